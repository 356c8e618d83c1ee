"""Prove gradients: per-tensor comparisons against autograd (the lecture's `cmp`, llm.c
`check_tensor`), strict shapes, float64 central finite differences with gradcheck's pass rule, and a
diagnosis of the usual mistakes. `check_backward` checks a user's own forward/backward pair;
`run_lecture_check` checks the lecture's atomic graph and the closed forms in ops.py.
Checking code: with the tests, the only place autograd is used. The library never prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from handgrad import atomic, ops
from handgrad.atomic import LectureConfig, Params, init_params
from handgrad.data import default_data_path, make_splits, read_words


# ---------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """gradcheck's rule, element by element: |manual - reference| <= atol + rtol * |reference|."""

    rtol: float
    atol: float

    def holds(self, manual: Tensor, reference: Tensor) -> bool:
        return bool(((manual - reference).abs() <= self.atol + self.rtol * reference.abs()).all())

    def __str__(self) -> str:
        return f"rtol={self.rtol:g}, atol={self.atol:g}"


# Against autograd, the same maths in another order differs by a few ulps of the tensor's largest
# entries. Measured for the closed forms on the lecture's batch (entries up to ~3e-2): max abs diff
# 8e-9 and <= 3e-7 of max|grad| in float32, <= 6e-16 of max|grad| in float64. So float64 gets ~1e5x
# slack (the issue's ~1e-12-relative regime), float32 ~10x in atol and ~40x in rtol.
AUTOGRAD_TOL: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-7),
}
# Central differences in float64 with step FD_EPS: truncation ~ eps^2 |f'''| / 6 ~ 1e-13, rounding
# ~ 1e-16 |f| / eps ~ 3e-10 for the lecture's loss of ~3.4 (measured: max |a-n| <= 6e-10, i.e.
# worst/tol <= 5e-3 below). We difference the outputs before summing them, which keeps rounding
# small for vector outputs. atol 1e-7 sits ~200x above that noise; rtol 1e-5 still flags the
# smallest mistake we look for (n/(n-1) = 1.03 at n = 32) with three orders of magnitude to spare.
FD_EPS = 1e-6
FD_TOL = Tolerance(rtol=1e-5, atol=1e-7)
FD_MAX_ELEMENTS = 512  # tensors up to this size are checked element by element; larger: a sample
FD_DIRECTIONS = 2  # plus this many random unit directions for sampled tensors (covers every element)


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


def autograd_tolerance(dtype: torch.dtype) -> Tolerance:
    return AUTOGRAD_TOL.get(dtype, AUTOGRAD_TOL[torch.float32])


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


def _values_diagnosis(m: Tensor, r: Tensor, tol: Tolerance, sizes: Mapping[str, int],
                      index: Sequence[Tensor]) -> str:
    """Why two same-shaped tensors differ (sign, scale, transpose, repeated-index rows)."""
    if not torch.isfinite(m).all():
        return "the gradient contains NaN or inf"
    if not m.any() and r.any():
        return "all zeros: the gradient was never written (or the upstream was lost)"
    if _close(-m, r, tol):
        return "sign flipped: manual = -reference"
    if m.dim() == 2 and m.shape[0] == m.shape[1] and _close(m.T, r, tol):
        return "transposed: manual.T matches the reference (x.T @ dout vs dout.T @ x?)"
    rr = float((r.double() * r.double()).sum())
    if rr > 0:
        k = float((m.double() * r.double()).sum()) / rr
        fit = float(((m.double() - k * r.double()).norm()) / max(float(m.double().norm()), 1e-300))
        if fit <= 1e-5 and abs(k - 1) > 1e-5:
            return _describe_scale(k, sizes)
    scale = float(r.abs().max())
    rel = float((m - r).abs().max()) / scale if scale > 0 else math.inf
    if rel < 1e-4:
        return (f"close (max relative error {rel:.1e}) but outside {tol}: probably a rounding-order "
                "difference rather than a wrong formula (compare in float64, or loosen the tolerance)")
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
    return "values differ, with no simple pattern (not a sign, constant scale, transpose or row subset)"


