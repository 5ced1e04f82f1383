"""Kernel tests run both ways of multiplying where the CPU has a choice: AVX512's micro-kernels everywhere the
kernels build, and AMX's tiles where the CPU has them and the OS grants them."""

from __future__ import annotations

import pytest

from dsvl2.model import kernels

AMX_OR_NOT = pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])


def amx_or_skip(amx: bool) -> None:
    if amx and not kernels.amx_ready():
        pytest.skip("this CPU has no AMX-BF16 tiles (or the OS does not grant them)")
