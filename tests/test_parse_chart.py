"""Chart parser on golden raw strings: titled tables, DePlot's linearised form, key-value lines, matplotlib code,
values with units / currency / magnitudes / qualifiers; renderers; and a property: no text makes it raise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.pipelines.base import PageRecord
from dsvl2.pipelines.chart import ChartTask, parse_chart, parse_number, parse_quantity

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
    assert [(x["name"], x["values"]) for x in r["series"]] == [("2023", [1200.0, None]), ("2024", [42.0, 7.5])]
    assert any("null" in n for n in r["notes"])


def test_chart_deplot_linearised_form():
    p = parse_chart("TITLE | Revenue <0x0A> Year | Revenue <0x0A> 2020 | 12% <0x0A> 2021 | (3)")
    assert p.ok and p.result["title"] == "Revenue"
    assert p.result["categories"] == ["2020", "2021"] and p.result["series"][0]["values"] == [12.0, -3.0]


def test_chart_key_value_lines_fallback():
    p = parse_chart("Apples: 42\nBananas: 35\n- Dates = 27")
    assert p.ok and p.result["categories"] == ["Apples", "Bananas", "Dates"]
    assert [(x["name"], x["values"]) for x in p.result["series"]] == [("series 1", [42.0, 35.0, 27.0])]


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


# --- values as DeepSeek-VL2 writes them ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "unit", "qualifier"),
    [
        ("$1.2M", 1_200_000.0, "$", None),
        ("~30", 30.0, None, "approximately"),
        ("45 million", 45_000_000.0, None, None),
        ("12 (estimated)", 12.0, None, "estimated"),
        ("approx. 45 kg", 45.0, "kg", "approximately"),
        ("USD 3bn", 3e9, "USD", None),
        ("<5%", 5.0, "%", "less than"),
        ("over 2.5 million people", 2_500_000.0, "people", "more than"),
        ("-€4.5B", -4.5e9, "€", None),
        ("20°C", 20.0, "°C", None),
        ("5 m", 5.0, "m", None),  # metres: a bare lower-case m is not million
        ("3 bars are red", None, None, None),
        ("1e309", None, None, None),
    ],
)
def test_parse_quantity_keeps_unit_and_qualifier(text, value, unit, qualifier):
    q = parse_quantity(text)
    assert (q.value, q.unit, q.qualifier, q.text) == (value, unit, qualifier, text)


def test_pair_lines_with_units_and_qualifiers_and_unused_lines_in_notes():
    text = "The chart shows revenue by year.\n- 2019: $1.2M\n- 2020: ~$1.5M\n- 2021: $2M (estimated)\nHope this helps!"
    r = parse_chart(text).result
    assert r["categories"] == ["2019", "2020", "2021"]
    [s] = r["series"]
    assert s["values"] == [1.2e6, 1.5e6, 2e6] and s["units"] == ["$", "$", "$"]
    assert s["qualifiers"] == [None, "approximately", "estimated"] and s["texts"][1] == "~$1.5M"
    assert "line 1 not used: The chart shows revenue by year." in r["notes"]
    assert "line 5 not used: Hope this helps!" in r["notes"]


def test_matplotlib_code_is_read_from_literal_lists_without_running_it():
    text = (
        "Here is the code to reproduce the chart:\n```python\nimport matplotlib.pyplot as plt\nimport numpy as np\n"
        "years = ['2019', '2020', '2021']\nsales = [1.2, 3.4, -2]\ncost = [1, 2, 3]\nx = np.arange(len(years))\n"
        "fig, ax = plt.subplots()\nax.bar(x - 0.2, sales, 0.4, label='Sales')\n"
        "ax.bar(x + 0.2, cost, 0.4, label='Cost')\n"
        "ax.set_xticks(x)\nax.set_xticklabels(years)\nax.set_title('Sales and cost')\nax.set_ylabel('USD')\n"
        "__import__('os').system('touch /tmp/pwned')\nplt.show()\n```\nThis draws two bar series."
    )
    p = parse_chart(text)
    r = p.result
    assert p.ok and (r["title"], r["y_axis"]) == ("Sales and cost", "USD")
    assert r["categories"] == ["2019", "2020", "2021"]
    assert [(s["name"], s["values"]) for s in r["series"]] == [("Sales", [1.2, 3.4, -2.0]), ("Cost", [1.0, 2.0, 3.0])]
    assert "line 1 not used: Here is the code to reproduce the chart:" in r["notes"]
    assert r["notes"][-1] == "line 19 not used: This draws two bar series."


def test_truncated_matplotlib_code_is_read_up_to_its_last_complete_statement():
    text = "```python\nimport matplotlib.pyplot as plt\nplt.plot([2018, 2019], [5, 6], label='A')\nplt.plot([2018, 20"
    p = parse_chart(text)
    assert p.ok and p.result["categories"] == ["2018", "2019"]
    assert [(s["name"], s["values"]) for s in p.result["series"]] == [("A", [5.0, 6.0])]


def test_code_without_literal_data_is_not_read_as_data():
    text = "```python\nimport matplotlib.pyplot as plt\ndf = pd.read_csv('x.csv')\nplt.plot(df.x, df.y)\n```"
    p = parse_chart(text)
    assert not p.ok and p.result["series"] == []


def _record(result):
    return PageRecord(source="c.png", sha256=None, page=1, page_size=None, task="chart", prompt="p", model={},
                      settings={}, text="", result=result, status="ok")


def test_renderers_show_units_and_qualifiers():
    r = parse_chart("| Year | Revenue |\n|---|---|\n| 2019 | $1.2M |\n| 2020 | ~$1.5M |").result
    record = _record(r)
    assert "| 2020 | 1500000 $ (approximately) |" in ChartTask.markdown(record)
    rows = ChartTask.csv_rows(record)
    assert rows[1] == [None or "", "Revenue", "2020", 1.5e6, "$", "approximately", ""]
    [(_, frame, _)] = ChartTask.frames(record)
    assert list(frame.columns) == ["category", "Revenue [$]", "Revenue [$] qualifier"]
    assert len(ChartTask.csv_columns) == len(rows[0])


def test_renderers_read_records_without_units():
    old = {"title": None, "x_axis": None, "y_axis": None, "categories": ["a"],
           "series": [{"name": "s", "values": [1.0]}], "notes": []}
    record = _record(old)
    assert ChartTask.csv_rows(record) == [["", "s", "a", 1.0, "", "", ""]]
    assert "| a | 1 |" in ChartTask.markdown(record)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["```python\n", "plt.plot(", "[1, 2]", ",", ")", "x = ", "\n", "$", "~", "1.2", "M",
                                 "(estimated)", ": ", "| a | b |\n|---|---|\n", "million", "import matplotlib\n"]),
                max_size=50).map("".join) | st.text(max_size=120))
def test_no_text_makes_the_chart_parser_raise(text):
    p = parse_chart(text)
    assert p.ok or p.error
    for s in p.result["series"]:
        n = len(p.result["categories"])
        assert len(s["values"]) == len(s["units"]) == len(s["qualifiers"]) == len(s["texts"]) == n
