// CUDA kernels of the fused SASA op (impl "native" on CUDA tensors), free of torch headers.
//
// Flash-style, on CUDA cores, fp32 accumulation for fp32 / fp16 / bf16 inputs (one instance serves both
// 16-bit formats: Bits16). A block owns a tile of
// pixels of one (batch, head) image; each pixel is handled by kGroup = DPAD / 8 threads, 8 channels
// each (DPAD = the head dim padded to a power of two, 8 .. 256), their partial dot products summed with
// warp shuffles (so per-thread state stays at a few dozen registers, no spills at any head dim).
// The tile's halo (the key/value pixels its windows touch, tile + r on each side, clipped to the image)
// goes through shared memory in chunks of rows x columns sized to the shared-memory budget, so any
// kernel size fits. Window bounds, relative offsets and the border rule come from ../sasa_index.h,
// the header the CPU kernel uses too; masked positions are never visited.
//
//   forward_kernel         queries: online softmax over the window, y and the log-sum-exp.
//   backward_query_kernel  queries: p recomputed from the log-sum-exp, dS = p (dP - delta); dQ, delta,
//                          the factorized relative terms and the per-pixel sums of dS over each row
//                          offset and each column offset (k + k values per pixel, never k^2).
//   backward_key_kernel    keys: the mirror image (the queries whose windows hold the key): dK, dV.
//   rel_partial_kernel / rel_sum_kernel   relative gradients: sum over pixels of dS sums times q, in
//                          fixed-size chunks, then over chunks in order.
// No atomics: every output element is written by one thread after a fixed-order loop, so results
// are deterministic. Relative logits are factorized: q . rel_row[o] and q . rel_col[c] once per
// offset (k D MACs per pixel). Logits are kept in base-2 units (q is scaled by scale * log2 e on
// load) so the exponentials are exp2f.
//
// Status: written and compiled (tests/test_native_cuda_compile.py checks ptxas' registers, spills and
// shared memory for sm_80 and sm_90) without a GPU to run it; scripts/gpu_benchmark.py validates it
// against the float64 reference with poisoned outputs. Tensor cores are not used: the (pixel, window)
// pairs form a band, not a dense tile, and mma code could not be validated here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../sasa_index.h"
#include "plan.h"
#include "sasa_cuda.h"

namespace sasa::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRelChunk = 1024;  // pixels per relative-gradient partial sum

// Shapes and the shared-memory chunk of one launch.
struct Geometry {
  int heads, height, width, channels, kernel_size, radius, row_channels;
  float scale;          // the op's scale
  float q_scale;        // scale * log2(e): q on load, so logits are in base-2 units
  int tiles_w;          // tiles per image row
  int chunk_rows, chunk_cols;
  bool bf16;            // 16-bit elements are bf16 (else fp16)
};

// 16-bit elements, fp16 or bf16 as Geometry::bf16 says: one kernel instance serves both formats (they
// differ in the conversions only), which halves the instances to compile.
struct Bits16 {
  unsigned short bits;
};
static_assert(sizeof(Bits16) == 2, "Bits16 must be a plain 16-bit element");

__device__ __forceinline__ float to_float(float x, const Geometry&) { return x; }
__device__ __forceinline__ float to_float(Bits16 x, const Geometry& g) {
  return g.bf16 ? __uint_as_float(static_cast<unsigned>(x.bits) << 16) : __half2float(__ushort_as_half(x.bits));
}

template <typename T>
__device__ __forceinline__ T from_float(float x, const Geometry& g);
template <>
__device__ __forceinline__ float from_float<float>(float x, const Geometry&) { return x; }
template <>
__device__ __forceinline__ Bits16 from_float<Bits16>(float x, const Geometry& g) {
  return {g.bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x))};
}



// Per-pixel scratch of the backward, in the workspace (fp32).
struct Scratch {
  float* delta;      // (B, heads, H, W): dO . O
  float* row_terms;  // (B, heads, H, W, k): q . rel_row[o], base-2 units
  float* col_terms;  // (B, heads, H, W, k): q . rel_col[c]
  float* ds_rows;    // (B, heads, H, W, k): sum of dS over the window's row o
  float* ds_cols;    // (B, heads, H, W, k): sum of dS over the window's column c
  float* partial;    // (heads, k, chunks, DPAD): relative-gradient partial sums
};

