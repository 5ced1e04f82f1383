"""Chart parser on golden raw strings: titled tables, DePlot's linearised form, key-value lines, numbers."""

from __future__ import annotations

import pytest

from dsvl2.pipelines.chart import parse_chart, parse_number

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
