// Ways to multiply one bf16 row of x by an int4 weight in model/csrc's "k16r4" layout with AVX512-BF16 (the
// one-row decode product), one thread, timed on weights in L1, in L2 and read from memory:
//   table   model/csrc/quant_avx512.h's int4_tile512<1>: a step's 32 bytes zero-extended to 16-bit lanes, each
//           nibble looked up in a table of bf16 (q - 8) by VPERMW (low nibbles, then high), two VDPBF16PS
//   bias    two steps' 64 bytes as 32-bit lanes; four shifts of 0 / 4 / 8 / 12 bits, each masked to two nibbles
//           and OR-ed under the bf16 exponent of 128 in one VPTERNLOGD, so that each 16-bit lane holds
//           bf16(128 + u) exactly (u = q + 8, the stored nibble); four VDPBF16PS against x arranged once per
//           call in the matching order; the group's sum less 136 * (sum of x over the group) is the product;
//           bias1 / bias2 / bias4 keep 4 / 8 / 16 sums (VDPBF16PS takes ~10 cycles here before its sum is ready)
//   lean    table with three instructions fewer a step or group: the low nibble looked up with no AND (a 32-entry
//           table whose halves are equal, VPERMW reading 5 bits of the index), x broadcast once per call into
//           64 bf16 a step (VDPBF16PS reads it from L1: no VBROADCASTI32X4), and the 4 rows' scales of a group
//           read as one 128-bit load (scales laid out (block, group, 4 rows) instead of (row, group))
// All scale per group of 128 (4 rows' scales spread to their lanes). Sizes: 8 weight rows (L1), 1,024 (L2) and
// 131,072 (read from memory), K = 1280. The figures are speeds: the weights are random, the checksum only keeps
// the loops alive; the ways must print the same checksum up to rounding.
//
//   g++ -O3 -march=native bench/int4_row512.cpp -o /tmp/int4_row512 && lscpu | grep -E 'Model name|Flags' \
//     && /tmp/int4_row512
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kGroupSteps = 8;  // groups of 128 k

uint16_t bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>(b >> 16);
}

// y[n0 .. n0 + 4) for the table way (as int4_tile512<1>) or, with LEAN, the lean way: x from lean_x (64 bf16 a
// step), scales s as (group, 4 rows), the low nibble looked up with no AND.
template <bool LEAN>
void table_block(const uint8_t* r, const float* s, int64_t groups, const uint16_t* x, float* y, int64_t steps) {
  (void)steps;
  alignas(64) uint16_t tab[32] = {};
  for (int i = 0; i < (LEAN ? 32 : 16); ++i) tab[i] = bf16(static_cast<float>(i % 16 - 8));
  const __m512i table = _mm512_load_si512(tab);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[2][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()}, {_mm512_setzero_ps(), _mm512_setzero_ps()}};
    for (int64_t t = g * kGroupSteps; t < (g + 1) * kGroupSteps; t += 2) {
      for (int u = 0; u < 2; ++u) {
        const uint8_t* rt = r + (t + u) * 32;
        if (u == 0) _mm_prefetch(reinterpret_cast<const char*>(rt + 2048), _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rt)));
        const __m512bh wl = (__m512bh)_mm512_permutexvar_epi16(LEAN ? v : _mm512_and_si512(v, low), table);
        const __m512bh wh = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        __m512bh xl, xh;
        if (LEAN) {
          xl = (__m512bh)_mm512_loadu_si512(x + (t + u) * 64);
          xh = (__m512bh)_mm512_loadu_si512(x + (t + u) * 64 + 32);
        } else {
          const uint16_t* xt = x + (t + u) * 16;
          xl = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
          xh = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + 8)));
        }
        part[u][0] = _mm512_dpbf16_ps(part[u][0], wl, xl);
        part[u][1] = _mm512_dpbf16_ps(part[u][1], wh, xh);
      }
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[0][0], part[1][0]), _mm512_add_ps(part[0][1], part[1][1]));
    const __m128 s4 = LEAN ? _mm_loadu_ps(s + 4 * g)
                           : _mm_setr_ps(s[0 * groups + g], s[1 * groups + g], s[2 * groups + g], s[3 * groups + g]);
    acc = _mm512_fmadd_ps(sum, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), acc);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  for (int j = 0; j < 4; ++j) y[j] = (lanes[4 * j] + lanes[4 * j + 1]) + (lanes[4 * j + 2] + lanes[4 * j + 3]);
}