template <int G>
__device__ __forceinline__ unsigned group_mask() {
  if constexpr (G == 32) {
    return 0xffffffffu;
  } else {
    return ((1u << G) - 1u) << (threadIdx.x % 32 / G * G);
  }
}

// Sum over the G threads of one pixel (every one gets the total).
template <int G>
__device__ __forceinline__ float group_sum(float x, unsigned mask) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(mask, x, offset);
  return x;
}

// This thread's 8 channels [d0, d0 + 8) of a pixel, times factor; 0 past the head dim.
template <typename T>
__device__ __forceinline__ void load_slice(float (&x)[kSlice], const T* pixel, int d0, const Geometry& g, float factor) {
#pragma unroll
  for (int e = 0; e < kSlice; ++e) x[e] = d0 + e < g.channels ? to_float(pixel[d0 + e], g) * factor : 0.f;
}

__device__ __forceinline__ float dot_slice(const float (&x)[kSlice], const float* s) {
  const float4 a = *reinterpret_cast<const float4*>(s);
  const float4 b = *reinterpret_cast<const float4*>(s + 4);
  return x[0] * a.x + x[1] * a.y + x[2] * a.z + x[3] * a.w + x[4] * b.x + x[5] * b.y + x[6] * b.z + x[7] * b.w;
}

__device__ __forceinline__ void axpy_slice(float (&acc)[kSlice], float alpha, const float* s) {
  const float4 a = *reinterpret_cast<const float4*>(s);
  const float4 b = *reinterpret_cast<const float4*>(s + 4);
  acc[0] += alpha * a.x, acc[1] += alpha * a.y, acc[2] += alpha * a.z, acc[3] += alpha * a.w;
  acc[4] += alpha * b.x, acc[5] += alpha * b.y, acc[6] += alpha * b.z, acc[7] += alpha * b.w;
}

// Partial dot of this thread's slice with the channels [lo, hi) of a relative embedding row
// (table[d - lo] is channel d).
template <typename T>
__device__ __forceinline__ float rel_dot(const float (&x)[kSlice], const T* table, int d0, int lo, int hi,
                                         const Geometry& g) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    if (d0 + e >= lo && d0 + e < hi) s += x[e] * to_float(table[d0 + e - lo], g);
  }
  return s;
}

// The block's tile: first row and column, and this thread's pixel (i, j), group lane and channels.
template <int DPAD>
struct Tile {
  int row0, col0, i, j, pixel, lane, d0;
  bool valid;
  __device__ Tile(const Geometry& g) {
    using C = Config<DPAD>;
    row0 = blockIdx.y / g.tiles_w * C::kTileH;
    col0 = blockIdx.y % g.tiles_w * C::kTileW;
    pixel = threadIdx.x / C::kGroup;
    lane = threadIdx.x % C::kGroup;
    d0 = lane * kSlice;
    i = row0 + pixel / C::kTileW;
    j = col0 + pixel % C::kTileW;
    valid = i < g.height && j < g.width;
  }
  // The halo: rows [halo_row0, halo_row1) and columns [halo_col0, halo_col1) the tile's windows touch
  // (for a key tile: the queries whose windows hold its keys; the window is symmetric).
  __device__ int halo_row0(const Geometry& g) const { return window_begin(row0, g.radius); }
  __device__ int halo_row1(const Geometry& g) const {
    return window_end(min(row0 + Config<DPAD>::kTileH, g.height) - 1, g.radius, g.height);
  }
  __device__ int halo_col0(const Geometry& g) const { return window_begin(col0, g.radius); }
  __device__ int halo_col1(const Geometry& g) const {
    return window_end(min(col0 + Config<DPAD>::kTileW, g.width) - 1, g.radius, g.width);
  }
  // This pixel's window, clipped to the image and to a chunk [lo, hi); empty for padding threads.
  __device__ int row_begin(const Geometry& g, int lo) const { return max(lo, window_begin(i, g.radius)); }
  __device__ int row_end(const Geometry& g, int hi) const { return valid ? min(hi, window_end(i, g.radius, g.height)) : 0; }
  __device__ int col_begin(const Geometry& g, int lo) const { return max(lo, window_begin(j, g.radius)); }
  __device__ int col_end(const Geometry& g, int hi) const { return valid ? min(hi, window_end(j, g.radius, g.width)) : 0; }
  // In-bounds pixel index (padding threads read the nearest real pixel and store nothing).
  __device__ int64_t offset(const Geometry& g) const {
    return static_cast<int64_t>(min(i, g.height - 1)) * g.width + min(j, g.width - 1);
  }
};

