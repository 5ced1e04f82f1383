"""model/csrc/glue_bf16.cpp through model/kernels.py: the small per-layer operations (RMSNorm with the residual add,
rotary embedding, the KV cache's write, greedy MoE routing, a dense MLP in one call) give what the torch ops they
replace give: the copies and the rotary embedding bit for bit, the norm within one bf16 rounding, the routing the same
experts with float32-close weights. Only where the kernels build; elsewhere the model runs the torch ops these are
compared with."""

from __future__ import annotations

import pytest
import torch

from dsvl2.model import feedforward, kernels, language
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.kv_cache import KVCache

EVERY_KERNEL = Paths.uniform("kernel", "forced by the test")
BF16 = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if not kernels.available():
        pytest.skip(f"no compiled kernel on this machine ({kernels.build_error()}); the torch ops run instead")


def _bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def _within_one_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y equals ref but for the last bf16 bit of a few elements (a float32 sum taken in another order)."""
    gap = (y.float() - ref.float()).abs()
    assert (gap <= ref.float().abs() * 2**-7 + 1e-30).all(), f"worst gap {gap.max().item()}"
    assert (y != ref).float().mean() <= 0.01


@pytest.mark.parametrize("shape", [(1, 1, 1280), (3, 7, 64), (2, 5, 33), (9, 100)])
def test_rms_norm_and_its_fused_residual_add_equal_the_torch_norm(shape):
    norm = language.RMSNorm(shape[-1], 1e-6)
    norm.weight.data = _bf16(shape[-1], seed=1)
    x, delta = _bf16(*shape, seed=2, scale=3.0), _bf16(*shape, seed=3)
    with torch.inference_mode():
        ref, ref_sum = norm(x), x + delta
        ref_of_sum = norm(ref_sum)
        norm.paths = EVERY_KERNEL
        out, same = norm.residual(x, None)
        fused, total = norm.residual(x, delta)
    assert same is x
    _within_one_rounding(out, ref)
    assert torch.equal(total, ref_sum)  # the residual add: one bf16 rounding, as torch's
    _within_one_rounding(fused, ref_of_sum)


def test_the_norm_is_torchs_where_the_kernels_are_switched_off(monkeypatch):
    norm = language.RMSNorm(64, 1e-6)
    norm.weight.data = _bf16(64, seed=1)
    x = _bf16(4, 64, seed=2)
    calls = []
    real = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ref = norm(x)
        norm.paths = EVERY_KERNEL
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        assert torch.equal(norm(x), ref) and not calls
        monkeypatch.delenv(kernels.ENV_SWITCH)
        norm(x)
    assert calls == [1]


class _RopeConfig:
    rope_theta, rope_scaling_type = 10000.0, None

    def __init__(self, dim: int):
        self.rope_dim = dim


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "pair-interleaved"])
@pytest.mark.parametrize(("B", "T", "H", "D"), [(1, 1, 10, 128), (2, 9, 3, 64), (1, 4, 1, 64), (2, 3, 2, 24)])
def test_rope_equals_apply_rope_bit_for_bit(B, T, H, D, interleaved):
    cos, sin = language.Rotary(_RopeConfig(D))(torch.randint(0, 4000, (B, T)), BF16)  # (B, 1, T, D)
    x = _bf16(B, H, T, D, seed=4)  # the model's (B, H, T, D) layout; the kernel reads it as (B, T, H, D) views
    ref = language.apply_rope(language.deinterleave(x) if interleaved else x, cos, sin)
    out = kernels.rope(x.transpose(1, 2), cos, sin, interleaved=interleaved)
    assert out.shape == (B, T, H, D) and out.is_contiguous()
    assert torch.equal(out.transpose(1, 2), ref)


def _write_both_ways(monkeypatch, shapes, lengths, rows, new) -> tuple[list, list]:
    """The cache's tensors after writing `new` at the next positions of `rows` (all rows when None), by the kernel
    and by torch's indexed assignment."""
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(kernels, "store_fits", kernels.store_fits if use_kernel else lambda *a: False)
        cache = KVCache(shapes, batch=len(lengths), capacity=20, n_layers=2, dtype=BF16)
        cache._lengths = list(lengths)
        target = cache if rows is None else cache.rows(rows)
        seen = target.write(1, target.positions(new[0].shape[1]), *new)
        results.append(([buf.clone() for buf in cache.layers[1]], [s.clone() for s in seen]))
    monkeypatch.undo()
    return results[0], results[1]


def test_cache_writes_by_the_kernel_equal_indexed_assignment(monkeypatch):
    calls = []
    real = kernels.store_rows
    monkeypatch.setattr(kernels, "store_rows", lambda *a: calls.append(1) or real(*a))
    k = _bf16(3, 2, 4, 8, seed=5)
    v = _bf16(3, 4, 2, 8, seed=6).transpose(1, 2)  # heads a stride apart, as a transposed (B, H, T, D) value
    kernel, torch_ = _write_both_ways(monkeypatch, [(4, 8), (4, 8)], [3, 0, 7], None, (k, v))  # MHA, every row
    assert calls and all(torch.equal(a, b) for a, b in zip(kernel[0] + kernel[1], torch_[0] + torch_[1], strict=True))
    latent = _bf16(2, 3, 20, seed=7)
    c, pe = latent.split([16, 4], dim=-1)  # MLA's latent and rope key: views of one (B, T, C + R) tensor
    kernel, torch_ = _write_both_ways(monkeypatch, [(16,), (4,)], [5, 0, 2], [2, 0], (c, pe))  # some rows
    assert all(torch.equal(a, b) for a, b in zip(kernel[0] + kernel[1], torch_[0] + torch_[1], strict=True))


