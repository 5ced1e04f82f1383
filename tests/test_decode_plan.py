"""The decode plan (model/decode_plan.py): a decode step with its choices settled once gives the module tree's
logits and cache bit for bit (MHA and MLA, greedy and noaux routing, bf16 / int8 / int4 on every quantised kernel
this CPU runs, staggered rows) and the engine's continuous batching the same tokens, settles every piece where every
family takes the kernels, follows weights replaced or moved and a product choice changed, calls the modules that
hooks watch, lets go of its weights for placement.py and on a move (with the other weight holders), and stays out of
the steps it does not cover. Only where the kernels build (AVX512-BF16); the module tree's own kernel wiring is
tested in tests/test_kernel_wiring.py."""

from __future__ import annotations

import pytest
import torch

from dsvl2.model import kernels, placement
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.quant import KERNEL_ISA, KERNEL_LAYOUT, QuantLinear

EVERY_KERNEL = Paths.uniform("kernel", "forced by the test")
LENGTHS = (5, 9, 2)  # the rows' prompt lengths: staggered, so each row reads its own span of the cache


@pytest.fixture(scope="module")
def kernel() -> None:
    if not kernels.available():
        pytest.skip(f"no compiled kernel on this machine ({kernels.build_error()})")


@pytest.fixture
def every_kernel(kernel, monkeypatch) -> None:
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(kernels, "paths", lambda trials=None: EVERY_KERNEL)  # whatever the calibration says


def _fresh(name: str, quantize: str = "none"):
    """A model of its own (the tests below change its weights; the session's parity models are read-only)."""
    from parity import checkpoint_dir

    from dsvl2.model.weights import load_model

    return load_model(checkpoint_dir(name), dtype=torch.bfloat16, quantize=quantize).language


def _prefilled(lm, rows: int = len(LENGTHS)):
    """A cache of `rows` rows, each holding its own prompt (LENGTHS), prefilled row by row."""
    cache = lm.new_cache(rows, 40)
    for row, n in enumerate(LENGTHS[:rows]):
        ids = torch.randint(3, lm.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(row))
        view = cache.rows([row])
        lm(lm.embed(ids), view)
        view.advance(n)
    return cache


def _tree(lm, x: torch.Tensor, cache) -> torch.Tensor:
    """The module tree's decode step, without the plan."""
    with kernels.switch_read_once():
        return lm.model(x, cache.positions(x.shape[1]), cache)


def _compare(lm, steps: int = 4, rows: int = len(LENGTHS), between=None) -> None:
    """`steps` decode steps through the model (the plan) and through the module tree from equal caches: logits and
    every cache buffer equal bit for bit at every step. `between(step)` runs before each step after the first."""
    with torch.inference_mode():
        planned, tree = _prefilled(lm, rows), _prefilled(lm, rows)
        tok = torch.randint(3, lm.cfg.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(7))
        for step in range(steps):
            if step and between is not None:
                between(step)
            x = lm.embed(tok)
            got = lm.logits(lm(x, planned)[:, 0])
            assert lm._decode_plan is not None, "the step did not run the plan"
            want = lm.logits(_tree(lm, x, tree)[:, 0])
            assert torch.equal(got, want), f"step {step}: the plan's logits differ from the module tree's"
            for a, b in zip(planned.layers, tree.layers, strict=True):
                assert all(torch.equal(p, t) for p, t in zip(a, b, strict=True)), f"step {step}: caches differ"
            planned.advance(1)
            tree.advance(1)
            tok = got.argmax(-1, keepdim=True)


@pytest.mark.parametrize(("name", "modules"), [("tiny-mha", set()), ("small-mla", set()),
                                               ("base-noaux", {"MoEGate"})])
def test_plan_equals_the_module_tree_in_bf16(every_kernel, name, modules):
    """Catches a settled piece that computes anything else than its module (a shape, a stride, a rounding, another
    op or weight): MHA and MLA (absorbed), dense and MoE layers, shared experts, 1 and 3 staggered rows. Every piece
    runs a kernel except noaux routing's gate (Base), which calls its module."""
    from parity import parity_model

    lm = parity_model(name, torch.bfloat16).language
    for rows in (1, 3):
        _compare(lm, rows=rows)
    assert set(lm._decode_plan.unsettled) == modules


def _quant_impls(lm) -> list[str]:
    """The kernel impls this CPU runs for `lm`'s scheme, its quantised layers relaid out for the kernels."""
    for m in lm.modules():
        if isinstance(m, QuantLinear):
            m.relayout(KERNEL_LAYOUT[m.scheme.bits])
    probe = next(m for m in lm.modules() if isinstance(m, QuantLinear))
    x = torch.zeros(1, probe.in_features, dtype=torch.bfloat16)
    return [impl for impl in KERNEL_ISA if probe.kernel_fits(x, impl)]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-mha", "small-mla"])
