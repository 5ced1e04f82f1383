"""Optional compiled CPU kernels (model/csrc/: decode_bf16.cpp, moe_bf16.cpp, attention_bf16.cpp, latent_bf16.cpp,
glue_bf16.cpp, bf16_common.h),
AVX512-BF16 dot products; the decode ones read each weight once for all rows:
  `linear`      an `F.linear` for bf16 products with few rows;
  `moe_routed`  the routed experts of a MoE layer in one call (two parallel passes over the active experts' weights
                instead of three separate products per expert, with the token gathering and the weighted sum):
                decode streams each weight once; experts with many rows (prefill) multiply packed weight blocks
                (on AMX's bf16 tiles where the CPU has them, `amx_ready()`);
  `attend`      attention of a few new queries over the cache, reading each cached key and value row once, in
                place (torch's batched products copy the cache's strided views first);
  `absorbed`    MLA's absorbed decode attention: W_uk and W_uv read once per call, every head's queries over the
                shared latent cache at once;
  `attention`   attention of many queries (the vision tower's 729-token tiles; prefill chunks, causal over the
                cache), ~1.6x torch's fused CPU kernel on SigLIP's 72-wide heads (Zen 4); both products on AMX's
                tiles where the CPU has them (~2x torch's on a Xeon with AMX);
  `rms_norm`, `rope`, `store_rows`, `route_greedy`  the small operations around a layer's products
                (glue_bf16.cpp): RMSNorm with the residual add fused, the rotary embedding, the KV cache's write,
                a MoE gate's routing, each one call where torch makes several cold passes.
Also `linear_fused`, a product with its bias (and GELU) fused through torch's own oneDNN (no build needed), for
the vision tower's large bf16 products.

The C++ source is built on first use (needs a C++ compiler and the `ninja` executable) by model/kernel_build.py,
once per machine and source version, into <TORCH_EXTENSIONS_DIR or ~/.cache/dsvl2/kernels>/dsvl2_kernels-<key>/;
a failed build is remembered there (delete that directory, `status().directory`, to retry). Nothing here is
required: without AVX512-BF16, when the build fails, for shapes, dtypes or devices it does not cover, or when
switched off (`enabled=False`, or DSVL2_KERNELS=0 in the environment), `linear` is `F.linear` and `moe_fits` is
False (the model then runs its experts one by one).
Nothing is raised or printed: `status()` returns a `KernelStatus` (built, loaded from the cache, failed with a
reason, unsupported CPU or switched off, and the seconds spent) for the caller to report, and
`available(on_build_start=...)` calls back when a build really starts.

Where to use them is decided once per operation family and machine: `paths(trials)` gives the model a
`kernel_choice.Paths` (CPU features, then a calibration cached next to the build); `paths()` reports the routes
decided in this process. This module is the one that reads the environment (DSVL2_KERNELS) and the CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dsvl2.model import kernel_build, kernel_choice
from dsvl2.model.devices import cpu_flags
from dsvl2.model.kernel_build import KernelStatus
from dsvl2.model.kernel_choice import Family, Machine, Paths, Route, Trial

# Rows (tokens) up to which `linear` uses the kernel (decode batches). Past ~16 rows a product is bound by the
# bf16 dot-product rate rather than by reading the weight; the kernel still matched F.linear at 48 and 64 rows
# on the 2-core Zen 4 (bench/gemv.py --rows 48 64), but prefill-sized products stay with torch's blocked GEMM.
MAX_ROWS = 32
ENV_SWITCH = "DSVL2_KERNELS"  # "0" turns the kernels off for the whole process

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / name for name in ("decode_bf16.cpp", "moe_bf16.cpp", "attention_bf16.cpp", "latent_bf16.cpp",
                                             "glue_bf16.cpp")]
# Included by the sources: part of the build key.
_DEPENDS = [_CSRC / "bf16_common.h", _CSRC / "parallel.h", _CSRC / "prefetch.h", _CSRC / "amx_tiles.h",
            _CSRC / "transpose.h", _CSRC / "amx_rows.h", _CSRC / "pair_tile.h"]
_NAME = "dsvl2_kernels"
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
_CPU_FLAG_SET = frozenset(_CPU_FLAGS)


def cpu_supported() -> bool:
    """True on an x86 CPU with the AVX512 F/BW/BF16 instructions the kernel is compiled for."""
    return cpu_flags() >= _CPU_FLAG_SET


def switched_off() -> bool:
    """True when the environment turns the kernels off (DSVL2_KERNELS=0, off, false or no); read at each call, or
    once for a whole forward inside `switch_read_once`."""
    read = _switch_read.get()
    return _environment_switched_off() if read is None else read


def _environment_switched_off() -> bool:
    value = os.environ.get(ENV_SWITCH)
    return value is not None and value.strip().lower() in ("0", "off", "false", "no")


# The switch as read on entering `switch_read_once` in this thread / task, None outside one.
_switch_read: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dsvl2_kernels_switch", default=None)


@contextlib.contextmanager
def switch_read_once() -> Iterator[None]:
    """Inside, `switched_off()` (and so both compiled libraries' `available()`) answers what the environment said on
    entry: the language model's forward asks it ~120 times a decode step, and each read of the environment cost
    ~0.6 us (~75 us a Tiny int4 step at batch 1, 0.7%)."""
    token = _switch_read.set(_environment_switched_off())
    try:
        yield
    finally:
        _switch_read.reset(token)


def _registered() -> None:
    """Raises unless the loaded library registered the ops (the build's check)."""
    torch.ops.dsvl2_kernels.linear_bf16  # noqa: B018 - attribute access raises if the op is missing


LIBRARY = kernel_build.Library(_NAME, _SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS, depends=_DEPENDS,
                               check=_registered, cpu_flags=_CPU_FLAGS)


def off_reason() -> str | None:
    """Why the environment switched the compiled libraries off (DSVL2_KERNELS=0), None when it did not."""
    return f"switched off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}" if switched_off() else None


def status(on_build_start: Callable[[], None] | None = None) -> KernelStatus:
    """What the kernels are in this process: "off" (DSVL2_KERNELS=0, as `switched_off` reads it), "unsupported" (no
    AVX512-BF16), else the first call builds (seconds to a minute, first run only; `on_build_start` is called
    just before the compiler starts) or loads the cached build, and later calls return that result ("built",
    "loaded" or "failed", with the reason and seconds). Never raises, never prints."""
    off = off_reason()
    if off is None and (loaded := LIBRARY.loaded) is not None:  # every fits() asks, several times per layer and step
        return loaded
    return LIBRARY.status(off=off, supported=cpu_supported(), on_build_start=on_build_start)


def available(on_build_start: Callable[[], None] | None = None) -> bool:
    """True when the kernels can run here; the first call builds them (see `status`), so call this at model load
    to keep the build out of the first decode step."""
    if (loaded := LIBRARY.loaded) is not None and not switched_off():  # asked by every kernel's check: the short way
        return loaded.available
    return status(on_build_start).available


def build_error() -> str | None:
    """Why the kernels are unavailable (switched off, unsupported CPU, or the build or load error), or None."""
    return status().reason


def build_seconds() -> float:
    """Seconds the first `available()` spent building or loading the extension in this process."""
    s = status()
    return s.build_seconds + s.load_seconds


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> Machine:
    """This CPU and torch's current thread count: what a calibration's timings are keyed by."""
    return Machine(_cpu_model(), cpu_flags() & frozenset(kernel_choice.RELEVANT_FLAGS), torch.get_num_threads())


_decided: dict[tuple, Paths] = {}  # (status, machine, trials) -> routes, once per process
_reported: dict[Family, Route] = {}  # the latest route of each family decided in this process
_deciding = threading.Lock()


def paths(trials: dict[Family, Trial | str] | None = None) -> Paths:
    """With `trials` (kernel_calibration.language_trials / vision_trials of a model): the routes for that model,
    decided by `kernel_choice.decide` at most once per process for the same status, machine and shapes (the build
    happens first, as in `status`; timings are cached in the build's directory). Without: what this process has
    decided so far, the features' or the prior's route for the families no model has asked about yet."""
    current, here = status(), machine()
    if trials is None:
        return Paths(tuple(_reported.get(f) or kernel_choice.by_features(f, here, current)
                           or kernel_choice.prior(f, here) for f in kernel_choice.FAMILIES))
    shapes = tuple(sorted((f, t if isinstance(t, str) else t.shape) for f, t in trials.items()))
    key = (current, here, shapes)
    if (found := _decided.get(key)) is not None:
        return found
    with _deciding:
        if (found := _decided.get(key)) is None:
            cache = Path(current.directory) if current.directory else None
            with torch.inference_mode():
                found = _decided[key] = kernel_choice.decide(trials, machine=here, status=current, cache=cache)
            _reported.update((f, found.route(f)) for f in trials)
        return found


def fits(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, w, bias)` is a product the kernel covers (ignoring whether it is available)."""
    return (
        bias is None
        and x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16
        and x.is_cpu and w.is_cpu
        and w.ndim == 2 and x.ndim >= 1 and x.shape[-1] == w.shape[1] and w.is_contiguous()
        and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and w.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))  # the op has no backward
    )


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K)^T in bf16 with float32 sums, by the kernel; requires `available()`.
    x may be non-contiguous; w must be contiguous (a Linear weight)."""
    return torch.ops.dsvl2_kernels.linear_bf16(x, w)


def takes(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, enabled: bool = True) -> bool:
    """Whether `linear` runs the kernel for these arguments: enabled, `fits` and available."""
    return enabled and fits(x, w, bias) and available()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, enabled: bool = True) -> torch.Tensor:
    """`F.linear(x, w, bias)`, by the kernel when it `takes` them; x is (..., K)."""
    if not takes(x, w, bias, enabled=enabled):
        return F.linear(x, w, bias)
    if x.ndim == 2:
        return linear_bf16(x, w)
    return linear_bf16(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])  # (..., N)


def _usable(*tensors: torch.Tensor) -> bool:
    """bf16 CPU tensors that need no autograd (the ops have no backward), and the kernels available here."""
    return (
        all(t.dtype is torch.bfloat16 and t.is_cpu for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and available()
    )


def moe_fits(x: torch.Tensor, expert_weight: torch.Tensor) -> bool:
    """Whether `moe_routed` covers routing tokens x (N, E) to experts whose weights look like `expert_weight`
    (one of them), and the kernel is available and switched on."""
    return x.ndim == 2 and x.shape[0] > 0 and _usable(x, expert_weight)


def moe_routed(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: list[torch.Tensor],
               up: list[torch.Tensor], down: list[torch.Tensor], *, amx: bool = True) -> torch.Tensor:
    """The routed part of a MoE layer, y (N, E) = sum over k of weights[n, k] * expert_{ids[n, k]}(x[n]), where
    expert e is down[e] (silu(gate[e] x) * up[e] x) with the model's bf16 roundings. x (N, E) bf16, ids (N, K)
    int64, weights (N, K) float32; gate[e], up[e] (I, E) and down[e] (E, I) contiguous bf16, or each list one
    contiguous stack of them all, (X, I, E) / (X, E, I) (three tensors convert faster than lists). Experts with many
    rows multiply on AMX's tiles where `amx` and `amx_ready()` (and the widths are multiples of 32), else on the
    AVX512 micro-kernel. Requires `moe_fits`."""
    return torch.ops.dsvl2_kernels.moe_bf16(x, ids, weights, gate, up, down, amx)


def amx_ready() -> bool:
    """True when the kernels can use AMX's bf16 tiles here: the CPU has them and the OS lets this process use them
    (asked once). False where the kernels are not available."""
    return available() and bool(torch.ops.dsvl2_kernels.amx_ready())


def attend_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend` covers queries q (B, H, T, D) over cache views k, v (B, Hk, S, D|Dv), and the kernel is
    available and switched on."""
    return (
        q.ndim == k.ndim == v.ndim == 4
        and 0 < q.shape[2] <= MAX_ROWS and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
        and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and v.stride(-1) == 1 and v.stride(-2) == v.shape[-1]
        and _usable(q, k, v)
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a cache whose slot is the position: query (b, h, t) sees slots 0..positions[b, t] of
    key head h // (H / Hk). Scores bf16(q . k) * scale and softmax in float32, probabilities rounded to bf16, sums
    of p * v in float32, as the model's short-query path. Returns (B, H, T, Dv). Requires `attend_fits`."""
    return torch.ops.dsvl2_kernels.attend_bf16(q, k, v, positions, scale)


def absorbed_fits(q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, pe: torch.Tensor,
                  w_kv_b: torch.Tensor) -> bool:
    """Whether `absorbed` covers MLA queries q_nope (B, H, T, Dn), q_pe (B, H, T, R) over the latent cache views
    c (B, S, C) and pe (B, S, R) with kv_b_proj's weight w_kv_b (H * (Dn + Dv), C), and the kernel is available and
    switched on."""
    return (
        q_nope.ndim == q_pe.ndim == 4 and c.ndim == pe.ndim == 3 and 0 < q_nope.shape[2] <= MAX_ROWS
        and c.stride(-1) == 1 and c.stride(-2) == c.shape[-1] and pe.stride(-1) == 1 and pe.stride(-2) == pe.shape[-1]
        and w_kv_b.ndim == 2 and w_kv_b.is_contiguous()
        and _usable(q_nope, q_pe, c, pe, w_kv_b)
    )


def absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, c: torch.Tensor, pe: torch.Tensor, w_kv_b: torch.Tensor,
             positions: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA's absorbed attention, query (b, h, t) seeing slots 0..positions[b, t] of the latent cache, with the
    roundings of attention.absorbed_attend: q_lat = bf16(q_nope @ W_uk), scores bf16(bf16(q_lat . c) + bf16(q_pe .
    pe)) * scale, softmax in float32, probabilities rounded to bf16, bf16 sums of p * c, out = bf16(lat @ W_uv^T).
    Returns (B, H, T, Dv). Requires `absorbed_fits`."""
    return torch.ops.dsvl2_kernels.absorbed_bf16(q_nope, q_pe, c, pe, w_kv_b, positions, scale)


def glue_fits(*tensors: torch.Tensor) -> bool:
    """Whether the per-layer glue kernels (`rms_norm`, `rope`, `store_rows`) take these tensors: bf16 on the CPU, no
    autograd, and the kernels available and switched on."""
    return _usable(*tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s), s) over the last dimension, with s = bf16(x + delta) where `delta` is given (the residual add fused
    into the norm) and s = x where not: bf16(weight * bf16(s * rsqrt(mean(s^2) + eps))), the mean in float32, as
    language.RMSNorm. Requires `glue_fits`."""
    normed, total = torch.ops.dsvl2_kernels.rms_norm_bf16(x, delta, weight, eps)
    return normed, (x if delta is None else total)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, T, H, D) (unit feature stride) with the tables cos, sin (B, 1, T, D) of
    language.Rotary: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), exactly as language.apply_rope; with
    `interleaved`, of x's features in DeepSeek-V2's pair order (language.deinterleave first). Returns a contiguous
    (B, T, H, D). Requires `glue_fits`."""
    return torch.ops.dsvl2_kernels.rope_bf16(x, cos, sin, interleaved)


def attend_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor, used: int,
                scale: float) -> torch.Tensor:
    """Multi-head attention's decode glue and attention in one call: `rope` of q (B, T, H, D) and k (B, T, Hk, D),
    `store_rows` of k and v into the contiguous caches (B, Hk, S, D) at `rows` (every row, in order: the attention
    reads row b for query row b) and `positions`, then `attend` of the rotated q over the caches' first `used`
    slots; exactly those three. Returns (B, H, T, D). Requires `glue_fits`."""
    return torch.ops.dsvl2_kernels.attend_step_bf16(q, k, v, cos, sin, cache[0], cache[1], rows, positions, used,
                                                    scale)


def route_greedy(x: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE gate's greedy routing of a few tokens x (N, E) bf16 by its weight (X, E), float32 or bf16 (widened to
    float32 as read: the same products), all threads sharing the experts: softmax of the float32
    logits, the k best experts in descending order, their scores (divided by their sum where `normalize` and k > 1)
    times `scaling`. Returns (ids (N, k) int64, weights (N, k) float32), as feedforward.MoEGate's greedy method
    computes them (the logits' float32 sums in another order). Requires `glue_fits(x)` and a CPU weight."""
    return torch.ops.dsvl2_kernels.route_greedy_bf16(x, weight, k, normalize, scaling)


