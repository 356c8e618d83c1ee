"""Prove gradients: per-tensor comparisons against autograd (the lecture's `cmp`, llm.c
`check_tensor`), strict shapes, float64 central finite differences with gradcheck's pass rule, and a
diagnosis of the usual mistakes. `check_backward` checks a user's own forward/backward pair,
`check_layer` and `check_model` a layer or a model of the layer library (forward -> (out, cache),
backward -> (dx, {name: dparam})), `run_lecture_check` the lecture's atomic graph and closed forms.
Checking code: with the tests, the only place autograd is used. The library never prints.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from handgrad import atomic, ops
from handgrad.atomic import LectureConfig, Params, init_params
from handgrad.data import default_data_path, make_splits, read_words
from handgrad.limits import Overran, limited, overran_message
from handgrad.report import Column, Table
from handgrad.tolerances import (  # the tolerances, re-exported: check.X is their public name
    AUTOGRAD_SLACK as AUTOGRAD_SLACK,
)
from handgrad.tolerances import (
    FAR_ABOVE as FAR_ABOVE,
)
from handgrad.tolerances import (
    FD_DIRECTIONS as FD_DIRECTIONS,
)
from handgrad.tolerances import (
    FD_EPS as FD_EPS,
)
from handgrad.tolerances import (
    FD_MAX_ELEMENTS as FD_MAX_ELEMENTS,
)
from handgrad.tolerances import (
    FD_SHAPE_LIMIT as FD_SHAPE_LIMIT,
)
from handgrad.tolerances import (
    FD_SLACK as FD_SLACK,
)
from handgrad.tolerances import (
    FD_TOL as FD_TOL,
)
from handgrad.tolerances import (
    KINK_PERSISTS as KINK_PERSISTS,
)
from handgrad.tolerances import (
    KINK_STEP as KINK_STEP,
)
from handgrad.tolerances import (
    LEVEL_ULPS as LEVEL_ULPS,
)
from handgrad.tolerances import (
    LOW_LEVEL_ULPS as LOW_LEVEL_ULPS,
)
from handgrad.tolerances import (
    LOW_PRECISION_EPS as LOW_PRECISION_EPS,
)
from handgrad.tolerances import (
    LOW_RTOL_ULPS as LOW_RTOL_ULPS,
)
from handgrad.tolerances import (
    RUN_TOL as RUN_TOL,
)
from handgrad.tolerances import (
    SECOND_ORDER_LEVEL as SECOND_ORDER_LEVEL,
)
from handgrad.tolerances import (
    VARIANT_DISTINCT as VARIANT_DISTINCT,
)
from handgrad.tolerances import (
    VARIANT_MATCH as VARIANT_MATCH,
)
from handgrad.tolerances import (
    Tolerance as Tolerance,
)
from handgrad.tolerances import (
    autograd_tolerance as autograd_tolerance,
)
from handgrad.tolerances import (
    fd_tolerance as fd_tolerance,
)
from handgrad.tolerances import (
    machine_eps as machine_eps,
)
from handgrad.tolerances import (
    measured_level as measured_level,
)
from handgrad.tolerances import (
    run_tolerance as run_tolerance,
)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Finite differences run thousands of tiny forwards; intra-op threads only add overhead there,
    and on a busy 2-core machine OpenMP's waiting made them 400x slower (40 ms instead of 0.1 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- diagnosis
def _scale_names(k: float, sizes: Mapping[str, int]) -> list[str]:
    """Name the constant k in terms of the problem's sizes (1/n, n/(n-1), 2, ...)."""
    cands: list[tuple[float, str]] = [(2.0, "2 (a stray factor 2?)"),
                                      (0.5, "1/2 (a missing factor 2, as in d(x**2) = 2x?)")]
    for label, s in sizes.items():
        if s < 2:
            continue
        cands += [
            (s, f"{label} (a missing 1/{label}?)"),
            (1 / s, f"1/{label} (divided by {label} once too often?)"),
            (s / (s - 1), f"{label}/({label}-1) (divides by {label}-1 where {label} was meant?)"),
            ((s - 1) / s, f"({label}-1)/{label} (divides by {label} where Bessel's {label}-1 was meant?)"),
        ]
        if s > 2:
            cands += [(s - 1, f"{label}-1 (a missing 1/({label}-1)?)"),
                      (1 / (s - 1), f"1/({label}-1) (divided by {label}-1 once too often?)")]
    return [name for value, name in cands if abs(k - value) <= 1e-6 * abs(value)]


def _describe_scale(k: float, sizes: Mapping[str, int]) -> str:
    frac = Fraction(abs(k)).limit_denominator(1000)
    ratio = f" = {frac}" if abs(abs(k) - float(frac)) <= 1e-6 * abs(k) and frac.denominator > 1 else ""
    names = _scale_names(abs(k), sizes)
    sign = "sign flipped and " if k < 0 else ""
    text = f"{sign}scaled by a constant: manual = {k:.7g}{ratio} x reference"
    if names:
        text += "; " + " or ".join(f"{abs(k):.7g} = {nm}" for nm in names)
    return text


def _close(a: Tensor, b: Tensor, tol: Tolerance) -> bool:
    return a.shape == b.shape and tol.holds(a, b)


def _reordered(m: Tensor, r: Tensor, tol: Tolerance) -> tuple[str, tuple[int, ...]] | None:
    """('permute', p) when m equals r.permute(p), ('view', p) when m equals r.permute(p) viewed in
    m's shape: the data laid out in another dimension order. None when no permutation fits."""
    if m.numel() != r.numel() or not 2 <= r.dim() <= 4 or m.numel() < 2:
        return None
    ident = tuple(range(r.dim()))
    for p in itertools.permutations(ident):
        if p == ident:
            continue
        rp = r.permute(p)
        if _close(rp.reshape(r.shape), r, tol):  # the permutation moves nothing that can be told apart
            continue
        if tuple(rp.shape) == tuple(m.shape) and _close(m, rp, tol):
            return "permute", p
        if _close(m, rp.reshape(m.shape), tol):
            return "view", p
    return None


def _close_diagnosis(m: Tensor, r: Tensor, tol: Tolerance) -> str:
    """Two tensors within 1e-4 of each other: rounding, or a small formula difference?"""
    err = float((m - r).abs().max())
    rel = err / float(r.abs().max())
    ref = tol if tol.level > 0 else autograd_tolerance(r.dtype, r)
    if err <= ref.atol:
        return (f"close (max relative error {rel:.1e}) and {ref.verdict(err)}: a rounding-order difference, "
                f"not a wrong formula (the tolerance given, {tol}, is tighter than that)")
    low = ""
    if r.dtype == torch.float64 and FLOAT32_SIZED[0] <= rel <= FLOAT32_SIZED[1]:
        low = ("; a difference of float32's size in a float64 computation: a float32 constant or "
               "intermediate inside (torch.where or torch.tensor with python floats, a .float())?")
    return (f"close (max relative error {rel:.1e}) but {ref.verdict(err)}: a small formula difference, "
            f"not rounding (a missing eps? a constant slightly off? a dropped term?){low}")


FLOAT32_SIZED = (1e-10, 1e-6)  # relative errors a float32 value inside a float64 computation leaves


def _values_diagnosis(m: Tensor, r: Tensor, tol: Tolerance, sizes: Mapping[str, int],
                      index: Sequence[Tensor]) -> str:
    """Why two same-shaped tensors differ (sign, scale, transpose, view order, repeated-index rows)."""
    if not torch.isfinite(m).all():
        return "the gradient contains NaN or inf"
    if not m.any() and r.any():
        return "all zeros: the gradient was never written (or the upstream was lost)"
    if _close(-m, r, tol):
        return "sign flipped: manual = -reference"
    if m.dim() == 2 and m.shape[0] == m.shape[1] and _close(m.T, r, tol):
        return "transposed: manual.T matches the reference (x.T @ dout vs dout.T @ x?)"
    order = _reordered(m, r, tol)
    if order:
        return (f"a view in the wrong dimension order: manual equals reference.permute{order[1]}"
                f".reshape{tuple(r.shape)} (a .view/.reshape where a .permute/.transpose was needed, "
                "or the dimensions listed in the wrong order)")
    rr = float((r.double() * r.double()).sum())
    fit = math.inf
    if rr > 0:
        k = float((m.double() * r.double()).sum()) / rr
        fit = float(((m.double() - k * r.double()).norm()) / max(float(m.double().norm()), 1e-300))
    sliced = _slice_scales(m, r, fit)  # a factor per row or column fits far better than one for all
    if sliced:
        return sliced
    if fit <= 1e-5 and abs(k - 1) > 1e-5:
        return _describe_scale(k, sizes)
    scale = float(r.abs().max())
    if scale > 0 and float((m - r).abs().max()) / scale < 1e-4:
        return _close_diagnosis(m, r, tol)
    if m.dim() >= 1 and m.shape[0] > 1:
        ok = (m - r).abs() <= tol.atol + tol.rtol * r.abs()  # (R, ...)
        bad = {i for i in range(m.shape[0]) if not bool(ok[i].all())}
        if 0 < len(bad) < m.shape[0]:
            for ix in index:
                vals, counts = ix.reshape(-1).unique(return_counts=True)
                repeated = set(vals[counts > 1].tolist())
                if bad <= repeated:
                    return (f"correct except on {len(bad)} of {m.shape[0]} rows, each a row whose index "
                            f"repeats in the index tensor (rows {sorted(bad)[:8]}): contributions were "
                            "overwritten instead of accumulated (use index_add_ or +=)")
            return (f"correct on {m.shape[0] - len(bad)} of {m.shape[0]} rows, wrong on rows "
                    f"{sorted(bad)[:8]}{'...' if len(bad) > 8 else ''} (an index that repeats and "
                    "was overwritten instead of accumulated?)")
    if m.dim() >= 2 and m.shape[-1] > 1:
        ok = ((m - r).abs() <= tol.atol + tol.rtol * r.abs()).reshape(-1, m.shape[-1])  # (R, C)
        bad_cols = [j for j in range(m.shape[-1]) if not bool(ok[:, j].all())]
        if 0 < len(bad_cols) < m.shape[-1]:
            return (f"correct on {m.shape[-1] - len(bad_cols)} of {m.shape[-1]} columns (the last dim), "
                    f"wrong on columns {bad_cols[:8]}{'...' if len(bad_cols) > 8 else ''} (a boundary or an "
                    "index range off by one?)")
    return ("values differ, with no simple pattern (not a sign, constant scale, transpose, "
            "dimension order, row or column subset)")


