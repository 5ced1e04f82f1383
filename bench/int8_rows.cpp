// int8 weight ("r4" layout: blocks of 4 rows, 16 k a step) times MBX rows of x, the kernel's two forms side by side
// (model/csrc/quant_avx512.h): float32 x with float32 FMAs, 4 rows of x a pass over each unit (int8_tile512), and
// bf16 x on VDPBF16PS with each pair of weight rows widened once to bf16 for all the rows (int8_tile512_bf16). Tiny's
// lm_head shape (129,280 x 1,280, 165 MB), two threads over units of 256 rows, 15 alternated passes, medians; the
// sums of both forms must agree (the values are small integers: exact). This replica has none of the kernel's
// prefetches, so its float32 form runs slower than the kernel's: in the kernel the bf16 form was 1.25-1.34x at 4-8
// rows (bench/RESULTS.md), here 1.8-2.6x.
//
//   for mb in 2 4 8; do g++ -O3 -march=native -fopenmp -DMBX=$mb bench/int8_rows.cpp -o /tmp/int8_rows_$mb; done
//   for mb in 2 4 8; do OMP_NUM_THREADS=2 /tmp/int8_rows_$mb; done; lscpu | grep -E 'Model name|Flags'
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#ifndef MBX
#define MBX 8
#endif
constexpr int64_t N = 129280, K = 1280, STEPS = K / 16, BLOCK = STEPS * 64;
static std::vector<int8_t> W(N / 4 * BLOCK);
static std::vector<float> XF(8 * K);
static std::vector<uint16_t> XB(8 * K);
static std::vector<float> Y(8 * N), Y2(8 * N);

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

template <int MB>
static inline void tile_f32(const int8_t* r, const float* x, float* y, int64_t n0) {
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m) for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < STEPS; ++t, r += 64) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * K + t * 16);
    for (int j = 0; j < 4; ++j) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + j * 16))));
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_fmadd_ps(w, xv[m], acc[m][j]);
    }
  }
  for (int j = 0; j < 4; ++j) for (int m = 0; m < MB; ++m) y[m * N + n0 + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// 8 rows of bf16 x; each pair of a block's rows widened once to bf16: [row 2p | row 2p+1] as 16 k each.
template <int MB>
static inline void tile_bf16(const int8_t* r, const uint16_t* x, float* y, int64_t n0) {
  __m512 acc[MB][2][2];  // [m][pair]: for pair p, lanes 0-7 row 2p, lanes 8-15 row 2p+1
  for (int m = 0; m < MB; ++m) for (int p = 0; p < 2; ++p) acc[m][p][0] = acc[m][p][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < STEPS; ++t, r += 64) {
    __m512bh w[2];
    for (int p = 0; p < 2; ++p) {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + 32 * p))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + 32 * p + 16))));
      w[p] = _mm512_cvtne2ps_pbh(hi, lo);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_broadcast_i32x8(_mm256_loadu_si256((const __m256i*)(x + m * K + t * 16)));
      acc[m][0][0] = _mm512_dpbf16_ps(acc[m][0][0], w[0], xv);
      acc[m][1][0] = _mm512_dpbf16_ps(acc[m][1][0], w[1], xv);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 2; ++p) {
      const __m512 a = acc[m][p][0];
      y[m * N + n0 + 2 * p] = hsum8(_mm512_castps512_ps256(a));
      y[m * N + n0 + 2 * p + 1] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    }
}
int main() {
  for (size_t i = 0; i < W.size(); ++i) W[i] = (int8_t)((i * 37) % 255 - 127);
  for (int i = 0; i < 8 * K; ++i) { float f = ((i * 13) % 17 - 8) / 8.0f; XF[i] = f; uint32_t b; memcpy(&b, &f, 4); XB[i] = b >> 16; }
  const int64_t unit = 64 * 4;  // rows per unit (~80 KB)
  auto run = [&](int form) {
    const int64_t units = N / unit;
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      if (form == 1) {
        for (int64_t n = u * unit; n < (u + 1) * unit; n += 4) tile_bf16<MBX>(W.data() + n / 4 * BLOCK, XB.data(), Y2.data(), n);
        continue;
      }
      for (int mb = 0; mb < MBX; mb += (MBX < 4 ? MBX : 4))
        for (int64_t n = u * unit; n < (u + 1) * unit; n += 4)
          tile_f32<(MBX < 4 ? MBX : 4)>(W.data() + n / 4 * BLOCK, XF.data() + mb * K, Y.data() + mb * N, n);
    }
  };
  auto time = [&](int form) { auto s = std::chrono::steady_clock::now(); run(form); return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count(); };
  run(0); run(1);
  double md = 0; for (int64_t i = 0; i < MBX * N; ++i) md = std::max(md, (double)std::abs(Y[i] - Y2[i]));
  printf("max diff %g\n", md);
  std::vector<double> a, b;
  for (int r = 0; r < 15; ++r) { a.push_back(time(0)); b.push_back(time(1)); }
  std::sort(a.begin(), a.end()); std::sort(b.begin(), b.end());
  printf("%d rows,", MBX); printf(" int8 %lld x %lld: float32 form %.2f ms, bf16 form %.2f ms (%.2fx)\n", (long long)N, (long long)K, a[7] * 1e3, b[7] * 1e3, a[7] / b[7]);
}
