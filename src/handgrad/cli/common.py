"""What the command line's modules share: the bad-usage error, the flag a config field was given as, and
the one-line error printer (`handgrad: error: ...`, the field names in the message shown as flags)."""

from __future__ import annotations

import sys

from handgrad import config
from handgrad.config import ConfigError

FLAGS: dict[str, str] = {}  # config field -> its flag, for every flag made (errors name fields)


class UsageError(ConfigError):
    """A bad flag value or combination, found here; one line, exit code 2."""


def flag(name: str) -> str:
    return FLAGS.get(name) or config.flag_of(name)


def err(msg: str) -> None:
    print(f"handgrad: error: {config.named(msg, flag)}", file=sys.stderr)
