// The routed experts of a MoE layer in bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.moe_bf16
// (declared with the other ops in decode_bf16.cpp); model/kernels.py builds it and decides when to call it.
//
// One call computes every active expert's gate and up products, the SiLU gating and the down product, then the
// routing-weighted sum, matching the model's reference arithmetic: per token slot (n, k) routed to expert e,
// a = bf16(bf16(silu(bf16(x gate_e))) * bf16(x up_e)), o = bf16(a down_e), and y[n] = bf16(sum over k in order of
// float(o[n, k]) * weights[n, k]). Slots are grouped by expert, each expert's rows of x gathered once. Two parallel
// passes hand out units of (expert, block of weight rows): pass 1 the gate and up rows with the gating, pass 2 the
// down rows. How a unit multiplies depends on how many rows its expert has:
//   few rows (decode)   the weight is streamed once at memory speed with the dot-product tiles of bf16_common.h
//                       (`span`), whose per-output reduction is cheap next to reading the weight;
//   many rows (prefill) the unit's 48 weight rows are packed into pairs along K (`pack_pairs`, L2-resident) and
//                       multiplied by the outer-product micro-kernel (`pair_tile`, 8 rows x 48 columns), which
//                       needs no reductions; the next unit's weight rows are prefetched meanwhile;
//   2+ rows on AMX      (Xeons with AMX-BF16, when asked) the weights are the tiles' a operand as they lie (nothing
//                       packed per unit) and each expert's activations are packed once into pairs as the b operand
//                       (amx_tiles.h, amx_rows.h); the next block of weight rows is prefetched while a block
//                       multiplies. From 2 rows: the tiles streamed Tiny's decode experts and projections faster
//                       than the dot products there (decode_bf16.cpp's kAmxRows).
// Measured on the 2-core Zen 4 (1,000-token prefill of the real-dimension Tiny): the layer's experts at ~310 GFLOP/s
// with cold weights (~340-370 on warm ones), and the whole prefill 12% faster than torch's per-expert products
// (oneDNN reorders every expert's weight for each small product) with their gather, scatter and float32 combine.
// On a 2-core Xeon with AMX (bench/moe_grouped.py, Tiny's widths): 1,000 tokens 2.2-2.5x and 2,048 tokens 1.5-2.0x
// torch's grouped product; the AVX512 micro-kernel reaches only a third of torch there.

#include "amx_rows.h"
#include "amx_tiles.h"
#include "bf16_common.h"

namespace {

using namespace dsvl2_kernels_detail;

constexpr int64_t kPackedMinRows = 16;  // an expert with at least this many rows takes the packed path
constexpr int64_t kAmxMinRows = 2;      // on AMX, from this many (decode_bf16.cpp's kAmxRows: the tiles stream faster)
constexpr int kPR = 8;                  // activation rows per packed micro-tile
constexpr int kPC = 3;                  // 16-lane weight columns per packed unit and micro-tile: 48 weight rows

// The gating of bf16-rounded gate and up values: bf16(silu(g)) * u, silu(g) = g / (1 + e^-g) in float32 as torch
// computes it (rounded once more when stored).
inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e))), u);
}

// g[i] = bf16(bf16(silu(g[i])) * u[i]) for i < n.
inline void gate_in_place(bf16* g, const bf16* u, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store_bf16(g + i, silu_mul(load16_f32(g + i, m), load16_f32(u + i, m)), m);
  }
}

struct Unit {
  int64_t expert, n0, n1;  // weight rows [n0, n1)
  bool packed;
};

// Units covering `rows` weight rows of every active expert: kPC * 16 rows where the expert takes the packed path,
// `streamed` rows (about kChunkBytes of weight) where it streams.
std::vector<Unit> plan(const std::vector<int64_t>& active, const std::vector<int64_t>& count, int64_t rows,
                       int64_t streamed, int64_t min_packed) {
  std::vector<Unit> units;
  for (int64_t e : active) {
    const bool packed = count[e] >= min_packed;
    const int64_t step = packed ? kPC * 16 : streamed;
    for (int64_t n0 = 0; n0 < rows; n0 += step) units.push_back({e, n0, std::min(rows, n0 + step), packed});
  }
  return units;
}

// Rows [n0, n1) of a weight w (rows K long) packed into `pk` as pairs along K for pair_tile's b operand
// ((K + 1) / 2 pairs x 16 * cols lanes); returns cols, the 16-lane columns.
int pack_unit(const bf16* w, int64_t K, int64_t n0, int64_t n1, std::vector<bf16>& pk) {
  const int cols = static_cast<int>((n1 - n0 + 15) / 16);
  pk.resize((K + 1) / 2 * cols * 32);
  pack_pairs(w + n0 * K, K, n1 - n0, K, cols * 16, pk.data());
  return cols;
}

