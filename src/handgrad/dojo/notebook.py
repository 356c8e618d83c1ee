"""Grading in the learner's own notebook: `from handgrad import dojo; dojo.grade(1, globals())`
(Karpathy, "Becoming a Backprop Ninja"). The notebook's parameters and batch are found (under the
lecture's names or the learner's own, by name, shape and value), the learner's cells are read from the
sources IPython keeps (In / _ih), and their lines run again here, statement by statement, with the right
upstream gradients fed in, at the learner's own point and at the grader's probes: one mistake shows once,
where it is, and the edit search can read the learner's line. The learner's own values give the chain
column ("right given your dprobs; the mistake is above, at dprobs"). Without cell sources the grade is
made from the values alone. Exercise 4 is graded in place: the training loop's gradients at its last
step, and, from the loop's cell, its loss curve against autograd's.
"""

from __future__ import annotations

import ast
import io
import time
from collections.abc import Mapping
from contextlib import redirect_stdout

import torch
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import graph as G
from handgrad.dojo import judge as J
from handgrad.dojo import loop
from handgrad.dojo import names as N
from handgrad.dojo import probes as P
from handgrad.dojo import runner as R
from handgrad.dojo.framework import Item, Probe
from handgrad.dojo.grading import SEED, assess, given_note, probes_of, verdict_words
from handgrad.dojo.items import get
from handgrad.dojo.judge import Row
from handgrad.dojo.report import Grade

PARAMS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
INPUTS = PARAMS + ("Xb", "Yb")
NB_RTOL = 1e-5  # a float32 value: within this of the larger of its and its upstream's largest entry (cmp)
NB_MATCH_RTOL = 2e-5  # equals a catalogue entry, float32 rounding allowed
TIME_LIMIT = 20.0
SKIP_EXPR = ("cmp", "print", "display", "plt", "show")  # calls in a cell that compute nothing graded
AUTOGRAD = ("backward", "retain_grad", "zero_", "requires_grad_")  # the lecture's own autograd lines


class NotebookError(ValueError):
    """The namespace cannot be graded (its parameters or batch are not there): one line."""


# ---------------------------------------------------------------------------- the notebook's tensors
def _tensors(ns: Mapping[str, object]) -> dict[str, Tensor]:
    return {k: v for k, v in ns.items() if isinstance(v, Tensor) and not k.startswith("_")}


def find_inputs(
    ns: Mapping[str, object], explicit: Mapping[str, str] | None
) -> tuple[dict[str, Tensor], dict]:
    """The notebook's C, W1, ..., Xb, Yb: by the lecture's name, a mapping, the same name in another case
    (xb, w1), or by shape among the rest (a batch is the (N, T) / (N,) integer pair whose N the forward
    values have)."""
    ts = _tensors(ns)
    wanted = {k: k for k in INPUTS}
    found, how = N.match(wanted, ts, explicit, gradients=False)
    found = {k: v for k, v in found.items() if v in ts}
    ints = {k: t for k, t in ts.items() if not t.is_floating_point() and k not in found.values()}
    if "Xb" not in found or "Yb" not in found:
        rows = {
            t.shape[0] for k, t in ts.items() if t.is_floating_point() and t.dim() >= 2 and k not in PARAMS
        }
        pairs = [
            (x, y)
            for x, tx in ints.items()
            for y, ty in ints.items()
            if tx.dim() == 2 and ty.dim() == 1 and tx.shape[0] == ty.shape[0]
        ]
        pairs = [pr for pr in pairs if ts[pr[0]].shape[0] in rows] or pairs
        pairs.sort(key=lambda pr: ts[pr[0]].shape[0])
        if pairs and "Xb" not in found and "Yb" not in found:
            found["Xb"], found["Yb"] = pairs[0]
            how["Xb"] = how["Yb"] = "shape"
    _by_shape(found, ts)
    missing = [k for k in INPUTS if k not in found]
    if missing:
        k = missing[0]
        raise NotebookError(
            f"{k} is missing: run the notebook's setup and forward cells first (or pass "
            f"names={{'{k}': 'your name'}})"
        )
    out = {k: ts[v].detach() for k, v in found.items()}
    for k in PARAMS:
        if not out[k].is_floating_point():
            raise NotebookError(
                f"{found[k]} is a {str(out[k].dtype)[6:]} tensor; the parameter {k} is floating point"
            )
    for k in ("Xb", "Yb"):
        if out[k].is_floating_point():
            raise NotebookError(
                f"{found[k]} is a {str(out[k].dtype)[6:]} tensor; the batch {k} holds integer indices"
            )
    return out, {k: found[k] for k in how if found.get(k) != k}


