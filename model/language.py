"""DeepSeek-V2 MoE decoder: RMSNorm, RoPE (plain, linear, YaRN), MHA or MLA attention; the dense MLP and the MoE
are in feedforward.py, the torch attention in attention.py.

Attribute paths equal the checkpoint's `language.*` keys. Forwards take plain tensors and an optional
`KVCache` and never decide policy: the engine chooses batch layout, chunking and sampling. Which operation
families run our CPU kernels is the `Paths` that `LanguageModel` gets from kernels.paths (per machine, calibrated
on this model's shapes) and hands to its modules.

Shape legend: B batch, T new tokens, S visible cache slots, E hidden size, H heads, H_kv key/value heads,
D head dim, Dn / Dv MLA non-rotary key / value head dims, R rope dim, C latent (kv_lora) rank,
N tokens (B*T), X routed experts, K experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dsvl2.model import decode_plan, holders, kernel_calibration, kernels
from dsvl2.model.attention import SDPA_MIN_QUERIES, absorbed_attend, attend, causal_mask
from dsvl2.model.config import LanguageConfig, yarn_mscale
from dsvl2.model.feedforward import MLP, MoE, MoEGate, proj
from dsvl2.model.kernel_choice import UNCHOSEN, Paths
from dsvl2.model.kv_cache import CacheRows, KVCache
from dsvl2.model.quant import QuantLinear
from dsvl2.model.stacked import StackedProjections

__all__ = ["MLP", "SDPA_MIN_QUERIES", "DecoderLayer", "LanguageModel", "MHAttention", "MLAttention", "MoE", "MoEGate",
           "RMSNorm", "Rotary", "attend", "cache_shapes", "cache_token_bytes", "causal_mask", "proj"]

Cache = KVCache | CacheRows
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, 1, T, R) of one forward's positions, shared by its layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel(x):
            return kernels.rms_norm(x, self.weight, self.eps)[0]
        # Reference: normalise in float32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def residual(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta): a residual add and the norm of its result (one kernel call where the layer
        glue takes the kernel); without delta, (norm(x), x)."""
        if delta is None:
            return self(x), x
        if self._kernel(x, delta):
            return kernels.rms_norm(x, self.weight, self.eps, delta)
        x = x + delta
        return self(x), x

    def _kernel(self, *xs: torch.Tensor) -> bool:
        return self.paths.kernel("layer_glue") and kernels.glue_fits(*xs, self.weight)


