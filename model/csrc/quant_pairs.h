// int4 products of 6-8 rows of bf16 x (decode batches) on AVX512-BF16 CPUs with AVX512-VBMI, from the "k16r4" layout
// as it lies. quant_avx512.h's tiles sum a block of 4 weight rows in 16 lanes (4 per row) and take at most 4 rows of
// x a pass: at 8 rows each weight is unpacked twice, and on a Zen 5 the 8-row products ran VDPBF16PS at ~60% of its
// issue rate (bench/RESULTS.md). Here a column of 16 weight rows (4 blocks) is rearranged per 16-k step by two byte
// permutations (VPERMT2B over the blocks' 4 x 32 bytes) into "pairs": 16-bit lanes 2j and 2j + 1 hold weight row j's
// k = 2p and 2p + 1, the layout of the bf16 GEMM's micro-kernel (pair_tile.h). Each nibble is looked up in the
// int4 table as the AVX512 tiles do (exact bf16 of q), and every row of x multiplies it with its pair of k broadcast
// to all 16 lanes: float32 lane j sums row j itself (no reduction across lanes), each unpacked weight serves all the
// rows, and two columns (32 weight rows) share each broadcast. Scaled per group as the other tiles scale (the
// group's float32 sums times the row's scale, added to the totals), so the results equal theirs up to the order of
// the float32 sums.
#pragma once

#include "quant_avx2.h"
#include "transpose.h"

#include <cstring>

namespace dsvl2_quant_detail {

// The table of the int4 lookup: entry i holds the bf16 bits of i - 8 (i < 16; the rest unused).
inline const uint16_t* int4_bf16_table() {
  alignas(64) static const auto table = [] {
    struct { uint16_t v[32]; } t{};
    for (int i = 0; i < 16; ++i) {
      const float f = static_cast<float>(i - 8);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      t.v[i] = static_cast<uint16_t>(bits >> 16);  // exact: small integers have 8 significant bits or fewer
    }
    return t;
  }();
  return table.v;
}

// Rows of x from which the pairs take a product (up to 8 a pass). Alternated with the AVX512 tiles on a Zen 5
// (bench/RESULTS.md), K = 1,280 with groups of 128, two threads: from memory 1.1x at 6 rows and 1.2x at 7-8, even at
// 5, 0.77-0.86x at 4 (VPERMT2B's bytes cost more than the 4-row tiles' unpacking saves); from L2 1.2x from 5 rows.
constexpr int64_t kPairMinRows = 6;
constexpr int kPairCols = 2;  // columns of 16 weight rows a tile: 2 x 8 sums (3 x 8 left too few registers)

inline bool pairs_ready() {
  static const bool ready = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16") &&
                            __builtin_cpu_supports("avx512bw");
  return ready;
}

// VPERMT2B's indices over a step's 4 blocks (bytes 0-63: blocks 0, 1; 64-127: blocks 2, 3) that put bytes 2p and
// 2p + 1 of the 16 rows (row 4b + i's 8 bytes at 32b + 8i) side by side: output half h holds p = 2 * `half` + h.
// Byte 2p + e holds k = 2p + e in its low nibble and k = 8 + 2p + e in its high one.
inline const uint8_t* pair_indices(int half) {
  alignas(64) static const auto indices = [] {
    struct { uint8_t v[2][64]; } t{};
    for (int s = 0; s < 2; ++s)
      for (int o = 0; o < 64; ++o) {
        const int p = 2 * s + o / 32, row = (o % 32) / 2, e = o % 2;
        t.v[s][o] = static_cast<uint8_t>((row / 4) * 32 + 8 * (row % 4) + 2 * p + e);
      }
    return t;
  }();
  return indices.v[half];
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

inline __m512i scale_bits(const float* p, __mmask16 live) {
  return _mm512_castps_si512(_mm512_maskz_loadu_ps(live, p));
}
inline __m512i scale_bits(const c10::BFloat16* p, __mmask16 live) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16);  // bf16 -> float exactly
}

// table[(g * nc + c) * 16 + i] = the scale of weight row n + 16c + i for group g (s: (N, groups); zero past N): each
// column's rows read 16 groups at a time and transposed in registers. Filling the table costs the 8-row products
// 3-6% on a Zen 5 (Tiny's lm_head with the fill skipped, wrong results, timing only); this form with the next
// tile's scales prefetched took back about half of it (lm_head 1.03x, the int4 step at batch 8 1.03x, against
// one value at a time without the prefetch; 12 rounds alternated in one process; gathering each column's 16
// lanes per group ran no faster).
template <typename S>
inline void scale_table(const S* s, int64_t groups, int64_t n, int nc, int64_t N, float* table) {
  for (int c = 0; c < nc; ++c)
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const int64_t width = std::min<int64_t>(16, groups - g0);
      const __mmask16 live = first_lanes(width);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = n + 16 * c + i;
        r[i] = row < N ? scale_bits(s + row * groups + g0, live) : _mm512_setzero_si512();
      }
      dsvl2_kernels_detail::transpose16(r);
      for (int64_t j = 0; j < width; ++j) _mm512_storeu_si512(table + ((g0 + j) * nc + c) * 16, r[j]);
    }
}

