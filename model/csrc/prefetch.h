// Software prefetches that the compiler keeps, for both compiled libraries (no vector instructions here).
//
// GCC (12 here) deletes a helper made only of _mm_prefetch / __builtin_prefetch where it reaches it through a call
// it analyses apart (a lambda handed to a template, an inline function not inlined yet): the builtin counts as no
// side effect, so the helper is found const, and a call to a const function whose result is unused is dead code.
// That silently removed the routed experts' L2 prefetches on AMX (moe_bf16.cpp's spread_prefetch) and the quantised
// AMX path's next-strip prefetch (quant_amx.h), while the same instruction written inline in a loop survived. An
// `asm volatile` statement is never deleted, so every software prefetch goes through these.
//
// The address goes in as a register ("r"), not as the memory it names ("m"(*p)): a memory operand tells GCC the
// statement reads that byte, which a char pointer may alias with anything in memory, so every accumulator a tile
// keeps in a local array (acc[MB][NB]) was stored to the stack on every iteration before the prefetch, in every
// tile that prefetches: 16 stores of 64 bytes per 16 VDPBF16PS in int8's 8-row tile, which took twice as long with
// them (Tiny's lm_head at 8 rows on a Zen 5: 9.1 -> 4.6 ms). A register operand reads nothing as far as the compiler
// knows; the loops keep their sums in registers.
#pragma once

namespace dsvl2_prefetch {

// The cache line at p into L1 (and L2): prefetcht0. Never faults; p need not be valid.
inline void to_l1(const void* p) { asm volatile("prefetcht0 (%0)" : : "r"(p)); }

// The cache line at p into L2: prefetcht1. Never faults; p need not be valid.
inline void to_l2(const void* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

// The cache line at p for one read soon, kept out of the outer caches where the CPU can: prefetchnta. Never faults.
inline void streamed(const void* p) { asm volatile("prefetchnta (%0)" : : "r"(p)); }

// The cache line at p of a weight a decode step reads once (the quantised products' tiles): with
// DSVL2_STREAM_WEIGHTS defined (model/quant_kernels.py defines it for AMD CPUs) prefetchnta, so that the step's
// hundreds of MB of weights do not push out of L2 and L3 what the rest of the step reads again (the norms',
// attention's and routing's data, the interpreter's own objects); prefetcht0 elsewhere. A compile-time choice: a
// test of a flag in the loop made GCC keep a tile's sums on the stack (tests/test_prefetch.py). Figures in
// bench/RESULTS.md; untimed on Intel, which keeps prefetcht0.
inline void weights(const void* p) {
#ifdef DSVL2_STREAM_WEIGHTS
  streamed(p);
#else
  to_l1(p);
#endif
}

}  // namespace dsvl2_prefetch