class Rotary(nn.Module):
    """cos/sin tables for positions, computed in float32 exactly as the reference's cached tables are
    (inverse frequencies, then position * frequency), with linear or YaRN scaling when configured."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        dim, base = cfg.rope_dim, cfg.rope_theta
        # Explicit CPU device: the model may be built under torch.device("meta"); these few floats are
        # computed here, not loaded.
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        inv_freq = 1.0 / (base**exponents)
        self.position_scale = 1.0
        self.mscale = 1.0
        kind = cfg.rope_scaling_type
        if kind == "linear":
            self.position_scale = 1.0 / float(cfg.rope_scaling["factor"])
        elif kind == "yarn":
            inv_freq, self.mscale = _yarn_inv_freq(exponents, dim, base, cfg.rope_scaling)
        self._inv_freq = inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, R), for rotate-half application."""
        inv_freq = self._inv_freq
        if inv_freq.device != positions.device:  # moved once, not copied to the device on every call
            inv_freq = self._inv_freq = inv_freq.to(positions.device)
        t = positions.to(torch.float32)
        if self.position_scale != 1.0:
            t = t * self.position_scale
        freqs = t[..., None] * inv_freq  # (B, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _yarn_inv_freq(exponents: torch.Tensor, dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (DeepSeek-V2's DeepseekV2YarnRotaryEmbedding): blend interpolated and extrapolated
    frequencies with a linear ramp between the correction dims, and scale cos/sin by an mscale ratio."""
    factor = float(scaling["factor"])
    original_max = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    mscale, mscale_all_dim = scaling.get("mscale", 1), scaling.get("mscale_all_dim", 0)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    freq_extra = 1.0 / (base**exponents)
    freq_inter = 1.0 / (factor * base**exponents)
    blended = freq_inter * (1 - extrapolation) + freq_extra * extrapolation
    return blended, float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek-V2 rotates adjacent pairs."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class MHAttention(nn.Module):
    """Multi-head attention as transformers' LlamaAttention (use_mla false): rotate-half RoPE over the
    whole head, optional grouped key/value heads."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        E = cfg.hidden_size
        self.q_proj = nn.Linear(E, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(E, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(E, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, E, bias=False)
        self.rotary = Rotary(cfg)
        self.scale = cfg.softmax_scale
        self.paths = UNCHOSEN
        self.stacked = StackedProjections("q_proj", "k_proj", "v_proj")

    @staticmethod
    def cache_shapes(cfg: LanguageConfig) -> list[tuple[int, ...]]:
        return [(cfg.kv_heads, cfg.head_dim), (cfg.kv_heads, cfg.head_dim)]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache | None, layer: int,
                rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        p = self.paths
        q, k, v = self.stacked(self, x, p) or (proj(x, m, p) for m in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.heads, self.head_dim)  # (B, T, H, D)
        k = k.view(B, T, self.kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        cos, sin = rope if rope is not None else self.rotary(positions, q.dtype)
        if p.kernel("layer_glue") and kernels.glue_fits(q, k, cos, sin):
            q, k = kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)
        else:
            q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
            k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D)
        else:
            k, v = cache.write(layer, positions, k, v)  # (B, H_kv, S, D)
            decode = T < SDPA_MIN_QUERIES and p.kernel("decode_attention")
            if decode and kernels.attend_fits(q, k, v):  # the cache read once, in place
                out = kernels.attend(q, k, v, positions, self.scale)
                return proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim), self.o_proj, p)
        if _prefill_kernel(q, k, v, p):  # keys by slot = position
            out = kernels.attention(q, k, v, self.scale, positions)
        else:
            k_pos = positions if cache is None else torch.arange(k.shape[2], device=x.device).expand(B, -1)
            out = attend(q, k, v, causal_mask(positions, k_pos), self.scale)  # (B, H, T, D)
        return proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim), self.o_proj, p)


