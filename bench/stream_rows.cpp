// How fast one-row bf16 products can stream their weight from memory on this CPU, beside a plain read, in one run:
// the 3-row tiles of the decode kernel before 2026-12-04 (kNB weight rows at a time, VDPBF16PS, their software
// prefetch at several distances and hints, and none), the rows read one after another as a single stream (what
// bf16_common.h's stream_one now does), and a float32 sum of the same bytes. Each pass reads a 512 MB weight of rows
// K = 1280 wide (Tiny's); two threads take 128 KB units from one shared counter (model/csrc/parallel.h before
// 2026-12-04) or each a contiguous half. The variants alternate pass by pass, so the host's drifting bandwidth hits
// all alike; each prints its median rate and its median ratio to the first variant in the same round.
//
//   g++ -O3 -march=native -fopenmp bench/stream_rows.cpp -o /tmp/stream_rows && /tmp/stream_rows; lscpu | grep Model
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using u16 = uint16_t;
constexpr int64_t K = 1280, N = (int64_t{512} << 20) / (2 * K), kUnitRows = (int64_t{1} << 17) / (2 * K) / 3 * 3;

static inline void prefetch(const void* p, int hint) {
  if (hint == 1) asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  if (hint == 2) asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
  if (hint == 3) asm volatile("prefetchnta %0" : : "m"(*static_cast<const char*>(p)));
}

// y[n] = x . w[n] for rows n0..n1 (a multiple of 3), prefetching `ahead` rows ahead with `hint` (0: none).
static void rows3(const u16* w, const u16* x, float* y, int64_t n0, int64_t n1, int64_t ahead, int hint) {
  for (int64_t n = n0; n < n1; n += 3) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0;
    const u16* r = w + n * K;
    for (int64_t k = 0; k < K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + K + k), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + 2 * K + k), xv);
      if (hint) {
        prefetch(r + ahead * K + k, hint);
        prefetch(r + (ahead + 1) * K + k, hint);
        prefetch(r + (ahead + 2) * K + k, hint);
      }
    }
    y[n] = _mm512_reduce_add_ps(a0), y[n + 1] = _mm512_reduce_add_ps(a1), y[n + 2] = _mm512_reduce_add_ps(a2);
  }
}

// The same products one weight row after another (a single forward stream per thread), prefetching `ahead` bytes
// ahead with `hint` (0: none); two accumulators per row to break the dependency chain.
static void rows1(const u16* w, const u16* x, float* y, int64_t n0, int64_t n1, int64_t ahead, int hint) {
  for (int64_t n = n0; n < n1; ++n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    const u16* r = w + n * K;
    for (int64_t k = 0; k < K; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
      if (hint) {
        prefetch(reinterpret_cast<const char*>(r + k) + ahead, hint);
        prefetch(reinterpret_cast<const char*>(r + k) + ahead + 64, hint);
      }
    }
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

// The same bytes summed as float32 lanes (the bandwidth probe's kind of read).
static void sum_rows(const u16* w, float* y, int64_t n0, int64_t n1) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const float* p = reinterpret_cast<const float*>(w + n0 * K);
  const int64_t floats = (n1 - n0) * K / 2;
  for (int64_t i = 0; i < floats; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i)), a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32)), a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  y[n0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename F>
static double gbs(F pass, int reps = 7) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto s = std::chrono::steady_clock::now();
    pass();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * N * K / t[reps / 2] / 1e9;
}

int main() {
  std::vector<u16> w(N * K), x(K);
  for (int64_t i = 0; i < N * K; ++i) w[i] = 0x3f80 + (i % 7);
  for (int64_t k = 0; k < K; ++k) x[k] = 0x3f80;
  std::vector<float> y(N);
  const int threads = omp_get_max_threads();
  auto units = [&](auto work) {  // 128 KB units from a shared counter
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    for (int64_t u = next.fetch_add(1); u * kUnitRows < N; u = next.fetch_add(1))
      work(u * kUnitRows, std::min(N, (u + 1) * kUnitRows) / 3 * 3);
  };
  auto halves = [&](auto work) {  // each thread one contiguous part
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      work(N * t / threads / 3 * 3, N * (t + 1) / threads / 3 * 3);
    }
  };
  std::printf("%d threads, weight %lld MB, K %lld; the variants alternate pass by pass (%s); GB/s, median of the\n"
              "passes, and each variant's median ratio to the kernel's current form (t1, 3 rows ahead) in the same round\n",
              threads, static_cast<long long>(2 * N * K >> 20), static_cast<long long>(K), "21 rounds");
  struct Variant { const char* name; int hint; int64_t ahead; bool halves; bool sum; bool seq = false; };
  const std::vector<Variant> variants = {
      {"current: t1, 3 rows ahead, units", 2, 3, false, false}, {"no prefetch, units", 0, 3, false, false},
      {"t0, 3 rows ahead, units", 1, 3, false, false},          {"nta, 3 rows ahead, units", 3, 3, false, false},
      {"nta, 6 rows ahead, units", 3, 6, false, false},         {"t1, 3 rows ahead, halves", 2, 3, true, false},
      {"nta, 3 rows ahead, halves", 3, 3, true, false},         {"row by row, t1 1 KB ahead, halves", 2, 1024, true, false, true},
      {"row by row, t1 4 KB ahead, halves", 2, 4096, true, false, true},
      {"row by row, nta 1 KB ahead, halves", 3, 1024, true, false, true},
      {"row by row, nta 4 KB ahead, halves", 3, 4096, true, false, true},
      {"row by row, none, halves", 0, 0, true, false, true},
      {"fp32 sum, units", 0, 0, false, true},
      {"fp32 sum, halves", 0, 0, true, true}};
  std::vector<std::vector<double>> rate(variants.size()), ratio(variants.size());
  for (int round = 0; round < 21; ++round) {
    std::vector<double> now(variants.size());
    for (size_t v = 0; v < variants.size(); ++v) {
      const Variant& c = variants[v];
      auto work = [&](int64_t a, int64_t b) {
        if (c.sum) sum_rows(w.data(), y.data(), a, b);
        else if (c.seq) rows1(w.data(), x.data(), y.data(), a, b, c.ahead, c.hint);
        else rows3(w.data(), x.data(), y.data(), a, b, c.ahead, c.hint);
      };
      now[v] = gbs([&] { if (c.halves) halves(work); else units(work); }, 1);
      rate[v].push_back(now[v]);
    }
    for (size_t v = 0; v < variants.size(); ++v) ratio[v].push_back(now[v] / now[0]);
  }
  auto median = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  for (size_t v = 0; v < variants.size(); ++v)
    std::printf("%-36s %5.1f GB/s (%4.1f-%4.1f)  %.2fx\n", variants[v].name, median(rate[v]),
                *std::min_element(rate[v].begin(), rate[v].end()), *std::max_element(rate[v].begin(), rate[v].end()),
                median(ratio[v]));
}
