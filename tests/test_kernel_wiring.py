"""The compiled kernels wired into the model (model/kernels.py through language.py and vision.py): with every family
routed to the kernels, decode, prefill (MHA and MLA) and the vision tower give the torch path's outputs within bf16
noise, and the kernels really ran. Only where the kernels build (AVX512-BF16, a compiler, ninja); the routing itself
is tested on any CPU with fake kernels in tests/test_kernel_choice.py."""

from __future__ import annotations

import pytest
import torch

from dsvl2.model import kernels
from dsvl2.model.kernel_choice import Paths

EVERY_KERNEL = Paths.uniform("kernel", "forced by the test")  # whatever this CPU's calibration says


@pytest.fixture(scope="module")
def kernel() -> None:
    if not kernels.available():
        pytest.skip(f"no compiled kernel on this machine ({kernels.build_error()}); routing tested with fakes")




@pytest.mark.parametrize("name", ["base-noaux", "small-mla", "tiny-mha"])
def test_model_decode_through_the_kernels_equals_decode_through_f_linear(kernel, kernel_calls, monkeypatch, name):
    """Catches a wrong wiring of the kernels into the model: a bf16 decode step on each parity checkpoint gives the
    same logits (within bf16 noise) with the kernels as with F.linear and torch's attention, and the kernels (the
    fused experts, and the cache attention: MHA's, or MLA's absorbed one) really ran."""
    from parity import checkpoint_names, parity_model

    assert name in checkpoint_names()
    lm = parity_model(name, torch.bfloat16).language
    ids = torch.randint(3, lm.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    ran = []
    monkeypatch.setattr(kernels, "paths", lambda trials: EVERY_KERNEL)  # whatever this CPU's calibration says
    for op in ("moe_routed", "attend", "absorbed", "rms_norm", "rope", "store_rows", "route_greedy"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, op=op, real=real, **k: ran.append(op) or real(*a, **k))

    def decode_logits() -> torch.Tensor:
        with torch.inference_mode():
            cache = lm.new_cache(2, 16)
            lm(lm.embed(ids[:, :11]), cache)
            cache.advance(11)
            return lm.logits(lm(lm.embed(ids[:, 11:]), cache)[:, 0])

    with_kernel = decode_logits()
    assert kernel_calls, "the decode step never reached the kernel"
    assert "moe_routed" in ran
    assert ("attend" in ran) == (not lm.cfg.use_mla) and ("absorbed" in ran) == lm.cfg.use_mla
    assert {"rms_norm", "rope", "store_rows"} <= set(ran)  # the layer glue
    greedy = lm.cfg.topk_method == "greedy" and lm.cfg.scoring_func == "softmax"
    assert ("route_greedy" in ran) == greedy
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    ran.clear()
    without = decode_logits()
    assert not ran
    assert (with_kernel - without).abs().max() <= 0.05 * without.abs().max()


@pytest.mark.parametrize("name", ["small-mla", "tiny-mha"])
def test_model_prefill_through_the_kernels_equals_prefill_through_torch(kernel, monkeypatch, name):
    """Catches a wrong wiring of the prefill kernels (MLA's expanded attention over the latent cache, MHA's causal
    attention, the packed experts): a 20-token bf16 prefill continuing a 5-token one is as close to float32's
    logits as the torch path's (within bf16 noise: both round differently, so a near-tie expert can flip in one
    and not the other; compared with each other they may differ by two such flips), and the kernels ran."""
    from parity import parity_model

    lm = parity_model(name, torch.bfloat16).language
    lm32 = parity_model(name, torch.float32).language
    ids = torch.randint(3, lm.cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(7))
    ran = []
    for op in ("moe_routed", "attention"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, op=op, real=real, **k: ran.append(op) or real(*a, **k))

    def prefill_logits(paths: Paths, model=lm) -> torch.Tensor:
        monkeypatch.setattr(kernels, "paths", lambda trials: paths)
        with torch.inference_mode():
            cache = model.new_cache(2, 25)
            model(model.embed(ids[:, :5]), cache)
            cache.advance(5)
            return model.logits(model(model.embed(ids[:, 5:]), cache)).float()

    fast = prefill_logits(EVERY_KERNEL)
    assert {"moe_routed", "attention"} <= set(ran)
    ran.clear()
    naive = prefill_logits(Paths.uniform("torch", "forced by the test"))
    assert not ran
    truth = prefill_logits(Paths.uniform("torch", "forced by the test"), lm32)
    err_fast, err_naive = float((fast - truth).abs().max()), float((naive - truth).abs().max())
    assert err_fast <= max(1.5 * err_naive, 0.05 * float(truth.abs().max())), (err_fast, err_naive)
    assert (fast - naive).abs().max() <= 0.1 * naive.abs().max()


def test_vision_tower_runs_its_attention_and_fused_gelu_through_the_kernels(kernel, monkeypatch):
    """Catches a wrong wiring into the tower: a bf16 tile gives the same features (within bf16 noise) with the
    kernels as with torch's fused attention and separate GELU, and the kernels really ran."""
    from parity import checkpoint_names, parity_model

    model = parity_model(checkpoint_names()[0], torch.bfloat16)
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(5))
    ran = []
    monkeypatch.setattr(kernels, "paths", lambda trials: EVERY_KERNEL)
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a: ran.append("attention") or real(*a))
    with torch.inference_mode():
        with_kernels = model.vision(pixels)
        assert ran
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        ran.clear()
        without = model.vision(pixels)
    assert not ran
    diff = (with_kernels.float() - without.float()).abs()
    assert diff.max() <= 0.05 * without.float().abs().max()
