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
from dataclasses import dataclass
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
    inputs = tuple(
        a.detach().clone().requires_grad_(True)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )
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


@dataclass
class Row:
    """One case: what each checker flagged and said, and how long it took."""

    case: C.Case
    handgrad: bool
    named: bool
    handgrad_said: str
    gradcheck: bool
    gradcheck_said: str
    gradgradcheck: bool
    gradgradcheck_said: str
    seconds: tuple[float, float, float]  # handgrad, gradcheck, gradgradcheck

    def verdict(self, flagged: bool) -> str:
        if self.case.wrong:
            return "flagged" if flagged else "missed"
        return "FALSE ALARM" if flagged else "ok"

    def markdown(self) -> str:
        c = self.case
        hg = "named" if self.named else self.verdict(self.handgrad)
        cells = [c.name, c.klass or "correct", hg, self.handgrad_said, self.verdict(self.gradcheck),
                 self.gradcheck_said, self.verdict(self.gradgradcheck), self.gradgradcheck_said,
                 *(f"{t:.3f}" for t in self.seconds)]
        return "| " + " | ".join(x.replace("|", "/") for x in cells) + " |"


def run_one(case: C.Case, repeat: int) -> Row:
    """The three checks on one case, in float64, each timed."""
    args = tuple(x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in case.inputs(0))
    report, th = timed(lambda: C.run_case(case, torch.float64), repeat)
    fn = as_callable(case)
    (gc, gc_said), tg = timed(lambda: torch_check(fn, args, torch.autograd.gradcheck), repeat)
    (ggc, ggc_said), tgg = timed(lambda: torch_check(fn, args, torch.autograd.gradgradcheck), repeat)
    named = case.wrong and any(w in C.said(report) for w in case.expect)
    return Row(case, not report.passed, named, handgrad_said(report), gc, gc_said, ggc, ggc_said,
               (th, tg, tgg))


def summary(rows: list[Row], repeat: int) -> list[str]:
    wrong = [r for r in rows if r.case.wrong]
    right = [r for r in rows if not r.case.wrong]
    t_hg, t_gc, t_ggc = (sum(r.seconds[i] for r in rows) for i in range(3))
    return [
        "",
        f"{len(wrong)} wrong cases: handgrad flags {sum(r.handgrad for r in wrong)} and names "
        f"{sum(r.named for r in wrong)}; gradcheck flags {sum(r.gradcheck for r in wrong)}, gradgradcheck "
        f"{sum(r.gradgradcheck for r in wrong)}, one of the two "
        f"{sum(r.gradcheck or r.gradgradcheck for r in wrong)} (neither names a mistake).",
        f"{len(right)} correct cases: false alarms: handgrad {sum(r.handgrad for r in right)}, gradcheck "
        f"{sum(r.gradcheck for r in right)}, gradgradcheck {sum(r.gradgradcheck for r in right)}.",
        f"time over all {len(rows)} cases (median of {repeat} per check, float64, one thread): handgrad "
        f"{t_hg:.2f} s, gradcheck {t_gc:.2f} s, gradgradcheck {t_ggc:.2f} s; handgrad / (gradcheck + "
        f"gradgradcheck) = {t_hg / max(t_gc + t_ggc, 1e-9):.1f}x (handgrad also replays the check in the "
        "user's dtype, runs each input alone for needs_input_grad, each output alone, an in-place probe, "
        "and names the mistake)",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0, help="only the first N cases of each list (0: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per check (the median is reported)")
    p.add_argument("--out", type=Path, help="also write the table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = (C.WRONG[: a.limit] if a.limit else C.WRONG) + (C.CORRECT[: a.limit] if a.limit else C.CORRECT)
    C.custom_ops()
    rows = [run_one(case, a.repeat) for case in cases]
    head = ["| case | mistake | handgrad | said | gradcheck | said | gradgradcheck | said | handgrad s | "
            "gradcheck s | gradgradcheck s |", "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
    text = "\n".join(head + [r.markdown() for r in rows] + summary(rows, a.repeat))
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
