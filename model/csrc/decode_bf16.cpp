// Decode kernels for bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.*; model/kernels.py builds
// them and decides when to call them.
//   linear_bf16  skinny product y (M, N) = x (M, K) @ w (N, K)^T with M small (1..32);
//   moe_bf16     a whole routed-expert layer for a few tokens: every active expert's gate/up products, SiLU
//                gating and down product, then the routing-weighted sum, in two parallel passes (see below).
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

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

// y[:, n0:n1] for any span: tiles of kNB weight rows, then the last (n1 - n0) % kNB rows one by one.
inline void span(const bf16* w, const bf16* x, bf16* y, int64_t n0, int64_t n1, int64_t M, int64_t K, int64_t N) {
  const int64_t full = n0 + (n1 - n0) / kNB * kNB;
  rows<kNB>(w, x, y, n0, full, M, K, N);
  rows<1>(w, x, y, full, n1, M, K, N);
}

// Runs work(unit) for units 0..units-1 on the intra-op threads; threads take units from a shared counter, so a
// thread that starts late (another process on its core) does not hold up the rest.
template <typename Work>
void run_units(int64_t units, const Work& work) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), units);
  if (workers <= 0) return;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed))
      work(u);
  });
}

// Rows of a weight of `row_bytes` per row handed out as one unit: ~kChunkBytes, a multiple of kNB.
inline int64_t rows_per_unit(int64_t row_bytes) {
  return std::max<int64_t>(kNB, kChunkBytes / row_bytes / kNB * kNB);
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
  const int64_t per_unit = rows_per_unit(K * 2);
  run_units((N + per_unit - 1) / per_unit, [&](int64_t u) {
    span(wp, xp, yp, u * per_unit, std::min(N, (u + 1) * per_unit), M, K, N);
  });
  return y;
}

