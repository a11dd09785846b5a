// Torch binding of the fused CPU kernel (forward.h, backward.h) and of the projection's products (gemm.h):
// argument checks, output allocation,
// dtype dispatch (fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64) and the parallel loops over
// (batch, head, band) tasks on ATen's threads (parallel_for).
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>

#include "backward.h"
#include "forward.h"
#include "gemm.h"
#include "peak.h"

namespace {

using namespace sasa::cpu;

template <typename S>
using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
Tensor5<S> view5(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<S>>(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)}};
}

Shape check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& rel_row, const std::optional<at::Tensor>& rel_col,
                         int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 5, "q: expected (B, heads, H, W, D)");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size: expected an odd int >= 1");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type(),
                "q, k, v: expected CPU tensors of one shape and dtype");
  }
  TORCH_CHECK(rel_row.has_value() == rel_col.has_value(), "rel_row, rel_col: give both or neither");
  TORCH_CHECK(q.numel() < std::numeric_limits<int32_t>::max(), "q: more than 2^31 elements");
  Shape s{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
          static_cast<int>(q.size(3)), static_cast<int>(q.size(4)), static_cast<int>(kernel_size), rel_row.has_value()};
  if (s.has_rel) {
    TORCH_CHECK(rel_row->sizes() == at::IntArrayRef({s.heads, s.kernel_size, s.row_channels()}) &&
                    rel_col->sizes() == at::IntArrayRef({s.heads, s.kernel_size, s.col_channels()}) &&
                    rel_row->scalar_type() == q.scalar_type() && rel_col->scalar_type() == q.scalar_type(),
                "rel_row, rel_col: expected (heads, k, D // 2) and (heads, k, D - D // 2) in q's dtype");
  }
  return s;
}

// A thread's share of the tasks, [front, back) packed in one word: its owner takes tasks from the front,
// the other threads, once their own share is done, from the back.
class Share {
 public:
  Share(int64_t begin, int64_t end) : range_(pack(begin, end)) {}
  // The next task from the front (owner) or the back (thief); false once the share is empty.
  bool take(bool from_front, int64_t& task) {
    uint64_t range = range_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<uint32_t>(range), back = static_cast<int64_t>(range >> 32);
      if (front >= back) return false;
      const uint64_t taken = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (range_.compare_exchange_weak(range, taken, std::memory_order_relaxed)) {
        task = from_front ? front : back - 1;
        return true;
      }
    }
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) { return static_cast<uint64_t>(back) << 32 | static_cast<uint32_t>(front); }
  std::atomic<uint64_t> range_;
};

// fn(workspace, task) for every task in [0, tasks) on ATen's threads, one workspace per thread (make_workspace's
// result: a new one, or a reference to thread_workspace's). Thread t
// first runs the t-th contiguous share of the tasks, in order, so consecutive kernels whose tasks split the
// data alike (the forward's and the backward's (batch, group of heads) planes) find their operands in the
// core that wrote them; then it takes the tasks left in the other shares, from their ends, so a thread slowed
// down (by other processes, or by bigger tasks) takes fewer. A task's result never depends on the thread
// that runs it.
template <typename MakeWorkspace, typename Fn>
void run_tasks(int64_t tasks, const MakeWorkspace& make_workspace, const Fn& fn) {
  TORCH_CHECK(tasks < (int64_t{1} << 31), "more than 2^31 tasks");
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::vector<std::unique_ptr<Share>> shares;
  for (int64_t t = 0; t < threads; ++t) shares.push_back(std::make_unique<Share>(t * tasks / threads, (t + 1) * tasks / threads));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    auto&& workspace = make_workspace();
    int64_t task;
    for (int64_t own = begin; own < end; ++own)
      while (shares[own]->take(true, task)) fn(workspace, task);
    for (int64_t other = 1; other < threads; ++other)
      while (shares[(begin + other) % threads]->take(false, task)) fn(workspace, task);
  });
}

