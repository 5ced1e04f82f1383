"""The compiled int8 / int4 kernels (model/quant_kernels.py): products equal dequantise-then-F.linear within the
stated tolerance over row counts, odd shapes, group tails, both activation dtypes and strided inputs; the kernel
layouts round-trip and every layer layout converts to every other; the library's switch and hardware check; and a
quantised parity model greedy-decodes the same tokens on the kernel as on "dequant".

Stated tolerance, against F.linear of the same inputs in float32 on the dequantised weight (max error relative to
the largest output): float32 activations 1e-5 (sums in another order); bf16 activations 2^-8 + 1e-5 (the output
is rounded once to bf16: at most half a bf16 step, 2^-9 of the value, plus the float32 sums).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import checkpoint_dir, load_cases, parity_processor, require
from quant_agreement import run_case
from quant_layers import assert_rel, quant_layer, use_impls

from dsvl2.model import quant_kernels
from dsvl2.model.kernels import ENV_SWITCH
from dsvl2.model.quant import Scheme, dequantize, quant_layers
from dsvl2.model.weights import load_model

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8 + 1e-5}
ROWS = (1, 2, 3, 7, 8, 17, 32)
# (N, K): odd N everywhere; K = 100 is no multiple of 8 (int8 tail) nor of 16 (int4: one group of all K, a padded
# last block); 6848 is Tiny's down_proj (int4 groups of 64); 384 has groups of 128.
SHAPES = ((37, 100), (33, 6848), (65, 384))
# and for the AVX512 tiles: K = 48 has int4 groups of 16 (one step per group), 1280 is Tiny's width.
AVX512_SHAPES = (*SHAPES, (20, 48), (1280, 1280))


SUFFIX = {quant_kernels.AVX2: "", quant_kernels.AVX512: " avx512", quant_kernels.AMX: " amx"}  # by `isa`


@pytest.fixture
def kernel_calls(monkeypatch, quant_kernels_on) -> list[str]:
    """Records the scheme of every product handed to the compiled kernels."""
    calls: list[str] = []
    for name in ("int8_linear", "int4_linear"):
        real = getattr(quant_kernels, name)

        def spy(*args, real=real, name=name):
            calls.append(name + SUFFIX[args[3 if name == "int8_linear" else 4]])  # isa
            return real(*args)

        monkeypatch.setattr(quant_kernels, name, spy)
    return calls


def _layer(n: int, k: int, scheme: Scheme, dtype: torch.dtype, seed: int = 0):
    return quant_layer(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), scheme, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_kernel_equals_dequantise_then_linear(kernel_calls, name, n, k, dtype):
    """Catches a wrong nibble, group, scale, tail, row block or stride in the kernels."""
    scheme = Scheme.named(name)
    layer, q, s = _layer(n, k, scheme, dtype, seed=n)
    assert layer.layout == ("r4" if name == "int8" else "k16r4")
    w = dequantize(q, s)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.inference_mode():
            got = layer.run(x, "kernel")
        assert got.shape == (rows, n) and got.dtype is dtype
        assert_rel(got, F.linear(x.float(), w), TOL[dtype], f"{name} {n}x{k} {dtype} rows {rows}")
    assert kernel_calls == [f"{name}_linear"] * len(ROWS)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize(("n", "k"), AVX512_SHAPES, ids=[f"{n}x{k}" for n, k in AVX512_SHAPES])
def test_avx512_tiles_equal_dequantise_then_linear(quant_avx512_on, kernel_calls, name, n, k):
    """The AVX512 tiles (int4 by table lookup and bf16 dot products, from 6 rows on columns of 16 weight rows
    rearranged into pairs of k; int8 in 16-lane FMAs for one row, from two rows widened to bf16 pairs of rows on
    VDPBF16PS) on bf16 activations: catches a wrong lane, row, nibble half, pair, row pair, group scale or tail; row
    counts cover 1-8-row tiles and their mixes (13: 8 rows in pairs, 5 in 4-row tiles; 14: 8 and 6 in pairs)."""
    scheme = Scheme.named(name)
    layer, q, s = _layer(n, k, scheme, torch.bfloat16, seed=n + 1)
    w = dequantize(q, s)
    for rows in (*ROWS, 4, 5, 6, 13, 14):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.inference_mode():
            got = layer.run(x, "kernel_avx512")
        assert got.shape == (rows, n) and got.dtype is torch.bfloat16
        assert_rel(got, F.linear(x.float(), w), TOL[torch.bfloat16], f"{name} {n}x{k} avx512 rows {rows}")
    layer.scales = layer.scales.float()  # the scales as float32 too (the same tiles read either)
    for rows in (1, 3, 8):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.inference_mode():
            got = layer.run(x, "kernel_avx512")
        assert_rel(got, F.linear(x.float(), w), TOL[torch.bfloat16], f"{name} {n}x{k} float scales rows {rows}")
    assert kernel_calls == [f"{name}_linear avx512"] * (len(ROWS) + 8)
    with torch.inference_mode():  # float32 activations are not the AVX512 tiles': the AVX2 ones run them
        layer.run(torch.randn(2, k), "kernel_avx512")
    assert kernel_calls[-1] == f"{name}_linear"


# The AVX512 prefill path (quant_gemm.h) from 24 rows, K in whole 32-k steps: 6848 in chunks of 2,048 k with int4
# groups of 64, 4096 in two whole chunks, 1280 and 384 with groups of 128, 64 as one int4 group; N past whole units
# of 48 weight rows and their 16-row columns.
GEMM_SHAPES = ((33, 6848), (100, 4096), (65, 384), (20, 64), (1280, 1280))
GEMM_ROWS = (24, 25, 31, 64, 100)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize(("n", "k"), GEMM_SHAPES, ids=[f"{n}x{k}" for n, k in GEMM_SHAPES])
def test_avx512_prefill_path_equals_dequantise_then_linear(quant_avx512_on, kernel_calls, name, n, k):
    """"kernel_avx512" on many rows of bf16 activations, contiguous and at a row stride of 2K: catches a wrong pair,
    lane, weight row, unit, chunk sum, group scale, row block past a multiple of 8, stride or masked column."""
    scheme = Scheme.named(name)
    layer, q, s = _layer(n, k, scheme, torch.bfloat16, seed=n + 3)
    w = dequantize(q, s)
    wide = torch.randn(max(GEMM_ROWS), 2 * k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    for rows in GEMM_ROWS:
        for x in (wide[:rows, :k].contiguous(), wide[:rows, k:]):
            with torch.inference_mode():
                got = layer.run(x, "kernel_avx512")
            assert got.shape == (rows, n) and got.dtype is torch.bfloat16
            assert_rel(got, F.linear(x.float(), w), TOL[torch.bfloat16], f"{name} {n}x{k} rows {rows} {x.stride()}")
    assert kernel_calls == [f"{name}_linear avx512"] * (2 * len(GEMM_ROWS))


# AMX's path needs K and the int4 groups in multiples of 32: 6848 has groups of 64, 1280 and 384 of 128, 64 one
# group of 64; 100 and 48 (groups of 16) fall back to the AVX512 tiles.
AMX_SHAPES = ((33, 6848), (65, 384), (20, 64), (1280, 1280), (37, 100), (20, 48))
AMX_ROWS = (1, 5, 6, 7, 8, 16, 17, 32, 33, 100)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize(("n", "k"), AMX_SHAPES, ids=[f"{n}x{k}" for n, k in AMX_SHAPES])
def test_amx_path_equals_dequantise_then_linear(quant_amx_on, kernel_calls, name, n, k):
    """"kernel_amx" on bf16 activations: the AVX512 tiles below 6 rows, AMX's tiles from there on (one step at a
    time up to 32 rows, int8's whole strip past them; int4 group by group): catches a wrong strip row, padded
    block, tile lane, pair of x, group scale or second block of 16 rows of x."""
    scheme = Scheme.named(name)
    layer, q, s = _layer(n, k, scheme, torch.bfloat16, seed=n + 2)
    w = dequantize(q, s)
    for rows in AMX_ROWS:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.inference_mode():
            got = layer.run(x, "kernel_amx")
        assert got.shape == (rows, n) and got.dtype is torch.bfloat16
        assert_rel(got, F.linear(x.float(), w), TOL[torch.bfloat16], f"{name} {n}x{k} amx rows {rows}")
    assert kernel_calls == [f"{name}_linear amx"] * len(AMX_ROWS)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_kernel_reads_strided_inputs(quant_kernels_on, name):
    """Catches a kernel that assumes x's rows are contiguous (a slice of a wider tensor, a transposed view)."""
    layer, q, s = _layer(31, 384, Scheme.named(name), torch.float32, seed=7)
    wide = torch.randn(5, 2 * 384, generator=torch.Generator().manual_seed(8))
    w = dequantize(q, s)
    for x in (wide[:, ::2], wide[:, 384:], torch.randn(384, 5).t()):
        assert not x.is_contiguous()
        with torch.inference_mode():
            assert_rel(layer.run(x, "kernel"), F.linear(x, w), TOL[torch.float32], f"{name} strided {x.stride()}")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_avx512_decode_rows_read_in_place(quant_avx512_on, name):
    """bf16 rows of x that are already whole 16-k steps go to the AVX512 tiles where they lie (no copy): a slice of
    every other row and of the right half of a wider tensor (row strides 2K and 4K), at 1, 3 and 8 rows, and a row
    with a stride of its own. Catches a tile reading a copy's stride, or x's columns past K, on the in-place path."""
    layer, q, s = _layer(37, 384, Scheme.named(name), torch.bfloat16, seed=9)
    w = dequantize(q, s)
    wide = torch.randn(16, 2 * 384, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    for rows in (1, 3, 8):
        for x in (wide[:rows, 384:], wide[: 2 * rows : 2, :384], wide[rows, 384:].as_strided((1, 384), (5, 1))):
            with torch.inference_mode():
                got = layer.run(x, "kernel_avx512")
            assert_rel(got, F.linear(x.float(), w), TOL[torch.bfloat16], f"{name} rows {rows} stride {x.stride()}")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_empty_products(quant_kernels_on, name):
    """No input features (K = 0) gives zeros, no rows (M = 0) an empty result, in x's dtype or float32 with
    float_out, on every path the CPU has: catches a division by the zero group count or an unwritten output."""
    op = quant_kernels.int8_linear if name == "int8" else quant_kernels.int4_linear
    isas = [quant_kernels.AVX2] + ([quant_kernels.AVX512] if quant_kernels.avx512_supported() else [])
    for isa in isas:
        dtype = torch.bfloat16 if isa != quant_kernels.AVX2 else torch.float32
        for k, rows in ((0, 3), (64, 0)):
            int8 = name == "int8"
            q = torch.zeros(2, (k // 16) * (64 if int8 else 32), dtype=torch.int8 if int8 else torch.uint8)
            s = torch.ones(8) if int8 else torch.ones(8, k // 16)  # int4: groups of 16 (none where K = 0)
            args = () if int8 else (16,)
            for float_out in (False, True):
                y = op(torch.randn(rows, k).to(dtype), q, s, *args, isa, float_out)
                assert y.shape == (rows, 8) and y.dtype == (torch.float32 if float_out else dtype)
                assert not y.any(), f"{name} isa {isa} K={k} rows={rows}"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_float_out_is_the_float_of_the_result(quant_kernels_on, name):
    """The logits' path (QuantLinear.floats, the ops' float_out): float32 holding exactly the values of the product
    in x's dtype, on every path here (AVX2, AVX512, AMX where the CPU has them, torch's where no kernel runs),
    including rounding ties, outputs past bf16's range (inf), NaN and denormal outputs: catches rounding that is
    not to nearest even, NaN or denormals handled apart from c10's, or float32 sums returned unrounded."""
    layer, _, _ = _layer(37, 384, Scheme.named(name), torch.bfloat16, seed=11)
    layer.scales.fill_(2**-7)  # exact weights: integer rows of x give exact outputs, some halfway between bf16's
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(9, 384, generator=gen)
    x[1] *= 2e-38  # outputs below float32's normal range (denormals)
    x[2] *= 1e36  # outputs past bf16's range
    x[3, 5] = float("nan")
    x[4:] = torch.randint(-3, 4, (5, 384), generator=gen).float()
    x = x.to(torch.bfloat16)
    exact = F.linear(x[4:].double(), layer.weight_as(torch.float64)).float()  # float32 holds these exactly
    assert ((exact.view(torch.int32) & 0xFFFF) == 0x8000).any()  # halfway between two bf16 values
    impls = ["kernel", "dequant"] + (["kernel_avx512"] if quant_kernels.avx512_supported() else [])
    impls += ["kernel_amx"] if quant_kernels.amx_supported() else []
    denormals = 0
    for impl in impls:
        for rows in (x[:1], x[:8], x.repeat(4, 1)):  # 1 row, the several-row tiles, AMX's strips
            with torch.inference_mode():
                layer.impls = (impl, impl)
                got, want = layer.floats(rows), layer(rows).float()
            assert got.dtype is torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{name} {impl} {len(rows)}")
            if len(rows) > 1:  # (paths that read denormal x or sums as zero give zeros instead)
                denormals += int(((got[1] != 0) & (got[1].abs() < 1.17e-38)).sum())
    assert denormals > 0


@pytest.mark.parametrize("n", [1, 4, 7])
@pytest.mark.parametrize("k", [1, 16, 100, 6848])
def test_kernel_layouts_round_trip(n, k):
    """Catches a wrong nibble order, row interleave or padding in the kernels' layouts."""
    gen = torch.Generator().manual_seed(k + n)
    q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    packed = quant_kernels.k16r4_pack(q4)
    steps, blocks = (k + 15) // 16, (n + 3) // 4
    assert packed.shape == (blocks, steps * 32) and packed.dtype is torch.uint8
    assert torch.equal(quant_kernels.k16r4_unpack(packed, n, k), q4)
    lo, hi = packed & 15, packed >> 4
    for row in range(min(n, 4)):  # step 0 of block 0: row r's byte j at 8 r + j holds k = j low, k = 8 + j high
        for j in range(min(k, 8)):
            assert int(lo[0, 8 * row + j]) == int(q4[row, j]) + 8
            assert int(hi[0, 8 * row + j]) == (int(q4[row, 8 + j]) + 8 if 8 + j < k else 8)
    assert bool((packed[-1, 32 * (steps - 1) + 8 * (n % 4 or 4):32 * steps] == 0x88).all())  # padded rows: zeros
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    packed = quant_kernels.r4_pack(q8)
    assert packed.shape == (blocks, steps * 64) and packed.dtype is torch.int8
    assert torch.equal(quant_kernels.r4_unpack(packed, n, k), q8)
    for row in range(min(n, 4)):  # step 0 of block 0: row r's 16 values at 16 r
        assert torch.equal(packed[0, 16 * row:16 * row + min(k, 16)], q8[row, :16])


def test_every_layout_converts_to_every_other(quant_kernels_on):
    """Catches a relayout that loses or reorders values, or one that leaves `layout` and qweight disagreeing."""
    layer, q, s = _layer(64, 256, Scheme.named("int4"), torch.float32, seed=9)
    assert layer.layouts() == ["k16r4", "cpu", "nibbles"]
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(10))
    ref = F.linear(x, dequantize(q, s))
    for layout in ("cpu", "nibbles", "k16r4", "nibbles", "cpu", "k16r4"):
        layer.relayout(layout)
        assert layer.layout == layout and torch.equal(layer.int_weight(), q), layout
        with torch.inference_mode():
            impl = {"cpu": "packed", "k16r4": "kernel", "nibbles": "dequant"}[layout]
            assert_rel(layer.run(x, impl), ref, TOL[torch.float32], f"{impl} after relayout to {layout}")
    copy = layer.copy_as("cpu")
    assert copy.layout == "cpu" and layer.layout == "k16r4" and copy.scales is layer.scales


def test_switched_off_or_unsupported_the_layers_run_torch(monkeypatch, quant_kernels_on):
    """DSVL2_KERNELS=0 or a CPU without AVX2: no kernel layout, the "kernel" impl falls back, nothing raises."""
    for how in ("env", "cpu"):
        with monkeypatch.context() as m:
            if how == "env":
                m.setenv(ENV_SWITCH, "0")
                expected = "off"
            else:
                m.setattr(quant_kernels, "cpu_flags", lambda: frozenset({"sse2"}))
                expected = "unsupported"
            assert quant_kernels.status().state == expected and not quant_kernels.available()
            layer, q, s = _layer(64, 256, Scheme.named("int4"), torch.float32, seed=11)
            assert layer.layout == "cpu" and layer.layouts() == ["cpu", "nibbles"]
            x = torch.randn(2, 256)
            assert_rel(layer.run(x, "kernel"), F.linear(x, dequantize(q, s)), TOL[torch.float32], how)
    assert quant_kernels.available()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_parity_model_greedy_tokens_equal_on_kernel_and_dequant(kernel_calls, name):
    """A quantised tiny-mha model decodes the same greedy tokens with every product on the kernel as with every
    product dequantised (the same weights; only the product differs)."""
    directory = require([d for d in [checkpoint_dir("tiny-mha")] if d.is_dir()], "parity checkpoint tiny-mha")[0]
    case = require([c for c in load_cases() if c.name == "e_text_only"], "parity case e_text_only")[0]
    eos = parity_processor("tiny-mha").tokenizer.eos_id
    model = load_model(directory, quantize=name)
    for layer in quant_layers(model):
        layer.relayout("r4" if name == "int8" else "k16r4")
    use_impls(model, ("kernel", "kernel"))
    on_kernel = run_case(model, case, 8, eos)
    assert kernel_calls, "no product ran on the kernel"
    use_impls(model, ("dequant", "dequant"))
    calls = len(kernel_calls)
    on_dequant = run_case(model, case, 8, eos)
    assert len(kernel_calls) == calls
    same = (on_kernel[1] == on_dequant[1]).all(dim=1)
    assert bool(same.all()), f"greedy tokens differ in rows {same.logical_not().nonzero().flatten().tolist()}"
    assert_rel(on_kernel[2], on_dequant[2], 1e-4, f"{name} step logits")


def test_the_ops_refuse_an_isa_they_cannot_run(quant_kernels_on):
    """The ops check their `isa` argument before touching memory: an unknown one, or the AVX512 tiles asked for
    float32 activations (or on a CPU without AVX512-BF16), is a clear error, never a crash or a wrong result."""
    layer, _, _ = _layer(8, 64, Scheme.named("int4"), torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="isa must be 0"):
        quant_kernels.int4_linear(x, layer.qweight, layer.scales, layer.group, 3)
    expected = "bf16 activations" if quant_kernels.avx512_supported() else "lacks AVX512"
    with pytest.raises(RuntimeError, match=expected):
        quant_kernels.int4_linear(x, layer.qweight, layer.scales, layer.group, quant_kernels.AVX512)
    with pytest.raises(RuntimeError, match=expected):
        held = quant_kernels.hold_experts(*[([layer.qweight], [layer.scales])] * 3)
        quant_kernels.moe_held(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), held, 4, layer.group,
                               layer.group, quant_kernels.AVX512)
