// Weight-only int8 / int4 products on AVX2 + FMA CPUs, registered as torch.ops.dsvl2_quant.*; model/quant_kernels.py
// builds them and model/quant_choice.py decides when to call them.
//   int8_linear  y (M, N) = x (M, K) @ (q (N, K) int8 * s (N,))^T                 (per output channel, "r4")
//   int4_linear  y (M, N) = x (M, K) @ (q4 (N, K) * s (N, K/G) per group of G)^T  (the "k16r4" layout below)
// x is float32 or bf16 (converted to float32 once; y comes back in x's dtype), s float32 or bf16, sums float32. With
// `float_out`, y comes back as float32 holding the values rounded to x's dtype: what `.float()` of the result gives,
// without its two passes over y and their allocations (the lm_head's logits: 4 MB at 8 rows of Tiny's vocabulary).
//
// Decode is bound by reading the weight, so each weight byte comes from memory once for all M rows, and in address
// order: the layouts interleave blocks of 4 weight rows 16 k at a time, so the 4-row tiles of a decode step stream
// one run of memory (four rows read apart are four streams, which ran at half the read bandwidth on a Zen 3).
// Threads take chunks of rows (~64 KB of weight) from a shared counter (a thread that starts late, another process
// on its core, does not hold up the product). One row of x (decode at batch 1): each block of 4 weight rows is
// dequantised in registers (int -> float32) and multiplied as it streams in, prefetched 1 KB ahead. Several rows:
// int8 in tiles of 3 rows of x x the block's 4 weight rows (each weight vector widened once for 3 rows, 12 sums in
// registers); int4 dequantises the block once into float32 (L1) and multiplies every row against it. Rows past the
// first tile re-read the chunk from L1/L2, not from memory. The building blocks are in quant_avx2.h.
//
// Layouts, rows in blocks of 4 (the last block padded with zero weights), K in steps of 16 (padded likewise):
//   int8 "r4"     (ceil(N/4), ceil(K/16) * 64) int8: per block, per step, 16 bytes of row 0, then rows 1, 2, 3.
//   int4 "k16r4"  (ceil(N/4), ceil(K/16) * 32) uint8: per block, per step, 8 bytes of row 0, then rows 1, 2, 3;
//                 byte j of a row's 8 holds k = 16t + j in its low nibble and k = 16t + 8 + j in its high nibble,
//                 each as q + 8 (8 is a zero weight). Eight bytes zero-extended to 32-bit lanes then give 8
//                 consecutive k by one AND and 8 more by one shift.
// A group of G values (quant.py: G in {16, 32, 64, 128} divides K, or one group of all K) is G/16 whole steps, or
// the whole row. Shape legend: M rows, N output features, K input features, G group size.

#include <torch/library.h>

#include "quant_amx.h"
#include "quant_gemm.h"
#include "quant_vnni.h"

