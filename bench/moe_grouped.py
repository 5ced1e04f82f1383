"""A MoE layer's routed experts on torch's grouped product over the stacked weights (`MoE.grouped`, nothing read
back to the host) against one expert at a time (`MoE.dispatch`, which reads the per-expert counts back), in one
run, at a real model's widths with random weights and routing: ms per layer for decode batches and a prefill
chunk, and the largest difference between the two (relative to the largest output).

    python bench/moe_grouped.py [--config tiny|small|base] [--dtype float32 bfloat16] [--tokens 1 3 8 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_limits import best_time, cpu_line

from dsvl2.model.config import ModelConfig
from dsvl2.model.language import MoE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": "deepseek-vl2-tiny", "small": "deepseek-vl2-small", "base": "deepseek-vl2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", choices=tuple(CONFIGS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 3, 8, 256])
    args = ap.parse_args()
    print(f"cpu: {cpu_line()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    cfg = ModelConfig.from_dir(ROOT / "tests" / "data" / "configs" / CONFIGS[args.config]).language
    print(f"{args.config} widths: {cfg.n_routed_experts} experts of {cfg.moe_intermediate_size} x "
          f"{cfg.hidden_size}, top {cfg.num_experts_per_tok}; routed experts only (no shared)")
    print(f"{'dtype':<9} {'tokens':>6} {'grouped ms':>11} {'dispatch ms':>12} {'dispatch/grouped':>17} {'max diff':>9}")
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
            with torch.inference_mode():
                grouped = best_time(lambda: moe.grouped(x, ids, weights)) * 1e3  # noqa: B023 - timed right here
                dispatch = best_time(lambda: moe.dispatch(x, ids, weights)) * 1e3  # noqa: B023
                a, b = moe.grouped(x, ids, weights).float(), moe.dispatch(x, ids, weights).float()
            diff = float((a - b).abs().max() / b.abs().max())
            print(f"{name:<9} {tokens:>6} {grouped:>11.2f} {dispatch:>12.2f} {dispatch / grouped:>16.2f}x "
                  f"{diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
