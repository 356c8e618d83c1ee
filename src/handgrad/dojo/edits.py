"""The edit search: the smallest edit of the learner's own line that makes a wrong row right on the
probes, said in their terms ("your line 40 is right with `dhprebn` in place of `dhpreact`"). A catalogue
cannot list every mistake; the learner's line can explain one it does not list.

This module only reads source (ast) and writes source: the candidates are run by the runner where the
learner's code runs, and judged by the grader. One edit at a time, of these kinds (rules as data below):
another variable in scope for one used; parentheses added or moved; a constant or exponent changed (n vs
n-1, 0.5 vs 1.5, a sign); a size for a hard-coded number; `.T` added or removed; a reduction's dim or
keepdim changed, added or removed; an index pattern; `+=` for `=` (and back); a factor of n, 1/n,
n/(n-1) or 2 added; an operator swapped; a term or factor dropped; a power added or removed.
"""

from __future__ import annotations

import ast
import copy
import difflib
from collections.abc import Iterator
from dataclasses import dataclass

from handgrad.dojo.graph import broadcast
from handgrad.dojo.runner import reads_of, writes_of

ARITH = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.MatMult, ast.Pow)
REDUCTIONS = ("sum", "mean")
MAX_CHAIN = 6  # operands of one arithmetic chain whose parenthesisations are all tried (Catalan(5) = 42)
MAX_CANDIDATES = 400  # per statement, best-ranked first

# How early a kind of edit is tried and preferred (smaller first), and the words after the edit.
KINDS: dict[str, tuple[float, str]] = {
    "accumulate": (1.0, "the line must add to what the gradient already holds, or replace it"),
    "index": (1.1, "the index pattern"),
    "parens": (1.2, "parentheses"),
    "name": (1.3, "another variable"),
    "call": (1.35, "another function"),
    "transpose": (1.4, "a transpose"),
    "reduce": (1.5, "the reduction"),
    "constant": (1.6, "a constant"),
    "sign": (1.7, "a sign"),
    "power": (1.8, "a power"),
    "factor": (2.0, "a missing factor"),
    "operator": (2.1, "an operator"),
    "drop": (2.2, "an extra term or factor"),
}
# Functions and methods one slip away from each other (a name for a name).
CALLS = {
    "any": ("all",),
    "all": ("any",),
    "max": ("min",),
    "min": ("max",),
    "zeros_like": ("ones_like",),
    "ones_like": ("zeros_like",),
    "zeros": ("ones",),
    "ones": ("zeros",),
    "exp": ("log",),
    "log": ("exp",),
    "argmax": ("argmin",),
    "argmin": ("argmax",),
    "tanh": ("sigmoid",),
    "sigmoid": ("tanh",),
}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
# (source of the factor, the words) for a missing factor put in front of a term: n is the batch size
FACTORS = (
    "n * {x}",
    "{x} / n",
    "n / (n - 1) * {x}",
    "(n - 1) / n * {x}",
    "{x} / (n - 1)",
    "2 * {x}",
    "{x} / 2",
    "-{x}",
)


@dataclass(frozen=True)
class Edit:
    index: int  # the statement's position: in the region, or the top-level def/class in the module
    line: int  # the learner's line the edit is on
    where: str  # "line 42", "In [12] line 3"
    kind: str
    was: str  # the learner's piece, as they wrote it
    now: str  # what puts it right
    top: ast.AST  # the statement (or function) the edit is in ...
    path: tuple  # ... where in it ...
    new: ast.AST  # ... and what goes there
    rank: float
    owner: str = ""  # call mode: the class whose method the source defines ('' for a function)

    @property
    def source(self) -> str:
        """The whole statement (or function) with the edit, to run (made when asked: most are never run)."""
        edited = _put(self.top, self.path, self.new)
        ast.fix_missing_locations(edited)
        return ast.unparse(edited)

    def words(self) -> str:
        why = KINDS[self.kind][1]
        return f"your {self.where} is right with `{self.now}` in place of `{self.was}` ({why})"


