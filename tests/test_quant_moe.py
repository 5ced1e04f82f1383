"""The quantised MoE kernel (quant_kernels.moe_held, model/csrc/quant_moe.cpp): a MoE layer's routed experts in one call
compute what MoE.dispatch computes expert by expert through the same quantised products, for int8 and int4, both
activation dtypes, one token to a decode batch, odd sizes and crowded experts, and with the layer's shared experts
(twice as wide, as in the real models) joining the call, what dispatch plus the shared MLP compute; MoE.forward
takes it exactly where the experts' decode products run the kernel; the weights it holds follow replaced weights.

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
from dsvl2.model.quant import KERNEL_ISA, QuantLinear, Scheme

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
SHAPES = [  # (hidden, intermediate, experts, top-k, tokens); experts <= 5: every slot crowded onto the first ones
    (1280, 896, 16, 6, 1),  # Tiny's widths, one token: every expert streams its weight
    (1280, 896, 16, 6, 8),  # a decode batch: some experts several rows
    (97, 31, 5, 3, 32),  # odd sizes (int4: one group per row), crowded, the most rows the kernel takes
    (64, 48, 8, 2, 3),  # int4 groups of 64 and 16
    (33, 7, 4, 4, 1),
]


def _moe(hidden: int, inter: int, experts: int, top_k: int, scheme: str, dtype: torch.dtype, seed: int,
         shared: int = 1, shared_scheme: str | None = None):
    """A MoE layer with random weights (`shared` shared experts), its routed and shared experts' linears quantised
    (the shared ones in `shared_scheme`, default `scheme`) in the kernel layouts and set to run the kernel."""
    moe = random_moe(hidden, inter, experts, top_k, seed, dtype, shared)
    for expert in (*moe.experts, moe.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            named = shared_scheme if expert is moe.shared_experts and shared_scheme else scheme
            layer, _, _ = quant_layer(getattr(expert, name).weight.float(), Scheme.named(named), dtype)
            layer.impls = ("kernel", "kernel")
            setattr(expert, name, layer)
    return moe


def _routing(moe, x: torch.Tensor, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, weights = moe.gate(x)
    if experts <= 5:  # crowd every slot onto the first experts: some run many rows, the rest none
        ids = torch.arange(top_k).expand(x.shape[0], -1).contiguous()
    return ids, weights


def _shared(scheme: str, inter: int) -> int:
    """Shared experts for a layer of routed width `inter`: two (twice as wide, as in the real models), or one where
    int4's group along the wider width would differ from the routed experts' (odd widths: they could not join)."""
    int4 = Scheme.named("int4")
    return 2 if scheme == "int8" or int4.group_for(inter) == int4.group_for(2 * inter) else 1


def _run(moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, with_shared: bool
         ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The one-call path (with the shared experts where `with_shared`) and what it must equal: the routed experts one
    by one (dispatch), plus the shared MLP's own output where they joined."""
    fused = moe._quant_experts.run(moe.experts, x, ids, weights, moe.shared_experts if with_shared else None)
    expected = moe.dispatch(x, ids, weights)
    if with_shared:
        assert moe._quant_experts.shared_joined
        expected = expected.float() + moe.shared_experts(x).float()
    return fused, expected


