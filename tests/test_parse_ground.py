"""Grounding parser on golden raw strings: labelled boxes, repairs, malformed payloads; OCR's Markdown."""

from __future__ import annotations

from dsvl2.pipelines.base import PageSize
from dsvl2.pipelines.ground import check_box, parse_grounding
from dsvl2.pipelines.ocr import parse_markdown

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
