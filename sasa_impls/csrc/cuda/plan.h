// Tiling and shared-memory plan of the CUDA kernels (sasa_cuda.cu). Plain C++ with no CUDA header, so
// that tests/test_native_cuda_compile.py can evaluate the plan with g++ on a machine without a GPU.
#pragma once

#include <cstddef>

#include "../sasa_index.h"  // SASA_HOST_DEVICE

namespace sasa::cuda {

constexpr int kThreads = 128;  // per block
constexpr int kSlice = 8;      // channels per thread
constexpr size_t kDefaultShared = 48 * 1024;  // dynamic shared memory without opting in

// Tiling for a padded head dim DPAD (8 .. 256): kGroup threads per pixel, kPixels = kTileH x kTileW
// pixels per block, kStride floats per pixel in shared memory (4 more than DPAD, so that neighbouring
// pixels' float4 reads spread over the banks).
template <int DPAD>
struct Config {
  static constexpr int kGroup = DPAD / kSlice;
  static constexpr int kPixels = kThreads / kGroup;
  static constexpr int kTileH = kPixels >= 64 ? 8 : kPixels >= 16 ? 4 : 2;
  static constexpr int kTileW = kPixels / kTileH;
  static constexpr int kStride = DPAD + 4;
};

enum class Kernel { kForward, kBackwardQuery, kBackwardKey };

// Floats of shared memory per block besides the halo chunk: per pixel of the tile, the column terms
// (forward) and the dS sums per row and column offset (backward, queries).
template <int DPAD>
SASA_HOST_DEVICE constexpr int fixed_floats(Kernel kernel, int kernel_size) {
  return kernel == Kernel::kForward         ? kernel_size * Config<DPAD>::kPixels
         : kernel == Kernel::kBackwardQuery ? 3 * kernel_size * Config<DPAD>::kPixels
                                            : 0;
}

// Floats per halo pixel of a chunk: key and value (queries), or query and dO plus the query's lse,
// delta, k row terms and k column terms (keys).
template <int DPAD>
SASA_HOST_DEVICE constexpr int chunk_pixel_floats(Kernel kernel, int kernel_size) {
  return 2 * Config<DPAD>::kStride + (kernel == Kernel::kBackwardKey ? 2 + 2 * kernel_size : 0);
}

struct Plan {
  int chunk_rows, chunk_cols;  // the halo goes through shared memory in chunks of this many pixels
  size_t shared_bytes;         // dynamic shared memory per block
};

// The largest chunk that fits 48 KiB besides the fixed part (at least 16 KiB: above 48 KiB in all the
// launch opts in to more shared memory, up to the device's limit).
template <int DPAD>
Plan plan(Kernel kernel, int height, int width, int kernel_size) {
  using C = Config<DPAD>;
  const int r = kernel_size / 2;
  const int halo_rows = C::kTileH + 2 * r < height ? C::kTileH + 2 * r : height;
  const int halo_cols = C::kTileW + 2 * r < width ? C::kTileW + 2 * r : width;
  const size_t fixed = static_cast<size_t>(fixed_floats<DPAD>(kernel, kernel_size)) * sizeof(float);
  const size_t pixel = static_cast<size_t>(chunk_pixel_floats<DPAD>(kernel, kernel_size)) * sizeof(float);
  const size_t budget = fixed + 16 * 1024 > kDefaultShared ? 16 * 1024 : kDefaultShared - fixed;
  const int fit = static_cast<int>(budget / pixel);
  const int cols = fit < halo_cols ? (fit > 1 ? fit : 1) : halo_cols;
  const int rows_fit = fit / cols;
  const int rows = rows_fit < halo_rows ? (rows_fit > 1 ? rows_fit : 1) : halo_rows;
  return {rows, cols, fixed + static_cast<size_t>(rows) * cols * pixel};
}

}  // namespace sasa::cuda
