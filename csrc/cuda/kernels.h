// Raw-pointer launchers of effdense's CUDA kernels. No torch headers: these files compile with plain nvcc
// (csrc/check_compile.py), and the torch glue (csrc/cuda/bn_ops.cpp) calls them with the current stream.
//
// Every launcher checks its launches and returns the first error (cudaSuccess otherwise); the glue turns
// an error into a TORCH_CHECK failure. Indexing is int64 throughout. Half and bfloat16 inputs accumulate in
// float, float in float, double in double ("A" below: the accumulation type).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace effdense {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Streaming multiprocessors of the current device (grid sizing), queried once per device and cached; 80 when
// it cannot be queried. Defined in bn_kernels.cu; for every kernel file's launch planning.
int sm_count();

// A [N, C, H, W] tensor in one of the two layouts the kernels read directly:
//  * channels-last (cl): element (p, c) at p * ld + c, pixel p = n * HW + hw (a channel prefix of a
//    channels-last buffer has ld = the buffer's channel count);
//  * planar: element (n, c, hw) at n * sN + c * sC + hw (contiguous NCHW, or a channel prefix of it).
// Any other layout is made contiguous by the glue first.
struct Feat {
  const void* data;
  int64_t N, C, HW;
  bool cl;
  int64_t ld;      // cl only
  int64_t sN, sC;  // planar only
};

// An output in the same layout kind as the Feat it is computed from (its own strides).
struct Out {
  void* data;
  int64_t ld;      // cl only
  int64_t sN, sC;  // planar only
};

// Bytes of device workspace the reductions of channel_stats / bn_relu_backward need for `x` on the
// current device (partial sums per chunk of pixels; the reductions are deterministic, no atomics).
size_t reduce_workspace_bytes(const Feat& x, DType dt);

// mean/var [C] in A (biased variance), from shifted sums (shift = the channel's first value) merged in a
// fixed order. x must have at least one pixel.
cudaError_t channel_stats(const Feat& x, DType dt, void* mean, void* var, void* workspace, cudaStream_t stream);

// out = relu(x * scale + shift) per channel (scale, shift: [C] in A), out in x's dtype. out may be x.
cudaError_t bn_relu(const Feat& x, DType dt, const void* scale, const void* shift, const Out& out,
                    cudaStream_t stream);

// The BN-ReLU backward of effdense.backends.bn.bn_relu_backward: g = gy * [x * scale + shift > 0],
// dbeta = sum g, dgamma = sum g * xhat, xhat = (x - mean) * invstd, and
// gx (=|+=) scale * (g - dbeta / P - xhat * dgamma / P)  (batch statistics)  or  scale * g  (running).
// gy has the layout kind of x (its own strides); gx is in x's dtype or, with gx_acc, in A.
// dgamma/dbeta [C] in A. x must have at least one pixel.
cudaError_t bn_relu_backward(const Feat& x, const Feat& gy, DType dt, const void* scale, const void* shift,
                             const void* mean, const void* invstd, bool batch_stats, const Out& gx, bool gx_acc,
                             bool accumulate, void* dgamma, void* dbeta, void* workspace, cudaStream_t stream);

// Fused BN-ReLU-Conv1x1 on tensor cores (WMMA, fp32 accumulation): z[p, b] = sum_c relu(x[p, c] * scale[c]
// + shift[c]) * w[b, c] for a channels-last x (half or bfloat16), w [B, C] contiguous, z [P, B] dense
// channels-last in x's dtype. scale/shift in float.
bool bn_relu_conv1x1_supported(const Feat& x, DType dt);
cudaError_t bn_relu_conv1x1(const Feat& x, DType dt, const float* scale, const float* shift, const void* w,
                            int64_t B, void* z, cudaStream_t stream);

}  // namespace cuda
}  // namespace effdense