def _by_shape(found: dict[str, str], ts: dict[str, Tensor]) -> None:
    """A parameter under another name, found by the shape the others imply when one tensor has it."""
    shape = {k: tuple(ts[v].shape) for k, v in found.items()}
    V = shape.get("C", (None,))[0] or shape.get("b2", (None,))[0]
    H = shape.get("b1", (None,))[0] or (shape.get("W1", (None, None))[1])
    E = shape.get("C", (None, None))[1]
    TE = shape.get("W1", (None,))[0]
    want = {
        "C": (V, E),
        "W1": (TE, H),
        "b1": (H,),
        "W2": (H, V),
        "b2": (V,),
        "bngain": (1, H),
        "bnbias": (1, H),
    }
    for k, s in want.items():
        if k in found or None in s:
            continue
        cands = [
            n
            for n, t in ts.items()
            if tuple(t.shape) == s
            and t.is_floating_point()
            and n not in found.values()
            and not N.gradient_like(n)
        ]
        if len(cands) == 1:
            found[k] = cands[0]


def _point(inputs: dict[str, Tensor]) -> dict[str, object]:
    ps = {k: inputs[k].detach().cpu().double() for k in PARAMS}
    return P.point(ps, inputs["Xb"].detach().cpu(), inputs["Yb"].detach().cpu())


def size_notes(ns: Mapping[str, object], pt: dict[str, object]) -> list[str]:
    """A setup size the learner overwrote later (n reused as a loop variable): said in their terms."""
    what = {
        "n": "the batch has {v} rows (Xb.shape[0])",
        "batch_size": "the batch has {v} rows (Xb.shape[0])",
        "n_embd": "C has {v} columns",
        "n_hidden": "W1 has {v} columns",
        "block_size": "Xb has {v} columns",
        "vocab_size": "C has {v} rows",
    }
    out = []
    for k, words in what.items():
        v = ns.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v != pt[k]:
            out.append(
                f"{k} is {v} here, but {words.format(v=pt[k])}: a loop variable or a later cell reused "
                f"{k}? The grade uses {pt[k]}; lines that ran with {k} = {v} computed with it"
            )
    return out


CHECKED = ("hprebn", "logits", "loss")  # the notebook's own forward values, held against the recomputed


def forward_notes(ns: Mapping[str, object], pt: dict[str, object], item: Item) -> list[str]:
    """A forward value the notebook holds that is not the forward pass of its parameters and batch (a
    parameter changed after the forward cell ran)."""
    graph = G.LECTURE if item.key == "1" else G.TRAINING
    vals = G.forward(graph, {k: v for k, v in pt.items() if isinstance(v, Tensor)})
    out = []
    for k in CHECKED:
        v = ns.get(k)
        if isinstance(v, Tensor) and not (
            tuple(v.shape) == tuple(vals[k].shape)
            and bool(torch.allclose(v.detach().double().cpu(), vals[k], rtol=1e-4, atol=1e-5))
        ):
            out.append(
                f"your {k} is not the forward pass of your parameters and batch (one changed after the "
                "forward "
                "cell ran?): the grade uses them as they are now; run the forward cell again"
            )
            break
    return out


# ---------------------------------------------------------------------------- the learner's cells
def cells(ns: Mapping[str, object]) -> list[tuple[str, str]]:
    """(label, source) of every cell IPython ran, in order ("In [12]" is the 12th)."""
    ih = ns.get("_ih") if isinstance(ns.get("_ih"), list) else ns.get("In")
    if not isinstance(ih, list):
        return []
    return [(f"In [{i}]", src) for i, src in enumerate(ih) if isinstance(src, str) and src.strip()]


