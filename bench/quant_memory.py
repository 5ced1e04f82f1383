"""Benchmark: peak memory of running Small / Base quantised on one machine (issue 15: <= 20 GiB on a 24 GiB box).

Writes (once) a random bf16 checkpoint of the real dimensions of `--config` (bench/engine_bench.py's
ensure_model), then runs, each in its own process, sampled every 20 ms from outside:

  load   `dsvl2 ocr PAGE --model BF16_DIR --quantize SCHEME` — quantising from the bf16 checkpoint while loading,
         then answering one page;
  write  (`--write`) `dsvl2 quantize BF16_DIR -o QDIR --bits B`, then `dsvl2 ocr PAGE --model QDIR` — the
         quantised checkpoint written once, then loaded as stored and answering the page.

For each it prints the peak resident set (the child's ru_maxrss, which counts every page it ever mapped,
file-backed ones included, so it can only overstate), the sampled peaks of anonymous and file-backed memory,
the wall time, the exit code and the record's status. lscpu's model and flags come first.

    python bench/quant_memory.py --config small --scheme int8 [--write] [--page samples/bar-chart.png]
    python bench/quant_memory.py --config base --scheme int4 --delete-after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

LIMIT = 20 * 2**30


def lscpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    return f"cpu: {model}; {os.cpu_count()} cpus; flags {' '.join(f for f in flags if f.startswith(('avx', 'amx')))}"


def _status(pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    found[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return found


def run_measured(argv: list[str]) -> dict:
    """Run `argv`, sample its memory until it exits, and return the figures (stdout parsed as JSON Lines)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(argv, stdout=out_file, stderr=err_file, text=True, cwd=ROOT)
        peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status(proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own ru_maxrss (KiB on Linux)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    peaks["VmRSS"] = max(peaks["VmRSS"], usage.ru_maxrss * 1024)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {
        "command": " ".join(argv[2:]) if argv[:2] == [sys.executable, "-m"] else " ".join(argv),
        "exit": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peaks["VmRSS"] / 2**30, 2),
        "peak_anon_gib": round(peaks["RssAnon"] / 2**30, 2),
        "peak_file_gib": round(peaks["RssFile"] / 2**30, 2),
        "within_20_gib": 0 < peaks["VmRSS"] <= LIMIT,
        "records": [{"status": r.get("status"), "settings_quantize": r.get("settings", {}).get("quantize"),
                     "tokens": (r.get("tokens") or {}).get("generated")} for r in records],
        "stderr_tail": err.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--scheme", default="int8", choices=("int8", "int4"))
    parser.add_argument("--page", type=Path, default=ROOT / "samples" / "bar-chart.png")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="the run's --dtype (default auto)")
    parser.add_argument("--write", action="store_true", help="also write the quantised checkpoint and run it")
    parser.add_argument("--delete-after", action="store_true", help="delete the checkpoints written (disk space)")
    args = parser.parse_args()
    print(lscpu_line(), flush=True)

    from engine_bench import ensure_model

    start = time.perf_counter()
    source = ensure_model(None, args.config)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    print(f"bf16 checkpoint {source} ({size / 2**30:.1f} GiB, ready in {time.perf_counter() - start:.0f} s)",
          flush=True)
    ocr = [sys.executable, "-m", "dsvl2", "ocr", str(args.page), "--format", "jsonl", "--max-new-tokens",
           str(args.max_new_tokens), "--dtype", args.dtype, "--quiet"]
    results = {"load": run_measured([*ocr, "--model", str(source), "--quantize", args.scheme])}
    print(json.dumps({"run": "quantise while loading, answer one page", **results["load"]}), flush=True)
    if args.write:
        qdir = source.with_name(f"{source.name}-{args.scheme}")
        shutil.rmtree(qdir, ignore_errors=True)
        bits = args.scheme.removeprefix("int")
        results["quantize"] = run_measured([sys.executable, "-m", "dsvl2", "quantize", str(source), "-o", str(qdir),
                                            "--bits", bits])
        print(json.dumps({"run": "dsvl2 quantize", **results["quantize"]}), flush=True)
        results["stored"] = run_measured([*ocr, "--model", str(qdir)])
        print(json.dumps({"run": "load the quantised checkpoint, answer one page", **results["stored"]}),
              flush=True)
        if args.delete_after:
            shutil.rmtree(qdir, ignore_errors=True)
    if args.delete_after:
        shutil.rmtree(source, ignore_errors=True)


if __name__ == "__main__":
    main()
