"""Engine benchmark: every figure beside this machine's limit, both measured in the same run.

    python bench/engine_bench.py [--model DIR | --config tiny|small|base [--layers L]] [--device cpu|cuda]
                                 [--sections limits,vision,prefill,decode,e2e] [--json OUT]

The model defaults to a random checkpoint at the real deepseek-vl2-tiny dimensions, written by the
checkpoint factory on first use (bench/out/, git-ignored); --config small (MLA) or base picks another model's real
dimensions and --layers L keeps its first L decoder layers, so the big models fit a short run. Every run prints
the CPU and which path (our kernel or torch) each operation family took, with the reason.
Limits: bf16 and fp32 matrix rate (a GEMM of the model's own shapes) and memory read bandwidth. Ratios: vision and
prefill FLOP/s over the bf16 rate; decode time per step over its bandwidth bound (the read bandwidth is the fastest
of several read patterns, one of them a decode step's own one-row product, so no step can beat its bound), counting
the bytes touched (weights of the distinct experts the batch routes to, shared weights, lm_head, and the cache rows
read); end to end pages per hour over the bound from the same three limits. The limits are measured again right
before each section and each section's ratio uses its own (a shared machine's speed drifts over a ten-minute run;
the first measurement is reported as `limits`). The prefill bound uses the bf16 rates measured on the model's own
products: dense ones (projections, shared experts) and the routed experts' grouped GEMMs (tokens x K rows over X
experts, with the gate's real routing), each at the faster of torch and our kernel (bench/prefill_rates.py).
Results print as lines and, with --json, a file.

With --device cuda the model and every measurement run on the GPU: timings wait for the device, the limits are
the GPU's (a model-shaped GEMM of 8192 rows, since a GPU needs more rows than a CPU to reach its rate, beside an
8192-cubed one reported as the peak; a 2 GiB read), and the peak GPU memory of the end-to-end job is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

import prefill_rates  # noqa: E402
from machine_limits import (  # noqa: E402,F401
    CPU,
    back_to_back,
    best_time,
    cpu_line,
    gemm_rate,
    measure_limits,
    paired_rates,
    read_bandwidth,
    read_probes,
    synchronize,
)

from dsvl2.model import kernel_calibration, kernels  # noqa: E402
from dsvl2.model.config import ModelConfig  # noqa: E402
from dsvl2.model.engine import Engine  # noqa: E402
from dsvl2.model.language import MoE, cache_token_bytes  # noqa: E402
from dsvl2.model.processor import Processor  # noqa: E402
from dsvl2.model.requests import Request, Sampling, user_prompt  # noqa: E402
from dsvl2.model.weights import load_model  # noqa: E402

CONFIGS = {"tiny": "deepseek-vl2-tiny", "small": "deepseek-vl2-small", "base": "deepseek-vl2"}  # tests/data/configs/
DEFAULT_MODEL = ROOT / "bench" / "out" / "deepseek-vl2-tiny-random"
TINY_CONFIG = ROOT / "tests" / "data" / "configs" / "deepseek-vl2-tiny"
PARITY_TOKENIZER = Path(os.environ.get("DSVL2_PARITY_DIR", ROOT.parent / "shared" / "parity")) / "tokenizer"


# -- FLOP and byte accounting -----------------------------------------------------------------------------
def vision_flops_per_tile(model) -> float:
    v = model.cfg.vision
    P, W = v.grid * v.grid, v.width
    per_block = 2 * P * (4 * W * W + 2 * W * v.mlp_hidden) + 2 * 2 * P * P * W
    patch = 2 * P * 3 * v.patch_size**2 * W
    proj_params = sum(p.numel() for n, p in model.projector.named_parameters() if n.endswith("weight"))
    tokens = ((v.grid + 1) // 2) ** 2
    return v.layers * per_block + patch + 2 * tokens * proj_params


def lm_token_params(model) -> tuple[int, int]:
    """Matmul parameters one token touches (routed experts at top-k) excluding embedding and lm_head,
    and the attention FLOPs per (query, key) pair over all layers."""
    cfg = model.cfg.language
    total = 0
    for layer in model.language.model.layers:
        total += sum(p.numel() for p in layer.self_attn.parameters() if p.dim() == 2)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            expert = sum(p.numel() for p in mlp.experts[0].parameters())
            total += cfg.num_experts_per_tok * expert + mlp.gate.weight.numel()
            if hasattr(mlp, "shared_experts"):
                total += sum(p.numel() for p in mlp.shared_experts.parameters())
        else:
            total += sum(p.numel() for p in mlp.parameters() if p.dim() == 2)
    if cfg.use_mla:
        pair = 2 * cfg.num_attention_heads * (cfg.q_head_dim + cfg.v_head_dim)
    else:
        pair = 2 * cfg.num_attention_heads * 2 * cfg.head_dim
    return total, pair * cfg.num_hidden_layers


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class DecodeBytes:
    """Bytes a decode step reads: every non-expert weight once, each distinct routed expert once, the
    lm_head, and the cache rows (counted per step from the gate hooks and the cache lengths)."""

    def __init__(self, model):
        self.model = model
        lm = model.language
        self.fixed = nbytes(lm.lm_head.parameters()) + nbytes(lm.model.norm.parameters())
        self.moes = []
        for layer in lm.model.layers:
            self.fixed += nbytes(layer.self_attn.parameters()) + nbytes(layer.input_layernorm.parameters())
            self.fixed += nbytes(layer.post_attention_layernorm.parameters())
            if isinstance(layer.mlp, MoE):
                self.fixed += nbytes(layer.mlp.gate.parameters())
                if hasattr(layer.mlp, "shared_experts"):
                    self.fixed += nbytes(layer.mlp.shared_experts.parameters())
                self.moes.append(layer.mlp)
            else:
                self.fixed += nbytes(layer.mlp.parameters())
        self.expert_bytes = nbytes(self.moes[0].experts[0].parameters()) if self.moes else 0
        self.routed: list[torch.Tensor] = []  # expert ids (N, K) of every MoE call
        self.hooks = [m.gate.register_forward_hook(self._count) for m in self.moes]

    def _count(self, _module, _inputs, out) -> None:
        self.routed.append(out[0])  # counted after the timing: reading it back here would wait for a GPU

    def step_bytes(self, cache_bytes: int) -> float:
        """Average bytes per step over the steps recorded since the last reset."""
        distinct = sum(int(ids.unique().numel()) for ids in self.routed)
        steps = max(len(self.routed) // max(len(self.moes), 1), 1)
        return self.fixed + self.expert_bytes * distinct / steps + cache_bytes

    def reset(self) -> None:
        self.routed.clear()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


# -- sections ------------------------------------------------------------------------------------------
def _runs(r: dict) -> str:
    """How a paired ratio was taken: each run's ratio and the rate sampled after it."""
    pairs = ", ".join(f"{x:.0%} of {g:.0f}" for x, g in zip(r["run_ratios"], r["bf16_gflops_after_runs"], strict=True))
    return f"median of runs: {pairs} GFLOP/s sampled after each"


