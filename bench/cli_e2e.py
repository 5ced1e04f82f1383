"""End-to-end benchmark of the job users run: `dsvl2 ocr DIR/` through the CLI's own path (run_task: rendering
thread, runner, continuous batching, writers), beside the same pages through a fixed-chunk scheduler (the
runner before continuous batching: a chunk of pages waits for its longest answer) and through the engine
alone, with the page bound from this machine's limits, all in one run; each path's peak RSS is its own (reset
before it, read before the limits are sampled).

    python bench/cli_e2e.py [--model DIR | --layers L V | --config tiny|small|base] [--pages 12] [--batch 4]
                            [--median 350] [--seed 0] [--dtype auto] [--quantize none|int8|int4]
                            [--paths cli,fixed_chunks,engine_alone] [--no-bound] [--json OUT]

Pages: a seeded mix of A4-like pages (3x3 tiles) and smaller ones (2x2 tiles). Answer lengths: lognormal with
the given median (sigma 0.6), clipped to 20-1,500 tokens, imposed per request in this benchmark only (EOS
suppressed, repetition guard off), so every scheduler generates the same tokens. The model defaults to a
random checkpoint at the real deepseek-vl2-tiny dimensions (bench/engine_bench.py makes it); `--layers L V` makes
and uses one truncated to L language and V vision layers (every width real), for hosts where the whole model
runs too slowly for a benchmark (a float32-only CPU); every ratio stays one of the same model. The bound: vision
and prefill at the bf16 (or fp32, for a float32 model) rate of a model-shaped GEMM, decode at the read bandwidth
for the bytes a decode step of this batch touches; each limit the median of its samples taken after each path and at
the end of this run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from engine_bench import (
    DEFAULT_MODEL,
    bench_decode,
    cpu_line,
    ensure_model,
    lm_token_params,
    measure_limits,
    peak_rss_gib,
    release_free_memory,
    reset_peak_rss,
    vision_flops_per_tile,
)
from PIL import Image

from dsvl2 import backend
from dsvl2.model.loading import load_runtime, resolve
from dsvl2.model.requests import Completion, Request, Sampling, user_prompt
from dsvl2.options import Options
from dsvl2.pipelines.ocr import OcrTask
from dsvl2.session import run_task

SIDES = {"a4": (1152, 1152), "small": (768, 768)}  # 3x3 and 2x2 tiles of 384


def truncated_model(layers: int, vision_layers: int) -> Path:
    """A random checkpoint of the real Tiny widths with fewer layers (bench/out, made once)."""
    from engine_bench import PARITY_TOKENIZER, TINY_CONFIG

    from dsvl2.model.factory import write_random_checkpoint

    path = DEFAULT_MODEL.with_name(f"{DEFAULT_MODEL.name}-L{layers}-V{vision_layers}")
    if (path / "config.json").is_file():
        return path
    config = json.loads((TINY_CONFIG / "config.json").read_text())
    config["language_config"]["num_hidden_layers"] = layers
    config["vision_config"]["layers"] = vision_layers
    out = write_random_checkpoint(config, path, seed=0, dtype=torch.bfloat16, tokenizer_dir=PARITY_TOKENIZER)
    (out / "processor_config.json").write_bytes((TINY_CONFIG / "processor_config.json").read_bytes())
    return out


def job(pages: int, median: int, seed: int) -> list[tuple[str, int]]:
    """(kind, answer tokens) per page, seeded."""
    g = torch.Generator().manual_seed(seed)
    kinds = ["a4" if torch.rand((), generator=g) < 0.6 else "small" for _ in range(pages)]
    lengths = torch.exp(math.log(median) + 0.6 * torch.randn(pages, generator=g)).clamp(20, 1500).round().int()
    return list(zip(kinds, lengths.tolist(), strict=True))


def write_pages(directory: Path, plan: list[tuple[str, int]], seed: int) -> list[Path]:
    paths = []
    for i, (kind, _) in enumerate(plan):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        w, h = SIDES[kind]
        pixels = torch.randint(0, 256, (h // 8, w // 8, 3), generator=g, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy()).resize((w, h), Image.Resampling.NEAREST)
        paths.append(directory / f"page{i:03d}.png")
        image.save(paths[-1])
    return paths


class Imposed:
    """A runtime whose i-th request answers exactly lengths[i] tokens. `chunked`: submissions wait until the
    engine is idle and go in chunks of the batch size (the fixed-chunk runner's schedule)."""

    def __init__(self, engine, lengths: list[int], *, chunked: bool) -> None:
        self.engine, self.lengths, self.chunked = engine, lengths, chunked
        self.model_id, self.revision, self.max_batch_size = "bench", None, engine.max_batch_size
        self.identity = backend.Identity("bench", None, None, "cpu", str(engine.model.dtype).removeprefix("torch."))
        self.load_seconds, self.kernels = 0.0, None
        self.held: list[Request] = []
        self.count = 0

    def submit(self, request: Request) -> None:
        sampling = replace(request.sampling, max_new_tokens=self.lengths[self.count], suppress_eos=True,
                           no_repeat_ngram=0)  # fmt: skip
        self.count += 1
        self.held.append(replace(request, sampling=sampling))
        if not self.chunked:
            self.engine.submit(self.held.pop())

    def step(self) -> list[Completion]:
        if self.chunked and self.held and not self.engine.has_work:
            chunk, self.held = self.held[: self.max_batch_size], self.held[self.max_batch_size :]
            for request in chunk:
                self.engine.submit(request)
        return self.engine.step()

    @property
    def has_work(self) -> bool:
        return bool(self.held) or self.engine.has_work

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)


