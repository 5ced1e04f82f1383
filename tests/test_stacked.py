"""Attention's input projections as one stacked product (model/stacked.py): bit for bit the separate products, on
the bf16 decode kernel and on every quantised kernel this CPU runs, held once (the projections' weights become views
of the stack), rebuilt when a weight is replaced, and left to the separate products where they cannot stack."""

from __future__ import annotations

import pytest
import torch
from quant_layers import quant_layer
from torch import nn

from dsvl2.model import kernels
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.quant import KERNEL_ISA, Scheme
from dsvl2.model.stacked import StackedProjections

EVERY_KERNEL = Paths.uniform("kernel", "forced by the test")
NAMES = ("q_proj", "k_proj", "v_proj")


class Holder(nn.Module):
    """Projections of one input under attention's names."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        for name, layer in zip(NAMES, layers, strict=True):
            setattr(self, name, layer)


def _quant_holder(bits: int, sizes=(64, 32, 32), k: int = 256, seed: int = 0) -> Holder:
    g = torch.Generator().manual_seed(seed)
    scheme = Scheme.named(f"int{bits}")
    return Holder([quant_layer(torch.randn(n, k, generator=g), scheme, torch.bfloat16)[0] for n in sizes])


def _quant_impls(bits: int) -> list[str]:
    """The kernel impls this CPU runs for `bits` (with the `quant_kernels_on` fixture: the library built)."""
    probe = _quant_holder(bits).q_proj
    x = torch.zeros(1, probe.in_features, dtype=torch.bfloat16)
    return [impl for impl in KERNEL_ISA if probe.kernel_fits(x, impl)]


@pytest.mark.parametrize("bits", [8, 4])
def test_stacked_quantised_products_equal_the_separate_ones_bit_for_bit(quant_kernels_on, bits):
    """Catches a stacked product that changes any output: every kernel impl here, 1 to 32 rows, q / k / v sliced out
    of one call equal each projection's own kernel call exactly."""
    impls = _quant_impls(bits)
    assert impls, "no kernel impl runs here"
    for impl in impls:
        holder = _quant_holder(bits)
        for m in holder.children():
            m.impls = (impl, impl)
        separate = {}
        for rows in (1, 2, 3, 5, 8, 17, 32):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            separate[rows] = [m.kernel(x, impl) for m in holder.children()]
        stacked = StackedProjections(*NAMES)
        for rows, want in separate.items():
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            got = stacked(holder, x, EVERY_KERNEL)
            assert got is not None, f"{impl}: not stacked at {rows} rows"
            for name, g, w in zip(NAMES, got, want, strict=True):
                assert torch.equal(g, w), f"{impl}, {rows} rows: {name} differs from its own product"


def test_stacked_quantised_weights_are_held_once_and_rebuilt_when_replaced(quant_kernels_on):
    """Catches a stack that copies the weights (twice the memory) or goes stale: after a call every projection's
    qweight and scales are views of the stack; a projection repacked (as quant_choice's relayout does) is taken up
    by the next call, whose output follows the new weight."""
    impl = _quant_impls(4)[0]
    holder = _quant_holder(4)
    for m in holder.children():
        m.impls = (impl, impl)
    stacked = StackedProjections(*NAMES)
    x = torch.randn(2, 256).to(torch.bfloat16)
    stacked(holder, x, EVERY_KERNEL)
    storages = {m.qweight.untyped_storage().data_ptr() for m in holder.children()}
    assert len(storages) == 1 and len({m.scales.untyped_storage().data_ptr() for m in holder.children()}) == 1
    replacement = _quant_holder(4, seed=9).k_proj
    holder.k_proj.qweight, holder.k_proj.scales = replacement.qweight.clone(), replacement.scales.clone()
    _, k, _ = stacked(holder, x, EVERY_KERNEL)
    assert torch.equal(k, replacement.kernel(x, impl))
    assert len({m.qweight.untyped_storage().data_ptr() for m in holder.children()}) == 1


def test_projections_that_cannot_stack_are_left_to_the_separate_products(quant_kernels_on):
    """Catches stacking where the slices would be wrong or the product would leave the kernel: rows that do not fill
    the layout's 4-row blocks, projections with different impls, more rows than decode's, a non-kernel impl."""
    impl = _quant_impls(8)[0]
    x = torch.randn(1, 256).to(torch.bfloat16)
    odd = _quant_holder(8, sizes=(64, 30, 32))
    mixed = _quant_holder(8)
    for holder in (odd, mixed):
        for m in holder.children():
            m.impls = (impl, impl)
    mixed.v_proj.impls = ("dequant", "dequant")
    assert StackedProjections(*NAMES)(odd, x, EVERY_KERNEL) is None
    assert StackedProjections(*NAMES)(mixed, x, EVERY_KERNEL) is None
    whole = _quant_holder(8)
    for m in whole.children():
        m.impls = (impl, impl)
    assert StackedProjections(*NAMES)(whole, torch.randn(33, 256).to(torch.bfloat16), EVERY_KERNEL) is None
    assert StackedProjections(*NAMES)(whole, x, EVERY_KERNEL) is not None


@pytest.mark.parametrize("name", ["tiny-mha", "small-mla"])
def test_decode_with_stacked_projections_equals_separate_projections(kernel_calls, monkeypatch, name):
    """Catches a stacked product wired wrongly into MHA or MLA (the splits, the views' strides through RoPE and the
    cache write): a bf16 decode step through the kernels gives bit for bit the logits of the separate products, and
    the stacked product really ran (one product of the projections' summed widths per layer)."""
    if not kernels.available():
        pytest.skip(f"no compiled kernel on this machine ({kernels.build_error()})")
    from parity import checkpoint_dir

    from dsvl2.model.weights import load_model

    lm = load_model(checkpoint_dir(name), dtype=torch.bfloat16).language
    monkeypatch.setattr(kernels, "paths", lambda trials: EVERY_KERNEL)
    ids = torch.randint(3, lm.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))

    def decode_logits() -> torch.Tensor:
        with torch.inference_mode():
            cache = lm.new_cache(2, 16)
            lm(lm.embed(ids[:, :11]), cache)
            cache.advance(11)
            kernel_calls.clear()
            return lm.logits(lm(lm.embed(ids[:, 11:]), cache)[:, 0])

    attn = lm.model.layers[0].self_attn
    widths = [getattr(attn, n).out_features for n in attn.stacked.names]
    stacked = decode_logits()
    assert (2, sum(widths), lm.cfg.hidden_size) in kernel_calls, "the stacked product never ran"
    held = {getattr(attn, n).weight.untyped_storage().data_ptr() for n in attn.stacked.names}
    assert len(held) == 1, "the projections' weights were copied, not rebound as views of the stack"
    monkeypatch.setattr(StackedProjections, "layer_for", lambda *a: None)  # the module tree and the decode plan
    lm._decode_plan = None  # the plan settled the stacked product at the first step: settled again without it
    separate = decode_logits()
    assert (2, sum(widths), lm.cfg.hidden_size) not in kernel_calls
    assert torch.equal(stacked, separate)