@torch.inference_mode()
def bench_vision(model, limits, tiles: int = 8) -> dict:
    """Seconds per tile (best of 3 runs of `tiles` tiles) and, as the ratio, the median of each run's rate over the
    bf16 rate sampled right after it."""
    pixels = torch.randn(tiles, 3, 384, 384, device=model.device)
    flops = vision_flops_per_tile(model) * tiles
    paired = paired_rates(lambda: model.encode_tiles(pixels), flops, bf16_sampler(model), 3, model.device)
    seconds = paired["seconds"] / tiles
    gflops = vision_flops_per_tile(model) / seconds / 1e9
    return {"seconds_per_tile": seconds, "gflops": gflops, "of_bf16_rate": paired["ratio"],
            "run_ratios": paired["ratios"], "bf16_gflops_after_runs": paired["limits_gflops"],
            "of_bf16_rate_before": gflops / limits["bf16_gflops"]}


def bf16_sampler(model):
    """A short sample of the bf16 rate on the model's width (the limit's own product, best of 2)."""
    return lambda: gemm_rate(model.cfg.language.hidden_size, model.device, torch.bfloat16, repeat=2)


@torch.inference_mode()
def bench_prefill(model, limits, tokens: int = 1000) -> dict:
    """Tokens per second of one `tokens`-token prefill, beside the bf16 rate and the bound from the rates measured
    on the model's own dense and grouped (routed-expert) products."""
    lm = model.language
    x = lm.embed(torch.randint(3, model.cfg.language.vocab_size, (1, tokens), device=model.device))

    def run():
        cache = lm.new_cache(1, tokens)
        lm.logits(lm(x, cache)[:, -1])

    params, pair = lm_token_params(model)
    flops = 2 * params * tokens + pair * tokens * (tokens + 1) / 2 + 2 * nbytes([lm.lm_head.weight]) // 2
    paired = paired_rates(run, flops, bf16_sampler(model), 3, model.device)
    seconds = paired["seconds"]
    gflops = flops / seconds / 1e9
    timer = lambda fn: best_time(fn, repeat=3, device=model.device)  # noqa: E731
    dense = prefill_rates.dense_rate(model, tokens, timer)
    grouped = prefill_rates.grouped_rates(model, tokens, timer)
    grouped_best = max((grouped[k] for k in ("torch", "kernel") if k in grouped), default=None)
    bound = prefill_rates.prefill_bound(model, tokens, total_flops=flops, dense_gflops=dense,
                                        grouped_gflops=grouped_best)
    return {"tokens_per_s": tokens / seconds, "gflops": gflops, "of_bf16_rate": paired["ratio"],
            "run_ratios": paired["ratios"], "bf16_gflops_after_runs": paired["limits_gflops"],
            "of_bf16_rate_before": gflops / limits["bf16_gflops"],
            "dense_gflops": dense, "grouped_gflops": grouped, "bound_tokens_per_s": tokens / bound["seconds"],
            "of_bound": bound["seconds"] / seconds, "routed_gflop": bound["routed_gflop"],
            "other_gflop": bound["other_gflop"]}


