// int4 products of a few rows on AVX512-VNNI (the ops' `isa` flag kIsaVnni, with the AVX512 or AMX tiles), on the
// "k16r4" layout as it lies. quant_avx512.h's int4 tile looks each nibble up as bf16 and multiplies it on
// VDPBF16PS; on a Xeon with AMX that instruction issues at ~0.4 a cycle (a quarter of the FMAs' rate), which bounds
// one row of x at ~15 G weights a second a core from cache. VPDPBUSD (u8 x s8 -> int32, 4 products a 32-bit lane)
// issues 2-4x as often there (bench/isa_rates.cpp) and needs no lookup: the nibbles are the u8 operand after one AND (low) or a shift
// and an AND (high).
//
// x therefore goes in as fixed point: per block of B k (B = 16 * gcd(G / 16, 8) k: 128 for G = 128), a power of two
// 2^E from the block's largest |x| (2^E <= max|x| / 2^13), and x_q = round(x / 2^E), |x_q| < 2^14, as two s8 parts
// x_q = 128 * hi + lo (hi in [-128, 127], lo in [0, 127]), one VPDPBUSD each. Exact for every x within 2^-6 of the
// block's largest (a bf16 value has 8 significant bits); a smaller one is rounded to the nearest multiple of 2^E
// (half to even), an error of at most 2^-14 of the block's largest |x|. Bf16 denormals read as zero (as VDPBF16PS
// reads them); a block holding an Inf or NaN gives NaN. Per block, in int32 (no rounding), the sums of q * x_q
// (q = nibble = weight + 8) less 8 * sum(x_q), then float32: y = sum over blocks of s_w * 2^E * that. So the result
// equals the dequantised weight times x rounded as above, up to float32 summation order (tests/test_quant_vnni.py).
//
// Lanes: one 64-byte line of a block of 4 weight rows is its steps t and t + 1 (t even); 32-bit lane d holds row
// (d % 8) / 2's bytes 4 (d % 2) .. + 3 of step t + d / 8, i.e. k = 16 (t + d / 8) + 4 (d % 2) + i (low nibbles) and
// + 8 (high). x is laid out to match once per call (`FixedRows`): per pair of steps four 64-byte vectors (low / high
// nibbles x lo / hi parts), so that the tile's inner loop only loads.
#pragma once

#include "quant_avx512.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace dsvl2_quant_detail {

// Whether the VNNI tiles cover a weight in groups of `group_steps` 16-k steps (whole pairs of steps), and the
// steps of x's fixed-point blocks for it (at most 8: 128 k).
inline bool vnni_fits(int64_t group_steps) { return group_steps % 2 == 0; }
inline int64_t vnni_block_steps(int64_t group_steps) { return std::gcd(group_steps, int64_t{8}); }

constexpr int64_t kVnniStreamRows = 2;  // rows of x up to which a tile runs the whole K (int4_span_vnni)

