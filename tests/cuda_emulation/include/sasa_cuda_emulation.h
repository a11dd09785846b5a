// A small emulation of the CUDA execution model on the CPU, enough to run sasa_impls/csrc/cuda/sasa_cuda.cu
// unmodified with g++ (tests/test_native_cuda_emulated.py). cuda_runtime.h, cuda_fp16.h and cuda_bf16.h in
// this folder all include it; the only change to the source is the launch syntax, ``f<<<grid, block,
// shared, stream>>>(args)`` -> ``::emu::launch(f, {grid, block, shared, stream})(args)`` (build.py).
//
// What it models: a grid of blocks run one block at a time; the block's threads as fibers (one ucontext
// each) in one OS thread, switched only at __syncthreads, __syncwarp and __shfl_xor_sync; threadIdx /
// blockIdx / blockDim / gridDim; dynamic shared memory (one buffer, filled with NaN before each block,
// guard bytes after the launch's size checked after each block); __syncthreads as a barrier of the block's
// threads (an exited thread counts as arrived); __syncwarp / __shfl_xor_sync among the lanes of their mask
// (a lane outside the mask, a mask without the caller, lanes that disagree on the mask or the operation,
// or a lane of the mask that exited first, are errors); a deadlock (every live thread waiting) is an error;
// the 48 KiB dynamic shared-memory default and the opt-in through cudaFuncSetAttribute up to the device's
// limit; grid-size limits; fp16 / bf16 conversions rounding to nearest even. Errors are reported as CUDA
// reports launch errors: by cudaGetLastError, with cudaGetErrorString saying what happened.
//
// What it cannot catch: races between threads that the serialized schedule hides (run a launch in both
// schedules, ascending and descending thread order, and compare bitwise: that shows some of them, not all);
// memory ordering and visibility (no caches, no weak ordering, no __threadfence semantics); out-of-bounds
// global accesses other than those the caller's guard zones see; misaligned vector accesses unless built
// with -fsanitize=alignment (the test does); register pressure, occupancy, bank conflicts, timing,
// anything about performance; the device's fast-math intrinsics (exp2f here is the C library's).
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Only ``extern __shared__ T name[];`` (dynamic shared memory): the harness defines ``name`` as the one
// buffer of the emulation (blocks run one at a time).
#define __shared__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

