// The CPU kernel's one microkernel: for up to a few rows r of operands sharing one right-hand side,
//     out_r[u] = init(r, u) + sum_j left_r(j) * right(j, u),
// every term a vector of consecutive pixels; init is out_r[u] itself (Accumulate), alpha_r out_r[u]
// (Rescale: the online softmax's running sums), 0 (Zero) or the relative logits (terms.h). All the
// FMAs of the op are this contraction with different operands (forward.h and backward.h say which):
// logits (j = channel, u = column offset, right = the key row shifted by u columns), aggregation (j =
// column offset, u = channel, right = the value row shifted by j), the factorized relative logits
// (right = a broadcast table entry). Several query rows against the same key row (or the same table)
// share ``right``: each of its loads then feeds several FMAs, which is what keeps this load-bound loop
// near the FMA rate (the shifted loads are unaligned).
//
// Outputs go in as few blocks as fill at most kAccumulators registers with accumulators, of sizes that differ by
// one at most: 12 of AVX2's 16 vector registers; 20 of AVX-512's 32, where 4 rows x 5 outputs take the logits' k =
// 19 offsets in 4 blocks instead of 4 + 4 + 4 + 4 + 3 (the rows' left vectors loaded 4 times per term instead of 5,
// one set-up and drain fewer). Against 16 accumulators, AMD Zen 4 f25m17, 2 threads: backward 0.962-0.979, forward
// 0.98-0.99 at k = 19, k = 3 and 7 0.97-0.98; the AVX2 build, whose 2- and 1-row blocks now split evenly too,
// 0.96-0.99. 24 accumulators, which change only the 16-output contractions (6 + 5 + 5), read 1.00-1.03. A block of
// fewer than 8 accumulators splits its reduction into partial sums, so that at least 8 FMA chains are in flight.
// Partial sums are added in a fixed order: the result depends on the shapes only, never on the thread that runs it.
#pragma once

#include "vec.h"

namespace sasa::cpu {

// Vectors at a fixed stride (in elements): vector u lives at base + u * stride.
template <typename T>
struct Strided {
  T* base;
  int64_t stride;
  Vec<T> get(int u) const { return load(base + u * stride); }
  void set(int u, Vec<T> v) const { store(base + u * stride, v); }
};

// left(j): vectors at a fixed stride (channel j of a packed row, or weight vector j).
template <typename T>
struct Loads {
  const T* base;
  int64_t stride;
  Vec<T> operator()(int j) const { return load(base + j * stride); }
};

// right(j, u) = the vector at base + j * j_stride + u * u_stride: a packed row shifted by a number of
// columns (stride +1 or -1) for one channel (stride = the channel stride), or the other way round.
template <typename T>
struct VectorAt {
  const T* base;
  int64_t j_stride, u_stride;
  Vec<T> operator()(int j, int u) const { return load(base + j * j_stride + u * u_stride); }
};

// right(j, u) = the vector at base + j * j_stride + u * STEP: a packed row shifted by u columns of STEP lanes each
// (pack.h's interleaved heads), channel j (VectorAt with u_stride STEP, known at compile time: the u offsets become
// constant displacements).
template <typename T, int STEP = 1>
struct Shifted {
  const T* base;
  int64_t j_stride;
  Vec<T> operator()(int j, int u) const { return load(base + j * j_stride + u * STEP); }
};

// The PERIOD values at p repeated across the lanes (lane l gets p[l % PERIOD]; PERIOD divides kLanes): one
// broadcast from memory.
template <typename T, int PERIOD>
inline Vec<T> periodic(const T* p) {
  static_assert(kLanes<T> % PERIOD == 0, "PERIOD must divide the lanes");
  if constexpr (PERIOD == 1) {
    return splat(*p);
  } else if constexpr (PERIOD == kLanes<T>) {
    return load(p);
  } else if constexpr (sizeof(T) == 4 && PERIOD == 2) {  // the pair as one double on every double lane
    double pair;
    std::memcpy(&pair, p, sizeof pair);
    return reinterpret_cast<Vec<T>>(splat(pair));
#if defined(__AVX512F__)
  } else if constexpr (sizeof(T) == 4 && PERIOD == 4) {
    return reinterpret_cast<Vec<T>>(_mm512_broadcast_f32x4(_mm_loadu_ps(reinterpret_cast<const float*>(p))));
#elif defined(__AVX2__)
  } else if constexpr (sizeof(T) == 4 && PERIOD == 4) {
    return reinterpret_cast<Vec<T>>(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)));
#endif
  } else {  // fp64 (the tests' accumulation type), other ISAs
    Vec<T> v;
    for (int l = 0; l < kLanes<T>; ++l) v[l] = p[l % PERIOD];
    return v;
  }
}

