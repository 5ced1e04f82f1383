"""Engine benchmark: every figure beside this machine's limit, both measured in the same run.

    python bench/engine_bench.py [--model DIR] [--device cpu|cuda] [--sections limits,vision,prefill,decode,e2e]
                                 [--json OUT]

The model defaults to a random checkpoint at the real deepseek-vl2-tiny dimensions, written by the
checkpoint factory on first use (bench/out/, git-ignored). Limits: bf16 and fp32 matrix rate (a GEMM of
the model's own shapes) and memory read bandwidth. Ratios: vision and prefill FLOP/s over the bf16 rate;
decode time per step over its bandwidth bound (the read bandwidth is the fastest of several read patterns,
one of them a decode step's own one-row product, so no step can beat its bound), counting the bytes touched
(weights of the distinct experts the batch routes to, shared weights, lm_head, and the cache rows read); end to
end pages per hour over the bound from the same three limits. The limits are measured again right before each section
and each section's ratio uses its own (a shared machine's speed drifts over a ten-minute run; the first
measurement is reported as `limits`). Results print as lines and, with --json, a file.

With --device cuda the model and every measurement run on the GPU: timings wait for the device, the limits are
the GPU's (a model-shaped GEMM of 8192 rows, since a GPU needs more rows than a CPU to reach its rate, beside an
8192-cubed one reported as the peak; a 2 GiB read), and the peak GPU memory of the end-to-end job is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from dsvl2.model.config import ModelConfig  # noqa: E402
from dsvl2.model.engine import Engine  # noqa: E402
from dsvl2.model.language import MoE, cache_token_bytes  # noqa: E402
from dsvl2.model.processor import Processor  # noqa: E402
from dsvl2.model.requests import Request, Sampling, user_prompt  # noqa: E402
from dsvl2.model.weights import load_model  # noqa: E402

DEFAULT_MODEL = ROOT / "bench" / "out" / "deepseek-vl2-tiny-random"
TINY_CONFIG = ROOT / "tests" / "data" / "configs" / "deepseek-vl2-tiny"
PARITY_TOKENIZER = Path(os.environ.get("DSVL2_PARITY_DIR", ROOT.parent / "shared" / "parity")) / "tokenizer"


CPU = torch.device("cpu")


def cpu_line() -> str:
    """lscpu's model name and the flags that decide bf16 speed (every benchmark prints them)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU returns to the host before its kernels have run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeat: int = 5, *, device: torch.device = CPU, inner: int = 1) -> float:
    """Seconds per call of `fn`: the fastest of `repeat` timings of `inner` back-to-back calls, each timing waiting
    for the device."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - t) / inner)
    return min(times)


def back_to_back(device: torch.device) -> int:
    """Calls per timing of a short operation: on a GPU one call is too short beside the wait for the device."""
    return 20 if device.type == "cuda" else 1


# -- limits --------------------------------------------------------------------------------------------
def measure_limits(hidden: int, device: torch.device) -> dict:
    out = {}
    cuda, inner = device.type == "cuda", back_to_back(device)
    rows = 8192 if cuda else 2048
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(rows, hidden, dtype=dt, device=device)
        b = torch.randn(4 * hidden, hidden, dtype=dt, device=device)
        seconds = best_time(lambda a=a, b=b: F.linear(a, b), device=device, inner=inner)
        out[f"{name}_gflops"] = 2 * rows * hidden * b.shape[0] / seconds / 1e9
    if cuda:
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        out["bf16_peak_gflops"] = 2 * 8192**3 / best_time(lambda: a @ a, device=device, inner=inner) / 1e9
    out["read_gbs"], out["read_pattern"] = read_bandwidth((2048 if cuda else 512) * 2**20, device)
    return out


def read_probes(nbytes: int, device: torch.device) -> dict:
    """Ways to read `nbytes` once, each with every thread torch uses: reductions in bf16 and fp32, and the read
    a decode step makes itself (a one-row product over a bf16 weight), by torch and, where they are built, by
    our kernels. The fastest is the machine's read bandwidth: no decode step can then beat its bound."""
    from dsvl2.model import kernels

    bf16 = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    fp32 = bf16.view(torch.float32)
    weight = bf16.view(-1, 4096)
    row = torch.ones(1, 4096, dtype=torch.bfloat16, device=device)
    probes = {"bf16 sum": lambda: bf16.sum(), "fp32 sum": lambda: fp32.sum(),
              "torch one-row product": lambda: F.linear(row, weight)}  # fmt: skip
    if device.type == "cpu" and kernels.available():
        probes["kernel one-row product"] = lambda: kernels.linear_bf16(row, weight)
    return probes


