"""The Backprop Ninja dojo: the lecture's exercises as files a learner fills in, graded gradient by
gradient with the mistake named, and its conceptual questions (`ask(4)`, `answer(4, "a; b; 0.19")`)
(Karpathy, "Building makemore Part 4: Becoming a Backprop Ninja").
"""

from handgrad.dojo.exercises import EXERCISES, start
from handgrad.dojo.grade import Grade, grade_file
from handgrad.dojo.hints import hint
from handgrad.dojo.notebook import grade
from handgrad.dojo.picture import write as draw
from handgrad.dojo.quiz import answer, ask

__all__ = ["EXERCISES", "Grade", "answer", "ask", "draw", "grade", "grade_file", "hint", "start"]
