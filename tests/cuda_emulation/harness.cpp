// The CUDA kernels of sasa_impls/csrc/cuda/sasa_cuda.cu on the CPU under the emulation
// (include/sasa_cuda_emulation.h), as a plain C ABI for ctypes: pointers are host memory (torch CPU
// tensors' data_ptr), the stream is null. build.py writes sasa_cuda.emulated.cu (the source with its
// launches spelled as calls) and compiles this file with it.
#include "sasa_cuda.emulated.cu"

namespace sasa::cuda {
namespace {
// The kernels' ``extern __shared__ float4 shared4[]``: one buffer, since blocks run one at a time.
constexpr size_t kSharedFloat4s = (256 * 1024 + emu::kGuardBytes) / sizeof(float4);
float4 shared4[kSharedFloat4s];
}  // namespace
}  // namespace sasa::cuda

namespace {

sasa::cuda::Problem problem(const int* dims, float scale) {
  return {dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], scale};
}

void prepare() {
  emu::State& s = emu::state();
  s.shared = sasa::cuda::shared4;
  s.shared_capacity = sizeof(sasa::cuda::shared4);
}

}  // namespace

extern "C" {

// dims: batch, heads, height, width, head dim, kernel size. dtype: 0 float32, 1 float16, 2 bfloat16.
// Each returns null on success, else the message a CUDA launch would report.
const char* emu_forward(int dtype, const int* dims, float scale, const void* q, const void* k, const void* v,
                        const void* rel_row, const void* rel_col, void* out, float* lse) {
  prepare();
  return sasa::cuda::forward(static_cast<sasa::cuda::DType>(dtype), problem(dims, scale), q, k, v, rel_row, rel_col, out,
                             lse, nullptr);
}

const char* emu_backward(int dtype, const int* dims, float scale, const void* grad_out, const void* q, const void* k,
                         const void* v, const void* rel_row, const void* rel_col, const void* out, const float* lse,
                         void* dq, void* dk, void* dv, void* drel_row, void* drel_col, float* workspace) {
  prepare();
  return sasa::cuda::backward(static_cast<sasa::cuda::DType>(dtype), problem(dims, scale), grad_out, q, k, v, rel_row,
                              rel_col, out, lse, dq, dk, dv, drel_row, drel_col, workspace, nullptr);
}

size_t emu_workspace_floats(const int* dims) { return sasa::cuda::backward_workspace_floats(problem(dims, 1.f)); }

// schedule: threads of a block in ascending (0) or descending (1) order between synchronizations.
void emu_set_schedule(int descending) { emu::state().descending = descending; }

// Launches, blocks and fiber switches so far (what the emulation ran).
long emu_counter(int which) {
  const emu::State& s = emu::state();
  return which == 0 ? s.launches : which == 1 ? s.blocks : s.switches;
}

}  // extern "C"
