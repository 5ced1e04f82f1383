// The experts of a MoE layer with int8 / int4 weights, in one call: torch.ops.dsvl2_quant.moe_held, on the weights a
// torch.classes.dsvl2_quant.Experts holds (quant_held.h); model/quant_kernels.py builds it, model/quant_experts.py
// decides when to call it.
//
// Per token slot (n, k) routed to expert e: a = silu(x gate_e) * (x up_e), o = a down_e, and y[n] = sum over k in
// order of weights[n, k] * o[n, k], all in float32 (the products as int8_linear / int4_linear compute them, on the
// weights in their kernel layouts). Where the object holds the layer's shared experts too (the last ones, each as
// wide as it is), every token has one more slot per shared expert, weight 1, after its routed ones: the layer's
// whole feed-forward sum, rounded once. Slots are grouped by expert, each expert's rows of x gathered once. Two
// parallel passes hand out units of (expert, block of weight rows) from one counter: pass 1 the gate and up rows,
// pass 2 the down rows; an expert with one row streams its weight at memory speed (the one-row tiles), one with
// several takes the several-row path. One call replaces, per layer and decode step, 3 products per active expert,
// each with its own Python dispatch, checks and parallel region (~40-100 us apiece on a 2-core host), and the gather
// / scatter around them.

#include <torch/custom_class.h>
#include <torch/library.h>

#include "quant_held.h"
#include "quant_vnni.h"

#include <numeric>
#include <optional>
#include <type_traits>