namespace {

using namespace dsvl2_quant_detail;

// v[0 .. n) rounded to bf16 as .to(bfloat16) rounds, kept in float32 (the compiler vectorises c10's conversion).
void round_to_bf16(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(c10::BFloat16(v[i]));
}

// The op's result from its float32 sums y: in `dtype`, or with `float_out` float32 holding the values rounded to it.
at::Tensor finish(at::Tensor y, at::ScalarType dtype, bool float_out) {
  if (dtype == at::kFloat) return y;
  if (!float_out) return y.to(dtype);
  float* p = y.mutable_data_ptr<float>();
  at::parallel_for(0, y.numel(), int64_t{1} << 15, [&](int64_t a, int64_t b) { round_to_bf16(p + a, b - a); });
  return y;
}

// y (M, N) of spans run in parallel over the weight's rows (`run_rows`), span(y, n0, n1) writing the float32 sums
// y[m, n0 .. n1) for every m (rows up to N only): as `finish` returns it, each span's sums converted where it just
// wrote them, so that no serial pass over y (a copy to bf16: an ATen op with its own allocation and parallel region,
// ~2 us a call of a decode step's 28 small products) follows the products.
template <typename Span>
at::Tensor run_finished(int64_t M, int64_t N, int64_t row_bytes, const at::TensorOptions& options, bool float_out,
                        const Span& span) {
  const at::ScalarType dtype = options.dtype().toScalarType();
  at::Tensor y = at::empty({M, N}, options.dtype(at::kFloat));
  const bool to_bf16 = dtype == at::kBFloat16 && !float_out, rounded = dtype == at::kBFloat16 && float_out;
  at::Tensor out = to_bf16 ? at::empty({M, N}, options) : y;
  float* yp = y.mutable_data_ptr<float>();
  at::BFloat16* op = to_bf16 ? out.mutable_data_ptr<at::BFloat16>() : nullptr;
  if (M == 0 || N == 0) return out;
  run_rows(N, row_bytes, [&](int64_t n0, int64_t n1) {
    span(yp, n0, n1);
    const int64_t end = std::min(n1, N);
    for (int64_t m = 0; m < M; ++m) {
      float* row = yp + m * N;
      if (to_bf16) {
        for (int64_t n = n0; n < end; ++n) op[m * N + n] = at::BFloat16(row[n]);
      } else if (rounded) {
        round_to_bf16(row + n0, end - n0);
      }
    }
  });
  return out;
}

// x's rows as the tiles read them (bf16 or float32, whole 16-k steps of ldx values with zeros past K) and their row
// stride: x itself where it already is that (a decode step's bf16 activations with K a multiple of 16: no copy),
// else a padded copy.
std::pair<at::Tensor, int64_t> rows_as(const at::Tensor& x, int64_t ldx, at::ScalarType dtype) {
  if (x.scalar_type() == dtype && x.size(1) == ldx && x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= ldx))
    return {x, x.size(0) <= 1 ? ldx : x.stride(0)};
  return {padded_rows(x, ldx, dtype), ldx};
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s, int64_t isa,
                       bool float_out) {
  TORCH_CHECK(x_in.dim() == 2 && q.dim() == 2 && s.dim() == 1, "int8_linear: x (M, K), q (N4, K16 * 4), s (N,)");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_linear: q must be contiguous int8");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "int8_linear: x must be float32 or bfloat16");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16,
              "int8_linear: s must be float32 or bfloat16");
  TORCH_CHECK(x_in.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(), "int8_linear: CPU tensors");
  check_isa("int8_linear", isa, x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = s.size(0), steps = (K + 15) / 16;
  TORCH_CHECK(q.size(0) == (N + 3) / 4 && q.size(1) == steps * 64, "int8_linear: q is ", q.sizes(), " for N=", N,
              ", K=", K, " (needs (", (N + 3) / 4, ", ", steps * 64, "))");
  const at::Tensor sc = s.contiguous();
  if (isa_base(isa) == 2 && N > 0 && amx_takes(M, K, 1, 0)) {
    const at::Tensor xk = amx_pairs(x_in);
    at::Tensor y = at::empty({M, N}, x_in.options().dtype(at::kFloat));
    const Int8Rows rows{q.const_data_ptr<int8_t>(), q.size(1)};
    float* yp = y.mutable_data_ptr<float>();
    with_scales(sc, [&](const auto* sp) {
      run_strips(N, K, [&](int64_t n0, int64_t n1) {
        amx_span(n0, n1, N, K, xk, M, yp, N, Int8Tiles(rows, sp, q.size(0)));
      });
    });
    return finish(y, x_in.scalar_type(), float_out);
  }
  if (isa_base(isa) >= 1 && N > 0 && x_in.scalar_type() == at::kBFloat16 && gemm_takes(M, K, 1, 0)) {
    at::Tensor y;
    with_scales(sc, [&](const auto* sp) {
      y = gemm_linear(x_in, N, sp, 1, float_out, Int8Tiles(Int8Rows{q.const_data_ptr<int8_t>(), q.size(1)}, sp, q.size(0)));
    });
    return float_out ? finish(y, at::kBFloat16, true) : y;
  }
  const int64_t ldx = steps * 16;
  // Several rows on AVX512 go as bf16 (x_in is bf16 there: exact) to the tiles that widen each weight once.
  const bool bf16_rows = isa_base(isa) >= 1 && M >= 2;
  const std::pair<at::Tensor, int64_t> xr = rows_as(x_in, ldx, bf16_rows ? at::kBFloat16 : at::kFloat);
  const at::Tensor& x = xr.first;
  const int64_t ld = xr.second;
  const Int8Rows rows{q.const_data_ptr<int8_t>(), q.size(1)};
  at::Tensor y;
  with_scales(sc, [&](const auto* sp) {
    y = run_finished(M, N, ldx, x_in.options(), float_out, [&](float* yp, int64_t n0, int64_t n1) {
      if (bf16_rows) {
        const auto* xb = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
        int8_span512_bf16(rows, sp, xb, ld, yp, N, n0, n1, N, M, steps);
      } else if (isa_base(isa) >= 1) {
        int8_span512(rows, sp, x.const_data_ptr<float>(), ld, yp, N, n0, n1, N, M, steps);
      } else {
        int8_span(rows, sp, x.const_data_ptr<float>(), ld, yp, N, n0, n1, N, M, steps);
      }
    });
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s, int64_t group,
                       int64_t isa, bool float_out) {
  TORCH_CHECK(x_in.dim() == 2 && q.dim() == 2 && s.dim() == 2, "int4_linear: x (M, K), q (N4, K16 * 32), s (N, K/G)");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous(), "int4_linear: q must be contiguous uint8");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "int4_linear: x must be float32 or bfloat16");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16,
              "int4_linear: s must be float32 or bfloat16");
  TORCH_CHECK(x_in.device().is_cpu() && q.device().is_cpu() && s.device().is_cpu(), "int4_linear: CPU tensors");
  check_isa("int4_linear", isa, x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = s.size(0);
  const int64_t steps = (K + 15) / 16, groups = s.size(1);
  TORCH_CHECK(q.size(0) == (N + 3) / 4 && q.size(1) == steps * 32, "int4_linear: q is ", q.sizes(), " for N=", N,
              ", K=", K, " (needs (", (N + 3) / 4, ", ", steps * 32, "))");
  TORCH_CHECK(group > 0 && groups * group == K, "int4_linear: s is ", s.sizes(), " for K=", K, ", G=", group);
  TORCH_CHECK(groups == 1 || group % 16 == 0, "int4_linear: G=", group, " must be a multiple of 16 or K");
  const int64_t group_steps = int4_group_steps(groups, group, steps);
  const at::Tensor sc = s.contiguous();
  if (isa_base(isa) == 2 && N > 0 && amx_takes(M, K, groups, group)) {
    const at::Tensor xk = amx_pairs(x_in);
    at::Tensor y = at::empty({M, N}, x_in.options().dtype(at::kFloat));
    const Int4Rows rows{q.const_data_ptr<uint8_t>(), q.size(1)};
    float* yp = y.mutable_data_ptr<float>();
    with_scales(sc, [&](const auto* sp) {
      run_strips(N, K / 2, [&](int64_t n0, int64_t n1) {
        amx_span(n0, n1, N, K, xk, M, yp, N, Int4Tiles(rows, sp, groups, K, N, q.size(0)));
      });
    });
    return finish(y, x_in.scalar_type(), float_out);
  }
  if (isa_base(isa) >= 1 && N > 0 && x_in.scalar_type() == at::kBFloat16 && gemm_takes(M, K, groups, group)) {
    at::Tensor y;
    const Int4Rows rows{q.const_data_ptr<uint8_t>(), q.size(1)};
    with_scales(sc, [&](const auto* sp) {
      y = gemm_linear(x_in, N, sp, groups, float_out, Int4Tiles(rows, sp, groups, K, N, q.size(0), false));
    });
    return float_out ? finish(y, at::kBFloat16, true) : y;
  }
  const int64_t ldx = steps * 16;
  const Int4Rows rows{q.const_data_ptr<uint8_t>(), q.size(1)};
  at::Tensor y;
  if (K == 0) return at::zeros({M, N}, x_in.options().dtype(float_out ? at::kFloat : x_in.scalar_type()));
  if (isa_base(isa) >= 1) {  // bf16 rows, no per-group sums (the table holds q itself)
    const std::pair<at::Tensor, int64_t> xr = rows_as(x_in, ldx, at::kBFloat16);
    const at::Tensor& xb = xr.first;
    const int64_t ld = xr.second;
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
    const bool vnni = (isa & kIsaVnni) && vnni_fits(group_steps) && M > 0;
    const FixedRows fixed = vnni ? fixed_rows(xp, ld, M, steps, vnni_block_steps(group_steps)) : FixedRows{};
    with_scales(sc, [&](const auto* sp) {
      y = run_finished(M, N, steps * 8, x_in.options(), float_out, [&](float* yp, int64_t n0, int64_t n1) {
        if (vnni) {
          int4_span_vnni(rows, sp, groups, fixed, 0, yp, N, n0, n1, N, M, group_steps);
        } else {
          int4_span512(rows, sp, groups, xp, ld, yp, N, n0, n1, N, M, steps, group_steps);
        }
      });
    });
    return y;
  }
  const at::Tensor x = padded_rows(x_in, ldx);
  const at::Tensor xsum = x.view({M, groups, ldx / groups}).sum(2);  // (M, groups), padding included (zeros)
  const float* sump = xsum.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  with_scales(sc, [&](const auto* sp) {
    y = run_finished(M, N, steps * 8, x_in.options(), float_out, [&](float* yp, int64_t n0, int64_t n1) {
      int4_span(rows, sp, groups, xp, ldx, sump, yp, N, n0, n1, N, M, steps, group_steps);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(dsvl2_quant, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor s, int isa, bool float_out=False) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor s, int group, int isa, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsvl2_quant, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
