"""A class's submissions graded at once: the paths (files, or directories of `*.py` files) in a fixed
order, one row per submission (exercise, score, first mistake, time, what its sandbox did), the gradients
the class gets wrong most with the diagnoses behind them, and the same as a table, CSV, JSON or an HTML
page. Every text that came from a submission (its path, its messages) is escaped where it is written
(report.safe_text for text, html.escape for HTML, a leading quote for a spreadsheet formula in CSV).
"""

from __future__ import annotations

import csv
import html
import io
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from handgrad.dojo.grading import CHEATS
from handgrad.dojo.report import COLOURS, Grade, safe_text

MAX_FILES = 5000  # submissions one command grades
TOP = 10  # rows of the class summary
STATUSES = ("all right", "flagged", "wrong", "cannot grade")
FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula at a cell's start


class ClassError(ValueError):
    """A path of the command that is not there or holds no submission: one line naming it."""


def collect(paths: list[str]) -> list[Path]:
    """The submissions: each path as given (a file, a link, a FIFO: the grader refuses what is not a
    regular file, in its own row), and every `*.py` under a directory, sorted, links not followed and
    hidden names (.x) skipped. ClassError for a path that is not there or a directory without one."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        try:
            st = os.lstat(p)
        except OSError as e:
            raise ClassError(f"{safe_text(raw, 200)}: {e.strerror or 'cannot be read'}") from None
        if stat.S_ISDIR(st.st_mode):
            found = sorted(_walk(p))
            if not found:
                raise ClassError(f"{safe_text(raw, 200)}: a directory without any .py file in it")
            out += found
        else:
            out.append(p)
        if len(out) > MAX_FILES:
            raise ClassError(f"{safe_text(raw, 200)}: more than {MAX_FILES:,} files to grade in one command")
    return list(dict.fromkeys(out))


def _walk(d: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(d, followlinks=False):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [Path(root) / f for f in files if f.endswith(".py") and not f.startswith(".")]
        if len(out) > MAX_FILES:
            break
    return out


# ---------------------------------------------------------------------------- one row per submission
@dataclass(frozen=True)
class Entry:
    """A submission's row of the class table."""

    file: str
    item: str
    right: int
    rows: int
    first: str  # the first wrong row and its diagnosis, or the reason it could not be graded
    seconds: float
    sandbox: str
    events: str  # what the grader did to its process, and what the file does besides its gradients
    status: str  # "all right", "flagged" (right, and scan.py flagged its code), "wrong", "cannot grade"

    @property
    def score(self) -> str:
        return "-" if self.status == "cannot grade" else f"{self.right}/{self.rows}"


def entry(g: Grade) -> Entry:
    bad = next((r for r in g.rows if not r.ok), None)
    if g.problem:
        first, status = g.problem, "cannot grade"
    elif bad is not None:
        first, status = f"{bad.name}: {bad.diagnosis or bad.status}", "wrong"
    else:
        first, status = "", "all right"
    flag = next((f for f in g.flags if f.kind in CHEATS), g.flags[0] if g.flags else None)
    if status == "all right" and flag is not None:  # right, but not only by hand: the teacher looks
        first, status = f"line {flag.line}: {flag.what}", "flagged"
    said = list(g.events) + [f.words() for f in g.flags]
    return Entry(safe_text(g.file, 200), g.item, g.right, len(g.rows), safe_text(first, 240),
                 round(g.seconds, 2), g.sandbox, safe_text("; ".join(said), 400), status)


def summary(grades: list[Grade]) -> list[dict]:
    """The rows the class gets wrong most (a blank left blank is not counted): (item, row), how many
    submissions, their commonest diagnoses."""
    wrong: Counter = Counter()
    why: dict[tuple[str, str], Counter] = {}
    graded: Counter = Counter()
    for g in grades:
        if g.problem:
            continue
        graded[g.item] += 1
        for r in g.rows:
            if not r.ok and r.status != "missing":  # a blank is not a mistake
                k = (g.item, r.name)
                wrong[k] += 1
                why.setdefault(k, Counter())[safe_text(_short(r.diagnosis or r.status), 160)] += 1
    return [{"item": item, "row": row, "wrong": n, "of": graded[item],
             "diagnoses": [{"diagnosis": d, "count": c} for d, c in why[(item, row)].most_common(3)]}
            for (item, row), n in wrong.most_common(TOP)]


def _short(text: str) -> str:
    """A diagnosis without the learner's own numbers, so alike mistakes count together."""
    return text.split(" (max", 1)[0].split("; ", 1)[0]


