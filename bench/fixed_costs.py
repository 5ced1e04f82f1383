"""What a decode step costs besides reading weights: a model with Tiny's structure and widths so small that its
products read almost nothing, timed per scheme on the kernel paths the real Tiny takes.

    python bench/fixed_costs.py [--batches 1 8] [--rounds 9] [--steps 50] [--schemes none int8 int4]

The model (written once under bench/out/ by the checkpoint factory) has the real Tiny's 12 decoder layers, the first
dense, 64 routed experts of which 6 a token and 2 shared, multi-head attention; its widths are hidden 128, one head
of 128, experts 128 wide, a vocabulary of 1,536 (the parity checkpoint's tokenizer), and the parity checkpoint's
small vision tower (decode never runs it). A step at batch 1 then reads 11 MB of weights in bf16 (~3 MB in int4),
which a 32 MiB L3 holds (~0.1 ms of a ~1.0-1.8 ms step), where the real Tiny's reads 1.1 GB: its time is the step's
Python, op dispatch, checks, allocations, parallel regions and the kernels' per-call setup, which the real model
pays as well on top of streaming its weights. Every quantised layer is set to the AVX512
tiles where the CPU has them (else the AVX2 ones), as the choice takes them for the real Tiny on the CPUs measured.
Each round times --steps greedy decode steps of every variant at every batch, one after another (context 30 tokens
and growing); printed per variant and batch: the median over rounds of the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]

from engine_bench import CONFIGS, PARITY_TOKENIZER  # noqa: E402
from quant_ab import set_decode_impl  # noqa: E402
from quant_bench import cpu_line  # noqa: E402

OUT = ROOT / "bench" / "out" / "deepseek-vl2-tiny-structure-random"
PARITY_TINY = PARITY_TOKENIZER.parent / "checkpoints" / "tiny-mha"
STRUCTURE = ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
             "first_k_dense_replace", "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob")
WIDTHS = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "num_attention_heads": 1,
          "num_key_value_heads": 1, "torch_dtype": "bfloat16"}


def ensure_structure_model() -> Path:
    """The small-width model of Tiny's structure (see the top), written on first use."""
    if (OUT / "config.json").is_file():
        return OUT
    from dsvl2.model.factory import write_random_checkpoint

    config = json.loads((PARITY_TINY / "config.json").read_text())
    tiny = json.loads((ROOT / "tests" / "data" / "configs" / CONFIGS["tiny"] / "config.json").read_text())
    language = config["language_config"]
    language.update({key: tiny["language_config"][key] for key in STRUCTURE}, **WIDTHS)
    config["projector_config"]["n_embed"] = WIDTHS["hidden_size"]
    config["torch_dtype"] = "bfloat16"
    return write_random_checkpoint(config, OUT, seed=0, dtype=torch.bfloat16, tokenizer_dir=PARITY_TINY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--schemes", nargs="+", default=["none", "int8", "int4"], choices=("none", "int8", "int4"))
    args = parser.parse_args()
    from dsvl2.model import quant_kernels
    from dsvl2.model.sampling import greedy_ids
    from dsvl2.model.weights import load_model

    path = ensure_structure_model()
    impl = "kernel_avx512" if quant_kernels.available() and quant_kernels.avx512_supported() else "kernel"
    print(f"{cpu_line()}; quantised layers on {impl}", flush=True)
    runs = {}  # (scheme, batch) -> (language model, cache, tokens)
    for scheme in args.schemes:
        model = load_model(path, quantize=scheme, dtype=torch.bfloat16)
        if scheme != "none" and not set_decode_impl(model, impl):
            sys.exit(f"{scheme}: a layer cannot run {impl}")
        lm = model.language
        for batch in args.batches:
            cache = lm.new_cache(batch, 30 + 2 * args.rounds * args.steps + 8)
            for row in range(batch):
                sub = cache.rows([row])
                lm(lm.embed(torch.randint(3, lm.cfg.vocab_size, (1, 30))), sub)
                sub.advance(30)
            runs[scheme, batch] = (lm, cache, torch.randint(3, lm.cfg.vocab_size, (batch, 1)))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        for _ in range(args.rounds + 1):  # the first round warms every variant up, untimed
            for key, (lm, cache, tokens) in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    tokens = greedy_ids(lm.logits(lm(lm.embed(tokens), cache)[:, 0]))[:, None]
                    cache.advance(1)
                times[key].append((time.perf_counter() - start) / args.steps)
                runs[key] = (lm, cache, tokens)
    print("scheme batch  step ms (median of rounds; min)")
    for (scheme, batch), values in times.items():
        rest = values[1:]
        print(f"{scheme:6} {batch:5}  {statistics.median(rest) * 1e3:7.3f} ({min(rest) * 1e3:.3f})")


if __name__ == "__main__":
    main()
