// The C++ API of the extension: what each effdense step and op computes, device generic.
//
// Two kinds of entry points, both defined once for every device (steps.cpp, block.cpp) as: the op's argument
// checks (checks.cpp), then the CPU kernel (cpu/, namespace effdense::cpu) or the CUDA one (cuda/, effdense::cuda)
// for the tensors' device, inside a profiler range named ``effdense::<name>`` (so effdense.launches counts a step
// as one launch, as it did when the steps were dispatcher operators):
//
//  * the registered operators (ops.cpp: schemas, dispatcher registration; fakes and autograd in
//    effdense/backends/cpp_backend.py), the five Python calls: dense_block_forward/backward, transition_forward/
//    backward, update_running_stats;
//  * the steps below, plain C++ functions the block driver (block.cpp) and the transition call. They are not
//    operators; tests and benchmarks reach them through effdense._C._testing (testing.cpp), which is not an API.
//
// A BN is given as (gamma, beta, mean, var, eps) and its scale/shift derived inside (bn_math.h), or, for the
// scale/shift steps, as scale = gamma * invstd and shift = beta - mean * scale in the accumulation dtype (float,
// double for double). Feature tensors are [N, C, H, W] of any strides; `_into` steps write into caller-given
// outputs (any strides: channel slices of the feature buffer, or the block's dense channels-last transients).
// Steps that compute a BN backward's batch-statistics sums take an optional Sync (sync.h: --sync-bn).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "sync.h"

namespace effdense {

using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptString = std::optional<std::string>;

// ------------------------------------------------------------------------------------------------ the steps

// Per-channel (mean, biased var) of x in its accumulation dtype; NaN for an empty batch (torch.var_mean).
Tensors2 channel_stats(const at::Tensor& x);
// out = relu(x * scale + shift) per channel; out in x's dtype or its accumulation dtype, may be x itself.
void bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
// The BN-ReLU backward (bn_math.h) into gx (= or, with accumulate, +=); returns (dgamma, dbeta) [C] in the
// accumulation dtype. mean/invstd: the statistics x was normalized with.
Tensors2 bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                               bool batch_stats, const at::Tensor& gx, bool accumulate,
                               const Sync* sync = nullptr);
// z = conv1x1(relu(x * scale + shift), w), z in x's memory format (CUDA: one tensor-core kernel where it applies).
at::Tensor bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& w);
// (scale, shift, invstd) [C] in `dtype` (float32 or float64).
Tensors3 bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                        const at::Tensor& var, double eps, at::ScalarType dtype);
// out = relu(bn(x)); out in x's dtype or its accumulation dtype, may be x itself.
void batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out);
// out = conv1x1(relu(bn(x)), w) (w [B, C, 1, 1]), with out's per-channel (mean, biased var) into
// (out_mean, out_var) when given.
void bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                         const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
// out = conv3x3(relu(bn(x)), w) (w [k, C, 3, 3], stride 1, zero padding 1), with out's statistics when given.
void bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                          const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
// Its backward: grad_a (the gradient of relu(bn(x))) into ga; returns grad_w in w's strides.
at::Tensor bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    double eps, const at::Tensor& w, const at::Tensor& ga);
// The BN-ReLU backward of a BN given as (gamma, beta, mean, var, eps) into gx (= or +=), gx may be gy itself;
// with coef [2, C] the batch-statistics correction is deferred: alpha, beta added into coef (cpu/tiles.h
// apply_correction) for whoever reads gx next (gather_grad). Returns (dgamma, dbeta) in gamma's/beta's dtypes.
Tensors2 batch_norm_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                       const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                       double eps, bool batch_stats, const at::Tensor& gx, bool accumulate,
                                       const OptTensor& coef, const Sync* sync = nullptr);
// The backward of bn_relu_linear_into from grad_z: returns (grad_w, dgamma, dbeta); grad_x into gx (= or +=).
Tensors3 bn_relu_linear_backward(const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w,
                                 const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                 const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
                                 bool accumulate, const OptTensor& coef, const Sync* sync = nullptr);
// A bottleneck's conv1 side backward, z = conv1x1(relu(bn1(x)), w), a = relu(bn2(z)), from grad_a: the BN2-ReLU
// backward, then bn_relu_linear_backward (accumulating into gx). Returns (grad_w, dgamma1, dbeta1, dgamma2, dbeta2).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef, const Sync* sync = nullptr);
// out = y, or with dropout y * noise / (1 - p) (noise: F.dropout's Bernoulli draw) and mask = noise != 0; the
// statistics of the stored values into (out_mean, out_var) when given.
void store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                    const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var);
// out = grad (+ coef[0] + coef[1] * (x - mean): deferred corrections), with dropout times mask / (1 - p).
void gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out, const OptTensor& x,
                 const OptTensor& coef, const OptTensor& mean);

// ------------------------------------------------------------------------------------- the registered ops

using BlockGrads = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                              std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using OptList = c10::List<std::optional<at::Tensor>>;

// block.cpp: the dense block of docs/DESIGN.md, forward (feat, mean, var, mean2, var2, drop_mask, bottleneck, count)
// and backward; the schemas in ops.cpp say what each argument is.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dense_block_forward(const at::Tensor& x, at::TensorList w1, at::TensorList w2, at::TensorList g1, at::TensorList b1,
                    at::TensorList g2, at::TensorList b2, const OptList& rm1, const OptList& rv1, const OptList& rm2,
                    const OptList& rv2, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
                    at::ArrayRef<double> drop, bool keep_bottleneck, bool reserve_backward,
                    const OptString& sync_group, int64_t sync_size);
BlockGrads dense_block_backward(const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& mean2, const at::Tensor& var2,
                                const at::Tensor& mask, const at::Tensor& kept, at::TensorList w1, at::TensorList w2,
                                at::TensorList g1, at::TensorList b1, at::TensorList g2, at::TensorList b2,
                                const OptList& rm1, const OptList& rv1, const OptList& rm2, const OptList& rv2,
                                at::ArrayRef<double> eps1, at::ArrayRef<double> eps2, at::ArrayRef<double> drop,
                                const OptString& sync_group, int64_t sync_size, int64_t sync_count);

// steps.cpp: the transition conv1x1(avgpool2x2(relu(bn(x)))) (cpu/transition.cpp says how), forward
// (y, mean, var, count) with the batch statistics (or the running ones given) and backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const OptTensor& running_mean,
    const OptTensor& running_var, double eps, const at::Tensor& w, const OptString& sync_group, int64_t sync_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const OptString& sync_group, int64_t sync_size, int64_t sync_count);
// nn.BatchNorm2d's running-statistics update (bn_math.h) of a list of layers at once; mean/var [C] (layer i takes
// the prefix its running_mean is long) or [L, B] (layer i takes row rows[i]); count: the batch's pixels.
void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                          at::ArrayRef<double> momentum, int64_t count);

// block.cpp: the CPU block driver's workspace (held across calls; effdense._C.workspace_bytes/release_workspace).
int64_t workspace_bytes();
void release_workspace();
// cpu/conv3x3.cpp: whether the CPU block driver runs bottleneck 3x3 convolutions on its own kernels (AVX2 build,
// EFFDENSE_CPU_CONV unset) rather than on ATen's.
bool cpu_conv3x3_enabled();

}  // namespace effdense
