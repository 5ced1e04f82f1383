// The small per-layer operations around the decoder's products, in bf16 on AVX512-BF16 CPUs, registered as
// torch.ops.dsvl2_kernels.* (declared with the other ops in decode_bf16.cpp); model/kernels.py decides when to call
// them.
//   rms_norm_bf16   RMSNorm of each row, optionally of the residual sum x + delta (returned too);
//   rope_bf16       rotate-half rotary embedding of (B, T, H, D) rows, optionally of pair-interleaved features;
//   store_rows_bf16 new tokens' cache rows written at their (row, slot) places;
//   route_greedy_bf16  a MoE gate's softmax scores and top-k experts for a few tokens (the gate's weight in float32
//                      or bf16: widened in registers, the same products).
// Each replaces several torch operations that make a pass over a few KB apiece: in a decode step, after the
// products have streamed ~1 GB of weights through the caches, each of those calls ran cold at 10-40 us (a batch-1
// step of the real-dimension Tiny spent ~20 of its ~100 ms in them and the Python around them). The arithmetic and
// its roundings are the model's (language.py): every bf16 result rounded once, to nearest even, where torch rounds.

#include "bf16_common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <type_traits>
#include <vector>

namespace {

using namespace dsvl2_kernels_detail;

constexpr int64_t kGrainElements = 1 << 15;  // rows handed to one thread at a time: decode rows stay on the caller

inline float bf16_round(float v) { return static_cast<float>(bf16(v)); }

// One row of RMSNorm: s = x (+ delta, rounded to bf16, written to sum when given), then
// out = bf16(w * bf16(s * rsqrt(mean(s^2) + eps))) with the mean in float32.
void norm_row(const bf16* x, const bf16* delta, const bf16* w, int64_t E, float eps, bf16* out, bf16* sum) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = tail_mask(E - c);
    __m512 s = load16_f32(x + c, m);
    if (delta != nullptr) {
      s = round_bf16(_mm512_add_ps(s, load16_f32(delta + c, m)));
      store_bf16(sum + c, s, m);
    }
    acc = _mm512_fmadd_ps(s, s, acc);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(E) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  const bf16* src = delta != nullptr ? sum : x;
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = tail_mask(E - c);
    const __m512 h = round_bf16(_mm512_mul_ps(load16_f32(src + c, m), rv));
    store_bf16(out + c, _mm512_mul_ps(load16_f32(w + c, m), h), m);
  }
}

// (normed, sum): normed = RMSNorm(s) with s = x + delta when delta is given (sum = s), else s = x (sum empty: the
// caller has x).
std::tuple<at::Tensor, at::Tensor> rms_norm_bf16(const at::Tensor& x_in, const std::optional<at::Tensor>& delta_in,
                                                 const at::Tensor& w, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x_in.device().is_cpu() &&
                  w.device().is_cpu(), "rms_norm_bf16: x and w must be bfloat16 CPU tensors");
  const int64_t E = w.numel();
  TORCH_CHECK(w.dim() == 1 && x_in.dim() >= 1 && x_in.size(-1) == E && E > 0,
              "rms_norm_bf16: x's last dimension must be w's length");
  const at::Tensor x = x_in.contiguous(), wc = w.contiguous();
  at::Tensor delta, sum = at::empty({0}, x.options());
  if (delta_in.has_value()) {
    TORCH_CHECK(delta_in->sizes() == x.sizes() && delta_in->scalar_type() == at::kBFloat16 && delta_in->device().is_cpu(),
                "rms_norm_bf16: delta must be a bfloat16 CPU tensor of x's shape");
    delta = delta_in->contiguous();
    sum = at::empty_like(x);
  }
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.numel() / E;
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* dp = delta.defined() ? delta.const_data_ptr<bf16>() : nullptr;
  const bf16* wp = wc.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  bf16* sp = delta.defined() ? sum.mutable_data_ptr<bf16>() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElements / E), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      norm_row(xp + n * E, dp ? dp + n * E : nullptr, wp, E, feps, op + n * E, sp ? sp + n * E : nullptr);
  });
  return {out, sum};
}

