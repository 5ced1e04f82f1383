"""Loading a ready-to-use runtime: resolve the model argument, pick device and dtype, load processor and
weights, and wrap them in an `Engine` (which is what pipelines call `generate` on).

Device "auto" is CUDA when available, else CPU. Dtype "auto" follows the checkpoint: reduced-precision
weights (the real models ship bfloat16) run in bfloat16 where the hardware computes it natively (CUDA with
bf16 support; a CPU with AVX512-BF16 or AMX), else in float32; float32 checkpoints stay float32, so they
reproduce float32 reference outputs unless bf16 is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsvl2.model import kernels
from dsvl2.model.devices import DTYPE_NAMES, check_device, check_dtype, cpu_has_bf16
from dsvl2.model.engine import Engine
from dsvl2.model.errors import DeviceError
from dsvl2.model.hub import DEFAULT_MODEL, resolve_model
from dsvl2.model.processor import Processor
from dsvl2.model.quant_checkpoint import scheme_name
from dsvl2.model.weights import fingerprint, load_model


def pick_device(device: str = "auto") -> torch.device:
    if problem := check_device(device):
        raise DeviceError(f"device {problem}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{device} was asked for, but torch sees no CUDA device (this torch build: "
                              f"{torch.__version__}); use --device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    if dtype == "auto":
        if checkpoint_dtype in ("float32", None):
            return torch.float32
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if problem := check_dtype(dtype):
        raise DeviceError(f"dtype {problem}")
    chosen = getattr(torch, DTYPE_NAMES[dtype])
    if chosen is torch.float16 and device.type == "cpu":
        raise DeviceError("float16 is not supported on CPU; use bfloat16 or float32")
    return chosen


def checkpoint_dtype(path: Path) -> str | None:
    """The `torch_dtype` config.json declares for the weights (None when absent or unreadable)."""
    try:
        value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def snapshot_revision(path: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot directory (`.../snapshots/<hash>`), else None."""
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    return None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CPU: MemAvailable; CUDA: free device memory), None if unknown."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()


MEMORY_SHARE = 0.5  # of the memory free after loading, what the KV cache may take


def auto_batch_size(engine_model, device: torch.device, *, limit: int = 16, share: float = MEMORY_SHARE) -> int:
    """Rows such that every row's KV cache at the model's full context fits in `share` of the memory left
    after loading; between 1 and `limit`."""
    lang = engine_model.cfg.language
    per_row = engine_model.language.cache_bytes_per_token() * lang.max_position_embeddings
    free = free_memory(device)
    if free is None:
        return 8
    return max(1, min(limit, int(free * share // max(per_row, 1))))


@dataclass(frozen=True, slots=True)
class Resolved:
    """A model argument resolved to what will run, without loading any weights: the checkpoint directory,
    its hub revision (None for a local directory), its fingerprint, the device and dtype it runs in, and its
    weight quantisation ("none", "int8", "int4": the checkpoint's own scheme, or the one asked for)."""

    model: str
    path: Path
    revision: str | None
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    quantize: str = "none"


def resolve(model: str = DEFAULT_MODEL, *, revision: str | None = None, device: str = "auto",
            dtype: str = "auto", quantize: str = "none") -> Resolved:
    """Where `model` is and how it will run (the hub is asked only when the model is not cached). A `quantize`
    other than a quantised checkpoint's own scheme is a ConfigError naming both, raised here, before loading."""
    dev = pick_device(device)
    path = resolve_model(model, revision=revision)
    return Resolved(model=model, path=path, revision=snapshot_revision(path) or revision,
                    fingerprint=fingerprint(path), device=dev, dtype=pick_dtype(dtype, dev, checkpoint_dtype(path)),
                    quantize=scheme_name(path, quantize))


def load_runtime(model: str | Resolved = DEFAULT_MODEL, *, revision: str | None = None, device: str = "auto",
                 dtype: str = "auto", max_batch_size: int | None = None, prefill_chunk: int = 2048,
                 cache_budget: int | None = None, on_kernel_build: Callable[[], None] | None = None,
                 quantize: str = "none") -> Engine:
    """A generation engine for `model` (a local checkpoint directory, a Hugging Face repo id, or what
    `resolve` made of one). Without `max_batch_size` the batch is sized from the memory left after loading
    (`auto_batch_size`); without `cache_budget` the KV cache may take half of that memory, so a large batch
    size given by hand admits only as many pages at once as their cache fits. `on_kernel_build` is called when
    the CPU kernels start compiling (a bf16 or quantised model on a CPU, first run only); `kernels.status()`
    and `quant_kernels.status()` say how that went. `quantize` (or a `Resolved`'s) "int8" / "int4" quantises the
    language model's weights while loading (weights.load_model); a quantised checkpoint loads as stored."""
    where = model if isinstance(model, Resolved) else resolve(model, revision=revision, device=device, dtype=dtype,
                                                               quantize=quantize)
    processor = Processor.from_dir(where.path)
    if where.quantize != "none" and where.device.type == "cpu":
        from dsvl2.model import quant_kernels

        quant_kernels.status(on_kernel_build)  # build (first run only) or load them before the weights are read
    weights = load_model(where.path, dtype=where.dtype, device=where.device, quantize=where.quantize)
    if max_batch_size is None:
        max_batch_size = auto_batch_size(weights, where.device)
    if cache_budget is None and (free := free_memory(where.device)) is not None:
        cache_budget = max(1, int(free * MEMORY_SHARE))
    if where.device.type == "cpu" and weights.dtype is torch.bfloat16:
        kernels.status(on_kernel_build)  # build (first run only) or load the kernels now, not inside the first page
        weights.vision.choose_paths()  # and choose each op family's path (a timing only the first time on a machine)
        weights.language.choose_paths()
    return Engine(weights, processor, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk,
                  cache_budget=cache_budget, model_id=where.model, revision=where.revision)
