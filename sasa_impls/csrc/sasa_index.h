// Index math of the SASA op shared by the CPU (cpu/) and CUDA (cuda/) kernels, so the CPU tests
// exercise the same window bounds, relative offsets and border rules the GPU kernels use.
//
// The contract (docs/design.md, "The operation"): query (i, j) attends to the k x k window centred on it,
// r = k / 2; window positions outside the image are excluded from the softmax (masked), never
// replaced by zero keys; k may exceed the image. Along one axis of length n the window of position i
// is therefore the clipped range [max(i - r, 0), min(i + r + 1, n)), never empty (it holds i), and
// the same range lists the queries whose windows contain key position i (the window is symmetric).
#pragma once

#if defined(__CUDACC__)
#define SASA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SASA_HOST_DEVICE inline
#endif

namespace sasa {

// Logit of a masked (outside the image) window position where a kernel computes one (the CPU kernel's
// border lanes; the CUDA kernels skip such positions): finite, so max/subtract never make NaN, and
// exp(MASKED - m) is exactly 0 for every finite m of a real logit.
constexpr float kMaskedLogit = -1e30f;

// First position of the clipped window of ``i`` (or of the queries that see key ``i``).
SASA_HOST_DEVICE int window_begin(int i, int radius) { return i - radius > 0 ? i - radius : 0; }

// One past the last position of the clipped window of ``i`` along an axis of length ``n``.
SASA_HOST_DEVICE int window_end(int i, int radius, int n) { return i + radius + 1 < n ? i + radius + 1 : n; }

// Index of key position ``key`` in the window of query ``query``: the offset a - i + r that selects
// rel_row[h, .] (rows) or rel_col[h, .] (columns); in [0, k) exactly when the key is in the window.
SASA_HOST_DEVICE int offset_index(int query, int key, int radius) { return key - query + radius; }

// Whether position ``x`` lies inside an axis of length ``n`` (an unmasked window position).
SASA_HOST_DEVICE bool inside(int x, int n) { return 0 <= x && x < n; }

// Key position at offset index ``offset`` (in [0, k)) of the window of ``query``.
SASA_HOST_DEVICE int key_at(int query, int offset, int radius) { return query + offset - radius; }

}  // namespace sasa
