"""Parsers on golden raw strings (tables in Markdown and HTML, charts, grounding), and fuzzing: any string
gives a result, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.pipelines.base import PageSize
from dsvl2.pipelines.chart import parse_chart, parse_number
from dsvl2.pipelines.ground import check_box, parse_grounding
from dsvl2.pipelines.ocr import parse_markdown
from dsvl2.pipelines.table import find_tables, parse_html_table, parse_markdown_table, parse_tables

# --- tables: Markdown ------------------------------------------------------------------------------------


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


# --- charts ------------------------------------------------------------------------------------------------


def test_chart_with_title_axes_and_two_series():
    p = parse_chart(
        "**Title:** Fruit sales\nX axis: Fruit\nY-axis label: Crates\n\n| Fruit | 2023 | 2024 |\n|---|---|---|\n"
        "| Apples | 1,200 | 42 |\n| Pears | n/a | 7.5 |"
    )
    assert p.ok
    r = p.result
    assert (r["title"], r["x_axis"], r["y_axis"]) == ("Fruit sales", "Fruit", "Crates")
    assert r["categories"] == ["Apples", "Pears"]
    assert r["series"] == [{"name": "2023", "values": [1200.0, None]}, {"name": "2024", "values": [42.0, 7.5]}]
    assert any("null" in n for n in r["notes"])


def test_chart_deplot_linearised_form():
    p = parse_chart("TITLE | Revenue <0x0A> Year | Revenue <0x0A> 2020 | 12% <0x0A> 2021 | (3)")
    assert p.ok and p.result["title"] == "Revenue"
    assert p.result["categories"] == ["2020", "2021"] and p.result["series"][0]["values"] == [12.0, -3.0]


def test_chart_key_value_lines_fallback():
    p = parse_chart("Apples: 42\nBananas: 35\n- Dates = 27")
    assert p.ok and p.result["categories"] == ["Apples", "Bananas", "Dates"]
    assert p.result["series"] == [{"name": "series 1", "values": [42.0, 35.0, 27.0]}]


def test_chart_without_data_is_a_parse_error():
    p = parse_chart("I cannot read this chart.")
    assert not p.ok and p.result["series"] == []


@pytest.mark.parametrize(
    ("cell", "value"),
    [
        ("1,234.5", 1234.5),
        ("12%", 12.0),
        ("(3)", -3.0),
        ("−2", -2.0),
        ("$ 5", 5.0),
        ("€7", 7.0),
        ("abc", None),
        ("", None),
        ("1.2.3", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_number(cell, value):
    assert parse_number(cell) == value


# --- grounding ---------------------------------------------------------------------------------------------

SIZE = PageSize(1000, 2000, 500.0, 1000.0, 144.0)


def boxes(text: str, **kw):
    p = parse_grounding(text, size=SIZE, **kw)
    return p, p.result["boxes"]


def test_grounding_several_refs_and_boxes_in_three_frames():
    p, bs = boxes(
        "<|ref|>cat<|/ref|><|det|>[[10, 20, 500, 600], [700,800,999,999]]<|/det|> and "
        "<|ref|>dog<|/ref|> <|det|>[[0, 0, 999, 999]]<|/det|>"
    )
    assert p.ok and [b["label"] for b in bs] == ["cat", "cat", "dog"]
    assert bs[0]["box"] == [10, 20, 500, 600]
    assert bs[0]["box_px"] == [10.0, 40.0, 500.5, 1201.2]
    assert bs[0]["box_pt"] == [5.01, 20.02, 250.25, 600.6]
    assert bs[2]["box_px"] == [0.0, 0.0, 1000.0, 2000.0]
    assert p.result["caption"] == "cat and dog"


def test_grounding_out_of_range_and_swapped_values_are_repaired_not_dropped():
    p, bs = boxes("<|ref|>x<|/ref|><|det|>[[1200, 20, 5, 600], [-3, 50, 40, 10]]<|/det|>")
    assert p.ok
    assert [(b["status"], b["box"]) for b in bs] == [("repaired", [5, 20, 999, 600]), ("repaired", [0, 10, 40, 50])]
    assert "clamped values outside 0–999" in bs[0]["notes"] and "swapped y1 and y2" in bs[1]["notes"]


def test_grounding_odd_length_and_flat_lists():
    p, bs = boxes("<|ref|>a<|/ref|><|det|>[[1, 2, 3], [1,2,3,4,5,6,7,8], [1,2,3,4,5]]<|/det|>")
    assert [(b["status"], b["box"]) for b in bs] == [
        ("invalid", None),
        ("ok", [1, 2, 3, 4]),
        ("ok", [5, 6, 7, 8]),
        ("invalid", None),
    ]
    assert bs[0]["notes"] == ["expected 4 numbers, got 3"] and bs[0]["raw"] == "[1, 2, 3]"
    assert "split a flat list" in bs[1]["notes"][0]
    assert not p.ok and p.error == "2 of 4 box(es) invalid"


def test_grounding_malformed_lists_and_nested_junk_never_evaluated():
    p, bs = boxes("<|det|>[[[10,10,20,20]], __import__('os'), [x,1,2,3], []]<|/det|>", query="q")
    assert [(b["label"], b["status"]) for b in bs] == [("q", "ok"), ("q", "invalid")]
    assert bs[1]["notes"] == ["not a number: 'x'"]
    assert "ignored characters other than numbers, commas and brackets" in p.result["notes"]
    assert "empty box list []" in p.result["notes"]


def test_grounding_unclosed_det_and_zero_area():
    p, bs = boxes("<|ref|>x<|/ref|><|det|>[[5, 5, 5, 9]]")
    assert bs[0]["status"] == "invalid" and bs[0]["notes"][-1] == "zero width or height"
    assert any("unclosed" in n for n in p.result["notes"])


def test_grounding_without_boxes_is_a_parse_error():
    p, bs = boxes("I see no giraffe.")
    assert not p.ok and bs == [] and p.error == "no boxes in the answer"


def test_grounding_image_pages_have_no_points():
    p = parse_grounding("<|det|>[[0,0,999,999]]<|/det|>", size=PageSize(640, 480))
    assert p.result["boxes"][0]["box_px"] == [0.0, 0.0, 640.0, 480.0] and p.result["boxes"][0]["box_pt"] is None


def test_check_box_float_values():
    assert check_box([0.5, 1, 2.5, 3]) == ("ok", [0.5, 1, 2.5, 3], [])


def test_ocr_strips_a_whole_page_fence():
    assert parse_markdown("```markdown\n# Title\ntext\n```").result == {"markdown": "# Title\ntext"}
    assert not parse_markdown("  \n").ok


# --- fuzzing -----------------------------------------------------------------------------------------------

ALPHABET = st.sampled_from(
    [
        *list("0123456789,[]|-:.<>/ \nabcxyz"),
        "<|ref|>",
        "<|/ref|>",
        "<|det|>",
        "<|/det|>",
        "<table>",
        "<tr>",
        "<td colspan=3>",
        "</td>",
    ]
)
JUNK = st.lists(ALPHABET, max_size=60).map("".join) | st.text(max_size=80)


@settings(max_examples=150, deadline=None)
@given(JUNK)
def test_parsers_never_raise(text):
    for parsed in (parse_tables(text), parse_chart(text), parse_grounding(text, size=SIZE), parse_markdown(text)):
        assert isinstance(parsed.result, dict)
        assert parsed.ok or parsed.error
    for b in parse_grounding(text, size=SIZE).result["boxes"]:
        assert b["status"] in ("ok", "repaired", "invalid")
        if b["box"] is not None:
            x1, y1, x2, y2 = b["box"]
            assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999
