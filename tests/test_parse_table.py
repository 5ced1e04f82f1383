"""Table parsers on golden raw strings: Markdown, HTML, several tables in prose."""

from __future__ import annotations

from dsvl2.pipelines.table import find_tables, parse_html_table, parse_markdown_table, parse_tables


def test_markdown_table_with_separator_and_alignment():
    t = parse_markdown_table("| Item | Qty | Price |\n|:---|:-:|--:|\n| Widget | 2 | 3.50 |\n| Gear | 1 | 19.99 |")
    assert t.header == ("Item", "Qty", "Price")
    assert t.rows == (("Widget", "2", "3.50"), ("Gear", "1", "19.99"))
    assert t.status == "ok" and t.notes == ()


def test_markdown_ragged_rows_are_padded_and_noted():
    t = parse_markdown_table("| a | b | c |\n|---|---|---|\n| 1 |\n| 1 | 2 | 3 | 4 |")
    assert t.header == ("a", "b", "c", "")
    assert t.rows == (("1", "", "", ""), ("1", "2", "3", "4"))
    assert any("ragged" in n for n in t.notes) and any("header" in n for n in t.notes)


def test_markdown_without_outer_pipes_and_escaped_pipe():
    t = parse_markdown_table("name | value\n--- | ---\na \\| b | 1")
    assert t.header == ("name", "value") and t.rows == (("a | b", "1"),)


def test_markdown_header_detected_without_separator_only_for_words_over_numbers():
    assert parse_markdown_table("| Fruit | Crates |\n| Apples | 42 |").header == ("Fruit", "Crates")
    assert parse_markdown_table("| x | y |\n| a | b |").header is None
    assert parse_markdown_table("| 1 | 2 |\n| 3 | 4 |").header is None


def test_markdown_header_only_table_is_empty_but_ok():
    t = parse_markdown_table("| a | b |\n|---|---|")
    assert t.header == ("a", "b") and t.rows == () and t.status == "ok"


def test_markdown_separator_only_is_a_parse_error():
    t = parse_markdown_table("|---|---|")
    assert t.status == "parse_error" and t.raw == "|---|---|"


def test_several_tables_in_prose_and_code_fences_in_order():
    text = (
        "Here are the tables.\n\n```markdown\n| A | B |\n|---|---|\n| 1 | 2 |\n```\n\nAnd an HTML one:\n"
        "<table><tr><th>X</th></tr><tr><td>9</td></tr></table>\n\n| C | D |\n|---|---|\n| 3 | 4 |\n"
    )
    tables = find_tables(text)
    assert [(t.format, t.header) for t in tables] == [
        ("markdown", ("A", "B")),
        ("html", ("X",)),
        ("markdown", ("C", "D")),
    ]
    assert [t.index for t in tables] == [0, 1, 2]


# --- tables: HTML ------------------------------------------------------------------------------------------


def test_html_merged_cells_are_repeated_and_header_rows_joined():
    html = (
        "<table><thead><tr><th rowspan='2'>Region</th><th colspan='2'>Sales</th></tr>"
        "<tr><th>Q1</th><th>Q2</th></tr></thead><tbody>"
        "<tr><td rowspan=2>North</td><td>1</td><td>2</td></tr><tr><td>3</td><td>4</td></tr>"
        "<tr><td colspan=3>Total: 10</td></tr></tbody></table>"
    )
    t = parse_html_table(html)
    assert t.header == ("Region", "Sales / Q1", "Sales / Q2")
    assert t.rows == (("North", "1", "2"), ("North", "3", "4"), ("Total: 10", "Total: 10", "Total: 10"))
    assert any("merged" in n for n in t.notes)


def test_html_unclosed_tags_entities_and_br():
    t = parse_html_table("<table><tr><td>a &amp; b<td>line<br>two<tr><td>c<td>d")
    assert t.rows == (("a & b", "line two"), ("c", "d")) and t.header is None
    t = parse_html_table("<table><tr><td>Fruit<td>Crates<tr><td>Apples<td>42</table>")
    assert t.header == ("Fruit", "Crates") and t.rows == (("Apples", "42"),)


def test_html_ragged_rows_and_span_beyond_table_are_clipped():
    t = parse_html_table("<table><tr><td rowspan=99>a</td><td>b</td><td>c</td></tr><tr><td>d</td></tr></table>")
    assert t.rows == (("a", "b", "c"), ("a", "d", ""))


def test_html_nested_table_is_folded_into_its_cell():
    t = parse_html_table("<table><tr><td>outer<table><tr><td>inner</td></tr></table></td><td>2</td></tr></table>")
    assert t.rows == (("outer inner", "2"),) and any("nested" in n for n in t.notes)


def test_html_absurd_spans_do_not_blow_up():
    t = parse_html_table("<table>" + "<tr><td colspan=999999>x</td></tr>" * 300 + "</table>")
    assert t.status == "parse_error" and "cells" in t.notes[0]


def test_html_empty_table_is_a_parse_error_with_raw_text():
    t = parse_html_table("<table></table>")
    assert t.status == "parse_error" and t.raw == "<table></table>"


def test_parse_tables_statuses():
    assert parse_tables("NONE").ok and parse_tables("").ok
    assert parse_tables("NONE").result == {"tables": []}
    no_table = parse_tables("The page shows a photo of a cat.")
    assert not no_table.ok and "no Markdown or HTML table" in no_table.error
    broken = parse_tables("| a | b |\n|---|---|\n| 1 | 2 |\n\n<table></table>")
    assert not broken.ok and "table(s) 2" in broken.error
    assert [t["status"] for t in broken.result["tables"]] == ["ok", "parse_error"]