template <class A, class B>
inline auto min(A a, B b) -> decltype(a < b ? a : b) {
  return b < a ? b : a;
}
template <class A, class B>
inline auto max(A a, B b) -> decltype(a < b ? a : b) {
  return a < b ? b : a;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline __half __float2half_rn(float f) {
  const _Float16 x = static_cast<_Float16>(f);  // IEEE conversion: round to nearest even
  __half h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<unsigned short>((u >> 16) | 0x40u)};  // quiet NaN
  return {static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace emu {

struct LaunchConfig {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
};

constexpr size_t kDefaultShared = 48 * 1024;
constexpr size_t kStackBytes = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kGuardBytes = 4096;  // checked after each block: nothing writes past the launch's shared size

enum class Op { kShfl, kSyncwarp };

struct State {
  // configuration (harness)
  void* shared = nullptr;  // the dynamic shared-memory buffer and its capacity
  size_t shared_capacity = 0;
  int optin_limit = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100 / H200
  int descending = 0;            // schedule: threads in ascending (0) or descending (1) order
  // per-function opt-in (cudaFuncSetAttribute)
  std::map<const void*, int> max_dynamic_shared;
  // errors
  cudaError_t error = cudaSuccess;
  std::string message;
  long launches = 0, blocks = 0, switches = 0;
  // the block now running
  int threads = 0, current = 0, exited = 0, arrived = 0;
  unsigned long generation = 0;
  bool progress = false, aborted = false;
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<char> stacks;
  std::vector<unsigned char> done;
  std::vector<unsigned long> count;  // per thread: warp-level operations so far
  std::vector<float> value[2];       // per thread: the value of its latest two warp operations (by parity)
  std::vector<unsigned> mask[2];
  std::vector<Op> op[2];
  const std::function<void()>* body = nullptr;
};

inline State& state() {
  static State s;
  return s;
}

inline void fail(cudaError_t error, const std::string& message) {
  State& s = state();
  if (s.error == cudaSuccess) {
    s.error = error;
    s.message = message;
  }
}

// From a fiber: back to the scheduler.
inline void yield() {
  State& s = state();
  ++s.switches;
  swapcontext(&s.contexts[s.current], &s.scheduler);
}

// From a fiber: record the error, end the launch (this fiber is never resumed).
[[noreturn]] inline void abort_launch(const std::string& what) {
  State& s = state();
  fail(cudaErrorLaunchFailure, what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                                   ", thread " + std::to_string(s.current) + ")");
  s.aborted = true;
  swapcontext(&s.contexts[s.current], &s.scheduler);
  __builtin_unreachable();
}

inline void sync_block() {
  State& s = state();
  s.progress = true;
  const unsigned long generation = s.generation;
  if (++s.arrived + s.exited == s.threads) {
    s.arrived = 0;
    ++s.generation;
    return;
  }
  while (s.generation == generation) yield();
  s.progress = true;
}

// The n-th warp-level operation of this thread: publish ``x``, wait for every lane of ``lanes`` to reach
// its n-th, check they agree; the value lane ``source`` published (source < 0: none).
inline float warp_op(Op op, unsigned lanes, float x, int source) {
  State& s = state();
  const int me = s.current, lane = me % 32, base = me - lane;
  if (!(lanes >> lane & 1u)) abort_launch("warp operation with a mask that leaves out the calling lane");
  const unsigned long n = ++s.count[me];
  const int slot = n & 1;
  s.value[slot][me] = x;
  s.mask[slot][me] = lanes;
  s.op[slot][me] = op;
  s.progress = true;
  for (int m = 0; m < 32; ++m) {
    if (!(lanes >> m & 1u)) continue;
    const int other = base + m;
    if (other >= s.threads) abort_launch("warp operation's mask names a lane past the block's threads");
    while (s.count[other] < n) {
      if (s.done[other]) abort_launch("lane " + std::to_string(m) + " of the mask exited before the warp operation");
      yield();
    }
    if (s.mask[slot][other] != lanes || s.op[slot][other] != op)
      abort_launch("lanes of one warp operation disagree on the mask or the operation");
  }
  s.progress = true;
  if (source < 0) return 0.f;
  if (source >= 32 || !(lanes >> source & 1u)) abort_launch("shuffle reads a lane outside its mask");
  return s.value[slot][base + source];
}

inline void entry() {
  State& s = state();
  (*s.body)();
  s.done[s.current] = 1;
  ++s.exited;
  s.progress = true;
  if (s.arrived > 0 && s.arrived + s.exited == s.threads) {  // the others wait at a barrier: release them
    s.arrived = 0;
    ++s.generation;
  }
  swapcontext(&s.contexts[s.current], &s.scheduler);
}

inline bool run_block(const dim3& block) {
  State& s = state();
  const int n = static_cast<int>(block.x * block.y * block.z);
  s.threads = n, s.exited = 0, s.arrived = 0, s.aborted = false;
  s.contexts.resize(n);
  s.stacks.resize(static_cast<size_t>(n) * kStackBytes);
  s.done.assign(n, 0);
  s.count.assign(n, 0);
  for (int p = 0; p < 2; ++p) {
    s.value[p].assign(n, 0.f);
    s.mask[p].assign(n, 0u);
    s.op[p].assign(n, Op::kShfl);
  }
  for (int t = 0; t < n; ++t) {
    getcontext(&s.contexts[t]);
    s.contexts[t].uc_stack.ss_sp = s.stacks.data() + static_cast<size_t>(t) * kStackBytes;
    s.contexts[t].uc_stack.ss_size = kStackBytes;
    s.contexts[t].uc_link = nullptr;
    makecontext(&s.contexts[t], entry, 0);
  }
  while (s.exited < n) {
    s.progress = false;
    for (int step = 0; step < n && !s.aborted; ++step) {
      const int t = s.descending ? n - 1 - step : step;
      if (s.done[t]) continue;
      s.current = t;
      threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      swapcontext(&s.scheduler, &s.contexts[t]);
    }
    if (s.aborted) return false;
    if (!s.progress && s.exited < n) {
      fail(cudaErrorLaunchFailure, "deadlock: every live thread of block (" + std::to_string(blockIdx.x) + "," +
                                       std::to_string(blockIdx.y) + ") waits at a barrier or warp operation");
      return false;
    }
  }
  return true;
}

inline void run_grid(const void* kernel, const LaunchConfig& config, const std::function<void()>& body) {
  State& s = state();
  ++s.launches;
  const unsigned threads = config.block.x * config.block.y * config.block.z;
  if (threads == 0 || threads > kMaxThreads) return fail(cudaErrorInvalidValue, "invalid block size");
  if (config.grid.x == 0 || config.grid.y == 0 || config.grid.z == 0 || config.grid.y > 65535 || config.grid.z > 65535)
    return fail(cudaErrorInvalidValue, "invalid grid size (gridDim.y and .z are at most 65535)");
  const auto raised = s.max_dynamic_shared.find(kernel);
  const size_t allowed = raised == s.max_dynamic_shared.end() ? kDefaultShared : static_cast<size_t>(raised->second);
  if (config.shared > allowed)
    return fail(cudaErrorInvalidValue, "dynamic shared memory of " + std::to_string(config.shared) +
                                           " bytes above the kernel's limit of " + std::to_string(allowed));
  if (config.shared + kGuardBytes > s.shared_capacity) return fail(cudaErrorInvalidValue, "emulation: shared buffer too small");
  gridDim = config.grid;
  blockDim = config.block;
  s.body = &body;
  unsigned char* shared = static_cast<unsigned char*>(s.shared);
  const float nan = __builtin_nanf("");
  for (unsigned z = 0; z < config.grid.z; ++z) {
    for (unsigned y = 0; y < config.grid.y; ++y) {
      for (unsigned x = 0; x < config.grid.x; ++x) {
        for (size_t f = 0; f < (config.shared + kGuardBytes) / 4; ++f) std::memcpy(shared + 4 * f, &nan, 4);
        blockIdx = {x, y, z};
        ++s.blocks;
        if (!run_block(config.block)) return;
        for (size_t f = config.shared / 4; f < (config.shared + kGuardBytes) / 4; ++f) {
          float got;
          std::memcpy(&got, shared + 4 * f, 4);
          if (!__builtin_isnan(got)) return fail(cudaErrorLaunchFailure, "write past the block's dynamic shared memory");
        }
      }
    }
  }
}

// ``kernel<<<grid, block, shared, stream>>>(args...)`` becomes ``launch(kernel, {grid, block, shared, stream})(args...)``.
template <class F>
auto launch(F kernel, LaunchConfig config) {
  return [kernel, config](auto... args) {
    const std::function<void()> body = [&] { kernel(args...); };
    run_grid(reinterpret_cast<const void*>(kernel), config, body);
  };
}

}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::Op::kSyncwarp, mask, 0.f, -1); }
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask, int width = 32) {
  if (width != 32) emu::abort_launch("emulation: __shfl_xor_sync takes width 32 only");
  return emu::warp_op(emu::Op::kShfl, mask, x, (emu::state().current % 32) ^ lane_mask);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::state().error;
  emu::state().error = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t) { return emu::state().message.c_str(); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::state().optin_limit;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int value) {
  if (value > emu::state().optin_limit) return cudaErrorInvalidValue;
  emu::state().max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
