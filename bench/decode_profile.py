"""Where a decode step's time goes: torch's profiler over a few decode steps of the engine's language model, per op.

    python bench/decode_profile.py [--model DIR | --config tiny|small|base [--layers L]] [--device cpu|cuda]
                                   [--quantize none|int8|int4] [--batches 1,8] [--context 1000] [--steps 10]
                                   [--rows 20]

Each row of a batch is prefilled with `--context` random tokens, then `--steps` greedy decode steps run under the
profiler (after three unprofiled ones). Printed per batch: the step time without and with the profiler, the ops by
self time on the host (and, on a GPU, by self time on the device), and on a GPU the kernels launched per step and
the share of the step the device was busy: a step whose device is idle most of the time is bound by the host
issuing its kernels, not by the GPU. The model defaults to bench/engine_bench.py's random real-dimension Tiny.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from engine_bench import CONFIGS, ensure_model
from machine_limits import cpu_line, synchronize
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dsvl2.model import kernels
from dsvl2.model.weights import load_model


def steps(lm, cache, tokens: torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """n greedy decode steps from `tokens`; the next tokens and each step's seconds (waiting for the device)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        tokens = lm.logits(lm(lm.embed(tokens), cache)[:, 0]).argmax(-1, keepdim=True)
        cache.advance(1)
        synchronize(device)
        times.append(time.perf_counter() - t)
    return tokens, times


def profile_batch(model, batch: int, context: int, n: int, rows: int) -> None:
    lm, device = model.language, model.device
    cache = lm.new_cache(batch, context + 2 * n + 8)
    for b in range(batch):
        sub = cache.rows([b])
        lm(lm.embed(torch.randint(3, model.cfg.language.vocab_size, (1, context), device=device)), sub)
        sub.advance(context)
    tokens = torch.randint(3, model.cfg.language.vocab_size, (batch, 1), device=device)
    tokens, _ = steps(lm, cache, tokens, 3, device)  # warm
    tokens, plain = steps(lm, cache, tokens, n, device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _, profiled = steps(lm, cache, tokens, n, device)
    step = statistics.median(plain)
    print(f"\n== batch {batch}, context {context}: {step * 1e3:.2f} ms a step ({statistics.median(profiled) * 1e3:.2f} "
          f"under the profiler), {batch / step:.1f} tokens/s", flush=True)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48), flush=True)
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=48), flush=True)
        launch_calls = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        launches = sum(e.count for e in events if e.key in launch_calls)
        # The kernels' own events (an op's row repeats its kernels' time), microseconds -> seconds.
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
        wall = sum(profiled)
        print(f"kernels launched: {launches / n:.0f} a step; device busy {busy / n * 1e3:.2f} ms of "
              f"{wall / n * 1e3:.2f} ms a step ({busy / wall:.0%})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a checkpoint directory (default: a random one of --config)")
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, help="keep the first L decoder layers of --config's random checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--quantize", default="none", choices=("none", "int8", "int4"), help="weight-only quantisation")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20, help="ops printed per table")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    path = ensure_model(args.model, args.config, args.layers)
    model = load_model(path, dtype=getattr(torch, args.dtype), device=device, quantize=args.quantize)
    print(f"cpu: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    print(f"model: {path.name}, {args.dtype}, quantize {args.quantize}; kernels: {kernels.status().describe()}",
          flush=True)
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            profile_batch(model, batch, args.context, args.steps, args.rows)


if __name__ == "__main__":
    main()