SLICE_FIT = 1e-6  # a slice "is a constant times" the reference: relative residual below this


def _slice_scales(m: Tensor, r: Tensor, one_fit: float = math.inf) -> str:
    """manual = k_i x reference along each row (dim 0) or each column (the last dim), with k varying
    (the fit 100x better than one constant's, `one_fit`): a factor that depends on the row or column,
    e.g. its own statistics taken with and without eps."""
    if m.dim() < 2 or m.numel() < 4:
        return ""
    for dim, what in ((0, "row"), (m.dim() - 1, "column")):
        mm = m.double().movedim(dim, 0).reshape(m.shape[dim], -1)  # (S, rest)
        rr = r.double().movedim(dim, 0).reshape(m.shape[dim], -1)
        nn = (rr * rr).sum(1)  # (S,)
        if mm.shape[0] < 2 or mm.shape[1] < 2 or not bool((nn > 0).all()):
            continue
        k = (mm * rr).sum(1) / nn  # (S,)
        resid = float((mm - k[:, None] * rr).norm() / max(float(mm.norm()), 1e-300))
        spread = float(k.max() - k.min())
        if resid <= SLICE_FIT and resid * 100 < one_fit and spread > 1e-9 * max(float(k.abs().max()), 1e-300):
            near1 = bool(((k - 1).abs() < 1e-2).all())
            hint = (f": close to 1, as a per-{what} statistic with and without eps (eps left out?)" if near1
                    else f" (a per-{what} statistic, a norm or a count, wrong?)")
            return (f"each {what} scaled by its own constant: manual = k x reference with k from "
                    f"{float(k.min()):.7g} to {float(k.max()):.7g} across {what}s{hint}")
    return ""


def _broadcast_dims(small: tuple[int, ...], big: tuple[int, ...]) -> list[int] | None:
    """The dims of `big` that a tensor shaped `small` is broadcast over (aligned right, as torch
    broadcasts), or None when `small` does not broadcast to `big`."""
    if len(small) > len(big):
        return None
    lead = len(big) - len(small)
    dims = list(range(lead))
    for i, s in enumerate(small):
        if s == big[lead + i]:
            continue
        if s != 1:
            return None
        dims.append(lead + i)
    return dims


def _shape_diagnosis(m: Tensor, want: tuple[int, ...], r: Tensor | None, tol: Tolerance,
                     sizes: Mapping[str, int], index: Sequence[Tensor]) -> str:
    """Why a gradient shaped like m is not shaped `want`; with the reference r (None when it is not
    known), also which simple mistake produced it: not summed, not broadcast back, a view or a
    transpose in the wrong order."""
    got = tuple(m.shape)
    head = f"shape {got} but the tensor is {want}"
    same_numel = m.numel() == math.prod(want)
    if same_numel and [s for s in got if s != 1] == [s for s in want if s != 1]:
        values = ""
        if r is not None:
            values = "the values agree; " if _close(m.reshape(want), r, tol) else \
                _values_diagnosis(m.reshape(want), r, tol, sizes, index) + "; "
        return (f"{head}: a dimension of size 1 is missing or extra (keepdim=True forgotten?); "
                f"{values}a gradient must have exactly its tensor's shape even where it would broadcast")
    if same_numel and r is not None:
        if _close(m.reshape(want), r, tol):
            return (f"{head}: the right values viewed in the wrong shape (manual.reshape{want} matches the "
                    "reference): a .view/.reshape to the wrong shape")
        if m.dim() == 2 and r.dim() == 2 and got == want[::-1] and _close(m.T, r, tol):
            return f"{head}: transposed, manual.T matches the reference (dout.T @ x instead of x.T @ dout?)"
        order = _reordered(m, r, tol)
        if order and order[0] == "permute":
            return (f"{head}: dimensions in the wrong order, manual equals reference.permute{order[1]} "
                    "(a transpose/permute missing or one too many)")
        if order:
            return (f"{head}: a view in the wrong dimension order, manual equals reference.permute{order[1]}"
                    f".reshape{got} (a .view/.reshape where a .permute/.transpose was needed)")
    if m.dim() == 2 and len(want) == 2 and got == want[::-1]:
        return f"{head}: transposed shape" + (" (and manual.T does not match either)" if r is not None
                                              else "")
    summed = _broadcast_dims(want, got)
    if summed:  # m is bigger: the gradient of a tensor broadcast over these dims, not yet summed
        keep = len(want) == len(got)
        how = f".sum({summed[0] if len(summed) == 1 else tuple(summed)}{', keepdim=True' if keep else ''})"
        if r is None:
            return f"{head}: not summed over the broadcast dim(s) {summed} ({how})"
        red = m.sum(summed, keepdim=True).reshape(want)
        if _close(red, r, tol):
            return (f"{head}: not summed over dim(s) {summed}, its sum over them equals the reference "
                    f"(a broadcast tensor's gradient is summed over the broadcast dims: {how})")
        return (f"{head}: the broadcast dim(s) {summed} are not summed over, and the sum over them does "
                "not match the reference either")
    spread = _broadcast_dims(got, want)
    if spread and r is not None and _close(m.expand(want), r, tol):
        return (f"{head}: not broadcast back, the reference is manual expanded over dim(s) {spread} "
                "(a gradient that comes back through a reduction must be expanded to the input's shape)")
    if m.dim() == len(want) and m.dim() >= 1:
        ones_m = {i for i, s in enumerate(got) if s == 1}
        ones_r = {i for i, s in enumerate(want) if s == 1}
        if ones_m != ones_r and (ones_m or ones_r):
            return (f"{head}: summed over the wrong dimension? (reduced dims {sorted(ones_m)} where the "
                    f"reference keeps size 1 in dims {sorted(ones_r)})")
        if m.dim() == 1:
            return f"{head}: summed over the wrong dimension? (.sum(1) where .sum(0) was meant)"
    if spread is not None:
        return f"{head}: it would broadcast, but a gradient must have exactly its tensor's shape"
    return head


def diagnose(manual: Tensor, reference: Tensor, tol: Tolerance | None = None,
             sizes: Mapping[str, int] | None = None, index: Sequence[Tensor] = ()) -> str:
    """Say why `manual` is not `reference`: shape (missing keepdim, not summed over a broadcast dim,
    not broadcast back, transposed, a view in the wrong dimension order, wrong reduced dimension),
    sign flipped, scaled by a recognisable constant (1/n, n/(n-1), 2, ...), transposed, close but
    above rounding level, or wrong only on rows whose index repeats in one of `index` (overwrite
    instead of accumulate). `sizes` names the problem's sizes, e.g. {"n": 32}, so a scale can be
    named. '' if they agree."""
    tol = tol or autograd_tolerance(reference.dtype, reference)
    sizes = sizes or {}
    if tuple(manual.shape) != tuple(reference.shape):
        return _shape_diagnosis(manual, tuple(reference.shape), reference, tol, sizes, index)
    if manual.dtype != reference.dtype:
        return f"dtype {manual.dtype} but the tensor is {reference.dtype}"
    if tol.holds(manual, reference):
        return ""
    return _values_diagnosis(manual, reference, tol, sizes, index)


def _with_verdict(diag: str, tol: Tolerance, err: float) -> str:
    """Append to a failure's diagnosis whether its error is at the level rounding explains."""
    verdict = tol.verdict(err)
    return f"{diag} [{verdict}]" if verdict and "level" not in diag else diag


