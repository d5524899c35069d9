// Raw-pointer launchers of the cpp block driver's small CUDA kernels (csrc/cuda/block_kernels.cu). No torch
// headers: the file compiles with plain nvcc (csrc/check_compile.py); the torch glue is csrc/cuda/block_ops.cpp.
//
// Every launcher returns the first CUDA error of its launches (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effdense {
namespace cuda {

// The element types the kernels read (same numbering as kernels.h's DType).
enum class VType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// A 1-D vector of n elements of type `type` at `data` with stride `stride` (elements).
struct Vec {
  const void* data;
  VType type;
  int64_t stride;
};

// scale = gamma * invstd, shift = beta - mean * scale, invstd = 1 / sqrt(var + eps), n channels, computed and
// written in `out` (F32 or F64; contiguous) as effdense.backends.bn.scale_shift does. One launch.
cudaError_t bn_scale_shift(Vec gamma, Vec beta, Vec mean, Vec var, double eps, int64_t n, VType out, void* scale,
                           void* shift, void* invstd, cudaStream_t stream);

// One layer of a running-statistics update (nn.BatchNorm2d's: ../bn_math.h, ../ops.h update_running_stats).
struct RunningLayer {
  void* running_mean;   // [c], stride rm_stride
  void* running_var;    // [c], stride rv_stride
  int64_t* tracked;     // num_batches_tracked (one element)
  const void* mean;     // batch mean [c], stride stat_stride (type: RunningArgs::stat_type)
  const void* var;      // batch var [c], same stride
  int64_t c, rm_stride, rv_stride, stat_stride;
  double momentum;      // < 0: cumulative average (momentum=None), factor 1 / num_batches_tracked
};

// Updates every layer in one launch per kMaxRunningLayers layers: num_batches_tracked += 1 on the device (no
// host read), then running = lerp(running, batch, factor), running_var towards the unbiased var * n / (n - 1);
// count == 0 only counts. All layers share the running statistics' type and the batch statistics' type.
constexpr int kMaxRunningLayers = 16;
cudaError_t update_running_stats(const RunningLayer* layers, int n_layers, VType running_type, VType stat_type,
                                 int64_t count, cudaStream_t stream);

}  // namespace cuda
}  // namespace effdense
