"""`--resume` knows a model by what answers, not by how it was named: the same checkpoint under another
path (`ckpt/../ckpt`, a symlink, a copy) is the same model and nothing is redone; a re-exported checkpoint
(other weights) or another dtype redoes the pages. Real tiny checkpoint; a page needing no work loads no
model, so counting loads counts redone work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fakes import isolate, make_image
from parity import PARITY_DIR, checkpoint_dir
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsvl2 import backend
from dsvl2.app import app
from dsvl2.model.weights import fingerprint

CKPT = checkpoint_dir("tiny-mha")


@pytest.fixture
def loads(monkeypatch, tmp_path) -> list[str]:
    """Each model loaded in the test, by the --model argument that asked for it."""
    assert (PARITY_DIR / "checkpoints" / "tiny-mha").is_dir(), f"tiny-mha checkpoint not found under {PARITY_DIR}"
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_image(Path("page.png"), (80, 60))
    seen: list[str] = []
    real = backend.runtime_factory

    def counting(model: str, **kw):
        seen.append(model)
        return real(model, **kw)

    monkeypatch.setattr(backend, "runtime_factory", counting)
    return seen


def ocr(model: Path | str, *extra: str) -> None:
    args = ["ocr", "page.png", "-o", "out.jsonl", "--resume", "--model", str(model), "--max-new-tokens", "2", *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr


def reexport(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint whose first weight is changed, as a fine-tune saved in place would be."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_the_same_model_under_another_path_is_not_redone(loads, tmp_path) -> None:
    ocr(CKPT)
    assert loads == [str(CKPT)]
    (tmp_path / "link").symlink_to(CKPT)
    shutil.copytree(CKPT, tmp_path / "copy")
    for same in (f"{CKPT}/../{CKPT.name}", tmp_path / "link", tmp_path / "copy"):
        ocr(same)
    assert loads == [str(CKPT)], "a page was redone for the same checkpoint under another path"


def test_a_reexported_checkpoint_or_another_dtype_redoes_the_page(loads, tmp_path) -> None:
    ocr(CKPT, "--dtype", "float32")
    ocr(CKPT, "--dtype", "bfloat16")
    assert len(loads) == 2, "another dtype must redo the page"
    other = reexport(CKPT, tmp_path / "reexported")
    ocr(other, "--dtype", "float32")
    assert loads[-1] == str(other) and len(loads) == 3, "other weights must redo the page"


def test_fingerprint_follows_content_not_path(tmp_path) -> None:
    shutil.copytree(CKPT, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == fingerprint(CKPT)
    assert fingerprint(reexport(CKPT, tmp_path / "other")) != fingerprint(CKPT)
    config = tmp_path / "copy" / "config.json"
    config.write_text(config.read_text() + "\n")  # any byte of the config may change an answer
    assert fingerprint(tmp_path / "copy") != fingerprint(CKPT)