# ---------------------------------------------------------------------------- compare
@dataclass
class Comparison:
    """One tensor's hand-written gradient against a reference gradient."""

    name: str
    shape: tuple[int, ...]  # the manual gradient's shape
    ref_shape: tuple[int, ...]  # the tensor's (reference gradient's) shape
    exact: bool  # bitwise equal (and same shape)
    allclose: bool  # within tol, element by element (and same shape)
    max_abs_diff: float  # max |manual - reference| (nan when the shapes cannot be compared)
    rel_err: float  # max_abs_diff / max|reference|: relative to the tensor's scale
    tol: Tolerance
    diagnosis: str = ""  # why it failed; '' when it passed
    note: str = ""  # said even when it passes (differences excused at points of non-differentiability)
    excused: bool = False  # differs only where the function is not differentiable (see excuse_kinks)

    @property
    def passed(self) -> bool:
        return self.shape == self.ref_shape and (self.exact or self.allclose or self.excused)


def compare(name: str, manual: Tensor, reference: Tensor, tol: Tolerance | None = None,
            sizes: Mapping[str, int] | None = None, index: Sequence[Tensor] = ()) -> Comparison:
    """The lecture's cmp, shape-strict: a gradient whose shape differs from its tensor's fails even
    when it would broadcast. `tol` defaults to autograd_tolerance for the reference's dtype and
    magnitude; pass one with a measured level (check_backward does) where rounding is larger."""
    tol = tol or autograd_tolerance(reference.dtype, reference)
    if not isinstance(manual, Tensor):
        return Comparison(name, (), tuple(reference.shape), False, False, math.nan, math.nan, tol,
                          f"no gradient: the backward returned {type(manual).__name__}, not a Tensor")
    manual, reference = manual.detach(), reference.detach()
    same = tuple(manual.shape) == tuple(reference.shape)
    if same or manual.numel() == reference.numel():
        m = manual.reshape(reference.shape).to(reference.dtype)
        diff = float((m - reference).abs().max()) if m.numel() else 0.0
    else:
        diff = math.nan
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    exact = same and manual.dtype == reference.dtype and torch.equal(manual, reference)
    close = same and manual.dtype == reference.dtype and tol.holds(manual, reference)
    diag = ""
    if not (exact or close):
        diag = diagnose(manual, reference, tol, sizes, index)  # never '' here
        if same:
            verdict_tol = tol if tol.level > 0 else autograd_tolerance(reference.dtype, reference)
            diag = _with_verdict(diag, verdict_tol, diff)
    return Comparison(name, tuple(manual.shape), tuple(reference.shape), exact, close, diff, rel, tol, diag)


# ---------------------------------------------------------------------------- finite differences
@dataclass
class FDResult:
    """A hand-written gradient against float64 central differences."""

    name: str
    shape: tuple[int, ...]
    elements: int  # elements checked one by one
    numel: int  # elements in the tensor
    directions: int  # random unit directions checked
    max_abs_err: float  # max |analytic - numeric| over the checks
    worst_ratio: float  # max |analytic - numeric| / (atol + rtol |numeric|): <= 1 passes
    tol: Tolerance
    diagnosis: str = ""
    kinks: int = 0  # checks at a point where the function is not differentiable (not compared)
    note: str = ""  # said even when it passes (the kinks)
    kink_elements: tuple[int, ...] = ()  # flat indices of the elements excused as kinks

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0


@dataclass(frozen=True)
class _Probe:
    """One central difference of sum(fn() * dout) along a perturbation, with its one-sided halves."""

    central: float  # (f(x + h v) - f(x - h v)) / 2h
    right: float  # (f(x + h v) - f(x)) / h
    left: float  # (f(x) - f(x - h v)) / h
    magnitude: float  # S: sum of |f(x) * dout| over the outputs the perturbation moved (else the max)


def _probe(fn: Callable[[], Tensor], x: Tensor, f0: Tensor, w: Tensor, h: float,
           where: int | None, v: Tensor | None) -> _Probe:
    """Perturb x in place by +-h at flat index `where` (or by +-h v), evaluate fn, restore x."""
    flat = x.view(-1)
    with torch.no_grad():
        if where is None:
            x.add_(h * v)
            plus = fn().detach().clone()
            x.sub_(2 * h * v)
            minus = fn().detach().clone()
            x.add_(h * v)
        else:
            orig = flat[where].clone()
            flat[where] = orig + h
            plus = fn().detach().clone()
            flat[where] = orig - h
            minus = fn().detach().clone()
            flat[where] = orig
    moved = plus != minus  # only these outputs carry the perturbation's rounding noise
    terms = f0.abs() * w.abs()
    # nothing moved (a derivative below the outputs' resolution, e.g. a loss that does not depend on a
    # bias batchnorm removes): the difference resolves no finer than the largest single term
    magnitude = float(terms[moved].sum()) if moved.any() else float(terms.max()) if terms.numel() else 0.0
    return _Probe(float(((plus - minus) * w).sum()) / (2 * h),  # difference first: less cancellation
                  float(((plus - f0) * w).sum()) / h, float(((f0 - minus) * w).sum()) / h, magnitude)


def _fd_level(magnitudes: Sequence[float], eps: float) -> float:
    """The rounding noise of a central difference whose forwards sum terms of size S: eps64 S / 2h."""
    return machine_eps(torch.float64) * max(magnitudes, default=0.0) / (2 * eps)


def _numeric_gradient(fn: Callable[[], Tensor], x: Tensor, dout: Tensor | None,
                      eps: float) -> tuple[Tensor, float]:
    """The full central-difference gradient of sum(fn() * dout) in x, and its noise level."""
    with torch.no_grad():
        f0 = fn().detach().clone()
    w = torch.ones_like(f0) if dout is None else dout.to(torch.float64).to(f0.device).expand_as(f0)
    with _one_thread():
        probes = [_probe(fn, x, f0, w, eps, i, None) for i in range(x.numel())]
    num = torch.tensor([p.central for p in probes], dtype=torch.float64).reshape(x.shape)
    return num, _fd_level([p.magnitude for p in probes], eps)


def _kink(fn: Callable[[], Tensor], x: Tensor, f0: Tensor, w: Tensor, eps: float, where: int | None,
          v: Tensor | None, p: _Probe, analytic: float, bound: float, level: float) -> str:
    """'' at a differentiable point; 'between' at a kink (a tie of a max, a relu at 0) where the
    analytic value lies between the one-sided derivatives (a valid choice there); 'outside' at a kink
    where it does not. At a kink the one-sided derivatives differ by a jump that does not shrink with
    the step; at a smooth point they differ by h f'' (shrinks) plus noise (below 16 x FD_SLACK levels)."""
    jump = abs(p.right - p.left)
    if not jump > max(bound, 16 * FD_SLACK * level):
        return ""
    q = _probe(fn, x, f0, w, eps / KINK_STEP, where, v)
    if not abs(q.right - q.left) >= KINK_PERSISTS * jump:
        return ""
    lo, hi = min(p.left, p.right, q.left, q.right), max(p.left, p.right, q.left, q.right)
    return "between" if lo - bound <= analytic <= hi + bound else "outside"


