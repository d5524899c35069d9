// The torch side of the CUDA kernels (namespace effdense::cuda): those of ../device_kernels.h, for CUDA tensors
// whose arguments steps.cpp has checked, and the fused BN-ReLU-Conv1x1. bn_ops.cpp: statistics, BN-ReLU forward
// and backward, the fused conv1x1 (kernels of bn_kernels.cu, conv1x1.cu); block_ops.cpp: the block driver's steps,
// composed of those with cuBLAS, cuDNN and ATen, and the small kernels of block_kernels.cu (scale/shift, running
// statistics); transition.cpp: the transition. Compiled only in a CUDA build (WITH_CUDA).
#pragma once

#define EFFDENSE_DEVICE cuda
#include "../device_kernels.h"
#undef EFFDENSE_DEVICE

namespace effdense {
namespace cuda {

// The fused tensor-core BN-ReLU-Conv1x1 where it applies, else an undefined tensor (steps.cpp composes it then).
at::Tensor bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& w);

}  // namespace cuda
}  // namespace effdense
