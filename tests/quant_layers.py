"""Helpers shared by the quantised-product tests (tests/test_quant.py, tests/test_quant_kernels.py): a
QuantLinear holding a given weight quantised, every layer of a model set to given implementations, and a
relative-error assertion that names the worst element."""

from __future__ import annotations

import torch

from dsvl2.model.quant import Impl, QuantLinear, Scheme, pack_nibbles, quant_layers, quantize


def use_impls(model: torch.nn.Module, impls: tuple[Impl, Impl]) -> None:
    """Make every QuantLinear of `model` run `impls` (decode, prefill), whatever quant_choice decided."""
    for m in quant_layers(model):
        m.impls = impls


def quant_layer(w: torch.Tensor, scheme: Scheme, dtype: torch.dtype) -> tuple[QuantLinear, torch.Tensor, torch.Tensor]:
    """A QuantLinear of `w` (N, K) under `scheme` with scales in `dtype`, in the runtime layout `use_stored`
    picks here; also the int values q (N, K) and the bf16 scales."""
    q, s = quantize(w, scheme)
    layer = QuantLinear(w.shape[1], w.shape[0], scheme)
    layer.qweight = layer.use_stored(q if scheme.bits == 8 else pack_nibbles(q))
    layer.scales = s.to(dtype)
    return layer, q, s


def assert_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """max |got - ref| / max |ref| <= tol, else a message naming `what` and the worst element's index."""
    err = (got.float() - ref.float()).abs()
    rel = float(err.max()) / max(float(ref.float().abs().max()), 1e-12)
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert rel <= tol, f"{what}: relative error {rel:.3g} > {tol} at {worst}"