// The routed experts of one MoE layer for a few tokens (decode), matching the model's reference arithmetic:
// per token slot (n, k) routed to expert e, a = bf16(bf16(silu(bf16(x gate_e))) * bf16(x up_e)),
// o = bf16(a down_e), then y[n] = bf16(sum over k in order of float(o[n, k]) * weights[n, k]).
// Slots are grouped by expert, each active expert's rows of x gathered once. Pass 1 hands out units of (expert,
// block of gate/up rows): both products for all of the expert's tokens, then the gating for those columns. Pass 2
// hands out units of (expert, block of down rows). Each expert weight byte is read once per step, and the whole
// layer is two parallel regions instead of three products per active expert.
at::Tensor moe_bf16(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                    at::TensorList gate, at::TensorList up, at::TensorList down) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu(),
              "moe_bf16: x must be a (N, E) bfloat16 CPU tensor");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0) && ids_in.scalar_type() == at::kLong,
              "moe_bf16: ids must be (N, K) int64");
  TORCH_CHECK(weights_in.sizes() == ids_in.sizes() && weights_in.scalar_type() == at::kFloat,
              "moe_bf16: weights must be (N, K) float32");
  const int64_t X = static_cast<int64_t>(gate.size());
  TORCH_CHECK(X > 0 && static_cast<int64_t>(up.size()) == X && static_cast<int64_t>(down.size()) == X,
              "moe_bf16: gate, up and down must list the same experts");
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), routing = weights_in.contiguous();
  const int64_t N = x.size(0), E = x.size(1), K = ids.size(1), I = gate[0].size(0);
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < N * K; ++s) TORCH_CHECK(idp[s] >= 0 && idp[s] < X, "moe_bf16: expert id out of range");

  // Slots grouped by expert (stable); packed row r of the gathered activations belongs to slot slot_of[r].
  std::vector<int64_t> count(X, 0), start(X + 1, 0), slot_of(N * K), row_of(N * K);
  for (int64_t s = 0; s < N * K; ++s) ++count[idp[s]];
  for (int64_t e = 0; e < X; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < N * K; ++s) {
    row_of[s] = fill[idp[s]]++;
    slot_of[row_of[s]] = s;
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < X; ++e) {
    if (!count[e]) continue;
    active.push_back(e);
    for (const at::Tensor* w : {&gate[e], &up[e], &down[e]})
      TORCH_CHECK(w->scalar_type() == at::kBFloat16 && w->device().is_cpu() && w->is_contiguous() && w->dim() == 2,
                  "moe_bf16: expert weights must be contiguous 2-D bfloat16 CPU tensors");
    TORCH_CHECK(gate[e].size(0) == I && gate[e].size(1) == E && up[e].sizes() == gate[e].sizes() &&
                down[e].size(0) == E && down[e].size(1) == I,
                "moe_bf16: expert ", e, " has weights of the wrong shape");
  }

  const int64_t R = N * K;
  at::Tensor xs = at::empty({R, E}, x.options()), g = at::empty({R, I}, x.options());
  at::Tensor u = at::empty({R, I}, x.options()), out = at::empty({R, E}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  bf16* xsp = xs.mutable_data_ptr<bf16>();
  for (int64_t r = 0; r < R; ++r) std::copy_n(xp + slot_of[r] / K * E, E, xsp + r * E);
  bf16* gp = g.mutable_data_ptr<bf16>();
  bf16* up_ = u.mutable_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const int64_t A = static_cast<int64_t>(active.size());

  // Pass 1: gate and up rows [n0, n1) of one expert for all its tokens, then a = silu(g) * u in place in g.
  const int64_t per1 = rows_per_unit(2 * E * 2), units1 = (I + per1 - 1) / per1;
  run_units(A * units1, [&](int64_t unit) {
    const int64_t e = active[unit / units1], n0 = unit % units1 * per1, n1 = std::min(I, n0 + per1);
    const int64_t r0 = start[e], M = count[e];
    span(gate[e].const_data_ptr<bf16>(), xsp + r0 * E, gp + r0 * I, n0, n1, M, E, I);
    span(up[e].const_data_ptr<bf16>(), xsp + r0 * E, up_ + r0 * I, n0, n1, M, E, I);
    for (int64_t m = r0; m < r0 + M; ++m)
      for (int64_t i = n0; i < n1; ++i) {
        const float gv = static_cast<float>(gp[m * I + i]);
        const bf16 act = bf16(gv / (1.0f + std::exp(-gv)));
        gp[m * I + i] = bf16(static_cast<float>(act) * static_cast<float>(up_[m * I + i]));
      }
  });
  // Pass 2: down rows [n0, n1) of one expert for all its tokens.
  const int64_t per2 = rows_per_unit(I * 2), units2 = (E + per2 - 1) / per2;
  run_units(A * units2, [&](int64_t unit) {
    const int64_t e = active[unit / units2], n0 = unit % units2 * per2, n1 = std::min(E, n0 + per2);
    span(down[e].const_data_ptr<bf16>(), gp + start[e] * I, op + start[e] * E, n0, n1, count[e], I, E);
  });

  at::Tensor y = at::empty({N, E}, x.options());
  bf16* yp = y.mutable_data_ptr<bf16>();
  const float* wp = routing.const_data_ptr<float>();
  std::vector<float> acc(E);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const bf16* o = op + row_of[n * K + k] * E;
      const float w = wp[n * K + k];
      for (int64_t c = 0; c < E; ++c) acc[c] += static_cast<float>(o[c]) * w;
    }
    for (int64_t c = 0; c < E; ++c) yp[n * E + c] = bf16(acc[c]);
  }
  return y;
}

// bf16 -> float32 for 16 values (bf16 is the top half of a float32); lanes past `mask` read as zero.
inline __m512 load16_f32(const bf16* p, __mmask16 mask) {
  const __m512i raw = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(mask), reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
}