def finite_differences(fn: Callable[[], Tensor], x: Tensor, analytic: Tensor, name: str = "x",
                       dout: Tensor | None = None, *, eps: float = FD_EPS, tol: Tolerance | None = None,
                       max_elements: int = FD_MAX_ELEMENTS, directions: int = FD_DIRECTIONS,
                       seed: int = 0, sizes: Mapping[str, int] | None = None,
                       index: Sequence[Tensor] = ()) -> FDResult:
    """Check `analytic` = d(sum(fn() * dout))/dx by central differences, no autograd: every element
    when x has at most max_elements, else a seeded random sample of them plus `directions` random
    unit directions v, comparing <analytic, v> with (f(x + eps v) - f(x - eps v)) / 2eps.
    fn() must read x, a float64 tensor, which is perturbed in place and restored. `tol` defaults to
    fd_tolerance of the measured noise level. A check that fails at a point where fn is not
    differentiable (a tie, a kink) is not counted when the analytic value lies between the
    one-sided derivatives there; FDResult.note says so. `sizes` and `index` feed the diagnosis."""
    if x.dtype != torch.float64:
        raise TypeError(f"finite differences need a float64 tensor, got {x.dtype}")
    if not isinstance(analytic, Tensor):
        return FDResult(name, (), 0, x.numel(), 0, math.nan, math.inf, tol or FD_TOL,
                        f"no gradient: the backward returned {type(analytic).__name__}, not a Tensor")
    if tuple(analytic.shape) != tuple(x.shape):  # diagnosed against the finite differences themselves
        num, level = _numeric_gradient(fn, x, dout, eps) if x.numel() <= FD_SHAPE_LIMIT else (None, 0.0)
        t = tol or fd_tolerance(level)
        msg = _shape_diagnosis(analytic.detach().double().cpu(), tuple(x.shape), num, t, sizes or {}, index)
        return FDResult(name, tuple(analytic.shape), 0, x.numel(), 0, math.nan, math.inf, t, msg)
    a = analytic.detach().to(torch.float64).reshape(-1).cpu()  # (numel,) the comparisons run on the CPU
    with torch.no_grad():
        f0 = fn().detach().clone()
    w = torch.ones_like(f0) if dout is None else dout.to(torch.float64).to(f0.device).expand_as(f0)

    g = torch.Generator().manual_seed(seed)
    n = x.numel()
    picks = torch.arange(n) if n <= max_elements else torch.randperm(n, generator=g)[:max_elements]
    dirs = 0 if n <= max_elements else directions
    vs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(dirs)]
    vs = [v / v.norm() for v in vs]  # unit directions, shaped like x
    where: list[tuple[int | None, Tensor | None]] = [(int(i), None) for i in picks] + [
        (None, v.to(x.device)) for v in vs]  # perturbations on x's device
    with _one_thread():
        probes = [_probe(fn, x, f0, w, eps, i, v) for i, v in where]
    num = torch.tensor([p.central for p in probes], dtype=torch.float64)  # (k + dirs,)
    ana = torch.cat([a[picks], *[(a * v.reshape(-1)).sum().reshape(1) for v in vs]])  # (k + dirs,)
    level = _fd_level([p.magnitude for p in probes], eps)
    tol = tol or fd_tolerance(level)
    err = (ana - num).abs()
    bound = tol.atol + tol.rtol * num.abs()
    ratio = torch.where(err == 0, 0.0, err / bound)  # 0/0: an exact zero where nothing moved
    kinds = {}
    with _one_thread():
        for j in (~(ratio <= 1.0)).nonzero().reshape(-1).tolist():
            kind = _kink(fn, x, f0, w, eps, *where[j], probes[j], float(ana[j]), float(bound[j]), level)
            if kind:
                kinds[j] = kind
            else:  # smooth here: keep the less noisy of the two measurements
                q = _probe(fn, x, f0, w, eps * KINK_STEP, *where[j])
                if abs(float(ana[j]) - q.central) < float(err[j]):
                    num[j] = q.central
                    err[j] = abs(float(ana[j]) - q.central)
                    bound[j] = tol.atol + tol.rtol * abs(q.central)
                    ratio[j] = err[j] / bound[j]
    excused = [j for j, kind in kinds.items() if kind == "between"]
    ratio[excused] = 0.0
    err[excused] = 0.0
    num[excused] = ana[excused]  # a valid one-sided choice: not held against the gradient
    worst = float(ratio.max()) if ratio.numel() else 0.0
    k = len(picks)
    note = ""
    if excused:
        note = (f"not differentiable at {len(excused)} of {k + dirs} points checked (a tie or a kink: the "
                "one-sided derivatives differ there and the central difference splits them); the gradient "
                "lies between them there, a valid choice, so those points are not compared")
    diag = ""
    if not worst <= 1.0:  # failed (NaN fails too)
        bad = ~(ratio <= 1.0)  # (k + dirs,)
        outside = [j for j, kind in kinds.items() if kind == "outside"]
        if k == n:  # every element checked: diagnose the whole tensor
            diag = _values_diagnosis(ana.reshape(x.shape), num.reshape(x.shape), tol, sizes or {}, index)
        elif bad[:k].any():  # a sampled element is wrong: diagnose the sample
            diag = _values_diagnosis(ana[:k], num[:k], tol, sizes or {}, ())
            if diag.startswith("correct"):  # rows of a flat sample are single elements: say it plainly
                diag = f"wrong on {int(bad[:k].sum())} of {k} sampled elements"
        else:  # only the random directions see it
            diag = (f"every sampled element agrees, but {int(bad[k:].sum())} of {dirs} random directions "
                    "do not: an element outside the sample is wrong")
        if outside:
            diag += (f"; at {len(outside)} of them the function is not differentiable (a tie or kink) and "
                     "the gradient is not between its one-sided derivatives either")
        diag = _with_verdict(diag, tol, float(err.max()))
    kinked = tuple(sorted(int(picks[j]) for j in excused if j < k))
    return FDResult(name, tuple(x.shape), k, n, dirs, float(err.max()) if err.numel() else 0.0, worst, tol,
                    diag, len(excused), note, kinked)


# ---------------------------------------------------------------------------- the report
@dataclass
class Section:
    title: str
    rows: list[Comparison | FDResult | Finding]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def _notes(r: Comparison | FDResult | Finding, diagnosis: str) -> list[str]:
    return ([f"-> {diagnosis}"] if not r.passed else []) + ([f"note: {r.note}"] if r.note else [])


def _render_comparisons(rows: list[Comparison]) -> list[str]:
    t = Table([Column("tensor", width=6), *(Column(c, width=w, gap="  ") for c, w in (
        ("shape", 5), ("exact", 5), ("approx", 6), ("maxdiff", 9), ("rel err", 9), ("atol", 9),
        ("verdict", 0)))])
    for r in rows:
        t.add(r.name, _fmt_shape(r.ref_shape), "yes" if r.exact else "no", "yes" if r.allclose else "no",
              f"{r.max_abs_diff:.2e}", f"{r.rel_err:.2e}", f"{r.tol.atol:.2e}", "ok" if r.passed else "FAIL",
              notes=_notes(r, r.diagnosis))
    return t.lines()


def _render_fd(rows: list[FDResult]) -> list[str]:
    t = Table([Column("tensor", width=6), *(Column(c, width=w, gap="  ") for c, w in (
        ("checked", 24), ("max|a-n|", 9), ("atol", 9), ("worst/tol", 9), ("verdict", 0)))])
    for r in rows:
        what = f"{r.elements} of {r.numel}" + (f" + {r.directions} dirs" if r.directions else "")
        t.add(r.name, what, f"{r.max_abs_err:.2e}", f"{r.tol.atol:.2e}", f"{r.worst_ratio:.2e}",
              "ok" if r.passed else "FAIL", notes=_notes(r, r.diagnosis or "mismatch"))
    return t.lines()


@dataclass
class Finding:
    """A check that is not a tensor comparison: part of an autograd.Function's contract (one
    gradient per input, needs_input_grad, saved tensors), or an error the check met. `note` is
    said even when it passes."""

    name: str
    passed: bool
    message: str = ""  # what is wrong, in one line ('' when it passed)
    note: str = ""

    @property
    def diagnosis(self) -> str:
        return self.message


def _render_findings(rows: list[Finding]) -> list[str]:
    t = Table([Column("check", width=5), Column("verdict", gap="  ")])
    for r in rows:
        t.add(r.name, "ok" if r.passed else "FAIL", notes=_notes(r, r.message))
    return t.lines()


