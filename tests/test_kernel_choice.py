"""model/kernel_choice.py and the model's routing by it, without the compiled kernels: fake CPU features, fake
timers and injected trials decide; a cached calibration is honoured and a corrupt one re-measured; DSVL2_KERNELS=0
wins; and the language model sends each family where its `Paths` says (fake kernels that compute the reference
math stand in for the compiled ones, so "kernel path = torch path" holds on any CPU)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from dsvl2.model import kernel_calibration, kernel_choice, kernels
from dsvl2.model.attention import attend, causal_mask
from dsvl2.model.kernel_build import KernelStatus
from dsvl2.model.kernel_choice import FAMILIES, GEMM_BOUND, Machine, Paths, Trial, decide

ZEN4 = Machine("AMD EPYC 9004", frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}), 16)
SAPPHIRE = Machine("Intel Xeon 8480", ZEN4.flags | {"amx_tile", "amx_bf16"}, 16)
AVX2 = Machine("AMD EPYC", frozenset({"avx2"}), 2)
LOADED = KernelStatus("loaded", directory="unused")


def timed(kernel_s: float, torch_s: float) -> tuple[Trial, Callable[[Callable[[], object]], float]]:
    """A trial whose kernel call takes `kernel_s` and torch call `torch_s` by the fake timer returned beside it
    (which times any such trial, and counts its calls)."""

    def build():
        return (lambda: kernel_s), (lambda: torch_s)

    def timer(fn):
        timer.calls += 1
        return fn()

    timer.calls = 0
    return Trial("M8 64x64", build), timer


def never_built() -> Trial:
    return Trial("M8 64x64", lambda: pytest.fail("a trial was timed where the features decide"))


def test_without_avx512_bf16_every_family_is_torch_and_nothing_is_timed():
    paths = decide({f: never_built() for f in FAMILIES}, machine=AVX2, status=LOADED, cache=None)
    assert all(r.use == "torch" and r.reason == "cpu: no avx512_bf16" for r in paths.routes)
    assert not any(paths.kernel(f) for f in FAMILIES)


def test_switched_off_wins_over_every_feature_and_timing():
    off = KernelStatus("off", reason="switched off by DSVL2_KERNELS=0")
    paths = decide({f: never_built() for f in FAMILIES}, machine=SAPPHIRE, status=off, cache=None)
    assert all(r.use == "torch" and "DSVL2_KERNELS=0" in r.reason for r in paths.routes)


def test_environment_switch_reaches_the_process_choice(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    trials = {f: never_built() for f in FAMILIES}
    assert not any(kernels.paths(trials).kernel(f) for f in FAMILIES)
    assert all("switched off" in r.reason for r in kernels.paths().routes)


def test_amx_keeps_gemm_bound_families_on_torch_unless_the_kernel_clearly_wins(tmp_path):
    uncalibrated = decide({}, machine=SAPPHIRE, status=LOADED, cache=None)
    for family in FAMILIES:
        assert uncalibrated.kernel(family) == (family not in GEMM_BOUND)
    assert uncalibrated.route("prefill_experts").reason == "amx"
    slightly, timer = timed(kernel_s=1.0, torch_s=1.1)  # faster, but within AMX_MARGIN
    paths = decide({"prefill_experts": slightly, "decode_experts": slightly}, machine=SAPPHIRE, status=LOADED,
                   cache=None, timer=timer)
    assert not paths.kernel("prefill_experts") and paths.route("prefill_experts").reason.startswith("amx")
    assert paths.kernel("decode_experts")  # not GEMM-bound: any win counts
    clearly, timer = timed(kernel_s=1.0, torch_s=2.0)
    paths = decide({"vision_gemm": clearly}, machine=SAPPHIRE, status=LOADED, cache=None, timer=timer)
    assert paths.kernel("vision_gemm") and paths.route("vision_gemm").reason == "amx, calibrated 2.00x"


def test_calibration_picks_the_faster_and_a_later_process_reads_it(tmp_path):
    faster, timer = timed(kernel_s=1.0, torch_s=1.3)
    slower, _ = timed(kernel_s=2.0, torch_s=1.0)
    trials = {"decode_projections": faster, "prefill_attention": slower}
    first = decide(trials, machine=ZEN4, status=LOADED, cache=tmp_path, timer=timer)
    assert first.route("decode_projections").reason == "calibrated 1.30x" and first.kernel("decode_projections")
    assert not first.kernel("prefill_attention")
    assert first.route("prefill_attention").reason == "calibrated: torch 2.00x"
    assert first.route("decode_experts").reason == "avx512_bf16, not calibrated"  # no trial: the prior
    assert timer.calls == 4
    files = list(tmp_path.glob(f"{kernel_choice.PREFIX}*.json"))
    assert files == [kernel_choice.cache_file(tmp_path, ZEN4)]
    record = json.loads(files[0].read_text())
    assert record["threads"] == 16 and record["cpu"] == ZEN4.cpu and len(record["timings"]) == 2
    again = decide(trials, machine=ZEN4, status=LOADED, cache=tmp_path,
                   timer=lambda fn: pytest.fail("timed again despite the cache"))
    assert again == first


def test_a_cached_timing_is_honoured(tmp_path):
    trial = Trial("M8 64x64", lambda: pytest.fail("timed despite the cache"))
    kernel_choice.write_timings(kernel_choice.cache_file(tmp_path, ZEN4), ZEN4,
                                {"decode_experts|M8 64x64": {"kernel_s": 3.0, "torch_s": 1.0}})
    paths = decide({"decode_experts": trial}, machine=ZEN4, status=LOADED, cache=tmp_path)
    assert not paths.kernel("decode_experts") and paths.route("decode_experts").reason == "calibrated: torch 3.00x"


@pytest.mark.parametrize("content", ["{not json", '{"version": 1}', json.dumps(
    {"version": 1, "cpu": ZEN4.cpu, "threads": 16, "timings": {"decode_experts|M8 64x64": {"kernel_s": "fast"}}})])
def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path, content):
    path = kernel_choice.cache_file(tmp_path, ZEN4)
    path.write_text(content)
    trial, timer = timed(kernel_s=1.0, torch_s=1.5)
    paths = decide({"decode_experts": trial}, machine=ZEN4, status=LOADED, cache=tmp_path, timer=timer)
    assert timer.calls == 2 and paths.kernel("decode_experts")
    assert kernel_choice.read_timings(path, ZEN4) == {"decode_experts|M8 64x64": {"kernel_s": 1.0, "torch_s": 1.5}}


def test_timings_are_keyed_by_thread_count_and_shape(tmp_path):
    trial, timer = timed(kernel_s=1.0, torch_s=1.5)
    decide({"decode_experts": trial}, machine=ZEN4, status=LOADED, cache=tmp_path, timer=timer)
    fewer = Machine(ZEN4.cpu, ZEN4.flags, 4)
    decide({"decode_experts": trial}, machine=fewer, status=LOADED, cache=tmp_path, timer=timer)
    assert timer.calls == 4 and kernel_choice.cache_file(tmp_path, fewer) != kernel_choice.cache_file(tmp_path, ZEN4)
    other_shape = Trial("M8 128x64", trial.build)
    decide({"decode_experts": other_shape}, machine=ZEN4, status=LOADED, cache=tmp_path, timer=timer)
    assert timer.calls == 6 and len(kernel_choice.read_timings(kernel_choice.cache_file(tmp_path, ZEN4), ZEN4)) == 2


def test_failed_kernels_no_kernel_for_the_shapes_and_a_raising_trial_go_to_torch():
    failed = KernelStatus("failed", reason="no `ninja` executable")
    trial, timer = timed(kernel_s=1.0, torch_s=2.0)

    def raising():
        raise RuntimeError("the kernel does not cover attention of (1, 2, 3, 4)\nmore")

    trials = {"decode_projections": trial, "vision_gemm": trial, "prefill_attention": Trial("x", raising),
              "decode_experts": "quantised experts: quant_choice.py picks their path"}
    paths = decide(trials, machine=ZEN4, status=failed, cache=None, timer=timer)
    assert paths.route("decode_projections").reason == "kernels unavailable: no `ninja` executable"
    assert paths.kernel("vision_gemm")  # torch's own oneDNN op: needs no build
    paths = decide(trials, machine=ZEN4, status=LOADED, cache=None, timer=timer)
    assert paths.route("prefill_attention").reason == (
        "kernel failed in calibration: the kernel does not cover attention of (1, 2, 3, 4)")
    assert paths.route("decode_experts").reason == "quantised experts: quant_choice.py picks their path"
    assert not paths.kernel("decode_experts")


def test_the_process_choice_is_decided_once_and_reported(monkeypatch, tmp_path):
    """kernels.paths: the build's directory holds the cache, the same trials are decided once per process, and
    `paths()` reports what was decided beside the features' routes of the families nobody asked about."""
    monkeypatch.setattr(kernels, "status", lambda *a: KernelStatus("loaded", directory=str(tmp_path)))
    monkeypatch.setattr(kernels, "machine", lambda: ZEN4)
    monkeypatch.setattr(kernels, "_decided", {})
    monkeypatch.setattr(kernels, "_reported", {})
    built = []

    def build():
        built.append(1)
        return (lambda: None), (lambda: torch.randn(256, 256) @ torch.randn(256, 256))

    trials = {"decode_experts": Trial("N8 tiny", build)}
    first = kernels.paths(trials)
    assert first.kernel("decode_experts") and first.route("decode_experts").reason.startswith("calibrated")
    assert kernels.paths(trials) is first and built == [1]
    assert kernel_choice.read_timings(kernel_choice.cache_file(tmp_path, ZEN4), ZEN4)
    report = kernels.paths()
    assert report.route("decode_experts") == first.route("decode_experts")
    assert report.route("vision_gemm").reason == "avx512_bf16, not calibrated"


