"""model/weights.py: every parity checkpoint loads exactly, and every bad model directory is one clear error.

Each bad directory is a copy of a small parity checkpoint in tmp_path with one thing broken. The checks: the
exception type (ConfigError for config.json, WeightsError for the weights), that the message names the file
or key at fault, and that all key problems arrive together in one error.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from parity import checkpoint_dir, checkpoint_names, require
from safetensors.torch import load_file, save_file

from dsvl2.model.errors import ConfigError, WeightsError
from dsvl2.model.weights import INDEX_FILE, SINGLE_FILE, checkpoint_files, load_model


def _with_file(name: str) -> str:
    names = [n for n in checkpoint_names() if (checkpoint_dir(n) / name).is_file()]
    return require(names, f"parity checkpoints with {name}")[0]


@pytest.fixture
def single(tmp_path) -> Path:
    """A writable copy of a single-file parity checkpoint."""
    return _copy(checkpoint_dir(_with_file(SINGLE_FILE)), tmp_path / "single")


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A writable copy of a sharded parity checkpoint (with model.safetensors.index.json)."""
    return _copy(checkpoint_dir(_with_file(INDEX_FILE)), tmp_path / "sharded")


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copyfile)  # the fixture files are read-only
    return target


def _rewrite_tensors(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _rewrite_header(file: Path, change: Callable[[dict], None]) -> None:
    """Edit the JSON header in place, keeping its length (padded with spaces, as the format allows)."""
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    data[8 : 8 + n] = text.ljust(n)
    file.write_bytes(bytes(data))


def _first_key(file: Path, prefix: str = "") -> str:
    return next(k for k in sorted(load_file(file)) if k.startswith(prefix))


def _load_error(directory: Path, kind: type[Exception] = WeightsError) -> str:
    with pytest.raises(kind) as err:
        load_model(directory)
    assert type(err.value) is kind
    return str(err.value)


# --- good checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", require(checkpoint_names(), "parity checkpoints"))
def test_parity_checkpoint_loads_every_tensor(name):
    """Single-file and sharded checkpoints load strictly, and each parameter equals its tensor in the files
    (the view_seperator spelling included)."""
    directory = checkpoint_dir(name)
    model = load_model(directory)
    state = model.state_dict()
    files = {}
    for file in checkpoint_files(directory):
        files.update(load_file(file))
    assert len(files) == len(state)
    for key, tensor in files.items():
        assert torch.equal(state["view_separator" if key == "view_seperator" else key], tensor), key
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_sharded_checkpoint_reads_the_index(sharded):
    files = checkpoint_files(sharded)
    assert [f.name for f in files] == sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))
    assert len(files) > 1
    load_model(sharded)


def test_load_in_bfloat16(single):
    model = load_model(single, dtype=torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    reference = load_file(single / SINGLE_FILE)
    assert torch.equal(model.language.lm_head.weight, reference["language.lm_head.weight"].to(torch.bfloat16))
    with torch.no_grad():
        logits = model.language.logits(model.language(model.language.embed(torch.arange(8)[None])))
    assert torch.isfinite(logits).all()


# --- bad directories: config.json ---------------------------------------------------------------------------


def test_no_config_json(single):
    (single / "config.json").unlink()
    message = _load_error(single, ConfigError)
    assert str(single / "config.json") in message


def test_unsupported_config_value(single):
    raw = json.loads((single / "config.json").read_text())
    raw["language_config"]["topk_method"] = "gready"
    (single / "config.json").write_text(json.dumps(raw))
    message = _load_error(single, ConfigError)
    assert "config.json" in message and "language_config.topk_method" in message and "gready" in message


@pytest.mark.parametrize("section", ["vision_config", "projector_config", "language_config"])
def test_config_missing_a_section(single, section):
    raw = json.loads((single / "config.json").read_text())
    del raw[section]
    (single / "config.json").write_text(json.dumps(raw))
    message = _load_error(single, ConfigError)
    assert "config.json" in message and section in message


def test_config_not_json(single):
    (single / "config.json").write_text('{"vision_config": ')
    assert "config.json" in _load_error(single, ConfigError)


# --- bad directories: files -----------------------------------------------------------------------------------


def test_index_names_a_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = _load_error(sharded)
    assert shard.name in message and INDEX_FILE in message


def test_index_not_json(sharded):
    (sharded / INDEX_FILE).write_text("{")
    assert INDEX_FILE in _load_error(sharded)


@pytest.mark.parametrize("keep", [0.5, -1], ids=["half", "one-byte-short"])
def test_truncated_safetensors(single, keep):
    file = single / SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    assert str(file) in _load_error(single)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4096])
    assert str(shard) in _load_error(sharded)


