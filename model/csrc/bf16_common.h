// Shared pieces of the bf16 CPU kernels (decode_bf16.cpp, attention_bf16.cpp): AVX512-BF16 loads and reductions,
// the weight-streaming tile of the skinny products, and the work-sharing loop. Everything is inline, in
// namespace dsvl2_kernels_detail.
#pragma once

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pair_tile.h"
#include "parallel.h"
#include "prefetch.h"
#include "transpose.h"
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace dsvl2_kernels_detail {

constexpr int kNB = 3;  // weight rows per tile
constexpr int kMB = 8;  // activation rows per tile: kNB * kMB = 24 accumulators, + 3 weight + 1 x of 32 registers
constexpr int64_t kChunkBytes = int64_t{1} << 17;  // weight bytes per unit of work handed to a thread

inline __m512bh load_bf16_masked(const bf16* p, __mmask32 mask) {
  // Lanes past K read as zero, so their products add nothing (any K, odd included).
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}

// [sum of a's lanes, sum of b's, c's, d's]. Quarters (128 bits) are named a0..a3; A, B, C, D are 4-float
// partial sums of a, b, c, d. About 3x fewer instructions than four _mm512_reduce_add_ps.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44),   // [a0 a1 b0 b1]
                                  _mm512_shuffle_f32x4(a, b, 0xEE));  // [a2 a3 b2 b3]
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88),   // [ab0 ab2 cd0 cd2]
                                    _mm512_shuffle_f32x4(ab, cd, 0xDD));  // [ab1 ab3 cd1 cd3] -> [A B C D]
  const __m256 ab4 = _mm512_castps512_ps256(abcd);                                           // [A | B]
  const __m256 cd4 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));  // [C | D]
  const __m256 h1 = _mm256_hadd_ps(ab4, cd4);  // per 128-bit lane: [A01 A23 C01 C23 | B01 B23 D01 D23]
  const __m256 h2 = _mm256_hadd_ps(h1, h1);    // [a c a c | b d b d]
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));  // [a b c d]
}

// y[j, i] = x[j] . w[i] for the NB rows of w at `w` (row stride K) and the MB rows of x at `x` (row stride ldx),
// y's row stride ldy.
// With PREFETCH, each 64-byte load of a weight row also prefetches the same place in the next slab into L2.
template <int NB, int MB, bool PREFETCH>
inline void tile(const bf16* w, const bf16* x, int64_t ldx, bf16* y, int64_t K, int64_t ldy) {
  __m512 acc[NB * MB];  // acc[i * MB + j] for w row i, x row j
  for (int t = 0; t < NB * MB; ++t) acc[t] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) {
      wv[i] = load_bf16(w + i * K + k);
      if (PREFETCH) dsvl2_prefetch::to_l2(w + (kNB + i) * K + k);
    }
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16(x + j * ldx + k);
      for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = load_bf16_masked(w + i * K + k, mask);
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16_masked(x + j * ldx + k, mask);
      for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
    }
  }

  float sums[NB * MB];
  int t = 0;
  for (; t + 4 <= NB * MB; t += 4) _mm_storeu_ps(sums + t, reduce4(acc[t], acc[t + 1], acc[t + 2], acc[t + 3]));
  for (; t < NB * MB; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);
  for (int j = 0; j < MB; ++j)
    for (int i = 0; i < NB; ++i) y[j * ldy + i] = bf16(sums[i * MB + j]);
}

template <int NB, bool PREFETCH>
inline void tile_rows(const bf16* w, const bf16* x, int64_t ldx, bf16* y, int64_t rows, int64_t K, int64_t ldy) {
  static_assert(kMB == 8, "one case per row count up to kMB");
  switch (rows) {
    case 8: tile<NB, 8, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 7: tile<NB, 7, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 6: tile<NB, 6, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 5: tile<NB, 5, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 4: tile<NB, 4, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 3: tile<NB, 3, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 2: tile<NB, 2, PREFETCH>(w, x, ldx, y, K, ldy); break;
    case 1: tile<NB, 1, PREFETCH>(w, x, ldx, y, K, ldy); break;
    default: break;
  }
}

// y[:, n0:n1] for all M rows of x (row stride ldx), rows n0..n1 of w (a multiple of NB of them). Row block by row
// block: the first block streams the weight in (and prefetches ahead), the others find it in L2 (n1 - n0 rows of w
// are at most ~kChunkBytes), while x's current block of kMB rows stays in L1.
template <int NB>
inline void rows(const bf16* w, const bf16* x, int64_t ldx, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K,
                 int64_t N) {
  for (int64_t n = n0; n < n1; n += NB) tile_rows<NB, true>(w + n * K, x, ldx, y + n, std::min<int64_t>(M, kMB), K, N);
  for (int64_t m = kMB; m < M; m += kMB)
    for (int64_t n = n0; n < n1; n += NB)
      tile_rows<NB, false>(w + n * K, x + m * ldx, ldx, y + m * N + n, std::min<int64_t>(M - m, kMB), K, N);
}

