"""Grounding parser on golden raw strings: labelled boxes, repairs, digit loops, open det blocks, "not found" as
a result, templates and options; OCR's Markdown: fences, lead-ins, grounding markup read by the same reader.
Property tests (hypothesis): no text makes either parser raise, and no number of a det payload goes unreported."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvl2.pipelines.base import OptionError, PageSize
from dsvl2.pipelines.ground import DEFAULT_TEMPLATE, TEMPLATES, GroundTask, check_box, parse_grounding
from dsvl2.pipelines.ocr import parse_markdown

SIZE = PageSize(1000, 2000, 500.0, 1000.0, 144.0)


def boxes(text: str, **kw):
    p = parse_grounding(text, size=SIZE, **kw)
    return p, p.result["boxes"]


# --- boxes -----------------------------------------------------------------------------------------------------


def test_grounding_several_refs_and_boxes_in_three_frames():
    p, bs = boxes(
        "<|ref|>cat<|/ref|><|det|>[[10, 20, 500, 600], [700,800,999,999]]<|/det|> and "
        "<|ref|>dog<|/ref|> <|det|>[[0, 0, 999, 999]]<|/det|>"
    )
    assert p.ok and p.result["found"] and [b["label"] for b in bs] == ["cat", "cat", "dog"]
    assert bs[0]["box"] == [10, 20, 500, 600]
    assert bs[0]["box_px"] == [10.0, 40.0, 500.5, 1201.2]
    assert bs[0]["box_pt"] == [5.01, 20.02, 250.25, 600.6]
    assert bs[2]["box_px"] == [0.0, 0.0, 1000.0, 2000.0]
    assert p.result["caption"] == "cat and dog"


def test_1000_is_a_rounding_slip_but_digit_loops_and_negatives_are_invalid():
    p, bs = boxes("<|ref|>x<|/ref|><|det|>[[5, 20, 1000, 600], [1200, 20, 5, 600], [-3, 50, 40, 10]]<|/det|>")
    assert [(b["status"], b["box"]) for b in bs] == [
        ("repaired", [5, 20, 999, 600]),
        ("invalid", None),
        ("invalid", None),
    ]
    assert bs[0]["notes"] == ["clamped 1000 to 999"]
    assert "1200 outside the 0–999 grid" in bs[1]["notes"][0] and "-3 outside" in bs[2]["notes"][0]
    assert not p.ok and p.error == "2 of 3 box(es) invalid" and p.result["found"]


@pytest.mark.parametrize("loop", ["9999", "99999", "9" * 50, "9" * 5000])
def test_a_digit_loop_is_never_clamped_into_a_box(loop):
    p, bs = boxes(f"<|ref|>x<|/ref|><|det|>[[0, 460, 891, {loop}]]<|/det|>")
    assert bs[0]["status"] == "invalid" and bs[0]["box"] is None and not p.ok and not p.result["found"]
    assert len(bs[0]["notes"][0]) < 120  # a runaway is quoted by its head and length


def test_swapped_corners_are_reordered():
    p, bs = boxes("<|ref|>x<|/ref|><|det|>[[500, 60, 100, 10]]<|/det|>")
    assert p.ok and bs[0]["box"] == [100, 10, 500, 60] and bs[0]["notes"] == ["swapped x1 and x2", "swapped y1 and y2"]


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


def test_stray_numbers_beside_a_box_are_an_invalid_entry():
    p, bs = boxes("<|det|>[245,[234,543,542,244]]<|/det|>", query="q")
    assert [(b["status"], b["raw"]) for b in bs] == [("repaired", "[234,543,542,244]"), ("invalid", "245")]
    assert not p.ok


def test_an_open_det_ends_at_the_next_label_which_gets_its_own_boxes():
    p, bs = boxes("<|ref|>A<|/ref|><|det|>[[220, <|ref|>B<|/ref|><|det|>[[220, 416, 417, 720]]<|/det|>")
    assert [(b["label"], b["status"], b["raw"]) for b in bs] == [
        ("A", "invalid", "[220,"),
        ("B", "ok", "[220, 416, 417, 720]"),
    ]
    assert "unclosed <|det|>: read up to the next label" in p.result["notes"]
    assert p.result["caption"] == "A B"


def test_grounding_unclosed_det_and_zero_area():
    p, bs = boxes("<|ref|>x<|/ref|><|det|>[[5, 5, 5, 9]]")
    assert bs[0]["status"] == "invalid" and bs[0]["notes"][-1] == "zero width or height"
    assert "unclosed <|det|>: read up to the end of the answer" in p.result["notes"]


def test_grounding_image_pages_have_no_points():
    p = parse_grounding("<|det|>[[0,0,999,999]]<|/det|>", size=PageSize(640, 480))
    assert p.result["boxes"][0]["box_px"] == [0.0, 0.0, 640.0, 480.0] and p.result["boxes"][0]["box_pt"] is None


def test_check_box_float_values():
    assert check_box([0.5, 1, 2.5, 3]) == ("ok", [0.5, 1, 2.5, 3], [])


# --- not found, captions, malformed ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["I see no giraffe.", "<|ref|>the giraffe<|/ref|>", "<|det|><|/det|>"])
def test_an_answer_without_boxes_is_not_found_not_an_error(text):
    p, bs = boxes(text, query="the giraffe")
    assert p.ok and p.error is None and bs == [] and p.result["found"] is False


def test_a_ref_without_a_box_is_named_in_a_note():
    p, _ = boxes("<|ref|>the giraffe<|/ref|>")
    assert p.result["notes"] == ["no box for <|ref|>the giraffe<|/ref|>"] and p.result["caption"] == "the giraffe"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "empty answer"),
        ("  \n", "empty answer"),
        ("[533, 132, 457]", "box numbers without <|det|> markup"),
        ("<|ref|>x<|/ref|>\n<|User|>: <image>\nagain", "the answer runs on into the chat template (<|User|>)"),
    ],
)
def test_malformed_answers_are_parse_errors(text, error):
    p, _ = boxes(text, query="x")
    assert not p.ok and p.error == error


def test_grounded_caption_keeps_words_and_labels_its_boxes():
    text = (
        "Well, you can put it in the <|ref|>trash can<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|> next to the "
        "<|ref|>door<|/ref|><|det|>[[50, 60, 70, 80], [90, 100, 110, 120]]<|/det|>."
    )
    p, bs = boxes(text)
    assert p.ok and p.result["caption"] == "Well, you can put it in the trash can next to the door."
    assert [b["label"] for b in bs] == ["trash can", "door", "door"] and p.result["query"] is None


# --- templates and options ----------------------------------------------------------------------------------------


def test_templates_by_name_custom_and_default():
    assert DEFAULT_TEMPLATE == TEMPLATES["paper"] == "Locate <|ref|>{query}<|/ref|> in the given image."
    assert GroundTask.from_options(query="a cat").prompts == ("Locate <|ref|>a cat<|/ref|> in the given image.",)
    assert GroundTask.from_options(query="x", template="readme").prompts == ("<|ref|>x<|/ref|>.",)
    assert GroundTask.from_options(query="x", template="find-all").prompts == ("Find all the <|ref|>x<|/ref|>",)
    own = GroundTask.from_options(query=["a", "b"], template="Where is <|ref|>{query}<|/ref|>?")
    assert own.prompts == ("Where is <|ref|>a<|/ref|>?", "Where is <|ref|>b<|/ref|>?")
    assert own.query_of("Where is <|ref|>b<|/ref|>?") == "b"
    whole = GroundTask.from_options(prompt="<|grounding|>Describe the image.")
    assert whole.prompts == ("<|grounding|>Describe the image.",) and whole.query_of(whole.prompts[0]) is None


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"query": "x", "template": "nonsense"}, "template"),
        ({"query": "x", "template": "paper", "prompt": "p {query}"}, "template"),
        ({"query": "x", "prompt": "Describe."}, "query"),
        ({"template": "paper"}, "query"),
        ({"query": "x", "prompt": " "}, "prompt"),
    ],
)
def test_bad_template_options_name_the_option(options, option):
    with pytest.raises(OptionError) as err:
        GroundTask.from_options(**options)
    assert err.value.option == option


def test_not_found_renders_as_such():
    from dsvl2.pipelines.base import PageRecord

    p = parse_grounding("There is no giraffe in this image.", size=SIZE, query="the giraffe")
    record = PageRecord(source="a.png", sha256=None, page=1, page_size=SIZE, task="ground", prompt="p",
                        model={}, settings={}, text="", result=p.result, status="ok")  # fmt: skip
    assert GroundTask.markdown(record) == "**the giraffe**\n_not found_ (There is no giraffe in this image.)"
    assert GroundTask.columns(p.result)["found"] is False


# --- OCR ------------------------------------------------------------------------------------------------------------


def test_ocr_strips_a_whole_page_fence():
    p = parse_markdown("```markdown\n# Title\ntext\n```")
    assert p.result["markdown"] == "# Title\ntext" and p.result["boxes"] == []
    assert not parse_markdown("  \n").ok


def test_ocr_drops_an_unambiguous_lead_in_and_closing_line_with_a_note():
    p = parse_markdown("Here is the text of the page:\n\n# Title\nbody\n\nLet me know if you need anything else.")
    assert p.result["markdown"] == "# Title\nbody"
    assert p.result["notes"] == [
        "dropped the lead-in line 'Here is the text of the page:'",
        "dropped the closing line 'Let me know if you need anything else.'",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Here's a detailed breakdown of each stage:\n### Stage 1",  # a sentence of the page, not a wrapper
        "Here is the text of the page:",  # nothing after it: the answer is kept as it is
        "# Minutes\nLet me know what you think, said the chair.\nAdjourned.",  # mid-page, not the last line
    ],
)
def test_ocr_keeps_lines_that_only_look_like_wrappers(text):
    assert parse_markdown(text).result["markdown"] == text.strip()


def test_ocr_grounding_markup_becomes_boxes_with_the_shared_reader():
    text = (
        "<|ref|>title<|/ref|><|det|>[[330, 198, 558, 230]]<|/det|>\n# Report\n"
        "The <|ref|>chart<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|> shows sales.\n<|ref|>x<|/ref|><|det|>[[1, 99999"
    )
    p = parse_markdown(text, size=SIZE)
    assert p.ok and p.result["markdown"] == "# Report\nThe chart shows sales."
    assert [(b["label"], b["status"]) for b in p.result["boxes"]] == [
        ("title", "ok"),
        ("chart", "ok"),
        ("x", "invalid"),
    ]
    assert p.result["boxes"][0]["box_px"] == [330.3, 396.4, 558.6, 460.5]
    assert any("unclosed <|det|>" in n for n in p.result["notes"])


# --- properties -----------------------------------------------------------------------------------------------------

PIECES = [*"0123456789", ",", " ", "[", "]", "[[", "]]", ".", "-", "x", "99999"]
PAYLOAD = st.lists(st.sampled_from(PIECES), max_size=60)
MARKUP = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "[[", "]]", "1", "999", "1000", ",", "\n", "9" * 400]


@settings(max_examples=300, deadline=None)
@given(payload=PAYLOAD.map("".join), closed=st.booleans(), tail=st.sampled_from(["", " done", "<|ref|>b<|/ref|>"]))
def test_every_number_of_a_det_payload_is_a_box_or_named_in_a_note(payload, closed, tail):
    """Catches a fragment of the model's answer that vanishes between the answer and the record."""
    text = f"<|ref|>a<|/ref|><|det|>{payload}{'<|/det|>' if closed else ''}{tail}"
    for result in (parse_grounding(text, size=SIZE).result, parse_markdown(text, size=SIZE).result):
        told = [b["raw"] for b in result["boxes"]] + [n for b in result["boxes"] for n in b["notes"]] + result["notes"]
        for number in re.findall(r"\d+", payload):
            assert any(number in t for t in told), (number, payload, result)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.lists(st.sampled_from(MARKUP), max_size=40).map("".join))
def test_no_text_makes_the_parsers_raise(text):
    g, o = parse_grounding(text, size=SIZE, query="q"), parse_markdown(text, size=SIZE)
    assert (g.ok or g.error) and (o.ok or o.error)
    assert all(b["box"] is None or (min(b["box"]) >= 0 and max(b["box"]) <= 999) for b in g.result["boxes"])