// x for the bias way: per pair of steps, four vectors (one per shift) of 16 32-bit lanes; lane L pairs with the
// weight's lane L: step 2p + L / 8, bytes 4 (L % 2) .. + 3 of its row (L % 8) / 2.
std::vector<uint16_t> bias_x(const uint16_t* x, int64_t steps) {
  std::vector<uint16_t> out(static_cast<size_t>(steps / 2) * 4 * 32);
  static const int kLow[4] = {0, 8, 1, 9};  // k of the lane's low word within its 16-k step, before + 4h
  for (int64_t p = 0; p < steps / 2; ++p)
    for (int v = 0; v < 4; ++v)
      for (int L = 0; L < 16; ++L) {
        const int64_t k = (2 * p + L / 8) * 16 + kLow[v] + 4 * (L % 2);
        out[((p * 4 + v) * 16 + L) * 2] = x[k];
        out[((p * 4 + v) * 16 + L) * 2 + 1] = x[k + 2];
      }
  return out;
}

template <int U>
void bias_block(const uint8_t* r, const float* s, int64_t groups, const uint16_t* xb, const float* corr, float* y,
                int64_t steps) {
  (void)steps;
  const __m512i nib = _mm512_set1_epi32(0x000F000F), exp128 = _mm512_set1_epi32(0x43004300);
  // lane L holds row (L % 8) / 2
  const __m512i spread = _mm512_set_epi32(3, 3, 2, 2, 1, 1, 0, 0, 3, 3, 2, 2, 1, 1, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[U][4];
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < 4; ++i) part[u][i] = _mm512_setzero_ps();
    for (int64_t t = g * kGroupSteps; t < (g + 1) * kGroupSteps; t += 2 * U) {
      for (int u = 0; u < U; ++u) {
        const uint8_t* rt = r + (t + 2 * u) * 32;
        _mm_prefetch(reinterpret_cast<const char*>(rt + 2048), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(rt);
        const uint16_t* xt = xb + ((t + 2 * u) / 2) * 4 * 32;
        // (v >> shift) & nib | exp128: 0xEA = (a & b) | c
        const __m512i w0 = _mm512_ternarylogic_epi32(v, nib, exp128, 0xEA);
        const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4), nib, exp128, 0xEA);
        const __m512i w2 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 8), nib, exp128, 0xEA);
        const __m512i w3 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 12), nib, exp128, 0xEA);
        part[u][0] = _mm512_dpbf16_ps(part[u][0], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xt));
        part[u][1] = _mm512_dpbf16_ps(part[u][1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xt + 32));
        part[u][2] = _mm512_dpbf16_ps(part[u][2], (__m512bh)w2, (__m512bh)_mm512_loadu_si512(xt + 64));
        part[u][3] = _mm512_dpbf16_ps(part[u][3], (__m512bh)w3, (__m512bh)_mm512_loadu_si512(xt + 96));
      }
    }
    for (int u = 1; u < U; ++u)
      for (int i = 0; i < 4; ++i) part[0][i] = _mm512_add_ps(part[0][i], part[u][i]);
    const __m512 sum = _mm512_sub_ps(_mm512_add_ps(_mm512_add_ps(part[0][0], part[0][1]), _mm512_add_ps(part[0][2], part[0][3])),
                                     _mm512_set1_ps(corr[g]));
    const __m128 s4 = _mm_setr_ps(s[0 * groups + g], s[1 * groups + g], s[2 * groups + g], s[3 * groups + g]);
    acc = _mm512_fmadd_ps(sum, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), acc);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, acc);
  for (int j = 0; j < 4; ++j)
    y[j] = (lanes[2 * j] + lanes[2 * j + 1]) + (lanes[8 + 2 * j] + lanes[9 + 2 * j]);
}

