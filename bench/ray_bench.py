"""`--ray local` against the plain CLI on the same pages, cores and memory: pages per hour of each (whole
command, as a user times it: model load included on both sides), their ratio with and without the local
instance's start-up, and how long that start-up takes (what `--ray local` pays before its first page). Both
runs are fresh processes writing to their own -o DIR/; their records must agree. The CPU's model and flags
are printed with the figures.

    python bench/ray_bench.py [--model DIR | --real-tiny [LAYERS]] [--dtype float32] [--pages 12]
                              [--side 384] [--workers 1] [--cpus-per-worker 2] [--max-new-tokens 16] [--batch 4]

The issue's figure is the real-dimension Tiny (`--real-tiny`: a random bf16 checkpoint of deepseek-vl2-tiny's
widths, written by bench/engine_bench.py under bench/out/ on first use), run in float32 (~13.5 GB: it fits once
on a 24 GiB machine, and the two runs never hold it at the same time). The pages are `--side` pixels square
images (384: one tile) with short answers, so the model's forward, not rendering, is what is timed. With one
worker of every core (`--workers 1 --cpus-per-worker` = the machine's cores) the Ray run has the plain CLI's
cores and memory; LAYERS truncates the decoder for a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]


def cpu() -> dict[str, str]:
    """lscpu's model name and flags (the flags say which vector units the CPU kernels can use)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {"model": fields.get("Model name", "?").strip(), "flags": fields.get("Flags", "?").strip()}


def mem_available_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib / 2**20


def make_pages(folder: Path, count: int, side: int) -> None:
    """`count` distinct `side`-pixel square PNG pages: a few lines of text each."""
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (side, side), "white")
        draw = ImageDraw.Draw(image)
        for line in range(6):
            text = f"page {i + 1}, line {line + 1}: total {17 * i + line} EUR"
            draw.text((16, 16 + line * side // 7), text, fill="black")
        image.save(folder / f"page-{i + 1:03d}.png")


def timed(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsvl2", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"dsvl2 {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def ray_start_seconds(workers: int, cpus: float) -> float:
    """A fresh process: import Ray and start the local instance exactly as `--ray local` does (dsvl2 itself,
    which the plain CLI imports too, is imported before the clock starts)."""
    code = (
        "import time\nfrom dsvl2 import ray_run\nfrom dsvl2.options import Options\n"
        "t = time.perf_counter()\n"
        f"ray_run.start(Options(ray='local', workers='{workers}', cpus_per_worker={cpus}))\n"
        "print(time.perf_counter() - t)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def answers(out: Path) -> dict[tuple[str, int], tuple]:
    found = {}
    for path in out.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            found[Path(r["source"]).name, r["page"]] = (r["text"], r["status"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--real-tiny", nargs="?", const=0, type=int, metavar="LAYERS")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pages", type=int, default=12)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    a = parser.parse_args()
    if a.real_tiny is not None:
        from engine_bench import ensure_model

        model = ensure_model(a.model, "tiny", a.real_tiny or None)
    else:
        from parity import checkpoint_dir

        model = a.model or checkpoint_dir("tiny-mha")
    model = Path(model).absolute()  # the runs' working directory is a temporary one
    info = cpu()
    print(f"cpu: {info['model']}\nflags: {info['flags']}")
    print(f"model: {model} in {a.dtype}; {a.pages} pages of {a.side}x{a.side}, {a.max_new_tokens} new tokens, "
          f"batch {a.batch}; {os.cpu_count()} cores, {mem_available_gib():.1f} GiB available", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_pages(work / "in", a.pages, a.side)
        common = ["ocr", "in", "--model", str(model), "--dtype", a.dtype, "--max-new-tokens", str(a.max_new_tokens),
                  "-b", str(a.batch), "-q"]  # fmt: skip
        plain = timed([*common, "-o", "plain/"], work)
        print(f"plain: {plain:.1f} s", flush=True)
        ray_args = ["--ray", "local", "--workers", str(a.workers), "--cpus-per-worker", str(a.cpus_per_worker)]
        on_ray = timed([*common, "-o", "ray/", *ray_args], work)
        print(f"ray: {on_ray:.1f} s", flush=True)
        start = ray_start_seconds(a.workers, a.cpus_per_worker)
        mine, theirs = answers(work / "plain"), answers(work / "ray")
        assert len(mine) == a.pages and mine == theirs, "the Ray run's records differ from the plain run's"
        manifest = json.loads((work / "ray" / "ocr.manifest.json").read_text())["runtime"]
    result = {
        "plain_pages_per_hour": round(a.pages / plain * 3600),
        "ray_pages_per_hour": round(a.pages / on_ray * 3600),
        "ray_over_plain": round(plain / on_ray, 3),
        "ray_local_start_seconds": round(start, 2),
        "ray_pages_per_hour_after_start": round(a.pages / max(on_ray - start, 1e-9) * 3600),
        "ray_over_plain_after_start": round(plain / max(on_ray - start, 1e-9), 3),
        # the workers' own load time, once the manifest reports it (a manifest without "ray" has the driver's)
        "ray_worker_load_seconds": manifest["load_seconds"] if "ray" in manifest else None,
        "workers": a.workers,
        "cpus_per_worker": a.cpus_per_worker,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