// Attention of a few new queries over the cache, as the model's short-query path computes it: scores
// bf16(q . k) * scale in float32, softmax in float32 over the slots each query may see (slot <= its position),
// probabilities rounded to bf16, out = bf16(sum of p * v in float32). Units of (row b, key head): the G query
// heads sharing the key head and their T queries read each cached key and value row once; slots past the
// furthest position in the row are never read. k and v are (B, Hk, S, D) views whose slot rows are contiguous
// (the cache's layout cut to the used slots), with any batch and head strides.
at::Tensor attend_bf16(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos_in,
                       double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_bf16: q, k, v must be 4-D");
  for (const at::Tensor* t : {&q_in, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "attend_bf16: q, k, v must be bf16 on CPU");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.size(0) == B && v.size(1) == Hk && v.size(2) == S,
              "attend_bf16: q, k, v shapes disagree");
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "attend_bf16: query heads must be a multiple of key heads");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == Dv,
              "attend_bf16: each cached slot's key and value must be contiguous rows");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(0) == B && pos_in.size(1) == T && pos_in.scalar_type() == at::kLong,
              "attend_bf16: positions must be (B, T) int64");
  const at::Tensor q = q_in.contiguous(), pos = pos_in.contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < S, "attend_bf16: position past the cache");
  at::Tensor out = at::empty({B, H, T, Dv}, q.options());
  const int64_t G = H / Hk, Q = G * T;
  const bf16* qp = q.const_data_ptr<bf16>();
  const bf16* kp = k.const_data_ptr<bf16>();
  const bf16* vp = v.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const float fscale = static_cast<float>(scale);

  run_units(B * Hk, [&](int64_t unit) {
    const int64_t b = unit / Hk, h = unit % Hk;
    int64_t seen = 0;  // slots visible to the furthest query of the row
    for (int64_t t = 0; t < T; ++t) seen = std::max(seen, pp[b * T + t] + 1);
    const bf16* kb = kp + b * k.stride(0) + h * k.stride(1);
    const bf16* vb = vp + b * v.stride(0) + h * v.stride(1);
    const bf16* qb = qp + (b * H + h * G) * T * D;  // Q = G * T contiguous query rows
    std::vector<bf16> scores(Q * seen);
    span(kb, qb, scores.data(), 0, seen, Q, D, seen);  // scores[r][s] = bf16(q_r . k_s)
    std::vector<float> probs(Q * seen, 0.0f), acc(Q * Dv, 0.0f);
    for (int64_t r = 0; r < Q; ++r) {
      const int64_t n = pp[b * T + r % T] + 1;
      float* pr = probs.data() + r * seen;
      float top = -INFINITY, total = 0.0f;
      for (int64_t s = 0; s < n; ++s) top = std::max(top, pr[s] = static_cast<float>(scores[r * seen + s]) * fscale);
      for (int64_t s = 0; s < n; ++s) total += pr[s] = std::exp(pr[s] - top);
      for (int64_t s = 0; s < n; ++s) pr[s] = static_cast<float>(bf16(pr[s] / total));
    }
    for (int64_t s = 0; s < seen; ++s) {
      const bf16* vs = vb + s * Dv;
      for (int64_t d = 0; d < Dv; d += 16) {
        const __mmask16 mask = Dv - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (Dv - d)) - 1);
        const __m512 vv = load16_f32(vs + d, mask);
        for (int64_t r = 0; r < Q; ++r) {
          float* a = acc.data() + r * Dv + d;
          const __m512 sum = _mm512_fmadd_ps(_mm512_set1_ps(probs[r * seen + s]), vv, _mm512_maskz_loadu_ps(mask, a));
          _mm512_mask_storeu_ps(a, mask, sum);
        }
      }
    }
    bf16* ob = op + (b * H + h * G) * T * Dv;
    for (int64_t i = 0; i < Q * Dv; ++i) ob[i] = bf16(acc[i]);
  });
  return out;
}

// ---- full attention for the vision tower: many queries, no mask -------------------------------------------------

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, times 2^n (scalef). Relative
// error ~2e-7 (a couple of float ulps); x below -87 gives 0, as expf underflows.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 y = _mm512_set1_ps(1.0f / 720);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(y, n));
}

