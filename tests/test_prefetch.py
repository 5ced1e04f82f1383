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


# A tile as quant_avx512.h's int8_tile512_bf16 writes it: sums in a local array, a prefetch in the loop.
TILE = r"""
#include "prefetch.h"
#include <immintrin.h>
#include <cstdint>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

void tile(const int8_t* r, const uint16_t* x, int64_t ldx, float* y, int64_t steps) {
  __m512 acc[4][2];
  for (int m = 0; m < 4; ++m) acc[m][0] = _mm512_setzero_ps(), acc[m][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < steps; ++t, r += 64) {
    dsvl2_prefetch::WHICH(r + 8192);
    const __m512bh w0 = (__m512bh)_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)));
    const __m512bh w1 = (__m512bh)_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 32)));
    for (int m = 0; m < 4; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + t * 32);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
    }
  }
  for (int m = 0; m < 4; ++m) y[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}
"""


def _loops(assembly: str) -> list[list[str]]:
    """The bodies of the loops in `assembly`: the lines from a label to a jump back to it."""
    lines = [line.strip() for line in assembly.splitlines()]
    at = {line[:-1]: i for i, line in enumerate(lines) if line.startswith(".L") and line.endswith(":")}
    bodies = []
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("j") and at.get(parts[1], i) < i:
            bodies.append(lines[at[parts[1]]:i + 1])
    return bodies


@pytest.mark.parametrize("which", ["to_l1", "to_l2", "streamed", "weights"])
@pytest.mark.parametrize("library", [kernels, quant_kernels], ids=["bf16", "quant"])
def test_a_prefetch_leaves_a_tiles_sums_in_registers(library, which):
    """Catches a prefetch written with its address as a memory operand ("m"(*p)): GCC then takes the statement as
    reading memory any char pointer may reach, and stores every sum of the loop's local array to the stack on
    every iteration before it (int8's 8-row tile spent 16 stores of 64 bytes per 16 VDPBF16PS, ~2x its time)."""
    flags = [f for f in library._CFLAGS if f != "-fopenmp"]
    loops = [body for body in _loops(_assembly(TILE.replace("WHICH", which), flags))
             if any(line.startswith("vdpbf16ps") for line in body)]
    assert loops, "the tile's loop was not found in the assembly"
    for body in loops:
        assert any(line.startswith("prefetch") for line in body), "the prefetch left the loop"
        stores = [line for line in body if line.startswith("vmov") and "%zmm" in line.split(",")[0]
                  and line.endswith(("(%rsp)", "(%rbp)"))]
        assert not stores, f"sums stored to the stack in the loop: {stores[:4]}"


def test_the_quantised_tiles_prefetch_weights_for_one_read_on_amd():
    """prefetch.h's `weights` in the quantised library's build: prefetchnta on AMD CPUs (the build defines
    DSVL2_STREAM_WEIGHTS there), prefetcht0 elsewhere; catches the define or the header's branch gone."""
    from dsvl2.model.devices import cpu_vendor

    flags = [f for f in quant_kernels._CFLAGS if f != "-fopenmp"]
    amd = cpu_vendor() == "AuthenticAMD"
    assert ("-DDSVL2_STREAM_WEIGHTS" in flags) == amd
    loops = [body for body in _loops(_assembly(TILE.replace("WHICH", "weights"), flags))
             if any(line.startswith("vdpbf16ps") for line in body)]
    prefetches = {line.split()[0] for body in loops for line in body if line.startswith("prefetch")}
    assert prefetches == ({"prefetchnta"} if amd else {"prefetcht0"})
    other = [f for f in flags if f != "-DDSVL2_STREAM_WEIGHTS"] + ([] if amd else ["-DDSVL2_STREAM_WEIGHTS"])
    loops = [body for body in _loops(_assembly(TILE.replace("WHICH", "weights"), other))
             if any(line.startswith("vdpbf16ps") for line in body)]
    assert {line.split()[0] for body in loops for line in body if line.startswith("prefetch")} == (
        {"prefetcht0"} if amd else {"prefetchnta"})


def test_the_vendor_is_read_from_cpuinfo():
    """The define above follows devices.cpu_vendor: the first vendor_id line of /proc/cpuinfo, none without one."""
    from dsvl2.model.devices import vendor_of

    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nflags\t\t: fpu avx2\n"
    assert vendor_of(amd) == "AuthenticAMD"
    assert vendor_of(amd.replace("AuthenticAMD", "GenuineIntel") + "vendor_id : Other\n") == "GenuineIntel"
    assert vendor_of("flags : vendor_id avx2\n") == ""
