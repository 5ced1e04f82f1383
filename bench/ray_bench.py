"""`--ray local` against the plain CLI on the same pages and the same cores: pages per hour of each (whole
command, as a user times it), their ratio, and how long a local Ray instance takes to start (what a
`--ray local` run pays before its first page). Both runs are fresh processes writing to their own -o DIR/.

    python bench/ray_bench.py [--model DIR | --real-tiny [LAYERS]] [--pages 24] [--workers 2]
                              [--cpus-per-worker 1] [--max-new-tokens 32] [--batch 4]

The issue wants the real-dimension Tiny (`--real-tiny`, a random checkpoint of deepseek-vl2-tiny's widths
written by bench/engine_bench.py; LAYERS truncates its decoder for slow hosts). The default is the tiny parity
checkpoint, which fits a 2-core machine: its ratio measures Ray's overhead, not a model-bound speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsvl2", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"dsvl2 {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def ray_start_seconds(workers: int, cpus: float) -> float:
    """A fresh process: import Ray and start the local instance exactly as `--ray local` does."""
    code = (
        "import time; t = time.perf_counter()\n"
        "from dsvl2 import ray_run\nfrom dsvl2.options import Options\n"
        f"ray_run.start(Options(ray='local', workers='{workers}', cpus_per_worker={cpus}))\n"
        "print(time.perf_counter() - t)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def records(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.rglob("*.jsonl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--real-tiny", nargs="?", const=0, type=int, metavar="LAYERS")
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    a = parser.parse_args()
    from fakes import make_pdf

    if a.real_tiny is not None:
        from engine_bench import ensure_model

        model = ensure_model(a.model, "tiny", a.real_tiny or None)
    else:
        from parity import checkpoint_dir

        model = a.model or checkpoint_dir("tiny-mha")
    print(f"cpu: {cpu_model()}")
    print(f"model: {model}; {a.pages} pages, {a.max_new_tokens} new tokens, batch {a.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_pdf(work / "in" / "pages.pdf", a.pages)
        common = ["ocr", "in", "--model", str(model), "--max-new-tokens", str(a.max_new_tokens), "-b", str(a.batch),
                  "-q"]  # fmt: skip
        plain = timed([*common, "-o", "plain/"], work)
        ray_args = ["--ray", "local", "--workers", str(a.workers), "--cpus-per-worker", str(a.cpus_per_worker)]
        on_ray = timed([*common, "-o", "ray/", *ray_args], work)
        start = ray_start_seconds(a.workers, a.cpus_per_worker)
        assert records(work / "plain") == records(work / "ray") == a.pages
    result = {
        "plain_pages_per_hour": round(a.pages / plain * 3600),
        "ray_pages_per_hour": round(a.pages / on_ray * 3600),
        "ray_over_plain": round(plain / on_ray, 3),
        "ray_local_start_seconds": round(start, 2),
        "ray_pages_per_hour_after_start": round(a.pages / max(on_ray - start, 1e-9) * 3600),
        "workers": a.workers,
        "cpus_per_worker": a.cpus_per_worker,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
