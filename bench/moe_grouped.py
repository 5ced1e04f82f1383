"""A MoE layer's routed experts on torch's grouped product over the stacked weights (`MoE.grouped`, nothing read
back to the host) against one expert at a time (`MoE.dispatch`, which reads the per-expert counts back) and, in
bf16 where it runs, our one-call kernel (`kernels.moe_routed`: its AVX512 micro-kernel, and AMX's tiles where the
CPU has them), in one run, at a real model's widths with random weights and routing: ms per layer (and GFLOP/s)
for decode batches and prefill chunks, and the largest difference from `dispatch` (relative to the largest output).

    python bench/moe_grouped.py [--config tiny|small|base] [--dtype float32 bfloat16] [--tokens 1 3 8 256 1000]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_limits import best_time, cpu_line

from dsvl2.model import kernels
from dsvl2.model.config import ModelConfig
from dsvl2.model.language import MoE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": "deepseek-vl2-tiny", "small": "deepseek-vl2-small", "base": "deepseek-vl2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", choices=tuple(CONFIGS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 3, 8, 256, 1000])
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    cfg = ModelConfig.from_dir(ROOT / "tests" / "data" / "configs" / CONFIGS[args.config]).language
    print(f"{args.config} widths: {cfg.n_routed_experts} experts of {cfg.moe_intermediate_size} x "
          f"{cfg.hidden_size}, top {cfg.num_experts_per_tok}; routed experts only (no shared)")
    print(f"{'dtype':<9} {'tokens':>6} {'path':<15} {'ms':>8} {'GFLOP/s':>8} {'max diff':>9}")
    for name in args.dtype:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        moe = MoE(cfg).to(dtype).requires_grad_(False)
        for p in moe.parameters():
            p.data.normal_(0, 0.02)
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(tokens)
            x = torch.randn(tokens, cfg.hidden_size, generator=g).to(dtype)
            ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                               for _ in range(tokens)])
            weights = torch.rand(tokens, cfg.num_experts_per_tok, generator=g)
            paths = {"dispatch": moe.dispatch, "grouped": moe.grouped}
            if kernels.moe_fits(x, moe.experts[0].down_proj.weight):
                lists = moe._expert_weights()
                paths["kernel avx512"] = functools.partial(kernels.moe_routed, gate=lists[0], up=lists[1],
                                                           down=lists[2], amx=False)
                if kernels.amx_ready():
                    paths["kernel amx"] = functools.partial(kernels.moe_routed, gate=lists[0], up=lists[1],
                                                            down=lists[2])
            flops = 2 * ids.numel() * sum(p.numel() for p in moe.experts[0].parameters())
            with torch.inference_mode():
                reference = moe.dispatch(x, ids, weights).float()
                for path, fn in paths.items():
                    seconds = best_time(lambda: fn(x, ids, weights))  # noqa: B023 - timed right here
                    diff = float((fn(x, ids, weights).float() - reference).abs().max() / reference.abs().max())
                    print(f"{name:<9} {tokens:>6} {path:<15} {seconds * 1e3:>8.2f} {flops / seconds / 1e9:>8.0f} "
                          f"{diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
