"""Broken model files through the CLI and the real runtime loader, on copies of the tiny parity checkpoint:
a safetensors header that lies, a config with missing or absurd values, a tokenizer without the special
tokens, pickle weights. Each is one clear line on stderr and exit 2 before any page is processed (nothing
on stdout, no output file); a pickle is never unpickled, even sitting next to good weights."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from fakes import isolate, make_image
from parity import checkpoint_dir
from typer.testing import CliRunner

from dsvl2.app import app

TINY = checkpoint_dir("tiny-mha")
MARKER = "UNPICKLED"


class _Evil:
    """Unpickling this creates the marker file: proof that a loader ran pickle code."""

    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


@pytest.fixture
def checkpoint(monkeypatch, tmp_path) -> Path:
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_image(Path("p.png"), size=(40, 30))
    return Path(shutil.copytree(TINY, tmp_path / "ckpt"))


def run(model: Path):
    args = ["ocr", "p.png", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2"]
    return CliRunner().invoke(app, [*args, "-o", "out.jsonl"], catch_exceptions=False)


def assert_setup_error(result, label: str, *needles: str) -> None:
    assert result.exit_code == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {label}: "), line
    for needle in needles:
        assert needle in line, line
    assert result.stdout == "" and not Path("out.jsonl").exists()  # no work started


def rewrite_header(file: Path, change) -> None:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


@pytest.mark.parametrize(
    "lie",
    [
        lambda h: first_tensor(h).__setitem__("data_offsets", [0, 10**12]),  # more bytes than the file has
        lambda h: first_tensor(h).__setitem__("shape", [s * 2 for s in first_tensor(h)["shape"]]),
    ],
    ids=["offsets", "shape"],
)
def test_a_safetensors_header_that_lies_about_sizes(checkpoint, lie):
    rewrite_header(checkpoint / "model.safetensors", lie)
    assert_setup_error(run(checkpoint), "model weights", "model.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda c: c.pop("language_config"), "has no 'language_config'"),
        (lambda c: c["language_config"].__setitem__("hidden_size", -4), "language_config.hidden_size"),
        (lambda c: c["language_config"].__setitem__("num_attention_heads", 0), "num_attention_heads"),
        (lambda c: c["language_config"].__setitem__("rms_norm_eps", "tiny"), "rms_norm_eps"),
        (lambda c: c["language_config"].__setitem__("vocab_size", 10**12), "language_config.vocab_size"),
        (lambda c: c["language_config"].__setitem__("vocab_size", 2048), "misshaped"),
    ],
    ids=["missing-section", "negative", "zero-heads", "wrong-type", "absurd-vocab", "vocab-unlike-weights"],
)
def test_a_config_with_missing_or_absurd_values(checkpoint, change, needle):
    config = json.loads((checkpoint / "config.json").read_text())
    change(config)
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = run(checkpoint)
    assert_setup_error(result, "model weights" if needle == "misshaped" else "model config", needle)


def test_a_tokenizer_missing_a_special_token(checkpoint):
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|ref|>"]
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert_setup_error(run(checkpoint), "tokenizer", "missing special tokens <|ref|>")


def test_pickle_weights_are_refused_and_never_unpickled(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    assert_setup_error(run(checkpoint), "model weights", "only safetensors checkpoints are accepted")
    assert not Path(MARKER).exists()


def test_a_pickle_next_to_good_weights_is_ignored(checkpoint):
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Evil()))
    result = run(checkpoint)
    assert result.exit_code == 0, result.stderr
    [record] = [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]
    assert record["status"] in ("ok", "truncated") and record["tokens"]["generated"] >= 1
    assert not Path(MARKER).exists()
