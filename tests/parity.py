"""Loader for the parity fixtures: golden outputs of the official DeepSeek-VL2 reference implementation.

Shared by the test modules (`from parity import PARITY_DIR, load_cases, ...`). The directory defaults to
`<repo>/../shared/parity` and can be pointed elsewhere with DSVL2_PARITY_DIR; case and checkpoint names
are read from disk, never assumed. Layout and meaning of every file: `PARITY_DIR/README.md`.

Tests that iterate fixtures must fail, not skip, when none are found (`require`), and may report what
they checked with `record(kind)`; tests/conftest.py prints the totals at the end of the run.

DSVL2_TEST_DEVICE (default cpu, e.g. cuda) is the device tests/test_parity.py runs the model on (`TEST_DEVICE`);
the other test modules stay on the CPU.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dsvl2.model.requests import Message

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("DSVL2_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))
TEST_DEVICE = torch.device(os.environ.get("DSVL2_TEST_DEVICE", "cpu"))

CHECKED: Counter[str] = Counter()  # kind -> how many fixture items were verified in this run


def record(kind: str, n: int = 1) -> None:
    """Count `n` verified fixture items of `kind` (e.g. "processor cases") for the end-of-run summary."""
    CHECKED[kind] += n


def require(items: list[Any], what: str) -> list[Any]:
    """`items`, or an AssertionError naming the directory when there are none (a missing fixture set must
    fail the run rather than silently skip it)."""
    assert items, f"no {what} found under {PARITY_DIR} (set DSVL2_PARITY_DIR to the fixture directory)"
    return items


def read_json(name: str) -> Any:
    """A JSON file at the top of the fixture directory, e.g. "tokenizer_cases.json"."""
    return json.loads((PARITY_DIR / name).read_text(encoding="utf-8"))


def load_image(name: str) -> Image.Image:
    """An input image from `PARITY_DIR/images`, loaded and converted to RGB (as fed to the reference)."""
    with Image.open(PARITY_DIR / "images" / name) as im:
        return im.convert("RGB")


def checkpoint_names() -> list[str]:
    """Names of the checkpoint directories under `checkpoints/`, sorted."""
    root = PARITY_DIR / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def checkpoint_dir(name: str) -> Path:
    """Hugging Face layout: config.json, processor_config.json, tokenizer files, safetensors shards."""
    return PARITY_DIR / "checkpoints" / name


def tokenizer_dir() -> Path:
    """The test tokenizer alone (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    return PARITY_DIR / "tokenizer"


@dataclass(frozen=True, slots=True)
class Case:
    """One `cases/<name>/` directory: a batch of B conversations (`rows`) and the reference outputs."""

    name: str
    path: Path
    rows: tuple[str, ...]  # one name per batch row (a single-sample case has rows == (name,))
    json: dict[str, Any] = field(repr=False, compare=False)  # case.json, the manifest

    @classmethod
    def load(cls, path: Path) -> Case:
        manifest = json.loads((path / "case.json").read_text(encoding="utf-8"))
        return cls(name=path.name, path=path, rows=tuple(manifest["rows"]), json=manifest)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def conversations(self) -> list[tuple[Message, ...]]:
        """The B conversations as `Message` tuples, images loaded as RGB PIL images (fresh each call)."""
        return [
            tuple(
                Message(turn["role"], turn["content"], tuple(load_image(n) for n in turn.get("images", ())))
                for turn in conversation
            )
            for conversation in self.json["conversations"]
        ]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Processor outputs: input_ids, attention_mask, images_seq_mask, images_spatial_crop,
        position_ids, seq_lens, num_image_tokens, labels, images_tile_is_padding (see case.json `files`)."""
        return load_file(self.path / "inputs.safetensors")

    def pixels(self) -> torch.Tensor:
        """The processor's `images` tensor, (B, N_max, 3, 384, 384) float32, reproduced bit for bit from
        pixels.npz: (u8 / 255 - 0.5) / 0.5, and 0.0 on the tiles marked `images_tile_is_padding`."""
        with np.load(self.path / "pixels.npz") as npz:
            u8 = torch.from_numpy(npz["images_u8"])
            padding = torch.from_numpy(npz["images_tile_is_padding"])
        x = u8.to(torch.float32).div(255).sub(0.5).div(0.5)
        x[padding] = 0.0
        return x

    def checkpoints(self) -> list[str]:
        """Checkpoints with stored model outputs for this case."""
        return [n for n in checkpoint_names() if (self.path / f"{n}.safetensors").is_file()]

    def outputs(self, checkpoint: str) -> dict[str, torch.Tensor]:
        """Model outputs of `checkpoint` for this case (logits, generated ids, routing, ...)."""
        file = self.path / f"{checkpoint}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"case {self.name} has no outputs for checkpoint {checkpoint!r}")
        return load_file(file)


def load_cases() -> list[Case]:
    """Every `cases/<name>/case.json`, sorted by name; [] when the directory is missing."""
    root = PARITY_DIR / "cases"
    if not root.is_dir():
        return []
    return [Case.load(p) for p in sorted(root.iterdir()) if (p / "case.json").is_file()]


@functools.cache
def parity_model(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The checkpoint `name` loaded once per test session (read-only use: tests must not modify it)."""
    from dsvl2.model.weights import load_model

    return load_model(checkpoint_dir(name), dtype=dtype, device=device)


@functools.cache
def parity_processor(name: str):
    from dsvl2.model.processor import Processor

    return Processor.from_dir(checkpoint_dir(name))
