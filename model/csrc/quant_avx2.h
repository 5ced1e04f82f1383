// The building blocks of the weight-only int8 / int4 kernels (quant_avx2.cpp: the products; quant_moe.cpp: a MoE
// layer's routed experts in one call), AVX2 + FMA. See quant_avx2.cpp for the layouts and the tiling.
#pragma once

#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "parallel.h"
#include "prefetch.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dsvl2_quant_detail {

constexpr int64_t kChunkBytes = int64_t{1} << 16;  // weight bytes per unit of work handed to a thread

using dsvl2_parallel::run_units;

constexpr int64_t kPrefetchBytes = 1024;  // how far ahead of a one-row tile its weight is prefetched

inline void prefetch(const void* p) { dsvl2_prefetch::weights(p); }  // see prefetch.h

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline float scale_at(const float* s, int64_t i) { return s[i]; }
inline float scale_at(const c10::BFloat16* s, int64_t i) { return static_cast<float>(s[i]); }

// block(std::integral_constant<int, MB>, m) over row blocks covering [0, M): blocks of Max rows, then one block
// of the rest (tiles of 3 here, `float_tile`'s 3 x 4 sums; 4 in quant_avx512.h).
template <int Max, typename Block>
void row_blocks(int64_t M, const Block& block) {
  int64_t m = 0;
  for (; m + Max <= M; m += Max) block(std::integral_constant<int, Max>{}, m);
  if constexpr (Max > 1) {
    if (M > m) row_blocks<Max - 1>(M - m, [&](auto tag, int64_t i) { block(tag, m + i); });
  }
}

// fn(pointer to s's data) with s float32 or bf16 (checked by the caller).
template <typename Fn>
void with_scales(const at::Tensor& s, const Fn& fn) {
  if (s.scalar_type() == at::kFloat) {
    fn(s.const_data_ptr<float>());
  } else {
    fn(s.const_data_ptr<c10::BFloat16>());
  }
}

// x (M, K) in `dtype` (float32 for these tiles; bf16 for quant_avx512.h's int4), rows at stride ldx >= K with zeros
// past K (int4 reads whole 16-k blocks).
inline at::Tensor padded_rows(const at::Tensor& x, int64_t ldx, at::ScalarType dtype = at::kFloat) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf = at::empty({M, ldx}, x.options().dtype(dtype));
  if (ldx > K) xf.narrow(1, K, ldx - K).zero_();
  xf.narrow(1, 0, K).copy_(x);
  return xf;
}

// Rows of the blocked layouts (see the top): row n of the weight starts in block n / 4 at byte (n % 4) * W, and
// its next 16 k are kRowsPerBlock * W bytes further on. Rows past N (the last block's padding) are zero weights;
// tiles never cross a block (NB divides 4) and skip the outputs of padded rows.
constexpr int64_t kRowsPerBlock = 4;

template <typename T, int W>
struct Blocked {
  const T* base;
  int64_t block_bytes;  // bytes per block of 4 rows: steps * 4 * W
  static constexpr int64_t kStep = kRowsPerBlock * W;  // bytes from one 16-k step of a row to its next
  const T* row(int64_t n) const { return base + (n / kRowsPerBlock) * block_bytes + (n % kRowsPerBlock) * W; }
};

// tile(std::integral_constant<int, MB>, m, n) over the tiles of rows [n0, n1) of y (blocks of 4 weight rows) and
// every row block of x (`row_blocks<Max>`), a row block's tiles one after another.
template <int Max, typename Tile>
void tiles(int64_t M, int64_t n0, int64_t n1, const Tile& tile) {
  row_blocks<Max>(M, [&](auto mb_tag, int64_t m) {
    for (int64_t n = n0; n < n1; n += kRowsPerBlock) tile(mb_tag, m, n);
  });
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A mask of the first min(n, 16) of 16 lanes (n >= 0): the live lanes of a 16-wide store or load near an end.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); }

// Weight rows per unit of work handed to a thread: ~kChunkBytes of weight, a multiple of 8 (whole blocks of 4).
inline int64_t rows_per_unit(int64_t row_bytes) {
  return std::max<int64_t>(8, kChunkBytes / std::max<int64_t>(row_bytes, 1) / 8 * 8);
}

// Steps of 16 k per int4 group: G / 16, or every step where the row is one group.
inline int64_t int4_group_steps(int64_t groups, int64_t group, int64_t steps) {
  return groups == 1 ? steps : group / 16;
}

// Units of work: ranges of rows (`rows_per_unit`) over the padded rows [0, round_up(N, 4)).
template <typename Span>
void run_rows(int64_t N, int64_t row_bytes, const Span& span) {
  const int64_t padded = round_up(N, kRowsPerBlock);
  const int64_t per_unit = rows_per_unit(row_bytes);
  run_units((padded + per_unit - 1) / per_unit,
            [&](int64_t u) { span(u * per_unit, std::min(padded, (u + 1) * per_unit)); });
}