def test_this_machine_without_avx512_bf16_chooses_torch_everywhere():
    if "avx512_bf16" in kernels.machine().flags:
        pytest.skip("this CPU has AVX512-BF16: the choice is calibrated (tested with fakes above)")
    assert all(r.use == "torch" for r in kernels.paths().routes)


# -- routing: the model asks its Paths -------------------------------------------------------------------------
class FakeKernels:
    """Stands in for the compiled ops with the reference math in torch (any dtype), and records which ran."""

    def __init__(self, monkeypatch):
        self.ran: list[str] = []
        self.weights: set[tuple[int, int]] = set()  # the bytes [start, end) of every weight a kernel product read
        for name in ("attend_fits", "attention_fits", "moe_fits", "fits", "available"):
            monkeypatch.setattr(kernels, name, lambda *a: True)
        monkeypatch.setattr(kernels, "linear", self.linear)
        monkeypatch.setattr(kernels, "attend", self.attend)
        monkeypatch.setattr(kernels, "attention", self.attention)
        monkeypatch.setattr(kernels, "moe_routed", self.moe_routed)
        monkeypatch.setattr(kernels, "linear_fused", self.linear_fused)

    def linear(self, x, w, bias=None, *, enabled=True):
        if enabled and x.numel() <= kernels.MAX_ROWS * x.shape[-1]:
            self.ran.append("linear")
            self.weights.add((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()))
        return F.linear(x, w, bias)

    def read(self, w: torch.Tensor) -> bool:
        """Whether a kernel product read all of `w` (itself, or a stacked weight it is a view into)."""
        start, end = w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()
        return any(a <= start and end <= b for a, b in self.weights)

    def attend(self, q, k, v, positions, scale):
        self.ran.append("attend")
        return attend(q, k, v, causal_mask(positions, torch.arange(k.shape[2]).expand(q.shape[0], -1)), scale)

    def attention(self, q, k, v, scale, positions=None):
        self.ran.append("attention")
        if positions is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        mask = causal_mask(positions, torch.arange(k.shape[2]).expand(q.shape[0], -1))
        return attend(q, k, v, mask, scale)

    def moe_routed(self, x, ids, weights, gate, up, down):
        self.ran.append("moe_routed")
        if len(gate) == 1 and gate[0].dim() == 3:  # the experts as one stack per projection: index it alike
            gate, up, down = gate[0], up[0], down[0]
        out = torch.zeros(x.shape, dtype=torch.float32)
        for n in range(x.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[n, k])
                h = F.silu(F.linear(x[n], gate[e])) * F.linear(x[n], up[e])
                out[n] += weights[n, k] * F.linear(h, down[e]).float()
        return out.to(x.dtype)

    def linear_fused(self, x, w, b, *, gelu=False):
        self.ran.append("linear_fused")
        y = F.linear(x, w, b)
        return F.gelu(y, approximate="tanh") if gelu else y


