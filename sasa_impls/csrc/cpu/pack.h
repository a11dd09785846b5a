// Moving data between the caller's tensors (any strides, any of the four dtypes) and the kernel's
// packed rows: the accumulation type, channel-major, zero-padded so that no load leaves the buffer
// and every load of a position outside the image reads 0.
#pragma once

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "contract.h"

namespace sasa::cpu {

// One (batch, head) image of a (B, heads, H, W, D) tensor, by strides (elements).
template <typename S>
struct Plane {
  S* data;
  int64_t row_stride, col_stride, channel_stride;
  S& operator()(int i, int x, int d) const { return data[i * row_stride + x * col_stride + d * channel_stride]; }
};

// Aligned storage for n vectors (std::vector would not honour the vectors' alignment).
template <typename T>
class VecBuffer {
 public:
  explicit VecBuffer(size_t n) : data_(new Vec<T>[n]()) {}
  T* data() { return reinterpret_cast<T*>(data_.get()); }
  const T* data() const { return reinterpret_cast<const T*>(data_.get()); }
  Strided<T> strided() { return {data(), kLanes<T>}; }
  Vec<T>& operator[](size_t i) { return data_[i]; }

 private:
  std::unique_ptr<Vec<T>[]> data_;
};

// The most planes PackedRows interleaves (a power of two).
inline constexpr int kMaxInterleave = 4;

// f(std::integral_constant<int, HEADS>{}) with HEADS = ``heads``, a power of two up to MOST and kLanes<T>: the
// kernels' row loops, PackedRows' packing and store_row with the interleave known at compile time (shifts by HEADS
// lanes as constant displacements; the (de-)interleaving loops vectorize).
template <typename T, int MOST, int HEADS = 1, class F>
inline void with_heads(int heads, const F& f) {
  if constexpr (2 * HEADS <= MOST && 2 * HEADS <= kLanes<T>) {
    if (heads > HEADS) return with_heads<T, MOST, 2 * HEADS>(heads, f);
  }
  f(std::integral_constant<int, HEADS>{});
}

// Rows of ``interleave`` planes (heads) as T, scaled, in a ring of ``capacity`` rows (row i lives in slot i %
// capacity, so a sweep down the image packs each row once and overwrites rows it has left behind). The planes'
// pixels are interleaved: lane x * interleave + s holds column x of plane s, so a vector of consecutive lanes holds
// whole pixels of several heads where one head's row would leave lanes empty (forward.h), and a shift by u columns
// is a shift by u * interleave lanes for every plane at once. Channel d of a row is a segment of (W + radius)
// interleave lanes rounded up to whole vectors: the image row followed by at least ``radius`` zero columns, every
// segment starting on a vector boundary (aligned loads at the query blocks' columns: a load that straddles two
// cache lines costs two of the load ports' slots). Consecutive segments share those zeros, so a window shifted by
// up to ``radius`` columns either way from any column of the image reads real keys or zeros (masked positions),
// never another row's data. The front and back padding absorb the loads of the last, partial vector of a row and
// of the leftmost/rightmost shifts.
template <typename T>
class PackedRows {
 public:
  PackedRows(int capacity, int channels, int width, int radius, int interleave)
      : capacity_(capacity),
        channels_(channels),
        width_(width),
        interleave_(interleave),
        segment_(round_up(static_cast<int64_t>(width + radius) * interleave)),
        front_(round_up(static_cast<int64_t>(radius) * interleave + kLanes<T>)),
        data_(static_cast<size_t>(front_ + static_cast<int64_t>(capacity) * channels * segment_ +
                                  static_cast<int64_t>(radius) * interleave + 2 * kLanes<T>) /
                  kLanes<T> + 1) {}

  // Pack rows [row_begin, row_end) of planes[0 .. interleave) into their slots. Only the first W interleave lanes
  // of a segment are ever written: the zero gaps and the padding stay zero.
  template <typename S>
  void pack(const Plane<const S>* planes, int row_begin, int row_end, T scale) {
    with_heads<T, kMaxInterleave>(interleave_, [&](auto heads) {
      pack_rows<decltype(heads)::value>(planes, row_begin, row_end, scale);
    });
  }

  // Channel ``channel`` of row ``row`` from lane ``x`` (column x / interleave).
  const T* at(int row, int channel, int x) const {
    return data_.data() + front_ + (static_cast<int64_t>(row % capacity_) * channels_ + channel) * segment_ + x;
  }
  int64_t channel_stride() const { return segment_; }

