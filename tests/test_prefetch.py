"""model/csrc/prefetch.h: a software prefetch reached the way the routed experts' AMX blocks reach theirs (a helper
made of nothing but prefetches, called from a lambda handed to a template) is in the code the compiler emits.

Written with _mm_prefetch, GCC 12 found that helper const and deleted its calls, so the experts' next-block L2
prefetch and the quantised AMX path's next-strip prefetch were missing from the built libraries; the test compiles
that pattern with the kernels' own flags and reads the assembly. Where no C++ compiler exists the kernels are not
built either, and the test has nothing to check.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dsvl2.model import kernels, quant_kernels

CSRC = Path(kernels.__file__).resolve().parent / "csrc"

# The pattern of moe_bf16.cpp (prefetch_piece, spread_prefetch, amx_block) and quant_amx.h (NextStrip::touch).
PATTERN = r"""
#include "prefetch.h"
#include <cstdint>

inline void piece(const char* p, int64_t bytes, int64_t part, int64_t parts) {
  for (int64_t o = bytes * part / parts / 64 * 64; o < bytes * (part + 1) / parts; o += 64)
    dsvl2_prefetch::WHICH(p + o);
}

inline auto spread(const char* next, int64_t bytes, int64_t call, int64_t calls, int64_t steps) {
  return [=](int64_t s) { piece(next, bytes, call * steps + s, calls * steps); };
}

template <typename Prefetch>
__attribute__((noinline)) void steps(float* c, int64_t n, const Prefetch& prefetch) {
  for (int64_t s = 0; s < n; ++s) {
    prefetch(s);
    c[s] += 1.0f;
  }
}

void run(const char* next, float* c, int64_t n, int64_t call) { steps(c, n, spread(next, 40960, call, 3, n)); }
"""


def _assembly(source: str, cflags: list[str]) -> str:
    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler here (the kernels are not built either)")
    done = subprocess.run([cxx, *cflags, "-S", "-o", "-", "-I", str(CSRC), "-x", "c++", "-"], input=source,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("which", "instruction"), [("to_l2", "prefetcht1"), ("to_l1", "prefetcht0")])
@pytest.mark.parametrize("library", [kernels, quant_kernels], ids=["bf16", "quant"])
def test_a_prefetch_through_a_lambda_survives_the_optimiser(library, which, instruction):
    flags = [f for f in library._CFLAGS if f != "-fopenmp"]
    assert instruction in _assembly(PATTERN.replace("WHICH", which), flags)


def test_every_library_lists_the_header_in_its_build_key():
    """A change to prefetch.h rebuilds both libraries (it is part of each build key)."""
    assert CSRC / "prefetch.h" in kernels._DEPENDS
    assert CSRC / "prefetch.h" in quant_kernels._HEADERS
