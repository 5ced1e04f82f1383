"""The calibration trials of each operation family on a model's own shapes and weights (kernel_choice.py times
them): for every family, the model's kernel call and the torch call it falls back to, on the same inputs.

Trials are cheap to make: `Trial.build` allocates inputs and closes over the model's weights only when a family
has no cached timing. Families a model has no kernel for (quantised experts, chosen by quant_choice.py) map to the
reason.
Not responsible for deciding (kernel_choice.py) nor for running the model (language.py, vision.py).

Shape legend: B batch, H heads, Hk key heads, T queries, S cached slots, D / Dv key / value head dims, N tokens,
C / R MLA's latent rank / rotary dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsvl2.model import kernels
from dsvl2.model.attention import absorbed_attend, attend, causal_mask
from dsvl2.model.kernel_choice import Family, Trial
from dsvl2.model.quant import QuantLinear

DECODE_ROWS = 8  # a decode batch: tokens per step in the decode trials
PREFILL_TOKENS = 256  # a prefill chunk's tokens in the prefill trials (long enough to be bound by the multiplies)
# A page's prompt (~600-1,500 tokens) in the prefill-attention trial, whose cost grows with the square of the length:
# at 256 tokens the fixed costs decided it the other way on a Xeon with AMX (torch 1.31x there, the kernel 1.9x at
# 1,000 tokens).
PREFILL_ATTENTION_TOKENS = 1024
DECODE_CONTEXT = 512  # cached slots per row in the decode-attention trial
PROJECTION_LAYERS = 4  # decode projections read this many layers' attention weights (past the last-level cache)

Calls = tuple[Callable[[], object], Callable[[], object]]


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _covered(fits: bool, what: str) -> None:
    if not fits:
        raise RuntimeError(f"the kernel does not cover {what}")


def language_trials(lm) -> dict[Family, Trial | str]:
    """Trials of the language families for a `LanguageModel` (bf16 weights on the CPU when they run)."""
    cfg, layers = lm.cfg, list(lm.model.layers)
    H = cfg.num_attention_heads
    if cfg.use_mla:
        Hk, D, Dv = H, cfg.q_head_dim, cfg.v_head_dim  # prefill expands every head's keys and values
    else:
        Hk, D, Dv = cfg.kv_heads, cfg.head_dim, cfg.head_dim
    scale = cfg.softmax_scale
    trials: dict[Family, Trial | str] = {
        "prefill_attention": Trial(f"B1 H{H} Hk{Hk} T{PREFILL_ATTENTION_TOKENS} D{D} Dv{Dv}",
                                   lambda: _causal_attention(H, Hk, D, Dv, scale)),
    }
    if cfg.use_mla:
        kv_b = layers[0].self_attn.kv_b_proj.weight  # a name of its own: the lambda reads it when the trial is built
        trials["decode_attention"] = Trial(
            f"B{DECODE_ROWS} H{H} S{DECODE_CONTEXT} absorbed Dn{cfg.qk_nope_head_dim} R{cfg.qk_rope_head_dim} "
            f"kv_b {kv_b.shape[0]}x{kv_b.shape[1]}", lambda: _absorbed_attention(cfg, kv_b))
    else:
        trials["decode_attention"] = Trial(f"B{DECODE_ROWS} H{H} Hk{Hk} S{DECODE_CONTEXT} D{D}",
                                           lambda: _cache_attention(H, Hk, D, scale))
    weights = [p for layer in layers[:PROJECTION_LAYERS] for p in layer.self_attn.parameters() if p.ndim == 2]
    if weights:
        names = ",".join(sorted({f"{w.shape[0]}x{w.shape[1]}" for w in weights}))
        trials["decode_projections"] = Trial(f"M{DECODE_ROWS} {len(weights)} of {names}",
                                             lambda: _projections(weights))
    moe = next((layer.mlp for layer in layers if hasattr(layer.mlp, "experts")), None)
    if moe is not None and isinstance(moe.experts[0].gate_proj, QuantLinear):
        trials["decode_experts"] = trials["prefill_experts"] = "quantised experts: quant_choice.py picks their path"
    elif moe is not None:
        w = moe.experts[0].gate_proj.weight
        name = f"X{len(moe.experts)} K{moe.gate.top_k} {w.shape[0]}x{w.shape[1]}"
        trials["decode_experts"] = Trial(f"N{DECODE_ROWS} {name}", lambda: _experts(moe, DECODE_ROWS))
        trials["prefill_experts"] = Trial(f"N{PREFILL_TOKENS} {name}", lambda: _experts(moe, PREFILL_TOKENS))
    return trials


def vision_trials(tower) -> dict[Family, Trial | str]:
    """Trials of the vision families for a `VisionTower`: one tile's products and attention."""
    block = tower.blocks[0] if len(tower.blocks) else None
    if block is None:
        return {}
    P, C = tower.pos_embed.shape[1:]
    heads = block.attn.heads
    fc1 = block.mlp.fc1
    return {
        "vision_gemm": Trial(f"M{P} {fc1.weight.shape[0]}x{fc1.weight.shape[1]} bias gelu",
                             lambda: _fused_gemm(P, fc1.weight, fc1.bias)),
        "vision_attention": Trial(f"B1 H{heads} L{P} D{C // heads}", lambda: _full_attention(heads, P, C // heads)),
    }


def _fused_gemm(rows: int, w: torch.Tensor, b: torch.Tensor) -> Calls:
    x = _bf16(rows, w.shape[1], seed=1)
    w, b = w.detach(), b.detach()
    return (lambda: kernels.linear_fused(x, w, b, gelu=True),
            lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))


def _full_attention(heads: int, length: int, dim: int) -> Calls:
    qkv = _bf16(1, length, 3, heads, dim, seed=2).permute(2, 0, 3, 1, 4)  # (3, 1, H, L, D) as the tower cuts it
    q, k, v = qkv[0], qkv[1], qkv[2]
    _covered(kernels.attention_fits(q, k, v), f"attention of {tuple(q.shape)}")
    return lambda: kernels.attention(q, k, v, dim**-0.5), lambda: F.scaled_dot_product_attention(q, k, v)


def _causal_attention(H: int, Hk: int, D: int, Dv: int, scale: float) -> Calls:
    T = PREFILL_ATTENTION_TOKENS
    q = _bf16(1, T, H, D, seed=3).transpose(1, 2)  # (B, H, T, D) as the projections give it
    k, v = _bf16(1, Hk, T, D, seed=4), _bf16(1, Hk, T, Dv, seed=5)
    positions = torch.arange(T)[None]
    mask = causal_mask(positions, positions)
    _covered(kernels.attention_fits(q, k, v), f"causal attention of {tuple(q.shape)}")
    return (lambda: kernels.attention(q, k, v, scale, positions),
            lambda: attend(q, k, v, mask, scale))


def _cache_attention(H: int, Hk: int, D: int, scale: float) -> Calls:
    B, S = DECODE_ROWS, DECODE_CONTEXT
    keys, values = _bf16(B, Hk, S + 32, D, seed=6), _bf16(B, Hk, S + 32, D, seed=7)  # a cache with free slots
    k, v = keys[:, :, :S], values[:, :, :S]
    q = _bf16(B, H, 1, D, seed=8)
    positions = torch.full((B, 1), S - 1)
    mask = causal_mask(positions, torch.arange(S).expand(B, -1))
    _covered(kernels.attend_fits(q, k, v), f"cache attention of {tuple(q.shape)}")
    return lambda: kernels.attend(q, k, v, positions, scale), lambda: attend(q, k, v, mask, scale)


def _absorbed_attention(cfg, w_kv_b: torch.Tensor) -> Calls:
    B, S, H = DECODE_ROWS, DECODE_CONTEXT, cfg.num_attention_heads
    latent = _bf16(B, S + 32, cfg.kv_lora_rank, seed=11)  # a cache with free slots
    rotary = _bf16(B, S + 32, cfg.qk_rope_head_dim, seed=12)
    c, pe = latent[:, :S], rotary[:, :S]
    q_nope = _bf16(B, 1, H, cfg.qk_nope_head_dim, seed=13).transpose(1, 2)  # (B, H, 1, Dn) as the projection gives it
    q_pe = _bf16(B, H, 1, cfg.qk_rope_head_dim, seed=14)
    w = w_kv_b.detach()
    positions = torch.full((B, 1), S - 1)
    mask = causal_mask(positions, torch.arange(S).expand(B, -1))
    _covered(kernels.absorbed_fits(q_nope, q_pe, c, pe, w), f"absorbed attention of {tuple(q_nope.shape)}")
    return (lambda: kernels.absorbed(q_nope, q_pe, c, pe, w, positions, cfg.softmax_scale),
            lambda: absorbed_attend(q_nope, q_pe, c, pe, w, mask, cfg.softmax_scale))


def _projections(weights: list[torch.Tensor]) -> Calls:
    inputs = {w.shape[1]: _bf16(DECODE_ROWS, w.shape[1], seed=9) for w in weights}
    pairs = [(inputs[w.shape[1]], w.detach()) for w in weights]
    _covered(all(kernels.fits(x, w) for x, w in pairs), "every projection")
    return (lambda: [kernels.linear_bf16(x, w) for x, w in pairs],
            lambda: [F.linear(x, w) for x, w in pairs])


def _experts(moe, tokens: int) -> Calls:
    x = _bf16(tokens, moe.gate.weight.shape[1], seed=10)
    with torch.inference_mode():
        ids, weights = moe.gate.forward(x)  # not a forward of the model: the gate's hooks must not see it
    _covered(kernels.moe_fits(x, moe.experts[0].down_proj.weight), f"experts over {tokens} tokens")
    args = moe._kernel_weights()
    return lambda: kernels.moe_routed(x, ids, weights, *args), lambda: moe.routed(x, ids, weights)
