"""`python -m handgrad` is the `handgrad` command."""

from handgrad.cli import main

raise SystemExit(main())