// out = bf16(bf16(y * cos) + bf16(rotate_half(y) * sin)) for one head's D features, where y = x, or with
// `interleaved` y = (x0, x2, ..., x1, x3, ...) (DeepSeek-V2's pair order, language.deinterleave); x's features are
// at stride 1, cos and sin are D long.
void rope_head(const bf16* x, const bf16* cos, const bf16* sin, int64_t D, bool interleaved, bf16* out) {
  const int64_t half = D / 2;
  if (!interleaved) {
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = tail_mask(half - i);
      const __m512 a = load16_f32(x + i, m), b = load16_f32(x + half + i, m);
      const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, load16_f32(cos + i, m))),
                                      round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b),
                                                               load16_f32(sin + i, m))));
      const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, load16_f32(cos + half + i, m))),
                                      round_bf16(_mm512_mul_ps(a, load16_f32(sin + half + i, m))));
      store_bf16(out + i, lo, m);
      store_bf16(out + half + i, hi, m);
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[2 * i]), b = static_cast<float>(x[2 * i + 1]);
    out[i] = bf16(bf16_round(a * static_cast<float>(cos[i])) + bf16_round(-b * static_cast<float>(sin[i])));
    out[half + i] = bf16(bf16_round(b * static_cast<float>(cos[half + i])) +
                         bf16_round(a * static_cast<float>(sin[half + i])));
  }
}

// x (B, T, H, D) with unit feature stride (any other strides), cos and sin (B, 1, T, D) as language.Rotary makes
// them (taken as they are: selecting (B, T, D) views in Python cost ~1.5 us of a ~4 us rope, 24 calls a Tiny decode
// step) -> the rotated (B, T, H, D).
at::Tensor rope_bf16(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool interleaved) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.stride(3) == 1,
              "rope_bf16: x must be a (B, T, H, D) bfloat16 CPU tensor with contiguous features");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope_bf16: the rotary dimension must be even");
  for (const at::Tensor* t : {&cos_in, &sin_in})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == 1 && t->size(2) == T && t->size(3) == D &&
                    t->scalar_type() == at::kBFloat16 && t->device().is_cpu(),
                "rope_bf16: cos and sin must be (B, 1, T, D) bfloat16 CPU tensors");
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor out = at::empty({B, T, H, D}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  const bf16* cp = cos.const_data_ptr<bf16>();
  const bf16* sp = sin.const_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, kGrainElements / (H * D)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      for (int64_t h = 0; h < H; ++h)
        rope_head(xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2), cp + r * D, sp + r * D, D, interleaved,
                  op + (r * H + h) * D);
    }
  });
  return out;
}

// For each buffer buf (Bc, *heads, S, F) (contiguous) and its new tokens src (B, T, *heads, F) (unit feature
// stride): buf[rows[b], h, positions[b, t], :] = src[b, t, h, :].
void store_rows_bf16(at::TensorList bufs, at::TensorList news, const at::Tensor& rows_in, const at::Tensor& pos_in) {
  TORCH_CHECK(bufs.size() == news.size(), "store_rows_bf16: one new tensor per buffer");
  TORCH_CHECK(rows_in.dim() == 1 && rows_in.scalar_type() == at::kLong && pos_in.dim() == 2 &&
                  pos_in.size(0) == rows_in.size(0) && pos_in.scalar_type() == at::kLong,
              "store_rows_bf16: rows (B,) and positions (B, T) must be int64");
  const at::Tensor rows = rows_in.contiguous(), pos = pos_in.contiguous();
  const int64_t B = pos.size(0), T = pos.size(1);
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (size_t i = 0; i < bufs.size(); ++i) {
    const at::Tensor& buf = bufs[i];
    const at::Tensor& src = news[i];
    TORCH_CHECK(buf.scalar_type() == at::kBFloat16 && src.scalar_type() == at::kBFloat16 && buf.device().is_cpu() &&
                    src.device().is_cpu() && buf.is_contiguous() && buf.dim() >= 3 && src.dim() == buf.dim(),
                "store_rows_bf16: buffers and new tensors must be bfloat16 CPU tensors, the buffers contiguous");
    const int64_t nd = buf.dim(), F = buf.size(nd - 1), S = buf.size(nd - 2), Bc = buf.size(0);
    int64_t heads = 1;
    for (int64_t d = 1; d < nd - 2; ++d) {
      TORCH_CHECK(src.size(d + 1) == buf.size(d), "store_rows_bf16: head dimensions disagree");
      heads *= buf.size(d);
    }
    TORCH_CHECK(src.size(0) == B && src.size(1) == T && src.size(nd - 1) == F && src.stride(nd - 1) == 1,
                "store_rows_bf16: new tokens must be (B, T, *heads, F) with contiguous features");
    // The heads of src must be one stride apart (true of views of (B, T, H * F) rows and of contiguous tensors).
    const int64_t hs = nd > 3 ? src.stride(nd - 2) : 0;
    for (int64_t d = 2; d < nd - 2; ++d)
      TORCH_CHECK(src.stride(d) == src.stride(d + 1) * src.size(d + 1), "store_rows_bf16: heads must be regular");
    const int64_t hs_buf = S * F;
    const bf16* sp = src.const_data_ptr<bf16>();
    bf16* bp = buf.mutable_data_ptr<bf16>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(rp[b] >= 0 && rp[b] < Bc, "store_rows_bf16: row out of range");
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = pp[b * T + t];
        TORCH_CHECK(p >= 0 && p < S, "store_rows_bf16: position past the cache");
        const bf16* s = sp + b * src.stride(0) + t * src.stride(1);
        bf16* d = bp + rp[b] * (heads * hs_buf) + p * F;
        for (int64_t h = 0; h < heads; ++h) std::memcpy(d + h * hs_buf, s + h * hs, F * sizeof(bf16));
      }
    }
  }
}