@pytest.mark.parametrize("with_shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("hidden", "inter", "experts", "top_k", "tokens"), SHAPES)
def test_moe_kernel_equals_the_experts_one_by_one(quant_kernels_on, scheme, dtype, hidden, inter, experts, top_k,
                                                  tokens, with_shared):
    """Catches a wrong gather, expert, gating, group, padding or weighted sum in the one-call path, and with the
    shared experts (twice the routed width where int4's groups allow) a wrong slot, width or weight for them."""
    moe = _moe(hidden, inter, experts, top_k, scheme, dtype, seed=tokens + hidden, shared=_shared(scheme, inter))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.inference_mode():
        ids, weights = _routing(moe, x, experts, top_k)
        fused, expected = _run(moe, x, ids, weights, with_shared)
    assert fused is not None and fused.dtype is dtype and fused.shape == (tokens, hidden)
    assert_rel(fused, expected, TOL[dtype], f"{scheme} {dtype} {hidden}x{inter} {tokens} tokens")


@pytest.mark.parametrize("with_shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("impl", ["kernel_avx512", "kernel_amx", "kernel_vnni", "kernel_amx_vnni"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("hidden", "inter", "experts", "top_k", "tokens"), SHAPES)
def test_moe_avx512_tiles_equal_the_experts_one_by_one(quant_avx512_on, scheme, hidden, inter, experts, top_k,
                                                       tokens, impl, with_shared):
    """The one-call path on the AVX512 tiles (bf16 activations; int4 reads the gated activations rounded to bf16,
    as the bf16 model's own products do), also where the experts chose "kernel_amx" (an expert's few decode rows
    run the same tiles), and with int4's tiles on VNNI (x and the gated activations in fixed point, as the experts'
    own products take them one by one): catches a wrong row pointer, bf16 copy or fixed-point row of the gathered
    rows, and of the shared experts' wider rows where they join."""
    if "amx" in impl and not quant_kernels.amx_supported():
        pytest.skip("this CPU lacks AMX-TILE / AMX-BF16")
    if "vnni" in impl and not quant_kernels.vnni_supported():
        pytest.skip("this CPU lacks AVX512-VNNI")
    moe = _moe(hidden, inter, experts, top_k, scheme, torch.bfloat16, seed=tokens + hidden,
               shared=_shared(scheme, inter))
    for expert in (*moe.experts, moe.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(expert, name).impls = (impl, impl)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    calls = []
    real = quant_kernels.moe_held
    with torch.inference_mode(), pytest.MonkeyPatch.context() as m:
        m.setattr(quant_kernels, "moe_held", lambda *a: calls.append(a[-1]) or real(*a))
        ids, weights = _routing(moe, x, experts, top_k)
        if "vnni" in impl and scheme == "int8":  # int8 offers no VNNI impl: the experts go one by one
            assert moe._quant_experts.run(moe.experts, x, ids, weights, moe.shared_experts) is None and calls == []
            return
        fused, expected = _run(moe, x, ids, weights, with_shared)
    assert calls[0] == KERNEL_ISA[impl]
    assert fused is not None and fused.dtype is torch.bfloat16
    assert_rel(fused, expected, TOL[torch.bfloat16], f"{scheme} avx512 {hidden}x{inter} {tokens} tokens")


def test_moe_layer_takes_the_kernel_exactly_where_its_products_do(quant_kernels_on, monkeypatch):
    """One call per layer, the shared experts in it, for decode-sized batches whose expert products run the kernel;
    experts one by one for longer prefill chunks, for products chosen elsewhere, and with the kernels switched off."""
    moe = _moe(64, 48, 8, 2, "int8", torch.float32, seed=0, shared=2)
    calls = []
    real = quant_kernels.moe_held
    monkeypatch.setattr(quant_kernels, "moe_held", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    with torch.inference_mode():
        x = torch.randn(2, 3, 64)
        fused = moe(x)
        assert calls == [6]  # the routed and the shared experts together
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
    assert calls == [6]


def test_shared_experts_of_another_scheme_run_in_a_call_of_their_own(quant_kernels_on, monkeypatch):
    """Shared experts that cannot join the routed ones' call (here int4 beside int8 experts) run in a second call,
    every token to them with weight 1, and the layer's output is still routed + shared."""
    moe = _moe(64, 48, 8, 2, "int8", torch.float32, seed=4, shared=2, shared_scheme="int4")
    calls = []
    real = quant_kernels.moe_held
    monkeypatch.setattr(quant_kernels, "moe_held", lambda x, *a: calls.append(a[3]) or real(x, *a))
    with torch.inference_mode():
        x = torch.randn(5, 64)
        fused = moe(x)
        assert calls == [8, 4] and not moe._quant_experts.shared_joined
        ids, weights = moe.gate(x)
        expected = moe.dispatch(x, ids, weights) + moe.shared_experts(x)
    assert_rel(fused, expected, TOL[torch.float32], "shared apart")


def test_moe_kernel_held_weights_follow_replaced_weights(quant_kernels_on):
    """The weights the library holds for a layer (hold_experts) are taken once and again when the weights are
    repacked (quant_choice's relayout), so the kernel never reads a freed or stale weight, and the replaced ones
    are not kept alive."""
    import weakref

    moe = _moe(64, 48, 8, 2, "int4", torch.float32, seed=1)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        moe._quant_experts.run(moe.experts, x, ids, weights)
        held = moe._quant_experts._held
        moe._quant_experts.run(moe.experts, x, ids, weights)
        assert moe._quant_experts._held is held
        old = weakref.ref(moe.experts[0].gate_proj.qweight)
        for expert in moe.experts:
            for m in (expert.gate_proj, expert.up_proj, expert.down_proj):
                m.relayout("nibbles")
                m.relayout("k16r4")
        fused = moe._quant_experts.run(moe.experts, x, ids, weights)
        assert_rel(fused, moe.dispatch(x, ids, weights), TOL[torch.float32], "after relayout")
    del held
    assert old() is None, "the replaced weight is still held"
    gate_q, gate_s, up_q, _, down_q, down_s = moe._quant_experts._held.lists()
    for e, g, s, u, d, ds in zip(moe.experts, gate_q, gate_s, up_q, down_q, down_s, strict=True):
        for got, m in ((g, e.gate_proj), (u, e.up_proj), (d, e.down_proj)):
            assert got.data_ptr() == m.qweight.data_ptr() and got.shape == m.qweight.shape
        assert s.data_ptr() == e.gate_proj.scales.data_ptr() and ds.data_ptr() == e.down_proj.scales.data_ptr()


def test_moe_kernel_holds_the_shared_experts_anew_when_theirs_change(quant_kernels_on):
    """Shared experts held with the routed ones are held again when only their weights are repacked (the dense
    layers' layout choice repacks them apart from the routed experts), and a call without them holds the routed
    experts alone: catches a stale or missing shared expert in the held weights."""
    moe = _moe(64, 48, 8, 2, "int8", torch.float32, seed=5, shared=2)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        expected = moe.dispatch(x, ids, weights) + moe.shared_experts(x)
        moe._quant_experts.run(moe.experts, x, ids, weights, moe.shared_experts)
        held = moe._quant_experts._held
        assert moe._quant_experts.shared_joined and len(held.lists()[0]) == len(moe.experts) + 1
        for m in (moe.shared_experts.gate_proj, moe.shared_experts.up_proj, moe.shared_experts.down_proj):
            m.relayout("plain")
            m.relayout("r4")
        fused = moe._quant_experts.run(moe.experts, x, ids, weights, moe.shared_experts)
        assert moe._quant_experts._held is not held
        assert moe._quant_experts._held.lists()[0][-1].data_ptr() == moe.shared_experts.gate_proj.qweight.data_ptr()
        assert_rel(fused, expected, TOL[torch.float32], "after the shared experts' relayout")
        routed = moe._quant_experts.run(moe.experts, x, ids, weights)
        assert not moe._quant_experts.shared_joined and len(moe._quant_experts._held.lists()[0]) == len(moe.experts)
        assert_rel(routed, moe.dispatch(x, ids, weights), TOL[torch.float32], "routed alone")


def test_moe_kernel_refuses_held_weights_of_the_wrong_shape(quant_kernels_on):
    """The held weights are checked once per (bits, groups, width) a call asks for, not per call: an expert whose
    scales do not fit (here the last one's down scales, an expert no token is routed to) is a clear error naming it
    on the first call and on every later one (a failed check is not remembered as passed), and the same weights
    run once the call asks for what they are."""
    moe = _moe(64, 48, 4, 2, "int4", torch.float32, seed=6)
    layers = [[getattr(e, n) for e in moe.experts] for n in ("gate_proj", "up_proj", "down_proj")]
    lists = [([m.qweight for m in ms], [m.scales for m in ms]) for ms in layers]
    lists[2][1][-1] = lists[2][1][-1][:, :1]  # the last expert's down scales: one group short
    held = quant_kernels.hold_experts(*lists)
    x, ids, weights = torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 0.5)
    g, d = moe.experts[0].gate_proj.group, moe.experts[0].down_proj.group
    for _ in range(2):
        with pytest.raises(RuntimeError, match="expert 3's down scales"):
            quant_kernels.moe_held(x, ids, weights, held, 4, g, d)
    lists[2][1][-1] = moe.experts[-1].down_proj.scales
    fitting = quant_kernels.hold_experts(*lists)
    assert quant_kernels.moe_held(x, ids, weights, fitting, 4, g, d).shape == (1, 64)
    with pytest.raises(RuntimeError, match="do not divide"):  # other groups than the weights': checked again
        quant_kernels.moe_held(x, ids, weights, fitting, 4, g, 7)


def test_moe_kernel_refuses_the_handle_of_dropped_experts(quant_kernels_on):
    """Catches a handle that outlives its weights (the op reading freed memory): the op takes the held experts by a
    handle, and once Python drops the object the handle is refused with an error naming it, while a live one runs."""
    moe = _moe(64, 48, 8, 2, "int4", torch.float32, seed=1)
    x = torch.randn(1, 64)
    ids, weights = torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 0.5)
    layers = [[getattr(e, n) for e in moe.experts] for n in ("gate_proj", "up_proj", "down_proj")]
    held = quant_kernels.hold_experts(*(([m.qweight for m in ms], [m.scales for m in ms]) for ms in layers))
    g, d = moe.experts[0].gate_proj.group, moe.experts[0].down_proj.group
    live = torch.ops.dsvl2_quant.moe_held(x, ids, weights, held.handle, 4, g, d, quant_kernels.AVX2)
    assert live.shape == (1, 64)
    handle = held.handle
    del held
    with pytest.raises(RuntimeError, match=f"no experts held under handle {handle}"):
        torch.ops.dsvl2_quant.moe_held(x, ids, weights, handle, 4, g, d, quant_kernels.AVX2)


def test_the_experts_choice_times_a_decode_step_as_the_model_runs_it(quant_kernels_on, monkeypatch):
    """The routed experts and the other layers are decided apart, the experts on what a decode step runs: every
    timed call sends random tokens through each MoE layer's own gate and runs the experts it picks through the
    model's code (the quantised MoE kernel's one call per layer, else one product per expert and projection).
    The timer here charges each product and kernel call a fixed cost: per product torch's op is faster (1.0
    against the kernel's 1.5, and 1.1 a product in the kernel's one call of 3.3 for an expert's three), per decode
    step the kernel's one call per layer is, at 1 and at 8 tokens. Timed per product on one expert, as before,
    the experts took torch's op; a dense layer of the same shape in the same model, timed per product, keeps it.
    The timing leaves the experts as they were; `choose` then repacks them."""
    from dsvl2.model import quant_choice
    from dsvl2.model.quant import QuantLinear

    model = torch.nn.Module()
    model.add_module("mlp", _moe(64, 48, 8, 2, "int8", torch.float32, seed=2))
    model.add_module("dense", _moe(64, 48, 1, 1, "int8", torch.float32, seed=3).experts[0])
    runs, moe_calls, tokens_seen = [], [], set()
    run, moe_kernel = QuantLinear.run, quant_kernels.moe_held

    def counted_run(self, x, impl):
        runs.append(impl)
        return run(self, x, impl)

    def counted_moe(x, *args):
        moe_calls.append(x.shape[0])
        return moe_kernel(x, *args)

    monkeypatch.setattr(QuantLinear, "run", counted_run)
    monkeypatch.setattr(quant_kernels, "moe_held", counted_moe)
    cost = {"kernel": 1.5, "packed": 1.0, "packed_bf16": 1.2, "dequant": 2.0}

    def timer(fn):
        runs.clear(), moe_calls.clear()
        fn()
        tokens_seen.update(moe_calls)
        return sum(cost[impl] for impl in runs) + 3.3 * len(moe_calls)

    experts = [getattr(e, p) for e in model.mlp.experts for p in ("gate_proj", "up_proj", "down_proj")]
    before = [(m.layout, m.impls, m.qweight.clone()) for m in experts]
    quant_choice._decided.clear()
    decisions = quant_choice.decide(model, torch.float32, timer=timer)
    for m, (layout, impls, qweight) in zip(experts, before, strict=True):  # timed in place, restored
        assert (m.layout, m.impls) == (layout, impls) and torch.equal(m.qweight, qweight)
    assert tokens_seen == {1, 8}  # a decode step of 1 and of 8 tokens, each layer's experts in one call
    assert (decisions["experts"].decode, decisions["experts"].layout) == ("kernel", "r4")
    assert (decisions["dense"].decode, decisions["dense"].layout) == ("packed", "plain")
    assert quant_choice.choose(model, torch.float32, timer=timer) == decisions
    expert, dense = model.mlp.experts[0].gate_proj, model.dense.gate_proj
    assert (expert.impls[0], expert.layout, dense.impls[0], dense.layout) == ("kernel", "r4", "packed", "plain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("E", [1, 37, 64])
def test_combine_slots_sums_as_the_torch_combine(quant_kernels_on, dtype, E):
    """The kernel's combine of dispatch's per-expert outputs (rows in expert order, handed over tensor by tensor,
    one of them a strided view) against the torch form (un-sort, float32 batched product; its float32 sums differ
    from the kernel's fused multiply-adds by an ulp): catches a wrong slot, row, weight, stride or rounding."""
    from dsvl2.model.feedforward import _combine

    gen = torch.Generator().manual_seed(E)
    N, K = 29, 6
    order = torch.randperm(N * K, generator=gen)
    out = torch.randn(N * K, E, generator=gen).to(dtype)
    weights = torch.rand(N, K, generator=gen)
    wide = torch.randn(40, 2 * E, generator=gen).to(dtype)
    wide[:40, :E] = out[:40]
    outs = [wide[:40, :E], out[40:100], out[100:]]  # a view at row stride 2E, then two slices
    got = quant_kernels.combine_slots(outs, order, weights)
    want = _combine(out, order, weights)
    assert got.dtype is dtype and got.shape == (N, E)
    diff = (got.float() - want.float()).abs()
    assert float(diff.max()) <= (1e-6 if dtype is torch.float32 else 2**-8) * float(want.float().abs().max())
    if dtype is torch.bfloat16:  # float32 sums in another order round to the same bf16 but at rare ties
        assert float((diff == 0).float().mean()) >= 0.98
    with pytest.raises(RuntimeError, match="permutation"):
        quant_kernels.combine_slots([out], torch.zeros(N * K, dtype=torch.long), weights)
    with pytest.raises(RuntimeError, match="rows"):
        quant_kernels.combine_slots([out[:-1]], order, weights)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dispatch_of_quantised_experts_combines_in_the_kernel(monkeypatch, quant_kernels_on, scheme):
    """A quantised model's prefill path (MoE.dispatch over quantised experts, some with no tokens) combines on the
    kernel, equal to the torch combine within the bf16 output's rounding."""
    import dsvl2.model.feedforward as ff

    moe = _moe(64, 48, 8, 2, scheme, torch.bfloat16, seed=5)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    calls = []
    real = quant_kernels.combine_slots
    monkeypatch.setattr(quant_kernels, "combine_slots", lambda *a: calls.append(len(a[0])) or real(*a))
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        ids[:, 0] = 0  # expert 0 crowded; with 8 experts and 80 slots some get none
        got = moe.dispatch(x, ids, weights)
        monkeypatch.setattr(ff, "_combined_by_kernel", lambda *a: False)
        want = moe.dispatch(x, ids, weights)
    assert calls == [int((torch.bincount(ids.flatten(), minlength=8) > 0).sum())]
    assert_rel(got, want, 2**-8, f"{scheme} dispatch")


def test_vnni_down_products_of_narrower_experts_read_their_own_width(quant_vnni_on):
    """Catches the gated activations turned into fixed point over the widest expert's width for every expert: the
    VNNI tiles ran every block they were given, so a routed expert's down product (half the shared experts' width)
    read its weight and scales past its K, zeros times whatever lay there. The memory after each routed expert's down
    scales is NaN here: read, it makes the output NaN; unread, the output equals the experts one by one."""
    moe = _moe(1280, 896, 16, 6, "int4", torch.bfloat16, seed=3, shared=2)
    for expert in (*moe.experts, moe.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(expert, name).impls = ("kernel_vnni", "kernel_vnni")
    for expert in moe.experts:
        down = expert.down_proj
        poisoned = torch.full((down.scales.numel() + 4096,), float("nan"), dtype=down.scales.dtype)
        poisoned[: down.scales.numel()] = down.scales.flatten()
        down.scales = poisoned[: down.scales.numel()].view(down.scales.shape)
    for tokens in (1, 8):
        x = torch.randn(tokens, 1280, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
        with torch.inference_mode():
            ids, weights = _routing(moe, x, 16, 6)
            fused, expected = _run(moe, x, ids, weights, with_shared=True)
        assert fused is not None and torch.isfinite(fused).all(), f"{tokens} tokens: read past a routed expert's K"
        assert_rel(fused, expected, TOL[torch.bfloat16], f"int4 vnni, shared experts twice as wide, {tokens} tokens")
