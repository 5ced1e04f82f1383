"""Checkpoint loading: find the safetensors shards, check every key and shape, then load strictly.

The model is built on the meta device, every tensor is read (memory-mapped) straight into the target dtype
and assigned, so no second copy of the weights is ever held. Module paths equal checkpoint keys except for
the one entry in `RENAMES`. Any mismatch is one `WeightsError` listing every missing, unexpected and
misshaped key, raised before a single tensor is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import WeightsError
from model.vl2 import DeepseekVL2

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# checkpoint key -> module path (the reference misspells the separator).
RENAMES = {"view_seperator": "view_separator"}
INVERSE_RENAMES = {v: k for k, v in RENAMES.items()}


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The shard files of a checkpoint: those named by model.safetensors.index.json, else
    model.safetensors, else every *.safetensors file in the directory."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise WeightsError(f"{directory}: shard(s) named by {INDEX_FILE} are missing: {', '.join(missing)}")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                           "only safetensors checkpoints are accepted")
    return files


def read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Key -> (shape, file) from the shards' headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = (tuple(f.get_slice(key).get_shape()), file)
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    return shapes


def _check(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], Path]],
           directory: Path) -> None:
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = sorted(f"{k} (checkpoint {list(found[k][0])}, model {list(expected[k])})"
                       for k in expected if k in found and found[k][0] != expected[k])
    if missing or unexpected or misshaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped))
                 if keys]
        raise WeightsError(f"{directory}: checkpoint does not match config.json: " + "; ".join(parts))


def build_meta(cfg: ModelConfig) -> DeepseekVL2:
    with torch.device("meta"):
        return DeepseekVL2(cfg)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for every tensor the model needs."""
    return {INVERSE_RENAMES.get(k, k): tuple(t.shape) for k, t in model.state_dict().items()}


def load_model(directory: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> DeepseekVL2:
    """Build the model of `directory`/config.json and load its weights, cast to `dtype`, onto `device`."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg = ModelConfig.from_dir(directory)
    model = build_meta(cfg)
    files = checkpoint_files(directory)
    _check(expected_shapes(model), read_shapes(files), directory)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    state[RENAMES.get(key, key)] = f.get_tensor(key).to(dtype)
        except Exception as e:
            raise WeightsError(f"{file}: cannot read tensor data ({e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
