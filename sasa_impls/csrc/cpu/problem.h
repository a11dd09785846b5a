// The problem a CPU kernel call solves: shapes, the caller's tensors as raw pointers and strides, and
// how the rows are cut into tasks.
#pragma once

#include <cstdint>

#include "../sasa_index.h"
#include "pack.h"

namespace sasa::cpu {

struct Shape {
  int batch, heads, height, width, channels, kernel_size;
  bool has_rel;
  int radius() const { return kernel_size / 2; }
  int row_channels() const { return channels / 2; }  // Dr: rows get the first D // 2 channels
  int col_channels() const { return channels - channels / 2; }
};

// A (B, heads, H, W, D) tensor by its data pointer and strides (elements).
template <typename S>
struct Tensor5 {
  S* data;
  int64_t stride[5];
  Plane<S> plane(int b, int h) const {
    return {data + b * stride[0] + h * stride[1], stride[2], stride[3], stride[4]};
  }
};

// Query rows are cut into bands of ``band`` rows; a task is one (batch, head, band). The band height is
// a parameter of the call (never derived from the thread count), so the backward's fixed-order
// reductions over bands give the same bits whatever the number of threads.
struct Bands {
  int height, band;
  int count() const { return (height + band - 1) / band; }
  int begin(int t) const { return t * band; }
  int end(int t) const { return (t + 1) * band < height ? (t + 1) * band : height; }
};

// The rows of a group of ``count`` consecutive rows from ``first_row`` that lie within ``radius`` of
// ``row``: [first, last] (empty when first > last). The query rows whose windows hold a key row, or the
// key rows in a query row's window (the window is symmetric).
inline void rows_within(int row, int first_row, int count, int radius, int& first, int& last) {
  first = row - radius - first_row > 0 ? row - radius - first_row : 0;
  last = row + radius - first_row < count - 1 ? row + radius - first_row : count - 1;
}

// Default band of the backward. One band per (batch, head) plane where the planes alone give about 4 tasks per
// CPU of the machine (``cpus``): a plane's only task then holds every key row's dK and dV and stores them, no
// halo rows are summed across bands (k = 19, Xeon family 6 model 167, 2 threads: 0.91-0.95 of the time of
// 16-row bands at 28 x 28 and 32 x 32, batch 1 and 8). Otherwise 2r rows rounded down to whole groups of
// ``group_rows``, at least 8, so a band's key rows (its halo) are about twice its query rows at most: the
// per-band key-gradient buffers then stay O(H W D) whatever k. Whole groups: with 4-row groups at k = 19,
// bands of 16 rows measured 0.94-0.995 of the time of bands of 18 (AMD Zen 5). The gradients' bits depend on
// the band, so ``cpus`` is the machine's count, never the threads a call runs on.
inline int default_band(const Shape& s, int group_rows, int cpus) {
  if (static_cast<int64_t>(s.batch) * s.heads >= 4 * static_cast<int64_t>(cpus)) return s.height;
  const int rows = (s.kernel_size - 1) / group_rows * group_rows;
  return rows > 8 ? rows : 8;
}

}  // namespace sasa::cpu
