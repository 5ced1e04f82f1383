"""Checkpoint loading: find the safetensors shards, check every key and shape, then load strictly.

The model is built on the meta device, every tensor is read (memory-mapped) straight into the target dtype
and assigned, so no second copy of the weights is ever held. Module paths equal checkpoint keys except for
the one entry in `RENAMES`. Any mismatch is one `WeightsError` listing every missing, unexpected and
misshaped key, raised before a single tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsvl2.model import allocator, placement
from dsvl2.model.config import ModelConfig
from dsvl2.model.errors import WeightsError
from dsvl2.model.feedforward import stack_slots
from dsvl2.model.quant import replace_linears
from dsvl2.model.quant_checkpoint import expected_dtypes, quantize_stored, run_scheme, stored_scheme
from dsvl2.model.vl2 import DeepseekVL2

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


FLOAT_DTYPES = {"F32", "BF16", "F16"}
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}


@dataclass(frozen=True, slots=True)
class StoredTensor:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"
    file: Path

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 8) * math.prod(self.shape)


def read_headers(files: list[Path]) -> tuple[dict[str, StoredTensor], list[str]]:
    """Key -> shape, dtype and file from the shards' headers (no tensor data is read), plus a description
    of every key stored in more than one shard."""
    from safetensors import safe_open

    found: dict[str, StoredTensor] = {}
    duplicated: list[str] = []
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    if key in found:
                        duplicated.append(f"{key} ({found[key].file.name}, {file.name})")
                    found[key] = StoredTensor(tuple(info.get_shape()), info.get_dtype(), file)
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    return found, duplicated


def _check(expected: dict[str, tuple[int, ...]], found: dict[str, StoredTensor], duplicated: list[str],
           directory: Path, dtypes: dict[str, tuple[str, ...]] | None = None) -> None:
    """One WeightsError listing every missing, unexpected, misshaped, wrongly typed (a float dtype unless `dtypes`
    names the key's) and duplicated key."""
    dtypes = dtypes or {}
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = sorted(f"{k} (checkpoint {list(found[k].shape)}, model {list(expected[k])})"
                       for k in expected if k in found and found[k].shape != expected[k])
    wrong_dtype = sorted(f"{k} ({t.dtype})" for k, t in found.items() if t.dtype not in dtypes.get(k, FLOAT_DTYPES))
    problems = (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped),
                ("wrong dtype", wrong_dtype), ("duplicated", sorted(duplicated)))
    parts = [f"{label} ({len(keys)}): {', '.join(keys)}" for label, keys in problems if keys]
    if parts:
        raise WeightsError(f"{directory}: checkpoint does not match config.json: " + "; ".join(parts))


def build_meta(cfg: ModelConfig) -> DeepseekVL2:
    with torch.device("meta"):
        return DeepseekVL2(cfg)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for every tensor the model needs."""
    return {INVERSE_RENAMES.get(k, k): tuple(t.shape) for k, t in model.state_dict().items()}


def load_model(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantize: str = "none") -> DeepseekVL2:
    """Build the model of `directory`/config.json and load its weights, cast to `dtype`, onto `device`.

    A quantised checkpoint (quant_checkpoint.py) loads as it is stored, its language linears `QuantLinear`s;
    `quantize` "int8" / "int4" quantises a floating-point checkpoint's language linears while reading, tensor by
    tensor (each read as stored, quantised a block of rows at a time, dropped), so no floating-point copy of those
    weights is ever held whole. Asking for another scheme than a checkpoint's own is a ConfigError naming both."""
    directory = Path(directory)
    cfg = ModelConfig.from_dir(directory)
    scheme, stored = run_scheme(directory, quantize), stored_scheme(directory)
    model = build_meta(cfg)
    found, duplicated = read_headers(checkpoint_files(directory))
    if stored is None:
        _check(expected_shapes(model), found, duplicated, directory)
    layers = replace_linears(model, scheme) if scheme is not None else {}
    if stored is not None:
        _check(expected_shapes(model), found, duplicated, directory, expected_dtypes(layers))
    targets = {f"{path}.weight": layer for path, layer in layers.items()} if stored is None else {}
    stored_layers = {f"{path}.qweight": layer for path, layer in layers.items()} if stored is not None else {}

    state, slots, stacks = {}, stack_slots(model), {}

    def lent(key: str) -> bool:  # read where the file maps it, as stored: each made into a tensor of its own below
        return key in targets or key in stored_layers or key in slots

    with allocator.while_loading():  # no heap holes left by the tensors read and dropped (allocator.py)
        for key, t in _read_tensors(found, dtype=dtype, device=device, lent=lent):
            if key in targets:
                try:
                    q, s = quantize_stored(t, scheme, values=True)
                except ValueError as e:
                    raise WeightsError(f"{directory}: {key}: {e}") from None
                del t
                base = key.removesuffix(".weight")
                state[f"{base}.qweight"] = targets[key].use_values(q)
                state[f"{base}.scales"] = s.to(dtype)
            elif key in stored_layers:
                q = stored_layers[key].use_stored(t)
                state[key] = q.clone() if q is t else q  # kept in the stored layout: a copy of the lent tensor
            elif (slot := slots.get(key)) is not None:
                state[key] = _into_stack(stacks, slot, t, dtype)
            else:
                state[RENAMES.get(key, key)] = t
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now: a weight the choice repacks must be freed with its old form
    if layers:
        from dsvl2.model import quant_choice  # imported here: it times products, which a float model never needs

        quant_choice.choose(model.language, dtype, cache=quant_choice.cache_directory())
        placement.place_on_huge_pages(model.language)  # in their final layouts: decode streams them (placement.py)
    return model.eval().requires_grad_(False)


