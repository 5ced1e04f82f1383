"""Weight-only quantisation benchmark: decode time per step for none / int8 / int4 in one run, each beside its own
bandwidth bound, plus load peak RSS, and (--agreement) the bf16 / int8 / int4 agreement table with float32 on every
parity checkpoint and case.

    python bench/quant_bench.py [--model DIR | --config tiny|small|base [--layers L]] [--dtype float32|bfloat16]
                                [--batches 1 8] [--steps 8] [--agreement [--agreement-dtype bfloat16]] [--cases a,b]
                                [--checkpoints tiny-mha,small-mla]

The model defaults to a random bf16 checkpoint of the real deepseek-vl2-tiny dimensions (bench/engine_bench.py's
ensure_model; --layers L keeps its first L decoder layers). Each scheme loads in its own child process, so its peak
RSS is its own. Bound = bytes a decode step reads (the weights and scales of every linear the step runs, routed
experts only where the batch sends tokens; the cache and embedding rows are left out) / the read bandwidth
measured right before (sum over a 1 GiB tensor, fastest of 3).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

SCHEMES = ("none", "int8", "int4")


def cpu_line() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    return f"cpu: {model}; {torch.get_num_threads()} threads; flags {' '.join(wanted)}"


def read_bandwidth() -> float:
    """Bytes per second reading a 1 GiB float32 tensor (fastest of 3 sums)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def linear_bytes(module: nn.Module) -> int:
    """Bytes one product with `module` reads: the weight, or the quantised weight and the scales the op reads."""
    from dsvl2.model.quant import QuantLinear

    if isinstance(module, QuantLinear):
        n_scales = module.scales.numel() * (2 if module.layout == "cpu" else 1)  # torch's int4 op: scales and zeros
        return module.qweight.numel() + n_scales * module.scales.element_size()
    return module.weight.numel() * module.weight.element_size()


