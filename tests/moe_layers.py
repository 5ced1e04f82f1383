"""A MoE layer with random weights of any size, for the tests of the fused routed-expert kernels (bf16:
tests/test_kernels.py; quantised: tests/test_quant_moe.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def random_moe(hidden: int, inter: int, experts: int, top_k: int, seed: int, dtype: torch.dtype, shared: int = 1):
    """dsvl2's MoE with softmax greedy routing over `experts` experts of width `inter` (top `top_k`; `shared` shared
    experts, one MLP of width shared * inter), weights ~ N(0, 0.05) from `seed`, in `dtype`, no gradients."""
    from dsvl2.model.language import MoE

    cfg = SimpleNamespace(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                          num_experts_per_tok=top_k, topk_method="greedy", scoring_func="softmax", n_group=1,
                          topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, n_shared_experts=shared)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.parameters():
        p.data.normal_(0, 0.05)
    return moe.to(dtype).requires_grad_(False)