@dataclass
class Scope:
    """What the names in scope at a statement are: tensor shapes (None when not known) and sizes."""

    tensors: dict[str, tuple[int, ...] | None]
    sizes: dict[str, int]  # n, vocab_size, ... -> their value at the first probe

    def compatible(self, a: str, b: str) -> bool:
        sa, sb = self.tensors.get(a), self.tensors.get(b)
        if sa is None or sb is None:
            return sa is None and sb is None
        try:
            broadcast(sa, sb)
        except ValueError:
            return False
        return True


# ---------------------------------------------------------------------------- node edits
def _const(v: float | int) -> ast.expr:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        v = float(v)
    return ast.UnaryOp(ast.USub(), ast.Constant(-v)) if v < 0 else ast.Constant(v)


def _number(node: ast.AST) -> float | None:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    return None


def _const_edits(c: float | int) -> list[float | int]:
    """The constants one slip away from c: its negative, c +- 1, 2c, c/2, 1/c, and 0.5 <-> 1.5."""
    out = [-c, c + 1, c - 1, 2 * c, c / 2]
    if c:
        out.append(1 / c)
    if isinstance(c, float):
        out += [c + 0.5, c - 0.5]
    seen, keep = {c}, []
    for v in out:
        v = int(v) if isinstance(c, int) and float(v).is_integer() else v
        if v not in seen:
            seen.add(v)
            keep.append(v)
    return keep


def _reduction(node: ast.Call) -> tuple[str, ast.expr] | None:
    """(name, receiver) of `x.sum(...)` / `x.mean(...)`."""
    if isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS:
        return node.func.attr, node.func.value
    return None


def _reduce_call(recv: ast.expr, name: str, dim: object, keepdim: bool) -> ast.Call:
    args = [] if dim is None else [ast.parse(repr(dim), mode="eval").body]
    kw = [ast.keyword("keepdim", ast.Constant(True))] if keepdim else []
    return ast.Call(ast.Attribute(copy.deepcopy(recv), name, ast.Load()), args, kw)


def _dim_of(node: ast.Call) -> tuple[object, bool]:
    dim: object = None
    if node.args:
        try:
            dim = ast.literal_eval(node.args[0])
        except ValueError:
            dim = "?"
    keep = False
    for kw in node.keywords:
        if kw.arg in ("dim", "axis"):
            try:
                dim = ast.literal_eval(kw.value)
            except ValueError:
                dim = "?"
        if kw.arg in ("keepdim", "keepdims"):
            keep = bool(getattr(kw.value, "value", False))
    return dim, keep


def _index_edits(sl: ast.expr, scope: Scope) -> Iterator[ast.expr]:
    """Index patterns one slip away: `:` for `range(n)` and back, the two indices swapped, a lone index
    given its row range."""
    n = ast.Name("n", ast.Load()) if "n" in scope.sizes else None
    rng = (
        [
            ast.Call(ast.Name("range", ast.Load()), [n], []),
            ast.Call(ast.Attribute(ast.Name("torch", ast.Load()), "arange", ast.Load()), [n], []),
        ]
        if n
        else []
    )
    if isinstance(sl, ast.Tuple) and len(sl.elts) == 2:
        a, b = sl.elts
        yield ast.Tuple([copy.deepcopy(b), copy.deepcopy(a)], ast.Load())
        for k, e in enumerate(sl.elts):
            if isinstance(e, ast.Slice) and e.lower is None and e.upper is None:
                for r in rng:
                    elts = [copy.deepcopy(x) for x in sl.elts]
                    elts[k] = copy.deepcopy(r)
                    yield ast.Tuple(elts, ast.Load())
            elif isinstance(e, ast.Call) and getattr(e.func, "id", getattr(e.func, "attr", "")) in (
                "range",
                "arange",
            ):
                elts = [copy.deepcopy(x) for x in sl.elts]
                elts[k] = ast.Slice()
                yield ast.Tuple(elts, ast.Load())
    elif isinstance(sl, ast.Name) and rng:
        yield ast.Tuple([copy.deepcopy(rng[0]), copy.deepcopy(sl)], ast.Load())