// Copy channels [0, DPAD) (0 past the head dim) of pixels [a0, a0 + rows) x [b0, b0 + cols) of one
// image into shared memory, kStride floats per pixel, times factor.
template <typename T, int DPAD>
__device__ void load_chunk(float* dst, const T* image, const Geometry& g, int a0, int rows, int b0, int cols,
                           float factor) {
  const int n = rows * cols * DPAD;
  for (int idx = threadIdx.x; idx < n; idx += kThreads) {
    const int d = idx % DPAD, p = idx / DPAD;
    const int64_t src = (static_cast<int64_t>(a0 + p / cols) * g.width + b0 + p % cols) * g.channels + d;
    dst[p * Config<DPAD>::kStride + d] = d < g.channels ? to_float(image[src], g) * factor : 0.f;
  }
}

// Walk the tile's halo in chunks of at most chunk_rows x chunk_cols pixels: between two barriers
// stage(a0, rows, b0, cols) copies the chunk of pixels [a0, a0 + rows) x [b0, b0 + cols) into shared
// memory, then visit(a0, rows, b0, cols) reads it (every thread of the block takes part in both).
template <int DPAD, typename Stage, typename Visit>
__device__ __forceinline__ void for_each_halo_chunk(const Tile<DPAD>& t, const Geometry& g, Stage stage, Visit visit) {
  const int hr1 = t.halo_row1(g), hc1 = t.halo_col1(g);
  for (int a0 = t.halo_row0(g); a0 < hr1; a0 += g.chunk_rows) {
    const int rows = min(g.chunk_rows, hr1 - a0);
    for (int b0 = t.halo_col0(g); b0 < hc1; b0 += g.chunk_cols) {
      const int cols = min(g.chunk_cols, hc1 - b0);
      __syncthreads();
      stage(a0, rows, b0, cols);
      __syncthreads();
      visit(a0, rows, b0, cols);
    }
  }
}

// Column terms q . rel_col[c] (base-2 units) of this pixel into terms[c * kPixels + pixel].
template <typename T, int DPAD>
__device__ void column_terms(float* terms, const float (&q)[kSlice], const T* rel_col, int head, const Geometry& g,
                             const Tile<DPAD>& t, unsigned mask) {
  using C = Config<DPAD>;
  const int k = g.kernel_size, cols = g.channels - g.row_channels;
  for (int c = 0; c < k; ++c) {
    const float term = rel_col == nullptr
                           ? 0.f
                           : group_sum<C::kGroup>(
                                 rel_dot(q, rel_col + (static_cast<int64_t>(head) * k + c) * cols, t.d0, g.row_channels, g.channels, g),
                                 mask);
    if (t.lane == 0) terms[c * C::kPixels + t.pixel] = term;
  }
}

