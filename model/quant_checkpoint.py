"""Quantised checkpoints: the scheme a checkpoint's config.json declares, the scheme a load runs (stored or asked
for, never both different), the dtypes a quantised checkpoint's tensors must have, and writing one.

Layout (format 1), a Hugging Face directory like the source one, loaded strictly by weights.load_model:
  config.json   the source's, plus  "quantization_config": {"quant_method": "dsvl2", "format": 1, "bits": 8 | 4,
                "group_size": null | 128, "scale_dtype": "bfloat16"}
  safetensors   every quantised linear `P.weight` (quant.py says which) replaced by
                  P.qweight  int8 (N, K)                      | uint8 (N, ceil(K/2)), two int4 values per byte
                                                                (low nibble k = 2j, high nibble k = 2j + 1, q + 8)
                  P.scales   bf16 (N,): w = q * scales[:, None] | bf16 (N, K/G): w = q * scales per group of G
                every other tensor as in the source (same dtype); shards `model-0000i-of-0000n.safetensors` of at
                most `shard_bytes` plus model.safetensors.index.json, or one model.safetensors
  other files   (tokenizer, processor config) copied unchanged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsvl2.model import allocator, quant_kernels
from dsvl2.model.config import ModelConfig
from dsvl2.model.errors import ConfigError, WeightsError
from dsvl2.model.quant import SCHEMES, QuantLinear, Scheme, pack_nibbles, quantize, replace_linears

CONFIG_KEY = "quantization_config"
METHOD = "dsvl2"
FORMAT = 1
DEFAULT_SHARD_BYTES = 2 * 2**30


def scheme_from_config(raw: Any) -> Scheme:
    """The `quantization_config` object of a config.json as a Scheme; ConfigError naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"unsupported value for {CONFIG_KEY}: expected a JSON object")
    if raw.get("quant_method") != METHOD or raw.get("format") != FORMAT:
        raise ConfigError(f"unsupported value for {CONFIG_KEY}: quant_method {raw.get('quant_method')!r} format "
                          f"{raw.get('format')!r} (this runtime reads {METHOD!r} format {FORMAT}, made by 'dsvl2 "
                          "quantize')")
    bits, group = raw.get("bits"), raw.get("group_size")
    if bits not in (8, 4) or isinstance(bits, bool):
        raise ConfigError(f"unsupported value for {CONFIG_KEY}.bits: {bits!r} (supported: 8, 4)")
    if bits == 8 and group is not None:
        raise ConfigError(f"unsupported value for {CONFIG_KEY}.group_size: {group!r} (int8 is per channel: null)")
    if bits == 4 and not (isinstance(group, int) and not isinstance(group, bool) and group >= 16):
        raise ConfigError(f"unsupported value for {CONFIG_KEY}.group_size: {group!r} (int4 needs an integer >= 16)")
    if raw.get("scale_dtype", "bfloat16") != "bfloat16":
        raise ConfigError(f"unsupported value for {CONFIG_KEY}.scale_dtype: {raw.get('scale_dtype')!r}")
    return Scheme(bits, group)


def scheme_config(scheme: Scheme) -> dict[str, Any]:
    return {"quant_method": METHOD, "format": FORMAT, "bits": scheme.bits, "group_size": scheme.group_size,
            "scale_dtype": "bfloat16"}


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{directory / 'config.json'}: cannot read JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{directory / 'config.json'}: expected a JSON object")
    return raw


def stored_scheme(directory: str | Path) -> Scheme | None:
    """The scheme `directory`'s config.json declares, None for a floating-point checkpoint."""
    directory = Path(directory)
    raw = _read_config(directory)
    if CONFIG_KEY not in raw:
        return None
    try:
        return scheme_from_config(raw[CONFIG_KEY])
    except ConfigError as e:
        raise ConfigError(f"{directory / 'config.json'}: {e}") from None


def run_scheme(directory: str | Path, quantize: str = "none") -> Scheme | None:
    """The scheme a load of `directory` runs: the stored one (`quantize` "none" or the same name), else the one
    asked for (quantised while loading), else None. Asking for another scheme than the stored one is an error
    naming both."""
    if quantize not in ("none", *SCHEMES):
        raise ConfigError(f"unsupported quantisation {quantize!r}: use none, int8 or int4")
    stored = stored_scheme(directory)
    if stored is not None:
        if quantize not in ("none", stored.name):
            raise ConfigError(f"{directory} is a {stored.name} checkpoint ({CONFIG_KEY} in config.json) but "
                              f"--quantize {quantize} was asked for: drop --quantize or use the float checkpoint")
        return stored
    return None if quantize == "none" else Scheme.named(quantize)


def scheme_name(directory: str | Path, quantize: str = "none") -> str:
    """"none", "int8" or "int4": what a load of `directory` with `quantize` runs (for records and resume keys)."""
    scheme = run_scheme(directory, quantize)
    return "none" if scheme is None else scheme.name


