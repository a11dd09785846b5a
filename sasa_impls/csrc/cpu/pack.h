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

// Rows of one plane as T, scaled, in a ring of ``capacity`` rows (row i lives in slot i % capacity, so
// a sweep down the image packs each row once and overwrites rows it has left behind). Channel d of a
// row is a segment of W + radius elements rounded up to whole vectors: the image row followed by at least
// ``radius`` zeros, every segment starting on a vector boundary (aligned loads at the query blocks' columns:
// a load that straddles two cache lines costs two of the load ports' slots). Consecutive
// segments share those zeros, so a window shifted by up to ``radius`` columns either way from any
// column of the image reads real keys or zeros (masked positions), never another row's data. The
// front and back padding absorb the loads of the last, partial vector of a row and of the
// leftmost/rightmost shifts.
template <typename T>
class PackedRows {
 public:
  PackedRows(int capacity, int channels, int width, int radius)
      : capacity_(capacity),
        channels_(channels),
        width_(width),
        segment_(round_up(width + radius)),
        front_(round_up(radius + kLanes<T>)),
        data_(static_cast<size_t>(front_ + static_cast<int64_t>(capacity) * channels * segment_ + radius + 2 * kLanes<T>) /
                  kLanes<T> + 1) {}

  // Pack row i of ``src`` into its slot. Only [0, W) of a segment is ever written: the zero gaps and the
  // padding stay zero.
  template <typename S>
  void pack(const Plane<const S>& src, int i, T scale) {
    for (int d = 0; d < channels_; ++d) {
      T* out = data_.data() + front_ + (static_cast<int64_t>(i % capacity_) * channels_ + d) * segment_;
      const S* in = &src(i, 0, d);
      if (src.col_stride == 1) {
        for (int x = 0; x < width_; ++x) out[x] = static_cast<T>(in[x]) * scale;
      } else {
        for (int x = 0; x < width_; ++x) out[x] = static_cast<T>(in[x * src.col_stride]) * scale;
      }
    }
  }

  template <typename S>
  void pack(const Plane<const S>& src, int row_begin, int row_end, T scale) {
    for (int i = row_begin; i < row_end; ++i) pack(src, i, scale);
  }

  const T* at(int row, int channel, int x) const {
    return data_.data() + front_ + (static_cast<int64_t>(row % capacity_) * channels_ + channel) * segment_ + x;
  }
  int64_t channel_stride() const { return segment_; }

 private:
  static int64_t round_up(int64_t n) { return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

  int capacity_, channels_, width_;
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

}  // namespace sasa::cpu
