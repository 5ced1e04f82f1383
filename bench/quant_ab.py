"""Same-process A/B of the quantised decode step: the unquantised model and each scheme on each kernel path, loaded
together and timed in alternating rounds, so that every speedup is a ratio of the same moments on a host whose speed
moves (this project's shared hosts: 2x within minutes; bench/quant_bench.py runs each scheme in its own process,
minutes apart, which suits peak RSS but not ratios).

    python bench/quant_ab.py [--model DIR | --config tiny --layers 3] [--batches 1 8] [--rounds 6] [--steps 4]
                             [--impls [kernel_avx512 kernel_amx ...]]

Per scheme the model loads as `load_model(quantize=...)` loads it (the choice runs and is printed: variant
"chosen"), and once more for each of --impls that its layers can run: every quantised layer set to that
implementation for decode (relaid out into the kernels' layout first). Each round runs --steps decode steps (context
32) of every variant at every batch size, one variant after another, then samples the read bandwidth. Printed per
variant and batch: the median over rounds of the step time, bytes read per step (bench/quant_bench.py's count), the
share of its own bandwidth bound, and its speedup over the unquantised model as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from quant_bench import cpu_line, decode_steps, read_bandwidth  # noqa: E402


def set_decode_impl(model: torch.nn.Module, impl: str) -> bool:
    """Every quantised layer of `model` decodes with `impl` (in the kernels' layout); False where one cannot."""
    from dsvl2.model.quant import KERNEL_LAYOUT, quant_layers

    probe_dtype = next(model.language.parameters()).dtype
    for layer in quant_layers(model):
        layer.relayout(KERNEL_LAYOUT[layer.scheme.bits])
        if not layer.kernel_fits(torch.empty(1, layer.in_features, dtype=probe_dtype), impl):
            return False
        layer.impls = (impl, layer.impls[1])
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--config", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schemes", nargs="+", default=["int8", "int4"], choices=("int8", "int4"))
    parser.add_argument("--impls", nargs="*", default=["kernel_avx512", "kernel_amx"],
                        help="kernel paths to time besides the chosen one (none: only the choice, one copy per scheme)")
    args = parser.parse_args()
    from engine_bench import ensure_model

    from dsvl2.model import quant_kernels
    from dsvl2.model.quant import quant_layers
    from dsvl2.model.weights import load_model

    print(cpu_line())
    print(f"quantised kernels: {quant_kernels.status().describe()}")
    path = ensure_model(args.model, args.config, args.layers)
    print(f"model: {path}; bf16; decode context 32 tokens; {args.rounds} rounds of {args.steps} steps per variant")
    models = {"none": load_model(path, dtype=torch.bfloat16)}
    variants: list[tuple[str, str, torch.nn.Module]] = [("none", "-", models["none"])]
    for scheme in args.schemes:
        chosen = load_model(path, dtype=torch.bfloat16, quantize=scheme)
        print(f"{scheme}: the choice took {sorted({(*m.impls, m.layout) for m in quant_layers(chosen)})}")
        variants.append((scheme, "chosen", chosen))
        if args.impls:  # a second copy, its layers set to each implementation in turn
            model = models[scheme] = load_model(path, dtype=torch.bfloat16, quantize=scheme)
            variants += [(scheme, impl, model) for impl in args.impls if set_decode_impl(model, impl)]
    times = {(s, i, b): [] for s, i, _ in variants for b in args.batches}
    nbytes, bandwidths = {}, []
    with torch.inference_mode():
        for _ in range(args.rounds):
            for scheme, impl, model in variants:
                if impl not in ("-", "chosen"):
                    set_decode_impl(model, impl)
                for batch in args.batches:
                    seconds, nbytes[scheme, impl, batch] = decode_steps(model, batch, args.steps)
                    times[scheme, impl, batch].append(seconds)
            bandwidths.append(read_bandwidth())
    bandwidth = statistics.median(bandwidths)
    per_round = " ".join(f"{b / 1e9:.1f}" for b in bandwidths)
    print(f"read bandwidth per round: {per_round} GB/s (median {bandwidth / 1e9:.1f})")
    print(f"{'scheme':<6} {'impl':<14} {'batch':>5} {'step ms':>8} {'MB read':>8} {'of bound':>9} {'vs none':>8}")
    for scheme, impl, _ in variants:
        for batch in args.batches:
            ts, base = times[scheme, impl, batch], times["none", "-", batch]
            step = statistics.median(ts)
            bound = nbytes[scheme, impl, batch] / bandwidth
            speedup = statistics.median(b / t for b, t in zip(base, ts, strict=True))
            print(f"{scheme:<6} {impl:<14} {batch:>5} {step * 1e3:>8.2f} {nbytes[scheme, impl, batch] / 1e6:>8.1f} "
                  f"{bound / step:>9.0%} {speedup:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
