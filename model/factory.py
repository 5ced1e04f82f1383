"""Random-weight checkpoints in the real Hugging Face layout, for tests and benchmarks.

`write_random_checkpoint` turns any config the runtime accepts into a model directory that `load_model`
loads strictly: config.json, safetensors shards named like the real ones (plus their index) and optionally the
tokenizer/processor files. Key names and shapes come from the model itself (built on the meta device), so the
files always match what the loader expects. Each tensor is drawn from its own generator seeded from
(seed, key): the bytes depend on neither the shard size nor the order of writing. The weights are not
meant to be realistic: their scales only keep activations O(1) and make MoE routing differ between tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsvl2.model.config import ModelConfig
from dsvl2.model.language import MoEGate, RMSNorm
from dsvl2.model.weights import INDEX_FILE, RENAMES, SINGLE_FILE, build_meta, expected_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 2 * 2**30

# Scales. Linear/conv weights are N(0, gain^2 / fan_in), so each layer roughly preserves the size of its input.
BIAS_STD = 0.02
NORM_NOISE = 0.1  # norm weights are 1 + N(0, NORM_NOISE^2)
LINEAR_GAIN = {"lm_head": 2.0}  # by module name; logits of std ~2 keep the greedy choice well separated
GATE_GAIN = 2.0  # gate logits of std ~2: peaked scores, so tokens pick different experts
SCORE_BIAS_STD = 0.05  # noaux_tc e_score_correction_bias: nudges, not overrides, the sigmoid scores
# Free parameters, by attribute name: embedding-like ones are N(0, 1), the rest small.
PARAMETER_STD = {"image_newline": 1.0, "view_separator": 1.0, "pos_embed": 0.1, "latent": 0.02}


@dataclass(frozen=True, slots=True)
class Init:
    """One tensor's distribution: N(mean, std^2)."""

    mean: float
    std: float


def init_for(module: nn.Module, module_name: str, attr: str, shape: tuple[int, ...]) -> Init:
    """The distribution of parameter `attr` (of `shape`) of `module`, which is named `module_name`."""
    if isinstance(module, nn.Embedding):
        return Init(0.0, 1.0)
    if isinstance(module, nn.LayerNorm | RMSNorm):
        return Init(1.0, NORM_NOISE) if attr == "weight" else Init(0.0, BIAS_STD)
    if isinstance(module, nn.Linear | nn.Conv2d):
        if attr == "bias":
            return Init(0.0, BIAS_STD)
        gain = LINEAR_GAIN.get(module_name.rsplit(".", 1)[-1], 1.0)
        return Init(0.0, gain / math.sqrt(math.prod(shape[1:])))
    if isinstance(module, MoEGate):
        if attr == "weight":  # (X, E)
            return Init(0.0, GATE_GAIN / math.sqrt(shape[1]))
        if attr == "e_score_correction_bias":
            return Init(0.0, SCORE_BIAS_STD)
    if attr in PARAMETER_STD:
        return Init(0.0, PARAMETER_STD[attr])
    # A new kind of parameter needs a deliberate scale, not a silent default.
    raise ValueError(f"no initialisation rule for {module_name}.{attr} ({type(module).__name__})")


def tensor_seed(seed: int, key: str) -> int:
    """Generator seed of checkpoint tensor `key`: crc32 of "seed/key". 32 bits, because torch's CPU generator
    (mt19937) keeps only the low 32 bits of its seed."""
    return zlib.crc32(f"{seed}/{key}".encode())


def random_tensor(key: str, shape: tuple[int, ...], init: Init, *, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Draw tensor `key` in float32 from its own generator, then cast: the same bytes wherever it is written."""
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    return torch.empty(shape, dtype=torch.float32).normal_(init.mean, init.std, generator=g).to(dtype)


def checkpoint_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], Init]]:
    """(checkpoint key, shape, init) for every tensor of the model of `cfg`, in module order."""
    model = build_meta(cfg)
    modules = dict(model.named_modules())
    plan = []
    for key, shape in expected_shapes(model).items():
        module_name, _, attr = RENAMES.get(key, key).rpartition(".")
        plan.append((key, shape, init_for(modules[module_name], module_name, attr, shape)))
    return plan


def shard_names(n: int) -> list[str]:
    """File names of `n` shards, as Hugging Face writes them."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def split_shards(sizes: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Group (key, bytes) in order into shards of at most `shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    used = 0
    for key, n in sizes:
        if not shards or used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def write_random_checkpoint(config: dict[str, Any], out_dir: str | Path, *, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, shard_bytes: int = DEFAULT_SHARD_BYTES,
                            tokenizer_dir: Path | None = None) -> Path:
    """Write a random-weight checkpoint of `config` to `out_dir` (which must not exist or be empty); return it.

    config.json is `config` as given with `torch_dtype` (top level, and in language_config when present) set
    to `dtype`. Tensors are written shard by shard, so at most one shard is held in memory. `tokenizer_dir`,
    when given, must hold tokenizer.json; whichever of TOKENIZER_FILES it has are copied. Everything is
    written into a temporary directory next to `out_dir` and renamed at the end, so `out_dir` is either
    complete or absent. Raises ConfigError for a config the runtime does not support.
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json")
    plan = checkpoint_plan(ModelConfig.from_dict(config))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = [(key, math.prod(shape) * itemsize) for key, shape, _ in plan]
    shards = split_shards(sizes, shard_bytes)
    names = shard_names(len(shards))
    by_key = {key: (shape, init) for key, shape, init in plan}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_files(tmp, config, dtype=dtype, seed=seed, shards=shards, names=names, by_key=by_key,
                     total_size=sum(n for _, n in sizes), tokenizer_dir=tokenizer_dir)
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_files(directory: Path, config: dict[str, Any], *, dtype: torch.dtype, seed: int,
                 shards: list[list[str]], names: list[str], by_key: dict[str, tuple[tuple[int, ...], Init]],
                 total_size: int, tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    dtype_name = str(dtype).removeprefix("torch.")
    config = copy.deepcopy(config)
    config["torch_dtype"] = dtype_name
    if isinstance(config.get("language_config"), dict) and "torch_dtype" in config["language_config"]:
        config["language_config"]["torch_dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    weight_map = {}
    for keys, name in zip(shards, names, strict=True):
        tensors = {k: random_tensor(k, *by_key[k], seed=seed, dtype=dtype) for k in keys}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(keys, name))
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dsvl2.model.factory",
        description="Write a random-weight DeepSeek-VL2 checkpoint in the Hugging Face layout; print its path.")
    parser.add_argument("--config", type=Path, required=True, help="config.json to build the model from")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="tensor dtype (default bfloat16)")
    parser.add_argument("--tokenizer-dir", type=Path, help="copy tokenizer/processor files from this directory")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GiB (default 2)")
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text(encoding="utf-8"))
    out = write_random_checkpoint(config, args.out, seed=args.seed, dtype=DTYPES[args.dtype],
                                  shard_bytes=int(args.shard_gb * 2**30), tokenizer_dir=args.tokenizer_dir)
    print(out)


if __name__ == "__main__":
    main()
