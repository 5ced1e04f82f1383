"""Projections of one input as one product: multi-head attention's q, k and v, and MLA's query and latent, for
decode's few rows where our kernels run them.

A decode step at batch 1 spends more on calling a small product than the product reads: each call is a Python
module call, its checks and an op with its own parallel region. Stacking the projections' weights along the
output dimension makes the three (two for MLA) one call over one stream of weight rows. The kernels compute every
output row on its own (its sum over K in an order that does not depend on the rows around it), so the stacked
product's slices equal the separate products bit for bit; tests/test_stacked.py checks that on every path.

The stack is the projections' own storage, held once: building it rebinds each projection's weight (a bf16
parameter, or a QuantLinear's qweight and scales) as a view of its rows there, as feedforward.StackedExperts does
for the experts. It is built at the first decode product that takes it and again when a weight was replaced
(loading, `.to()`, quant_choice's `relayout`), which the weights' identities show.
"""

from __future__ import annotations

import torch
from torch import nn

from dsvl2.model import kernels
from dsvl2.model.holders import WeightHolder
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.quant import KERNEL_ISA, KERNEL_LAYOUT, QuantLinear

Projection = nn.Linear | QuantLinear


class StackedProjections(WeightHolder):
    """The projections `names` of a module (all of the same input) as one stacked product; see the module
    docstring. `__call__` returns their outputs, or None where the stacked product does not run (the caller then
    runs them one by one)."""

    def __init__(self, *names: str):
        self.names = names
        self._held: list[tuple] = []  # what each member held when the stack was built (`_holding`)
        self._layer: QuantLinear | torch.Tensor | None = None  # the stacked quantised layer, or bf16 weight
        self._sizes: list[int] = []

    def __call__(self, module: nn.Module, x: torch.Tensor, paths: Paths) -> list[torch.Tensor] | None:
        """The outputs (..., N_i) of `module`'s projections for x (..., K), as views of one product's output."""
        layer = self.layer_for(module, x, paths)
        if layer is None:
            return None
        if isinstance(layer, QuantLinear):
            y = layer.kernel(x.reshape(-1, x.shape[-1]), layer.impls[0]).view(*x.shape[:-1], layer.out_features)
        else:
            y = kernels.linear(x, layer)
        return y.split_with_sizes(self._sizes, dim=-1)

    def layer_for(self, module: nn.Module, x: torch.Tensor, paths: Paths) -> QuantLinear | torch.Tensor | None:
        """The stacked layer (quantised: its product runs `impls[0]`) or bf16 weight whose product `__call__` runs for
        x, made or remade where the members' weights changed; None where the stacked product does not run."""
        modules = module._modules  # asked per layer and decode step: plain lookups, not nn.Module's __getattr__
        members = [modules[name] for name in self.names]
        first = members[0]
        if isinstance(first, QuantLinear):
            impl = first.impls[0]
            if not (0 < x.numel() <= QuantLinear.DECODE_ROWS * x.shape[-1] and impl in KERNEL_ISA
                    and first.kernel_fits(x, impl)):
                return None
        elif not (isinstance(first, nn.Linear)
                  and kernels.takes(x, first.weight, enabled=paths.kernel("decode_projections"))):
            return None
        return self._current(members)

    @property
    def sizes(self) -> list[int]:
        """The members' output widths, in order: where the stacked product's output splits."""
        return self._sizes

    def release(self) -> None:
        """Drop the stack (the members keep their views of it; the next call stacks them as they are then)."""
        self._layer, self._held = None, []

    def _current(self, members: list[Projection]) -> QuantLinear | torch.Tensor | None:
        """The stacked layer (quantised) or weight (bf16) over `members`' weights as they are now (built where they
        changed), or None where they cannot be stacked."""
        if not self._held or not all(_same(m, held) for m, held in zip(members, self._held, strict=True)):
            self.release()  # the old stack's reference goes before a new one is made
            self._layer = _stack(members)
            self._sizes = [m.out_features for m in members]
            self._held = [_holding(m) for m in members]  # the members are now views of the stack
        return self._layer


def _holding(m: Projection) -> tuple:
    """What a projection holds: its weight tensors (by identity; a parameter's data also by address, as `.to()`
    rebinds a parameter's data in place) and, for a quantised one, its product choice."""
    if isinstance(m, QuantLinear):
        return m._buffers["qweight"], m._buffers["scales"], m.impls
    w = m._parameters["weight"]
    return w, w.data_ptr()


def _same(m: Projection, held: tuple) -> bool:
    """Whether `m` still holds what `_holding` saw (cheap: asked per layer and decode step)."""
    if isinstance(m, QuantLinear):
        b = m._buffers
        return b["qweight"] is held[0] and b["scales"] is held[1] and m.impls == held[2]
    w = m._parameters["weight"]
    return w is held[0] and w.data_ptr() == held[1]


def _stack(members: list[Projection]) -> QuantLinear | torch.Tensor | None:
    """`members`' weights stacked along N (a QuantLinear over them where quantised, else the weight itself), the
    members rebound as views of it; None where they differ in kind, input width, scheme, layout or product choice,
    or a quantised one's rows do not fill its layout's blocks (the slices would not be whole blocks)."""
    first = members[0]
    if isinstance(first, QuantLinear):
        if not all(isinstance(m, QuantLinear) and m.in_features == first.in_features and m.scheme == first.scheme
                   and m.layout == first.layout == KERNEL_LAYOUT[first.scheme.bits] and m.impls == first.impls
                   and m.scales.dtype == first.scales.dtype and m.out_features % 4 == 0 for m in members):
            return None
        with torch.device("meta"):
            layer = QuantLinear(first.in_features, sum(m.out_features for m in members), first.scheme)
        layer.qweight = _rebind([m._buffers for m in members], "qweight")
        layer.scales = _rebind([m._buffers for m in members], "scales")
        layer.layout, layer.impls = first.layout, first.impls
        return layer
    if not all(isinstance(m, nn.Linear) and m.bias is None and m.in_features == first.in_features for m in members):
        return None
    params = [m.weight for m in members]
    if len({(p.dtype, p.device, p.is_inference()) for p in params}) != 1:
        return None  # a parameter can be a view only of a stack made in its own mode, on its device
    with torch.inference_mode(params[0].is_inference()), torch.no_grad():
        return _rebind([m._parameters for m in members], "weight")


def _rebind(holders: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The tensors `holders[i][name]` concatenated along dim 0 into one new tensor, each holder's entry then a view of
    its rows there (a parameter keeps its object: its data is rebound), so that the old storages are freed; where
    they already lie one after another in one storage (placement.py lays them out so), a view of them all."""
    parts = [h[name] for h in holders]
    if _adjacent(parts):
        first = parts[0].detach()
        return first.as_strided((sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride())
    stack = torch.cat([p.detach() for p in parts])
    start = 0
    for h, p in zip(holders, parts, strict=True):
        view = stack[start:start + p.shape[0]]
        start += p.shape[0]
        if isinstance(p, nn.Parameter):
            p.data = view
        else:
            h[name] = view
    return stack


def _adjacent(parts: list[torch.Tensor]) -> bool:
    """Whether `parts` are contiguous tensors of one dtype and row shape, each starting where the one before ends in
    the same storage: together one tensor's rows."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for p in parts:
        if (not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]
                or p.untyped_storage().data_ptr() != storage or p.data_ptr() != end):
            return False
        end += p.nbytes
    return True
