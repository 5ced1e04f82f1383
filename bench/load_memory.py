"""Benchmark: peak memory of loading a real-dimension deepseek-vl2-tiny checkpoint in bfloat16.

Writes (once) a random-weight checkpoint of tests/data/configs/deepseek-vl2-tiny/config.json in bf16 with
model/factory.py, then loads it with `load_model(..., dtype=torch.bfloat16)` in a fresh subprocess and prints
one JSON object: bf16 weight bytes, RSS before loading, peak RSS (ru_maxrss), their ratio, load seconds, the
largest anonymous / file-backed RSS seen while loading, and the same after every weight page has been read once
(safetensors may hand out lazily memory-mapped tensors, whose pages only become resident when first used).
Issue 2 asks for peak RSS < 1.3x the weight bytes. This script never imports torch itself: ru_maxrss survives
fork + exec, so the measuring child must be started by a small parent.

    python bench/load_memory.py [--dir DIR] [--checkpoint-dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "tests" / "data" / "configs" / "deepseek-vl2-tiny"
PARITY_DIR = Path(os.environ.get("DSVL2_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "deepseek-vl2-tiny-random"
BOUND = 1.3


def ensure_checkpoint(out: Path, *, dtype: str, seed: int, shard_gb: float) -> None:
    """Write the random checkpoint (with model/factory.py's CLI) unless `out` already holds one."""
    if (out / "config.json").is_file():
        return
    with tempfile.TemporaryDirectory() as staging:
        # The parity tokenizer plus the real processor_config.json, in the one directory the factory copies from.
        for src in [*(PARITY_DIR / "tokenizer").glob("*.json"), CONFIG_DIR / "processor_config.json"]:
            shutil.copyfile(src, Path(staging) / src.name)
        subprocess.run([sys.executable, "-m", "dsvl2.model.factory", "--config", str(CONFIG_DIR / "config.json"),
                        "--out", str(out), "--seed", str(seed), "--dtype", dtype, "--shard-gb", str(shard_gb),
                        "--tokenizer-dir", staging], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler:
    """Largest RssAnon / RssFile of this process, sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], _status_kib(field))
            time.sleep(0.02)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self._thread.join()
        return {f"sampled_peak_{k[3:].lower()}_bytes": v * 1024 for k, v in self.peaks.items()}


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(directory: Path) -> dict:
    """Load `directory` in this process (call in a fresh one) and return the figures."""
    import torch

    from dsvl2.model.weights import load_model

    rss_before = _status_kib("VmRSS") * 1024
    sampler = _Sampler()
    start = time.perf_counter()
    model = load_model(directory, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    loaded = {"peak_rss_bytes": _max_rss(), **sampler.stop()}
    state = model.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())

    sampler = _Sampler()
    start = time.perf_counter()
    with torch.no_grad():
        for t in state.values():  # one element per 4 KiB page
            t.reshape(-1)[:: max(4096 // t.element_size(), 1)].float().sum()
    touch_seconds = time.perf_counter() - start
    touched = {"peak_rss_bytes": _max_rss(), **sampler.stop()}
    touched["rss_bytes"] = _status_kib("VmRSS") * 1024
    touched["seconds"] = round(touch_seconds, 2)
    return {
        "checkpoint": str(directory),
        "weights_bytes": weights,
        "weights_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
        "rss_before_bytes": rss_before,
        **loaded,
        "peak_over_weights": round(loaded["peak_rss_bytes"] / weights, 4),
        "bound": BOUND,
        "within_bound": loaded["peak_rss_bytes"] < BOUND * weights,
        "load_seconds": round(seconds, 2),
        "after_touching_every_page": {
            **touched,
            "peak_over_weights": round(touched["peak_rss_bytes"] / weights, 4),
            "within_bound": touched["peak_rss_bytes"] < BOUND * weights,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help=f"checkpoint directory, written if absent (default {DEFAULT_OUT}"
                        ", with a -float32 suffix for a float32 checkpoint)")
    parser.add_argument("--checkpoint-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the tensors in the files (the load is always bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="factory seed")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="factory shard size in GiB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir or DEFAULT_OUT.with_name(
        DEFAULT_OUT.name + ("" if args.checkpoint_dtype == "bfloat16" else f"-{args.checkpoint_dtype}"))
    if args.child:
        print(json.dumps(measure(directory)))
        return
    start = time.perf_counter()
    ensure_checkpoint(directory, dtype=args.checkpoint_dtype, seed=args.seed, shard_gb=args.shard_gb)
    written = time.perf_counter() - start
    run = subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory)],
                         capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    result["parent_max_rss_bytes"] = _max_rss()
    result["write_seconds"] = round(written, 2)
    result["files"] = sorted(p.name for p in directory.iterdir())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
