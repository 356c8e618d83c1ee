"""A grade, as the learner reads it: a table per row (text, or HTML in Jupyter), notes, and the closing
line ("24 of 26 right (2 with a shape note); next: dbnvar_inv"). Exit status: 0 all right, 1 something
wrong or missing, 2 could not grade.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from handgrad.dojo.judge import Row, shape_words

VERDICTS = {"ok": "ok", "wrong": "WRONG", "missing": "missing", "error": "ERROR", "invalid": "INVALID"}
COLOURS = {  # the verdict's background in HTML and in the graph picture
    "ok": "#d8f0d8",
    "shape": "#e8f4c8",  # right, with a shape note
    "wrong": "#f8d0d0",
    "missing": "#eeeeee",
    "error": "#f8e0b0",
    "invalid": "#f8e0b0",
}
CHAIN = {None: "-", "yes": "yes", "given": "given", "no": "no"}


@dataclass
class Grade:
    """One file's or notebook's grade: the rows, notes, or the one-line reason it could not be graded."""

    file: str
    item: str  # the item's key
    title: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str = ""  # non-empty: could not grade (exit 2)
    probes: list[str] = field(default_factory=list)  # the verdict probes, in words, for the legend
    strict: bool = False
    seconds: float = 0.0  # how long grading took
    flags: list = field(default_factory=list)  # scan.Flag: what the file does besides its gradients
    events: list[str] = field(default_factory=list)  # what the grader did to its process (killed, ...)
    sandbox: str = ""  # how its process was held: "bwrap", "basic" ('' for a notebook, run in-process)

    @property
    def right(self) -> int:
        return sum(r.ok for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.problem:
            return 2
        return 0 if all(r.ok for r in self.rows) else 1

    def summary(self) -> str:
        """The closing line: "18 of 26 right; next: dbnvar_inv"."""
        bad = [r for r in self.rows if not r.ok]
        marked = sum(r.ok and r.mark == "shape" for r in self.rows)
        note = f" ({marked} with a shape note)" if marked else ""
        nxt = f"; next: {bad[0].target}" if bad else "; all done"
        return f"{self.right} of {len(self.rows)} right{note}{nxt}"

    def _cells(self, r: Row) -> tuple[str, str, str, str, str, str, str]:
        """One row of the table as text: name, shape, verdict, exact, chain, line, diagnosis."""
        exact = "-" if r.exact is None else ("yes" if r.exact else "no")
        what = r.diagnosis
        if r.ok:
            what = (
                r.note
                or r.diagnosis
                or (
                    "exact (bit for bit with autograd in float32)"
                    if r.exact
                    else "within tolerance"
                    if r.grad
                    else "right"
                )
            )
        if r.yours:
            what = f"(yours: {r.yours}) {what}"
        verdict = "ok*" if r.ok and r.mark == "shape" else VERDICTS[r.status]
        shape = shape_words(r.shape) if r.grad and r.shape else "-"
        line = r.where or (f"line {r.line}" if r.line else "-")
        return r.name, shape, verdict, exact, CHAIN.get(r.chain, "-"), line, what

    def table(self) -> str:
        if self.problem:
            return f"{safe_text(self.file)}: cannot grade: {safe_text(self.problem)}"
        cells = [tuple(safe_text(c) for c in self._cells(r)) for r in self.rows]
        heads = ("row", "shape", "verdict", "exact", "chain", "where", "diagnosis")
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        out = [f"{safe_text(self.file)}: {self.title}" + ("  [strict]" if self.strict else ""),
               fmt.format(*heads)]
        out += [fmt.format(*c) for c in cells]
        out += [f"note: {safe_text(nt)}" for nt in self.notes]
        out += [
            "",
            "verdict: " + "; ".join(self.probes or ["float64 probes"]),
            "ok*: right, with a shape note (--strict: wrong); exact: float32 bit for bit with autograd; "
            "chain: your own values end to end (given: right given your own upstream, which is wrong)",
            self.summary(),
        ]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        """The table as HTML, each verdict coloured (Jupyter shows this for a cell's value)."""
        if self.problem:
            return f"<p><b>{_h(self.file)}: cannot grade:</b> {_h(self.problem)}</p>"
        heads = ("row", "shape", "verdict", "exact", "chain", "where", "diagnosis")
        head = "".join(f"<th>{c}</th>" for c in heads)
        body = []
        for r in self.rows:
            colour = COLOURS["shape"] if r.ok and r.mark == "shape" else COLOURS.get(r.status, "#ffffff")
            tds = "".join(f"<td style='text-align:left'>{_h(c)}</td>" for c in self._cells(r))
            body.append(f"<tr style='background:{colour}'>{tds}</tr>")
        notes = "".join(f"<p>note: {_h(nt)}</p>" for nt in self.notes)
        return (
            f"<p><b>{_h(self.file)}</b>: {_h(self.title)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}"
            f"<p><small>verdict: {_h('; '.join(self.probes))}</small></p><p><b>{_h(self.summary())}</b></p>"
        )

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "item": self.item,
            "problem": self.problem,
            "notes": self.notes,
            "strict": self.strict,
            "rows": [r.to_json() for r in self.rows],
            "summary": "" if self.problem else self.summary(),
            "exit_code": self.exit_code,
            "flags": [f.to_json() for f in self.flags],
            "events": self.events,
            "sandbox": self.sandbox,
            "seconds": round(self.seconds, 3),
        }


# control characters (terminal escapes, backspace, carriage return, C1), Unicode's invisible format
# characters (bidirectional overrides, zero-width ones), line and paragraph separators, lone surrogates
UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001-\U000e007f\ud800-\udfff]"
)


def _escape(m: re.Match) -> str:
    c = ord(m.group(0))
    named = {9: "\\t", 10: "\\n", 13: "\\r"}.get(c)
    if named:
        return named
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def safe_text(text: object, limit: int | None = None) -> str:
    """`text` as one line that shows what it holds and does nothing to a terminal: every control or
    invisible character written as its escape (ESC as \\x1b, a newline as \\n), cut to `limit`
    characters with an ellipsis. Every byte a grade prints that came from a learner's file or its
    process goes through here (names, lines, messages)."""
    out = UNSAFE.sub(_escape, str(text))
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 1, 0)] + "\u2026"
    return out


def _h(text: str) -> str:
    return html.escape(safe_text(text))