@dataclass
class Report:
    """The result of a check: sections of rows, `.passed`, and a readable str() (print it)."""

    title: str
    sections: list[Section]
    header: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.sections)

    def rows(self) -> list[Comparison | FDResult | Finding]:
        return [r for s in self.sections for r in s.rows]

    def failures(self) -> list[Comparison | FDResult | Finding]:
        return [r for r in self.rows() if not r.passed]

    def row(self, name: str, section: int = 0) -> Comparison | FDResult | Finding:
        """The row called `name` in section number `section`."""
        for r in self.sections[section].rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [self.title, *self.header]
        for s in self.sections:
            lines += ["", s.title]
            comps = [r for r in s.rows if isinstance(r, Comparison)]
            fds = [r for r in s.rows if isinstance(r, FDResult)]
            finds = [r for r in s.rows if isinstance(r, Finding)]
            lines += _render_findings(finds) if finds else []
            lines += _render_comparisons(comps) if comps else []
            lines += _render_fd(fds) if fds else []
            lines += s.notes
        n_fail = len(self.failures())
        lines += ["", "PASSED" if self.passed else f"FAILED ({n_fail} of {len(self.rows())} checks)"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        verdict = "passed" if self.passed else f"FAILED {len(self.failures())} of {len(self.rows())}"
        return f"<Report {self.title!r}: {verdict}; print() it for the table>"

    def _repr_pretty_(self, p, cycle: bool) -> None:  # IPython / Jupyter show the full table
        p.text(str(self))


AUTOGRAD_RULE = (f"atol = {AUTOGRAD_SLACK:g} x each tensor's rounding level: {LEVEL_ULPS:g} eps(dtype) "
                 f"max|grad| ({LOW_LEVEL_ULPS:g} in float16/bfloat16), or autograd's own float32-vs-float64 "
                 "difference rescaled to the dtype when larger")
FD_RULE = (f"float64, central, eps={FD_EPS:g}; pass |a-n| <= atol + rtol*|n|, rtol={FD_TOL.rtol:g}, "
           f"atol = {FD_SLACK:g} x each tensor's noise level eps64 x sum|out*dout| / 2eps")


REPLAY_TITLE = ("the same backward run in float64 vs autograd in float64: the formula itself, free of "
                "float32 rounding (a mistake below float32's resolution, as batchnorm's eps left out, shows "
                f"here; {AUTOGRAD_RULE})")


def excuse_kinks(row: Comparison, manual: Any, reference: Tensor, fd: FDResult | None) -> Comparison:
    """`row` passed when every element where manual and reference differ is one that finite
    differences found not differentiable (a tie of two maxima, a relu at 0): there any value
    between the one-sided derivatives is a valid gradient, and autograd merely chose another."""
    if row.passed or fd is None or not fd.kink_elements or row.shape != row.ref_shape:
        return row
    m, r = manual.detach().to(reference.dtype), reference.detach()
    bad = (~((m - r).abs() <= row.tol.atol + row.tol.rtol * r.abs())).reshape(-1).nonzero().reshape(-1)
    if not bad.numel() or not set(bad.tolist()) <= set(fd.kink_elements):
        return row
    return replace(row, excused=True, diagnosis="", note=(
        f"differs from autograd only at {bad.numel()} element(s) where the function is not differentiable "
        "(a tie or a kink, found by the finite differences): any value between the one-sided derivatives "
        "is valid there and autograd chose another, so they are not held against the gradient"))


def _excused(rows: Sequence[Comparison | FDResult], manual: Mapping[str, Any],
             reference: Mapping[str, Tensor],
             fd_rows: Sequence[Comparison | FDResult]) -> list[Comparison | FDResult]:
    """excuse_kinks applied to each autograd row, with the finite-difference row of the same name."""
    fds = {r.name: r for r in fd_rows if isinstance(r, FDResult)}
    return [excuse_kinks(r, manual[r.name], reference[r.name], fds.get(r.name))
            if isinstance(r, Comparison) and r.name in manual and r.name in reference else r for r in rows]


def _levels(r32: Sequence[Tensor] | None, r64: Sequence[Tensor] | None,
            dtypes: Sequence[torch.dtype]) -> list[float]:
    """measured_level per tensor; zeros when one of the two recomputations failed."""
    if r32 is None or r64 is None:
        return [0.0] * len(dtypes)
    return [measured_level(a, b, d) for a, b, d in zip(r32, r64, dtypes)]


# ---------------------------------------------------------------------------- naming the mistake
def _name_rows(sections: Sequence[Section], fn: Callable[..., list[Tensor]], inputs64: Sequence[Any],
               names: Sequence[str], weights: Sequence[Tensor], user: Mapping[str, Any],
               ref: Mapping[str, Tensor]) -> None:
    """Say, in each failing row, which variant of the forward's own graph the gradient equals (a
    branch left out, a local derivative in a common wrong form, ...; handgrad.variants). `user` and
    `ref` map input names to the float64 gradients; fn(*inputs64) -> the outputs weighted."""
    failing = {r.name for sec in sections for r in sec.rows
               if isinstance(r, (Comparison, FDResult)) and not r.passed}
    if not failing:
        return
    pos = {n: i for i, n in enumerate(names)}
    wrong = {pos[n]: g.detach().to(torch.float64) for n, g in user.items()
             if n in failing and n in pos and isinstance(g, Tensor) and isinstance(ref.get(n), Tensor)
             and g.shape == ref[n].shape}
    right = {pos[n]: t.detach().to(torch.float64) for n, t in ref.items()
             if n in pos and isinstance(t, Tensor)}
    passing = [pos[n] for n in ref if n in pos and n not in failing]
    from handgrad import variants  # records and replays the forward: loaded only when a check fails
    try:
        named = variants.explain(fn, inputs64, names, weights, wrong, right, passing)
    except Exception:  # naming is a bonus: a forward it cannot replay keeps the plain diagnosis
        return
    variants.attach_names(sections, {names[i]: nm for i, nm in named.items()})


# ---------------------------------------------------------------------------- users' own backward
def _named(inputs: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {f"x{i}": t for i, t in enumerate(inputs)}


def _out(res: Any) -> Tensor:
    return res[0] if isinstance(res, tuple) else res


def _call(forward: Callable, backward: Callable, xs: list[Tensor], dout: Tensor,
          n_wrt: int) -> tuple[Tensor, ...]:
    """Run forward then backward with the upstream gradient dout; return the gradients."""
    res = forward(*xs)
    dout = dout.to(_out(res).dtype)
    grads = backward(dout, res[1]) if isinstance(res, tuple) else backward(dout, *xs)
    grads = (grads,) if isinstance(grads, Tensor) else tuple(grads)
    if len(grads) != n_wrt:
        raise ValueError(f"backward returned {len(grads)} gradients for {n_wrt} inputs")
    return grads


def _autograd_reference(forward: Callable, named: Mapping[str, Tensor], wrt: Sequence[str], dout: Tensor,
                        dtype: torch.dtype | None) -> list[Tensor]:
    """Autograd's gradients of sum(forward(...) * dout) for the inputs in wrt, with every floating
    input cast to `dtype` (None: as given); zeros for an input the forward does not use."""
    leaves = {k: (t.detach().to(dtype or t.dtype).clone().requires_grad_(k in wrt)
                  if t.is_floating_point() else t) for k, t in named.items()}
    with torch.enable_grad():
        out = _out(forward(*leaves.values()))
        grads = torch.autograd.grad(out, [leaves[k] for k in wrt], dout.to(out.dtype), allow_unused=True)
    return [torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(wrt, grads)]


def _try(fn: Callable[[], Any]) -> Any:
    """The rounding measurements recompute in float32 and float64; a forward that cannot (fixed
    dtypes inside it) gets the magnitude-only tolerance."""
    try:
        return fn()
    except (RuntimeError, TypeError, ValueError):
        return None


def check_backward(forward: Callable, backward: Callable,
                   inputs: Mapping[str, Tensor] | Sequence[Tensor], *, wrt: Sequence[str] | None = None,
                   seed: int = 0, fd: bool = True, title: str | None = None,
                   tol: Tolerance | None = None, fd_tol: Tolerance | None = None,
                   sizes: Mapping[str, int] | None = None, name_mistakes: bool = True,
                   timeout: float | None = 60.0) -> Report:
    """Check a hand-written backward against autograd and float64 finite differences.

    forward(*inputs) returns (out, cache), and then backward(dout, cache) is called; or it returns
    just out, and then backward(dout, *inputs) is called. backward returns one gradient per input
    in `wrt` (default: every floating-point input, in order). dout is a seeded random N(0, 1) tensor
    shaped like out, so the gradients checked are those of sum(out * dout). Integer inputs (indices)
    are passed through, and a gradient wrong only on rows whose index repeats in one is diagnosed.
    Autograd is compared in the inputs' dtype, with a tolerance per tensor from its rounding level
    (autograd_tolerance; `tol` replaces it); finite differences run in float64 (fd_tolerance;
    `fd_tol` replaces it). `sizes` names sizes for the diagnosis (e.g. {"n": 32}); the input
    shapes' sizes are added. A wrong gradient is named from the forward's own graph when one of its
    variants explains it (`name_mistakes`, see handgrad.variants). Each call of forward or backward
    may take `timeout` seconds; one that does not return is stopped and reported in one line."""
    title = title or f"check_backward: {getattr(backward, '__name__', 'backward')}"
    fwd = limited(forward, timeout, f"forward {getattr(forward, '__name__', '')}".rstrip())
    bwd = limited(backward, timeout, f"backward {getattr(backward, '__name__', '')}".rstrip())
    try:
        return _check_backward(fwd, bwd, inputs, wrt, seed, fd, title, tol, fd_tol, sizes, name_mistakes,
                               forward)
    except Overran as e:
        what = e.args[0] if e.args else "a call"
        row = Finding(what.split()[0], False, overran_message(e, what))
        return Report(title, [Section("running it", [row])])


def _check_backward(forward: Callable, backward: Callable, inputs: Mapping[str, Tensor] | Sequence[Tensor],
                    wrt: Sequence[str] | None, seed: int, fd: bool, title: str, tol: Tolerance | None,
                    fd_tol: Tolerance | None, sizes: Mapping[str, int] | None, name_mistakes: bool,
                    fd_forward: Callable) -> Report:
    """check_backward's body; `fd_forward` is the forward without a time limit per call (the finite
    differences call it thousands of times, after it has returned once under the limit)."""
    named = _named(inputs)
    wrt = list(wrt) if wrt is not None else [k for k, t in named.items() if t.is_floating_point()]
    index = [t for t in named.values() if not t.is_floating_point() and not t.is_complex()]
    all_sizes = dict(sizes or {})
    for k, t in named.items():
        for i, s in enumerate(t.shape):
            if s not in all_sizes.values():
                all_sizes[f"{k}.shape[{i}]"] = s

    with torch.no_grad():
        out = _out(forward(*[t.detach() for t in named.values()]))
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    ref = _autograd_reference(forward, named, wrt, dout, None)  # in the inputs' own dtype
    dtypes = [named[k].dtype for k in wrt]
    r32 = _try(lambda: _autograd_reference(forward, named, wrt, dout, torch.float32))
    r64 = _try(lambda: _autograd_reference(forward, named, wrt, dout, torch.float64))
    with torch.no_grad():
        grads = _call(forward, backward, [t.detach() for t in named.values()], dout, len(wrt))
    rows: list[Comparison | FDResult] = [
        compare(k, gm, r, tol or autograd_tolerance(d, r, lv), all_sizes, index)
        for k, gm, r, d, lv in zip(wrt, grads, ref, dtypes, _levels(r32, r64, dtypes))]
    names = sorted({str(d).replace("torch.", "") for d in dtypes})
    sections = [Section(f"hand-written backward vs autograd ({', '.join(names)}; "
                        f"{tol if tol else AUTOGRAD_RULE})", rows)]
    x64 = [t.detach().to(torch.float64).clone() if t.is_floating_point() else t for t in named.values()]
    dout64 = dout.to(torch.float64)
    with torch.no_grad():
        grads64 = _call(forward, backward, x64, dout64, len(wrt))
    if r64 is not None and any(d != torch.float64 for d in dtypes):
        sections.append(Section(REPLAY_TITLE, [
            compare(k, g64, r, autograd_tolerance(torch.float64, r, lv), all_sizes, index)
            for k, g64, r, lv in zip(wrt, grads64, r64, _levels(r32, r64, [torch.float64] * len(wrt)))]))

    if fd:  # finite differences in float64, no autograd
        keys = list(named)
        fd_rows: list[Comparison | FDResult] = []
        for k, g64 in zip(wrt, grads64):
            x = x64[keys.index(k)]

            def fn(xs=x64) -> Tensor:
                return _out(fd_forward(*xs))
            fd_rows.append(finite_differences(fn, x, g64, k, dout64, tol=fd_tol, seed=seed, sizes=all_sizes,
                                              index=index))
        sections.append(Section("hand-written backward vs finite differences "
                                f"({FD_RULE if fd_tol is None else f'float64, eps={FD_EPS:g}; {fd_tol}'})",
                                fd_rows))
        sections[0].rows = _excused(rows, dict(zip(wrt, grads)), dict(zip(wrt, ref)), fd_rows)
        if len(sections) == 3:
            sections[1].rows = _excused(sections[1].rows, dict(zip(wrt, grads64)), dict(zip(wrt, r64)),
                                        fd_rows)
    if name_mistakes and r64 is not None:
        _name_rows(sections, lambda *xs: [_out(forward(*xs))], x64, list(named), [dout64],
                   dict(zip(wrt, grads64)), dict(zip(wrt, r64)))
    return Report(title, sections)


# ---------------------------------------------------------------------------- layers and models
def _owner(layer: Any, name: str) -> tuple[Any, str]:
    """The object and attribute holding parameter or buffer `name`: "weight" is layer.weight, and a
    Sequential's "2.weight" is layer.layers[2].weight (nested: "1.0.weight")."""
    *path, attr = name.split(".")
    obj = layer
    for part in path:
        obj = obj.layers[int(part)] if part.isdigit() and hasattr(obj, "layers") else getattr(obj, part)
    return obj, attr


@contextmanager
def _substituted(layer: Any, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Set the named parameters of `layer` to `tensors` for the duration; restore them after."""
    saved: dict[str, Tensor] = {}
    try:
        for name, t in tensors.items():
            obj, attr = _owner(layer, name)
            saved[name] = getattr(obj, attr)
            setattr(obj, attr, t)
        yield
    finally:
        for name, t in saved.items():
            obj, attr = _owner(layer, name)
            setattr(obj, attr, t)


def _layer_as(layer: Any, dtype: torch.dtype) -> Any:
    """A deep copy of `layer` with every floating parameter and buffer in `dtype` (set as the
    attributes its forward reads, so perturbing copy.params()[name] in place perturbs the forward)."""
    twin = copy.deepcopy(layer)
    for name, t in {**twin.params(), **twin.buffers()}.items():
        if t.is_floating_point():
            obj, attr = _owner(twin, name)
            setattr(obj, attr, t.detach().to(dtype).clone())
    return twin


def _layer_dtype(layer: Any, x: Tensor) -> torch.dtype:
    floats = [t.dtype for t in layer.params().values() if t.is_floating_point()]
    return floats[0] if floats else (x.dtype if x.is_floating_point() else torch.float32)


def _float_as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype) if t.is_floating_point() else t


def _layer_autograd(layer: Any, x: Tensor, loss: Callable[[Tensor], Tensor], training: bool = True
                    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Autograd's gradients of loss(layer.forward(x)[0]): for the output, for x (None when x holds
    integer indices), and for every parameter by name (zeros for one the forward does not use)."""
    leaves = {k: t.detach().clone().requires_grad_(True) for k, t in layer.params().items()}
    xg = x.detach().clone().requires_grad_(True) if x.is_floating_point() else x
    with _substituted(layer, leaves), torch.enable_grad():
        out = layer.forward(xg, training)[0]
        targets = [out, *([xg] if x.is_floating_point() else []), *leaves.values()]
        grads = list(torch.autograd.grad(loss(out), targets, allow_unused=True))
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(targets, grads)]
    dout = grads.pop(0)
    dx = grads.pop(0) if x.is_floating_point() else None
    return dout, dx, dict(zip(leaves, grads))


def _unpack_backward(res: Any, who: str) -> tuple[Tensor | None, Mapping[str, Tensor]]:
    if not (isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], Mapping)):
        raise TypeError(f"{who}.backward must return (dx, {{name: dparam}}), got {type(res).__name__}"
                        + (f" of length {len(res)}" if isinstance(res, tuple) else ""))
    return res[0], res[1]


