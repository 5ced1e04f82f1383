"""A decode step with its choices settled once: the language model's layers as a plan of direct kernel calls.

A decode step of the module tree asks every question again at every layer and step: which path each op family
takes, whether each kernel covers these tensors (dtype, device, strides, autograd, the library switched on), whether
stacked or held weights are still current, plus nn.Module's calls and attribute lookups. On Tiny's 12 layers that
is ~4,000 Python calls a step: ~0.6 ms at any batch, ~9% of a real int4 step at batch 1 on a 2-core Zen 5
(bench/fixed_costs.py, bench/RESULTS.md).

For a step of one new token per row over a whole `KVCache` (the engine's decode), in bf16 on the CPU with autograd
off, `DecodePlan` asks those questions once, when it is made: each piece of a layer (its two norms with their
residual adds, the attention, the feed-forward block; inside them the projections, routing and experts) becomes
either the kernel call the module would make, with its weights and choices bound, or, where the module would not
take a kernel there (a family on torch, a quantised product on torch's op, MLA's expanded form, a gate other than
greedy softmax) or where a module the tree calls has forward hooks or a wrapped forward, the module itself, called
as the module tree calls it. Each settled piece makes the same calls on the same tensors as the module path, so the
plan's output equals it bit for bit (tests/test_decode_plan.py).

A plan stays valid while what it bound is current: every weight, stacked or held weight and product choice it read
(by identity, and parameters' data by address, as `.to()` and the stacks rebind a parameter's data in place), which
of the modules it passes by are watched by hooks, the model's `Paths` and the kernels switched on. `LanguageModel`
checks that at each step (~370 checks on Tiny int4, ~18 us) and makes a new plan where it fails.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from dsvl2.model import kernels, quant_kernels
from dsvl2.model.feedforward import MLP, MoE, MoEGate, every_token, proj
from dsvl2.model.holders import WeightHolder
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.kv_cache import KVCache
from dsvl2.model.quant import KERNEL_ISA, QuantLinear

ROWS = min(kernels.MAX_ROWS, QuantLinear.DECODE_ROWS)  # decode rows every settled kernel covers

Product = Callable[[torch.Tensor], torch.Tensor]  # x (M, K) -> (M, N)
Norm = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]  # RMSNorm.residual
Layer = Callable[[torch.Tensor, torch.Tensor | None, "Step"], tuple[torch.Tensor, torch.Tensor]]  # (x, delta, step)


@dataclass
class Step:
    """What every layer of one step shares: positions (B, 1), the rotary tables, the cache and its slots in use."""

    positions: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    cache: KVCache
    used: int


class Watch:
    """What a plan bound: (holder, key, value) entries that must still be `holder[key] is value`, tensors that must
    still have their data at the address they had, and modules the tree calls that must still be `observed` or not
    as they were. Checked once a step in C's loops (`map`): on Tiny int4 ~270 entries, ~40 addresses and ~60 modules
    in ~18 us."""

    def __init__(self):
        self.holders: list[dict] = []
        self.keys: list[str] = []
        self.values: list[object] = []
        self.tensors: list[torch.Tensor] = []
        self.addresses: list[int] = []
        self.called: list[nn.Module] = []
        self.seen: list[bool] = []

    def _hold(self, holder: dict, key: str) -> object:
        value = holder[key]
        self.holders.append(holder), self.keys.append(key), self.values.append(value)
        return value

    def param(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        p = self._hold(module._parameters, name)
        self.tensors.append(p), self.addresses.append(p.data_ptr())
        return p

    def buffer(self, module: nn.Module, name: str) -> torch.Tensor:
        return self._hold(module._buffers, name)

    def attr(self, module: nn.Module | object, name: str) -> object:
        return self._hold(module.__dict__, name)

    def observed(self, module: nn.Module) -> bool:
        """Whether something sees or replaces the calls of `module`, which the module tree calls (`observed`); the
        answer is part of what must stay as it was."""
        seen = observed(module)
        self.called.append(module), self.seen.append(seen)
        return seen

    def current(self) -> bool:
        return (all(map(operator.is_, map(operator.getitem, self.holders, self.keys), self.values))
                and all(map(operator.eq, map(torch.Tensor.data_ptr, self.tensors), self.addresses))
                and all(map(operator.is_, map(observed, self.called), self.seen)))  # global hooks: `usable`


def observed(module: nn.Module) -> bool:
    """Whether `module` has forward hooks or a forward of its own (an instance attribute over its class's, as a
    wrapper sets): the plan then calls it, so that they see what the module tree would show them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (torch.nn.modules.module's global ones)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def usable(embeds: torch.Tensor, cache: object) -> bool:
    """Whether a forward of `embeds` (B, T, E) over `cache` is a step a plan runs: one bf16 token per row on the CPU
    over a whole bf16 `KVCache`, at most ROWS rows, autograd off."""
    return (type(cache) is KVCache and embeds.shape[1] == 1 and 0 < embeds.shape[0] <= ROWS
            and embeds.dtype is torch.bfloat16 and embeds.is_cpu and cache.device.type == "cpu"
            and cache.layers and cache.layers[0][0].dtype is torch.bfloat16 and not torch.is_grad_enabled()
            and not _global_hooks())


class DecodePlan(WeightHolder):
    """The decoder `decoder` (language.Decoder) settled for decode steps under `paths`; see the module docstring.
    Make it with the kernels available and switched on (`kernels.available()`)."""

    def __init__(self, decoder: nn.Module, paths: Paths):
        self.paths = paths
        self.watch = Watch()
        self.unsettled: list[str] = []  # the kinds of the modules a step calls as modules (where no kernel runs)
        self.released = False
        self._quantised = any(isinstance(m, QuantLinear) for m in decoder.modules())
        self.whole = self._as_module(decoder, decoder) if self.watch.observed(decoder) else None  # hooks: called whole
        layers = [] if self.whole is not None else list(decoder.layers)
        self.rotary = layers[0].self_attn.rotary if layers else None
        self.layers = [self._layer(layer) for layer in layers]
        self.final = self._norm(decoder.norm)

    def __reduce__(self) -> tuple:
        """Copied and pickled as None: a copied model makes its own plan (this one's calls are bound to the original's
        tensors), and its closures could not be pickled."""
        return type(None), ()

    def release(self) -> None:
        """Let go of everything bound (placement.py, before it moves the weights): the plan is no longer current."""
        self.layers, self.final, self.whole, self.watch = [], None, None, Watch()
        self.released = True

    def current(self, paths: Paths) -> bool:
        """Whether the plan still computes what the module tree would under `paths`."""
        return (not self.released and paths is self.paths and kernels.available()
                and (not self._quantised or quant_kernels.available())
                and self.watch.current())

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """language.Decoder's forward of x (B, 1, E) at `positions` over `cache` (see `usable`)."""
        if self.whole is not None:
            return self.whole(x, positions, cache)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        step = Step(positions, rope, cache, cache.reserve(1))
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, step)
        return self.final(x, delta)[0]

    # --- the pieces ---

    def _as_module(self, run: Callable, module: nn.Module) -> Callable:
        """`run`, a piece that calls `module` as the module tree does, noted in `unsettled`."""
        self.unsettled.append(type(module).__name__)
        return run

    def _layer(self, layer: nn.Module) -> Layer:
        """language.DecoderLayer's forward of (x, delta) as its pieces, or the layer itself where it is observed."""
        if self.watch.observed(layer):
            return self._as_module(lambda x, delta, step: layer(x, step.positions, step.cache, step.rope, delta), layer)
        norm_in, norm_post = self._norm(layer.input_layernorm), self._norm(layer.post_attention_layernorm)
        attention, feedforward = self._attention(layer.self_attn, layer.index), self._feedforward(layer.mlp)

        def pieces(x: torch.Tensor, delta: torch.Tensor | None, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
            h, x = norm_in(x, delta)
            h, x = norm_post(x, attention(h, step))
            return x, feedforward(h)

        return pieces

    def _norm(self, norm: nn.Module, called: bool = False) -> Norm:
        """RMSNorm.residual of (x, delta); `called`: a norm the module tree calls as a module (MLA's)."""
        if not (self.paths.kernel("layer_glue") and _bf16(norm.weight)) or (called and self.watch.observed(norm)):
            return self._as_module(norm.residual, norm)
        w, eps = self.watch.param(norm), norm.eps

        def settled(x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return kernels.rms_norm(x, w, eps, delta)

        return settled

    def _linear(self, layer: nn.Module) -> Product:
        """x (M, K) -> (M, N) as `proj` computes it for decode rows."""
        if isinstance(layer, QuantLinear):  # called as a module by `proj`
            impl = None if self.watch.observed(layer) else layer.kernel_for(_probe(layer.in_features), layer.impls[0])
            if impl is None:
                return self._as_module(layer, layer)
            self.watch.attr(layer, "impls")
            return self._quant_product(layer, impl)
        w = layer.weight
        if not (self.paths.kernel("decode_projections") and layer.bias is None and _bf16(w) and w.is_contiguous()):
            paths = self.paths
            return self._as_module(lambda x: proj(x, layer, paths), layer)
        w = self.watch.param(layer)
        return lambda x: kernels.linear_bf16(x, w)

    def _quant_product(self, layer: QuantLinear, impl: str) -> Product:
        """`layer`'s kernel product by `impl` (QuantLinear.kernel), its weights bound."""
        q, s, isa = self.watch.buffer(layer, "qweight"), self.watch.buffer(layer, "scales"), KERNEL_ISA[impl]
        if layer.scheme.bits == 8:
            return lambda x: quant_kernels.int8_linear(x, q, s, isa, False)
        group = layer.group
        return lambda x: quant_kernels.int4_linear(x, q, s, group, isa, False)

    def _projections(self, module: nn.Module, names: tuple[str, ...]) -> Callable[[torch.Tensor], list]:
        """`module`'s projections `names` of one input x (M, K): its stacked product where the module runs one
        (stacked.py), else each on its own."""
        members = [module._modules[name] for name in names]
        stack = module.stacked.layer_for(module, _probe(members[0].in_features)[None], self.paths)
        if stack is None:
            products = [self._linear(m) for m in members]
            return lambda x: [p(x) for p in products]
        for m in members:  # what the stack holds: stacked.py's `_holding`
            if isinstance(m, QuantLinear):
                self.watch.buffer(m, "qweight"), self.watch.buffer(m, "scales"), self.watch.attr(m, "impls")
            else:
                self.watch.param(m)
        sizes = list(module.stacked.sizes)
        if isinstance(stack, QuantLinear):
            product = self._quant_product(stack, stack.impls[0])
        else:
            product = lambda x: kernels.linear_bf16(x, stack)  # noqa: E731
        return lambda x: product(x).split_with_sizes(sizes, dim=-1)

    def _attention(self, attn: nn.Module, index: int) -> Callable[[torch.Tensor, Step], torch.Tensor]:
        def module(h: torch.Tensor, step: Step) -> torch.Tensor:
            return attn(h, step.positions, step.cache, index, step.rope)

        if not (self.paths.kernel("layer_glue") and self.paths.kernel("decode_attention")) or self.watch.observed(attn):
            return self._as_module(module, attn)
        if hasattr(attn, "kv_b_proj"):
            return self._latent_attention(attn, index) or self._as_module(module, attn)
        return self._head_attention(attn, index)

    def _head_attention(self, attn: nn.Module, index: int) -> Callable[[torch.Tensor, Step], torch.Tensor]:
        """language.MHAttention's decode over the cache: its rope, store and attend kernels in one call."""
        qkv = self._projections(attn, ("q_proj", "k_proj", "v_proj"))
        out = self._linear(attn.o_proj)
        H, Hk, D, scale = attn.heads, attn.kv_heads, attn.head_dim, attn.scale

        def settled(h: torch.Tensor, step: Step) -> torch.Tensor:
            B = h.shape[0]
            q, k, v = qkv(h.view(B, -1))
            cache = step.cache
            o = kernels.attend_step(q.view(B, 1, H, D), k.view(B, 1, Hk, D), v.view(B, 1, Hk, D), *step.rope,
                                    cache.layers[index], cache.every_row, step.positions, step.used, scale)
            return out(o.transpose(1, 2).reshape(B, H * D)).view(B, 1, -1)  # o: (B, H, 1, D)

        return settled

    def _latent_attention(self, attn: nn.Module, index: int) -> Callable[[torch.Tensor, Step], torch.Tensor] | None:
        """language.MLAttention's absorbed decode over the cache on the rope, store and absorbed kernels; None where
        the module would not take it (the expanded form forced, kv_b_proj's weight not a contiguous bf16 one)."""
        w = attn.kv_b_proj.weight
        if self.watch.attr(attn, "absorb") is False or not (_bf16(w) and w.ndim == 2 and w.is_contiguous()):
            return None
        w = self.watch.param(attn.kv_b_proj)
        lora = "q_a_proj" in attn._modules
        first = self._projections(attn, ("q_a_proj" if lora else "q_proj", "kv_a_proj_with_mqa"))
        q_norm = self._norm(attn.q_a_layernorm, called=True) if lora else None
        q_up = self._linear(attn.q_b_proj) if lora else None
        kv_norm = self._norm(attn.kv_a_layernorm, called=True)
        out = self._linear(attn.o_proj)
        H, dn, dr, dv, rank, scale = attn.heads, attn.dn, attn.dr, attn.dv, attn.rank, attn.scale

        def settled(h: torch.Tensor, step: Step) -> torch.Tensor:
            B = h.shape[0]
            q, latent = first(h.view(B, -1))
            if lora:
                q = q_up(q_norm(q.view(B, 1, -1), None)[0].view(B, -1))
            q = q.view(B, 1, H, dn + dr).transpose(1, 2)  # (B, H, 1, Dn+R)
            q_nope, q_pe = q.split([dn, dr], dim=-1)
            c, k_pe = latent.view(B, 1, -1).split([rank, dr], dim=-1)  # (B, 1, C), (B, 1, R)
            c = kv_norm(c, None)[0]
            cos, sin = step.rope
            q_pe = kernels.rope(q_pe.transpose(1, 2), cos, sin, interleaved=True).transpose(1, 2)
            k_pe = kernels.rope(k_pe[:, :, None], cos, sin, interleaved=True)[:, :, 0]
            c, k_pe = step.cache.store(index, step.positions, (c, k_pe), step.used)
            o = kernels.absorbed(q_nope, q_pe, c, k_pe, w, step.positions, scale)  # (B, H, 1, Dv)
            return out(o.transpose(1, 2).reshape(B, H * dv)).view(B, 1, -1)

        return settled

    def _feedforward(self, block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer's feed-forward block of h (B, 1, E)."""
        if self.watch.observed(block):
            return self._as_module(block, block)
        run = self._experts(block) if isinstance(block, MoE) else self._mlp(block)
        if run is None:
            return self._as_module(block, block)
        return lambda h: run(h.view(h.shape[0], -1)).view(h.shape)

    def _mlp(self, mlp: MLP) -> Callable[[torch.Tensor], torch.Tensor]:
        """A dense MLP of x (N, E): bf16 as one call of the experts' kernel (MLP.forward's), quantised as its three
        products."""
        down = mlp.down_proj
        if not isinstance(down, QuantLinear):
            if not (self.paths.kernel("decode_experts") and _bf16(down.weight)) or self.watch.observed(mlp):
                return self._as_module(mlp, mlp)
            gate, up, down = (self.watch.param(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            return lambda x: kernels.moe_routed(x, *every_token(x.shape[0]), [gate], [up], [down])
        gate, up, down = (self._linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        return lambda x: down(F.silu(gate(x)) * up(x))

    def _experts(self, moe: MoE) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A MoE layer of x (N, E) (MoE.forward's decode): routing, then the routed experts (with the shared ones where
        they join them) in one kernel call; None where MoE.forward would not take that kernel."""
        route = self._route(moe.gate)
        experts, shared = moe.experts, moe._modules.get("shared_experts")
        first, last = experts[0], experts[-1]
        if isinstance(first.down_proj, QuantLinear):
            call = moe._quant_experts.call_for(experts, _probe(first.gate_proj.in_features), shared)
            if call is None:
                return None
            self.watch.attr(first.gate_proj, "impls")
            for m in (first.gate_proj, last.down_proj, *((shared.gate_proj, shared.down_proj) if shared else ())):
                if isinstance(m, QuantLinear):  # quant_experts.QuantExperts's `ends`
                    self.watch.buffer(m, "qweight")
            held, bits, group_in, group_mid, isa = call
            rest = None if shared is None or moe._quant_experts.shared_joined else moe._shared

            def routed(x: torch.Tensor) -> torch.Tensor:
                return quant_kernels.moe_held(x, *route(x), held, bits, group_in, group_mid, isa)
        else:
            if not (self.paths.kernel("decode_experts") and _bf16(first.down_proj.weight)):
                return None
            args = moe._kernel_weights()
            self.watch.param(first.gate_proj), self.watch.param(last.down_proj)  # MoE._weights_key
            rest = None if shared is None else self._mlp(shared)

            def routed(x: torch.Tensor) -> torch.Tensor:
                return kernels.moe_routed(x, *route(x), *args)

        if rest is None:
            return routed
        return lambda x: routed(x) + rest(x)

    def _route(self, gate: MoEGate) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        w = gate.weight
        if (not (gate.method == "greedy" and gate.scoring == "softmax" and self.paths.kernel("layer_glue")
                 and w.dtype in (torch.bfloat16, torch.float32) and w.is_cpu) or self.watch.observed(gate)):
            return self._as_module(gate, gate)
        w = self.watch.param(gate).detach()
        k, normalize, scaling = gate.top_k, gate.norm_topk_prob, gate.scaling
        return lambda x: kernels.route_greedy(x, w, k, normalize, scaling)


def _probe(k: int) -> torch.Tensor:
    """One decode row of width k: what the settled kernels' checks are asked about (none depends on the count of
    rows up to ROWS)."""
    return torch.zeros(1, k, dtype=torch.bfloat16)


def _bf16(t: torch.Tensor) -> bool:
    return t.dtype is torch.bfloat16 and t.is_cpu
