"""Config fields as data. A field of a config dataclass is declared with `option(default, help, rule)`:
its help, its valid values (a Rule) and how it appears on the command line live with the field, so
validation (`validate`), the checkpoint schema's ranges and the CLI's flags are all read from one place
(rules as data, in the spirit of pytest's `addoption`; no field is spelled out a second time).

Errors name fields, not flags: a message marks a field with `ref(name)`; `str()` shows the field's name
(for a notebook), the CLI renders the same mark as the field's flag. `FieldError` is a field whose value
it cannot take ("steps must be a positive integer, got 0").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

MARK = "\x00"  # around a field name in a message; never in a path or a printable value
_REF = re.compile(MARK + r"(\w+)" + MARK)
REQUIRED = dataclasses.MISSING  # the default of a field that must be given


def ref(name: str) -> str:
    """A field named in a message: shown as the field's name, or by the CLI as its flag."""
    return f"{MARK}{name}{MARK}"


def named(text: str, name: Callable[[str], str] = str) -> str:
    """`text` with every ref(field) replaced by name(field) (default: the field's own name)."""
    return _REF.sub(lambda m: name(m.group(1)), text)


class ConfigError(ValueError):
    """Bad input in one line, naming the fields concerned (with ref): str() names them as fields,
    render(flag_of) as the command line's flags."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return named(self.text)

    def render(self, name: Callable[[str], str]) -> str:
        return named(self.text, name)


class FieldError(ConfigError):
    """A field with a value it cannot take: "<field> <problem>" (the CLI: "<flag>: <problem>")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{ref(field)} {problem}")
        self.field, self.problem = field, problem

    def render(self, name: Callable[[str], str]) -> str:
        return f"{name(self.field)}: {named(self.problem, name)}"


# ---------------------------------------------------------------------------- rules
# A rule's problem(value) is None for a valid value, else what is wrong. `style` says how the error
# reads: "field" -> FieldError ("steps must be ..."), "value" -> "threads 0: expected ...".
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Count:
    """A positive integer: at least `lo` (`why` says why, when lo > 1), at most `hi`."""

    lo: int = 1
    hi: int = 2**63 - 1
    why: str = ""

    def problem(self, v: Any) -> str | None:
        if not _is_int(v) or v < 1:
            return f"must be a positive integer, got {v!r}"
        if v < self.lo:
            return f"must be at least {self.lo} ({self.why}), got {v!r}"
        if v > self.hi:
            return f"must be at most {self.hi:,}, got {v:,}"
        return None


@dataclass(frozen=True)
class Range:
    """An integer from lo to hi; `text` says what a valid value is when the bounds alone do not."""

    lo: int
    hi: int
    text: str = ""

    def problem(self, v: Any) -> str | None:
        if _is_int(v) and self.lo <= v <= self.hi:
            return None
        return f"must be {self.text or f'an integer from {self.lo} to {self.hi}'}, got {v!r}"


@dataclass(frozen=True)
class Positive:
    """A positive finite number, at most `hi` (None: no bound)."""

    hi: float | None = None

    def problem(self, v: Any) -> str | None:
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            return f"must be a positive finite number, got {v!r}"
        if self.hi is not None and v > self.hi:
            return f"must be at most {self.hi:g}, got {v!r}"
        return None


@dataclass(frozen=True)
class OneOf:
    """One of `options` (a live collection: a registry may grow after the rule is made)."""

    options: Collection[str]

    def problem(self, v: Any) -> str | None:
        return None if v in self.options else f"must be one of {tuple(self.options)}, got {v!r}"


@dataclass(frozen=True)
class Expect:
    """A value `test` accepts, described as `expected`; the error leads with the value given
    ("threads 0: expected a positive number of threads")."""

    test: Callable[[Any], bool]
    expected: str
    style: str = "value"

    def problem(self, v: Any) -> str | None:
        return None if _is_int(v) and self.test(v) else f"expected {self.expected}"


@dataclass(frozen=True)
class Between:
    """A finite number from lo to hi; `open_hi` excludes hi itself (Adam's betas stay below 1)."""

    lo: float
    hi: float
    open_hi: bool = False

    def problem(self, v: Any) -> str | None:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if number and self.lo <= v and (v < self.hi if self.open_hi else v <= self.hi):
            return None
        hi = f"{self.hi:g}" + (" (not included)" if self.open_hi else "")
        return f"must be a number from {self.lo:g} to {hi}, got {v!r}"


Rule = Count | Range | Positive | OneOf | Expect | Between


# ---------------------------------------------------------------------------- declaring fields
@dataclass(frozen=True)
class Option:
    """What a field says about itself: its help ("{default}" is replaced by its default), its rule,
    its flag ("" for none: a field the command line never sets), argparse's metavar, its help group
    (None: the command's own), and what a resumed run does with it ("fixed": kept, and refused when
    given; "kept": kept unless given; "given": the new command's value or the default, never kept)."""

    help: str
    rule: Rule | None = None
    flag: str | None = None  # default: "--" + the name with "-" for "_"
    metavar: str | None = None
    group: str | None = None
    resume: str = "fixed"


def option(default: Any, help: str, rule: Rule | None = None, **kw) -> Any:
    """A dataclass field carrying its Option (see there); `default` REQUIRED for none."""
    return dataclasses.field(default=default, metadata={"option": Option(help, rule, **kw)})


def options(cls) -> dict[str, Option]:
    """The declared options of a config dataclass, in field order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


def flag_of(name: str, opt: Option | None = None) -> str:
    if opt is not None and opt.flag is not None:
        return opt.flag
    return "--" + name.replace("_", "-")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def value_type(cls, name: str) -> type:
    """The field's type without Optional (int | None -> int)."""
    hint = _hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def error(name: str, value: Any, rule: Rule) -> ConfigError | None:
    """The error for `value` of field `name` under `rule`, or None when the value is valid."""
    problem = rule.problem(value)
    if problem is None:
        return None
    if getattr(rule, "style", "field") == "value":
        return ConfigError(f"{ref(name)} {value}: {problem}")
    return FieldError(name, problem)


def validate(obj) -> None:
    """Check every field of a config dataclass instance against its rule (None passes for an
    optional field); raises the first field's ConfigError."""
    for name, opt in options(type(obj)).items():
        v = getattr(obj, name)
        if v is None and opt.rule is not None and _optional(type(obj), name):
            continue
        if value_type(type(obj), name) is bool and not isinstance(v, bool):
            raise FieldError(name, f"must be True or False, got {v!r}")
        e = error(name, v, opt.rule) if opt.rule is not None else None
        if e is not None:
            raise e


def _optional(cls, name: str) -> bool:
    hint = _hints(cls)[name]
    return type(None) in typing.get_args(hint)


def int_bounds(cls, name: str) -> tuple[int, int]:
    """The inclusive integer range a field's rule allows (int64 when it has no simple bounds)."""
    rule = options(cls)[name].rule
    lo, hi = getattr(rule, "lo", None), getattr(rule, "hi", None)
    return (-(2**63) if lo is None else lo, 2**63 - 1 if hi is None else hi)