def node_edits(
    node: ast.AST, scope: Scope, parent_arith: bool, parent: ast.AST | None = None
) -> Iterator[tuple[ast.AST, str, float]]:
    """(replacement, kind, extra rank) for one node of an expression."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        name = node.id
        if name in scope.tensors:
            for other in scope.tensors:
                if other != name:  # a shape that does not broadcast is tried later (it may be indexed)
                    sim = difflib.SequenceMatcher(None, name, other).ratio()
                    yield (
                        ast.Name(other, ast.Load()),
                        "name",
                        1.0 - sim + (0.0 if scope.compatible(name, other) else 0.6),
                    )
            shape = scope.tensors[name]
            if shape is None or len(shape) == 2:
                yield ast.Attribute(ast.Name(name, ast.Load()), "T", ast.Load()), "transpose", 0.0
            yield ast.BinOp(ast.Name(name, ast.Load()), ast.Pow(), ast.Constant(2)), "power", 0.0
        elif name in scope.sizes:
            yield ast.BinOp(ast.Name(name, ast.Load()), ast.Sub(), ast.Constant(1)), "constant", 0.0
            yield ast.BinOp(ast.Name(name, ast.Load()), ast.Add(), ast.Constant(1)), "constant", 0.1
            for other in scope.sizes:
                if other != name and scope.sizes[other] != scope.sizes[name]:
                    yield ast.Name(other, ast.Load()), "name", 0.5
    elif isinstance(node, ast.Attribute) and node.attr == "T":
        yield copy.deepcopy(node.value), "transpose", 0.0
    elif (c := _number(node)) is not None and not (
        isinstance(parent, ast.Call)
        and (_reduction(parent) or getattr(parent.func, "attr", "") in ("softmax", "log_softmax"))
    ):
        for v in _const_edits(c):
            yield _const(v), "constant", 0.0
        if "n" in scope.sizes:  # a constant missing its 1/n (or n/(n-1), ...), or a number for a formula in n
            for f in ("{x} / n", "{x} * n", "{x} / (n - 1)", "{x} * n / (n - 1)"):
                yield ast.parse(f.format(x=repr(c)), mode="eval").body, "factor", 0.0
            if isinstance(c, float) and not c.is_integer():
                for f in ("n / (n - 1)", "(n - 1) / n", "1 / n", "1 / (n - 1)", "1.0 / n", "1.0 / (n - 1)"):
                    yield ast.parse(f, mode="eval").body, "constant", -0.1
        for s, val in scope.sizes.items():  # a hard-coded size
            if val == c:
                yield ast.Name(s, ast.Load()), "constant", -0.5
            if val - 1 == c:
                yield ast.BinOp(ast.Name(s, ast.Load()), ast.Sub(), ast.Constant(1)), "constant", -0.4
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield copy.deepcopy(node.operand), "sign", 0.0
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ARITH):
        if isinstance(
            node.op, ast.MatMult
        ):  # the operands of @ swapped, each transposed: a.T @ b for b.T @ a
            yield ast.BinOp(_toggle_t(node.right), ast.MatMult(), _toggle_t(node.left)), "transpose", -0.1
        swaps = {
            ast.Add: [(ast.Sub, "sign"), (ast.Mult, "operator")],
            ast.Sub: [(ast.Add, "sign")],
            ast.Mult: [(ast.Div, "operator"), (ast.MatMult, "operator"), (ast.Add, "operator")],
            ast.Div: [(ast.Mult, "operator")],
            ast.MatMult: [(ast.Mult, "operator")],
        }
        for op, kind in swaps.get(type(node.op), []):
            yield ast.BinOp(copy.deepcopy(node.left), op(), copy.deepcopy(node.right)), kind, 0.0
        size_shift = (
            isinstance(node.left, ast.Name)
            and node.left.id in scope.sizes
            and _number(node.right) in (1, 1.0)
            and isinstance(node.op, (ast.Add, ast.Sub))
        )
        if size_shift:
            yield copy.deepcopy(node.left), "constant", -0.2
        elif isinstance(node.op, ast.Pow):
            yield copy.deepcopy(node.left), "power", 0.0
        else:
            yield copy.deepcopy(node.left), "drop", 0.0
            yield copy.deepcopy(node.right), "drop", 0.0
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARE:
        yield (
            ast.Compare(
                copy.deepcopy(node.left), [COMPARE[type(node.ops[0])]()], copy.deepcopy(node.comparators)
            ),
            "operator",
            0.0,
        )
    elif isinstance(node, ast.Call):
        fname = getattr(node.func, "attr", getattr(node.func, "id", ""))
        for other in CALLS.get(fname, ()):
            new = copy.deepcopy(node)
            if isinstance(new.func, ast.Attribute):
                new.func.attr = other
            else:
                new.func.id = other
            yield new, "call", 0.0
        red = _reduction(node)
        if red:
            name, recv = red
            dim, keep = _dim_of(node)
            for d in (0, 1, None, -1):
                for k in (True, False):
                    if (d, k) != (dim, keep) and not (d is None and k):
                        yield _reduce_call(recv, name, d, k), "reduce", 0.0 if d == dim or k == keep else 0.2
            other = "mean" if name == "sum" else "sum"
            yield _reduce_call(recv, other, None if dim == "?" else dim, keep), "reduce", 0.3
            yield copy.deepcopy(recv), "reduce", 0.4
        fname = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if fname in ("softmax", "log_softmax") and len(node.args) >= 2:
            for d in (0, 1, -1):
                new = copy.deepcopy(node)
                if _number(new.args[1]) != d:
                    new.args[1] = ast.Constant(d)
                    yield new, "reduce", 0.1
    elif isinstance(node, ast.Subscript):
        for sl in _index_edits(node.slice, scope):
            yield ast.Subscript(copy.deepcopy(node.value), sl, node.ctx), "index", 0.0
    if (
        parent_arith
        and isinstance(node, (ast.Name, ast.Call, ast.Attribute, ast.Subscript))
        and not (isinstance(node, ast.Name) and node.id in scope.sizes)
        and "n" in scope.sizes
    ):
        for f in FACTORS:
            yield ast.parse(f.format(x=f"({ast.unparse(node)})"), mode="eval").body, "factor", 0.0


def _toggle_t(node: ast.expr) -> ast.expr:
    """x -> x.T, x.T -> x."""
    if isinstance(node, ast.Attribute) and node.attr == "T":
        return copy.deepcopy(node.value)
    return ast.Attribute(copy.deepcopy(node), "T", ast.Load())


# ---------------------------------------------------------------------------- parentheses
def _flatten(node: ast.expr) -> list:
    """An arithmetic chain in source order: operand, op, operand, ... (every BinOp inside it)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ARITH):
        return _flatten(node.left) + [node.op] + _flatten(node.right)
    return [node]


