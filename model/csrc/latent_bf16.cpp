// MLA's absorbed decode attention for bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.absorbed_bf16
// (model/kernels.py builds it and decides when to call it).
//
// With W_uk folded into the queries, every head attends over the same cache rows: the latent c (C wide, which is
// also the value) and the shared rotary key pe (R wide). One call does the three steps of the model's torch form
// (attention.py, absorbed_attend), each split over the threads its own way:
//   1. per head h: q_lat = bf16(q_nope @ W_uk[h]), the head's (Dn, C) block of kv_b_proj read once for all rows;
//   2. per batch row and group of 16 query rows (one a float32 lane): score = bf16(bf16(q_lat . c) + bf16(q_pe .
//      pe)), times scale in float32, softmax in float32 over the slots the query sees (slot <= its position),
//      probabilities rounded to bf16, lat = bf16(sum of p * c in float32); each cached row is read once for all
//      the group's heads (`attend_latent`);
//   3. per head h: out = bf16(lat @ W_uv[h]^T), the head's (Dv, C) block read once for all rows.
// torch runs steps 1 and 3 as batched products of a few rows against strided weight views, at a fraction of the
// bandwidth (2.5 ms of a 3-row decode step's layer at Small's widths, where reading the 4 MB takes ~0.15 ms).

#include "bf16_common.h"

#include <array>
#include <cstring>

namespace {

using namespace dsvl2_kernels_detail;

constexpr int kRows = 4;   // rows of x summed together over a row of w (step 1): 4 x 4 accumulators
constexpr int kCols = 4;   // 16-lane columns of w per pass (64 of C's values, 128 bytes of each row)

// Step 1's product, out = bf16(x @ w) for up to kRows rows of float32 x: out[r][0..cols) = bf16(sum over s < n of
// p[r][s] * c[s][0..cols)) for RB rows (at row stride ldp), the NV 16-lane columns at c (row stride ldc), out's
// stride ldo; TAIL where cols < 16 * NV. A slice of w's columns stays in L1 / L2 while every row sums over it.
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

constexpr int kLanes = 16;         // query rows of a group: one a float32 lane
constexpr int kScoreSlots = 8;     // slots a score block sums at once, one accumulator each
constexpr int64_t kSlotChunk = 256;  // slots of a group's scores handed to a thread at once
constexpr int64_t kColBlock = 32;    // columns of c a unit of the sums covers: one 64-byte line of a cached row
constexpr int64_t kSumsAhead = 32;   // cached rows the sums prefetch ahead

inline uint32_t load_pair(const bf16* p) {  // two adjacent bf16 as one 32-bit lane (any alignment)
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline uint16_t bits_of(bf16 v) {
  uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// acc[j] lane r = q_r . k_j in float32 (VDPBF16PS, pairs along K) for the kScoreSlots cached rows at k (row stride
// ldk, K values each); rows past `count` repeat the last one (their sums are not used). Each product multiplies all
// the group's query rows by one broadcast pair of a cached row: no reduction across lanes afterwards.
inline void score_block(const uint32_t* qp, const bf16* k, int64_t ldk, int64_t count, int64_t K,
                        __m512 acc[kScoreSlots]) {
  const bf16* row[kScoreSlots];
  __m512 odd[kScoreSlots];  // a second sum per slot (odd pairs), so that 16 chains hide the product's latency
  for (int j = 0; j < kScoreSlots; ++j) {
    row[j] = k + std::min<int64_t>(j, count - 1) * ldk;
    acc[j] = _mm512_setzero_ps(), odd[j] = _mm512_setzero_ps();
  }
  const int64_t P = K / 2;
  const char* next = reinterpret_cast<const char*>(k + kScoreSlots * ldk);  // the next block's rows, contiguous
  const int64_t next_lines = kScoreSlots * ldk * 2 / 64;
  int64_t t = 0;
  for (; t + 2 <= P; t += 2) {
    if (t < next_lines) dsvl2_prefetch::to_l1(next + t * 64), dsvl2_prefetch::to_l1(next + t * 64 + 64);
    const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + t * kLanes);
    const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + (t + 1) * kLanes);
    for (int j = 0; j < kScoreSlots; ++j) {
      const __m512i even_pair = _mm512_set1_epi32(static_cast<int>(load_pair(row[j] + 2 * t)));
      const __m512i odd_pair = _mm512_set1_epi32(static_cast<int>(load_pair(row[j] + 2 * t + 2)));
      acc[j] = _mm512_dpbf16_ps(acc[j], q0, (__m512bh)even_pair);
      odd[j] = _mm512_dpbf16_ps(odd[j], q1, (__m512bh)odd_pair);
    }
  }
  if (t < P) {
    const __m512bh q = (__m512bh)_mm512_loadu_si512(qp + t * kLanes);
    for (int j = 0; j < kScoreSlots; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], q, (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(row[j] + 2 * t))));
  }
  if (K % 2) {  // the last value, paired with zero
    const __m512bh q = (__m512bh)_mm512_loadu_si512(qp + P * kLanes);
    for (int j = 0; j < kScoreSlots; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], q, (__m512bh)_mm512_set1_epi32(bits_of(row[j][K - 1])));
  }
  for (int j = 0; j < kScoreSlots; ++j) acc[j] = _mm512_add_ps(acc[j], odd[j]);
}