// x for the lean way: per step, its 8 low k repeated in the 4 128-bit lanes, then its 8 high k likewise.
std::vector<uint16_t> lean_x(const uint16_t* x, int64_t steps) {
  std::vector<uint16_t> out(static_cast<size_t>(steps) * 64 + 32);
  for (int64_t t = 0; t < steps; ++t)
    for (int h = 0; h < 2; ++h)
      for (int lane = 0; lane < 4; ++lane)
        for (int k = 0; k < 8; ++k) out[t * 64 + h * 32 + lane * 8 + k] = x[t * 16 + h * 8 + k];
  return out;
}

const char* const kNames[5] = {"table", "bias1", "bias2", "bias4", "lean"};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main() {
  const int64_t K = 1280, steps = K / 16, groups = K / 128;
  std::vector<uint16_t> x(K);
  uint32_t seed = 1;
  auto rnd = [&] { return seed = seed * 1664525u + 1013904223u; };
  for (auto& v : x) v = bf16(static_cast<float>(static_cast<int>(rnd() >> 16) % 2001 - 1000) / 1000.0f);
  std::vector<float> corr(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float sum = 0;
    for (int64_t k = g * 128; k < (g + 1) * 128; ++k) {
      uint32_t b = static_cast<uint32_t>(x[k]) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      sum += f;
    }
    corr[g] = 34.0f * sum;  // 136 * sum / 4 lanes per row
  }
  for (const int64_t rows : {int64_t{8}, int64_t{1024}, int64_t{131072}}) {  // L1, 0.6 MB (L2), 84 MB (memory)
    const int64_t blocks = rows / 4, block_bytes = steps * 32;
    std::vector<uint8_t> w(static_cast<size_t>(blocks * block_bytes) + 4096);
    for (auto& b : w) b = static_cast<uint8_t>(rnd() >> 24);
    std::vector<float> s(static_cast<size_t>(rows * groups));
    for (auto& v : s) v = 0.01f + static_cast<float>(rnd() >> 24) / 25600.0f;
    std::vector<float> sb(s.size());  // the lean way's scales: (block, group, 4 rows)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t g = 0; g < groups; ++g) sb[(n / 4 * groups + g) * 4 + n % 4] = s[n * groups + g];
    std::vector<float> y(rows);
    const int reps = rows == 8 ? 50000 : rows == 1024 ? 400 : 4;
    double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
    double check[5] = {0, 0, 0, 0, 0};
    for (int round = 0; round < 6; ++round)
      for (int way = 0; way < 5; ++way) {
        const double t0 = now();
        const std::vector<uint16_t> xb = way == 4 ? lean_x(x.data(), steps) : bias_x(x.data(), steps);  // once a call
        for (int rep = 0; rep < reps; ++rep) {
          if (way == 4) {
            for (int64_t b = 0; b < blocks; ++b)
              table_block<true>(w.data() + b * block_bytes, sb.data() + b * 4 * groups, groups, xb.data(),
                                y.data() + b * 4, steps);
          } else if (way == 0) {
            for (int64_t b = 0; b < blocks; ++b)
              table_block<false>(w.data() + b * block_bytes, s.data() + b * 4 * groups, groups, x.data(),
                                 y.data() + b * 4, steps);
          } else {
            for (int64_t b = 0; b < blocks; ++b)
              (way == 1 ? bias_block<1> : way == 2 ? bias_block<2> : bias_block<4>)(w.data() + b * block_bytes, s.data() + b * 4 * groups, groups, xb.data(), corr.data(),
                         y.data() + b * 4, steps);
          }
        }
        const double dt = (now() - t0) / reps;
        best[way] = std::min(best[way], dt);
        double c = 0;
        for (float v : y) c += v;
        check[way] = c;
      }
    for (int way = 0; way < 5; ++way)
      std::printf("%-6s rows %6lld x K %lld (%s): %.3f ms, %.1f G weights/s, checksum %.4f\n", kNames[way],
                  static_cast<long long>(rows), static_cast<long long>(K), rows == 8 ? "L1" : rows == 1024 ? "L2" : "memory",
                  best[way] * 1e3, rows * K / best[way] / 1e9, check[way]);
  }
  return 0;
}