// right(j, u) = the PERIOD values at base + (j * j_stride + u * u_stride) PERIOD repeated across the lanes: a
// relative embedding entry of each of PERIOD interleaved heads (one value on every lane where PERIOD is 1).
template <typename T, int PERIOD = 1>
struct ScalarAt {
  const T* base;
  int64_t j_stride, u_stride;
  Vec<T> operator()(int j, int u) const { return periodic<T, PERIOD>(base + (j * j_stride + u * u_stride) * PERIOD); }
};

inline constexpr int kRegisters = kVectorBytes == 64 ? 32 : 16;  // vector registers of the ISA
inline constexpr int kAccumulators = kVectorBytes == 64 ? 20 : 12;
inline constexpr int kChains = 8;

template <int ROWS>
inline constexpr int kBlockOutputs = kAccumulators / ROWS;

// The accumulators' first values (init(r, u) above), known at compile time: no multiply by 1, no zeros
// stored and loaded again.
template <typename T>
struct Accumulate {
  const Strided<T>* out;
  Vec<T> operator()(int r, int u) const { return out[r].get(u); }
};

template <typename T>
struct Rescale {
  const Strided<T>* out;
  const Vec<T>* alpha;
  Vec<T> operator()(int r, int u) const { return alpha[r] * out[r].get(u); }
};

template <typename T>
struct Zero {
  Vec<T> operator()(int, int) const { return Vec<T>{}; }
};

// One part of a contraction whose sum runs over several operand sets: left[r] per row, one right-hand side.
// A block's accumulators stay in registers from its first part to its last (the backward's dQ, dK and dV sum 4
// key or query rows of 19 terms each: one set-up and drain per 76 terms instead of per 19).
template <typename T, class Right>
struct Part {
  const Loads<T>* left;
  Right right;
};

// Outputs [u0, u0 + NOUT) of ROWS rows, summed over ``count`` parts of n terms each.
template <typename T, int ROWS, int NOUT, class Init, class Right>
inline __attribute__((always_inline)) void contract_block(const Strided<T>* out, const Init& init,
                                                          const Part<T, Right>* parts, int count, int n, int u0) {
  constexpr int SPLIT = ROWS * NOUT >= kChains ? 1 : (kChains + ROWS * NOUT - 1) / (ROWS * NOUT);
  // Each left vector in a register, loaded once per j, where the registers hold it with the block's
  // accumulators and the right vector (GCC would otherwise fold its load into each of the NOUT FMAs
  // that read it: 20 loads per 16 FMAs instead of 8 at 4 rows x 4 outputs, measured 38% of the FMA-only
  // rate instead of 73% on a Zen 4, whose cores load one 64-byte vector per cycle).
  constexpr bool kLeftInRegisters = ROWS > 1 && NOUT > 1 && ROWS * NOUT * SPLIT + ROWS + 1 <= kRegisters;
  Vec<T> acc[SPLIT][ROWS][NOUT];  // every loop over its indices unrolled: an index left in a loop keeps acc in memory
#pragma GCC unroll 24
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 24
    for (int u = 0; u < NOUT; ++u) {
      acc[0][r][u] = init(r, u0 + u);
#pragma GCC unroll 24
      for (int s = 1; s < SPLIT; ++s) acc[s][r][u] = Vec<T>{};
    }
  }
  for (int part = 0; part < count; ++part) {
    const Loads<T>* left = parts[part].left;
    const Right& right = parts[part].right;
    int j = 0;
    // Unrolled: one pointer increment per operand and iteration took issue slots from the FMAs (Xeon f6m167,
    // 4 rows x 4 outputs, n = 64: 54% of the FMA-only rate rolled, 65% unrolled).
#pragma GCC unroll 4
    for (; j + SPLIT <= n; j += SPLIT) {
#pragma GCC unroll 8
      for (int s = 0; s < SPLIT; ++s) {
        Vec<T> l[ROWS];
        for (int r = 0; r < ROWS; ++r) {
          l[r] = left[r](j + s);
          if constexpr (kLeftInRegisters) asm("" : "+v"(l[r]));
        }
#pragma GCC unroll 24
        for (int u = 0; u < NOUT; ++u) {
          Vec<T> x = right(j + s, u0 + u);
          if constexpr (ROWS > 1) asm("" : "+v"(x));  // one load for all rows (GCC would fold it into each FMA)
#pragma GCC unroll 24
          for (int r = 0; r < ROWS; ++r) acc[s][r][u] += l[r] * x;
        }
      }
    }
    for (; j < n; ++j) {
      Vec<T> l[ROWS];
#pragma GCC unroll 24
      for (int r = 0; r < ROWS; ++r) l[r] = left[r](j);
#pragma GCC unroll 24
      for (int u = 0; u < NOUT; ++u) {
        const Vec<T> x = right(j, u0 + u);
#pragma GCC unroll 24
        for (int r = 0; r < ROWS; ++r) acc[0][r][u] += l[r] * x;
      }
    }
  }
  Strided<T> dst[ROWS];  // copies: the stores (memcpy) may alias ``out``, which GCC reloaded before each one
  for (int r = 0; r < ROWS; ++r) dst[r] = out[r];
