// The int8 / int4 products of many rows of bf16 x (prefill) on AVX512-BF16 CPUs, where AMX's tiles do not take them
// (quant_amx.h): the ops' isa 1, and isa 2 without the tiles. The decode tiles (quant_avx512.h) sum each output over
// 16 lanes and reduce it, and read x again for every 4 weight rows: at a prefill's hundreds of rows they ran at
// 0.6-0.8x the bf16 GEMM's rate on a Zen 5 (bench/RESULTS.md). Here a unit of up to 48 weight rows is written as
// exact bf16 values (q: |q| <= 128 has 8 significant bits; Int8Tiles, Int4Tiles unscaled) into an L2 buffer, packed
// into pairs along K, the layout the bf16 experts' prefill multiplies (moe_bf16.cpp), and rows of x are multiplied
// against it by outer-product micro-kernels (no reductions). The sums are scaled as the decode tiles scale theirs:
// int8's (and int4's of one group) per output channel after the whole K, on pair_tile (8 rows x 48 lanes); int4's
// per group of G k (a multiple of 32), each group's float32 sums times its scale added to the running totals, on
// group_tile (4 rows x 48 lanes: both sets of sums in registers). K longer than kGemmChunkSteps steps of 32 goes a
// chunk at a time, the chunks' sums added in float32. Results equal the decode tiles' up to the order of the float32
// sums. (int4 with the weights as bf16(q * s), AMX's form, summed over the whole K ran 1.05-1.1x faster, but those
// weights add their own rounding: past the stated tolerance at K = 64.)
#pragma once

#include "pair_tile.h"
#include "quant_amx.h"
#include "transpose.h"

#include <c10/util/BFloat16.h>

#include <vector>

namespace dsvl2_quant_detail {

// Rows of x from which the products take this path. Fewer keep the decode tiles: alternated on a Zen 5 (Tiny's
// and Small's shapes, weights from memory), both ran even at 16 rows and this path 1.0-1.25x (int8) and
// 0.99-1.17x (int4, before its group tiles) faster at 24, 1.2-1.35x / 1.05-1.2x at 32, 1.3-1.5x / 1.1-1.3x at 64.
constexpr int64_t kGemmMinRows = 24;
constexpr int kGemmCols = 3;             // 16-lane columns of weight rows per unit: 48 rows, pair_tile's 8 x 3
constexpr int64_t kGemmChunkSteps = 64;  // 32-k steps packed at once: 2,048 k, 192 KB for 48 rows

// Whether this path takes a product of M rows, K input features and int4 groups of `group` (0 or one group: int8,
// or a whole row): whole 32-k steps and groups, and AVX512-VBMI for int4's byte permutation (checked for int8 too:
// the span is compiled for both; every AVX512-BF16 CPU but Cooper Lake has it: there the decode tiles run).
inline bool gemm_takes(int64_t M, int64_t K, int64_t groups, int64_t group) {
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
  return M >= kGemmMinRows && K > 0 && K % 32 == 0 && (groups <= 1 || group % 32 == 0) && vbmi;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

inline void store16(float* p, __m512 v, __mmask16 live) { _mm512_mask_storeu_ps(p, live, v); }
// To nearest even as c10's conversion (.to(bfloat16)) rounds, bit for bit: denormals rounded, not flushed as
// VCVTNEPS2BF16 flushes them; NaN as 0x7FC0.
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 live) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm512_mask_cvtepi32_storeu_epi16(p, live, r);
}

