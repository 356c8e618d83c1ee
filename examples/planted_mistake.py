"""A planted mistake and the report it gets: the memory-saving GELU of memory_saving_gelu.py with the
power rule's 3 forgotten in d(0.044715 x**3)/dx, the slip "GELU's constant" that the values alone
hardly show (the gradient is off by under 10% where |x| > 1, and nowhere near a sign or a scale).

handgrad records the Function's own forward, tries the common wrong forms of each op's derivative,
and says which one the gradient equals: here the power rule's factor 3 dropped in `x**3`.

    python examples/planted_mistake.py   # the report; exit code 0 when the check caught and named it
"""

import sys

import torch

from handgrad.functions import check_function

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from memory_saving_gelu import SQRT_2_PI, A, MemorySavingGELU  # noqa: E402


class GELUWithAPlantedMistake(MemorySavingGELU):
    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + A * x**3))
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + A * x * x))  # 3 * A meant


def main() -> int:
    x = 2 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    report = check_function(GELUWithAPlantedMistake, x)
    print(report)
    named = any("power rule's factor 3 dropped" in (r.diagnosis or "") for r in report.failures())
    return 0 if not report.passed and named else 1


if __name__ == "__main__":
    sys.exit(main())
