// Work sharing for the compiled libraries (bf16_common.h, quant_avx2.cpp): no vector instructions here, so both
// the AVX512 and the AVX2 library include it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace dsvl2_parallel {

// Runs work(unit) for units 0..units-1 on the intra-op threads. Each thread owns a contiguous share of the units
// and takes them in order, so it reads its part of a weight as one stream (the hardware prefetcher keeps running
// across units, and a unit's software prefetch of the rows past its end reaches the thread's own next unit); a
// thread whose share is done takes what is left of the others' shares from a shared counter per share, so a thread
// that starts late (another process on its core) does not hold up the rest. Handing out units round-robin from one
// counter instead (each thread's stream jumping every unit) read a decode weight ~13% slower on a Zen 5
// (bench/stream_rows.cpp).
template <typename Work>
void run_units(int64_t units, const Work& work) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), units);
  if (workers <= 0) return;
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  const std::unique_ptr<Share[]> shares(new Share[workers]);
  for (int64_t t = 0; t < workers; ++t) {
    shares[t].next.store(units * t / workers, std::memory_order_relaxed);
    shares[t].end = units * (t + 1) / workers;
  }
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    // One t per thread (grain 1, no more workers than threads), or every t on one thread where parallel_for runs
    // inline (called from inside a parallel region): each t's loop then still covers every share.
    for (int64_t t = first; t < last; ++t)
      for (int64_t s = 0; s < workers; ++s) {
        Share& share = shares[(t + s) % workers];
        for (int64_t u = share.next.fetch_add(1, std::memory_order_relaxed); u < share.end;
             u = share.next.fetch_add(1, std::memory_order_relaxed))
          work(u);
      }
  });
}

}  // namespace dsvl2_parallel
