// The machine's physical FMA rate (sasa-bench peak): per thread, kPeakChains independent chains of
// vector FMAs of the widest ISA the extension is compiled for, enough chains to cover the FMA latency
// on every port (2 ports x 4 cycles = 8 in flight; AVX-512 has 32 registers, AVX2 16). Nothing is
// loaded or stored inside the loop: what it reaches is the cores' FMA throughput, the ceiling the
// kernel's "% of peak" is measured against.
#pragma once

#include <cstdint>

#include "vec.h"

namespace sasa::cpu {

inline constexpr int kPeakChains = kVectorBytes == 64 ? 24 : 12;

// ``iterations`` rounds of kPeakChains FMAs; returns a value depending on every chain (never dead code).
template <typename T>
__attribute__((noinline)) T fma_chains(int64_t iterations, T seed) {
  Vec<T> acc[kPeakChains];
  for (int c = 0; c < kPeakChains; ++c) acc[c] = splat(static_cast<T>(seed + c));
  const Vec<T> mul = splat(static_cast<T>(0.999999)), add = splat(static_cast<T>(1e-6));
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 32
    for (int c = 0; c < kPeakChains; ++c) acc[c] = acc[c] * mul + add;  // one vfmadd each, in registers
  }
  T total = 0;
  for (int c = 0; c < kPeakChains; ++c) total += hsum(acc[c]);
  return total;
}

// FLOPs of fma_chains(iterations): 2 per lane per FMA.
template <typename T>
inline double fma_chain_flops(int64_t iterations) {
  return 2.0 * static_cast<double>(iterations) * kPeakChains * kLanes<T>;
}

}  // namespace sasa::cpu
