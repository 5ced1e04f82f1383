"""The torch attention the model falls back to (and that its kernels are checked and timed against): the causal
mask of a cache whose slot is the position, and masked attention for long (prefill) and short (decode) query
blocks. Pure functions of tensors; choosing between them and the compiled kernels is the caller's business.

Shape legend: B batch, H query heads, Hk key/value heads (Hk | H), T queries, S keys, D / Dv key / value head dims,
C / R MLA's latent rank / rotary dim.
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


def absorbed_attend(q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, pe: torch.Tensor, w_kv_b: torch.Tensor,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA's absorbed attention (DeepSeek-V2 section 2.1): W_uk folded into the queries q_nope (B, H, T, Dn), which
    then attend with q_pe (B, H, T, R) over the one cached latent c (B, S, C), also the value, and rotary key pe
    (B, S, R); W_uv folded into the output. w_kv_b is kv_b_proj's weight (H * (Dn + Dv), C). Returns (B, H, T, Dv).

    Per head, the weights are multiplied as they lie (row-major, heads strided): einsum's "bhtc,hvc->bhtv" copied
    W_uv transposed on every call. One key "head" shared by all heads: the heads are folded into the query rows, so
    that each product is one batched matmul against the cache as it lies. Broadcasting the cache over the heads
    instead (c[:, None]) made torch copy it once per head for each product: 94% of a float32 decode step of the
    real-width Small. The cache is the left operand (scores transposed, (B, S, H * T)): with it transposed on the
    right, torch's bf16 batched product ran 5-7x slower (the same sums, bit-identical either way)."""
    B, H, T, Dn = q_nope.shape
    w = w_kv_b.view(H, -1, w_kv_b.shape[-1])
    w_uk, w_uv = w[:, :Dn], w[:, Dn:]  # (H, Dn, C), (H, Dv, C): views of the weight, never copied
    q_lat = (q_nope.transpose(0, 1).reshape(H, B * T, Dn) @ w_uk).view(H, B, T, -1).transpose(0, 1)  # (B, H, T, C)
    rows = (q_lat.reshape(B, H * T, -1).transpose(1, 2), q_pe.reshape(B, H * T, -1).transpose(1, 2))
    scores = (c @ rows[0] + pe @ rows[1]).transpose(1, 2)  # (B, H * T, S)
    scores = (scores.float().reshape(B, H, T, -1) * scale).masked_fill(~mask, float("-inf"))  # (B, H, T, S)
    out_lat = scores.softmax(dim=-1).to(c.dtype).view(B, H * T, -1) @ c  # (B, H * T, C)
    lat_by_head = out_lat.view(B, H, T, -1).transpose(0, 1).reshape(H, B * T, -1)  # (H, B * T, C)
    return (w_uv @ lat_by_head.transpose(1, 2)).view(H, -1, B, T).permute(2, 0, 3, 1)  # (B, H, T, Dv)