def _param_rows(names: Sequence[str], grads: Mapping[str, Any], ref: Mapping[str, Tensor],
                levels: Mapping[str, float], sizes: Mapping[str, int],
                index: Sequence[Tensor]) -> list[Comparison | FDResult]:
    """One row per parameter (a missing gradient fails with its own message) and one failing row per
    name the backward returned that is not a parameter."""
    rows: list[Comparison | FDResult] = []
    for name in names:
        tol = autograd_tolerance(ref[name].dtype, ref[name], levels.get(name, 0.0))
        if name not in grads:
            rows.append(Comparison(name, (), tuple(ref[name].shape), False, False, math.nan, math.nan, tol,
                                   f"no gradient: the backward's dict has no {name!r} (its keys: "
                                   f"{sorted(grads)})"))
        else:
            rows.append(compare(name, grads[name], ref[name], tol, sizes, index))
    for name in grads:
        if name not in ref:
            g = grads[name]
            rows.append(Comparison(name, tuple(g.shape) if isinstance(g, Tensor) else (), (), False, False,
                                   math.nan, math.nan, autograd_tolerance(torch.float32),
                                   f"the backward returned a gradient for {name!r}, which is not a parameter "
                                   f"(params: {list(names)}): a misspelt or stale name?"))
    return rows


def _state(layer: Any) -> dict[str, Tensor]:
    return {k: t.detach().clone() for k, t in {**layer.params(), **layer.buffers()}.items()}


def _purity_rows(before: Mapping[str, Tensor], layer: Any) -> list[Comparison | FDResult]:
    """A failing row for each parameter or buffer the forward/backward changed."""
    rows: list[Comparison | FDResult] = []
    for k, t in _state(layer).items():
        b = before.get(k)
        if b is None or t.shape != b.shape or not torch.equal(t, b):
            comparable = b is not None and t.shape == b.shape
            diff = float((t.double() - b.double()).abs().max()) if comparable else math.nan
            rows.append(Comparison(
                f"{k} (state)", tuple(t.shape), tuple(t.shape), False, False, diff, math.nan,
                Tolerance(0.0, 0.0),
                "changed by forward or backward: a layer must be pure (return state updates, do not apply "
                "them), or checks and finite differences see a moving target"))
    return rows


def _sizes(**tensors: Tensor) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for k, t in tensors.items():
        for i, s in enumerate(t.shape):
            if s not in sizes.values():
                sizes[f"{k}.shape[{i}]"] = s
    return sizes


def _recomputed(layer: Any, x: Tensor, loss: Callable[[Tensor], Tensor], training: bool):
    """Autograd in float32 and in float64 on copies of the layer: the rounding measurement."""
    return [_try(lambda d=d: _layer_autograd(_layer_as(layer, d), _float_as(x, d), loss, training))
            for d in (torch.float32, torch.float64)]


def _level_map(r32: Any, r64: Any, ref: Mapping[str, Tensor]) -> dict[str, float]:
    if r32 is None or r64 is None:
        return {}
    return {k: measured_level(r32[2].get(k), r64[2].get(k), t.dtype) for k, t in ref.items()}


