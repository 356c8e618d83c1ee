"""Grading, the same for every item and for files and notebooks: the learner's code runs on the probes
(a child process for a file: child.py; the notebook's own process for a notebook), the rows are judged
(judge.py), what changed in place is said, each wrong row is diagnosed (the catalogue, then the edit
search on the learner's own line), and the chain column says which right lines sit under a wrong
upstream ("right given your dprobs; the mistake is above, at dprobs"). Exercise 4 is also trained with
the learner's backward against autograd (loop.py).
"""

from __future__ import annotations

import ast
import math
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from handgrad.dojo import catalogue as K
from handgrad.dojo import edits as ED
from handgrad.dojo import graph as G
from handgrad.dojo import judge as J
from handgrad.dojo import names as N
from handgrad.dojo import runner as R
from handgrad.dojo import sandbox as SB
from handgrad.dojo import scan as S
from handgrad.dojo import submission as SUB
from handgrad.dojo import trust as T
from handgrad.dojo.framework import Item, Probe, blank_lines
from handgrad.dojo.judge import Row
from handgrad.dojo.registry import get
from handgrad.dojo.report import Grade, safe_text

TIME_LIMIT = 20.0  # seconds for the learner's code per request (a complete file takes well under 1 s)
SEED = 20250901  # the random projections candidate values are compared by
FP_SLACK = 6.0  # a candidate fits when its projections are within this many tolerances (times sqrt(size))


@cache
def probes_of(key: str) -> tuple[Probe, ...]:
    """An item's probes, computed once per process (they are deterministic; nothing changes them)."""
    return tuple(get(key).probes())


def verdict_words(probes: tuple[Probe, ...] | list[Probe]) -> list[str]:
    return [p.about for p in probes if p.verdict]


# ---------------------------------------------------------------------------- the learner's names
def region_vars(item: Item, parsed: R.Parsed, explicit: dict[str, str] | None) -> tuple[dict[str, str], str]:
    """{row key: the learner's variable} for a region item, and the note that says which names were taken."""
    wanted = {r.key: r.var for r in item.rows if r.tensor}
    if item.mode != "region":
        return wanted, ""
    written = [w for s in parsed.region for w in sorted(s.writes)]
    found, how = N.match(wanted, written, explicit)
    return {k: found.get(k, v) for k, v in wanted.items()}, N.said(wanted, found, how)


# ---------------------------------------------------------------------------- what changed in place
def _row_of_var(item: Item, rows: list[Row], vars_: dict[str, str], var: str) -> Row | None:
    for spec, row in zip(item.rows, rows):
        if vars_.get(spec.key, spec.var) == var:
            return row
    return None


