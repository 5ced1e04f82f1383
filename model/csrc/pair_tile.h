// The pair-packed GEMM micro-kernel on AVX512-BF16 (VDPBF16PS) and its loads, shared by the bf16 kernels
// (bf16_common.h: attention, the experts) and the quantised products' prefill (quant_gemm.h). Compiled for those
// instructions whatever the including library's flags (the quantised library is built for AVX2), so only code
// compiled for them calls it. Namespace dsvl2_kernels_detail.
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace dsvl2_kernels_detail {

using bf16 = c10::BFloat16;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16")

inline __m512bh load_bf16(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

inline __m512bh bcast_pair(const bf16* p) {  // (p[0], p[1]) in all 16 pair lanes
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

// acc[r][c] (MR rows x NR 16-lane columns) += sum over pairs t < pairs of a_r pair t * b[t][c]: the pair-packed
// GEMM micro-kernel. Row r of `a` starts at a + r * lda (bf16, pairs contiguous); b's pair t starts at b + t * ldb.
template <int MR, int NR>
inline void pair_tile(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs, __m512* out) {
  __m512 acc[MR * NR];  // local, so the compiler keeps it in registers (out may alias anything)
  for (int t = 0; t < MR * NR; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh bv[NR];
    for (int c = 0; c < NR; ++c) bv[c] = load_bf16(b + t * ldb + 32 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = bcast_pair(a + r * lda + 2 * t);
      for (int c = 0; c < NR; ++c) acc[r * NR + c] = _mm512_dpbf16_ps(acc[r * NR + c], bv[c], av);
    }
  }
  for (int t = 0; t < MR * NR; ++t) out[t] = acc[t];
}

template <int MR>
inline void pair_tile_cols(int nr, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs,
                           __m512* acc) {
  switch (nr) {
    case 5: pair_tile<MR, 5>(a, lda, b, ldb, pairs, acc); break;
    case 4: pair_tile<MR, 4>(a, lda, b, ldb, pairs, acc); break;
    case 3: pair_tile<MR, 3>(a, lda, b, ldb, pairs, acc); break;
    case 2: pair_tile<MR, 2>(a, lda, b, ldb, pairs, acc); break;
    default: pair_tile<MR, 1>(a, lda, b, ldb, pairs, acc); break;
  }
}

// acc[r * nr + c] = the pair_tile product for any 1 <= mr <= 8 and 1 <= nr <= 5. Callers keep mr * nr <= 24, what
// the registers hold (attention 4 x 5, the experts 8 x 3).
inline void pair_tile_any(int mr, int nr, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs,
                          __m512* acc) {
  switch (mr) {
    case 8: pair_tile_cols<8>(nr, a, lda, b, ldb, pairs, acc); break;
    case 7: pair_tile_cols<7>(nr, a, lda, b, ldb, pairs, acc); break;
    case 6: pair_tile_cols<6>(nr, a, lda, b, ldb, pairs, acc); break;
    case 5: pair_tile_cols<5>(nr, a, lda, b, ldb, pairs, acc); break;
    case 4: pair_tile_cols<4>(nr, a, lda, b, ldb, pairs, acc); break;
    case 3: pair_tile_cols<3>(nr, a, lda, b, ldb, pairs, acc); break;
    case 2: pair_tile_cols<2>(nr, a, lda, b, ldb, pairs, acc); break;
    default: pair_tile_cols<1>(nr, a, lda, b, ldb, pairs, acc); break;
  }
}

#pragma GCC pop_options

}  // namespace dsvl2_kernels_detail
