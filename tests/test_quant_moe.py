"""The quantised MoE kernel (quant_kernels.moe, model/csrc/quant_moe.cpp): a MoE layer's routed experts in one call
compute what MoE.dispatch computes expert by expert through the same quantised products, for int8 and int4, both
activation dtypes, one token to a decode batch, odd sizes and crowded experts; MoE.forward takes it exactly where
the experts' decode products run the kernel; its weight lists follow replaced weights.

Stated tolerance against dispatch (max error relative to the largest output): float32 activations 1e-5 (the same
products, summed in another order); bf16 activations 2^-6 (dispatch rounds every product, the gating and each
expert's output to bf16, the kernel keeps them in float32 and rounds once: a few bf16 steps of the largest).
"""

from __future__ import annotations

import pytest
import torch
from moe_layers import random_moe
from quant_layers import assert_rel, quant_layer

from dsvl2.model import quant_kernels
from dsvl2.model.kernels import ENV_SWITCH
from dsvl2.model.quant import QuantLinear, Scheme

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
SHAPES = [  # (hidden, intermediate, experts, top-k, tokens); experts <= 5: every slot crowded onto the first ones
    (1280, 896, 16, 6, 1),  # Tiny's widths, one token: every expert streams its weight
    (1280, 896, 16, 6, 8),  # a decode batch: some experts several rows
    (97, 31, 5, 3, 32),  # odd sizes (int4: one group per row), crowded, the most rows the kernel takes
    (64, 48, 8, 2, 3),  # int4 groups of 64 and 16
    (33, 7, 4, 4, 1),
]