def _parse(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except SyntaxError:  # IPython syntax not transformed, or a cell that never ran
        return None


def _graded(s: ast.stmt) -> bool:
    """A statement worth running again: not a cmp/print call, not the notebook's autograd lines."""
    if isinstance(s, ast.Expr) and not R.writes_of(s):
        return False
    calls = {
        getattr(n.func, "attr", getattr(n.func, "id", "")) for n in ast.walk(s) if isinstance(n, ast.Call)
    }
    return not calls & set(AUTOGRAD)


def _loop_body(tree: ast.Module, vars_: set[str]) -> list[ast.stmt] | None:
    """Exercise 4: the statements of the training loop's body that compute the gradients (from the first
    that writes one to the last), wherever the loop sits (inside `with torch.no_grad():`, say)."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.While)):
            hits = [i for i, s in enumerate(node.body) if R.writes_of(s) & vars_]
            if hits and (best is None or len(hits) > best[0]):
                best = (len(hits), node.body[hits[0] : hits[-1] + 1])
    return best[1] if best else None


def region_of(item: Item, ns: Mapping[str, object], vars_: dict[str, str], filename_of) -> R.Parsed | None:
    """The learner's lines for this item, from the cells IPython kept: for each row the latest cell that
    writes it from this item's own upstream gradients (an exercise-2 cell's dlogits is not exercise 1's),
    those cells in order; exercise 4: the loop body of the cell that trains."""
    cs = [(label, src, _parse(src)) for label, src in cells(ns)]
    cs = [c for c in cs if c[2] is not None]
    if not cs:
        return None
    want = set(vars_.values())
    p = R.Parsed("<notebook>", "", {})
    if item.training:
        for label, src, tree in reversed(cs):
            body = _loop_body(tree, want)
            if body and len({w for s in body for w in R.writes_of(s)} & want) >= len(want) // 2:
                fn = filename_of(label)
                p.lines[fn] = src.splitlines()
                p.region = [R.make_stmt(s, fn, p.lines[fn], label) for s in body if _graded(s)]
                return p
        return None
    graph = item.graph
    lecture = {f"d{g}" for g in G.LECTURE.grads} | {f"d{g}" for g in G.TRAINING.grads}
    chosen: dict[str, int] = {}
    for k, var in vars_.items():
        allowed = {vars_.get(c, f"d{c}") for c in graph.consumers(k)} | {var}
        if graph.seed != "loss":
            allowed.add(f"d{graph.seed}")
        for i in range(len(cs) - 1, -1, -1):
            stmts = [s for s in cs[i][2].body if var in R.writes_of(s) and not R.writes_of(s) & set(INPUTS)]
            if not stmts:
                continue
            reads = set().union(*(R.reads_of(s) for s in stmts)) & (lecture | set(vars_.values()))
            if reads <= allowed and (reads & (allowed - {var}) or not (allowed - {var} - {f"d{graph.seed}"})):
                chosen[k] = i
                break
    if not chosen:
        return None
    for i in sorted(set(chosen.values())):
        label, src, tree = cs[i]
        fn = filename_of(label)
        p.lines[fn] = src.splitlines()
        body = tree.body
        first = next((j for j, s in enumerate(body) if R.writes_of(s) & want), 0)
        p.region += [
            R.make_stmt(s, fn, p.lines[fn], label)
            for s in body[first:]
            if _graded(s) and not R.writes_of(s) & set(INPUTS)
        ]
    return p


# ---------------------------------------------------------------------------- running here
class Here:
    """Runs the learner's lines in this process (the notebook's own), on copies of the probe values."""

    def __init__(
        self,
        p: R.Parsed,
        base: dict,
        vars_: dict[str, str],
        probes: list[Probe],
        foreign: dict[str, object],
        time_limit: float,
    ):
        self.p, self.base, self.vars_, self.time_limit = p, base, vars_, time_limit
        self.probes = {q.name: q for q in probes}
        self.foreign = foreign  # names the lines read that another cell made: {name: value}
        own = next(q for q in probes if q.own)
        self.alias = {
            k: a for k, v in foreign.items() if isinstance(v, Tensor) and (a := _same(v, own.inputs))
        }

    def values(self, q: Probe) -> dict:
        vals = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in q.inputs.items()}
        for k, v in self.foreign.items():
            if k in self.alias:  # the learner's own name for a probe value (xb for Xb, w1 for W1, ...)
                vals[k] = q.inputs[self.alias[k]].clone()
            elif isinstance(v, Tensor):
                if q.own:
                    vals[k] = v.clone()
            elif isinstance(v, int) and not isinstance(v, bool):
                size = next((s for s in R.SIZES if self.probes_own_size(s) == v), None)
                vals[k] = q.inputs[size] if size and size in q.inputs else v
            else:
                vals[k] = v
        return vals

    def probes_own_size(self, s: str) -> object:
        own = next((q for q in self.probes.values() if q.own), None)
        return own.inputs.get(s) if own else None

    def run(self, probes: list[Probe]) -> tuple[dict[str, Tensor], dict]:
        out: dict[str, Tensor] = {}
        meta: dict = {"probes": {}, "notes": [], "events": {}}
        for q in probes:
            with R.time_limit(self.time_limit), redirect_stdout(io.StringIO()):
                r = R.run_region(
                    self.p, self.base, self.values(q), q.feeds if q.feed else {}, self.vars_, q.feed, q.dtype
                )
            out.update({f"{q.name}|{k}": t for k, t in r.out.items()})
            meta["probes"][q.name] = r.meta
            meta["events"][q.name] = r.events
            meta["notes"] += [nt for nt in r.notes if nt not in meta["notes"]]
        return out, meta

    def __call__(
        self,
        key: str,
        index: int,
        sources: list[str],
        probes: list[Probe],
        full: bool = False,
        owners: list[str] | None = None,
    ) -> dict[str, list]:
        res = {}
        for q in probes:
            try:
                with R.time_limit(self.time_limit), redirect_stdout(io.StringIO()):
                    res[q.name] = R.edit_values(
                        self.p,
                        self.base,
                        self.values(q),
                        q.feeds,
                        self.vars_,
                        key,
                        index,
                        sources,
                        q.dtype,
                        SEED,
                        full,
                    )
            except R.OutOfTime:
                res[q.name] = []
        return res


def _same(v: Tensor, inputs: dict[str, object]) -> str:
    """The probe value the notebook's tensor `v` is (equal at the notebook's own point), or ''."""
    for k, t in inputs.items():
        if (
            isinstance(t, Tensor)
            and tuple(t.shape) == tuple(v.shape)
            and t.dtype.is_floating_point == v.dtype.is_floating_point
        ):
            a = v.detach().cpu()
            if (a.double() if a.is_floating_point() else a).equal(t) or (
                a.is_floating_point() and bool(torch.allclose(a.double(), t, rtol=1e-5, atol=1e-6))
            ):
                return k
    return ""


def _base(ns: Mapping[str, object], p: R.Parsed, probe: Probe, vars_: dict[str, str]) -> tuple[dict, dict]:
    """The namespace the lines run in: the notebook's own (its imports, functions, sizes), and the names
    the lines read that no probe gives (another cell's tensors and numbers), to be copied per run."""
    free: set[str] = set()
    written: set[str] = set()
    for s in p.region:
        free |= R.reads_of(s.node) - written
        written |= s.writes
    rows = set(vars_.values())
    foreign = {
        k: ns[k]
        for k in free
        if k in ns
        and k not in probe.inputs
        and k not in rows
        and (isinstance(ns[k], Tensor) or (isinstance(ns[k], int) and not isinstance(ns[k], bool)))
    }
    base = {k: v for k, v in ns.items() if not isinstance(v, Tensor)}
    return base, foreign


# ---------------------------------------------------------------------------- the grade
def grade(
    exercise: int | str,
    namespace: Mapping[str, object],
    *,
    strict: bool = False,
    names: Mapping[str, str] | None = None,
    time_limit: float = TIME_LIMIT,
) -> Grade:
    """Grade what a notebook holds (`globals()`); the report renders as an HTML table when it is a cell's
    value in Jupyter, and as text with print()."""
    start = time.perf_counter()
    item = get(str(exercise))
    g = Grade("notebook", item.key, item.title, strict=strict)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if item.mode == "call":
            _grade_calls(item, namespace, g, strict, time_limit)
        elif item.kind != "exercise":  # a region challenge's probes are its own, not a notebook's point
            raise NotebookError(
                f"{item.kind} {item.key} is graded from its file: `handgrad dojo start {item.key}`, fill "
                f"it in, then `handgrad dojo grade {item.slug}.py`"
            )
        else:
            _grade_region(item, namespace, g, strict, dict(names or {}), time_limit)
    except NotebookError as e:
        g.problem = str(e)
    except R.OutOfTime:
        g.problem = f"your lines were still running after {time_limit:g} s (an infinite loop?)"
    except Exception as e:  # the grader's own failure on something unforeseen: one line, never a traceback
        g.problem = f"the grader failed on this notebook ({type(e).__name__}: {e}); please report it"
    finally:
        torch.set_num_threads(threads)
    g.seconds = time.perf_counter() - start
    return g


def _grade_region(
    item: Item, ns: Mapping[str, object], g: Grade, strict: bool, explicit: dict[str, str], time_limit: float
) -> None:
    inputs, taken = find_inputs(ns, explicit)
    wanted = {r.key: r.var for r in item.rows}
    found, how = N.match(
        wanted, list(_tensors(ns)) + [w for _, src in cells(ns) for w in _written(src)], explicit
    )
    vars_ = {k: found.get(k, v) for k, v in wanted.items()}
    stepped = False
    if item.training:
        inputs, where, stepped = _last_step(ns, inputs, vars_)
        g.notes.append(where)
    pt = _point(inputs)
    seed = _seed(item, ns, pt)
    probes = item.probes(own=pt, seed_grad=seed) if item.key == "3" else item.probes(own=pt)
    own = [q for q in probes if q.own and q.verdict]
    for k, name in _by_value(item, ns, wanted, vars_, found, own[0]).items():
        vars_[k], found[k], how[k] = name, name, "value"
    g.probes = verdict_words(probes)
    g.notes += size_notes(ns, pt) + forward_notes(ns, pt, item)
    said = N.said(wanted, found, how)
    if taken:
        said = "; ".join(
            x for x in (said, "inputs: took " + ", ".join(f"{v} for {k}" for k, v in taken.items())) if x
        )
    if said:
        g.notes.insert(0, said)
    mine = _mine(ns, vars_, item)
    p = region_of(item, ns, vars_, lambda label: f"<{label}>")
    if p is None or not p.region:
        g.notes.append(
            "no cell of this exercise found in the sources IPython keeps (In / _ih): graded on your "
            "values alone (no random upstream, no edit search)"
        )
        g.rows = _values_only(item, probes[0], mine, vars_, strict)
    else:
        base, foreign = _base(ns, p, own[0], vars_)
        here = Here(p, base, vars_, probes, foreign, time_limit)
        try:
            outs, meta = here.run(probes)
        except R.OutOfTime:
            raise NotebookError(
                f"your lines were still running after {time_limit:g} s (an infinite loop?)"
            ) from None
        skip = _skips(item, probes, meta, foreign)
        g.rows, notes = assess(item, probes, outs, meta, vars_, p, here, strict, skip)
        # a notebook's other lines (cmp, prints, plots) fail on the grader's values: not the learner's news
        g.notes += [nt for nt in notes if not nt.endswith("(a line that writes no graded row)")]
        for r in g.rows:  # right at the notebook's own batch, as cmp sees it: counted right, the number said
            if r.status == "wrong" and r.key == "hard-coded":
                r.status, r.note, r.kind, r.key = "ok", r.diagnosis, "", ""
        _yours(item, g.rows, probes, mine, exact=not stepped)
        if item.training:
            g.rows += _train_here(p, base, vars_, time_limit)
    if not any(r.kind == K.ALIAS for r in g.rows):
        g.notes += _shared(mine, vars_, probes[0])


def _by_value(
    item: Item,
    ns: Mapping[str, object],
    wanted: dict[str, str],
    vars_: dict[str, str],
    found: dict[str, str],
    own: Probe,
) -> dict[str, str]:
    """Rows the notebook holds under a name nothing like the lecture's: the one tensor whose value is the
    right gradient at the notebook's own point (a wrong value under an unknown name cannot be told)."""
    out: dict[str, str] = {}
    taken = set(found.values()) | set(own.inputs) | set(wanted.values())
    pool = {k: v for k, v in _tensors(ns).items() if v.is_floating_point() and k not in taken}
    for key in wanted:
        ref = own.refs.get(key)
        if vars_.get(key) in ns or not isinstance(ref, Tensor):
            continue
        up = J.upstream_scale(item, key, own)
        hits = [
            k
            for k, v in pool.items()
            if k not in out.values() and v.numel() == ref.numel() and _close32(v.detach().cpu(), ref, up)
        ]
        if len(hits) == 1:
            out[key] = hits[0]
    return out


def _written(src: str) -> list[str]:
    tree = _parse(src)
    return [] if tree is None else sorted({w for s in tree.body for w in R.writes_of(s)})


def _seed(item: Item, ns: Mapping[str, object], pt: dict) -> Tensor | None:
    """Exercise 3 starts from dhpreact: the notebook's own (from exercise 1), else autograd's."""
    if item.key != "3":
        return None
    want = G.forward(G.CROSS_ENTROPY, {k: v for k, v in pt.items() if isinstance(v, Tensor)})["hpreact"]
    mine = ns.get("dhpreact")
    if isinstance(mine, Tensor) and tuple(mine.shape) == tuple(want.shape) and mine.is_floating_point():
        return mine.detach().cpu().double()
    return None


def _mine(ns: Mapping[str, object], vars_: dict[str, str], item: Item) -> dict[str, object]:
    """The learner's own value of each row (as the notebook holds it), or why there is none."""
    out: dict[str, object] = {}
    for spec in item.rows:
        v = ns.get(vars_.get(spec.key, spec.var))
        out[spec.key] = v.detach().cpu() if isinstance(v, Tensor) else v
    return out


def _skips(item: Item, probes: list[Probe], meta: dict, foreign: dict) -> set[tuple[str, str]]:
    """(probe, row) pairs that do not count: a line that reads another cell's tensor can only be run at
    the notebook's own point."""
    out = set()
    for q in probes:
        if q.own:
            continue
        for k, m in meta["probes"].get(q.name, {}).items():
            if m.get("status") == "error" and m.get("type") == "NameError" and m.get("name") in foreign:
                out.add((q.name, k))
    return out


def _yours(
    item: Item, rows: list[Row], probes: list[Probe], mine: dict[str, object], exact: bool = True
) -> None:
    """The exact and chain columns from the notebook's own values: float32 bit for bit with autograd at
    its point; right, right given its own upstream values, or neither."""
    own = next((q for q in probes if q.own and q.verdict and not q.random), None)
    f32 = next((q for q in probes if q.exact), None)
    if own is None or item.graph is None:
        return
    vals, feeds, local = own_local(item, own, mine)
    for spec, row in zip(item.rows, rows):
        a = vals.get(spec.key)
        if a is None or row.status in ("missing", "error", "invalid"):
            continue
        if f32 is not None and spec.key in f32.refs:
            r = f32.refs[spec.key]
            row.exact = (
                bool(a.dtype == r.dtype and tuple(a.shape) == tuple(r.shape) and torch.equal(a, r))
                if exact
                else None
            )  # at a point put back from the last update: not bit for bit
        truth, given = own.refs[spec.key], local.total(spec.key)
        up = J.upstream_scale(item, spec.key, own)
        mine_up = max(
            (
                float(vals[c].abs().max())
                for c in item.graph.consumers(spec.key)
                if c in vals and vals[c].numel()
            ),
            default=0.0,
        )  # the learner's own upstream's size
        if _close32(a, truth, up):
            row.chain = "yes"
        elif given is not None and _close32(a, given, max(up, mine_up)):
            row.chain = "given"
            ups = [
                c
                for c in item.graph.consumers(spec.key)
                if c in vals
                and c in own.refs
                and not _close32(vals[c], own.refs[c], J.upstream_scale(item, c, own))
            ]
            if row.ok and ups:
                row.note = "; ".join(
                    x for x in (row.note, given_note(item, rows, spec.key, ups, "yours")) if x
                )
        else:
            row.chain = "no"
            if row.ok:
                row.note = "; ".join(
                    x
                    for x in (
                        row.note,
                        "your notebook's value differs from what your line gives "
                        "here: was it changed after its line, or computed from other "
                        "values?",
                    )
                    if x
                )


def own_local(item: Item, own: Probe, mine: dict[str, object]) -> tuple[dict[str, Tensor], dict, G.Local]:
    """The notebook's own gradients, the upstream values they make (the right ones where a gradient is
    missing or of another size), and the right local answer of each row given them."""
    vals = {k: v for k, v in mine.items() if isinstance(v, Tensor) and v.is_floating_point()}
    feeds = {
        k: (
            vals[k].double().reshape(own.refs[k].shape)
            if k in vals and vals[k].numel() == own.refs[k].numel()
            else own.refs[k]
        )
        for k in item.graph.grads
    }
    feeds[item.graph.seed] = own.feeds.get(item.graph.seed, torch.ones((), dtype=torch.float64))
    return vals, feeds, G.local_vjps(item.graph, own.inputs, feeds)


def _close32(a: Tensor, ref: Tensor, upstream: float = 0.0) -> bool:
    if a.numel() != ref.numel():
        return False
    if tuple(a.shape) != tuple(ref.shape) and J.squeezed(tuple(a.shape)) != J.squeezed(tuple(ref.shape)):
        return False
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, upstream)
    return bool(
        (
            (a.reshape(ref.shape).double() - ref).abs() <= NB_RTOL * ref.abs() + max(NB_RTOL * scale, 1e-12)
        ).all()
    )