def _trees(items: list) -> list[ast.expr]:
    if len(items) == 1:
        return [copy.deepcopy(items[0])]
    out = []
    for k in range(1, len(items), 2):
        for left in _trees(items[:k]):
            for right in _trees(items[k + 1 :]):
                out.append(ast.BinOp(left, type(items[k])(), right))
    return out


def paren_edits(node: ast.expr) -> Iterator[ast.expr]:
    items = _flatten(node)
    if 3 < len(items) <= 2 * MAX_CHAIN - 1:
        here = ast.dump(node)
        seen = {here}
        for t in _trees(items):
            d = ast.dump(t)
            if d not in seen:
                seen.add(d)
                yield t


# ---------------------------------------------------------------------------- walking a statement
def _children(node: ast.AST) -> Iterator[tuple[str, int | None, ast.AST]]:
    for fname, value in ast.iter_fields(node):
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, ast.AST):
                    yield fname, i, v
        elif isinstance(value, ast.AST):
            yield fname, None, value


def _walk(node: ast.AST, path: tuple = ()) -> Iterator[tuple[tuple, ast.AST, ast.AST | None]]:
    """(path, node, parent) for every node under `node`."""
    stack = [(path, node, None)]
    while stack:
        p, n, parent = stack.pop()
        yield p, n, parent
        for fname, i, child in reversed(list(_children(n))):
            stack.append((p + ((fname, i),), child, n))