// lat[r][0..cols) = bf16(sum over s < n of p[s][r] * c_s[0..cols)) for the 8 lanes r at p (slot pairs u at p + u *
// kLanes, each lane's (p[2u], p[2u + 1]) as one 32-bit value) and cols <= kColBlock columns of the cached rows at c
// (row stride ldc); `live` of the 8 rows are stored, at out (row stride ldo). Two cached rows' 32 columns are
// interleaved in pairs (VPUNPCKLWD: columns 8i..8i+3 of each 128-bit lane, VPUNPCKHWD: 8i+4..8i+7) and multiplied
// by each lane's broadcast pair; the sums' lanes go back to column order once at the end. TAIL where cols <
// kColBlock: masked loads there only (a masked load inside the loop makes GCC keep the sums on the stack).
template <bool TAIL>
inline void latent_sums(const uint32_t* p, const bf16* c, int64_t ldc, int64_t n, int64_t cols, int live, bf16* out,
                        int64_t ldo) {
  const __mmask32 cmask = TAIL ? static_cast<__mmask32>((uint64_t{1} << cols) - 1) : ~__mmask32{0};
  const auto row = [&](int64_t s) {
    if constexpr (TAIL) return _mm512_maskz_loadu_epi16(cmask, c + s * ldc);
    return _mm512_loadu_si512(c + s * ldc);
  };
  __m512 lo_acc[8], hi_acc[8];
  for (int r = 0; r < 8; ++r) lo_acc[r] = _mm512_setzero_ps(), hi_acc[r] = _mm512_setzero_ps();
  const auto pair_step = [&](__m512i a, __m512i z, const uint32_t* ps) {
    const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, z), hi = (__m512bh)_mm512_unpackhi_epi16(a, z);
    for (int r = 0; r < 8; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(ps[r]));
      lo_acc[r] = _mm512_dpbf16_ps(lo_acc[r], lo, w);
      hi_acc[r] = _mm512_dpbf16_ps(hi_acc[r], hi, w);
    }
  };
  int64_t s = 0;
  for (; s + 2 <= n; s += 2) {
    dsvl2_prefetch::to_l1(c + (s + kSumsAhead) * ldc);  // strided rows: the hardware's prefetch does not follow
    dsvl2_prefetch::to_l1(c + (s + kSumsAhead + 1) * ldc);
    pair_step(row(s), row(s + 1), p + s / 2 * kLanes);
  }
  if (s < n) pair_step(row(s), _mm512_setzero_si512(), p + s / 2 * kLanes);  // the odd last slot, its pair zero
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int r = 0; r < live; ++r) {
    store_bf16(out + r * ldo, _mm512_permutex2var_ps(lo_acc[r], first, hi_acc[r]), tail_mask(cols));
    if (cols > 16)
      store_bf16(out + r * ldo + 16, _mm512_permutex2var_ps(lo_acc[r], second, hi_acc[r]), tail_mask(cols - 16));
  }
}

