"""The bf16 multiply rates a prefill can reach here, on the model's own products, and the prefill bound from them.

A prefill multiplies two kinds of products: dense ones (attention projections, shared experts, dense MLPs; every
token through one weight: rows = tokens) and grouped ones (routed experts: `tokens` x K rows spread over X experts,
so each expert multiplies ~tokens * K / X rows, many small GEMMs). A single big GEMM's rate overstates what the
grouped ones reach, so both are measured, on the model's first MoE layer's real weights and routing, by torch and
(where the model's paths send the family there) by our kernel; the bound takes the faster of each. Used by
bench/engine_bench.py; holds no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsvl2.model import kernels
from dsvl2.model.feedforward import grouped_fits

Timer = Callable[[Callable[[], object]], float]  # seconds per call


def first_moe(model):
    return next((layer.mlp for layer in model.language.model.layers if hasattr(layer.mlp, "experts")), None)


def dense_rate(model, tokens: int, timer: Timer) -> float:
    """GFLOP/s of F.linear over `tokens` rows through the first decoder layer's attention weights and the first MoE
    layer's shared experts (the model's own dense prefill products)."""
    layer = model.language.model.layers[0]
    weights = [p for p in layer.self_attn.parameters() if p.ndim == 2]
    moe = first_moe(model)
    if moe is not None and hasattr(moe, "shared_experts"):
        weights += [p for p in moe.shared_experts.parameters() if p.ndim == 2]
    device, dtype = weights[0].device, weights[0].dtype
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], device=device, dtype=dtype) for w in weights}
    flops = sum(2 * tokens * w.numel() for w in weights)
    with torch.inference_mode():
        return flops / timer(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]) / 1e9


def grouped_rates(model, tokens: int, timer: Timer) -> dict[str, float]:
    """GFLOP/s of the routed experts of the first MoE layer over `tokens` tokens with the gate's real routing:
    torch's (the faster of its expert-by-expert products, MoE.dispatch, and its grouped product, MoE.grouped, where
    that runs) and, where it runs here, our fused kernel; {} without MoE."""
    moe = first_moe(model)
    if moe is None:
        return {}
    weight = moe.experts[0].down_proj.weight
    x = torch.randn(tokens, weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        flops = 2 * ids.numel() * sum(p.numel() for p in moe.experts[0].parameters())
        # torch's best form here: expert by expert, or its grouped product where the model would run that.
        seconds = timer(lambda: moe.dispatch(x, ids, weights))
        if grouped_fits(x, weight):
            seconds = min(seconds, timer(lambda: moe.grouped(x, ids, weights)))
        rates = {"torch": flops / seconds / 1e9}
        if kernels.moe_fits(x, weight):
            lists = moe._expert_weights()
            rates["kernel"] = flops / timer(lambda: kernels.moe_routed(x, ids, weights, *lists)) / 1e9
    rows = ids.numel() / len(moe.experts)
    return {**rates, "rows_per_expert": rows, "experts": len(moe.experts), "top_k": ids.shape[1]}


def prefill_bound(model, tokens: int, *, total_flops: float, dense_gflops: float,
                  grouped_gflops: float | None) -> dict[str, float]:
    """Seconds a `tokens`-token prefill of `total_flops` needs at least: routed experts at `grouped_gflops` (the dense
    rate for a model without MoE), everything else (and attention, counted at the dense rate) at `dense_gflops`."""
    cfg = model.language.cfg
    moe = first_moe(model)
    n_moe = sum(hasattr(layer.mlp, "experts") for layer in model.language.model.layers)
    expert_params = sum(p.numel() for p in moe.experts[0].parameters()) if moe is not None else 0
    routed = 2 * tokens * cfg.num_experts_per_tok * expert_params * n_moe if moe is not None else 0
    seconds = (total_flops - routed) / (dense_gflops * 1e9) + routed / ((grouped_gflops or dense_gflops) * 1e9)
    return {"seconds": seconds, "routed_gflop": routed / 1e9, "other_gflop": (total_flops - routed) / 1e9}