def quantize_stored(w: torch.Tensor, scheme: Scheme, *, chunk_bytes: int = 64 * 2**20, values: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An (N, K) floating-point weight of any float dtype -> (qweight, scales) in the stored layout (int8 (N, K), or
    int4 nibbles (N, ceil(K/2))), or with `values` the int8 (N, K) values for `QuantLinear.use_values`. A weight
    with a NaN or an infinity is a ValueError naming its row. On a CPU where quant_kernels is available its op
    quantises each row in one pass, a row of float32 per thread (2.4-3.3x faster loads of Tiny, bench/RESULTS.md);
    elsewhere torch's ops quantise a block of rows at a time: each block is widened to float32 and its temporaries
    freed before the next, so quantising a weight never holds more than `chunk_bytes` of float32 on top of the
    weight itself and its result (an lm_head of 102,400 x 2,048 would otherwise add ~3 GiB of float32
    temporaries). Rows are independent in both schemes, so either equals `quantize` on the whole weight."""
    n, k = w.shape
    packed = scheme.bits == 4 and not values
    if w.is_cpu and quant_kernels.available():  # quant_pack.cpp: the same values, byte for byte
        q, s = quant_kernels.quantize_values(w, scheme.bits, scheme.group_for(k))
        _check_finite(s)
        return (quant_kernels.nibbles_from_values(q) if packed else q), s
    q_shape, s_shape = scheme.shapes(n, k)
    q = torch.empty(q_shape if packed else (n, k), dtype=torch.uint8 if packed else torch.int8)
    s = torch.empty(s_shape, dtype=torch.bfloat16)
    step = max(1, chunk_bytes // (4 * max(k, 1)))
    for start in range(0, n, step):
        q_rows, s_rows = quantize(w[start:start + step], scheme)
        q[start:start + step] = pack_nibbles(q_rows) if packed else q_rows
        s[start:start + step] = s_rows
    _check_finite(s)
    return q, s


def _check_finite(scales: torch.Tensor) -> None:
    """Raises ValueError naming the first row whose scale is not finite: its weights hold a NaN or an infinity
    (the scale is their group's largest magnitude), which no int8 / int4 value can stand for."""
    bad = (~torch.isfinite(scales)).reshape(scales.shape[0], -1).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(f"weight row {int(bad[0])} holds a NaN or an infinity: it cannot be quantised")


def expected_dtypes(layers: dict[str, QuantLinear]) -> dict[str, tuple[str, ...]]:
    """Safetensors dtype names each quantised tensor may have (every other tensor: a float dtype)."""
    found: dict[str, tuple[str, ...]] = {}
    for path, layer in layers.items():
        found[f"{path}.qweight"] = ("I8",) if layer.scheme.bits == 8 else ("U8",)
        found[f"{path}.scales"] = ("BF16", "F32", "F16")
    return found


def write_quantized(source: str | Path, out: str | Path, scheme: Scheme, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    on_tensor: Callable[[str, int, int], None] | None = None) -> Path:
    """Write `source` (a floating-point checkpoint) quantised with `scheme` to `out` (which must not exist or be
    empty); return `out`. Tensors stream from the memory-mapped shards one at a time, and at most one output
    shard is held, so memory stays near `shard_bytes`. `on_tensor(key, done, total)` reports progress. The
    directory appears whole or not at all (written to a sibling temporary directory, then renamed)."""
    from safetensors.torch import save_file

    from dsvl2.model.weights import INDEX_FILE, _check, build_meta, checkpoint_files, expected_shapes, read_headers
    from dsvl2.model.weights import _read_tensors as read_tensors

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"{out}: exists and is not an empty directory")
    if (stored := stored_scheme(source)) is not None:
        raise WeightsError(f"{source}: already quantised ({stored.name}); quantise the float checkpoint")
    model = build_meta(ModelConfig.from_dir(source))
    found, duplicated = read_headers(checkpoint_files(source))
    _check(expected_shapes(model), found, duplicated, source)
    targets = {f"{path}.weight": layer for path, layer in replace_linears(model, scheme).items()}
    config = _read_config(source) | {CONFIG_KEY: scheme_config(scheme)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        shards: list[list[str]] = []
        weight_map: dict[str, int] = {}
        pending: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal pending, size
            if pending:
                save_file(pending, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
                shards.append(list(pending))
                weight_map.update(dict.fromkeys(pending, len(shards) - 1))
                pending, size = {}, 0

        with allocator.while_loading():  # no heap holes left by the tensors read and dropped
            # A weight to quantise is read where the file maps it (its values and scales are new tensors).
            tensors = read_tensors(found, dtype=lambda _: None, device="cpu", lent=targets.__contains__)
            for n, (key, t) in enumerate(tensors, start=1):
                if key in targets:
                    try:
                        q, s = quantize_stored(t, scheme)
                    except ValueError as e:
                        raise WeightsError(f"{source}: {key}: {e}") from None
                    base = key.removesuffix(".weight")
                    items = {f"{base}.qweight": q, f"{base}.scales": s}
                else:
                    items = {key: t}
                del t
                nbytes = sum(v.numel() * v.element_size() for v in items.values())
                if pending and size + nbytes > shard_bytes:
                    flush()
                pending.update(items)
                size += nbytes
                total += nbytes
                if on_tensor is not None:
                    on_tensor(key, n, len(found))
        flush()
        names = _shard_names(len(shards))
        for i, name in enumerate(names):
            (tmp / f"part-{i}.safetensors").rename(tmp / name)
        if len(names) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file in source.iterdir():
            if file.is_file() and file.name not in ("config.json", INDEX_FILE) and file.suffix != ".safetensors":
                shutil.copyfile(file, tmp / file.name)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _shard_names(n: int) -> list[str]:
    from dsvl2.model.factory import shard_names

    return shard_names(n)