#pragma GCC unroll 24
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 24
    for (int u = 0; u < NOUT; ++u) {
      Vec<T> total = acc[0][r][u];
#pragma GCC unroll 24
      for (int s = 1; s < SPLIT; ++s) total += acc[s][r][u];
      dst[r].set(u0 + u, total);
    }
  }
}

// Outputs [u0, u0 + m), m <= NOUT: one block of exactly m outputs.
template <typename T, int ROWS, int NOUT, class Init, class Right>
inline void contract_rest(const Strided<T>* out, const Init& init, const Part<T, Right>* parts, int count, int n,
                          int u0, int m) {
  if constexpr (NOUT > 0) {
    if (m == NOUT) {
      contract_block<T, ROWS, NOUT>(out, init, parts, count, n, u0);
    } else {
      contract_rest<T, ROWS, NOUT - 1>(out, init, parts, count, n, u0, m);
    }
  }
}

// out_r[u] = init(r, u) + sum over the parts p < count of sum_{j < n} left_{p,r}(j) * right_p(j, u) for u in
// [0, m), r < ROWS.
template <typename T, int ROWS, class Init, class Right>
inline void contract(const Strided<T>* out, int m, const Init& init, const Part<T, Right>* parts, int count, int n) {
  constexpr int B = kBlockOutputs<ROWS>;
  for (int u = 0; u < m;) {  // as few blocks as B allows, of sizes that differ by one at most
    const int blocks = (m - u + B - 1) / B, size = (m - u + blocks - 1) / blocks;
    contract_rest<T, ROWS, B>(out, init, parts, count, n, u, size);
    u += size;
  }
}

// ``rows`` (1 .. MAXROWS, known at run time) rows of operands, summed over ``count`` parts.
template <typename T, int MAXROWS, class Init, class Right>
inline void contract_rows(int rows, const Strided<T>* out, int m, const Init& init, const Part<T, Right>* parts,
                          int count, int n) {
  if constexpr (MAXROWS > 1) {
    if (rows < MAXROWS) return contract_rows<T, MAXROWS - 1>(rows, out, m, init, parts, count, n);
  }
  contract<T, MAXROWS>(out, m, init, parts, count, n);
}

// One part: out_r[u] = init(r, u) + sum_{j < n} left_r(j) * right(j, u).
template <typename T, int MAXROWS, class Init, class Right>
inline void contract_rows(int rows, const Strided<T>* out, int m, const Init& init, const Loads<T>* left,
                          const Right& right, int n) {
  const Part<T, Right> part{left, right};
  contract_rows<T, MAXROWS>(rows, out, m, init, &part, 1, n);
}

// One row of operands accumulated onto ``out`` (the relative part of dQ).
template <typename T, class Right>
inline void contract(Strided<T> out, int m, Loads<T> left, const Right& right, int n) {
  contract_rows<T, 1>(1, &out, m, Accumulate<T>{&out}, &left, right, n);
}

}  // namespace sasa::cpu
