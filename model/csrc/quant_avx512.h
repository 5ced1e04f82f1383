// AVX512 variants of the int8 / int4 tiles of quant_avx2.h, for CPUs with AVX512F/BW/VL/DQ and AVX512-BF16 (Zen 4,
// Sapphire Rapids and later). They are compiled inside a `#pragma GCC target` region, so the library itself keeps
// the AVX2 build flags and loads on any AVX2 CPU; the ops call these only when asked to (`isa` 1) and after
// `avx512_ready()` says the CPU has the instructions. Same layouts, same row blocks, same per-unit threading as
// the AVX2 tiles; what differs is the arithmetic:
//   int8  one row of x: 16 k per instruction, a row's 16 bytes of a step widened to 16 float32 lanes and one FMA
//         with x's 16 (float32), half the AVX2 tile's instructions per weight byte; from two rows: a pair of the
//         block's rows widened once to 32 bf16 and multiplied by VDPBF16PS for every row (int8_tile512_bf16).
//   int4  the 4 rows x 16 k of a block's step (32 bytes) zero-extended to 32 16-bit lanes; each nibble looked up
//         in a 16-entry table of the bf16 values q = nibble - 8 (exact: small integers), one lookup per half
//         (low nibbles: k 0-7 of each row, high: k 8-15); then VDPBF16PS multiplies them by x in bf16 (x's 8
//         values of a half broadcast to the 4 rows' 128-bit lanes) and sums pairs into float32: 64 weights in
//         ~5 + 2 x rows instructions, where the AVX2 tile spends ~26 (unpacking is what bounds AVX2's int4).
//         Products are exact (bf16 x bf16 in float32); float32 lane i holds row i / 4's partial sum; per group
//         the sum is scaled by the row's scale (one vector of the 4 rows' scales, each in 4 lanes). From two rows of
//         x, each row's broadcasts serve 4 blocks (16 weight rows) at once (int4_tile512_wide).
// x therefore comes as bf16 for int4 and int8's several rows (a model in bf16 has it so: exact) and as float32 for
// int8's one row (and for the MoE op's int8 down products, whose gated rows are float32). Results equal the
// dequantised product up to float32 summation order. MB rows of x share each unpacked step (decode batches).
#pragma once

#include "quant_pairs.h"

#include <cstring>

namespace dsvl2_quant_detail {

// Whether this CPU runs the instructions below (checked once; the caller must not call them otherwise).
inline bool avx512_ready() {
  static const bool ready = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("avx512bf16");
  return ready;
}

// The ops' `isa`: 0 runs quant_avx2.h's tiles, 1 the tiles below (bf16 x only), 2 those or, for products with
// rows enough where the CPU and Linux grant AMX-BF16's tiles, quant_amx.h's; 1 or 2 with the flag kIsaVnni runs
// int4's AVX512 tiles on VPDPBUSD instead where the weight's groups allow (quant_vnni.h; int8 ignores the flag).
constexpr int64_t kIsaVnni = 4;
inline int64_t isa_base(int64_t isa) { return isa & 3; }

inline bool vnni_ready() {
  static const bool ready = avx512_ready() && __builtin_cpu_supports("avx512vnni");
  return ready;
}

inline void check_isa(const char* op, int64_t isa, const at::Tensor& x) {
  const int64_t base = isa_base(isa);
  TORCH_CHECK((isa & ~(kIsaVnni | 3)) == 0 && base <= 2 && (base >= 1 || !(isa & kIsaVnni)), op,
              ": isa must be 0 (AVX2), 1 (AVX512) or 2 (AMX), the last two optionally with flag 4 (VNNI)");
  TORCH_CHECK(base == 0 || avx512_ready(), op, ": this CPU lacks AVX512F/BW/VL/DQ or AVX512-BF16");
  TORCH_CHECK(!(isa & kIsaVnni) || vnni_ready(), op, ": this CPU lacks AVX512-VNNI");
  TORCH_CHECK(base == 0 || x.scalar_type() == at::kBFloat16, op, ": the AVX512 and AMX paths take bf16 activations");
}

// How far ahead of an AVX512 tile its weight is prefetched: 2 KB ran 7-10% faster than the AVX2 tiles' 1 KB
// on the AMX Xeon (the lm_head at one row, six alternated rounds in one process: int8 10.6 / 11.7 ms, int4 7.6 /
// 8.2; 4 KB even with 2 KB, 4 KB into L2 between, 16 KB into L2 no better than 1 KB): its reads waited on memory.
// Likewise for two rows (a routed expert's usual share of a decode batch of 8): the hardware prefetcher alone left
// them 11-13% slower (Tiny's lm_head and 60 experts' gate 896 x 1,280 at 2 rows from memory, int8 and int4 on VNNI,
// seven alternated pairs of processes: medians 14.7 -> 13.0, 7.8 -> 7.1, 9.3 -> 8.2, 6.2 -> 5.5 ms).
// On a Zen 5 farther is faster (Tiny's lm_head, nine alternated rounds in one process, twice; speed against 2 KB):
// 8 KB: int8 1.26-1.28x at one row and 1.15x at two, int4 1.06-1.07x, int4 on VNNI 1.12-1.13x; 4 KB: 1.13-1.14x,
// 1.05-1.10x, 1.05-1.11x; 16 KB no better than 8. So 8 KB, which the Xeon's runs above (4 KB even with 2 KB) do not
// argue against; not yet timed there. Tiles of more rows prefetch too (they did from 1-2 rows only, leaving the
// rest to the hardware prefetcher): on the Zen 5, alternated in one process, int8 on VDPBF16PS 1.08-1.41x at 4 rows
// and 1.18-1.55x at 8 (Tiny's and Small's lm_head, Small's dense MLP), int4's AVX512 tiles 1.03-1.05x / 1.11-1.15x,
// int4 on VNNI even.
constexpr int64_t kPrefetchBytes512 = 8192;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// y[m][n0 .. n0 + 4) for MB rows of float32 x: per step, each of the block's 4 weight rows widened once (16 k)
// and multiplied by every row's 16 x values; 4 * MB independent sums.
template <int MB, typename S>
inline void int8_tile512(const Int8Rows& q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy,
                         int64_t n0, int64_t N, int64_t steps) {
  constexpr int NB = kRowsPerBlock;
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const int8_t* r = q.row(n0);
  for (int64_t t = 0; t < steps; ++t, r += Int8Rows::kStep) {
    prefetch(r + kPrefetchBytes512);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + t * 16);
    for (int j = 0; j < NB; ++j) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j * 16))));
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_fmadd_ps(w, xv[m], acc[m][j]);
    }
  }
  for (int j = 0; j < NB && n0 + j < N; ++j)
    for (int m = 0; m < MB; ++m) y[m * ldy + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) * scale_at(s, n0 + j);
}

