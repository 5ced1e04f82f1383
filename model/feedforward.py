"""The decoder's feed-forward blocks: dense MLP, MoE routing (MoEGate) and routed + shared experts (MoE), and the
bias-free projection `proj` every language module uses. Attribute paths equal the checkpoint's `language.*` keys.

Each module holds the model's `Paths` (kernel_choice.py; set by LanguageModel, `UNCHOSEN` = torch until then)
and asks it, never the environment, whether a family runs our kernels; the kernels' own checks (shape, dtype,
device, availability) still apply. Shape legend: N tokens, E hidden size, X routed experts, K experts per token,
T new tokens per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.model import kernels
from dsvl2.model.attention import SDPA_MIN_QUERIES
from dsvl2.model.config import LanguageConfig
from dsvl2.model.kernel_choice import UNCHOSEN, Paths
from dsvl2.model.quant import QuantExperts, QuantLinear


def proj(x: torch.Tensor, layer: nn.Linear | QuantLinear, paths: Paths) -> torch.Tensor:
    """A bias-free projection. A quantised layer runs its own choice (quant.py); few-row bf16 products on CPU
    (decode) go to the compiled kernel that reads the weight once at memory speed for all rows (model/kernels.py)
    when the decode-projection family takes the kernel; everything else is F.linear."""
    if isinstance(layer, QuantLinear):
        return layer(x)
    return kernels.linear(x, layer.weight, enabled=paths.kernel("decode_projections"))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.paths
        return proj(F.silu(proj(x, self.gate_proj, p)) * proj(x, self.up_proj, p), self.down_proj, p)


class MoEGate(nn.Module):
    """Routing: scores in float32 (softmax or sigmoid), then greedy / group_limited_greedy / noaux_tc
    selection. Returns expert ids (N, K) and float32 weights (N, K) after normalisation and scaling."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k, self.method, self.scoring = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, X)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(scores.shape[0], self.n_group, -1).amax(dim=-1)  # (N, groups)
            masked = scores.masked_fill(~self._expert_mask(group_scores, scores), 0.0)
            weights, ids = masked.topk(self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: select on bias-corrected scores, weigh with the uncorrected ones
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(choice.shape[0], self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
            masked = choice.masked_fill(~self._expert_mask(group_scores, scores), 0.0)  # 0.0, as the reference
            ids = masked.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def _expert_mask(self, group_scores: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the topk_group best groups: (N, X) bool."""
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        per_group = scores.shape[1] // self.n_group
        return group_mask[:, :, None].expand(-1, -1, per_group).reshape(scores.shape)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts. Tokens are sorted by expert so that each active
    expert runs one matrix product over all of its tokens (no per-token loop)."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.gate = MoEGate(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self._weight_lists: tuple[tuple, tuple[list[torch.Tensor], ...]] | None = None
        self._quant_experts, self._quant_shared = QuantExperts(), QuantExperts()
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, E)
        ids, weights = self.gate(flat)  # (N, K)
        T = shape[-2] if x.ndim >= 3 else flat.shape[0]  # new tokens per row: decode or prefill
        family = "decode_experts" if T < SDPA_MIN_QUERIES else "prefill_experts"
        down, y = self.experts[0].down_proj, None
        if isinstance(down, QuantLinear):  # quantised experts on the kernel: the whole layer in one call
            y = self._quant_experts.run(self.experts, flat, ids, weights)
        elif self.paths.kernel(family) and kernels.moe_fits(flat, down.weight):
            # bf16 CPU: the whole layer in one call
            y = kernels.moe_routed(flat, ids, weights, *self._expert_weights())
        if y is None:
            y = self.dispatch(flat, ids, weights)
        if hasattr(self, "shared_experts"):
            y = y + self._shared(flat)
        return y.view(shape)

    def _shared(self, flat: torch.Tensor) -> torch.Tensor:
        """The shared experts' output for tokens flat (N, E): quantised ones on the kernel in one call (every token
        to the one expert with weight 1, exact), else their three products."""
        if isinstance(self.shared_experts.down_proj, QuantLinear):
            every = torch.zeros(flat.shape[0], 1, dtype=torch.long), torch.ones(flat.shape[0], 1)
            y = self._quant_shared.run([self.shared_experts], flat, *every)
            if y is not None:
                return y
        return self.shared_experts(flat)

    def _expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The experts' gate, up and down weights as lists, built once: collecting 3 x 64 parameters through
        nn.Module attribute lookups took ~0.25 ms per layer, a twentieth of a batch-1 decode step. Rebuilt when
        the parameters are replaced or moved (loading, `.to()`), which the first and last weights show."""
        first, last = self.experts[0].gate_proj.weight, self.experts[-1].down_proj.weight
        key = (len(self.experts), id(first), first.data_ptr(), id(last), last.data_ptr())
        if self._weight_lists is None or self._weight_lists[0] != key:
            experts = self.experts
            lists = ([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
                     [e.down_proj.weight for e in experts])
            self._weight_lists = (key, lists)
        return self._weight_lists[1]

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Experts one by one, each over all of its tokens (any dtype, device and token count)."""
        N, K = ids.shape
        order = ids.flatten().argsort(stable=True)  # token-slot indices grouped by expert
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        tokens = x[order // K]
        out = torch.empty_like(tokens)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                out[start : start + n] = expert(tokens[start : start + n])
                start += n
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        # Weighted sum in float32 (the weights' dtype), as the reference does; as one batched product, which gives
        # the same sums as multiplying and reducing over K, ~8x faster than that reduction on CPU.
        return torch.bmm(weights[:, None, :], unsorted.view(N, K, -1).float())[:, 0].to(x.dtype)
