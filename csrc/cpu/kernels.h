// The CPU kernels of the effdense steps and ops (namespace effdense::cpu): those of ../device_kernels.h, for CPU
// tensors whose arguments steps.cpp has checked, and the cross-process merge. bn.cpp: statistics, BN-ReLU forward and
// backward (one tiled kernel family for both ways a BN is given), scale/shift, running statistics, the channel store
// and gradient gather, the merge; linear.cpp: BN-ReLU-Linear (the bottleneck 1x1 convolution) forward and backward,
// the bottleneck backward; conv3x3.cpp: BN-ReLU-Conv3x3 forward and backward; transition.cpp: the transition.
// tiles.h and gemm.h: the tile machinery they share.
#pragma once

#define EFFDENSE_DEVICE cpu
#include "../device_kernels.h"
#undef EFFDENSE_DEVICE

namespace effdense {
namespace cpu {

// Chan's merge of every process's (count, mean, M2) rows, gathered [P, 1 + 2C] (double), into mean/var [C].
void merge_moments(const at::Tensor& gathered, const at::Tensor& mean, const at::Tensor& var);

}  // namespace cpu
}  // namespace effdense
