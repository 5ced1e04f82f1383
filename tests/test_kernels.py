"""model/kernels.py: the AVX512-BF16 skinny product equals F.linear within bf16 rounding wherever it runs, and
`linear` is exactly F.linear wherever it does not (no such CPU, no compiler, failed build, switched off, or a
product it does not cover). The extension is built at most once per test session (cached on disk after)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from kernel_isa import AMX_OR_NOT, amx_or_skip
from moe_layers import random_moe

from dsvl2.model import kernels
from dsvl2.model.kernel_choice import Paths

EVERY_KERNEL = Paths.uniform("kernel", "forced by the test")  # a test of a kernel runs it whatever calibration says


def _can_build() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return kernels.cpu_supported() and shutil.which("c++") is not None and is_ninja_available()


NO_KERNEL = "no compiled kernel on this machine ({}); the F.linear fallback is tested instead"

@pytest.fixture(scope="module")
def built() -> bool:
    return kernels.available()


@pytest.fixture
def kernel(built) -> None:
    """For the tests of the compiled kernels themselves. Where none can be built here (no AVX512-BF16, compiler or
    ninja), test_availability_follows_the_machine checks that this is why, and the fallback paths are what the
    model runs (tested by the other tests here and by the whole suite)."""
    if not built:
        pytest.skip(NO_KERNEL.format(kernels.build_error()))




def assert_close_to_float32(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Catches wrong sums (K tails, odd K, M and N remainders, strides) while allowing what bf16 output must
    differ by: rounding the float32 sum to bf16 (at most 2^-8 relative) plus float32 summation order."""
    ref = F.linear(x.float(), w.float())
    bound = ref.abs() * 2**-8 + F.linear(x.float().abs(), w.float().abs()) * 1e-5 + 1e-30
    excess = (y.float() - ref).abs() / bound
    worst = int(excess.argmax())
    row, col = divmod(worst, ref.shape[-1])
    assert excess.max() <= 1, (
        f"{tuple(x.shape)} @ {tuple(w.shape)}^T: worst at y[{row}, {col}] = "
        f"{y.reshape(-1)[worst].item()} vs float32 {ref.reshape(-1)[worst].item()}"
    )


def test_availability_follows_the_machine(built):
    """On a CPU with AVX512-BF16, a compiler and ninja the kernel must build; elsewhere it must say it is not
    available, with a reason, and `linear` must be F.linear."""
    if _can_build():
        assert built, f"the kernel failed to build here: {kernels.build_error()}"
        assert kernels.build_error() is None
    else:
        assert not built and kernels.build_error()
        x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))


