// AMX variants of the int8 / int4 products for several rows of bf16 x (decode batches, prefill), on Xeons with
// AMX-BF16 (the ops' `isa` 2). The AVX512 tiles (quant_avx512.h) spend one FMA or bf16 dot product per 16 or 32
// weights per row of x, which bounds a decode batch on the arithmetic, not on reading the weight (8 rows: ~1.2x
// the bf16 model's step on a Xeon, against 2x one row); AMX's TDPBF16PS takes 16 weight rows x 32 k x 16 rows of
// x in one instruction. So from kAmxMinRows rows, weight rows go 16 at a time (a strip): their q are written as bf16
// into an L1 buffer, 16 x 32 per tile step, and multiplied there by x, packed once per call into pairs along K
// (AMX's VNNI layout for the b operand, 16 rows of x per tile). Fewer rows keep the AVX512 tiles (one row streams
// the weight at memory speed; the tiles' loads and products would only add to it).
//   int8  q is exact in bf16 (|q| <= 128 has 8 significant bits); the sums are scaled per output channel after
//         the product, as the AVX512 tile does. Up to 32 rows each step is dequantised just before its product;
//         more (prefill) dequantise the strip a chunk of K at a time, once for every 32 rows of x (`amx_span`).
//   int4  q * s by a lookup in a 16-entry table per weight row and group of bf16((q - 8) * s), the weight
//         dequantize(q, s, bf16) gives, so the tiles sum the whole K with nothing to scale per group (scaling each
//         group's 128 k apart stored and reloaded the tiles every 4 products, whose chains never filled: the
//         tiles' form 1.5x faster at 8 rows). Equal to F.linear on the bf16-dequantised weight up to the order of
//         the float32 sums; against the float32 one (the AVX512 tiles' exact q, scaled in float32) the weights
//         differ by bf16's rounding, as an unquantised bf16 model's do.
// Products are exact (bf16 x bf16 into float32), so results equal those products' sums up to their order. Taken where K and int4's groups are multiples of 32 (whole tile steps) and Linux grants the tiles
// (`amx_takes`); otherwise isa 2 runs the AVX512 tiles.
#pragma once

#include "amx_tiles.h"
#include "quant_avx512.h"
#include "transpose.h"

#include <c10/util/BFloat16.h>

#include <vector>

namespace dsvl2_quant_detail {

using dsvl2_kernels_detail::amx_ready;

constexpr int64_t kAmxMinRows = 6;  // rows of x from which isa 2 multiplies on the tiles (fewer: AVX512 tiles; 4 ran even)
constexpr int64_t kStripRows = 16;  // weight rows per strip: one tile's rows

// Whether the AMX path takes a product of M rows, K input features and int4 groups of `group` (0: int8): the
// tiles granted, and AVX512-VBMI for int4's byte permutation (every AMX CPU so far has it; checked all the same,
// for int8 too: the one span is compiled for both).
inline bool amx_takes(int64_t M, int64_t K, int64_t groups, int64_t group) {
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
  return M >= kAmxMinRows && K > 0 && K % 32 == 0 && (groups <= 1 || group % 32 == 0) && amx_ready() && vbmi;
}

// x (M, K) bf16 -> pairs along K for 16-lane blocks of rows: pair p of row m at (p * L + m) * 2, L = M rounded up
// to 16, zeros past M (one transpose of x's (M, K/2) 32-bit pairs).
inline at::Tensor amx_pairs(const at::Tensor& x) {
  const int64_t M = x.size(0), L = round_up(M, 16);
  const at::Tensor b = x.to(at::kBFloat16).contiguous().view(at::kInt);  // (M, K/2) pairs
  at::Tensor out = at::zeros({b.size(1), L}, b.options());
  out.narrow(1, 0, M).copy_(b.t());
  return out;
}

// The weight bytes of the strip after rows n .. n + 16 (whole blocks of 4, within the layout), prefetched into L2
// a slice at a time while this strip's tiles multiply, so that reading the weight overlaps the products instead of
// stalling the next strip's dequantising (prefetches issued only there, a cache line each, filled the core's line
// buffers and waited on memory while the tiles sat idle; the products waited likewise in turn).
class NextStrip {
 public:
  NextStrip(const uint8_t* base, int64_t block_bytes, int64_t blocks, int64_t n, int64_t slices)
      : slices_(std::max<int64_t>(slices, 1)) {
    const int64_t b0 = std::min(blocks, (n + kStripRows) / kRowsPerBlock);
    const int64_t b1 = std::min(blocks, b0 + kStripRows / kRowsPerBlock);
    p_ = base + b0 * block_bytes;
    bytes_ = (b1 - b0) * block_bytes;
  }
  void touch(int64_t i) const {  // slice i of `slices`
    const int64_t per = round_up((bytes_ + slices_ - 1) / slices_, 64);
    for (int64_t o = i * per; o < std::min(bytes_, (i + 1) * per); o += 64)
      dsvl2_prefetch::to_l2(p_ + o);
  }

