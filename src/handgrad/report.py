"""One table renderer for every report (check, bench, verify, dojo): columns with a title, an alignment,
a minimum width and the gap before them; rows of cells, each with optional lines shown under it (a
diagnosis, a note); rendered as aligned text (each column as wide as its widest cell, no trailing
spaces) or as an HTML table for Jupyter.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Column:
    title: str
    align: str = "<"  # "<" left, ">" right
    width: int = 0  # at least this wide (the widest cell or the title widens it)
    gap: str = " "  # what stands before it (nothing before the first column)


@dataclass
class Row:
    cells: list[str]
    notes: list[str] = field(default_factory=list)  # lines under the row, indented past the first column


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    rule: str = ""  # a line under the header ("-" * 60), or none
    title: str = ""  # a line above the table, or none

    def add(self, *cells: object, notes: list[str] | None = None) -> Table:
        self.rows.append(Row([str(c) for c in cells], list(notes or [])))
        return self

    def widths(self) -> list[int]:
        return [max([c.width, len(c.title)] + [len(r.cells[i]) for r in self.rows if i < len(r.cells)])
                for i, c in enumerate(self.columns)]

    def _line(self, cells: list[str], widths: list[int]) -> str:
        parts = [("" if i == 0 else c.gap) + f"{cell:{c.align}{w}}"
                 for i, (c, cell, w) in enumerate(zip(self.columns, cells, widths))]
        return "".join(parts).rstrip()

    def lines(self) -> list[str]:
        widths = self.widths()
        indent = " " * widths[0] + (self.columns[1].gap if len(self.columns) > 1 else " ")
        out = [self.title] if self.title else []
        out.append(self._line([c.title for c in self.columns], widths))
        out += [self.rule] if self.rule else []
        for r in self.rows:
            out.append(self._line(r.cells, widths))
            out += [indent + note for note in r.notes]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def html(self) -> str:
        """The table as HTML (Jupyter's _repr_html_): a header row, one row per row, its notes below it."""
        n = len(self.columns)
        side = lambda c: "left" if c.align == "<" else "right"  # noqa: E731
        head = "".join(f"<th style='text-align:{side(c)}'>{html.escape(c.title)}</th>" for c in self.columns)
        body = []
        for r in self.rows:
            cells = "".join(f"<td style='text-align:{side(c)}'>{html.escape(x)}</td>"
                            for c, x in zip(self.columns, r.cells))
            body.append(f"<tr>{cells}</tr>")
            body += [f"<tr><td></td><td colspan='{n - 1}'><i>{html.escape(note)}</i></td></tr>"
                     for note in r.notes]
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return self.html()
