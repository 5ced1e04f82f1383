// MLA's absorbed decode attention for bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.absorbed_bf16
// (model/kernels.py builds it and decides when to call it).
//
// With W_uk folded into the queries, every head attends over the same cache rows: the latent c (C wide, which is
// also the value) and the shared rotary key pe (R wide). One call does the three steps of the model's torch form
// (attention.py, absorbed_attend), each split over the threads its own way:
//   1. per head h: q_lat = bf16(q_nope @ W_uk[h]), the head's (Dn, C) block of kv_b_proj read once for all rows;
//   2. per batch row and block of query rows: score = bf16(bf16(q_lat . c) + bf16(q_pe . pe)), times scale in
//      float32, softmax in float32 over the slots the query sees (slot <= its position), probabilities rounded to
//      bf16, lat = bf16(sum of p * c in float32); each cached row is read from memory once for all heads;
//   3. per head h: out = bf16(lat @ W_uv[h]^T), the head's (Dv, C) block read once for all rows.
// torch runs steps 1 and 3 as batched products of a few rows against strided weight views, at a fraction of the
// bandwidth (2.5 ms of a 3-row decode step's layer at Small's widths, where reading the 4 MB takes ~0.15 ms).

#include "bf16_common.h"

namespace {

using namespace dsvl2_kernels_detail;

constexpr int kRows = 4;   // query rows summed together over a cached row: 4 x 4 accumulators
constexpr int kCols = 4;   // 16-lane columns of c per pass (64 of C's values, 128 bytes of each cached row)

// out[r][0..cols) = bf16(sum over s < n of p[r][s] * c[s][0..cols)) for RB query rows (probabilities at row
// stride ldp, zero past each row's own slots), the NV 16-lane columns at c (row stride ldc), out's stride ldo;
// TAIL where cols < 16 * NV. Unlike MHA's one-row weighted_rows (decode_bf16.cpp), which streams each value row
// once from memory, 128 columns wide, this one reads slices of the cache that every head's rows share from L2,
// several rows at a time (MHA's attention through this one, 64 columns a pass, ran ~2x slower at batch 8).
template <int RB, int NV, bool TAIL>
inline void weighted_block(const float* p, int64_t ldp, int64_t n, const bf16* c, int64_t ldc, bf16* out,
                           int64_t ldo, int64_t cols) {
  __m512 acc[RB * NV];
  __mmask16 mask[NV];
  for (int t = 0; t < RB * NV; ++t) acc[t] = _mm512_setzero_ps();
  for (int j = 0; j < NV; ++j) mask[j] = tail_mask(cols - 16 * j);
  for (int64_t s = 0; s < n; ++s) {
    __m512 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load16_f32_of<TAIL>(c + s * ldc + 16 * j, mask[j]);
    for (int r = 0; r < RB; ++r) {
      const __m512 ps = _mm512_set1_ps(p[r * ldp + s]);
      for (int j = 0; j < NV; ++j) acc[r * NV + j] = _mm512_fmadd_ps(ps, v[j], acc[r * NV + j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) store_bf16(out + r * ldo + 16 * j, acc[r * NV + j], mask[j]);
}

template <int NV>
inline void weighted_rows_of(int rows, const float* p, int64_t ldp, int64_t n, const bf16* c, int64_t ldc,
                             bf16* out, int64_t ldo, int64_t cols) {
  if (cols < 16 * NV) {  // the last columns of a C that is no multiple of 16 * kCols: rare, kept simple
    for (int r = 0; r < rows; ++r) weighted_block<1, NV, true>(p + r * ldp, ldp, n, c, ldc, out + r * ldo, ldo, cols);
    return;
  }
  switch (rows) {
    case 4: weighted_block<4, NV, false>(p, ldp, n, c, ldc, out, ldo, cols); break;
    case 3: weighted_block<3, NV, false>(p, ldp, n, c, ldc, out, ldo, cols); break;
    case 2: weighted_block<2, NV, false>(p, ldp, n, c, ldc, out, ldo, cols); break;
    default: weighted_block<1, NV, false>(p, ldp, n, c, ldc, out, ldo, cols); break;
  }
}

// weighted_block for any rows <= kRows and cols <= 16 * kCols.
inline void weighted(int rows, const float* p, int64_t ldp, int64_t n, const bf16* c, int64_t ldc, bf16* out,
                     int64_t ldo, int64_t cols) {
  static_assert(kRows == 4 && kCols == 4, "one case per row and column count");
  switch ((cols + 15) / 16) {
    case 4: weighted_rows_of<4>(rows, p, ldp, n, c, ldc, out, ldo, cols); break;
    case 3: weighted_rows_of<3>(rows, p, ldp, n, c, ldc, out, ldo, cols); break;
    case 2: weighted_rows_of<2>(rows, p, ldp, n, c, ldc, out, ldo, cols); break;
    default: weighted_rows_of<1>(rows, p, ldp, n, c, ldc, out, ldo, cols); break;
  }
}

// Query rows of one batch row handed to a thread at once: a multiple of kMB (span's row block), doubled while the
// batch still gives every thread two units, so that wide models (Base's 128 heads) re-read the cache less often.
int64_t query_rows_per_unit(int64_t B, int64_t Q) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  int64_t rows = kMB;
  while (rows < Q && B * ((Q + 2 * rows - 1) / (2 * rows)) >= 2 * threads && rows < 64) rows *= 2;
  return rows;
}

// Step 2 for all batch rows: out_lat (B, H, T, C) from q_lat (B, H, T, C) and q_pe (B, H, T, R) (contiguous).
void attend_latent(const bf16* qlp, const bf16* qpp, const at::Tensor& c, const at::Tensor& pe, const int64_t* pp,
                   int64_t B, int64_t H, int64_t T, float scale, bf16* op) {
  const int64_t C = c.size(2), R = pe.size(2);
  const int64_t Q = H * T, per_unit = query_rows_per_unit(B, Q), units_per_row = (Q + per_unit - 1) / per_unit;
  const bf16* cp = c.const_data_ptr<bf16>();
  const bf16* pep = pe.const_data_ptr<bf16>();
  run_units(B * units_per_row, [&](int64_t unit) {
    const int64_t b = unit / units_per_row, r0 = unit % units_per_row * per_unit;
    const int64_t rows = std::min(per_unit, Q - r0);  // query rows r0.. of row b, row r = head r / T, token r % T
    int64_t seen = 0;  // slots visible to the furthest query of the row
    for (int64_t t = 0; t < T; ++t) seen = std::max(seen, pp[b * T + t] + 1);
    const bf16* cb = cp + b * c.stride(0);
    const bf16* peb = pep + b * pe.stride(0);
    thread_local std::vector<bf16> latent_buf, rotary_buf;  // per-thread scratch, reused unit after unit
    thread_local std::vector<float> prob_buf;
    latent_buf.resize(rows * seen), rotary_buf.resize(rows * seen), prob_buf.resize(rows * seen);
    bf16* const latent = latent_buf.data();
    bf16* const rotary = rotary_buf.data();
    float* const probs = prob_buf.data();
    span(cb, qlp + (b * Q + r0) * C, latent, 0, seen, rows, C, seen);  // latent[r][s] = bf16(q_lat_r . c_s)
    span(peb, qpp + (b * Q + r0) * R, rotary, 0, seen, rows, R, seen);  // rotary[r][s] = bf16(q_pe_r . pe_s)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = pp[b * T + (r0 + r) % T] + 1;
      for (int64_t s = 0; s < n; s += 16) {  // the score: the two bf16 products added and rounded to bf16
        const __mmask16 m = tail_mask(n - s);
        const __m512 sum = _mm512_add_ps(load16_f32(latent + r * seen + s, m), load16_f32(rotary + r * seen + s, m));
        _mm512_mask_storeu_ps(probs + r * seen + s, m, round_bf16(sum));
      }
      softmax_row_bf16(probs + r * seen, n, seen, scale);
    }
    bf16* ob = op + (b * Q + r0) * C;
    for (int64_t d = 0; d < C; d += 16 * kCols)  // a slice of c's columns stays in L2 while every row sums over it
      for (int64_t r = 0; r < rows; r += kRows)
        weighted(static_cast<int>(std::min<int64_t>(kRows, rows - r)), probs + r * seen, seen, seen, cb + d, C,
                 ob + r * C + d, C, std::min<int64_t>(16 * kCols, C - d));
  });
}

at::Tensor absorbed_bf16(const at::Tensor& q_nope_in, const at::Tensor& q_pe_in, const at::Tensor& c,
                         const at::Tensor& pe, const at::Tensor& w, const at::Tensor& pos_in, double scale) {
  TORCH_CHECK(q_nope_in.dim() == 4 && q_pe_in.dim() == 4 && c.dim() == 3 && pe.dim() == 3 && w.dim() == 2,
              "absorbed_bf16: queries (B, H, T, Dn|R), cache (B, S, C|R) and kv_b_proj's weight (H * (Dn + Dv), C)");
  for (const at::Tensor* t : {&q_nope_in, &q_pe_in, &c, &pe, &w})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(),
                "absorbed_bf16: queries, cache and weight must be bf16 on the CPU");
  const int64_t B = q_nope_in.size(0), H = q_nope_in.size(1), T = q_nope_in.size(2), Dn = q_nope_in.size(3);
  const int64_t R = q_pe_in.size(3), S = c.size(1), C = c.size(2);
  TORCH_CHECK(q_pe_in.size(0) == B && q_pe_in.size(1) == H && q_pe_in.size(2) == T && c.size(0) == B &&
                  pe.size(0) == B && pe.size(1) == S && pe.size(2) == R,
              "absorbed_bf16: query and cache shapes disagree");
  TORCH_CHECK(w.is_contiguous() && w.size(1) == C && H > 0 && w.size(0) % H == 0 && w.size(0) / H > Dn,
              "absorbed_bf16: kv_b_proj's weight must be a contiguous (H * (Dn + Dv), C)");
  TORCH_CHECK(c.stride(2) == 1 && c.stride(1) == C && pe.stride(2) == 1 && pe.stride(1) == R,
              "absorbed_bf16: each cached slot's latent and rotary key must be contiguous rows");
  TORCH_CHECK(pos_in.dim() == 2 && pos_in.size(0) == B && pos_in.size(1) == T && pos_in.scalar_type() == at::kLong,
              "absorbed_bf16: positions must be (B, T) int64");
  const int64_t Dv = w.size(0) / H - Dn, BT = B * T;
  const at::Tensor q_nope = q_nope_in.contiguous(), q_pe = q_pe_in.contiguous(), pos = pos_in.contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < BT; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < S, "absorbed_bf16: position past the cache");
  at::Tensor q_lat = at::empty({B, H, T, C}, q_nope.options()), lat = at::empty({B, H, T, C}, q_nope.options());
  at::Tensor out = at::empty({B, H, T, Dv}, q_nope.options());
  const bf16* qnp = q_nope.const_data_ptr<bf16>();
  const bf16* wp = w.const_data_ptr<bf16>();
  bf16* qlp = q_lat.mutable_data_ptr<bf16>();
  bf16* latp = lat.mutable_data_ptr<bf16>();
  bf16* outp = out.mutable_data_ptr<bf16>();
  const auto row_of = [&](int64_t i, int64_t h) { return (i / T * H + h) * T + i % T; };  // (b, t) = i -> (b, h, t)

