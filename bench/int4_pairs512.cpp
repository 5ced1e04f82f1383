// int4 products of several rows of bf16 x (decode batches) in model/csrc's "k16r4" layout with AVX512-BF16, timed
// on weights from L2 (1,536 rows, re-read) and from memory (131,072 rows), K = 1,280 in groups of 128, units of 96
// weight rows handed to the threads as the kernels' run_rows hands them:
//   tiles   model/csrc/quant_avx512.h's int4_tile512_wide<MB, 4> on 4 rows of x a pass (5-8 rows: a second pass
//           over each unit, from L2): each 16-k step of a block of 4 weight rows unpacked into 16 lanes per row
//   pairs   model/csrc/quant_pairs.h's int4_pair_tile<M, 2>: a column of 16 weight rows (4 blocks) rearranged per
//           step by two VPERMT2B into pairs of k, the nibbles looked up as the tiles look them up, all M rows of x
//           multiplied by each unpacked weight with their pair of k broadcast (lanes are weight rows)
//   native  pairs from a layout that stores the VPERMT2B's output (what a new runtime layout would read): the upper
//           bound of dropping the rearrangement
// Each way's checksum must match the tiles' (printed where it does not). Speeds only: random weights.
//
//   g++ -O3 -march=native -fopenmp bench/int4_pairs512.cpp -o /tmp/int4_pairs512 && lscpu | grep -E 'Model name|Flags'
//   for m in 2 4 5 6 7 8; do /tmp/int4_pairs512 $m 2; done       # rows of x, threads
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t K = 1280, kSteps = K / 16, kGroupSteps = 8, kGroups = K / 128, kUnit = 96;
alignas(64) uint16_t kTable[32];
alignas(64) uint8_t kIndex[2][64];

uint16_t bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);
}

void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA); }

struct Weight {
  const uint8_t* q;       // k16r4: per block of 4 rows, steps of 32 bytes
  const uint8_t* native;  // per column of 16 rows and step, the 128 bytes the rearrangement makes
  const float* s;         // (N, groups)
  const float* st;        // (groups, N)
  int64_t N, bb;          // rows, bytes per block
};

template <int MB, int NB>
void tiles(const Weight& w, const uint16_t* x, float* y, int64_t n0) {
  const __m512i table = _mm512_load_si512(kTable), low = _mm512_set1_epi16(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[NB][MB];
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MB; ++m) acc[b][m] = _mm512_setzero_ps();
  const uint8_t* r = w.q + n0 / 4 * w.bb;
  for (int64_t g = 0; g < kGroups; ++g) {
    __m512 part[NB][MB];
    for (int b = 0; b < NB; ++b)
      for (int m = 0; m < MB; ++m) part[b][m] = _mm512_setzero_ps();
    for (int64_t t = g * kGroupSteps; t < (g + 1) * kGroupSteps; ++t) {
      __m512bh wl[NB], wh[NB];
      for (int b = 0; b < NB; ++b) {
        const uint8_t* rt = r + b * w.bb + t * 32;
        prefetch(rt + 8192);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt)));
        wl[b] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
        wh[b] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
      }
      for (int m = 0; m < MB; ++m) {
        const uint16_t* xt = x + m * K + t * 16;
        const __m512bh xl = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
        const __m512bh xh =
            (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 8)));
        for (int b = 0; b < NB; ++b) part[b][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(part[b][m], wl[b], xl), wh[b], xh);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const float* sn = w.s + (n0 + 4 * b) * kGroups + g;
      const __m128 s4 = _mm_setr_ps(sn[0], sn[kGroups], sn[2 * kGroups], sn[3 * kGroups]);
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
      for (int m = 0; m < MB; ++m) acc[b][m] = _mm512_fmadd_ps(part[b][m], scale, acc[b][m]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int m = 0; m < MB; ++m) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[b][m]);
      for (int j = 0; j < 4; ++j)
        y[m * w.N + n0 + 4 * b + j] = (lanes[4 * j] + lanes[4 * j + 1]) + (lanes[4 * j + 2] + lanes[4 * j + 3]);
    }
}

