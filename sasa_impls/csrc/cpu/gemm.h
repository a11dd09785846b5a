// Matrix products for SASA2d's fused projection (sasa_impls/projection.py): the 1x1 Q, K, V convolutions as one
// product of the stacked weight (3 d_out x d_in) with the pixels of each image, and its two gradients:
//     forward       C_b = W   X_b      (M = 3 d_out, K = d_in,   N = H W)
//     input grad    C_b = W^T dY_b     (M = d_in,    K = 3 d_out, N = H W)
//     weight grad   C   = sum_b dY_b X_b^T  (M = 3 d_out, K = H W, N = d_in)
// Why here: on AMD CPUs the BLAS behind torch (MKL) runs AVX2 code, 40% of the FMA peak on a Zen 5, where
// this loop runs the widest vectors the extension is built for.
//
// The classic register-blocked kernel: a block of kRowBlock rows of C by kPanelVectors vectors of columns
// lives in registers (24 of AVX-512's 32; 12 of AVX2's 16); per k, the panel's vectors are loaded once and
// each row's A(m, k) broadcast once, feeding kPanelVectors FMAs. B is packed, a kDepth x panel-width slab at
// a time, into a contiguous zero-padded buffer that every row block of the task then streams through in order
// (B's rows at a stride of H W floats would otherwise map to a few L1 sets), except where its rows spread over the
// sets by themselves (reads_in_place: the panel is then read where it lies). A is read in place through its
// strides (W or W^T, a view). Every element of C is computed by one task, over k in increasing order: the
// result does not depend on the thread count.
#pragma once

#include <cstdint>

#include "pack.h"

namespace sasa::cpu {

inline constexpr int kRowBlock = 6;
inline constexpr int kPanelVectors = kVectorBytes == 64 ? 4 : 2;
// k per packed slab: 512 x 64 floats = 128 KB, in every L2 here (not L1: read in order, the prefetchers keep up).
// Each slab reloads and stores the blocks of C, so the gradients' deep products (K = 3 d_out = 384 for dX, H W
// for dW) want few: against slabs of 128 (32 KB, in L1) both gradients together took 0.86-0.89 of the time,
// slabs of 64 1.12-1.14 (AMD Zen 4 family 25 model 17, 28 x 28 B = 1 to 32 x 32 B = 8, scripts/native_ab.py).
inline constexpr int kDepth = 512;

template <typename T>
inline constexpr int kPanelWidth = kPanelVectors * kLanes<T>;

// A matrix by its data pointer and strides (elements).
template <typename T>
struct Matrix {
  const T* data;
  int64_t row_stride, col_stride;
  const T* at(int64_t i, int64_t j) const { return data + i * row_stride + j * col_stride; }
};

// Columns [n0, n0 + width) of rows [k0, k0 + depth) of B into ``slab`` (depth x kPanelWidth, row-major),
// columns past ``width`` zero. Where B's rows are its unit stride (dW's X^T: B's columns are the rows of X), whole
// kLanes x kLanes tiles are transposed in registers: read in B's row order, one element from each of 64 rows of X
// per slab row, the packing took 26% of the weight gradient's samples at 32 x 32 (X's rows 4 KB apart, in one L1
// set), 6-8% at 28 x 28.
template <typename T>
void pack_slab(const Matrix<T>& b, int64_t k0, int depth, int64_t n0, int width, T* slab) {
  constexpr int L = kLanes<T>, P = kPanelWidth<T>;
  const bool tiles = b.row_stride == 1 && b.col_stride != 1;
  const int tiled_depth = tiles ? depth / L * L : 0, tiled_width = tiles ? width / L * L : 0;
  for (int k0t = 0; k0t < tiled_depth; k0t += L) {
    for (int n0t = 0; n0t < tiled_width; n0t += L) {
      Vec<T> rows[L];
      for (int j = 0; j < L; ++j) rows[j] = load(b.at(k0 + k0t, n0 + n0t + j));  // column n0t + j of B
      transpose<T>(rows);
      for (int i = 0; i < L; ++i) store(slab + static_cast<int64_t>(k0t + i) * P + n0t, rows[i]);
    }
  }
  for (int k = 0; k < depth; ++k) {  // what the tiles left
    T* row = slab + static_cast<int64_t>(k) * P;
    const T* src = b.at(k0 + k, n0);
    const int first = k < tiled_depth ? tiled_width : 0;
    if (b.col_stride == 1) {
      for (int n = first; n < width; ++n) row[n] = src[n];
    } else {
      for (int n = first; n < width; ++n) row[n] = src[n * b.col_stride];
    }
    for (int n = width; n < P; ++n) row[n] = T(0);
  }
}

// C[m0 .. m0 + ROWS, panel columns] (+)= A[rows, k0 .. k0 + depth] slab, the slab's rows ``lds`` elements apart (a
// packed slab, or B's panel in place); ``width`` valid columns of the panel, in its first V vectors (a panel cut short
// by the image's last pixels computes only the vectors it needs: 784 = 12 x 64 + 16 columns at 28 x 28).
template <typename T, int ROWS, int V>
__attribute__((noinline)) void gemm_block(const Matrix<T>& a, int64_t m0, int64_t k0, int depth, const T* slab,
                                          int64_t lds, T* c, int64_t ldc, int width, bool accumulate) {
  constexpr int L = kLanes<T>, P = kPanelWidth<T>;
  // Loops over acc's indices unrolled (and partial vectors loaded with one masked load): GCC kept acc on the stack
  // otherwise, and the stores of a block's first values waited behind the previous block's stores of C, which
  // miss the caches (a quarter of the product's samples sat there; 0.91-0.93 of the forward product's time).
  Vec<T> acc[ROWS][V];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const int valid = width - v * L;
      const T* src = c + i * ldc + v * L;
      acc[i][v] = !accumulate || valid <= 0 ? Vec<T>{} : valid >= L ? load(src) : load_first(src, valid);
    }
  }
  // C's lines of the block after next, for writing: their stores then find them in the caches (0.96-0.97 of the
  // forward product's time at batch 8; at batch 1, where C stays in L2, 0.97-1.03).
  for (int i = 0; i < ROWS; ++i) {
    for (int v = 0; v < V; ++v) __builtin_prefetch(c + (2 * ROWS + i) * ldc + v * L, 1);
  }
  const T* rows[ROWS];
  for (int i = 0; i < ROWS; ++i) rows[i] = a.at(m0 + i, k0);
  const int64_t step = a.col_stride;