// On AMX the weights are the a operand as they lie (rows of 16 output features, no packing) and the expert's
// activations the b operand, packed once per expert (`pack_pairs`, `padded_tokens(M)` lanes: xk); the sums come
// out as (features x tokens) blocks and are transposed on the way out. Gate and up rows [0, rows) (row stride K,
// rows a multiple of 16) of one expert with M tokens, gated into g (row stride ldg) at the unit's first column.
// While a block of 16 rows multiplies, the next block's rows are prefetched (the next unit's, next_g / next_u, after
// the last), which the tile loads' own misses would otherwise wait for.
void gate_up_amx(const bf16* wg, const bf16* wu, int64_t K, int64_t rows, const bf16* xk, int64_t M, bf16* g,
                 int64_t ldg, const bf16* next_g, const bf16* next_u) {
  const int64_t L = padded_tokens(M), calls = (L + 31) / 32;
  alignas(64) float sums[4 * 256];
  __m512 v[16];
  amx_begin();
  for (int64_t n = 0; n < rows; n += 16) {
    const bf16* const a[2] = {wg + n * K, wu + n * K};
    const bool last = n + 16 >= rows;
    for (int64_t j = 0; j < L; j += 32) {
      const int nb = L - j > 16 ? 2 : 1;
      const bf16* const b[2] = {xk + j * 2, xk + (j + 16) * 2};
      amx_block_any(2, nb, a, K, b, L * 2, K / 32, sums,
                    spread_prefetch(last ? next_g : a[0] + 16 * K, last ? next_u : a[1] + 16 * K, 16 * K * 2, j / 32,
                                    calls, K / 32));
      for (int jb = 0; jb < nb; ++jb) {  // gate sums in block jb, up sums in block nb + jb
        for (int r = 0; r < 16; ++r)
          v[r] = silu_mul(round_bf16(_mm512_load_ps(sums + jb * 256 + 16 * r)),
                          round_bf16(_mm512_load_ps(sums + (nb + jb) * 256 + 16 * r)));
        store_transposed(v, M - j - 16 * jb, g + (j + 16 * jb) * ldg + n, ldg);
      }
    }
  }
  amx_end();
}

// One projection of every expert: `list` names one 2-D weight per expert, or holds a single (X, rows, cols) stack of
// them all (the MoE layer's StackedExperts, as the loader lays them out: a decode step's call then converts three
// tensors where three lists of 64 cost ~16-25 us of Python argument conversion, 11 calls a Tiny step).
struct ExpertWeights {
  at::TensorList list;
  bool stacked;
  int64_t experts() const { return stacked ? list[0].size(0) : static_cast<int64_t>(list.size()); }
  const at::Tensor& first() const { return list[0]; }
  // Rows and columns of one expert's weight.
  int64_t rows() const { return first().size(stacked ? 1 : 0); }
  int64_t cols() const { return first().size(stacked ? 2 : 1); }
  const bf16* of(int64_t e) const {
    return stacked ? first().const_data_ptr<bf16>() + e * rows() * cols() : list[e].const_data_ptr<bf16>();
  }
  // Expert e's weight is (rows, cols), contiguous bf16 on the CPU (the stack as a whole, where stacked).
  void check(int64_t e, int64_t r, int64_t c, const char* what) const {
    const at::Tensor& w = stacked ? first() : list[e];
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.device().is_cpu() && w.is_contiguous() &&
                    w.dim() == (stacked ? 3 : 2),
                "moe_bf16: expert weights must be contiguous bfloat16 CPU tensors: one 2-D an expert, or one 3-D stack");
    TORCH_CHECK(rows() == r && cols() == c && (stacked || (w.size(0) == r && w.size(1) == c)), "moe_bf16: expert ", e,
                "'s ", what, " weight has the wrong shape");
  }
};

ExpertWeights expert_weights(at::TensorList l) { return {l, l.size() == 1 && l[0].dim() == 3}; }