template <int MB, bool NATIVE>
void pairs(const Weight& w, const uint16_t* x, float* y, int64_t n0) {
  constexpr int NC = 2;
  const __m512i table = _mm512_load_si512(kTable), low = _mm512_set1_epi16(0x0F);
  const __m512i i01 = _mm512_load_si512(kIndex[0]), i23 = _mm512_load_si512(kIndex[1]);
  alignas(64) float total[MB * NC * 16] = {};
  for (int64_t g = 0; g < kGroups; ++g) {
    __m512 acc[MB * NC];
    for (int i = 0; i < MB * NC; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t t = g * kGroupSteps; t < (g + 1) * kGroupSteps; ++t) {
      __m512i w01[NC], w23[NC];
      for (int c = 0; c < NC; ++c) {
        if (NATIVE) {
          const uint8_t* b = w.native + ((n0 / 16 + c) * kSteps + t) * 128;
          prefetch(b + 8192);
          prefetch(b + 8192 + 64);
          w01[c] = _mm512_loadu_si512(b);
          w23[c] = _mm512_loadu_si512(b + 64);
        } else {
          const uint8_t* b = w.q + (n0 / 4 + 4 * c) * w.bb + t * 32;
          if (t % 2 == 0)
            for (int i = 0; i < 4; ++i) prefetch(b + i * w.bb + NC * 4 * w.bb);
          const auto half = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
          const __m512i z0 = _mm512_inserti64x4(_mm512_castsi256_si512(half(b)), half(b + w.bb), 1);
          const __m512i z1 = _mm512_inserti64x4(_mm512_castsi256_si512(half(b + 2 * w.bb)), half(b + 3 * w.bb), 1);
          w01[c] = _mm512_permutex2var_epi8(z0, i01, z1);
          w23[c] = _mm512_permutex2var_epi8(z0, i23, z1);
        }
      }
      for (int p = 0; p < 4; ++p) {
        __m512bh wl[NC], wh[NC];
        for (int c = 0; c < NC; ++c) {
          const __m512i v8 = p < 2 ? w01[c] : w23[c];
          const __m512i v =
              _mm512_cvtepu8_epi16(p % 2 == 0 ? _mm512_castsi512_si256(v8) : _mm512_extracti64x4_epi64(v8, 1));
          wl[c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
          wh[c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        }
        for (int h = 0; h < 2; ++h)
          for (int m = 0; m < MB; ++m) {
            uint32_t bits;
            std::memcpy(&bits, x + m * K + t * 16 + 8 * h + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
            for (int c = 0; c < NC; ++c) acc[m * NC + c] = _mm512_dpbf16_ps(acc[m * NC + c], h ? wh[c] : wl[c], xv);
          }
      }
    }
    for (int c = 0; c < NC; ++c) {
      const __m512 sc = _mm512_loadu_ps(w.st + g * w.N + n0 + 16 * c);
      for (int m = 0; m < MB; ++m) {
        float* tp = total + (m * NC + c) * 16;
        _mm512_store_ps(tp, _mm512_fmadd_ps(acc[m * NC + c], sc, _mm512_load_ps(tp)));
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < NC; ++c) std::memcpy(y + m * w.N + n0 + 16 * c, total + (m * NC + c) * 16, 64);
}

template <int MB>
void run_rows(int way, const Weight& w, const uint16_t* x, float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t u = 0; u < w.N / kUnit; ++u) {
    const int64_t n0 = u * kUnit, n1 = n0 + kUnit;
    if (way == 0) {
      for (int64_t m = 0; m < MB; m += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, MB - m));
        for (int64_t n = n0; n < n1; n += 16) {
          if (rows == 4) tiles<4, 4>(w, x + m * K, y + m * w.N, n);
          if (rows == 3) tiles<3, 4>(w, x + m * K, y + m * w.N, n);
          if (rows == 2) tiles<2, 4>(w, x + m * K, y + m * w.N, n);
          if (rows == 1) tiles<1, 4>(w, x + m * K, y + m * w.N, n);
        }
      }
    } else {
      for (int64_t n = n0; n < n1; n += 32) way == 1 ? pairs<MB, false>(w, x, y, n) : pairs<MB, true>(w, x, y, n);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int M = argc > 1 ? std::atoi(argv[1]) : 8, threads = argc > 2 ? std::atoi(argv[2]) : 2;
  if (M < 2 || M > 8) return std::fprintf(stderr, "rows of x: 2-8\n"), 2;
  omp_set_num_threads(threads);
  for (int i = 0; i < 16; ++i) kTable[i] = bf16(static_cast<float>(i - 8));
  for (int s = 0; s < 2; ++s)
    for (int o = 0; o < 64; ++o) {
      const int p = 2 * s + o / 32, row = (o % 32) / 2, e = o % 2;
      kIndex[s][o] = static_cast<uint8_t>((row / 4) * 32 + 8 * (row % 4) + 2 * p + e);
    }
  const char* names[] = {"tiles", "pairs", "native"};
  for (const int64_t N : {int64_t{1536}, int64_t{131072}}) {
    std::vector<uint8_t> q(N / 4 * kSteps * 32), native(N / 16 * kSteps * 128);
    for (auto& b : q) b = static_cast<uint8_t>(std::rand());
    for (int64_t c = 0; c < N / 16; ++c)
      for (int64_t t = 0; t < kSteps; ++t)
        for (int s = 0; s < 2; ++s)
          for (int o = 0; o < 64; ++o) {
            const int src = kIndex[s][o];
            native[(c * kSteps + t) * 128 + 64 * s + o] = q[(4 * c + src / 32) * kSteps * 32 + t * 32 + src % 32];
          }
    std::vector<float> s(N * kGroups), st(N * kGroups);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < kGroups; ++g) s[n * kGroups + g] = st[g * N + n] = 0.01f * (1 + std::rand() % 7);
    std::vector<uint16_t> x(M * K);
    for (auto& v : x) v = bf16(static_cast<float>(std::rand() % 200 - 100) / 50.0f);
    const Weight w{q.data(), native.data(), s.data(), st.data(), N, kSteps * 32};
    std::vector<float> y(M * N), ref;
    const auto run = [&](int way) {
      switch (M) {
        case 8: run_rows<8>(way, w, x.data(), y.data()); break;
        case 7: run_rows<7>(way, w, x.data(), y.data()); break;
        case 6: run_rows<6>(way, w, x.data(), y.data()); break;
        case 5: run_rows<5>(way, w, x.data(), y.data()); break;
        case 4: run_rows<4>(way, w, x.data(), y.data()); break;
        case 3: run_rows<3>(way, w, x.data(), y.data()); break;
        default: run_rows<2>(way, w, x.data(), y.data()); break;
      }
    };
    run(0);
    ref = y;
    double best[3] = {1e9, 1e9, 1e9};
    const int reps = N < 10000 ? 400 : 5;
    for (int round = 0; round < 5; ++round)
      for (int way = 0; way < 3; ++way) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; ++r) run(way);
        best[way] = std::min(best[way], std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        double err = 0;
        for (size_t i = 0; i < y.size(); ++i) err = std::max(err, static_cast<double>(std::fabs(y[i] - ref[i])));
        if (round == 0 && err > 1e-2) std::printf("  %s differs from the tiles by %g\n", names[way], err);
      }
    for (int way = 0; way < 3; ++way)
      std::printf("rows %d, %s, %d threads: %-6s %8.1f us  %5.0f GFLOP/s  %.2fx the tiles\n", M,
                  N < 10000 ? "L2" : "memory", threads, names[way], best[way] * 1e6, 2.0 * M * N * K / best[way] * 1e-9,
                  best[0] / best[way]);
  }
}
