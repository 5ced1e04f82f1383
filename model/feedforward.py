"""The decoder's feed-forward blocks: dense MLP, MoE routing (MoEGate) and routed + shared experts (MoE), and the
bias-free projection `proj` every language module uses. Attribute paths equal the checkpoint's `language.*` keys.

Each module holds the model's `Paths` (kernel_choice.py; set by LanguageModel, `UNCHOSEN` = torch until then)
and asks it, never the environment, whether a family runs our kernels; the kernels' own checks (shape, dtype,
device, availability) still apply. Shape legend: N tokens, E hidden size, X routed experts, K experts per token,
T new tokens per row, I an expert's width.

A MoE layer's routed experts run, first that applies: the quantised one-call kernel (quant_experts.QuantExperts, which
takes the shared experts into the same call where their weights match the routed ones' scheme and layout); the bf16
CPU one-call kernel (kernels.moe_routed, where its family takes the kernel); torch's grouped product over the
experts' weights stacked per projection (`MoE.grouped`: float32 / bf16 on the CPU, bf16 on a GPU; nothing read
back to the host); else one expert at a time (`MoE.dispatch`). The stacks are the experts' own parameters, held
once: the loader reads the weights into them (`stack_slots`), and `StackedExperts` copies them there otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.model import kernels, quant_kernels
from dsvl2.model.attention import SDPA_MIN_QUERIES
from dsvl2.model.config import LanguageConfig
from dsvl2.model.holders import WeightHolder
from dsvl2.model.kernel_choice import UNCHOSEN, Paths
from dsvl2.model.quant import QuantLinear
from dsvl2.model.quant_experts import QuantExperts


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
        flat = x.reshape(-1, x.shape[-1])
        down = self.down_proj
        if (flat.shape[0] <= kernels.MAX_ROWS and p.kernel("decode_experts") and not isinstance(down, QuantLinear)
                and kernels.moe_fits(flat, down.weight)):
            # A few rows in bf16 on the CPU: the three products and the gating in one call, as the one expert of
            # every token with weight 1 (exact: the weighted sum rounds the expert's bf16 output to itself).
            ids, ones = every_token(flat.shape[0])
            gate, up = [self.gate_proj.weight], [self.up_proj.weight]
            return kernels.moe_routed(flat, ids, ones, gate, up, [down.weight]).view(*x.shape[:-1], -1)
        return proj(F.silu(proj(x, self.gate_proj, p)) * proj(x, self.up_proj, p), down, p)


@functools.cache
def every_token(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of n tokens all to expert 0 with weight 1: (ids (n, 1) int64, weights (n, 1) float32); made once per n
    (n <= kernels.MAX_ROWS or QuantLinear.DECODE_ROWS: decode batches), never written."""
    return torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1)


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
        self._float_key: tuple | None = None  # which weight `_float` was converted from
        self._float: torch.Tensor | None = None
        self.paths = UNCHOSEN

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.method == "greedy" and self.scoring == "softmax" and x.shape[0] <= kernels.MAX_ROWS
                and self.paths.kernel("layer_glue") and kernels.glue_fits(x)):  # a decode step's few tokens
            w = self.weight.detach()  # bf16 read as is (the same float32 products as `_float_weight`'s, half the bytes)
            if w.dtype not in (torch.bfloat16, torch.float32):
                w = self._float_weight()
            return kernels.route_greedy(x, w, self.top_k, self.norm_topk_prob, self.scaling)
        logits = F.linear(x.float(), self._float_weight())  # (N, X)
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

    def _float_weight(self) -> torch.Tensor:
        """The routing weight in float32, converted once (per decode step and layer the conversion of a bf16
        weight cost ~3x the product itself) and again when the parameter is replaced (loading, `.to()`) or
        changed in place."""
        w = self.weight
        if w.dtype is torch.float32:
            return w
        key = (id(w), w.data_ptr(), w.device, None if w.is_inference() else w._version)  # _version: in-place edits
        if self._float_key != key:
            self._float_key, self._float = key, w.detach().float()
        return self._float

    def _expert_mask(self, group_scores: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the topk_group best groups: (N, X) bool."""
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        per_group = scores.shape[1] // self.n_group
        return group_mask[:, :, None].expand(-1, -1, per_group).reshape(scores.shape)


class MoE(nn.Module, WeightHolder):
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
        self._kernel_args: tuple[tuple, tuple[list[torch.Tensor], ...]] | None = None
        self._quant_experts, self._quant_shared = QuantExperts(), QuantExperts()
        self._stacked = StackedExperts()
        self.paths = UNCHOSEN

    def release(self) -> None:
        """Drop the lists of the experts' weights (`_expert_weights`, `_kernel_weights`; the holders among its
        attributes release themselves: holders.release_all)."""
        self._weight_lists = self._kernel_args = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, E)
        ids, weights = self.gate(flat)  # (N, K)
        T = shape[-2] if x.ndim >= 3 else flat.shape[0]  # new tokens per row: decode or prefill
        family = "decode_experts" if T < SDPA_MIN_QUERIES else "prefill_experts"
        down, y, shared = self.experts[0].down_proj, None, getattr(self, "shared_experts", None)
        if isinstance(down, QuantLinear):  # quantised experts on the kernel: the whole layer in one call, with the
            y = self._quant_experts.run(self.experts, flat, ids, weights, shared)  # shared experts where they join
            if y is not None and self._quant_experts.shared_joined:
                shared = None
        elif self.paths.kernel(family) and kernels.moe_fits(flat, down.weight):
            # bf16 CPU: the whole layer in one call
            y = kernels.moe_routed(flat, ids, weights, *self._kernel_weights())
        if y is None:
            y = self.routed(flat, ids, weights)
        if shared is not None:
            y = y + self._shared(flat)
        return y.view(shape)

    def _shared(self, flat: torch.Tensor) -> torch.Tensor:
        """The shared experts' output for tokens flat (N, E): quantised ones on the kernel in one call (every token
        to the one expert with weight 1, exact), else their three products."""
        if isinstance(self.shared_experts.down_proj, QuantLinear) and flat.shape[0] <= QuantLinear.DECODE_ROWS:
            y = self._quant_shared.run([self.shared_experts], flat, *every_token(flat.shape[0]))
            if y is not None:
                return y
        return self.shared_experts(flat)

    def _expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The experts' gate, up and down weights as lists, built once: collecting 3 x 64 parameters through
        nn.Module attribute lookups took ~0.25 ms per layer, a twentieth of a batch-1 decode step. Rebuilt when
        the parameters are replaced or moved (loading, `.to()`), which the first and last weights show."""
        key = self._weights_key()
        if self._weight_lists is None or self._weight_lists[0] != key:
            experts = self.experts
            lists = ([e.gate_proj.weight for e in experts], [e.up_proj.weight for e in experts],
                     [e.down_proj.weight for e in experts])
            self._weight_lists = (key, lists)
        return self._weight_lists[1]

    def _kernel_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The experts' weights as the bf16 kernel takes them: their three stacks, one tensor a list, where the
        parameters are views of them (`StackedExperts`; the loader lays them out so), else `_expert_weights`' lists.
        Three tensors convert ~16-25 us faster than three lists of 64 in the op's argument parsing (11 calls a Tiny
        decode step). Rebuilt as `_expert_weights` is."""
        key = self._weights_key()
        if self._kernel_args is None or self._kernel_args[0] != key:
            stacks = self._stacked.get(self.experts)
            args = tuple([s] for s in stacks) if stacks is not None else self._expert_weights()
            self._kernel_args = (self._weights_key(), args)  # after `get`, which may have rebound the parameters
        return self._kernel_args[1]

    def _weights_key(self) -> tuple:
        """What shows the experts' parameters replaced or moved: the first and last weights' identities and places."""
        first, last = self.experts[0].gate_proj.weight, self.experts[-1].down_proj.weight
        return len(self.experts), id(first), first.data_ptr(), id(last), last.data_ptr()

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts without the fused kernels: torch's grouped product where it runs for these tokens and
        float experts (`grouped_fits`), else one expert at a time, as also where the decode projections' kernel
        takes these few rows (the experts' products then read each weight once on that kernel)."""
        down = self.experts[0].down_proj
        if (isinstance(down, QuantLinear) or not grouped_fits(x, down.weight)
                or kernels.takes(x, down.weight, enabled=self.paths.kernel("decode_projections"))):
            return self.dispatch(x, ids, weights)
        return self.grouped(x, ids, weights)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The products `dispatch` runs (tokens sorted by expert, each expert's rows one block), as three of torch's
        grouped products over the stacked weights (`StackedExperts`). The blocks' ends stay on the device: nothing
        is read back to the host, so a GPU's queue does not drain once per layer and step as it does for
        `dispatch`'s per-expert counts. Float experts only; see `grouped_fits`."""
        stacks = self._stacked.get(self.experts)
        if stacks is None:
            return self.dispatch(x, ids, weights)
        gate, up, down = stacks
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # token-slot indices grouped by expert
        counts = torch.zeros(len(self.experts), dtype=torch.int32, device=x.device)
        ends = counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        tokens = x[order // ids.shape[1]]
        h = (F.silu(torch._grouped_mm(tokens, gate.transpose(-2, -1), offs=ends))
             * torch._grouped_mm(tokens, up.transpose(-2, -1), offs=ends))
        return _combine(torch._grouped_mm(h, down.transpose(-2, -1), offs=ends), order, weights)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`dispatch` over this layer's experts."""
        return dispatch(self.experts, x, ids, weights)


def dispatch(experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Experts one by one, each over all of its tokens (any dtype, device, token count and expert kind, quantised
    included): tokens x (N, E) routed to `ids` (N, K), indices into the sequence `experts`, with `weights` (N, K).
    Reads the per-expert counts back to the host. Quantised experts on a CPU (a quantised model's prefill) have
    their outputs combined by the kernel library (`quant_kernels.combine_slots`, the same float32 sum), which
    reads them where they are instead of copying them into one tensor, un-sorting that and widening it to float32."""
    order = ids.flatten().argsort(stable=True)  # token-slot indices grouped by expert
    counts = torch.bincount(ids.flatten(), minlength=len(experts)).tolist()
    tokens = x[order // ids.shape[1]]
    if _combined_by_kernel(experts, tokens, weights):
        outs, start = [], 0
        for expert, n in zip(experts, counts, strict=True):
            if n:
                outs.append(expert(tokens[start : start + n]))
                start += n
        return quant_kernels.combine_slots(outs, order, weights)
    out = torch.empty_like(tokens)
    start = 0
    for expert, n in zip(experts, counts, strict=True):
        if n:
            out[start : start + n] = expert(tokens[start : start + n])
            start += n
    return _combine(out, order, weights)


def _combined_by_kernel(experts, tokens: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether `dispatch` combines these experts' outputs with `quant_kernels.combine_slots`."""
    return (isinstance(getattr(experts[0], "down_proj", None), QuantLinear) and tokens.is_cpu
            and tokens.dtype in (torch.float32, torch.bfloat16) and weights.dtype is torch.float32
            and quant_kernels.available())


def _combine(out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' outputs `out` (N * K, E), sorted by expert as `order` sorted the token slots, back in slot
    order and summed per token with `weights` (N, K): (N, E) in out's dtype. The weighted sum in float32 (the
    weights' dtype), as the reference does; as one batched product, which gives the same sums as multiplying and
    reducing over K, ~8x faster than that reduction on CPU."""
    N, K = weights.shape
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return torch.bmm(weights[:, None, :], unsorted.view(N, K, -1).float())[:, 0].to(out.dtype)


GROUPED_ALIGN = 8  # elements: off the CPU torch's grouped product wants rows a multiple of 16 bytes (bf16)


def grouped_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped product (`MoE.grouped`) takes tokens x with expert weights like w (an expert's
    down_proj weight): on the CPU in float32 or bf16 (the same products as F.linear there); elsewhere in bf16, with
    both widths a multiple of 16 bytes, on a device where a first small grouped product ran (CUDA's kernels; the
    meta device checks shapes as CUDA does). Other dtypes and devices take `MoE.dispatch`."""
    if x.dtype != w.dtype or x.device != w.device or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return (x.dtype is torch.bfloat16 and w.shape[0] % GROUPED_ALIGN == 0 and w.shape[1] % GROUPED_ALIGN == 0
            and _grouped_runs(str(x.device)))


@functools.cache
def _grouped_runs(device: str) -> bool:
    """Whether torch's grouped bf16 product runs on `device` (this build and device; once per process)."""
    try:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        b = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device).transpose(-2, -1)
        torch._grouped_mm(a, b, offs=torch.tensor([8, 16], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


class StackedExperts(WeightHolder):
    """The routed experts' float weights as three stacked tensors, gate and up (X, I, E) and down (X, E, I), for
    `MoE.grouped`. Building them rebinds each expert's parameters as views of the stacks, so the weights are held
    once (while building, one stack more); built on first use and again when the parameters were replaced or moved
    (loading, `.to()`), which the first or last expert's weight no longer inside its stack shows."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self):
        self._stacks: tuple[torch.Tensor, ...] = ()

    def release(self) -> None:
        self._stacks = ()

    def get(self, experts: nn.ModuleList) -> tuple[torch.Tensor, ...] | None:
        """The stacks (gate, up, down), or None where the parameters cannot be views of one stack (some of them
        inference tensors and some not, which a Parameter's data cannot switch between)."""
        if not self._current(experts):
            self._stacks = self._build(experts) if self._stackable(experts) else ()
        return self._stacks or None

    def _stackable(self, experts: nn.ModuleList) -> bool:
        kinds = {getattr(e, name).weight.is_inference() for e in experts for name in self.NAMES}
        return len(kinds) == 1

    def _current(self, experts: nn.ModuleList) -> bool:
        if not self._stacks:
            return False
        for name, stack in zip(self.NAMES, self._stacks, strict=True):
            first, last = getattr(experts[0], name).weight, getattr(experts[-1], name).weight
            if (first.device != stack.device or first.dtype != stack.dtype or first.data_ptr() != stack.data_ptr()
                    or last.data_ptr() != stack[-1].data_ptr()):
                return False
        return True

    def _build(self, experts: nn.ModuleList) -> tuple[torch.Tensor, ...]:
        stacks = []
        for name in self.NAMES:
            params = [getattr(e, name).weight for e in experts]
            # A parameter can be a view of a stack made in its own mode only (`_stackable`).
            with torch.inference_mode(params[0].is_inference()), torch.no_grad():
                stack = _laid_out(params)
                if stack is None:  # copy them into one (~1 s per Tiny layer in float32 on 2 cores: page faults)
                    stack = params[0].new_empty((len(params), *params[0].shape))
                    for i, p in enumerate(params):
                        stack[i].copy_(p)
                        p.data = stack[i]  # the parameter's old storage is freed
                stacks.append(stack)
        return tuple(stacks)


def _laid_out(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The stack `params` already are, one after another in one storage (as the loader places them:
    `stack_slots`), as a tensor over that storage; None where they are not."""
    first = params[0]
    storage, start, size = first.untyped_storage(), first.storage_offset(), first.numel()
    for i, p in enumerate(params):
        if not (p.is_contiguous() and p.shape == first.shape and p.dtype == first.dtype and p.device == first.device
                and p.untyped_storage().data_ptr() == storage.data_ptr() and p.storage_offset() == start + i * size):
            return None
    return first.new_empty(0).set_(storage, start, (len(params), *first.shape))


def stack_slots(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Where a loader puts the float routed experts' weights of `model` so that `StackedExperts` takes them as its
    stacks without copying: by state-dict key, (the name of its stack, its index there, the stack's length)."""
    slots = {}
    for path, m in model.named_modules():
        if isinstance(m, MoE):
            for name in StackedExperts.NAMES:
                for e, expert in enumerate(m.experts):
                    if isinstance(getattr(expert, name), nn.Linear):
                        slots[f"{path}.experts.{e}.{name}.weight"] = (f"{path}.experts.{name}", e, len(m.experts))
    return slots
