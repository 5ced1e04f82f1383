// Issue rates of the 512-bit instructions the quantised decode tiles spend, one thread, twelve independent chains
// each: VPDPBUSD (u8 x s8 -> int32, model/csrc/quant_vnni.h), VDPBF16PS (bf16 pairs -> float32,
// quant_avx512.h), VFMADD (float32), VPDPWSSD (int16 pairs -> int32). Prints billions of instructions a second.
// On the AMX Xeon of 2026-12-03, 15:33 UTC (bench/RESULTS.md): 3.54-3.79, 0.99-1.10, 4.08-4.23, 1.50-1.68.
//
//     g++ -O2 -march=native bench/isa_rates.cpp -o /tmp/isa_rates && /tmp/isa_rates
#include <immintrin.h>

#include <chrono>
#include <cstdio>

// Billions of `op` a second: twelve independent chains v[j] = op(v[j]), n rounds.
template <class V, class Op>
static double rate(V (&v)[12], Op op, long n) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) v[j] = op(v[j]);
    asm volatile("" ::"x"(v[0]), "x"(v[1]), "x"(v[2]), "x"(v[3]), "x"(v[4]), "x"(v[5]), "x"(v[6]), "x"(v[7]),
                 "x"(v[8]), "x"(v[9]), "x"(v[10]), "x"(v[11]));
  }
  return n * 12 / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

int main() {
  const long n = 50'000'000;
  __m512i a[12];
  __m512 f[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i + 1), f[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512i b = _mm512_set1_epi32(0x01020304), c = _mm512_set1_epi32(0x05060708);
  const __m512bh hb = (__m512bh)_mm512_set1_epi32(0x3f803f80), hc = (__m512bh)_mm512_set1_epi32(0x3f003f00);
  const __m512 fb = _mm512_set1_ps(1.0001f), fc = _mm512_set1_ps(0.5f);
  const double dpbusd = rate(a, [&](__m512i v) { return _mm512_dpbusd_epi32(v, b, c); }, n);
  const double dpbf16 = rate(f, [&](__m512 v) { return _mm512_dpbf16_ps(v, hb, hc); }, n);
  const double fma = rate(f, [&](__m512 v) { return _mm512_fmadd_ps(v, fb, fc); }, n);
  const double dpwssd = rate(a, [&](__m512i v) { return _mm512_dpwssd_epi32(v, b, c); }, n);
  printf("G instructions/s: vpdpbusd %.2f  vdpbf16ps %.2f  vfmadd %.2f  vpdpwssd %.2f\n", dpbusd, dpbf16, fma, dpwssd);
  int sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_epi32(a[i]) + static_cast<int>(_mm512_reduce_add_ps(f[i]));
  return sink == 42;
}