def _shared(mine: dict[str, object], vars_: dict[str, str], own: Probe) -> list[str]:
    """Two of the notebook's gradients that are one tensor (an assignment without .clone()) although their
    right values differ (a view such as demb = dembcat.view(...) has the same numbers: not said)."""
    seen: dict[int, str] = {}
    out = []
    for k, v in mine.items():
        if not (isinstance(v, Tensor) and v.numel()):
            continue
        ptr = R.storage(v)
        other = seen.get(ptr)
        if other is None:
            seen[ptr] = k
            continue
        a, b = own.refs.get(other), own.refs.get(k)
        if (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.numel() == b.numel()
            and bool(torch.allclose(a.reshape(-1), b.reshape(-1)))
        ):
            continue
        out.append(
            f"{vars_.get(other, 'd' + other)} and {vars_.get(k, 'd' + k)} are one tensor in your "
            "notebook (an "
            "assignment without .clone()): a change through one changed the other; write .clone() where one "
            "gradient starts from another"
        )
    return out


def _values_only(
    item: Item, own: Probe, mine: dict[str, object], vars_: dict[str, str], strict: bool
) -> list[Row]:
    """Without cell sources: each value against the local answer given the notebook's own upstream values
    (float32 tolerance), and named from the catalogue."""
    vals, feeds, loc = own_local(item, own, mine)
    probe = Probe(
        "yours",
        "your notebook's values",
        dict(own.inputs),
        {k: (loc.total(k) if loc.total(k) is not None else own.refs[k]) for k in item.graph.grads},
        feeds,
        loc,
        own=True,
    )
    rows = []
    for spec in item.rows:
        v = mine.get(spec.key)
        ref = probe.refs[spec.key]
        row = Row(
            spec.name,
            tuple(ref.shape),
            "missing",
            yours=vars_.get(spec.key, spec.var) if vars_.get(spec.key, spec.var) != spec.var else "",
        )
        rows.append(row)
        if v is None:
            row.diagnosis = (
                f"{vars_.get(spec.key, spec.var)} is not in your notebook (nor a tensor named like it)"
            )
            continue
        d = R.describe(v)
        if d["status"] != "value":
            row.status, row.diagnosis = "invalid", d.get("msg", "")
            continue
        up = J.upstream_scale(item, spec.key, probe)
        if _close32(v, ref, up):
            row.status = "ok"
            if tuple(v.shape) != tuple(ref.shape):
                got, want = J.shape_words(tuple(v.shape)), J.shape_words(tuple(ref.shape))
                words = f"shape {got} where {spec.key} is {want}"
                if strict or not J.broadcasts_alike(item, spec.key, probe, tuple(v.shape)):
                    row.status, row.kind, row.diagnosis = "wrong", K.SHAPE, words
                else:
                    row.mark, row.note = "shape", words + ": right values, broadcasts the same way"
            row.chain = "yes" if _close32(v, own.refs[spec.key], up) else "given"
            continue
        row.status = "wrong"
        a = v.double()
        pend = J.Pending(spec, row, [(probe, a)], [])
        row.kind, row.key, row.diagnosis = J.diagnose(item, pend, NB_MATCH_RTOL)
        row.chain = "no"
    shared = _shared(mine, vars_, own)
    if shared:  # one tensor under two names: its values cannot be judged apart; the alias is the mistake
        for spec, row in zip(item.rows, rows):
            var = vars_.get(spec.key, spec.var)
            if any(f"{var} and" in w or f"and {var} are" in w for w in shared):
                row.status, row.kind, row.key = "wrong", K.ALIAS, "alias"
                row.diagnosis = next(w for w in shared if var in w)
            elif not row.ok:
                row.diagnosis += (
                    "; your values went through the alias named in the other rows: fix that first"
                )
    return rows


