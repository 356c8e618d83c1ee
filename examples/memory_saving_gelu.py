"""A memory-saving GELU (tanh form) as a torch.autograd.Function, checked with handgrad.

Written with torch ops, GELU's tanh form makes autograd save several tensors per element (x, x**3's
input, the tanh's output, the products' operands). This Function saves x alone and recomputes the
rest in backward:
    t = tanh(sqrt(2/pi) (x + 0.044715 x**3))
    d gelu/dx = 0.5 (1 + t) + 0.5 x (1 - t**2) sqrt(2/pi) (1 + 3 * 0.044715 x**2)
Its backward is written in torch ops on the saved input, so it is differentiable again: the check
runs the double backward (the gradgradcheck question) as well.

    python examples/memory_saving_gelu.py   # bytes saved for backward, then the reports; exit 0 if all pass
"""

import math
import sys

import torch

from handgrad.functions import check_function

SQRT_2_PI = math.sqrt(2 / math.pi)
A = 0.044715


def gelu_tanh(x):
    """The tanh form in torch ops: what autograd would differentiate (and save for) by itself."""
    return 0.5 * x * (1 + torch.tanh(SQRT_2_PI * (x + A * x**3)))


class MemorySavingGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # only the input: everything else is recomputed
        return gelu_tanh(x)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        t = torch.tanh(SQRT_2_PI * (x + A * x**3))
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + 3 * A * x * x))


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward when fn(x) is computed."""
    seen: dict[tuple, int] = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def main() -> int:
    x = torch.randn(256, 1024)
    plain, mine = saved_bytes(gelu_tanh, x), saved_bytes(MemorySavingGELU.apply, x)
    print(
        f"saved for backward, x of {x.numel() * x.element_size():,} bytes: autograd through the torch ops "
        f"{plain:,} bytes, MemorySavingGELU {mine:,} bytes ({plain / mine:.1f}x less)\n"
    )
    g = torch.Generator().manual_seed(0)
    reports = [
        check_function(MemorySavingGELU, (2 * torch.randn(6, 8, generator=g)).to(dtype))
        for dtype in (torch.float64, torch.float32, torch.bfloat16)
    ]
    for report in reports:
        print(report, end="\n\n")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
