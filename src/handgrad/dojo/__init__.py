"""The Backprop Ninja dojo: the lecture's exercises and coding challenges as files a learner fills in (or
their own notebook), graded row by row with the mistake named, and the lecture's conceptual questions
(`ask(4)`, `answer(4, "a; b; 0.19")`) (Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja").
Plain functions returning report objects; the command line prints them.
"""

from handgrad.dojo.api import draw, grade, hint, items, next_hint, solution, start
from handgrad.dojo.grading import grade_file, grade_files
from handgrad.dojo.quiz import answer, ask
from handgrad.dojo.report import Grade

__all__ = [
    "Grade",
    "answer",
    "ask",
    "draw",
    "grade",
    "grade_file",
    "grade_files",
    "hint",
    "items",
    "next_hint",
    "solution",
    "start",
]
