"""The quantised weights' placement (model/placement.py): each decoder layer's quantised tensors in one buffer on
2 MiB boundaries, the answers bit for bit those of the weights where they were loaded, and the stacked projections
a view of that buffer, not a copy out of it."""

from __future__ import annotations

import mmap

import pytest
import torch
from parity import checkpoint_dir
from quant_layers import use_impls
from test_stacked import EVERY_KERNEL, NAMES, _quant_holder, _quant_impls

from dsvl2.model import allocator
from dsvl2.model.placement import _move, place_on_huge_pages
from dsvl2.model.quant import KERNEL_LAYOUT, QuantLinear, quant_layers
from dsvl2.model.stacked import StackedProjections
from dsvl2.model.weights import load_model


def _decode_logits(lm: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, lm.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = lm.new_cache(2, 16)
        lm(lm.embed(ids[:, :11]), cache)
        cache.advance(11)
        return lm.logits(lm(lm.embed(ids[:, 11:]), cache)[:, 0])


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["tiny-mha", "small-mla"])
def test_each_layer_in_one_huge_page_buffer_answering_as_before(quant_kernels_on, name):
    """Catches a layer's tensors left where they were loaded (or all layers in one buffer, which the copy would hold
    twice), a buffer not on a 2 MiB boundary, a tensor copied wrongly (the logits would move), and the stacked
    projections copied out of the buffer at the first decode step."""
    lm = load_model(checkpoint_dir(name), dtype=torch.bfloat16, quantize="int4").language
    per_layer = {}
    for i, layer in enumerate(lm.model.layers):
        tensors = [t for m in layer.modules() if isinstance(m, QuantLinear) for t in (m.qweight, m.scales)]
        assert len({_storage(t) for t in tensors}) == 1, f"layer {i}'s quantised tensors are not in one buffer"
        per_layer[i] = _storage(tensors[0])
        if hasattr(mmap, "MADV_HUGEPAGE"):
            assert min(t.data_ptr() for t in tensors) % allocator.HUGE_PAGE == 0
    assert len(set(per_layer.values())) == len(per_layer) and _storage(lm.lm_head.qweight) not in per_layer.values()
    impl = _quant_impls(4)[0]  # every product on our kernel, so that the projections stack at decode
    for m in quant_layers(lm):
        m.relayout(KERNEL_LAYOUT[4])  # (a repack: new tensors, then placed again)
    use_impls(lm, (impl, impl))
    place_on_huge_pages(lm)
    attn = lm.model.layers[0].self_attn
    layer0 = _storage(getattr(attn, attn.stacked.names[0]).qweight)
    placed = _decode_logits(lm)  # builds the stacked projections
    assert {_storage(getattr(attn, n).qweight) for n in attn.stacked.names} == {layer0}
    for m in lm.modules():  # every tensor back in an allocation of its own
        if isinstance(m, QuantLinear):
            m.qweight, m.scales = m.qweight.clone(), m.scales.clone()
    assert torch.equal(placed, _decode_logits(lm))


def test_a_stack_of_adjacent_projections_is_a_view_of_them(quant_kernels_on):
    """Catches StackedProjections copying weights that already lie one after another (placement.py's layout), and
    a view that slices them wrongly (the outputs would differ from the separate products); tensors not adjacent
    are still copied into a stack of their own."""
    impl = _quant_impls(4)[0]
    holder = _quant_holder(4)
    for m in holder.children():
        m.impls = (impl, impl)
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = [m.kernel(x, impl) for m in holder.children()]
    _move([(m._buffers, "qweight") for m in holder.children()] + [(m._buffers, "scales") for m in holder.children()])
    before = [(m.qweight.data_ptr(), m.scales.data_ptr()) for m in holder.children()]
    got = StackedProjections(*NAMES)(holder, x, EVERY_KERNEL)
    assert [(m.qweight.data_ptr(), m.scales.data_ptr()) for m in holder.children()] == before
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    apart = _quant_holder(4, seed=1)
    for m in apart.children():
        m.impls = (impl, impl)
    first = apart.q_proj.qweight.data_ptr()
    StackedProjections(*NAMES)(apart, x, EVERY_KERNEL)
    assert apart.q_proj.qweight.data_ptr() != first and len({_storage(m.qweight) for m in apart.children()}) == 1


def test_a_kernel_that_refuses_the_advice_still_gets_its_buffer(monkeypatch):
    """Catches a load that fails on a Linux built without transparent huge pages (madvise(MADV_HUGEPAGE) raises
    EINVAL there): the buffer comes back whole, writable, on its 2 MiB boundary, without the advice."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("this platform has no MADV_HUGEPAGE: the plain allocation is all there is")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", Refusing)
    buffer = allocator.huge_page_buffer(3 << 20)
    buffer.fill_(7)
    assert buffer.numel() == 3 << 20 and int(buffer[-1]) == 7 and buffer.data_ptr() % allocator.HUGE_PAGE == 0
