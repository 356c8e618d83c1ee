"""A learner's answer written as a PyTorch expression (`dy.expand_as(x)`), parsed with `ast` and run by a
small interpreter over a whitelist: the question's own names, `torch` and `F` functions, tensor methods
and a few builtins; no dunders, no imports, no assignments, no lambdas, nothing outside tensor maths.
Never `eval`. Every step is bounded (tensor sizes, Python integers, iteration), so an answer cannot
exhaust memory or time. Reference for the node types: the Python docs' `ast` module.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_CHARS = 1000  # an answer is one expression, not a program
MAX_NODES = 300
MAX_ELEMENTS = 1 << 22  # no tensor (or the bound on what a call could make) above this many elements
MAX_FLOPS = 1 << 28  # multiply-adds of one matrix product
MAX_INT = 10**12  # Python integers stay below this in magnitude
MAX_ITEMS = 64  # list and tuple literals
MAX_ITER = 10**5  # what sum(), min(), max(), tuple(), list() may iterate over
MAX_STR = 32  # string constants (a dtype name, a device)


class ExpressionError(ValueError):
    """The answer cannot be evaluated as written: it does not parse, or uses a name or a construct
    that is not allowed, or asks for too much. One line; bad input (exit 2)."""


class EvaluationError(Exception):
    """torch (or Python) refused the answer while it ran: a wrong answer, its message the diagnosis."""


# ---------------------------------------------------------------------------- the whitelist
TORCH_FUNCS = frozenset({
    "abs", "add", "all", "amax", "amin", "any", "arange", "argmax", "argmin", "as_tensor",
    "broadcast_to", "cat", "clamp", "count_nonzero", "cumsum", "div", "eq", "exp", "eye",
    "flatten", "full", "full_like", "gather", "index_add", "index_select", "isclose", "log", "log_softmax",
    "logsumexp", "max", "maximum", "mean", "min", "minimum", "mul", "ne", "neg", "ones", "ones_like",
    "permute", "pow", "prod", "reshape", "scatter", "scatter_add", "sign", "softmax", "sqrt", "square",
    "squeeze", "stack", "sub", "sum", "tanh", "tensor", "transpose", "unsqueeze", "where", "zeros",
    "zeros_like",
})
DTYPES = frozenset({"float32", "float64", "float", "double", "int64", "long", "int32", "int", "bool"})
F_FUNCS = frozenset({"cross_entropy", "log_softmax", "nll_loss", "one_hot", "softmax"})
TENSOR_METHODS = frozenset({
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "bool", "broadcast_to",
    "clamp", "clone", "contiguous", "count_nonzero", "cumsum", "detach", "dim", "div", "double", "eq",
    "exp", "expand", "expand_as", "flatten", "float", "gather", "ge", "gt", "index_add", "index_add_",
    "index_put", "index_select", "int", "item", "le", "log", "log_softmax", "logsumexp", "long", "lt",
    "masked_fill", "max", "mean", "min", "mul", "ne", "neg", "new_full", "new_ones", "new_tensor",
    "new_zeros", "nonzero", "numel", "permute", "pow", "prod", "repeat", "reshape",
    "reshape_as", "scatter", "scatter_add", "sign", "size", "softmax", "sqrt", "square", "squeeze", "sub",
    "sum", "sum_to_size", "t", "tanh", "tile", "to", "transpose", "type_as", "unsqueeze", "view",
    "view_as", "where",
})
TENSOR_PROPERTIES = frozenset({"T", "mT", "dtype", "ndim", "shape"})
RESULT_FIELDS = frozenset({"values", "indices"})  # of torch.return_types (x.max(1).values)
MODULES: dict[str, tuple[object, frozenset[str]]] = {  # name -> (module, the attributes allowed on it)
    "torch": (torch, TORCH_FUNCS | DTYPES | {"nn"}),
    "torch.nn": (torch.nn, frozenset({"functional"})),
    "F": (F, F_FUNCS),
}
BUILTINS = {"abs": abs, "bool": bool, "float": float, "int": int, "len": len, "list": list, "max": max,
            "min": min, "range": range, "round": round, "sum": sum, "tuple": tuple}
ITERATING = (list, max, min, sum, tuple)  # the builtins that iterate over their argument
ATTRIBUTES = TORCH_FUNCS | DTYPES | F_FUNCS | TENSOR_METHODS | TENSOR_PROPERTIES | RESULT_FIELDS | {
    "nn", "functional", "numel"}

BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
          ast.MatMult: operator.matmul, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
          ast.BitXor: operator.xor}
UNARYOPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}
ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.keyword, ast.Attribute,
                 ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.List, ast.Subscript, ast.Slice, ast.Starred,
                 ast.IfExp, *BINOPS, *UNARYOPS, *COMPARE)
WHY_NOT = {  # node type -> what to say when an answer uses it
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension",
    ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.NamedExpr: "an assignment (:=)",
    ast.BoolOp: "'and'/'or' (use & and | on tensors)", ast.JoinedStr: "an f-string", ast.Dict: "a dict",
    ast.Set: "a set", ast.Await: "await", ast.Yield: "yield",
}


@dataclass(frozen=True)
class Expression:
    """A parsed answer, checked against the whitelist; `names` are the variables it may read."""

    text: str
    tree: ast.Expression
    names: frozenset[str]


# ---------------------------------------------------------------------------- parsing
def parse(text: str, names: Iterable[str]) -> Expression:
    """Parse one expression over `names` (plus torch, F and a few builtins) and check every node
    against the whitelist. Raises ExpressionError (one line) for anything that cannot be run."""
    names = frozenset(names)
    src = text.strip()
    if not src:
        raise ExpressionError("the answer is empty")
    if len(src) > MAX_CHARS:
        raise ExpressionError(f"the answer is {len(src)} characters long; one expression of up to "
                              f"{MAX_CHARS} is expected")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        where = f" (at column {e.offset})" if e.offset else ""
        raise ExpressionError(f"{_short(src)} does not parse: {e.msg}{where}") from None
    except (ValueError, MemoryError, RecursionError) as e:  # a NUL byte; absurd nesting
        raise ExpressionError(f"{_short(src)} does not parse: {e}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"the answer has {len(nodes)} parts; up to {MAX_NODES} are allowed")
    known = names | set(MODULES) | set(BUILTINS)
    for node in nodes:
        _check_node(node, src, names, known)
    return Expression(src, tree, names)


def _short(src: str) -> str:
    return repr(src if len(src) <= 60 else src[:57] + "...")


def _check_node(node: ast.AST, src: str, names: frozenset[str], known: set[str]) -> None:
    if not isinstance(node, ALLOWED_NODES):
        what = WHY_NOT.get(type(node), f"'{type(node).__name__}'")
        raise ExpressionError(f"{_short(src)}: {what} is not allowed here; write one tensor expression")
    if isinstance(node, ast.Name):
        if node.id.startswith("_"):
            raise ExpressionError(f"{_short(src)}: names starting with '_' are not allowed")
        if node.id not in known:
            have = ", ".join(sorted(names)) or "none"
            raise ExpressionError(f"{_short(src)}: unknown name {node.id!r}; the names here are {have}, "
                                  "and torch, F")
    elif isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise ExpressionError(f"{_short(src)}: attributes starting with '_' are not allowed "
                                  f"(.{node.attr})")
        if node.attr not in ATTRIBUTES:
            raise ExpressionError(f"{_short(src)}: .{node.attr} is not one of the tensor operations allowed "
                                  "here")
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, str) and len(v) > MAX_STR:
            raise ExpressionError(f"{_short(src)}: a string of {len(v)} characters; up to {MAX_STR} are "
                                  "allowed")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            raise ExpressionError(f"{_short(src)}: the integer {v:.3g} is too large" if abs(v) < 10**300 else
                                  f"{_short(src)}: an integer is too large")
        if not isinstance(v, (int, float, str, bool, type(None), type(Ellipsis))):
            raise ExpressionError(f"{_short(src)}: a {type(v).__name__} constant is not allowed here")
    elif isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) > MAX_ITEMS:
        raise ExpressionError(f"{_short(src)}: a list of {len(node.elts)} items; up to {MAX_ITEMS} are "
                              "allowed")
    elif isinstance(node, ast.Compare) and len(node.ops) > 1:
        raise ExpressionError(f"{_short(src)}: a chained comparison; write (a < b) & (b < c)")
    elif isinstance(node, ast.keyword) and node.arg is None:
        raise ExpressionError(f"{_short(src)}: **keyword unpacking is not allowed")


# ---------------------------------------------------------------------------- evaluating
def evaluate(expr: Expression, env: Mapping[str, object]) -> object:
    """Run a parsed answer with the variables `env` (tensors, numbers, shapes). Raises EvaluationError
    when torch refuses it (a wrong answer) and ExpressionError when it asks for too much."""
    return evaluate_with_precision(expr, env)[0]


def evaluate_with_precision(expr: Expression, env: Mapping[str, object]) -> tuple[object, torch.dtype | None]:
    """evaluate(), and the least precise floating-point dtype of any tensor the answer made on the way
    (None: none was made): `F.one_hot(Y, V) / n` computes in float32 even inside a float64 result."""
    missing = expr.names - set(env)
    if missing:
        raise ValueError(f"env lacks {sorted(missing)}")  # a bug of the caller, not the learner's
    scope = {k: env[k] for k in expr.names}
    interp = _Interpreter(scope, expr.text)
    try:
        with torch.no_grad():
            return interp.run(expr.tree.body), interp.lowest
    except (ExpressionError, EvaluationError):
        raise
    except RecursionError:
        raise ExpressionError(f"{_short(expr.text)}: nested too deeply") from None
    except MemoryError:
        raise ExpressionError(f"{_short(expr.text)}: asks for more memory than there is") from None
    except Exception as e:  # torch's RuntimeError, IndexError, TypeError, ...: the answer is wrong
        raise EvaluationError(_first_line(e)) from None


def _first_line(e: BaseException) -> str:
    if isinstance(e, OverflowError):
        return "a number overflows"
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    msg = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in msg)  # an answer's string, escaped
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _size(v: object) -> int:
    """How many elements a value holds: a tensor's numel, a sequence's items (the tensors inside it
    counted whole), 0 for a scalar."""
    if isinstance(v, Tensor):
        return v.numel()
    if isinstance(v, (range, torch.Size)):
        return len(v)
    if isinstance(v, (list, tuple)):
        return sum(max(_size(x), 1) for x in v) if len(v) <= MAX_ITEMS else len(v)
    return 0


def _ints(v: object) -> list[int]:
    """The integers an argument holds (itself, a one-element integer tensor, or the items of a shape,
    tuple or list): what a call may take as sizes or repeats."""
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        return [int(v.item())]
    if isinstance(v, (tuple, list, torch.Size)):
        return [i for x in v for i in _ints(x)] if len(v) <= MAX_ITEMS else []
    return []


def _number(v: object) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, Tensor) and v.numel() == 1:
        return float(v.item())
    return None


def _arange_length(args: list, kwargs: dict) -> float:
    """How many elements torch.arange(end) / arange(start, end[, step]) makes (inf when it cannot be
    told from the arguments)."""
    nums = [_number(a) for a in args]
    if any(n is None for n in nums) or len(nums) > 3:
        return math.inf
    start, end, step = 0.0, None, 1.0
    if len(nums) == 1:
        end = nums[0]
    elif nums:
        start, end, *rest = nums
        step = rest[0] if rest else 1.0
    start = _number(kwargs.get("start", start))
    end = _number(kwargs.get("end", end))
    step = _number(kwargs.get("step", step))
    if None in (start, end, step) or step == 0 or not all(map(math.isfinite, (start, end, step))):
        return math.inf
    return max(0.0, math.ceil((end - start) / step))


class _Interpreter:
    def __init__(self, scope: dict[str, object], text: str):
        self.scope = scope
        self.text = text
        self.lowest: torch.dtype | None = None  # the least precise float dtype seen

    def refuse(self, what: str) -> ExpressionError:
        return ExpressionError(f"{_short(self.text)}: {what}")

    def checked(self, v: object) -> object:
        if isinstance(v, Tensor) and v.is_floating_point() and (
                self.lowest is None or torch.finfo(v.dtype).eps > torch.finfo(self.lowest).eps):
            self.lowest = v.dtype
        if isinstance(v, Tensor) and v.numel() > MAX_ELEMENTS:
            raise self.refuse(f"makes a tensor of {v.numel():,} elements; the answers here are small "
                              f"(up to {MAX_ELEMENTS:,})")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            raise self.refuse("an integer grows too large")
        return v

    def run(self, node: ast.AST) -> object:
        method = getattr(self, "do_" + type(node).__name__)
        return self.checked(method(node))

    # ---- leaves
    def do_Constant(self, node: ast.Constant) -> object:
        return node.value

    def do_Name(self, node: ast.Name) -> object:
        if node.id in self.scope:
            return self.scope[node.id]
        if node.id in MODULES:
            return _Module(node.id)
        return BUILTINS[node.id]

    def do_Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.items(node.elts))

    def do_List(self, node: ast.List) -> list:
        return self.items(node.elts)

    def items(self, elts: list[ast.expr]) -> list:
        out: list = []
        for e in elts:
            if isinstance(e, ast.Starred):
                v = self.run(e.value)
                if _size(v) > MAX_ITEMS:
                    raise self.refuse(f"*unpacks {_size(v):,} items; up to {MAX_ITEMS} are allowed")
                out.extend(v)
            else:
                out.append(self.run(e))
        return out

    def do_Slice(self, node: ast.Slice) -> slice:
        return slice(*(None if p is None else self.run(p) for p in (node.lower, node.upper, node.step)))

    # ---- operators
    def do_UnaryOp(self, node: ast.UnaryOp) -> object:
        v = self.run(node.operand)
        self.operand(v)
        return UNARYOPS[type(node.op)](v)

    def do_BinOp(self, node: ast.BinOp) -> object:
        a, b = self.run(node.left), self.run(node.right)
        return self.binary(BINOPS[type(node.op)], a, b)

    def do_Compare(self, node: ast.Compare) -> object:
        return self.binary(COMPARE[type(node.ops[0])], self.run(node.left), self.run(node.comparators[0]))

    def operand(self, v: object) -> None:
        if not isinstance(v, (Tensor, int, float, bool)):
            raise EvaluationError(f"an operator was applied to a {type(v).__name__}; operators take tensors "
                                  "and numbers here")

    def binary(self, op, a: object, b: object) -> object:
        self.operand(a)
        self.operand(b)
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            self.bound_binary(op, a, b)
        elif op is operator.pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            if b * math.log2(abs(a)) > math.log2(MAX_INT):
                raise self.refuse("an integer power grows too large")
        return op(a, b)

    def bound_binary(self, op, a: object, b: object) -> None:
        """The result's size before it is made: the broadcast shape, or a matmul's on meta tensors."""
        shapes = [tuple(t.shape) for t in (a, b) if isinstance(t, Tensor)]
        flops = 0
        try:
            if op is operator.matmul:
                meta = [torch.empty(s, device="meta") for s in shapes]
                out = (meta[0] @ meta[1]) if len(meta) == 2 else meta[0]
                n = out.numel()
                flops = n * meta[0].shape[-1] if len(meta) == 2 else 0
            else:
                n = math.prod(torch.broadcast_shapes(*shapes))
        except (RuntimeError, ValueError, TypeError):
            return  # the real operation raises the real error
        if flops > MAX_FLOPS:
            raise self.refuse("a matrix product that large is not needed here")
        if n > MAX_ELEMENTS:
            raise self.refuse(f"an operation would make {n:,} elements; the answers here are small")

    def do_IfExp(self, node: ast.IfExp) -> object:
        return self.run(node.body) if bool(self.run(node.test)) else self.run(node.orelse)

    # ---- attributes, indexing, calls
    def do_Attribute(self, node: ast.Attribute) -> object:
        obj, name = self.run(node.value), node.attr
        if isinstance(obj, _Module):
            return obj.get(name, self)
        if isinstance(obj, Tensor) and name in TENSOR_METHODS | TENSOR_PROPERTIES:
            return getattr(obj, name)
        if isinstance(obj, torch.Size) and name == "numel":
            return obj.numel
        if type(obj).__module__ == "torch.return_types" and name in RESULT_FIELDS:
            return getattr(obj, name)
        raise EvaluationError(f".{name} is not available on a {type(obj).__name__} here")

    def do_Subscript(self, node: ast.Subscript) -> object:
        obj, index = self.run(node.value), self.run(node.slice)
        if isinstance(obj, Tensor):
            parts = index if isinstance(index, tuple) else (index,)
            widest = max([_size(p) for p in parts] + [1])
            if widest * max(obj.numel(), 1) > MAX_ELEMENTS:
                raise self.refuse("an index that large would make too big a tensor")
        elif not (isinstance(obj, (tuple, list, torch.Size, range))
                  or type(obj).__module__ == "torch.return_types"):
            raise EvaluationError(f"a {type(obj).__name__} cannot be indexed here")
        return obj[index]

    def do_Call(self, node: ast.Call) -> object:
        fn = self.run(node.func)
        args = self.items(node.args)
        kwargs = {k.arg: self.run(k.value) for k in node.keywords}
        name = self.allowed(fn)
        iterates = any(fn is b for b in ITERATING)
        if iterates and args and _size(args[0]) > MAX_ITER:
            raise self.refuse(f"{name}() over {_size(args[0]):,} items; up to {MAX_ITER:,} are allowed")
        if iterates and args and not isinstance(args[0], (Tensor, range, list, tuple, torch.Size)):
            raise EvaluationError(f"{name}() of a {type(args[0]).__name__}")
        self.bound_call(name, getattr(fn, "__self__", None), args, kwargs)
        return fn(*args, **kwargs)

    def allowed(self, fn: object) -> str:
        """The name of a callable the answer may call (a whitelisted torch/F function, a tensor method,
        a builtin); anything else was not reachable through the whitelist and is refused."""
        if any(fn is b for b in BUILTINS.values()):
            return fn.__name__
        owner = getattr(fn, "__self__", None)
        name = getattr(fn, "__name__", "")
        if isinstance(owner, Tensor) and name in TENSOR_METHODS:
            return name
        if isinstance(owner, torch.Size) and name == "numel":
            return name
        for mod, names in MODULES.values():
            if name in names and getattr(mod, name, None) is fn:
                return name
        raise EvaluationError(f"a {type(fn).__name__} cannot be called here")

    def bound_call(self, name: str, owner: object, args: list, kwargs: dict) -> None:
        """Refuse a call that could make more than MAX_ELEMENTS elements: the largest tensor or sequence it
        is given (and their broadcast) times every integer it is given (sizes, repeats); arange, eye,
        one_hot and index_select by their own rules."""
        values = [*args, *kwargs.values()]
        tensors = [v for v in [owner, *values] if isinstance(v, Tensor)]
        widest = max([_size(v) for v in [owner, *values]] + [1])
        if len(tensors) > 1:
            try:
                widest = max(widest, math.prod(torch.broadcast_shapes(*(t.shape for t in tensors))))
            except RuntimeError:
                pass
        ints = [abs(i) for v in values for i in _ints(v)]
        if name == "eye" and len(ints) == 1:
            ints *= 2  # eye(n) is n x n
        factor = 1
        for i in ints:
            factor *= max(i, 1)
            if factor > MAX_ELEMENTS:
                break
        need = widest * factor
        if name == "arange":
            need = _arange_length(args, kwargs)
        elif name == "one_hot" and tensors:
            classes = ints[0] if ints else (int(tensors[0].max()) + 1 if tensors[0].numel() else 0)
            need = tensors[0].numel() * max(classes, 1)
        elif name == "index_select":
            need = math.prod(max(t.numel(), 1) for t in tensors)
        if need > MAX_ELEMENTS:
            raise self.refuse(f"{name}() with these sizes could make more than {MAX_ELEMENTS:,} elements; "
                              "the answers here are small")


class _Module:
    """torch, torch.nn or F as the answer sees them: only their whitelisted attributes."""

    def __init__(self, name: str):
        self.name = name

    def get(self, attr: str, interp: _Interpreter) -> object:
        mod, allowed = MODULES[self.name]
        if attr not in allowed:
            hint = " (use F.one_hot, F.softmax, ...)" if self.name.startswith("torch") else ""
            raise interp.refuse(f"{self.name}.{attr} is not one of the operations allowed here{hint}")
        sub = f"{self.name}.{attr}"
        if sub in MODULES:
            return _Module(sub)
        if sub == "torch.nn.functional":
            return _Module("F")
        return getattr(mod, attr)