def _prefill_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paths: Paths) -> bool:
    """Whether a query block (B, H, T, D) is prefill-sized, its family takes the kernel and the kernel covers it."""
    return q.shape[2] >= SDPA_MIN_QUERIES and paths.kernel("prefill_attention") and kernels.attention_fits(q, k, v)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 section 2.1). Keys and values come from a shared latent
    c = RMSNorm(W_dkv x) of rank C plus one rotary key shared by all heads; only (c, k_pe) are cached.

    Two exact forms (they differ by float rounding only):
      expanded  k_nope = W_uk c, v = W_uv c per head, then ordinary attention: cheap for long query blocks;
      absorbed  W_uk folded into the query and W_uv into the output, attention runs in latent space over
                the cache as is: cheap for decode, where expanding S cached tokens per step dominates.
    """

    ABSORB_MAX_TOKENS = 16

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        E, H = cfg.hidden_size, cfg.num_attention_heads
        self.heads, self.dn, self.dr, self.dv = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(E, H * cfg.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(E, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(E, self.rank + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, E, bias=False)
        self.rotary = Rotary(cfg)
        self.scale = cfg.softmax_scale
        self.absorb: bool | None = None  # None: absorbed for short query blocks with a cache
        self.paths = UNCHOSEN
        self.stacked = StackedProjections("q_proj" if cfg.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa")

    @staticmethod
    def cache_shapes(cfg: LanguageConfig) -> list[tuple[int, ...]]:
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query (B, T, H * (Dn+R)) and the latent with the rotary key (B, T, C+R) of x."""
        lora = hasattr(self, "q_a_proj")  # the query through a low-rank bottleneck (q_lora_rank)
        first = self.q_a_proj if lora else self.q_proj
        p = self.paths
        q, latent = self.stacked(self, x, p) or (proj(x, m, p) for m in (first, self.kv_a_proj_with_mqa))
        return (proj(self.q_a_layernorm(q), self.q_b_proj, p) if lora else q), latent

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache | None, layer: int,
                rope: Rope | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, latent = self._projections(x)
        q = q.view(B, T, self.heads, self.dn + self.dr).transpose(1, 2)  # (B, H, T, Dn+R)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        c, k_pe = latent.split([self.rank, self.dr], dim=-1)  # (B, T, C), (B, T, R)
        c = self.kv_a_layernorm(c)
        cos, sin = rope if rope is not None else self.rotary(positions, q.dtype)
        if self.paths.kernel("layer_glue") and kernels.glue_fits(q_pe, k_pe, cos, sin):
            q_pe = kernels.rope(q_pe.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
            k_pe = kernels.rope(k_pe[:, :, None], cos, sin, interleaved=True)[:, :, 0]
        else:
            q_pe = apply_rope(deinterleave(q_pe), cos, sin)
            k_pe = apply_rope(deinterleave(k_pe)[:, None], cos, sin)[:, 0]  # (B, T, R)
        if cache is not None:
            c, k_pe = cache.write(layer, positions, c, k_pe)  # (B, S, C), (B, S, R)

        def mask() -> torch.Tensor:  # the torch forms' mask, made only where one runs (the kernel takes positions)
            k_pos = positions if cache is None else torch.arange(c.shape[1], device=x.device).expand(B, -1)
            return causal_mask(positions, k_pos)  # over a cache, key slot s holds position s

        absorb = self.absorb if self.absorb is not None else (cache is not None and T <= self.ABSORB_MAX_TOKENS)
        if absorb:
            out = self._absorbed(q_nope, q_pe, c, k_pe, mask, positions)
        else:
            out = self._expanded(q_nope, q_pe, c, k_pe, mask(), positions)
        return proj(out.transpose(1, 2).reshape(B, T, self.heads * self.dv), self.o_proj, self.paths)

    def _expanded(self, q_nope, q_pe, c, k_pe, mask, positions) -> torch.Tensor:
        B, S, _ = c.shape
        kv = proj(c, self.kv_b_proj, self.paths).view(B, S, self.heads, self.dn + self.dv)
        kv = kv.transpose(1, 2)  # (B, H, S, Dn+Dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(B, self.heads, S, self.dr)), dim=-1)  # (B, H, S, Dn+R)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if _prefill_kernel(q, k, v, self.paths):  # key slot = position
            return kernels.attention(q, k, v, self.scale, positions)
        return attend(q, k, v, mask, self.scale)  # (B, H, T, Dv)

    def _absorbed(self, q_nope, q_pe, c, k_pe, mask: Callable[[], torch.Tensor], positions) -> torch.Tensor:
        w = self.kv_b_proj.weight
        if self.paths.kernel("decode_attention") and kernels.absorbed_fits(q_nope, q_pe, c, k_pe, w):
            return kernels.absorbed(q_nope, q_pe, c, k_pe, w, positions, self.scale)
        return absorbed_attend(q_nope, q_pe, c, k_pe, w, mask(), self.scale)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, index: int):
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.use_mla else MHAttention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.index = index

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache | None, rope: Rope | None = None,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer over the residual stream x + delta (delta: the previous layer's feed-forward output, whose add is
        fused into this layer's first norm; None for the first layer). Returns (x, delta) of the next layer's input
        x + delta, the last add left to the caller."""
        h, x = self.input_layernorm.residual(x, delta)
        h, x = self.post_attention_layernorm.residual(x, self.self_attn(h, positions, cache, self.index, rope))
        return x, self.mlp(h)


class Decoder(nn.Module):
    """`language.model`: token embedding, decoder layers, final norm."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        # Left uninitialised (`_weight`), as every weight is loaded: nn.Embedding's normal_ init on the meta device
        # the loader builds on imports torch._dynamo, 2.4 s of every load.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        # Every layer's rotary is built from the same config: one set of tables serves the whole forward.
        rope = self.layers[0].self_attn.rotary(positions, x.dtype) if len(self.layers) else None
        delta = None
        for layer in self.layers:
            x, delta = layer(x, positions, cache, rope, delta)
        return self.norm.residual(x, delta)[0]


def cache_shapes(cfg: LanguageConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of what one layer caches: MHA keys and values, or MLA's latent and rope key."""
    return (MLAttention if cfg.use_mla else MHAttention).cache_shapes(cfg)


def cache_token_bytes(cfg: LanguageConfig, dtype: torch.dtype) -> int:
    """Bytes one token takes in the KV cache over all layers, for a cache of `dtype`, without building a model."""
    per_layer = sum(math.prod(shape) for shape in cache_shapes(cfg))
    return per_layer * cfg.num_hidden_layers * dtype.itemsize


class LanguageModel(nn.Module):
    """`language`: the decoder plus its (untied) output head."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.paths = UNCHOSEN  # for the output head; `use_paths` hands it to every module that asks
        self._trials: dict | None = None  # the calibration trials on this model's shapes, made once
        self._decode_plan: decode_plan.DecodePlan | None = None  # decode steps with their choices settled

    def _apply(self, fn, recurse: bool = True):
        """nn.Module's conversions and moves (`.to()`, `.float()`, `.cuda()`): every holder of the weights lets go
        first (holders.py), so that the old tensors go with the move."""
        holders.release_all(self)
        self._decode_plan = None
        return super()._apply(fn, recurse)

    def use_paths(self, paths: Paths) -> None:
        """Make every module of this model ask `paths` which families run our kernels."""
        if paths is not self.paths:
            for module in self.modules():
                if isinstance(module, LanguageModel | MHAttention | MLAttention | MLP | MoE | MoEGate | RMSNorm):
                    module.paths = paths

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.model.embed_tokens.weight  # the head may be quantised; the embedding is the model's dtype
        return KVCache(cache_shapes(self.cfg), batch=batch, capacity=capacity, n_layers=self.cfg.num_hidden_layers,
                       dtype=p.dtype, device=p.device)

    def cache_bytes_per_token(self) -> int:
        """Bytes one token takes in this model's KV cache (`cache_token_bytes`)."""
        return cache_token_bytes(self.cfg, self.model.embed_tokens.weight.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(B, T, E) input embeddings -> (B, T, E) final hidden states. With a cache the tokens continue
        each row at its current length (the caller advances the cache afterwards); without one they
        start at position 0."""
        B, T, _ = embeds.shape
        if cache is not None:
            positions = cache.positions(T)
        else:
            positions = torch.arange(T, device=embeds.device).expand(B, T)
        if embeds.dtype is torch.bfloat16 and embeds.device.type == "cpu":  # where our kernels can run
            self.choose_paths()  # decided once per process (at load), then a lookup
        with kernels.switch_read_once():  # DSVL2_KERNELS read once for the forward, not by every kernel's check
            if decode_plan.usable(embeds, cache) and (plan := self._plan()) is not None:
                return plan(embeds, positions, cache)  # the module tree's decode, its choices settled once
            return self.model(embeds, positions, cache)

    def _plan(self) -> decode_plan.DecodePlan | None:
        """The decode plan of the current weights and paths (made anew where they changed), None where the kernels
        are not available."""
        plan = self._decode_plan
        if plan is None or not plan.current(self.paths):
            self._decode_plan = plan = None  # the old plan's weights go before a new one binds them
            if kernels.available():
                plan = self._decode_plan = decode_plan.DecodePlan(self.model, self.paths)
        return plan

    def choose_paths(self) -> Paths:
        """Which path each op family takes on this CPU for this model's shapes (`kernels.paths`: features, else a
        timing cached beside the kernel build), decided once per process; the loader calls it so that the first
        page does not pay for the calibration."""
        if self._trials is None:
            self._trials = kernel_calibration.language_trials(self)
        paths = kernels.paths(self._trials)
        self.use_paths(paths)
        return paths

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lm_head, QuantLinear):  # float32 from the kernel: no bf16 copy, no conversion pass
            return self.lm_head.floats(hidden)
        return proj(hidden, self.lm_head, self.paths).float()
