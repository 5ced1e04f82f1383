// Weight-only int8 / int4 products on AVX2 + FMA CPUs, registered as torch.ops.dsvl2_quant.*; model/quant_kernels.py
// builds them and model/quant_choice.py decides when to call them.
//   int8_linear  y (M, N) = x (M, K) @ (q (N, K) int8 * s (N,))^T                 (per output channel)
//   int4_linear  y (M, N) = x (M, K) @ (q4 (N, K) * s (N, K/G) per group of G)^T  (the "k16" layout below)
// x is float32 or bf16 (converted to float32 once; y comes back in x's dtype), s float32 or bf16, sums float32.
//
// Decode is bound by reading the weight, so each weight byte comes from memory once for all M rows: threads take
// chunks of N (~64 KB of weight) from a shared counter (a thread that starts late, another process on its core,
// does not hold up the product); within a chunk, tiles of NB weight rows x MB activation rows accumulate in
// registers, each weight vector dequantised once per tile (in registers: int -> float32, times its scale) and
// used for MB rows. Rows past the first MB re-read the chunk from L1/L2, not from memory.
//
// int4 "k16" layout (N, ceil(K/16) * 8) uint8: per row, each block of 16 k is 8 bytes; byte j holds k = 16b + j in
// its low nibble and k = 16b + 8 + j in its high nibble, each as q + 8 (padding past K is 8, a zero weight). Eight
// bytes zero-extended to 32-bit lanes then give 8 consecutive k by one AND and 8 more by one shift. A group of G
// values (quant.py: G in {16, 32, 64, 128} divides K, or one group of all K) is G/16 whole blocks, or the whole
// row. Shape legend: M rows, N output features, K input features, G group size.

#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

constexpr int64_t kChunkBytes = int64_t{1} << 16;  // weight bytes per unit of work handed to a thread (rows: a multiple of 8)

using dsvl2_parallel::run_units;

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline float scale_at(const float* s, int64_t i) { return s[i]; }
inline float scale_at(const c10::BFloat16* s, int64_t i) { return static_cast<float>(s[i]); }

// Tiles: MB activation rows x NB weight rows, MB * NB <= 8 float32 accumulators of the 16 AVX2 registers. Eight
// rows share each dequantised weight vector (compute-bound batches: 16 FMAs per 16 int4 values, ~7 other
// instructions); one row takes four weight rows at a time (memory-bound: four streams in flight).
constexpr int tile_nb(int mb) { return mb >= 8 ? 1 : mb >= 3 ? 2 : 4; }

// block(std::integral_constant<int, MB>, m) over row blocks covering [0, M): 8s, then 4, 3, 2 or 1.
template <typename Block>
void row_blocks(int64_t M, const Block& block) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) block(std::integral_constant<int, 8>{}, m);
  if (m + 4 <= M) block(std::integral_constant<int, 4>{}, m), m += 4;
  switch (M - m) {
    case 3: block(std::integral_constant<int, 3>{}, m); break;
    case 2: block(std::integral_constant<int, 2>{}, m); break;
    case 1: block(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// fn(pointer to s's data) with s float32 or bf16 (checked by the caller).
template <typename Fn>
void with_scales(const at::Tensor& s, const Fn& fn) {
  if (s.scalar_type() == at::kFloat) {
    fn(s.const_data_ptr<float>());
  } else {
    fn(s.const_data_ptr<c10::BFloat16>());
  }
}

// x (M, K) in float32, rows at stride ldx >= K with zeros past K (int4 reads whole 16-k blocks).
at::Tensor float_rows(const at::Tensor& x, int64_t ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xf = at::empty({M, ldx}, x.options().dtype(at::kFloat));
  if (ldx > K) xf.narrow(1, K, ldx - K).zero_();
  xf.narrow(1, 0, K).copy_(x);
  return xf;
}

// ---------------------------------------------------------------------------------------------------- int8

// y[m][n] for m < MB, n in [n0, n0 + NB): dot products of MB rows of x with NB int8 rows of q, times s[n].
template <int MB, int NB, typename S>
inline void int8_tile(const int8_t* q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
                      int64_t K) {
  // One row: two sets of sums (even and odd steps of 8 k) so that no sum waits on the previous FMA's latency.
  constexpr int P = MB == 1 ? 2 : 1;
  __m256 acc[P][MB][NB];
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) acc[p][m][j] = _mm256_setzero_ps();
  const int8_t* rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = q + (n0 + j) * K;
  auto step = [&](int p, int64_t k) {
    for (int j = 0; j < NB; ++j) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[j] + k));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
      for (int m = 0; m < MB; ++m)
        acc[p][m][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + k), acc[p][m][j]);
    }
  };
  int64_t k = 0;
  for (; k + 8 * P <= K; k += 8 * P)
    for (int p = 0; p < P; ++p) step(p, k + 8 * p);
  for (; k + 8 <= K; k += 8) step(0, k);
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      float sum = hsum(P == 1 ? acc[0][m][j] : _mm256_add_ps(acc[0][m][j], acc[P - 1][m][j]));
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(rows[j][t]) * x[m * ldx + t];
      y[m * ldy + n0 + j] = sum * scale_at(s, n0 + j);
    }
}