// Multi-head attention's decode around its attention in one call: q (B, T, H, D) and k (B, T, Hk, D) rotated as
// rope_bf16 rotates them, k and v (B, T, Hk, D) stored at `positions` of cache rows `rows` (every row of the
// (B, Hk, S, D) caches, in order) as store_rows_bf16 stores them, and the rotated q attending over the caches'
// first `used` slots by attend_bf16 (query row b over cache row b): the calls and arithmetic of
// language.MHAttention's decode, one call where it makes four with the cache views between them (~8 us a layer of
// Python and dispatch on a Zen 5; decode_plan.py). Returns attend_bf16's (B, H, T, D).
at::Tensor attend_step_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& rows, const at::Tensor& positions, int64_t used, double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && used > 0 && used <= k_cache.size(2) &&
                  used <= v_cache.size(2),
              "attend_step_bf16: the caches must be (B, Hk, S, D) with at least `used` slots");
  const at::Tensor rotated = rope_bf16(k, cos, sin, false);
  store_rows_bf16({k_cache, v_cache}, {rotated, v}, rows, positions);
  static const auto attend = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("dsvl2_kernels::attend_bf16", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, double)>();
  return attend.call(rope_bf16(q, cos, sin, false).transpose(1, 2), k_cache.narrow(2, 0, used),
                     v_cache.narrow(2, 0, used), positions, scale);
}

// scores[n * X + e] = x[n] . w[e] in float32 for every token n and expert e: each expert's row read once for all
// tokens, 8 tokens at a time (2 sums each: 16 chains of FMAs, not one chain of E / 16 dependent FMAs per score), the
// experts shared out between the threads in runs of kRouteExperts. The gate's weight is cold after a step's
// products: read in float32 by one thread, a row at a time per token, the op took ~38 us a layer at batch 1 and ~87
// at batch 8 on the real-dimension Tiny (Zen 5, 64 experts x 1,280); so, in bf16 as the model holds it, ~20 and ~43;
// with each run's rows prefetched into L1 at its start (row by row the loads waited on memory), ~14 and ~33 (cold
// gates, alternated in one process; into L2 instead, no faster than none; x converted to float32 once, slower).
constexpr int64_t kRouteExperts = 8;
constexpr int64_t kRouteTokens = 8;

template <int NT, typename W>
void route_dots(const bf16* x, const W* w, int64_t E, int64_t X, float* scores) {
  __m512 acc[NT][2];
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < E; c += 16) {
    const __mmask16 m = tail_mask(E - c);
    __m512 wv;
    if constexpr (std::is_same_v<W, float>) wv = _mm512_maskz_loadu_ps(m, w + c);
    else wv = load16_f32(w + c, m);
    const int half = (c / 16) & 1;
    for (int j = 0; j < NT; ++j) acc[j][half] = _mm512_fmadd_ps(load16_f32(x + j * E + c, m), wv, acc[j][half]);
  }
  for (int j = 0; j < NT; ++j) scores[j * X] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
}

