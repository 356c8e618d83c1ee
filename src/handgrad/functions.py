"""Check the backward passes engineers write for PyTorch: a `torch.autograd.Function` subclass
(`check_function`) or an op registered with `torch.library.custom_op` / `register_autograd`
(`check_op`). The Function runs through autograd's engine as it would in a model; what its backward
returns is taken before the engine reshapes or casts it, and held against autograd differentiating
the Function's own forward, in the inputs' dtype and again in float64, and against float64 finite
differences. Then the contract autograd relies on: one gradient per input, needs_input_grad,
mark_non_differentiable, mark_dirty, saved tensors not changed in place, each output on its own;
second order (the gradgradcheck question) unless the backward is @once_differentiable, and the
jvp when there is one. A wrong gradient is named from the user's forward (handgrad.variants).
References: PyTorch, "Extending torch.autograd" and "Custom operators"; torch.autograd.gradcheck.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from handgrad import variants
from handgrad.check import (
    AUTOGRAD_RULE,
    FD_RULE,
    REPLAY_TITLE,
    SECOND_ORDER_LEVEL,
    Comparison,
    FDResult,
    Finding,
    Report,
    Section,
    Tolerance,
    _excused,
    autograd_tolerance,
    compare,
    finite_differences,
    measured_level,
)
from handgrad.limits import Overran, overran_message, time_limit

DEFAULT_TIMEOUT_S = 60.0  # one call of the user's forward or backward may take this long
_ONCE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(torch.__file__)


class CheckInputError(ValueError):
    """What was passed to check_function / check_op cannot be checked; the message is one line."""


# ---------------------------------------------------------------------------- what is checked
class RecordingCtx(FunctionCtx):
    """A stand-in for autograd's ctx when the forward is run directly (under autograd, as the
    reference): it keeps what forward saves and marks, and when the saved tensors were saved."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.to_save: tuple = ()
        self.saved_copies: list[Tensor | None] = []
        self.saved_versions: list[int] = []
        self.dirty_tensors: tuple = ()
        self.non_differentiable: tuple = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.to_save = tensors
        with torch._C.DisableTorchFunction():  # not part of the user's forward (a recording skips it)
            self.saved_copies = [t.detach().clone() if isinstance(t, Tensor) else None for t in tensors]
        self.saved_versions = [t._version if isinstance(t, Tensor) else 0 for t in tensors]

    @property
    def saved_tensors(self) -> tuple:
        return tuple(self.to_save)

    def save_for_forward(self, *tensors: Any) -> None:
        self.saved_for_forward = tensors


@dataclass
class Subject:
    """A Function or a custom op, as the check uses it."""

    name: str  # "LayerNormFunction", "mylib::softplus"
    kind: str  # "Function" | "custom op"
    params: list[str]  # the positional inputs' names
    apply: Callable[..., Any]  # the call autograd differentiates
    forward_math: Callable[..., tuple[Any, RecordingCtx]] | None  # the forward run directly: (out, ctx)
    spy_host: Any  # the object whose attribute `spy_attr` is the user's backward
    spy_attr: str
    backward: Callable | None  # the user's backward(ctx, *grads)
    jvp_host: Any = None  # the Function class when it defines jvp
    once_differentiable: bool = False
    kw_params: list[str] = field(default_factory=list)  # an op's keyword-only inputs


def _describe(obj: Any) -> str:
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return f"function {obj.__qualname__}"
    if isinstance(obj, type):
        return f"class {obj.__qualname__}"
    return f"a {type(obj).__name__}"


def _forward_params(fn: Callable, skip: int) -> list[str]:
    try:
        ps = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_POSITIONAL for p in ps):
        return []
    return [p.name for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def function_subject(fn: Any) -> Subject:
    """The Subject for a torch.autograd.Function subclass or its .apply; CheckInputError otherwise."""
    cls = fn
    if inspect.ismethod(fn) and isinstance(fn.__self__, type):
        cls = fn.__self__
    Function = torch.autograd.Function
    if not (isinstance(cls, type) and issubclass(cls, Function)):
        hint = (
            " (an instance: pass the class itself)"
            if isinstance(type(fn), type) and isinstance(fn, Function)
            else "; a plain (forward, backward) pair is checked with check_backward, a custom op with "
            "check_op"
        )
        raise CheckInputError(
            f"check_function: expected a torch.autograd.Function subclass or its .apply, got "
            f"{_describe(fn)}{hint}"
        )
    if cls.forward is Function.forward:
        raise CheckInputError(f"check_function: {cls.__qualname__} defines no forward")
    has_bw, has_vjp = cls.backward is not Function.backward, cls.vjp is not Function.vjp
    if not (has_bw or has_vjp):
        raise CheckInputError(
            f"check_function: {cls.__qualname__} defines no backward (or vjp): nothing to check"
        )
    if has_bw and has_vjp and cls.backward is not cls.vjp:
        raise CheckInputError(
            f"check_function: {cls.__qualname__} defines both backward and vjp; autograd "
            "refuses that, define one"
        )
    setup = torch.autograd.function._is_setup_context_defined(cls.setup_context)
    attr = "vjp" if has_vjp and not has_bw else "backward"
    backward = getattr(cls, attr)
    params = _forward_params(cls.forward, 0 if setup else 1)

    def forward_math(*args: Any) -> tuple[Any, RecordingCtx]:
        ctx = RecordingCtx(tuple(isinstance(a, Tensor) and a.requires_grad for a in args))
        if setup:
            out = cls.forward(*args)
            cls.setup_context(ctx, args, out)
        else:
            out = cls.forward(ctx, *args)
        return out, ctx

    return Subject(
        cls.__qualname__,
        "Function",
        params,
        cls.apply,
        forward_math,
        cls,
        attr,
        backward,
        cls if cls.jvp is not Function.jvp else None,
        getattr(backward, "__code__", None) is _ONCE_CODE,
    )


def op_subject(op: Any) -> Subject:
    """The Subject for torch.ops.ns.name, one of its overloads, or a torch.library.custom_op."""
    from torch._library.custom_ops import OPDEFS, CustomOpDef

    opdef = op if isinstance(op, CustomOpDef) else None
    overload = None
    if opdef is not None:
        overload = opdef._opoverload
    elif isinstance(op, torch._ops.OpOverloadPacket):
        names = op.overloads()
        overload = (
            op.default
            if "default" in names
            else getattr(op, names[0])
            if len(names) == 1
            else None
        )
        if overload is None:
            raise CheckInputError(
                f"check_op: {op} has overloads {names}; pass one, e.g. "
                f"torch.ops.{op._qualified_op_name.replace('::', '.')}.{names[0]}"
            )
    elif isinstance(op, torch._ops.OpOverload):
        overload = op
    if overload is None:
        raise CheckInputError(
            f"check_op: expected a custom op (torch.ops.ns.name or a torch.library.custom_op), "
            f"got {_describe(op)}"
            + (
                "; an autograd.Function is checked with check_function"
                if isinstance(op, type) and issubclass(op, torch.autograd.Function)
                else ""
            )
        )
    qual = overload._schema.name
    opdef = opdef or OPDEFS.get(qual)
    schema = overload._schema
    params = [a.name for a in schema.arguments if not a.kwarg_only]
    kw = [a.name for a in schema.arguments if a.kwarg_only]
    info = opdef if opdef is not None else None
    forward_math = None
    if opdef is not None:
        impl = opdef._init_fn

        def forward_math(*args: Any, **kwargs: Any) -> tuple[Any, RecordingCtx]:
            ctx = RecordingCtx(tuple(isinstance(a, Tensor) and a.requires_grad for a in args))
            out = impl(*args, **kwargs)
            if opdef._setup_context_fn is not None:
                if kw:
                    opdef._setup_context_fn(ctx=ctx, inputs=args, keyword_only_inputs=kwargs, output=out)
                else:
                    opdef._setup_context_fn(ctx=ctx, inputs=args, output=out)
            return out, ctx

    return Subject(
        qual,
        "custom op",
        params,
        overload,
        forward_math,
        info,
        "_backward_fn",
        getattr(info, "_backward_fn", None),
        None,
        False,
        kw,
    )


def _find_op_info(subject: Subject, out: Any) -> None:
    """An op registered with torch.library.register_autograd (not custom_op) keeps its backward in
    the closure of the autograd.Function it generated: find it from an output's grad_fn."""
    if subject.spy_host is not None:
        return
    for t in _flat(out):
        fn = getattr(t, "grad_fn", None)
        cls = getattr(type(fn), "_forward_cls", None) if fn is not None else None
        bw = getattr(cls, "backward", None)
        if bw is None:
            continue
        info = inspect.getclosurevars(bw).nonlocals.get("info")
        if info is not None and getattr(info, "_backward_fn", None) is not None:
            subject.spy_host, subject.backward = info, info._backward_fn
            subject.once_differentiable = getattr(info._backward_fn, "__code__", None) is _ONCE_CODE
            return


# ---------------------------------------------------------------------------- running it
@dataclass
class BackwardCall:
    """One call of the user's backward, as the spy saw it."""

    needs: tuple[bool, ...]
    raw: Any = None
    returned: bool = False
    error: BaseException | None = None
    saved: dict[str, Tensor] = field(default_factory=dict)  # what ctx holds: saved tensors, attributes
    saved_error: str = ""  # unpacking ctx.saved_tensors raised (a saved tensor changed in place)
    changed: list[str] = field(default_factory=list)  # held tensors the backward changed in place
    grad_changed: bool = False  # it changed its incoming gradient in place


def _ctx_tensors(ctx: Any, rec: BackwardCall) -> dict[str, Tensor]:
    held: dict[str, Tensor] = {}
    try:
        for i, t in enumerate(ctx.saved_tensors):
            if isinstance(t, Tensor):
                held[f"ctx.saved_tensors[{i}]"] = t
    except RuntimeError as e:
        rec.saved_error = _one_line(e)
    for k, v in getattr(ctx, "__dict__", {}).items():
        if k.startswith("_"):
            continue
        if isinstance(v, Tensor):
            held[f"ctx.{k}"] = v
        elif isinstance(v, (tuple, list)):
            for j, t in enumerate(v):
                if isinstance(t, Tensor):
                    held[f"ctx.{k}[{j}]"] = t
    return held


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(
        torch.equal(a.detach(), b)
        or (
            a.is_floating_point()
            and torch.equal(a.detach().isnan(), b.isnan())
            and torch.equal(torch.nan_to_num(a.detach()), torch.nan_to_num(b))
        )
    )


@contextmanager
def _spy(subject: Subject, log: list[BackwardCall], timeout: float | None) -> Iterator[None]:
    """While inside, every call of the user's backward is logged before autograd sees its result."""
    host, attr, original = subject.spy_host, subject.spy_attr, subject.backward
    if host is None or original is None:
        yield
        return
    label = f"{subject.name}.backward"

    def spy(ctx: Any, *grads: Any) -> Any:
        rec = BackwardCall(tuple(getattr(ctx, "needs_input_grad", ()) or ()))
        log.append(rec)
        held = _ctx_tensors(ctx, rec)
        rec.saved = held
        before = {k: t.detach().clone() for k, t in held.items()}
        gin = [g.detach().clone() if isinstance(g, Tensor) else None for g in grads]
        try:
            with time_limit(timeout, label):
                res = original(ctx, *grads)
        except BaseException as e:
            rec.error = e
            raise
        rec.raw, rec.returned = res, True
        rec.changed = [k for k, t in held.items() if not _same(t, before[k])]
        rec.grad_changed = any(
            isinstance(g, Tensor) and b is not None and not _same(g, b) for g, b in zip(grads, gin)
        )
        return res

    had = attr in vars(host) if isinstance(host, type) else True
    saved_attr = vars(host).get(attr) if isinstance(host, type) else getattr(host, attr)
    setattr(host, attr, staticmethod(spy) if isinstance(host, type) else spy)
    try:
        yield
    finally:
        if isinstance(host, type):
            if had:
                setattr(host, attr, saved_attr)
            else:
                delattr(host, attr)
        else:
            setattr(host, attr, saved_attr)


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _where(e: BaseException) -> str:
    """file:line of the innermost frame of the user's code in e's traceback."""
    best = ""
    for fs in traceback.extract_tb(e.__traceback__):
        f = os.path.abspath(fs.filename)
        if (
            f.startswith(_TORCH_DIR)
            or f.startswith(os.path.join(_HERE, "functions.py"))
            or f.startswith(os.path.join(_HERE, "variants.py"))
            or f.startswith(os.path.join(_HERE, "check.py"))
        ):
            continue
        best = f"{os.path.basename(fs.filename)}:{fs.lineno}"
    return best


def _raised(e: BaseException, what: str) -> str:
    if isinstance(e, Overran):
        return overran_message(e, what)
    where = _where(e)
    return f"{what} raised {_one_line(e)}" + (f" (at {where})" if where else "")


@dataclass
class Run:
    """One trip through autograd's engine: forward, then backward with douts."""

    outs: list[Any] = field(default_factory=list)
    diff_out: list[int] = field(default_factory=list)  # outputs that carry a gradient
    douts: dict[int, Tensor] = field(default_factory=dict)
    calls: list[BackwardCall] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)  # what autograd handed back, per diff input
    error: str = ""  # one line: the forward or backward raised, or ran out of time
    phase: str = ""  # "forward" | "backward"
    changed_inputs: list[int] = field(default_factory=list)  # inputs the forward changed in place
    returned_inputs: list[int] = field(default_factory=list)  # inputs returned as outputs (mark_dirty)
    call_args: list[Any] = field(default_factory=list)
    mutate_error: str = ""

    @property
    def raw(self) -> BackwardCall | None:
        return self.calls[-1] if self.calls else None


