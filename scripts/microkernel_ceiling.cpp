// What one core's FMAs reach when loads feed them (scripts/microkernel_ceiling.py): the FMA-only rate,
// FMAs with aligned and with cache-line-splitting loads, and the native kernel's own contraction
// (csrc/cpu/contract.h) at its forward and backward shapes on buffers that stay in L1. The kernel's
// "% of peak" is measured against the FMA-only rate; these rows say how much of it a load-fed
// microkernel can reach on this CPU at all.
#include <torch/extension.h>

#include <chrono>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/backward.h"
#include "cpu/peak.h"

namespace {

using namespace sasa::cpu;
using T = float;
constexpr int L = kLanes<T>;
using Row = std::tuple<std::string, double, double>;  // name, FLOPs per call, seconds per call

template <typename Fn>
Row timed(const std::string& name, double flops, int64_t calls, const Fn& fn) {
  fn();  // warm-up (and the buffers into L1)
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) fn();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {name, flops, seconds / static_cast<double>(calls)};
}

// kLoadedChains accumulators (16, or 8 where the ISA has 16 registers: they, the loaded vectors and m must all
// stay in registers); per iteration kLoadedChains FMAs acc = acc * x + m (as fma_chains: no two share a product),
// each x one of LOADS vectors loaded that iteration at ``offset`` elements past a 64-byte boundary (0: aligned;
// 3: every load spans two cache lines), 4 KB of data; m from ``seed``, new per call (the loop is a pure
// function: a repeated call with the same arguments could be elided).
constexpr int kLoadedChains = kRegisters == 32 ? 16 : 8;

template <int LOADS>
__attribute__((noinline)) T loaded_fmas(const T* buffer, int64_t iterations, int offset, T seed) {
  constexpr int C = kLoadedChains;
  static_assert(C + LOADS + 1 <= kRegisters, "the accumulators, loaded vectors and m must fit in the registers");
  Vec<T> acc[C], x[LOADS];  // every loop unrolled, so that both arrays live in registers
#pragma GCC unroll 16
  for (int i = 0; i < C; ++i) acc[i] = splat(seed + static_cast<T>(i));  // distinct: no two chains merge
  Vec<T> m = splat(static_cast<T>(1e-7) * seed);
  asm("" : "+v"(m));
  for (int64_t it = 0; it < iterations; ++it) {
    const T* p = buffer + ((it * 8 * L) & 1023) + offset;
#pragma GCC unroll 8
    for (int l = 0; l < LOADS; ++l) {
      x[l] = load(p + l * L);
      asm("" : "+v"(x[l]));  // one register load per vector, not folded into each FMA that reads it
    }
#pragma GCC unroll 16
    for (int i = 0; i < C; ++i) acc[i] = acc[i] * x[i % LOADS] + m;
  }
  Vec<T> total = acc[0];
#pragma GCC unroll 16
  for (int i = 1; i < C; ++i) total += acc[i];
  return hsum(total);
}

// The kernel's contraction of ROWS rows, m outputs, a reduction of n, ``right`` over an L1-resident row,
// accumulated onto ``out`` (rescaled first where the forward's aggregation rescales: ``rescale``).
template <int ROWS, class Right>
Row contraction(const std::string& name, int m, int n, const Right& right, std::vector<T>& out, int64_t out_stride,
                const std::vector<T>& left, int64_t left_stride, int64_t calls, bool rescale = false) {
  Strided<T> outs[ROWS];
  Loads<T> lefts[ROWS];
  Vec<T> alpha[ROWS];
  for (int r = 0; r < ROWS; ++r) {  // rows 1040 / 1104 elements apart: no 4 KB aliasing between them
    outs[r] = {out.data() + r * 1040, out_stride};
    lefts[r] = {left.data() + r * 1104, left_stride};
    alpha[r] = splat(T(1));
  }
  return timed(name, 2.0 * ROWS * m * n * L, calls, [&] {
    if (rescale) {
      contract_rows<T, ROWS>(ROWS, outs, m, Rescale<T>{outs, alpha}, lefts, right, n);
    } else {
      contract_rows<T, ROWS>(ROWS, outs, m, Accumulate<T>{outs}, lefts, right, n);
    }
  });
}

