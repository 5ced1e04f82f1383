// What one step of the quantised AMX strips (model/csrc/quant_amx.h) costs on this CPU, one thread, and what two
// changes to it would gain: a model of the kernel's inner loop, not the kernel (no bookkeeping, no prefetches,
// weights from a 1 MB buffer that stays in L2, activations' pairs from 40-60 KB as the lm_head's K = 1,280 has them).
//   int4 (16 weight rows x 32 k = 512 weights a step, as Int4Tiles::step): per block of 4 rows one 64-byte load and
//        per row a byte permutation, a shift, a mask, a table lookup and a store of 32 bf16; then a tile load of
//        that buffer, one of x's pairs, one TDPBF16PS. Printed: the step as the kernel runs it (the tiles load what
//        the dequantising just stored), the same with the tiles loading another buffer (what waiting on those
//        stores costs), the dequantising alone, the tiles alone, and the dequantising two steps ahead of the tiles
//        in a ring of 4 buffers (tried in the kernel: ~10% from cache, nothing from memory; not kept).
//   int8 on AMX's int8 product, not built (1,024 weights a step: 16 rows x 64 k): the "r4" layout's 4 lines of a
//        block (4 rows x 16 k each) turned into 4 rows of 64 k by a 4 x 4 transpose of 128-bit lanes, stored two
//        steps ahead in a ring; a tile load of it, three of x's parts (x as 21-bit fixed point in three 7-bit
//        parts), three TDPBSSD. Printed: all of it, the transpose alone, the tiles alone, the tiles with x's parts
//        staying in L1. Against the int4 line, per 1,024 weights: twice its figures.
// Nanoseconds a step; operands are arbitrary (the figures are speeds). bench/RESULTS.md has this host's figures.
//
//     g++ -O2 -march=sapphirerapids bench/amx_strips.cpp -o /tmp/strips && lscpu | grep 'Model name' && /tmp/strips
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace {

struct alignas(64) TileConfig {  // palette 1, every tile 16 rows x 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

constexpr long kWeightBytes = 1 << 20;
alignas(64) uint8_t weights[kWeightBytes];
alignas(64) uint8_t pairs[60][1024];  // x's operand, 1 KB a tile
alignas(64) uint8_t ring[4][1024], other[2][1024];
alignas(64) float sums[256];
__m512i index_[4], table_[16];

using Clock = std::chrono::steady_clock;

double ns(Clock::time_point a, long steps) {
  return std::chrono::duration<double, std::nano>(Clock::now() - a).count() / static_cast<double>(steps);
}

enum Mode { kAsRun, kOtherBuffer, kDequantOnly, kTilesOnly, kTwoAhead };

template <Mode M>
__attribute__((noinline)) double int4_step(long steps) {
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  constexpr __mmask64 kLowBytes = 0x5555555555555555ull;
  constexpr __mmask32 kHighNibble = 0xFF00FF00u;
  _tile_zero(0);
  _tile_zero(1);
  long off = 0;
  const auto t0 = Clock::now();
  for (long t = 0; t < steps; ++t) {
    uint8_t* out = M == kTwoAhead ? ring[t & 3] : ring[t & 1];
    if (M != kTilesOnly) {
      for (int b = 0; b < 4; ++b) {
        const __m512i v = _mm512_load_si512(weights + off);
        off = (off + 64) % kWeightBytes;
        for (int j = 0; j < 4; ++j) {
          __m512i x = _mm512_maskz_permutexvar_epi8(kLowBytes, index_[j], v);
          x = _mm512_and_si512(_mm512_mask_srli_epi16(x, kHighNibble, x, 4), nibble);
          _mm512_store_si512(out + (4 * b + j) * 64, _mm512_permutexvar_epi16(x, table_[4 * b + j]));
        }
      }
    }
    asm volatile("" ::: "memory");
    if (M == kDequantOnly) continue;
    const void* a = M == kAsRun ? out : M == kTwoAhead ? ring[(t + 2) & 3] : other[t & 1];
    if (t & 1) {
      _tile_loadd(5, a, 64);
      _tile_loadd(7, pairs[t % 40], 64);
      _tile_dpbf16ps(1, 5, 7);
    } else {
      _tile_loadd(4, a, 64);
      _tile_loadd(6, pairs[t % 40], 64);
      _tile_dpbf16ps(0, 4, 6);
    }
  }
  const double r = ns(t0, steps);
  _tile_stored(0, sums, 64);
  return r;
}

enum Int8Mode { kAll, kTransposeOnly, kTiles, kTilesL1 };

template <Int8Mode M>
__attribute__((noinline)) double int8_step(long steps) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  long off = 0;
  const auto t0 = Clock::now();
  for (long t = 0; t < steps; ++t) {
    if (M == kAll || M == kTransposeOnly) {
      uint8_t* out = ring[t & 3];
      for (int b = 0; b < 4; ++b) {  // rows 4b .. 4b + 3: their 4 steps of 16 k, 64 bytes a line
        const uint8_t* p = weights + off;
        off = (off + 256) % kWeightBytes;
        const __m512i l0 = _mm512_load_si512(p), l1 = _mm512_load_si512(p + 64);
        const __m512i l2 = _mm512_load_si512(p + 128), l3 = _mm512_load_si512(p + 192);
        const __m512i t0 = _mm512_shuffle_i64x2(l0, l1, 0x44), t1 = _mm512_shuffle_i64x2(l0, l1, 0xEE);
        const __m512i t2 = _mm512_shuffle_i64x2(l2, l3, 0x44), t3 = _mm512_shuffle_i64x2(l2, l3, 0xEE);
        _mm512_store_si512(out + (4 * b + 0) * 64, _mm512_shuffle_i64x2(t0, t2, 0x88));
        _mm512_store_si512(out + (4 * b + 1) * 64, _mm512_shuffle_i64x2(t0, t2, 0xDD));
        _mm512_store_si512(out + (4 * b + 2) * 64, _mm512_shuffle_i64x2(t1, t3, 0x88));
        _mm512_store_si512(out + (4 * b + 3) * 64, _mm512_shuffle_i64x2(t1, t3, 0xDD));
      }
    }
    asm volatile("" ::: "memory");
    if (M == kTransposeOnly) continue;
    const uint8_t* x = pairs[M == kTilesL1 ? 0 : (3 * t) % 57];
    _tile_loadd(3, ring[(t + 2) & 3], 64);
    _tile_loadd(5, x, 64);
    _tile_dpbssd(0, 3, 5);
    _tile_loadd(6, x + 1024, 64);
    _tile_dpbssd(1, 3, 6);
    _tile_loadd(7, x + 2048, 64);
    _tile_dpbssd(2, 3, 7);
  }
  const double r = ns(t0, steps);
  _tile_stored(0, sums, 64);
  return r;
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    std::puts("Linux did not grant AMX's tiles");
    return 1;
  }
  const TileConfig config;
  _tile_loadconfig(&config);
  for (long i = 0; i < kWeightBytes; ++i) weights[i] = static_cast<uint8_t>(i * 7);
  for (int j = 0; j < 4; ++j) index_[j] = _mm512_set1_epi16(static_cast<short>(j));
  for (int j = 0; j < 16; ++j) table_[j] = _mm512_set1_epi16(static_cast<short>(0x3f80 + j));
  const long n = 2'000'000;
  for (int round = 0; round < 3; ++round) {
    std::printf("int4 strip step (512 weights), ns: as run %.1f | tiles on another buffer %.1f | dequantise only %.1f"
                " | tiles only %.1f | two ahead %.1f\n",
                int4_step<kAsRun>(n), int4_step<kOtherBuffer>(n), int4_step<kDequantOnly>(n),
                int4_step<kTilesOnly>(n), int4_step<kTwoAhead>(n));
    std::printf("int8 on TDPBSSD (1,024 weights), ns: all %.1f | transpose only %.1f | tiles only %.1f"
                " | tiles, x in L1 %.1f\n",
                int8_step<kAll>(n / 2), int8_step<kTransposeOnly>(n / 2), int8_step<kTiles>(n / 2),
                int8_step<kTilesL1>(n / 2));
  }
  _tile_release();
  return 0;
}
