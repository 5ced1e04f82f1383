"""The torch attention the model falls back to (and that its kernels are checked and timed against): the causal
mask of a cache whose slot is the position, and masked attention for long (prefill) and short (decode) query
blocks. Pure functions of tensors; choosing between them and the compiled kernels is the caller's business.

Shape legend: B batch, H query heads, Hk key/value heads (Hk | H), T queries, S keys, D / Dv key / value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, T) query and (B, S) key positions -> (B, 1, T, S) bool, True where the key is visible."""
    return (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]


SDPA_MIN_QUERIES = 16  # query blocks this long are prefill: torch's fused kernel, and the prefill families


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with q (B, H, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv), Hk | H.

    Long query blocks (prefill) use torch's fused kernel. Short ones (decode) use two matmuls with the
    softmax in float32, as the reference does: for a single query the fused CPU kernel is several times
    slower than reading the cached keys once."""
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    if T >= SDPA_MIN_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hk != H)
    G = H // Hk
    qg = q.reshape(B, Hk, G * T, q.shape[-1])  # query heads grouped under their key head
    # k on the left: its (S, D) blocks are read in place, where q @ k^T would copy the transposed keys.
    scores = (k @ qg.transpose(-1, -2)).transpose(-1, -2).float() * scale  # (B, Hk, G*T, S)
    scores = scores.view(B, Hk, G, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, Hk, G * T, -1)
    return (probs @ v).view(B, H, T, v.shape[-1])