// M rows of x as the VNNI tiles read them (see the top): per row, pairs * 4 vectors, and per block its scale 2^E
// and 8 * sum(x_q). Owns its memory.
struct FixedRows {
  at::Tensor vectors, scales, offsets;  // (M, pairs * 256) int8, (M, blocks) float32, (M, blocks) int32
  int64_t pairs = 0, blocks = 0, block_pairs = 0;
  int8_t* v = nullptr;  // their data (read in the tiles' loops: no tensor accessors there)
  float* s = nullptr;
  int32_t* o = nullptr;
  const int8_t* row(int64_t m) const { return v + m * pairs * 256; }
  const float* scale(int64_t m) const { return s + m * blocks; }
  const int32_t* offset(int64_t m) const { return o + m * blocks; }
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")

// One block of n k (a multiple of 16) of bf16 bits x -> x_q's parts in hi / lo (bytes), returning 2^E and storing
// 8 * sum(x_q) at *offset.
inline float fixed_block(const uint16_t* x, int64_t n, int8_t* hi, int8_t* lo, int32_t* offset) {
  __m512i top = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 32)
    top = _mm512_max_epu16(top, _mm512_and_si512(_mm512_loadu_si512(x + k), _mm512_set1_epi16(0x7FFF)));
  const int fmax = _mm512_reduce_max_epi32(_mm512_srli_epi32(_mm512_cvtepu16_epi32(_mm256_max_epu16(
                       _mm512_castsi512_si256(top), _mm512_extracti64x4_epi64(top, 1))), 7));
  if (fmax == 0 || fmax == 255) {  // zeros and denormals only; or an Inf / NaN (NaN scale: the outputs are NaN)
    std::memset(hi, 0, n), std::memset(lo, 0, n);
    *offset = 0;
    return fmax == 0 ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  // x = (128 + m) * 2^(f - 134) for exponent field f, mantissa m; 2^E = 2^(fmax - 140); x_q = (128 + m) * 2^shift
  // with shift = f - fmax + 6 <= 6: a left shift, or a right shift rounded half to even.
  const __m512i low7 = _mm512_set1_epi32(0x7F), ff = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1);
  const __m512i six_less = _mm512_set1_epi32(6 - fmax), ten = _mm512_set1_epi32(10);
  __m512i total = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 16) {
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    const __m512i f = _mm512_and_si512(_mm512_srli_epi32(b, 7), ff);
    const __mmask16 normal = _mm512_cmpneq_epi32_mask(f, _mm512_setzero_si512());
    const __m512i mant = _mm512_maskz_or_epi32(normal, _mm512_and_si512(b, low7), _mm512_set1_epi32(0x80));
    const __m512i shift = _mm512_add_epi32(f, six_less);
    const __m512i right = _mm512_min_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), shift), ten);  // > 0 where used
    const __m512i half_less = _mm512_sub_epi32(_mm512_sllv_epi32(one, _mm512_sub_epi32(right, one)), one);
    const __m512i odd = _mm512_and_si512(_mm512_srlv_epi32(mant, right), one);
    const __m512i down = _mm512_srlv_epi32(_mm512_add_epi32(_mm512_add_epi32(mant, half_less), odd), right);
    const __mmask16 up = _mm512_cmpge_epi32_mask(shift, _mm512_setzero_si512());
    __m512i v = _mm512_mask_sllv_epi32(down, up, mant, shift);
    const __mmask16 negative = _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x8000));
    v = _mm512_mask_sub_epi32(v, negative, _mm512_setzero_si512(), v);
    total = _mm512_add_epi32(total, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 7)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(_mm512_and_si512(v, low7)));
  }
  *offset = 8 * _mm512_reduce_add_epi32(total);
  return std::ldexp(1.0f, fmax - 140);
}

// x (M rows of bf16 bits at stride ldx >= steps * 16, zeros past K) as FixedRows for blocks of `block_steps`.
inline FixedRows fixed_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t steps, int64_t block_steps) {
  FixedRows f;
  f.pairs = steps / 2, f.block_pairs = block_steps / 2, f.blocks = steps / block_steps;
  const auto bytes = at::TensorOptions().dtype(at::kChar);
  f.vectors = at::empty({M, f.pairs * 256}, bytes);
  f.scales = at::empty({M, f.blocks}, bytes.dtype(at::kFloat));
  f.offsets = at::empty({M, f.blocks}, bytes.dtype(at::kInt));
  f.v = f.vectors.mutable_data_ptr<int8_t>(), f.s = f.scales.mutable_data_ptr<float>();
  f.o = f.offsets.mutable_data_ptr<int32_t>();
  const int64_t block_k = block_steps * 16;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> hi(steps * 16), lo(steps * 16);
    for (int64_t m = m0; m < m1; ++m) {
      const uint16_t* xm = x + m * ldx;
      float* scale = f.s + m * f.blocks;
      int32_t* offset = f.o + m * f.blocks;
      for (int64_t b = 0; b < f.blocks; ++b)
        scale[b] = fixed_block(xm + b * block_k, block_k, hi.data() + b * block_k, lo.data() + b * block_k, offset + b);
      int8_t* out = f.v + m * f.pairs * 256;
      for (int64_t p = 0; p < f.pairs; ++p)
        for (int nibble = 0; nibble < 2; ++nibble)
          for (const int8_t* part : {lo.data(), hi.data()}) {  // vector 2 * nibble + (part is hi)
            int64_t first, second;
            std::memcpy(&first, part + 32 * p + 8 * nibble, 8);
            std::memcpy(&second, part + 32 * p + 16 + 8 * nibble, 8);
            _mm512_storeu_si512(out, _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi64x(first)),
                                                        _mm256_set1_epi64x(second), 1));
            out += 64;
          }
    }
  });
  return f;
}

