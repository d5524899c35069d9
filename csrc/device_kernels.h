// The functions every device's kernels implement: ops.h's steps and its transition and running-statistics ops,
// for tensors of that device whose arguments steps.cpp has checked. Declared once, here, for each device in its
// namespace: cpu/kernels.h includes this file with EFFDENSE_DEVICE defined as cpu, cuda/ops.h as cuda (no include
// guard, on purpose). The sync arguments (--sync-bn) are null on CUDA (sync.h).
#ifndef EFFDENSE_DEVICE
#error "define EFFDENSE_DEVICE (cpu or cuda) before including device_kernels.h"
#endif

#include <ATen/ATen.h>

#include <tuple>

#include "common.h"
#include "sync.h"

namespace effdense {
namespace EFFDENSE_DEVICE {

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x);
void bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy,
                                                         const at::Tensor& scale, const at::Tensor& shift,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         bool batch_stats, const at::Tensor& gx, bool accumulate,
                                                         const Sync* sync);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps, at::ScalarType dtype);
void batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out);
void bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                         const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
void bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                          const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
at::Tensor bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    double eps, const at::Tensor& w, const at::Tensor& ga);
std::tuple<at::Tensor, at::Tensor> batch_norm_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_linear_backward(
    const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef, const Sync* sync);
void store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                    const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var);
void gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out, const OptTensor& x,
                 const OptTensor& coef, const OptTensor& mean);
// the transition of a dense x with the statistics it normalizes with: (y, mean, var), mean/var empty with running
// statistics, the batch's merged over the processes of `sync` when given (then `count` becomes their pixels)
std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_forward(const at::Tensor& x, const at::Tensor& gamma,
                                                                  const at::Tensor& beta, const OptTensor& rm,
                                                                  const OptTensor& rv, double eps,
                                                                  const at::Tensor& w, const Sync* sync,
                                                                  int64_t& count);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const Sync* sync);
void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                          at::ArrayRef<double> momentum, int64_t count);

}  // namespace EFFDENSE_DEVICE
}  // namespace effdense
