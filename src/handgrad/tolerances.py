"""Tolerances, defined once, for every comparison handgrad makes: against autograd (scaled to the rounding
level of the tensor's dtype and magnitude), against float64 central differences (gradcheck's
|a - n| <= atol + rtol * |n| rule), for naming a wrong gradient by a variant of the forward, and for
whole runs (--verify-autograd). References: torch.autograd.gradcheck's rule; Higham, "Accuracy and
Stability of Numerical Algorithms" (rounding first order in eps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


# The one home of every tolerance. A comparison allows a SLACK multiple of the error that rounding
# alone explains for that tensor, its `level`, which follows the tensor's dtype and magnitude:
# * against autograd (the same maths in another order, in the tensor's dtype d), level is the larger of
#   LEVEL_ULPS * eps(d) * max|reference| (a short chain of roundings of the largest entry; all that is
#   known when only the two tensors are given) and the rounding of this very computation,
#   measured as max|autograd in float32 - autograd in float64| and rescaled to d by eps(d)/eps(float32)
#   (rounding errors are first order in eps). The measurement sees cancellation: batchnorm's dx at
#   batch 2 is ~1e-5 of the terms it is made of, so its rounding is ~1e5 ulps of max|dx|, and an
#   atol tied to max|dx| (or to the lecture's ~1e-2 gradients) fails correct code.
# * against float64 central differences with step h: level = eps(float64) * S / 2h, the rounding
#   noise of the two forwards, where S sums |output * dout| over the outputs the step moved. The
#   truncation error h^2 |f'''| / 6 is relative to the derivative: FD_TOL.rtol.
def machine_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps)


@dataclass(frozen=True)
class Tolerance:
    """gradcheck's rule, element by element: |manual - reference| <= atol + rtol * |reference|.
    `level` is the error that rounding alone explains for this tensor (0 when not known) and
    `source` says what it measures; the scale-aware rules below set atol to a multiple of it."""

    rtol: float
    atol: float
    level: float = 0.0
    source: str = ""

    def holds(self, manual: Tensor, reference: Tensor) -> bool:
        return bool(((manual - reference).abs() <= self.atol + self.rtol * reference.abs()).all())

    def verdict(self, err: float) -> str:
        """Say how an error of this size compares with the level ('' when the level is unknown)."""
        if not self.level > 0 or not math.isfinite(err):
            return ""
        k = err / self.level
        if err <= self.atol:
            where = "within tolerance of it"
        elif err > FAR_ABOVE * self.atol:
            where = "far above it, a real difference"
        else:
            where = "above it"
        return f"max error {err:.2e} is {k:.3g}x the {self.source} ({self.level:.1e}): {where}"

    def __str__(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol:.3g}"


# Slack over the level, measured on correct code (tests/test_check.py, 10 seeds each of linear, tanh,
# linear+tanh, GELU, softmax, layernorm, batchnorm at batch 2..64, float32 and float64): the worst
# |manual - autograd| was 2.1 levels, the worst |analytic - finite difference| 0.5 levels.
AUTOGRAD_SLACK = 16.0
LEVEL_ULPS = 8.0  # the level from the magnitude alone: 8 ulps of max|reference|
# float16 and bfloat16 (eps above LOW_PRECISION_EPS): 8 ulps x 16 would be the whole value in bfloat16
# (2^-7 x 128 = 1), so the magnitude floor is 1 ulp of max|reference| and the elementwise rtol 2 eps.
# Measured on correct Functions (tests/function_corpus.py, and layernorm, batchnorm at batch 2 and 256,
# softmax over 512, attention, GELU, cross-entropy over 100 classes, 2 seeds each, both dtypes): the
# worst |manual - autograd| was 6.6 such levels (batchnorm at batch 2 in float16, where the measured
# float32-vs-float64 rounding dominates), 4 levels elsewhere.
LOW_PRECISION_EPS = 1e-3
LOW_LEVEL_ULPS = 1.0
LOW_RTOL_ULPS = 2.0
FD_SLACK = 32.0
FAR_ABOVE = 100.0  # an error over 100 tolerances is "far above" the level
# Central differences in float64 with step FD_EPS: the truncation h^2 |f'''| / 6 is ~1e-13 of f' for
# functions that change on a length scale of ~1; rtol 1e-5 allows length scales down to ~3e-4 and
# still flags n/(n-1) = 1.03 at n = 32 by orders of magnitude. Batchnorm's eps left out changes dx by
# only ~eps/var (measured 6e-6 at unit variance), below this rtol: the float64 replay of the
# hand-written backward against float64 autograd is what catches it. atol comes from the scale, above.
FD_EPS = 1e-6
FD_TOL = Tolerance(rtol=1e-5, atol=0.0)
FD_MAX_ELEMENTS = 512  # tensors up to this size are checked element by element; larger: a sample
FD_DIRECTIONS = 2  # plus this many random unit directions for sampled tensors (covers every element)
FD_SHAPE_LIMIT = 4096  # a wrong-shaped gradient is diagnosed against the full FD gradient up to this size
KINK_STEP = 8  # a failing check is looked at again with step h / KINK_STEP ...
KINK_PERSISTS = 0.5  # ... and is a kink when its one-sided derivatives still differ by half as much
# A failing check at a smooth point is measured again with step h * KINK_STEP: rounding noise shrinks
# KINK_STEP-fold, truncation grows KINK_STEP**2-fold (still far below rtol). Noise the level misses
# (inputs that cancel, as in batchnorm over 2 rows: x - mean is ~1e-2 of x) then stops failing; a wrong
# gradient fails at both steps.


# Naming a wrong gradient (handgrad.variants): it "equals" a variant of the forward when they agree
# within VARIANT_MATCH of the largest entry (float64 rounding of two orders of the same formula sits
# ~1e-15 of it, ~1e-11 under batchnorm's cancellation at batch 2) and the variant differs from the
# right gradient by at least VARIANT_DISTINCT (100x further from the right one than from the user's;
# eps = 1e-5 left out of a normalisation changes its gradient by ~eps/var, 1e-6 to 1e-5 of it).
VARIANT_MATCH = 1e-9
VARIANT_DISTINCT = 1e-7
# Second order and forward mode are compared in float64 only (no float32 rerun measures their
# cancellation): their rounding level is this fraction of the reference's largest entry (~1e5 ulps).
SECOND_ORDER_LEVEL = 1e-11


# Relative agreement of whole-run quantities between the hand-written and the autograd path, by dtype:
# `--verify-autograd`'s per-step loss difference (issue 11: <= 1e-5 in float32, <= 1e-12 in float64) and
# the diagnostics' sanity checks (relative to one dlogits entry, or to the largest gradient entry).
RUN_TOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-12}


def run_tolerance(dtype: torch.dtype) -> float:
    """RUN_TOL for this dtype (float32's for any other)."""
    return RUN_TOL.get(dtype, RUN_TOL[torch.float32])


def autograd_tolerance(dtype: torch.dtype, reference: Tensor | None = None,
                       measured: float = 0.0) -> Tolerance:
    """The tolerance against autograd for a tensor of this dtype: AUTOGRAD_SLACK times its level,
    the larger of LEVEL_ULPS * eps(dtype) * max|reference| (magnitude 1 without a reference; 1 ulp
    for float16 and bfloat16) and `measured`, the rounding measured for this computation (see
    measured_level)."""
    eps = machine_eps(dtype)
    low = eps > LOW_PRECISION_EPS
    scale = float(reference.detach().abs().max()) if reference is not None and reference.numel() else 1.0
    ulps = LOW_LEVEL_ULPS if low else LEVEL_ULPS
    level = max(ulps * eps * scale if math.isfinite(scale) else 0.0, measured)
    rtol = (LOW_RTOL_ULPS if low else AUTOGRAD_SLACK) * eps
    return Tolerance(rtol=rtol, atol=AUTOGRAD_SLACK * level, level=level,
                     source=f"{str(dtype).replace('torch.', '')} rounding level at this tensor's magnitude")


def measured_level(r32: Tensor | None, r64: Tensor | None, dtype: torch.dtype) -> float:
    """The rounding of one computation in `dtype`: how far its float32 result lies from its float64
    result, times eps(dtype)/eps(float32). 0 when the two cannot be compared."""
    if not (isinstance(r32, Tensor) and isinstance(r64, Tensor)) or r32.shape != r64.shape or not r64.numel():
        return 0.0
    d = float((r32.detach().double() - r64.detach().double()).abs().max())
    return d * machine_eps(dtype) / machine_eps(torch.float32) if math.isfinite(d) else 0.0


def fd_tolerance(level: float, base: Tolerance = FD_TOL) -> Tolerance:
    """The tolerance against float64 central differences whose rounding noise is `level`."""
    return Tolerance(rtol=base.rtol, atol=max(base.atol, FD_SLACK * level), level=level,
                     source="finite-difference noise level (float64 forwards, step h)")
