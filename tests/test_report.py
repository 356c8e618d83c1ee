"""The one table renderer (report.py): aligned text (columns as wide as their widest cell, notes under a
row, no trailing spaces) and HTML with every cell escaped."""

from handgrad.report import Column, Table


def test_text_aligns_each_column_to_its_widest_cell_and_puts_notes_under_their_row():
    t = Table([Column("name", width=6), Column("x", ">", 4, gap="  "), Column("what", gap="  ")], rule="-" * 10,
              title="a title")
    t.add("a", "1.5", "ok").add("longer name", "10", "", notes=["-> why", "note: more"])
    assert t.lines() == ["a title",
                         "name            x  what",
                         "-" * 10,
                         "a             1.5  ok",
                         "longer name    10",
                         "             -> why",
                         "             note: more"]
    assert str(t) == t.text() == "\n".join(t.lines())


def test_a_row_with_fewer_cells_and_an_untitled_column_leave_no_trailing_spaces():
    t = Table([Column("engine", width=8), Column("ms", ">", 5), Column("", gap="  ")])
    t.add("fast", "1.00").add("eager", "-", "unavailable: no compiler")
    assert t.lines() == ["engine      ms", "fast      1.00", "eager        -  unavailable: no compiler"]


def test_html_escapes_every_cell_and_note():
    t = Table([Column("tensor"), Column("value", ">")])
    t.add("<b>", "1 & 2", notes=["<script>"])
    h = t._repr_html_()
    assert "<b>" not in h and "<script>" not in h
    assert "&lt;b&gt;" in h and "1 &amp; 2" in h and "&lt;script&gt;" in h and "text-align:right" in h