def check_layer(layer: Any, x: Tensor, *, dout: Tensor | None = None, seed: int = 0, training: bool = True,
                fd: bool = True, title: str | None = None, name_mistakes: bool = True) -> Report:
    """Check a layer's backward: dx (when x is floating) and every parameter gradient against
    autograd in the layer's dtype, then against float64 central differences on a float64 deep copy.

    The layer follows the layer library's protocol: params() and buffers() name its tensors (each
    name an attribute, or "i.name" into a Sequential's .layers), forward(x, training) -> (out, cache)
    is pure, backward(dout, cache) -> (dx, {name: dparam}). dout defaults to a seeded N(0, 1)
    tensor. Shapes are strict; a missing or unknown gradient name gets its own failing row, and so
    does a parameter or buffer the forward changed. A wrong gradient is named from the layer's own
    forward (`name_mistakes`, see handgrad.variants)."""
    dtype = _layer_dtype(layer, x)
    who = type(layer).__name__
    before = _state(layer)
    with torch.no_grad():
        out = layer.forward(x, training)[0]
    if not out.is_floating_point():
        return _index_layer_report(layer, x, out, training, who, title)
    if dout is None:
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    sizes = _sizes(x=x, out=out)
    index = [] if x.is_floating_point() else [x]

    def loss(o: Tensor) -> Tensor:
        return (o * dout.to(o.dtype)).sum()
    _, ref_dx, ref = _layer_autograd(layer, x, loss, training)
    r32, r64 = _recomputed(layer, x, loss, training)
    levels = _level_map(r32, r64, ref)
    with torch.no_grad():
        out, cache = layer.forward(x, training)
        dx, grads = _unpack_backward(layer.backward(dout, cache), who)
    rows: list[Comparison | FDResult] = []
    if ref_dx is not None:
        lx = measured_level(r32[1], r64[1], ref_dx.dtype) if r32 is not None and r64 is not None else 0.0
        rows.append(compare("x", dx, ref_dx, autograd_tolerance(ref_dx.dtype, ref_dx, lx), sizes, index))
    rows += _param_rows(list(ref), grads, ref, levels, sizes, index)
    rows += _purity_rows(before, layer)
    sections = [Section(f"{who}.backward vs autograd ({str(dtype)[6:]}; {AUTOGRAD_RULE})", rows)]
    layer64, x64, dx64, grads64 = _layer_backward64(layer, x, dout, training, who)
    manual64 = {**grads64, **({"x": dx64} if ref_dx is not None else {})}
    if r32 is not None and r64 is not None and dtype != torch.float64:
        ref64 = {**r64[2], **({"x": r64[1]} if ref_dx is not None else {})}
        lv64 = {k: measured_level(r32[2].get(k) if k != "x" else r32[1], t, torch.float64)
                for k, t in ref64.items()}
        replay = [compare("x", dx64, ref64["x"], autograd_tolerance(torch.float64, ref64["x"], lv64["x"]),
                          sizes, index)] if ref_dx is not None else []
        replay += _param_rows(list(r64[2]), grads64, r64[2], lv64, sizes, index)
        sections.append(Section(REPLAY_TITLE, replay))
    if fd:
        fd_sec = _layer_fd(layer64, x64, dx64, grads64, dout, training, sizes, index, seed, who)
        sections[0].rows = _excused(rows, {**grads, "x": dx}, {**ref, "x": ref_dx}, fd_sec.rows)
        if len(sections) == 2:
            sections[1].rows = _excused(sections[1].rows, manual64, ref64, fd_sec.rows)
        sections.append(fd_sec)
    if name_mistakes and r64 is not None:
        pnames = list(layer64.params())

        def layer_out(x_: Tensor, *ps: Tensor) -> list[Tensor]:
            with _substituted(layer64, dict(zip(pnames, ps))):
                return [layer64.forward(x_, training)[0]]
        user64 = {**grads64, **({"x": dx64} if ref_dx is not None else {})}
        ref64 = {**r64[2], **({"x": r64[1]} if ref_dx is not None else {})}
        inputs64 = [x64, *[layer64.params()[k].detach().clone() for k in pnames]]
        _name_rows(sections, layer_out, inputs64, ["x", *pnames], [dout.to(torch.float64)], user64, ref64)
    return Report(title or f"check_layer: {who}, x {_fmt_shape(tuple(x.shape))}, "
                  f"{'training' if training else 'inference'}", sections)


def _index_layer_report(layer: Any, x: Tensor, out: Tensor, training: bool, who: str, title: str | None
                        ) -> Report:
    """A layer whose output is integer ids (ContextWindows) has no gradient to check: its backward
    must return (None, {}) and it must own no parameters; the layers after it are checked in a
    Sequential that holds both."""
    with torch.no_grad():
        _, cache = layer.forward(x, training)
        dx, grads = _unpack_backward(layer.backward(None, cache), who)
    params = sorted(layer.params())
    ok = dx is None and not grads and not params
    why = "" if ok else (f"an index layer's backward must return (None, {{}}) and it may own no parameters; "
                         f"got dx {type(dx).__name__}, gradients {sorted(grads)}, parameters {params}")
    row = Finding("output", ok, why, note=f"integer output {_fmt_shape(tuple(out.shape))}: no gradient flows "
                  "through it; check the layers after it in a Sequential that starts with it")
    return Report(title or f"check_layer: {who}, x {_fmt_shape(tuple(x.shape))}",
                  [Section(f"{who}: an index layer", [row])])


def _layer_backward64(layer: Any, x: Tensor, dout: Tensor, training: bool, who: str
                      ) -> tuple[Any, Tensor, Tensor | None, Mapping[str, Tensor]]:
    """The layer's own backward on a float64 deep copy: (layer64, x64, dx64, {name: dparam64})."""
    layer64 = _layer_as(layer, torch.float64)
    x64 = _float_as(x, torch.float64).clone()
    with torch.no_grad():
        _, cache = layer64.forward(x64, training)
        dx64, grads64 = _unpack_backward(layer64.backward(dout.to(torch.float64), cache), who)
    return layer64, x64, dx64, grads64


def _layer_fd(layer64: Any, x64: Tensor, dx64: Tensor | None, grads64: Mapping[str, Tensor], dout: Tensor,
              training: bool, sizes: Mapping[str, int], index: Sequence[Tensor], seed: int,
              who: str) -> Section:
    """Finite differences of sum(forward(x) * dout) on the float64 copy, for x and every parameter."""
    dout64 = dout.to(torch.float64)

    def fn() -> Tensor:
        return layer64.forward(x64, training)[0]
    rows: list[Comparison | FDResult] = []
    if x64.is_floating_point():
        rows.append(finite_differences(fn, x64, dx64, "x", dout64, seed=seed, sizes=sizes, index=index))
    for name, t in layer64.params().items():
        rows.append(finite_differences(fn, t, grads64.get(name), name, dout64, seed=seed, sizes=sizes,
                                       index=index))
    return Section(f"{who}.backward vs finite differences ({FD_RULE})", rows)


def check_model(model: Any, X: Tensor, Y: Tensor, *, seed: int = 0, fd: bool = True,
                title: str | None = None, name_mistakes: bool = True) -> Report:
    """Check a model's backward on the mean cross-entropy of model.forward(X)[0] against Y: dlogits
    from ops.cross_entropy_backward (ops.loss_pair: the masked one for sequences Y (N, T)), then
    every named parameter gradient of model.backward(dlogits, cache), against autograd in the
    model's dtype, then against float64 central differences of the loss on a float64 deep copy (a
    seeded sample of the elements of tensors over FD_MAX_ELEMENTS, plus random directions). Training
    mode (batch statistics). A wrong gradient is named from the model's own forward
    (`name_mistakes`, see handgrad.variants)."""
    who = type(model).__name__
    before = _state(model)
    sizes = {"n": X.shape[0], **_sizes(X=X)}
    index = [] if X.is_floating_point() else [X]
    ce_forward, ce_backward = ops.loss_pair(Y)  # Y (N,): cross-entropy; (N, T): masked over sequences
    ce_name = f"logits (ops.{ce_backward.__name__})"

    def loss(logits: Tensor) -> Tensor:
        return ce_forward(logits, Y)[0]
    ref_dlogits, _, ref = _layer_autograd(model, X, loss)
    r32, r64 = _recomputed(model, X, loss, True)
    levels = _level_map(r32, r64, ref)
    with torch.no_grad():
        logits, cache = model.forward(X, True)
        loss_value, ce_cache = ce_forward(logits, Y)
        dlogits = ce_backward(1.0, ce_cache)  # (N, V) or (N, T, V)
        _, grads = _unpack_backward(model.backward(dlogits, cache), who)
    lv = measured_level(r32[0], r64[0], ref_dlogits.dtype) if r32 is not None and r64 is not None else 0.0
    rows: list[Comparison | FDResult] = [
        compare(ce_name, dlogits, ref_dlogits,
                autograd_tolerance(ref_dlogits.dtype, ref_dlogits, lv), sizes)]
    rows += _param_rows(list(ref), grads, ref, levels, sizes, index)
    rows += _purity_rows(before, model)
    dtype = _layer_dtype(model, X)
    sections = [Section(f"{who}.backward vs autograd ({str(dtype)[6:]}; {AUTOGRAD_RULE})", rows,
                        _first_failure_note([r for r in rows if isinstance(r, Comparison)]))]
    model64 = _layer_as(model, torch.float64)
    X64 = _float_as(X, torch.float64)
    with torch.no_grad():
        logits64, cache64 = model64.forward(X64, True)
        dlogits64 = ce_backward(1.0, ce_forward(logits64, Y)[1])  # (N, V) or (N, T, V)
        _, grads64 = _unpack_backward(model64.backward(dlogits64, cache64), who)
    if r32 is not None and r64 is not None and dtype != torch.float64:
        lv64 = {k: measured_level(r32[2].get(k), t, torch.float64) for k, t in r64[2].items()}
        replay = [compare(ce_name, dlogits64, r64[0], autograd_tolerance(
            torch.float64, r64[0], measured_level(r32[0], r64[0], torch.float64)), sizes)]
        replay += _param_rows(list(r64[2]), grads64, r64[2], lv64, sizes, index)
        sections.append(Section(REPLAY_TITLE, replay,
                                _first_failure_note([r for r in replay if isinstance(r, Comparison)])))
    if fd:
        fd_rows: list[Comparison | FDResult] = [
            finite_differences(lambda: loss(model64.forward(X64, True)[0]), t, grads64.get(name), name,
                               seed=seed, sizes=sizes, index=index)
            for name, t in model64.params().items()]
        sections.append(Section(f"{who}.backward vs finite differences of the loss ({FD_RULE}; tensors "
                                f"over {FD_MAX_ELEMENTS} elements: a seeded sample plus {FD_DIRECTIONS} "
                                "random unit directions)", fd_rows))
    if name_mistakes and r64 is not None:
        mnames = list(model64.params())

        def model_loss(*ps: Tensor) -> list[Tensor]:
            with _substituted(model64, dict(zip(mnames, ps))):
                return [loss(model64.forward(X64, True)[0]).reshape(1)]
        _name_rows(sections, model_loss, [model64.params()[k].detach().clone() for k in mnames], mnames,
                   [torch.ones(1, dtype=torch.float64)], dict(grads64), dict(r64[2]))
    header = [f"batch {X.shape[0]}, {sum(t.numel() for t in model.params().values())} parameters in "
              f"{len(ref)} tensors; loss {float(loss_value):.6f}"]
    return Report(title or f"check_model: {who}", sections, header)


