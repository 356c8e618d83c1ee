"""The Backprop Ninja dojo: the lecture's exercises as files a learner fills in, graded gradient by
gradient with the mistake named (Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja").
"""

from handgrad.dojo.exercises import EXERCISES, start
from handgrad.dojo.grade import Grade, grade_file
from handgrad.dojo.hints import hint
from handgrad.dojo.notebook import grade
from handgrad.dojo.picture import write as draw

__all__ = ["EXERCISES", "Grade", "draw", "grade", "grade_file", "hint", "start"]
