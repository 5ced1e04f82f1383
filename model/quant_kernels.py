"""Optional compiled CPU kernels for the weight-only int8 / int4 products (model/csrc/quant_avx2.cpp, AVX2 + FMA):
  `int8_linear`  y = x @ (q * s[:, None])^T, q (N, K) int8 in the "r4" layout below (`r4_pack` / `r4_unpack`);
  `int4_linear`  y = x @ (q * s per group)^T, q in the "k16r4" layout below (`k16r4_pack` / `k16r4_unpack`);
  `moe_held`     a MoE layer's routed (and shared) experts in those layouts, in one call (model/csrc/quant_moe.cpp),
                 on the experts' weights `hold_experts` holds once per layer (no lists handed over per call).
x is float32 or bf16 (sums in float32, y in x's dtype); each weight byte is read once for all rows (decode).
Each op takes `isa`: AVX2 (the tiles of quant_avx2.h) or, for bf16 activations on a CPU with AVX512-BF16
(`avx512_supported()`), AVX512 (quant_avx512.h: int4 by table lookup into bf16 and VDPBF16PS, from 6 rows with
AVX512-VBMI on weight rows rearranged into pairs of k, quant_pairs.h; int8 in 16-lane FMAs; from 24 rows a GEMM
on bf16 q, quant_gemm.h) or, on a Xeon with AMX-BF16 (`amx_supported()`), AMX (quant_amx.h: products of 6 rows or
more dequantise each 16 weight rows once into bf16 and multiply them on AMX's tiles; fewer rows run the AVX512
tiles). The library is built with the AVX2 flags either way; the AVX512 and AMX code is compiled for its target
alone.

Built on first use by model/kernel_build.py, as model/kernels.py builds the bf16 library, into
<cache root>/dsvl2_quant-<key>/ (a failed build is remembered there: delete `status().directory` to retry). Nothing
here is required: on a CPU without AVX2 / FMA / F16C, when the build fails, or when switched off (DSVL2_KERNELS=0,
shared with kernels.py) `available()` is False and quant.py runs torch's ops. Nothing is raised or printed:
`status()` returns a `KernelStatus` for the caller to report. Not responsible for choosing where the kernels run
(quant_choice.py) nor for the model's layers (quant.py).

Both layouts interleave blocks of BLOCK_ROWS = 4 weight rows, K in steps of 16, so that a decode step reads the
weight in address order (the rows past N and the k past K are padding, zero weights):
  "r4"     (ceil(N/4), ceil(K/16) * 64) int8: per block and step, the step's 16 values of row 0, then rows 1-3.
  "k16r4"  (ceil(N/4), ceil(K/16) * 32) uint8: per block and step, 8 bytes of row 0, then rows 1-3; byte j of a
           row's 8 holds k = 16t + j in its low nibble and k = 16t + 8 + j in its high nibble, each as q + 8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsvl2.model import kernel_build
from dsvl2.model.devices import cpu_flags, cpu_vendor
from dsvl2.model.kernel_build import KernelStatus
from dsvl2.model.kernels import off_reason, switched_off

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "quant_avx2.cpp", _CSRC / "quant_moe.cpp", _CSRC / "quant_pack.cpp"]
_NAME = "dsvl2_quant"
# On AMD CPUs the tiles prefetch their weights for one read (prefetch.h's `weights`); a flag, so part of the key.
_STREAM_WEIGHTS = ["-DDSVL2_STREAM_WEIGHTS"] if cpu_vendor() == "AuthenticAMD" else []
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *_STREAM_WEIGHTS]
_LDFLAGS = ["-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
AMX_FLAGS = ("amx_tile", "amx_bf16", "avx512vbmi")  # VBMI: int4 strips by byte permutation
VNNI_FLAGS = ("avx512_vnni",)
# The ops' `isa`: which tiles run (AVX512 and AMX take bf16 activations only; AMX: the AVX512 tiles for fewer than
# 6 rows, AMX's tiles from there on where K and the int4 groups are multiples of 32 and Linux grants the tiles).
# VNNI is a flag added to AVX512 or AMX: int4's AVX512 tiles multiply on VPDPBUSD, x in fixed point (quant_vnni.h:
# `fixed_point` below gives the x they multiply), where the groups are whole pairs of 16-k steps; int8 ignores it.
AVX2, AVX512, AMX, VNNI = 0, 1, 2, 4
K16 = 16  # k values per step of the layouts
BLOCK_ROWS = 4  # weight rows interleaved per block of the layouts


def cpu_supported() -> bool:
    """True on an x86 CPU with the AVX2 / FMA / F16C instructions the library is compiled for."""
    return cpu_flags().issuperset(_CPU_FLAGS)


def avx512_supported() -> bool:
    """True where the CPU also runs the AVX512 tiles (quant_avx512.h: AVX512F/BW/VL/DQ and AVX512-BF16)."""
    return cpu_flags().issuperset(_CPU_FLAGS + AVX512_FLAGS)


def amx_supported() -> bool:
    """True where the CPU also has AMX-BF16's tiles (quant_amx.h; Linux must still grant them, which the ops check
    and, where it does not, run the AVX512 tiles)."""
    return avx512_supported() and cpu_flags().issuperset(AMX_FLAGS)


def vnni_supported() -> bool:
    """True where the CPU also has AVX512-VNNI (int4's VPDPBUSD tiles, the VNNI flag of the ops' `isa`)."""
    return avx512_supported() and cpu_flags().issuperset(VNNI_FLAGS)


def fixed_point(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (M, K) bf16 as the VNNI tiles multiply it, in float32: per block of `block` k (the last one padded with
    zeros), 2^E = 2^(e - 14) for the block's largest |x| in [2^(e-1), 2^e), and each x rounded to the nearest multiple
    of 2^E (half to even; bf16 denormals are zero; a block with an Inf or NaN is all NaN). For tests and accuracy
    studies: the ops compute this inside (quant_vnni.h), where `block` = 16 * gcd(G / 16, 8) for groups of G k
    (G = K where the row is one group: then K / 16 whole steps)."""
    m, k = x.shape
    xf = F.pad(x.float(), (0, -k % block)).view(m, -1, block)
    xf = torch.where(xf.abs() < torch.finfo(torch.bfloat16).tiny, torch.zeros_like(xf), xf)  # denormals: zero
    top = xf.abs().amax(-1, keepdim=True)
    step = torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent - 14)
    out = torch.where(top > 0, torch.round(xf / step) * step, torch.zeros_like(xf))
    out = torch.where(torch.isfinite(top), out, torch.full_like(out, float("nan")))
    return out.view(m, -1)[:, :k]


