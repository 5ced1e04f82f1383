"""Weight-only quantisation invariants on small random weights: the arithmetic (error bound, layouts that round
trip) and every product implementation equal to dequantise-then-F.linear; the per-machine choice with a fake
timer, and the runtime layout it leaves the layers in. (The compiled kernels' own invariants:
test_quant_kernels.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from quant_layers import assert_rel, quant_layer

from dsvl2.model import quant_choice, quant_kernels, torch_int4
from dsvl2.model.quant import (
    Scheme,
    cpu_int4_pack,
    cpu_int4_unpack,
    dequantize,
    pack_nibbles,
    quantize,
    unpack_nibbles,
)

# Relative max error of a product against F.linear on the dequantised weight in the same dtype: float32 products
# differ by summation order only; bf16 ones (and "packed_bf16", whose input is rounded to bf16) by bf16 rounding.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TOL_BF16_INPUT = 2e-2


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


_layer = quant_layer


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantisation_error_is_at_most_half_a_step(name):
    """Catches a wrong rounding, clamp or scale (e.g. scales not rounded to bf16 before q is computed)."""
    scheme = Scheme.named(name)
    w = _weight(64, 6848 if name == "int4" else 256)  # K = 6848: Tiny's dense down_proj, groups of 64
    q, s = quantize(w, scheme)
    assert s.dtype is torch.bfloat16 and q.dtype is torch.int8
    assert s.shape == ((64,) if name == "int8" else (64, 6848 // 64))
    step = s.float() if s.ndim == 1 else s.float().repeat_interleave(w.shape[1] // s.shape[1], dim=1)
    err = (dequantize(q, s) - w).abs() / (step if step.ndim == 2 else step[:, None])
    assert float(err.max()) <= 0.5 + 1e-3, f"worst error {float(err.max()):.3f} steps at {int(err.argmax())}"
    lo, hi = (-127, 127) if name == "int8" else (-8, 7)
    assert int(q.min()) >= lo and int(q.max()) <= hi


_CAPABILITY_PROBE = """
import torch
from dsvl2.model import torch_int4
shapes = [(n, k) for n in (32, 64, 96, 160, 1280) for k in (16, 256, 6848)]
ok = all(torch.equal(torch_int4.unpack(torch_int4.pack(q), q.shape[1]), q)
         for q in (torch.randint(-8, 8, s, dtype=torch.int8) for s in shapes))
print(torch.backends.cpu.get_cpu_capability(), torch_int4.known(), ok)
"""


@pytest.mark.parametrize("capability", ["avx2", "avx512", "default"])
def test_torch_int4_layout_is_read_back_or_left_out(capability):
    """torch packs int4 for the vector width it runs (blocks of 32 rows on AVX2, 64 on AVX512): catches reading
    one capability's layout as another's, which corrupts every weight relaid out of torch's layout. Where the
    layout is not known (no vector build), it must be left out, never read wrongly."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", _CAPABILITY_PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    ran, known, round_trips = out[0], out[1] == "True", out[2] == "True"
    if ran.startswith("AVX"):
        assert known and round_trips, f"torch's {ran} int4 layout is not read back"
    else:
        assert round_trips or not known, f"torch's {ran} int4 layout is claimed known but does not round-trip"


