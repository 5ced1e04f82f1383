// The bf16 kernels' shared AMX pieces above the tile products of amx_tiles.h: L2 prefetch spread over a block's
// tile steps, the packed activations' lane count, the transposed bf16 store of a block's sums, and weight rows
// times packed activations (`rows_amx`). Callers check `amx_ready()` first.
#pragma once

#include "amx_tiles.h"
#include "bf16_common.h"

namespace dsvl2_kernels_detail {

// Prefetches piece `part` of `parts` of the bytes [p, p + bytes) into L2. Spread over a packed unit's row blocks, it
// brings in the weight rows of the unit this thread will likely take next while this one computes (cold expert
// weights otherwise stall the packing).
inline void prefetch_piece(const bf16* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = bytes * part / parts / 64 * 64; o < bytes * (part + 1) / parts; o += 64)
    dsvl2_prefetch::to_l2(c + o);
}

// The prefetch hook of a run of `calls` amx_block calls of `steps` steps each: step s of call `call` brings its share
// of the `bytes` at each of r0 and r1 into L2 (prefetch_piece).
inline auto spread_prefetch(const bf16* r0, const bf16* r1, int64_t bytes, int64_t call, int64_t calls, int64_t steps) {
  return [=](int64_t s) {
    prefetch_piece(r0, bytes, call * steps + s, calls * steps);
    prefetch_piece(r1, bytes, call * steps + s, calls * steps);
  };
}

// Tokens of an expert's packed activations, a multiple of 16 (AMX's b blocks; the rows past M are zero).
inline int64_t padded_tokens(int64_t M) { return (M + 15) / 16 * 16; }

// Writes the 16 x 16 float32 block v (v[r] lane t: weight row r, token t), transposed and rounded to bf16, into rows
// t < tokens of out (row stride ldo), 16 columns each.
inline void store_transposed(__m512* v, int64_t tokens, bf16* out, int64_t ldo) {
  transpose16(reinterpret_cast<__m512i*>(v));
  for (int64_t t = 0; t < std::min<int64_t>(16, tokens); ++t) store_bf16(out + t * ldo, v[t], 0xFFFF);
}

// Weight rows [0, rows) (row stride K, rows a multiple of 16, K of 32) times M rows of activations packed into
// pairs `gk` (pack_pairs, padded_tokens(M) lanes) into out (row stride ldo) at the rows' first column, rounded to
// bf16: 32 weight rows at a time as the tiles' a operand as they lie, the next 32 (next_d after the last: the
// caller's next unit) prefetched into L2 meanwhile, the sums transposed on the way out. A MoE layer's down products
// on AMX (moe_bf16.cpp) and the decode products of a batch (decode_bf16.cpp).
inline void rows_amx(const bf16* wd, int64_t K, int64_t rows, const bf16* gk, int64_t M, bf16* out, int64_t ldo,
                     const bf16* next_d) {
  const int64_t L = padded_tokens(M), calls = (L + 31) / 32;
  alignas(64) float sums[4 * 256];
  __m512 v[16];
  amx_begin();
  for (int64_t n = 0; n < rows; n += 32) {
    const int mb = rows - n > 16 ? 2 : 1;
    const bf16* const a[2] = {wd + n * K, wd + (n + 16) * K};
    const bf16* const next = n + 32 >= rows ? next_d : wd + (n + 32) * K;
    for (int64_t j = 0; j < L; j += 32) {
      const int nb = L - j > 16 ? 2 : 1;
      const bf16* const b[2] = {gk + j * 2, gk + (j + 16) * 2};
      amx_block_any(mb, nb, a, K, b, L * 2, K / 32, sums,
                    spread_prefetch(next, next + 16 * K, 16 * K * 2, j / 32, calls, K / 32));
      for (int i = 0; i < mb; ++i)
        for (int jb = 0; jb < nb; ++jb) {
          for (int r = 0; r < 16; ++r) v[r] = _mm512_load_ps(sums + (i * nb + jb) * 256 + 16 * r);
          store_transposed(v, M - j - 16 * jb, out + (j + 16 * jb) * ldo + n + 16 * i, ldo);
        }
    }
  }
  amx_end();
}

}  // namespace dsvl2_kernels_detail