def _make_douts(outs: Sequence[Any], diff_out: Sequence[int], seed: int) -> dict[int, Tensor]:
    """Seeded N(0, 1) upstream gradients in float64, on each output's device."""
    g = torch.Generator().manual_seed(seed + 1)
    return {
        k: torch.randn(outs[k].shape, generator=g, dtype=torch.float64).to(outs[k].device) for k in diff_out
    }


def run_engine(
    subject: Subject,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    diff: Sequence[int],
    dtype: torch.dtype | None,
    douts: Mapping[int, Tensor] | None,
    seed: int,
    timeout: float | None,
    only: Sequence[int] | None = None,
    mutate: Callable[[list[Any], list[Any]], None] | None = None,
    create_graph: bool = False,
) -> tuple[Run, list[Tensor]]:
    """Forward then backward through autograd, with the inputs at `diff` requiring grad (cast to
    `dtype`; None keeps theirs) and the rest passed through. `only` restricts the outputs whose
    gradient flows; `mutate(outs, args)` runs between forward and backward. Returns the run and
    the leaves."""
    run = Run()
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    leaves = {i: cast(args[i]).clone().requires_grad_(True) for i in diff}
    call_args = [
        leaves[i].clone()
        if i in leaves
        else cast(a).clone()
        if isinstance(a, Tensor) and a.is_floating_point()
        else a
        for i, a in enumerate(args)
    ]
    run.call_args = call_args
    before = [t.detach().clone() if isinstance(t, Tensor) else None for t in call_args]
    with _spy(subject, run.calls, timeout):
        try:
            with time_limit(timeout, f"{subject.name}.forward"), torch.enable_grad():
                out = subject.apply(*call_args, **kwargs)
        except BaseException as e:  # the user's forward: anything it raises is reported
            if isinstance(e, KeyboardInterrupt):
                raise
            run.error, run.phase = (
                _raised(e, f"{subject.name}.forward" if subject.kind == "Function" else f"{subject.name}"),
                "forward",
            )
            return run, list(leaves.values())
        if subject.kind == "custom op" and subject.spy_host is None:
            _find_op_info(subject, out)
        run.outs = _flat(out)
        run.changed_inputs = [
            i
            for i, (t, b) in enumerate(zip(call_args, before))
            if isinstance(t, Tensor) and b is not None and not _same(t, b)
        ]
        run.returned_inputs = [
            i for i, t in enumerate(call_args) if isinstance(t, Tensor) and any(o is t for o in run.outs)
        ]
        run.diff_out = [k for k, o in enumerate(run.outs) if isinstance(o, Tensor) and o.requires_grad]
        run.douts = dict(douts) if douts is not None else _make_douts(run.outs, run.diff_out, seed)
        flowing = [k for k in run.diff_out if (only is None or k in only) and k in run.douts]
        if mutate is not None:
            try:
                with torch.no_grad():
                    mutate(run.outs, call_args)
            except RuntimeError as e:
                run.mutate_error = _one_line(e)
        if not flowing or not leaves:
            return run, list(leaves.values())
        dd = [run.douts[k].to(run.outs[k].dtype).to(run.outs[k].device) for k in flowing]
        if create_graph:
            dd = [d.detach().requires_grad_(True) for d in dd]
            run.douts = {k: d for k, d in zip(flowing, dd)}
        try:
            got = torch.autograd.grad(
                [run.outs[k] for k in flowing],
                list(leaves.values()),
                dd,
                allow_unused=True,
                create_graph=create_graph,
            )
            run.grads = list(got)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            rec = run.raw
            if rec is not None and rec.error is not None:
                e = rec.error
            run.error, run.phase = (
                _raised(
                    e,
                    f"{subject.name}.backward"
                    if rec is not None and not rec.returned
                    else "autograd, taking the backward's result,",
                ),
                "backward",
            )
    return run, list(leaves.values())


# ---------------------------------------------------------------------------- the reference
@dataclass
class Reference:
    """Autograd differentiating the forward itself (RecordingCtx in place of autograd's ctx)."""

    grads: list[Tensor]  # per diff input
    outs: list[Any]
    ctx: RecordingCtx | None
    leaves: list[Tensor] = field(default_factory=list)  # the differentiated inputs, outs' graph leads to them


@dataclass
class _Refs:
    """The references of one check: in the inputs' dtype, float32 and float64 (None: none)."""

    ref: Reference | None
    r32: Reference | None
    r64: Reference | None
    note: str = ""  # why there is none, or why it was set aside
    refuted: bool = False  # the finite differences disagree with it

    @property
    def valid(self) -> bool:
        return self.ref is not None and not self.refuted


