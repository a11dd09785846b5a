// Launchers of the CUDA kernels (sasa_cuda.cu), free of torch headers: raw device pointers, the
// stream as void*. q, k, v, the output and the gradients are contiguous (B, heads, H, W, D); the
// relative embeddings contiguous (heads, k, D / 2) and (heads, k, D - D / 2), or null.
// Every launcher returns nullptr on success, else a message (a CUDA error or a limit).
#pragma once

#include <cstddef>

namespace sasa::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Problem {
  int batch, heads, height, width, channels, kernel_size;
  float scale;
};

// Largest head dim the kernels take (channels are padded to a power of two >= 8 up to it).
constexpr int kMaxChannels = 256;

// Floats of scratch the backward needs (delta, relative terms and dS sums: 4 k + 1 per pixel, the
// relative-gradient partial sums).
size_t backward_workspace_floats(const Problem& p);

// out (input dtype) and lse (fp32, (B, heads, H, W)).
const char* forward(DType dtype, const Problem& p, const void* q, const void* k, const void* v,
                    const void* rel_row, const void* rel_col, void* out, float* lse, void* stream);

// dq, dk, dv (input dtype) and, with relative embeddings, drel_row / drel_col; ``workspace`` holds
// backward_workspace_floats(p) floats.
const char* backward(DType dtype, const Problem& p, const void* grad_out, const void* q, const void* k,
                     const void* v, const void* rel_row, const void* rel_col, const void* out, const float* lse,
                     void* dq, void* dk, void* dv, void* drel_row, void* drel_col, float* workspace, void* stream);

}  // namespace sasa::cuda
