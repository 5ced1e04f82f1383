"""load_runtime's choices: dtype auto follows the checkpoint, the batch and the cache budget follow free memory."""

from __future__ import annotations

import pytest
import torch
from parity import checkpoint_dir, checkpoint_names, parity_model, require

from dsvl2.model import loading


def test_auto_batch_size_follows_free_memory(monkeypatch):
    model = parity_model(require(checkpoint_names(), "parity checkpoints")[0])
    per_row = model.language.new_cache(1, 1).nbytes() * model.cfg.language.max_position_embeddings
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "available_memory", lambda: 6 * per_row)
    assert loading.auto_batch_size(model, cpu) == 3  # half of the free memory, one full-context row each
    monkeypatch.setattr(loading, "available_memory", lambda: per_row // 10)
    assert loading.auto_batch_size(model, cpu) == 1
    monkeypatch.setattr(loading, "available_memory", lambda: 10**15)
    assert loading.auto_batch_size(model, cpu, limit=16) == 16


def test_dtype_auto_follows_the_checkpoint(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    assert loading.pick_dtype("auto", cpu, "float32") is torch.float32
    assert loading.pick_dtype("auto", cpu, "bfloat16") is torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    assert loading.pick_dtype("auto", cpu, "bfloat16") is torch.float32
    assert loading.pick_dtype("bf16", cpu, "float32") is torch.bfloat16
    name = require(checkpoint_names(), "parity checkpoints")[0]
    assert loading.checkpoint_dtype(checkpoint_dir(name)) == "float32"
    engine = loading.load_runtime(str(checkpoint_dir(name)), max_batch_size=2)
    assert engine.model.dtype is torch.float32 and engine.max_batch_size == 2


def test_a_bf16_cpu_runtime_prepares_the_kernels_at_load(monkeypatch):
    """The kernels' build (first run) or load, and each op family's path, happen in load_runtime, not inside the
    first page; a float32 runtime never asks for them."""
    from dsvl2.model import kernels

    calls = []
    real = kernels.status

    def status(on_build_start=None):
        calls.append(1)
        return real(on_build_start)

    monkeypatch.setattr(kernels, "status", status)
    name = require(checkpoint_names(), "parity checkpoints")[0]
    engine = loading.load_runtime(str(checkpoint_dir(name)), dtype="float32", max_batch_size=1)
    assert engine.model.dtype is torch.float32 and not calls
    engine = loading.load_runtime(str(checkpoint_dir(name)), dtype="bfloat16", max_batch_size=1)
    assert engine.model.dtype is torch.bfloat16 and calls  # built or loaded (then asked again by the paths' choice)


def test_the_cache_budget_follows_free_memory_unless_given(monkeypatch):
    name = require(checkpoint_names(), "parity checkpoints")[0]
    monkeypatch.setattr(loading, "available_memory", lambda: 10 * 2**20)
    engine = loading.load_runtime(str(checkpoint_dir(name)), max_batch_size=64)
    assert engine.max_batch_size == 64 and engine.cache_budget == 5 * 2**20  # half the free memory
    assert loading.load_runtime(str(checkpoint_dir(name)), cache_budget=12345).cache_budget == 12345
    monkeypatch.setattr(loading, "available_memory", lambda: None)
    assert loading.load_runtime(str(checkpoint_dir(name))).cache_budget is None


def test_devices_named_with_an_index_are_accepted_and_a_missing_gpu_is_a_device_error(monkeypatch):
    """`--device cuda:N` is a device the option check accepts; without CUDA (or without device N) loading
    stops with a DeviceError (reported as 'device: ...', not as a model-config problem)."""
    from dsvl2.errors import describe
    from dsvl2.model.devices import check_device
    from dsvl2.model.errors import DeviceError

    assert check_device("cuda:3") is None and check_device("cuda") is None and check_device("gpu:0") is not None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="cuda:1 was asked for, but torch sees no CUDA device") as caught:
        loading.pick_device("cuda:1")
    assert describe(caught.value)[0].startswith("device: cuda:1 was asked for")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="this machine has 1 CUDA device"):
        loading.pick_device("cuda:1")