def _registered() -> None:
    """Raises unless the loaded library registered the ops (the build's check)."""
    torch.ops.dsvl2_quant.int8_linear  # noqa: B018 - attribute access raises if the op is missing
    torch.ops.dsvl2_quant.int4_linear  # noqa: B018
    torch.ops.dsvl2_quant.moe_held  # noqa: B018
    torch.ops.dsvl2_quant.quantize_values  # noqa: B018
    torch.classes.dsvl2_quant.Experts  # noqa: B018


# Included by the sources: part of the build key.
_HEADERS = [_CSRC / "parallel.h", _CSRC / "prefetch.h", _CSRC / "quant_avx2.h", _CSRC / "quant_avx512.h",
            _CSRC / "quant_amx.h", _CSRC / "quant_vnni.h", _CSRC / "amx_tiles.h",
            _CSRC / "transpose.h", _CSRC / "quant_gemm.h", _CSRC / "pair_tile.h",
            _CSRC / "quant_pairs.h", _CSRC / "quant_held.h"]
LIBRARY = kernel_build.Library(_NAME, _SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS, check=_registered,
                               cpu_flags=_CPU_FLAGS, depends=_HEADERS)


def status(on_build_start: Callable[[], None] | None = None) -> KernelStatus:
    """What the quantised kernels are in this process: "off" (DSVL2_KERNELS=0, as kernels.switched_off reads it),
    "unsupported" (no AVX2 / FMA / F16C), else the first call builds (seconds; `on_build_start` is called just before
    the compiler starts) or loads the cached build, and later calls return that result. Never raises, never prints."""
    return LIBRARY.status(off=off_reason(), supported=cpu_supported(), on_build_start=on_build_start)