namespace {

using namespace dsvl2_quant_detail;

struct Unit {
  int64_t expert, n0, n1;  // weight rows [n0, n1) of the expert's gate (which == 0), up (1) or down (2)
  int which;
};

// Units covering the rows_of(e) weight rows of each active expert's matrices `which`, ~kChunkBytes of weight each
// (rows of row_bytes_of(e) bytes).
template <typename RowsOf, typename BytesOf>
void plan(std::vector<Unit>& units, const std::vector<int64_t>& active, RowsOf rows_of, BytesOf row_bytes_of,
          std::initializer_list<int> which) {
  for (int w : which)
    for (int64_t e : active) {
      const int64_t per_unit = rows_per_unit(row_bytes_of(e)), padded = round_up(rows_of(e), kRowsPerBlock);
      for (int64_t n0 = 0; n0 < padded; n0 += per_unit) units.push_back({e, n0, std::min(padded, n0 + per_unit), w});
    }
}

// Rows token_of[r] of x (N, E: float32 or bf16) into row r of f (float32) and of b (bf16, rounded to nearest even
// as .to(bfloat16) rounds; exact for bf16 x), each where defined, zeros from E to their row length: one pass where
// padding, gathering and converting took five ATen calls. With `gated` and the sum written in x's dtype: a whole
// decode step of the real-dimension Tiny 1.04x / 1.03x faster in int4 at batch 1 / 8, int8 1.02x / 1.01x (Zen 5).
void gather_rows(const at::Tensor& x, const std::vector<int64_t>& token_of, int64_t ld, const at::Tensor& f,
                 const at::Tensor& b) {
  const int64_t E = x.size(1);
  float* fp = f.defined() ? f.mutable_data_ptr<float>() : nullptr;
  at::BFloat16* bp = b.defined() ? b.mutable_data_ptr<at::BFloat16>() : nullptr;
  for (size_t r = 0; r < token_of.size(); ++r) {
    float* fr = fp != nullptr ? fp + r * ld : nullptr;
    at::BFloat16* br = bp != nullptr ? bp + r * ld : nullptr;
    if (x.scalar_type() == at::kBFloat16) {
      const at::BFloat16* xr = x.const_data_ptr<at::BFloat16>() + token_of[r] * E;
      if (fr != nullptr)
        for (int64_t c = 0; c < E; ++c) fr[c] = static_cast<float>(xr[c]);
      if (br != nullptr) std::copy(xr, xr + E, br);
    } else {
      const float* xr = x.const_data_ptr<float>() + token_of[r] * E;
      if (fr != nullptr) std::copy(xr, xr + E, fr);
      if (br != nullptr)
        for (int64_t c = 0; c < E; ++c) br[c] = at::BFloat16(xr[c]);
    }
    if (fr != nullptr) std::fill(fr + E, fr + ld, 0.0f);
    if (br != nullptr) std::fill(br + E, br + ld, at::BFloat16(0.0f));
  }
}

// h = silu(gate) * up into f (R rows of ld floats, zeros past the row's width) and, where defined, b (bf16):
// gate_up (2, R, ldg) float32, row r's first width[r] values used. The silu is taken in place, once per run of rows
// of one width (the routed experts' rows, then the wider shared experts' last), on those columns only; the rows are
// gated in parallel. (At batch 8 of Tiny int4 the silu over every row's full width and a serial gating cost ~60 us a
// layer, ~2.8% of the step, timed inside the op; the step ran ~1.01x faster without, 4 alternated processes.)
void gated(const at::Tensor& gate_up, const std::vector<int64_t>& width, const at::Tensor& f, const at::Tensor& b) {
  const at::Tensor& any = f.defined() ? f : b;
  const int64_t R = any.size(0), ld = any.size(1), ldg = gate_up.size(2);
  const at::Tensor gate = gate_up[0];
  for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
    for (r1 = r0 + 1; r1 < R && width[r1] == width[r0];) ++r1;
    at::Tensor run = gate.narrow(0, r0, r1 - r0).narrow(1, 0, width[r0]);
    at::silu_(run);
  }
  const float* sp = gate.const_data_ptr<float>();
  const float* up_p = sp + R * ldg;
  float* fp = f.defined() ? f.mutable_data_ptr<float>() : nullptr;
  at::BFloat16* bp = b.defined() ? b.mutable_data_ptr<at::BFloat16>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(ld, 1));
  at::parallel_for(0, R, grain, [&](int64_t a, int64_t z) {
    for (int64_t r = a; r < z; ++r) {
      const int64_t w = width[r];
      const float* gr = sp + r * ldg;
      const float* ur = up_p + r * ldg;
      if (fp != nullptr) {
        float* fr = fp + r * ld;
        for (int64_t i = 0; i < w; ++i) fr[i] = gr[i] * ur[i];
        std::fill(fr + w, fr + ld, 0.0f);
      }
      if (bp != nullptr) {
        at::BFloat16* br = bp + r * ld;
        for (int64_t i = 0; i < w; ++i) br[i] = at::BFloat16(gr[i] * ur[i]);
        std::fill(br + w, br + ld, at::BFloat16(0.0f));
      }
    }
  });
}

// Per-group sums of x's rows (int4's offsets): (R, groups) for rows of ldx floats whose first K form the groups.
at::Tensor group_sums(const at::Tensor& x, int64_t groups) {
  return x.view({x.size(0), groups, x.size(1) / groups}).sum(2).contiguous();
}

// Rows of x as a product reads them: float32 (AVX2, and int8's one-row tiles on AVX512) or bf16 bits (on AVX512:
// int4, and int8 from 2 rows where given), and int4's per-group sums of the float32 rows (AVX2).
struct Rows {
  const float* f;
  const uint16_t* b;
  const float* sums;
  int64_t ld;
  const FixedRows* fixed;  // int4 on VNNI: every row of b as fixed point (rows from `first`), else null
  int64_t first;
};