// Read-once prefetches (prefetchnta: nothing reads the weight again) kStreamAhead bytes ahead of a forward read of
// [start, end), running on past `end` into what the thread reads next (its share's next unit, parallel.h).
constexpr int64_t kStreamAhead = 4096;
struct StreamAhead {
  const char* next;
  const char* stop;
  StreamAhead(const void* start, const void* end)
      : next(static_cast<const char*>(start) + kStreamAhead), stop(static_cast<const char*>(end) + kStreamAhead) {}
  // Prefetches up to kStreamAhead bytes past `read_to`, where the reads are about to go.
  void before(const void* read_to) {
    for (const char* to = std::min(static_cast<const char*>(read_to) + kStreamAhead, stop); next < to; next += 64)
      dsvl2_prefetch::streamed(next);
  }
};

// y[n0:n1] = x . w[n] for one row of x: the weight rows read one after another as a single forward stream (they are
// contiguous), read-once prefetches ahead, two accumulators per row. On a 2-core Zen 5 this read a weight at 1.17x
// (with an L2 prefetch) to 1.31x (read-once) the rate of the 3-row tiles' three interleaved streams, 92% of a plain
// sum's rate (bench/stream_rows.cpp).
inline void stream_one(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t K) {
  StreamAhead ahead(w + n0 * K, w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* r = w + n * K;
    ahead.before(r + K);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, load_bf16(r + k), load_bf16(x + k));
      a1 = _mm512_dpbf16_ps(a1, load_bf16(r + k + 32), load_bf16(x + k + 32));
    }
    for (; k < K; k += 32) {  // a last 32 and the masked tail
      const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
      a0 = _mm512_dpbf16_ps(a0, load_bf16_masked(r + k, mask), load_bf16_masked(x + k, mask));
    }
    y[n] = bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
  }
}

// `stream_one` for MB (2..kMB) rows of x at stride ldx, y's row stride ldy: one accumulator per row of x. At 2-6
// rows 1.2-1.35x the tiles on the Zen 5, even at 8.
template <int MB>
inline void stream_few(const bf16* w, const bf16* x, int64_t ldx, bf16* y, int64_t ldy, int64_t n0, int64_t n1,
                       int64_t K) {
  StreamAhead ahead(w + n0 * K, w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* r = w + n * K;
    ahead.before(r + K);
    __m512 acc[MB];
    for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
      const __m512bh wv = load_bf16_masked(r + k, mask);
      for (int j = 0; j < MB; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], wv, load_bf16_masked(x + j * ldx + k, mask));
    }
    for (int j = 0; j < MB; ++j) y[j * ldy + n] = bf16(_mm512_reduce_add_ps(acc[j]));
  }
}

// The most bytes of x that `stream_few` streams against: every weight line meets all M rows of x, so they must stay
// in L1 beside the stream (half of a 48 KB L1D). Past it the tiles, which load x once per kNB weight lines, win: on
// the Zen 5, Small's lm_head (K = 2,048) at 8 rows (32 KB of x) streamed at 20-25 GB/s against the tiles' 30-31,
// while 6 rows (24 KB) streamed at 58-60 against 40-43, and Tiny's 8 rows (K = 1,280, 20 KB) ran even.
constexpr int64_t kStreamXBytes = 24 << 10;

// y[:, n0:n1] for any span: one row of x, or up to kMB rows of at most kStreamXBytes, stream the weight
// (`stream_one`, `stream_few`); more take tiles of kNB weight rows, then the last (n1 - n0) % kNB rows one by one.
// x's rows are K long at stride ldx (K unless given), y's stride is N.
inline void span(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N,
                 int64_t ldx = -1) {
  if (ldx < 0) ldx = K;
  static_assert(kMB == 8, "one case per row count up to kMB");
  switch (M * K * static_cast<int64_t>(sizeof(bf16)) <= kStreamXBytes || M == 1 ? M : 0) {
    case 1: return stream_one(w, x, y, n0, n1, K);
    case 2: return stream_few<2>(w, x, ldx, y, N, n0, n1, K);
    case 3: return stream_few<3>(w, x, ldx, y, N, n0, n1, K);
    case 4: return stream_few<4>(w, x, ldx, y, N, n0, n1, K);
    case 5: return stream_few<5>(w, x, ldx, y, N, n0, n1, K);
    case 6: return stream_few<6>(w, x, ldx, y, N, n0, n1, K);
    case 7: return stream_few<7>(w, x, ldx, y, N, n0, n1, K);
    case 8: return stream_few<8>(w, x, ldx, y, N, n0, n1, K);
    default: break;
  }
  const int64_t full = n0 + (n1 - n0) / kNB * kNB;
  rows<kNB>(w, x, ldx, y, n0, full, M, K, N);
  rows<1>(w, x, ldx, y, full, n1, M, K, N);
}

