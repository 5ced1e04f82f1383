// Attention of many queries in bf16 on AVX512-BF16 CPUs, registered as torch.ops.dsvl2_kernels.attention_bf16
// (declared with the other ops in decode_bf16.cpp): the SigLIP tower's tiles (no mask) and prefill chunks (causal
// over the KV cache). model/kernels.py builds it and decides when to call it.

#include "amx_tiles.h"
#include "bf16_common.h"

namespace {

using namespace dsvl2_kernels_detail;

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
// the output (4 queries x 5 columns at a time). With `amx` on a CPU with AMX-BF16 both products run on its tiles
// (the same packed layouts are their b operands; D padded with zero pairs to a multiple of 32, keys to one of 32).
at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& positions, double scale, bool amx) {
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
  const bool tiles = amx && amx_ready();
  const int64_t Dp = tiles ? (D + 31) / 32 * 16 : (D + 1) / 2;  // pairs along D (whole tile steps on AMX)
  const int64_t Lkp = tiles ? (Lk + 31) / 32 * 32 : (Lk + 15) / 16 * 16;  // keys in whole columns (AMX: pairs of them)
  const int64_t Vc = (Dv + 15) / 16;         // 16-lane columns of the output
  const int64_t kpack = Dp * Lkp * 2, vpack = Lkp / 2 * Vc * 32;

  at::Tensor packed = at::empty({B * Hk * (kpack + vpack)}, q.options());
  bf16* const pk = packed.mutable_data_ptr<bf16>();
  run_units(B * Hk, [&](int64_t bh) {
    const int64_t b = bh / Hk, h = bh % Hk;
    bf16* const keys = pk + bh * (kpack + vpack);
    pack_pairs(k.const_data_ptr<bf16>() + b * k.stride(0) + h * k.stride(1), k.stride(2), Lk, D, Lkp, keys);
    const int64_t written = (D + 1) / 2 * Lkp * 2;  // pack_pairs fills the pairs of D; AMX's padding pairs are zero
    std::fill(keys + written, keys + kpack, bf16(0.0f));
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
    const int64_t ext = tiles ? (extent + 31) / 32 * 32 : (extent + 15) / 16 * 16;  // keys computed for the block
    const bf16* kp = pk + (b * Hk + h / G) * (kpack + vpack);
    const bf16* vp = kp + kpack;
    // Per-thread scratch, reused unit after unit: filling fresh buffers (bf16 elements one by one) cost as much as
    // the block's score products. Every element read below is written first.
    thread_local std::vector<bf16> qs, probs;
    thread_local std::vector<float> scores;
    qs.resize(kQB * Dp * 2), probs.resize(kQB * ext), scores.resize(kQB * ext);
    const bf16* qb = q.const_data_ptr<bf16>() + b * q.stride(0) + h * q.stride(1);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(qb + (i0 + r) * q.stride(2), D, qs.data() + r * Dp * 2);
      std::fill(qs.data() + r * Dp * 2 + D, qs.data() + (r + 1) * Dp * 2, zero);  // odd D, AMX's padding
    }
    if (tiles) amx_begin();
    alignas(64) float sums[4 * 256];
    const auto nothing = [](int64_t) {};
    const int mb = rows > 16 ? 2 : 1;  // AMX's blocks of 16 queries (rows past `rows` are computed, not stored)
    for (int64_t j = 0; tiles && j < ext; j += 32) {
      const bf16* const a[2] = {qs.data(), qs.data() + 16 * Dp * 2};
      const bf16* const bk[2] = {kp + j * 2, kp + (j + 16) * 2};
      amx_block_any(mb, 2, a, Dp * 2, bk, Lkp * 2, Dp / 16, sums, nothing);
      for (int i = 0; i < mb; ++i)
        for (int64_t x = 0; x < std::min<int64_t>(16, rows - 16 * i); ++x)
          for (int c = 0; c < 2; ++c)
            _mm512_storeu_ps(scores.data() + (16 * i + x) * ext + j + 16 * c,
                             _mm512_mul_ps(_mm512_load_ps(sums + (2 * i + c) * 256 + 16 * x), _mm512_set1_ps(fscale)));
    }
    __m512 acc[kMR * kNR];
    for (int64_t j = 0; !tiles && j < ext; j += 48) {  // a slab of 48 keys stays in L1 while every query block uses it
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
    for (int64_t c0 = 0; tiles && c0 < Vc; c0 += 2) {
      const int nb = static_cast<int>(std::min<int64_t>(2, Vc - c0));
      const bf16* const a[2] = {probs.data(), probs.data() + 16 * ext};
      const bf16* const bv[2] = {vp + 32 * c0, vp + 32 * (c0 + nb - 1)};
      amx_block_any(mb, nb, a, ext, bv, Vc * 32, ext / 32, sums, nothing);
      for (int i = 0; i < mb; ++i)
        for (int64_t x = 0; x < std::min<int64_t>(16, rows - 16 * i); ++x) {
          bf16* o = ob + ((b * Lq + i0 + 16 * i + x) * H + h) * Dv;
          for (int c = 0; c < nb; ++c)
            store_bf16(o + 16 * (c0 + c), _mm512_load_ps(sums + (i * nb + c) * 256 + 16 * x),
                       tail_mask(Dv - 16 * (c0 + c)));
        }
    }
    if (tiles) {
      amx_end();
      return;
    }
    for (int64_t r = 0; r < rows; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r));
      for (int64_t c0 = 0; c0 < Vc; c0 += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, Vc - c0));
        pair_tile_any(mr, nr, probs.data() + r * ext, ext, vp + 32 * c0, Vc * 32, ext / 2, acc);
        for (int x = 0; x < mr; ++x) {
          bf16* o = ob + ((b * Lq + i0 + r + x) * H + h) * Dv;
          for (int c = 0; c < nr; ++c) store_bf16(o + 16 * (c0 + c), acc[x * nr + c], tail_mask(Dv - 16 * (c0 + c)));
        }
      }
    }
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(dsvl2_kernels, CPU, m) {
  m.impl("attention_bf16", &attention_bf16);
}