def _shape_diagnosis(m: Tensor, r: Tensor, tol: Tolerance, sizes: Mapping[str, int],
                     index: Sequence[Tensor]) -> str:
    got, want = tuple(m.shape), tuple(r.shape)
    head = f"shape {got} but the tensor is {want}"
    if m.numel() == r.numel() and [s for s in got if s != 1] == [s for s in want if s != 1]:
        values = _values_diagnosis(m.reshape(want), r, tol, sizes, index) \
            if not _close(m.reshape(want), r, tol) else "the values agree"
        return (f"{head}: a dimension of size 1 is missing or extra (keepdim=True forgotten?); "
                f"{values}; a gradient must have exactly its tensor's shape even where it would broadcast")
    if m.dim() == 2 and r.dim() == 2 and got == want[::-1]:
        if _close(m.T, r, tol):
            return f"{head}: transposed, manual.T matches the reference (dout.T @ x instead of x.T @ dout?)"
        return f"{head}: transposed shape (and manual.T does not match either)"
    if m.dim() == r.dim() and m.dim() >= 1:
        ones_m = {i for i, s in enumerate(got) if s == 1}
        ones_r = {i for i, s in enumerate(want) if s == 1}
        if ones_m != ones_r and (ones_m or ones_r):
            return (f"{head}: summed over the wrong dimension? (reduced dims {sorted(ones_m)} where the "
                    f"reference keeps size 1 in dims {sorted(ones_r)})")
        if m.dim() == 1:
            return f"{head}: summed over the wrong dimension? (.sum(1) where .sum(0) was meant)"
    try:
        torch.broadcast_shapes(got, want)
        return f"{head}: it would broadcast, but a gradient must have exactly its tensor's shape"
    except RuntimeError:
        return head


def diagnose(manual: Tensor, reference: Tensor, tol: Tolerance | None = None,
             sizes: Mapping[str, int] | None = None, index: Sequence[Tensor] = ()) -> str:
    """Say why `manual` is not `reference`: shape (missing keepdim, transposed, wrong reduced
    dimension), sign flipped, scaled by a recognisable constant (1/n, n/(n-1), 2, ...), transposed,
    or wrong only on rows whose index repeats in one of `index` (overwrite instead of accumulate).
    `sizes` names the problem's sizes, e.g. {"n": 32}, so a scale can be named. '' if they agree."""
    tol = tol or autograd_tolerance(reference.dtype)
    sizes = sizes or {}
    if tuple(manual.shape) != tuple(reference.shape):
        return _shape_diagnosis(manual, reference, tol, sizes, index)
    if manual.dtype != reference.dtype:
        return f"dtype {manual.dtype} but the tensor is {reference.dtype}"
    if tol.holds(manual, reference):
        return ""
    return _values_diagnosis(manual, reference, tol, sizes, index)


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

    @property
    def passed(self) -> bool:
        return self.shape == self.ref_shape and (self.exact or self.allclose)


def compare(name: str, manual: Tensor, reference: Tensor, tol: Tolerance | None = None,
            sizes: Mapping[str, int] | None = None, index: Sequence[Tensor] = ()) -> Comparison:
    """The lecture's cmp, shape-strict: a gradient whose shape differs from its tensor's fails even
    when it would broadcast. `tol` defaults to AUTOGRAD_TOL for the reference's dtype."""
    tol = tol or autograd_tolerance(reference.dtype)
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
    diag = "" if (exact or close) else diagnose(manual, reference, tol, sizes, index)  # never '' here
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

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0


