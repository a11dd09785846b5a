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
  int interleave = 1;  // heads whose pixels share the kernels' vectors (pack.h; interleaved_heads)
  int radius() const { return kernel_size / 2; }
  int row_channels() const { return channels / 2; }  // Dr: rows get the first D // 2 channels
  int col_channels() const { return channels - channels / 2; }
  int planes() const { return batch * (heads / interleave); }  // what the tasks split: (image, group of heads)
  int64_t plane(int b, int h0) const { return static_cast<int64_t>(b) * (heads / interleave) + h0 / interleave; }
  int lanes() const { return width * interleave; }              // of a packed row
};

// A (B, heads, H, W, D) tensor by its data pointer and strides (elements).
template <typename S>
struct Tensor5 {
  S* data;
  int64_t stride[5];
  Plane<S> plane(int b, int h) const {
    return {data + b * stride[0] + h * stride[1], stride[2], stride[3], stride[4]};
  }
  // The planes of heads [h0, h0 + count) of image b (count <= kMaxInterleave: a task's interleaved heads).
  struct Heads {
    Plane<S> of[kMaxInterleave];
  };
  Heads planes(int b, int h0, int count) const {
    Heads heads;
    for (int s = 0; s < count; ++s) heads.of[s] = plane(b, h0 + s);
    return heads;
  }
};

// Heads whose pixels share the kernels' vectors (pack.h's interleaving): where W pixels leave part of a row's last
// vector empty (28 columns in 32 lanes), the smallest power of two up to kMaxInterleave that divides the heads and
// leaves the fewest empty lanes per pixel (4 heads of 28 columns fill 7 vectors of 16 lanes exactly; 2 heads of 56
// or of 7 columns). The forward against one head per row, k = 19, 8 heads, AMD Zen 4 f25m17, 2 threads: 28 x 28
// 0.93 (batch 8) and 0.95 (batch 1), 56 x 56 batch 2 0.88, 7 x 7 batch 8 0.62; k = 3 and 7 at 28 x 28 1.01. 8 heads
// of 14 columns (a shift by one column is 8 lanes: each block's window spans 160 lanes of every key row) took 1.19x
// the time at batch 1.
template <typename T>
inline int interleaved_heads(const Shape& s, int most = kMaxInterleave) {
  int best = 1;
  for (int m = 2; m <= most && m <= kLanes<T> && s.heads % m == 0; m *= 2) {
    // padded(m W) / (m W) < padded(best W) / (best W), in integers
    const int64_t lanes = padded_width<T>(m * s.width), best_lanes = padded_width<T>(best * s.width);
    if (lanes * best < best_lanes * m) best = m;
  }
  return best;
}

// Whether one band per plane balances ``workers`` threads: the planes split evenly among them, or give each about
// 4 tasks.
inline bool whole_planes(const Shape& s, int workers) {
  return s.planes() % workers == 0 || s.planes() >= 4 * workers;
}

// Query rows are cut into bands of ``band`` rows; a task is one (plane, band). The band height is
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

// Default band of the backward. One band per plane where the planes balance the machine's CPUs (``cpus``;
// whole_planes): a plane's only task then holds every key row's dK and dV and stores them, no halo rows are
// summed across bands (k = 19, Xeon family 6 model 167, 2 threads: 0.91-0.95 of the time of 16-row bands at 28 x
// 28 and 32 x 32, batch 1 and 8, 8 planes). Otherwise 2r rows rounded down to whole groups of
// ``group_rows``, at least 8, so a band's key rows (its halo) are about twice its query rows at most: the
// per-band key-gradient buffers then stay O(H W D) whatever k. Whole groups: with 4-row groups at k = 19,
// bands of 16 rows measured 0.94-0.995 of the time of bands of 18 (AMD Zen 5). The gradients' bits depend on
// the band, so ``cpus`` is the machine's count, never the threads a call runs on.
inline int default_band(const Shape& s, int group_rows, int cpus) {
  if (whole_planes(s, cpus)) return s.height;
  const int rows = (s.kernel_size - 1) / group_rows * group_rows;
  return rows > 8 ? rows : 8;
}

}  // namespace sasa::cpu
