"""Tokenizer and processor behaviour: the contract checks (caller's images untouched, padding identical to
Pillow's, typed errors with clear messages). Exact parity with the reference is in test_parity.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from parity import PARITY_DIR, checkpoint_dir, checkpoint_names, require, tokenizer_dir
from PIL import Image, ImageOps

from dsvl2.model.errors import ConfigError, InputError, TokenizerError
from dsvl2.model.processor import (
    Processor,
    ProcessorConfig,
    pad_image,
)
from dsvl2.model.requests import ASSISTANT, IMAGE_TOKEN, USER, Message
from dsvl2.model.tokenizer import Tokenizer

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
    directory = checkpoint_dir(require(checkpoint_names(), "parity checkpoints")[0])
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


@pytest.mark.parametrize("sizes", [(), ((640, 480),), ((300, 900), (1200, 800)), ((64, 64),) * 3])
def test_count_tokens_is_the_prepared_length(processor: Processor, sizes) -> None:
    """A server refuses a request past the context from `count_tokens` alone: it must equal what `prepare`
    builds (tiled for up to two images, one view each from three on)."""
    images = tuple(Image.new("RGB", size, (200, 10, 10)) for size in sizes)
    content = "".join(f"{IMAGE_TOKEN}\n" for _ in images) + "Describe."
    conversation = (Message(USER, content, images), Message(ASSISTANT, "ok"), Message(USER, "More?"),
                    Message(ASSISTANT, ""))
    assert processor.count_tokens(conversation) == len(processor.prepare(conversation).input_ids)
