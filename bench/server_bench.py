"""`--server` against the local CLI, same pages, same machine, same run.

Two figures:
  1. throughput: `dsvl2 ocr DIR` with the model loaded in the CLI process, and the same pages through
     `dsvl2 ocr DIR --server URL --max-concurrent N` against a `dsvl2 serve` of the same checkpoint, each
     in pages/min over the pages' own time (the run manifest's summary: model loading excluded), and their ratio;
  2. per-request overhead of the HTTP path: a one-token answer to the same page through the engine in this
     process and through the server (PNG data URL, JSON, HTTP, the server's parsing), median difference in ms.

    python bench/server_bench.py [--model DIR] [--pages 16] [--concurrent 8] [--max-new-tokens 48]

The default model is the tiny parity checkpoint (random weights, fast): there the model's own time is small,
so the HTTP path's share is at its largest — a worst case for the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from machine_limits import cpu_line  # noqa: E402
from servers import Server  # noqa: E402

DEFAULT_MODEL = ROOT.parent / "shared" / "parity" / "checkpoints" / "tiny-mha"


def make_pages(folder: Path, n: int, seed: int = 0) -> None:
    """Seeded pages of mixed sizes (A4-like portrait at 2/3 of 144 dpi, landscape, small) with text lines."""
    rng = random.Random(seed)
    sizes = [(794, 1123), (1000, 700), (600, 400)]
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        image = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(image)
        for y in range(40, h - 40, 36):
            draw.text((40, y), " ".join(str(rng.randint(0, 10**6)) for _ in range(6)), fill="black")
        image.save(folder / f"page{k:03d}.png")


def run_cli(args: list[str], cwd: Path) -> dict:
    """Run `dsvl2 ocr` into a directory and return its manifest's summary."""
    out = cwd / f"out{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, "-m", "dsvl2", "ocr", *args, "-o", f"{out}/", "-q"], cwd=cwd,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"dsvl2 ocr failed ({done.returncode}): {done.stderr[-2000:]}")
    manifest = next(out.glob("*manifest*.json"))
    return json.loads(manifest.read_text())["summary"]


def overhead_ms(model: Path, server: Server, repeats: int) -> tuple[float, float, float]:
    """(median engine ms, median HTTP ms, difference) for a one-token answer to the same small page."""
    import openai

    import dsvl2
    from dsvl2.model.requests import Request, Sampling, user_prompt
    from dsvl2.remote import request_body

    image = Image.new("RGB", (600, 400), "white")
    ImageDraw.Draw(image).text((20, 20), "overhead probe", fill="black")
    runtime = dsvl2.load(str(model), batch_size=1)
    request = Request("probe", user_prompt("Read it.", (image,)), Sampling(max_new_tokens=1))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    name = next(iter(client.models.list())).id
    local, remote = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.generate([request])
        local.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.chat.completions.create(**request_body(request, name))
        remote.append(time.perf_counter() - start)
    a, b = statistics.median(local) * 1e3, statistics.median(remote) * 1e3
    return a, b, b - a


def answered(summary: dict) -> int:
    """Pages that got an answer (ok, truncated, repetition or parse_error: random weights rarely say EOS)."""
    return sum(summary.get(f"pages_{s}", 0) for s in ("ok", "truncated", "repetition", "parse_error"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"cpu: {cpu_line()}")
    print(f"model: {args.model}; {args.pages} pages, --max-new-tokens {args.max_new_tokens}, "
          f"{args.concurrent} at once")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pages = work / "pages"
        pages.mkdir()
        make_pages(pages, args.pages)
        common = [str(pages), "--max-new-tokens", str(args.max_new_tokens), "--repetition-guard", "0"]
        local = run_cli([*common, "--model", str(args.model), "-b", str(args.concurrent)], work)
        server = Server(args.model, "--batch-size", str(args.concurrent))
        try:
            remote = run_cli([*common, "--server", server.url, "--max-concurrent", str(args.concurrent)], work)
            engine_ms, http_ms, extra = overhead_ms(args.model, server, args.repeats)
        finally:
            server.stop()
    ratio = remote["pages_per_minute"] / local["pages_per_minute"]
    print(f"local CLI:      {local['pages_per_minute']:8.2f} pages/min ({answered(local)} pages answered)")
    print(f"--server:       {remote['pages_per_minute']:8.2f} pages/min ({answered(remote)} pages answered)")
    print(f"ratio:          {ratio:8.2f}x  (target >= 0.9x)")
    print(f"one-token page: engine {engine_ms:.1f} ms, through HTTP {http_ms:.1f} ms: overhead {extra:.1f} ms")
    buffer = io.StringIO()
    json.dump({"local": local, "server": remote, "ratio": ratio, "overhead_ms": extra}, buffer)
    print(buffer.getvalue())


if __name__ == "__main__":
    main()
