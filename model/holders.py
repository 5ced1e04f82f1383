"""Objects that hold a model's weights besides its parameters and buffers: a stack that projections or experts are
views of (stacked.py, feedforward.py), the experts held by the quantised kernel library (quant_experts.QuantExperts), a
decode plan's bound calls (decode_plan.py), a MoE layer's lists of its experts' weights. Each is a `WeightHolder`: it
lets go on `release()` and takes the weights up again, as they are then, at its next use.

`release_all` lets go of every one in a model before its weights move: placement.py's huge pages, and any conversion
or move of the language model (`.to()`, `.float()`, `.cuda()`: `nn.Module._apply`, through LanguageModel), so that the
old tensors are freed with the move instead of held until a next call that may never come (a model moved to a GPU
never makes another decode step on the CPU's kernels).
"""

from __future__ import annotations

from torch import nn


class WeightHolder:
    """Holds tensors of a model's weights (or views of them) outside its parameters and buffers."""

    def release(self) -> None:
        """Drop every reference to the weights; the next use takes them up as they are then."""
        raise NotImplementedError


def release_all(model: nn.Module) -> None:
    """`release()` every WeightHolder among `model`'s modules and their plain attributes."""
    for module in model.modules():
        if isinstance(module, WeightHolder):
            module.release()
        for value in vars(module).values():
            if isinstance(value, WeightHolder):
                value.release()