// This thread's workspace for a call of ``shape`` with ``band``, made by make() for the first such call and kept
// for the next ones: the backward's (a new one per call: its pages, freshly mapped on every call, fault in under
// one lock for both threads; 4 interleaved heads of 28 x 28 at batch 1, k = 19, 1.7 MB per thread, took 1.6x the
// time of one head per row on 2 threads, 1.01x on one; one head per row, batch 1, 0.969-0.977x the time of a new
// workspace per call). The forward's is made per call: kept, it gained nothing (1.000) and the layer's fwd+bwd
// held both at once (peak memory 3.7-4.8 MiB against 3.2-3.9 at 28 x 28 batch 1). The backward writes what it
// reads of its workspace before reading it, except zeros it never writes (the packed rows' gaps, the scratch's
// margins), so the results do not depend on the calls before.
template <typename Workspace, typename Make>
Workspace& thread_workspace(const Shape& shape, int band, const Make& make) {
  const std::array<int64_t, 9> key{shape.batch, shape.heads,  shape.height,      shape.width, shape.channels,
                                   shape.kernel_size, shape.has_rel, shape.interleave, band};
  thread_local std::array<int64_t, 9> cached_key{};
  thread_local std::unique_ptr<Workspace> cached;
  if (!cached || cached_key != key) {
    cached.reset();
    cached = std::make_unique<Workspace>(make());
    cached_key = key;
  }
  return *cached;
}

// Tasks are numbered band-major (task = band * planes + plane): the bands cut short by the image's
// bottom come last, so the threads' last tasks are the small ones.
struct Task {
  int b, h, band;  // h: the plane's first head
};

Task task_of(const Shape& s, int64_t task) {
  const int planes = s.planes(), groups = s.heads / s.interleave;
  const int plane = task % planes;
  return {plane / groups, plane % groups * s.interleave, static_cast<int>(task / planes)};
}

// The machine's logical CPUs (not the threads a call runs on): the backward's default band depends on it.
int machine_cpus() {
  const unsigned cpus = std::thread::hardware_concurrency();
  return cpus > 0 ? static_cast<int>(cpus) : 1;
}

at::Tensor maybe_poisoned(at::Tensor t, bool poison) {
  return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

// dq, dk, dv laid out as q, k, v are. Where q, k, v are evenly spaced views of one buffer with one set of
// strides that together tile it (SASA2d's channel slices of its projection's product), the gradients are the
// same views of one new buffer, so the product's gradient is that buffer, no concatenation (projection.py's
// _ChannelSplit); otherwise each is allocated like its input.
std::vector<at::Tensor> gradients_like(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t spacing = k.storage_offset() - q.storage_offset();
  if (spacing > 0 && v.storage_offset() - k.storage_offset() == spacing && k.storage().is_alias_of(q.storage()) &&
      v.storage().is_alias_of(q.storage()) && k.strides() == q.strides() && v.strides() == q.strides()) {
    std::vector<int64_t> sizes{3}, strides{spacing};
    sizes.insert(sizes.end(), q.sizes().begin(), q.sizes().end());
    strides.insert(strides.end(), q.strides().begin(), q.strides().end());
    if (at::empty_strided(sizes, strides, q.options().device(at::kMeta)).is_non_overlapping_and_dense()) {
      const at::Tensor all = at::empty_strided(sizes, strides, q.options());  // (3, B, heads, H, W, D)
      return {all[0], all[1], all[2]};
    }
  }
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& rel_row, const std::optional<at::Tensor>& rel_col,
                                int64_t kernel_size, double scale, bool poison, int64_t band) {
  Shape shape = check_and_describe(q, k, v, rel_row, rel_col, kernel_size);
  const at::Tensor rows = shape.has_rel ? rel_row->contiguous() : at::Tensor();
  const at::Tensor cols = shape.has_rel ? rel_col->contiguous() : at::Tensor();
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = maybe_poisoned(at::empty_like(q), poison);
  at::Tensor lse = maybe_poisoned(at::empty({shape.batch, shape.heads, shape.height, shape.width}, q.options().dtype(acc_dtype)), poison);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sasa_native_forward", [&] {
    using T = Acc<scalar_t>;
    const ForwardArgs<scalar_t, T> args{view5<const scalar_t>(q), view5<const scalar_t>(k), view5<const scalar_t>(v),
                                        shape.has_rel ? rows.data_ptr<scalar_t>() : nullptr,
                                        shape.has_rel ? cols.data_ptr<scalar_t>() : nullptr,
                                        static_cast<T>(scale), view5<scalar_t>(out), lse.data_ptr<T>()};
    shape.interleave = interleaved_heads<T>(shape);
    const Bands bands{shape.height,
                      band > 0 ? static_cast<int>(band) : default_forward_band(shape, at::get_num_threads())};
    run_tasks(static_cast<int64_t>(shape.planes()) * bands.count(), [&] { return ForwardWorkspace<T>(shape); },
              [&](ForwardWorkspace<T>& ws, int64_t task) {
                const Task t = task_of(shape, task);
                forward_task(shape, args, t.b, t.h, bands.begin(t.band), bands.end(t.band), ws);
              });
  });
  return {out, lse};
}