# ---------------------------------------------------------------------------- the lecture's graph
LECTURE_CONFIG = LectureConfig(n_embd=10, n_hidden=64, block_size=3)  # the lecture's exercise setup
LECTURE_BATCH = 32


def _autograd_atomic(p: Params, X: Tensor, Y: Tensor) -> tuple[atomic.Intermediates, dict[str, Tensor]]:
    """Autograd's gradient of the atomic forward's loss for all 26 tensors."""
    leaves = Params(*(t.detach().clone().requires_grad_(True) for t in p.tensors()))
    with torch.enable_grad():
        f = atomic.forward(leaves, X, Y)
        targets = dict(f.differentiable()) | dict(leaves.items())
        grads = torch.autograd.grad(f.loss, [targets[k] for k in atomic.GRAD_NAMES])
    return f, dict(zip(atomic.GRAD_NAMES, grads))


def _first_failure_note(rows: list[Comparison]) -> list[str]:
    bad = [r.name for r in rows if not r.passed]
    if not bad:
        return []
    return [f"first wrong gradient in backward order: {bad[0]}; the {len(bad) - 1} failing rows after it "
            "may only inherit its error"] if len(bad) > 1 else []


def _closed_forms(p: Params, Y: Tensor, f: atomic.Intermediates, dhpreact: Tensor) -> tuple[Tensor, Tensor]:
    """Exercises 2 and 3: dlogits from ops.cross_entropy_backward (loss seed 1) and dhprebn from
    ops.batchnorm_backward fed the upstream dhpreact, on the atomic forward's own logits and hprebn."""
    with torch.no_grad():
        _, ce_cache = ops.cross_entropy_forward(f.logits, Y)
        dlogits = ops.cross_entropy_backward(1.0, ce_cache)  # (N, V)
        _, bn_cache, _ = ops.batchnorm_forward(f.hprebn, p.bngain, p.bnbias)
        dhprebn, _, _ = ops.batchnorm_backward(dhpreact, bn_cache)  # (N, H)
    return dlogits, dhprebn


def check_lecture_graph(p: Params, X: Tensor, Y: Tensor,
                        backward: Callable[..., atomic.Grads] = atomic.backward,
                        fd: bool = True, seed: int = 0) -> Report:
    """The lecture's three exercises checked on one batch: the atomic backward (26 tensors) vs
    autograd, the closed forms in ops.py vs autograd, and finite differences in float64 for the
    atomic parameter gradients and the closed forms. Each closed form is fed autograd's upstream
    gradient, so a mistake upstream of it is not blamed on it. `backward` replaces atomic.backward
    (to test the checker with deliberately broken ones)."""
    dtype, n = p.C.dtype, X.shape[0]
    sizes = {"n": n, "H": p.W1.shape[1], "V": p.C.shape[0]}
    ref_f, ref = _autograd_atomic(p, X, Y)
    _, ref32 = _autograd_atomic(p.to(torch.float32), X, Y)
    _, ref64 = _autograd_atomic(p.to(torch.float64), X, Y)

    def tol(name: str) -> Tolerance:
        return autograd_tolerance(dtype, ref[name], measured_level(ref32[name], ref64[name], dtype))
    with torch.no_grad():
        f = atomic.forward(p, X, Y)
        grads = backward(p, X, Y, f)
    rows = [compare(name, gm, ref[name], tol(name), sizes=sizes, index=[X] if name == "C" else ())
            for name, gm in grads.items()]
    n_exact = sum(r.exact for r in rows)
    atomic_sec = Section(f"exercise 1: atomic backward vs autograd ({str(dtype)[6:]}; {AUTOGRAD_RULE})", rows,
                         [f"{n_exact} of {len(rows)} bit-exact, "
                          f"{sum(r.passed for r in rows)} of {len(rows)} pass", *_first_failure_note(rows)])

    # exercises 2 and 3: the closed forms, fed autograd's own upstream gradient
    dlogits, dhprebn = _closed_forms(p, Y, f, ref["hpreact"])
    closed = Section("exercises 2 and 3: closed forms in ops.py vs autograd (fed autograd's upstream "
                     "gradient)", [
        compare("logits (ops.cross_entropy_backward)", dlogits, ref["logits"], tol("logits"), sizes=sizes),
        compare("hprebn (ops.batchnorm_backward)", dhprebn, ref["hprebn"], tol("hprebn"), sizes=sizes)])
    sections = [atomic_sec, closed]
    if fd:
        sections.append(_lecture_fd(p, X, Y, backward, ref64["hpreact"], sizes, seed))
    header = [f"batch n={n}, n_embd={p.C.shape[1]}, n_hidden={p.W1.shape[1]}, block_size={X.shape[1]}, "
              f"vocab={p.C.shape[0]}; loss {float(ref_f.loss.detach()):.6f}"]
    return Report(f"handgrad check: the lecture's graph (Backprop Ninja), {str(dtype)[6:]}", sections, header)


def _lecture_fd(p: Params, X: Tensor, Y: Tensor, backward: Callable[..., atomic.Grads], dhpreact: Tensor,
                sizes: Mapping[str, int], seed: int) -> Section:
    """Finite differences (float64) for the atomic parameter gradients and the two closed forms; the
    batchnorm closed form is fed `dhpreact` (autograd's, float64) and differenced on its own."""
    p64 = Params(*(t.detach().to(torch.float64).clone() for t in p.tensors()))
    with torch.no_grad():
        f = atomic.forward(p64, X, Y)
        grads = backward(p64, X, Y, f)
    dlogits, dhprebn = _closed_forms(p64, Y, f, dhpreact)
    rows: list[Comparison | FDResult] = []
    for (name, t), (_, g) in zip(p64.items(), grads.params().items()):
        rows.append(finite_differences(lambda: atomic.forward(p64, X, Y).loss, t, g, name,
                                       seed=seed, sizes=sizes, index=[X] if name == "C" else ()))
    logits = f.logits.clone()
    rows.append(finite_differences(lambda: ops.cross_entropy_forward(logits, Y)[0], logits, dlogits,
                                   "logits (ops.cross_entropy_backward)", seed=seed, sizes=sizes))
    hprebn = f.hprebn.clone()
    rows.append(finite_differences(lambda: ops.batchnorm_forward(hprebn, p64.bngain, p64.bnbias)[0], hprebn,
                                   dhprebn, "hprebn (ops.batchnorm_backward)", dhpreact, seed=seed,
                                   sizes=sizes))
    return Section(f"finite differences ({FD_RULE})\ntensors over {FD_MAX_ELEMENTS} elements: a seeded "
                   f"sample of {FD_MAX_ELEMENTS} plus {FD_DIRECTIONS} random unit directions; the batchnorm "
                   "closed form differenced on its own, fed autograd's dhpreact", rows)


def lecture_batch(seed: int, dtype: torch.dtype = torch.float32,
                  cfg: LectureConfig = LECTURE_CONFIG, batch: int = LECTURE_BATCH
                  ) -> tuple[Params, Tensor, Tensor]:
    """The lecture's exercise setup: params from init_params(cfg, seed) (non-zero b1/W2/b2) and a
    batch drawn with a seeded torch.Generator from the train split of the bundled names."""
    words = read_words(default_data_path())
    splits = make_splits(words.items, cfg.block_size, 42)
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(0, splits.Xtr.shape[0], (batch,), generator=g)  # (N,)
    return init_params(cfg, seed, dtype), splits.Xtr[ix], splits.Ytr[ix]


def run_lecture_check(dtype: torch.dtype = torch.float32, seed: int = 42) -> Report:
    """`handgrad check`: the lecture's graph on a seeded batch (n_hidden 64, batch 32)."""
    p, X, Y = lecture_batch(seed, dtype)
    report = check_lecture_graph(p, X, Y, seed=seed)
    report.title += f", seed {seed}"
    return report
