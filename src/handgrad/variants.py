"""Name a wrong gradient from the user's own forward. The forward's torch calls are recorded once
(a TorchFunctionMode), then replayed under autograd with one thing changed at a time: one use of a
tensor that is used more than once left out (a missing branch), one op's derivative replaced by a
common wrong form (tanh's 1 - h, sigmoid's s, softmax's diagonal, a mean without 1/n, n vs n-1, a
missing transpose, GELU's constant, ...), a constant or an eps left out, one derivative's sign
flipped. The user's gradient is held against each variant's gradient to say which one it equals.
References: the dojo's catalogue of the lecture's mistakes (handgrad.dojo.catalogue), generalised to
any forward; torch.overrides.TorchFunctionMode. Checking code: autograd is used freely here.
"""

from __future__ import annotations

import ast
import dataclasses
import linecache
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from handgrad.tolerances import VARIANT_DISTINCT, VARIANT_MATCH

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(os.path.abspath(__file__))
# frames in these files are the checker's, not the user's forward
_CHECKER_FILES = {os.path.join(_HERE, f) for f in ("variants.py", "functions.py", "check.py", "testing.py")}

# kinds of mistake (what the corpus in the tests counts by)
BRANCH = "branch"  # one use of a tensor used more than once left out
DERIVATIVE = "derivative"  # a local derivative in a common wrong form
SIGN = "sign"
CONSTANT = "constant"  # a constant factor left out or inverted
EPS = "eps"
TRANSPOSE = "transpose"
REDUCTION = "reduction"  # mean vs sum, n vs n-1
INDEX = "index"  # repeated indices overwritten

VARIANT_BUDGET_S = 20.0  # stop trying variants after this long (a large graph)
MAX_VARIANTS = 600


# ---------------------------------------------------------------------------- recording
@dataclass
class Call:
    """One torch call of the recorded forward."""

    index: int
    func: Callable
    args: tuple
    kwargs: dict
    out: Any  # what it returned (tensors kept alive: their ids name them during replay)
    snapshot: Any  # a copy of out when it does not depend on the inputs: replayed as a constant
    file: str
    line: int
    last_on_line: bool = True  # the last call recorded on its line: its result is the line's target

    @property
    def op(self) -> str:
        return op_name(self.func)

    @property
    def inplace(self) -> bool:
        raw = getattr(self.func, "__name__", "")
        return (
            raw == "__setitem__"
            or (raw.endswith("_") and not raw.endswith("__"))
            or raw in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__")
        )

    @property
    def source(self) -> str:
        """The call's source line, without a trailing comment."""
        line = linecache.getline(self.file, self.line).strip() if self.file else ""
        cut = line.find("  #")
        if cut > 0 and line[:cut].count('"') % 2 == 0 and line[:cut].count("'") % 2 == 0:
            line = line[:cut].rstrip()
        return line

    @property
    def target(self) -> str:
        """The name the call's line assigns (`h` in `h = torch.tanh(hpre)`), '' if none."""
        src = self.source
        try:
            node = ast.parse(src).body[0]
        except (SyntaxError, IndexError, ValueError):
            return ""
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            tgt = node.targets[0] if isinstance(node, ast.Assign) else node.target
            return ast.unparse(tgt)
        return ""

    def where(self) -> str:
        src = self.source
        return (f"`{src}` ({os.path.basename(self.file)}:{self.line})" if src
                else f"`{self.op}` (what your forward computes, by its values)")


_ALIASES = {
    "truediv": "div",
    "divide": "div",
    "true_divide": "div",
    "multiply": "mul",
    "subtract": "sub",
    "radd": "add",
    "iadd": "add",
    "rmul": "mul",
    "imul": "mul",
    "isub": "sub",
    "itruediv": "div",
    "idiv": "div",
    "rtruediv": "rdiv",
    "rdiv": "rdiv",
    "ipow": "pow",
    "rmatmul": "matmul",
    "negative": "neg",
    "absolute": "abs",
    "special_expit": "sigmoid",
    "expit": "sigmoid",
    "transpose": "transpose",
    "t": "transpose",
    "T": "transpose",
    "mT": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "arccos": "acos",
}


def op_name(func: Callable) -> str:
    """tanh for torch.tanh, Tensor.tanh, Tensor.tanh_ and F.tanh; mul for Tensor.__mul__; ..."""
    raw = getattr(func, "__name__", None) or type(func).__name__
    if raw == "__get__":  # a property such as Tensor.T
        raw = getattr(getattr(func, "__self__", None), "__name__", raw)
    name = raw.strip("_")
    return _ALIASES.get(name, name)


def _user_frame() -> tuple[str, int]:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not fn.startswith(_TORCH_DIR) and fn not in _CHECKER_FILES and not fn.startswith("<frozen"):
            return fn, f.f_lineno
        f = f.f_back
    return "", 0


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


class _Recorder(TorchFunctionMode):
    """Keep every torch call that returns a tensor (or assigns into one), with where it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if outs or getattr(func, "__name__", "") == "__setitem__":
            file, line = _user_frame()
            snap = None
            if outs and not any(t.requires_grad for t in outs):
                snap = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
            if self.calls and (self.calls[-1].file, self.calls[-1].line) == (file, line):
                self.calls[-1].last_on_line = False
            self.calls.append(Call(len(self.calls), func, args, kwargs, out, snap, file, line))
        return out


@dataclass
class Graph:
    """A recorded forward: inputs (the tensors fed to it), its calls, and the outputs whose
    gradient is taken (sum over k of <outputs[k], weights[k]>)."""

    inputs: list[Tensor]
    names: list[str]
    calls: list[Call]
    outputs: list[Tensor]
    weights: list[Tensor] = field(default_factory=list)

    def uses(self) -> dict[int, list[tuple[int, int]]]:
        """For each tensor (by id) that carries gradient: the (call, flat argument position) of each
        use. An in-place call's own target is not a use; nor is a call replayed as a constant."""
        uses: dict[int, list[tuple[int, int]]] = {}
        for c in self.calls:
            if c.snapshot is not None:
                continue
            for pos, leaf in enumerate(pytree.tree_leaves((c.args, c.kwargs))):
                if isinstance(leaf, Tensor) and leaf.requires_grad and not (pos == 0 and c.inplace):
                    uses.setdefault(id(leaf), []).append((c.index, pos))
        return uses

    def producer(self, tid: int) -> Call | None:
        for c in reversed(self.calls):
            if any(id(t) == tid for t in _tensors(c.out)):
                return c
        return None

    def label(self, tid: int) -> str:
        """A readable name for a tensor: the input's name, or the variable its line assigns."""
        for name, t in zip(self.names, self.inputs):
            if id(t) == tid:
                return name
        c = self.producer(tid)
        if c is None:
            return "a tensor"
        if c.target and c.last_on_line:
            return c.target
        return f"the result of `{c.op}` in line {c.line}" if c.line else f"the result of `{c.op}`"


def record(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    names: Sequence[str],
    pick: Callable[[Any], list[Tensor]],
) -> tuple[Graph, Any]:
    """Run fn(*inputs) once under autograd, recording its torch calls. pick(result) -> the output
    tensors whose gradient is checked. Returns the graph and fn's result."""
    rec = _Recorder()
    with torch.enable_grad(), rec:
        result = fn(*inputs)
    return Graph(list(inputs), list(names), rec.calls, pick(result)), result


# ---------------------------------------------------------------------------- replay with one change
@dataclass(frozen=True)
class Variant:
    """One change to the forward's backward: what it is, where, and how to make it."""

    key: str
    kind: str
    text: str  # "tanh's derivative taken as 1 - h instead of 1 - h**2"
    at: int  # the call it changes
    drop: int | None = None  # flat argument position to detach (a branch left out)
    rule: Callable | None = None  # (Local) -> {tensor position: wrong gradient}: a local derivative
    swap: Callable | None = None  # (args, kwargs) -> (args, kwargs): a constant changed
    priority: int = 0  # lower is said first when several variants fit


@dataclass
class Local:
    """What a rule sees: the call's arguments (detached), its differentiable tensors, its output,
    the upstream gradient g and autograd's right gradient for each tensor."""

    args: tuple
    kwargs: dict
    tensors: list[Tensor]
    out: Tensor
    g: Tensor
    correct: list[Tensor | None]

    @property
    def x(self) -> Tensor:
        return self.tensors[0]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[i] if len(self.args) > i else default