SHAPES = [  # (M, N, K): full tiles, every M and N remainder of the 4 x 4 tiles, K tails and odd K; on an AMX CPU
    # 2-32 rows with K a multiple of 32 take AMX's tiles for N rounded down to 16 and stream the rest (1795: 3 rows)
    (1, 896, 1280),
    (6, 1795, 1280),
    (2, 1792, 1280),
    (3, 1280, 896),
    (4, 17, 64),
    (5, 7, 31),
    (7, 130, 33),
    (8, 1795, 1283),
    (5, 67, 2600),  # few rows whose x outgrows the streamed path's L1 budget: tiles, with a K tail
    (16, 1, 1),
    (31, 9, 95),
    (32, 128, 2048),
]


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_kernel_matches_float32_reference(kernel, m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    assert_close_to_float32(kernels.linear_bf16(x, w), x, w)


@pytest.mark.parametrize("m", [1, 3, 9])  # one forward stream, a few rows streamed, tiles
def test_every_unit_runs_once_whatever_the_thread_count(kernel, m):
    """model/csrc/parallel.h: threads own contiguous shares of the units and take what is left of the others'; any
    thread count (more than the units, fewer, not dividing them) must compute every output once and alike (each
    output row is one unit's, so the result is bit for bit the one-thread result)."""
    torch.manual_seed(m)
    x = torch.randn(m, 1280, dtype=torch.bfloat16)
    w = torch.randn(1003, 1280, dtype=torch.bfloat16)  # ~20 units of ~128 KB, the last one short
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernels.linear_bf16(x, w)
        for n in (2, 3, 7, 64):
            torch.set_num_threads(n)
            assert torch.equal(kernels.linear_bf16(x, w), alone), f"{n} threads"
    finally:
        torch.set_num_threads(threads)
    assert_close_to_float32(alone, x, w)


def test_kernel_reads_strided_activations(kernel):
    torch.manual_seed(0)
    w = torch.randn(37, 300, dtype=torch.bfloat16)
    x = torch.randn(600, 6, dtype=torch.bfloat16)[::2, ::2].t()  # (3, 300), strides (2, 12)
    assert not x.is_contiguous()
    assert_close_to_float32(kernels.linear_bf16(x, w), x, w)


def test_linear_uses_the_kernel_for_skinny_bf16_products(kernel, kernel_calls):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # (B, T, K): rows are flattened
    w = torch.randn(40, 64, dtype=torch.bfloat16)
    y = kernels.linear(x, w)
    assert kernel_calls == [(6, 40, 64)]
    assert y.shape == (2, 3, 40)
    assert_close_to_float32(y.reshape(6, 40), x.reshape(6, 64), w)


def _fallback_cases() -> dict[str, tuple]:
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(24, 64, dtype=torch.bfloat16)
    return {
        "float32": (x.float(), w.float(), None),
        "too many rows": (torch.randn(kernels.MAX_ROWS + 1, 64, dtype=torch.bfloat16), w, None),
        "bias": (x, w, torch.randn(24, dtype=torch.bfloat16)),
        "strided weight": (x, torch.randn(64, 24, dtype=torch.bfloat16).t(), None),
        "empty": (x[:0], w, None),
        "needs grad": (x, w.clone().requires_grad_(), None),
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_products_the_kernel_does_not_cover_go_to_f_linear(built, kernel_calls, case):
    torch.manual_seed(2)
    x, w, bias = _fallback_cases()[case]
    assert not kernels.fits(x, w, bias)
    assert torch.equal(kernels.linear(x, w, bias), F.linear(x, w, bias))
    assert kernel_calls == []


def test_switched_off_by_parameter_or_environment(built, kernel_calls, monkeypatch):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(24, 64, dtype=torch.bfloat16)
    assert torch.equal(kernels.linear(x, w, enabled=False), F.linear(x, w))
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available()
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert kernel_calls == []


def test_the_switch_read_once_holds_for_its_forward_and_no_longer(built, monkeypatch):
    """Catches a switch snapshot that leaks: inside `switch_read_once` both libraries answer what DSVL2_KERNELS said
    on entry (the language model's forward reads it once), outside the environment is read again (a forward entered
    with the switch off running no kernel: tests/test_kernel_wiring.py)."""
    from dsvl2.model import quant_kernels

    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    with kernels.switch_read_once():
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        assert kernels.available() and not kernels.switched_off()
        assert quant_kernels.available() == quant_kernels.cpu_supported()
        with kernels.switch_read_once():  # nested: the environment as it is now
            assert not kernels.available() and not quant_kernels.available()
        assert kernels.available()
    assert not kernels.available() and not quant_kernels.available()
    monkeypatch.delenv(kernels.ENV_SWITCH)
    assert kernels.available()


def test_a_failed_build_is_recorded_not_raised(monkeypatch, tmp_path, kernel_calls):
    """A machine with the CPU flags but a broken toolchain must fall back, not crash the first decode step, and
    later processes read the recorded failure instead of building again (model/kernel_build.py)."""
    from torch.utils import cpp_extension

    from dsvl2.model import kernel_build

    loads = []

    def broken_load(*args, **kwargs):
        loads.append(1)
        raise RuntimeError("Error building extension 'dsvl2_kernels': [1/2] c++ ...\n"
                           "decode_bf16.cpp:1:1: fatal error: immintrin.h: No such file or directory")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # never touch the real cache
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr(kernel_build, "toolchain_problem", lambda: None)  # CI may lack ninja: the load is fake
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    monkeypatch.setattr(kernels.LIBRARY, "loaded", None)
    started = []
    assert not kernels.available(on_build_start=lambda: started.append(1))
    status = kernels.status()
    assert status.state == "failed" and status.compiled and started == [1] and loads == [1]
    assert "fatal error: immintrin.h" in kernels.build_error() and "\n" not in kernels.build_error()
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert kernel_calls == []
    monkeypatch.setattr(kernels.LIBRARY, "loaded", None)  # as a new process would
    again = kernels.status(on_build_start=lambda: started.append(2))
    assert again.state == "failed" and not again.compiled and started == [1] and loads == [1]
    assert "fatal error: immintrin.h" in again.reason and again.directory in again.reason


def test_status_says_why_without_building(monkeypatch):
    """Switched off or an unsupported CPU: a status with the reason, and no build is attempted."""
    from dsvl2.model import kernel_build

    monkeypatch.setattr(kernel_build, "load_library", lambda *a, **k: pytest.fail("a build was attempted"))
    monkeypatch.setattr(kernels.LIBRARY, "loaded", None)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    off = kernels.status()
    assert off.state == "off" and kernels.ENV_SWITCH in off.reason and not off.available
    assert off.reason in off.describe()
    monkeypatch.delenv(kernels.ENV_SWITCH)
    monkeypatch.setattr(kernels, "cpu_supported", lambda: False)
    unsupported = kernels.status()
    assert unsupported.state == "unsupported" and "avx512_bf16" in unsupported.reason
    assert kernels.build_error() == unsupported.reason and kernels.build_seconds() == 0.0


def _moe(hidden: int, inter: int, experts: int, top_k: int, seed: int):
    return random_moe(hidden, inter, experts, top_k, seed, torch.bfloat16)


MOE_SHAPES = [  # (hidden, intermediate, experts, top-k, tokens); experts <= 5: all slots crowded onto the first ones
    (1280, 896, 64, 6, 8),  # Tiny's layer at batch 8: one-row experts stream their weight, 2+ rows on AMX's tiles
    (1280, 896, 64, 6, 160),  # prefill-sized: experts with >= 16 rows (2 on AMX) packed, the others streamed
    (97, 31, 5, 3, 32),  # odd sizes, crowded: packed with odd K on both passes and a partial column block
    (33, 7, 4, 4, 40),
    (33, 7, 4, 4, 1),  # one token
    (64, 40, 8, 2, 3),
    (64, 96, 4, 4, 40),  # widths a multiple of 32 (AMX's tiles where present): 40 rows = a block pair and a block
    (96, 64, 3, 3, 17),  # 17 rows: a block pair whose second block has one row
]


@AMX_OR_NOT
@pytest.mark.parametrize(("hidden", "inter", "experts", "top_k", "tokens"), MOE_SHAPES)
def test_moe_kernel_equals_the_experts_one_by_one(kernel, hidden, inter, experts, top_k, tokens, amx):
    """The fused routed-expert kernel computes what MoE.dispatch does, expert by expert through F.linear: the same
    bf16 roundings, so only float32 summation order may differ (one bf16 step on a rare element). Both ways of
    multiplying the packed experts: AVX512's micro-kernel, and AMX's tiles on a CPU that has them."""
    amx_or_skip(amx)
    moe = _moe(hidden, inter, experts, top_k, seed=tokens)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        if experts <= 5:  # crowd every slot onto the first experts: some run many rows, the rest none
            ids = torch.arange(top_k).expand(tokens, -1).contiguous()
        fused = kernels.moe_routed(x, ids, weights, *moe._expert_weights(), amx=amx)
        one_by_one = moe.dispatch(x, ids, weights)
    diff = (fused.float() - one_by_one.float()).abs()
    assert diff.max() <= 2**-7 * one_by_one.float().abs().max()
    assert (diff == 0).float().mean() >= 0.99


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_moe_kernel_takes_the_experts_stacked_or_listed_alike(kernel, tokens):
    """Catches the stacked form of the experts' weights (one (X, I, E) tensor a projection, as the MoE layer hands
    them over) reading another expert's rows than the listed form: both give the same output bit for bit, and the
    layer's kernel call passes the stacks its parameters are views of; a stack of the wrong shape is refused."""
    moe = _moe(64, 40, 8, 2, seed=tokens)
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        ids, weights = moe.gate(x)
        gate, up, down = moe._kernel_weights()
        assert len(gate) == len(up) == len(down) == 1 and gate[0].shape == (8, 40, 64) and down[0].shape == (8, 64, 40)
        assert gate[0].data_ptr() == moe.experts[0].gate_proj.weight.data_ptr()
        assert down[0][7].data_ptr() == moe.experts[7].down_proj.weight.data_ptr()
        stacked = kernels.moe_routed(x, ids, weights, gate, up, down)
        listed = kernels.moe_routed(x, ids, weights, *moe._expert_weights())
        assert torch.equal(stacked, listed)
        with pytest.raises(RuntimeError, match="wrong shape"):
            kernels.moe_routed(x, ids, weights, gate, up, [down[0].transpose(1, 2).contiguous()])


def test_expert_weight_lists_follow_replaced_parameters():
    """The kernel's weight lists are built once, and rebuilt when the parameters are moved or replaced (as
    `.to()` and loading with assign=True do), so the kernel never reads stale weights."""
    moe = _moe(64, 40, 8, 2, seed=0)
    lists = moe._expert_weights()
    assert moe._expert_weights() is lists
    moe.float()
    assert all(w.dtype is torch.float32 for group in moe._expert_weights() for w in group)
    state = {k: torch.randn_like(v) for k, v in moe.state_dict().items()}
    moe.load_state_dict(state, assign=True)
    gate, up, down = moe._expert_weights()
    for e, g, u, d in zip(moe.experts, gate, up, down, strict=True):
        assert g is e.gate_proj.weight and u is e.up_proj.weight and d is e.down_proj.weight


def test_moe_layer_takes_the_kernel_only_where_it_fits(kernel, monkeypatch):
    moe = _moe(64, 40, 8, 2, seed=0)
    moe.paths = EVERY_KERNEL
    calls = []
    real = kernels.moe_routed
    monkeypatch.setattr(kernels, "moe_routed", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.inference_mode():
        decode = moe(torch.randn(2, 3, 64, dtype=torch.bfloat16))
        moe(torch.randn(1, 100, 64, dtype=torch.bfloat16))  # prefill-sized: the kernel too
        moe.float()(torch.randn(1, 4, 64))  # float32: experts one by one through F.linear
    assert calls == [6, 100]
    assert decode.shape == (2, 3, 64)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.moe_fits(torch.randn(2, 64, dtype=torch.bfloat16), moe.experts[0].down_proj.weight.bfloat16())


def test_vision_tower_carries_contiguous_activations():
    """Catches a layout regression that costs every block: the patch embedding's transpose left the activations
    channel-major, a layout each residual add keeps, so every LayerNorm made a transposing copy."""
    from parity import checkpoint_names, parity_model

    model = parity_model(checkpoint_names()[0])
    seen = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
             for block in model.vision.blocks]
    with torch.inference_mode():
        model.vision(torch.randn(1, 3, 384, 384))
    for hook in hooks:
        hook.remove()
    assert seen and all(seen)


@pytest.mark.parametrize("gelu", [True, False])
def test_fused_linear_equals_the_torch_ops(monkeypatch, gelu):
    """bf16 on CPU: one oneDNN call (bias, and GELU when asked, fused) within a bf16 step of F.linear (then
    F.gelu); float32 or switched off: exactly the torch ops."""

    def torch_ops(x, w, b):
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y

    torch.manual_seed(6)
    x, w, b = torch.randn(3, 50, 64), torch.randn(96, 64) * 0.2, torch.randn(96)
    assert torch.equal(kernels.linear_fused(x, w, b, gelu=gelu), torch_ops(x, w, b))
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    ref = torch_ops(xb.float(), wb.float(), bb.float())
    fused = kernels.linear_fused(xb, wb, bb, gelu=gelu)
    assert fused.shape == (3, 50, 96) and fused.dtype is torch.bfloat16
    assert ((fused.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-2).all()
    assert not torch.equal(fused, torch_ops(xb, wb, torch.zeros_like(bb)))  # the bias is really added
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert torch.equal(kernels.linear_fused(xb, wb, bb, gelu=gelu), torch_ops(xb, wb, bb))