template <typename S>
void int8_span512(const Int8Rows& q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
                  int64_t n1, int64_t N, int64_t M, int64_t steps) {
  tiles<4>(M, n0, n1, [&](auto mb_tag, int64_t m, int64_t n) {
    int8_tile512<decltype(mb_tag)::value>(q, s, x + m * ldx, ldx, y + m * ldy, ldy, n, N, steps);
  });
}

// The sum of 8 float32 lanes: HIGH picks lanes 8-15 of v, else lanes 0-7.
template <bool HIGH>
inline float half_sum(__m512 v) {
  const __m256 h = HIGH ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)) : _mm512_castps512_ps256(v);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// y[m][n0 .. n0 + 4) for MB rows of bf16 x (several rows: decode batches): per step, each pair of the block's rows
// (2p, 2p + 1) widened once into 32 bf16 (exact: |q| <= 127 has 7 significant bits), row 2p's 16 k in the low half
// and row 2p + 1's in the high, and multiplied by VDPBF16PS against each row of x's 16 k repeated in both halves:
// lanes 0-7 sum row 2p, 8-15 row 2p + 1, 2 * MB sums for the 4 rows. Against int8_tile512 (float32 FMAs on float32
// x, 4 rows of x a pass) each weight is widened once for all MB rows and the products take half the instructions,
// and 8 rows of bf16 x fit L1 (8 of float32 x at K = 1,280 are 40 KB). Tiny's int8 lm_head on a Zen 5, alternated
// with the float32 tiles in one process: 1.03-1.30x at 2 rows, 1.28-1.34x at 4, 1.25-1.26x at 8 (before both forms
// prefetched at every row count; bench/int8_rows.cpp replays the two forms outside the kernel).
template <int MB, typename S>
inline void int8_tile512_bf16(const Int8Rows& q, const S* s, const uint16_t* x, int64_t ldx, float* y, int64_t ldy,
                              int64_t n0, int64_t N, int64_t steps) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_setzero_ps(), acc[m][1] = _mm512_setzero_ps();
  const int8_t* r = q.row(n0);
  const auto widen = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  for (int64_t t = 0; t < steps; ++t, r += Int8Rows::kStep) {
    prefetch(r + kPrefetchBytes512);
    const __m512bh w0 = _mm512_cvtne2ps_pbh(widen(r + 16), widen(r));
    const __m512bh w1 = _mm512_cvtne2ps_pbh(widen(r + 48), widen(r + 32));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_broadcast_i32x8(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ldx + t * 16)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
    }
  }
  for (int m = 0; m < MB; ++m) {
    const float sums[kRowsPerBlock] = {half_sum<false>(acc[m][0]), half_sum<true>(acc[m][0]),
                                       half_sum<false>(acc[m][1]), half_sum<true>(acc[m][1])};
    for (int j = 0; j < kRowsPerBlock && n0 + j < N; ++j) y[m * ldy + n0 + j] = sums[j] * scale_at(s, n0 + j);
  }
}