class _Swapped(torch.autograd.Function):
    """The call's own forward value with a rule's backward (autograd's for the tensors the rule
    leaves alone); differentiable again, so forward-mode answers come from the double-vjp trick."""

    @staticmethod
    def forward(ctx, call, rule, args, kwargs, positions, *tensors):
        with torch.no_grad():
            out = call.func(*args, **kwargs)
        ctx.call, ctx.rule, ctx.args, ctx.kwargs, ctx.positions = call, rule, args, kwargs, positions
        ctx.save_for_backward(*tensors)
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
            args, kwargs = _put(ctx.args, ctx.kwargs, ctx.positions, xs)
            out = ctx.call.func(*args, **kwargs)
            diff = [x for x in xs if x.requires_grad]
            got = (
                iter(torch.autograd.grad(out, diff, g, allow_unused=True, create_graph=create))
                if diff
                else iter(())
            )
            correct = [next(got) if x.requires_grad else None for x in xs]
        with torch.set_grad_enabled(create):  # a graph only for a double backward (the forward-mode trick)
            local = Local(args, kwargs, [t.detach() for t in tensors], out.detach(), g, correct)
            local.args, local.kwargs = _put(ctx.args, ctx.kwargs, ctx.positions, local.tensors)
            wrong = ctx.rule(local) or {}
        grads = [wrong.get(i, c) for i, c in enumerate(correct)]
        grads = [
            None if gr is None else gr.reshape(t.shape) if gr.numel() == t.numel() else gr
            for gr, t in zip(grads, tensors)
        ]
        return (None, None, None, None, None, *grads)


def _put(
    args: tuple, kwargs: dict, positions: Sequence[int], tensors: Sequence[Tensor]
) -> tuple[tuple, dict]:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for p, t in zip(positions, tensors):
        leaves[p] = t
    return pytree.tree_unflatten(leaves, spec)


def _bind(recorded: Any, new: Any, env: dict[int, Tensor]) -> None:
    old, news = _tensors(recorded), _tensors(new)
    if len(old) == len(news):
        for o, n in zip(old, news):
            env[id(o)] = n


def replay(graph: Graph, inputs: Sequence[Tensor], change: Variant | None = None) -> list[Tensor]:
    """Run the recorded calls again on new inputs (changing one thing), return the outputs."""
    env: dict[int, Tensor] = {id(r): n for r, n in zip(graph.inputs, inputs)}
    for c in graph.calls:
        if c.snapshot is not None:
            _bind(
                c.out, pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, c.snapshot), env
            )
            continue
        leaves, spec = pytree.tree_flatten((c.args, c.kwargs))
        new = []
        for pos, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                leaf = env.get(id(leaf), leaf.detach() if leaf.requires_grad else leaf)
                if change is not None and change.at == c.index and change.drop == pos:
                    leaf = leaf.detach()
            new.append(leaf)
        args, kwargs = pytree.tree_unflatten(new, spec)
        if change is not None and change.at == c.index and change.swap is not None:
            args, kwargs = change.swap(args, kwargs)
        if change is not None and change.at == c.index and change.rule is not None:
            flat = pytree.tree_leaves((args, kwargs))
            positions = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.is_floating_point()]
            out = _Swapped.apply(c, change.rule, args, kwargs, positions, *[flat[i] for i in positions])
        else:
            out = c.func(*args, **kwargs)
        _bind(c.out, out, env)
    return [env.get(id(o), o) for o in graph.outputs]


def variant_grads(
    graph: Graph, inputs64: Sequence[Tensor], weights: Sequence[Tensor], change: Variant | None
) -> list[Tensor | None]:
    """d/dinputs of sum_k <outputs_k, weights_k> through the graph with `change` made."""
    leaves = _leaves(inputs64)
    with torch.enable_grad():
        outs = replay(graph, _fed(leaves), change)
        loss = sum((o * w).sum() for o, w in zip(outs, weights) if isinstance(o, Tensor) and o.requires_grad)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            return [None] * len(leaves)
        diff = [t for t in leaves if _diff(t)]
        got = iter(torch.autograd.grad(loss, diff, allow_unused=True))
    return [next(got) if _diff(t) else None for t in leaves]


