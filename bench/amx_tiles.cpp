// What AMX's tile instructions cost on this CPU, one thread, for the kernels that use them (model/csrc/amx_tiles.h,
// moe_bf16.cpp, attention_bf16.cpp, quant_amx.h):
//   1. a TDPBF16PS alone, with a tile load of a or b before each, and with both, for a operands of 16, 8, 4 and 1
//      rows (the quantised path's decode batches use 16-row a tiles whatever the rows of x, so this says whether
//      fewer rows would be cheaper: on the AMX Xeon of 2026-12-03 they were not, ~9-16 ns a product, ~5 ns a load);
//   2. the routed experts' 2 x 2 blocks (2 a tiles of weight rows as they lie, 2 b tiles of packed activations, 4
//      products per step) with the operands in L2 (an expert's real widths: K 1,280, 96 tokens) or small enough for
//      L1 (K 256 or 512, 32 tokens): what blocking the experts' loops for L1 could gain at most;
//   3. those blocks streaming 64 experts' gate and up weights from memory, with and without the next block
//      prefetched into L2 a slice per step (moe_bf16.cpp), alternated.
// Operands are zeros: the figures are speeds, not results.
//
//   g++ -O2 -mamx-tile -mamx-bf16 bench/amx_tiles.cpp -o /tmp/amx_tiles && lscpu | grep 'Model name' && /tmp/amx_tiles
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace {

// Palette 1: tiles 0-3 the sums and 4-5 the a operands (`a_rows` rows of 64 bytes), 6-7 the b operands (16 rows).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

using Clock = std::chrono::steady_clock;

double ns_per(Clock::time_point a, Clock::time_point b, long n) {
  return std::chrono::duration<double, std::nano>(b - a).count() / static_cast<double>(n);
}

alignas(64) uint16_t A[2][512], B[2][512];

void single_products() {
  for (int rows : {16, 8, 4, 1}) {
    TileConfig config;
    for (int t = 0; t < 6; ++t) config.rows[t] = static_cast<uint8_t>(rows);
    _tile_loadconfig(&config);
    const long n = 2000000;
    _tile_loadd(4, A[0], 64);
    _tile_loadd(5, A[1], 64);
    _tile_loadd(6, B[0], 64);
    _tile_loadd(7, B[1], 64);
    const auto t0 = Clock::now();
    for (long i = 0; i < n; i += 2) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 7);
    }
    const auto t1 = Clock::now();
    for (long i = 0; i < n; ++i) {
      _tile_loadd(4, A[i & 1], 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    const auto t2 = Clock::now();
    for (long i = 0; i < n; ++i) {
      _tile_loadd(6, B[i & 1], 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    const auto t3 = Clock::now();
    for (long i = 0; i < n; ++i) {
      _tile_loadd(4, A[i & 1], 64);
      _tile_loadd(6, B[i & 1], 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    const auto t4 = Clock::now();
    std::printf("a of %2d rows: ns per product %.2f, with a load of a %.2f, of b %.2f, of both %.2f\n", rows,
                ns_per(t0, t1, n), ns_per(t1, t2, n), ns_per(t2, t3, n), ns_per(t3, t4, n));
    _tile_release();
  }
}

// One 2 x 2 block into c (4 tiles of sums, 256 floats each): weight rows a0 and a1 as they lie (row stride K), packed
// tokens j .. j + 32 of b (L tokens a step), over K / 32 steps; before(s) runs ahead of step s's loads. Returns the
// products it ran.
template <typename Before>
long block2x2(const uint16_t* a0, const uint16_t* a1, long K, const uint16_t* b, long L, long j, float* c,
              const Before& before) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long s = 0; s < K / 32; ++s) {
    before(s);
    _tile_loadd(4, a0 + 32 * s, K * 2);
    _tile_loadd(5, a1 + 32 * s, K * 2);
    _tile_loadd(6, b + (16 * s * L + j) * 2, L * 4);
    _tile_loadd(7, b + (16 * s * L + j + 16) * 2, L * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
  return 4 * (K / 32);
}

// Zeroed memory of `bytes` (a multiple of 64), 64-byte aligned.
uint16_t* zeroed(long bytes) {
  auto* p = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
  std::memset(p, 0, bytes);
  return p;
}

// GFLOP/s of body(c), which runs 2 x 2 blocks into c with the tiles configured and returns their count of products.
template <typename Body>
double timed(const Body& body) {
  alignas(64) float c[4 * 256];
  const TileConfig config;
  _tile_loadconfig(&config);
  const auto t0 = Clock::now();
  const long products = body(c);
  const auto t1 = Clock::now();
  _tile_release();
  return static_cast<double>(products) * 16 * 16 * 32 * 2 / std::chrono::duration<double>(t1 - t0).count() / 1e9;
}

// GFLOP/s of 2 x 2 blocks over K (32 weight rows as they lie, row stride K) and L packed tokens, `reps` times.
double blocks(int K, int L, int reps) {
  uint16_t* a = zeroed(32L * K * 2);
  uint16_t* b = zeroed(static_cast<long>(K) / 2 * L * 4);
  const double rate = timed([&](float* c) {
    long products = 0;
    for (int r = 0; r < reps; ++r)
      for (int j = 0; j < L; j += 32) products += block2x2(a, a + 16L * K, K, b, L, j, c, [](long) {});
    return products;
  });
  std::free(a);
  std::free(b);
  return rate;
}

// GFLOP/s of the experts' gate and up products as gate_up_amx runs them, weights streamed from memory: 64 experts'
// gate and up weights (896 x 1,280 each, 294 MB, past the L3 cache), per block of 16 rows the 2 x 2 blocks over 96
// packed tokens (3 runs of K / 32 steps); with `prefetch`, each step brings its share of the next block's rows into
// L2 (moe_bf16.cpp's spread_prefetch, through an asm volatile prefetcht1 as model/csrc/prefetch.h does).
double streamed(bool prefetch) {
  constexpr long kExperts = 64, kRows = 896, K = 1280, L = 96, kSteps = K / 32, kCalls = L / 32;
  static uint16_t* const w = zeroed(kExperts * 2 * kRows * K * 2);
  static uint16_t* const b = zeroed(K / 2 * L * 4);
  return timed([&](float* c) {
    long products = 0;
    for (long e = 0; e < kExperts; ++e)
      for (long n = 0; n < kRows; n += 16) {
        const uint16_t* a0 = w + (e * 2 * kRows + n) * K;  // gate rows n..n+16, then the up rows
        const uint16_t* a1 = a0 + kRows * K;
        const bool last = n + 16 >= kRows && e + 1 < kExperts;
        const char* next0 = reinterpret_cast<const char*>(last ? w + (e + 1) * 2 * kRows * K : a0 + 16 * K);
        const char* next1 = reinterpret_cast<const char*>(last ? w + ((e + 1) * 2 + 1) * kRows * K : a1 + 16 * K);
        for (long j = 0; j < L; j += 32)
          products += block2x2(a0, a1, K, b, L, j, c, [&](long s) {
            if (!prefetch) return;
            const long part = j / 32 * kSteps + s, parts = kCalls * kSteps, bytes = 16 * K * 2;
            for (long o = bytes * part / parts / 64 * 64; o < bytes * (part + 1) / parts; o += 64) {
              asm volatile("prefetcht1 %0" : : "m"(next0[o]));
              asm volatile("prefetcht1 %0" : : "m"(next1[o]));
            }
          });
      }
    return products;
  });
}

}  // namespace

int main() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux grants the tile data state
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::printf("this CPU or Linux does not grant AMX's tiles\n");
    return 1;
  }
  single_products();
  for (int round = 0; round < 2; ++round)
    std::printf("2 x 2 blocks: K 1280, 96 tokens (operands in L2) %.0f GFLOP/s; K 256, 96 tokens %.0f; "
                "K 256, 32 tokens (L1) %.0f; K 512, 32 tokens %.0f\n",
                blocks(1280, 96, 2000), blocks(256, 96, 10000), blocks(256, 32, 30000), blocks(512, 32, 15000));
  for (int round = 0; round < 8; ++round) {
    const double with = streamed(true), without = streamed(false);
    std::printf("experts' gate and up, weights from memory: next block prefetched into L2 %.0f GFLOP/s, not %.0f\n",
                with, without);
  }
  return 0;
}