def test_plan_equals_the_module_tree_quantised(every_kernel, quant_kernels_on, name, scheme):
    """Catches a settled quantised product, stacked projection or held-experts call that differs from the module
    tree's: every kernel impl this CPU runs, all settled (the shared experts join the routed call)."""
    lm = _fresh(name, scheme)
    impls = _quant_impls(lm)
    assert impls, "no quantised kernel runs here"
    for impl in impls:
        for m in lm.modules():
            if isinstance(m, QuantLinear):
                m.impls = (impl, impl)
        _compare(lm, steps=3)
        assert set(lm._decode_plan.unsettled) <= {"MoEGate"}, f"{impl}: {lm._decode_plan.unsettled}"


def test_plan_follows_weights_replaced_and_choices_changed(every_kernel, quant_kernels_on):
    """Catches a plan that goes stale: between steps a norm's data is rebound (as `.to()` does), an expert stack's
    parameter rebound, a projection's quantised weight replaced and another product choice taken; each next step
    equals the module tree's, which reads the weights as they are."""
    lm = _fresh("tiny-mha")
    layers = lm.model.layers

    def change(step: int) -> None:
        if step == 1:
            norm = layers[1].input_layernorm.weight
            norm.data = norm.detach() * 1.5
        elif step == 2:
            gate = layers[1].mlp.experts[0].gate_proj.weight
            gate.data = -gate.detach().clone()
        elif step == 3:
            q = layers[0].self_attn.q_proj.weight
            q.data = q.detach().flip(0).contiguous()

    _compare(lm, steps=4, between=change)
    quantised = _fresh("tiny-mha", "int4")
    impls = _quant_impls(quantised)
    for m in quantised.modules():
        if isinstance(m, QuantLinear):
            m.impls = (impls[0], impls[0])
    layers = quantised.model.layers
    o_proj, donor = layers[1].self_attn.o_proj, layers[0].self_attn.o_proj
    probe = torch.randn(2, o_proj.in_features).to(torch.bfloat16)
    assert not torch.equal(o_proj.run(probe, "dequant"), o_proj.run(probe, impls[0])), "a change the test cannot see"
    experts = layers[2].mlp.experts

    def change_quantised(step: int) -> None:
        if step == 1:
            o_proj.qweight, o_proj.scales = donor.qweight.clone(), donor.scales.clone()
        elif step == 2:
            for layer in layers:
                layer.self_attn.o_proj.impls = ("dequant", "dequant")
        elif step == 3:  # the last expert's down projection: what the held experts are checked by
            last, other = experts[-1].down_proj, experts[0].down_proj
            last.qweight, last.scales = other.qweight.clone(), other.scales.clone()

    _compare(quantised, steps=4, between=change_quantised)


def test_placement_takes_the_weights_from_the_plan(every_kernel, quant_kernels_on):
    """Catches a plan that keeps the weights placement.py moves (twice their memory until the next step): placing
    them releases the plan, and the next step makes a new one over the moved weights, equal to the module tree."""
    lm = _fresh("tiny-mha", "int8")
    _compare(lm, steps=1)
    plan = lm._decode_plan
    placement.place_on_huge_pages(lm)
    assert plan.released and not plan.layers
    _compare(lm, steps=2)
    assert lm._decode_plan is not plan


def test_plan_stays_out_of_steps_it_does_not_cover(kernel, monkeypatch):
    """Catches the plan running where it would not compute the module tree's step: float32 weights, autograd on,
    more than one new token, a cache of some rows only, and the kernels switched off (DSVL2_KERNELS=0)."""
    monkeypatch.setattr(kernels, "paths", lambda trials=None: EVERY_KERNEL)
    lm = _fresh("tiny-mha")
    x = lm.embed(torch.tensor([[5, 6], [7, 8]]))  # (2, 2, E)
    one = x[:, :1]
    with torch.no_grad():
        cache = lm.new_cache(2, 16)
        lm(x, cache)  # two new tokens a row: prefill
        cache.advance(2)
        lm(one[:1], cache.rows([0]))  # some rows
    with torch.enable_grad():
        lm(one, cache)
    assert lm._decode_plan is None
    with torch.no_grad():
        lm(one, cache)
        assert lm._decode_plan is not None
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        lm(one, cache)
    assert lm._decode_plan is None, "a plan ran with the kernels switched off"
    floats = _fresh("tiny-mha").float()
    with torch.no_grad():
        floats(floats.embed(torch.tensor([[5]])), floats.new_cache(1, 4))
    assert floats._decode_plan is None