// y[m][n0 .. n0 + 16 NC) for MB rows of bf16 x (ldx each, zeros past K): NC columns of 16 weight rows from n0 (a
// multiple of 4). `scales`: per group, NC x 16 rows' scales (zero past N).
template <int MB, int NC>
inline void int4_pair_tile(const Int4Rows& q, const float* scales, int64_t groups, const uint16_t* x, int64_t ldx,
                           float* y, int64_t ldy, int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  const __m512i table = _mm512_load_si512(int4_bf16_table());
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i index01 = _mm512_load_si512(pair_indices(0)), index23 = _mm512_load_si512(pair_indices(1));
  const int64_t bb = q.block_bytes, ahead = NC * kRowsPerBlock * bb;  // prefetched: this place in the next tile
  alignas(64) float total[MB * NC * 16] = {};
  const uint8_t* r = q.row(n0);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB * NC];
    for (int i = 0; i < MB * NC; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t t1 = std::min(steps, (g + 1) * group_steps);
    for (int64_t t = g * group_steps; t < t1; ++t) {
      __m512i w01[NC], w23[NC];  // the step's bytes of pairs (0, 1) and (2, 3) of each column
      for (int c = 0; c < NC; ++c) {
        const uint8_t* b = r + c * kRowsPerBlock * bb + t * Int4Rows::kStep;
        if (t % 2 == 0)  // a 64-byte line holds two steps of a block
          for (int i = 0; i < kRowsPerBlock; ++i) prefetch(b + i * bb + ahead);
        const auto half = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
        const __m512i z0 = _mm512_inserti64x4(_mm512_castsi256_si512(half(b)), half(b + bb), 1);
        const __m512i z1 = _mm512_inserti64x4(_mm512_castsi256_si512(half(b + 2 * bb)), half(b + 3 * bb), 1);
        w01[c] = _mm512_permutex2var_epi8(z0, index01, z1);
        w23[c] = _mm512_permutex2var_epi8(z0, index23, z1);
      }
      for (int p = 0; p < 4; ++p) {  // pairs p (low nibbles: k 2p, 2p + 1) and p + 4 (high: k 8 + 2p, 9 + 2p)
        __m512bh wl[NC], wh[NC];
        for (int c = 0; c < NC; ++c) {
          const __m512i w = p < 2 ? w01[c] : w23[c];
          const __m512i v =
              _mm512_cvtepu8_epi16(p % 2 == 0 ? _mm512_castsi512_si256(w) : _mm512_extracti64x4_epi64(w, 1));
          wl[c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
          wh[c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        }
        for (int half = 0; half < 2; ++half)
          for (int m = 0; m < MB; ++m) {
            uint32_t bits;  // x's pair of k for these weights, in every lane
            std::memcpy(&bits, x + m * ldx + t * 16 + 8 * half + 2 * p, sizeof bits);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
            for (int c = 0; c < NC; ++c)
              acc[m * NC + c] = _mm512_dpbf16_ps(acc[m * NC + c], half == 0 ? wl[c] : wh[c], xv);
          }
      }
    }
    for (int c = 0; c < NC; ++c) {
      const __m512 sc = _mm512_loadu_ps(scales + (g * NC + c) * 16);
      for (int m = 0; m < MB; ++m) {
        float* tp = total + (m * NC + c) * 16;
        _mm512_store_ps(tp, _mm512_fmadd_ps(acc[m * NC + c], sc, _mm512_load_ps(tp)));
      }
    }
  }
  for (int c = 0; c < NC; ++c) {
    const int64_t n = n0 + 16 * c;
    if (n >= N) break;
    const __mmask16 live = first_lanes(N - n);
    for (int m = 0; m < MB; ++m)
      _mm512_mask_storeu_ps(y + m * ldy + n, live, _mm512_load_ps(total + (m * NC + c) * 16));
  }
}

template <int MB>
void int4_pair_cols(int nc, const Int4Rows& q, const float* scales, int64_t groups, const uint16_t* x, int64_t ldx,
                    float* y, int64_t ldy, int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  if (nc == 2) {
    int4_pair_tile<MB, 2>(q, scales, groups, x, ldx, y, ldy, n0, N, steps, group_steps);
  } else {
    int4_pair_tile<MB, 1>(q, scales, groups, x, ldx, y, ldy, n0, N, steps, group_steps);
  }
}

#pragma GCC pop_options

// Rows [n0, n) of y for rows of x [m, m + mb), kPairMinRows <= mb <= 8, by the pair tiles over whole columns of 16
// weight rows within [n0, n1); returns n, where the caller's tiles take the rest (fewer than 16 rows).
template <typename S>
int64_t int4_pairs_span(const Int4Rows& q, const S* s, int64_t groups, const uint16_t* x, int64_t ldx, float* y,
                        int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t mb, int64_t steps,
                        int64_t group_steps) {
  thread_local std::vector<float> scales;  // per tile: groups x columns x 16 rows
  scales.resize(groups * kPairCols * 16);
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16 * kPairCols) {
    const int nc = static_cast<int>(std::min<int64_t>(kPairCols, (n1 - n) / 16));
    const char* next = reinterpret_cast<const char*>(s + std::min(n + 16 * kPairCols, N) * groups);
    const char* end = reinterpret_cast<const char*>(s + std::min(n + 32 * kPairCols, N) * groups);
    for (; next < end; next += 64) prefetch(next);  // the next tile's scales, read while this one computes
    scale_table(s, groups, n, nc, N, scales.data());
    switch (mb) {
      case 8: int4_pair_cols<8>(nc, q, scales.data(), groups, x, ldx, y, ldy, n, N, steps, group_steps); break;
      case 7: int4_pair_cols<7>(nc, q, scales.data(), groups, x, ldx, y, ldy, n, N, steps, group_steps); break;
      default: int4_pair_cols<6>(nc, q, scales.data(), groups, x, ldx, y, ldy, n, N, steps, group_steps); break;
    }
    if (nc < kPairCols) return n + 16 * nc;
  }
  return n;
}

}  // namespace dsvl2_quant_detail
