// Ways to turn int4 weights into float32 for the one-row (decode) dot product on AVX2, timed on a weight that
// stays in the L2 cache (so unpacking, not reading memory, is what is measured), one thread:
//   current   model/csrc/quant_avx2.h's int4_row: 8 bytes per weight row and 16 k (low nibble k, high k + 8),
//             widened to 32-bit lanes, masked / shifted, converted (vcvtdq2ps), one FMA per 8 weights
//   f16c      the nibbles as 16-bit lanes read as subnormal halves (n * 2^-24) by vcvtph2ps
//   exponent  8 nibbles per 32-bit lane, each moved under the exponent of 1.0 (1 + n/16) by shift, mask, or
//   int8      the int8 kernel's widening of 16 int8 weights, for scale
// Weights are random bytes: the figures are speeds, not results (the checksums only keep the loops alive).
//
//   g++ -O3 -mavx2 -mfma -mf16c bench/int4_unpack.cpp -o /tmp/int4_unpack && lscpu | grep 'Model name' \
//     && /tmp/int4_unpack
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

enum Way { kCurrent, kF16c, kExponent, kInt8 };

// A block of 4 weight rows over `steps` steps of 16 k (32 bytes per step; int8 reads a second 32 bytes).
template <Way W>
float block(const uint8_t* r, const float* x, int steps) {
  __m256 lo[4], hi[4];
  for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xF), mask = _mm256_set1_epi32(0x00780000), one = _mm256_set1_epi32(0x3F800000);
  const __m128i low16 = _mm_set1_epi16(0xF);
  for (int t = 0; t < steps; ++t) {
    const __m256 xl = _mm256_loadu_ps(x + t * 16), xh = _mm256_loadu_ps(x + t * 16 + 8);
    const uint8_t* rt = r + t * 32;
    if constexpr (W == kCurrent) {
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + j * 8)));
        lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), xl, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, hi[j]);
      }
    } else if constexpr (W == kF16c) {
      for (int j = 0; j < 4; ++j) {
        const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + j * 8)));
        lo[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_and_si128(v, low16)), xl, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_srli_epi16(v, 4)), xh, hi[j]);
      }
    } else if constexpr (W == kExponent) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt));
      auto plane = [&](__m256i shifted) {
        return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(shifted, mask), one));
      };
      lo[0] = _mm256_fmadd_ps(plane(_mm256_slli_epi32(v, 19)), xl, lo[0]);
      hi[0] = _mm256_fmadd_ps(plane(_mm256_slli_epi32(v, 15)), xh, hi[0]);
      lo[1] = _mm256_fmadd_ps(plane(_mm256_slli_epi32(v, 11)), xl, lo[1]);
      hi[1] = _mm256_fmadd_ps(plane(_mm256_slli_epi32(v, 7)), xh, hi[1]);
      lo[2] = _mm256_fmadd_ps(plane(_mm256_slli_epi32(v, 3)), xl, lo[2]);
      hi[2] = _mm256_fmadd_ps(plane(_mm256_srli_epi32(v, 1)), xh, hi[2]);
      lo[3] = _mm256_fmadd_ps(plane(_mm256_srli_epi32(v, 5)), xl, lo[3]);
      hi[3] = _mm256_fmadd_ps(plane(_mm256_srli_epi32(v, 9)), xh, hi[3]);
    } else {
      for (int j = 0; j < 4; ++j) {
        const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + j * 8));
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rt + 32 * steps + j * 8));
        lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), xl, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), xh, hi[j]);
      }
    }
  }
  float s = 0;
  for (int j = 0; j < 4; ++j) s += hsum(_mm256_add_ps(lo[j], hi[j]));
  return s;
}

template <Way W>
void run(const char* name, const std::vector<uint8_t>& w, const std::vector<float>& x, int blocks, int steps) {
  constexpr int kReps = 200;
  float check = 0;
  double best = 1e9;
  for (int rep = 0; rep < 7; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int it = 0; it < kReps; ++it)
      for (int b = 0; b < blocks; ++b) check += block<W>(w.data() + b * steps * 64, x.data(), steps);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::printf("%-9s %6.1f G weights/s  (checksum %g)\n", name, double(kReps) * blocks * 4 * steps * 16 / best / 1e9,
              check);
}

}  // namespace

int main() {
  const int K = 1280, steps = K / 16, blocks = 64;  // 256 rows of Tiny's width: 160 KB of int4, in L2
  std::vector<uint8_t> w(size_t(blocks) * steps * 64);
  for (auto& b : w) b = uint8_t(std::rand());
  std::vector<float> x(K);
  for (auto& v : x) v = float(std::rand()) / RAND_MAX;
  std::printf("one thread, %d rows x %d k, weights in L2; best of 7\n", blocks * 4, K);
  run<kCurrent>("current", w, x, blocks, steps);
  run<kF16c>("f16c", w, x, blocks, steps);
  run<kExponent>("exponent", w, x, blocks, steps);
  run<kInt8>("int8", w, x, blocks, steps);
}