// y[m][n0 .. n0 + 4) for MB rows of x from row m0 of `x`: per block, int32 sums per row of x, low / high nibbles
// and hi / lo parts apart (four chains), then one float32 FMA per block with the rows' scales times 2^E.
template <int MB, typename S>
inline void int4_tile_vnni(const Int4Rows& q, const S* s, int64_t groups, const FixedRows& x, int64_t m0, float* y,
                           int64_t ldy, int64_t n0, int64_t N, int64_t group_steps) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i row_of_lane = _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0);
  constexpr __mmask16 kFirstLanes = 0x0055;  // one lane of each weight row: where -8 * sum(x_q) goes
  const int64_t block_steps = 2 * x.block_pairs;
  const int8_t* xr[MB];
  const float* xs[MB];
  const int32_t* xo[MB];
  for (int m = 0; m < MB; ++m) xr[m] = x.row(m0 + m), xs[m] = x.scale(m0 + m), xo[m] = x.offset(m0 + m);
  const int64_t blocks = x.blocks, block_pairs = x.block_pairs;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* r = q.row(n0);
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i part[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 4; ++i) part[m][i] = _mm512_setzero_si512();
    for (int64_t p = b * block_pairs; p < (b + 1) * block_pairs; ++p) {
      const uint8_t* rp = r + p * 2 * Int4Rows::kStep;
      prefetch(rp + kPrefetchBytes512);
      const __m512i v = _mm512_loadu_si512(rp);
      const __m512i wl = _mm512_and_si512(v, low), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xv = xr[m] + p * 256;
        part[m][0] = _mm512_dpbusd_epi32(part[m][0], wl, _mm512_loadu_si512(xv));
        part[m][1] = _mm512_dpbusd_epi32(part[m][1], wl, _mm512_loadu_si512(xv + 64));
        part[m][2] = _mm512_dpbusd_epi32(part[m][2], wh, _mm512_loadu_si512(xv + 128));
        part[m][3] = _mm512_dpbusd_epi32(part[m][3], wh, _mm512_loadu_si512(xv + 192));
      }
    }
    const int64_t g = groups == 1 ? 0 : b * block_steps / group_steps;
    const __m128 s4 = _mm_setr_ps(group_scale(s, groups, n0, g, N), group_scale(s, groups, n0 + 1, g, N),
                                  group_scale(s, groups, n0 + 2, g, N), group_scale(s, groups, n0 + 3, g, N));
    const __m512 sw = _mm512_permutexvar_ps(row_of_lane, _mm512_castps128_ps512(s4));
    for (int m = 0; m < MB; ++m) {
      __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(part[m][1], part[m][3]), 7),
                                     _mm512_add_epi32(part[m][0], part[m][2]));
      sum = _mm512_mask_sub_epi32(sum, kFirstLanes, sum, _mm512_set1_epi32(xo[m][b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(sw, _mm512_set1_ps(xs[m][b])), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[m]);
    for (int j = 0; j < kRowsPerBlock && n0 + j < N; ++j)
      y[m * ldy + n0 + j] = (lanes[2 * j] + lanes[2 * j + 1]) + (lanes[8 + 2 * j] + lanes[9 + 2 * j]);
  }
}

// Block b of x's fixed point (weight group g) for MB rows of x from row m, under the nb blocks of 4 weight rows from
// row n0: per weight block, the int32 sums per part (the low and high nibbles' products share a chain: exact), then
// one float32 FMA per row of x into its sums, acc + j * 16 + i * ld_acc for weight block j and row m + i (16 lanes:
// lane d holds weight row (d % 8) / 2's). Where `ahead`, each weight block's bytes for x's next block (the same
// rows, K further) are prefetched. PAIRS (x's block_pairs) a constant: the block's loop unrolled keeps its sums in registers.
template <int MB, int PAIRS, typename S>
inline void int4_blocks_vnni(const Int4Rows& q, const S* s, int64_t groups, int64_t g, int64_t n0, int64_t nb,
                             int64_t N, const FixedRows& x, int64_t m, int64_t b, float* acc, int64_t ld_acc,
                             bool ahead) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i row_of_lane = _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0);
  constexpr __mmask16 kFirstLanes = 0x0055;
  constexpr int64_t kBlockBytes = PAIRS * 64;
  const int8_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = x.row(m + i) + b * PAIRS * 256;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t n = n0 + j * kRowsPerBlock;
    const uint8_t* rp = q.row(n) + b * kBlockBytes;
    if (ahead)
      for (int o = 0; o < kBlockBytes; o += 64) dsvl2_prefetch::to_l1(rp + kBlockBytes + o);
    __m512i lo[MB], hi[MB];
#pragma GCC unroll 8  // unrolled, not a memset of the arrays and reloads (what GCC made of MB 6-8: 2x slower)
    for (int i = 0; i < MB; ++i) lo[i] = hi[i] = _mm512_setzero_si512();
