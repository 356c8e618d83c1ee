"""handgrad's check_function / check_op / check_backward side by side with torch.autograd.gradcheck and
gradgradcheck on the same corpus (tests/function_corpus.py), in float64 (gradcheck's dtype): what
each flags, what each says, and the time each takes (median of --repeat runs, in this process, on the
same inputs, one thread). A (forward, backward) pair is wrapped in an autograd.Function for gradcheck.

    .venv/bin/python benchmarks/gradcheck_side_by_side.py [--limit N] [--repeat 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import function_corpus as C  # noqa: E402


def as_callable(case: C.Case) -> Any:
    """What gradcheck is handed: Function.apply, the op, or a Function made from the pair."""
    if case.kind == C.FUNC:
        return case.target.apply
    if case.kind == C.OP:
        return C.custom_ops()[case.target]
    forward, backward = case.target

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *xs):
            out, cache = forward(*xs)
            ctx.cache, ctx.floats = cache, [isinstance(x, torch.Tensor) and x.is_floating_point() for x in xs]
            return out

        @staticmethod
        def backward(ctx, dout):
            got = backward(dout, ctx.cache)
            got = iter(got if isinstance(got, tuple) else (got,))
            return tuple(next(got) if f else None for f in ctx.floats)
    return Pair.apply


def first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[0].split())
    return f"{type(e).__name__}: {text[:110]}{'...' if len(text) > 110 else ''}"


def torch_check(fn: Any, args: tuple, which: Any) -> tuple[bool, str]:
    """(flagged, what it said) for gradcheck or gradgradcheck."""
    inputs = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                   else a for a in args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = which(fn, inputs)
    except Exception as e:  # gradcheck raises GradcheckError, autograd RuntimeError, the backward anything
        return True, first_line(e)
    return (not ok), "passes" if ok else "returned False"


def timed(fn: Any, repeat: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def handgrad_said(report) -> str:
    bad = report.failures()
    if not bad:
        return "passes"
    text = " ".join((getattr(bad[0], "diagnosis", "") or "").split())
    return text[:140] + ("..." if len(text) > 140 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0, help="only the first N cases of each list (0: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per check (the median is reported)")
    p.add_argument("--out", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = (C.WRONG[:a.limit] if a.limit else C.WRONG) + (C.CORRECT[:a.limit] if a.limit else C.CORRECT)
    C.custom_ops()
    lines = ["| case | mistake | handgrad | said | gradcheck | said | gradgradcheck | said | handgrad s | "
             "gradcheck s | gradgradcheck s |", "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
    tally = {k: 0 for k in ("wrong", "hg", "named", "gc", "ggc", "either", "right", "hg_fp", "gc_fp", "ggc_fp")}
    t_hg = t_gc = t_ggc = 0.0
    for case in cases:
        args = tuple(x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                     for x in case.inputs(0))
        report, th = timed(lambda case=case: C.run_case(case, torch.float64), a.repeat)
        fn = as_callable(case)
        (gc, gc_said), tg = timed(lambda: torch_check(fn, args, torch.autograd.gradcheck), a.repeat)
        (ggc, ggc_said), tgg = timed(lambda: torch_check(fn, args, torch.autograd.gradgradcheck), a.repeat)
        t_hg, t_gc, t_ggc = t_hg + th, t_gc + tg, t_ggc + tgg
        hg = not report.passed
        named = case.wrong and any(w in C.said(report) for w in case.expect)
        if case.wrong:
            tally["wrong"] += 1
            tally["hg"] += hg
            tally["named"] += named
            tally["gc"] += gc
            tally["ggc"] += ggc
            tally["either"] += gc or ggc
        else:
            tally["right"] += 1
            tally["hg_fp"] += hg
            tally["gc_fp"] += gc
            tally["ggc_fp"] += ggc
        verdict = ("named" if named else "flagged" if hg else "missed") if case.wrong else ("FALSE ALARM" if hg else "ok")
        tv = (lambda f: ("flagged" if f else "missed") if case.wrong else ("FALSE ALARM" if f else "ok"))
        cell = (lambda s: s.replace("|", "/"))
        lines.append(f"| {case.name} | {case.klass or 'correct'} | {verdict} | {cell(handgrad_said(report))} | "
                     f"{tv(gc)} | {cell(gc_said)} | {tv(ggc)} | {cell(ggc_said)} | {th:.3f} | {tg:.3f} | {tgg:.3f} |")
    w, r = tally["wrong"], tally["right"]
    summary = [
        "",
        f"{w} wrong cases: handgrad flags {tally['hg']} and names {tally['named']}; gradcheck flags {tally['gc']}, "
        f"gradgradcheck {tally['ggc']}, one of the two {tally['either']} (neither names a mistake).",
        f"{r} correct cases: false alarms: handgrad {tally['hg_fp']}, gradcheck {tally['gc_fp']}, gradgradcheck "
        f"{tally['ggc_fp']}.",
        f"time over all {w + r} cases (median of {a.repeat} per check, float64, one thread): handgrad {t_hg:.2f} s, "
        f"gradcheck {t_gc:.2f} s, gradgradcheck {t_ggc:.2f} s; handgrad / (gradcheck + gradgradcheck) = "
        f"{t_hg / max(t_gc + t_ggc, 1e-9):.1f}x (handgrad also replays the check in the user's dtype, runs each "
        "input alone for needs_input_grad, each output alone, an in-place probe, and names the mistake)",
    ]
    text = "\n".join(lines + summary)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