def test_cache_write_rejects_a_position_past_the_cache():
    buf = torch.zeros(1, 2, 4, 8, dtype=BF16)
    with pytest.raises(RuntimeError, match="past the cache"):
        kernels.store_rows([buf], [_bf16(1, 1, 2, 8, seed=8)], torch.tensor([0]), torch.tensor([[4]]))


@pytest.mark.parametrize(("B", "T", "H", "Hk"), [(3, 1, 4, 2), (1, 1, 10, 10), (2, 3, 6, 3)])
def test_the_one_call_attention_step_equals_rope_store_and_attend(B, T, H, Hk):
    """Catches the decode plan's one call for multi-head attention (`attend_step`) differing from the three calls
    the module makes: rope of q and k, the cache write of k and v at each row's own positions, attention over the
    first `used` slots: its output and both caches equal bit for bit (grouped and plain heads, 1 and 3 tokens)."""
    D, S = 32, 24
    q, k, v = _bf16(B, T, H, D, seed=1), _bf16(B, T, Hk, D, seed=2), _bf16(B, T, Hk, D, seed=3)
    cos, sin = _bf16(B, 1, T, D, seed=4), _bf16(B, 1, T, D, seed=5)
    positions = torch.tensor([5, 11, 0][:B])[:, None] + torch.arange(T)
    used, rows = int(positions.max()) + 1, torch.arange(B)
    fused, separate = ((_bf16(B, Hk, S, D, seed=6), _bf16(B, Hk, S, D, seed=7)) for _ in range(2))
    kernels.store_rows(separate, (kernels.rope(k, cos, sin), v), rows, positions)
    want = kernels.attend(kernels.rope(q, cos, sin).transpose(1, 2), separate[0][:, :, :used],
                          separate[1][:, :, :used], positions, 0.125)
    got = kernels.attend_step(q, k, v, cos, sin, fused, rows, positions, used, 0.125)
    assert got.shape == (B, H, T, D) and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(fused, separate, strict=True))


class _GateConfig:
    topk_method, scoring_func, n_group, topk_group = "greedy", "softmax", 1, 1
    n_routed_experts, hidden_size = 64, 96

    def __init__(self, k: int, norm: bool, scaling: float):
        self.num_experts_per_tok, self.norm_topk_prob, self.routed_scaling_factor = k, norm, scaling


@pytest.mark.parametrize(("k", "norm", "scaling"), [(6, False, 1.0), (6, True, 2.5), (1, True, 1.0)])
def test_greedy_routing_picks_the_torch_gates_experts_with_its_weights(k, norm, scaling):
    gate = feedforward.MoEGate(_GateConfig(k, norm, scaling))
    gate.weight.data = _bf16(64, 96, seed=9, scale=0.2)
    x = _bf16(11, 96, seed=10)  # a block of 8 tokens and 3 more
    with torch.inference_mode():
        ids, weights = gate(x)
        gate.paths = EVERY_KERNEL
        kernel_ids, kernel_weights = kernels.route_greedy(x, gate._float_weight(), k, norm, scaling)
        assert torch.equal(gate(x)[0], kernel_ids)  # the gate module takes the kernel for a decode's few tokens
        bf16_ids, bf16_weights = kernels.route_greedy(x, gate.weight.detach(), k, norm, scaling)
    assert torch.equal(bf16_ids, kernel_ids) and torch.equal(bf16_weights, kernel_weights)  # bf16 read as float32
    by_id, order = ids.sort(dim=-1)
    kernel_by_id, kernel_order = kernel_ids.sort(dim=-1)
    assert torch.equal(by_id, kernel_by_id)
    assert torch.allclose(weights.gather(1, order), kernel_weights.gather(1, kernel_order), rtol=1e-5, atol=1e-8)
    assert (kernel_weights[:, :-1] >= kernel_weights[:, 1:]).all()  # best first


@pytest.mark.parametrize(("hidden", "inter", "rows"), [(128, 192, 1), (64, 96, 32), (40, 24, 5)])
def test_a_dense_mlps_one_call_equals_its_three_products(monkeypatch, hidden, inter, rows):
    mlp = feedforward.MLP(hidden, inter)
    for i, layer in enumerate((mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        layer.weight.data = _bf16(*layer.weight.shape, seed=11 + i, scale=0.1)
    x = _bf16(rows, hidden, seed=14)
    calls = []
    real = kernels.moe_routed
    monkeypatch.setattr(kernels, "moe_routed", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ref = mlp(x)
        mlp.paths = EVERY_KERNEL
        out = mlp(x)
    assert calls == [1]
    _within_one_rounding(out, ref)
