"""The machine's limits that bench/engine_bench.py sets its figures beside: the CPU line (model name and the flags
that decide bf16 speed), timing that waits for the device, the bf16 / fp32 matrix rate of a model-shaped GEMM and
the memory read bandwidth (the fastest of several read patterns). Holds no state.
"""

from __future__ import annotations

import platform
import subprocess
import time

import torch
import torch.nn.functional as F

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
def gemm_rate(hidden: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeat: int = 5) -> float:
    """GFLOP/s of a model-shaped product (2,048 rows, 8,192 on a GPU, of width `hidden` by a 4 x hidden weight)."""
    rows = 8192 if device.type == "cuda" else 2048
    a = torch.randn(rows, hidden, dtype=dtype, device=device)
    b = torch.randn(4 * hidden, hidden, dtype=dtype, device=device)
    seconds = best_time(lambda: F.linear(a, b), repeat, device=device, inner=back_to_back(device))
    return 2 * rows * hidden * b.shape[0] / seconds / 1e9


def paired_rates(fn, flops: float, sample, repeat: int, device: torch.device = CPU) -> dict:
    """`fn` (doing `flops`) timed `repeat` times, each timing followed by a sample of the limit (`sample()`, GFLOP/s):
    on a shared host whose speed moves by 2x within minutes, a limit measured minutes apart can put a ratio past
    100%. Returns the best seconds, each run's ratio to the limit sampled right after it, and their median."""
    fn()
    synchronize(device)
    seconds, ratios, limits = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - t)
        limits.append(sample())
        ratios.append(flops / seconds[-1] / 1e9 / limits[-1])
    return {"seconds": min(seconds), "ratios": ratios, "limits_gflops": limits,
            "ratio": sorted(ratios)[len(ratios) // 2]}


def measure_limits(hidden: int, device: torch.device) -> dict:
    out = {}
    cuda, inner = device.type == "cuda", back_to_back(device)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out[f"{name}_gflops"] = gemm_rate(hidden, device, dt)
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
