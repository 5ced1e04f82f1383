// AMX bf16 tile products for the packed (prefill-sized) paths of the bf16 kernels, on Xeons with AMX-BF16
// (Sapphire Rapids and later). Compiled into the AVX512 library with function-level targets, so the rest of the
// library does not depend on AMX; callers check `amx_ready()` first (the CPU has the tiles and Linux lets this
// process use them) and fall back to the AVX512 micro-kernels (`pair_tile`) otherwise.
//
// The b operand is the layout `pack_pairs` writes for `pair_tile`: pair p of lane j at b + (p * L + j) * 2, holding
// (k[j][2p], k[j][2p + 1]); that is AMX's VNNI layout for B, 16 pairs of 16 lanes being one 16 x 64-byte tile at
// row stride 4L bytes. The a operand is rows as they lie (32 bf16 of each of 16 rows per tile), so K must be a
// multiple of 32 (`amx_fits`) and 16 rows readable from each block's first.
// Per 32 of K, TDPBF16PS adds to each float32 sum the products of 16 pairs, a and b rounded as they are (bf16),
// with denormal inputs read as zero (like VDPBF16PS, which pair_tile uses); only the order of the float32 sums
// differs from the AVX512 path.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dsvl2_kernels_detail {

// True when this CPU has AMX-TILE and AMX-BF16 (cpuid leaf 7, EDX bits 24 and 22) and Linux granted this process
// the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, asked once; oneDNN asks the same way,
// a second request is harmless).
inline bool amx_ready() {
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

inline bool amx_fits(int64_t K) { return K > 0 && K % 32 == 0; }

// Every tile 16 rows x 64 bytes: tmm0-3 the float32 sums, tmm4-5 blocks of a, tmm6-7 blocks of b.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Loads the tile configuration on the calling thread (tile state is per thread) for a run of amx_block calls;
// release with amx_end before the thread leaves the kernel.
__attribute__((target("amx-tile"))) inline void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

__attribute__((target("amx-tile"))) inline void amx_end() { _tile_release(); }

// c's 16 x 16 float32 block i * NB + j (rows of 16) = a block i times b block j over K = 32 * steps: a block i is
// 16 rows at a[i] (row stride lda elements, 32 of each row a step), b block j the pairs at b[j] (row stride ldb
// elements, 16 rows a step). MB, NB in {1, 2}. `prefetch(s)` is called at each step (to bring in what comes next).
template <int MB, int NB, typename Prefetch>
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_block(const c10::BFloat16* const* a, int64_t lda,
                                                                   const c10::BFloat16* const* b, int64_t ldb,
                                                                   int64_t steps, float* c, const Prefetch& prefetch) {
  static_assert(MB >= 1 && MB <= 2 && NB >= 1 && NB <= 2, "amx_block: 1 or 2 blocks of a and of b");
  const int64_t sa = lda * 2, sb = ldb * 2;  // bytes
  asm volatile("" ::: "memory");  // the tile loads' asm does not say it reads memory: stores before it land first
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (MB == 2) _tile_zero(2);
  if constexpr (MB == 2 && NB == 2) _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    prefetch(s);
    _tile_loadd(4, a[0] + 32 * s, sa);
    _tile_loadd(6, b[0] + 16 * s * ldb, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, b[1] + 16 * s * ldb, sb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MB == 2) {
      _tile_loadd(5, a[1] + 32 * s, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  // Sums of a block i, b block j in tile 2i + j.
  _tile_stored(0, c, 64);
  if constexpr (NB == 2) _tile_stored(1, c + 256, 64);
  if constexpr (MB == 2) _tile_stored(2, c + NB * 256, 64);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, c + 3 * 256, 64);
}

// amx_block on run-time block counts mb, nb in {1, 2}.
template <typename Prefetch>
inline void amx_block_any(int mb, int nb, const c10::BFloat16* const* a, int64_t lda, const c10::BFloat16* const* b,
                          int64_t ldb, int64_t steps, float* c, const Prefetch& prefetch) {
  if (mb == 2 && nb == 2) amx_block<2, 2>(a, lda, b, ldb, steps, c, prefetch);
  else if (mb == 2) amx_block<2, 1>(a, lda, b, ldb, steps, c, prefetch);
  else if (nb == 2) amx_block<1, 2>(a, lda, b, ldb, steps, c, prefetch);
  else amx_block<1, 1>(a, lda, b, ldb, steps, c, prefetch);
}

}  // namespace dsvl2_kernels_detail