  run_units(H, [&](int64_t h) {  // 1. q_lat[:, h] = bf16(q_nope[:, h] @ W_uk[h])
    thread_local std::vector<float> x_buf;
    thread_local std::vector<bf16> y_buf;
    x_buf.resize(BT * Dn), y_buf.resize(BT * C);
    float* const x = x_buf.data();
    for (int64_t i = 0; i < BT; ++i)
      for (int64_t d = 0; d < Dn; ++d) x[i * Dn + d] = static_cast<float>(qnp[row_of(i, h) * Dn + d]);
    const bf16* w_uk = wp + h * (Dn + Dv) * C;  // rows d < Dn of the head's block, C wide
    for (int64_t d = 0; d < C; d += 16 * kCols)
      for (int64_t i = 0; i < BT; i += kRows)
        weighted(static_cast<int>(std::min<int64_t>(kRows, BT - i)), x + i * Dn, Dn, Dn, w_uk + d, C,
                 y_buf.data() + i * C + d, C, std::min<int64_t>(16 * kCols, C - d));
    for (int64_t i = 0; i < BT; ++i) std::copy_n(y_buf.data() + i * C, C, qlp + row_of(i, h) * C);
  });
  attend_latent(qlp, q_pe.const_data_ptr<bf16>(), c, pe, pp, B, H, T, static_cast<float>(scale), latp);  // 2.
  run_units(H, [&](int64_t h) {  // 3. out[:, h] = bf16(lat[:, h] @ W_uv[h]^T)
    thread_local std::vector<bf16> x_buf, y_buf;
    x_buf.resize(BT * C), y_buf.resize(BT * Dv);
    for (int64_t i = 0; i < BT; ++i) std::copy_n(latp + row_of(i, h) * C, C, x_buf.data() + i * C);
    span(wp + (h * (Dn + Dv) + Dn) * C, x_buf.data(), y_buf.data(), 0, Dv, BT, C, Dv);
    for (int64_t i = 0; i < BT; ++i) std::copy_n(y_buf.data() + i * Dv, Dv, outp + row_of(i, h) * Dv);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("absorbed_bf16", &absorbed_bf16);
}
