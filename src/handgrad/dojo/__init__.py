"""The Backprop Ninja dojo: the lecture's exercises and coding challenges as files a learner fills in (or
their own notebook), graded row by row with the mistake named, and the lecture's conceptual questions
(`ask(4)`, `answer(4, "a; b; 0.19")`) (Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja").
Plain functions returning report objects; the command line prints them.

The names below are imported on first use (PEP 562), as handgrad's own are: the sandbox's modules
(sandbox.py, child.py) import without torch, so `handgrad dojo grade` can start the sandbox before the
grader has imported torch (handgrad.__main__).
"""

import importlib
import importlib.util

_PUBLIC = {  # name -> the module of the dojo that defines it
    "draw": "api", "grade": "api", "hint": "api", "items": "api", "next_hint": "api", "solution": "api",
    "start": "api", "grade_file": "grading", "grade_files": "grading", "answer": "quiz", "ask": "quiz",
    "Grade": "report",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """A public name, or one of the dojo's modules (`dojo.api`), imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"handgrad.dojo.{_PUBLIC[name]}"), name)
    elif importlib.util.find_spec(f"handgrad.dojo.{name}") is not None:
        value = importlib.import_module(f"handgrad.dojo.{name}")
    else:
        raise AttributeError(f"module 'handgrad.dojo' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