// int8_span512 for rows of bf16 x (ldx each, zeros past K): up to 8 rows a tile. (Fewer rows a tile where 8 rows of
// x pass 24 KB, the unit re-read from L2 for the rest, ran no faster: Small's lm_head, K = 2,048, on a Zen 5.)
template <typename S>
void int8_span512_bf16(const Int8Rows& q, const S* s, const uint16_t* x, int64_t ldx, float* y, int64_t ldy,
                       int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t steps) {
  tiles<8>(M, n0, n1, [&](auto mb_tag, int64_t m, int64_t n) {
    int8_tile512_bf16<decltype(mb_tag)::value>(q, s, x + m * ldx, ldx, y + m * ldy, ldy, n, N, steps);
  });
}

// y[m][n0 .. n0 + 4) for MB rows of bf16 x (see the top): per group, two float32 sums per row of x (low and high
// halves, so neither waits on the other), scaled once per group by the 4 rows' scales.
template <int MB, typename S>
inline void int4_tile512(const Int4Rows& q, const S* s, int64_t groups, const uint16_t* x, int64_t ldx, float* y,
                         int64_t ldy, int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  const __m512i table = _mm512_load_si512(int4_bf16_table());
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // lane i: row i / 4
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* r = q.row(n0);
  for (int64_t g = 0; g < groups; ++g) {
    // Sums per row of x and half (low / high nibbles) and, for one row, per step parity (two steps at a time):
    // at least four chains of VDPBF16PS, so that the loop is not bound by one chain's latency (one row with two
    // chains ran ~1.5x slower from cache on a Zen 4).
    constexpr int U = MB == 1 ? 2 : 1;
    __m512 part[MB][U][2];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) part[m][u][0] = _mm512_setzero_ps(), part[m][u][1] = _mm512_setzero_ps();
    const int64_t t1 = std::min(steps, (g + 1) * group_steps);
    auto step = [&](int64_t t, int u) {
      const uint8_t* rt = r + t * Int4Rows::kStep;
      if (u == 0) prefetch(rt + kPrefetchBytes512);  // a 64-byte line: two steps of a block
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt)));
      const __m512bh wl = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
      const __m512bh wh = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
      for (int m = 0; m < MB; ++m) {
        const uint16_t* xt = x + m * ldx + t * 16;
        const __m512bh xl = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
        const __m512bh xh =
            (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 8)));
        part[m][u][0] = _mm512_dpbf16_ps(part[m][u][0], wl, xl);
        part[m][u][1] = _mm512_dpbf16_ps(part[m][u][1], wh, xh);
      }
    };
    int64_t t = g * group_steps;
    for (; t + U <= t1; t += U)
      for (int u = 0; u < U; ++u) step(t + u, u);
    if (t < t1) step(t, 0);
    __m512 lo[MB], hi[MB];
    for (int m = 0; m < MB; ++m) {
      lo[m] = part[m][0][0], hi[m] = part[m][0][1];
      for (int u = 1; u < U; ++u) lo[m] = _mm512_add_ps(lo[m], part[m][u][0]), hi[m] = _mm512_add_ps(hi[m], part[m][u][1]);
    }
    const __m128 s4 = _mm_setr_ps(group_scale(s, groups, n0, g, N), group_scale(s, groups, n0 + 1, g, N),
                                  group_scale(s, groups, n0 + 2, g, N), group_scale(s, groups, n0 + 3, g, N));
    const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(lo[m], hi[m]), scale, acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[m]);
    for (int j = 0; j < kRowsPerBlock && n0 + j < N; ++j)
      y[m * ldy + n0 + j] = (lanes[4 * j] + lanes[4 * j + 1]) + (lanes[4 * j + 2] + lanes[4 * j + 3]);
  }
}