def _grow_shape(header: dict) -> None:
    key = min(k for k in header if k != "__metadata__")
    header[key]["shape"][0] *= 2


def _past_end(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096


def _overlap(header: dict) -> None:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[keys[1]]["data_offsets"] = list(header[keys[0]]["data_offsets"])


@pytest.mark.parametrize("lie", [_grow_shape, _past_end, _overlap], ids=["shape", "end-offset", "overlap"])
def test_header_lies_about_sizes_or_offsets(single, lie):
    file = single / SINGLE_FILE
    _rewrite_header(file, lie)
    assert str(file) in _load_error(single)


def test_header_length_prefix_lies(single):
    file = single / SINGLE_FILE
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    file.write_bytes(bytes(data))
    assert str(file) in _load_error(single)


@pytest.mark.parametrize("content", [pickle.dumps({"weight": [1.0, 2.0]}), b""], ids=["pickle", "empty"])
def test_file_that_is_not_safetensors(single, content):
    file = single / SINGLE_FILE
    file.write_bytes(content)
    assert str(file) in _load_error(single)


def test_pytorch_bin_alone_is_refused(single):
    """Only safetensors are read: a pickle checkpoint can run code when loaded."""
    torch.save(load_file(single / SINGLE_FILE), single / "pytorch_model.bin")
    (single / SINGLE_FILE).unlink()
    message = _load_error(single)
    assert str(single) in message and "safetensors" in message


# --- bad directories: keys and shapes -------------------------------------------------------------------------


def test_missing_key(single):
    file = single / SINGLE_FILE
    key = _first_key(file, "language.model.layers.")
    _rewrite_tensors(file, lambda t: t.pop(key))
    message = _load_error(single)
    assert "missing (1)" in message and key in message


def test_unexpected_key(single):
    _rewrite_tensors(single / SINGLE_FILE, lambda t: t.update({"language.model.extra.weight": torch.zeros(3)}))
    message = _load_error(single)
    assert "unexpected (1)" in message and "language.model.extra.weight" in message


def test_wrong_shape(single):
    file = single / SINGLE_FILE
    key = _first_key(file, "vision.blocks.")
    _rewrite_tensors(file, lambda t: t.update({key: torch.zeros(*t[key].shape[:-1], t[key].shape[-1] + 1)}))
    message = _load_error(single)
    assert "misshaped (1)" in message and key in message


def test_all_key_problems_in_one_error(sharded):
    """A missing key, an unexpected key and two misshaped keys spread over two shards: one error lists all."""
    first, second = sorted(sharded.glob("model-*.safetensors"))[:2]
    missing = _first_key(first, "vision.")
    misshaped = [_first_key(first, "projector."), _first_key(second, "language.")]

    def break_first(t: dict[str, torch.Tensor]) -> None:
        del t[missing]
        t[misshaped[0]] = torch.zeros(7)

    def break_second(t: dict[str, torch.Tensor]) -> None:
        t[misshaped[1]] = t[misshaped[1]].T.contiguous() if t[misshaped[1]].dim() == 2 else torch.zeros(7)
        t["vision.extra"] = torch.zeros(2)

    _rewrite_tensors(first, break_first)
    _rewrite_tensors(second, break_second)
    message = _load_error(sharded)
    assert message.count("\n") == 0
    for expected in ("missing (1)", missing, "unexpected (1)", "vision.extra", "misshaped (2)", *misshaped):
        assert expected in message, f"{expected!r} not in: {message}"


# --- gaps: weights.py accepts these today (see the report that added these tests) -----------------------------


def test_integer_tensor_is_refused(single):
    file = single / SINGLE_FILE
    key = _first_key(file, "language.model.norm.")
    _rewrite_tensors(file, lambda t: t.update({key: t[key].to(torch.int32)}))
    assert key in _load_error(single)


def test_key_in_two_shards_is_refused(sharded):
    first, second = sorted(sharded.glob("model-*.safetensors"))[:2]
    key = _first_key(first)
    _rewrite_tensors(second, lambda t: t.update({key: load_file(first)[key]}))
    message = _load_error(sharded)
    assert key in message and first.name in message and second.name in message
