"""Property-based tests (hypothesis): the processor keeps token counts, masks and tiles consistent for any
image size and aspect ratio; the parsers turn any string into a result that fits the record schema (never
an exception, never NaN, no well-formed box lost); page ranges, shards, output keys and displayed sources
hold their contracts for any input. Small examples and few of them: the whole file runs in seconds."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from parity import checkpoint_dir
from PIL import Image
from test_writers import violations

from dsvl2.inputs import display, parse_pages, parse_shard, safe_key
from dsvl2.model.processor import Processor, num_image_tokens, plan_image
from dsvl2.model.requests import user_prompt
from dsvl2.pipelines.base import PageSize
from dsvl2.pipelines.chart import parse_chart
from dsvl2.pipelines.ground import GRID, parse_grounding
from dsvl2.pipelines.ocr import parse_markdown
from dsvl2.pipelines.schema import results
from dsvl2.pipelines.table import parse_tables

TINY = checkpoint_dir("tiny-mha")
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny() -> Processor:
    return Processor.from_dir(TINY)


# --- the processor -------------------------------------------------------------------------------------------

SIZES = st.one_of(
    st.tuples(st.integers(1, 1200), st.integers(1, 1200)),
    st.tuples(st.integers(1, 6), st.integers(1, 20_000)),  # a thin strip, either way up
    st.tuples(st.integers(1, 20_000), st.integers(1, 6)),
)


@FEW
@given(size=SIZES, colour=st.integers(0, 255))
def test_any_image_size_gives_consistent_tokens_masks_and_tiles(tiny, size, colour):
    """Catches token counts that disagree with the tile grid (the model would scatter image features into
    text positions), tiles of the wrong shape, and non-finite pixels from degenerate resizes."""
    image = Image.new("RGB", size, (colour, 255 - colour, 7))
    prepared = tiny.prepare(user_prompt("Read the page.", (image,)))
    cfg = tiny.config
    plan = plan_image(size, num_images=1, cfg=cfg)
    tw, th = plan.num_width_tiles, plan.num_height_tiles
    ids, mask = prepared.input_ids, prepared.images_seq_mask
    assert ids.shape == mask.shape and ids.dtype == torch.long and mask.dtype == torch.bool
    assert plan.resolution in cfg.candidate_resolutions
    n = int(mask.sum())
    assert n == num_image_tokens(tw, th, cfg) == prepared.num_image_tokens[0] == plan.num_tokens
    assert bool((ids[mask] == tiny.tokenizer.image_id).all()) and not bool(
        (ids[~mask] == tiny.tokenizer.image_id).any()
    )
    where = mask.nonzero().flatten()
    assert int(where[-1] - where[0]) + 1 == n, "image positions are not one contiguous block"
    assert prepared.tiles.shape == (1 + tw * th, 3, cfg.image_size, cfg.image_size)
    assert torch.isfinite(prepared.tiles).all()
    assert prepared.images_spatial_crop.tolist() == [[tw, th]]
    assert image.size == size and image.mode == "RGB"  # the caller's image is untouched


@settings(FEW, max_examples=8)
@given(a=SIZES, b=SIZES)
def test_collating_two_pages_keeps_each_rows_mask(tiny, a, b):
    items = [tiny.prepare(user_prompt("p", (Image.new("RGB", s),))) for s in (a, b)]
    batch = tiny.collate(items)
    for row, item in enumerate(items):
        t = item.input_ids.numel()
        assert int(batch.images_seq_mask[row].sum()) == int(item.images_seq_mask.sum())
        assert bool(batch.attention_mask[row, -t:].all()) and not bool(batch.attention_mask[row, :-t].any())
        assert int(batch.images_spatial_crop[row].sum()) == int(item.images_spatial_crop.sum())


# --- parsers --------------------------------------------------------------------------------------------------

PIECES = st.sampled_from(
    [
        *list("0123456789,.[]|-:<>/ \n\tab"),
        "<|ref|>",
        "<|/ref|>",
        "<|det|>",
        "<|/det|>",
        "<|grounding|>",
        "<table>",
        "<tr>",
        "<td rowspan=999>",
        "<th colspan=1000>",
        "</td>",
        "</table>",
        "|---|",
        "NaN",
        "inf",
        "1e309",
        "−",
        "%",
        "```",
        "Title:",
        "\x00",
        "\udcff",
    ]
)
ANSWERS = st.lists(PIECES, max_size=80).map("".join) | st.text(max_size=120)
SIZE = PageSize(640, 480, 612.0, 792.0, 144.0)


def strict_json(value: object) -> None:
    json.dumps(value, allow_nan=False, ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(ANSWERS)
def test_any_answer_parses_to_a_result_that_fits_the_schema(text):
    """Catches a parser exception escaping (it would cost the page), NaN or infinity in a result (invalid
    JSON), and a result whose shape the record schema does not allow."""
    for task, parsed in (
        ("ocr", parse_markdown(text)),
        ("table", parse_tables(text)),
        ("chart", parse_chart(text)),
        ("ground", parse_grounding(text, size=SIZE, query="q")),
    ):
        assert parsed.ok or parsed.error, task
        strict_json(parsed.result)
        assert violations(parsed.result, results()[task]) == [], (task, text)
    for t in parse_tables(text).result["tables"]:
        assert all(len(row) == t["n_columns"] for row in t["rows"])
    chart = parse_chart(text).result
    assert all(len(s["values"]) == len(chart["categories"]) for s in chart["series"])


BOX = st.tuples(st.integers(0, GRID - 1), st.integers(0, GRID - 1), st.integers(1, GRID), st.integers(1, GRID))


@settings(max_examples=150, deadline=None)
@given(before=ANSWERS, box=BOX, after=ANSWERS)
def test_a_well_formed_box_in_any_surroundings_is_never_lost(before, box, after):
    x1, y1, dx, dy = box
    x2, y2 = min(x1 + dx, GRID), min(y1 + dy, GRID)
    assume(x1 < x2 and y1 < y2)
    text = f"{before}<|ref|>target<|/ref|><|det|>[[{x1}, {y1}, {x2}, {y2}]]<|/det|>{after}"
    boxes = parse_grounding(text, size=SIZE).result["boxes"]
    mine = [b for b in boxes if b["box"] == [x1, y1, x2, y2]]
    assert mine and all(b["status"] == "ok" for b in mine), boxes
    for b in boxes:
        if b["box"] is not None:
            px = b["box_px"]
            assert 0 <= px[0] < px[2] <= SIZE.width_px and 0 <= px[1] < px[3] <= SIZE.height_px


# --- page ranges, shards, keys ----------------------------------------------------------------------------------

RANGES = st.lists(st.tuples(st.integers(1, 40), st.one_of(st.none(), st.integers(0, 40)), st.booleans()), max_size=6)


@settings(max_examples=150, deadline=None)
@given(ranges=RANGES, n_pages=st.integers(0, 50))
def test_page_ranges_select_exactly_the_pages_written(ranges, n_pages):
    parts, expected = [], []
    for start, length, open_ended in ranges:
        if open_ended:
            parts.append(f"{start}-")
            wanted = range(start, n_pages + 1)
        elif length is None:
            parts.append(str(start))
            wanted = range(start, min(start, n_pages) + 1)
        else:
            parts.append(f"{start}-{start + length}")
            wanted = range(start, min(start + length, n_pages) + 1)
        expected += [p for p in wanted if p not in expected]
    if not parts:
        with pytest.raises(ValueError):
            parse_pages("")
        return
    assert parse_pages(",".join(parts)).select(n_pages) == tuple(expected)


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=30, unique=True), n=st.integers(1, 7))
def test_shards_take_every_document_exactly_once(keys, n):
    shards = [parse_shard(f"{i}/{n}") for i in range(1, n + 1)]
    assert all(sum(s.takes(k) for s in shards) == 1 for k in keys)


NAMES = st.lists(
    st.text(min_size=1, max_size=300) | st.binary(min_size=1, max_size=300).map(os.fsdecode), min_size=1, max_size=4
)


@settings(max_examples=100, deadline=None)
@given(NAMES)
def test_any_path_components_give_a_safe_relative_key(parts):
    """Catches an output name that climbs out ('..'), is empty, holds a separator or control character,
    is not valid UTF-8, or is too long for the file system once the output suffix is added."""
    key = safe_key(parts)
    pieces = key.split("/")
    assert len(pieces) == len(parts)
    for piece in pieces:
        assert piece == "_" or (piece not in (".", "..") and not piece.startswith((" ", ".")))
        raw = piece.encode("utf-8")  # raises on a lone surrogate
        assert len(raw) <= 180 and not any(c < 32 or c == 127 for c in raw) and b"\\" not in raw


@settings(max_examples=150, deadline=None)
@given(st.text() | st.binary().map(os.fsdecode))
def test_displayed_sources_are_utf8_without_control_characters(name):
    shown = display(name)
    shown.encode("utf-8")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in shown)
    if name.isprintable() and name.encode("utf-8", "surrogatepass") == name.encode("utf-8", "surrogateescape"):
        assert shown == name  # ordinary names are shown as they are