 private:
  static int64_t round_up(int64_t n) { return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

  // pack with HEADS = interleave_, known at compile time: the interleaving stores vectorize. Interleaved planes, and
  // one plane's runs of 8 rows or more (the backward's whole bands): channel by channel, its rows in order (one
  // stream per plane in SASA2d's channel-major layout), which took about 0.72 of the time of row by row at k = 3, 4
  // heads of 28 x 28, batch 8 (AMD Zen 4, the forward against an unchanged kernel in two runs: 1.015 and 1.404), and
  // for the backward's one plane 0.967 [0.953, 0.997] of the backward's time at k = 19, 28 x 28 batch 8 (0.99 at
  // batch 1; AMD Zen 5 f26m2). One plane's few rows (the forward packs a group's 4 new rows at a time): row by row,
  // which took about 0.87-0.90 of channel by channel (k = 3, 32 x 32, batch 8: 1.006 and 1.039 against 1.15).
  template <int HEADS, typename S>
  void pack_rows(const Plane<const S>* planes, int row_begin, int row_end, T scale) {
    bool unit = true;
    for (int s = 0; s < HEADS; ++s) unit = unit && planes[s].col_stride == 1;
    const auto pack_one = [&](int i, int d) {
      T* out = data_.data() + front_ + (static_cast<int64_t>(i % capacity_) * channels_ + d) * segment_;
      const S* in[HEADS];
      for (int s = 0; s < HEADS; ++s) in[s] = &planes[s](i, 0, d);
      if (unit) {
        for (int x = 0; x < width_; ++x) {
          for (int s = 0; s < HEADS; ++s) out[x * HEADS + s] = static_cast<T>(in[s][x]) * scale;
        }
      } else {
        for (int x = 0; x < width_; ++x) {
          for (int s = 0; s < HEADS; ++s) out[x * HEADS + s] = static_cast<T>(in[s][x * planes[s].col_stride]) * scale;
        }
      }
    };
    if (HEADS == 1 && row_end - row_begin < 8) {
      for (int i = row_begin; i < row_end; ++i) {
        for (int d = 0; d < channels_; ++d) pack_one(i, d);
      }
    } else {
      for (int d = 0; d < channels_; ++d) {
        for (int i = row_begin; i < row_end; ++i) pack_one(i, d);
      }
    }
  }

  int capacity_, channels_, width_, interleave_;
  int64_t segment_, front_;
  VecBuffer<T> data_;
};

// Round up to whole vectors: the width of the per-row scratch buffers.
template <typename T>
inline int padded_width(int width) {
  return (width + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// Write the first ``n`` lanes of D vectors (channel d at vals.get(d)), times ``factor``, to
// pixels (i, x0 .. x0 + n) of ``out``.
template <typename T, typename S>
inline void store_pixels(const Plane<S>& out, int i, int x0, int n, Strided<T> vals, int channels, T factor) {
  if (out.col_stride == 1) {
    for (int d = 0; d < channels; ++d) {
      const Vec<T> v = vals.get(d) * factor;
      S* dst = &out(i, x0, d);
      if constexpr (std::is_same_v<S, T>) {
        if (n == kLanes<T>) {
          store(dst, v);
        } else {
          store_first(dst, v, n);
        }
      } else {
        for (int lane = 0; lane < n; ++lane) dst[lane] = static_cast<S>(v[lane]);
      }
    }
  } else {
    for (int lane = 0; lane < n; ++lane) {
      S* dst = &out(i, x0 + lane, 0);
      for (int d = 0; d < channels; ++d) dst[d * out.channel_stride] = static_cast<S>(vals.base[d * vals.stride + lane] * factor);
    }
  }
}

// Channel d of row i of HEADS planes from one row of interleaved lanes (lane x * HEADS + s: plane s, column x).
template <int HEADS, typename T, typename S>
inline void deinterleave(const Plane<S>* planes, int i, int d, int width, const T* lanes, T factor) {
  for (int s = 0; s < HEADS; ++s) {
    S* out = &planes[s](i, 0, d);
    const int64_t step = planes[s].col_stride;
    if (step == 1) {
      for (int x = 0; x < width; ++x) out[x] = static_cast<S>(lanes[x * HEADS + s] * factor);
    } else {
      for (int x = 0; x < width; ++x) out[x * step] = static_cast<S>(lanes[x * HEADS + s] * factor);
    }
  }
}

// Write row i of ``interleave`` planes from D rows of lanes (channel d's lane x * interleave + s at rows + d *
// row_stride, PackedRows' interleaving), times ``factor``.
template <typename T, typename S>
inline void store_row(const Plane<S>* planes, int interleave, int i, int width, T* rows, int64_t row_stride,
                      int channels, T factor) {
  constexpr int L = kLanes<T>;
  with_heads<T, kMaxInterleave>(interleave, [&](auto heads) {
    constexpr int HEADS = decltype(heads)::value;  // known at compile time: the de-interleaving loads vectorize
    if constexpr (HEADS == 1) {
      for (int x0 = 0; x0 < width; x0 += L) {
        store_pixels(planes[0], i, x0, width - x0 < L ? width - x0 : L, Strided<T>{rows + x0, row_stride},
                     channels, factor);
      }
    } else {
      for (int d = 0; d < channels; ++d) deinterleave<HEADS>(planes, i, d, width, rows + d * row_stride, factor);
    }
  });
}

}  // namespace sasa::cpu