#pragma GCC unroll 4
  for (int k = 0; k < depth; ++k) {
    Vec<T> x[V];
    for (int v = 0; v < V; ++v) {
      x[v] = load(slab + k * lds + v * L);
      asm("" : "+v"(x[v]));  // one load for all rows (GCC would fold it into each FMA)
    }
    for (int i = 0; i < ROWS; ++i) {
      Vec<T> w = splat(rows[i][k * step]);
      asm("" : "+v"(w));  // one broadcast per row, not one per FMA
      for (int v = 0; v < V; ++v) acc[i][v] += w * x[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const int valid = width - v * L;
      T* dst = c + i * ldc + v * L;
      if (valid >= L) {
        store(dst, acc[i][v]);
      } else if (valid > 0) {
        store_first(dst, acc[i][v], valid);
      }
    }
  }
}

// gemm_block for 1 .. ROWS rows and 1 .. V vectors (known at run time).
template <typename T, int ROWS = kRowBlock, int V = kPanelVectors>
inline void gemm_rows(int rows, int vectors, const Matrix<T>& a, int64_t m0, int64_t k0, int depth, const T* slab,
                      int64_t lds, T* c, int64_t ldc, int width, bool accumulate) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) {
      return gemm_rows<T, ROWS - 1, V>(rows, vectors, a, m0, k0, depth, slab, lds, c, ldc, width, accumulate);
    }
  }
  if constexpr (V > 1) {
    if (vectors < V) {
      return gemm_rows<T, ROWS, V - 1>(rows, vectors, a, m0, k0, depth, slab, lds, c, ldc, width, accumulate);
    }
  }
  gemm_block<T, ROWS, V>(a, m0, k0, depth, slab, lds, c, ldc, width, accumulate);
}

// Whether gemm_block may read B's panel in place instead of a packed slab: a full panel (whole vectors) on rows of
// unit stride an odd number of 64-byte lines apart, so that consecutive rows fall in every L1 set in turn (28 x 28
// pixels: 49 lines; 32 x 32: 64 lines, every row in one set, which is why B is packed). In place, the forward
// product at 28 x 28 took 0.975-0.986 of its time and its gradients 0.941-0.974 (batch 8 and 1; the same bits; AMD
// Zen 5 f26m2, scripts/native_ab.py), the layer's chained kernels 0.973-0.974 at batch 8.
template <typename T>
inline bool reads_in_place(const Matrix<T>& b, int width) {
  const int64_t stride_bytes = b.row_stride * static_cast<int64_t>(sizeof(T));
  return width == kPanelWidth<T> && b.col_stride == 1 && stride_bytes % 64 == 0 && stride_bytes / 64 % 2 == 1;
}

// C[m0 .. m1, n0 .. n0 + width) (+)= A[m0 .. m1, :] B[:, n0 .. n0 + width), K = a's columns, slab by slab;
// ``accumulate`` adds to C instead of overwriting it. ``slab``: kDepth x kPanelWidth scratch.
template <typename T>
void gemm_panel(const Matrix<T>& a, const Matrix<T>& b, int64_t m0, int64_t m1, int64_t depth_total, int64_t n0,
                int width, T* c, int64_t ldc, bool accumulate, T* slab) {
  const bool in_place = reads_in_place(b, width);
  for (int64_t k0 = 0; k0 < depth_total; k0 += kDepth) {
    const int depth = static_cast<int>(depth_total - k0 < kDepth ? depth_total - k0 : kDepth);
    if (!in_place) pack_slab(b, k0, depth, n0, width, slab);
    const T* rows = in_place ? b.at(k0, n0) : slab;
    const int64_t lds = in_place ? b.row_stride : kPanelWidth<T>;
    const bool add = accumulate || k0 > 0;
    const int vectors = (width + kLanes<T> - 1) / kLanes<T>;
    for (int64_t m = m0; m < m1; m += kRowBlock) {
      const int block = static_cast<int>(m1 - m < kRowBlock ? m1 - m : kRowBlock);
      gemm_rows<T>(block, vectors, a, m, k0, depth, rows, lds, c + m * ldc + n0, ldc, width, add);
    }
  }
}

}  // namespace sasa::cpu