#pragma GCC unroll 4  // the whole block: its sums stay in the same registers (a loop copied them each pair)
    for (int p = 0; p < PAIRS; ++p) {
      const __m512i v = _mm512_loadu_si512(rp + p * 64);
      const __m512i wl = _mm512_and_si512(v, low), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const int8_t* xv = xr[i] + p * 256;
        lo[i] = _mm512_dpbusd_epi32(lo[i], wl, _mm512_loadu_si512(xv));
        hi[i] = _mm512_dpbusd_epi32(hi[i], wl, _mm512_loadu_si512(xv + 64));
        lo[i] = _mm512_dpbusd_epi32(lo[i], wh, _mm512_loadu_si512(xv + 128));
        hi[i] = _mm512_dpbusd_epi32(hi[i], wh, _mm512_loadu_si512(xv + 192));
      }
    }
    const __m128 s4 = _mm_setr_ps(group_scale(s, groups, n, g, N), group_scale(s, groups, n + 1, g, N),
                                  group_scale(s, groups, n + 2, g, N), group_scale(s, groups, n + 3, g, N));
    const __m512 sw = _mm512_permutexvar_ps(row_of_lane, _mm512_castps128_ps512(s4));
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(hi[i], 7), lo[i]);
      sum = _mm512_mask_sub_epi32(sum, kFirstLanes, sum, _mm512_set1_epi32(x.offset(m + i)[b]));
      float* a = acc + j * 16 + i * ld_acc;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                                          _mm512_mul_ps(sw, _mm512_set1_ps(x.scale(m + i)[b])), _mm512_loadu_ps(a)));
    }
  }
}

// Rows [n0, n1) of y for M rows of x from row m0. One or two rows stream each block of 4 weight rows over the whole
// K (int4_tile_vnni: the weight read once, at memory speed). More go block of x by block of x, a pass of up to
// kPassBlocks weight blocks under each, the rows of x 16 at a time (sums and x near the core: 32 + 16 KB): x's
// vectors (4 x 64 bytes per 32 k and row, 4x its bf16 bytes) came from L2 once per 4 weight rows when each tile ran
// the whole K, and that bounded the tiles from 3 rows on (8 rows: 2.9 G weights a second a core from cache, 4.5-5.4
// now; Tiny's lm_head from memory at 4 / 5 / 8 rows 14.2 / 20.2 / 27.7 -> 11.6 / 13.9 / 18.5 ms: bench/RESULTS.md).
template <typename S>
void int4_span_vnni(const Int4Rows& q, const S* s, int64_t groups, const FixedRows& x, int64_t m0, float* y,
                    int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t group_steps) {
  if (M <= kVnniStreamRows) {
    tiles<kVnniStreamRows>(M, n0, n1, [&](auto mb_tag, int64_t m, int64_t n) {
      int4_tile_vnni<decltype(mb_tag)::value>(q, s, groups, x, m0 + m, y + m * ldy, ldy, n, N, group_steps);
    });
    return;
  }
  constexpr int64_t kPassBlocks = 32, kPassRows = 16;
  const int64_t pairs = x.block_pairs, block_steps = 2 * pairs;
  thread_local std::vector<float> acc;
  for (int64_t mc = 0; mc < M; mc += kPassRows)
    for (int64_t c0 = n0; c0 < n1; c0 += kPassBlocks * kRowsPerBlock) {
      const int64_t rows = std::min(kPassRows, M - mc);
      const int64_t nb = (std::min(n1, c0 + kPassBlocks * kRowsPerBlock) - c0 + 3) / kRowsPerBlock;
      acc.assign(rows * nb * 16, 0.0f);
      for (int64_t b = 0; b < x.blocks; ++b) {
        const int64_t g = groups == 1 ? 0 : b * block_steps / group_steps;
        row_blocks<8>(rows, [&](auto mb_tag, int64_t m) {
          constexpr int MB = decltype(mb_tag)::value;
          float* a = acc.data() + m * nb * 16;
          const int64_t first = m0 + mc + m;
          const bool ahead = m == 0 && b + 1 < x.blocks;
          if (pairs == 4) {
            int4_blocks_vnni<MB, 4>(q, s, groups, g, c0, nb, N, x, first, b, a, nb * 16, ahead);
          } else if (pairs == 2) {
            int4_blocks_vnni<MB, 2>(q, s, groups, g, c0, nb, N, x, first, b, a, nb * 16, ahead);
          } else {
            int4_blocks_vnni<MB, 1>(q, s, groups, g, c0, nb, N, x, first, b, a, nb * 16, ahead);
          }
        });
      }
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < nb; ++j) {
          const float* l = acc.data() + (m * nb + j) * 16;
          float* out = y + (mc + m) * ldy + c0 + kRowsPerBlock * j;
          for (int r = 0; r < kRowsPerBlock && c0 + kRowsPerBlock * j + r < N; ++r)
            out[r] = (l[2 * r] + l[2 * r + 1]) + (l[8 + 2 * r] + l[9 + 2 * r]);
        }
    }
}

#pragma GCC pop_options

}  // namespace dsvl2_quant_detail
