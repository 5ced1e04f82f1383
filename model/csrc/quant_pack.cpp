// Quantising and packing weights at load time, each in one pass per row or block of rows on every intra-op thread:
// the loader's work, where torch's ops (model/quant.py `quantize`, model/quant_kernels.py's packers) took ~8-11 s
// of a quantised Tiny's 13-25 s load in a dozen passes over each weight (widening to float32, max, min, division,
// rounding, clamping, narrowing, padding, interleaving; with the loader's own copy gone too, Tiny's int4 loads are
// 3.3x faster, bench/RESULTS.md). Same values as those functions, byte for byte (tests/test_quant_pack.py):
//   quantize_values(w, bits, group)  w (N, K) float32 / bf16 / fp16 -> (q int8 (N, K), s bf16 (N,) or (N, K/G)):
//       per row (int8) or group of G (int4), peak = max(max w, -min w) in float32, s = bf16(max(peak / 127 or 7,
//       1e-12)), q = round-half-even(w / s) clamped to [-127, 127] or [-8, 7]. A row or group with a NaN or an
//       infinity gets a non-finite scale (as torch's max propagates them) and zeros for q: the caller rejects it.
//   r4_from_values(q)                int8 (N, K) -> the "r4" layout (quant_kernels.py's docstring).
//   k16r4_from_values(q)             int8 (N, K) in [-8, 7] -> the "k16r4" layout.
//   k16r4_from_nibbles(b, k)         the stored int4 layout (N, ceil(K/2)): byte j holds k = 2j and 2j + 1 as
//                                    q + 8 in its low and high nibble -> "k16r4", without the int8 values between.
//   nibbles_from_values(q)           int8 (N, K) in [-8, 7] -> that stored layout (quant.py `pack_nibbles`).
// Rows past N and k past K are padding: zero weights (int8 0; int4 nibble 8).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kRows = 4;   // weight rows per block of the layouts
constexpr int64_t kStepK = 16;  // k per step of the layouts

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One row (or group) of n floats: its scale (as bf16) and its quantised values into q. Eight lanes at a time (AVX2,
// the library's baseline): VDIVPS is IEEE division and VROUNDPS to nearest rounds half to even, as torch's ops do.
float quantize_span(const float* w, int64_t n, float levels, int8_t* q) {
  const float inf = std::numeric_limits<float>::infinity();
  __m256 hi8 = _mm256_set1_ps(-inf), lo8 = _mm256_set1_ps(inf), nan8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(w + i);
    hi8 = _mm256_max_ps(hi8, v);
    lo8 = _mm256_min_ps(lo8, v);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float his[8], los[8];
  _mm256_store_ps(his, hi8);
  _mm256_store_ps(los, lo8);
  float hi = -inf, lo = inf;
  bool nan = _mm256_movemask_ps(nan8) != 0;
  for (int j = 0; j < 8; ++j) hi = std::max(hi, his[j]), lo = std::min(lo, los[j]);
  for (; i < n; ++i) nan |= std::isnan(w[i]), hi = std::max(hi, w[i]), lo = std::min(lo, w[i]);
  // torch.maximum(amax, -amin) / levels, clamp_min(1e-12), .to(bfloat16); torch's max propagates a NaN.
  const float peak = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(hi, -lo);
  const float scale = static_cast<float>(c10::BFloat16(std::isnan(peak) ? peak : std::max(peak / levels, 1e-12f)));
  if (!std::isfinite(scale)) {  // a NaN or an infinity in the span: refused by the caller, which sees the scale
    std::fill(q, q + n, int8_t{0});
    return scale;
  }
  const float top = levels == 127.0f ? 127.0f : 7.0f, bottom = levels == 127.0f ? -127.0f : -8.0f;
  const __m256 s8 = _mm256_set1_ps(scale), top8 = _mm256_set1_ps(top), bottom8 = _mm256_set1_ps(bottom);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(w + i), s8),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, bottom8), top8));
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(v16, v16));
  }
  for (; i < n; ++i) q[i] = static_cast<int8_t>(std::min(std::max(std::nearbyint(w[i] / scale), bottom), top));
  return scale;
}