@torch.inference_mode()
def bench_decode(model, batch: int, context: int = 1000, steps: int = 8) -> dict:
    lm, device = model.language, model.device
    cache = lm.new_cache(batch, context + steps + 4)
    for b in range(batch):  # prefill row by row (a 1000-token page prompt each)
        rows = cache.rows([b])
        lm(lm.embed(torch.randint(3, model.cfg.language.vocab_size, (1, context), device=device)), rows)
        rows.advance(context)
    counter = DecodeBytes(model)
    tokens = torch.randint(3, model.cfg.language.vocab_size, (batch, 1), device=device)
    lm.logits(lm(lm.embed(tokens), cache)[:, 0])  # warm
    cache.advance(1)
    counter.reset()
    # This shared host's read bandwidth moves by 2x within minutes, so each step is paired with a bandwidth sample
    # taken right after it (a 256 MiB read, as in measure_limits) and the ratio is the median of the step ratios.
    probes = read_probes(256 * 2**20, device)
    times, bandwidth = [], []
    synchronize(device)
    for _ in range(steps):
        t = time.perf_counter()
        logits = lm.logits(lm(lm.embed(tokens), cache)[:, 0])
        tokens = logits.argmax(-1, keepdim=True)
        cache.advance(1)
        synchronize(device)
        times.append(time.perf_counter() - t)
        bandwidth.append(read_bandwidth(256 * 2**20, device, repeat=2, probes=probes)[0])
    per_token_cache = cache.nbytes() // cache.capacity // batch
    step = statistics.median(times)
    touched = counter.step_bytes(int(cache.lengths.sum()) * per_token_cache)
    counter.close()
    read_gbs = statistics.median(bandwidth)
    bound = touched / (read_gbs * 1e9)
    ratio = statistics.median(touched / (gbs * 1e9) / t for t, gbs in zip(times, bandwidth, strict=True))
    return {"batch": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step, "bytes_per_step": touched,
            "read_gbs": read_gbs, "read_gbs_range": [min(bandwidth), max(bandwidth)], "bound_ms": bound * 1e3,
            "of_bandwidth_bound": ratio, "cache_bytes_per_token": per_token_cache}


def synthetic_page(side: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy())


