"""int4's few-row tiles on AVX512-VNNI (model/csrc/quant_vnni.h, the "kernel_vnni" / "kernel_amx_vnni" impls).

They multiply x as fixed point per block of k (`quant_kernels.fixed_point` states the rounding), so the tolerance
is the bf16 one of tests/test_quant_kernels.py, per element (2^-8 of each output plus 1e-5 of the largest: the
output's one rounding to bf16 and float32 sums), against F.linear of the dequantised weight and x as
`fixed_point` rounds it; x is drawn over 2^14 of magnitudes, so that the rounding shows (checked: the same bound
against x unrounded fails somewhere). Shapes whose groups are an odd number of 16-k steps run the bf16 tiles.
"""

from __future__ import annotations

import math

import pytest
import torch
from quant_layers import assert_rel, quant_layer

from dsvl2.model import quant_kernels
from dsvl2.model.quant import Scheme, dequantize

# (N, K, int4 group): Tiny's width (blocks of 128 k), the dense down_proj's groups of 64 over K = 6848, groups of
# 32 (a block of 2 steps; 301 rows: passes of 128 weight rows and a part one), one group of all K = 96 (6 steps:
# blocks of 2), odd N; K = 48 in groups of 16 and K = 40 (one group, 3 steps) do not fit (odd steps per group): the
# bf16 tiles run them. Rows: 1-2 stream the whole K per weight block, more go block by block of x in passes of 16
# rows of x (19: two) and tiles of up to 8.
SHAPES = ((1280, 1280, 128), (33, 6848, 64), (301, 96, 32), (21, 96, 96), (20, 48, 16), (9, 40, 40))
ROWS = (1, 2, 3, 4, 5, 8, 19)
AMX_MIN_ROWS = 6  # "kernel_amx_vnni" multiplies this many rows or more on AMX's tiles (x as it is, the weights'
# q * s rounded to bf16: tests/test_quant_kernels.py's bound) where K and the groups are multiples of 32