// y[m][n0 .. n0 + 4 NB) for MB rows of bf16 x: int4_tile512's arithmetic on NB blocks of 4 weight rows at once,
// each row of x's two broadcasts a step serving every block. A 128-bit broadcast from memory issues about once a
// cycle where VDPBF16PS issues twice (Zen 5), so the tile of one block, two broadcasts per two products, waited on
// them: ~0.5 ns a row of x and step from L2 against ~0.18 with the broadcasts out of the loop. One sum per block and
// row of x (low and high halves in one chain; 8-16 chains in the 16-row tiles hide the product's latency). Tiny's
// lm_head on a Zen 5, alternated with one block a tile: 1.16x / 1.21x / 1.26x at 2 / 4 / 8 rows; the whole int4
// decode step at batch 8 1.09x.
template <int MB, int NB, typename S>
inline void int4_tile512_wide(const Int4Rows& q, const S* s, int64_t groups, const uint16_t* x, int64_t ldx,
                              float* y, int64_t ldy, int64_t n0, int64_t N, int64_t steps, int64_t group_steps) {
  const __m512i table = _mm512_load_si512(int4_bf16_table());
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // lane i: row i / 4
  __m512 acc[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MB; ++m) acc[b][m] = _mm512_setzero_ps();
  const uint8_t* r = q.row(n0);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[NB][MB];
    for (int b = 0; b < NB; ++b)
      for (int m = 0; m < MB; ++m) part[b][m] = _mm512_setzero_ps();
    const int64_t t1 = std::min(steps, (g + 1) * group_steps);
    for (int64_t t = g * group_steps; t < t1; ++t) {
      __m512bh wl[NB], wh[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* rt = r + b * q.block_bytes + t * Int4Rows::kStep;
        prefetch(rt + kPrefetchBytes512);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt)));
        wl[b] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
        wh[b] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
      }
      for (int m = 0; m < MB; ++m) {
        const uint16_t* xt = x + m * ldx + t * 16;
        const __m512bh xl = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
        const __m512bh xh =
            (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 8)));
        for (int b = 0; b < NB; ++b) part[b][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(part[b][m], wl[b], xl), wh[b], xh);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const int64_t n = n0 + b * kRowsPerBlock;
      const __m128 s4 = _mm_setr_ps(group_scale(s, groups, n, g, N), group_scale(s, groups, n + 1, g, N),
                                    group_scale(s, groups, n + 2, g, N), group_scale(s, groups, n + 3, g, N));
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
      for (int m = 0; m < MB; ++m) acc[b][m] = _mm512_fmadd_ps(part[b][m], scale, acc[b][m]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MB; ++m) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[b][m]);
      const int64_t n = n0 + b * kRowsPerBlock;
      for (int j = 0; j < kRowsPerBlock && n + j < N; ++j)
        y[m * ldy + n + j] = (lanes[4 * j] + lanes[4 * j + 1]) + (lanes[4 * j + 2] + lanes[4 * j + 3]);
    }
}

// From kPairMinRows rows of x on CPUs with AVX512-VBMI, 8 rows at a time (and the rest if kPairMinRows or more) run
// quant_pairs.h's tiles over the unit's whole columns of 16 weight rows; the rest (rows of x or weight rows) these.
template <typename S>
void int4_span512(const Int4Rows& q, const S* s, int64_t groups, const uint16_t* x, int64_t ldx, float* y,
                  int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t steps, int64_t group_steps) {
  const auto rest = [&](int64_t m0, int64_t rows, int64_t from) {
    row_blocks<4>(rows, [&](auto mb_tag, int64_t m) {
      constexpr int MB = decltype(mb_tag)::value;
      const uint16_t* xm = x + (m0 + m) * ldx;
      float* ym = y + (m0 + m) * ldy;
      int64_t n = from;
      if constexpr (MB > 1) {  // one row reads at memory speed with int4_tile512's two sums a step (wider: 0.86x)
        for (; n + 4 * kRowsPerBlock <= n1; n += 4 * kRowsPerBlock)
          int4_tile512_wide<MB, 4>(q, s, groups, xm, ldx, ym, ldy, n, N, steps, group_steps);
        for (; n + 2 * kRowsPerBlock <= n1; n += 2 * kRowsPerBlock)
          int4_tile512_wide<MB, 2>(q, s, groups, xm, ldx, ym, ldy, n, N, steps, group_steps);
      }
      for (; n < n1; n += kRowsPerBlock) int4_tile512<MB>(q, s, groups, xm, ldx, ym, ldy, n, N, steps, group_steps);
    });
  };
  int64_t m = 0;
  for (; M - m >= kPairMinRows && pairs_ready(); m += std::min<int64_t>(8, M - m)) {
    const int64_t mb = std::min<int64_t>(8, M - m);
    const int64_t n = int4_pairs_span(q, s, groups, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1, N, mb, steps,
                                      group_steps);
    if (n < n1) rest(m, mb, n);
  }
  if (m < M) rest(m, M - m, n0);
}

#pragma GCC pop_options

}  // namespace dsvl2_quant_detail
