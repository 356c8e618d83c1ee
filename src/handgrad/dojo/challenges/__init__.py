"""The coding challenges given alongside "Becoming a Backprop Ninja" (Karpathy, nn-zero-to-hero), one
file each: a plain Python file with marked blanks, graded like the exercises (items.py lists them).
"""

from handgrad.dojo.challenges import (
    attention,
    batchnorm,
    checkpoint,
    cross_entropy,
    embedding,
    gradcheck,
    layernorm,
    linear_tanh,
    rnn,
)

CHALLENGES = tuple(
    m.ITEM
    for m in (
        linear_tanh,
        cross_entropy,
        batchnorm,
        gradcheck,
        embedding,
        checkpoint,
        layernorm,
        attention,
        rnn,
    )
)