// Several rows of x (prefill, decode batches): each block of 4 weight rows is dequantised once into float32
// (`dequant(n, w)`: 4 rows of ldx values at w, scales applied, exactly the weight quant.py's dequantize gives),
// then multiplied by every row of x in tiles of MB rows x the 4 weight rows: 12 float32 sums in the 16 AVX2
// registers, each weight vector loaded once for 3 FMAs and 12 FMAs in flight per 8 k. (Dequantising int4 inside
// the tile repeats its unpacking for every 3 rows; 8 rows x 1 weight row ran ~1.7x slower on a Zen 3.)
template <int MB>
inline void float_tile(const float* w, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
                       int64_t N) {
  __m256 acc[MB][kRowsPerBlock];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < kRowsPerBlock; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < ldw; k += 8)
    for (int j = 0; j < kRowsPerBlock; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * ldw + k);
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][j]);
    }
  for (int j = 0; j < kRowsPerBlock && n0 + j < N; ++j)
    for (int m = 0; m < MB; ++m) y[m * ldy + n0 + j] = hsum(acc[m][j]);
}

template <typename Dequant>
void dequantised_span(int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t kp, const float* x, int64_t ldx,
                      float* y, int64_t ldy, const Dequant& dequant) {
  thread_local std::vector<float> block;  // 4 dequantised rows of kp (K padded to whole steps) values
  block.resize(kRowsPerBlock * kp);
  for (int64_t n = n0; n < n1; n += kRowsPerBlock) {
    dequant(n, block.data());
    row_blocks<3>(M, [&](auto mb_tag, int64_t m) {
      float_tile<decltype(mb_tag)::value>(block.data(), kp, x + m * ldx, ldx, y + m * ldy, ldy, n, N);
    });
  }
}

// ---------------------------------------------------------------------------------------------------- int8

using Int8Rows = Blocked<int8_t, 16>;

// y[m][n] for m < MB, n in [n0, n0 + 4): dot products of MB rows of x with a block of 4 int8 rows read as one run
// of memory (each 16-k step two vectors of 8 per weight row, widened once for the MB rows), times s[n]. One row of
// x keeps two sums per weight row (the two halves of a step) so that no sum waits on the previous FMA, and
// prefetches (memory-bound decode); more rows have 4 * MB independent sums (12 of the 16 registers at MB = 3; the
// dequantise-a-block path int4 takes ran ~1.5x slower here: int8 widens in two instructions).
template <int MB, typename S>
inline void int8_tile(const Int8Rows& q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
                      int64_t N, int64_t steps) {
  constexpr int NB = kRowsPerBlock, H = MB == 1 ? 2 : 1;
  __m256 acc[MB][NB][H];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < H; ++h) acc[m][j][h] = _mm256_setzero_ps();
  const int8_t* r = q.row(n0);
  for (int64_t t = 0; t < steps; ++t, r += Int8Rows::kStep) {
    if (MB == 1) prefetch(r + kPrefetchBytes);
    const float* xt = x + t * 16;
    for (int j = 0; j < NB; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j * 16 + h * 8));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
        for (int m = 0; m < MB; ++m)
          acc[m][j][h % H] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xt + m * ldx + h * 8), acc[m][j][h % H]);
      }
  }
  for (int j = 0; j < NB && n0 + j < N; ++j)
    for (int m = 0; m < MB; ++m)
      y[m * ldy + n0 + j] = hsum(H == 1 ? acc[m][j][0] : _mm256_add_ps(acc[m][j][0], acc[m][j][H - 1])) *
                            scale_at(s, n0 + j);
}

// Rows [n0, n1) of y (n0 a multiple of 4, n1 a multiple of 4 or N), all M rows of x, in blocks of rows.
template <typename S>
void int8_span(const Int8Rows& q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
               int64_t n1, int64_t N, int64_t M, int64_t steps) {
  tiles<3>(M, n0, n1, [&](auto mb_tag, int64_t m, int64_t n) {
    int8_tile<decltype(mb_tag)::value>(q, s, x + m * ldx, ldx, y + m * ldy, ldy, n, N, steps);
  });
}

// ---------------------------------------------------------------------------------------------------- int4

using Int4Rows = Blocked<uint8_t, 8>;

template <typename S>
inline float group_scale(const S* s, int64_t groups, int64_t n, int64_t g, int64_t N) {
  return n < N ? scale_at(s, n * groups + g) : 0.0f;
}

// Rows n .. n + 4 of the weight, dequantised into w (4 rows of steps * 16 floats): w = (q + 8) * s - 8 s per group.
template <typename S>
inline void int4_dequant(const Int4Rows& q, const S* s, int64_t groups, int64_t n, int64_t N, int64_t steps,
                         int64_t group_steps, float* w) {
  const int64_t ldw = steps * 16;
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int j = 0; j < kRowsPerBlock; ++j) {
    const uint8_t* r = q.row(n + j);
    for (int64_t g = 0; g < groups; ++g) {
      const float sg = group_scale(s, groups, n + j, g, N);
      const __m256 scale = _mm256_set1_ps(sg), offset = _mm256_set1_ps(-8.0f * sg);
      for (int64_t t = g * group_steps; t < std::min(steps, (g + 1) * group_steps); ++t) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + t * Int4Rows::kStep));
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        _mm256_storeu_ps(w + j * ldw + t * 16, _mm256_fmadd_ps(lo, scale, offset));
        _mm256_storeu_ps(w + j * ldw + t * 16 + 8, _mm256_fmadd_ps(hi, scale, offset));
      }
    }
  }
}