def only(*families: str) -> Paths:
    return Paths(tuple(kernel_choice.Route(f, "kernel" if f in families else "torch", "test") for f in FAMILIES))


def prefill_then_decode(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        cache = lm.new_cache(ids.shape[0], ids.shape[1] + 1)
        prefill = lm(lm.embed(ids[:, :-1]), cache)
        cache.advance(ids.shape[1] - 1)
        return torch.cat((lm.logits(prefill), lm.logits(lm(lm.embed(ids[:, -1:]), cache))), dim=1)


@pytest.mark.parametrize("name", ["small-mla", "tiny-mha"])
def test_each_family_runs_where_the_paths_say_and_equals_the_torch_path(monkeypatch, name):
    """Catches routing bugs: a family set to torch reaching a kernel (or the reverse), MLA projections skipping the
    decode kernels, wrong arguments (positions, scale, layouts) handed to a kernel: fake kernels computing the
    reference math must give the torch path's logits, prefill (17 tokens) and decode both."""
    from parity import checkpoint_names, parity_model

    assert name in checkpoint_names()
    lm = parity_model(name).language  # float32: the fakes' math matches torch's to rounding
    fake = FakeKernels(monkeypatch)
    ids = torch.randint(3, lm.cfg.vocab_size, (2, 18), generator=torch.Generator().manual_seed(4))
    try:
        lm.use_paths(only())
        reference = prefill_then_decode(lm, ids)
        assert fake.ran == []
        lm.use_paths(Paths.uniform("kernel", "test"))
        fast = prefill_then_decode(lm, ids)
        expected = {"linear", "attention", "moe_routed"} | ({"attend"} if not lm.cfg.use_mla else set())
        assert set(fake.ran) == expected
        decode_linears = fake.ran.count("linear")
        fake.ran.clear()
        lm.use_paths(only("decode_projections"))
        prefill_then_decode(lm, ids)
        assert set(fake.ran) == {"linear"}  # nothing but the decode projections (the experts' ones too, now)
        assert len(fake.ran) > decode_linears
        # Every layer's projections, MLA's included; absorbed MLA decode reads kv_b per head (its own kernel).
        # q, k and v (MLA: the query and the latent) may be read as one stacked product (model/stacked.py).
        projections = {name: p for name, p in lm.model.layers.named_parameters()
                       if p.ndim == 2 and ".self_attn." in f".{name}" and "kv_b_proj" not in name}
        unread = [name for name, p in [*projections.items(), ("lm_head", lm.lm_head.weight)] if not fake.read(p)]
        assert not unread, f"never read by a kernel product: {unread}"
    finally:
        lm.use_paths(kernel_choice.UNCHOSEN)
    worst = (fast - reference).abs().max()
    assert worst <= 1e-4 * reference.abs().max(), f"kernel paths differ from torch by {worst}"


def test_language_model_asks_the_process_choice_with_its_own_trials(monkeypatch):
    """A bf16 forward on the CPU takes the routes from kernels.paths, with trials on this model's shapes (MLA's
    decode attention: the absorbed form with its own kv_b weight), and hands them to every module."""
    from parity import parity_model

    lm = parity_model("small-mla", torch.bfloat16).language
    asked = []
    chosen = only("decode_experts")
    monkeypatch.setattr(kernels, "paths", lambda trials: asked.append(trials) or chosen)
    try:
        with torch.inference_mode():
            lm(lm.embed(torch.tensor([[5, 6, 7]])))
        assert all(m.paths is chosen for m in lm.modules() if hasattr(m, "paths"))
    finally:
        lm.use_paths(kernel_choice.UNCHOSEN)
    (trials,) = asked
    rank = lm.cfg.kv_lora_rank
    kv_b = f"{lm.cfg.num_attention_heads * (lm.cfg.qk_nope_head_dim + lm.cfg.v_head_dim)}x{rank}"
    assert "absorbed" in trials["decode_attention"].shape and f"kv_b {kv_b}" in trials["decode_attention"].shape
    if kernels.available():  # the trial runs on the model's own kv_b weight (not whatever a later line binds)
        for call in trials["decode_attention"].build():
            assert call().shape[-1] == lm.cfg.v_head_dim
    assert kv_b in trials["decode_projections"].shape  # MLA's kv_b projection is among the timed ones
    assert {"prefill_attention", "decode_projections", "decode_experts", "prefill_experts"} <= set(trials)


def test_expert_trials_time_the_models_own_kernel_and_fallback(monkeypatch):
    from parity import parity_model

    fake = FakeKernels(monkeypatch)
    lm = parity_model("small-mla", torch.bfloat16).language
    trials = kernel_calibration.language_trials(lm)
    kernel_call, torch_call = trials["decode_experts"].build()
    with torch.inference_mode():
        by_kernel, by_torch = kernel_call(), torch_call()
    assert fake.ran == ["moe_routed"]  # the fallback is the model's own MoE.dispatch, not a kernel
    assert by_kernel.shape == (kernel_calibration.DECODE_ROWS, lm.cfg.hidden_size)
    assert (by_kernel.float() - by_torch.float()).abs().max() <= 0.02 * by_torch.float().abs().max()


def test_vision_tower_routes_by_its_paths(monkeypatch):
    from parity import checkpoint_names, parity_model

    tower = parity_model(checkpoint_names()[0]).vision
    fake = FakeKernels(monkeypatch)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(5))
    try:
        with torch.inference_mode():
            tower.use_paths(only())
            reference = tower(pixels)
            assert fake.ran == []
            tower.use_paths(only("vision_gemm", "vision_attention"))
            fast = tower(pixels)
    finally:
        tower.use_paths(kernel_choice.UNCHOSEN)
    assert {"linear_fused", "attention"} == set(fake.ran)
    assert (fast - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_a_bf16_cpu_model_chooses_its_paths_when_it_loads():
    """Catches the calibration moving back into the first page: `dsvl2.load` of a bf16 model on a CPU has
    decided every family (the runtime reports them, the manifest and -v show them) before any page."""
    from parity import checkpoint_dir

    import dsvl2
    from dsvl2.model import kernel_choice, kernels

    runtime = dsvl2.load(str(checkpoint_dir("tiny-mha")), device="cpu", dtype="bfloat16", batch_size=1)
    assert runtime.paths is not None and [r.family for r in runtime.paths.routes] == list(kernel_choice.FAMILIES)
    assert runtime.paths == kernels.paths()
    assert runtime.engine.model.language._trials is not None and runtime.engine.model.vision._trials is not None