def bench_e2e(model, processor, limits, *, pages: int, new_tokens: int, batch: int, tiling: int = 2) -> dict:
    """A synthetic OCR job: `pages` pages tiled tiling x tiling, `new_tokens` each with EOS suppressed."""
    side = 384 * tiling
    sampling = Sampling(max_new_tokens=new_tokens, suppress_eos=True)
    requests = [Request(f"p{i}", user_prompt("Convert the document to markdown.", (synthetic_page(side, i),)),
                        sampling) for i in range(pages)]
    engine = Engine(model, processor, max_batch_size=batch)
    t = time.perf_counter()
    done = engine.generate(requests)
    seconds = time.perf_counter() - t
    assert all(c.n_generated == new_tokens for c in done)
    return {"batch": batch, "tiling": f"{tiling}x{tiling}", "pages": pages, "new_tokens": new_tokens,
            "seconds": seconds, "pages_per_hour": pages / seconds * 3600,
            "prompt_tokens": done[0].n_prompt}


def e2e_bound(model, limits, *, prompt_tokens: int, tiles: int, new_tokens: int, decode_bytes: float,
              batch: int) -> float:
    """Pages per hour if vision and prefill ran at the bf16 rate and decode at the read bandwidth."""
    params, pair = lm_token_params(model)
    compute = tiles * vision_flops_per_tile(model) + 2 * params * prompt_tokens + pair * prompt_tokens**2 / 2
    seconds = compute / (limits["bf16_gflops"] * 1e9) + new_tokens * decode_bytes / (limits["read_gbs"] * 1e9) / batch
    return 3600 / seconds


