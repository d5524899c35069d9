// The cpp block driver's small CUDA kernels (block_kernels.h): a BN's scale/shift from (gamma, beta, mean, var,
// eps) in one launch, and the running-statistics update of a list of layers without a host synchronization
// (num_batches_tracked is read and incremented on the device). No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../bn_math.h"
#include "block_kernels.h"

namespace effdense {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double load(const void* p, VType t, int64_t i) {
  switch (t) {
    case VType::F32: return static_cast<double>(static_cast<const float*>(p)[i]);
    case VType::F64: return static_cast<const double*>(p)[i];
    case VType::F16: return static_cast<double>(__half2float(static_cast<const __half*>(p)[i]));
    default: return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
}

template <typename A>
__device__ __forceinline__ A load_as(const Vec& v, int64_t i) {
  return static_cast<A>(load(v.data, v.type, i * v.stride));
}

// One thread per channel; the arithmetic in A (bn_math.h, as the CPU kernels and effdense.backends.bn.scale_shift).
template <typename A>
__global__ void scale_shift_kernel(Vec gamma, Vec beta, Vec mean, Vec var, A eps, int64_t n, A* scale, A* shift,
                                   A* invstd) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  bnmath::scale_shift(load_as<A>(gamma, i), load_as<A>(beta, i), load_as<A>(mean, i), load_as<A>(var, i), eps,
                      scale[i], shift[i], invstd[i]);
}

// The running type's opmath: float for float/half/bfloat16, double for double.
template <typename R>
struct Op {
  using type = float;
};
template <>
struct Op<double> {
  using type = double;
};

template <typename R>
__device__ __forceinline__ typename Op<R>::type to_op(R v) {
  return static_cast<typename Op<R>::type>(v);
}
template <>
__device__ __forceinline__ float to_op<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_op<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename R>
__device__ __forceinline__ R from_op(typename Op<R>::type v) {
  return static_cast<R>(v);
}
template <>
__device__ __forceinline__ __half from_op<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

struct RunningBatch {
  RunningLayer layer[kMaxRunningLayers];
};

// One block per layer: every thread reads num_batches_tracked before thread 0 increments it (a barrier between),
// then the block sweeps the layer's channels (bn_math.h: factor, unbiased variance, torch's lerp).
template <typename R, typename M>
__global__ void running_stats_kernel(RunningBatch batch, int64_t count) {
  using O = typename Op<R>::type;
  const RunningLayer& L = batch.layer[blockIdx.x];
  const int64_t tracked = *L.tracked + 1;
  __syncthreads();
  if (threadIdx.x == 0) *L.tracked = tracked;
  if (count == 0) return;  // an empty batch only counts, as nn.BatchNorm2d
  const O w = static_cast<O>(bnmath::running_factor(L.momentum, tracked));
  const M unb = static_cast<M>(bnmath::unbiased_factor(count));
  R* rm = static_cast<R*>(L.running_mean);
  R* rv = static_cast<R*>(L.running_var);
  const M* m = static_cast<const M*>(L.mean);
  const M* v = static_cast<const M*>(L.var);
  for (int64_t j = threadIdx.x; j < L.c; j += blockDim.x) {
    const O mb = to_op<R>(from_op<R>(static_cast<O>(m[j * L.stat_stride])));
    const O vb = to_op<R>(from_op<R>(static_cast<O>(v[j * L.stat_stride] * unb)));
    const O a = to_op<R>(rm[j * L.rm_stride]), b = to_op<R>(rv[j * L.rv_stride]);
    rm[j * L.rm_stride] = from_op<R>(bnmath::lerp(a, mb, w));
    rv[j * L.rv_stride] = from_op<R>(bnmath::lerp(b, vb, w));
  }
}

template <typename R, typename M>
cudaError_t launch_running(const RunningLayer* layers, int n_layers, int64_t count, cudaStream_t stream) {
  for (int first = 0; first < n_layers; first += kMaxRunningLayers) {
    RunningBatch batch{};
    const int n = n_layers - first < kMaxRunningLayers ? n_layers - first : kMaxRunningLayers;
    for (int i = 0; i < n; ++i) batch.layer[i] = layers[first + i];
    running_stats_kernel<R, M><<<n, kThreads, 0, stream>>>(batch, count);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename M>
cudaError_t dispatch_running(const RunningLayer* layers, int n_layers, VType running_type, int64_t count,
                             cudaStream_t stream) {
  switch (running_type) {
    case VType::F32: return launch_running<float, M>(layers, n_layers, count, stream);
    case VType::F64: return launch_running<double, M>(layers, n_layers, count, stream);
    case VType::F16: return launch_running<__half, M>(layers, n_layers, count, stream);
    default: return launch_running<__nv_bfloat16, M>(layers, n_layers, count, stream);
  }
}

}  // namespace

cudaError_t bn_scale_shift(Vec gamma, Vec beta, Vec mean, Vec var, double eps, int64_t n, VType out, void* scale,
                           void* shift, void* invstd, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  if (out == VType::F64)
    scale_shift_kernel<double><<<blocks, kThreads, 0, stream>>>(gamma, beta, mean, var, eps, n,
                                                                static_cast<double*>(scale),
                                                                static_cast<double*>(shift),
                                                                static_cast<double*>(invstd));
  else
    scale_shift_kernel<float><<<blocks, kThreads, 0, stream>>>(gamma, beta, mean, var, static_cast<float>(eps), n,
                                                               static_cast<float*>(scale), static_cast<float*>(shift),
                                                               static_cast<float*>(invstd));
  return cudaGetLastError();
}

cudaError_t update_running_stats(const RunningLayer* layers, int n_layers, VType running_type, VType stat_type,
                                 int64_t count, cudaStream_t stream) {
  if (n_layers == 0) return cudaSuccess;
  if (stat_type == VType::F64) return dispatch_running<double>(layers, n_layers, running_type, count, stream);
  if (stat_type == VType::F32) return dispatch_running<float>(layers, n_layers, running_type, count, stream);
  return cudaErrorInvalidValue;  // batch statistics are accumulated in float or double
}

}  // namespace cuda
}  // namespace effdense