def test_int4_layouts_round_trip():
    """Catches a wrong nibble order (stored layout) or a wrong reading of torch's CPU layout."""
    q = torch.randint(-8, 8, (96, 256), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q), 256), q)
    assert pack_nibbles(q)[0, 0] == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)  # low nibble = even k
    assert not torch_int4.known() or torch.equal(cpu_int4_unpack(cpu_int4_pack(q), 256), q)
    odd = q[:, :255]
    assert torch.equal(unpack_nibbles(pack_nibbles(odd), 255), odd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("impl", ["packed", "packed_bf16", "dequant"])
@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_every_implementation_equals_dequantise_then_linear(name, impl, dtype, rows, strided):
    """The quantised product = F.linear on the dequantised weight, for every torch path the choice may pick (in
    the layout it reads), on contiguous and strided activations (torch's int4 op refuses non-contiguous rows; MLA's
    attention output reaches o_proj strided)."""
    scheme = Scheme.named(name)
    w = _weight(96, 384, seed=2)
    layer, q, s = _layer(w, scheme, dtype)
    kernel_layout = "r4" if name == "int8" else "k16r4"
    assert layer.layout == (kernel_layout if quant_kernels.available() else "plain" if name == "int8" else "cpu")
    layer.relayout("plain" if name == "int8" else "cpu")
    x = torch.randn(2 * rows, 384, generator=torch.Generator().manual_seed(3)).to(dtype)
    # strided: the same values column-major (dense, rows 1 apart), as MLA's attention output reaches o_proj
    x = (x.t().contiguous().t() if strided else x).view(2, rows, 384)
    assert x.is_contiguous() is not strided or rows == 1
    with torch.inference_mode():
        got = layer.run(x, impl)
        ref = F.linear(x, dequantize(q, s, dtype))
    assert got.shape == (2, rows, 96) and got.dtype is dtype
    tol = TOL_BF16_INPUT if impl == "packed_bf16" else TOL[dtype]
    assert_rel(got, ref, tol, f"{name} {impl} {dtype} rows {rows}")
    assert torch.equal(layer.int_weight(), q)


def test_a_shape_torchs_int4_op_does_not_cover_never_takes_its_layout():
    """N not a multiple of 32: no "cpu" layout; in nibbles only "dequant" runs, and "packed" falls back to it."""
    w = _weight(48, 128, seed=4)
    layer, q, s = _layer(w, Scheme.named("int4"), torch.float32)
    assert "cpu" not in layer.layouts()
    layer.relayout("nibbles")
    x = torch.randn(3, 128)
    assert quant_choice.candidates(layer, torch.float32) == ["dequant"]
    assert_rel(layer.run(x, "packed"), F.linear(x, dequantize(q, s)), TOL[torch.float32], "nibbles")


def test_the_choice_takes_the_fastest_candidate_per_row_count():
    """Catches a choice that ignores the timings, mixes up decode and prefill, or times decode at one row count
    only: "packed_bf16" is fastest at a batch of 8 but 3x slower at one row, where "packed" is close at both."""
    model = torch.nn.Sequential(torch.nn.Identity())
    layer, _, _ = _layer(_weight(64, 128, seed=5), Scheme.named("int8"), torch.float32)
    layer.relayout("plain")  # torch's candidates read it (the kernel's "r4" is timed on a copy by `choose`)
    model.add_module("proj", layer)
    speeds = {("packed", 1): 1.0, ("packed_bf16", 1): 3.0, ("dequant", 1): 2.0,
              ("packed", 8): 1.0, ("packed_bf16", 8): 0.8, ("dequant", 8): 2.0,
              ("packed", 256): 3.0, ("packed_bf16", 256): 2.0, ("dequant", 256): 1.0}

    def timer(fn):
        impl, _, rows = fn.__defaults__
        return speeds.get((impl, rows), 10.0)  # the kernel: slowest

    times = quant_choice.time_impls(layer, torch.float32, 8, timer=timer)
    assert min(times, key=times.get) == "packed_bf16"
    quant_choice._decided.clear()
    decisions = quant_choice.choose(model, torch.float32, timer=timer)
    assert list(decisions) == ["dense"] and decisions["dense"].impls_for("plain") == ("packed", "dequant")
    assert decisions["dense"].layout == "plain"
    assert layer.impls == ("packed", "dequant") and layer.layout == "plain"  # the layout the decode winner reads
    assert quant_choice.candidates(layer, torch.bfloat16) == ["packed", "dequant"]  # no cast for bf16
    if quant_kernels.available():
        wide = ["kernel_avx512"] if quant_kernels.avx512_supported() else []  # bf16 activations only
        wide += ["kernel_amx"] if quant_kernels.amx_supported() else []
        assert quant_choice.candidates(layer.copy_as("r4"), torch.bfloat16) == ["kernel", *wide, "dequant"]
        assert quant_choice.candidates(layer.copy_as("r4"), torch.float32) == ["kernel", "dequant"]


def test_dense_decode_is_timed_over_its_layers_as_a_decode_step_runs_them(monkeypatch):
    """Catches dense decode timed per product on one layer, which a cache holds (on a Zen 5 that took torch's int8
    op, 2x the bf16 model's time for those products in a real decode step): every decode timing runs one product
    through each dense layer in model order, the lm_head left out, each in the layout being timed, up to
    DENSE_STEP_BYTES of weight; prefill is timed on the largest layer; the layers are left as they were."""
    from dsvl2.model.quant import QuantLinear

    model = torch.nn.Module()
    for i, n in enumerate((64, 96, 32)):
        model.add_module(f"proj{i}", _layer(_weight(n, 128, seed=20 + i), Scheme.named("int8"), torch.float32)[0])
    model.add_module("lm_head", _layer(_weight(160, 128, seed=23), Scheme.named("int8"), torch.float32)[0])
    layers = [model.proj0, model.proj1, model.proj2]
    before = [(m.layout, m.qweight.clone()) for m in [*layers, model.lm_head]]
    ran, run = [], QuantLinear.run

    def recorded_run(self, x, impl):
        ran.append((self, self.layout, x.shape[0]))
        return run(self, x, impl)

    monkeypatch.setattr(QuantLinear, "run", recorded_run)
    calls = []

    def timer(fn):
        ran.clear()
        fn()
        calls.append((fn.__defaults__, list(ran)))
        return {"packed": 1.0, "kernel": 2.0}.get(fn.__defaults__[0], 3.0)

    quant_choice._decided.clear()
    assert quant_choice.decide(model, torch.float32, timer=timer)["dense"].decode == "packed"
    decode = [(d, r) for d, r in calls if d[2] in quant_choice.DECODE_ROWS["dense"]]
    every = {impl for layout in model.proj0.layouts()
             for impl in quant_choice.candidates(model.proj0.copy_as(layout), torch.float32)}
    assert {d[0] for d, _ in decode} == every - {"dequant"}
    for (impl, _, rows), products in decode:
        layout = products[0][1]
        assert products == [(m, layout, rows) for m in layers], f"{impl} at {rows} rows"
    assert {r[0][1] for _, r in decode} == set(model.proj0.layouts())  # every layout timed
    prefill = [r for d, r in calls if d[2] == quant_choice.PREFILL_ROWS["dense"]]
    assert prefill and all(m.out_features == 96 and len(r) == 1 for r in prefill for m, *_ in r)
    for m, (layout, qweight) in zip([*layers, model.lm_head], before, strict=True):
        assert m.layout == layout and torch.equal(m.qweight, qweight)
    monkeypatch.setattr(quant_choice, "DENSE_STEP_BYTES", model.proj0.qweight.nbytes + 1)  # proj0 and proj1
    assert list(quant_choice.representatives(model)["dense"][1]) == layers[:2]


def test_dense_decode_times_dequantising_where_nothing_else_runs(monkeypatch):
    """The other side of the rule above: where no other implementation reads the weight (int4 with N = 48, which
    torch's layout does not fit, and the kernels switched off: only "nibbles"), "dequant" is timed for decode over
    the step and chosen, not left untimed (which would leave the family without a decision)."""
    from dsvl2.model.kernels import ENV_SWITCH

    monkeypatch.setenv(ENV_SWITCH, "0")
    model = torch.nn.Module()
    model.add_module("odd", _layer(_weight(48, 256, seed=24), Scheme.named("int4"), torch.float32)[0])
    assert model.odd.layouts() == ["nibbles"]
    timed = []

    def timer(fn):
        timed.append(fn.__defaults__[0::2])
        return 1.0

    quant_choice._decided.clear()
    decision = quant_choice.decide(model, torch.float32, timer=timer)["dense"]
    assert (decision.decode, decision.prefill, decision.layout) == ("dequant", "dequant", "nibbles")
    assert sorted(timed) == [("dequant", rows) for rows in sorted({*quant_choice.DECODE_ROWS["dense"],
                                                                  quant_choice.PREFILL_ROWS["dense"]})]


def test_a_candidate_that_rounds_the_activations_must_win_by_the_margin():
    """VNNI's tiles round x to fixed point: timed within ROUNDING_MARGIN of the exact AVX512 tiles (the noise of a
    timing), the exact ones are taken, for decode and for prefill; clearly faster (a Xeon's VNNI), VNNI is. Catches
    the margin left out, applied to the exact candidates, or applied to one of the two choices only."""
    def timings(vnni_speedup: float) -> dict[str, float]:
        out = {}
        for rows in (*quant_choice.DECODE_ROWS["experts"], quant_choice.PREFILL_ROWS["experts"]):
            out[f"kernel_avx512@k16r4@{rows}"] = 1.0 * rows
            out[f"kernel_vnni@k16r4@{rows}"] = 1.0 * rows / vnni_speedup
            out[f"kernel@k16r4@{rows}"] = 3.0 * rows
        return out

    margin = quant_choice.ROUNDING_MARGIN
    near = quant_choice.from_timings(timings(1 + (margin - 1) / 2), "experts")
    assert (near.decode, near.prefill) == ("kernel_avx512", "kernel_avx512")
    clear = quant_choice.from_timings(timings(margin + 0.05), "experts")
    assert (clear.decode, clear.prefill) == ("kernel_vnni", "kernel_vnni")


def test_the_timings_are_kept_in_the_cache_directory_and_read_back(tmp_path):
    """Catches a choice timed again in every process (its timings not written, or not read back) and one that
    reuses the timings of another shape."""
    def model_of(n: int) -> torch.nn.Module:
        model = torch.nn.Module()
        model.add_module("proj", _layer(_weight(n, 128, seed=6), Scheme.named("int8"), torch.float32)[0])
        return model

    calls = []

    def timer(fn):
        calls.append(fn.__defaults__[0])
        return {"packed": 1.0, "dequant": 2.0}.get(fn.__defaults__[0], 3.0)

    quant_choice._decided.clear()
    first = quant_choice.choose(model_of(64), torch.float32, timer=timer, cache=tmp_path)
    timed = len(calls)
    assert timed and first["dense"].decode == "packed"
    files = list(tmp_path.glob(f"{quant_choice.CACHE_PREFIX}*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["timings"]) == 1
    quant_choice._decided.clear()  # as in a new process
    again = quant_choice.choose(model_of(64), torch.float32, cache=tmp_path,
                                timer=lambda fn: pytest.fail("timed again despite the cache"))
    assert again == first
    quant_choice.choose(model_of(32), torch.float32, timer=timer, cache=tmp_path)
    assert len(calls) == 2 * timed and len(json.loads(files[0].read_text())["timings"]) == 2


def _big_and_odd(seed: int) -> tuple[torch.nn.Module, tuple, tuple]:
    """A model of two int4 layers, K = 256: "big" (N = 64) and "odd" (N = 48, which torch's "cpu" layout does not
    fit), each as (layer, q, s); the in-process decisions forgotten."""
    model = torch.nn.Module()
    scheme = Scheme.named("int4")
    big = _layer(_weight(64, 256, seed=seed), scheme, torch.float32)
    odd = _layer(_weight(48, 256, seed=seed + 1), scheme, torch.float32)
    model.add_module("big", big[0])
    model.add_module("odd", odd[0])
    quant_choice._decided.clear()
    return model, big, odd


@pytest.mark.parametrize(("fastest", "layout"), [("packed", "cpu"), ("kernel", "k16r4")])
def test_the_int4_choice_leaves_every_layer_in_the_layout_it_reads(fastest, layout):
    """Catches a choice whose implementation cannot read the layers' layout (the int4 products would all fall back
    to dequantising). A layer the chosen layout does not fit (N = 48) keeps its own and still computes. ("dequant"
    is timed for decode only where nothing else runs: never faster than a product on the quantised weights.)"""
    if layout == "k16r4" and not quant_kernels.available():
        pytest.skip(f"quantised kernels unavailable: {quant_kernels.status().reason}")
    model, (big, q_big, s_big), (odd, q_odd, s_odd) = _big_and_odd(seed=12)

    def timer(fn):  # "dequant" is fastest in nibbles, slower elsewhere
        impl, reads = fn.__defaults__[0], fn.__defaults__[1].layout
        return 0.5 if impl == fastest and (impl != "dequant" or reads == "nibbles") else 1.0

    decisions = quant_choice.choose(model, torch.float32, timer=timer)
    assert decisions["dense"].decode == fastest and big.layout == layout and big.impls[0] == fastest
    assert odd.layout == (layout if layout in odd.layouts() else odd.layouts()[0])
    x = torch.randn(2, 256)
    with torch.inference_mode():
        for layer, q, s in ((big, q_big, s_big), (odd, q_odd, s_odd)):
            assert torch.equal(layer.int_weight(), q)
            assert_rel(layer(x), F.linear(x, dequantize(q, s)), TOL[torch.float32], f"{layer.layout} {layer.impls}")


def test_a_layer_that_keeps_another_layout_runs_the_fastest_timed_in_it(quant_kernels_on):
    """Catches a layer the chosen layout does not fit left with the decision's impls, which cannot read its layout
    (they fall back to the AVX2 kernel), or given one impl for decode and prefill alike: "packed" wins in "cpu"; in
    "k16r4", where the odd layer stays, the kernel was timed fastest for decode and "dequant" for prefill."""
    model, (big, _, _), (odd, q, s) = _big_and_odd(seed=14)

    def timer(fn):
        impl, layer, rows = fn.__defaults__
        if layer.layout == "cpu":
            return 0.5 if impl == "packed" else 1.0
        fastest = "dequant" if rows > max(quant_choice.DECODE_ROWS["dense"]) else "kernel"
        return 0.7 if layer.layout == "k16r4" and impl == fastest else 1.0

    decisions = quant_choice.choose(model, torch.float32, timer=timer)
    assert decisions["dense"].layout == "cpu" and big.impls == ("packed", "packed")
    assert odd.layout == "k16r4" and odd.impls == ("kernel", "dequant")
    assert ("k16r4", "kernel", "dequant") in decisions["dense"].others
    from dsvl2.model.quant import describe_paths, quant_paths

    paths = quant_paths(model)
    assert paths["families"]["dense"] == {  # what -v and the manifest show: the odd layer too
        "decode": "packed", "prefill": "packed", "layout": "cpu",
        "others": [{"decode": "kernel", "prefill": "dequant", "layout": "k16r4", "layers": 1}]}
    assert describe_paths(paths) == ("int4 products: dense decode packed, prefill packed, cpu layout (1 layer: "
                                     "decode kernel, prefill dequant, k16r4 layout)")
    x = torch.randn(2, 256)
    with torch.inference_mode():
        assert_rel(odd(x), F.linear(x, dequantize(q, s)), TOL[torch.float32], "odd layer")


def test_loading_keeps_the_timings_and_a_second_load_reads_them(monkeypatch, tmp_path):
    """Catches a loader that does not hand the choice its cache directory: the first quantised load writes the
    timings file there, a second process's load (the in-process decisions forgotten) times nothing and takes the
    same implementations and layouts."""
    from parity import checkpoint_dir

    from dsvl2.model.quant import quant_paths
    from dsvl2.model.weights import load_model

    monkeypatch.setattr(quant_choice, "cache_directory", lambda: tmp_path)
    monkeypatch.setattr(quant_choice, "_decided", {})
    first = quant_paths(load_model(checkpoint_dir("tiny-mha"), quantize="int4"))
    assert len(list(tmp_path.glob(f"{quant_choice.CACHE_PREFIX}*.json"))) == 1
    monkeypatch.setattr(quant_choice, "_decided", {})
    monkeypatch.setattr(quant_choice, "measure", lambda *a, **k: pytest.fail("timed again despite the file"))
    assert quant_paths(load_model(checkpoint_dir("tiny-mha"), quantize="int4")) == first


def test_a_layout_the_choice_changes_at_load_frees_the_weight_it_replaces(monkeypatch, quant_kernels_on, tmp_path):
    """Catches a loader that still holds the loaded tensors while the choice repacks the layers (each repacked
    weight then held twice until loading returns: +0.9 GiB measured on 4 layers of Small in int8): the choice
    takes torch's layout for every family here, and no weight loaded in the kernels' layout outlives the load."""
    import weakref

    from parity import checkpoint_dir

    from dsvl2.model.quant import quant_layers
    from dsvl2.model.weights import load_model

    loaded = []
    real_choose = quant_choice.choose

    def choose(language, dtype, **kwargs):
        loaded.extend(weakref.ref(m.qweight) for m in quant_layers(language) if m.layout == "r4")
        forced = {f: quant_choice.Decision("packed", "packed", "plain") for f in ("experts", "dense")}
        monkeypatch.setattr(quant_choice, "decide", lambda *a, **k: forced)
        decisions = real_choose(language, dtype, **kwargs)
        kept.extend(ref for ref in loaded if ref() is not None)  # still inside the load
        return decisions

    kept = []
    monkeypatch.setattr(quant_choice, "choose", choose)
    model = load_model(checkpoint_dir("tiny-mha"), quantize="int8")
    assert loaded and all(m.layout == "plain" for m in quant_layers(model))
    assert kept == []