def test_plan_calls_the_modules_that_hooks_watch(every_kernel):
    """Catches a plan that runs past a hook or a wrapped forward the module tree would call: with a forward hook on
    a gate, a pre-hook on a layer and a wrapped attention forward, each decode step calls each of them once (the
    rest stays settled, the logits equal the tree's); registered after the plan was made they are seen at the next
    step; a hook on the decoder itself has it called whole; once removed the plan settles those pieces again."""
    lm = _fresh("tiny-mha")
    _compare(lm, steps=1)
    assert lm._decode_plan.unsettled == []
    layers, seen = lm.model.layers, []
    gate_hook = layers[1].mlp.gate.register_forward_hook(lambda m, args, out: seen.append("gate"))
    layer_hook = layers[2].register_forward_pre_hook(lambda m, args: seen.append("layer"))
    attention = layers[0].self_attn
    attention.forward = lambda *a, forward=attention.forward: seen.append("attention") or forward(*a)
    with torch.inference_mode():
        cache = _prefilled(lm, 2)
        seen.clear()
        lm(lm.embed(torch.tensor([[5], [6]])), cache)
    assert sorted(seen) == ["attention", "gate", "layer"]
    assert sorted(lm._decode_plan.unsettled) == ["DecoderLayer", "MHAttention", "MoEGate"]
    _compare(lm, steps=2)
    gate_hook.remove(), layer_hook.remove()
    del attention.forward
    decoder_hook = lm.model.register_forward_hook(lambda m, args, out: seen.append("decoder"))
    seen.clear()
    with torch.inference_mode():
        lm(lm.embed(torch.tensor([[5], [6]])), cache)
    assert seen == ["decoder"] and lm._decode_plan.unsettled == ["Decoder"]
    decoder_hook.remove()
    _compare(lm, steps=1)
    assert lm._decode_plan.unsettled == []
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: called.append(type(m).__name__))
    try:
        with torch.inference_mode():
            lm(lm.embed(torch.tensor([[5], [6]])), cache)
    finally:
        handle.remove()
    assert called.count("DecoderLayer") == len(layers) and "MoEGate" in called, "a global hook went unseen"



def test_a_move_frees_what_the_holders_held(every_kernel, quant_kernels_on):
    """Catches a holder that keeps the weights it bound after the model's tensors move (`.to()`, `.float()`: a model
    moved to a GPU would keep its CPU weights for good): the decode plan, the stacked projections, the MoE layers'
    lists of stacks and the quantised experts held by the library let go of them, and the old tensors are freed."""
    import gc
    import weakref

    for scheme in ("none", "int4"):
        lm = _fresh("tiny-mha", scheme)
        if scheme == "int4":
            impl = _quant_impls(lm)[0]
            for m in lm.modules():
                if isinstance(m, QuantLinear):
                    m.impls = (impl, impl)
        _compare(lm, steps=1)
        attn, moe = lm.model.layers[0].self_attn, lm.model.layers[1].mlp
        held = [lm._decode_plan, attn.stacked._layer]
        if scheme == "int4":  # a scale the library holds (`.float()` replaces the scales, not the integer weights)
            held.append(moe._quant_experts._held.lists()[1][0])
        else:
            held += [*moe._kernel_args[1][0], *moe._stacked._stacks]
        refs = [weakref.ref(h) for h in held if h is not None]
        assert len(refs) >= 3, f"{scheme}: the holders held nothing to test"
        del held
        lm.float()
        gc.collect()
        assert all(r() is None for r in refs), f"{scheme}: weights still held after the move"


@pytest.mark.parametrize("name", ["tiny-mha", "small-mla"])
def test_engine_through_the_plan_answers_as_through_the_module_tree(every_kernel, monkeypatch, name):
    """Catches a plan that breaks in the engine's own decode (rows joining and leaving, idle rows with a zero input,
    a cache grown between steps): continuous batching over image and text requests of staggered budgets gives the
    same tokens with the plan as with the module tree (the plan switched off), and the plan ran."""
    from parity import checkpoint_dir, parity_processor
    from test_engine_step import text_request
    from test_invariants import page_requests

    from dsvl2.model import decode_plan
    from dsvl2.model.engine import Engine
    from dsvl2.model.weights import load_model

    vl = load_model(checkpoint_dir(name), dtype=torch.bfloat16)
    requests = [*page_requests(3), text_request("t0", 5, 9), text_request("t1", 30, 3), text_request("t2", 12, 14)]

    def answers() -> dict[str, list[int]]:
        engine = Engine(vl, parity_processor(name), max_batch_size=3)
        return {c.id: list(c.token_ids) for c in engine.generate(requests)}

    planned = answers()
    assert vl.language._decode_plan is not None, "the engine's decode did not run the plan"
    monkeypatch.setattr(decode_plan, "usable", lambda embeds, cache: False)
    assert answers() == planned


def test_a_copied_model_makes_its_own_plan(every_kernel):
    """Catches a deep copy that keeps the original's plan, whose calls are bound to the original's tensors: the copy's
    norm weights scaled in place (their addresses unchanged), its decode equals its own module tree's."""
    import copy

    lm = _fresh("tiny-mha")
    _compare(lm, steps=1)
    twin = copy.deepcopy(lm)
    assert twin._decode_plan is None
    with torch.no_grad():
        for layer in twin.model.layers:
            layer.post_attention_layernorm.weight.mul_(1.5)
    _compare(twin, steps=2)