def available(on_build_start: Callable[[], None] | None = None) -> bool:
    """True when the kernels can run here; the first call builds them (see `status`)."""
    if (loaded := LIBRARY.loaded) is not None and not switched_off() and cpu_supported():  # `status`'s answer, short
        return loaded.available
    return status(on_build_start).available


def _interleave(rows: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """(N, steps * width) bytes of each row's steps -> (ceil(N/4), steps * 4 * width): per block of 4 rows, per
    step, the rows' `width` bytes one after another; rows past N are `pad` bytes."""
    n = rows.shape[0]
    if n % BLOCK_ROWS:
        rows = F.pad(rows, (0, 0, 0, BLOCK_ROWS - n % BLOCK_ROWS), value=pad)
    return rows.view(-1, BLOCK_ROWS, rows.shape[1] // width, width).transpose(1, 2).reshape(rows.shape[0] // 4, -1)


def _deinterleave(p: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """The inverse of `_interleave` for the first `n` rows: (N, steps * width)."""
    blocks = p.view(p.shape[0], -1, BLOCK_ROWS, width).transpose(1, 2)  # (N4, 4, steps, width)
    return blocks.reshape(p.shape[0] * BLOCK_ROWS, -1)[:n]


def _library_packs(t: torch.Tensor) -> bool:
    """Whether the library's packing ops (model/csrc/quant_pack.cpp) take `t`: a CPU tensor, the library loaded
    (never built for this: whoever packs into its layouts has asked for it already)."""
    return t.is_cpu and LIBRARY.loaded is not None and available()


def quantize_values(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize's values (int8 (N, K)) and bf16 scales in one pass per row on every thread, for a CPU weight
    of float32, bf16 or fp16 (`group` None: per row, int8's); requires `available()`. A row or group holding a NaN
    or an infinity gets a non-finite scale, its values zeros."""
    return torch.ops.dsvl2_quant.quantize_values(w, bits, group or 0)


def nibbles_from_values(q: torch.Tensor) -> torch.Tensor:
    """quant.pack_nibbles in one pass per row on every thread (int4 values (N, K) -> the stored layout); requires
    `available()`."""
    return torch.ops.dsvl2_quant.nibbles_from_values(q)


def k16r4_from_nibbles(b: torch.Tensor, k: int) -> torch.Tensor:
    """The stored int4 layout (N, ceil(K/2)) uint8 -> "k16r4", with no int8 values between; requires
    `available()`."""
    return torch.ops.dsvl2_quant.k16r4_from_nibbles(b, k)


def r4_pack(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> the "r4" layout (ceil(N/4), ceil(K/16) * 64) int8 (by the library where it is loaded: the
    same bytes in one pass)."""
    if _library_packs(q):
        return torch.ops.dsvl2_quant.r4_from_values(q)
    k = q.shape[1]
    if k % K16:
        q = F.pad(q, (0, K16 - k % K16))
    return _interleave(q, K16, 0).contiguous()


def r4_unpack(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `r4_pack`: int8 (N, K)."""
    return _deinterleave(p, n, K16)[:, :k].contiguous()


def k16r4_pack(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] -> the "k16r4" layout (ceil(N/4), ceil(K/16) * 32) uint8 (by the library
    where it is loaded, as `r4_pack`)."""
    if _library_packs(q):
        return torch.ops.dsvl2_quant.k16r4_from_values(q)
    n, k = q.shape
    u = (q + 8).view(torch.uint8)  # [-8, 7] + 8 stays in int8's range
    if k % K16:
        u = F.pad(u, (0, K16 - k % K16), value=8)
    b = u.view(n, -1, 2, 8)  # (N, step, half, j)
    return _interleave((b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, -1), 8, 0x88).contiguous()


def k16r4_unpack(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `k16r4_pack`: int8 (N, K) in [-8, 7]."""
    b = _deinterleave(p, n, 8).reshape(n, -1, 1, 8)  # (N, step, 1, j)
    u = torch.cat((b & 15, b >> 4), dim=2).reshape(n, -1)[:, :k]  # (N, K)
    return u.to(torch.int8) - 8


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, isa: int = AVX2,
                float_out: bool = False) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (q (N, K) int8 * s (N,))^T, q in the "r4" layout; requires `available()`. x float32
    or bf16 (bf16 only with `isa` AVX512 or AMX, which need `avx512_supported()` / `amx_supported()`), any
    strides. y in x's dtype, or with `float_out` float32 holding the values rounded to x's dtype (`.float()` of
    that, without its passes: logits)."""
    return torch.ops.dsvl2_quant.int8_linear(x, q, s, isa, float_out)


def int4_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int, isa: int = AVX2,
                float_out: bool = False) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (q4 * s per group of `group` along K)^T, q in the "k16r4" layout and s (N, K/G);
    requires `available()`. x float32 or bf16 (bf16 only with `isa` AVX512 or AMX), any strides. `float_out` as
    for `int8_linear`."""
    return torch.ops.dsvl2_quant.int4_linear(x, q, s, group, isa, float_out)


class HeldExperts:
    """A MoE layer's expert weights held by the library (`hold_experts`): the library's object, which keeps the
    tensors alive, and the handle `moe_held` passes to the op (handing the object itself to an op cost ~8 us a call
    in torch's argument parsing; model/csrc/quant_moe.cpp)."""

    __slots__ = ("handle", "obj")

    def __init__(self, obj: torch.ScriptObject):
        self.obj = obj
        self.handle: int = obj.handle()

    def lists(self) -> list[list[torch.Tensor]]:
        """The tensors held: gate qweights, gate scales, up qweights, up scales, down qweights, down scales."""
        return self.obj.lists()


def hold_experts(gate: tuple[list, list], up: tuple[list, list], down: tuple[list, list],
                 shared: int = 0) -> HeldExperts:
    """A MoE layer's expert weights held once by the library for `moe_held` (requires `available()`): gate, up,
    down = (qweights, scales) lists over all experts, qweights in the kernel layout of their bits ("r4" / "k16r4");
    the last `shared` of them the layer's shared experts (each as wide as it is), which every token runs with weight
    1. A call then hands over one handle instead of every expert's tensors (~140 us a call on Tiny's 64
    experts). It keeps the tensors alive while it lives: make it anew when they are replaced."""
    return HeldExperts(torch.classes.dsvl2_quant.Experts(*gate, *up, *down, shared))


def combine_slots(outs: list[torch.Tensor], order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y (N, E) = sum over k, in order, of weights[n, k] * the output of token slot (n, k), in float32, rounded once
    to the outputs' dtype: `outs` are the experts' outputs (rows, E) one after another, their rows the slots in the
    order `order` (N * K,) sorted them (feedforward.dispatch's), weights (N, K) float32. CPU tensors, float32 or
    bf16; requires `available()` (model/csrc/quant_moe.cpp)."""
    return torch.ops.dsvl2_quant.combine_slots(outs, order, weights)


def moe_held(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: HeldExperts, bits: int,
             group_in: int, group_mid: int, isa: int = AVX2) -> torch.Tensor:
    """A MoE layer's experts with quantised weights, y (N, E) in x's dtype = sum over k of weights[n, k] *
    expert_{ids[n, k]}(x[n]), plus each shared expert's output where `experts` holds them (`hold_experts`' `shared`;
    `ids` index the routed ones), expert e = down_e(silu(gate_e x) * up_e x), all in float32 (the sum rounded once
    to x's dtype, to nearest even). x (N, E) float32 or bf16, ids (N, K) int64, weights (N, K) float32; int4 groups
    of `group_in` along E (gate, up) and `group_mid` along the experts' widths (down); `isa` as for the products.
    Requires `available()`; one call per layer (model/csrc/quant_moe.cpp)."""
    return torch.ops.dsvl2_quant.moe_held(x, ids, weights, experts.handle, bits, group_in, group_mid, isa)
