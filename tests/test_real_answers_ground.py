"""Real DeepSeek-VL2 answers (tests/data/real_answers/ground.json, ocr.json, quoted with their sources) read by the
grounding and OCR parsers: every case's `expect` holds — status, found, labels, boxes on the grid and in pixels,
notes — so a parser change that misreads an answer someone really got fails here. No case is skipped."""

from __future__ import annotations

import re

import pytest
from real_answers import SOURCES, cases

from dsvl2.pipelines.base import PageSize
from dsvl2.pipelines.ground import parse_grounding
from dsvl2.pipelines.ocr import parse_markdown


def _query(prompt: str | None) -> str | None:
    m = re.search(r"<\|ref\|>(.*?)<\|/ref\|>", prompt or "")
    return m.group(1) if m else None


def _contains_all(notes: list[str], wanted: list[str], where: str) -> None:
    for w in wanted:
        assert any(w in n for n in notes), f"{where}: no note containing {w!r} in {notes}"


def _check_boxes(got: list[dict], want: list[dict], case_id: str) -> None:
    assert len(got) == len(want), f"{case_id}: {len(got)} boxes, expected {len(want)}: {got}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"{case_id} box {i}"
        for key in ("label", "status", "box", "box_px", "raw"):
            if key in w:
                assert g[key] == w[key], f"{where}: {key} {g[key]!r} != {w[key]!r}"
        _contains_all(g["notes"], w.get("notes_contain", []), where)
        if g["status"] == "invalid":
            assert g["box"] is None and g["box_px"] is None and g["notes"], where


@pytest.mark.parametrize("case", cases("ground.json"), ids=lambda c: c["id"])
def test_real_grounding_answer(case: dict) -> None:
    assert case["source"].startswith(SOURCES), case["source"]
    parsed = parse_grounding(case["text"], size=PageSize(*case["page_size"]), query=_query(case["prompt"]))
    want, r = case["expect"], parsed.result
    assert ("ok" if parsed.ok else "parse_error") == want["status"], (case["id"], parsed.error, r)
    assert r["found"] is want["found"], (case["id"], r)
    if "error" in want:
        assert parsed.error == want["error"], (case["id"], parsed.error)
    if "caption" in want:
        assert r["caption"] == want["caption"], (case["id"], r["caption"])
    _check_boxes(r["boxes"], want["boxes"], case["id"])
    _contains_all(r["notes"], want.get("notes_contain", []), case["id"])


@pytest.mark.parametrize("case", cases("ocr.json"), ids=lambda c: c["id"])
def test_real_ocr_answer(case: dict) -> None:
    assert case["source"].startswith(SOURCES), case["source"]
    parsed = parse_markdown(case["text"], size=PageSize(*case["page_size"]))
    want, r = case["expect"], parsed.result
    assert ("ok" if parsed.ok else "parse_error") == want["status"], (case["id"], parsed.error)
    assert r["markdown"] == want["markdown"], (case["id"], r["markdown"])
    assert "<|ref|>" not in r["markdown"] and "<|det|>" not in r["markdown"]
    _check_boxes(r["boxes"], want.get("boxes", []), case["id"])
    _contains_all(r["notes"], want.get("notes_contain", []), case["id"])