 private:
  const uint8_t* p_;
  int64_t bytes_, slices_;
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// int8 ("r4", whole pairs of 16-k steps): `step(n, t, out, ld)` writes weight rows n .. n + 16, k 32t .. 32t + 32
// as 16 rows of bf16 q at out (row stride ld): each row's two steps widened to float32 and joined into one 64-byte
// store (exact: |q| <= 128 has 8 significant bits). Rows past the layout's padded rows (`blocks`: its count of
// blocks of 4) are zeros. The sums are scaled per output channel afterwards (`row_scale`), as the AVX512 tile does.
template <typename S>
class Int8Tiles {
 public:
  Int8Tiles(const Int8Rows& q, const S* s, int64_t blocks) : q_(q), s_(s), blocks_(blocks) {}
  float row_scale(int64_t n) const { return scale_at(s_, n); }
  const uint8_t* base() const { return reinterpret_cast<const uint8_t*>(q_.base); }
  int64_t block_bytes() const { return q_.block_bytes; }
  int64_t blocks() const { return blocks_; }
  void step(int64_t n, int64_t t, uint16_t* out, int64_t ld) const {
    for (int b = 0; b < 4; ++b) {
      uint16_t* o = out + 4 * b * ld;
      if (n / kRowsPerBlock + b >= blocks_) {
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(o + j * ld, _mm512_setzero_si512());
        continue;
      }
      const int8_t* r = q_.row(n + 4 * b) + 2 * t * Int8Rows::kStep;
      for (int j = 0; j < 4; ++j) {
        const __m512bh w = _mm512_cvtne2ps_pbh(widen(r + Int8Rows::kStep + j * 16), widen(r + j * 16));
        _mm512_storeu_si512(o + j * ld, (__m512i)w);
      }
    }
  }

 private:
  static __m512 widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  Int8Rows q_;
  const S* s_;
  int64_t blocks_;
};

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

// int4 ("k16r4"): step t (32 k, inside one group: G is a multiple of 32 or the whole row) of weight rows n .. n + 16
// as bf16 values of q * s, the weight `dequantize(q, s, bf16)` gives (each rounded to nearest even), so that the
// tiles sum the whole K at once with nothing to scale per group. Per block and pair of 16-k steps (64 bytes: per
// step the 4 rows' 8 bytes), each row's 32 k come from one byte permutation (its 16 bytes into the low bytes of 32
// words, in k order: each byte twice), a shift of the words that take the high nibble, a mask and a lookup in the
// row's table of the group's 16 values (i - 8) * s: five instructions per 32 weights. The 16 tables are made again
// when a step starts another strip or group (once per 16 x G weights), so an object serves one thread. Unscaled
// (`scaled` false: the AVX512 prefill products, quant_gemm.h), every table holds q itself, i - 8, exact in bf16, and
// the caller scales each group's sums.
template <typename S>
class Int4Tiles {
 public:
  Int4Tiles(const Int4Rows& q, const S* s, int64_t groups, int64_t K, int64_t N, int64_t blocks, bool scaled = true)
      : q_(q), s_(s), groups_(groups), group_tiles_(K / groups / 32), N_(N), blocks_(blocks), scaled_(scaled) {
    if (!scaled) {
      const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t i = 0; i < kStripRows; ++i) table_[i] = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
    }
    for (int j = 0; j < 4; ++j) {
      alignas(64) uint8_t idx[64];
      for (int w = 0; w < 32; ++w) {  // word w of row j: k = w; bytes of step 2u at 32u, row j's at 8j
        const int u = w / 16, byte = (w % 16) % 8;
        idx[2 * w] = static_cast<uint8_t>(32 * u + 8 * j + byte), idx[2 * w + 1] = 0;
      }
      index_[j] = _mm512_load_si512(idx);
    }
  }
  float row_scale(int64_t) const { return 1.0f; }  // in the weights already
  const uint8_t* base() const { return q_.base; }
  int64_t block_bytes() const { return q_.block_bytes; }
  int64_t blocks() const { return blocks_; }
  void step(int64_t n, int64_t t, uint16_t* out, int64_t ld) {
    if (scaled_ && (n != n_ || t / group_tiles_ != g_)) tables(n, t / group_tiles_);
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    constexpr __mmask64 kLowBytes = 0x5555555555555555ull;
    constexpr __mmask32 kHighNibble = 0xFF00FF00u;  // words 8-15 and 24-31: the high nibbles
    for (int b = 0; b < 4; ++b) {
      uint16_t* o = out + 4 * b * ld;
      if (n / kRowsPerBlock + b >= blocks_) {
        for (int j = 0; j < 4; ++j) _mm512_storeu_si512(o + j * ld, _mm512_setzero_si512());
        continue;
      }
      const __m512i v = _mm512_loadu_si512(q_.row(n + 4 * b) + 2 * t * Int4Rows::kStep);
      for (int j = 0; j < 4; ++j) {
        __m512i x = _mm512_maskz_permutexvar_epi8(kLowBytes, index_[j], v);
        x = _mm512_and_si512(_mm512_mask_srli_epi16(x, kHighNibble, x, 4), nibble);
        _mm512_storeu_si512(o + j * ld, _mm512_permutexvar_epi16(x, table_[4 * b + j]));
      }
    }
  }

