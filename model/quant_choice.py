"""Which implementation the quantised products run on this machine, per scheme, activation dtype and row count,
and so which runtime layout the weights take: our AVX2 kernels ("kernel", in the "r4" / "k16r4" layouts, where
quant_kernels is available), torch's packed int8/int4 CPU ops in the activation dtype ("packed", in the "plain" /
torch's "cpu" layout), the same ops in bf16 with the activations cast ("packed_bf16", float32 models only), or
F.linear on the dequantised weight ("dequant", any layout, every device).

Decided once per process and (machine, scheme, dtype, shape, layouts) by timing the candidates on one of the
model's own quantised layers with kernel_choice's `best_time` (the bf16 kernels' calibration), for a decode batch
(DECODE_ROWS rows) and a prefill chunk (PREFILL_ROWS rows): the decode winner fixes the layout (timed on a copy
of that layer in each layout it can take), the prefill winner is the fastest that reads the same layout; then
every layer is repacked into it, one at a time (never two copies of the model's weights). Off the CPU only
"dequant" exists. Not responsible for the products themselves (quant.py) nor for the bf16 families
(kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsvl2.model.kernel_choice import Timer, best_time
from dsvl2.model.quant import Impl, Layout, QuantLinear, quant_layers

DECODE_ROWS = 8
PREFILL_ROWS = 256

_decided: dict[tuple, tuple[Impl, Impl, Layout]] = {}


def candidates(layer: QuantLinear, dtype: torch.dtype) -> list[Impl]:
    """The implementations that can run `layer`, in its current layout, with activations of `dtype` here."""
    probe = torch.empty(1, layer.in_features, dtype=dtype, device=layer.qweight.device)
    found: list[Impl] = ["kernel"] if layer.kernel_fits(probe) else []
    if layer.packable(probe):
        found += ["packed", "packed_bf16"] if dtype is not torch.bfloat16 else ["packed"]
    return [*found, "dequant"]


def representative(model: torch.nn.Module) -> QuantLinear | None:
    """The layer the choice is timed on: the first routed expert's gate_proj (the bytes decode reads most), else
    the first quantised layer with the most weights."""
    layers = quant_layers(model)
    experts = [m for name, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts.0.gate_proj" in name]
    if experts:
        return experts[0]
    return max(layers, key=lambda m: m.in_features * m.out_features, default=None)


def time_impls(layer: QuantLinear, dtype: torch.dtype, rows: int, *, timer: Timer = best_time) -> dict[Impl, float]:
    """Seconds per product of `rows` rows for every candidate."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(layer.qweight.device)
    calls: dict[Impl, Callable[[], object]] = {impl: (lambda impl=impl, layer=layer: layer.run(x, impl))
                                               for impl in candidates(layer, dtype)}
    with torch.inference_mode():
        return {impl: timer(call) for impl, call in calls.items()}


def decide(layer: QuantLinear, dtype: torch.dtype, *, timer: Timer = best_time) -> tuple[Impl, Impl, Layout]:
    """(decode impl, prefill impl, layout) for layers like `layer`: the fastest decode candidate over every layout
    the layer can take (a "dequant" win keeps the layout it was fastest in), then the fastest prefill candidate
    that reads that layout. `layer` itself is not changed (other layouts are timed on copies)."""
    variants = {layout: layer if layout == layer.layout else layer.copy_as(layout) for layout in layer.layouts()}
    decode = {(impl, layout): t for layout, variant in variants.items()
              for impl, t in time_impls(variant, dtype, DECODE_ROWS, timer=timer).items()}
    impl, layout = min(decode, key=decode.__getitem__)
    prefill = time_impls(variants[layout], dtype, PREFILL_ROWS, timer=timer)
    return impl, min(prefill, key=prefill.__getitem__), layout


def choose(model: torch.nn.Module, dtype: torch.dtype, *, timer: Timer = best_time) -> tuple[Impl, Impl]:
    """(decode, prefill) implementations for the quantised layers of `model` with `dtype` activations, decided
    once per process for the same shape and layouts (`decide` on the representative layer). Also repacks every
    quantised layer of `model` that can take it into the layout the choice reads, one layer at a time."""
    layer = representative(model)
    if layer is None:
        return ("dequant", "dequant")
    key = (layer.scheme, layer.in_features, layer.out_features, layer.layout, tuple(layer.layouts()),
           str(layer.qweight.device), dtype, torch.get_num_threads(), timer)
    if (found := _decided.get(key)) is None:
        with torch.inference_mode():
            found = _decided[key] = decide(layer, dtype, timer=timer)
    decode, prefill, layout = found
    for m in quant_layers(model):
        if layout in m.layouts():
            m.relayout(layout)
    return decode, prefill