def _get(root: ast.AST, path: tuple) -> ast.AST:
    n = root
    for fname, i in path:
        v = getattr(n, fname)
        n = v[i] if i is not None else v
    return n


def _put(root: ast.AST, path: tuple, new: ast.AST) -> ast.AST:
    """root with the node at path replaced: the nodes on the path are copied, the rest shared."""
    if not path:
        return copy.deepcopy(new)
    out = copy.copy(root)
    node = out
    for k, (fname, i) in enumerate(path):
        last = k == len(path) - 1
        child = copy.deepcopy(new) if last else None
        if i is None:
            child = child if last else copy.copy(getattr(node, fname))
            setattr(node, fname, child)
        else:
            items = list(getattr(node, fname))
            items[i] = child if last else copy.copy(items[i])
            setattr(node, fname, items)
            child = items[i]
        node = child
    return out


def segment(lines: list[str], node: ast.AST) -> str | None:
    """The learner's own text of `node` (ast.get_source_segment on lines split once)."""
    try:
        a, b = node.lineno - 1, node.end_lineno - 1
        ca, cb = node.col_offset, node.end_col_offset
    except AttributeError:
        return None
    if not (0 <= a <= b < len(lines)):
        return None
    if a == b:
        return lines[a].encode()[ca:cb].decode("utf-8", "replace")
    first = lines[a].encode()[ca:].decode("utf-8", "replace")
    last = lines[b].encode()[:cb].decode("utf-8", "replace")
    return "\n".join([first, *lines[a + 1 : b], last])


def _simple(node: ast.AST) -> bool:
    return isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return))