// total[r * NR + c] = sum over `groups` groups of group_pairs pairs each of scale(group, column c) times the group's
// pair_tile sums: each group's float32 sums of exact products scaled as the decode tiles scale them, the running
// totals in registers beside the group's sums (MR x NR twice, so MR <= 4 at NR = 3). scales: per group, NR x 16.
template <int MR, int NR>
inline void group_tile(const dsvl2_kernels_detail::bf16* a, int64_t lda, const dsvl2_kernels_detail::bf16* b,
                       int64_t ldb, int64_t group_pairs, int64_t groups, const float* scales, __m512* out) {
  using dsvl2_kernels_detail::bcast_pair;
  using dsvl2_kernels_detail::load_bf16;
  __m512 total[MR * NR];
  for (int i = 0; i < MR * NR; ++i) total[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MR * NR];
    for (int i = 0; i < MR * NR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t t = g * group_pairs; t < (g + 1) * group_pairs; ++t) {
      __m512bh bv[NR];
      for (int c = 0; c < NR; ++c) bv[c] = load_bf16(b + t * ldb + 32 * c);
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = bcast_pair(a + r * lda + 2 * t);
        for (int c = 0; c < NR; ++c) acc[r * NR + c] = _mm512_dpbf16_ps(acc[r * NR + c], bv[c], av);
      }
    }
    for (int c = 0; c < NR; ++c) {
      const __m512 sc = _mm512_loadu_ps(scales + (g * NR + c) * 16);
      for (int r = 0; r < MR; ++r) total[r * NR + c] = _mm512_fmadd_ps(acc[r * NR + c], sc, total[r * NR + c]);
    }
  }
  for (int i = 0; i < MR * NR; ++i) out[i] = total[i];
}

template <int MR>
inline void group_tile_cols(int nr, const dsvl2_kernels_detail::bf16* a, int64_t lda,
                            const dsvl2_kernels_detail::bf16* b, int64_t ldb, int64_t group_pairs, int64_t groups,
                            const float* scales, __m512* out) {
  switch (nr) {
    case 3: group_tile<MR, 3>(a, lda, b, ldb, group_pairs, groups, scales, out); break;
    case 2: group_tile<MR, 2>(a, lda, b, ldb, group_pairs, groups, scales, out); break;
    default: group_tile<MR, 1>(a, lda, b, ldb, group_pairs, groups, scales, out); break;
  }
}

// group_tile for any 1 <= mr <= 4 and 1 <= nr <= 3.
inline void group_tile_any(int mr, int nr, const dsvl2_kernels_detail::bf16* a, int64_t lda,
                           const dsvl2_kernels_detail::bf16* b, int64_t ldb, int64_t group_pairs, int64_t groups,
                           const float* scales, __m512* out) {
  switch (mr) {
    case 4: group_tile_cols<4>(nr, a, lda, b, ldb, group_pairs, groups, scales, out); break;
    case 3: group_tile_cols<3>(nr, a, lda, b, ldb, group_pairs, groups, scales, out); break;
    case 2: group_tile_cols<2>(nr, a, lda, b, ldb, group_pairs, groups, scales, out); break;
    default: group_tile_cols<1>(nr, a, lda, b, ldb, group_pairs, groups, scales, out); break;
  }
}