std::tuple<at::Tensor, at::Tensor> quantize_values(const at::Tensor& w_in, int64_t bits, int64_t group) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.device().is_cpu(), "quantize_values: w must be an (N, K) CPU tensor");
  TORCH_CHECK(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16 ||
                  w_in.scalar_type() == at::kHalf,
              "quantize_values: w must be float32, bfloat16 or float16");
  TORCH_CHECK(bits == 8 || bits == 4, "quantize_values: bits must be 8 or 4");
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(bits == 8 ? group == 0 : (group > 0 && K % group == 0),
              "quantize_values: int8 takes group 0 (per row), int4 a group that divides K");
  const int64_t span = bits == 8 ? K : group, spans = bits == 8 ? 1 : K / group;
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor s = bits == 8 ? at::empty({N}, w.options().dtype(at::kBFloat16))
                           : at::empty({N, spans}, w.options().dtype(at::kBFloat16));
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  at::BFloat16* sp = s.mutable_data_ptr<at::BFloat16>();
  const float levels = bits == 8 ? 127.0f : 7.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "quantize_values", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
      std::vector<float> row(K);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(wp[n * K + k]);
        for (int64_t g = 0; g < spans; ++g)
          sp[n * spans + g] = at::BFloat16(quantize_span(row.data() + g * span, span, levels, qp + n * K + g * span));
      }
    });
  });
  return {q, s};
}

// out (ceil(N/4), ceil(K/16) * 4 * width) bytes: per block of 4 rows, per step of 16 k, each row's `width` bytes,
// written by step(o, n, t) for row n < N and step t; rows past N are `pad`.
template <typename Step>
at::Tensor interleave(int64_t N, int64_t K, int64_t width, uint8_t pad, const at::TensorOptions& options,
                      const Step& step) {
  const int64_t steps = ceil_div(K, kStepK), blocks = ceil_div(N, kRows), block_bytes = steps * kRows * width;
  at::Tensor out = at::empty({blocks, block_bytes}, options);
  uint8_t* op = static_cast<uint8_t*>(out.data_ptr());
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(block_bytes, 1)),
                   [&](int64_t b0, int64_t b1) {
                     for (int64_t b = b0; b < b1; ++b)
                       for (int64_t t = 0; t < steps; ++t)
                         for (int64_t r = 0; r < kRows; ++r) {
                           uint8_t* o = op + b * block_bytes + (t * kRows + r) * width;
                           const int64_t n = b * kRows + r;
                           if (n < N) {
                             step(o, n, t);
                           } else {
                             std::fill(o, o + width, pad);
                           }
                         }
                   });
  return out;
}

// q_in as the packers read it: an (N, K) int8 CPU tensor, rows contiguous.
at::Tensor int8_rows(const at::Tensor& q_in, const char* op) {
  TORCH_CHECK(q_in.dim() == 2 && q_in.device().is_cpu() && q_in.scalar_type() == at::kChar, op,
              ": q must be an (N, K) int8 CPU tensor");
  return q_in.contiguous();
}

at::Tensor r4_from_values(const at::Tensor& q_in) {
  const at::Tensor q = int8_rows(q_in, "r4_from_values");
  const int64_t N = q.size(0), K = q.size(1);
  const int8_t* qp = q.const_data_ptr<int8_t>();
  return interleave(N, K, kStepK, 0, q.options(), [&](uint8_t* o, int64_t n, int64_t t) {
    const int64_t k0 = t * kStepK, whole = std::min(kStepK, K - k0);
    std::memcpy(o, qp + n * K + k0, whole);
    std::fill(o + whole, o + kStepK, uint8_t{0});
  });
}

// The k16r4 bytes of row n, step t, from nibble values u(n, k) = q + 8 in [0, 15] (8, a zero weight, past K);
// whole(o, n, t) writes a step that lies inside K (no bounds to check).
template <typename Nibble, typename Whole>
at::Tensor k16r4_from(int64_t N, int64_t K, const at::TensorOptions& options, const Nibble& u, const Whole& whole) {
  return interleave(N, K, kStepK / 2, 0x88, options.dtype(at::kByte), [&](uint8_t* o, int64_t n, int64_t t) {
    if ((t + 1) * kStepK <= K) return whole(o, n, t);
    for (int64_t j = 0; j < kStepK / 2; ++j) {
      const int64_t k = t * kStepK + j;
      const uint8_t low = k < K ? u(n, k) : uint8_t{8}, high = k + 8 < K ? u(n, k + 8) : uint8_t{8};
      o[j] = static_cast<uint8_t>(low | (high << 4));
    }
  });
}

