"""An exercise's graph drawn as SVG with each tensor coloured by the grade of its gradient, so a learner
sees where the backward pass went wrong (`handgrad dojo grade FILE --graph out.svg`). Plain SVG text,
laid out by depth: the forward pass runs top to bottom, as in the lecture's notebook.
"""

from __future__ import annotations

import html
from pathlib import Path

from handgrad import io
from handgrad.dojo.graph import Graph
from handgrad.dojo.registry import get
from handgrad.dojo.report import COLOURS, VERDICTS, Grade

ROW_H, COL_W, NODE_W, NODE_H, MARGIN, TOP = 64, 170, 140, 40, 40, 90  # px
NOTE_CHARS = 90  # the longest diagnosis written beside the graph (the full one is the node's tooltip)
PLAIN = "#ffffff"  # a tensor with no graded gradient (the batch, the loss)
STROKE = {"ok": "#2e7d32", "wrong": "#c62828", "missing": "#9e9e9e", "error": "#e65100", "invalid": "#e65100"}


def layout(graph: Graph) -> dict[str, tuple[int, int]]:
    """(row, column) per tensor: an op's output one row below its deepest input; a leaf (parameter or
    batch) one row above its first user, beside the chain."""
    row: dict[str, int] = {}
    outs = [op.out for op in graph.ops]
    for op in graph.ops:
        row[op.out] = 1 + max((row.get(i, -1) for i in op.ins if i in row), default=0)
    for op in graph.ops:
        for i in op.ins:
            if i not in outs and i not in row:
                row[i] = max(row[op.out] - 1, 0)
    by_row: dict[int, list[str]] = {}
    for name in sorted(row, key=lambda k: (k not in outs, outs.index(k) if k in outs else 0, k)):
        by_row.setdefault(row[name], []).append(name)
    return {name: (r, c) for r, names in by_row.items() for c, name in enumerate(names)}


def svg(grade: Grade) -> str:
    """The picture of a graded exercise (any item with a graph)."""
    ex = get(grade.item)
    graph = ex.graph
    if graph is None:
        raise ValueError(f"{ex.kind} {ex.key} has no graph to draw")
    rows = {r.name[1:]: r for r in grade.rows if r.grad}
    pos = layout(graph)
    ncols = 1 + max(c for _, c in pos.values())
    nrows = 1 + max(r for r, _ in pos.values())
    said = [n for n in pos if n in rows and rows[n].status in ("wrong", "error", "invalid")]
    notes_x = MARGIN + (ncols - 1) * COL_W + NODE_W + 24  # right of every node: what is wrong, in words
    width = notes_x + (NOTE_CHARS * 7 + MARGIN if said else MARGIN)
    height = TOP + nrows * ROW_H + MARGIN

    def xy(name: str) -> tuple[float, float]:
        r, c = pos[name]
        return MARGIN + c * COL_W + NODE_W / 2, TOP + r * ROW_H + NODE_H / 2

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="#fcfcfc"/>',
        f'<text x="{MARGIN}" y="24" font-size="15" font-weight="bold">{_h(ex.title)}</text>',
        f'<text x="{MARGIN}" y="44">{_h(grade.file)}: {_h(grade.summary())}</text>',
    ]
    x0 = MARGIN
    for status in ("ok", "wrong", "missing", "error"):
        out.append(
            f'<rect x="{x0}" y="56" width="14" height="14" fill="{COLOURS[status]}" '
            f'stroke="{STROKE[status]}"/><text x="{x0 + 20}" y="67">{VERDICTS[status]}</text>'
        )
        x0 += 100
    for op in graph.ops:  # edges first, under the nodes
        x2, y2 = xy(op.out)
        for i in op.ins:
            x1, y1 = xy(i)
            y1, y2e = y1 + NODE_H / 2, y2 - NODE_H / 2
            skip = pos[op.out][0] - pos[i][0] > 1 and pos[op.out][1] == pos[i][1]
            if skip:  # a tensor used again further down: bend out to the right of the chain
                bend = x1 + NODE_W / 2 + 30 + 10 * (pos[op.out][0] - pos[i][0])
                d = f"M{x1 + NODE_W / 2},{y1 - NODE_H / 2} C{bend},{y1} {bend},{y2e} {x2 + NODE_W / 2},{y2}"
            else:
                d = f"M{x1},{y1} C{x1},{(y1 + y2e) / 2} {x2},{(y1 + y2e) / 2} {x2},{y2e}"
            out.append(f'<path d="{d}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')
    for name in pos:
        cx, cy = xy(name)
        r = rows.get(name)
        fill = COLOURS.get(r.status, PLAIN) if r else PLAIN
        stroke = STROKE.get(r.status, "#555") if r else "#555"
        if r is None:
            tip = f"{name}: no gradient graded"
        else:
            tip = f"d{name}: {VERDICTS[r.status]}" + (f": {r.diagnosis}" if r.diagnosis and not r.ok else "")
        label = f"{VERDICTS[r.status]}" if r else ""
        out.append(
            f'<g><title>{_h(tip)}</title><rect x="{cx - NODE_W / 2}" y="{cy - NODE_H / 2}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="8" fill="{fill}" stroke="{stroke}" stroke-width="{2 if r else 1}"/>'
            f'<text x="{cx}" y="{cy - 3 if label else cy + 4}" text-anchor="middle" font-weight="bold">'
            f"{_h(name)}</text>"
            + (
                f'<text x="{cx}" y="{cy + 13}" text-anchor="middle" font-size="10">'
                f"d{_h(name)}: {label}</text>"
                if label
                else ""
            )
            + "</g>"
        )
    for name in said:  # the diagnosis beside the chain, level with its tensor
        r = rows[name]
        _, cy = xy(name)
        words = f"d{name}: {r.diagnosis}"
        words = words if len(words) <= NOTE_CHARS else words[: NOTE_CHARS - 3] + "..."
        out.append(
            f'<text x="{notes_x}" y="{cy + 4}" font-size="11" fill="{STROKE[r.status]}">{_h(words)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(grade: Grade, path: str | Path) -> Path:
    """Write the picture atomically (a temporary file in the same folder, then renamed)."""
    path = Path(path)
    io.atomic_write_bytes(path, svg(grade).encode())
    return path


def _h(text: str) -> str:
    return html.escape(str(text))
