// Decode kernels for bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.*; model/kernels.py builds
// them and decides when to call them.
//   linear_bf16  skinny product y (M, N) = x (M, K) @ w (N, K)^T with M small (1..32);
//   attend_bf16  attention of a few new queries over the KV cache, in place.
// The routed-expert layer (moe_bf16) is in moe_bf16.cpp, the many-query attention in attention_bf16.cpp, MLA's
// absorbed decode attention in latent_bf16.cpp, the norms, rotary and cache writes in glue_bf16.cpp, shared pieces in
// bf16_common.h.
//
// Decode is bound by reading the weight, so the weight is read from memory exactly once for all M rows. Threads
// take chunks of W's rows (~128 KB), each from its own contiguous share first (parallel.h), so a thread that starts
// late (another process on its core) does not hold up the product. For one row of x, or up to kMB (8) rows whose x
// fits in L1 beside the stream (kStreamXBytes), the chunk's weight rows are read one after another as one forward
// stream with read-once prefetches ahead (bf16_common.h's stream_one and stream_few): on a 2-core Zen 5 this took
// Tiny's decode step from 26.4 to 21.5 ms at batch 1 and 81 to 69 ms at batch 8 (bench/RESULTS.md). Other products
// take tiles: within a chunk, tiles of kNB weight rows x kMB activation rows accumulate in registers: the first
// block of kMB activation rows streams the chunk in from memory, prefetching one tile ahead into L2, and later
// blocks (M > kMB) find it in L2. Products use AVX512-BF16 (vdpbf16ps: 32 bf16 pairs
// -> 16 float32 lanes); sums stay float32 until the final round-to-nearest-even store.
//
// Tile shape and prefetch were chosen by bench/gemv.py-style runs on a 2-core Zen 4 (AVX512-BF16, no AMX):
// 3 x 8 tiles with an L2 prefetch one tile ahead beat 4 x 4 and 8 x 2 tiles and L1 or longer prefetches by
// 10-40% at M = 8; chunk-by-chunk row blocks beat tile-by-tile ones by ~40% at M = 16.
// At M >= 8 a core is near its vdpbf16ps issue rate (about one per cycle, ~180 GFLOP/s here).


#include "amx_rows.h"
#include "amx_tiles.h"
#include "bf16_common.h"

namespace {

using namespace dsvl2_kernels_detail;

// Rows of x from which linear_bf16 multiplies on AMX's tiles where the CPU has them (up to 32, K a multiple of 32;
// the last N % 16 weight rows stream through the dot products): at 8 rows those are bound by VDPBF16PS's issue rate
// on a Xeon (~0.4 a cycle: Tiny's lm_head 30-35 ms, 52% of the read bandwidth), where the tiles take 16 weight rows
// x 32 k x 16 rows of x per instruction and stream 32 weight rows at a time, the next 32 prefetched into L2: 14-18
// ms at 8 rows, 15-19 at 2-6 (bench/RESULTS.md); at one row the two ran even. Units of up to 256 weight rows: the
// prefetch reaches the thread's own next block (units of 32 rows prefetched the unit the other core then took, into
// this core's L2: 30 ms at 8 rows).
constexpr int64_t kAmxRows = 2;

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
  // Weight rows [0, tiled) on AMX's tiles (x packed once into pairs), the rest streamed through the dot products.
  const int64_t tiled = M >= kAmxRows && M <= 32 && K % 32 == 0 && amx_ready() ? N / 16 * 16 : 0;
  at::Tensor xk;
  if (tiled > 0) {
    xk = at::empty({padded_tokens(M) * K}, x.options());
    pack_pairs(xp, K, M, K, padded_tokens(M), xk.mutable_data_ptr<bf16>());
  }
  const bf16* xkp = tiled > 0 ? xk.const_data_ptr<bf16>() : nullptr;
  const int64_t per_tiled = std::max<int64_t>(32, std::min<int64_t>(256, tiled / 16) / 32 * 32);
  const int64_t tiled_units = (tiled + per_tiled - 1) / per_tiled;
  const int64_t per_unit = rows_per_unit(K * 2), rest = N - tiled;
  run_units(tiled_units + (rest + per_unit - 1) / per_unit, [&](int64_t u) {
    if (u < tiled_units) {
      const int64_t n0 = u * per_tiled, n1 = std::min(tiled, n0 + per_tiled);
      rows_amx(wp + n0 * K, K, n1 - n0, xkp, M, yp + n0, N, wp + (n1 < tiled ? n1 : n0) * K);
    } else {
      const int64_t n0 = tiled + (u - tiled_units) * per_unit;
      span(wp, xp, yp, n0, std::min(N, n0 + per_unit), M, K, N);
    }
  });
  return y;
}