template <typename T, int DPAD>
__device__ __forceinline__ float row_term(const float (&q)[kSlice], const T* rel_row, int head, int offset,
                                          const Geometry& g, const Tile<DPAD>& t, unsigned mask) {
  if (rel_row == nullptr) return 0.f;
  const T* table = rel_row + (static_cast<int64_t>(head) * g.kernel_size + offset) * g.row_channels;
  return group_sum<Config<DPAD>::kGroup>(rel_dot(q, table, t.d0, 0, g.row_channels, g), mask);
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const T* __restrict__ rel_row, const T* __restrict__ rel_col, T* __restrict__ out,
                   float* __restrict__ lse, Geometry g) {
  using C = Config<DPAD>;
  extern __shared__ float4 shared4[];
  float* col_terms = reinterpret_cast<float*>(shared4);                      // [k][kPixels]
  float* keys = col_terms + fixed_floats<DPAD>(Kernel::kForward, g.kernel_size);  // [chunk pixels][kStride]
  float* values = keys + g.chunk_rows * g.chunk_cols * C::kStride;
  const Tile<DPAD> t(g);
  const unsigned mask = group_mask<C::kGroup>();
  const int head = blockIdx.x % g.heads, r = g.radius;
  const int64_t image = static_cast<int64_t>(blockIdx.x) * g.height * g.width;

  float qv[kSlice];
  load_slice(qv, q + (image + t.offset(g)) * g.channels, t.d0, g, g.q_scale);
  column_terms(col_terms, qv, rel_col, head, g, t, mask);
  float m = -INFINITY, l = 0.f, acc[kSlice] = {};

  const auto stage_keys_values = [&](int a0, int rows, int b0, int cols) {
    load_chunk<T, DPAD>(keys, k + image * g.channels, g, a0, rows, b0, cols, 1.f);
    load_chunk<T, DPAD>(values, v + image * g.channels, g, a0, rows, b0, cols, 1.f);
  };
  for_each_halo_chunk(t, g, stage_keys_values, [&](int a0, int rows, int b0, int cols) {
    for (int a = t.row_begin(g, a0); a < t.row_end(g, a0 + rows); ++a) {
      const float rt = row_term(qv, rel_row, head, offset_index(t.i, a, r), g, t, mask);
      for (int b = t.col_begin(g, b0); b < t.col_end(g, b0 + cols); ++b) {
        const int p = ((a - a0) * cols + b - b0) * C::kStride + t.d0;
        const float s = group_sum<C::kGroup>(dot_slice(qv, keys + p), mask) + rt +
                        col_terms[offset_index(t.j, b, r) * C::kPixels + t.pixel];
        if (s > m) {  // online softmax: rescale when the running max grows
          const float correction = exp2f(m - s);
          l *= correction;
#pragma unroll
          for (int e = 0; e < kSlice; ++e) acc[e] *= correction;
          m = s;
        }
        const float prob = exp2f(s - m);
        l += prob;
        axpy_slice(acc, prob, values + p);
      }
    }
  });
  if (!t.valid) return;
  const int64_t pix = image + t.offset(g);
  const float inv = 1.f / l;
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    if (t.d0 + e < g.channels) out[pix * g.channels + t.d0 + e] = from_float<T>(acc[e] * inv, g);
  }
  if (t.lane == 0) lse[pix] = (m + log2f(l)) * kLn2;
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads, 1)
    backward_query_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ rel_row, const T* __restrict__ rel_col, const T* __restrict__ out,
                          const T* __restrict__ grad_out, const float* __restrict__ lse, T* __restrict__ dq,
                          Scratch scratch, Geometry g) {
  using C = Config<DPAD>;
  extern __shared__ float4 shared4[];
  const int kk = g.kernel_size;
  float* col_terms = reinterpret_cast<float*>(shared4);  // [k][kPixels]
  float* ds_rows = col_terms + kk * C::kPixels;           // [k][kPixels]
  float* ds_cols = ds_rows + kk * C::kPixels;             // [k][kPixels]
  float* keys = col_terms + fixed_floats<DPAD>(Kernel::kBackwardQuery, kk);  // [chunk pixels][kStride]
  float* values = keys + g.chunk_rows * g.chunk_cols * C::kStride;
  const Tile<DPAD> t(g);
  const unsigned mask = group_mask<C::kGroup>();
  const int head = blockIdx.x % g.heads, r = g.radius;
  const int64_t image = static_cast<int64_t>(blockIdx.x) * g.height * g.width;
  const int64_t pix = image + t.offset(g);

  float qv[kSlice], gv[kSlice], ov[kSlice];
  load_slice(qv, q + pix * g.channels, t.d0, g, g.q_scale);
  load_slice(gv, grad_out + pix * g.channels, t.d0, g, 1.f);
  load_slice(ov, out + pix * g.channels, t.d0, g, 1.f);
  float delta = 0.f;
#pragma unroll
  for (int e = 0; e < kSlice; ++e) delta += gv[e] * ov[e];
  delta = group_sum<C::kGroup>(delta, mask);
  const float lse2 = lse[pix] * kLog2e;
  column_terms(col_terms, qv, rel_col, head, g, t, mask);
  for (int o = 0; o < kk; ++o) {
    const float rt = row_term(qv, rel_row, head, o, g, t, mask);
    if (t.lane == 0) {
      ds_rows[o * C::kPixels + t.pixel] = 0.f;
      ds_cols[o * C::kPixels + t.pixel] = 0.f;
      if (t.valid) {
        scratch.row_terms[pix * kk + o] = rt;
        scratch.col_terms[pix * kk + o] = col_terms[o * C::kPixels + t.pixel];
      }
    }
  }
  if (t.valid && t.lane == 0) scratch.delta[pix] = delta;
  float acc[kSlice] = {};

  const auto stage_keys_values = [&](int a0, int rows, int b0, int cols) {
    load_chunk<T, DPAD>(keys, k + image * g.channels, g, a0, rows, b0, cols, 1.f);
    load_chunk<T, DPAD>(values, v + image * g.channels, g, a0, rows, b0, cols, 1.f);
  };
  for_each_halo_chunk(t, g, stage_keys_values, [&](int a0, int rows, int b0, int cols) {
    for (int a = t.row_begin(g, a0); a < t.row_end(g, a0 + rows); ++a) {
      const int o = offset_index(t.i, a, r);
      const float rt = row_term(qv, rel_row, head, o, g, t, mask);
      float row_sum = 0.f;
      for (int b = t.col_begin(g, b0); b < t.col_end(g, b0 + cols); ++b) {
        const int p = ((a - a0) * cols + b - b0) * C::kStride + t.d0;
        const int c = offset_index(t.j, b, r);
        const float s = group_sum<C::kGroup>(dot_slice(qv, keys + p), mask) + rt + col_terms[c * C::kPixels + t.pixel];
        const float prob = exp2f(s - lse2);
        const float ds = prob * (group_sum<C::kGroup>(dot_slice(gv, values + p), mask) - delta);
        axpy_slice(acc, ds, keys + p);
        row_sum += ds;
        if (t.lane == 0) ds_cols[c * C::kPixels + t.pixel] += ds;
      }
      if (t.lane == 0) ds_rows[o * C::kPixels + t.pixel] += row_sum;
    }
  });
  __syncwarp(mask);  // the group's lane 0 wrote its dS sums
  if (!t.valid) return;
  if (rel_row != nullptr) {  // dQ's relative part: sum_o dS_rows[o] rel_row[o] + sum_c dS_cols[c] rel_col[c]
    const int dr = g.row_channels, dc = g.channels - dr;
    for (int o = 0; o < kk; ++o) {
      const float sr = ds_rows[o * C::kPixels + t.pixel], sc = ds_cols[o * C::kPixels + t.pixel];
      const T* row_table = rel_row + (static_cast<int64_t>(head) * kk + o) * dr;
      const T* col_table = rel_col + (static_cast<int64_t>(head) * kk + o) * dc;
#pragma unroll
      for (int e = 0; e < kSlice; ++e) {
        const int d = t.d0 + e;
        if (d < dr) {
          acc[e] += sr * to_float(row_table[d], g);
        } else if (d < g.channels) {
          acc[e] += sc * to_float(col_table[d - dr], g);
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    if (t.d0 + e < g.channels) dq[pix * g.channels + t.d0 + e] = from_float<T>(acc[e] * g.scale, g);
  }
  for (int o = t.lane; o < kk; o += C::kGroup) {
    scratch.ds_rows[pix * kk + o] = ds_rows[o * C::kPixels + t.pixel];
    scratch.ds_cols[pix * kk + o] = ds_cols[o * C::kPixels + t.pixel];
  }
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads, 1)
    backward_key_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ grad_out, const float* __restrict__ lse, T* __restrict__ dk,
                        T* __restrict__ dv, Scratch scratch, Geometry g) {
  using C = Config<DPAD>;
  extern __shared__ float4 shared4[];
  const int kk = g.kernel_size, ns = chunk_pixel_floats<DPAD>(Kernel::kBackwardKey, kk) - 2 * C::kStride;
  const int chunk = g.chunk_rows * g.chunk_cols;
  float* queries = reinterpret_cast<float*>(shared4);  // [chunk pixels][kStride], q * scale * log2 e
  float* grads = queries + chunk * C::kStride;         // [chunk pixels][kStride], dO
  float* stats = grads + chunk * C::kStride;           // [chunk pixels][ns]
  const Tile<DPAD> t(g);
  const unsigned mask = group_mask<C::kGroup>();
  const int r = g.radius;
  const int64_t image = static_cast<int64_t>(blockIdx.x) * g.height * g.width;
  const int64_t pix = image + t.offset(g);

  float kv[kSlice], vv[kSlice], dkv[kSlice] = {}, dvv[kSlice] = {};
  load_slice(kv, k + pix * g.channels, t.d0, g, 1.f);
  load_slice(vv, v + pix * g.channels, t.d0, g, 1.f);

  const auto stage_queries_grads = [&](int a0, int rows, int b0, int cols) {
    load_chunk<T, DPAD>(queries, q + image * g.channels, g, a0, rows, b0, cols, g.q_scale);
    load_chunk<T, DPAD>(grads, grad_out + image * g.channels, g, a0, rows, b0, cols, 1.f);
    for (int idx = threadIdx.x; idx < rows * cols * ns; idx += kThreads) {
      const int p = idx / ns, f = idx % ns;
      const int64_t src = image + static_cast<int64_t>(a0 + p / cols) * g.width + b0 + p % cols;
      stats[idx] = f == 0 ? lse[src] * kLog2e
                   : f == 1 ? scratch.delta[src]
                   : f < 2 + kk ? scratch.row_terms[src * kk + f - 2]
                                : scratch.col_terms[src * kk + f - 2 - kk];
    }
  };
  for_each_halo_chunk(t, g, stage_queries_grads, [&](int a0, int rows, int b0, int cols) {
    for (int i = t.row_begin(g, a0); i < t.row_end(g, a0 + rows); ++i) {
      const int o = offset_index(i, t.i, r);  // this key's row offset in the window of query row i
      for (int j = t.col_begin(g, b0); j < t.col_end(g, b0 + cols); ++j) {
        const int p = (i - a0) * cols + j - b0;
        const float* st = stats + p * ns;
        const float* qp = queries + p * C::kStride + t.d0;
        const float* gp = grads + p * C::kStride + t.d0;
        const float s = group_sum<C::kGroup>(dot_slice(kv, qp), mask) + st[2 + o] + st[2 + kk + offset_index(j, t.j, r)];
        const float prob = exp2f(s - st[0]);
        const float ds = prob * (group_sum<C::kGroup>(dot_slice(vv, gp), mask) - st[1]);
        axpy_slice(dvv, prob, gp);
        axpy_slice(dkv, ds, qp);
      }
    }
  });
  if (!t.valid) return;
#pragma unroll
  for (int e = 0; e < kSlice; ++e) {
    if (t.d0 + e < g.channels) {
      dk[pix * g.channels + t.d0 + e] = from_float<T>(dkv[e] / kLog2e, g);  // queries carry scale * log2 e
      dv[pix * g.channels + t.d0 + e] = from_float<T>(dvv[e], g);
    }
  }
}

// partial[h, o, chunk, d] = sum over the chunk's pixels (all batches) of dS_sum[o] * q[d], where the
// dS sum is over the row offset o for d < Dr and over the column offset o otherwise. One thread per d.
template <typename T>
__global__ void rel_partial_kernel(const T* __restrict__ q, Scratch scratch, int batch, int dpad, Geometry g) {
  const int h = blockIdx.x / g.kernel_size, o = blockIdx.x % g.kernel_size, d = threadIdx.x;
  const int64_t hw = static_cast<int64_t>(g.height) * g.width, n = batch * hw;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kRelChunk, end = min(begin + kRelChunk, n);
  const float* sums = d < g.row_channels ? scratch.ds_rows : scratch.ds_cols;
  float acc = 0.f;
  if (d < g.channels) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t pix = (idx / hw * g.heads + h) * hw + idx % hw;
      acc += sums[pix * g.kernel_size + o] * to_float(q[pix * g.channels + d], g);
    }
  }
  scratch.partial[(static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * dpad + d] = acc;
}

template <typename T>
__global__ void rel_sum_kernel(Scratch scratch, int chunks, int dpad, T* __restrict__ drel_row,
                               T* __restrict__ drel_col, Geometry g) {
  const int d = threadIdx.x;
  if (d >= g.channels) return;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) acc += scratch.partial[(static_cast<int64_t>(blockIdx.x) * chunks + c) * dpad + d];
  acc *= g.scale;
  const int dr = g.row_channels;
  if (d < dr) {
    drel_row[static_cast<int64_t>(blockIdx.x) * dr + d] = from_float<T>(acc, g);
  } else {
    drel_col[static_cast<int64_t>(blockIdx.x) * (g.channels - dr) + d - dr] = from_float<T>(acc, g);
  }
}

