"""Which implementation the quantised products run on this machine, per scheme, activation dtype and row count,
and so which runtime layout the weights take: our AVX2 kernels ("kernel", in the "r4" / "k16r4" layouts, where
quant_kernels is available), torch's packed int8/int4 CPU ops in the activation dtype ("packed", in the "plain" /
torch's "cpu" layout), the same ops in bf16 with the activations cast ("packed_bf16", float32 models only), or
F.linear on the dequantised weight ("dequant", any layout, every device).

Decided once per process and (machine, scheme, dtype, shape, layouts) by timing the candidates on one of the
model's own quantised layers with kernel_choice's `best_time` (the bf16 kernels' calibration), for a decode batch
(DECODE_ROWS rows) and a prefill chunk (PREFILL_ROWS rows): the decode winner fixes the layout (timed on a copy
of that layer in each layout it can take; a routed expert's kernel time is that of the one-call MoE path), the
prefill winner is the fastest that reads the same layout; then every layer is repacked into it, one at a time
(never two copies of the model's weights). Off the CPU only "dequant" exists. Not responsible for the products
themselves (quant.py) nor for the bf16 families (kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsvl2.model import quant_kernels
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


def representative(model: torch.nn.Module) -> tuple[QuantLinear | None, tuple[QuantLinear, ...] | None]:
    """The layer the choice is timed on: the first routed expert's gate_proj (the bytes decode reads most), with
    that expert's (gate, up, down) layers; else the first quantised layer with the most weights, and None."""
    for name, m in model.named_modules():
        if name.endswith(".experts.0") and isinstance(getattr(m, "gate_proj", None), QuantLinear):
            return m.gate_proj, (m.gate_proj, m.up_proj, m.down_proj)
    return max(quant_layers(model), key=lambda m: m.in_features * m.out_features, default=None), None


def time_fused_expert(expert: tuple[QuantLinear, ...], layout: Layout, dtype: torch.dtype, rows: int, *,
                      timer: Timer = best_time) -> float | None:
    """Seconds per product of `rows` rows when an expert's three products run as decode runs them on the kernel:
    in one quant_kernels.moe call (QuantExperts) for the three, timed here on `expert` in `layout` (copies where
    it is in another) and divided by 3. None where the kernel does not take these layers."""
    layers = [m if m.layout == layout else m.copy_as(layout) for m in expert]
    gate, up, down = layers
    x = torch.randn(rows, gate.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    if not (gate.kernel_fits(x) and down.layout == gate.layout and up.layout == gate.layout):
        return None
    ids, weights = torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1)
    lists = [([m.qweight], [m.scales]) for m in layers]

    def call(impl="kernel", layer=gate):  # the defaults name what is timed, as time_impls' calls do
        return quant_kernels.moe(x, ids, weights, *lists, layer.scheme.bits, gate.group or 0, down.group or 0)

    with torch.inference_mode():
        return timer(call) / 3


def time_impls(layer: QuantLinear, dtype: torch.dtype, rows: int, *, timer: Timer = best_time) -> dict[Impl, float]:
    """Seconds per product of `rows` rows for every candidate."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(layer.qweight.device)
    calls: dict[Impl, Callable[[], object]] = {impl: (lambda impl=impl, layer=layer: layer.run(x, impl))
                                               for impl in candidates(layer, dtype)}
    with torch.inference_mode():
        return {impl: timer(call) for impl, call in calls.items()}


def decide(layer: QuantLinear, dtype: torch.dtype, *, timer: Timer = best_time,
           expert: tuple[QuantLinear, ...] | None = None) -> tuple[Impl, Impl, Layout]:
    """(decode impl, prefill impl, layout) for layers like `layer`: the fastest decode candidate over every layout
    the layer can take (a "dequant" win keeps the layout it was fastest in), then the fastest prefill candidate
    that reads that layout. Where `layer` is a routed expert's (`expert` its three layers), the kernel's decode
    time is that of the one-call MoE path decode takes with it (`time_fused_expert`): a product timed alone
    would not show the per-call costs that path saves. `layer` itself is not changed (others are timed on copies)."""
    variants = {layout: layer if layout == layer.layout else layer.copy_as(layout) for layout in layer.layouts()}
    decode: dict[tuple[Impl, Layout], float] = {}
    for layout, variant in variants.items():
        times = time_impls(variant, dtype, DECODE_ROWS, timer=timer)
        if expert is not None and "kernel" in times:
            fused = time_fused_expert(expert, layout, dtype, DECODE_ROWS, timer=timer)
            times["kernel"] = times["kernel"] if fused is None else fused
        decode.update(((impl, layout), t) for impl, t in times.items())
    impl, layout = min(decode, key=decode.__getitem__)
    prefill = time_impls(variants[layout], dtype, PREFILL_ROWS, timer=timer)
    return impl, min(prefill, key=prefill.__getitem__), layout


def choose(model: torch.nn.Module, dtype: torch.dtype, *, timer: Timer = best_time) -> tuple[Impl, Impl]:
    """(decode, prefill) implementations for the quantised layers of `model` with `dtype` activations, decided
    once per process for the same shape and layouts (`decide` on the representative layer). Also repacks every
    quantised layer of `model` that can take it into the layout the choice reads, one layer at a time."""
    layer, expert = representative(model)
    if layer is None:
        return ("dequant", "dequant")
    key = (layer.scheme, layer.in_features, layer.out_features, layer.layout, tuple(layer.layouts()),
           str(layer.qweight.device), dtype, torch.get_num_threads(), timer)
    if (found := _decided.get(key)) is None:
        with torch.inference_mode():
            found = _decided[key] = decide(layer, dtype, timer=timer, expert=expert)
    decode, prefill, layout = found
    for m in quant_layers(model):
        if layout in m.layouts():
            m.relayout(layout)
    return decode, prefill