// Rows [n0, n1) of y for MB rows of x: tiles of MB x NB, then single weight rows.
template <int MB, int NB, typename S>
void int8_rows(const int8_t* q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
               int64_t n1, int64_t K) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) int8_tile<MB, NB>(q, s, x, ldx, y, ldy, n, K);
  for (; n < n1; ++n) int8_tile<MB, 1>(q, s, x, ldx, y, ldy, n, K);
}

// Rows [n0, n1) of y for all M rows, in blocks of rows (see `row_blocks`).
template <typename S>
void int8_span(const int8_t* q, const S* s, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0,
               int64_t n1, int64_t M, int64_t K) {
  row_blocks(M, [&](auto mb_tag, int64_t m) {
    constexpr int mb = decltype(mb_tag)::value;
    int8_rows<mb, tile_nb(mb)>(q, s, x + m * ldx, ldx, y + m * ldy, ldy, n0, n1, K);
  });
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(x_in.dim() == 2 && q.dim() == 2 && s.dim() == 1, "int8_linear: x (M, K), q (N, K), s (N,)");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_linear: q must be contiguous int8");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "int8_linear: x must be float32 or bfloat16");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16,
              "int8_linear: s must be float32 or bfloat16");
  TORCH_CHECK(x_in.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(), "int8_linear: CPU tensors");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && s.size(0) == N, "int8_linear: x has K=", K, ", q is ", q.sizes(), ", s is ",
              s.sizes());
  const at::Tensor sc = s.contiguous();
  const at::Tensor x = float_rows(x_in, K);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    const int8_t* qp = q.const_data_ptr<int8_t>();
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const int64_t per_unit = std::max<int64_t>(8, kChunkBytes / std::max<int64_t>(K, 1) / 8 * 8);
    const int64_t units = (N + per_unit - 1) / per_unit;
    with_scales(sc, [&](const auto* sp) {
      run_units(units, [&](int64_t u) {
        int8_span(qp, sp, xp, K, yp, N, u * per_unit, std::min(N, (u + 1) * per_unit), M, K);
      });
    });
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------------- int4

// y[m][n] for m < MB, n in [n0, n0 + NB): rows of the k16 layout (`lda` bytes each), groups of G k, scales s
// (N, groups). x rows at stride ldx cover every block (zero past K).
template <int MB, int NB, typename S>
inline void int4_tile(const uint8_t* q, int64_t lda, const S* s, int64_t groups, const float* x, int64_t ldx,
                      float* y, int64_t ldy, int64_t n0, int64_t blocks, int64_t group_blocks) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale[NB], offset[NB];  // w = (q + 8) * s - 8 s, one FMA per 8 values
    for (int j = 0; j < NB; ++j) {
      const float sj = scale_at(s, (n0 + j) * groups + g);
      scale[j] = _mm256_set1_ps(sj);
      offset[j] = _mm256_set1_ps(-8.0f * sj);
    }
    const int64_t b1 = std::min(blocks, (g + 1) * group_blocks);
    for (int64_t b = g * group_blocks; b < b1; ++b) {
      const float* xb = x + b * 16;
      for (int j = 0; j < NB; ++j) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (n0 + j) * lda + b * 8));
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), scale[j], offset[j]);
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xb + m * ldx), acc[m][j]);
        const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale[j], offset[j]);
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xb + m * ldx + 8), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) y[m * ldy + n0 + j] = hsum(acc[m][j]);
}