def read_bandwidth(nbytes: int, device: torch.device, repeat: int = 5, probes: dict | None = None) -> tuple[float, str]:
    """(GB/s, pattern) of the fastest of `read_probes` reading `nbytes`."""
    inner = back_to_back(device)
    rates = {name: nbytes / best_time(fn, repeat, device=device, inner=inner) / 1e9
             for name, fn in (probes or read_probes(nbytes, device)).items()}  # fmt: skip
    best = max(rates, key=rates.get)
    return rates[best], best


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
@torch.inference_mode()
def bench_vision(model, limits, tiles: int = 8) -> dict:
    pixels = torch.randn(tiles, 3, 384, 384, device=model.device)
    seconds = best_time(lambda: model.encode_tiles(pixels), repeat=3, device=model.device) / tiles
    gflops = vision_flops_per_tile(model) / seconds / 1e9
    return {"seconds_per_tile": seconds, "gflops": gflops, "of_bf16_rate": gflops / limits["bf16_gflops"]}


@torch.inference_mode()
def bench_prefill(model, limits, tokens: int = 1000) -> dict:
    lm = model.language
    x = lm.embed(torch.randint(3, model.cfg.language.vocab_size, (1, tokens), device=model.device))

    def run():
        cache = lm.new_cache(1, tokens)
        lm.logits(lm(x, cache)[:, -1])

    seconds = best_time(run, repeat=2, device=model.device)
    params, pair = lm_token_params(model)
    flops = 2 * params * tokens + pair * tokens * (tokens + 1) / 2 + 2 * nbytes([lm.lm_head.weight]) // 2
    gflops = flops / seconds / 1e9
    return {"tokens_per_s": tokens / seconds, "gflops": gflops, "of_bf16_rate": gflops / limits["bf16_gflops"]}


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


def ensure_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from dsvl2.model.factory import write_random_checkpoint

    config = json.loads((TINY_CONFIG / "config.json").read_text())
    out = write_random_checkpoint(config, path, seed=0, dtype=torch.bfloat16, tokenizer_dir=PARITY_TOKENIZER)
    import shutil

    shutil.copy(TINY_CONFIG / "processor_config.json", out / "processor_config.json")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model and the limits run")
    ap.add_argument("--sections", default="limits,vision,prefill,decode,e2e")
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--e2e-pages", type=int, default=8)
    ap.add_argument("--e2e-tokens", type=int, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")

    path = ensure_model(args.model)
    rss_before = peak_rss_gib()
    t = time.perf_counter()
    model = load_model(path, dtype=dtype, device=device)
    processor = Processor.from_dir(path)
    weights_gib = nbytes(model.parameters()) / 2**30
    machine = {"cpu": cpu_line(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": str(device)}  # fmt: skip
    print(f"cpu: {machine['cpu']}; torch {torch.__version__}, {machine['threads']} threads", flush=True)
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
        print(f"vision: {r['seconds_per_tile']:.3f} s/tile, {r['gflops']:.0f} GFLOP/s = "
              f"{r['of_bf16_rate']:.0%} of bf16 rate", flush=True)
    if "prefill" in sections:
        limits = limits_before("prefill")
        r = results["prefill"] = bench_prefill(model, limits)
        print(f"prefill: {r['tokens_per_s']:.0f} tok/s, {r['gflops']:.0f} GFLOP/s = "
              f"{r['of_bf16_rate']:.0%} of bf16 rate", flush=True)
    decode_bytes = {}
    if "decode" in sections:
        results["decode"] = []
        for batch in (int(b) for b in args.decode_batches.split(",")):
            limits = limits_before(f"decode batch {batch}")
            r = bench_decode(model, batch)
            results["decode"].append(r)
            decode_bytes[batch] = r["bytes_per_step"]
            low, high = r["read_gbs_range"]
            print(f"decode batch {batch}: {r['step_ms']:.0f} ms/step, {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['bytes_per_step'] / 1e9:.2f} GB/step; read {r['read_gbs']:.1f} GB/s ({low:.0f}-{high:.0f}) "
                  f"between steps, bound {r['bound_ms']:.0f} ms; {r['of_bandwidth_bound']:.0%} of bandwidth bound "
                  f"(median of the steps); cache {r['cache_bytes_per_token']} B/token", flush=True)
    if "e2e" in sections:
        limits = limits_before("e2e")
        release_free_memory()  # what earlier sections left in the allocator's free lists is not the job's memory
        e2e_start_rss = current_rss_gib()
        section_peak = reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batched = bench_e2e(model, processor, limits, pages=args.e2e_pages, new_tokens=args.e2e_tokens, batch=8)
        batch8_peak = peak_rss_gib() if section_peak else None  # the batch-8 job's own peak
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
    print(f"peak RSS {results['peak_rss_gib']:.2f} GiB (weights {weights_gib:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