class ByteCounter:
    """Bytes a language-model forward reads: every linear outside the routed experts once, plus the routed experts
    the gates send tokens to. Each gate's forward is wrapped to keep its choice, and `settle` counts them after the
    step. Not for timed steps: a wrapped gate is called as a module, where the decode plan would run its kernel
    (decode_plan.py), and counting in a forward hook made int4's batch-1 step 1.03x slower (Tiny, Zen 5)."""

    def __init__(self, lm: nn.Module):
        from dsvl2.model.quant import QuantLinear

        linears = {name: m for name, m in lm.named_modules() if isinstance(m, nn.Linear | QuantLinear)}
        self.fixed = sum(linear_bytes(m) for name, m in linears.items() if ".experts." not in name)
        self.per_expert = {}
        for layer in lm.model.layers:
            if hasattr(layer.mlp, "experts"):
                e = layer.mlp.experts[0]
                parts = (e.gate_proj, e.up_proj, e.down_proj)
                self.per_expert[id(layer.mlp.gate)] = sum(linear_bytes(m) for m in parts)
        self.bytes, self.chosen = 0, []
        self.gates = [layer.mlp.gate for layer in lm.model.layers if hasattr(layer.mlp, "experts")]
        for gate in self.gates:
            gate.forward = self._keeping(id(gate), gate.forward)  # an instance attribute over the class's method

    def _keeping(self, gate: int, forward):
        def keep(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.chosen.append((gate, out[0]))
            return out
        return keep

    def start(self) -> None:
        self.chosen.clear()

    def settle(self) -> int:
        """The bytes the forward since `start` read."""
        self.bytes = self.fixed + sum(len(ids.unique()) * self.per_expert[gate] for gate, ids in self.chosen)
        return self.bytes

    def close(self) -> None:
        for gate in self.gates:
            del gate.forward  # the class's method again


def decode_steps(model: nn.Module, batch: int, steps: int) -> tuple[float, int]:
    """Median seconds per decode step of `batch` rows after a 32-token prompt, and the bytes a step read. The steps
    are timed as the CLI runs them (nothing watching the gates: the decode plan settles every piece), then run again
    from the same prompt with the gates' choices counted (`ByteCounter`), which routes them alike."""
    from dsvl2.model.sampling import greedy_ids

    lm = model.language
    ids = torch.randint(3, 1000, (batch, 32), generator=torch.Generator().manual_seed(batch))

    def prefilled():
        cache = lm.new_cache(batch, 32 + steps + 1)
        lm(lm.embed(ids), cache)
        cache.advance(32)
        return cache

    cache, tok, fed, times = prefilled(), ids[:, -1:], [], []
    for _ in range(steps):
        fed.append(tok)
        begin = time.perf_counter()
        tok = greedy_ids(lm.logits(lm(lm.embed(tok), cache)[:, -1]))[:, None]  # as the engine samples greedy rows
        cache.advance(1)
        times.append(time.perf_counter() - begin)
    counter, cache = ByteCounter(lm), prefilled()
    for tok in fed:
        counter.start()
        lm(lm.embed(tok), cache)
        cache.advance(1)
        counter.settle()
    counter.close()
    return statistics.median(times), counter.bytes


def run_scheme(path: str, scheme: str, dtype: str, batches: list[int], steps: int, queue) -> None:
    """In a child process: load, then per batch size the median decode step and the bytes it read."""
    from engine_bench import peak_rss_gib

    from dsvl2.model.quant import quant_layers
    from dsvl2.model.weights import load_model

    start = time.perf_counter()
    model = load_model(path, dtype=getattr(torch, dtype), quantize=scheme)
    load_s, rss = time.perf_counter() - start, peak_rss_gib()
    impls = sorted({(*layer.impls, layer.layout) for layer in quant_layers(model)})
    results = []
    with torch.inference_mode():
        for batch in batches:
            results.append((batch, *decode_steps(model, batch, steps), read_bandwidth()))
    queue.put({"scheme": scheme, "load_s": load_s, "peak_rss_gib": rss, "impls": impls, "decode": results})


def agreement(cases_wanted: set[str] | None, steps: int = 12, quant_dtype: torch.dtype = torch.float32,
              checkpoints: set[str] | None = None) -> None:
    from parity import checkpoint_dir, checkpoint_names, load_cases, parity_processor
    from quant_agreement import compare, run_case

    from dsvl2.model.weights import load_model

    print("\nagreement with float32: min/mean logits cosine, greedy tokens matched before the first difference"
          f" (int8 / int4 with {str(quant_dtype).removeprefix('torch.')} activations)")
    print(f"{'checkpoint':<11} {'case':<17} {'bf16':>22} {'int8':>22} {'int4':>22}")
    for name in checkpoint_names():
        if checkpoints and name not in checkpoints:
            continue
        eos = parity_processor(name).tokenizer.eos_id
        ref_model = load_model(checkpoint_dir(name))
        variants = {"bf16": load_model(checkpoint_dir(name), dtype=torch.bfloat16),
                    "int8": load_model(checkpoint_dir(name), dtype=quant_dtype, quantize="int8"),
                    "int4": load_model(checkpoint_dir(name), dtype=quant_dtype, quantize="int4")}
        for case in load_cases():
            if cases_wanted and case.name not in cases_wanted:
                continue
            ref = run_case(ref_model, case, steps, eos)
            cells = []
            for model in variants.values():
                a = compare(ref, run_case(model, case, steps, eos))
                cells.append(f"{a.min_cos:.4f}/{a.mean_cos:.4f} {a.matched:>2}/{a.steps}")
            print(f"{name:<11} {case.name:<17} " + " ".join(f"{c:>22}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--config", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--agreement", action="store_true", help="print the parity agreement table")
    parser.add_argument("--cases", default="", help="comma-separated parity cases for --agreement (default all)")
    parser.add_argument("--agreement-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="activations of the int8 / int4 models in --agreement (bfloat16: the kernels' bf16 "
                             "paths, AVX512 / AMX where the CPU has them)")
    parser.add_argument("--checkpoints", default="", help="comma-separated parity checkpoints for --agreement")
    args = parser.parse_args()
    from engine_bench import ensure_model

    print(cpu_line())
    from dsvl2.model import quant_kernels

    print(f"quantised kernels: {quant_kernels.status().describe()}")
    path = ensure_model(args.model, args.config, args.layers)
    print(f"model: {path}; activations {args.dtype}; decode context 32 tokens; median of {args.steps} steps")
    ctx = multiprocessing.get_context("spawn")
    print(f"{'scheme':<6} {'batch':>5} {'step ms':>9} {'MB read':>9} {'GB/s':>6} {'bound ms':>9} {'ratio':>6} "
          f"{'load s':>7} {'peak RSS GiB':>13}  impls (decode, prefill, layout)")
    for scheme in args.schemes:
        queue = ctx.Queue()
        child = ctx.Process(target=run_scheme, args=(str(path), scheme, args.dtype, args.batches, args.steps, queue))
        child.start()
        out = queue.get()
        child.join()
        for batch, step, nbytes, bandwidth in out["decode"]:
            bound = nbytes / bandwidth
            print(f"{scheme:<6} {batch:>5} {step * 1e3:>9.2f} {nbytes / 1e6:>9.1f} {bandwidth / 1e9:>6.1f} "
                  f"{bound * 1e3:>9.2f} {step / bound:>6.2f} {out['load_s']:>7.1f} {out['peak_rss_gib']:>13.2f}  "
                  f"{out['impls'] or '-'}", flush=True)
    if args.agreement:
        agreement(set(filter(None, args.cases.split(","))) or None, quant_dtype=getattr(torch, args.agreement_dtype),
                  checkpoints=set(filter(None, args.checkpoints.split(","))) or None)


if __name__ == "__main__":
    main()
