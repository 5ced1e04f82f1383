"""Benchmark: weight-streaming rate (GB/s) of skinny bf16 products, torch's F.linear vs model/kernels.py's
AVX512-BF16 kernel, beside this machine's read bandwidth measured in the same run.

Every product cycles over enough distinct weights (--footprint-mb in total, well past the last-level cache)
that each weight comes from memory, as in a decode step. Rates count the weight bytes only (x and y are
tiny). The two implementations alternate repetition by repetition, so load from other processes hits both
alike; the table gives medians over --reps (and the best repetition of each). On a shared machine,
--wait-idle S waits (up to S seconds) before each repetition until other processes leave the CPUs idle.

    python bench/gemv.py [--reps 7] [--footprint-mb 512] [--rows 1 2 4 8 16 32] [--threads N] [--wait-idle 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsvl2.model import kernels

SHAPES = ((896, 1280), (1792, 1280), (1280, 896), (1280, 1280), (129280, 1280))  # (N, K) of w
ROWS = (1, 2, 4, 8, 16, 32)


def _cpu_ticks() -> tuple[int, int, float]:
    """(busy, total) ticks of all CPUs from /proc/stat, and this process's own CPU ticks."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    own = os.times()
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), (own.user + own.system) * os.sysconf("SC_CLK_TCK")


def wait_idle(max_seconds: float, *, window: float = 0.3, busy_share: float = 0.08) -> None:
    """Return once other processes used under `busy_share` of the CPUs over `window`, or after max_seconds."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        b0, t0, o0 = _cpu_ticks()
        time.sleep(window)
        b1, t1, o1 = _cpu_ticks()
        if (b1 - b0) - (o1 - o0) <= busy_share * max(t1 - t0, 1):
            return


def read_bandwidth(*, mb: int, reps: int, idle: float = 0) -> float:
    """GB/s of `t.sum()` over a bf16 tensor of `mb` megabytes (median of reps)."""
    big = torch.ones(mb * 2**20 // 2, dtype=torch.bfloat16)
    big.sum()
    rates = []
    for _ in range(reps):
        if idle:
            wait_idle(idle)
        start = time.perf_counter()
        big.sum()
        rates.append(big.numel() * 2 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def streaming_rates(fns: dict[str, Callable], n: int, k: int, m: int, *, footprint: int, reps: int,
                    idle: float = 0) -> dict[str, list[float]]:
    """GB/s of weight read per repetition for each function, cycling over distinct (n, k) weights."""
    nbytes = n * k * 2
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(max(2, -(-footprint // nbytes)))]
    x = torch.randn(m, k, dtype=torch.bfloat16)
    for fn in fns.values():  # warm up: thread pool, page faults, code paths
        for w in weights:
            fn(x, w)
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        if idle:
            wait_idle(idle)
        for name, fn in fns.items():
            start = time.perf_counter()
            for w in weights:
                fn(x, w)
            rates[name].append(len(weights) * nbytes / (time.perf_counter() - start) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per product (median reported)")
    parser.add_argument("--footprint-mb", type=int, default=512, help="total size of the distinct weights cycled")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="values of M (rows of x)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S",
                        help="before each repetition wait up to S seconds for the other processes to go idle")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    ok = kernels.available()
    build = time.perf_counter() - start
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel "
          + (f"available (build/load {build:.1f} s)" if ok else f"unavailable: {kernels.build_error()}"))
    idle = args.wait_idle if Path("/proc/stat").is_file() else 0
    print(f"read bandwidth (bf16 sum over 512 MB): {read_bandwidth(mb=512, reps=args.reps, idle=idle):.1f} GB/s")

    fns: dict[str, Callable] = {"F.linear": F.linear}
    if ok:
        fns["kernel"] = kernels.linear_bf16
    header = f"{'N x K':>13} {'M':>3} | " + " | ".join(f"{name:>17}" for name in fns)
    print(header + (" | kernel/F.linear" if ok else ""))
    print(" " * 19 + " | ".join(f"{'median (best)':>17}" for _ in fns))
    for n, k in SHAPES:
        for m in args.rows:
            rates = streaming_rates(fns, n, k, m, footprint=args.footprint_mb * 2**20, reps=args.reps, idle=idle)
            med = {name: statistics.median(r) for name, r in rates.items()}
            cells = " | ".join(f"{med[name]:8.1f} ({max(rates[name]):5.1f})" for name in fns)
            ratio = f" | {med['kernel'] / med['F.linear']:6.2f}x" if ok else ""
            print(f"{f'{n} x {k}':>13} {m:>3} | {cells}{ratio}", flush=True)
        print(f"read bandwidth now: {read_bandwidth(mb=512, reps=3, idle=idle):.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
