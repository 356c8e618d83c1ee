"""`python -m handgrad.cli`, the same command as `handgrad` and `python -m handgrad`."""

from handgrad.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