def reference(
    subject: Subject,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    diff: Sequence[int],
    diff_out: Sequence[int],
    douts: Mapping[int, Tensor],
    dtype: torch.dtype | None,
    timeout: float | None,
    only: Sequence[int] | None = None,
) -> Reference | str:
    """Autograd's gradients of sum_k <out_k, dout_k> through the forward run directly, or a line
    saying why there are none (no forward to run, it raised, it leaves autograd's graph)."""
    if subject.forward_math is None:
        return "the op's forward is not Python code handgrad can run under autograd"
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    leaves = [cast(args[i]).clone().requires_grad_(True) for i in diff]
    call_args = list(args)
    for i, leaf in zip(diff, leaves):
        call_args[i] = leaf.clone()
    for i, a in enumerate(call_args):
        if i not in diff and isinstance(a, Tensor) and a.is_floating_point():
            call_args[i] = cast(a).clone()
    flowing = [k for k in diff_out if only is None or k in only]
    try:
        with time_limit(timeout, f"{subject.name}.forward"), torch.enable_grad():
            res = subject.forward_math(*call_args, **kwargs)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return "running the forward directly under autograd failed: " + _one_line(e)
    out, ctx = res
    outs = _flat(out)
    used = [k for k in flowing if k < len(outs) and isinstance(outs[k], Tensor) and outs[k].requires_grad]
    if not used:
        return ("the forward's outputs carry no autograd graph (computed outside torch, detached, or under "
                "no_grad)")
    try:
        with torch.enable_grad():
            got = torch.autograd.grad(
                [outs[k] for k in used],
                leaves,
                [douts[k].to(outs[k].dtype).to(outs[k].device) for k in used],
                allow_unused=True,
            )
    except RuntimeError as e:
        return "autograd could not differentiate the forward: " + _one_line(e)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got)]
    return Reference(grads, outs, ctx, leaves)


# ---------------------------------------------------------------------------- the check
OPTIONS = ("wrt", "seed", "fd", "double", "jvp", "timeout", "title", "device", "name_mistakes")


