"""The quantised products one by one, every implementation that can run them here side by side, on the model's own
shapes: per (scheme, shape, rows) the time of "kernel" (AVX2 tiles), "kernel_avx512" (AVX512 tiles, bf16
activations on an AVX512-BF16 CPU), "kernel_amx" (those, or from 6 rows AMX's tiles on a Xeon with AMX), "packed"
(torch's int8/int4 CPU ops) and "dequant" (F.linear on the dequantised weight), beside the unquantised bf16
product (torch's F.linear, and our bf16 kernel where it is built), each as a share of its own bandwidth bound (the
bytes it reads / the read bandwidth measured in the same run).

    python bench/quant_tiles.py [--rows 1 2 4 8 32 256] [--mib 256] [--schemes int8 int4] [--shapes 1280x1280 ...]

Each timed call multiplies the same activations by enough distinct weights of the shape (--mib of bf16 weight in
all) that they cannot stay in the last-level cache, as a decode step reads its layers; activations are bf16, as
a model runs on a CPU with native bf16. Shapes: Tiny's attention (1280 x 1280), dense MLP (6848 x 1280 and its
down projection 1280 x 6848, int4 groups of 64) and routed expert (896 x 1280).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

from machine_limits import best_time, cpu_line, read_bandwidth  # noqa: E402
from quant_layers import quant_layer  # noqa: E402

from dsvl2.model import kernels  # noqa: E402
from dsvl2.model.quant import KERNEL_ISA, QuantLinear, Scheme  # noqa: E402

SHAPES = ((1280, 1280), (6848, 1280), (1280, 6848), (896, 1280))
CPU = torch.device("cpu")


def layers_of(n: int, k: int, scheme: Scheme, count: int) -> list[QuantLinear]:
    """`count` distinct quantised layers of shape (n, k) in the kernels' layout."""
    return [quant_layer(torch.randn(n, k, generator=torch.Generator().manual_seed(i)), scheme, torch.bfloat16)[0]
            for i in range(count)]


def bytes_read(layer: QuantLinear) -> int:
    return layer.qweight.numel() + layer.scales.numel() * layer.scales.element_size()


def time_impl(layers: list[QuantLinear], impl: str, x: torch.Tensor) -> float | None:
    """Seconds for the product of x by every layer with `impl`, in the layout `impl` reads; None where it cannot."""
    layout = {"packed": "plain" if layers[0].scheme.bits == 8 else "cpu", "dequant": layers[0].layout}.get(impl)
    variants = layers if layout in (None, layers[0].layout) else [m.copy_as(layout) for m in layers]
    if impl in KERNEL_ISA and not variants[0].kernel_fits(x, impl):
        return None
    if impl == "packed" and not (layout in variants[0].layouts() and variants[0].packable(x)):
        return None
    with torch.inference_mode():
        return best_time(lambda: [m.run(x, impl) for m in variants], repeat=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 256])
    ap.add_argument("--mib", type=int, default=256, help="bf16 MiB of distinct weights per shape")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES],
                    help="N x K of each product (the lm_head's: 129280x1280)")
    ap.add_argument("--schemes", nargs="+", default=["int8", "int4"], choices=("int8", "int4"))
    ap.add_argument("--impls", nargs="+", default=["kernel", "kernel_avx512", "kernel_amx", "packed", "dequant"])
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}; {torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)
    gbs, pattern = read_bandwidth(512 * 2**20, CPU)
    print(f"read bandwidth {gbs:.1f} GB/s ({pattern})", flush=True)
    print(f"{'shape':<11} {'rows':>4} {'impl':<16} {'ms':>8} {'MB':>7} {'% of bound':>10} {'vs bf16':>8}")
    for n, k in (tuple(map(int, shape.split("x"))) for shape in args.shapes):
        count = max(1, args.mib * 2**20 // (2 * n * k))
        dense = [torch.randn(n, k, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
                 for i in range(count)]
        quantised = {name: layers_of(n, k, Scheme.named(name), count) for name in args.schemes}
        for rows in args.rows:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            rates = {"bf16 F.linear": best_time(lambda x=x, dense=dense: [F.linear(x, w) for w in dense], repeat=3)}
            if kernels.available() and kernels.fits(x, dense[0]):
                rates["bf16 kernel"] = best_time(lambda x=x, dense=dense: [kernels.linear_bf16(x, w) for w in dense],
                                                 repeat=3)
            base = min(rates.values())
            for name, seconds in rates.items():
                mb = count * n * k * 2 / 1e6
                print(f"{n}x{k:<6} {rows:>4} {name:<16} {seconds * 1e3:8.2f} {mb:7.1f} "
                      f"{mb / 1e3 / gbs / seconds:10.0%} {base / seconds:7.2f}x", flush=True)
            for name, layers in quantised.items():
                mb = count * bytes_read(layers[0]) / 1e6
                for impl in args.impls:
                    seconds = time_impl(layers, impl, x)
                    if seconds is not None:
                        print(f"{n}x{k:<6} {rows:>4} {name + ' ' + impl:<16} {seconds * 1e3:8.2f} {mb:7.1f} "
                              f"{mb / 1e3 / gbs / seconds:10.0%} {base / seconds:7.2f}x", flush=True)
    gbs_after, _ = read_bandwidth(512 * 2**20, CPU)
    print(f"read bandwidth after: {gbs_after:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