// The one-row tile (memory-bound decode): per group, sums of (q + 8) * x in registers (low and high nibbles apart,
// so no sum waits on the previous FMA), scaled once per group; the offset -8 s * (sum of x over the group) comes
// from `xsum` (per-group sums of x). Saves the per-value scaling FMA of `int4_tile`.
template <int NB, typename S>
inline void int4_tile1(const uint8_t* q, int64_t lda, const S* s, int64_t groups, const float* x, const float* xsum,
                       float* y, int64_t n0, int64_t blocks, int64_t group_blocks) {
  __m256 acc[NB];
  float offset[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps(), offset[j] = 0.0f;
  const __m256i low = _mm256_set1_epi32(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 lo[NB], hi[NB];
    for (int j = 0; j < NB; ++j) lo[j] = _mm256_setzero_ps(), hi[j] = _mm256_setzero_ps();
    const int64_t b1 = std::min(blocks, (g + 1) * group_blocks);
    for (int64_t b = g * group_blocks; b < b1; ++b) {
      const __m256 xl = _mm256_loadu_ps(x + b * 16), xh = _mm256_loadu_ps(x + b * 16 + 8);
      for (int j = 0; j < NB; ++j) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (n0 + j) * lda + b * 8));
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), xl, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, hi[j]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float sj = scale_at(s, (n0 + j) * groups + g);
      acc[j] = _mm256_fmadd_ps(_mm256_add_ps(lo[j], hi[j]), _mm256_set1_ps(sj), acc[j]);
      offset[j] += sj * xsum[g];
    }
  }
  for (int j = 0; j < NB; ++j) y[n0 + j] = hsum(acc[j]) - 8.0f * offset[j];
}

template <int MB, int NB, typename S>
void int4_rows(const uint8_t* q, int64_t lda, const S* s, int64_t groups, const float* x, int64_t ldx,
               const float* xsum, float* y, int64_t ldy, int64_t n0, int64_t n1, int64_t blocks,
               int64_t group_blocks) {
  int64_t n = n0;
  if constexpr (MB == 1) {
    for (; n + NB <= n1; n += NB) int4_tile1<NB>(q, lda, s, groups, x, xsum, y, n, blocks, group_blocks);
    for (; n < n1; ++n) int4_tile1<1>(q, lda, s, groups, x, xsum, y, n, blocks, group_blocks);
  } else {
    for (; n + NB <= n1; n += NB) int4_tile<MB, NB>(q, lda, s, groups, x, ldx, y, ldy, n, blocks, group_blocks);
    for (; n < n1; ++n) int4_tile<MB, 1>(q, lda, s, groups, x, ldx, y, ldy, n, blocks, group_blocks);
  }
}

template <typename S>
void int4_span(const uint8_t* q, int64_t lda, const S* s, int64_t groups, const float* x, int64_t ldx,
               const float* xsum, float* y, int64_t ldy, int64_t n0, int64_t n1, int64_t M, int64_t blocks,
               int64_t group_blocks) {
  row_blocks(M, [&](auto mb_tag, int64_t m) {
    constexpr int mb = decltype(mb_tag)::value;
    int4_rows<mb, tile_nb(mb)>(q, lda, s, groups, x + m * ldx, ldx, xsum + m * groups, y + m * ldy, ldy, n0, n1,
                               blocks, group_blocks);
  });
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s, int64_t group) {
  TORCH_CHECK(x_in.dim() == 2 && q.dim() == 2 && s.dim() == 2, "int4_linear: x (M, K), q (N, K16 / 2), s (N, K/G)");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "int4_linear: q must be contiguous uint8");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "int4_linear: x must be float32 or bfloat16");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16,
              "int4_linear: s must be float32 or bfloat16");
  TORCH_CHECK(x_in.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(), "int4_linear: CPU tensors");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0);
  const int64_t blocks = (K + 15) / 16, groups = s.size(1);
  TORCH_CHECK(q.size(1) == blocks * 8, "int4_linear: q has ", q.size(1), " bytes per row, K=", K, " needs ",
              blocks * 8);
  TORCH_CHECK(s.size(0) == N && group > 0 && groups * group == K, "int4_linear: s is ", s.sizes(), " for N=", N,
              ", K=", K, ", G=", group);
  TORCH_CHECK(groups == 1 || group % 16 == 0, "int4_linear: G=", group, " must be a multiple of 16 or K");
  const int64_t group_blocks = groups == 1 ? blocks : group / 16;
  const at::Tensor sc = s.contiguous();
  const int64_t ldx = blocks * 16;
  const at::Tensor x = float_rows(x_in, ldx);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0 && K > 0) {
    const at::Tensor xsum = x.view({M, groups, ldx / groups}).sum(2);  // (M, groups), padding included (zeros)
    const float* sump = xsum.const_data_ptr<float>();
    const uint8_t* qp = q.const_data_ptr<uint8_t>();
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const int64_t lda = blocks * 8;
    const int64_t per_unit = std::max<int64_t>(8, kChunkBytes / lda / 8 * 8);
    const int64_t units = (N + per_unit - 1) / per_unit;
    with_scales(sc, [&](const auto* sp) {
      run_units(units, [&](int64_t u) {
        int4_span(qp, lda, sp, groups, xp, ldx, sump, yp, N, u * per_unit, std::min(N, (u + 1) * per_unit), M,
                      blocks, group_blocks);
      });
    });
  } else if (K == 0) {
    y.zero_();
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(dsvl2_quant, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor s) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor s, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_quant, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