def _bind(
    subject: Subject, inputs: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Positional inputs for the Function (its kwargs bound by name, defaults filled in); for an op,
    the keyword-only inputs stay keywords."""
    args = list(inputs)
    kw = dict(kwargs)
    if subject.kind == "custom op":
        for name in list(kw):
            if name in subject.params:
                i = subject.params.index(name)
                if len(args) < i:
                    raise CheckInputError(
                        f"check_op: {subject.name}'s input {name!r} given by keyword but an "
                        "earlier input is missing"
                    )
                args.insert(i, kw.pop(name))
        return args, kw
    if kw:
        if not subject.params:
            raise CheckInputError(
                f"check_function: {subject.name}.forward takes *args: pass its inputs "
                "positionally (unknown keyword(s) " + ", ".join(map(repr, kw)) + ")"
            )
        for name in kw:
            if name not in subject.params:
                raise CheckInputError(
                    f"check_function: {subject.name}.forward has no input {name!r} (its inputs: "
                    f"{', '.join(subject.params)}; the check's own options: {', '.join(OPTIONS)})"
                )
        for i, name in enumerate(subject.params):
            if name in kw:
                if i < len(args):
                    raise CheckInputError(f"check_function: {subject.name}'s input {name!r} given twice")
                if len(args) < i:
                    raise CheckInputError(
                        f"check_function: {subject.name}'s input {name!r} given by keyword "
                        f"but {subject.params[len(args)]!r} before it is missing"
                    )
                args.append(kw.pop(name))
    if subject.params and len(args) < len(subject.params):
        try:
            fwd = subject.spy_host.forward
            ps = list(inspect.signature(fwd).parameters.values())
            byname = {p.name: p for p in ps}
            for name in subject.params[len(args) :]:
                if byname[name].default is inspect.Parameter.empty:
                    raise CheckInputError(
                        f"check_function: {subject.name}.forward needs input {name!r}, not given"
                    )
                args.append(byname[name].default)
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
    return args, {}


def _validate(what: str, subject: Subject, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """One line for inputs that cannot be checked: arrays, tensors in lists, no floating tensor."""
    for i, a in enumerate(list(args) + list(kwargs.values())):
        name = subject.params[i] if i < len(subject.params) else f"input {i}"
        tname = type(a).__module__ + "." + type(a).__name__
        if tname.startswith("numpy.") and hasattr(a, "shape"):
            raise CheckInputError(
                f"{what}: input {name!r} is a {tname}, not a torch.Tensor: pass torch.from_numpy(...) "
                "(or torch.tensor(...))"
            )
        if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) for t in a):
            raise CheckInputError(
                f"{what}: input {name!r} is a {type(a).__name__} of tensors: autograd.Function "
                "differentiates tensors passed directly, pass them as separate inputs"
            )
        if isinstance(a, Tensor):
            if a.is_complex():
                raise CheckInputError(
                    f"{what}: input {name!r} is complex ({a.dtype}): only real floating-point "
                    "tensors are checked"
                )
            if a.layout != torch.strided:
                raise CheckInputError(
                    f"{what}: input {name!r} has layout {a.layout}: only dense (strided) tensors are checked"
                )
            if a.device.type == "meta":
                raise CheckInputError(f"{what}: input {name!r} is on the meta device (no values to check)")
    if not any(isinstance(a, Tensor) and a.is_floating_point() for a in list(args) + list(kwargs.values())):
        kinds = ", ".join(sorted({type(a).__name__ for a in args})) or "nothing"
        raise CheckInputError(
            f"{what}: no floating-point tensor among the inputs (got {kinds}): nothing to "
            "differentiate; pass torch tensors, e.g. torch.randn(4, 3, dtype=torch.float64)"
        )


def _diff_positions(what: str, subject: Subject, args: Sequence[Any], wrt: Any) -> list[int]:
    """The inputs differentiated: `wrt`; else those passed with requires_grad=True (as gradcheck
    reads them); else every floating-point tensor."""
    floats = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    if wrt is None:
        marked = [i for i in floats if args[i].requires_grad]
        return marked or floats
    wanted = [wrt] if isinstance(wrt, (int, str)) else list(wrt)
    out = []
    for w in wanted:
        i = subject.params.index(w) if isinstance(w, str) and w in subject.params else w
        if not isinstance(i, int) or i not in floats:
            raise CheckInputError(
                f"{what}: wrt={w!r} is not a floating-point tensor input (those are: "
                f"{', '.join(_name(subject, j) for j in floats)})"
            )
        out.append(i)
    return sorted(set(out))


def _name(subject: Subject, i: int) -> str:
    return subject.params[i] if i < len(subject.params) else f"input{i}"


def _fmt_arg(a: Any) -> str:
    if isinstance(a, Tensor):
        dt = str(a.dtype).replace("torch.", "")
        dev = "" if a.device.type == "cpu" else f" {a.device}"
        return f"{tuple(a.shape)} {dt}{dev}"
    r = repr(a)
    return r if len(r) <= 30 else r[:27] + "..."


def check_function(
    fn: Any,
    *inputs: Any,
    wrt: Any = None,
    seed: int = 0,
    fd: bool = True,
    double: bool | None = None,
    jvp: bool | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    title: str | None = None,
    device: str | torch.device | None = None,
    name_mistakes: bool = True,
    **kwargs: Any,
) -> Report:
    """Check a torch.autograd.Function (the class or its .apply) on these inputs.

    Inputs are passed as to MyFunction.apply; keyword arguments other than the options below are
    the forward's own inputs by name. Every floating-point tensor input is differentiated (`wrt`:
    only these, by name or position); integer tensors and other objects pass through. The backward
    runs through autograd's engine; its result is held against autograd differentiating
    MyFunction.forward in the inputs' dtype and again in float64, and against float64 finite
    differences (`fd`). Then the contract: one gradient per input, shapes/dtypes/devices, None
    for inputs needing none and never for one that does (each input alone needing a gradient),
    mark_non_differentiable, mark_dirty, saved tensors unchanged, each output on its own. Second
    order unless the backward is @once_differentiable (`double`), forward mode when the Function
    defines jvp (`jvp`). Each call of the forward or backward may take `timeout` seconds. `device`
    moves the inputs first ("cuda": CheckInputError when no GPU is present). A wrong gradient is
    named from the forward's own graph (`name_mistakes`). Problems with the call itself raise
    CheckInputError with a one-line message; everything about the Function is in the report."""
    subject = function_subject(fn)
    args, kw = _bind(subject, inputs, kwargs)
    return _check(
        subject, args, kw, wrt, seed, fd, double, jvp, timeout, title, device, name_mistakes, "check_function"
    )


def check_op(
    op: Any,
    *inputs: Any,
    wrt: Any = None,
    seed: int = 0,
    fd: bool = True,
    double: bool | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    title: str | None = None,
    device: str | torch.device | None = None,
    name_mistakes: bool = True,
    **kwargs: Any,
) -> Report:
    """Check a custom op's registered backward (torch.library.custom_op + register_autograd, or
    torch.library.register_autograd on a defined op): `torch.ops.ns.name`, one of its overloads, or
    the object custom_op returned. The same checks as check_function; the reference is autograd
    through the op's Python implementation when it is a custom_op written with torch ops, and
    finite differences otherwise (an implementation in NumPy or a compiled kernel). A registration
    problem torch.library.opcheck finds (schema, autograd registration) gets its own row."""
    subject = op_subject(op)
    args, kw = _bind(subject, inputs, kwargs)
    return _check(
        subject, args, kw, wrt, seed, fd, double, None, timeout, title, device, name_mistakes, "check_op"
    )


def _check(
    subject: Subject,
    args: list[Any],
    kwargs: dict[str, Any],
    wrt: Any,
    seed: int,
    fd: bool,
    double: bool | None,
    jvp: bool | None,
    timeout: float | None,
    title: str | None,
    device: Any,
    want_names: bool,
    what: str,
) -> Report:
    _validate(what, subject, args, kwargs)
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise CheckInputError(f"{what}: device={str(device)!r} but no CUDA GPU is available here")
        args = [a.to(dev) if isinstance(a, Tensor) else a for a in args]
        kwargs = {k: a.to(dev) if isinstance(a, Tensor) else a for k, a in kwargs.items()}
    diff = _diff_positions(what, subject, args, wrt)
    c = _Checker(subject, args, kwargs, diff, seed, fd, timeout, want_names)
    head = ", ".join(f"{_name(subject, i)} {_fmt_arg(a)}" for i, a in enumerate(args))
    if kwargs:
        head += ", " + ", ".join(f"{k}={_fmt_arg(v)}" for k, v in kwargs.items())
    report_title = title or f"{what}: {subject.name}({head})"
    return c.run(report_title, double, jvp)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@dataclass
class _Checker:
    subject: Subject
    args: list[Any]
    kwargs: dict[str, Any]
    diff: list[int]
    seed: int
    fd: bool
    timeout: float | None
    want_names: bool
    contract: list[Finding] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    zero_ok: dict[str, bool] = field(default_factory=dict)  # right gradient zero here: None is right

    @property
    def names(self) -> list[str]:
        return [_name(self.subject, i) for i in self.diff]

    def sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for i, a in enumerate(self.args):
            if isinstance(a, Tensor):
                for d, s in enumerate(a.shape):
                    if s not in sizes.values():
                        sizes[f"{_name(self.subject, i)}.shape[{d}]"] = s
        return sizes

    def index(self) -> list[Tensor]:
        return [
            a
            for a in self.args
            if isinstance(a, Tensor) and not a.is_floating_point() and a.dtype != torch.bool
        ]

    # ------------------------------------------------------------------ the whole check
    def run(self, title: str, double: bool | None, jvp: bool | None) -> Report:
        S = self.subject
        main, _ = run_engine(S, self.args, self.kwargs, self.diff, None, None, self.seed, self.timeout)
        stop = self._cannot_go_on(main)
        if stop:
            return Report(title, [Section(f"{S.name}: running it", [stop])])
        dtypes = sorted({_dtype_name(self.args[i].dtype) for i in self.diff})
        self.header.append(
            f"inputs differentiated: {', '.join(self.names)} ({', '.join(dtypes)}); "
            f"{len(main.diff_out)} of {len(main.outs)} output(s) carry a gradient"
        )
        if S.once_differentiable:
            self.header.append("the backward is @once_differentiable")
        grads = self._returned(main)  # None when the backward's return cannot be mapped onto the inputs
        if grads is None:
            return Report(
                title, [Section(f"{S.name}: the contract autograd relies on", self.contract)], self.header
            )
        refs = self._references(main)
        sections, grads64 = self._first_order(main, grads, refs, dtypes)
        first_order_ok = all(s.passed for s in sections)
        good = refs.r64 if refs.valid else None  # a float64 reference the finite differences did not refute
        self._contract(main, grads, refs.r64)
        for extra in (
            self._per_output(main, good),
            self._second_order(main, good) if double is True or (double is None and first_order_ok) else None,
            self._forward_mode(main, good) if S.jvp_host is not None and jvp is not False else None,
        ):
            if extra is not None:
                sections.append(extra)
        if self.want_names and not first_order_ok and grads64 is not None:
            self._name(sections, grads64, refs.r64, refs.valid, main)
        if S.kind == "custom op":
            self.contract.append(self._opcheck())
        sections.insert(0, Section(f"{S.name}: the contract autograd relies on", self.contract))
        return Report(title, sections, self.header)

    def _cannot_go_on(self, main: Run) -> Finding | None:
        """One line when the first trip through autograd gives nothing to check."""
        S = self.subject
        if main.error and main.phase == "forward":
            return Finding("forward", False, main.error)
        if not main.diff_out:
            return Finding(
                "outputs",
                False,
                f"no output of {S.name} carries a gradient: every output is an integer "
                "tensor, marked non-differentiable, or not a tensor"
                if main.outs
                else f"{S.name} returned nothing",
            )
        if main.raw is None and not main.error and S.spy_host is not None:
            return Finding(
                "backward",
                False,
                f"autograd never called {S.name}'s backward: the outputs' graph does not "
                "lead to it (does the forward return a tensor made outside it, or an input unchanged?)",
            )
        return None

    def _references(self, main: Run) -> _Refs:
        S, args, kw, diff = self.subject, self.args, self.kwargs, self.diff
        refs = [
            reference(S, args, kw, diff, main.diff_out, main.douts, d, self.timeout)
            for d in (None, torch.float32, torch.float64)
        ]
        return _Refs(
            *[r if isinstance(r, Reference) else None for r in refs],
            note=refs[0] if isinstance(refs[0], str) else "",
        )

    def _first_order(
        self, main: Run, grads: Sequence[Any], refs: _Refs, dtypes: Sequence[str]
    ) -> tuple[list[Section], list[Any] | None]:
        """The backward against autograd in the inputs' dtype, replayed in float64, and against finite
        differences; autograd's own gradient is set aside where the finite differences refute it."""
        S = self.subject
        run64, _ = run_engine(
            S, self.args, self.kwargs, self.diff, torch.float64, main.douts, self.seed, self.timeout
        )
        grads64 = self._returned(run64, quiet=True) if not run64.error else None
        user_dtype = [self.args[i].dtype for i in self.diff]
        vs_autograd = f"{S.name}'s backward vs autograd through its forward"
        sections = [
            Section(
                f"{vs_autograd} ({', '.join(dtypes)}; {AUTOGRAD_RULE})",
                self._compare_rows(grads, refs.ref.grads if refs.ref else None, refs, user_dtype),
            )
        ]
        if not all(d == torch.float64 for d in user_dtype):
            if grads64 is None:
                why = run64.error or "its gradients do not map onto the inputs"
                sections.append(
                    Section(
                        REPLAY_TITLE,
                        [Finding("float64 replay", False, f"{S.name} cannot run in float64: {why}")],
                    )
                )
            else:
                sections.append(
                    Section(
                        REPLAY_TITLE,
                        self._compare_rows(
                            grads64,
                            refs.r64.grads if refs.r64 else None,
                            refs,
                            [torch.float64] * len(self.diff),
                        ),
                    )
                )
        fd_rows: list[FDResult] = []
        if self.fd and grads64 is not None:
            fd_rows = self._fd_rows(grads64, main.douts, main)
            sections.append(
                Section(f"{S.name}'s backward (float64) vs finite differences ({FD_RULE})", fd_rows)
            )
        if refs.ref is not None and refs.r64 is not None and fd_rows:
            bad = self._invalid_reference(refs.r64, grads64, main.douts, main)
            if bad:
                refs.note = (
                    f"autograd's gradient of the forward disagrees with finite differences for "
                    f"{', '.join(bad)} (the forward leaves autograd's graph: .detach(), .data, .numpy(), "
                    "no_grad, a kernel): the finite differences are the reference"
                )
                refs.refuted = True
        if not refs.valid:
            sections = [s for s in sections if s.rows is fd_rows]
            ok = self.fd and bool(fd_rows)
            sections.insert(
                0,
                Section(
                    vs_autograd,
                    [
                        Finding(
                            "reference",
                            ok,
                            ""
                            if ok
                            else refs.note + "; and no finite differences (fd=False): nothing to "
                            "compare with",
                            note=refs.note + "; verdict from the finite differences" if ok else "",
                        )
                    ],
                ),
            )
            return sections, grads64
        if fd_rows:  # differences only where the function is not differentiable are not held against it
            sections[0].rows = _excused(
                sections[0].rows, dict(zip(self.names, grads)), dict(zip(self.names, refs.ref.grads)), fd_rows
            )
            if sections[1].title == REPLAY_TITLE and refs.r64 is not None and grads64 is not None:
                sections[1].rows = _excused(
                    sections[1].rows,
                    dict(zip(self.names, grads64)),
                    dict(zip(self.names, refs.r64.grads)),
                    fd_rows,
                )
        return sections, grads64

    # ------------------------------------------------------------------ what the backward returned
    def _returned(self, run: Run, quiet: bool = False) -> list[Any] | None:
        """The backward's own result per differentiated input (before autograd reshapes or casts it),
        with the contract's rows about it; None when it cannot be mapped onto the inputs."""
        S = self.subject
        rec = run.raw
        add = (lambda f: None) if quiet else self.contract.append
        if run.error and (rec is None or not rec.returned):
            add(Finding("backward", False, run.error))
            return None
        if rec is None:  # an op whose backward the spy cannot reach: what autograd handed back
            if not quiet:
                self.header.append(
                    "the backward's own return value is not reachable for this op: what autograd "
                    "handed back is checked (it sums broadcast shapes and casts dtypes silently)"
                )
            return list(run.grads)
        raw = rec.raw
        n = len(self.args)
        if isinstance(raw, list):
            add(Finding("gradients returned", False, f"{S.name}'s backward returned a list of {len(raw)}: "
                        "autograd takes a tuple (or one tensor), and a list counts as one gradient; return a "
                        "tuple"))
            return None
        got = list(raw) if isinstance(raw, tuple) else [raw]
        while len(got) > n and got[-1] is None:  # autograd accepts extra trailing Nones
            got.pop()
        if len(got) != n:
            extra = [
                (_name(S, i), type(a).__name__) for i, a in enumerate(self.args) if not isinstance(a, Tensor)
            ]
            hint = (
                ""
                if not extra
                else "; inputs that are not tensors get None too ("
                + ", ".join(f"{k}: {t}" for k, t in extra)
                + ")"
            )
            add(
                Finding(
                    "gradients returned",
                    False,
                    f"{S.name}'s backward returned {len(got)} gradient(s) for the {n} inputs of forward"
                    f"({', '.join(_name(S, i) for i in range(n))}): one per input, in order, None for an "
                    "input "
                    f"that needs none{hint}",
                )
            )
            return None
        problems = []
        for i, (gr, a) in enumerate(zip(got, self.args)):
            nm = _name(S, i)
            if gr is None:
                continue
            if not isinstance(a, Tensor):
                problems.append(
                    f"returned a {type(gr).__name__} for {nm} (a {type(a).__name__} input, not a tensor): "
                    "an input that is not a tensor gets None"
                )
            elif not isinstance(gr, Tensor):
                problems.append(f"returned a {type(gr).__name__} for {nm}, not a Tensor or None")
        if problems:
            add(Finding("gradients returned", False, f"{S.name}'s backward " + "; ".join(problems)))
            return None
        if run.error:  # autograd refused the result (device, shape): the rows below say why
            if not quiet:
                self.header.append(f"autograd refused the backward's result: {run.error}")
        if not quiet:
            add(Finding("gradients returned", True, note=f"{n} returned for {n} inputs"))
        return [got[i] for i in self.diff]

    def _zero(self, j: int, r: Tensor) -> bool:
        """The right gradient of the j-th differentiated input is zero here (None then means it)."""
        ok = bool(r.numel() == 0 or float(r.abs().max()) == 0.0)
        self.zero_ok[self.names[j]] = ok
        return ok

    def _compare_rows(
        self, grads: Sequence[Any], ref: Sequence[Tensor] | None, refs: _Refs, dtypes: Sequence[torch.dtype]
    ) -> list[Comparison | Finding]:
        rows: list[Comparison | Finding] = []
        if ref is None:
            return rows
        s32 = refs.r32.grads if refs.r32 is not None else None
        s64 = refs.r64.grads if refs.r64 is not None else None
        sizes, index = self.sizes(), self.index()
        for j, (name, gm, r, d) in enumerate(zip(self.names, grads, ref, dtypes)):
            lv = measured_level(s32[j], s64[j], d) if s32 is not None and s64 is not None else 0.0
            tol = autograd_tolerance(d, r, lv)
            if gm is None and self._zero(j, r):
                rows.append(Comparison(name, tuple(r.shape), tuple(r.shape), True, True, 0.0, 0.0, tol, note=(
                    f"None for {name}: its gradient is zero here, and autograd reads None as zero")))
                continue
            if gm is None:
                rows.append(
                    Comparison(
                        name,
                        (),
                        tuple(r.shape),
                        False,
                        False,
                        math.nan,
                        math.nan,
                        tol,
                        f"None: the backward returned no gradient for {name}, which needs one "
                        f"(ctx.needs_input_grad[{self.diff[j]}] is True); autograd takes None as zero",
                    )
                )
                continue
            if isinstance(gm, Tensor) and gm.device != r.device:
                rows.append(
                    Comparison(
                        name,
                        tuple(gm.shape),
                        tuple(r.shape),
                        False,
                        False,
                        math.nan,
                        math.nan,
                        tol,
                        f"on {gm.device} but {name} is on {r.device}: a gradient lives on its input's device",
                    )
                )
                continue
            rows.append(compare(name, gm, r.to(d) if r.dtype != d else r, tol, sizes, index))
        return rows

    def _fd_fn(self, x64: list[Any], main: Run) -> Callable[[], Tensor]:
        S, kwargs = self.subject, self.kwargs
        diff_out = main.diff_out

        def fn() -> Tensor:  # no time limit per call: thousands of calls, of a forward that returned before
            with torch.no_grad():
                outs = _flat(S.apply(*[t.clone() if isinstance(t, Tensor) else t for t in x64], **kwargs))
            return torch.cat([outs[k].reshape(-1).to(torch.float64) for k in diff_out])

        return fn

    def _x64(self) -> list[Any]:
        return [
            a.detach().to(torch.float64).clone() if isinstance(a, Tensor) and a.is_floating_point() else a
            for a in self.args
        ]

    def _fd_rows(self, grads64: Sequence[Any], douts: Mapping[int, Tensor], main: Run) -> list[FDResult]:
        x64 = self._x64()
        fn = self._fd_fn(x64, main)
        w = torch.cat(
            [douts[k].reshape(-1).to(torch.float64).to(x64[self.diff[0]].device) for k in main.diff_out]
        )
        rows = []
        for name, i, g in zip(self.names, self.diff, grads64):
            if g is None and self.zero_ok.get(name):  # None read as zero: held against the differences
                g = torch.zeros_like(x64[i])
            if g is None:
                rows.append(
                    FDResult(
                        name,
                        (),
                        0,
                        x64[i].numel(),
                        0,
                        math.nan,
                        math.inf,
                        Tolerance(0, 0),
                        f"None: no gradient returned for {name}, which needs one",
                    )
                )
                continue
            if isinstance(g, Tensor) and g.device != x64[i].device:
                g = g.to(x64[i].device)
            try:
                rows.append(
                    finite_differences(
                        fn, x64[i], g, name, w, seed=self.seed, sizes=self.sizes(), index=self.index()
                    )
                )
            except Overran as e:
                rows.append(
                    FDResult(
                        name,
                        (),
                        0,
                        x64[i].numel(),
                        0,
                        math.nan,
                        math.inf,
                        Tolerance(0, 0),
                        _raised(e, f"{self.subject.name}.forward"),
                    )
                )
        return rows

    def _invalid_reference(
        self, r64: Reference, grads64: Sequence[Any], douts: Mapping[int, Tensor], main: Run
    ) -> list[str]:
        """The inputs where autograd's gradient of the forward fails the finite differences while the
        user's passes them, or where both fail and differ (the forward is opaque to autograd there)."""
        bad = []
        x64 = self._x64()
        fn = self._fd_fn(x64, main)
        w = torch.cat(
            [douts[k].reshape(-1).to(torch.float64).to(x64[self.diff[0]].device) for k in main.diff_out]
        )
        for name, i, g, rg in zip(self.names, self.diff, grads64, r64.grads):
            if (
                isinstance(g, Tensor)
                and g.shape == rg.shape
                and g.device == rg.device
                and autograd_tolerance(torch.float64, rg).holds(g.to(rg.dtype), rg)
            ):
                continue  # the user's gradient equals autograd's: nothing to doubt
            res = finite_differences(fn, x64[i], rg, name, w, seed=self.seed)
            if not res.passed:
                bad.append(name)
        return bad

    # ------------------------------------------------------------------ the contract
    def _contract(self, main: Run, grads: Sequence[Any], r64: Reference | None) -> None:
        """The rows of the contract autograd relies on, beyond what the backward returned."""
        S = self.subject
        rec = main.raw
        add = self.contract.append
        # non-differentiable outputs that depend on the inputs
        nd = [
            k
            for k, o in enumerate(main.outs)
            if isinstance(o, Tensor) and o.is_floating_point() and not o.requires_grad
        ]
        if nd:
            leak = []
            if r64 is not None:
                for k in nd:
                    o = r64.outs[k] if k < len(r64.outs) else None
                    if isinstance(o, Tensor) and o.requires_grad:
                        u = torch.randn(
                            o.shape, generator=torch.Generator().manual_seed(self.seed + 7), dtype=o.dtype
                        ).to(o.device)
                        with torch.enable_grad():
                            got = torch.autograd.grad(o, r64.leaves, u, allow_unused=True, retain_graph=True)
                        if any(g is not None and bool(g.abs().max() > 0) for g in got):
                            leak.append(k)
            if leak:
                add(
                    Finding(
                        "non-differentiable outputs",
                        False,
                        f"output(s) {leak} are marked non-differentiable (ctx.mark_non_differentiable) but "
                        "depend "
                        "on the inputs differentiably: their gradient is silently dropped",
                    )
                )
            else:
                add(
                    Finding(
                        "non-differentiable outputs",
                        True,
                        note=f"output(s) {nd} marked non-differentiable; "
                        "they do not depend on the inputs differentiably",
                    )
                )
        # inputs changed in place by the forward
        buffers = [_name(S, i) for i in main.changed_inputs if i not in self.diff]
        if buffers:  # running statistics and the like: not in the graph, so no mark_dirty needed
            add(Finding("inputs changed in place", True, note=f"{', '.join(buffers)} changed in place by the "
                        "forward (not differentiated, so autograd does not need to know)"))
        for i in [i for i in main.changed_inputs if i in self.diff]:
            nm = _name(S, i)
            if i in main.returned_inputs:
                ctx = self._forward_ctx()
                marked = ctx is not None and any(
                    isinstance(t, Tensor) for t in getattr(ctx, "dirty_tensors", ()) or ()
                )
                if ctx is not None and not marked:
                    add(
                        Finding(
                            "inputs changed in place",
                            False,
                            f"the forward changes {nm} in place and returns it without ctx.mark_dirty({nm})",
                        )
                    )
                else:
                    add(
                        Finding(
                            "inputs changed in place",
                            True,
                            note=f"{nm} is changed in place and returned, marked dirty",
                        )
                    )
            else:
                add(
                    Finding(
                        "inputs changed in place",
                        False,
                        f"the forward changed its input {nm} in place (and "
                        f"does not return it with ctx.mark_dirty({nm})): the caller's {nm} is silently "
                        "modified and autograd's graph no longer matches its values",
                    )
                )
        # saved tensors changed in place after save_for_backward, inside the forward
        ctx = self._forward_ctx()
        if ctx is not None and ctx.saved_copies:
            moved = [
                j
                for j, (t, cp) in enumerate(zip(ctx.to_save, ctx.saved_copies))
                if isinstance(t, Tensor) and cp is not None and not _same(t, cp)
            ]
            if moved:
                add(
                    Finding(
                        "saved tensors",
                        False,
                        f"the forward changed ctx.saved_tensors{moved} in place after "
                        "ctx.save_for_backward: the backward reads the changed values (save after the last "
                        "change, or save a copy)",
                    )
                )
        if rec is not None and rec.saved_error:
            add(Finding("saved tensors", False, f"unpacking ctx.saved_tensors raised: {rec.saved_error}"))
        if rec is not None and rec.changed:
            add(
                Finding(
                    "saved tensors",
                    False,
                    f"the backward changed {', '.join(rec.changed)} in place: a second "
                    "backward through the same graph (retain_graph=True) or a double backward sees the "
                    "changed "
                    "values",
                )
            )
        if rec is not None and rec.grad_changed:
            add(
                Finding(
                    "grad_output",
                    False,
                    "the backward changed its incoming gradient in place: autograd may "
                    "share that tensor with other branches of the graph; compute into a new tensor",
                )
            )
        self._probe_inplace(main, grads)
        self._needs_input_grad(main, grads)
        if rec is not None and not any(f.name == "saved tensors" for f in self.contract):
            add(Finding("saved tensors", True, note="unchanged between forward and backward"))

    def _forward_ctx(self) -> RecordingCtx | None:
        """What the forward saves and marks, from running it directly (float64 copies, no_grad)."""
        if self.subject.forward_math is None:
            return None
        x = self._x64()
        x = [t.clone() if isinstance(t, Tensor) else t for t in x]
        try:
            with torch.no_grad(), time_limit(self.timeout, f"{self.subject.name}.forward"):
                return self.subject.forward_math(*x, **self.kwargs)[1]
        except Exception:
            return None

    def _probe_inplace(self, main: Run, grads: Sequence[Any]) -> None:
        """Change the outputs and inputs in place after forward (as a later in-place op would) and run
        the backward again: a tensor kept with save_for_backward makes autograd refuse; one kept as a
        ctx attribute is read changed, silently."""
        S = self.subject
        if main.raw is None:
            return

        def mutate(outs: list[Any], args: list[Any]) -> None:
            for t in list(outs) + list(args):
                if isinstance(t, Tensor) and t.is_floating_point():
                    try:
                        t.mul_(1.5).add_(0.25)
                    except RuntimeError:
                        pass

        run, _ = run_engine(
            S, self.args, self.kwargs, self.diff, None, main.douts, self.seed, self.timeout, mutate=mutate
        )
        if run.error:
            if "modified by an inplace operation" in run.error:
                return  # save_for_backward noticed: as it should
            return
        rec = run.raw
        if rec is None or not rec.returned:
            return
        got = list(rec.raw) if isinstance(rec.raw, (tuple, list)) else [rec.raw]
        if len(got) != len(self.args):
            return
        changed = [
            _name(S, i)
            for i, g0 in zip(self.diff, grads)
            if isinstance(g0, Tensor)
            and isinstance(got[i], Tensor)
            and (got[i].shape != g0.shape or not torch.equal(got[i].detach(), g0.detach()))
        ]
        if changed:
            ids = {id(t) for t in run.outs + run.call_args if isinstance(t, Tensor)}
            ptrs = {t.data_ptr() for t in run.outs + run.call_args if isinstance(t, Tensor) and t.numel()}
            holders = [
                k
                for k, t in rec.saved.items()
                if k.startswith("ctx.")
                and not k.startswith("ctx.saved_tensors")
                and (id(t) in ids or (t.numel() and t.data_ptr() in ptrs))
            ]
            who = f" ({', '.join(holders)})" if holders else ""
            self.contract.append(
                Finding(
                    "saved tensors",
                    False,
                    f"d{', d'.join(changed)} change(s) when the forward's inputs or outputs are "
                    f"changed in place before backward: the backward reads them from ctx "
                    f"attributes{who}, which autograd cannot guard; keep them with "
                    "ctx.save_for_backward, which refuses such a change",
                )
            )

    def _needs_input_grad(self, main: Run, grads: Sequence[Any]) -> None:
        """Each differentiated input alone needing a gradient: None for it is wrong, a gradient for
        the others is wasted work, and its own gradient must not change."""
        S = self.subject
        wasted: set[str] = set()
        rec = main.raw
        if rec is not None and rec.returned:
            got = list(rec.raw) if isinstance(rec.raw, (tuple, list)) else [rec.raw]
            for i, (gr, a) in enumerate(zip(got, self.args)):
                if isinstance(gr, Tensor) and isinstance(a, Tensor) and i not in self.diff:
                    wasted.add(_name(S, i))
        if len(self.diff) < 2 or rec is None:
            self._needs_row(wasted, [], 1)
            return
        wrong: list[str] = []
        for i in self.diff:
            run, _ = run_engine(S, self.args, self.kwargs, [i], None, main.douts, self.seed, self.timeout)
            nm = _name(S, i)
            needs = tuple(i == j or False for j in range(len(self.args)))
            if run.error and (run.raw is None or not run.raw.returned):
                wrong.append(
                    f"with only {nm} needing a gradient (ctx.needs_input_grad = {needs}) "
                    + run.error.replace(f"{S.name}.backward ", "the backward ", 1)
                )
                continue
            r = run.raw
            if r is None:
                continue
            got = list(r.raw) if isinstance(r.raw, (tuple, list)) else [r.raw]
            if len(got) != len(self.args):
                wrong.append(
                    f"with only {nm} needing a gradient the backward returned {len(got)} gradients "
                    f"for {len(self.args)} inputs"
                )
                continue
            for j, (gr, a) in enumerate(zip(got, self.args)):
                if j != i and isinstance(gr, Tensor) and isinstance(a, Tensor):
                    wasted.add(_name(S, j))
            mine, full = got[i], grads[self.diff.index(i)]
            if mine is None and not self.zero_ok.get(nm):
                wrong.append(
                    f"with only {nm} needing a gradient (ctx.needs_input_grad[{i}] True) the backward "
                    f"returned None for it"
                )
            elif (
                isinstance(mine, Tensor)
                and isinstance(full, Tensor)
                and (
                    mine.shape != full.shape
                    or not autograd_tolerance(full.dtype, full).holds(
                        mine.detach().to(full.dtype), full.detach()
                    )
                )
            ):
                wrong.append(
                    f"d{nm} differs when only {nm} needs a gradient: part of it is computed inside "
                    "another input's `if ctx.needs_input_grad[...]` branch?"
                )
        self._needs_row(wasted, wrong, len(self.diff) + 1)

    def _needs_row(self, wasted: set[str], wrong: list[str], patterns: int) -> None:
        note = f"{patterns} pattern(s) of needs_input_grad tried"
        if wasted:
            note += (
                f"; the backward computes a gradient for {', '.join(sorted(wasted))} even when it needs none "
                "(correct, but wasted work: check ctx.needs_input_grad)"
            )
        self.contract.append(Finding("needs_input_grad", not wrong, "; ".join(wrong), note))

    # ------------------------------------------------------------------ each output on its own
    def _per_output(self, main: Run, r64: Reference | None) -> Section | None:
        S = self.subject
        if len(main.diff_out) < 2:
            return None
        rows: list[Comparison | Finding] = []
        for k in main.diff_out:
            run, _ = run_engine(
                S, self.args, self.kwargs, self.diff, None, main.douts, self.seed, self.timeout, only=[k]
            )
            label = f"output {k} alone"
            if run.error and (run.raw is None or not run.raw.returned):
                rows.append(
                    Finding(
                        label,
                        False,
                        run.error + f" (with only output {k}'s gradient flowing, the "
                        "others arrive as zeros, or None after ctx.set_materialize_grads(False))",
                    )
                )
                continue
            got = self._returned(run, quiet=True)
            refs = [
                reference(
                    S, self.args, self.kwargs, self.diff, main.diff_out, main.douts, d, self.timeout, only=[k]
                )
                for d in (None, torch.float32, torch.float64)
            ]
            ref, r32, r64k = refs
            if got is None or not isinstance(ref, Reference):
                continue
            for j, (name, g, r) in enumerate(zip(self.names, got, ref.grads)):
                if g is None:
                    if bool(r.abs().max() > 0):
                        rows.append(
                            Finding(
                                f"{name} via output {k}",
                                False,
                                f"None for {name} when only output {k}'s gradient flows",
                            )
                        )
                    continue
                lv = (
                    measured_level(r32.grads[j], r64k.grads[j], r.dtype)
                    if isinstance(r32, Reference) and isinstance(r64k, Reference)
                    else 0.0
                )
                rows.append(
                    compare(
                        f"{name} via output {k}",
                        g,
                        r.to(g.dtype) if isinstance(g, Tensor) else r,
                        autograd_tolerance(r.dtype, r, lv),
                        self.sizes(),
                        self.index(),
                    )
                )
        if not rows:
            return None
        return Section("each output on its own (its gradient alone flowing) vs autograd", rows)

    # ------------------------------------------------------------------ second order
    def _second_order(self, main: Run, r64: Reference | None) -> Section | None:
        S = self.subject
        title = (
            "second order: the backward differentiated again (double backward, float64) vs autograd twice "
            "through the forward"
        )
        if S.once_differentiable:
            run, leaves = run_engine(
                S,
                self.args,
                self.kwargs,
                self.diff,
                torch.float64,
                main.douts,
                self.seed,
                self.timeout,
                create_graph=True,
            )
            ok = False
            try:  # once_differentiable's DelayedError leads nowhere: only a full backward reaches it
                s = sum((g * 1.0).sum() for g in run.grads if isinstance(g, Tensor))
                s.backward()
            except RuntimeError as e:
                ok = "once_differentiable" in str(e) or "does not require grad" in str(e)
            return Section(
                title,
                [
                    Finding(
                        "double backward",
                        ok,
                        ""
                        if ok
                        else "the backward is @once_differentiable but a double backward did not raise",
                        note="the backward is @once_differentiable: a double backward "
                        "raises, as it should; no second-order check"
                        if ok
                        else "",
                    )
                ],
            )
        run, leaves = run_engine(
            S,
            self.args,
            self.kwargs,
            self.diff,
            torch.float64,
            main.douts,
            self.seed,
            self.timeout,
            create_graph=True,
        )
        if run.error:
            return Section(title, [Finding("double backward", False, run.error)])
        g = torch.Generator().manual_seed(self.seed + 11)
        vs = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device) for x in leaves]
        douts = [run.douts[k] for k in run.diff_out if k in run.douts]
        s = sum((gr * v).sum() for gr, v in zip(run.grads, vs) if isinstance(gr, Tensor))
        if not isinstance(s, Tensor) or not s.requires_grad:
            return Section(
                title,
                [
                    Finding(
                        "double backward",
                        False,
                        "the backward's result carries no autograd graph "
                        "(it is computed outside autograd, detached or under no_grad) and it is "
                        "not marked @once_differentiable: a double backward silently gets zeros; "
                        "decorate it with @once_differentiable",
                    )
                ],
            )
        try:
            with time_limit(self.timeout, f"{S.name}'s double backward"):
                hs = torch.autograd.grad(s, leaves + douts, allow_unused=True)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return Section(title, [Finding("double backward", False, _raised(e, "the double backward"))])
        hs = [torch.zeros_like(t) if h is None else h for t, h in zip(leaves + douts, hs)]
        ref = self._second_reference(main, vs, r64)
        names = [f"{n} (d/d{n} of <dinputs, v>)" for n in self.names] + [
            f"dout{k} (d/d dout{k} of <dinputs, v>)" for k in run.diff_out if k in run.douts
        ]
        if ref is None:
            return Section(
                title,
                [
                    Finding(
                        "double backward",
                        True,
                        note="no reference for the second order "
                        "(autograd cannot differentiate the forward twice here)",
                    )
                ],
            )
        rows: list[Comparison | Finding] = []
        for name, h, r in zip(names, hs, ref):
            row = compare(name, h, r, autograd_tolerance(torch.float64, r, _cancel_level(r)), self.sizes())
            if row.diagnosis.startswith("all zeros"):  # said of a second derivative, not of a gradient
                row = replace(row, diagnosis="all zeros: the backward's result does not depend on it through "
                              "autograd" + row.diagnosis[row.diagnosis.find(" [max error"):])
            rows.append(row)
        if not all(r.passed for r in rows):
            rows.insert(0, Finding("double backward", False, self._second_diagnosis(main, vs, ref, r64)))
        return Section(title, rows)

    def _second_reference(
        self, main: Run, vs: Sequence[Tensor], r64: Reference | None
    ) -> list[Tensor] | None:
        """d/d(inputs, douts) of sum_i <dinput_i, v_i>, autograd twice through the forward (float64)."""
        S = self.subject
        if S.forward_math is None or r64 is None:
            return None
        leaves = [self.args[i].detach().to(torch.float64).clone().requires_grad_(True) for i in self.diff]
        call = self._x64()
        for i, leaf in zip(self.diff, leaves):
            call[i] = leaf.clone()
        try:
            with torch.enable_grad(), time_limit(self.timeout, f"{S.name}.forward"):
                outs = _flat(S.forward_math(*call, **self.kwargs)[0])
                used = [k for k in main.diff_out if isinstance(outs[k], Tensor) and outs[k].requires_grad]
                douts = [
                    main.douts[k].to(torch.float64).detach().clone().requires_grad_(True)
                    for k in main.diff_out
                ]
                dmap = dict(zip(main.diff_out, douts))
                gx = torch.autograd.grad(
                    [outs[k] for k in used],
                    leaves,
                    [dmap[k] for k in used],
                    create_graph=True,
                    allow_unused=True,
                )
                s = sum((g * v).sum() for g, v in zip(gx, vs) if g is not None)
                if not isinstance(s, Tensor) or not s.requires_grad:
                    return [torch.zeros_like(t) for t in leaves + douts]
                hs = torch.autograd.grad(s, leaves + douts, allow_unused=True)
        except (RuntimeError, TypeError, ValueError):
            return None
        return [torch.zeros_like(t) if h is None else h for t, h in zip(leaves + douts, hs)]

    def _second_diagnosis(
        self, main: Run, vs: Sequence[Tensor], ref: Sequence[Tensor], r64: Reference | None
    ) -> str:
        """Why the second order is wrong: saved intermediates carry no graph. Confirmed by running the
        backward itself on a ctx whose saved tensors keep their graph (the forward run under autograd)."""
        S = self.subject
        run, leaves = run_engine(
            S,
            self.args,
            self.kwargs,
            self.diff,
            torch.float64,
            main.douts,
            self.seed,
            self.timeout,
            create_graph=True,
        )
        rec = run.raw
        consts = []
        if rec is not None:
            ids = {id(t) for t in run.call_args + run.outs if isinstance(t, Tensor)}
            for k, t in rec.saved.items():
                if id(t) not in ids and t.is_floating_point() and not t.requires_grad:
                    consts.append(k)
        text = (
            "the first derivative is right, but its derivative is not: the backward is not differentiable "
            "as written and not marked @once_differentiable"
        )
        if consts:
            text += (
                f"; it reads {', '.join(consts)}, computed by the forward without an autograd graph (the "
                "forward runs under no_grad), which a double backward treats as constants"
            )
            if (
                S.forward_math is not None
                and S.backward is not None
                and self._confirm_constants(main, vs, ref)
            ):
                text += " (confirmed: with their graph kept, the backward's second order is right)"
            text += (
                "; recompute them in backward from saved inputs or outputs, or decorate the backward with "
                "@once_differentiable so a double backward raises instead"
            )
        else:
            text += ("; does it use .detach(), .data, no_grad or NumPy? Decorate it with "
                     "@once_differentiable if so")
        return text

    def _confirm_constants(self, main: Run, vs: Sequence[Tensor], ref: Sequence[Tensor]) -> bool:
        S = self.subject
        leaves = [self.args[i].detach().to(torch.float64).clone().requires_grad_(True) for i in self.diff]
        call = self._x64()
        for i, leaf in zip(self.diff, leaves):
            call[i] = leaf.clone()
        try:
            with torch.enable_grad(), time_limit(self.timeout, f"{S.name}.backward"):
                out, ctx = S.forward_math(*call, **self.kwargs)
                outs = _flat(out)
                douts = [
                    main.douts[k].to(torch.float64).detach().clone().requires_grad_(True)
                    for k in main.diff_out
                ]
                dmap = dict(zip(main.diff_out, douts))
                grads_in = [
                    dmap.get(k, torch.zeros_like(o) if isinstance(o, Tensor) else None)
                    for k, o in enumerate(outs)
                ]
                res = S.backward(ctx, *grads_in)
                got = _flat(res)
                s = sum((got[i] * v).sum() for i, v in zip(self.diff, vs) if isinstance(got[i], Tensor))
                hs = torch.autograd.grad(s, leaves + douts, allow_unused=True)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return False
        hs = [torch.zeros_like(t) if h is None else h for t, h in zip(leaves + douts, hs)]
        return all(
            h.shape == r.shape and autograd_tolerance(torch.float64, r, _cancel_level(r)).holds(h, r)
            for h, r in zip(hs, ref)
        )

    # ------------------------------------------------------------------ forward mode
    def _forward_mode(self, main: Run, r64: Reference | None) -> Section:
        import torch.autograd.forward_ad as fwAD

        S = self.subject
        title = "forward mode: the Function's jvp (float64) vs autograd's J t through the forward"
        x64 = self._x64()
        g = torch.Generator().manual_seed(self.seed + 13)
        ts = {
            i: torch.randn(x64[i].shape, generator=g, dtype=torch.float64).to(x64[i].device)
            for i in self.diff
        }
        try:
            with fwAD.dual_level(), time_limit(self.timeout, f"{S.name}.jvp"):
                call = [fwAD.make_dual(x64[i], ts[i]) if i in ts else a for i, a in enumerate(x64)]
                outs = _flat(S.apply(*call, **self.kwargs))
                tangents = {k: fwAD.unpack_dual(outs[k]).tangent for k in main.diff_out}
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return Section(title, [Finding("jvp", False, _raised(e, f"{S.name}.jvp") + " (forward mode)")])
        ref = self._jvp_reference(main, ts, r64)
        rows: list[Comparison | Finding] = []
        if ref is None:
            return Section(title, [Finding("jvp", True, note="no reference for forward mode here")])
        for k in main.diff_out:
            t = tangents[k]
            name = f"output {k} tangent"
            if t is None:
                rows.append(Finding(name, False, f"the jvp gives no tangent for output {k}"))
                continue
            rows.append(
                compare(
                    name,
                    t,
                    ref[k],
                    autograd_tolerance(torch.float64, ref[k], _cancel_level(ref[k])),
                    self.sizes(),
                )
            )
        if self.want_names and r64 is not None and not all(r.passed for r in rows):
            self._name_jvp(rows, tangents, ref, ts, r64, main)
        return Section(title, rows)

    def _jvp_reference(
        self, main: Run, ts: Mapping[int, Tensor], r64: Reference | None
    ) -> dict[int, Tensor] | None:
        S = self.subject
        if S.forward_math is None or r64 is None:
            return None
        leaves = {i: self.args[i].detach().to(torch.float64).clone().requires_grad_(True) for i in self.diff}
        call = self._x64()
        for i, leaf in leaves.items():
            call[i] = leaf.clone()
        try:
            with torch.enable_grad():
                outs = _flat(S.forward_math(*call, **self.kwargs)[0])
                us = {k: torch.zeros_like(outs[k], requires_grad=True) for k in main.diff_out}
                vj = torch.autograd.grad(
                    [outs[k] for k in main.diff_out],
                    list(leaves.values()),
                    [us[k] for k in main.diff_out],
                    create_graph=True,
                    allow_unused=True,
                )
                s = sum((v * ts[i]).sum() for v, i in zip(vj, leaves) if v is not None)
                got = torch.autograd.grad(s, [us[k] for k in main.diff_out], allow_unused=True)
        except (RuntimeError, TypeError, ValueError):
            return None
        return {k: torch.zeros_like(us[k]) if gr is None else gr for k, gr in zip(main.diff_out, got)}

    def _name_jvp(
        self,
        rows: list,
        tangents: Mapping[int, Tensor],
        ref: Mapping[int, Tensor],
        ts: Mapping[int, Tensor],
        r64: Reference,
        main: Run,
    ) -> None:
        inputs = self._x64()
        weights = [main.douts[k].to(torch.float64) for k in main.diff_out]
        graph = variants.record_checked(
            self._math_outputs(main),
            inputs,
            [_name(self.subject, i) for i in range(len(inputs))],
            weights,
            {self.diff[j]: g for j, g in enumerate(r64.grads)},
        )
        if graph is None:
            return
        tang = [ts.get(i) for i in range(len(inputs))]
        found: dict[int, variants.Variant] = {}
        outs_used = [k for k in main.diff_out]
        start = time.perf_counter()
        for v in variants.variants(graph):
            if time.perf_counter() - start > variants.VARIANT_BUDGET_S:
                break
            try:
                jv = variants.variant_jvp(graph, inputs, tang, v)
            except Exception:
                continue
            for j, k in enumerate(outs_used):
                if k in found or j >= len(jv):
                    continue
                u = tangents[k]
                if isinstance(u, Tensor) and u.shape == jv[j].shape and variants._matches(u, jv[j], ref[k]):
                    found[k] = v
        for idx, row in enumerate(rows):
            if isinstance(row, Comparison) and not row.passed:
                k = int(row.name.split()[1])
                if k in found:
                    rows[idx] = replace(
                        row,
                        diagnosis=f"named from your forward: the jvp equals J t with "
                        f"{found[k].text}; {row.diagnosis}",
                    )

    # ------------------------------------------------------------------ naming
    def _name(
        self, sections: list[Section], grads64: Sequence[Any], r64: Reference | None, ok_ref: bool, main: Run
    ) -> None:
        """Name each wrong gradient from the forward's graph: the variant whose gradient it equals."""
        x64 = self._x64()
        failing = _failing_names(sections)
        user = {
            self.diff[j]: g.detach().to(torch.float64)
            for j, g in enumerate(grads64)
            if isinstance(g, Tensor) and self.names[j] in failing and g.shape == x64[self.diff[j]].shape
        }
        passing = [self.diff[j] for j, n in enumerate(self.names) if n not in failing]
        weights = [main.douts[k].to(torch.float64) for k in main.diff_out]
        if r64 is not None and ok_ref:
            fn = self._math_outputs(main)
            ref = {self.diff[j]: g for j, g in enumerate(r64.grads)}
        else:  # no autograd reference: only a known op the whole forward computes can name it
            fn = self._apply_outputs(main)
            ref = {}
        if not ref:
            rec = (
                variants.recognise([x64[i] for i in self.diff], self._outs64(main), self.names)
                if len(self.diff) == len(x64)
                else None
            )
            if rec is None:
                return
            rec.weights = weights
            got = variants.variant_grads(rec, x64, weights, None)
            ref = {i: g for i, g in enumerate(got) if g is not None}
            fn = None
        if fn is None:
            named = variants.name_mistakes([rec], x64, user, ref, passing)
        else:
            names = [_name(self.subject, i) for i in range(len(x64))]
            named = variants.explain(fn, x64, names, weights, user, ref, passing)
        variants.attach_names(sections, {_name(self.subject, i): nm for i, nm in named.items()})

    def _math_outputs(self, main: Run) -> Callable[..., list[Tensor]]:
        S, kwargs, diff_out = self.subject, self.kwargs, main.diff_out

        def fn(*xs: Any) -> list[Tensor]:
            outs = _flat(S.forward_math(*xs, **kwargs)[0])
            return [outs[k] for k in diff_out]

        return fn

    def _apply_outputs(self, main: Run) -> Callable[..., list[Tensor]]:
        S, kwargs, diff_out = self.subject, self.kwargs, main.diff_out

        def fn(*xs: Any) -> list[Tensor]:
            outs = _flat(S.apply(*xs, **kwargs))
            return [outs[k] for k in diff_out]

        return fn

    def _outs64(self, main: Run) -> list[Tensor]:
        x64 = self._x64()
        with torch.no_grad():
            try:
                outs = _flat(self.subject.apply(*x64, **self.kwargs))
            except Exception:
                return []
        return [outs[k] for k in main.diff_out if k < len(outs)]

    # ------------------------------------------------------------------ registration
    def _opcheck(self) -> Finding:
        try:
            torch.library.opcheck(
                self.subject.apply,
                tuple(self.args),
                self.kwargs,
                test_utils=("test_schema", "test_autograd_registration"),
            )
        except Exception as e:
            return Finding("registration (opcheck)", False, "torch.library.opcheck: " + _one_line(e))
        return Finding(
            "registration (opcheck)", True, note="schema and autograd registration pass torch.library.opcheck"
        )


def _cancel_level(r: Tensor) -> float:
    """The rounding level allowed for second-order and forward-mode answers, relative to their size:
    these are compared in float64 only, with no float32 rerun to measure cancellation."""
    return SECOND_ORDER_LEVEL * (float(r.abs().max()) if r.numel() else 0.0)


def _failing_names(sections: Sequence[Section]) -> set[str]:
    return {
        r.name for s in sections for r in s.rows if isinstance(r, (Comparison, FDResult)) and not r.passed
    }
