// Skinny bf16 matrix product for decode: y (M, N) = x (M, K) @ w (N, K)^T with M small (1..32), registered as
// torch.ops.dsvl2_kernels.linear_bf16. model/kernels.py builds it and decides when to call it.
//
// Decode is bound by reading the weight, so the weight is read from memory exactly once for all M rows. Threads
// take chunks of W's rows (~128 KB) from a shared counter, so a thread that starts late (another process on its
// core) does not hold up the product. Within a chunk, tiles of kNB weight rows x kMB activation rows accumulate
// in registers: the first block of kMB activation rows streams the chunk in from memory, prefetching one tile
// ahead into L2, and later blocks (M > kMB) find it in L2. Products use AVX512-BF16 (vdpbf16ps: 32 bf16 pairs
// -> 16 float32 lanes); sums stay float32 until the final round-to-nearest-even store.
//
// Tile shape and prefetch were chosen by bench/gemv.py-style runs on a 2-core Zen 4 (AVX512-BF16, no AMX):
// 3 x 8 tiles with an L2 prefetch one tile ahead beat 4 x 4 and 8 x 2 tiles and L1 or longer prefetches by
// 10-40% at M = 8 and tie at M = 1; chunk-by-chunk row blocks beat tile-by-tile ones by ~40% at M = 16.
// At M >= 8 a core is near its vdpbf16ps issue rate (about one per cycle, ~180 GFLOP/s here).

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

using bf16 = c10::BFloat16;

constexpr int kNB = 3;  // weight rows per tile
constexpr int kMB = 8;  // activation rows per tile: kNB * kMB = 24 accumulators, + 3 weight + 1 x of 32 registers
constexpr int64_t kChunkBytes = int64_t{1} << 17;  // weight bytes per unit of work handed to a thread

inline __m512bh load_bf16(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

inline __m512bh load_bf16_masked(const bf16* p, __mmask32 mask) {
  // Lanes past K read as zero, so their products add nothing (any K, odd included).
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const void*>(p));
}

// [sum of a's lanes, sum of b's, c's, d's]. Quarters (128 bits) are named a0..a3; A, B, C, D are 4-float
// partial sums of a, b, c, d. About 3x fewer instructions than four _mm512_reduce_add_ps.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44),   // [a0 a1 b0 b1]
                                  _mm512_shuffle_f32x4(a, b, 0xEE));  // [a2 a3 b2 b3]
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88),   // [ab0 ab2 cd0 cd2]
                                    _mm512_shuffle_f32x4(ab, cd, 0xDD));  // [ab1 ab3 cd1 cd3] -> [A B C D]
  const __m256 ab4 = _mm512_castps512_ps256(abcd);                                           // [A | B]
  const __m256 cd4 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));  // [C | D]
  const __m256 h1 = _mm256_hadd_ps(ab4, cd4);  // per 128-bit lane: [A01 A23 C01 C23 | B01 B23 D01 D23]
  const __m256 h2 = _mm256_hadd_ps(h1, h1);    // [a c a c | b d b d]
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));  // [a b c d]
}

// y[j, i] = x[j] . w[i] for the NB rows of w at `w` and the MB rows of x at `x` (row strides K; y's is ldy).
// With PREFETCH, each 64-byte load of a weight row also prefetches the same place in the next slab into L2.
template <int NB, int MB, bool PREFETCH>
inline void tile(const bf16* w, const bf16* x, bf16* y, int64_t K, int64_t ldy) {
  __m512 acc[NB * MB];  // acc[i * MB + j] for w row i, x row j
  for (int t = 0; t < NB * MB; ++t) acc[t] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) {
      wv[i] = load_bf16(w + i * K + k);
      if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(w + (kNB + i) * K + k), _MM_HINT_T1);
    }
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16(x + j * K + k);
      for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = load_bf16_masked(w + i * K + k, mask);
    for (int j = 0; j < MB; ++j) {
      const __m512bh xv = load_bf16_masked(x + j * K + k, mask);
      for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
    }
  }

  float sums[NB * MB];
  int t = 0;
  for (; t + 4 <= NB * MB; t += 4) _mm_storeu_ps(sums + t, reduce4(acc[t], acc[t + 1], acc[t + 2], acc[t + 3]));
  for (; t < NB * MB; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);
  for (int j = 0; j < MB; ++j)
    for (int i = 0; i < NB; ++i) y[j * ldy + i] = bf16(sums[i * MB + j]);
}

template <int NB, bool PREFETCH>
inline void tile_rows(const bf16* w, const bf16* x, bf16* y, int64_t rows, int64_t K, int64_t ldy) {
  static_assert(kMB == 8, "one case per row count up to kMB");
  switch (rows) {
    case 8: tile<NB, 8, PREFETCH>(w, x, y, K, ldy); break;
    case 7: tile<NB, 7, PREFETCH>(w, x, y, K, ldy); break;
    case 6: tile<NB, 6, PREFETCH>(w, x, y, K, ldy); break;
    case 5: tile<NB, 5, PREFETCH>(w, x, y, K, ldy); break;
    case 4: tile<NB, 4, PREFETCH>(w, x, y, K, ldy); break;
    case 3: tile<NB, 3, PREFETCH>(w, x, y, K, ldy); break;
    case 2: tile<NB, 2, PREFETCH>(w, x, y, K, ldy); break;
    case 1: tile<NB, 1, PREFETCH>(w, x, y, K, ldy); break;
    default: break;
  }
}

// y[:, n0:n1] for all M rows of x, rows n0..n1 of w (a multiple of NB of them). Row block by row block: the
// first block streams the weight in (and prefetches ahead), the others find it in L2 (n1 - n0 rows of w are at
// most ~kChunkBytes), while x's current block of kMB rows stays in L1.
template <int NB>
inline void rows(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N) {
  for (int64_t n = n0; n < n1; n += NB) tile_rows<NB, true>(w + n * K, x, y + n, std::min<int64_t>(M, kMB), K, N);
  for (int64_t m = kMB; m < M; m += kMB)
    for (int64_t n = n0; n < n1; n += NB)
      tile_rows<NB, false>(w + n * K, x + m * K, y + m * N + n, std::min<int64_t>(M - m, kMB), K, N);
}

at::Tensor linear_bf16(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2, "linear_bf16: x (M, K) and w (N, K) must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "linear_bf16: x and w must be bfloat16");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear_bf16: x and w must be on the CPU");
  TORCH_CHECK(w.is_contiguous(), "linear_bf16: w must be contiguous");
  TORCH_CHECK(x_in.size(1) == w.size(1), "linear_bf16: x has K=", x_in.size(1), " but w has K=", w.size(1));
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* wp = w.const_data_ptr<bf16>();
  bf16* yp = y.mutable_data_ptr<bf16>();
  const int64_t slabs = N / kNB;
  const int64_t per_chunk = std::max<int64_t>(1, kChunkBytes / (kNB * K * 2));  // slabs
  const int64_t chunks = (slabs + per_chunk - 1) / per_chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers > 0) {
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
           c = next.fetch_add(1, std::memory_order_relaxed))
        rows<kNB>(wp, xp, yp, c * per_chunk * kNB, std::min(slabs, (c + 1) * per_chunk) * kNB, M, K, N);
    });
  }
  rows<1>(wp, xp, yp, slabs * kNB, N, M, K, N);  // the last N % kNB rows
  return y;
}

}  // namespace

TORCH_LIBRARY(dsvl2_kernels, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
}
