"""Test session setup: report how many parity fixtures were checked; shared fixtures. The code under test
is the installed `dsvl2` package (`pip install -e .`), never the folders imported by their own names."""

import pytest


def pytest_terminal_summary(terminalreporter) -> None:
    from parity import CHECKED

    if CHECKED:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(CHECKED.items()))
        terminalreporter.write_line(f"parity fixtures checked: {counts}")


@pytest.fixture(scope="module")
def processor():
    """The processor of the first parity checkpoint (all parity checkpoints share one setup)."""
    from parity import checkpoint_dir, checkpoint_names, require

    from dsvl2.model.processor import Processor

    return Processor.from_dir(checkpoint_dir(require(checkpoint_names(), "parity checkpoints")[0]))


@pytest.fixture(scope="module")
def tokenizer():
    """The parity fixtures' test tokenizer (real special tokens, synthetic vocabulary)."""
    from parity import tokenizer_dir

    from dsvl2.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A scripted FakeRuntime behind the CLI's runtime seam, in an isolated HOME and working directory."""
    from fakes import FakeRuntime, isolate, use_fake


    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    rt = FakeRuntime()
    use_fake(monkeypatch, rt)
    return rt


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Records the (M, N, K) of every product `kernels.linear` hands to the compiled kernel."""
    from dsvl2.model import kernels

    calls: list[tuple[int, ...]] = []
    real = kernels.linear_bf16

    def spy(x, w):
        calls.append((x.shape[0], *w.shape))
        return real(x, w)

    monkeypatch.setattr(kernels, "linear_bf16", spy)
    return calls


@pytest.fixture
def quant_kernels_on(monkeypatch):
    """The quantised kernels (model/quant_kernels.py) switched on and built; a skip only where this machine cannot
    run or build them."""
    from dsvl2.model import kernel_build, quant_kernels
    from dsvl2.model.kernels import ENV_SWITCH

    monkeypatch.delenv(ENV_SWITCH, raising=False)
    if not quant_kernels.cpu_supported():
        pytest.skip("this CPU lacks AVX2 / FMA / F16C")
    if problem := kernel_build.toolchain_problem():
        pytest.skip(f"cannot build the kernels here: {problem}")
    st = quant_kernels.status()
    assert st.available, f"the quantised kernels did not build or load: {st.reason}"


@pytest.fixture
def quant_avx512_on(quant_kernels_on):
    """`quant_kernels_on`, and a CPU that runs the AVX512 tiles (quant_avx512.h); a skip only where it does not."""
    from dsvl2.model import quant_kernels

    if not quant_kernels.avx512_supported():
        pytest.skip("this CPU lacks AVX512F/BW/VL/DQ or AVX512-BF16 (the AVX512 tiles)")


@pytest.fixture
def quant_amx_on(quant_avx512_on):
    """`quant_avx512_on`, and a CPU with AMX-BF16's tiles (quant_amx.h); a skip only where it has none."""
    from dsvl2.model import quant_kernels

    if not quant_kernels.amx_supported():
        pytest.skip("this CPU lacks AMX-TILE / AMX-BF16 (the quantised products' AMX path)")


@pytest.fixture
def quant_vnni_on(quant_avx512_on):
    """`quant_avx512_on`, and a CPU with AVX512-VNNI (int4's VPDPBUSD tiles, quant_vnni.h); a skip only where it
    has none."""
    from dsvl2.model import quant_kernels

    if not quant_kernels.vnni_supported():
        pytest.skip("this CPU lacks AVX512-VNNI (int4's VPDPBUSD tiles)")
