"""Real answers (tests/data/real_answers/table.json, chart.json, quoted with their sources) read by the table and
chart parsers: every case's `expect` holds — status, each table's shape, header and rows, the chart's categories
and values, and the notes that keep unused answer lines — so a parser change that misreads an answer someone
really got fails here. No case is skipped."""

from __future__ import annotations

import pytest
from real_answers import SOURCES, cases

from dsvl2.pipelines.chart import parse_chart
from dsvl2.pipelines.table import parse_tables


def _contains_all(notes: list[str], wanted: list[str], where: str) -> None:
    for w in wanted:
        assert any(w in n for n in notes), f"{where}: no note containing {w!r} in {notes}"


def _check_case(case: dict) -> None:
    assert case["source"].startswith(SOURCES), case["source"]
    assert case["model"] in ("deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2", "unknown"), case["model"]


@pytest.mark.parametrize("case", cases("table.json"), ids=lambda c: c["id"])
def test_real_table_answer(case: dict) -> None:
    _check_case(case)
    parsed = parse_tables(case["text"])
    want, r = case["expect"], parsed.result
    assert ("ok" if parsed.ok else "parse_error") == want["status"], (case["id"], parsed.error)
    assert len(r["tables"]) == len(want["tables"]), (case["id"], r["tables"])
    for i, (got, w) in enumerate(zip(r["tables"], want["tables"], strict=True)):
        where = f"{case['id']} table {i}"
        assert (got["format"], got["n_columns"], len(got["rows"])) == (w["format"], w["n_columns"], w["n_rows"]), where
        assert got["header"] == w["header"], where
        assert got["rows"][0] == w["first_row"] and got["rows"][-1] == w["last_row"], where
        _contains_all(got["notes"], w.get("notes_contain", []), where)
    _contains_all(r["notes"], want.get("notes_contain", []), case["id"])


@pytest.mark.parametrize("case", cases("chart.json"), ids=lambda c: c["id"])
def test_real_chart_answer(case: dict) -> None:
    _check_case(case)
    parsed = parse_chart(case["text"])
    want, r = case["expect"], parsed.result
    assert ("ok" if parsed.ok else "parse_error") == want["status"], (case["id"], parsed.error)
    assert r["categories"] == want["categories"], case["id"]
    assert len(r["series"]) >= len(want["series"]), case["id"]
    for got, w in zip(r["series"], want["series"], strict=False):
        assert (got["name"], got["values"]) == (w["name"], w["values"]), case["id"]
    _contains_all(r["notes"], want.get("notes_contain", []), case["id"])