// y[m][n0 .. n1) for all M rows of x (bf16, row stride ldx, K long) and weight rows n0 .. n1 (n0 a multiple of 48,
// at most 48 rows) as `w` writes them 16 x 32 at a time (Int8Tiles, or Int4Tiles unscaled: q itself), scaled by s:
// s (N,) or (N, groups); `groups` 1 scales after the whole K, more scale each group's sums. T: y's element type.
template <typename Tiles, typename S, typename T>
void gemm_span(int64_t n0, int64_t n1, int64_t N, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, Tiles w,
               const S* s, int64_t groups, T* y) {
  using dsvl2_kernels_detail::bf16;
  const int cols = static_cast<int>((n1 - n0 + 15) / 16);
  const int64_t lanes = cols * 16, ldb = lanes * 2, steps = K / 32;
  const int64_t group_steps = groups > 1 ? steps / groups : steps;  // steps one scale covers
  const int64_t fold = groups > 1 ? group_steps : std::min(steps, kGemmChunkSteps);  // steps summed before scaling
  const int64_t chunk = std::max<int64_t>(kGemmChunkSteps / fold, 1) * fold;
  const bool chunked = chunk < steps;
  thread_local std::vector<uint16_t> packed;
  thread_local std::vector<float> sums;  // the chunks' sums so far, M x lanes (K past one chunk only)
  packed.resize(std::min(chunk, steps) * 16 * ldb);
  if (chunked) sums.resize(M * lanes);
  alignas(64) uint16_t rows[kStripRows * 32];
  alignas(64) float row_scale[kGemmCols * 16];
  for (int64_t i = 0; i < lanes; ++i) row_scale[i] = groups > 1 ? 1.0f : group_scale(s, 1, n0 + i, 0, N);
  thread_local std::vector<float> group_scales;  // per fold of the chunk and column, 16 rows' scales
  group_scales.resize(groups > 1 ? chunk / fold * lanes : 0);
  __m512 total[8 * kGemmCols];
  for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
    const int64_t c1 = std::min(steps, c0 + chunk);
    for (int64_t t = c0; t < c1; ++t)  // the weight rows' pairs along k: pair p of row j at (p * lanes + j) * 2
      for (int c = 0; c < cols; ++c) {
        w.step(n0 + 16 * c, t, rows, 32);
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(rows + 32 * i);
        dsvl2_kernels_detail::transpose16(r);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(packed.data() + ((t - c0) * 16 + p) * ldb + 32 * c, r[p]);
      }
    for (int64_t f = 0; groups > 1 && f < (c1 - c0) / fold; ++f)
      for (int64_t i = 0; i < lanes; ++i)
        group_scales[f * lanes + i] = group_scale(s, groups, n0 + i, (c0 + f * fold) / group_steps, N);
    const int64_t block = groups > 1 ? 4 : 8;  // rows of x per micro-tile (group_tile keeps twice the sums)
    for (int64_t m = 0; m < M; m += block) {
      const int mr = static_cast<int>(std::min<int64_t>(block, M - m));
      const bf16* xm = reinterpret_cast<const bf16*>(x + m * ldx + c0 * 32);
      const auto* b = reinterpret_cast<const bf16*>(packed.data());
      if (groups > 1) {
        group_tile_any(mr, cols, xm, ldx, b, ldb, fold * 16, (c1 - c0) / fold, group_scales.data(), total);
      } else {
        dsvl2_kernels_detail::pair_tile_any(mr, cols, xm, ldx, b, ldb, (c1 - c0) * 16, total);
      }
      for (int r = 0; r < mr; ++r) {
        float* part = chunked ? sums.data() + (m + r) * lanes : nullptr;
        for (int c = 0; c < cols; ++c) {
          __m512 v = total[r * cols + c];
          if (chunked && c0 > 0) v = _mm512_add_ps(v, _mm512_loadu_ps(part + 16 * c));
          if (chunked && c1 < steps) {
            _mm512_storeu_ps(part + 16 * c, v);
            continue;
          }
          const int64_t n = n0 + 16 * c;
          const __mmask16 live = first_lanes(N - n);  // n < N
          store16(y + (m + r) * N + n, _mm512_mul_ps(v, _mm512_load_ps(row_scale + 16 * c)), live);
        }
      }
    }
  }
}

#pragma GCC pop_options

// y (M, N) bf16 (float32 with `float_out`, the values not yet rounded: the caller's `finish`) of bf16 x (M, K) by the
// weight `tiles` writes, scaled by s (see gemm_span), units of 48 weight rows handed to the threads.
template <typename Tiles, typename S>
at::Tensor gemm_linear(const at::Tensor& x_in, int64_t N, const S* s, int64_t groups, bool float_out,
                       const Tiles& tiles) {
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), width = 16 * kGemmCols;
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  run_units((N + width - 1) / width, [&](int64_t u) {
    const int64_t n0 = u * width, n1 = std::min(n0 + width, N);
    if (float_out) {
      gemm_span(n0, n1, N, K, xp, x.stride(0), M, tiles, s, groups, y.mutable_data_ptr<float>());
    } else {
      gemm_span(n0, n1, N, K, xp, x.stride(0), M, tiles, s, groups, y.mutable_data_ptr<at::BFloat16>());
    }
  });
  return y;
}

}  // namespace dsvl2_quant_detail