// The backward into dq, dk, dv (q's shape and dtype, any strides; every element written); returns them and, with
// relative logits, the relative gradients.
std::vector<at::Tensor> backward_into(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const std::optional<at::Tensor>& rel_row,
                                      const std::optional<at::Tensor>& rel_col, const at::Tensor& out,
                                      const at::Tensor& lse, int64_t kernel_size, double scale, bool poison,
                                      int64_t band, at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  Shape shape = check_and_describe(q, k, v, rel_row, rel_col, kernel_size);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out, out: expected q's shape");
  for (const at::Tensor* t : {&dq, &dk, &dv}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "dq, dk, dv: expected CPU tensors of q's shape and dtype");
  }
  const at::Tensor rows = shape.has_rel ? rel_row->contiguous() : at::Tensor();
  const at::Tensor cols = shape.has_rel ? rel_col->contiguous() : at::Tensor();
  const at::Tensor grad = grad_out.to(q.scalar_type());
  const at::Tensor stats = lse.contiguous();
  for (at::Tensor* t : {&dq, &dk, &dv}) maybe_poisoned(*t, poison);
  at::Tensor drow = shape.has_rel ? maybe_poisoned(at::empty_like(rows), poison) : at::Tensor();
  at::Tensor dcol = shape.has_rel ? maybe_poisoned(at::empty_like(cols), poison) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sasa_native_backward", [&] {
    using T = Acc<scalar_t>;
    shape.interleave = interleaved_heads<T>(shape, kBackwardInterleave);
    const Bands bands{shape.height,
                      band > 0 ? static_cast<int>(band) : default_band(shape, kBackwardGroupRows, machine_cpus())};
    const int64_t planes = shape.planes(), tasks = planes * bands.count();
    std::vector<int64_t> halo_offset(bands.count() + 1, 0);
    for (int t = 0; t < bands.count(); ++t)
      halo_offset[t + 1] = halo_offset[t] + halo_end(shape, bands, t) - halo_begin(shape, bands, t);
    const auto acc_options = q.options().dtype(stats.scalar_type());
    // the bands' halo rows, summed by reduce_key_row; one band per plane keeps its halo in its workspace
    at::Tensor halo = at::empty({bands.count() > 1 ? planes * halo_offset.back() * halo_row_size<T>(shape) : 0}, acc_options);
    // the relative gradients per (batch, head, band)
    const int64_t kd = shape.kernel_size * shape.channels;
    const int64_t heads = static_cast<int64_t>(shape.batch) * shape.heads;
    at::Tensor partial = at::empty({shape.has_rel ? heads * bands.count() * kd : 0}, acc_options);
    const BackwardArgs<scalar_t, T> args{
        view5<const scalar_t>(q), view5<const scalar_t>(k), view5<const scalar_t>(v), view5<const scalar_t>(out),
        view5<const scalar_t>(grad), shape.has_rel ? rows.data_ptr<scalar_t>() : nullptr,
        shape.has_rel ? cols.data_ptr<scalar_t>() : nullptr, stats.data_ptr<T>(), static_cast<T>(scale),
        view5<scalar_t>(dq), view5<scalar_t>(dk), view5<scalar_t>(dv), halo.data_ptr<T>(), halo_offset.data(),
        partial.data_ptr<T>()};
    run_tasks(tasks,
              [&]() -> BackwardWorkspace<T>& {
                return thread_workspace<BackwardWorkspace<T>>(shape, bands.band,
                                                              [&] { return BackwardWorkspace<T>(shape, bands.band); });
              },
              [&](BackwardWorkspace<T>& ws, int64_t task) {
                const Task t = task_of(shape, task);
                backward_task(shape, bands, args, t.b, t.h, t.band, ws);
              });
    if (bands.count() > 1) {  // one band per plane: its task stored dK and dV
      run_tasks(planes * shape.height, [&] { return std::vector<T>(halo_row_size<T>(shape)); },
                [&](std::vector<T>& sum, int64_t row) {
                  const Task t = task_of(shape, row / shape.height);
                  reduce_key_row(shape, bands, args, t.b, t.h, row % shape.height, sum);
                });
    }
    if (shape.has_rel) {  // sum the per-task relative gradients over batch and bands, in task order
      const int dr = shape.row_channels(), dc = shape.col_channels();
      const T* parts = partial.data_ptr<T>();
      scalar_t* drow_p = drow.data_ptr<scalar_t>();
      scalar_t* dcol_p = dcol.data_ptr<scalar_t>();
      std::vector<T> sum(kd);
      for (int h = 0; h < shape.heads; ++h) {
        std::fill(sum.begin(), sum.end(), T(0));
        for (int b = 0; b < shape.batch; ++b)
          for (int t = 0; t < bands.count(); ++t) {
            const T* part = parts + ((static_cast<int64_t>(b) * shape.heads + h) * bands.count() + t) * kd;
            for (int e = 0; e < kd; ++e) sum[e] += part[e];
          }
        for (int o = 0; o < shape.kernel_size; ++o) {
          for (int d = 0; d < dr; ++d) drow_p[(h * shape.kernel_size + o) * dr + d] = static_cast<scalar_t>(sum[o * shape.channels + d]);
          for (int d = 0; d < dc; ++d) dcol_p[(h * shape.kernel_size + o) * dc + d] = static_cast<scalar_t>(sum[o * shape.channels + dr + d]);
        }
      }
    }
  });
  if (shape.has_rel) return {dq, dk, dv, drow, dcol};
  return {dq, dk, dv};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& rel_row,
                                 const std::optional<at::Tensor>& rel_col, const at::Tensor& out,
                                 const at::Tensor& lse, int64_t kernel_size, double scale, bool poison, int64_t band) {
  const std::vector<at::Tensor> grads = gradients_like(q, k, v);
  return backward_into(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, scale, poison, band, grads[0],
                       grads[1], grads[2]);
}

