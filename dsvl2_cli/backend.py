"""The CLI's only doors into the model runtime, each a module attribute so that tests can replace it:
`runtime_factory` (load a model for generation), `download_model` and `list_cached_models` (the cache).

The runtime is imported when a model is first needed, never at CLI import time, so `--help`, input
errors and fully-resumed runs cost no torch import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsvl2.pipelines.base import Runtime

DEFAULT_MODEL = "deepseek-ai/deepseek-vl2-tiny"

RuntimeFactory = Callable[..., "Runtime"]


def load_runtime(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
) -> Runtime:
    """The embedded runtime for `model` (a local directory or a Hugging Face repo id). `batch_size` (from
    --batch-size) caps the engine's batch; None lets the runtime choose."""
    from dsvl2.model.loading import load_runtime as load

    if batch_size is None:
        return load(model, revision=revision, device=device, dtype=dtype)
    return load(model, revision=revision, device=device, dtype=dtype, max_batch_size=batch_size)


def _download_model(repo_id: str, *, revision: str | None = None) -> Path:
    from dsvl2.model.hub import download_model as download

    return download(repo_id, revision=revision)


def _list_cached_models() -> list[Any]:
    from dsvl2.model.hub import list_cached_models as list_models

    return list_models()


runtime_factory: RuntimeFactory = load_runtime
download_model: Callable[..., Path] = _download_model
# Entries are (repo id, revision, size bytes) tuples or objects with those attributes (model.hub.CachedModel).
list_cached_models: Callable[[], list[Any]] = _list_cached_models
