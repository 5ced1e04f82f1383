"""Tokenizer and processor: exact parity with the reference outputs in the parity fixtures, plus the
contract checks (caller's images untouched, typed errors with clear messages)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from parity import (
    PARITY_DIR,
    Case,
    checkpoint_dir,
    checkpoint_names,
    load_cases,
    read_json,
    record,
    require,
    tokenizer_dir,
)
from PIL import Image, ImageOps

from model.errors import ConfigError, InputError, TokenizerError
from model.processor import (
    MAX_TILED_IMAGES,
    Processor,
    ProcessorConfig,
    pad_geometry,
    pad_image,
    plan_image,
)
from model.requests import ASSISTANT, IMAGE_TOKEN, USER, Message
from model.tokenizer import BOS, EOS, PAD, Tokenizer

BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "images_seq_mask",
    "images_spatial_crop",
    "position_ids",
    "seq_lens",
)


def _processor_dirs() -> list[Path]:
    """One checkpoint directory per distinct processor setup (config + tokenizer file): checkpoints that
    share both would produce identical inputs, so testing each once keeps the run short."""
    distinct: dict[tuple[ProcessorConfig, bytes], Path] = {}
    for name in checkpoint_names():
        d = checkpoint_dir(name)
        distinct.setdefault((ProcessorConfig.from_dir(d), (d / "tokenizer.json").read_bytes()), d)
    return list(distinct.values())


CASES = load_cases()
PROCESSOR_DIRS = _processor_dirs()
# An empty fixture set must fail, not skip: parametrize over a None placeholder that `require` rejects.
CASE_PARAMS = [(c, d) for c in CASES for d in PROCESSOR_DIRS] or [(None, None)]


@pytest.fixture(scope="module")
def processor() -> Processor:
    return Processor.from_dir(require(PROCESSOR_DIRS, "checkpoint directories")[0])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # compare float32 bit patterns (tells -0.0 from 0.0, NaN payloads, ...)


# ---------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize(
    ("case", "directory"),
    CASE_PARAMS,
    ids=[f"{c.name}-{d.name}" if c else "no-cases" for c, d in CASE_PARAMS],
)
def test_cases_match_reference_processor(case: Case | None, directory: Path | None) -> None:
    """Every case: prepare each conversation, collate, and compare every processor output exactly."""
    require(CASES, "parity cases")
    require(PROCESSOR_DIRS, "checkpoint directories")
    assert case is not None and directory is not None
    proc = Processor.from_dir(directory)
    items = [proc.prepare(conversation) for conversation in case.conversations()]
    batch = proc.collate(items)
    want = case.inputs()
    for key in BATCH_KEYS:
        got, ref = getattr(batch, key), want[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{case.name}.{key}: {got.shape} vs {ref.shape}"
        if not torch.equal(got, ref):
            row, col = (got != ref).nonzero()[0].tolist()[:2]
            pytest.fail(f"{case.name}.{key} differs first at [{row}, {col}]: {got[row]} vs {ref[row]}")
    ref_counts = want["num_image_tokens"].tolist()  # (B, I_max), 0 where a row has fewer images
    for row, item in enumerate(items):
        counts = list(item.num_image_tokens)
        assert counts + [0] * (len(ref_counts[row]) - len(counts)) == ref_counts[row], f"{case.name} row {row}"
    pixels = case.pixels()
    assert batch.images.shape == pixels.shape, f"{case.name}: images {batch.images.shape} vs {pixels.shape}"
    if not torch.equal(_bits(batch.images), _bits(pixels)):
        diff = (batch.images - pixels).abs()
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        pytest.fail(f"{case.name}: pixels differ, max |diff| {diff.max():.3g} at (b, tile, c, y, x) = {worst}")
    record("processor cases")


def test_tiling_table(processor: Processor) -> None:
    """processor_tiling_table.json: best resolution, tile and token counts (also with 3+ images), and the
    resize / paste geometry of both views, for every listed image size."""
    table = read_json("processor_tiling_table.json")
    cfg = processor.config
    assert [tuple(c) for c in table["candidate_resolutions"]] == list(cfg.candidate_resolutions)
    assert tuple(table["pad_color"]) == cfg.pad_color
    rows = require(table["rows"], "tiling table rows")
    side = (cfg.image_size, cfg.image_size)
    for row in rows:
        size = tuple(row["image_size"])
        plan = plan_image(size, num_images=1, cfg=cfg)
        got = {
            "best_resolution": list(plan.resolution),
            "num_width_tiles": plan.num_width_tiles,
            "num_height_tiles": plan.num_height_tiles,
            "num_tiles_incl_global": plan.num_tiles,
            "num_image_tokens": plan.num_tokens,
            "num_image_tokens_if_3_or_more_images": plan_image(size, num_images=3, cfg=cfg).num_tokens,
            "global_view": _geometry(size, side),
            "local_view": _geometry(size, plan.resolution),
        }
        assert got == {k: row[k] for k in got}, f"image size {size}"
        assert plan_image(size, num_images=MAX_TILED_IMAGES, cfg=cfg) == plan
    record("tiling table rows", len(rows))


def _geometry(size: tuple[int, int], target: tuple[int, int]) -> dict[str, list[int]]:
    resized, offset = pad_geometry(size, target)
    return {"resized": list(resized), "paste_offset": list(offset)}


def test_tokenizer_cases(tokenizer: Tokenizer) -> None:
    """tokenizer_cases.json: encode (no special tokens) and bos + encode match; decode round-trips with
    bos/eos/pad removed."""
    data = read_json("tokenizer_cases.json")
    assert len(tokenizer) == data["len_tokenizer"]
    cases = require(data["cases"], "tokenizer cases")
    for case in cases:
        ids = tokenizer.encode(case["text"])
        assert ids == case["ids"], f"encode({case['text']!r})"
        assert [tokenizer.bos_id, *ids] == case["ids_with_special"], f"bos + encode({case['text']!r})"
        expected = case["text"]
        for dropped in (BOS, EOS, PAD):
            expected = expected.replace(dropped, "")
        assert tokenizer.decode(ids) == expected, f"decode(encode({case['text']!r}))"
    record("tokenizer cases", len(cases))


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    special = read_json("generation_info.json")["tokenizer"]["special_ids"]
    assert {tok: tokenizer.token_id(tok) for tok in special} == special
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        special[BOS],
        special[EOS],
        special[PAD],
    )
    assert tokenizer.image_id == special[IMAGE_TOKEN]


# ---------------------------------------------------------------------------------------------------
# Behaviour


def test_pad_image_matches_pillow() -> None:
    """Our padding (built on pad_geometry) equals ImageOps.pad pixel for pixel, rounding edge cases too."""
    rng = np.random.default_rng(0)
    sizes = [(50, 40), (2, 3), (385, 384), (769, 768), (999, 501), (333, 777), (1000, 3), (3, 1000)]
    targets = [(384, 384), (768, 384), (384, 1152), (1152, 768)]
    for w, h in sizes:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for target in targets:
            ours = pad_image(image, target, (127, 127, 127))
            pillow = ImageOps.pad(image, target, method=Image.Resampling.BICUBIC, color=(127, 127, 127))
            assert ours.tobytes() == pillow.tobytes(), f"image {w}x{h} into {target}"


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_prepare_leaves_callers_image_alone(processor: Processor, mode: str, capsys) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    before = (image.mode, image.size, image.tobytes(), dict(image.info))
    conversation = (Message(USER, f"{IMAGE_TOKEN}\nRead it.", (image,)), Message(ASSISTANT, ""))
    prepared = processor.prepare(conversation)
    processor.collate([prepared])
    assert (image.mode, image.size, image.tobytes(), dict(image.info)) == before
    reference = processor.prepare(
        (Message(USER, f"{IMAGE_TOKEN}\nRead it.", (image.convert("RGB"),)), Message(ASSISTANT, ""))
    )
    assert torch.equal(prepared.tiles, reference.tiles)
    assert capsys.readouterr() == ("", "")


def test_text_only_batch(processor: Processor) -> None:
    """Rows without images still get one all-zero tile and one (0, 0) crop, like the reference."""
    tok = processor.tokenizer
    items = [processor.prepare((Message(USER, text), Message(ASSISTANT, ""))) for text in ("Hi.", "Say more.")]
    assert items[0].tiles.shape == (0, 3, 384, 384) and items[0].images_spatial_crop.shape == (0, 2)
    batch = processor.collate(items)
    assert batch.images.shape == (2, 1, 3, 384, 384) and not batch.images.any()
    assert batch.images_spatial_crop.tolist() == [[[0, 0]], [[0, 0]]]
    short, long = (int(n) for n in batch.seq_lens)
    assert batch.input_ids[0, : long - short].tolist() == [tok.pad_id] * (long - short)
    assert batch.position_ids[0].tolist() == [1] * (long - short) + list(range(short))


def test_empty_user_turn_follows_template(processor: Processor) -> None:
    """The deepseek template renders an empty user turn as "<|User|>:" with no space or separator."""
    tok = processor.tokenizer
    prepared = processor.prepare((Message(USER, "  "), Message(ASSISTANT, "")))
    assert prepared.input_ids.tolist() == [tok.bos_id, *tok.encode(f"{USER}:{ASSISTANT}:")]


def _turn(role: str, content: str, images: tuple = ()) -> SimpleNamespace:
    """A turn that skips Message's own validation, to reach the processor's checks."""
    return SimpleNamespace(role=role, content=content, images=images)


IMG = Image.new("RGB", (8, 8))
BAD_CONVERSATIONS = {
    "empty": ((), "empty conversation"),
    "no final assistant turn": ((Message(USER, "Hi"),), "last turn must be an empty assistant turn"),
    "final answer not empty": (
        (Message(USER, "Hi"), Message(ASSISTANT, "Hello")),
        "last turn must be an empty assistant turn",
    ),
    "image in assistant turn": (
        (
            Message(USER, "Hi"),
            Message(ASSISTANT, IMAGE_TOKEN, (IMG,)),
            Message(USER, "?"),
            Message(ASSISTANT, ""),
        ),
        "assistant turns cannot hold images",
    ),
    "more placeholders than images": (
        (_turn(USER, f"{IMAGE_TOKEN}{IMAGE_TOKEN}", (IMG,)), Message(ASSISTANT, "")),
        "2 <image> placeholders but 1 images",
    ),
    "image without placeholder": (
        (_turn(USER, "Hi", (IMG,)), Message(ASSISTANT, "")),
        "0 <image> placeholders",
    ),
    "no user turn": ((Message(ASSISTANT, ""),), "no user turn"),
    "unknown role": ((_turn("system", "Hi"), Message(ASSISTANT, "")), "unknown role 'system'"),
    "empty image": (
        (Message(USER, IMAGE_TOKEN, (Image.new("RGB", (0, 5)),)), Message(ASSISTANT, "")),
        "is empty",
    ),
}


@pytest.mark.parametrize("name", BAD_CONVERSATIONS)
def test_bad_conversations_raise_input_error(processor: Processor, name: str) -> None:
    conversation, message = BAD_CONVERSATIONS[name]
    with pytest.raises(InputError, match=message):
        processor.prepare(conversation)


def test_collate_nothing_raises(processor: Processor) -> None:
    with pytest.raises(InputError, match="nothing to collate"):
        processor.collate([])


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json in"):
        Tokenizer.from_dir(tmp_path)
    data = json.loads((tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<|ref|>", "<|User|>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"missing special tokens <\|ref\|>, <\|User\|>") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    config = json.loads((tokenizer_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<unk>"}))
    with pytest.raises(TokenizerError, match="pad_token is '<unk>'"):
        Tokenizer.from_dir(tmp_path)


def test_decode_keeps_grounding_and_drops_unknown_ids(tokenizer: Tokenizer) -> None:
    text = "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"
    ids = [
        tokenizer.bos_id,
        *tokenizer.encode(text),
        len(tokenizer),
        10**6,
        tokenizer.eos_id,
        tokenizer.pad_id,
    ]
    assert tokenizer.decode(ids) == text


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"processor_config\.json not found"):
        Processor.from_dir(tokenizer_dir())
    directory = require(PROCESSOR_DIRS, "checkpoint directories")[0]
    base = json.loads((directory / "processor_config.json").read_text(encoding="utf-8"))
    with pytest.raises(ConfigError, match="not a multiple of image_size"):
        ProcessorConfig.from_dict({**base, "candidate_resolutions": [[384, 384], [500, 384]]})
    with pytest.raises(ConfigError, match="unsupported sft_format"):
        ProcessorConfig.from_dict({**base, "sft_format": "plain"})
    # candidate_resolutions may live in config.json instead
    (tmp_path / "processor_config.json").write_text(
        json.dumps({k: v for k, v in base.items() if k != "candidate_resolutions"}), encoding="utf-8"
    )
    (tmp_path / "config.json").write_text(json.dumps({"candidate_resolutions": [[384, 384]]}), encoding="utf-8")
    assert ProcessorConfig.from_dir(tmp_path).candidate_resolutions == ((384, 384),)


def test_parity_dir_is_configured() -> None:
    """The fixture directory exists, so an empty parameter list above can only mean missing cases."""
    assert PARITY_DIR.is_dir(), f"parity fixtures not found at {PARITY_DIR}"