template <typename W>
void route_scores(const bf16* x, const W* w, int64_t N, int64_t E, int64_t X, float* scores) {
  dsvl2_parallel::run_units((X + kRouteExperts - 1) / kRouteExperts, [&](int64_t u) {
    const int64_t e1 = std::min(X, (u + 1) * kRouteExperts);
    const char* end = reinterpret_cast<const char*>(w + e1 * E);  // the run's rows, all asked for at once
    for (const char* p = reinterpret_cast<const char*>(w + u * kRouteExperts * E); p < end; p += 64)
      dsvl2_prefetch::to_l1(p);
    for (int64_t e = u * kRouteExperts; e < e1; ++e)
      for (int64_t n = 0; n < N; n += kRouteTokens) {
        const bf16* xn = x + n * E;
        const W* we = w + e * E;
        float* out = scores + n * X + e;
        switch (std::min<int64_t>(N - n, kRouteTokens)) {
          case 1: route_dots<1>(xn, we, E, X, out); break;
          case 2: route_dots<2>(xn, we, E, X, out); break;
          case 3: route_dots<3>(xn, we, E, X, out); break;
          case 4: route_dots<4>(xn, we, E, X, out); break;
          case 5: route_dots<5>(xn, we, E, X, out); break;
          case 6: route_dots<6>(xn, we, E, X, out); break;
          case 7: route_dots<7>(xn, we, E, X, out); break;
          default: route_dots<8>(xn, we, E, X, out);
        }
      }
  });
}

// MoE routing by softmax scores and greedy top-k (DeepSeek-V2's "greedy" method) of a few tokens x (N, E) bf16 with
// the gate's weight w (X, E), float32 or bf16: logits = float(x) . w in float32, softmax in float32, the k largest scores
// (ties to the lower expert id) in descending order, divided by their sum (+ 1e-20) when `normalize`, times
// `scaling`. Returns (ids (N, k) int64, weights (N, k) float32).
std::tuple<at::Tensor, at::Tensor> route_greedy_bf16(const at::Tensor& x_in, const at::Tensor& w_in, int64_t k,
                                                     bool normalize, double scaling) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu(),
              "route_greedy_bf16: x must be a (N, E) bfloat16 CPU tensor");
  TORCH_CHECK(w_in.dim() == 2 && (w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16) &&
                  w_in.device().is_cpu() && w_in.size(1) == x_in.size(1),
              "route_greedy_bf16: w must be a (X, E) float32 or bfloat16 CPU tensor");
  const int64_t N = x_in.size(0), E = x_in.size(1), X = w_in.size(0);
  TORCH_CHECK(k > 0 && k <= X, "route_greedy_bf16: k must be within the experts");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor ids = at::empty({N, k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({N, k}, x.options().dtype(at::kFloat));
  const bf16* xp = x.const_data_ptr<bf16>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  float* op = weights.mutable_data_ptr<float>();
  std::vector<float> all(N * X);
  if (w.scalar_type() == at::kFloat) route_scores(xp, w.const_data_ptr<float>(), N, E, X, all.data());
  else route_scores(xp, w.const_data_ptr<bf16>(), N, E, X, all.data());
  std::vector<int64_t> order(X);
  for (int64_t n = 0; n < N; ++n) {
    float* scores = all.data() + n * X;
    float top = -INFINITY;
    for (int64_t e = 0; e < X; ++e) top = std::max(top, scores[e]);
    float total = 0.0f;
    for (int64_t e = 0; e < X; ++e) total += (scores[e] = std::exp(scores[e] - top));
    for (int64_t e = 0; e < X; ++e) scores[e] /= total;
    for (int64_t e = 0; e < X; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    float picked = 0.0f;
    for (int64_t j = 0; j < k; ++j) picked += scores[order[j]];
    const float divisor = normalize && k > 1 ? picked + 1e-20f : 1.0f;
    for (int64_t j = 0; j < k; ++j) {
      ip[n * k + j] = order[j];
      op[n * k + j] = (normalize && k > 1 ? scores[order[j]] / divisor : scores[order[j]]) * static_cast<float>(scaling);
    }
  }
  return {ids, weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("rope_bf16", &rope_bf16);
  m.impl("store_rows_bf16", &store_rows_bf16);
  m.impl("route_greedy_bf16", &route_greedy_bf16);
  m.impl("attend_step_bf16", &attend_step_bf16);
}
