"""The one door from the CLI and the Python API into the model runtime, each function a module attribute so
that tests can replace it: `identify` (which model, revision, device and dtype a run would use, without
loading it), `runtime_factory` (load it), `download_model` and `list_cached_models` (the cache).

The runtime is imported when a model is first needed, never at import time, so `dsvl2 --help` and
`import dsvl2` cost no torch import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsvl2.model.hub import DEFAULT_MODEL

if TYPE_CHECKING:
    from dsvl2.model.engine import Engine
    from dsvl2.model.kernel_build import KernelStatus
    from dsvl2.model.kernel_choice import Paths
    from dsvl2.model.loading import Resolved
    from dsvl2.model.requests import Completion, Request

__all__ = ["DEFAULT_MODEL", "Identity", "Runtime", "identify", "load"]


@dataclass(frozen=True, slots=True)
class Identity:
    """What answers a run's pages: the model as given, its hub revision, its fingerprint (None when unknown),
    the device kind and dtype it runs in, and how its weights are quantised ("none", "int8", "int4": a quantised
    checkpoint's own scheme even without --quantize). Part of every record and of its resume key."""

    model: str
    revision: str | None
    fingerprint: str | None
    device: str
    dtype: str
    quantize: str = "none"

    def record_model(self) -> dict[str, str | None]:
        return {"id": self.model, "revision": self.revision, "fingerprint": self.fingerprint}


def _identity(resolved: Resolved) -> Identity:
    return Identity(
        model=resolved.model,
        revision=resolved.revision,
        fingerprint=resolved.fingerprint,
        device=resolved.device.type,
        dtype=str(resolved.dtype).removeprefix("torch."),
        quantize=resolved.quantize,
    )


def _identify(model: str, *, revision: str | None = None, device: str = "auto", dtype: str = "auto",
              quantize: str = "none") -> Identity:
    from dsvl2.model.loading import resolve

    return _identity(resolve(model, revision=revision, device=device, dtype=dtype, quantize=quantize))


class Runtime:
    """A loaded model, reusable across calls and threads' worth of pages: `dsvl2.load()` returns one, and
    every task function takes it as `runtime=`. Implements `dsvl2.pipelines.base.Runtime`."""

    def __init__(
        self, engine: Engine, identity: Identity, *, load_seconds: float = 0.0, kernels: KernelStatus | None = None,
        paths: Paths | None = None, quant_kernels: KernelStatus | None = None, quant_paths: dict | None = None,
    ) -> None:
        """`load_seconds`: what loading took (kernel build included); `kernels`: how the CPU kernels came to be and
        `paths`: which op families use them (both None where none are used: float32, or a GPU); `quant_kernels`
        and `quant_paths`: the same for a quantised model's products (model/quant.py's `quant_paths`)."""
        self.engine, self.identity = engine, identity
        self.load_seconds, self.kernels, self.paths = load_seconds, kernels, paths
        self.quant_kernels, self.quant_paths = quant_kernels, quant_paths

    @property
    def model_id(self) -> str:
        return self.identity.model

    @property
    def revision(self) -> str | None:
        return self.identity.revision

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def submit(self, request: Request) -> None:
        self.engine.submit(request)

    def step(self) -> list[Completion]:
        return self.engine.step()

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def generate(
        self, requests: Sequence[Request], *, on_completion: Callable[[Completion], None] | None = None
    ) -> list[Completion]:
        """Answer `requests` all at once (results in request order), as `Engine.generate`."""
        return self.engine.generate(requests, on_completion=on_completion)

    def __repr__(self) -> str:
        i = self.identity
        weights = "" if i.quantize == "none" else f", {i.quantize} weights"
        return f"<dsvl2.Runtime {i.model} on {i.device} in {i.dtype}{weights}, {self.max_batch_size} pages at once>"


def load(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    quantize: str = "none",
    on_kernel_build: Callable[[], None] | None = None,
) -> Runtime:
    """The embedded runtime for `model` (a local directory or a Hugging Face repo id). `batch_size` caps how
    many pages it answers at once; None sizes it from free memory. `quantize` "int8" / "int4" quantises the
    language model's weights while loading (a quantised checkpoint loads as stored; another scheme than its own
    is a ConfigError naming both). `on_kernel_build` is called if the CPU kernels start compiling (first run on
    a machine)."""
    import torch

    from dsvl2.model import kernels, quant_kernels
    from dsvl2.model.loading import load_runtime, resolve
    from dsvl2.model.quant import quant_paths

    if quantize not in ("none", "int8", "int4"):
        from dsvl2.pipelines.base import OptionError

        raise OptionError("quantize", "must be none, int8 or int4")
    start = time.perf_counter()
    resolved = resolve(model, revision=revision, device=device, dtype=dtype, quantize=quantize)
    sizing = {} if batch_size is None else {"max_batch_size": batch_size}
    engine = load_runtime(resolved, on_kernel_build=on_kernel_build, **sizing)
    uses_kernels = resolved.device.type == "cpu" and resolved.dtype is torch.bfloat16
    quantized = resolved.quantize != "none"
    return Runtime(engine, _identity(resolved), load_seconds=time.perf_counter() - start,
                   kernels=kernels.status() if uses_kernels else None,
                   paths=kernels.paths() if uses_kernels else None,
                   quant_kernels=quant_kernels.status() if quantized and resolved.device.type == "cpu" else None,
                   quant_paths=quant_paths(engine.model) if quantized else None)  # fmt: skip


def _download_model(repo_id: str, *, revision: str | None = None) -> Path:
    from dsvl2.model.hub import download_model as download

    return download(repo_id, revision=revision)


def _list_cached_models() -> list[Any]:
    from dsvl2.model.hub import list_cached_models as list_models

    return list_models()


identify: Callable[..., Identity] = _identify
runtime_factory: Callable[..., Any] = load
download_model: Callable[..., Path] = _download_model
# Entries are (repo id, revision, size bytes) tuples or objects with those attributes (model.hub.CachedModel).
list_cached_models: Callable[[], list[Any]] = _list_cached_models