def apply_events(item: Item, rows: list[Row], vars_: dict[str, str], events: list[dict]) -> list[str]:
    """Aliases and in-place changes, said once each: a recorded gradient changed later through another
    name makes the row whose line made the alias wrong (add .clone()), never the right line it changed;
    a forward value or a size changed in place is restored for the lines below, and said."""
    notes, seen = [], set()
    by_key = dict(zip((s.key for s in item.rows), rows))
    for ev in events:
        sig = (ev["kind"], ev.get("key", ev.get("name")), ev["line"])
        if sig in seen:
            continue
        seen.add(sig)
        b = ev.get("bound")
        if ev["kind"] == "alias":
            var = ev["var"]
            victim = by_key.get(ev["key"])
            if b:
                fix = f"`{b['name']} = {b['other']}.clone()`"
                words = (
                    f"{b['where']} `{b['text']}` makes {b['name']} the same tensor as {b['other']} (no "
                    "copy), so "
                    f"{ev['where']} `{ev['text']}` changes {var} too: your {var} is no longer what its "
                    "own line "
                    f"computed; write {fix}"
                )
                culprit = _row_of_var(item, rows, vars_, b["name"])
            else:
                via = ", ".join(ev.get("via") or []) or "another name"
                words = (
                    f"{ev['where']} `{ev['text']}` changes {var} in place through {via}, after {var}'s own "
                    "last line: two names share one tensor; add .clone() where one gradient starts from "
                    "another"
                )
                culprit = None
            target = culprit if culprit is not None and culprit is not victim else victim
            if target is not None:
                target.status, target.kind, target.key, target.diagnosis = "wrong", K.ALIAS, "alias", words
                if b:  # the line to fix is the one that made the alias
                    target.line, target.where = b["line"], b["where"]
            if victim is not None and victim is not target and victim.ok:
                victim.note = "; ".join(
                    x
                    for x in (
                        victim.note,
                        f"changed later through {b['name'] if b else 'an alias'}"
                        f" (see {target.name if target else 'the notes'})",
                    )
                    if x
                )
            if target is None:
                notes.append(words)
        elif ev["kind"] == "forward":
            what = (
                f"{ev['where']} `{ev['text']}` changes the forward value {ev['name']} in place"
                if ev["inplace"]
                else f"{ev['where']} `{ev['text']}` binds the forward name {ev['name']} to another value"
            )
            if b:
                what += (
                    f" (through {b['name']}, which {b['where']} `{b['text']}` made the same tensor: write "
                    f"`{b['name']} = {b['other']}.clone()`)"
                )
            notes.append(
                what + f"; the grader restored {ev['name']} for the lines below, but your own run reads "
                "the changed value"
            )
            row = _row_of_var(item, rows, vars_, (ev.get("via") or [""])[0]) or (
                _row_of_var(item, rows, vars_, b["name"]) if b else None
            )
            if row is not None and row.ok:
                row.note = "; ".join(
                    x for x in (row.note, f"changes {ev['name']} in place (see the notes)") if x
                )
        elif ev["kind"] == "setup":
            notes.append(
                f"{ev['name']} is {ev['value']} after {ev['where']} `{ev['text']}`, but the setup's "
                f"{ev['name']} is {ev['want']} (a loop variable or a later line reused {ev['name']}?): "
                f"the grader kept {ev['want']} for the lines below"
            )
    return notes


# ---------------------------------------------------------------------------- the chain column
def chain_column(item: Item, rows: list[Row], probes: list[Probe], outs: dict[str, Tensor]) -> None:
    """yes: the learner's own chain gives the right value; given: it gives the right local answer of the
    learner's own (wrong) upstream values; no: neither."""
    ch = next((p for p in probes if not p.feed), None)
    if ch is None or item.graph is None:
        return
    graph = item.graph
    own: dict[str, Tensor] = {}
    for g in graph.grads:
        a = outs.get(f"{ch.name}|{g}")
        ref = ch.refs[g]
        if a is not None and a.numel() == ref.numel():
            own[g] = a.reshape(ref.shape).to(ref.dtype)
    local = None
    by_key = dict(zip((s.key for s in item.rows), rows))
    for spec, row in zip(item.rows, rows):
        g = spec.key
        a = outs.get(f"{ch.name}|{g}")
        if a is None or row.status in ("missing", "error", "invalid"):
            row.chain = None
            continue
        if J.compare(item, g, ch, a) != "fail":
            row.chain = "yes"
            continue
        if local is None:
            feeds = {k: own.get(k, ch.refs[k]) for k in graph.grads}
            feeds[graph.seed] = ch.feeds.get(graph.seed, torch.ones((), dtype=torch.float64))
            local = G.local_vjps(graph, ch.inputs, feeds)
        given = local.total(g)
        mine_up = max(
            (float(own[c].abs().max()) for c in graph.consumers(g) if c in own and own[c].numel()),
            default=0.0,
        )  # the learner's own upstream's size
        tol = (
            J.tolerance(given, a, max(mine_up, J.upstream_scale(item, g, ch))) if given is not None else None
        )
        if (
            given is not None
            and a.numel() == given.numel()
            and tol.holds(a.reshape(given.shape).to(given.dtype), given)
        ):
            row.chain = "given"
            ups = [
                u
                for u in graph.consumers(g)
                if u in by_key and own.get(u) is not None and J.compare(item, u, ch, own[u]) == "fail"
            ]
            if row.ok and ups:
                row.note = "; ".join(x for x in (row.note, given_note(item, rows, g, ups, "chain")) if x)
        else:
            row.chain = "no"