def finite_differences(fn: Callable[[], Tensor], x: Tensor, analytic: Tensor, name: str = "x",
                       dout: Tensor | None = None, *, eps: float = FD_EPS, tol: Tolerance = FD_TOL,
                       max_elements: int = FD_MAX_ELEMENTS, directions: int = FD_DIRECTIONS,
                       seed: int = 0, sizes: Mapping[str, int] | None = None,
                       index: Sequence[Tensor] = ()) -> FDResult:
    """Check `analytic` = d(sum(fn() * dout))/dx by central differences, no autograd: every element
    when x has at most max_elements, else a seeded random sample of them plus `directions` random
    unit directions v, comparing <analytic, v> with (f(x + eps v) - f(x - eps v)) / 2eps.
    fn() must read x, a float64 tensor, which is perturbed in place and restored. `sizes` and
    `index` feed the diagnosis (see diagnose)."""
    if x.dtype != torch.float64:
        raise TypeError(f"finite differences need a float64 tensor, got {x.dtype}")
    if not isinstance(analytic, Tensor):
        return FDResult(name, (), 0, x.numel(), 0, math.nan, math.inf, tol,
                        f"no gradient: the backward returned {type(analytic).__name__}, not a Tensor")
    if tuple(analytic.shape) != tuple(x.shape):
        msg = _shape_diagnosis(analytic, torch.zeros_like(x), tol, sizes or {}, ())
        return FDResult(name, tuple(analytic.shape), 0, x.numel(), 0, math.nan, math.inf, tol, msg)
    a = analytic.detach().to(torch.float64).reshape(-1)  # (numel,)
    flat = x.view(-1)  # (numel,)  perturbed in place

    def diff_quotient(delta: Tensor | float, where: Tensor | int | None) -> float:
        with torch.no_grad():
            if where is None:
                x.add_(delta)
                plus = fn().detach().clone()
                x.sub_(2 * delta)
                minus = fn().detach()
                x.add_(delta)
            else:
                orig = flat[where].clone()
                flat[where] = orig + delta
                plus = fn().detach().clone()
                flat[where] = orig - delta
                minus = fn().detach()
                flat[where] = orig
        d = plus - minus  # difference the outputs first, then sum: less cancellation
        return float((d if dout is None else d * dout).sum()) / (2 * eps)

    g = torch.Generator().manual_seed(seed)
    n = x.numel()
    picks = torch.arange(n) if n <= max_elements else torch.randperm(n, generator=g)[:max_elements]
    dirs = 0 if n <= max_elements else directions
    vs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(dirs)]
    vs = [v / v.norm() for v in vs]  # unit directions, shaped like x
    with _one_thread():
        num = torch.tensor([diff_quotient(eps, int(i)) for i in picks]
                           + [diff_quotient(eps * v, None) for v in vs], dtype=torch.float64)  # (k + dirs,)
    ana = torch.cat([a[picks], *[(a * v.reshape(-1)).sum().reshape(1) for v in vs]])  # (k + dirs,)
    err = (ana - num).abs()
    ratio = err / (tol.atol + tol.rtol * num.abs())
    worst = float(ratio.max()) if ratio.numel() else 0.0
    k = len(picks)
    diag = ""
    if not worst <= 1.0:  # failed (NaN fails too)
        bad = ~(ratio <= 1.0)  # (k + dirs,)
        if k == n:  # every element checked: diagnose the whole tensor
            diag = _values_diagnosis(ana.reshape(x.shape), num.reshape(x.shape), tol, sizes or {}, index)
        elif bad[:k].any():  # a sampled element is wrong: diagnose the sample
            diag = _values_diagnosis(ana[:k], num[:k], tol, sizes or {}, ())
            if diag.startswith("correct"):  # rows of a flat sample are single elements: say it plainly
                diag = f"wrong on {int(bad[:k].sum())} of {k} sampled elements"
        else:  # only the random directions see it
            diag = (f"every sampled element agrees, but {int(bad[k:].sum())} of {dirs} random directions "
                    "do not: an element outside the sample is wrong")
    return FDResult(name, tuple(x.shape), k, n, dirs, float(err.max()), worst, tol, diag)


# ---------------------------------------------------------------------------- the report
@dataclass
class Section:
    title: str
    rows: list[Comparison | FDResult]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def _render_comparisons(rows: list[Comparison]) -> list[str]:
    w = max([len(r.name) for r in rows] + [6])
    sw = max([len(_fmt_shape(r.ref_shape)) for r in rows] + [5])
    out = [f"{'tensor':<{w}}  {'shape':<{sw}}  exact  approx  maxdiff    rel err    verdict"]
    for r in rows:
        out.append(f"{r.name:<{w}}  {_fmt_shape(r.ref_shape):<{sw}}  {'yes' if r.exact else 'no':<5}  "
                   f"{'yes' if r.allclose else 'no':<6}  {r.max_abs_diff:<9.2e}  {r.rel_err:<9.2e}  "
                   f"{'ok' if r.passed else 'FAIL'}")
        if not r.passed:
            out.append(f"{'':<{w}}  -> {r.diagnosis}")
    return out


def _render_fd(rows: list[FDResult]) -> list[str]:
    w = max([len(r.name) for r in rows] + [6])
    out = [f"{'tensor':<{w}}  {'checked':<24}  max|a-n|   worst/tol  verdict"]
    for r in rows:
        what = f"{r.elements} of {r.numel}" + (f" + {r.directions} dirs" if r.directions else "")
        out.append(f"{r.name:<{w}}  {what:<24}  {r.max_abs_err:<9.2e}  {r.worst_ratio:<9.2e}  "
                   f"{'ok' if r.passed else 'FAIL'}")
        if not r.passed:
            out.append(f"{'':<{w}}  -> {r.diagnosis or 'mismatch'}")
    return out