def _diff(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def _leaves(inputs: Sequence[Any]) -> list[Any]:
    """Fresh leaves for the floating-point tensors; everything else as it is."""
    return [
        t.detach().clone().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point() else t
        for t in inputs
    ]


def _fed(leaves: Sequence[Any]) -> list[Any]:
    """What the forward is fed: copies of the leaves (so an in-place op in it cannot touch a leaf)."""
    return [t.clone() if _diff(t) else t for t in leaves]


def variant_jvp(
    graph: Graph, inputs64: Sequence[Tensor], tangents: Sequence[Tensor | None], change: Variant | None
) -> list[Tensor | None]:
    """J t through the changed graph, per output, by the double-vjp trick: J t = d/du <J^T u, t>."""
    leaves = _leaves(inputs64)
    with torch.enable_grad():
        outs = replay(graph, _fed(leaves), change)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        pairs = [(o, u) for o, u in zip(outs, us) if o.requires_grad]
        diff = [(x, t) for x, t in zip(leaves, tangents) if _diff(x) and t is not None]
        vjps = torch.autograd.grad(
            [o for o, _ in pairs],
            [x for x, _ in diff],
            [u for _, u in pairs],
            create_graph=True,
            allow_unused=True,
        )
        s = sum((v * t).sum() for v, (_, t) in zip(vjps, diff) if v is not None)
        if not isinstance(s, Tensor) or not s.requires_grad:
            return [torch.zeros_like(o) for o in outs]
        got = torch.autograd.grad(s, us, allow_unused=True)
    return [torch.zeros_like(o) if gr is None else gr for o, gr in zip(outs, got)]


# ---------------------------------------------------------------------------- the catalogue
@dataclass(frozen=True)
class Rule:
    """A common wrong form of one op's derivative. fn(Local) -> {tensor position: gradient} (None:
    does not apply there); when(call) says whether it can apply to a recorded call at all."""

    key: str
    kind: str
    text: str
    fn: Callable[[Local], Mapping[int, Tensor] | None]
    when: Callable[[Call], bool] | None = None


def _sc(c: Call, i: int, name: str, default: Any = None) -> Any:
    if name in c.kwargs:
        return c.kwargs[name]
    return c.args[i] if len(c.args) > i else default


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar_arg(c: Call) -> float | None:
    """The python number among a binary call's two operands (x * 2.0 -> 2.0)."""
    nums = [a for a in c.args[:2] if _is_num(a)]
    return float(nums[0]) if len(nums) == 1 and len(_tensors(c.args[:2])) == 1 else None


def _dims(L: Local, i: int = 1, name: str = "dim") -> tuple[int, ...]:
    d = L.arg(i, name, None)
    if d is None or (isinstance(d, (tuple, list)) and len(d) == 0):
        return tuple(range(L.x.dim()))
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(k % max(L.x.dim(), 1) for k in d)


def _keep(g: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """g of a reduction over dims, reshaped to broadcast against x (keepdim)."""
    shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    return g.reshape(shape) if g.numel() == math.prod(shape) else g


def _reduced_n(L: Local) -> float:
    return L.x.numel() / max(L.out.numel(), 1)


def _softmax_dim(L: Local) -> int:
    d = L.arg(1, "dim", -1)
    return -1 if d is None else int(d)


def _other_dim(L: Local) -> int:
    """For a 2-D softmax-like call: the dim it does not reduce over."""
    return 0 if _softmax_dim(L) % L.x.dim() == 1 else 1


def _two_dims(c: Call) -> bool:
    return isinstance(c.args[0], Tensor) and c.args[0].dim() == 2 and min(c.args[0].shape) > 1


def _norm_dx(
    dxhat: Tensor,
    xhat: Tensor,
    rstd: Tensor,
    dims: tuple[int, ...],
    mean_term: bool = True,
    var_term: bool = True,
    n_var: float | None = None,
) -> Tensor:
    """The normalisation's dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), optionally
    without a term or with another count in the variance term."""
    n = math.prod(xhat.shape[d] for d in dims)
    out = dxhat.clone()
    if mean_term:
        out = out - dxhat.mean(dims, keepdim=True)
    if var_term:
        out = out - xhat * (dxhat * xhat).sum(dims, keepdim=True) / (n_var or n)
    return rstd * out


def _normalise(L: Local, dims: tuple[int, ...], eps: float, w: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """(xhat, rstd, weight broadcastable to x) of a normalisation over `dims`, biased variance."""
    mean = L.x.mean(dims, keepdim=True)
    var = ((L.x - mean) ** 2).mean(dims, keepdim=True)
    rstd = (var + eps) ** -0.5
    return (L.x - mean) * rstd, rstd, w if isinstance(w, Tensor) else None


def _ln_parts(L: Local) -> tuple[tuple[int, ...], Tensor, Tensor, Tensor | None]:
    shape = L.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    dims = tuple(range(L.x.dim() - k, L.x.dim()))
    return (dims, *_normalise(L, dims, float(L.arg(4, "eps", 1e-5)), L.arg(2, "weight")))


def _bn_parts(L: Local) -> tuple[tuple[int, ...], Tensor, Tensor, Tensor | None]:
    dims = tuple(i for i in range(L.x.dim()) if i != 1)  # every dim but the channels
    w = L.arg(3, "weight")
    if isinstance(w, Tensor):
        w = w.reshape([L.x.shape[1] if i == 1 else 1 for i in range(L.x.dim())])
    return (dims, *_normalise(L, dims, float(L.arg(7, "eps", 1e-5)), w))


def _norm_rule(parts: Callable[[Local], tuple], **opts: Any) -> Callable[[Local], Mapping[int, Tensor]]:
    """A normalisation's dx in a wrong form: opts no_mean, no_var, bessel (n-1), no_gain."""

    def fn(L: Local) -> Mapping[int, Tensor]:
        dims, xhat, rstd, w = parts(L)
        dxhat = L.g if w is None or opts.get("no_gain") else L.g * w
        n = math.prod(L.x.shape[d] for d in dims)
        nv = n - 1 if opts.get("bessel") else None
        return {0: _norm_dx(dxhat, xhat, rstd, dims, not opts.get("no_mean"), not opts.get("no_var"), nv)}

    return fn


def _ln_rule(**opts: Any) -> Callable[[Local], Mapping[int, Tensor]]:
    return _norm_rule(_ln_parts, **opts)


def _bn_rule(**opts: Any) -> Callable[[Local], Mapping[int, Tensor]]:
    return _norm_rule(_bn_parts, **opts)


def _ln_dw_x(L: Local) -> Mapping[int, Tensor] | None:
    dims = tuple(range(L.x.dim() - L.arg(2, "weight").dim()))
    return {1: (L.g * L.x).sum(dims)}


def _bn_training(c: Call) -> bool:
    return bool(_sc(c, 5, "training", False))


SQRT_2_PI = math.sqrt(2 / math.pi)
GELU_A = 0.044715


def _gelu_erf_d(x: Tensor, pdf_const: bool = True, x_term: bool = True) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x * x) / (math.sqrt(2 * math.pi) if pdf_const else 1.0)
    return cdf + x * pdf if x_term else cdf


def _gelu_tanh_d(
    x: Tensor,
    a3: float = 3 * GELU_A,
    c: float = SQRT_2_PI,
    sq: bool = True,
    first: bool = True,
    second: bool = True,
) -> Tensor:
    t = torch.tanh(SQRT_2_PI * (x + GELU_A * x**3))
    dt = (1 - t * t) if sq else (1 - t)
    out = torch.zeros_like(x)
    if first:
        out = out + 0.5 * (1 + t)
    if second:
        out = out + 0.5 * x * dt * c * (1 + a3 * x * x)
    return out


def _is_tanh_gelu(c: Call) -> bool:
    return _sc(c, 1, "approximate", "none") == "tanh"


def _unary(fn: Callable[[Local], Tensor]) -> Callable[[Local], Mapping[int, Tensor]]:
    return lambda L: {0: L.g * fn(L)}


def _pow_k(c: Call) -> float | None:
    k = c.args[1] if len(c.args) > 1 else c.kwargs.get("exponent")
    return float(k) if _is_num(k) and isinstance(c.args[0], Tensor) else None


def _square_last2(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2]


def _has_repeats(ix: Any) -> bool:
    ts = [
        t
        for t in pytree.tree_leaves(ix)
        if isinstance(t, Tensor) and not t.is_floating_point() and t.dtype != torch.bool
    ]
    return any(t.numel() > t.unique().numel() for t in ts)


def _overwrite_getitem(L: Local) -> Mapping[int, Tensor]:
    z = torch.zeros_like(L.x)
    z[L.args[1]] = L.g  # overwrites a repeated index: the last write wins
    return {0: z}


def _overwrite_embedding(L: Local) -> Mapping[int, Tensor]:
    w = L.arg(1, "weight")
    z = torch.zeros_like(w)
    z[L.args[0]] = L.g
    return {0: z}


def _ce_probs(L: Local) -> tuple[Tensor, float]:
    return torch.softmax(L.x, 1), float(L.x.shape[0])


def _ce_plain(c: Call) -> bool:
    logits, target = c.args[0], _sc(c, 1, "target")
    return (
        isinstance(logits, Tensor)
        and logits.dim() == 2
        and isinstance(target, Tensor)
        and not target.is_floating_point()
        and _sc(c, 4, "reduction", "mean") == "mean"
        and _sc(c, 2, "weight") is None
        and float(_sc(c, 7, "label_smoothing", 0.0) or 0.0) == 0.0
    )


def _mean_n(c: Call) -> float:
    out = _tensors(c.out)
    return c.args[0].numel() / max(out[0].numel(), 1) if out else 1.0


def _bcast_rules(c: Call) -> list[Rule]:
    """A broadcast operand's gradient averaged instead of summed over the broadcast dims."""
    out = _tensors(c.out)
    ts = [a for a in c.args[:2] if isinstance(a, Tensor)]
    if len(ts) != 2 or not out or c.op not in ("add", "sub", "mul", "div", "rsub", "maximum", "minimum"):
        return []
    rules = []
    for i, t in enumerate(ts):
        if t.requires_grad and t.numel() < out[0].numel():
            k = out[0].numel() / t.numel()
            rules.append(
                Rule(
                    f"bcast:{i}",
                    REDUCTION,
                    f"the gradient of the broadcast operand `{_operand(c, i)}` averaged instead of "
                    f"summed over the dims it is broadcast over (1/{k:g} too small)",
                    lambda L, i=i, k=k: {i: L.correct[i] / k} if L.correct[i] is not None else None,
                )
            )
    return rules


def _operand(c: Call, i: int) -> str:
    src = c.source
    return f"operand {i + 1} of `{c.op}`" if not src else f"operand {i + 1} of `{c.op}` in line {c.line}"


RULES: dict[str, list[Rule]] = {
    "tanh": [
        Rule(
            "tanh:1-h",
            DERIVATIVE,
            "tanh's derivative taken as 1 - h instead of 1 - h**2",
            _unary(lambda L: 1 - L.out),
        ),
        Rule(
            "tanh:1-x2",
            DERIVATIVE,
            "tanh's derivative taken as 1 - x**2 at its input instead of 1 - h**2 at its output h",
            _unary(lambda L: 1 - L.x * L.x),
        ),
    ],
    "sigmoid": [
        Rule(
            "sigmoid:s",
            DERIVATIVE,
            "sigmoid's derivative taken as s instead of s * (1 - s)",
            _unary(lambda L: L.out),
        ),
        Rule(
            "sigmoid:1-s",
            DERIVATIVE,
            "sigmoid's derivative taken as 1 - s instead of s * (1 - s)",
            _unary(lambda L: 1 - L.out),
        ),
        Rule(
            "sigmoid:x",
            DERIVATIVE,
            "sigmoid's derivative taken as x * (1 - x) at its input instead of s * (1 - s) at its output s",
            _unary(lambda L: L.x * (1 - L.x)),
        ),
        Rule(
            "sigmoid:tanh",
            DERIVATIVE,
            "sigmoid's derivative taken as tanh's 1 - s**2",
            _unary(lambda L: 1 - L.out * L.out),
        ),
    ],
    "exp": [
        Rule(
            "exp:input",
            DERIVATIVE,
            "exp's derivative taken at its input (x) instead of its output exp(x)",
            _unary(lambda L: L.x),
        ),
        Rule(
            "exp:exp-out",
            DERIVATIVE,
            "exp's derivative taken as exp of its output instead of the output itself",
            _unary(lambda L: torch.exp(L.out)),
        ),
    ],
    "log": [
        Rule(
            "log:out",
            DERIVATIVE,
            "log's derivative taken as 1/log(x) (its output) instead of 1/x",
            _unary(lambda L: 1 / L.out),
        ),
        Rule("log:x", DERIVATIVE, "log's derivative taken as x instead of 1/x", _unary(lambda L: L.x)),
        Rule(
            "log:x2",
            DERIVATIVE,
            "log's derivative taken as 1/x**2 instead of 1/x",
            _unary(lambda L: 1 / (L.x * L.x)),
        ),
    ],
    "sqrt": [
        Rule(
            "sqrt:half",
            CONSTANT,
            "sqrt's derivative without its 1/2: 1/sqrt(x) instead of 1/(2 sqrt(x))",
            _unary(lambda L: 1 / L.out),
        ),
        Rule(
            "sqrt:input",
            DERIVATIVE,
            "sqrt's derivative taken as 1/(2x) instead of 1/(2 sqrt(x))",
            _unary(lambda L: 0.5 / L.x),
        ),
    ],
    "rsqrt": [
        Rule(
            "rsqrt:half",
            CONSTANT,
            "rsqrt's derivative without its 1/2: -x**-1.5 instead of -x**-1.5 / 2",
            _unary(lambda L: -(L.out**3)),
        ),
        Rule(
            "rsqrt:exp",
            DERIVATIVE,
            "rsqrt's derivative with the exponent not lowered: -x**-0.5 / 2 instead of -x**-1.5 / 2",
            _unary(lambda L: -0.5 * L.out),
        ),
    ],
    "reciprocal": [
        Rule(
            "recip:nosq",
            DERIVATIVE,
            "1/x's derivative taken as -1/x instead of -1/x**2",
            _unary(lambda L: -1 / L.x),
        ),
    ],
    "square": [
        Rule(
            "square:2",
            CONSTANT,
            "the power rule's factor 2 dropped: d(x**2) taken as x instead of 2x",
            _unary(lambda L: L.x),
        ),
    ],
    "softmax": [
        Rule(
            "softmax:diag",
            DERIVATIVE,
            "softmax's Jacobian taken as its diagonal only: s * (1 - s) * dout "
            "instead of s * (dout - sum(dout * s))",
            lambda L: {0: L.out * (1 - L.out) * L.g},
        ),
        Rule(
            "softmax:nosum",
            DERIVATIVE,
            "softmax's backward without its - sum(dout * s) term: s * dout",
            lambda L: {0: L.out * L.g},
        ),
        Rule(
            "softmax:nos",
            DERIVATIVE,
            "softmax's backward without its leading s: dout - sum(dout * s)",
            lambda L: {0: L.g - (L.g * L.out).sum(_softmax_dim(L), keepdim=True)},
        ),
        Rule(
            "softmax:dim",
            REDUCTION,
            "softmax's backward with its sum(dout * s) over the wrong dim",
            lambda L: {0: L.out * (L.g - (L.g * L.out).sum(_other_dim(L), keepdim=True))},
            _two_dims,
        ),
    ],
    "log_softmax": [
        Rule(
            "logsoftmax:nosum",
            DERIVATIVE,
            "log_softmax's backward without its softmax term: dout instead of dout - softmax * sum(dout)",
            lambda L: {0: L.g},
        ),
        Rule(
            "logsoftmax:elem",
            DERIVATIVE,
            "log_softmax's softmax term taken elementwise: dout - softmax * "
            "dout instead of dout - softmax * sum(dout)",
            lambda L: {0: L.g - L.out.exp() * L.g},
        ),
        Rule(
            "logsoftmax:dim",
            REDUCTION,
            "log_softmax's backward with its sum(dout) over the wrong dim",
            lambda L: {0: L.g - L.out.exp() * L.g.sum(_other_dim(L), keepdim=True)},
            _two_dims,
        ),
    ],
    "leaky_relu": [
        Rule(
            "leaky:slope",
            DERIVATIVE,
            "leaky ReLU's negative slope left out of its derivative (0 instead of the slope for x < 0)",
            _unary(lambda L: (L.x > 0).to(L.x.dtype)),
        ),
    ],
    "logsumexp": [
        Rule(
            "lse:exp",
            DERIVATIVE,
            "logsumexp's derivative taken as exp(x) instead of softmax(x) (not normalised)",
            lambda L: {0: L.x.exp() * _keep(L.g, L.x, _dims(L))},
        ),
    ],
    "cross_entropy": [
        Rule(
            "ce:-1",
            DERIVATIVE,
            "cross-entropy's dlogits without the -1 at the target: softmax / n instead "
            "of (softmax - onehot) / n (softmax without the -1)",
            lambda L: {0: _ce_probs(L)[0] * L.g / _ce_probs(L)[1]},
            _ce_plain,
        ),
        Rule(
            "ce:1/n",
            CONSTANT,
            "cross-entropy's 1/n (the mean over the batch) left out",
            lambda L: {0: L.correct[0] * L.x.shape[0]},
            _ce_plain,
        ),
    ],
    "nll_loss": [
        Rule(
            "nll:1/n",
            CONSTANT,
            "the NLL's 1/n (the mean over the batch) left out",
            lambda L: {0: L.correct[0] * L.x.shape[0]},
            lambda c: (
                _sc(c, 4, "reduction", "mean") == "mean"
                and isinstance(c.args[0], Tensor)
                and c.args[0].dim() == 2
            ),
        ),
    ],
    "mse_loss": [
        Rule("mse:2", CONSTANT, "the squared error's factor 2 left out", lambda L: {0: L.correct[0] / 2}),
        Rule(
            "mse:1/n",
            CONSTANT,
            "the mean squared error's 1/n left out",
            lambda L: {0: L.correct[0] * L.x.numel()},
            lambda c: _sc(c, 2, "reduction", "mean") == "mean",
        ),
    ],
    "sum": [
        Rule(
            "sum:mean",
            REDUCTION,
            "a sum's derivative divided by n (a mean's derivative used for a sum)",
            lambda L: {0: L.correct[0] / _reduced_n(L)},
            lambda c: _mean_n(c) > 1,
        ),
    ],
    "mean": [
        Rule(
            "mean:1/n",
            CONSTANT,
            "the mean's 1/n left out of its derivative (n = {n:g})",
            lambda L: {0: L.correct[0] * _reduced_n(L)},
            lambda c: _mean_n(c) > 1,
        ),
        Rule(
            "mean:n-1",
            REDUCTION,
            "the mean's derivative divided by n-1 instead of n (n = {n:g}): n vs n-1",
            lambda L: {0: L.correct[0] * _reduced_n(L) / (_reduced_n(L) - 1)},
            lambda c: _mean_n(c) > 2,
        ),
    ],
    "var": [
        Rule(
            "var:bessel",
            REDUCTION,
            "the variance's derivative with the other count: n vs n-1 (Bessel's correction)",
            lambda L: _var_other(L),
        ),
        Rule(
            "var:2",
            CONSTANT,
            "the variance's factor 2 (from d(x - mean)**2) left out",
            lambda L: {0: L.correct[0] / 2},
        ),
        Rule(
            "var:mean",
            DERIVATIVE,
            "the variance's derivative taken with x instead of x - mean",
            lambda L: _var_nomean(L),
        ),
    ],
    "std": [
        Rule(
            "std:bessel",
            REDUCTION,
            "the standard deviation's derivative with the other count: n vs n-1 (Bessel's correction)",
            lambda L: _var_other(L, std=True),
        ),
    ],
    "layer_norm": [
        Rule(
            "ln:mean",
            BRANCH,
            "layernorm's dx without the mean term (the branch through the mean left out): "
            "rstd * (dxhat - xhat * mean(dxhat * xhat))",
            _ln_rule(no_mean=True),
        ),
        Rule(
            "ln:var",
            BRANCH,
            "layernorm's dx without the variance term: rstd * (dxhat - mean(dxhat))",
            _ln_rule(no_var=True),
        ),
        Rule(
            "ln:bessel",
            REDUCTION,
            "layernorm's dx with the unbiased (n-1) variance where the forward divides by n",
            _ln_rule(bessel=True),
        ),
        Rule(
            "ln:gain",
            DERIVATIVE,
            "layernorm's dx without the gain: dout used for dxhat instead of dout * weight",
            _ln_rule(no_gain=True),
            lambda c: isinstance(_sc(c, 2, "weight"), Tensor),
        ),
        Rule(
            "ln:dw-x",
            DERIVATIVE,
            "layernorm's dweight taken as sum(dout * x) instead of sum(dout * xhat)",
            _ln_dw_x,
            lambda c: isinstance(_sc(c, 2, "weight"), Tensor),
        ),
    ],
    "batch_norm": [
        Rule(
            "bn:mean",
            BRANCH,
            "batchnorm's dx without the mean term (the branch through the batch mean left out)",
            _bn_rule(no_mean=True),
            _bn_training,
        ),
        Rule(
            "bn:var", BRANCH, "batchnorm's dx without the variance term", _bn_rule(no_var=True), _bn_training
        ),
        Rule(
            "bn:bessel",
            REDUCTION,
            "batchnorm's dx with the unbiased (n-1) variance where the forward "
            "normalises by the biased (n) one",
            _bn_rule(bessel=True),
            _bn_training,
        ),
    ],
    "gelu": [
        Rule(
            "gelu:erf:nox",
            BRANCH,
            "GELU's derivative without its x * phi(x) term: Phi(x) only",
            _unary(lambda L: _gelu_erf_d(L.x, x_term=False)),
            lambda c: not _is_tanh_gelu(c),
        ),
        Rule(
            "gelu:erf:pdf",
            CONSTANT,
            "GELU's phi(x) without its 1/sqrt(2 pi)",
            _unary(lambda L: _gelu_erf_d(L.x, pdf_const=False)),
            lambda c: not _is_tanh_gelu(c),
        ),
        Rule(
            "gelu:erf:tanh",
            DERIVATIVE,
            "GELU's derivative in the tanh form where the forward uses the erf form (erf vs tanh form)",
            _unary(lambda L: _gelu_tanh_d(L.x)),
            lambda c: not _is_tanh_gelu(c),
        ),
        Rule(
            "gelu:tanh:3",
            CONSTANT,
            "GELU's constant: 0.044715 where the derivative of 0.044715 x**3 needs 3 * 0.044715",
            _unary(lambda L: _gelu_tanh_d(L.x, a3=GELU_A)),
            _is_tanh_gelu,
        ),
        Rule(
            "gelu:tanh:c",
            CONSTANT,
            "GELU's constant sqrt(2/pi) left out of the derivative",
            _unary(lambda L: _gelu_tanh_d(L.x, c=1.0)),
            _is_tanh_gelu,
        ),
        Rule(
            "gelu:tanh:1-t",
            DERIVATIVE,
            "tanh's 1 - t instead of 1 - t**2 inside GELU's derivative",
            _unary(lambda L: _gelu_tanh_d(L.x, sq=False)),
            _is_tanh_gelu,
        ),
        Rule(
            "gelu:tanh:first",
            BRANCH,
            "GELU's derivative without its first term 0.5 * (1 + t)",
            _unary(lambda L: _gelu_tanh_d(L.x, first=False)),
            _is_tanh_gelu,
        ),
        Rule(
            "gelu:tanh:second",
            BRANCH,
            "GELU's derivative without its second term (the derivative through tanh's argument)",
            _unary(lambda L: _gelu_tanh_d(L.x, second=False)),
            _is_tanh_gelu,
        ),
        Rule(
            "gelu:tanh:erf",
            DERIVATIVE,
            "GELU's derivative in the erf form where the forward uses the tanh form (erf vs tanh form)",
            _unary(lambda L: _gelu_erf_d(L.x)),
            _is_tanh_gelu,
        ),
    ],
    "silu": [
        Rule(
            "silu:s",
            BRANCH,
            "SiLU's derivative taken as s only (its x * s * (1 - s) term left out)",
            _unary(lambda L: torch.sigmoid(L.x)),
        ),
        Rule(
            "silu:xs",
            BRANCH,
            "SiLU's derivative taken as x * s * (1 - s) only (its s term left out)",
            _unary(lambda L: L.x * torch.sigmoid(L.x) * (1 - torch.sigmoid(L.x))),
        ),
    ],
    "softplus": [
        Rule(
            "softplus:exp",
            DERIVATIVE,
            "softplus's derivative taken as exp(x) instead of sigmoid(x)",
            _unary(lambda L: L.x.exp()),
            lambda c: float(_sc(c, 1, "beta", 1.0)) == 1.0,
        ),
        Rule(
            "softplus:neg",
            SIGN,
            "softplus's derivative taken as sigmoid(-x) instead of sigmoid(x)",
            _unary(lambda L: torch.sigmoid(-L.x)),
            lambda c: float(_sc(c, 1, "beta", 1.0)) == 1.0,
        ),
    ],
    "relu": [
        Rule(
            "relu:out",
            DERIVATIVE,
            "ReLU's derivative taken as its output relu(x) instead of (x > 0)",
            _unary(lambda L: L.out),
        ),
    ],
    "erf": [
        Rule(
            "erf:c",
            CONSTANT,
            "erf's 2/sqrt(pi) left out of its derivative",
            _unary(lambda L: torch.exp(-L.x * L.x)),
        ),
    ],
    "sin": [
        Rule(
            "sin:sin",
            DERIVATIVE,
            "sin's derivative taken as sin instead of cos",
            _unary(lambda L: torch.sin(L.x)),
        )
    ],
    "cos": [
        Rule(
            "cos:cos",
            DERIVATIVE,
            "cos's derivative taken as cos instead of -sin",
            _unary(lambda L: torch.cos(L.x)),
        )
    ],
    "cumsum": [
        Rule(
            "cumsum:fwd",
            DERIVATIVE,
            "cumsum's derivative taken as a cumsum of dout instead of a reversed cumsum",
            lambda L: {0: L.g.cumsum(int(L.arg(1, "dim")))},
        )
    ],
    "getitem": [
        Rule(
            "index:overwrite",
            INDEX,
            "the gradient of an indexing with repeated indices "
            "overwritten instead of accumulated (use index_add_ or +=)",
            _overwrite_getitem,
            lambda c: _has_repeats(c.args[1]) and isinstance(c.args[0], Tensor),
        )
    ],
    "gather": [
        Rule(
            "gather:overwrite",
            INDEX,
            "the gradient of a gather with repeated indices overwritten "
            "instead of accumulated (scatter where scatter_add is meant)",
            lambda L: {0: torch.zeros_like(L.x).scatter(int(L.arg(1, "dim")), L.arg(2, "index"), L.g)},
            lambda c: _has_repeats(_sc(c, 2, "index")),
        )
    ],
    "index_select": [
        Rule(
            "index_select:overwrite",
            INDEX,
            "the gradient of an index_select with repeated indices "
            "copied instead of accumulated (index_copy where index_add is meant)",
            lambda L: {0: torch.zeros_like(L.x).index_copy(int(L.arg(1, "dim")), L.arg(2, "index"), L.g)},
            lambda c: _has_repeats(_sc(c, 2, "index")),
        )
    ],
    "embedding": [
        Rule(
            "embedding:overwrite",
            INDEX,
            "the embedding's gradient overwritten instead of "
            "accumulated where an index repeats (use index_add_)",
            lambda L: {0: _overwrite_embedding(L)[0]},
            lambda c: _has_repeats(c.args[0]),
        )
    ],
}


def _var_other(L: Local, std: bool = False) -> Mapping[int, Tensor] | None:
    dims = _dims(L)
    n = _reduced_n(L)
    xc = L.x - L.x.mean(dims, keepdim=True)
    ss = (xc * xc).sum(dims, keepdim=True)
    v = _keep(L.out, L.x, dims)
    v2 = v * v if std else v
    if not bool((v2 != 0).all()):
        return None
    corr = round(float((n - ss / v2).mean()))
    other = 1 - corr if corr in (0, 1) else None
    if other is None or n - other <= 0:
        return None
    return {0: L.correct[0] * (n - corr) / (n - other)}


def _var_nomean(L: Local) -> Mapping[int, Tensor] | None:
    dims = _dims(L)
    xc = L.x - L.x.mean(dims, keepdim=True)
    ratio = L.correct[0] / xc  # 2 g / (n - c), constant along dims
    return {0: torch.nan_to_num(ratio) * L.x} if bool((xc != 0).all()) else None


# ops whose derivative is the identity or a rearrangement: "left out" means nothing there
_IDENTITY = {
    "clone",
    "view",
    "reshape",
    "contiguous",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "getitem",
    "squeeze",
    "unsqueeze",
    "flatten",
    "unflatten",
    "expand",
    "expand_as",
    "view_as",
    "reshape_as",
    "detach",
    "alias",
    "add",
    "sub",
    "pos",
    "type",
    "type_as",
    "requires_grad",
    "cat",
    "stack",
    "split",
    "chunk",
    "unbind",
    "narrow",
    "select",
    "movedim",
    "repeat",
    "broadcast_to",
    "copy",
    "setitem",
    "rsub",
    "neg",
    "permute",
    "transpose",
    "flip",
    "roll",
    "index_select",
    "gather",
    "masked_fill",
    "where",
    "sum",
    "mean",
    "cpu",
    "cuda",
}
# unary ops for which "the derivative left out" (dout passed through) is a plausible mistake
_LEFT_OUT = {
    "tanh",
    "sigmoid",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "square",
    "relu",
    "gelu",
    "silu",
    "softplus",
    "erf",
    "sin",
    "cos",
    "abs",
    "softmax",
    "log_softmax",
    "pow",
    "log1p",
    "expm1",
    "leaky_relu",
    "elu",
    "mish",
    "hardtanh",
    "clamp",
    "atan",
    "asin",
    "sinh",
    "cosh",
    "layer_norm",
    "rdiv",
}
EPS_MAX = 1e-3  # a positive constant added below this is taken to be an eps
_EPS_POS = {
    "layer_norm": (4, "eps"),
    "batch_norm": (7, "eps"),
    "group_norm": (4, "eps"),
    "rms_norm": (3, "eps"),
    "instance_norm": (7, "eps"),
    "normalize": (3, "eps"),
}


def _const_rules(c: Call) -> list[Rule]:
    """A multiplying or dividing constant left out of the derivative, or used the wrong way round."""
    k = _scalar_arg(c)
    if k is None or k in (0.0, 1.0, -1.0):
        return []
    if c.op == "mul":
        return [
            Rule(
                "const:mul",
                CONSTANT,
                f"the constant {k:g} left out of the derivative of a product with it",
                lambda L: {0: L.g},
            ),
            Rule(
                "const:mul-inv",
                CONSTANT,
                f"divided by {k:g} instead of multiplied in the derivative",
                lambda L: {0: L.g / k},
            ),
        ]
    if c.op == "div" and isinstance(c.args[0], Tensor):
        return [
            Rule(
                "const:div",
                CONSTANT,
                f"the 1/{k:g} left out of the derivative of a division by {k:g}",
                lambda L: {0: L.g},
            ),
            Rule(
                "const:div-mul",
                CONSTANT,
                f"multiplied by {k:g} instead of divided in the derivative",
                lambda L: {0: L.g * k},
            ),
        ]
    if c.op == "rdiv":
        rules = [
            Rule(
                "rdiv:nosq",
                DERIVATIVE,
                f"the derivative of {k:g}/x taken as -{k:g}/x instead of -{k:g}/x**2",
                lambda L: {0: -k * L.g / L.x},
            )
        ]
        if k != 1.0:
            rules.append(
                Rule(
                    "rdiv:c",
                    CONSTANT,
                    f"the {k:g} of {k:g}/x left out of its derivative",
                    lambda L: {0: -L.g / (L.x * L.x)},
                )
            )
        return rules
    return []


def _pow_rules(c: Call) -> list[Rule]:
    k = _pow_k(c)
    if k is None or k in (0.0, 1.0):
        return []
    rules = [
        Rule(
            "pow:k",
            CONSTANT,
            f"the power rule's factor {k:g} dropped: d(x**{k:g}) taken as "
            f"x**{k - 1:g} instead of {k:g} x**{k - 1:g}",
            _unary(lambda L: L.x ** (k - 1)),
        ),
        Rule(
            "pow:exp",
            DERIVATIVE,
            f"the power rule's exponent not lowered: d(x**{k:g}) taken as "
            f"{k:g} x**{k:g} instead of {k:g} x**{k - 1:g}",
            _unary(lambda L: k * L.x**k),
        ),
    ]
    if k < 0:
        rules.append(
            Rule(
                "pow:exp+1",
                DERIVATIVE,
                f"the power rule's exponent raised instead of lowered: "
                f"{k:g} x**{k + 1:g} instead of {k:g} x**{k - 1:g}",
                _unary(lambda L: k * L.x ** (k + 1)),
            )
        )
    return rules


def _binary_rules(c: Call) -> list[Rule]:
    """Two tensor operands: a product's derivative from the wrong factor, a quotient's errors, and a
    matrix product's missing transpose."""
    a, b = (c.args + (None, None))[:2]
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return []
    rules: list[Rule] = []
    if c.op == "mul" and a is not b and a.shape == b.shape:
        rules += [
            Rule(
                "mul:self",
                DERIVATIVE,
                "a product's derivative taken from the wrong factor: d(a * b)/da taken as a instead of b",
                lambda L: {0: L.g * L.tensors[0]},
            ),
            Rule(
                "mul:self-b",
                DERIVATIVE,
                "a product's derivative taken from the wrong factor: d(a * b)/db taken as b instead of a",
                lambda L: {1: L.g * L.tensors[1]},
            ),
        ]
    if c.op == "div":
        rules += [
            Rule(
                "div:nosq",
                DERIVATIVE,
                "a quotient's derivative in its denominator taken as -a/b instead of -a/b**2",
                lambda L: {1: _red(-L.g * L.tensors[0] / L.tensors[1], L.tensors[1])},
            ),
            Rule(
                "div:noa",
                DERIVATIVE,
                "a quotient's derivative in its denominator taken as -1/b**2 instead of -a/b**2",
                lambda L: {1: _red(-L.g / L.tensors[1] ** 2, L.tensors[1])},
            ),
            Rule(
                "div:mul",
                DERIVATIVE,
                "a quotient's derivative in its numerator taken as b instead of "
                "1/b (multiplied instead of divided)",
                lambda L: {0: _red(L.g * L.tensors[1], L.tensors[0])},
            ),
        ]
    if c.op in ("matmul", "mm", "bmm") and a.dim() >= 2 and b.dim() >= 2:
        if _square_last2(b):
            rules.append(
                Rule(
                    "matmul:a:T",
                    TRANSPOSE,
                    "a matrix product's da taken as dout @ b instead of dout @ b.T (a transpose missing)",
                    lambda L: {0: _red(L.g @ L.tensors[1], L.tensors[0])},
                )
            )
            rules.append(
                Rule(
                    "matmul:b:T",
                    TRANSPOSE,
                    "a matrix product's db transposed: dout.T @ a instead of a.T @ dout",
                    lambda L: {1: _red(L.g.mT @ L.tensors[0], L.tensors[1])},
                )
            )
        if _square_last2(a):
            rules.append(
                Rule(
                    "matmul:b:noT",
                    TRANSPOSE,
                    "a matrix product's db taken as a @ dout instead of a.T @ dout (a transpose missing)",
                    lambda L: {1: _red(L.tensors[0] @ L.g, L.tensors[1])},
                )
            )
    if c.op == "linear" and isinstance(b, Tensor) and b.dim() == 2 and b.shape[0] == b.shape[1]:
        rules.append(
            Rule(
                "linear:W:T",
                TRANSPOSE,
                "the linear layer's dW transposed: x.T @ dout instead of dout.T @ x",
                lambda L: {1: L.correct[1].mT},
            )
        )
        rules.append(
            Rule(
                "linear:x:T",
                TRANSPOSE,
                "the linear layer's dx taken as dout @ W.T instead of dout @ W (a transpose too many)",
                lambda L: {0: L.g @ L.tensors[1].mT},
            )
        )
    bias = _sc(c, 2, "bias")
    if c.op == "linear" and isinstance(bias, Tensor):
        rules.append(
            Rule(
                "linear:b:mean",
                REDUCTION,
                "the linear layer's db averaged over the rows instead of summed",
                lambda L: {2: L.correct[2] * L.tensors[2].numel() / L.g.numel()},
            )
        )
    return rules


def _red(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a gradient over the dims its operand was broadcast over (as autograd does)."""
    while grad.dim() > like.dim():
        grad = grad.sum(0)
    dims = tuple(i for i, (s, t) in enumerate(zip(like.shape, grad.shape)) if s == 1 and t != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


def _eps_variant(c: Call) -> Variant | None:
    """eps left out: the call replayed with its eps (a small positive constant) set to 0."""
    name = c.op
    if name in _EPS_POS:
        i, kw = _EPS_POS[name]
        eps = _sc(c, i, kw)
        if not _is_num(eps) or eps == 0:
            return None

        def swap(args, kwargs, i=i, kw=kw):
            if kw in kwargs:
                return args, {**kwargs, kw: 0.0}
            return tuple(0.0 if j == i else a for j, a in enumerate(args)), kwargs

        return Variant(
            f"eps:{name}",
            EPS,
            f"eps ({eps:g}) left out: the gradient as if `{name}` had eps = 0",
            c.index,
            swap=swap,
            priority=1,
        )
    if name in ("add", "sub", "clamp_min", "clamp") and len(c.args) >= 2:
        k = _scalar_arg(c) if name in ("add", "sub") else None
        if name in ("clamp", "clamp_min"):
            m = _sc(c, 1, "min")
            k = float(m) if _is_num(m) else None
        if k is None or not 0 < abs(k) <= EPS_MAX:
            return None

        def swap2(args, kwargs):
            return tuple(0.0 if _is_num(a) and not isinstance(a, bool) else a for a in args), kwargs

        return Variant(
            f"eps:{c.index}",
            EPS,
            f"eps ({k:g}) left out: the gradient as if the {k:g} added in {c.where()} were 0",
            c.index,
            swap=swap2,
            priority=1,
        )
    return None


def variants(graph: Graph) -> list[Variant]:
    """Every change tried, in the order their names are preferred."""
    out: list[Variant] = []
    uses = graph.uses()
    for c in graph.calls:
        if c.snapshot is not None or not any(t.requires_grad for t in _tensors(c.out)):
            continue
        single = len(_tensors(c.out)) == 1 and isinstance(c.out, Tensor)
        ts = [t for t in _tensors((c.args, c.kwargs)) if t.is_floating_point()]
        if single and any(t.requires_grad for t in ts):
            rules = (
                list(RULES.get(c.op, ()))
                + _pow_rules(c)
                + _const_rules(c)
                + _binary_rules(c)
                + _bcast_rules(c)
            )
            for r in rules:
                if r.when is not None and not _safe(r.when, c):
                    continue
                n = _mean_n(c) if "{n" in r.text else 0
                out.append(
                    Variant(
                        r.key,
                        r.kind,
                        f"{r.text.format(n=n)} in {c.where()}",
                        c.index,
                        rule=_guarded(r.fn),
                        priority=0,
                    )
                )
        ev = _eps_variant(c)
        if ev is not None:
            out.append(ev)
    for tid, us in uses.items():
        if len(us) < 2:
            continue
        name = graph.label(tid)
        lines = sorted({graph.calls[i].line for i, _ in us if graph.calls[i].line})
        for i, pos in us:
            cons = graph.calls[i]
            out.append(
                Variant(
                    f"drop:{i}:{pos}",
                    BRANCH,
                    f"the branch through {cons.where()} left out: `{name}` is used {len(us)} times"
                    + (f" (lines {', '.join(map(str, lines))})" if len(lines) > 1 else "")
                    + ", and its gradient is the sum over every use",
                    i,
                    drop=pos,
                    priority=2,
                )
            )
    for c in graph.calls:
        if c.snapshot is not None or not isinstance(c.out, Tensor) or not c.out.requires_grad:
            continue
        ts = [t for t in _tensors((c.args, c.kwargs)) if t.is_floating_point()]
        diff = [i for i, t in enumerate(ts) if t.requires_grad]
        if not diff or c.op in ("clone", "contiguous", "to", "detach"):
            continue
        for i in diff:
            which = f" w.r.t. {_operand(c, i)}" if len(ts) > 1 else ""
            out.append(
                Variant(
                    f"sign:{c.index}:{i}",
                    SIGN,
                    f"the derivative of `{c.op}`{which} with its sign flipped, in {c.where()}",
                    c.index,
                    rule=lambda L, i=i: {i: -L.correct[i]} if L.correct[i] is not None else None,
                    priority=3,
                )
            )
        if c.op in _LEFT_OUT and len(ts) >= 1 and ts[0].shape == c.out.shape and ts[0].requires_grad:
            out.append(
                Variant(
                    f"leftout:{c.index}",
                    DERIVATIVE,
                    f"the derivative of `{c.op}` left out (dout passed through unchanged) in {c.where()}",
                    c.index,
                    rule=lambda L: {0: L.g},
                    priority=3,
                )
            )
    out.sort(key=lambda v: v.priority)
    return out[:MAX_VARIANTS]


def _safe(pred: Callable[[Call], bool], c: Call) -> bool:
    try:
        return bool(pred(c))
    except Exception:
        return False


def _guarded(fn: Callable[[Local], Any]) -> Callable[[Local], Any]:
    def run(L: Local) -> Any:
        try:
            res = fn(L)
        except Exception:
            return None
        if not res:
            return None
        return {
            i: g
            for i, g in res.items()
            if isinstance(g, Tensor) and i < len(L.tensors) and g.numel() == L.tensors[i].numel()
        }

    return run


# ---------------------------------------------------------------------------- recognising the whole forward
def _recognisers(x: Tensor, n_inputs: int) -> list[tuple[str, Callable[..., Tensor]]]:
    """Known ops a whole forward may compute (written in primitives, or opaque to autograd)."""
    F = torch.nn.functional
    out: list[tuple[str, Callable[..., Tensor]]] = []
    if n_inputs == 1:
        out += [
            ("GELU (erf form)", lambda x: F.gelu(x)),
            ("GELU (tanh form)", lambda x: F.gelu(x, approximate="tanh")),
            ("SiLU", F.silu),
            ("sigmoid", torch.sigmoid),
            ("tanh", torch.tanh),
            ("softplus", F.softplus),
            ("softmax over the last dim", lambda x: torch.softmax(x, -1)),
            ("log_softmax over the last dim", lambda x: torch.log_softmax(x, -1)),
            ("exp", torch.exp),
            ("log", torch.log),
            ("sqrt", torch.sqrt),
            ("sin", torch.sin),
            ("cos", torch.cos),
        ]
        for eps in (1e-5, 1e-6, 1e-12, 1e-8, 0.0):
            out.append(
                (
                    f"layernorm over the last dim (eps {eps:g})",
                    lambda x, eps=eps: F.layer_norm(x, x.shape[-1:], eps=eps),
                )
            )
    if n_inputs == 3 and x.dim() >= 1:
        for eps in (1e-5, 1e-6, 1e-12, 1e-8, 0.0):
            out.append(
                (
                    f"layernorm over the last dim (eps {eps:g})",
                    lambda x, w, b, eps=eps: F.layer_norm(x, x.shape[-1:], w, b, eps),
                )
            )
    if n_inputs == 2:
        for eps in (1e-5, 1e-6, 1e-12, 1e-8, 0.0):
            out.append(
                (
                    f"layernorm over the last dim (eps {eps:g})",
                    lambda x, w, eps=eps: F.layer_norm(x, x.shape[-1:], w, None, eps),
                )
            )
    return out


def recognise(inputs64: Sequence[Tensor], outputs64: Sequence[Tensor], names: Sequence[str]) -> Graph | None:
    """A one-call graph of the known op the forward computes (same values within 1e-10), if any."""
    diff = [t for t in inputs64 if isinstance(t, Tensor) and t.is_floating_point()]
    if len(outputs64) != 1 or not diff or len(diff) != len(inputs64):
        return None
    y = outputs64[0].detach()
    x = diff[0]
    for _, fn in _recognisers(x, len(diff)):
        try:
            with torch.no_grad():
                ref = fn(*[t.detach() for t in diff])
        except Exception:
            continue
        if ref.shape != y.shape or not torch.isfinite(ref).all():
            continue
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if float((ref - y).abs().max()) <= 1e-10 * max(scale, 1.0):
            clones = [t.detach().clone().requires_grad_(True) for t in diff]
            graph, _ = record(fn, clones, names, lambda r: [r])
            for c in graph.calls:  # made here, not in the user's code: no line of theirs to quote
                c.file, c.line = "", 0
            return graph
    return None


# ---------------------------------------------------------------------------- matching
@dataclass
class Named:
    """What the user's gradient for one input equals."""

    variant: Variant
    negated: bool = False
    others: list[Variant] = field(default_factory=list)

    def phrase(self, name: str) -> str:
        sign = "minus " if self.negated else ""
        also = ""
        if self.others:
            also = " (it equals as well: " + "; ".join(v.text for v in self.others[:2]) + ")"
        return (
            f"named from your forward: your d{name} equals {sign}the gradient with {self.variant.text}{also}"
        )


def _differs(v: Tensor, r: Tensor) -> bool:
    return v.shape != r.shape or float((v - r).abs().max()) > VARIANT_DISTINCT * max(
        float(r.abs().max()), 1e-300
    )


def _matches(u: Tensor, v: Tensor, r: Tensor) -> bool:
    scale = max(float(u.abs().max()), float(r.abs().max()), 1e-300)
    return (
        float((u - v).abs().max()) <= VARIANT_MATCH * scale
        and float((v - r).abs().max()) > VARIANT_DISTINCT * scale
    )


def name_mistakes(
    graphs: Sequence[Graph],
    inputs64: Sequence[Tensor],
    user: Mapping[int, Tensor],
    ref: Mapping[int, Tensor],
    passing: Sequence[int] = (),
    budget_s: float = VARIANT_BUDGET_S,
) -> dict[int, Named]:
    """For each input position in `user` (the user's float64 gradient where it is wrong), the variant
    of one of `graphs` whose gradient it equals (or minus it). `ref` holds the right gradients; a
    variant that also changes an input in `passing` is said after those that do not."""
    found: dict[int, list[tuple[int, Variant, bool]]] = {i: [] for i in user}
    start = time.perf_counter()
    for graph in graphs:
        for v in variants(graph):
            if time.perf_counter() - start > budget_s:
                break
            try:
                grads = variant_grads(graph, inputs64, graph.weights, v)
            except Exception:
                continue
            spoils = sum(
                1 for j in passing if j in ref and grads[j] is not None and _differs(grads[j], ref[j])
            )
            for i, u in user.items():
                g = grads[i] if i < len(grads) else None
                if g is None or g.shape != u.shape or i not in ref:
                    continue
                if _matches(u, g, ref[i]):
                    found[i].append((spoils, v, False))
                elif v.kind != SIGN and _matches(u, -g, ref[i]):
                    found[i].append((spoils + 1, v, True))
    named: dict[int, Named] = {}
    for i, hits in found.items():
        if not hits:
            continue
        hits.sort(key=lambda h: (h[0], h[1].priority))
        best = hits[0]
        others = [v for _, v, neg in hits[1:] if v.text != best[1].text and not neg][:2]
        named[i] = Named(best[1], best[2], others)
    return named


# ---------------------------------------------------------------------------- the checks' entry points
def record_checked(
    fn: Callable[..., list[Tensor]],
    inputs64: Sequence[Any],
    names: Sequence[str],
    weights: Sequence[Tensor],
    ref: Mapping[int, Tensor] | None = None,
) -> Graph | None:
    """Record fn(*inputs) -> [output tensors] on float64 inputs; the graph when replaying it gives the
    right gradients back (`ref`, by input position, when given), else None."""
    leaves = _leaves(inputs64)
    try:
        graph, _ = record(fn, _fed(leaves), names, lambda r: list(r))
        graph.weights = list(weights)
        got = variant_grads(graph, inputs64, graph.weights, None)
    except Exception:
        return None
    for i, r in (ref or {}).items():
        g = got[i] if i < len(got) else None
        if g is None or g.shape != r.shape:
            return None
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-300)
        if float((g - r.to(g.dtype)).abs().max()) > 1e-9 * scale:
            return None
    return graph


def explain(
    fn: Callable[..., list[Tensor]],
    inputs64: Sequence[Any],
    names: Sequence[str],
    weights: Sequence[Tensor],
    user: Mapping[int, Tensor],
    ref: Mapping[int, Tensor],
    passing: Sequence[int] = (),
) -> dict[int, Named]:
    """For each input position in `user` (the user's float64 gradient, wrong), the variant it
    equals: from fn's own graph (with the upstream gradient left out as one more variant), else from
    a known op fn turns out to compute."""
    if not user:
        return {}
    named: dict[int, Named] = {}
    graph = record_checked(fn, inputs64, names, weights, ref)
    if graph is not None:
        named = name_mistakes([graph], inputs64, user, ref, passing)
        named.update(_dout_left_out(graph, inputs64, {i: u for i, u in user.items() if i not in named}, ref))
    left = {i: u for i, u in user.items() if i not in named}
    floats = [i for i, t in enumerate(inputs64) if isinstance(t, Tensor) and t.is_floating_point()]
    if left and floats:
        try:
            with torch.no_grad():
                outs = fn(*[t.detach() if isinstance(t, Tensor) else t for t in inputs64])
        except Exception:
            outs = []
        sub = [inputs64[i] for i in floats]
        rec = recognise(sub, list(outs), [names[i] for i in floats])
        if rec is not None:
            rec.weights = list(weights)
            at = {i: j for j, i in enumerate(floats)}
            got = name_mistakes(
                [rec],
                sub,
                {at[i]: u for i, u in left.items() if i in at},
                {at[i]: r for i, r in ref.items() if i in at},
                [at[i] for i in passing if i in at],
            )
            named.update({floats[j]: nm for j, nm in got.items()})
    return named


def _dout_left_out(
    graph: Graph, inputs64: Sequence[Any], user: Mapping[int, Tensor], ref: Mapping[int, Tensor]
) -> dict[int, Named]:
    """The backward never multiplied by the upstream gradient: the gradient of sum(out) instead."""
    if not user:
        return {}
    try:
        got = variant_grads(graph, inputs64, [torch.ones_like(w) for w in graph.weights], None)
    except Exception:
        return {}
    v = Variant(
        "dout",
        DERIVATIVE,
        "the upstream gradient dout left out (the gradient of sum(out) instead of "
        "sum(out * dout): the local derivative never multiplied by grad_output)",
        -1,
        priority=0,
    )
    return {
        i: Named(v)
        for i, u in user.items()
        if i < len(got)
        and got[i] is not None
        and i in ref
        and got[i].shape == u.shape
        and _matches(u, got[i], ref[i])
    }


GENERIC = ("values differ, with no simple pattern", "wrong on", "every sampled")
PARTIAL = ("correct on", "correct except", "each row scaled", "each column scaled", "close (")


def attach_names(sections: Sequence[Any], named: Mapping[str, Named]) -> None:
    """Put each input's named mistake into its failing rows' diagnoses (rows are check.py's
    Comparison and FDResult: .name, .passed, .diagnosis). Where the plain diagnosis found no pattern
    the name replaces it; where it did (a sign, a scale, a transpose) the name is added after it
    when it says more (a catalogue entry or an eps), and left out when it would only repeat it."""
    if not named:
        return
    for s in sections:
        for j, r in enumerate(s.rows):
            if type(r).__name__ not in ("Comparison", "FDResult") or r.passed or r.name not in named:
                continue
            nm = named[r.name]
            phrase = nm.phrase(r.name)
            d = r.diagnosis or ""
            cut = d.rfind(" [max error")
            body, verdict = (d[:cut], d[cut:]) if cut >= 0 else (d, "")
            if not d or d.startswith(GENERIC):
                new = phrase + verdict
            elif d.startswith(PARTIAL):  # a partial pattern: the variant says more, so it comes first
                new = f"{phrase}; {body}{verdict}"
            elif nm.variant.priority <= 1 and nm.variant.kind != SIGN:
                new = f"{body}; {phrase}{verdict}"
            else:
                continue
            s.rows[j] = dataclasses.replace(r, diagnosis=new)