int padded_channels(int channels) {
  int dpad = kSlice;
  while (dpad < channels) dpad *= 2;
  return dpad;
}

int64_t pixels(const Problem& p) { return static_cast<int64_t>(p.batch) * p.heads * p.height * p.width; }

int rel_chunks(const Problem& p) {
  return static_cast<int>((static_cast<int64_t>(p.batch) * p.height * p.width + kRelChunk - 1) / kRelChunk);
}

Scratch scratch_of(const Problem& p, float* workspace) {
  const int64_t n = pixels(p), nk = n * p.kernel_size;
  return {workspace, workspace + n, workspace + n + nk, workspace + n + 2 * nk, workspace + n + 3 * nk,
          workspace + n + 4 * nk};
}

// Geometry of a launch of ``kernel`` and its dynamic shared memory (plan.h).
template <int DPAD>
size_t geometry(const Problem& p, bool bf16, Kernel kernel, Geometry& g) {
  const Plan chunk = plan<DPAD>(kernel, p.height, p.width, p.kernel_size);
  g = {p.heads, p.height, p.width, p.channels, p.kernel_size, p.kernel_size / 2, p.channels / 2, p.scale,
       p.scale * kLog2e, (p.width + Config<DPAD>::kTileW - 1) / Config<DPAD>::kTileW, chunk.chunk_rows, chunk.chunk_cols,
       bf16};
  return chunk.shared_bytes;
}