// y[n0 .. n0 + 4) for one row of x (memory-bound decode), a block of 4 rows read as one run of memory: per group,
// sums of (q + 8) * x in registers (low and high nibbles apart, so no sum waits on the previous FMA), scaled once
// per group; the offset -8 s * (sum of x over the group) comes from `xsum` (per-group sums of x). Saves the
// per-value scaling FMA of `int4_dequant`.
template <typename S>
inline void int4_row(const Int4Rows& q, const S* s, int64_t groups, const float* x, const float* xsum, float* y,
                     int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  constexpr int NB = kRowsPerBlock;
  __m256 acc[NB];
  float offset[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps(), offset[j] = 0.0f;
  const __m256i low = _mm256_set1_epi32(0x0F);
  const uint8_t* r = q.row(n0);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) lo[j] = _mm256_setzero_ps(), hi[j] = _mm256_setzero_ps();
    const int64_t t1 = std::min(steps, (g + 1) * group_steps);
    for (int64_t t = g * group_steps; t < t1; ++t) {
      const __m256 xl = _mm256_loadu_ps(x + t * 16), xh = _mm256_loadu_ps(x + t * 16 + 8);
      const uint8_t* rt = r + t * Int4Rows::kStep;
      if (t % 2 == 0) prefetch(rt + kPrefetchBytes);  // a 64-byte line holds two steps of a block
      for (int j = 0; j < NB; ++j) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + j * 8)));
        lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), xl, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, hi[j]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float sj = group_scale(s, groups, n0 + j, g, N);
      acc[j] = _mm256_fmadd_ps(_mm256_add_ps(lo[j], hi[j]), _mm256_set1_ps(sj), acc[j]);
      offset[j] += sj * xsum[g];
    }
  }
  for (int j = 0; j < NB && n0 + j < N; ++j) y[n0 + j] = hsum(acc[j]) - 8.0f * offset[j];
}

// y[m][n0 .. n0 + 4) for MB <= 3 rows of x (decode batches): each 16-k step of the block's 4 weight rows is
// unpacked and scaled in registers once for the MB rows, into exactly the weights `int4_dequant` writes, and summed
// in the same order as `float_tile`, so the result equals `dequantised_span`'s; it skips that path's store and
// reload of the dequantised block, which costs more than unpacking again when there are 3 rows or fewer.
template <int MB, typename S>
inline void int4_tile(const Int4Rows& q, const S* s, int64_t groups, const float* x, int64_t ldx, float* y,
                      int64_t ldy, int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  constexpr int NB = kRowsPerBlock;
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0x0F);
  const uint8_t* r = q.row(n0);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale[NB], offset[NB];
    for (int j = 0; j < NB; ++j) {
      const float sg = group_scale(s, groups, n0 + j, g, N);
      scale[j] = _mm256_set1_ps(sg), offset[j] = _mm256_set1_ps(-8.0f * sg);
    }
    for (int64_t t = g * group_steps; t < std::min(steps, (g + 1) * group_steps); ++t) {
      const uint8_t* rt = r + t * Int4Rows::kStep;
      for (int j = 0; j < NB; ++j) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + j * 8)));
        const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), scale[j], offset[j]);
        const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale[j], offset[j]);
        for (int m = 0; m < MB; ++m) {
          acc[m][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + t * 16), acc[m][j]);
          acc[m][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + t * 16 + 8), acc[m][j]);
        }
      }
    }
  }
  for (int j = 0; j < NB && n0 + j < N; ++j)
    for (int m = 0; m < MB; ++m) y[m * ldy + n0 + j] = hsum(acc[m][j]);
}

// Rows [n0, n1) of y (n0 a multiple of 4, n1 a multiple of 4 or N), all M rows of x: one row `int4_row`, 2-3
// `int4_tile`, more `dequantised_span` (its block dequantised once serves every 3 rows).
template <typename S>
void int4_span(const Int4Rows& q, const S* s, int64_t groups, const float* x, int64_t ldx, const float* xsum,
               float* y, int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t steps,
               int64_t group_steps) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; n += kRowsPerBlock) int4_row(q, s, groups, x, xsum, y, n, N, steps, group_steps);
  } else if (M <= 3) {
    tiles<3>(M, n0, n1, [&](auto mb_tag, int64_t m, int64_t n) {
      int4_tile<decltype(mb_tag)::value>(q, s, groups, x + m * ldx, ldx, y + m * ldy, ldy, n, N, steps, group_steps);
    });
  } else {
    dequantised_span(M, n0, n1, N, steps * 16, x, ldx, y, ldy,
                     [&](int64_t n, float* w) { int4_dequant(q, s, groups, n, N, steps, group_steps, w); });
  }
}

}  // namespace dsvl2_quant_detail