def peak_rss_gib() -> float:
    """Peak resident memory of this process since it started or since the last `reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free memory back to the system (glibc malloc_trim; a no-op
    elsewhere), so a section's RSS starts from what is live."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux: /proc/self/clear_refs), so a section's own peak can be
    read in a run that did other things first. False where the system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cache_bytes_by_model(dtype: torch.dtype) -> dict:
    """KV-cache bytes per token of each DeepSeek-VL2 model (their configs in tests/data/configs), beside what an
    expanded cache (every head's keys and values) would take: MLA caches only the latent and the rope key."""
    out = {}
    for config in sorted((ROOT / "tests" / "data" / "configs").glob("*/config.json")):
        lang = ModelConfig.from_dir(config.parent).language
        size = torch.empty((), dtype=dtype).element_size()
        if lang.use_mla:
            per_head = lang.num_attention_heads * (lang.q_head_dim + lang.v_head_dim)
        else:
            per_head = lang.kv_heads * 2 * lang.head_dim
        expanded = lang.num_hidden_layers * per_head * size
        out[config.parent.name] = {"attention": "MLA" if lang.use_mla else "MHA",
                                   "bytes_per_token": cache_token_bytes(lang, dtype),
                                   "expanded_bytes_per_token": expanded}
    return out


def ensure_model(path: Path | None, config: str = "tiny", layers: int | None = None) -> Path:
    """`path` when given; else a random bf16 checkpoint of `config`'s real dimensions (its first `layers` decoder
    layers when given), written by the checkpoint factory under bench/out/ on first use."""
    source = ROOT / "tests" / "data" / "configs" / CONFIGS[config]
    if path is None:
        path = DEFAULT_MODEL.with_name(f"{CONFIGS[config]}{f'-{layers}layers' if layers else ''}-random")
    if (path / "config.json").is_file():
        return path
    from dsvl2.model.factory import write_random_checkpoint

    raw = json.loads((source / "config.json").read_text())
    if layers:
        raw["language_config"]["num_hidden_layers"] = layers
    out = write_random_checkpoint(raw, path, seed=0, dtype=torch.bfloat16, tokenizer_dir=PARITY_TOKENIZER)
    import shutil

    shutil.copy(source / "processor_config.json", out / "processor_config.json")
    return out


def report_paths(model) -> dict:
    """Decide (or read the cached decision of) every family's path for this model, print one line each, return them."""
    if model.device.type == "cpu" and model.dtype is torch.bfloat16:
        kernels.paths(kernel_calibration.language_trials(model.language))
        kernels.paths(kernel_calibration.vision_trials(model.vision))
    paths = kernels.paths()
    for route in paths.routes:
        print(f"path {route.family}: {route.use} ({route.reason})", flush=True)
    return paths.as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a checkpoint directory (default: a random one of --config)")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="dimensions of the random checkpoint")
    ap.add_argument("--layers", type=int, help="keep the first L decoder layers of --config's random checkpoint")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model and the limits run")
    ap.add_argument("--sections", default="limits,vision,prefill,decode,e2e")
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="prefill length, and each decode row's context")
    ap.add_argument("--e2e-pages", type=int, default=8)
    ap.add_argument("--e2e-tokens", type=int, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")

    if args.layers is not None and (args.layers < 1 or args.model is not None):
        ap.error("--layers takes a positive count and applies to --config's random checkpoint, not to --model")
    path = ensure_model(args.model, args.config, args.layers)
    rss_before = peak_rss_gib()
    t = time.perf_counter()
    model = load_model(path, dtype=dtype, device=device)
    processor = Processor.from_dir(path)
    weights_gib = nbytes(model.parameters()) / 2**30
    machine = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": str(device)}  # fmt: skip
    print(f"cpu: {machine['cpu']}; torch {torch.__version__}, {machine['threads']} threads", flush=True)
    print(f"kernels: {kernels.status().describe()}", flush=True)
    machine["kernel_paths"] = report_paths(model)
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    results: dict = {"machine": machine, "model": str(path), "dtype": args.dtype, "weights_gib": weights_gib,
                     "load_seconds": time.perf_counter() - t, "rss_before_load_gib": rss_before}

    results["cache_bytes_per_token"] = cache_bytes_by_model(dtype)
    for name, c in results["cache_bytes_per_token"].items():
        print(f"KV cache {name} ({c['attention']}, {args.dtype}): {c['bytes_per_token']:,} bytes per token "
              f"(every head's keys and values would take {c['expanded_bytes_per_token']:,})", flush=True)

    def limits_before(section: str) -> dict:
        found = measure_limits(model.cfg.language.hidden_size, device)
        results.setdefault("limits_by_section", {})[section] = found
        results.setdefault("limits", found)
        peak = f" (8192-cubed {found['bf16_peak_gflops']:.0f})" if "bf16_peak_gflops" in found else ""
        print(f"limits before {section}: bf16 {found['bf16_gflops']:.0f} GFLOP/s{peak}, fp32 "
              f"{found['fp32_gflops']:.0f} GFLOP/s, read {found['read_gbs']:.1f} GB/s ({found['read_pattern']})",
              flush=True)
        return found

    if sections == {"limits"}:
        limits_before("limits")
    if "vision" in sections:
        limits = limits_before("vision")
        r = results["vision"] = bench_vision(model, limits)
        print(f"vision: {r['seconds_per_tile']:.3f} s/tile, {r['gflops']:.0f} GFLOP/s; {r['of_bf16_rate']:.0%} of the "
              f"bf16 rate ({_runs(r)})", flush=True)
    if "prefill" in sections:
        limits = limits_before("prefill")
        r = results["prefill"] = bench_prefill(model, limits, tokens=args.prompt_tokens)
        print(f"prefill: {r['tokens_per_s']:.0f} tok/s, {r['gflops']:.0f} GFLOP/s; {r['of_bf16_rate']:.0%} of the "
              f"bf16 rate ({_runs(r)})", flush=True)
        g = r["grouped_gflops"]
        grouped = (f"routed experts (grouped GEMMs, {g['rows_per_expert']:.0f} rows x {g['experts']} experts, "
                   f"top-{g['top_k']}) {g['torch']:.0f} GFLOP/s by torch"
                   + (f", {g['kernel']:.0f} by the kernel" if "kernel" in g else "")) if g else "no routed experts"
        print(f"  bf16 rates on its own products: dense {r['dense_gflops']:.0f} GFLOP/s, {grouped}; bound "
              f"{r['bound_tokens_per_s']:.0f} tok/s ({r['routed_gflop']:.0f} GFLOP routed, {r['other_gflop']:.0f} "
              f"other): {r['of_bound']:.0%} of bound", flush=True)
    decode_bytes = {}
    if "decode" in sections:
        results["decode"] = []
        for batch in (int(b) for b in args.decode_batches.split(",")):
            limits = limits_before(f"decode batch {batch}")
            r = bench_decode(model, batch, context=args.prompt_tokens)
            results["decode"].append(r)
            decode_bytes[batch] = r["bytes_per_step"]
            low, high = r["read_gbs_range"]
            print(f"decode batch {batch}: {r['step_ms']:.0f} ms/step, {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['bytes_per_step'] / 1e9:.2f} GB/step; read {r['read_gbs']:.1f} GB/s ({low:.0f}-{high:.0f}) "
                  f"between steps, bound {r['bound_ms']:.3g} ms; {r['of_bandwidth_bound']:.0%} of bandwidth bound "
                  f"(median of the steps); cache {r['cache_bytes_per_token']} B/token", flush=True)
    if "e2e" in sections:
        limits = limits_before("e2e")
        release_free_memory()  # what earlier sections left in the allocator's free lists is not the job's memory
        e2e_start_rss = current_rss_gib()
        section_peak = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batched = bench_e2e(model, processor, limits, pages=args.e2e_pages, new_tokens=args.e2e_tokens, batch=8)
        # The batch-8 job's own peak; on a GPU the weights are not in the host's RSS, which says nothing then.
        batch8_peak = peak_rss_gib() if section_peak and device.type == "cpu" else None
        if device.type == "cuda":
            results["batch8_gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"peak GPU memory of the batch-8 job: {results['batch8_gpu_peak_gib']:.2f} GiB "
                  f"(weights {weights_gib:.2f} GiB)", flush=True)
        single = bench_e2e(model, processor, limits, pages=2, new_tokens=args.e2e_tokens, batch=1)
        step_bytes = decode_bytes.get(8) or bench_decode(model, 8)["bytes_per_step"]
        bound = e2e_bound(model, limits, prompt_tokens=batched["prompt_tokens"], tiles=5,
                          new_tokens=args.e2e_tokens, decode_bytes=step_bytes, batch=8)
        # The same bound one page at a time: what batching can gain at all once both run at the machine's limits.
        single_bytes = decode_bytes.get(1) or bench_decode(model, 1)["bytes_per_step"]
        bound_single = e2e_bound(model, limits, prompt_tokens=batched["prompt_tokens"], tiles=5,
                                 new_tokens=args.e2e_tokens, decode_bytes=single_bytes, batch=1)
        results["e2e"] = {"batch8": batched, "batch1": single, "bound_pages_per_hour": bound,
                          "bound_one_at_a_time_pages_per_hour": bound_single, "bound_speedup": bound / bound_single,
                          "batch8_peak_rss_gib": batch8_peak, "rss_at_section_start_gib": e2e_start_rss,
                          "batch8_peak_over_weights_gib": batch8_peak - weights_gib if batch8_peak else None,
                          "of_bound": batched["pages_per_hour"] / bound,
                          "speedup_over_one_at_a_time": batched["pages_per_hour"] / single["pages_per_hour"]}
        print(f"end to end (2x2 pages, {args.e2e_tokens} tokens): batch 8 {batched['pages_per_hour']:.0f} pages/h "
              f"= {results['e2e']['of_bound']:.0%} of bound {bound:.0f}; one at a time "
              f"{single['pages_per_hour']:.0f} pages/h; speedup {results['e2e']['speedup_over_one_at_a_time']:.2f}x",
              flush=True)
        print(f"  bound one page at a time {bound_single:.0f} pages/h: at this machine's limits batch 8 gains "
              f"{bound / bound_single:.2f}x over one at a time", flush=True)
        if batch8_peak:
            print(f"peak RSS of the batch-8 job: {batch8_peak:.2f} GiB = weights + {batch8_peak - weights_gib:.2f} GiB "
                  f"(RSS at its start {e2e_start_rss:.2f} GiB)", flush=True)
    results["peak_rss_gib"] = peak_rss_gib()
    where = "on the GPU" if device.type == "cuda" else f"{weights_gib:.2f} GiB"
    print(f"peak RSS {results['peak_rss_gib']:.2f} GiB (weights {where})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