using dsvl2_parallel::run_units;

// Rows of a weight of `row_bytes` per row handed out as one unit: ~kChunkBytes, a multiple of kNB.
inline int64_t rows_per_unit(int64_t row_bytes) {
  return std::max<int64_t>(kNB, kChunkBytes / row_bytes / kNB * kNB);
}

// bf16 -> float32 for 16 values (bf16 is the top half of a float32); lanes past `mask` read as zero.
inline __m512 load16_f32(const bf16* p, __mmask16 mask) {
  const __m512i raw = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(mask), reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
}

// The same for 16 whole values. Loops that accumulate in an array of registers use this one where they can: with a
// masked load in the loop, GCC 12 -O3 keeps storing the accumulators to the stack on every iteration (a store per
// multiply-add: 2-3x slower sums of probabilities times values).
inline __m512 load16_f32(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// load16_f32 of the lanes of `mask` where TAIL, of all 16 where not (the mask is then all ones).
template <bool TAIL>
inline __m512 load16_f32_of(const bf16* p, __mmask16 mask) {
  if constexpr (TAIL) return load16_f32(p, mask);
  return load16_f32(p);
}

inline __mmask16 tail_mask(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

inline __m512 round_bf16(__m512 v) {  // float32 -> nearest bf16 (ties to even) -> float32
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The lanes of `mask` of v rounded to bf16 (nearest, ties to even) at p[0..15].
inline void store_bf16(bf16* p, __m512 v, __mmask16 mask) {
  const __m512i h = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));  // the 16 bf16 in the low half
  _mm512_mask_storeu_epi16(reinterpret_cast<void*>(p), static_cast<__mmask32>(mask), h);
}

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, times 2^n (scalef). Relative
// error ~2e-7 (a couple of float ulps); x below -87 gives 0, as expf underflows.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 y = _mm512_set1_ps(1.0f / 720);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(y, n));
}

// The short-query paths' softmax of one query row, in place: p[0..n) holds the raw float32 scores of the slots the
// query sees; they become float32(bf16(softmax(scale * score))), as torch computes it (max, exp of the difference,
// sum, divide in float32, probabilities rounded to bf16), and p[n..width) zero, so that callers may sum several
// query rows over the same slots.
inline void softmax_row_bf16(float* p, int64_t n, int64_t width, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail_mask(n - s);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + s), vscale);
    _mm512_mask_storeu_ps(p + s, m, x);
    top = _mm512_mask_max_ps(top, m, top, x);
  }
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail_mask(n - s);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s), shift)));
    _mm512_mask_storeu_ps(p + s, m, e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = tail_mask(n - s);
    _mm512_mask_storeu_ps(p + s, m, round_bf16(_mm512_div_ps(_mm512_maskz_loadu_ps(m, p + s), sum)));
  }
  std::fill(p + n, p + width, 0.0f);
}

// Rows of a matrix (attention keys, expert weights) into pairs along their length, the layout `pair_tile` reads as
// its b: out[p][j] = (k[j][2p], k[j][2p + 1]) for p < ceil(D / 2), j < Lkp, rows Lk of length D at stride ldk (zero
// past Lk and D). Blocks of 16 rows x 16 pairs are read as 64-byte row pieces (sequential, prefetch-friendly, where
// a 32-bit gather per pair touched 16 cache lines) and transposed in registers.
inline void pack_pairs(const bf16* k, int64_t ldk, int64_t Lk, int64_t D, int64_t Lkp, bf16* out) {
  const int64_t Dp = (D + 1) / 2;
  __m512i r[16];
  for (int64_t j = 0; j < Lkp; j += 16) {
    const int64_t rows = std::clamp<int64_t>(Lk - j, 0, 16);
    for (int64_t p = 0; p < Dp; p += 16) {
      const int64_t left = D - 2 * p;  // elements of each row from pair p on
      const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t{1} << left) - 1);
      for (int64_t i = 0; i < 16; ++i) {
        if (i >= rows) {
          r[i] = _mm512_setzero_si512();
          continue;
        }
        const bf16* src = k + (j + i) * ldk + 2 * p;
        dsvl2_prefetch::to_l1(src + 4 * 32);  // 4 blocks ahead in the row
        r[i] = _mm512_maskz_loadu_epi16(m, src);
      }
      transpose16(r);
      for (int64_t q = 0; q < std::min<int64_t>(16, Dp - p); ++q)
        _mm512_storeu_si512(reinterpret_cast<void*>(out + ((p + q) * Lkp + j) * 2), r[q]);
    }
  }
}

}  // namespace dsvl2_kernels_detail