@dataclass
class Report:
    """The result of a check: sections of rows, `.passed`, and a readable str() (print it)."""

    title: str
    sections: list[Section]
    header: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.sections)

    def rows(self) -> list[Comparison | FDResult]:
        return [r for s in self.sections for r in s.rows]

    def failures(self) -> list[Comparison | FDResult]:
        return [r for r in self.rows() if not r.passed]

    def row(self, name: str, section: int = 0) -> Comparison | FDResult:
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


# ---------------------------------------------------------------------------- users' own backward
def _named(inputs: Mapping[str, Tensor] | Sequence[Tensor]) -> dict[str, Tensor]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {f"x{i}": t for i, t in enumerate(inputs)}


def _call(forward: Callable, backward: Callable, xs: list[Tensor], dout: Tensor,
          n_wrt: int) -> tuple[Tensor, ...]:
    """Run forward then backward with the upstream gradient dout; return the gradients."""
    res = forward(*xs)
    out = res[0] if isinstance(res, tuple) else res
    dout = dout.to(out.dtype)
    grads = backward(dout, res[1]) if isinstance(res, tuple) else backward(dout, *xs)
    grads = (grads,) if isinstance(grads, Tensor) else tuple(grads)
    if len(grads) != n_wrt:
        raise ValueError(f"backward returned {len(grads)} gradients for {n_wrt} inputs")
    return grads