def given_note(item: Item, rows: list[Row], g: str, ups: list[str], prefix: str) -> str:
    """ "right given your dprobs; the mistake is above, at dprobs": the wrong upstream values a right line
    read, and the nearest wrong row above it."""
    words = f"{prefix}: right given your {', '.join('d' + u for u in ups)}"
    above = upstream(item.graph, g)
    origin = next((r for s, r in reversed(list(zip(item.rows, rows))) if not r.ok and s.key in above), None)
    return words + (f"; the mistake is above, at {origin.name}" if origin is not None else "")


def upstream(graph: G.Graph, g: str) -> set[str]:
    """Every tensor whose gradient d{g} is made from, directly or not (its consumers, theirs, ...)."""
    out, todo = set(), [g]
    while todo:
        for c in graph.consumers(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


# ---------------------------------------------------------------------------- the edit search
# (row key, statement index, candidate sources, probes, full) -> {probe: fingerprints, or the values}
Edits = Callable[..., dict[str, list]]
FULL = 8  # the best-ranked candidates whose fingerprints fit, checked value by value on every probe


def _fits(fp: dict, p: Probe, key: str, item: Item, cache: dict) -> bool:
    ref = p.refs[key]
    if fp.get("status") != "value" or not fp.get("finite") or tuple(fp.get("shape", ())) != tuple(ref.shape):
        return False
    if (p.name, key) not in cache:
        cache[(p.name, key)] = R.fingerprint(ref, SEED)["fp"]
    tol = J.tolerance(ref, ref, J.upstream_scale(item, key, p))
    bound = FP_SLACK * math.sqrt(max(ref.numel(), 1)) * (tol.atol + tol.rtol * float(ref.abs().max()))
    return all(abs(a - b) <= bound for a, b in zip(fp["fp"], cache[(p.name, key)]))


def _scope(parsed: R.Parsed, item: Item, vars_: dict[str, str], p: Probe, index: int) -> ED.Scope:
    """The names in scope at region statement `index`: the probe's values and the rows written above."""
    tensors: dict[str, tuple[int, ...] | None] = {
        k: tuple(v.shape) for k, v in p.inputs.items() if isinstance(v, Tensor) and v.is_floating_point()
    }
    written = {w for s in parsed.region[:index] for w in s.writes}
    for spec in item.rows:
        var = vars_.get(spec.key, spec.var)
        if var in written and isinstance(p.refs.get(spec.key), Tensor):
            tensors[var] = tuple(p.refs[spec.key].shape)
    sizes = {
        k: v for k, v in p.inputs.items() if isinstance(v, int) and not isinstance(v, bool) and k in R.SIZES
    }
    return ED.Scope(tensors, sizes)


def _call_scope(top: ast.AST) -> ED.Scope:
    """The names of a def or class (their shapes unknown: the driver hands them over)."""
    skip = {
        "torch",
        "F",
        "self",
        "range",
        "len",
        "min",
        "max",
        "sum",
        "zip",
        "enumerate",
        "list",
        "tuple",
        "float",
        "int",
        "bool",
        "print",
        "isinstance",
        "abs",
        "reversed",
        "super",
        "True",
        "False",
        "None",
    }
    names = {n.id for n in ast.walk(top) if isinstance(n, ast.Name) and n.id not in skip}
    names |= {
        a.arg for n in ast.walk(top) if isinstance(n, ast.FunctionDef) for a in n.args.args if a.arg != "self"
    }
    funcs = {n.name for n in ast.walk(top) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    sizes = {"n": 0} if "n" in names else {}
    return ED.Scope({k: None for k in names - funcs - set(sizes)}, sizes)


MAX_EDITS = {"region": 600, "call": 250}  # candidates tried per row, best-ranked first (a call runs a driver)
CHUNK = 60  # tried at a time: the search stops at the first chunk that holds a fix


def candidates(
    item: Item, parsed: R.Parsed, key: str, var: str, vars_: dict[str, str], p: Probe
) -> list[ED.Edit]:
    """The edits of the statements behind one row, best-ranked first. Region items: the row's statements
    and the helpers they read; call items: the statements of the function (or method) that compute the
    row's variable, the function being what runs again."""
    out: list[ED.Edit] = []
    if item.mode == "region":
        nodes = [s.node for s in parsed.region]
        known = set(vars_.values()) | set(p.inputs)
        idx = sorted(ED.depends(nodes, var, known), reverse=True)
        helpers = {w for i in idx for w in parsed.region[i].writes}
        for i in idx:
            st = parsed.region[i]
            label = st.where.rsplit("line", 1)[0]
            out += ED.statement_edits(
                st.node,
                {var} | helpers,
                _scope(parsed, item, vars_, p, i),
                parsed.lines.get(st.filename, []),
                i,
                lambda line, label=label: f"{label}line {line}",
            )
    else:
        for i, top in enumerate(parsed.tree.body):
            units = (
                [(top, "")]
                if isinstance(top, ast.FunctionDef)
                else [(f, top.name) for f in top.body if isinstance(f, ast.FunctionDef)]
                if isinstance(top, ast.ClassDef)
                else []
            )
            text, label = parsed.tops[i] if i < len(parsed.tops) else (parsed.text, "")
            for fn, owner in units:
                simple = [
                    n
                    for n in ast.walk(fn)
                    if isinstance(n, (ast.Assign, ast.AugAssign, ast.Expr, ast.Return))
                ]
                rel = ED.depends(simple, var, set())
                if not rel:
                    continue
                targets = {var} | {w for k in rel for w in R.writes_of(simple[k])}
                out += ED.statement_edits(
                    fn,
                    targets,
                    _call_scope(fn),
                    text,
                    i,
                    lambda line, label=label: f"{label} line {line}".strip(),
                    owner,
                )
    out.sort(key=lambda e: e.rank)
    return out[: MAX_EDITS[item.mode]]


def search(
    item: Item, pend: J.Pending, parsed: R.Parsed, vars_: dict[str, str], probes: list[Probe], run: Edits
) -> ED.Edit | None:
    """The best-ranked single edit of the learner's lines that makes the row right on every verdict probe:
    candidates in rank order, a chunk at a time; a chunk's candidates are run on the first failing probe
    (fingerprints), the best that fit are run again value by value on every verdict probe."""
    key = pend.spec.key
    var = vars_.get(key, pend.spec.var)
    graded = [p for p in probes if p.verdict]
    first = pend.failing[0][0]
    cache: dict = {}
    cands = candidates(item, parsed, key, var, vars_, graded[0])
    for start in range(0, len(cands), CHUNK):
        chunk = cands[start : start + CHUNK]
        alive = []
        for (index, owner), group in _groups(chunk):
            res = run(key, index, [e.source for e in group], [first], False, [owner] * len(group))
            alive += [
                e for e, fp in zip(group, res.get(first.name, [])) if _fits(fp, first, key, item, cache)
            ]
        alive.sort(key=lambda e: e.rank)
        for (index, owner), group in _groups(alive[:FULL]):
            full = run(key, index, [e.source for e in group], graded, True, [owner] * len(group))
            for k, e in enumerate(group):
                vals = [full.get(p.name, [None] * len(group))[k] for p in graded]
                if all(v is not None and J.compare(item, key, p, v) != "fail" for p, v in zip(graded, vals)):
                    return e
    return None


def search_behaviours(
    item: Item, specs: list, parsed: R.Parsed, probes: list[Probe], run: Edits
) -> ED.Edit | None:
    """For rows that are verdicts (a checker's True/False): the best-ranked single edit of the function
    behind them after which every such row is right."""
    keys = [s.key for s in item.rows if not s.tensor]
    if parsed.tree is None:
        return None
    want = {p.name: {k: p.refs[k] for k in keys if isinstance(p.refs.get(k), bool)} for p in probes}
    cands: list[ED.Edit] = []
    for spec in specs:
        cands += candidates(item, parsed, spec.key, spec.var, {}, probes[0])
    cands = sorted({(e.index, e.owner, e.source): e for e in cands}.values(), key=lambda e: e.rank)
    for start in range(0, min(len(cands), MAX_EDITS["call"]), CHUNK):
        for (index, owner), group in _groups(cands[start : start + CHUNK]):
            res = run("*", index, [e.source for e in group], probes, False, [owner] * len(group))
            for k, e in enumerate(group):
                if all(
                    k < len(res.get(p.name, []))
                    and all(res[p.name][k].get("values", {}).get(r) == v for r, v in want[p.name].items())
                    for p in probes
                ):
                    return e
    return None


def _groups(edits: list[ED.Edit]) -> list[tuple[tuple[int, str], list[ED.Edit]]]:
    """The edits by the statement (and class) they change, in rank order of each group's best."""
    out: dict[tuple[int, str], list[ED.Edit]] = {}
    for e in edits:
        out.setdefault((e.index, e.owner), []).append(e)
    return list(out.items())


# ---------------------------------------------------------------------------- one grade
F32_WORDS = ("float32", ".float()", "torch.float)", "torch.float,", "torch.half", "float16")


def float32_rows(item: Item, parsed: R.Parsed, vars_: dict[str, str]) -> set[str]:
    """The rows whose own lines make a float32 value on purpose (dtype=torch.float32, .float())."""
    if item.mode != "region":
        return set()
    out = set()
    for st in parsed.region:
        lines = parsed.lines.get(st.filename, [])
        text = "\n".join(lines[st.node.lineno - 1 : getattr(st.node, "end_lineno", st.node.lineno)])
        if any(w in text for w in F32_WORDS):
            out |= {k for k, v in vars_.items() if v in st.writes}
    return out


def assess(
    item: Item,
    probes: list[Probe],
    outs: dict[str, Tensor],
    meta: dict,
    vars_: dict[str, str],
    parsed: R.Parsed,
    run: Edits,
    strict: bool = False,
    skip: set | None = None,
    lines: dict[str, int] | None = None,
) -> tuple[list[Row], list[str]]:
    """The rows and notes of a grade, from what the learner's code gave on every probe."""
    rows, pending = J.judge_rows(
        item, probes, outs, meta, vars_, strict, skip, float32_rows(item, parsed, vars_)
    )
    for spec, row in zip(item.rows, rows):
        if row.line is None and lines:
            row.line = lines.get(spec.blank or spec.var) or lines.get(spec.var)
    events = [ev for p in probes if p.verdict or not p.feed for ev in meta.get("events", {}).get(p.name, [])]
    notes = list(meta.get("notes", []))
    for pend in pending:
        kind, dkey, words = J.diagnose(item, pend)
        edit = None
        if (
            pend.catalogued != "all"
        ):  # the catalogue stays for the known mistakes; the edit search speaks where
            try:  # it is silent (or names the mistake on some probes only: a coincidence of sizes, say)
                edit = search(item, pend, parsed, vars_, probes, run)
            except (SyntaxError, ValueError, RecursionError):  # a line the search cannot take apart
                edit = None
        pend.row.edit = edit.words() if edit else ""
        if edit and pend.catalogued == "some":
            kind, dkey, words = K.OTHER, "", ""
        pend.row.kind, pend.row.key, pend.row.diagnosis = J.with_edit(kind, dkey, words, pend.row.edit)
    if item.judge is not None:
        for i, (spec, row) in enumerate(zip(item.rows, rows)):
            if spec.tensor:
                new = item.judge(spec, probes, outs, meta, row) or row
                if new.edit and new.edit not in new.diagnosis:
                    new.diagnosis = f"{new.diagnosis}; {new.edit}"
                rows[i] = new
    verdicts = [
        (s, r)
        for s, r in zip(item.rows, rows)
        if not s.tensor and r.status == "wrong" and isinstance(probes[0].refs.get(s.key), bool)
    ]
    if verdicts and item.mode == "call":
        edit = search_behaviours(
            item, [s for s, _ in verdicts], parsed, [p for p in probes if p.verdict], run
        )
        for _, r in verdicts:
            if edit is not None:
                r.edit = edit.words()
                r.diagnosis = f"{r.diagnosis}; {r.edit}"
    notes += apply_events(item, rows, vars_, events)
    chain_column(item, rows, probes, outs)
    return rows, notes


class ChildRun:
    """The edit search's runs in the file's child process (its replies checked by trust.py)."""

    def __init__(self, child, vars_: dict[str, str], time_limit: float, watch: list):
        self.child, self.vars_, self.time_limit, self.watch = child, vars_, time_limit, watch

    def __call__(
        self,
        key: str,
        index: int,
        sources: list[str],
        probes: list[Probe],
        full: bool = False,
        owners: list[str] | None = None,
    ) -> dict[str, list]:
        rep, got = self.child.request(
            {
                "op": "edits",
                "key": key,
                "index": index,
                "sources": sources,
                "seed": SEED,
                "rows": self.vars_,
                "full": full,
                "owners": owners,
                "probes": [{"name": p.name, "dtype": _dt(p)} for p in probes],
            },
            self.time_limit,
        )
        self.watch += rep.get("watch", []) if isinstance(rep.get("watch"), list) else []
        if not rep.get("ok"):
            return {}
        values = full and not key.startswith("*")
        res = T.edits_reply(rep, [p.name for p in probes], len(sources), values)
        if not values:
            return res
        try:
            got = T.tensors(got, {f"{p.name}|{k}" for p in probes for k in range(len(sources))})
        except T.ReplyError:
            return {}
        return {p.name: [got.get(f"{p.name}|{k}") for k in range(len(sources))] for p in probes}


def _dt(p: Probe) -> str:
    return str(p.dtype).removeprefix("torch.")


def probe_inputs(probes: list[Probe] | tuple[Probe, ...]) -> tuple[dict[str, Tensor], dict]:
    """Probe tensors for the child (`probe|v|name`, `probe|f|key`), and their numbers."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for p in probes:
        scalars[p.name] = {}
        for k, v in p.inputs.items():
            if isinstance(v, Tensor):
                tensors[f"{p.name}|v|{k}"] = v.detach().clone().contiguous()
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[p.name][k] = v
        if p.feed:
            for k, t in p.feeds.items():
                tensors[f"{p.name}|f|{k}"] = t.detach().clone().contiguous()
    return tensors, scalars


# ---------------------------------------------------------------------------- what the file does besides
def file_flags(item: Item, parsed: R.Parsed, vars_: dict[str, str], events: list) -> list[S.Flag]:
    """What the file's graded code does besides hand-written gradients (scan.py): read from the source
    by the grader, plus what the child's watch saw it do as it ran, each on its line."""
    tree = ast.parse(parsed.text, parsed.filename)
    by_var = {v: k for k, v in vars_.items()}
    if item.mode == "region":
        a, b = R.region_bounds(parsed.text.splitlines())
        setup = [st for st in tree.body if isinstance(st, R.DEFS) and not a < st.lineno <= b]
        graded = [st.node for st in parsed.region]
        rows_of = {st.line: tuple(sorted(by_var[w] for w in st.writes if w in by_var))
                   for st in parsed.region}
    else:
        body = [st for st in tree.body if not R._is_main_guard(st)]
        setup = [st for st in body if isinstance(st, R.DEFS)]
        graded = [st for st in body if not isinstance(st, R.DEFS)]
        rows_of = {}
    lines = parsed.text.splitlines()
    flags = S.merge(S.scan(parsed.text, graded, setup, rows_of), S.seen(events, lines, rows_of))
    return flags + carried(parsed, flags, rows_of) if item.mode == "region" else flags


CHEATS = ("autograd", "handgrad")  # the kinds of flag that mean a row is not the learner's own work


def carried(parsed: R.Parsed, flags: list[S.Flag], rows_of: dict[int, tuple[str, ...]]) -> list[S.Flag]:
    """A row whose statement reads a value that a flagged statement made (`g = lecture_gradients(...)`
    then `dlogprobs = g['logprobs']`) carries that flag: one per such statement, naming where it came
    from. The region's statements in order; a statement that writes no row passes its taint on to what
    it writes (a row does not: the lines below it build on the learner's own value)."""
    cheats = [f for f in flags if f.kind in CHEATS]
    tainted: dict[str, S.Flag] = {}
    out = []
    for st in parsed.region:
        end = getattr(st.node, "end_lineno", st.line)
        own = next((f for f in cheats if st.line <= f.line <= end), None)
        via = next((tainted[v] for v in sorted(st.reads) if v in tainted), None)
        source = own or via
        if source is None:
            continue
        if not rows_of.get(st.line):  # a row is the learner's next step's input, not autograd's
            tainted.update({w: source for w in st.writes})
        if via is not None and own is None and rows_of.get(st.line):
            what = f"uses a value from line {source.line}, which {source.what}"
            out.append(S.Flag(st.line, source.kind, what, st.text[:120], rows_of[st.line]))
    return out


def apply_flags(grade: Grade, item: Item, flags: list[S.Flag]) -> None:
    """Each flag a note on its line; a row whose own lines hold autograd or handgrad's code says so, and
    in strict mode is wrong (a cheat outside any row's lines, in strict mode, makes every row wrong).
    Strict mode also fails what it cannot read (scan.opaque: exec, getattr by name, frames, ...)."""
    grade.flags = flags
    by_key = {spec.key: row for spec, row in zip(item.rows, grade.rows)}
    loose = []
    for f in flags:
        grade.notes.append(f.words())
        if f.kind not in CHEATS and not (grade.strict and S.opaque(f)):
            continue
        hit = [by_key[k] for k in f.rows if k in by_key]
        if not hit:
            loose.append(f)
        for r in hit:
            _cheat(r, f, grade.strict)
    if grade.strict and loose:
        for r in grade.rows:
            if r.status == "ok":
                _cheat(r, loose[0], True)


def _cheat(row: Row, f: S.Flag, strict: bool) -> None:
    source = {"autograd": "autograd", "handgrad": "the dojo's own code"}.get(
        f.kind, "code the grader cannot read")
    words = f"{row.name} comes from {source}, not from your code (line {f.line}: {f.what})"
    if strict:
        row.status, row.kind, row.key = "wrong", "cheat", f"cheat-{f.kind}"
        row.chain = None
        row.diagnosis = f"{words}; strict mode fails it"
    elif words not in row.note:
        row.note = f"{row.note}; {words}" if row.note else words
        if row.status != "ok":
            row.diagnosis = f"{row.diagnosis}; {words}" if row.diagnosis else words


# ---------------------------------------------------------------------------- files
def identify(text: str, name: str | None) -> Item | str:
    """The file's item (from its content and its `# handgrad dojo: KEY` line, or `name`), or why there
    is none (submission.identify says how)."""
    try:
        return SUB.identify(text, name)[0]
    except (SUB.SubmissionError, ValueError) as e:
        return str(e)


def grade_file(
    path: str | Path,
    item: str | None = None,
    *,
    strict: bool = False,
    names: dict[str, str] | None = None,
    time_limit: float = TIME_LIMIT,
    sandbox: str | SB.Sandbox | None = None,
) -> Grade:
    """Grade one learner file, its item read from its content and `# handgrad dojo: KEY` line unless
    given. `sandbox`: "auto", "require" (SandboxError without bubblewrap), "basic", a Sandbox, or None
    ($HANDGRAD_DOJO_SANDBOX, else "auto")."""
    return grade_files([path], item, strict=strict, names=names, time_limit=time_limit, sandbox=sandbox)[0]


def grade_files(
    paths: list[str | Path],
    item: str | None = None,
    *,
    strict: bool = False,
    names: dict[str, str] | None = None,
    time_limit: float = TIME_LIMIT,
    sandbox: str | SB.Sandbox | None = None,
    each: Callable[[Grade], None] | None = None,
) -> list[Grade]:
    """Grade files one after the other, each in its own sandboxed child process with its own time limit
    (`each` is called with every grade as it is done, its child dead). The probes are tiny: one torch
    thread (on a busy machine OpenMP's waiting made them 100x slower)."""
    box = sandbox if isinstance(sandbox, SB.Sandbox) else SB.choose(sandbox)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for p in paths:
            out.append(_guarded(Path(p), item, strict, names, time_limit, box))
            if each is not None:
                each(out[-1])
        return out
    finally:
        torch.set_num_threads(threads)


def _guarded(path: Path, name: str | None, strict: bool, explicit: dict[str, str] | None,
             time_limit: float, box: SB.Sandbox) -> Grade:
    """One file's grade; the grader's own failure on something unforeseen is one line, never a traceback."""
    start = time.perf_counter()
    try:
        grade = _grade_path(path, name, strict, explicit, time_limit, box)
    except Exception as e:
        grade = Grade(str(path), name or "?", problem=f"the grader failed on this file "
                      f"({type(e).__name__}: {safe_text(e, 200)}); please report it")
    grade.sandbox = box.kind
    grade.seconds = time.perf_counter() - start
    return grade


def _grade_path(
    path: Path, name: str | None, strict: bool, explicit: dict[str, str] | None, time_limit: float,
    box: SB.Sandbox,
) -> Grade:
    try:
        text = SUB.read(path)
        item, said_item = SUB.identify(text, name)
    except (SUB.SubmissionError, ValueError) as e:
        return Grade(str(path), name or "?", problem=str(e))
    grade = Grade(str(path), item.key, item.title, strict=strict)
    try:
        parsed = R.parse(text, str(path), item.mode)
    except R.FileProblem as e:
        grade.problem = safe_text(e)
        return grade
    vars_, said = region_vars(item, parsed, explicit)
    probes = list(probes_of(item.key))
    grade.probes = verdict_words(probes)
    watch: list = []
    from handgrad.dojo.child import Child

    with Child(box, time_limit) as ch:
        try:
            _run_child(ch, grade, item, probes, text, path, parsed, vars_, time_limit, watch)
        finally:
            ch.close()
            grade.events = list(ch.events)
    if grade.problem:
        return grade
    apply_flags(grade, item, file_flags(item, parsed, vars_, watch))
    for note in (said, said_item):
        if note:
            grade.notes.insert(0, note)
    _problem_rows(grade)
    _hints_used(grade, path)
    return grade


def _run_child(ch, grade: Grade, item: Item, probes: list[Probe], text: str, path: Path,
               parsed: R.Parsed, vars_: dict[str, str], time_limit: float, watch: list) -> None:
    """Load the file in the child, run it on the probes, judge what came back (checked by trust.py)."""
    tensors, scalars = probe_inputs(probes)
    lines = T.Lines(text)
    load = {"op": "load", "source": text, "filename": str(path), "mode": item.mode, "driver": item.driver,
            "scalars": scalars}
    rep, _ = ch.request(load, time_limit, tensors)
    got: dict[str, Tensor] = {}
    if rep.get("ok"):
        run = {"op": "run", "rows": vars_,
               "probes": [{"name": p.name, "feed": p.feed, "dtype": _dt(p)} for p in probes]}
        rep, got = ch.request(run, time_limit)
    watch += rep.get("watch", []) if isinstance(rep.get("watch"), list) else []
    if not rep.get("ok"):
        grade.problem = T.problem(rep)
        return
    try:
        meta, outs = T.run_reply(rep, got, [p.name for p in probes], [r.key for r in item.rows], lines)
    except T.ReplyError as e:
        grade.problem = f"the grader's child process sent {e}: the grade stops here"
        return
    grade.rows, grade.notes = assess(
        item, probes, outs, meta, vars_, parsed, ChildRun(ch, vars_, time_limit, watch), grade.strict,
        lines=blank_lines(text),
    )
    if item.training:
        grade.rows += _training(ch, vars_, time_limit, watch)


def _problem_rows(grade: Grade) -> None:
    """A NumPy array or a tensor elsewhere than the CPU: the file cannot be graded as it is (one line)."""
    bad = next((r for r in grade.rows if r.status == "invalid" and r.key == "numpy"), None)
    if bad is not None:
        where = f"{bad.where}: " if bad.where else (f"line {bad.line}: " if bad.line else "")
        grade.problem = f"{where}{bad.name} is {bad.diagnosis}"


def _hints_used(grade: Grade, path: Path) -> None:
    from handgrad.dojo.hints import LEVELS, used

    shown = used(path)
    if shown:
        grade.notes.append(
            "hints used: " + ", ".join(f"{k} ({v} of {len(LEVELS)})" for k, v in sorted(shown.items()))
        )


def _training(ch, vars_: dict[str, str], time_limit: float, watch: list) -> list[Row]:
    """Exercise 4: train with the learner's backward alone; the loss curve against autograd's."""
    from handgrad.dojo import loop

    rep, got = ch.request({"op": "train", "lr": loop.LR, "rows": vars_}, time_limit, loop.inputs())
    watch += rep.get("watch", []) if isinstance(rep.get("watch"), list) else []
    mine, stop = torch.zeros(0, dtype=torch.float64), T.problem(rep)
    if rep.get("ok"):
        try:
            mine = T.tensors(got, {"losses"}).get("losses", mine)
            stop = T.text(rep.get("stop"))
        except T.ReplyError as e:
            stop = f"the grader's child process sent {e}"
    return loop.judge_training(mine, loop.reference(), stop)
