// Torch binding of the CUDA kernels (sasa_cuda.cu): checks, allocation, and the launch on the
// caller's stream. Only torch/extension.h is included (no c10/cuda or ATen/cuda headers), so this file
// compiles against a CPU build of torch too; the stream comes from Python as an integer
// (torch.cuda.current_stream(device).cuda_stream).
#include <torch/extension.h>

#include <limits>
#include <optional>

#include "sasa_cuda.h"

namespace {

using sasa::cuda::DType;
using sasa::cuda::Problem;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "q: the native CUDA kernel takes float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& rel_row, const std::optional<at::Tensor>& rel_col,
                   int64_t kernel_size, double scale) {
  TORCH_CHECK(q.dim() == 5, "q: expected (B, heads, H, W, D)");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous() && t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type(),
                "q, k, v: expected contiguous CUDA tensors of one shape and dtype");
  }
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size: expected an odd int >= 1");
  TORCH_CHECK(q.size(4) <= sasa::cuda::kMaxChannels, "q: the native CUDA kernel takes head dims up to ",
              sasa::cuda::kMaxChannels, ", got ", q.size(4));
  TORCH_CHECK(q.numel() < std::numeric_limits<int32_t>::max(), "q: more than 2^31 elements");
  TORCH_CHECK(rel_row.has_value() == rel_col.has_value(), "rel_row, rel_col: give both or neither");
  if (rel_row.has_value()) {
    TORCH_CHECK(rel_row->is_contiguous() && rel_col->is_contiguous() && rel_row->scalar_type() == q.scalar_type() &&
                    rel_col->scalar_type() == q.scalar_type() && rel_row->is_cuda() && rel_col->is_cuda(),
                "rel_row, rel_col: expected contiguous CUDA tensors in q's dtype");
  }
  return {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
          static_cast<int>(q.size(3)), static_cast<int>(q.size(4)), static_cast<int>(kernel_size),
          static_cast<float>(scale)};
}

const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

at::Tensor allocate(at::Tensor t, bool poison) {
  return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

void check(const char* error, const char* what) { TORCH_CHECK(error == nullptr, "sasa native CUDA ", what, ": ", error); }

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& rel_row, const std::optional<at::Tensor>& rel_col,
                                int64_t kernel_size, double scale, bool poison, int64_t stream) {
  const Problem p = problem_of(q, k, v, rel_row, rel_col, kernel_size, scale);
  const at::DeviceGuard guard(q.device());
  at::Tensor out = allocate(at::empty_like(q), poison);
  at::Tensor lse = allocate(at::empty({p.batch, p.heads, p.height, p.width}, q.options().dtype(at::kFloat)), poison);
  check(sasa::cuda::forward(dtype_of(q), p, q.data_ptr(), k.data_ptr(), v.data_ptr(), data_or_null(rel_row),
                            data_or_null(rel_col), out.data_ptr(), lse.data_ptr<float>(), reinterpret_cast<void*>(stream)),
        "forward");
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& rel_row,
                                 const std::optional<at::Tensor>& rel_col, const at::Tensor& out,
                                 const at::Tensor& lse, int64_t kernel_size, double scale, bool poison, int64_t stream) {
  const Problem p = problem_of(q, k, v, rel_row, rel_col, kernel_size, scale);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  out.is_contiguous() && lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "grad_out, out, lse: expected contiguous tensors of the forward's shapes and dtypes");
  const at::DeviceGuard guard(q.device());
  at::Tensor dq = allocate(at::empty_like(q), poison);
  at::Tensor dk = allocate(at::empty_like(k), poison);
  at::Tensor dv = allocate(at::empty_like(v), poison);
  const auto rel_grad = [&](const at::Tensor& rel) {  // an empty batch launches nothing: its rel gradients are 0
    return q.numel() == 0 ? at::zeros_like(rel) : allocate(at::empty_like(rel), poison);
  };
  at::Tensor drow = rel_row.has_value() ? rel_grad(*rel_row) : at::Tensor();
  at::Tensor dcol = rel_row.has_value() ? rel_grad(*rel_col) : at::Tensor();
  at::Tensor workspace = at::empty({static_cast<int64_t>(sasa::cuda::backward_workspace_floats(p))},
                                   q.options().dtype(at::kFloat));
  check(sasa::cuda::backward(dtype_of(q), p, grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                             data_or_null(rel_row), data_or_null(rel_col), out.data_ptr(), lse.data_ptr<float>(),
                             dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), drow.defined() ? drow.data_ptr() : nullptr,
                             dcol.defined() ? dcol.data_ptr() : nullptr, workspace.data_ptr<float>(),
                             reinterpret_cast<void*>(stream)),
        "backward");
  if (rel_row.has_value()) return {dq, dk, dv, drow, dcol};
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SASA local attention on CUDA (sasa_impls.impls.native)";
  m.def("forward", &forward, "out, lse = forward(q, k, v, rel_row, rel_col, kernel_size, scale, poison, stream)");
  m.def("backward", &backward,
        "dq, dk, dv[, drel_row, drel_col] = backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, "
        "scale, poison, stream)");
}
