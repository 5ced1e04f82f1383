"""Optional compiled CPU kernels for the weight-only int8 / int4 products (model/csrc/quant_avx2.cpp, AVX2 + FMA):
  `int8_linear`  y = x @ (q * s[:, None])^T, q (N, K) int8 as quant.py stores it;
  `int4_linear`  y = x @ (q * s per group)^T, q in the "k16" layout below (`k16_pack` / `k16_unpack`).
x is float32 or bf16 (sums in float32, y in x's dtype); each weight byte is read once for all rows (decode).

Built on first use by model/kernel_build.py, as model/kernels.py builds the bf16 library, into
<cache root>/dsvl2_quant-<key>/ (a failed build is remembered there: delete `status().directory` to retry). Nothing
here is required: on a CPU without AVX2 / FMA / F16C, when the build fails, or when switched off (DSVL2_KERNELS=0,
shared with kernels.py) `available()` is False and quant.py runs torch's ops. Nothing is raised or printed:
`status()` returns a `KernelStatus` for the caller to report. Not responsible for choosing where the kernels run
(quant_choice.py) nor for the model's layers (quant.py).

int4 "k16" layout, (N, ceil(K/16) * 8) uint8: per row, each block of 16 k is 8 bytes; byte j holds k = 16b + j in
its low nibble and k = 16b + 8 + j in its high nibble, each as q + 8; padding past K is 8 (a zero weight).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsvl2.model import kernel_build
from dsvl2.model.devices import cpu_flags
from dsvl2.model.kernel_build import KernelStatus
from dsvl2.model.kernels import off_reason

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / "quant_avx2.cpp"]
_NAME = "dsvl2_quant"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_CPU_FLAGS = ("avx2", "fma", "f16c")
K16 = 16  # k values per block of the int4 layout


def cpu_supported() -> bool:
    """True on an x86 CPU with the AVX2 / FMA / F16C instructions the library is compiled for."""
    return all(flag in cpu_flags() for flag in _CPU_FLAGS)


def _registered() -> None:
    """Raises unless the loaded library registered the ops (the build's check)."""
    torch.ops.dsvl2_quant.int8_linear  # noqa: B018 - attribute access raises if the op is missing
    torch.ops.dsvl2_quant.int4_linear  # noqa: B018


LIBRARY = kernel_build.Library(_NAME, _SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS, check=_registered,
                               cpu_flags=_CPU_FLAGS, depends=[_CSRC / "parallel.h"])  # the included header: build key


def status(on_build_start: Callable[[], None] | None = None) -> KernelStatus:
    """What the quantised kernels are in this process: "off" (DSVL2_KERNELS=0, read at each call), "unsupported"
    (no AVX2 / FMA / F16C), else the first call builds (seconds; `on_build_start` is called just before the
    compiler starts) or loads the cached build, and later calls return that result. Never raises, never prints."""
    return LIBRARY.status(off=off_reason(), supported=cpu_supported(), on_build_start=on_build_start)


def available(on_build_start: Callable[[], None] | None = None) -> bool:
    """True when the kernels can run here; the first call builds them (see `status`)."""
    return status(on_build_start).available


def k16_pack(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] -> the k16 layout (N, ceil(K/16) * 8) uint8."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if k % K16:
        u = F.pad(u, (0, K16 - k % K16), value=8)
    b = u.view(n, -1, 2, 8)  # (N, block, half, j)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, -1)


def k16_unpack(p: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `k16_pack`: (N, ceil(K/16) * 8) uint8 -> int8 (N, K) in [-8, 7]."""
    n = p.shape[0]
    b = p.view(n, -1, 1, 8)  # (N, block, 1, j)
    u = torch.cat((b & 15, b >> 4), dim=2).reshape(n, -1)[:, :k]  # (N, K)
    return u.to(torch.int8) - 8


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (q (N, K) int8 * s (N,))^T; requires `available()`. x float32 or bf16, any strides."""
    return torch.ops.dsvl2_quant.int8_linear(x, q, s)


def int4_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (q4 * s per group of `group` along K)^T, q (N, ceil(K/16) * 8) in the k16 layout and
    s (N, K/G); requires `available()`. x float32 or bf16, any strides."""
    return torch.ops.dsvl2_quant.int4_linear(x, q, s, group)