def store_fits(buffers: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> bool:
    """Whether `store_rows` covers writing `new` into `buffers`, and the kernels are available and switched on."""
    return (all(b.is_contiguous() and b.ndim >= 3 and n.ndim == b.ndim and n.stride(-1) == 1
                for b, n in zip(buffers, new, strict=True))
            and _usable(*buffers, *new))


def store_rows(buffers: Sequence[torch.Tensor], new: Sequence[torch.Tensor], rows: torch.Tensor,
               positions: torch.Tensor) -> None:
    """buffer[rows[b], ..., positions[b, t], :] = new[b, t, ..., :] for each contiguous cache buffer (Bc, *heads, S,
    F) and its new tokens (B, T, *heads, F) (unit feature stride): the KV cache's write as one call. Requires
    `glue_fits` of them all."""
    torch.ops.dsvl2_kernels.store_rows_bf16(list(buffers), list(new), rows, positions)


@functools.cache
def _onednn_linear_pointwise():
    """torch's oneDNN linear with a fused epilogue (the op Inductor uses on CPU), or None where this torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def linear_fused(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, w, bias)`, followed by `F.gelu(..., approximate="tanh")` when `gelu`. For bf16 on CPU in one
    oneDNN call: bias (and GELU) are applied to the float32 sums before the single rounding to bf16, where torch's
    addmm first copies the bias into the whole output and a separate GELU makes another pass over it (and one
    more bf16 rounding). Elsewhere, or when switched off (DSVL2_KERNELS=0), the torch ops."""
    global _fused_refused
    op = _onednn_linear_pointwise() if x.dtype is torch.bfloat16 and x.is_cpu and not switched_off() else None
    usable = op is not None and not _fused_refused and w.ndim == 2 and w.dtype is x.dtype
    if usable and (bias is None or bias.dtype is x.dtype):
        try:
            y = op(x.reshape(-1, x.shape[-1]), w, bias, *(("gelu", [], "tanh") if gelu else ("none", [], "")))
            return y.view(*x.shape[:-1], w.shape[0])
        except RuntimeError:
            # oneDNN has no bf16 inner product for this CPU (an AVX2-only host: "could not create a primitive
            # descriptor"); torch's own ops compute the same product there, so use them from now on.
            _fused_refused = True
    y = F.linear(x, w, bias)
    return F.gelu(y, approximate="tanh") if gelu else y


_fused_refused = False  # set once oneDNN has refused the fused bf16 product on this CPU


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` covers q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), and the kernel is available."""
    return (
        q.ndim == k.ndim == v.ndim == 4 and all(t.stride(-1) == 1 for t in (q, k, v))
        and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0
        and _usable(q, k, v)
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              positions: torch.Tensor | None = None, *, amx: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) v as `F.scaled_dot_product_attention` computes it in bf16 (float32 scores and
    softmax, probabilities rounded to bf16); query head h reads key head h // (H / Hk). Without `positions` every
    query sees every key; with positions (B, Lq), query (b, i) sees keys 0..positions[b, i] (causal attention over
    a cache whose slot is the position). Returns (B, H, Lq, Dv) whose storage is (B, Lq, H, Dv), so
    `out.transpose(1, 2).reshape(B, Lq, H * Dv)` is free. Requires `attention_fits`."""
    return torch.ops.dsvl2_kernels.attention_bf16(q, k, v, positions, scale, amx)