// C_b = A_b B_b for every b ((B, M, N)), or with ``reduce`` C = sum_b A_b B_b ((M, N), the sum in b order):
// a (1 or B, M, K), b (B, K, N), fp32 or fp64, any strides. Tasks: (image, panel of columns), or with ``reduce``
// (panel, chunk of rows) each summing over every image. A task computes every row of its panel, so each panel's slab
// is packed once: cutting an image's rows into one part per thread (the heads each thread then attends, so that it
// read q, k and v from its own core) packed every slab once per part and left 2-row blocks at the parts' ends; whole
// panels took 0.95-0.98 of the forward product's time at batch 1 and 0.98-1.00 of the layer's chained kernels
// (scripts/native_ab.py, AMD Zen 4 f25m17, 2 threads).
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b, bool reduce) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "a, b: expected (batch, M, K) and (batch, K, N)");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "a, b: expected CPU tensors of one dtype, float32 or float64");
  const int64_t batch = b.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(b.size(1) == K && (a.size(0) == 1 || a.size(0) == batch),
              "a, b: expected (1 or batch, M, K) and (batch, K, N), got ", a.sizes(), " and ", b.sizes());
  const auto shape = reduce ? std::vector<int64_t>{M, N} : std::vector<int64_t>{batch, M, N};
  if (batch == 0 || M == 0 || N == 0 || K == 0) return at::zeros(shape, b.options());
  at::Tensor c = at::empty(shape, b.options());  // every element written by one task, its first write a store
  const int64_t a_batch_stride = a.size(0) == 1 ? 0 : a.stride(0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sasa_native_matmul", [&] {
    using T = scalar_t;
    constexpr int P = kPanelWidth<T>;
    const int64_t panels = (N + P - 1) / P;
    const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
    const int64_t chunks = reduce ? std::min<int64_t>(blocks, (at::get_num_threads() + panels - 1) / panels) : 1;
    const int64_t chunk_rows = kRowBlock * ((blocks + chunks - 1) / chunks);
    auto operand = [&](const at::Tensor& t, int64_t image, int64_t batch_stride) {
      return Matrix<T>{t.data_ptr<T>() + image * batch_stride, t.stride(1), t.stride(2)};
    };
    T* out = c.data_ptr<T>();
    const int64_t depth = std::min<int64_t>(kDepth, K);  // the slab, per thread: no deeper than the product
    run_tasks(reduce ? panels * chunks : batch * panels, [&] { return VecBuffer<T>(depth * kPanelVectors); },
              [&](VecBuffer<T>& slab, int64_t task) {
                const int64_t panel = task % panels, n0 = panel * P;
                const int width = static_cast<int>(std::min<int64_t>(P, N - n0));
                if (!reduce) {
                  const int64_t image = task / panels;
                  gemm_panel(operand(a, image, a_batch_stride), operand(b, image, b.stride(0)), 0, M, K, n0, width,
                             out + image * M * N, N, false, slab.data());
                  return;
                }
                const int64_t m0 = task / panels * chunk_rows, m1 = std::min(M, m0 + chunk_rows);
                for (int64_t image = 0; image < batch && m0 < m1; ++image) {
                  gemm_panel(operand(a, image, a_batch_stride), operand(b, image, b.stride(0)), m0, m1, K, n0, width,
                             out, N, image > 0, slab.data());
                }
              });
  });
  return c;
}