inline __mmask16 tail_mask(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

inline __m512bh bcast_pair(const bf16* p) {  // (p[0], p[1]) in all 16 pair lanes
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

// acc[r][c] (MR rows x NR 16-lane columns) += sum over pairs t < pairs of a_r pair t * b[t][c]: the pair-packed
// GEMM micro-kernel. Row r of `a` starts at a + r * lda (bf16, pairs contiguous); b's pair t starts at b + t * ldb.
template <int MR, int NR>
inline void pair_tile(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs, __m512* out) {
  __m512 acc[MR * NR];  // local, so the compiler keeps it in registers (out may alias anything)
  for (int t = 0; t < MR * NR; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh bv[NR];
    for (int c = 0; c < NR; ++c) bv[c] = load_bf16(b + t * ldb + 32 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = bcast_pair(a + r * lda + 2 * t);
      for (int c = 0; c < NR; ++c) acc[r * NR + c] = _mm512_dpbf16_ps(acc[r * NR + c], bv[c], av);
    }
  }
  for (int t = 0; t < MR * NR; ++t) out[t] = acc[t];
}

template <int MR>
inline void pair_tile_cols(int nr, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs,
                           __m512* acc) {
  switch (nr) {
    case 5: pair_tile<MR, 5>(a, lda, b, ldb, pairs, acc); break;
    case 4: pair_tile<MR, 4>(a, lda, b, ldb, pairs, acc); break;
    case 3: pair_tile<MR, 3>(a, lda, b, ldb, pairs, acc); break;
    case 2: pair_tile<MR, 2>(a, lda, b, ldb, pairs, acc); break;
    default: pair_tile<MR, 1>(a, lda, b, ldb, pairs, acc); break;
  }
}

inline void pair_tile_any(int mr, int nr, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t pairs,
                          __m512* acc) {
  switch (mr) {
    case 4: pair_tile_cols<4>(nr, a, lda, b, ldb, pairs, acc); break;
    case 3: pair_tile_cols<3>(nr, a, lda, b, ldb, pairs, acc); break;
    case 2: pair_tile_cols<2>(nr, a, lda, b, ldb, pairs, acc); break;
    default: pair_tile_cols<1>(nr, a, lda, b, ldb, pairs, acc); break;
  }
}

// Keys into pairs along D: out[p][j] = (k[j][2p], k[j][2p + 1]) for p < ceil(D / 2), j < Lkp (zero past Lk and D).
// One 32-bit gather takes a pair from 16 key rows.
inline void pack_keys(const bf16* k, int64_t ldk, int64_t Lk, int64_t D, int64_t Lkp, bf16* out) {
  const int64_t Dp = (D + 1) / 2, even = D / 2;
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(ldk)));
  for (int64_t j = 0; j < Lkp; j += 16) {
    const __mmask16 m = tail_mask(Lk - j);
    const bf16* base = k + j * ldk;
    for (int64_t p = 0; p < even; ++p) {
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, base + 2 * p, 2);
      _mm512_storeu_si512(reinterpret_cast<void*>(out + (p * Lkp + j) * 2), w);
    }
    if (Dp > even) {  // odd D: the last pair is (k[j][D - 1], 0)
      bf16* dst = out + (even * Lkp + j) * 2;
      for (int64_t jj = 0; jj < 16; ++jj) {
        dst[2 * jj] = j + jj < Lk ? base[jj * ldk + D - 1] : bf16(0.0f);
        dst[2 * jj + 1] = bf16(0.0f);
      }
    }
  }
}