// One product of rows [n0, n1) of weight q (its blocks of 4 rows `block_bytes` apart; scales s) for M rows of x:
// int8 or int4 (steps of 16 k over K).
template <typename S>
void product(int bits, int64_t isa, const void* q, int64_t block_bytes, const S* s, int64_t group, const Rows& x,
             float* y, int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t M, int64_t K) {
  const int64_t steps = (K + 15) / 16;
  if (bits == 8) {
    const Int8Rows rows{static_cast<const int8_t*>(q), block_bytes};
    if (isa_base(isa) >= 1 && x.b != nullptr && M >= 2) {  // several rows of bf16 x: each weight widened once
      int8_span512_bf16(rows, s, x.b, x.ld, y, ldy, n0, n1, N, M, steps);
    } else if (isa_base(isa) >= 1) {  // AVX512 tiles (an expert's few decode rows: AMX's strips would not pay)
      int8_span512(rows, s, x.f, x.ld, y, ldy, n0, n1, N, M, steps);
    } else {
      int8_span(rows, s, x.f, x.ld, y, ldy, n0, n1, N, M, steps);
    }
  } else {
    const int64_t groups = K / group, group_steps = int4_group_steps(groups, group, steps);
    const Int4Rows rows{static_cast<const uint8_t*>(q), block_bytes};
    if (x.fixed != nullptr) {
      int4_span_vnni(rows, s, groups, *x.fixed, x.first, y, ldy, n0, n1, N, M, group_steps);
    } else if (isa_base(isa) >= 1) {
      int4_span512(rows, s, groups, x.b, x.ld, y, ldy, n0, n1, N, M, steps, group_steps);
    } else {
      int4_span(rows, s, groups, x.f, x.ld, x.sums, y, ldy, n0, n1, N, M, steps, group_steps);
    }
  }
}

// `Rows` over r0.. of float32 rows `f` (and their bf16 copy `b` / group sums `sums` where defined; fixed point where
// given, row r0 being its row `first`).
Rows rows_from(const at::Tensor& f, const at::Tensor& b, const at::Tensor& sums, const FixedRows* fixed, int64_t r0,
               int64_t first) {
  const int64_t ld = f.defined() ? f.size(1) : b.size(1);
  return {f.defined() ? f.const_data_ptr<float>() + r0 * ld : nullptr,
          b.defined() ? reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>()) + r0 * ld : nullptr,
          sums.defined() ? sums.const_data_ptr<float>() + r0 * sums.size(1) : nullptr, ld, fixed, first};
}

// bf16 rows b (ldx each) as fixed point where the VNNI tiles run a weight of K in groups of `group` (else null).
std::optional<FixedRows> fixed_if(bool vnni, const at::Tensor& b, int64_t K, int64_t group) {
  if (!vnni) return std::nullopt;
  const int64_t steps = (K + 15) / 16, group_steps = int4_group_steps(K / group, group, steps);
  if (!vnni_fits(group_steps)) return std::nullopt;
  return fixed_rows(reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>()), b.size(1), b.size(0), steps,
                    vnni_block_steps(group_steps));
}

// The gated activations hb (R rows, bf16) as fixed point for int4's VNNI tiles, per run of rows of one width (the
// routed experts' rows, then the wider shared experts'), each over its own width: the tiles run every block of the
// fixed rows they are given, so rows converted over the widest width made a narrower expert's down product read its
// weight and scales past its K (zeros times whatever lay there: NaN where that was past the last row's scales).
struct FixedRuns {
  std::vector<std::optional<FixedRows>> runs;
  std::vector<int64_t> run_of, start;  // each row's run; each run's first row

  FixedRuns(bool vnni, const at::Tensor& hb, const std::vector<int64_t>& width, int64_t group) {
    if (!vnni) return;
    const int64_t R = static_cast<int64_t>(width.size());
    run_of.resize(R);
    for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
      for (r1 = r0 + 1; r1 < R && width[r1] == width[r0];) ++r1;
      start.push_back(r0);
      runs.push_back(fixed_if(true, hb.narrow(0, r0, r1 - r0), width[r0], group));
      std::fill(run_of.begin() + r0, run_of.begin() + r1, static_cast<int64_t>(runs.size()) - 1);
    }
  }
  // The fixed rows holding row r (null where the VNNI tiles do not run) and r's row in them.
  std::pair<const FixedRows*, int64_t> of(int64_t r) const {
    if (runs.empty()) return {nullptr, r};
    const int64_t run = run_of[r];
    return {runs[run] ? &*runs[run] : nullptr, r - start[run]};
  }
};