def through_cli(engine, directory: Path, lengths: list[int], *, chunked: bool, batch: int) -> float:
    """Seconds for `dsvl2 ocr DIR -o OUT/` on the loaded engine."""
    runtime = Imposed(engine, lengths, chunked=chunked)
    backend.runtime_factory = lambda *a, **k: runtime
    backend.identify = lambda *a, **k: runtime.identity
    out = directory.parent / ("out-chunked" if chunked else "out")
    options = Options.create(output=str(out) + "/", batch_size=batch, quiet=True, repetition_guard=0,
                             max_new_tokens=max(lengths))  # fmt: skip
    start = time.perf_counter()
    code = run_task(task=OcrTask(), paths=[str(directory)], options=options)
    seconds = time.perf_counter() - start
    assert code == 0, f"run_task exited {code}"
    assert runtime.count == len(lengths)
    return seconds


def engine_alone(engine, paths: list[Path], lengths: list[int]) -> float:
    requests = [
        Request(f"e{i}", user_prompt(OcrTask().prompt, (Image.open(p).convert("RGB"),)),
                Sampling(max_new_tokens=n, suppress_eos=True))
        for i, (p, n) in enumerate(zip(paths, lengths, strict=True))
    ]  # fmt: skip
    start = time.perf_counter()
    done = engine.generate(requests)
    seconds = time.perf_counter() - start
    assert [c.n_generated for c in done] == lengths
    return seconds