// Launch with ``shared`` dynamic bytes (opting in above 48 KiB where the device allows it).
template <typename Kernel, typename... Args>
const char* launch(Kernel kernel, dim3 grid, size_t shared, cudaStream_t stream, Args... args) {
  if (shared > kDefaultShared) {
    int device = 0, limit = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (shared > static_cast<size_t>(limit)) return "kernel_size too large: the kernel's shared memory exceeds the device's";
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  }
  kernel<<<grid, kThreads, shared, stream>>>(args...);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <int DPAD>
dim3 tile_grid(const Problem& p) {
  using C = Config<DPAD>;
  const unsigned tiles = ((p.height + C::kTileH - 1) / C::kTileH) * ((p.width + C::kTileW - 1) / C::kTileW);
  return dim3(static_cast<unsigned>(p.batch * p.heads), tiles);
}

template <typename T, int DPAD>
const char* forward_impl(const Problem& p, bool bf16, const void* q, const void* k, const void* v, const void* rel_row,
                         const void* rel_col, void* out, float* lse, cudaStream_t stream) {
  Geometry g;
  const size_t shared = geometry<DPAD>(p, bf16, Kernel::kForward, g);
  return launch(forward_kernel<T, DPAD>, tile_grid<DPAD>(p), shared, stream, static_cast<const T*>(q),
                static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(rel_row),
                static_cast<const T*>(rel_col), static_cast<T*>(out), lse, g);
}

template <typename T, int DPAD>
const char* backward_impl(const Problem& p, bool bf16, const void* grad_out, const void* q, const void* k, const void* v,
                          const void* rel_row, const void* rel_col, const void* out, const float* lse, void* dq,
                          void* dk, void* dv, void* drel_row, void* drel_col, float* workspace, cudaStream_t stream) {
  const Scratch scratch = scratch_of(p, workspace);
  const T* qt = static_cast<const T*>(q);
  Geometry g;
  size_t shared = geometry<DPAD>(p, bf16, Kernel::kBackwardQuery, g);
  const char* error = launch(backward_query_kernel<T, DPAD>, tile_grid<DPAD>(p), shared, stream, qt,
                             static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(rel_row),
                             static_cast<const T*>(rel_col), static_cast<const T*>(out),
                             static_cast<const T*>(grad_out), lse, static_cast<T*>(dq), scratch, g);
  if (error != nullptr) return error;
  shared = geometry<DPAD>(p, bf16, Kernel::kBackwardKey, g);
  error = launch(backward_key_kernel<T, DPAD>, tile_grid<DPAD>(p), shared, stream, qt, static_cast<const T*>(k),
                 static_cast<const T*>(v), static_cast<const T*>(grad_out), lse, static_cast<T*>(dk),
                 static_cast<T*>(dv), scratch, g);
  if (error != nullptr || rel_row == nullptr) return error;
  const int chunks = rel_chunks(p);
  const dim3 rel_grid(static_cast<unsigned>(p.heads * p.kernel_size), static_cast<unsigned>(chunks));
  rel_partial_kernel<T><<<rel_grid, DPAD, 0, stream>>>(qt, scratch, p.batch, DPAD, g);
  rel_sum_kernel<T><<<p.heads * p.kernel_size, DPAD, 0, stream>>>(scratch, chunks, DPAD, static_cast<T*>(drel_row),
                                                                   static_cast<T*>(drel_col), g);
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

// The largest padded head dim compiled: kMaxChannels (sasa_cuda.h), unless a build asks for fewer instances
// (tests/test_native_cuda_compile.py checks the benchmark's head dims, <= 64, to compile in time).
#ifndef SASA_CUDA_MAX_PADDED_DIM
#define SASA_CUDA_MAX_PADDED_DIM 256
#endif

// Calls op.template run<T, DPAD>() for the element type (float, or Bits16 for both 16-bit formats) and
// the padded head dim.
template <typename Op>
const char* dispatch(DType dtype, int channels, const Op& op) {
  const auto by_dim = [&](auto tag) -> const char* {
    using T = decltype(tag);
    switch (channels < 1 ? 0 : padded_channels(channels)) {
      case 8: return op.template run<T, 8>();
      case 16: return op.template run<T, 16>();
      case 32: return op.template run<T, 32>();
      case 64: return op.template run<T, 64>();
#if SASA_CUDA_MAX_PADDED_DIM >= 128
      case 128: return op.template run<T, 128>();
#endif
#if SASA_CUDA_MAX_PADDED_DIM >= 256
      case 256: return op.template run<T, 256>();
#endif
      default: return "head dim out of range for the CUDA kernels";
    }
  };
  return dtype == DType::kFloat32 ? by_dim(float{}) : by_dim(Bits16{});
}

struct ForwardOp {
  const Problem& p;
  bool bf16;
  const void *q, *k, *v, *rel_row, *rel_col;
  void* out;
  float* lse;
  void* stream;
  template <typename T, int DPAD>
  const char* run() const {
    return forward_impl<T, DPAD>(p, bf16, q, k, v, rel_row, rel_col, out, lse, static_cast<cudaStream_t>(stream));
  }
};

struct BackwardOp {
  const Problem& p;
  bool bf16;
  const void *grad_out, *q, *k, *v, *rel_row, *rel_col, *out;
  const float* lse;
  void *dq, *dk, *dv, *drel_row, *drel_col;
  float* workspace;
  void* stream;
  template <typename T, int DPAD>
  const char* run() const {
    return backward_impl<T, DPAD>(p, bf16, grad_out, q, k, v, rel_row, rel_col, out, lse, dq, dk, dv, drel_row, drel_col,
                                  workspace, static_cast<cudaStream_t>(stream));
  }
};

}  // namespace

size_t backward_workspace_floats(const Problem& p) {
  return static_cast<size_t>(pixels(p)) * (1 + 4 * p.kernel_size) +
         static_cast<size_t>(p.heads) * p.kernel_size * rel_chunks(p) * padded_channels(p.channels);
}

const char* forward(DType dtype, const Problem& p, const void* q, const void* k, const void* v, const void* rel_row,
                    const void* rel_col, void* out, float* lse, void* stream) {
  if (pixels(p) == 0) return nullptr;  // an empty batch: nothing to launch
  return dispatch(dtype, p.channels, ForwardOp{p, dtype == DType::kBFloat16, q, k, v, rel_row, rel_col, out, lse, stream});
}

const char* backward(DType dtype, const Problem& p, const void* grad_out, const void* q, const void* k, const void* v,
                     const void* rel_row, const void* rel_col, const void* out, const float* lse, void* dq, void* dk,
                     void* dv, void* drel_row, void* drel_col, float* workspace, void* stream) {
  if (pixels(p) == 0) return nullptr;  // an empty batch: nothing to launch
  return dispatch(dtype, p.channels,
                  BackwardOp{p, dtype == DType::kBFloat16, grad_out, q, k, v, rel_row, rel_col, out, lse, dq, dk, dv,
                             drel_row, drel_col, workspace, stream});
}

}  // namespace sasa::cuda