std::vector<Row> ceiling(int64_t iterations) {
  TORCH_CHECK(iterations >= 1, "iterations: expected a positive int, got ", iterations);
  std::vector<T> buffer(1024 + 8 * L + 2 * L, T(1e-7)), left(8192, T(1e-3)), row(8192, T(2e-3)), out(8192, T(0));
  T* aligned = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  volatile T sink = 0;
  T seed = 0;  // a new argument per call: the loops are pure functions, and a repeated call could be elided
  std::vector<Row> rows;
  constexpr int C = kLoadedChains;
  const double fma_flops = 2.0 * C * L * iterations;
  rows.push_back(timed("FMAs only (kPeakChains chains)", fma_chain_flops<T>(iterations), 1,
                       [&] { sink = sink + fma_chains<T>(iterations, seed += 1); }));
  const auto loaded = [&](int loads, const char* kind) {
    return std::to_string(C) + " FMAs + " + std::to_string(loads) + " " + kind + " loads";
  };
  rows.push_back(timed(loaded(C / 4, "aligned"), fma_flops, 1, [&] { sink = sink + loaded_fmas<C / 4>(aligned, iterations, 0, seed += 1); }));
  rows.push_back(timed(loaded(C / 2, "aligned"), fma_flops, 1, [&] { sink = sink + loaded_fmas<C / 2>(aligned, iterations, 0, seed += 1); }));
  rows.push_back(timed(loaded(C / 4, "split"), fma_flops, 1, [&] { sink = sink + loaded_fmas<C / 4>(aligned, iterations, 3, seed += 1); }));
  rows.push_back(timed(loaded(C / 2, "split"), fma_flops, 1, [&] { sink = sink + loaded_fmas<C / 2>(aligned, iterations, 3, seed += 1); }));
  const int64_t cs = 4 * L, calls = std::max<int64_t>(1, iterations / 32);  // a packed row's channel stride
  const T* key = row.data() + 2 * L;
  // each at the kernel's own group of rows: forward kGroupRows (forward.h), backward kBackwardGroupRows (backward.h)
  const auto rows_of = [](int rows) { return "(" + std::to_string(rows) + " rows, "; };
  // forward q.k: k = 19 column offsets, D = 16 channels; a.v: 16 channels, 19 offsets
  constexpr int F = kGroupRows, G = kBackwardGroupRows;
  rows.push_back(contraction<F>("contract q.k " + rows_of(F) + "19 x 16)", 19, 16, Shifted<T>{key, cs}, out, L, left, cs,
                                calls));
  rows.push_back(contraction<F>("contract a.v " + rows_of(F) + "16 x 19)", 16, 19, VectorAt<T>{key, 1, cs}, out, 2 * L,
                                left, L, calls, true));
  // backward: dP like q.k, dQ like a.v, dK / dV from the diagonal of the p / dS scratch
  rows.push_back(contraction<G>("contract dP " + rows_of(G) + "19 x 16)", 19, 16, Shifted<T>{key, cs}, out, L, left, cs,
                                calls));
  rows.push_back(contraction<G>("contract dK " + rows_of(G) + "16 x 19)", 16, 19, VectorAt<T>{key + 2 * L, -1, cs}, out,
                                2 * L, left, 3 * L + 1, calls));
  TORCH_CHECK(sink == sink, "the loops' results are not finite");
  return rows;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ceiling", &ceiling, "[(name, flops_per_call, seconds_per_call)] = ceiling(iterations), on the calling thread",
        py::call_guard<py::gil_scoped_release>());
}