def page_bound(model, limits: dict, plan: list[tuple[str, int]], prompt_tokens: dict, step_bytes: float,
               batch: int) -> float:
    """Pages per hour at this machine's limits for this mix (see the module docstring)."""
    params, pair = lm_token_params(model)
    rate = limits["bf16_gflops" if model.dtype is torch.bfloat16 else "fp32_gflops"] * 1e9
    tiles = {"a4": 10, "small": 5}  # the local grid plus the global view
    compute = sum(tiles[k] * vision_flops_per_tile(model) + 2 * params * prompt_tokens[k]
                  + pair * prompt_tokens[k] ** 2 / 2 for k, _ in plan)  # fmt: skip
    decode = sum(n for _, n in plan) * step_bytes / (limits["read_gbs"] * 1e9) / batch
    return len(plan) / (compute / rate + decode) * 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--layers", type=int, nargs=2, metavar=("L", "V"), help="truncate to L language, V vision layers")
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--median", type=int, default=350)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", choices=("tiny", "small", "base"), help="a random checkpoint of these real "
                    "dimensions (bench/engine_bench.py's ensure_model) instead of --model / --layers")
    ap.add_argument("--dtype", default="auto", help="the CLI's --dtype (auto: bf16 where the CPU has it)")
    ap.add_argument("--quantize", default="none", choices=("none", "int8", "int4"), help="the CLI's --quantize")
    ap.add_argument("--paths", default="cli,fixed_chunks,engine_alone",
                    help="which of cli, fixed_chunks, engine_alone to time (comma-separated)")
    ap.add_argument("--no-bound", action="store_true", help="skip measuring this machine's limits and the bound")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if args.config:
        path = ensure_model(None, args.config)
    else:
        path = truncated_model(*args.layers) if args.layers else ensure_model(args.model)
    resolved = resolve(str(path), dtype=args.dtype, quantize=args.quantize)
    start = time.perf_counter()
    engine = load_runtime(resolved, max_batch_size=args.batch)
    load_seconds = time.perf_counter() - start
    model = engine.model
    weights_gib = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**30
    plan = job(args.pages, args.median, args.seed)
    lengths = [n for _, n in plan]
    print(f"model: {resolved.path.name} in {model.dtype}, quantize {resolved.quantize}, weights {weights_gib:.2f} GiB "
          f"(loaded in {load_seconds:.0f} s); batch {args.batch}; pages "
          f"{sum(k == 'a4' for k, _ in plan)} A4 (3x3) + {sum(k == 'small' for k, _ in plan)} small (2x2); answer "
          f"tokens {sorted(lengths)}", flush=True)  # fmt: skip
    results: dict = {"cpu": cpu_line(), "plan": plan, "batch": args.batch, "quantize": resolved.quantize,
                     "dtype": str(model.dtype), "load_seconds": load_seconds}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pages"
        directory.mkdir()
        paths = write_pages(directory, plan, args.seed)
        prompt_tokens = {}
        for kind in SIDES:
            index = next((i for i, (k, _) in enumerate(plan) if k == kind), None)
            if index is not None:
                image = Image.open(paths[index]).convert("RGB")
                prepared = engine.processor.prepare(user_prompt(OcrTask().prompt, (image,)))
                prompt_tokens[kind] = int(prepared.input_ids.numel())
        runs = {
            "cli": lambda: through_cli(engine, directory, lengths, chunked=False, batch=args.batch),
            "fixed_chunks": lambda: through_cli(engine, directory, lengths, chunked=True, batch=args.batch),
            "engine_alone": lambda: engine_alone(engine, paths, lengths),
        }
        samples = []  # the limits after each path: this shared host's speed moves by 2x within minutes
        for name in args.paths.split(","):
            release_free_memory()  # each path's own peak: not the paths before it, nor the limits' probe buffers
            reset_peak_rss()
            seconds = runs[name]()
            rss = peak_rss_gib()
            results[name] = {"seconds": seconds, "pages_per_hour": len(plan) / seconds * 3600, "peak_rss_gib": rss}
            print(f"{name}: {seconds:.1f} s, {results[name]['pages_per_hour']:.1f} pages/h, peak RSS {rss:.2f} GiB = "
                  f"weights {rss - weights_gib:+.2f} GiB", flush=True)
            if not args.no_bound:
                samples.append(measure_limits(model.cfg.language.hidden_size, model.device))
    if args.no_bound or set(args.paths.split(",")) != set(runs):
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return
    samples.append(measure_limits(model.cfg.language.hidden_size, model.device))
    limits = {key: statistics.median(s[key] for s in samples) if isinstance(samples[0][key], float) else samples[0][key]
              for key in samples[0]}  # each limit: the median of its samples after each path and at the end
    results["limit_samples"] = samples
    decode = bench_decode(model, args.batch)
    bound = page_bound(model, limits, plan, prompt_tokens, decode["bytes_per_step"], args.batch)
    results |= {"limits": limits, "decode": decode, "bound_pages_per_hour": bound}
    cli, chunks, alone = (results[k]["pages_per_hour"] for k in ("cli", "fixed_chunks", "engine_alone"))
    print(f"limits: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in limits.items()})}")
    print(f"bound {bound:.1f} pages/h; CLI {cli / bound:.0%} of bound; CLI / fixed chunks {cli / chunks:.2f}x; "
          f"CLI / engine alone {cli / alone:.0%}; the CLI's peak RSS weights "
          f"{results['cli']['peak_rss_gib'] - weights_gib:+.2f} GiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