// int8_rows, holding int4 values in [-8, 7] (checked: another value would spill into its neighbour's nibble).
at::Tensor int4_values(const at::Tensor& q_in, const char* op) {
  at::Tensor q = int8_rows(q_in, op);
  const bool empty = q.numel() == 0;
  const int8_t lowest = empty ? 0 : at::min(q).item<int8_t>(), highest = empty ? 0 : at::max(q).item<int8_t>();
  TORCH_CHECK(lowest >= -8 && highest <= 7, op, ": q must hold int4 values in [-8, 7]");
  return q;
}

at::Tensor k16r4_from_values(const at::Tensor& q_in) {
  const at::Tensor q = int4_values(q_in, "k16r4_from_values");
  const int64_t N = q.size(0), K = q.size(1);
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const auto u = [&](int64_t n, int64_t k) { return static_cast<uint8_t>(qp[n * K + k] + 8); };
  return k16r4_from(N, K, q.options(), u, [&](uint8_t* o, int64_t n, int64_t t) {
    const int8_t* v = qp + n * K + t * kStepK;
    for (int j = 0; j < 8; ++j) o[j] = static_cast<uint8_t>((v[j] + 8) | ((v[j + 8] + 8) << 4));
  });
}

at::Tensor k16r4_from_nibbles(const at::Tensor& b_in, int64_t K) {
  TORCH_CHECK(b_in.dim() == 2 && b_in.device().is_cpu() && b_in.scalar_type() == at::kByte,
              "k16r4_from_nibbles: b must be an (N, ceil(K/2)) uint8 CPU tensor");
  TORCH_CHECK(K >= 0 && b_in.size(1) == (K + 1) / 2, "k16r4_from_nibbles: b has ", b_in.size(1),
              " bytes a row, K = ", K, " needs ", (K + 1) / 2);
  const at::Tensor b = b_in.contiguous();
  const int64_t N = b.size(0), row_bytes = b.size(1);
  const uint8_t* bp = b.const_data_ptr<uint8_t>();
  const auto u = [&](int64_t n, int64_t k) {
    return static_cast<uint8_t>((bp[n * row_bytes + k / 2] >> (4 * (k % 2))) & 15);
  };
  return k16r4_from(N, K, b.options(), u, [&](uint8_t* o, int64_t n, int64_t t) {
    // stored byte i of the step holds k = 2i, 2i + 1; k16r4's byte j holds k = j and j + 8
    const uint8_t* p = bp + n * row_bytes + t * (kStepK / 2);
    uint8_t k[kStepK];
    for (int i = 0; i < kStepK / 2; ++i) k[2 * i] = p[i] & 15, k[2 * i + 1] = p[i] >> 4;
    for (int j = 0; j < 8; ++j) o[j] = static_cast<uint8_t>(k[j] | (k[j + 8] << 4));
  });
}

// int8 values (N, K) in [-8, 7] -> the stored int4 layout (N, ceil(K/2)): byte j holds k = 2j in its low nibble
// and 2j + 1 in its high one, each as q + 8 (8 past K): what `dsvl2 quantize` writes.
at::Tensor nibbles_from_values(const at::Tensor& q_in) {
  const at::Tensor q = int4_values(q_in, "nibbles_from_values");
  const int64_t N = q.size(0), K = q.size(1), row_bytes = (K + 1) / 2;
  at::Tensor out = at::empty({N, row_bytes}, q.options().dtype(at::kByte));
  const int8_t* qp = q.const_data_ptr<int8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* v = qp + n * K;
      uint8_t* o = op + n * row_bytes;
      for (int64_t j = 0; j < K / 2; ++j) o[j] = static_cast<uint8_t>((v[2 * j] + 8) | ((v[2 * j + 1] + 8) << 4));
      if (K % 2) o[K / 2] = static_cast<uint8_t>((v[K - 1] + 8) | (8 << 4));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsvl2_quant, m) {
  m.def("quantize_values(Tensor w, int bits, int group) -> (Tensor, Tensor)");
  m.def("r4_from_values(Tensor q) -> Tensor");
  m.def("k16r4_from_values(Tensor q) -> Tensor");
  m.def("k16r4_from_nibbles(Tensor b, int k) -> Tensor");
  m.def("nibbles_from_values(Tensor q) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_quant, CPU, m) {
  m.impl("quantize_values", &quantize_values);
  m.impl("r4_from_values", &r4_from_values);
  m.impl("k16r4_from_values", &k16r4_from_values);
  m.impl("k16r4_from_nibbles", &k16r4_from_nibbles);
  m.impl("nibbles_from_values", &nibbles_from_values);
}
