// What bounds the AVX512 int4 tile (model/csrc/quant_avx512.h) on a CPU with AVX512-BF16: the one-row dot product
// over 16 KB of weight that stays in L1, one thread, nanoseconds per 64-byte line (128 int4 weights), four
// independent sums in every variant but "dp x2":
//   lookup     the tile as it is: two 32-byte steps, each zero-extended to 16-bit lanes, both nibbles looked up
//              into bf16 (vpermw), four VDPBF16PS against x broadcast per half
//   or-trick   the line as 32 16-bit words, each nibble masked into the low bits of bf16 128.0 (no shuffle), four
//              VDPBF16PS against x laid out in the same order (tried in the model and dropped: slower there)
//   dp x4      the four VDPBF16PS alone (no unpacking): the floor of any tile that keeps activations bf16
//   dp x2      two VDPBF16PS alone, two sums (a bf16 weight's line needs two dot products per 64 weights)
//   unpack     the or-trick's unpacking alone (no dot product)
// Weights and x are constants: the figures are speeds, not results (the checksums only keep the loops alive).
//
//   g++ -O3 bench/int4_avx512_dot.cpp -o /tmp/int4_avx512_dot && lscpu | grep 'Model name' \
//     && /tmp/int4_avx512_dot
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

enum Variant { kLookup, kOrTrick, kDp4, kDp2, kUnpack, kVariants };
const char* const kNames[kVariants] = {"lookup", "or-trick", "dp x4", "dp x2", "unpack"};

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
float run(const uint8_t* w, const uint16_t* xe, int64_t lines, int reps, Variant variant) {
  const __m512i nib = _mm512_set1_epi16(0x0F), bias = _mm512_set1_epi16(0x4300);
  const __m512i table = _mm512_set1_epi16(0x4100);  // any 16-entry table: the speed does not depend on it
  const int64_t plane = lines * 32;
  __m512 total = _mm512_setzero_ps();
  for (int r = 0; r < reps; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t t = 0; t < lines; ++t) {
      const uint8_t* wt = w + t * 64;
      const uint16_t* xt = xe + t * 32;
      if (variant == kLookup) {
        for (int h = 0; h < 2; ++h) {
          const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + 32 * h)));
          const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(u, nib), table);
          const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(u, 4), table);
          const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 16 * h)));
          const __m512i xh =
              _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 16 * h + 8)));
          __m512& s0 = h == 0 ? a0 : a2;
          __m512& s1 = h == 0 ? a1 : a3;
          s0 = _mm512_dpbf16_ps(s0, (__m512bh)lo, (__m512bh)xl);
          s1 = _mm512_dpbf16_ps(s1, (__m512bh)hi, (__m512bh)xh);
        }
        continue;
      }
      const __m512i v = _mm512_loadu_si512(wt);
      if (variant == kOrTrick || variant == kUnpack) {
        const __m512i w0 = _mm512_ternarylogic_epi32(v, nib, bias, 0xEA);  // (a & b) | c
        const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, bias, 0xEA);
        const __m512i w2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nib, bias, 0xEA);
        const __m512i w3 = _mm512_or_si512(_mm512_srli_epi16(v, 12), bias);
        if (variant == kUnpack) {
          const __m512i folded = _mm512_xor_si512(_mm512_xor_si512(w0, w1), _mm512_xor_si512(w2, w3));
          a0 = _mm512_add_ps(a0, _mm512_castsi512_ps(folded));
          continue;
        }
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xt));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xt + plane));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)w2, (__m512bh)_mm512_loadu_si512(xt + 2 * plane));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)w3, (__m512bh)_mm512_loadu_si512(xt + 3 * plane));
        continue;
      }
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)v, (__m512bh)_mm512_loadu_si512(xt));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)v, (__m512bh)_mm512_loadu_si512(xt + plane));
      if (variant == kDp4) {
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)v, (__m512bh)_mm512_loadu_si512(xt + 2 * plane));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)v, (__m512bh)_mm512_loadu_si512(xt + 3 * plane));
      }
    }
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
  return _mm512_reduce_add_ps(total);
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU lacks AVX512-BF16\n");
    return 1;
  }
  const int64_t lines = 256;  // 16 KB of weight: L1
  std::vector<uint8_t> w(lines * 64, 0x37);
  std::vector<uint16_t> xe(lines * 32 * 4, 0x3f80);
  for (int v = 0; v < kVariants; ++v) {
    const auto variant = static_cast<Variant>(v);
    const int reps = 20000;
    run(w.data(), xe.data(), lines, 100, variant);
    const auto start = std::chrono::steady_clock::now();
    const float check = run(w.data(), xe.data(), lines, reps, variant);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double n = static_cast<double>(lines) * reps;
    std::printf("%-9s %5.2f ns per 64-byte line, %5.1f G int4 weights/s  [%g]\n", kNames[v], s / n * 1e9,
                n * 128 / s / 1e9, check);
  }
  return 0;
}
