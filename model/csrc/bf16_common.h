// Shared pieces of the bf16 CPU kernels (decode_bf16.cpp, attention_bf16.cpp): AVX512-BF16 loads and reductions,
// the weight-streaming tile of the skinny products, and the work-sharing loop. Everything is inline, in
// namespace dsvl2_kernels_detail.
#pragma once

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace dsvl2_kernels_detail {

using bf16 = c10::BFloat16;

constexpr int kNB = 3;  // weight rows per tile
constexpr int kMB = 8;  // activation rows per tile: kNB * kMB = 24 accumulators, + 3 weight + 1 x of 32 registers
constexpr int64_t kChunkBytes = int64_t{1} << 17;  // weight bytes per unit of work handed to a thread

inline __m512bh load_bf16(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

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

// y[j, i] = x[j] . w[i] for the NB rows of w at `w` and the MB rows of x at `x` (row strides K; y's is ldy).
// With PREFETCH, each 64-byte load of a weight row also prefetches the same place in the next slab into L2.
template <int NB, int MB, bool PREFETCH>
inline void tile(const bf16* w, const bf16* x, bf16* y, int64_t K, int64_t ldy) {
  __m512 acc[NB * MB];  // acc[i * MB + j] for w row i, x row j
  for (int t = 0; t < NB * MB; ++t) acc[t] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) {
      wv[i] = load_bf16(w + i * K + k);
      if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(w + (kNB + i) * K + k), _MM_HINT_T1);
    }
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16(x + j * K + k);
      for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = load_bf16_masked(w + i * K + k, mask);
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16_masked(x + j * K + k, mask);
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
inline void tile_rows(const bf16* w, const bf16* x, bf16* y, int64_t rows, int64_t K, int64_t ldy) {
  static_assert(kMB == 8, "one case per row count up to kMB");
  switch (rows) {
    case 8: tile<NB, 8, PREFETCH>(w, x, y, K, ldy); break;
    case 7: tile<NB, 7, PREFETCH>(w, x, y, K, ldy); break;
    case 6: tile<NB, 6, PREFETCH>(w, x, y, K, ldy); break;
    case 5: tile<NB, 5, PREFETCH>(w, x, y, K, ldy); break;
    case 4: tile<NB, 4, PREFETCH>(w, x, y, K, ldy); break;
    case 3: tile<NB, 3, PREFETCH>(w, x, y, K, ldy); break;
    case 2: tile<NB, 2, PREFETCH>(w, x, y, K, ldy); break;
    case 1: tile<NB, 1, PREFETCH>(w, x, y, K, ldy); break;
    default: break;
  }
}

// y[:, n0:n1] for all M rows of x, rows n0..n1 of w (a multiple of NB of them). Row block by row block: the
// first block streams the weight in (and prefetches ahead), the others find it in L2 (n1 - n0 rows of w are at
// most ~kChunkBytes), while x's current block of kMB rows stays in L1.
template <int NB>
inline void rows(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N) {
  for (int64_t n = n0; n < n1; n += NB) tile_rows<NB, true>(w + n * K, x, y + n, std::min<int64_t>(M, kMB), K, N);
  for (int64_t m = kMB; m < M; m += kMB)
    for (int64_t n = n0; n < n1; n += NB)
      tile_rows<NB, false>(w + n * K, x + m * K, y + m * N + n, std::min<int64_t>(M - m, kMB), K, N);
}

// y[:, n0:n1] for any span: tiles of kNB weight rows, then the last (n1 - n0) % kNB rows one by one.
inline void span(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N) {
  const int64_t full = n0 + (n1 - n0) / kNB * kNB;
  rows<kNB>(w, x, y, n0, full, M, K, N);
  rows<1>(w, x, y, full, n1, M, K, N);
}

// Runs work(unit) for units 0..units-1 on the intra-op threads; threads take units from a shared counter, so a
// thread that starts late (another process on its core) does not hold up the rest.
template <typename Work>
void run_units(int64_t units, const Work& work) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), units);
  if (workers <= 0) return;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed))
      work(u);
  });
}

// Rows of a weight of `row_bytes` per row handed out as one unit: ~kChunkBytes, a multiple of kNB.
inline int64_t rows_per_unit(int64_t row_bytes) {
  return std::max<int64_t>(kNB, kChunkBytes / row_bytes / kNB * kNB);
}

// bf16 -> float32 for 16 values (bf16 is the top half of a float32); lanes past `mask` read as zero.
inline __m512 load16_f32(const bf16* p, __mmask16 mask) {
  const __m512i raw = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(mask), reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
}

inline __mmask16 tail_mask(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

inline __m512bh bcast_pair(const bf16* p) {  // (p[0], p[1]) in all 16 pair lanes
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

}  // namespace dsvl2_kernels_detail
