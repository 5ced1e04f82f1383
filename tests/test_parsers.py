"""Fuzzing every parser: any string gives a result, never an exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.pipelines.base import PageSize
from dsvl2.pipelines.chart import parse_chart
from dsvl2.pipelines.ground import parse_grounding
from dsvl2.pipelines.ocr import parse_markdown
from dsvl2.pipelines.table import parse_tables

SIZE = PageSize(1000, 2000, 500.0, 1000.0, 144.0)


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
