"""Table parsers on golden raw strings: Markdown, HTML, LaTeX tabular, several tables in prose, prose kept in
notes, "no table" said in words; and a property: no text makes them raise or lose a line silently."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.pipelines.table import (
    find_tables,
    parse_html_table,
    parse_latex_table,
    parse_markdown_table,
    parse_tables,
    says_no_table,
)


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
    assert parse_tables("NONE").result == {"tables": [], "notes": []}
    no_table = parse_tables("The page shows a photo of a cat.")
    assert not no_table.ok and "does not say there is none" in no_table.error
    assert no_table.result["notes"] == ["line 1 not used: The page shows a photo of a cat."]
    broken = parse_tables("| a | b |\n|---|---|\n| 1 | 2 |\n\n<table></table>")
    assert not broken.ok and "table(s) 2" in broken.error
    assert [t["status"] for t in broken.result["tables"]] == ["ok", "parse_error"]


# --- the shapes DeepSeek-VL2 answers in (synthetic strings in the shapes the issue lists) -------------------


def test_prose_around_a_markdown_table_goes_to_notes_and_a_caption_line_is_not_a_row():
    text = (
        "Here is the information from the image in markdown format:\n\nTable 2 | Datasets\n| Name | Size |\n"
        "|---|---|\n| COCO | 118k |\n\nThe table lists two datasets."
    )
    parsed = parse_tables(text)
    [t] = parsed.result["tables"]
    assert parsed.ok and t["header"] == ["Name", "Size"] and t["rows"] == [["COCO", "118k"]]
    assert parsed.result["notes"] == [
        "line 1 not used: Here is the information from the image in markdown format:",
        "line 3 not used: Table 2 | Datasets",
        "line 8 not used: The table lists two datasets.",
    ]


def test_grounding_tokens_are_not_table_columns():
    text = "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<|ref|>x<|/ref|>\n| a | b |\n|---|---|\n| 1 | 2 |"
    parsed = parse_tables(text)
    assert parsed.ok and [t["header"] for t in parsed.result["tables"]] == [["a", "b"]]
    assert len(parsed.result["notes"]) == 2


def test_html_without_thead_takes_the_header_its_rowspans_cover():
    html = (
        "<table><tr><td rowspan=2>Model</td><td colspan=2>Score</td></tr><tr><td>Acc</td><td>F1</td></tr>"
        "<tr><td>A</td><td>0.9</td><td>0.8</td></tr></table>"
    )
    t = parse_html_table(html)
    assert t.header == ("Model", "Score / Acc", "Score / F1") and t.rows == (("A", "0.9", "0.8"),)


def test_latex_tabular_rules_multicolumn_multirow_and_escapes():
    text = (
        "Sure:\n\\begin{tabular}{|l|c|r|}\n\\hline\n\\multirow{2}{*}{Model} & \\multicolumn{2}{c|}{Score} \\\\ "
        "\\cline{2-3}\n & Acc & F1 \\\\\n\\hline\n\\textbf{Ours} & 91.2\\% & 0.88 \\\\\n"
        "R\\&D & $\\approx$85 & 0.80 \\\\\n"
        "\\hline\n\\end{tabular}"
    )
    parsed = parse_tables(text)
    [t] = parsed.result["tables"]
    assert parsed.ok and t["format"] == "latex"
    assert t["header"] == ["Model", "Score / Acc", "Score / F1"]
    assert t["rows"] == [["Ours", "91.2%", "0.88"], ["R&D", "85", "0.80"]]
    assert parsed.result["notes"] == ["line 1 not used: Sure:"]


def test_latex_booktabs_without_header_rule_and_unclosed_tabular():
    t = parse_latex_table("\\begin{tabular}{ll}\nFruit & Crates \\\\\nApples & 42 \\\\")
    assert t.status == "ok" and t.header == ("Fruit", "Crates") and t.rows == (("Apples", "42"),)
    t = parse_latex_table("\\begin{tabular}{cc}\\toprule a & b \\\\ \\midrule 1 & 2 \\\\ \\bottomrule\\end{tabular}")
    assert t.header == ("a", "b") and t.rows == (("1", "2"),)
    assert parse_latex_table("\\begin{tabular}{c}\\hline\\end{tabular}").status == "parse_error"


@pytest.mark.parametrize(
    "text",
    [
        "There is no table in this image.",
        "There are no tables on the page.",
        "The image does not contain any tables. It shows a cat on a sofa.",
        "This document doesn't have a table.",
        "I don't see any table in the image.",
        "No table found.",
        "**None**",
    ],
)
def test_no_table_said_in_words_is_ok_with_no_tables(text):
    parsed = parse_tables(text)
    assert says_no_table(text) and parsed.ok and parsed.result["tables"] == []


@pytest.mark.parametrize(
    "text",
    [
        "The table on the left is wooden.",
        "There is no doubt the table shows growth.",
        "The page shows a photo of a cat.",
        "table",
        "There is no table. " + "More words. " * 60,
    ],
)
def test_other_prose_without_a_table_stays_a_parse_error(text):
    assert not says_no_table(text) and not parse_tables(text).ok


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["|", "---", "a", "1", " ", "\n", "&", "\\\\", "\\hline", "\\begin{tabular}{c}",
                                 "\\multicolumn{3}{c}{", "}", "<table>", "<td rowspan=3>", "There is no table.",
                                 "<|ref|>", "```"]), max_size=60).map("".join) | st.text(max_size=120))
def test_no_text_makes_the_table_parser_raise_or_drop_a_line(text):
    parsed = parse_tables(text)
    assert parsed.ok or parsed.error
    for t in parsed.result["tables"]:
        assert all(len(row) == t["n_columns"] for row in t["rows"])
    prose = [s for s in text.splitlines() if s.strip() and not s.strip().startswith("```")]
    if not parsed.result["tables"] and prose and not parsed.ok:
        assert parsed.result["notes"], "an answer without tables lost its lines"