# ---------------------------------------------------------------------------- exercise 4 in place
def _last_step(
    ns: Mapping[str, object], inputs: dict[str, Tensor], vars_: dict[str, str]
) -> tuple[dict[str, Tensor], str, bool]:
    """After the loop the parameters are one update past the gradients the notebook holds: put the update
    back (p + lr * grad), where that gives the forward values the notebook holds."""
    grads = {k: ns.get(vars_.get(k, f"d{k}")) for k in PARAMS}
    fwd = {k: ns[k].detach().double() for k in ("logits", "hpreact", "h") if isinstance(ns.get(k), Tensor)}
    lrs = [v for v in (ns.get("lr"), 0.1, 0.01) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    hyps = [("as they are", 0.0)] + [
        (f"before the last update (lr {lr:g})", float(lr)) for lr in dict.fromkeys(lrs)
    ]
    ok = all(isinstance(grads[k], Tensor) and grads[k].numel() == inputs[k].numel() for k in PARAMS)
    best, best_err = hyps[0], float("inf")
    for words, lr in hyps:
        if lr and not ok:
            continue
        cand = (
            {
                **inputs,
                **{
                    k: (inputs[k].double() + lr * grads[k].detach().double().reshape(inputs[k].shape))
                    for k in PARAMS
                },
            }
            if lr
            else inputs
        )
        vals = G.forward(
            G.TRAINING, {k: (v.double() if v.is_floating_point() else v) for k, v in cand.items()}
        )
        err = max(
            (
                float((vals[k] - t).abs().max()) / max(float(t.abs().max()), 1e-12)
                for k, t in fwd.items()
                if tuple(t.shape) == tuple(vals[k].shape)
            ),
            default=float("inf"),
        )
        if err < best_err:
            best, best_err = (words, lr), err
    words, lr = best
    if best_err == float("inf"):
        words, lr = hyps[1] if ok and len(hyps) > 1 else hyps[0]
    out = (
        {
            **inputs,
            **{
                k: (inputs[k].double() + lr * grads[k].detach().double().reshape(inputs[k].shape))
                for k in PARAMS
            },
        }
        if lr
        else inputs
    )
    return (
        out,
        f"exercise 4: graded at the parameters of your loop's last step ({words}) and its last batch",
        bool(lr),
    )


def _train_here(p: R.Parsed, base: dict, vars_: dict[str, str], time_limit: float) -> list[Row]:
    try:
        with R.time_limit(time_limit), redirect_stdout(io.StringIO()):
            out, meta = loop.run_training(p, base, loop.inputs(), vars_, loop.LR, R.run_region)
        mine, stop = out["losses"], meta["stop"]
    except R.OutOfTime:
        mine, stop = torch.zeros(0, dtype=torch.float64), f"still running after {time_limit:g} s"
    return loop.judge_training(mine, loop.reference(), stop)


# ---------------------------------------------------------------------------- challenges in a notebook
def _grade_calls(item: Item, ns: Mapping[str, object], g: Grade, strict: bool, time_limit: float) -> None:
    """A challenge in a notebook: its functions (or class) as the notebook defines them, called on the
    probes here; the edit search reads the cells that define them."""
    probes = list(probes_of(item.key))
    g.probes = verdict_words(probes)
    p, tops = _defs(item, ns)
    base = {k: v for k, v in ns.items()}
    base.setdefault("__name__", "__dojo__")
    outs: dict[str, Tensor] = {}
    meta: dict = {"probes": {}, "notes": []}
    for q in probes:
        with R.time_limit(time_limit), redirect_stdout(io.StringIO()), R.default_dtype(q.dtype):
            rec = R.run_call(p, dict(base), item.driver, q.tensors(), q.name)
        outs.update({f"{q.name}|{k}": t for k, t in rec.out.items()})
        meta["probes"][q.name] = rec.meta

    def run(
        key: str,
        index: int,
        sources: list[str],
        qs: list[Probe],
        full: bool = False,
        owners: list[str] | None = None,
    ) -> dict[str, list]:
        res = {}
        for q in qs:
            with R.time_limit(time_limit), redirect_stdout(io.StringIO()), R.default_dtype(q.dtype):
                res[q.name] = R.call_edit_values(
                    p, dict(base), item.driver, q.tensors(), q.name, key, index, sources, SEED, full, owners
                )
        return res

    vars_ = {r.key: r.var for r in item.rows}
    g.rows, notes = assess(item, probes, outs, meta, vars_, p, run, strict)
    g.notes += notes
    del tops


def _defs(item: Item, ns: Mapping[str, object]) -> tuple[R.Parsed, list[ast.stmt]]:
    """The latest definition of each function or class in the cells, as one module for the edit search."""
    latest: dict[str, tuple[str, str, ast.stmt]] = {}
    for label, src in cells(ns):
        tree = _parse(src)
        for s in tree.body if tree else []:
            if isinstance(s, (ast.FunctionDef, ast.ClassDef)):
                latest[s.name] = (label, src, s)
    p = R.Parsed("<notebook>", "", {})
    p.tree = ast.Module([], [])
    for label, src, s in latest.values():
        p.lines[f"<{label}>"] = src.splitlines()
        p.tree.body.append(s)
        p.tops.append((src, label))
    return p, p.tree.body