// Values into pairs along Lk: out[t][d] = (v[2t][d], v[2t + 1][d]) for t < Lkp / 2, d < 16 * Vc (zero past Lk, Dv).
inline void pack_values(const bf16* v, int64_t ldv, int64_t Lk, int64_t Dv, int64_t Lkp, int64_t Vc, bf16* out) {
  __m512i lo_idx, hi_idx;  // interleave the low / high 16 lanes of a and b: a0 b0 a1 b1 ...
  {
    alignas(64) uint16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = static_cast<uint16_t>(i), lo[2 * i + 1] = static_cast<uint16_t>(32 + i);
      hi[2 * i] = static_cast<uint16_t>(16 + i), hi[2 * i + 1] = static_cast<uint16_t>(48 + i);
    }
    lo_idx = _mm512_load_si512(lo), hi_idx = _mm512_load_si512(hi);
  }
  for (int64_t t = 0; t < Lkp / 2; ++t) {
    const int64_t j = 2 * t;
    bf16* dst = out + t * Vc * 32;
    for (int64_t d = 0; d < 16 * Vc; d += 32) {
      const __mmask32 m = Dv - d >= 32 ? ~__mmask32(0) : (Dv > d ? static_cast<__mmask32>((1u << (Dv - d)) - 1) : 0);
      const __m512i a = _mm512_maskz_loadu_epi16(j < Lk ? m : 0, v + j * ldv + d);
      const __m512i b = _mm512_maskz_loadu_epi16(j + 1 < Lk ? m : 0, v + (j + 1) * ldv + d);
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + 2 * d), _mm512_permutex2var_epi16(a, lo_idx, b));
      if (d + 16 < 16 * Vc)
        _mm512_storeu_si512(reinterpret_cast<void*>(dst + 2 * d + 32), _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

constexpr int kQB = 32;  // queries per unit of work
constexpr int kMR = 4;   // query rows per micro-tile
constexpr int kNR = 5;   // 16-lane output columns per micro-tile (kMR x kNR accumulators + kNR loads + 1 broadcast)

// softmax(q k^T * scale) v as torch's fused attention computes it in bf16: scores and softmax in float32, the
// probabilities rounded to bf16 for the product with v, float32 sums, one rounding of the output.
// q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv) with H a multiple of Hk (query head h reads key head
// h / (H / Hk)), any strides with contiguous last dims. Without positions every query sees every key (the vision
// tower); with positions (B, Lq), query (b, i) sees keys 0..positions[b, i] (the language model's prefill over its
// cache, where a key's slot is its position). Returns (B, H, Lq, Dv) as a view of a (B, Lq, H, Dv) tensor, so
// merging the heads back into the features costs nothing.
// Keys are packed once per (b, key head) into pairs along D ([D/2][Lk][2]) and values into pairs along Lk
// ([Lk/2][Dv][2]); units of (b, h, kQB queries) compute their score block with the pair-packed micro-kernel
// (4 queries x 48 keys) up to the furthest key a query of the block sees, the softmax with a vectorised exp, and
// the output (4 queries x 5 columns at a time).
at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& positions, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_bf16: q, k, v must be 4-D");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->stride(3) == 1,
                "attention_bf16: q, k, v must be bf16 CPU tensors with contiguous last dims");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.size(0) == B && v.size(1) == Hk && v.size(2) == Lk,
              "attention_bf16: q, k, v shapes disagree");
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "attention_bf16: query heads must be a multiple of key heads");
  TORCH_CHECK(Lk > 0 && D > 0 && Dv > 0, "attention_bf16: needs keys and non-empty heads");
  at::Tensor pos;
  if (positions.has_value()) {
    pos = positions->contiguous();
    TORCH_CHECK(pos.dim() == 2 && pos.size(0) == B && pos.size(1) == Lq && pos.scalar_type() == at::kLong,
                "attention_bf16: positions must be (B, Lq) int64");
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < B * Lq; ++i)
      TORCH_CHECK(pp[i] >= 0 && pp[i] < Lk, "attention_bf16: position past the keys");
  }
  const int64_t* pp = positions.has_value() ? pos.const_data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({B, Lq, H, Dv}, q.options());
  if (B * H * Lq == 0) return out.transpose(1, 2);
  const int64_t G = H / Hk;
  const int64_t Dp = (D + 1) / 2;            // pairs along D
  const int64_t Lkp = (Lk + 15) / 16 * 16;   // keys padded to whole 16-lane columns
  const int64_t Vc = (Dv + 15) / 16;         // 16-lane columns of the output
  const int64_t kpack = Dp * Lkp * 2, vpack = Lkp / 2 * Vc * 32;

  at::Tensor packed = at::empty({B * Hk * (kpack + vpack)}, q.options());
  bf16* const pk = packed.mutable_data_ptr<bf16>();
  run_units(B * Hk, [&](int64_t bh) {
    const int64_t b = bh / Hk, h = bh % Hk;
    pack_keys(k.const_data_ptr<bf16>() + b * k.stride(0) + h * k.stride(1), k.stride(2), Lk, D, Lkp,
              pk + bh * (kpack + vpack));
    pack_values(v.const_data_ptr<bf16>() + b * v.stride(0) + h * v.stride(1), v.stride(2), Lk, Dv, Lkp, Vc,
                pk + bh * (kpack + vpack) + kpack);
  });

  const bf16 zero(0.0f);
  const int64_t qblocks = (Lq + kQB - 1) / kQB;
  const float fscale = static_cast<float>(scale);
  run_units(B * H * qblocks, [&](int64_t unit) {
    const int64_t bh = unit / qblocks, b = bh / H, h = bh % H, i0 = unit % qblocks * kQB;
    const int64_t rows = std::min<int64_t>(kQB, Lq - i0);
    int64_t seen[kQB];  // keys each query of the block sees
    int64_t extent = 0;
    for (int64_t r = 0; r < rows; ++r) extent = std::max(extent, seen[r] = pp ? pp[b * Lq + i0 + r] + 1 : Lk);
    const int64_t ext = (extent + 15) / 16 * 16;  // keys computed for the block: whole 16-lane columns
    const bf16* kp = pk + (b * Hk + h / G) * (kpack + vpack);
    const bf16* vp = kp + kpack;
    std::vector<bf16> qs(kQB * Dp * 2, zero), probs(kQB * ext);
    std::vector<float> scores(kQB * ext);
    const bf16* qb = q.const_data_ptr<bf16>() + b * q.stride(0) + h * q.stride(1);
    for (int64_t r = 0; r < rows; ++r) std::copy_n(qb + (i0 + r) * q.stride(2), D, qs.data() + r * Dp * 2);
    __m512 acc[kMR * kNR];
    for (int64_t j = 0; j < ext; j += 48) {  // a slab of 48 keys stays in L1 while every query block uses it
      const int nr = static_cast<int>(std::min<int64_t>(3, (ext - j) / 16));
      for (int64_t r = 0; r < rows; r += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r));
        pair_tile_any(mr, nr, qs.data() + r * Dp * 2, Dp * 2, kp + j * 2, Lkp * 2, Dp, acc);
        for (int x = 0; x < mr; ++x)
          for (int c = 0; c < nr; ++c)
            _mm512_storeu_ps(scores.data() + (r + x) * ext + j + 16 * c,
                             _mm512_mul_ps(acc[x * nr + c], _mm512_set1_ps(fscale)));
      }
    }
    for (int64_t r = 0; r < rows; ++r) {  // softmax over the keys the query sees, probabilities to bf16
      float* s = scores.data() + r * ext;
      const int64_t n = seen[r];
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, tail_mask(n - j), s + j));
      const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < ext; j += 16) {  // keys past n (masked, or padding) get probability 0
        const __m512 e = _mm512_maskz_mov_ps(tail_mask(std::max<int64_t>(n - j, 0)),
                                             exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift)));
        _mm512_storeu_ps(s + j, e);
        total = _mm512_add_ps(total, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
      bf16* pr = probs.data() + r * ext;
      for (int64_t j = 0; j < ext; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(s + j), inv)));
    }
    bf16* ob = out.mutable_data_ptr<bf16>();
    std::vector<float> row(Vc * 16);
    for (int64_t r = 0; r < rows; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r));
      for (int64_t c0 = 0; c0 < Vc; c0 += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, Vc - c0));
        pair_tile_any(mr, nr, probs.data() + r * ext, ext, vp + 32 * c0, Vc * 32, ext / 2, acc);
        for (int x = 0; x < mr; ++x) {
          float* dst = row.data();
          for (int c = 0; c < nr; ++c) _mm512_storeu_ps(dst + 16 * c, acc[x * nr + c]);
          bf16* o = ob + ((b * Lq + i0 + r + x) * H + h) * Dv;
          for (int64_t d = 16 * c0; d < std::min(Dv, 16 * (c0 + nr)); ++d) o[d] = bf16(dst[d - 16 * c0]);
        }
      }
    }
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY(dsvl2_kernels, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("attend_bf16(Tensor q, Tensor k, Tensor v, Tensor positions, float scale) -> Tensor");
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, Tensor? positions, float scale) -> Tensor");
  m.def("moe_bf16(Tensor x, Tensor ids, Tensor weights, Tensor[] gate, Tensor[] up, Tensor[] down) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("moe_bf16", &moe_bf16);
  m.impl("attend_bf16", &attend_bf16);
  m.impl("attention_bf16", &attention_bf16);
}