def _block(k: int, group: int) -> int | None:
    """k per fixed-point block where the VNNI tiles run groups of `group` over K = k (None: they do not)."""
    steps = -(-k // 16)
    group_steps = steps if group == k else group // 16
    return 16 * math.gcd(group_steps, 8) if group_steps % 2 == 0 else None


def _wide_x(rows: int, k: int, seed: int) -> torch.Tensor:
    """bf16 rows whose values span 2^14 of magnitudes (so that the fixed point rounds some of them)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-10, 4, (rows, k), generator=g).float())
            ).to(torch.bfloat16)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got.double() - ref).abs()
    bound = ref.abs() * 2**-8 + 1e-5 * float(ref.abs().max())
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"{what}: {int((err > bound).sum())} outputs off, worst {worst}"


def test_fixed_point_is_exact_near_the_block_max_and_rounds_below():
    """The rounding the VNNI tiles apply to x, as stated: exact within 2^-6 of the block's largest |x|, at most
    2^-14 of it below that, half to even, denormals zero, a block with an Inf or NaN all NaN."""
    x = torch.tensor([[3.0, 3.0 / 64, -3.0 / 64, 1e-3, 2**-130, 0.0] + [0.0] * 26], dtype=torch.bfloat16)
    got = quant_kernels.fixed_point(x, 32)
    step = 2.0 ** (2 - 14)  # 3.0 is in [2, 4): e = 2
    assert got[0, :3].tolist() == x[0, :3].float().tolist()
    assert got[0, 3].item() == round(x[0, 3].item() / step) * step != x[0, 3].item()
    assert got[0, 4].item() == 0.0 and got[0, 5].item() == 0.0
    half = torch.tensor([[1.0, 2.0 ** -13 * 0.5 * 3, 2.0 ** -13 * 0.5 * 5] + [0.0] * 29], dtype=torch.bfloat16)
    assert quant_kernels.fixed_point(half, 32)[0, 1:3].tolist() == [2.0 ** -13 * 2, 2.0 ** -13 * 2]  # 1.5, 2.5 -> 2
    wide = _wide_x(4, 512, 0)
    rounded = quant_kernels.fixed_point(wide, 128)
    top = wide.float().view(4, -1, 128).abs().amax(-1, keepdim=True).expand(-1, -1, 128).reshape(4, 512)
    assert bool(((rounded - wide.float()).abs() <= top * 2**-14).all())
    nan = quant_kernels.fixed_point(torch.tensor([[1.0, float("inf")] + [0.0] * 30 + [1.0] * 32]), 32)
    assert bool(nan[0, :32].isnan().all()) and nan[0, 32:].tolist() == [1.0] * 32


@pytest.mark.parametrize(("n", "k", "group"), SHAPES, ids=[f"{n}x{k}g{g}" for n, k, g in SHAPES])
@pytest.mark.parametrize("impl", ["kernel_vnni", "kernel_amx_vnni"])
def test_vnni_tiles_equal_dequantise_then_linear_on_fixed_point_x(quant_vnni_on, n, k, group, impl):
    """Catches a wrong lane, nibble half, part shift, block scale, offset, group or tail in the VNNI tiles (and
    their fallback where the groups do not fit)."""
    if impl == "kernel_amx_vnni" and not quant_kernels.amx_supported():
        pytest.skip("this CPU lacks AMX-TILE / AMX-BF16")
    layer, q, s = quant_layer(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), Scheme(4, group),
                              torch.bfloat16)
    assert layer.group == group and layer.kernel_fits(torch.empty(1, k, dtype=torch.bfloat16), impl)
    w = dequantize(q, s).double()
    block = _block(k, group)
    for rows in ROWS:
        x = _wide_x(rows, k, rows)
        with torch.inference_mode():
            got = layer.run(x, impl)
        assert got.shape == (rows, n) and got.dtype is torch.bfloat16
        what = f"{impl} {n}x{k} g{group} rows {rows}"
        if impl == "kernel_amx_vnni" and rows >= AMX_MIN_ROWS and k % 32 == 0 and group % 32 == 0:
            assert_rel(got, x.double() @ w.t(), 2**-8 + 1e-5, what)  # AMX's tiles: test_quant_kernels' bound
            continue
        seen = quant_kernels.fixed_point(x, block) if block else x.float()
        _assert_close(got, seen.double() @ w.t(), what)
        if block and rows == 5 and n > 100:  # the bound sees the rounding: x unrounded is off somewhere
            with pytest.raises(AssertionError):
                _assert_close(got, x.double() @ w.t(), "x unrounded")


def test_vnni_impls_are_int4_only(quant_vnni_on):
    """int8 layers never offer the VNNI impls (their tiles ignore the flag: nothing to choose between)."""
    probe = torch.empty(1, 64, dtype=torch.bfloat16)
    int8, _, _ = quant_layer(torch.randn(16, 64), Scheme(8), torch.bfloat16)
    int4, _, _ = quant_layer(torch.randn(16, 64), Scheme(4, 32), torch.bfloat16)
    assert not int8.kernel_fits(probe, "kernel_vnni") and int4.kernel_fits(probe, "kernel_vnni")


def test_vnni_tiles_read_denormals_as_zero_and_spread_a_nan(quant_vnni_on):
    """The kernel's own handling of x's edge values, as quant_vnni.h states it: a bf16 denormal multiplies as zero
    (as VDPBF16PS reads it), and a block with an Inf makes every output NaN (not a finite number)."""
    layer, _, _ = quant_layer(torch.randn(16, 256, generator=torch.Generator().manual_seed(3)), Scheme(4, 128),
                              torch.bfloat16)
    x = _wide_x(1, 256, 4)
    tiny = x.clone()
    tiny[0, 5] = torch.finfo(torch.bfloat16).tiny / 4  # a denormal
    zeroed = x.clone()
    zeroed[0, 5] = 0.0
    with torch.inference_mode():
        assert torch.equal(layer.run(tiny, "kernel_vnni"), layer.run(zeroed, "kernel_vnni"))
        x[0, 200] = float("inf")
        assert bool(layer.run(x, "kernel_vnni").isnan().all())
