"""The coding challenges given alongside "Becoming a Backprop Ninja" (Karpathy, nn-zero-to-hero), one
file each: a plain Python file with marked blanks, graded like the exercises (items.py lists them).
"""

from handgrad.dojo.challenges import batchnorm, checkpoint, cross_entropy, embedding, gradcheck, linear_tanh

CHALLENGES = tuple(m.ITEM for m in (linear_tanh, cross_entropy, batchnorm, gradcheck, embedding, checkpoint))
