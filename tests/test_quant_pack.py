"""The library's load-time quantising and packing (model/csrc/quant_pack.cpp) against torch's ops they replace
(quant.quantize, quant_kernels' packers with the library out of the way): the same values, scales and bytes,
on shapes whose rows and k do not fill the layouts' blocks, ties of the rounding, zero and one-signed rows; a
weight with a NaN or an infinity is refused by name, not quantised into garbage."""

from __future__ import annotations

import pytest
import torch

from dsvl2.model import quant_kernels
from dsvl2.model.errors import WeightsError
from dsvl2.model.quant import Scheme, pack_nibbles, quantize, unpack_nibbles
from dsvl2.model.quant_checkpoint import quantize_stored

pytestmark = pytest.mark.usefixtures("quant_kernels_on")


@pytest.fixture
def torch_only(monkeypatch):
    """quant_kernels' packers on torch's ops (what they run where the library is not loaded)."""
    monkeypatch.setattr(quant_kernels, "_library_packs", lambda t: False)


def _weight(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows, then rows that test the edges: all zeros, all negative, ties of the rounding (values at
    exactly half a step of the scale the row's peak gives), magnitudes near float16's limits."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]
    w[0] = 0
    w[1] = -w[1].abs()
    w[2] = torch.arange(k) % 14 - 6.5  # half-integers, each a tie of the rounding (to the even neighbour) ...
    w[2, ::16] = 7.0  # ... where every group's peak of 7 makes int4's scale exactly 1
    w[3] = torch.arange(k) % 254 - 126.5  # likewise for int8: a peak of 127, scale 1
    w[3, ::16] = 127.0
    w[4] *= 6e3
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "k"), [(8, 96), (8, 100), (4, 256), (4, 96), (4, 80)])
def test_quantize_values_equals_torchs_quantize(dtype, bits, k):
    """Catches any difference in the scale (peak, division, clamp, bf16 rounding) or the values (division by
    the rounded scale, ties to even, clamping), per row (int8) and per group of 128, 64, 32 or 16 (int4)."""
    scheme = Scheme.named(f"int{bits}")
    w = _weight(37, k, dtype)
    want_q, want_s = quantize(w, scheme)
    got_q, got_s = quant_kernels.quantize_values(w, bits, scheme.group_for(k))
    assert got_q.dtype == torch.int8 and got_s.dtype == torch.bfloat16
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q, want_q)
    strided = torch.cat((w, w), dim=1)[:, :k]  # rows with a stride: the op reads them as torch does
    assert torch.equal(quant_kernels.quantize_values(strided, bits, scheme.group_for(k))[0], want_q)
    stored_q, stored_s = quantize_stored(w, scheme)  # the loader's and `dsvl2 quantize`'s way to it
    assert torch.equal(stored_q, want_q if bits == 8 else pack_nibbles(want_q)) and torch.equal(stored_s, want_s)


@pytest.mark.parametrize(("n", "k"), [(37, 96), (8, 100), (3, 16), (5, 7)])
def test_the_library_packs_the_bytes_torchs_ops_pack(n, k, monkeypatch):
    """Catches a misplaced row, step or nibble, or the wrong padding (zero weights: int8 0, int4 nibble 8) past
    N or K, in r4, k16r4 from values, k16r4 straight from the stored nibbles and the stored nibbles themselves
    (odd K included)."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    got = quant_kernels.r4_pack(q8), quant_kernels.k16r4_pack(q4), quant_kernels.k16r4_from_nibbles(pack_nibbles(q4), k)
    assert torch.equal(quant_kernels.nibbles_from_values(q4), pack_nibbles(q4))  # the stored layout, odd K included
    monkeypatch.setattr(quant_kernels, "_library_packs", lambda t: False)
    want_r4, want_k16 = quant_kernels.r4_pack(q8), quant_kernels.k16r4_pack(q4)
    assert torch.equal(got[0], want_r4)
    assert torch.equal(got[1], want_k16) and torch.equal(got[2], want_k16)
    assert torch.equal(unpack_nibbles(pack_nibbles(q4), k), q4)  # the stored layout the last one read


def test_int4_values_out_of_range_are_refused():
    """Catches a value outside [-8, 7] packed silently into another value's nibble."""
    for pack in (quant_kernels.k16r4_pack, quant_kernels.nibbles_from_values):
        with pytest.raises(RuntimeError, match=r"\[-8, 7\]"):
            pack(torch.tensor([[8] + [0] * 15], dtype=torch.int8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("library", [True, False])
def test_a_weight_with_a_nan_or_an_infinity_is_refused_naming_its_row(bad, library, monkeypatch):
    """Catches a non-finite weight turned into a scale of NaN / inf and values of garbage, by either path of
    quantize_stored (the library's and torch's, which the loader takes where the library is not loaded)."""
    if not library:
        monkeypatch.setattr(quant_kernels, "available", lambda *a: False)
    for scheme in (Scheme.named("int8"), Scheme.named("int4")):
        w = torch.randn(6, 256).to(torch.bfloat16)
        w[4, 200] = bad
        with pytest.raises(ValueError, match="weight row 4 holds a NaN or an infinity"):
            quantize_stored(w, scheme, values=True)


def test_loading_and_writing_name_the_tensor_they_cannot_quantise(tmp_path):
    """Catches the row's error reaching the user without the checkpoint and tensor it came from, when quantising
    while loading and in `dsvl2 quantize`'s writer."""
    import shutil

    from parity import checkpoint_dir
    from safetensors.torch import load_file, save_file

    from dsvl2.model.quant_checkpoint import write_quantized
    from dsvl2.model.weights import checkpoint_files, load_model

    copy = tmp_path / "tiny"
    shutil.copytree(checkpoint_dir("tiny-mha"), copy)
    shard = checkpoint_files(copy)[0]
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("o_proj.weight"))
    tensors[key][1, 3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"{copy}: {key}: weight row 1 holds a NaN"):
        load_model(copy, quantize="int8")
    with pytest.raises(WeightsError, match=rf"{copy}: {key}: weight row 1 holds a NaN"):
        write_quantized(copy, tmp_path / "out", Scheme.named("int4"))
    assert not (tmp_path / "out").exists()  # nothing half-written left behind