def statement_edits(
    top: ast.stmt,
    targets: set[str],
    scope: Scope,
    text: str | list[str],
    index: int,
    where_of,
    owner: str = "",
) -> list[Edit]:
    """Every single edit of the simple statements under `top` that write one of `targets` (for a def or
    a class: the statements of its body that do), as an Edit whose source is `top` edited."""
    out: list[Edit] = []
    lines = text.splitlines() if isinstance(text, str) else text
    for path, node, _ in _walk(top):
        if not _simple(node):
            continue
        w = writes_of(node)
        if isinstance(node, ast.Return):
            w = {t for t in targets if t in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}}
        if not (w & targets):
            continue
        line = node.lineno
        later = 0.5 if isinstance(node, ast.Return) else 0.0  # a return hands values on: the fix is above it

        def add(
            sub_path: tuple,
            new: ast.AST,
            kind: str,
            extra: float,
            was_node: ast.AST | None = None,
            was: str | None = None,
            now: str | None = None,
            path: tuple = path,
            line: int = line,
            later: float = later,
        ) -> None:
            full = path + sub_path
            ast.fix_missing_locations(new)
            try:
                now_unparsed = ast.unparse(new)
            except Exception:  # an edit that does not unparse (a malformed node): not a candidate
                return
            was_text = was if was is not None else (segment(lines, was_node) or ast.unparse(was_node))
            now_text = now if now is not None else now_unparsed
            if kind == "index" and isinstance(new, ast.Tuple):  # as the learner writes an index: [a, b]
                now_text, was_text = f"[{now_text.strip('()')}]", f"[{was_text.strip('()')}]"
            at = getattr(was_node, "lineno", line) if was_node is not None else line
            if was_text.strip() == now_text.strip():
                return
            out.append(
                Edit(
                    index,
                    at,
                    where_of(at),
                    kind,
                    was_text,
                    now_text,
                    top,
                    full,
                    new,
                    KINDS[kind][0] + extra + later,
                    owner,
                )
            )

        # the statement itself: += for =, = for +=, -= for +=
        tgt = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AugAssign):
            head = segment(lines, node.target) or ast.unparse(node.target)
            new = ast.Assign([copy.deepcopy(node.target)], copy.deepcopy(node.value))
            _ctx_store(new.targets[0])
            sym = _OPS.get(type(node.op), "?")
            add((), new, "accumulate", 0.0, was=f"{head} {sym}=", now=f"{head} =")
            if isinstance(node.op, (ast.Add, ast.Sub)):
                flip = ast.AugAssign(
                    copy.deepcopy(node.target),
                    ast.Sub() if isinstance(node.op, ast.Add) else ast.Add(),
                    copy.deepcopy(node.value),
                )
                add((), flip, "sign", 0.0, was=f"{head} {sym}=", now=f"{head} {'-' if sym == '+' else '+'}=")
        elif tgt is not None:
            head = segment(lines, tgt) or ast.unparse(tgt)
            for op, sym in ((ast.Add, "+"), (ast.Sub, "-")):
                new = ast.AugAssign(copy.deepcopy(tgt), op(), copy.deepcopy(node.value))
                add((), new, "accumulate", 0.0 if sym == "+" else 0.5, was=f"{head} =", now=f"{head} {sym}=")
        # the target's index (dlogprobs[:, Yb] = ...)
        for t_path, t_node, _ in (
            _walk(tgt, (("targets", 0),))
            if tgt is not None
            else _walk(node.target, (("target", None),))
            if isinstance(node, ast.AugAssign)
            else iter(())
        ):
            if isinstance(t_node, ast.Subscript):
                for sl in _index_edits(t_node.slice, scope):
                    add(t_path + (("slice", None),), sl, "index", 0.0, was_node=t_node.slice)
        # the value
        value = getattr(node, "value", None)
        if value is None:
            continue
        add_path = ("value", None)
        index_paths = set()  # nodes inside an index: index arithmetic slips often, so its edits come early
        for sub_path, sub, parent in _walk(value, (add_path,)):
            if isinstance(sub, ast.Subscript):
                index_paths.add(sub_path + (("slice", None),))
            inside = any(sub_path[: len(ip)] == ip for ip in index_paths)
            arith_parent = parent is None or (isinstance(parent, ast.BinOp) and isinstance(parent.op, ARITH))
            for new, kind, extra in node_edits(sub, scope, arith_parent, parent):
                add(
                    sub_path,
                    new,
                    kind,
                    extra - (0.7 if inside and kind in ("drop", "constant", "sign") else 0.0),
                    was_node=sub,
                )
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ARITH):
                for t in paren_edits(sub):
                    add(sub_path, t, "parens", 0.0, was_node=sub)
        # the whole value: negated, reduced, transposed
        v = value
        wraps = [
            ("-({x})", "sign"),
            ("({x}).sum(0)", "reduce"),
            ("({x}).sum(0, keepdim=True)", "reduce"),
            ("({x}).sum(1, keepdim=True)", "reduce"),
            ("({x}).T", "transpose"),
        ]
        if "n" in scope.sizes:
            wraps += [(f.replace("{x}", "({x})"), "factor") for f in FACTORS[:-1]]
        for src_, kind in wraps:
            new = ast.parse(src_.format(x=ast.unparse(v)), mode="eval").body
            add((add_path,), new, kind, 0.3, was_node=v)
    out.sort(key=lambda e: e.rank)
    seen, uniq = set(), []
    for e in out:
        sig = (e.path, ast.dump(e.new))
        if sig not in seen:
            seen.add(sig)
            uniq.append(e)
    return uniq[:MAX_CANDIDATES]


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.MatMult: "@", ast.Pow: "**"}


def _ctx_store(node: ast.AST) -> None:
    if hasattr(node, "ctx"):
        node.ctx = ast.Store()


def depends(statements: list[ast.stmt], var: str, known: set[str], depth: int = 2) -> set[int]:
    """The positions of the statements that write `var`, and of those that write the helper names they
    read (not `known` names: rows, forward values), `depth` levels up."""
    want, found = {var}, set()
    for _ in range(depth + 1):
        new = {i for i, s in enumerate(statements) if writes_of(s) & want} - found
        if not new:
            break
        found |= new
        reads = set().union(*(reads_of(statements[i]) for i in new)) | set().union(
            *(_attr_reads(statements[i]) for i in new)
        )
        want = {r for r in reads if r not in known} - {var}
    return found


def _attr_reads(node: ast.AST) -> set[str]:
    return {
        f"self.{n.attr}"
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Load)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    }