def _into_stack(stacks: dict[str, torch.Tensor], slot: tuple[str, int, int], t: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """`t` copied (cast to `dtype`) into its place in one of `stacks` (made at its first tensor), returned as that
    view: the routed experts' weights load as the stacks the grouped expert product reads (feedforward.stack_slots)."""
    name, index, length = slot
    stack = stacks.get(name)
    if stack is None:
        stack = stacks[name] = t.new_empty((length, *t.shape), dtype=dtype)
    stack[index].copy_(t)
    return stack[index]


def _read_tensors(found: dict[str, StoredTensor], *, dtype: torch.dtype | Callable[[str], torch.dtype | None],
                  device: str | torch.device, batch_bytes: int = 256 * 2**20,
                  lent: Callable[[str], bool] = lambda key: False):
    """Yield (key, tensor in `dtype` on `device`, owning its memory) for every stored tensor (`dtype` may be a
    function of the key, None there meaning the stored dtype); where `lent(key)`, the tensor as the file maps it
    instead (stored dtype, no copy), for the caller to read before it asks for the next one (quantising, packing
    or stacking it makes the copy it keeps: a second one here took ~3 s of a Tiny load). Each file is
    reopened every `batch_bytes` of stored data, so the mapped pages already copied out are released: peak
    memory stays near the loaded weights' size plus one batch, instead of adding a whole shard."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, t in found.items():
        by_file.setdefault(t.file, []).append(key)
    for file, keys in by_file.items():
        start = 0
        while start < len(keys):
            size, end = 0, start
            while end < len(keys) and (end == start or size + found[keys[end]].nbytes <= batch_bytes):
                size += found[keys[end]].nbytes
                end += 1
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for key in keys[start:end]:
                        # A copy even when the dtype matches: weights in process memory, not file pages the
                        # kernel may evict under memory pressure and re-read from disk mid-run.
                        want = dtype(key) if callable(dtype) else dtype
                        t = f.get_tensor(key)
                        yield key, t if lent(key) else t.to(want if want is not None else t.dtype, copy=True)
            except Exception as e:
                raise WeightsError(f"{file}: cannot read tensor data ({e})") from None
            start = end


# Files whose bytes decide the answers besides the weights (the processor's tiling and the vocabulary).
_FINGERPRINT_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer.json",
                      "tokenizer_config.json", "special_tokens_map.json")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def fingerprint(directory: str | Path) -> str:
    """A hash that tells checkpoints apart without reading their weights whole: the bytes of config,
    processor and tokenizer files, and per weight shard its size, header and 16 blocks of 64 KiB spread
    over its data. The same checkpoint under any path (or copied) has the same fingerprint; a re-export
    (other weights, dtype or layout) does not. Reads about 1 MiB per shard."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = directory / name
        if path.is_file():
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    for shard in checkpoint_files(directory):
        size = shard.stat().st_size
        h.update(f"{shard.name}\0{size}\0".encode())
        with open(shard, "rb") as f:
            head = f.read(8)
            header = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(header, size)))
            start, span = 8 + header, max(size - 8 - header, 0)
            for i in range(_SAMPLES if span else 0):
                f.seek(start + span * i // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