at::Tensor moe_bf16(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                    at::TensorList gate_in, at::TensorList up_in, at::TensorList down_in, bool amx) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu(),
              "moe_bf16: x must be a (N, E) bfloat16 CPU tensor");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0) && ids_in.scalar_type() == at::kLong,
              "moe_bf16: ids must be (N, K) int64");
  TORCH_CHECK(weights_in.sizes() == ids_in.sizes() && weights_in.scalar_type() == at::kFloat,
              "moe_bf16: weights must be (N, K) float32");
  TORCH_CHECK(!gate_in.empty() && !up_in.empty() && !down_in.empty(), "moe_bf16: no experts");
  const ExpertWeights gate = expert_weights(gate_in), up = expert_weights(up_in), down = expert_weights(down_in);
  const int64_t X = gate.experts();
  TORCH_CHECK(X > 0 && up.experts() == X && down.experts() == X,
              "moe_bf16: gate, up and down must list the same experts");
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), routing = weights_in.contiguous();
  const int64_t N = x.size(0), E = x.size(1), K = ids.size(1), I = gate.rows();
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
  // On AMX, each packed expert's rows of x (and later of g) are packed into pairs for the tiles (below).
  const bool use_amx = amx && amx_fits(E) && amx_fits(I) && amx_ready();
  const int64_t min_packed = use_amx ? kAmxMinRows : kPackedMinRows;
  std::vector<int64_t> active;
  bool any_streamed = false;
  for (int64_t e = 0; e < X; ++e) {
    if (!count[e]) continue;
    active.push_back(e);
    any_streamed |= count[e] < min_packed;
    gate.check(e, I, E, "gate");
    up.check(e, I, E, "up");
    down.check(e, E, I, "down");
  }

  // Gathered rows of x and the gated activations, each zero-padded to an even length (the packed path reads pairs).
  const int64_t R = N * K, Ex = (E + 1) / 2 * 2, Ix = (I + 1) / 2 * 2;
  at::Tensor xs = at::empty({R, Ex}, x.options()), g = at::empty({R, Ix}, x.options());
  at::Tensor u = at::empty({any_streamed ? R : 0, I}, x.options()), out = at::empty({R, E}, x.options());
  const bf16* xp = x.const_data_ptr<bf16>();
  bf16* xsp = xs.mutable_data_ptr<bf16>();
  bf16* gp = g.mutable_data_ptr<bf16>();
  bf16* up_ = u.mutable_data_ptr<bf16>();
  bf16* op = out.mutable_data_ptr<bf16>();
  const bf16 zero(0.0f);
  run_units((R + 63) / 64, [&](int64_t block) {
    for (int64_t r = block * 64; r < std::min(R, block * 64 + 64); ++r) {
      std::copy_n(xp + slot_of[r] / K * E, E, xsp + r * Ex);
      if (Ex > E) xsp[r * Ex + E] = zero;
      if (Ix > I) gp[r * Ix + I] = zero;
    }
  });

  // Each packed expert's rows packed for AMX's tiles at token offset tok0[e].
  std::vector<int64_t> tok0(X + 1, 0), packed_experts;
  for (int64_t e = 0; e < X; ++e) {
    const bool p = use_amx && count[e] >= min_packed;
    tok0[e + 1] = tok0[e] + (p ? padded_tokens(count[e]) : 0);
    if (p) packed_experts.push_back(e);
  }
  at::Tensor xk = at::empty({tok0[X], E}, x.options()), gk = at::empty({tok0[X], I}, x.options());
  bf16* xkp = xk.mutable_data_ptr<bf16>();
  bf16* gkp = gk.mutable_data_ptr<bf16>();
  const auto pack_rows = [&](const bf16* rows, int64_t ld, int64_t width, bf16* packed) {
    run_units(static_cast<int64_t>(packed_experts.size()), [&](int64_t i) {
      const int64_t e = packed_experts[i];
      pack_pairs(rows + start[e] * ld, ld, count[e], width, tok0[e + 1] - tok0[e], packed + tok0[e] * width);
    });
  };
  pack_rows(xsp, Ex, E, xkp);

  const int64_t workers = at::get_num_threads();
  // Pass 1: gate and up rows [n0, n1) of one expert for all its rows, gated into g.
  const std::vector<Unit> units1 = plan(active, count, I, rows_per_unit(2 * E * 2), min_packed);
  run_units(static_cast<int64_t>(units1.size()), [&](int64_t i) {
    const Unit& t = units1[i];
    const int64_t r0 = start[t.expert], M = count[t.expert];
    const bf16* wg = gate.of(t.expert);
    const bf16* wu = up.of(t.expert);
    if (!t.packed) {
      span(wg, xsp + r0 * Ex, gp + r0 * Ix, t.n0, t.n1, M, E, Ix, Ex);
      span(wu, xsp + r0 * Ex, up_ + r0 * I, t.n0, t.n1, M, E, I, Ex);
      for (int64_t m = r0; m < r0 + M; ++m) gate_in_place(gp + m * Ix + t.n0, up_ + m * I + t.n0, t.n1 - t.n0);
      return;
    }
    if (use_amx) {
      const Unit& next = units1[std::min<int64_t>(i + workers, units1.size() - 1)];  // likely this thread's next
      gate_up_amx(wg + t.n0 * E, wu + t.n0 * E, E, t.n1 - t.n0, xkp + tok0[t.expert] * E, M, gp + r0 * Ix + t.n0, Ix,
                  gate.of(next.expert) + next.n0 * E,
                  up.of(next.expert) + next.n0 * E);
      return;
    }
    thread_local std::vector<bf16> pkg, pku;
    const int cols = pack_unit(wg, E, t.n0, t.n1, pkg);
    pack_unit(wu, E, t.n0, t.n1, pku);
    const Unit& next = units1[std::min<int64_t>(i + workers, units1.size() - 1)];  // likely this thread's next
    const int64_t next_bytes = (next.n1 - next.n0) * E * 2, blocks = (M + kPR - 1) / kPR;
    __m512 ag[kPR * kPC], au[kPR * kPC];
    for (int64_t m = 0; m < M; m += kPR) {
      const int mr = static_cast<int>(std::min<int64_t>(kPR, M - m));
      prefetch_piece(gate.of(next.expert) + next.n0 * E, next_bytes, m / kPR, blocks);
      prefetch_piece(up.of(next.expert) + next.n0 * E, next_bytes, m / kPR, blocks);
      const bf16* xm = xsp + (r0 + m) * Ex;
      pair_tile_any(mr, cols, xm, Ex, pkg.data(), cols * 32, Ex / 2, ag);
      pair_tile_any(mr, cols, xm, Ex, pku.data(), cols * 32, Ex / 2, au);
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < cols; ++c)
          store_bf16(gp + (r0 + m + r) * Ix + t.n0 + 16 * c, silu_mul(round_bf16(ag[r * cols + c]),
                     round_bf16(au[r * cols + c])), tail_mask(t.n1 - t.n0 - 16 * c));
    }
  });

  pack_rows(gp, Ix, I, gkp);

  // Pass 2: down rows [n0, n1) of one expert for all its rows.
  const std::vector<Unit> units2 = plan(active, count, E, rows_per_unit(I * 2), min_packed);
  run_units(static_cast<int64_t>(units2.size()), [&](int64_t i) {
    const Unit& t = units2[i];
    const int64_t r0 = start[t.expert], M = count[t.expert];
    const bf16* wd = down.of(t.expert);
    if (!t.packed) {
      span(wd, gp + r0 * Ix, op + r0 * E, t.n0, t.n1, M, I, E, Ix);
      return;
    }
    if (use_amx) {
      const Unit& next = units2[std::min<int64_t>(i + workers, units2.size() - 1)];
      rows_amx(wd + t.n0 * I, I, t.n1 - t.n0, gkp + tok0[t.expert] * I, M, op + r0 * E + t.n0, E,
               down.of(next.expert) + next.n0 * I);
      return;
    }
    thread_local std::vector<bf16> pk;
    const int cols = pack_unit(wd, I, t.n0, t.n1, pk);
    const Unit& next = units2[std::min<int64_t>(i + workers, units2.size() - 1)];
    const int64_t next_bytes = (next.n1 - next.n0) * I * 2, blocks = (M + kPR - 1) / kPR;
    __m512 acc[kPR * kPC];
    for (int64_t m = 0; m < M; m += kPR) {
      const int mr = static_cast<int>(std::min<int64_t>(kPR, M - m));
      prefetch_piece(down.of(next.expert) + next.n0 * I, next_bytes, m / kPR, blocks);
      pair_tile_any(mr, cols, gp + (r0 + m) * Ix, Ix, pk.data(), cols * 32, Ix / 2, acc);
      for (int r = 0; r < mr; ++r)
        for (int c = 0; c < cols; ++c)
          store_bf16(op + (r0 + m + r) * E + t.n0 + 16 * c, acc[r * cols + c], tail_mask(t.n1 - t.n0 - 16 * c));
    }
  });

  // The routing-weighted sum over each token's slots, in slot order.
  at::Tensor y = at::empty({N, E}, x.options());
  bf16* yp = y.mutable_data_ptr<bf16>();
  const float* wp = routing.const_data_ptr<float>();
  run_units((N + 15) / 16, [&](int64_t block) {
    for (int64_t n = block * 16; n < std::min(N, block * 16 + 16); ++n)
      for (int64_t c = 0; c < E; c += 16) {
        const __mmask16 m = tail_mask(E - c);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; ++k)
          acc = _mm512_fmadd_ps(load16_f32(op + row_of[n * K + k] * E + c, m), _mm512_set1_ps(wp[n * K + k]), acc);
        store_bf16(yp + n * E + c, acc, m);
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("moe_bf16", &moe_bf16);
}