 private:
  void tables(int64_t n, int64_t g) {
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t i = 0; i < kStripRows; ++i) {
      const __m512 w = _mm512_mul_ps(q, _mm512_set1_ps(group_scale(s_, groups_, n + i, g, N_)));
      table_[i] = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(w));
    }
    n_ = n, g_ = g;
  }
  Int4Rows q_;
  const S* s_;
  int64_t groups_, group_tiles_, N_, blocks_;
  bool scaled_;
  int64_t n_ = -1, g_ = -1;
  __m512i index_[4];
  __m512i table_[kStripRows];
};

// The float32 sums of 16 weight rows with nb (1 or 2) blocks of 16 rows of x over `steps` steps of 32 k, into
// sums[j * 256 + i * 16 + lane] (weight row i, row 16j + lane of x). Step t's weights are the 16 x 32 bf16 at `a(t)`
// (which may write them first; row stride sa bytes), its pairs of x at b + t * step_b (block j 32 values on, row
// stride sb bytes). Even and odd steps add into different tiles and load their weights into different tiles, so a
// product waits neither on the previous one's sum (TDPBF16PS's latency is several times its throughput) nor on a
// tile register it still reads.
template <typename A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,amx-tile,amx-bf16"))) inline void
tile_sums(int nb, int64_t steps, const A& a, int64_t sa, const uint16_t* b, int64_t step_b, int64_t sb, float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = 0; t < steps; t += 2) {
    const uint16_t* bt = b + t * step_b;
    const void* even = a(t);
    asm volatile("" ::: "memory");  // the tile loads' asm does not say it reads memory: a's stores land first
    _tile_loadd(4, even, sa);
    _tile_loadd(6, bt, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (nb == 2) {
      _tile_loadd(7, bt + 32, sb);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (t + 1 == steps) break;
    const void* odd = a(t + 1);
    asm volatile("" ::: "memory");
    _tile_loadd(5, odd, sa);
    if (nb == 1) {
      _tile_loadd(7, bt + step_b, sb);
      _tile_dpbf16ps(1, 5, 7);
    } else {
      _tile_loadd(6, bt + step_b, sb);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(7, bt + step_b + 32, sb);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float part[4][256];
  _tile_stored(0, part[0], 64);
  _tile_stored(1, part[1], 64);
  _tile_stored(2, part[2], 64);
  _tile_stored(3, part[3], 64);
  for (int j = 0; j < nb; ++j)
    for (int i = 0; i < 256; i += 16)
      _mm512_storeu_ps(sums + j * 256 + i,
                       _mm512_add_ps(_mm512_load_ps(part[2 * j] + i), _mm512_load_ps(part[2 * j + 1] + i)));
}

// out[c * ldo + r] = in[r * 16 + c] for a 16 x 16 block of float32 (rows of `in` contiguous), added to what out
// holds where `add`.
__attribute__((target("avx512f"))) inline void transposed_to(const float* in, float* out, int64_t ldo, bool add) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(in + 16 * i));
  dsvl2_kernels_detail::transpose16(r);
  for (int c = 0; c < 16; ++c) {
    const __m512 v = _mm512_castsi512_ps(r[c]);
    _mm512_storeu_ps(out + c * ldo, add ? _mm512_add_ps(_mm512_loadu_ps(out + c * ldo), v) : v);
  }
}

// Rows [n0, n1) of y (n0 a multiple of 16) for all M rows of x (pairs `xk` from amx_pairs, L lanes) with the weight
// `w` gives (Int8Tiles, Int4Tiles: its own copy, a thread's): y[m][n] = the sums of weight row n with x's row m,
// times the row's scale. Up to 32 rows of x (decode) each step's 16 x 32 weights are dequantised into an L1 buffer
// just before their product, the tiles summing the whole K. More rows (prefill) dequantise the strip a chunk of K
// at a time (step after step) and run the chunk's tiles for every 32 rows of x: the whole K where x (L x K bf16)
// fits in kXBytes, so each 32 rows' tile chains run over all of K; else chunks of 4 steps, their sums added up in
// float32, so that each chunk of x (64 KB at 256 rows) stays near the core for all its rows instead of x being
// swept from the last-level cache once per 32 rows. Alternated at 64 and 256 rows on this project's AMX Xeon
// (bench/RESULTS.md): on K = 6,848 chunks of 4 steps ran best and the whole K or 16 steps fell to 0.5-0.8x; on
// K = 1,280 the whole K ran best.
template <typename Tiles>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,amx-tile,amx-bf16"))) void amx_span(
    int64_t n0, int64_t n1, int64_t N, int64_t K, const at::Tensor& xk, int64_t M, float* y, int64_t ldy, Tiles w) {
  constexpr int64_t kStep = kStripRows * 32;  // bf16 values of one tile step: 16 weight rows x 32 k, 1 KB
  constexpr int64_t kXBytes = int64_t{1} << 20;
  const int64_t L = xk.size(1), steps = K / 32, step_b = 16 * L * 2, sb = L * 4;
  const int64_t chunk_steps = L * K * 2 <= kXBytes ? steps : 4;
  const auto* xp = reinterpret_cast<const uint16_t*>(xk.const_data_ptr<int32_t>());
  alignas(64) uint16_t buf[2][kStep];
  alignas(64) float sums[2 * 256];
  thread_local std::vector<uint16_t> chunk;
  thread_local std::vector<float> acc;  // a strip's sums: L rows of x x 16 weight rows (y's rows, 64 bytes each)
  const bool per_step = M <= 32;
  acc.resize(L * kStripRows);
  if (!per_step) chunk.resize(kStep * chunk_steps);
  // sums (tile_sums' layout: weight row x row of x) of the rows m0 .. m0 + 32 into acc, transposed, added to what is
  // there where `add`.
  const auto collect = [&](int64_t m0, int nb, bool add) {
    for (int j = 0; j < nb; ++j)
      transposed_to(sums + j * 256, acc.data() + (m0 + 16 * j) * kStripRows, kStripRows, add);
  };
  dsvl2_kernels_detail::amx_begin();
  for (int64_t n = n0; n < n1; n += kStripRows) {
    const NextStrip next(w.base(), w.block_bytes(), w.blocks(), n, steps);
    if (per_step) {
      const int nb = M > 16 ? 2 : 1;
      const auto a = [&](int64_t t) { return next.touch(t), w.step(n, t, buf[t & 1], 32), buf[t & 1]; };
      tile_sums(nb, steps, a, 64, xp, step_b, sb, sums);
      collect(0, nb, false);
    } else {
      for (int64_t c0 = 0; c0 < steps; c0 += chunk_steps) {
        const int64_t c1 = std::min(steps, c0 + chunk_steps);
        for (int64_t t = c0; t < c1; ++t) next.touch(t), w.step(n, t, chunk.data() + kStep * (t - c0), 32);
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
          const int nb = M - m0 > 16 ? 2 : 1;
          tile_sums(nb, c1 - c0, [&](int64_t t) { return chunk.data() + kStep * t; }, 64,
                    xp + c0 * step_b + m0 * 2, step_b, sb, sums);
          collect(m0, nb, c0 > 0);
        }
      }
    }
    alignas(64) float scale[kStripRows];
    for (int64_t i = 0; i < kStripRows; ++i) scale[i] = n + i < N ? w.row_scale(n + i) : 0.0f;
    const __m512 sc = _mm512_load_ps(scale);
    const __mmask16 live = first_lanes(N - n);
    for (int64_t m = 0; m < M; ++m)  // one row of y's 16 values at a time (the strip's rows: y's columns)
      _mm512_mask_storeu_ps(y + m * ldy + n, live, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + m * kStripRows), sc));
  }
  dsvl2_kernels_detail::amx_end();
}

#pragma GCC pop_options

// Units of work of whole strips: ~kChunkBytes of weight each, over the rows [0, round_up(N, 16)).
template <typename Span>
void run_strips(int64_t N, int64_t row_bytes, const Span& span) {
  const int64_t padded = round_up(N, kStripRows);
  const int64_t per_unit = std::max<int64_t>(kStripRows, kChunkBytes / std::max<int64_t>(row_bytes, 1) / 16 * 16);
  run_units((padded + per_unit - 1) / per_unit,
            [&](int64_t u) { span(u * per_unit, std::min(padded, (u + 1) * per_unit)); });
}

}  // namespace dsvl2_quant_detail
