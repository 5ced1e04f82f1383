"""The attention kernels (model/csrc/decode_bf16.cpp's attend_bf16, latent_bf16.cpp, attention_bf16.cpp) through
model/kernels.py: decode attention over the KV cache equals the masked-matmul path, MLA's absorbed attention equals
its torch form (and each row what it gives alone), and the many-query attention of the vision tower and of prefill
stays as close to float32 as torch's own bf16 attention; positions past the cache are refused. Only where the
kernels build; elsewhere the model runs the torch forms these are compared with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_isa import AMX_OR_NOT, amx_or_skip

from dsvl2.model import kernels


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if not kernels.available():
        pytest.skip(f"no compiled kernel on this machine ({kernels.build_error()}); the torch forms run instead")


ATTEND_SHAPES = [  # (B, H, Hk, T, D, Dv, capacity, row lengths)
    (8, 10, 10, 1, 128, 128, 1200, [1000, 3, 500, 999, 0, 1, 77, 1000]),  # Tiny decode, ragged rows
    (2, 4, 2, 3, 72, 40, 50, [10, 20]),  # grouped key heads, several queries, D not a multiple of 32
    (2, 3, 1, 5, 33, 17, 9, [2, 0]),  # odd sizes, rows of different lengths
]


@pytest.mark.parametrize(("B", "H", "Hk", "T", "D", "Dv", "capacity", "lengths"), ATTEND_SHAPES)
def test_attention_kernel_equals_the_masked_matmul_path(B, H, Hk, T, D, Dv, capacity, lengths):
    """Over strided cache views (capacity > used slots), the kernel's causal attention equals language.attend with
    the causal mask: the same bf16 roundings, float32 summation order aside."""
    from dsvl2.model.language import attend, causal_mask

    torch.manual_seed(B * 100 + T)
    keys = torch.randn(B, Hk, capacity, D).to(torch.bfloat16)
    values = torch.randn(B, Hk, capacity, Dv).to(torch.bfloat16)
    q = torch.randn(B, H, T, D).to(torch.bfloat16)
    positions = torch.tensor(lengths)[:, None] + torch.arange(T)
    used = int(positions.max()) + 1
    k, v = keys[..., :used, :], values[..., :used, :]
    assert kernels.attend_fits(q, k, v) and not k.is_contiguous()
    out = kernels.attend(q, k, v, positions, 0.1)
    ref = attend(q, k, v, causal_mask(positions, torch.arange(used).expand(B, -1)), 0.1)
    diff = (out.float() - ref.float()).abs()
    assert diff.max() <= 2**-7 * ref.float().abs().max()
    assert (diff == 0).float().mean() >= 0.99


def test_attention_kernel_rejects_positions_past_the_cache():
    q, k = torch.randn(1, 2, 1, 16, dtype=torch.bfloat16), torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="position past the cache"):
        kernels.attend(q, k, k, torch.tensor([[4]]), 1.0)


ABSORBED_SHAPES = [  # (B, H, T, Dn, Dv, C, R, capacity, lengths)
    (3, 16, 1, 128, 128, 512, 64, 1200, [1150, 3, 700]),  # Small's widths, ragged rows
    (2, 5, 3, 24, 16, 40, 8, 50, [20, 0]),  # several queries, C no multiple of 64 (the tail columns)
    (5, 3, 2, 17, 9, 70, 6, 40, [33, 1, 0, 12, 37]),  # odd sizes, more rows than a block of 4
    (2, 32, 1, 128, 128, 512, 64, 300, [257, 40]),  # Base's 32 heads: two groups of 16 query rows
    (2, 7, 3, 16, 8, 45, 5, 60, [31, 2]),  # 21 query rows: a group and a part of one, odd C and R, odd slot counts
]


def _absorbed_inputs(B, H, T, Dn, Dv, C, R, capacity, lengths):
    torch.manual_seed(B * 100 + T)
    latent, rotary = torch.randn(B, capacity, C).to(torch.bfloat16), torch.randn(B, capacity, R).to(torch.bfloat16)
    q_nope = torch.randn(B, T, H, Dn).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, Dn) as the projection cuts it
    q_pe = torch.randn(B, H, T, R).to(torch.bfloat16)
    w = (torch.randn(H * (Dn + Dv), C) * C**-0.5).to(torch.bfloat16)
    positions = torch.tensor(lengths)[:, None] + torch.arange(T)
    used = int(positions.max()) + 1
    return q_nope, q_pe, latent[:, :used], rotary[:, :used], w, positions


@pytest.mark.parametrize(("B", "H", "T", "Dn", "Dv", "C", "R", "capacity", "lengths"), ABSORBED_SHAPES)
def test_absorbed_mla_kernel_equals_the_torch_form(B, H, T, Dn, Dv, C, R, capacity, lengths):
    """Over strided views of a latent cache (capacity > used slots), the absorbed-attention kernel equals
    attention.absorbed_attend: the same bf16 roundings (q_lat, each score product, the score, the probabilities, the
    latent sums, the output), float32 summation order aside; and it is as close to float32 as the torch form."""
    from dsvl2.model.attention import absorbed_attend, causal_mask

    q_nope, q_pe, c, pe, w, positions = _absorbed_inputs(B, H, T, Dn, Dv, C, R, capacity, lengths)
    assert kernels.absorbed_fits(q_nope, q_pe, c, pe, w) and not c.is_contiguous()
    scale = (Dn + R) ** -0.5
    mask = causal_mask(positions, torch.arange(c.shape[1]).expand(B, -1))
    out = kernels.absorbed(q_nope, q_pe, c, pe, w, positions, scale)
    ref = absorbed_attend(q_nope, q_pe, c, pe, w, mask, scale)
    assert out.shape == ref.shape == (B, H, T, Dv)
    diff = (out.float() - ref.float()).abs()
    assert diff.max() <= 2**-7 * ref.float().abs().max()
    assert (diff == 0).float().mean() >= 0.95
    exact = absorbed_attend(*(t.float() for t in (q_nope, q_pe, c, pe, w)), mask, scale)
    torch_error = (ref.float() - exact).abs().max()
    assert (out.float() - exact).abs().max() <= 1.5 * torch_error + 1e-6


def test_absorbed_mla_kernel_gives_each_row_what_it_gives_the_row_alone():
    """Batched = alone, exactly: every step sums each query row on its own, so a row's output cannot depend on the
    other rows of the batch (a wrong row <-> (batch, head, token) mapping would mix them)."""
    q_nope, q_pe, c, pe, w, positions = _absorbed_inputs(5, 3, 2, 17, 9, 70, 6, 40, [33, 1, 0, 12, 37])
    together = kernels.absorbed(q_nope, q_pe, c, pe, w, positions, 0.2)
    for b in range(5):
        alone = kernels.absorbed(q_nope[b : b + 1], q_pe[b : b + 1], c[b : b + 1], pe[b : b + 1], w,
                                 positions[b : b + 1], 0.2)
        assert torch.equal(alone, together[b : b + 1])


def test_absorbed_mla_kernel_rejects_positions_past_the_cache_and_a_misshapen_weight():
    q_nope, q_pe, c, pe, w, positions = _absorbed_inputs(1, 2, 1, 8, 8, 16, 4, 8, [3])
    with pytest.raises(RuntimeError, match="position past the cache"):
        kernels.absorbed(q_nope, q_pe, c, pe, w, positions + 1, 1.0)
    with pytest.raises(RuntimeError, match="kv_b_proj's weight"):
        kernels.absorbed(q_nope, q_pe, c, pe, w[:-1], positions, 1.0)


ATTENTION_SHAPES = [  # (B, H, Lq, Lk, D, Dv): SigLIP tiles (729 tokens, 72-wide heads), odd sizes, more keys
    (2, 16, 729, 729, 72, 72),
    (2, 3, 37, 37, 33, 17),
    (1, 2, 5, 40, 80, 80),
]


@AMX_OR_NOT
@pytest.mark.parametrize(("B", "H", "Lq", "Lk", "D", "Dv"), ATTENTION_SHAPES)
def test_full_attention_kernel_is_as_close_to_float32_as_torchs_bf16_attention(B, H, Lq, Lk, D, Dv, amx):
    """The vision tower's attention kernel against float32 attention, on strided views like the tower's (q, k, v
    cut from one projection): its error stays within torch's own bf16 fused attention's (about one bf16 step of
    the output); a wrong pack, tail or softmax gives errors of the order of the values themselves. Both ways of
    multiplying: AVX512's micro-kernel, and AMX's tiles on a CPU that has them."""
    amx_or_skip(amx)
    torch.manual_seed(Lq + D)
    fused = (torch.randn(B, max(Lq, Lk), 3, H, max(D, Dv)) * 1.5).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = fused[0][:, :, :Lq, :D], fused[1][:, :, :Lk, :D], fused[2][:, :, :Lk, :Dv]
    assert kernels.attention_fits(q, k, v)
    out = kernels.attention(q, k, v, D**-0.5, amx=amx)
    assert out.shape == (B, H, Lq, Dv) and out.transpose(1, 2).is_contiguous()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=D**-0.5)
    torch_error = (F.scaled_dot_product_attention(q, k, v, scale=D**-0.5).float() - ref).abs().max()
    assert (out.float() - ref).abs().max() <= 2 * torch_error + 1e-3


CAUSAL_SHAPES = [  # (B, H, Hk, T, D, Dv, capacity, row lengths before the chunk)
    (1, 10, 10, 300, 128, 128, 320, [0]),  # Tiny's prefill from an empty cache
    (2, 4, 2, 40, 72, 40, 120, [50, 3]),  # grouped key heads, a chunk continuing rows of different lengths
    (2, 3, 3, 17, 192, 128, 40, [0, 20]),  # MLA's expanded heads (192-wide keys, 128-wide values)
]


@AMX_OR_NOT
@pytest.mark.parametrize(("B", "H", "Hk", "T", "D", "Dv", "capacity", "lengths"), CAUSAL_SHAPES)
def test_causal_attention_kernel_is_as_close_to_float32_as_the_masked_path(B, H, Hk, T, D, Dv, capacity,
                                                                          lengths, amx):
    """Prefill through the kernel: over strided cache views, query (b, t) sees slots 0..position; the error
    against float32 stays within the error of the model's own bf16 path (language.attend with the causal mask).
    AVX512's micro-kernel, and AMX's tiles where present."""
    from dsvl2.model.language import attend, causal_mask

    amx_or_skip(amx)
    torch.manual_seed(T + D)
    keys = (torch.randn(B, Hk, capacity, D) * 1.5).to(torch.bfloat16)
    values = torch.randn(B, Hk, capacity, Dv).to(torch.bfloat16)
    q = (torch.randn(B, T, H, D) * 1.5).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, D) as projections give it
    positions = torch.tensor(lengths)[:, None] + torch.arange(T)
    used = int(positions.max()) + 1
    k, v = keys[..., :used, :], values[..., :used, :]
    assert kernels.attention_fits(q, k, v)
    out = kernels.attention(q, k, v, D**-0.5, positions, amx=amx)
    assert out.shape == (B, H, T, Dv)
    mask = causal_mask(positions, torch.arange(used).expand(B, -1))
    G = H // Hk
    ref = attend(q.float(), k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1), mask, D**-0.5)
    model_error = (attend(q, k, v, mask, D**-0.5).float() - ref).abs().max()
    assert (out.float() - ref).abs().max() <= 2 * model_error + 1e-3


def test_causal_attention_kernel_rejects_positions_past_the_keys():
    q = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="position past the keys"):
        kernels.attention(q, q, q, 1.0, torch.tensor([[1, 2, 3]]))