// The routing-weighted sum over each token's slots, in slot order, in float32: y[n] = sum over k of
// w[n * K + k] * rows[row_of[n * K + k]] (rows of E values, float32 or bf16), an (N, E) tensor of `options`
// (rounded once, to nearest even as .to(bfloat16) rounds).
template <typename T>
at::Tensor weighted_sum(const std::vector<const T*>& rows, const std::vector<int64_t>& row_of, const float* wp,
                        int64_t N, int64_t K, int64_t E, const at::TensorOptions& options) {
  at::Tensor y = at::empty({N, E}, options);
  const at::ScalarType dtype = y.scalar_type();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> sum(E);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float w = wp[n * K + k];
        const T* o = rows[row_of[n * K + k]];
        for (int64_t c = 0; c < E; ++c) sum[c] += w * static_cast<float>(o[c]);
      }
      if (dtype == at::kBFloat16) {
        at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>() + n * E;
        for (int64_t c = 0; c < E; ++c) yp[c] = at::BFloat16(sum[c]);
      } else {
        std::copy(sum.begin(), sum.end(), y.mutable_data_ptr<float>() + n * E);
      }
    }
  });
  return y;
}

// The combine of feedforward.dispatch's per-expert outputs: outs[e] (its rows, in the order `order` sorted the slots:
// sorted row r is slot order[r], the rows of outs[0], then outs[1], ...) summed per token with weights (N, K) as
// `weighted_sum` sums them, returned in the outputs' dtype. One pass over the outputs, where un-sorting them, widening
// them to float32 and a batched product wrote ~3x their size into fresh memory (Small int8's 1,500-token prefill:
// ~0.7 s of 9.3, most of it faulting those pages in).
at::Tensor combine_slots(at::TensorList outs, const at::Tensor& order_in, const at::Tensor& weights_in) {
  TORCH_CHECK(weights_in.dim() == 2 && weights_in.scalar_type() == at::kFloat && weights_in.device().is_cpu(),
              "combine_slots: weights must be (N, K) float32 on the CPU");
  const at::Tensor routing = weights_in.contiguous(), order = order_in.contiguous();
  const int64_t R = routing.numel();
  TORCH_CHECK(order.dim() == 1 && order.numel() == R && order.scalar_type() == at::kLong,
              "combine_slots: order must be (N * K,) int64");
  TORCH_CHECK(!outs.empty(), "combine_slots: no outputs");
  const at::ScalarType dtype = outs[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "combine_slots: outputs must be float32 or bf16");
  const int64_t E = outs[0].dim() == 2 ? outs[0].size(1) : -1;
  for (const at::Tensor& o : outs)
    TORCH_CHECK(o.dim() == 2 && o.size(1) == E && o.scalar_type() == dtype && o.device().is_cpu() && o.stride(1) == 1,
                "combine_slots: outputs must be (rows, E) CPU tensors of one dtype with contiguous rows");
  std::vector<int64_t> row_of(R, -1);
  const int64_t* orp = order.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(orp[r] >= 0 && orp[r] < R && row_of[orp[r]] < 0, "combine_slots: order is not a permutation");
    row_of[orp[r]] = r;
  }
  const auto sum_rows = [&](auto* tag) {  // every output's rows, in order, as T pointers
    using T = std::remove_pointer_t<decltype(tag)>;
    std::vector<const T*> rows;
    rows.reserve(R);
    for (const at::Tensor& o : outs)
      for (int64_t r = 0; r < o.size(0) && static_cast<int64_t>(rows.size()) < R; ++r)
        rows.push_back(o.const_data_ptr<T>() + r * o.stride(0));
    const int64_t given = std::accumulate(outs.begin(), outs.end(), int64_t{0},
                                          [](int64_t n, const at::Tensor& o) { return n + o.size(0); });
    TORCH_CHECK(given == R, "combine_slots: ", given, " rows for ", R, " slots");
    return weighted_sum(rows, row_of, routing.const_data_ptr<float>(), routing.size(0), routing.size(1), E,
                        routing.options().dtype(dtype));
  };
  return dtype == at::kFloat ? sum_rows(static_cast<float*>(nullptr)) : sum_rows(static_cast<at::BFloat16*>(nullptr));
}

