"""The routed experts on torch's grouped product (MoE.grouped, the torch path for float experts on the CPU and, in
bf16, on a GPU) against MoE.dispatch (one expert at a time, which reads its per-expert counts back to the host):
the same outputs, the weights held once (the experts' parameters become views of the stacks), and stacks that
follow new weights. The grouped product is exactly F.linear's on the CPU; the stated tolerance (max error relative
to the largest output) is 1e-6 in float32 and 2^-8 in bf16, room for a summation order only."""

from __future__ import annotations

import pytest
import torch
from moe_layers import random_moe
from quant_layers import assert_rel

from dsvl2.model.feedforward import grouped_fits

TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 3, 8, 37])
@torch.inference_mode()
def test_the_grouped_product_computes_what_dispatch_does(dtype, tokens):
    """Catches a grouped path that sends a token slot to another expert's block or back to another slot (the
    block ends, the sort, the unsort), or weighs the experts wrongly: any token count, experts left without
    tokens (12 experts, top 2) and, below, every token on the same two experts."""
    moe = random_moe(48, 40, 12, 2, seed=tokens, dtype=dtype)
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    ids, weights = moe.gate(x)
    assert grouped_fits(x, moe.experts[0].down_proj.weight)
    assert_rel(moe.grouped(x, ids, weights), moe.dispatch(x, ids, weights), TOL[dtype], f"{tokens} tokens")
    crowded = torch.tensor([[5, 2]]).expand(tokens, 2).contiguous()
    assert_rel(moe.grouped(x, crowded, weights), moe.dispatch(x, crowded, weights), TOL[dtype], "crowded")


@torch.inference_mode()
def test_the_stacks_hold_the_weights_once_and_follow_new_ones():
    """Catches stacks that copy the experts' weights (twice the memory of the largest part of the model) and stale
    stacks that keep multiplying by the weights a load replaced."""
    moe = random_moe(32, 24, 6, 2, seed=1, dtype=torch.float32)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    ids, weights = moe.gate(x)
    moe.grouped(x, ids, weights)
    gate, up, down = moe._stacked.get(moe.experts)
    for stack, name in zip((gate, up, down), ("gate_proj", "up_proj", "down_proj"), strict=True):
        for e, expert in enumerate(moe.experts):
            w = getattr(expert, name).weight
            assert w.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr(), (name, e)
            assert torch.equal(w, stack[e])
    new = {k: torch.randn_like(v) for k, v in moe.state_dict().items()}
    moe.load_state_dict(new, assign=True)
    assert_rel(moe.grouped(x, ids, weights), moe.dispatch(x, ids, weights), TOL[torch.float32], "new weights")
    assert moe._stacked.get(moe.experts)[0].data_ptr() != gate.data_ptr()


def test_the_moe_layer_takes_the_grouped_path_for_float_experts(monkeypatch):
    """Catches a forward that still runs the experts one by one (reading counts back) where the grouped product
    applies, and one whose output changed by taking it."""
    moe = random_moe(32, 24, 6, 2, seed=3, dtype=torch.float32)
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = moe(x)
        monkeypatch.setattr(type(moe), "dispatch", lambda *a: pytest.fail("dispatch ran"))
        assert_rel(moe(x), expected, TOL[torch.float32], "forward")


def test_what_the_grouped_product_does_not_take():
    w = torch.zeros(8, 16)
    assert not grouped_fits(torch.zeros(2, 16, dtype=torch.float16), w.half())  # not on the CPU's list
    assert not grouped_fits(torch.zeros(2, 16), w.bfloat16())  # mixed dtypes
    meta = torch.zeros(2, 16, dtype=torch.bfloat16, device="meta")
    assert grouped_fits(meta, w.bfloat16().to("meta"))
    assert not grouped_fits(meta.float(), w.to("meta"))  # off the CPU only bf16
    assert not grouped_fits(meta[:, :12], torch.zeros(8, 12, dtype=torch.bfloat16, device="meta"))  # 24-byte rows


def test_a_loaded_models_experts_are_their_stacks_already():
    """Catches a loader that leaves the routed experts' weights apart: the first grouped product would then copy
    every layer's experts into stacks (~1 s per real-width Tiny layer in float32 on 2 cores)."""
    from parity import checkpoint_dir

    from dsvl2.model.language import MoE
    from dsvl2.model.weights import load_model

    model = load_model(checkpoint_dir("tiny-mha"))
    moes = [layer.mlp for layer in model.language.model.layers if isinstance(layer.mlp, MoE)]
    assert moes
    for moe in moes:
        before = [[getattr(e, name).weight.data_ptr() for e in moe.experts] for name in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
        stacks = moe._stacked.get(moe.experts)
        after = [[getattr(e, name).weight.data_ptr() for e in moe.experts] for name in ("gate_proj", "up_proj",
                                                                                         "down_proj")]
        assert after == before and [s.data_ptr() for s in stacks] == [ptrs[0] for ptrs in before]


@torch.inference_mode()
def test_experts_that_cannot_share_one_stack_run_one_by_one():
    """Catches stacking parameters of two kinds (inference tensors and not), which would corrupt those whose data
    cannot become a view of the stack: the layer keeps its weights as they are and runs dispatch's products."""
    with torch.inference_mode(False):
        moe = random_moe(32, 24, 6, 2, seed=5, dtype=torch.float32)
    moe.experts[2].up_proj.weight = torch.nn.Parameter(moe.experts[2].up_proj.weight.clone(), requires_grad=False)
    assert moe.experts[2].up_proj.weight.is_inference() and not moe.experts[0].up_proj.weight.is_inference()
    before = [e.up_proj.weight.data_ptr() for e in moe.experts]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(6))
    ids, weights = moe.gate(x)
    assert moe._stacked.get(moe.experts) is None
    assert_rel(moe.grouped(x, ids, weights), moe.dispatch(x, ids, weights), TOL[torch.float32], "mixed")
    assert [e.up_proj.weight.data_ptr() for e in moe.experts] == before
