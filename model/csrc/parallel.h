// Work sharing for the compiled libraries (bf16_common.h, quant_avx2.cpp): no vector instructions here, so both
// the AVX512 and the AVX2 library include it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace dsvl2_parallel {

// Runs work(unit) for units 0..units-1 on the intra-op threads; threads take units from a shared counter, so a
// thread that starts late (another process on its core) does not hold up the rest.
template <typename Work>
void run_units(int64_t units, const Work& work) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), units);
  if (workers <= 0) return;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < units;
         u = next.fetch_add(1, std::memory_order_relaxed))
      work(u);
  });
}

}  // namespace dsvl2_parallel