// Step 2 for all batch rows: out_lat (B, H, T, C) from q_lat (B, H, T, C) and q_pe (B, H, T, R) (contiguous). The
// B x H x T query rows go in groups of kLanes of one batch row, a row to a float32 lane, in three passes:
//   scores  per (group, chunk of slots): score[s][lane] = bf16(bf16(q_lat . c_s) + bf16(q_pe . pe_s)), each product
//           a VDPBF16PS of every lane's query pair by one broadcast pair of the cached row;
//   softmax per group, lane-parallel over the slots: scale, max, exp, sum, divide, probabilities rounded to bf16 and
//           stored as pairs of slots (p[2u][lane], p[2u + 1][lane]);
//   sums    per (group, kColBlock columns): lat[lane][col] = bf16(sum over s of p[s][lane] * c_s[col]), VDPBF16PS of
//           two cached rows' columns interleaved in pairs (VPUNPCKLWD / VPUNPCKHWD) by one lane's broadcast pair.
// Against the form before (query rows by span's tiles, each score a reduction across lanes and a scalar conversion;
// the sums in float32 FMAs) on a 2-core Zen 5, Small's widths (16 heads, C 512, R 64), 12 layers' caches alternated
// in one process: 1.43x / 1.46x / 1.40x / 1.32x at batch 1 / 3 / 8 / 16 and 2,000 / 1,151 / 2,000 / 1,000 slots
// (batch 8 at 2,000: 2.24 -> 1.61 ms a layer). The sums read a column block of rows 1 KB apart, which the hardware's
// prefetch does not follow: they prefetch kSumsAhead rows ahead.
void attend_latent(const bf16* qlp, const bf16* qpp, const at::Tensor& c, const at::Tensor& pe, const int64_t* pp,
                   int64_t B, int64_t H, int64_t T, float scale, bf16* op) {
  const int64_t C = c.size(2), R = pe.size(2), Q = H * T, G = (Q + kLanes - 1) / kLanes;
  const int64_t PL = (C + 1) / 2, PR = (R + 1) / 2;
  const bf16* cp = c.const_data_ptr<bf16>();
  const bf16* pep = pe.const_data_ptr<bf16>();
  std::vector<int64_t> seen(B, 0);  // slots visible to the furthest query of each batch row
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) seen[b] = std::max(seen[b], pp[b * T + t] + 1);
  const int64_t width = (*std::max_element(seen.begin(), seen.end()) + 1) / 2 * 2;  // slots, a whole pair
  const at::TensorOptions f32 = c.options().dtype(at::kFloat), i32 = c.options().dtype(at::kInt);
  at::Tensor packed = at::empty({B * G * (PL + PR) * kLanes}, i32);
  at::Tensor scores = at::empty({B * G * width * kLanes}, f32);
  at::Tensor pairs = at::empty({B * G * width / 2 * kLanes}, i32);
  uint32_t* const qk = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  float* const sc = scores.mutable_data_ptr<float>();
  uint32_t* const pr = reinterpret_cast<uint32_t*>(pairs.mutable_data_ptr<int32_t>());
  const auto rows_of = [&](int64_t g) { return std::min<int64_t>(kLanes, Q - g * kLanes); };

  run_units(B * G, [&](int64_t bg) {  // the groups' queries as pairs along C and along R
    const int64_t b = bg / G, g = bg % G;
    uint32_t* const dst = qk + bg * (PL + PR) * kLanes;
    // pair p of lane r at dst[p * kLanes + r]: pack_pairs' layout with the group's rows as its 16 columns
    pack_pairs(qlp + (b * Q + g * kLanes) * C, C, rows_of(g), C, kLanes, reinterpret_cast<bf16*>(dst));
    pack_pairs(qpp + (b * Q + g * kLanes) * R, R, rows_of(g), R, kLanes, reinterpret_cast<bf16*>(dst + PL * kLanes));
  });

  std::vector<std::array<int64_t, 3>> chunks;  // (batch row, group, first slot)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < seen[b]; s += kSlotChunk) chunks.push_back({b, g, s});
  run_units(static_cast<int64_t>(chunks.size()), [&](int64_t i) {
    const auto [b, g, s0] = chunks[i];
    const int64_t bg = b * G + g, s1 = std::min(seen[b], s0 + kSlotChunk);
    const uint32_t* ql = qk + bg * (PL + PR) * kLanes;
    const bf16* cb = cp + b * c.stride(0);
    const bf16* peb = pep + b * pe.stride(0);
    float* out = sc + bg * width * kLanes;
    __m512 lat[kScoreSlots], rot[kScoreSlots];
    for (int64_t s = s0; s < s1; s += kScoreSlots) {
      const int64_t count = std::min<int64_t>(kScoreSlots, s1 - s);
      score_block(ql, cb + s * C, C, count, C, lat);
      score_block(ql + PL * kLanes, peb + s * R, R, count, R, rot);
      for (int64_t j = 0; j < count; ++j)
        _mm512_storeu_ps(out + (s + j) * kLanes, round_bf16(_mm512_add_ps(round_bf16(lat[j]), round_bf16(rot[j]))));
    }
  });

  run_units(B * G, [&](int64_t bg) {  // softmax of every lane over the slots it sees, lane-parallel
    const int64_t b = bg / G, g = bg % G, rows = rows_of(g), n_max = seen[b];
    alignas(64) int32_t n_lanes[kLanes];
    for (int r = 0; r < kLanes; ++r)
      n_lanes[r] = r < rows ? static_cast<int32_t>(pp[b * T + (g * kLanes + r) % T] + 1) : 0;
    const __m512i n = _mm512_load_si512(n_lanes);
    const __mmask16 live = _mm512_cmpgt_epi32_mask(n, _mm512_setzero_si512());
    float* x = sc + bg * width * kLanes;
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t s = 0; s < n_max; ++s) {
      const __mmask16 m = _mm512_cmpgt_epi32_mask(n, _mm512_set1_epi32(static_cast<int32_t>(s)));
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + s * kLanes), vscale);
      _mm512_storeu_ps(x + s * kLanes, v);
      top = _mm512_mask_max_ps(top, m, top, v);
    }
    top = _mm512_mask_mov_ps(_mm512_setzero_ps(), live, top);  // lanes without slots: nothing to shift
    for (int64_t s = 0; s < n_max; ++s) {
      const __mmask16 m = _mm512_cmpgt_epi32_mask(n, _mm512_set1_epi32(static_cast<int32_t>(s)));
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + s * kLanes), top)));
      _mm512_storeu_ps(x + s * kLanes, e);
      total = _mm512_add_ps(total, e);
    }
    total = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), live, total);
    uint32_t* p = pr + bg * width / 2 * kLanes;
    for (int64_t s = 0; s < n_max; s += 2) {  // probabilities rounded to bf16, two slots to a 32-bit lane
      const __m512 a = _mm512_div_ps(_mm512_loadu_ps(x + s * kLanes), total);
      const __m512 z =
          s + 1 < n_max ? _mm512_div_ps(_mm512_loadu_ps(x + (s + 1) * kLanes), total) : _mm512_setzero_ps();
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(z));
      _mm512_storeu_si512(p + s / 2 * kLanes, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  });

  const int64_t col_blocks = (C + kColBlock - 1) / kColBlock;
  run_units(B * G * col_blocks, [&](int64_t unit) {  // lat = p . c, kColBlock columns of one group at a time
    const int64_t bg = unit / col_blocks, b = bg / G, g = bg % G, d = unit % col_blocks * kColBlock;
    const int64_t rows = rows_of(g), cols = std::min(kColBlock, C - d);
    const bf16* cb = cp + b * c.stride(0) + d;
    const uint32_t* p = pr + bg * width / 2 * kLanes;
    bf16* o = op + (b * Q + g * kLanes) * C + d;
    for (int64_t half = 0; half < rows; half += 8) {
      const int live = static_cast<int>(std::min<int64_t>(8, rows - half));
      if (cols == kColBlock)
        latent_sums<false>(p + half, cb, C, seen[b], cols, live, o + half * C, C);
      else
        latent_sums<true>(p + half, cb, C, seen[b], cols, live, o + half * C, C);
    }
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
