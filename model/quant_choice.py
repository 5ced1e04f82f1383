"""Which implementation the quantised products run on this machine, per scheme, activation dtype and row count:
torch's packed int8/int4 CPU ops in the activation dtype ("packed"), the same ops in bf16 with the activations
cast ("packed_bf16", float32 models only), or F.linear on the dequantised weight ("dequant", every device).

Decided once per process and (machine, scheme, dtype, shape) by timing the candidates on one of the model's own
quantised layers with kernel_choice's `best_time` (the bf16 kernels' calibration), for a decode batch
(DECODE_ROWS rows) and a prefill chunk (PREFILL_ROWS rows). Off the CPU only "dequant" exists. Not responsible for
the products themselves (quant.py) nor for the bf16 families (kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsvl2.model.kernel_choice import Timer, best_time
from dsvl2.model.quant import Impl, QuantLinear, quant_layers

DECODE_ROWS = 8
PREFILL_ROWS = 256

_decided: dict[tuple, tuple[Impl, Impl]] = {}


def candidates(layer: QuantLinear, dtype: torch.dtype) -> list[Impl]:
    """The implementations that can run `layer` with activations of `dtype` here."""
    probe = torch.empty(1, layer.in_features, dtype=dtype, device=layer.qweight.device)
    if not layer.packable(probe):
        return ["dequant"]
    found: list[Impl] = ["packed", "dequant"]
    if dtype is not torch.bfloat16:
        found.insert(1, "packed_bf16")
    return found


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
    calls: dict[Impl, Callable[[], object]] = {impl: (lambda impl=impl: layer.run(x, impl))
                                               for impl in candidates(layer, dtype)}
    with torch.inference_mode():
        return {impl: timer(call) for impl, call in calls.items()}


def choose(model: torch.nn.Module, dtype: torch.dtype, *, timer: Timer = best_time) -> tuple[Impl, Impl]:
    """(decode, prefill) implementations for the quantised layers of `model` with `dtype` activations: the
    fastest candidate of each on the representative layer, decided once per process for the same shape."""
    layer = representative(model)
    if layer is None:
        return ("dequant", "dequant")
    key = (layer.scheme, layer.in_features, layer.out_features, layer.layout, str(layer.qweight.device), dtype,
           torch.get_num_threads(), timer)
    if (found := _decided.get(key)) is None:
        picks = []
        for rows in (DECODE_ROWS, PREFILL_ROWS):
            times = time_impls(layer, dtype, rows, timer=timer)
            picks.append(min(times, key=times.__getitem__))
        found = _decided[key] = (picks[0], picks[1])
    return found