def exit_code(grades: list[Grade]) -> int:
    """0 every submission all right (flagged ones too, unless strict made them wrong), 1 otherwise (a
    submission that cannot be graded is its row's news, not the command's: exit 2 is for the command's
    own bad flags and paths)."""
    return 0 if grades and all(not g.problem and g.exit_code == 0 for g in grades) else 1


# ---------------------------------------------------------------------------- the formats
HEADS = ("file", "exercise", "score", "status", "first mistake", "seconds", "sandbox", "events")


def _cells(e: Entry) -> tuple[str, ...]:
    return (e.file, e.item, e.score, e.status, e.first or "-", f"{e.seconds:.2f}", e.sandbox, e.events or "-")


def table(grades: list[Grade], width: int = 60) -> str:
    """The class as text: a line per submission, then the summary."""
    cells = [_cells(entry(g)) for g in grades]
    cut = [tuple(c if len(c) <= width else c[: width - 1] + "\u2026" for c in row) for row in cells]
    widths = [max([len(h)] + [len(c[i]) for c in cut]) for i, h in enumerate(HEADS[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    out = [fmt.format(*HEADS)] + [fmt.format(*c) for c in cut]
    out += ["", *summary_lines(grades)]
    return "\n".join(out)


def summary_lines(grades: list[Grade]) -> list[str]:
    n = len(grades)
    counts = Counter(entry(g).status for g in grades)
    out = [f"{n} submissions: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES
                                          if counts[s])]
    top = summary(grades)
    if top:
        out.append("wrong most often:")
    for s in top:
        ds = "; ".join(f"{d['diagnosis']} ({d['count']})" for d in s["diagnoses"])
        out.append(f"  {s['item']} {s['row']}: {s['wrong']} of {s['of']} wrong: {ds}")
    return out


def to_csv(grades: list[Grade]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("file", "exercise", "right", "rows", "status", "first_mistake", "seconds", "sandbox",
                "events"))
    for g in grades:
        e = entry(g)
        w.writerow([_formula_safe(str(x)) for x in (e.file, e.item, e.right, e.rows, e.status, e.first,
                                                     f"{e.seconds:.2f}", e.sandbox, e.events)])
    return buf.getvalue()


def _formula_safe(cell: str) -> str:
    return "'" + cell if cell.startswith(FORMULA) else cell


def to_json(grades: list[Grade]) -> dict:
    return {
        "submissions": [{**vars(entry(g)), "score": entry(g).score, "grade": g.to_json()} for g in grades],
        "summary": summary(grades),
        "exit_code": exit_code(grades),
    }


STATUS_COLOUR = {"all right": COLOURS["ok"], "flagged": COLOURS["error"], "wrong": COLOURS["wrong"],
                 "cannot grade": COLOURS["error"]}


def to_html(grades: list[Grade], title: str = "handgrad dojo: the class's grades") -> str:
    """A page of its own (no script, no outside resource): the class table, the summary, and each
    submission's full grade below it."""
    h = html.escape
    rows = []
    for i, g in enumerate(grades):
        e = entry(g)
        tds = "".join(f"<td>{h(c)}</td>" for c in _cells(e))
        tds = tds.replace(f"<td>{h(e.file)}</td>", f"<td><a href='#g{i}'>{h(e.file)}</a></td>", 1)
        rows.append(f"<tr style='background:{STATUS_COLOUR[e.status]}'>{tds}</tr>")
    head = "".join(f"<th>{h(c)}</th>" for c in HEADS)
    top = "".join(
        f"<tr><td>{h(s['item'])}</td><td>{h(s['row'])}</td><td>{s['wrong']} of {s['of']}</td><td>"
        + "<br>".join(f"{h(d['diagnosis'])} ({d['count']})" for d in s["diagnoses"]) + "</td></tr>"
        for s in summary(grades)
    )
    each = "".join(f"<section id='g{i}'>{g._repr_html_()}</section>" for i, g in enumerate(grades))
    lines = "<br>".join(h(x) for x in summary_lines(grades)[:1])
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{h(title)}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #bbb;padding:3px 7px;"
        "text-align:left;vertical-align:top;font-size:13px}th{background:#eee}section{margin-top:2em}"
        "</style></head><body>"
        f"<h1>{h(title)}</h1><p>{lines}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<h2>Wrong most often</h2><table><thead><tr><th>exercise</th><th>row</th><th>wrong</th>"
        f"<th>diagnoses</th></tr></thead><tbody>{top}</tbody></table>"
        f"<h2>Each submission</h2>{each}</body></html>"
    )
