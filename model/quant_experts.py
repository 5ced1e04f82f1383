"""A MoE layer's quantised experts as one call of the quantised MoE kernel (quant_kernels.moe_held): the experts'
weights held by the kernel library once, the shared experts joining the routed ones' call where their linears match.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from dsvl2.model import quant_kernels
from dsvl2.model.holders import WeightHolder
from dsvl2.model.quant import KERNEL_ISA, QuantLinear


class QuantExperts(WeightHolder):
    """A MoE layer's routed experts, and its shared ones where they can join them, as one call of the quantised MoE
    kernel (quant_kernels.moe_held) where their products run the kernel: every expert's qweights and scales held by
    the library (`hold_experts`), made once and again when the weights are replaced (loading, `relayout`, `.to()`),
    which the first and last show."""

    def __init__(self):
        self._ends: tuple[torch.Tensor | None, ...] | None = None
        self._held: quant_kernels.HeldExperts | None = None
        self.shared_joined = False  # whether the weights held include the shared experts given to `run`

    def release(self) -> None:
        """Drop the weights held (the next call holds the experts' weights as they are then)."""
        self._held = self._ends = None
        self.shared_joined = False

    def run(self, experts: Sequence[nn.Module], x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            shared: nn.Module | None = None) -> torch.Tensor | None:
        """y (N, E) in x's dtype for tokens x (N, E) routed to `ids` with `weights` (MoE.dispatch's result, the
        expert arithmetic in float32), or None where the kernel does not run these experts: not quantised, not
        chosen for decode, more than DECODE_ROWS tokens, or a layout / dtype / device it does not cover.

        `shared`, the layer's shared experts (an MLP): where their linears are quantised in the routed experts'
        scheme, layout and scale dtype (`joins`), the same call runs them too, every token with weight 1, and y is
        the layer's whole feed-forward output, summed in float32 and rounded once (`shared_joined` then says so);
        else they are left to the caller. Joined, Tiny's int4 decode step ran 1.04x / 1.02-1.05x faster at batch
        1 / 8 than with a second call for them (2-core Zen 5, bench/RESULTS.md)."""
        call = self.call_for(experts, x, shared)
        if call is None:
            return None
        held, bits, group_in, group_mid, isa = call
        return quant_kernels.moe_held(x, ids, weights, held, bits, group_in, group_mid, isa)

    def call_for(self, experts: Sequence[nn.Module], x: torch.Tensor, shared: nn.Module | None = None
                 ) -> tuple[quant_kernels.HeldExperts, int, int, int, int] | None:
        """What `run` hands the op besides the tokens and their routing, (held weights, bits, group_in, group_mid,
        isa), the weights held anew where they were replaced; None where the kernel does not run these experts."""
        first, last = experts[0], experts[-1]
        gate, down = first.gate_proj, first.down_proj
        impl = gate.impls[0] if isinstance(gate, QuantLinear) else "dequant"
        if not (impl in KERNEL_ISA and isinstance(down, QuantLinear) and x.ndim == 2
                and 0 < x.shape[0] <= QuantLinear.DECODE_ROWS and gate.kernel_fits(x, impl)
                and down.layout == gate.layout):
            return None
        # The weights held are current while the first and last qweights are the tensors they were (a repack or
        # a move replaces every one); identities, as this is asked per layer and decode step.
        ends = (gate._buffers["qweight"], last.down_proj._buffers["qweight"],
                *((None, None) if shared is None else (shared.gate_proj._buffers.get("qweight"),
                                                       shared.down_proj._buffers.get("qweight"))))
        held = self._ends
        if held is None or not all(map(operator.is_, ends, held)):
            modules = [*experts, shared] if shared is not None and joins(shared, first) else list(experts)
            layers = [[getattr(e, name) for e in modules] for name in ("gate_proj", "up_proj", "down_proj")]
            self.release()  # the old weights' references go before the new are taken
            self.shared_joined = len(modules) > len(experts)
            self._held = quant_kernels.hold_experts(*(([m.qweight for m in ms], [m.scales for m in ms])
                                                      for ms in layers), shared=int(self.shared_joined))
            self._ends = ends
        return self._held, gate.scheme.bits, gate.group or 0, down.group or 0, KERNEL_ISA[impl]


def joins(shared: nn.Module, expert: nn.Module) -> bool:
    """Whether the shared experts' MLP `shared` can run in the quantised MoE call of the routed `expert`'s layer:
    each of its linears quantised in the routed one's scheme, group size, layout and scale dtype, on its device.
    (Their chosen impl may differ, the shared experts being timed with the dense layers: in the call they run the
    routed experts' tiles, an exact product of the same weights.)"""
    for name in ("gate_proj", "up_proj", "down_proj"):
        mine, theirs = getattr(shared, name), getattr(expert, name)
        if not (isinstance(mine, QuantLinear) and isinstance(theirs, QuantLinear) and mine.scheme == theirs.scheme
                and mine.group == theirs.group and mine.layout == theirs.layout
                and mine.scales.dtype == theirs.scales.dtype and mine.qweight.device == theirs.qweight.device):
            return False
    return True
