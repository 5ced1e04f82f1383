"""Names the runtime accepts for devices and dtypes, and what this CPU can do: one table and one probe,
read by loading (dsvl2.model.loading), the kernels and the option checks. Importing this module imports
no torch, so the CLI can check `--device` and `--dtype` before a model is needed."""

from __future__ import annotations

import functools
import re
from pathlib import Path

# Every dtype spelling we accept → the torch dtype's name.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str) -> str | None:
    """Why `device` is not one we accept (None when it is: auto, cpu, cuda or cuda:N)."""
    return None if _DEVICE.fullmatch(device) else f"must be auto, cpu, cuda or cuda:N, not {device!r}"


def check_dtype(dtype: str) -> str | None:
    """Why `dtype` is not one we accept (None when it is: auto or a name in DTYPE_NAMES)."""
    if dtype == "auto" or dtype in DTYPE_NAMES:
        return None
    return f"must be auto, {', '.join(DTYPE_NAMES)}, not {dtype!r}"


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once (empty where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return frozenset(_cpuinfo().split())


def vendor_of(cpuinfo: str) -> str:
    """The first vendor_id in a /proc/cpuinfo text ("AuthenticAMD", "GenuineIntel"), empty where there is none."""
    found = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    return found.group(1) if found else ""


def cpu_vendor() -> str:
    """This CPU's vendor_id (`vendor_of` /proc/cpuinfo)."""
    return vendor_of(_cpuinfo())


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 dot products (AVX512-BF16 or AMX), where torch's bf16 matrix
    products run faster than float32 instead of being emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