def check_backward(forward: Callable, backward: Callable,
                   inputs: Mapping[str, Tensor] | Sequence[Tensor], *, wrt: Sequence[str] | None = None,
                   seed: int = 0, fd: bool = True, title: str | None = None,
                   tol: Tolerance | None = None, fd_tol: Tolerance = FD_TOL,
                   sizes: Mapping[str, int] | None = None) -> Report:
    """Check a hand-written backward against autograd and float64 finite differences.

    forward(*inputs) returns (out, cache), and then backward(dout, cache) is called; or it returns
    just out, and then backward(dout, *inputs) is called. backward returns one gradient per input
    in `wrt` (default: every floating-point input, in order). dout is a seeded random tensor shaped
    like out, so the gradients checked are those of sum(out * dout). Integer inputs (indices) are
    passed through, and a gradient wrong only on rows whose index repeats in one is diagnosed.
    Autograd is compared in the inputs' dtype; finite differences run in float64.
    `sizes` names sizes for the diagnosis (e.g. {"n": 32}); the input shapes' sizes are added."""
    named = _named(inputs)
    wrt = list(wrt) if wrt is not None else [k for k, t in named.items() if t.is_floating_point()]
    index = [t for t in named.values() if not t.is_floating_point() and not t.is_complex()]
    all_sizes = dict(sizes or {})
    for k, t in named.items():
        for i, s in enumerate(t.shape):
            if s not in all_sizes.values():
                all_sizes[f"{k}.shape[{i}]"] = s

    # autograd reference, in the inputs' own dtype
    leaves = {k: (t.detach().clone().requires_grad_(k in wrt) if k in wrt else t) for k, t in named.items()}
    with torch.enable_grad():
        res = forward(*leaves.values())
        out = res[0] if isinstance(res, tuple) else res
        g = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        ref = torch.autograd.grad(out, [leaves[k] for k in wrt], dout, allow_unused=True)
    ref = [torch.zeros_like(named[k]) if r is None else r for k, r in zip(wrt, ref)]
    with torch.no_grad():
        grads = _call(forward, backward, [t.detach() for t in named.values()], dout, len(wrt))
    rows: list[Comparison | FDResult] = [compare(k, gm, r, tol, all_sizes, index)
                                         for k, gm, r in zip(wrt, grads, ref)]
    dtypes = sorted({str(named[k].dtype).replace("torch.", "") for k in wrt})
    sections = [Section(f"hand-written backward vs autograd ({', '.join(dtypes)}; "
                        f"{tol or autograd_tolerance(named[wrt[0]].dtype) if wrt else ''})", rows)]

    if fd:  # finite differences in float64, no autograd
        x64 = [t.detach().to(torch.float64).clone() if t.is_floating_point() else t for t in named.values()]
        with torch.no_grad():
            dout64 = dout.to(torch.float64)
            grads64 = _call(forward, backward, x64, dout64, len(wrt))
        keys = list(named)
        fd_rows: list[Comparison | FDResult] = []
        for k, g64 in zip(wrt, grads64):
            x = x64[keys.index(k)]

            def fn(xs=x64) -> Tensor:
                res = forward(*xs)
                return res[0] if isinstance(res, tuple) else res
            fd_rows.append(finite_differences(fn, x, g64, k, dout64, tol=fd_tol, seed=seed, sizes=all_sizes,
                                              index=index))
        sections.append(Section(f"hand-written backward vs finite differences (float64, central, "
                                f"eps={FD_EPS:g}; pass |a-n| <= atol + rtol*|n| with {fd_tol})", fd_rows))
    return Report(title or f"check_backward: {getattr(backward, '__name__', 'backward')}", sections)


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
    atomic parameter gradients and the closed forms. `backward` replaces atomic.backward (to test
    the checker with deliberately broken ones)."""
    dtype, n = p.C.dtype, X.shape[0]
    sizes = {"n": n, "H": p.W1.shape[1], "V": p.C.shape[0]}
    ref_f, ref = _autograd_atomic(p, X, Y)
    with torch.no_grad():
        f = atomic.forward(p, X, Y)
        grads = backward(p, X, Y, f)
    rows = [compare(name, gm, ref[name], sizes=sizes, index=[X] if name == "C" else ())
            for name, gm in grads.items()]
    n_exact = sum(r.exact for r in rows)
    atomic_sec = Section(f"exercise 1: atomic backward vs autograd ({str(dtype)[6:]}; "
                         f"{autograd_tolerance(dtype)})", rows,
                         [f"{n_exact} of {len(rows)} bit-exact, "
                          f"{sum(r.passed for r in rows)} of {len(rows)} pass", *_first_failure_note(rows)])

    # exercises 2 and 3: the closed forms, fed autograd's own upstream gradient
    dlogits, dhprebn = _closed_forms(p, Y, f, ref["hpreact"])
    closed = Section("exercises 2 and 3: closed forms in ops.py vs autograd", [
        compare("logits (ops.cross_entropy_backward)", dlogits, ref["logits"], sizes=sizes),
        compare("hprebn (ops.batchnorm_backward)", dhprebn, ref["hprebn"], sizes=sizes)])
    sections = [atomic_sec, closed]
    if fd:
        sections.append(_lecture_fd(p, X, Y, backward, sizes, seed))
    header = [f"batch n={n}, n_embd={p.C.shape[1]}, n_hidden={p.W1.shape[1]}, block_size={X.shape[1]}, "
              f"vocab={p.C.shape[0]}; loss {float(ref_f.loss.detach()):.6f}"]
    return Report(f"handgrad check: the lecture's graph (Backprop Ninja), {str(dtype)[6:]}", sections, header)


def _lecture_fd(p: Params, X: Tensor, Y: Tensor, backward: Callable[..., atomic.Grads],
                sizes: Mapping[str, int], seed: int) -> Section:
    """Finite differences (float64) for the atomic parameter gradients and the two closed forms."""
    p64 = Params(*(t.detach().to(torch.float64).clone() for t in p.tensors()))
    with torch.no_grad():
        f = atomic.forward(p64, X, Y)
        grads = backward(p64, X, Y, f)
    dlogits, dhprebn = _closed_forms(p64, Y, f, grads.dhpreact)
    rows: list[Comparison | FDResult] = []
    for (name, t), (_, g) in zip(p64.items(), grads.params().items()):
        rows.append(finite_differences(lambda: atomic.forward(p64, X, Y).loss, t, g, name,
                                       seed=seed, sizes=sizes, index=[X] if name == "C" else ()))
    logits = f.logits.clone()
    rows.append(finite_differences(lambda: ops.cross_entropy_forward(logits, Y)[0], logits, dlogits,
                                   "logits (ops.cross_entropy_backward)", seed=seed, sizes=sizes))
    hprebn = f.hprebn.clone()

    def loss_from_hprebn() -> Tensor:
        hpreact, _, _ = ops.batchnorm_forward(hprebn, p64.bngain, p64.bnbias)  # (N, H)
        h, _ = ops.tanh_forward(hpreact)  # (N, H)
        logits, _ = ops.linear_forward(h, p64.W2, p64.b2)  # (N, V)
        return ops.cross_entropy_forward(logits, Y)[0]
    rows.append(finite_differences(loss_from_hprebn, hprebn, dhprebn, "hprebn (ops.batchnorm_backward)",
                                   seed=seed, sizes=sizes))
    return Section(f"finite differences, float64, no autograd (central, eps={FD_EPS:g}; pass |a-n| <= "
                   f"atol + rtol*|n| with {FD_TOL})\ntensors over {FD_MAX_ELEMENTS} elements: a seeded "
                   f"sample of {FD_MAX_ELEMENTS} plus {FD_DIRECTIONS} random unit directions", rows)


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