def _moe(hidden: int, inter: int, experts: int, top_k: int, scheme: str, dtype: torch.dtype, seed: int):
    """A MoE layer with random weights, its routed and shared experts' linears quantised in the kernel layouts and
    set to run the kernel."""
    moe = random_moe(hidden, inter, experts, top_k, seed, dtype)
    for expert in (*moe.experts, moe.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer, _, _ = quant_layer(getattr(expert, name).weight.float(), Scheme.named(scheme), dtype)
            layer.impls = ("kernel", "kernel")
            setattr(expert, name, layer)
    return moe


def _routing(moe, x: torch.Tensor, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = moe.gate(x)
    if experts <= 5:  # crowd every slot onto the first experts: some run many rows, the rest none
        ids = torch.arange(top_k).expand(x.shape[0], -1).contiguous()
    return ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("hidden", "inter", "experts", "top_k", "tokens"), SHAPES)
def test_moe_kernel_equals_the_experts_one_by_one(quant_kernels_on, scheme, dtype, hidden, inter, experts, top_k,
                                                  tokens):
    """Catches a wrong gather, expert, gating, group, padding or weighted sum in the one-call path."""
    moe = _moe(hidden, inter, experts, top_k, scheme, dtype, seed=tokens + hidden)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.inference_mode():
        ids, weights = _routing(moe, x, experts, top_k)
        fused = moe._quant_experts.run(moe.experts, x, ids, weights)
        one_by_one = moe.dispatch(x, ids, weights)
    assert fused is not None and fused.dtype is dtype and fused.shape == (tokens, hidden)
    assert_rel(fused, one_by_one, TOL[dtype], f"{scheme} {dtype} {hidden}x{inter} {tokens} tokens")


@pytest.mark.parametrize("impl", ["kernel_avx512", "kernel_amx"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("hidden", "inter", "experts", "top_k", "tokens"), SHAPES)
def test_moe_avx512_tiles_equal_the_experts_one_by_one(quant_avx512_on, scheme, hidden, inter, experts, top_k,
                                                       tokens, impl):
    """The one-call path on the AVX512 tiles (bf16 activations; int4 reads the gated activations rounded to bf16,
    as the bf16 model's own products do), also where the experts chose "kernel_amx" (an expert's few decode rows
    run the same tiles): catches a wrong row pointer or bf16 copy of the gathered rows."""
    if impl == "kernel_amx" and not quant_kernels.amx_supported():
        pytest.skip("this CPU lacks AMX-TILE / AMX-BF16")
    moe = _moe(hidden, inter, experts, top_k, scheme, torch.bfloat16, seed=tokens + hidden)
    for expert in moe.experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(expert, name).impls = (impl, impl)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    calls = []
    real = quant_kernels.moe
    with torch.inference_mode(), pytest.MonkeyPatch.context() as m:
        m.setattr(quant_kernels, "moe", lambda *a: calls.append(a[-1]) or real(*a))
        ids, weights = _routing(moe, x, experts, top_k)
        fused = moe._quant_experts.run(moe.experts, x, ids, weights)
        one_by_one = moe.dispatch(x, ids, weights)
    assert calls == [{"kernel_avx512": quant_kernels.AVX512, "kernel_amx": quant_kernels.AMX}[impl]]
    assert fused is not None and fused.dtype is torch.bfloat16
    assert_rel(fused, one_by_one, TOL[torch.bfloat16], f"{scheme} avx512 {hidden}x{inter} {tokens} tokens")


def test_moe_layer_takes_the_kernel_exactly_where_its_products_do(quant_kernels_on, monkeypatch):
    """One call per layer for decode-sized batches whose expert products run the kernel, and one for the shared
    experts; experts one by one for longer prefill chunks, for products chosen elsewhere, and with the kernels
    switched off."""
    moe = _moe(64, 48, 8, 2, "int8", torch.float32, seed=0)
    calls = []
    real = quant_kernels.moe
    monkeypatch.setattr(quant_kernels, "moe", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    with torch.inference_mode():
        x = torch.randn(2, 3, 64)
        fused = moe(x)
        assert calls == [6, 6]  # the routed experts, then the shared ones
        ids, weights = moe.gate(x.view(6, 64))
        expected = moe.dispatch(x.view(6, 64), ids, weights) + moe.shared_experts(x.view(6, 64))
        assert_rel(fused.view(6, 64), expected, TOL[torch.float32], "forward")
        moe(torch.randn(1, QuantLinear.DECODE_ROWS + 1, 64))  # a prefill chunk: experts one by one
        for expert in (*moe.experts, moe.shared_experts):
            for m in (expert.gate_proj, expert.up_proj, expert.down_proj):
                m.impls = ("dequant", "kernel")
        moe(x)
        for expert in (*moe.experts, moe.shared_experts):
            for m in (expert.gate_proj, expert.up_proj, expert.down_proj):
                m.impls = ("kernel", "kernel")
        monkeypatch.setenv(ENV_SWITCH, "0")
        moe(x)
    assert calls == [6, 6]


def test_moe_kernel_lists_follow_replaced_weights(quant_kernels_on):
    """The lists are built once and rebuilt when the weights are repacked (quant_choice's relayout), so the kernel
    never reads a freed or stale weight."""
    moe = _moe(64, 48, 8, 2, "int4", torch.float32, seed=1)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        moe._quant_experts.run(moe.experts, x, ids, weights)
        lists = moe._quant_experts._lists
        moe._quant_experts.run(moe.experts, x, ids, weights)
        assert moe._quant_experts._lists is lists
        for expert in moe.experts:
            for m in (expert.gate_proj, expert.up_proj, expert.down_proj):
                m.relayout("nibbles")
                m.relayout("k16r4")
        fused = moe._quant_experts.run(moe.experts, x, ids, weights)
        assert_rel(fused, moe.dispatch(x, ids, weights), TOL[torch.float32], "after relayout")
    (gate_q, _), (up_q, _), (down_q, _) = moe._quant_experts._lists
    for e, g, u, d in zip(moe.experts, gate_q, up_q, down_q, strict=True):
        assert g is e.gate_proj.qweight and u is e.up_proj.qweight and d is e.down_proj.qweight


def test_the_choice_times_an_experts_kernel_as_decode_runs_it(quant_kernels_on):
    """The routed experts and the other layers are decided apart. A routed expert's kernel is timed as the
    one-call MoE path (its three products in one call, a third each): it wins the experts' decode here although
    the product timed alone loses to torch's packed op; a dense layer of the same shape in the same model, timed
    alone, keeps torch's op and its layout."""
    from dsvl2.model import quant_choice

    model, holder = torch.nn.Module(), torch.nn.Module()
    holder.add_module("experts", torch.nn.ModuleList([_moe(64, 48, 1, 1, "int8", torch.float32, seed=2).experts[0]]))
    model.add_module("mlp", holder)
    model.add_module("dense", _moe(64, 48, 1, 1, "int8", torch.float32, seed=3).experts[0])

    def timer(fn):  # packed 1.0 per product; the kernel alone 1.5; the kernel's one call for three products 2.4
        impl = fn.__defaults__[0]
        if impl == "kernel":
            return 2.4 if fn.__name__ == "call" else 1.5
        return {"packed": 1.0, "packed_bf16": 1.2, "dequant": 2.0}[impl]

    quant_choice._decided.clear()
    decisions = quant_choice.choose(model, torch.float32, timer=timer)
    assert (decisions["experts"].decode, decisions["experts"].layout) == ("kernel", "r4")
    assert (decisions["dense"].decode, decisions["dense"].layout) == ("packed", "plain")
    expert, dense = model.mlp.experts[0].gate_proj, model.dense.gate_proj
    assert (expert.impls[0], expert.layout, dense.impls[0], dense.layout) == ("kernel", "r4", "packed", "plain")