// out[0..cols) = bf16(sum over s < n of p[s] * v[s][0..cols)) for v's rows at stride ldv, float32 sums in registers
// (NV 16-lane columns, cols <= 16 * NV; TAIL where cols < 16 * NV). With ONCE (nothing reads these rows again), they
// are read forward with read-once prefetches ahead, as the keys are (`span`): on a 2-core Zen 5, 12 layers of Tiny's
// cache at batch 1 / 8 / 16 and 2,000 / 2,000 / 1,000 slots, attention 1.05x / 1.08x / 1.06x with them (alternated
// in one process). Without, the hardware's prefetch alone, so that a second query row finds them in L2.
template <int NV, bool TAIL, bool ONCE>
inline void weighted_rows_n(const float* p, int64_t n, const bf16* v, int64_t ldv, bf16* out, int64_t cols) {
  __m512 acc[NV];
  __mmask16 mask[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps(), mask[j] = tail_mask(cols - 16 * j);
  StreamAhead ahead(v, v + n * ldv);
  for (int64_t s = 0; s < n; ++s) {
    if constexpr (ONCE) ahead.before(v + (s + 1) * ldv);
    const __m512 ps = _mm512_set1_ps(p[s]);
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(ps, load16_f32_of<TAIL>(v + s * ldv + 16 * j, mask[j]), acc[j]);
  }
  for (int j = 0; j < NV; ++j) store_bf16(out + 16 * j, acc[j], mask[j]);
}

template <int NV, bool ONCE>
inline void weighted_rows_n(const float* p, int64_t n, const bf16* v, int64_t ldv, bf16* out, int64_t cols) {
  if (cols == 16 * NV)
    weighted_rows_n<NV, false, ONCE>(p, n, v, ldv, out, cols);
  else
    weighted_rows_n<NV, true, ONCE>(p, n, v, ldv, out, cols);
}

// weighted_rows_n for up to 128 columns (any more are the caller's next call).
template <bool ONCE>
inline void weighted_rows(const float* p, int64_t n, const bf16* v, int64_t ldv, bf16* out, int64_t cols) {
  switch (std::min<int64_t>((cols + 15) / 16, 8)) {
    case 8: weighted_rows_n<8, ONCE>(p, n, v, ldv, out, cols); break;
    case 7: weighted_rows_n<7, ONCE>(p, n, v, ldv, out, cols); break;
    case 6: weighted_rows_n<6, ONCE>(p, n, v, ldv, out, cols); break;
    case 5: weighted_rows_n<5, ONCE>(p, n, v, ldv, out, cols); break;
    case 4: weighted_rows_n<4, ONCE>(p, n, v, ldv, out, cols); break;
    case 3: weighted_rows_n<3, ONCE>(p, n, v, ldv, out, cols); break;
    case 2: weighted_rows_n<2, ONCE>(p, n, v, ldv, out, cols); break;
    default: weighted_rows_n<1, ONCE>(p, n, v, ldv, out, cols); break;
  }
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
    thread_local std::vector<bf16> score_buf;  // per-thread scratch, reused unit after unit
    thread_local std::vector<float> prob_buf;
    score_buf.resize(Q * seen), prob_buf.resize(Q * seen);
    bf16* const scores = score_buf.data();
    float* const probs = prob_buf.data();
    span(kb, qb, scores, 0, seen, Q, D, seen);  // scores[r][s] = bf16(q_r . k_s)
    for (int64_t r = 0; r < Q; ++r) {  // softmax over the slots the query sees, probabilities rounded to bf16
      const int64_t n = pp[b * T + r % T] + 1;
      for (int64_t s = 0; s < n; s += 16) {
        const __mmask16 m = tail_mask(n - s);
        _mm512_mask_storeu_ps(probs + r * seen + s, m, load16_f32(scores + r * seen + s, m));
      }
      softmax_row_bf16(probs + r * seen, n, n, fscale);
    }
    bf16* ob = op + (b * H + h * G) * T * Dv;
    for (int64_t r = 0; r < Q; ++r)  // out row r = sum over its visible slots of p * v, 128 columns at a time
      for (int64_t d = 0; d < Dv; d += 128) {
        const int64_t n = pp[b * T + r % T] + 1;
        if (Q == 1 && Dv <= 128)  // the one pass over the values
          weighted_rows<true>(probs + r * seen, n, vb + d, Dv, ob + r * Dv + d, Dv - d);
        else
          weighted_rows<false>(probs + r * seen, n, vb + d, Dv, ob + r * Dv + d, Dv - d);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(dsvl2_kernels, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("moe_bf16(Tensor x, Tensor ids, Tensor weights, Tensor[] gate, Tensor[] up, Tensor[] down, bool amx) -> Tensor");
  m.def("amx_ready() -> bool", [] { return dsvl2_kernels_detail::amx_ready(); });
  m.def("attend_bf16(Tensor q, Tensor k, Tensor v, Tensor positions, float scale) -> Tensor");
  m.def("absorbed_bf16(Tensor q_nope, Tensor q_pe, Tensor c, Tensor pe, Tensor w, Tensor positions, float scale) -> Tensor");
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, Tensor? positions, float scale, bool amx) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor? delta, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rope_bf16(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
  m.def("store_rows_bf16(Tensor(a!)[] bufs, Tensor[] new, Tensor rows, Tensor positions) -> ()");
  m.def("route_greedy_bf16(Tensor x, Tensor w, int k, bool normalize, float scaling) -> (Tensor, Tensor)");
  m.def("attend_step_bf16(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor rows, Tensor positions, int used, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("attend_bf16", &attend_bf16);
}
