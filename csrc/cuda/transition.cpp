// The transition conv1x1(avgpool2x2(relu(bn(x)))) on CUDA (cuda/ops.h), composed of the CUDA steps (channel
// statistics, scale/shift, BN-ReLU forward and backward: ops.h) and ATen (avg_pool2d, cuDNN's 1x1 convolution):
// the same math as the CPU kernels (cpu/transition.cpp), without their tile fusion. Compiled only with CUDA.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "ops.h"

namespace effdense {
namespace cuda {
namespace {

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w) {
  return at::convolution(x, w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

// u = relu(bn(x)) in x's layout, with the BN's (scale, shift, invstd)
std::tuple<at::Tensor, Tensors3> bn_relu_of(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                           const at::Tensor& mean, const at::Tensor& var, double eps) {
  Tensors3 affine = effdense::bn_scale_shift(gamma, beta, mean, var, eps, acc_type(x.scalar_type()));
  at::Tensor u = at::empty(x.sizes(), x.options(), out_format(x));
  effdense::bn_relu_into(x, std::get<0>(affine), std::get<1>(affine), u);
  return {u, affine};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_forward(const at::Tensor& x, const at::Tensor& gamma,
                                                                  const at::Tensor& beta, const OptTensor& rm,
                                                                  const OptTensor& rv, double eps,
                                                                  const at::Tensor& w, const Sync* sync,
                                                                  int64_t& count) {
  (void)sync;  // CPU only (make_sync refuses CUDA tensors)
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x.scalar_type());
  at::Tensor mean = at::empty({0}, x.options().dtype(acc)), var = at::empty({0}, x.options().dtype(acc));
  if (!rm) std::tie(mean, var) = effdense::channel_stats(x);
  at::Tensor u = std::get<0>(bn_relu_of(x, gamma, beta, rm ? *rm : mean, rv ? *rv : var, eps));
  at::Tensor y = conv1x1(at::avg_pool2d(u, {2, 2}, {2, 2}), w);
  (void)count;  // this process's pixels (no merge)
  return {y.is_contiguous(out_format(x)) ? y : y.contiguous(out_format(x)), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const Sync* sync) {
  (void)sync;
  const c10::cuda::CUDAGuard guard(x.device());
  auto [u, affine] = bn_relu_of(x, gamma, beta, mean, var, eps);
  auto [scale, shift, invstd] = affine;
  at::Tensor pooled = at::avg_pool2d(u, {2, 2}, {2, 2});
  auto [gp, gw, gb] = at::convolution_backward(gy, pooled, w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0},
                                               1, {true, true, false});
  at::Tensor gu = at::avg_pool2d_backward(gp, u, {2, 2}, {2, 2}, {0, 0}, false, true, std::nullopt);
  at::Tensor gx = at::empty(x.sizes(), x.options(), out_format(x));
  auto [dg, db] = effdense::bn_relu_backward_into(x, gu, scale, shift, mean.to(scale.scalar_type()), invstd,
                                                  batch_stats, gx, false);
  if (gw.strides() != w.strides()) gw = at::empty_like(w).copy_(gw);
  return {gx, dg.to(gamma.scalar_type()), db.to(beta.scalar_type()), gw};
}

}  // namespace cuda
}  // namespace effdense

#endif  // WITH_CUDA