// SASA2d's step on these kernels as one autograd node (sasa_impls/native_layer.py says why and when): the
// projection's product of the stacked weight, the op on its q, k, v channel slices, and in the backward the op's
// backward written straight into the product's gradient (its q, k, v slices), then the product's two gradients.
// The same kernels on the same operands as the general path's three autograd Functions: the same bits.

at::Tensor split_heads(const at::Tensor& t, int64_t heads) {  // (B, C, H, W) -> (B, heads, H, W, C / heads)
  return t.reshape({t.size(0), heads, t.size(1) / heads, t.size(2), t.size(3)}).permute({0, 1, 3, 4, 2});
}

at::Tensor merge_heads(const at::Tensor& t) {  // (B, heads, H, W, D) -> (B, heads D, H, W)
  return t.permute({0, 1, 4, 2, 3}).reshape({t.size(0), t.size(1) * t.size(4), t.size(2), t.size(3)});
}

// The q, k, v heads of a (B, 3 d_out, H, W) product (or of its gradient).
std::vector<at::Tensor> qkv_heads(const at::Tensor& product, int64_t heads) {
  std::vector<at::Tensor> parts;
  for (const at::Tensor& part : product.split(product.size(1) / 3, 1)) parts.push_back(split_heads(part, heads));
  return parts;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct LayerStep : public torch::autograd::Function<LayerStep> {
  // x (B, d_in, H, W); wq, wk, wv the 1x1 convs' (d_out, d_in, 1, 1) weights; stacked: their stack (3 d_out, d_in)
  // where the caller keeps one (inference), else made here. Returns (B, d_out, H, W).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wq,
                            const at::Tensor& wk, const at::Tensor& wv, const std::optional<at::Tensor>& rel_row,
                            const std::optional<at::Tensor>& rel_col, const std::optional<at::Tensor>& stacked,
                            int64_t heads, int64_t kernel_size, double scale, bool poison, int64_t band) {
    TORCH_CHECK(x.dim() == 4, "x: expected (B, C, H, W)");
    const at::Tensor weight = stacked.has_value() ? *stacked : at::cat({wq.flatten(1), wk.flatten(1), wv.flatten(1)});
    at::Tensor product;
    {
      RECORD_FUNCTION("sasa::projections", std::vector<c10::IValue>());
      product = matmul(weight.unsqueeze(0), x.flatten(2), false).view({x.size(0), -1, x.size(2), x.size(3)});
    }
    const std::vector<at::Tensor> qkv = qkv_heads(product, heads);
    std::vector<at::Tensor> out_lse;
    {
      RECORD_FUNCTION("FusedSASA", std::vector<c10::IValue>());
      out_lse = ::forward(qkv[0], qkv[1], qkv[2], rel_row, rel_col, kernel_size, scale, poison, band);
    }
    // the product apart from the saved variables, which the node holds until its backward returns: the backward
    // lets it go once the op's backward has read it (1.2 MB less at the peak at 28 x 28 batch 1: the general path's
    // peak). Nothing outside can change it in place: no version check needed.
    ctx->saved_data["product"] = product;
    ctx->save_for_backward({x, weight, out_lse[0], out_lse[1], rel_row.value_or(at::Tensor()),
                            rel_col.value_or(at::Tensor())});
    ctx->saved_data["settings"] = std::vector<int64_t>{heads, kernel_size, poison, band};
    ctx->saved_data["scale"] = scale;
    return merge_heads(out_lse[0]);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "SASA2d's native layer step: no double backward (create_graph)");
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const std::vector<int64_t> settings = ctx->saved_data["settings"].toIntVector();
    const int64_t heads = settings[0], kernel_size = settings[1], band = settings[3];
    const bool poison = settings[2] != 0;
    at::Tensor grad_product;
    std::vector<at::Tensor> op_grads;
    {
      at::Tensor product = ctx->saved_data["product"].toTensor();
      if (!torch::autograd::get_current_graph_task_keep_graph()) ctx->saved_data.erase("product");
      const std::vector<at::Tensor> qkv = qkv_heads(product, heads);
      grad_product = at::empty_like(product);  // the op's backward writes its q, k, v slices
      const std::vector<at::Tensor> slots = qkv_heads(grad_product, heads);
      RECORD_FUNCTION("FusedSASABackward", std::vector<c10::IValue>());
      op_grads = backward_into(split_heads(grads[0], heads), qkv[0], qkv[1], qkv[2], defined_or_none(saved[4]),
                               defined_or_none(saved[5]), saved[2], saved[3], kernel_size,
                               ctx->saved_data["scale"].toDouble(), poison, band, slots[0], slots[1], slots[2]);
    }
    // edges: x 0, wq 1, wk 2, wv 3 (then the relative embeddings and the stack, where given)
    at::Tensor dx, dw;
    {
      RECORD_FUNCTION("sasa::projections", std::vector<c10::IValue>());
      const at::Tensor dy = grad_product.flatten(2);  // (B, 3 d_out, H W)
      if (ctx->needs_input_grad(0)) dx = matmul(weight.t().unsqueeze(0), dy, false).view(x.sizes());
      if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
        dw = matmul(dy, x.flatten(2).transpose(1, 2), true);  // (3 d_out, d_in)
      }
    }
    torch::autograd::variable_list result{dx};
    for (const at::Tensor& part : dw.defined() ? dw.chunk(3) : std::vector<at::Tensor>(3)) {
      result.push_back(part.defined() ? part.view({part.size(0), part.size(1), 1, 1}) : part);
    }
    const bool relative = op_grads.size() == 5;
    result.push_back(relative ? op_grads[3] : at::Tensor());
    result.push_back(relative ? op_grads[4] : at::Tensor());
    result.resize(result.size() + 6);  // the stack (never differentiated through here) and the settings
    return result;
  }
};