at::Tensor moe_held(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in, int64_t handle,
                    int64_t bits_in, int64_t group_in, int64_t group_mid, int64_t isa) {
  const int bits = static_cast<int>(bits_in);
  check_isa("quant moe", isa, x_in);
  TORCH_CHECK(bits == 8 || bits == 4, "quant moe: bits must be 8 or 4");
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu() &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "quant moe: x must be a (N, E) float32 or bf16 CPU tensor");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0) && ids_in.scalar_type() == at::kLong,
              "quant moe: ids must be (N, K) int64");
  TORCH_CHECK(weights_in.sizes() == ids_in.sizes() && weights_in.scalar_type() == at::kFloat,
              "quant moe: weights must be (N, K) float32");
  const c10::intrusive_ptr<Experts> held = held_experts(handle);
  const int64_t N = x_in.size(0), E = x_in.size(1), K = ids_in.size(1);
  const std::vector<ExpertRows>& table = held->rows_for(bits, group_in, group_mid, E);
  const int64_t X = static_cast<int64_t>(table.size()), shared = held->shared, routed = X - shared, KS = K + shared;
  const at::Tensor ids = ids_in.contiguous(), routing = weights_in.contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const float* wp = routing.const_data_ptr<float>();
  // Token n's slots: its K routed experts, then the shared ones (the last `shared` held), weight 1 each.
  std::vector<int64_t> expert_of(N * KS);
  std::vector<float> weight_of(N * KS, 1.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < KS; ++k) {
      if (k >= K) {
        expert_of[n * KS + k] = routed + k - K;
        continue;
      }
      const int64_t e = idp[n * K + k];
      TORCH_CHECK(e >= 0 && e < routed, "quant moe: expert id ", e, " out of range (", routed, " routed experts)");
      expert_of[n * KS + k] = e, weight_of[n * KS + k] = wp[n * K + k];
    }

  // Slots grouped by expert (stable): gathered row r belongs to slot slot_of[r]; slot i's row is row_of[i].
  const int64_t R = N * KS;
  std::vector<int64_t> count(X, 0), start(X + 1, 0), slot_of(R), row_of(R), active;
  for (int64_t i = 0; i < R; ++i) ++count[expert_of[i]];
  for (int64_t e = 0; e < X; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < R; ++i) slot_of[row_of[i] = fill[expert_of[i]]++] = i;
  // Each expert's own width I (a shared expert is wider); the gate / up outputs are rows of the widest's.
  int64_t I = 0;
  for (int64_t e = 0; e < X; ++e)
    if (count[e]) active.push_back(e), I = std::max(I, table[e].width);

  // Gathered rows of x (padded to whole 16-k steps with zeros), the gate and up outputs, the gated activations.
  const int64_t ldx = round_up(E, 16), ldh = round_up(I, 16);
  const bool bf16_rows_used = bits == 4 && isa_base(isa) >= 1, sums_used = bits == 4 && isa == 0;
  const bool vnni = bf16_rows_used && (isa & kIsaVnni);
  // bf16 rows of x (exact: x_in is bf16 on AVX512) for int4's tiles and int8's several-row ones; the gated
  // activations (float32) go to int8's down products as they are. (At batch 1 every expert has one row: none made.)
  const bool int8_bf16 = bits == 8 && isa_base(isa) >= 1 &&
                         std::any_of(count.begin(), count.end(), [](int64_t c) { return c >= 2; });
  const at::TensorOptions floats = x_in.options().dtype(at::kFloat);
  // Float32 rows wherever a product reads them (all but int4 on AVX512, which reads the bf16 ones only).
  const bool float_rows_used = !bf16_rows_used;
  const at::Tensor xg = float_rows_used ? at::empty({R, ldx}, floats) : at::Tensor();
  const at::Tensor xb = bf16_rows_used || int8_bf16 ? at::empty({R, ldx}, floats.dtype(at::kBFloat16)) : at::Tensor();
  std::vector<int64_t> token_of(R), width(R);
  for (int64_t r = 0; r < R; ++r) token_of[r] = slot_of[r] / KS, width[r] = table[expert_of[slot_of[r]]].width;
  gather_rows(x_in.contiguous(), token_of, ldx, xg, xb);
  const std::optional<FixedRows> xfixed = fixed_if(vnni, xb, E, group_in);
  const at::Tensor xsum = sums_used ? group_sums(xg, E / group_in) : at::Tensor();
  at::Tensor gu = at::empty({2, R, I}, floats), out = at::empty({R, E}, floats);
  float* gup = gu.mutable_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const auto row_bytes = [&](int64_t k) { return bits == 8 ? round_up(k, 16) : round_up(k, 16) / 2; };
  const auto width_of = [&](int64_t e) { return table[e].width; };

  const auto run = [&](const auto* any_s) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(any_s)>>;
    std::vector<Unit> units;
    plan(units, active, width_of, [&](int64_t) { return row_bytes(E); }, {0, 1});
    run_units(static_cast<int64_t>(units.size()), [&](int64_t i) {
      const Unit& u = units[i];
      const ExpertRows& w = table[u.expert];
      const int64_t r0 = start[u.expert];
      product(bits, isa, w.q[u.which], w.block_bytes[u.which], static_cast<const S*>(w.s[u.which]), group_in,
              rows_from(xg, xb, xsum, xfixed ? &*xfixed : nullptr, r0, r0), gup + (u.which * R + r0) * I, I, u.n0, u.n1,
              w.width, count[u.expert], E);
    });
    // The gated activations: float32, rounded to bf16 where the AVX512 int4 product reads them (as a bf16 model
    // rounds every product's output).
    const at::Tensor h = float_rows_used ? at::empty({R, ldh}, floats) : at::Tensor();
    const at::Tensor hb = bf16_rows_used ? at::empty({R, ldh}, floats.dtype(at::kBFloat16)) : at::Tensor();
    gated(gu, width, h, hb);
    const at::Tensor hsum = sums_used ? group_sums(h, I / group_mid) : at::Tensor();
    const FixedRuns hfixed(vnni, hb, width, group_mid);
    units.clear();
    plan(units, active, [&](int64_t) { return E; }, [&](int64_t e) { return row_bytes(width_of(e)); }, {2});
    run_units(static_cast<int64_t>(units.size()), [&](int64_t i) {
      const Unit& u = units[i];
      const ExpertRows& w = table[u.expert];
      const int64_t r0 = start[u.expert];
      const auto [fixed, first] = hfixed.of(r0);
      product(bits, isa, w.q[2], w.block_bytes[2], static_cast<const S*>(w.s[2]), group_mid,
              rows_from(h, hb, hsum, fixed, r0, first), op + r0 * E, E, u.n0, u.n1, E, count[u.expert], w.width);
    });
  };
  if (held->scale_type == at::kFloat) {
    run(static_cast<const float*>(nullptr));
  } else {
    run(static_cast<const c10::BFloat16*>(nullptr));
  }

  std::vector<const float*> rows(R);
  for (int64_t r = 0; r < R; ++r) rows[r] = op + r * E;
  return weighted_sum(rows, row_of, weight_of.data(), N, KS, E, x_in.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsvl2_quant, m) {
  m.class_<Experts>("Experts")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t>())
      .def("lists", [](const c10::intrusive_ptr<Experts>& e) {  // what it holds, in the constructor's order
        return std::vector<std::vector<at::Tensor>>{e->gate_q, e->gate_s, e->up_q, e->up_s, e->down_q, e->down_s};
      })
      .def("handle", handle_of);
  m.def("moe_held(Tensor x, Tensor ids, Tensor weights, int experts, int bits, int group_in, int group_mid, "
        "int isa) -> Tensor", moe_held);
  m.def("combine_slots(Tensor[] outs, Tensor order, Tensor weights) -> Tensor", combine_slots);
}