at::Tensor layer_step(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                      const std::optional<at::Tensor>& rel_row, const std::optional<at::Tensor>& rel_col,
                      const std::optional<at::Tensor>& stacked, int64_t heads, int64_t kernel_size, double scale,
                      bool poison, int64_t band) {
  return LayerStep::apply(x, wq, wk, wv, rel_row, rel_col, stacked, heads, kernel_size, scale, poison, band);
}

}  // namespace

// GFLOP/s of fma_chains on ``threads`` of ATen's threads at once (each ``iterations`` rounds), in fp64
// or fp32: the physical FMA peak (peak.h). ``threads`` at most ATen's thread count, so each runs at once.
double fma_peak(bool double_precision, int64_t threads, int64_t iterations) {
  TORCH_CHECK(threads >= 1 && threads <= at::get_num_threads(), "threads: expected 1 .. ", at::get_num_threads(),
              " (torch.get_num_threads()), got ", threads);
  TORCH_CHECK(iterations >= 1, "iterations: expected a positive int, got ", iterations);
  std::atomic<int64_t> sink{0};
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const double total = double_precision ? fma_chains<double>(iterations, static_cast<double>(t))
                                            : fma_chains<float>(iterations, static_cast<float>(t));
      sink += total != total;  // consumes the result
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double flops = double_precision ? fma_chain_flops<double>(iterations) : fma_chain_flops<float>(iterations);
  return flops * threads / seconds / 1e9 + 0.0 * sink.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SASA local attention on the CPU (sasa_impls.impls.native)";
  m.def("forward", &forward, "out, lse = forward(q, k, v, rel_row, rel_col, kernel_size, scale, poison, band)",
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward,
        "dq, dk, dv[, drel_row, drel_col] = backward(grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, "
        "scale, poison, band)",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_step", &layer_step,
        "out = layer_step(x, wq, wk, wv, rel_row, rel_col, stacked, heads, kernel_size, scale, poison, band): SASA2d's "
        "projections and op as one autograd node", py::arg("x"), py::arg("wq"), py::arg("wk"), py::arg("wv"),
        py::arg("rel_row"), py::arg("rel_col"), py::arg("stacked"), py::arg("heads"), py::arg("kernel_size"),
        py::arg("scale"), py::arg("poison"), py::arg("band"), py::call_guard<py::gil_scoped_release>());
  m.def("matmul", &matmul,
        "c = matmul(a, b, reduce): a_b b_b per image, or their sum over images (reduce)", py::arg("a"), py::arg("b"),
        py::arg("reduce"), py::call_guard<py::gil_scoped_release>());
  m.def("fma_peak", &fma_peak, "GFLOP/s = fma_peak(double_precision, threads, iterations): the physical FMA peak",
        py::call_guard<py::gil_scoped_release>());
}
