// The device-generic entry of every effdense step (ops.h) and of the transition and running-statistics ops:
// the op's argument checks (checks.cpp), a profiler range under the op's name, then the kernel of the tensors'
// device, cpu:: (cpu/) or cuda:: (cuda/, a CUDA build only: check_feature refuses CUDA tensors otherwise).
// Plain calls: no dispatcher, no boxing; what the block driver pays per step is the checks it paid before.
#include <ATen/record_function.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"
#ifdef WITH_CUDA
#include "cuda/ops.h"
#endif

// `return cuda::CALL` for a tensor `t` on a CUDA device (a CUDA build), else nothing: the CPU kernel follows.
#ifdef WITH_CUDA
#define EFFDENSE_ON_CUDA(t, CALL) \
  if ((t).is_cuda()) return cuda::CALL
#else
#define EFFDENSE_ON_CUDA(t, CALL) (void)0
#endif

// The profiler range of a step: effdense.launches counts it as one launch where nothing inside launches.
#define EFFDENSE_RANGE(name) RECORD_FUNCTION("effdense::" name, std::vector<c10::IValue>())

namespace effdense {

Tensors2 channel_stats(const at::Tensor& x) {
  check_channel_stats(x);
  EFFDENSE_RANGE("channel_stats");
  EFFDENSE_ON_CUDA(x, channel_stats(x));
  return cpu::channel_stats(x);
}

void bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu_into(x, scale, shift, out);
  EFFDENSE_RANGE("bn_relu_into");
  EFFDENSE_ON_CUDA(x, bn_relu_into(x, scale, shift, out));
  cpu::bn_relu_into(x, scale, shift, out);
}

Tensors2 bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                               bool batch_stats, const at::Tensor& gx, bool accumulate, const Sync* sync) {
  check_bn_relu_backward_into(x, gy, scale, shift, mean, invstd, gx);
  EFFDENSE_RANGE("bn_relu_backward_into");
  EFFDENSE_ON_CUDA(x, bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, gx, accumulate, sync));
  return cpu::bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, gx, accumulate, sync);
}

at::Tensor bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& w) {
  check_bn_relu_conv1x1(x, scale, shift, w);
  EFFDENSE_RANGE("bn_relu_conv1x1");
#ifdef WITH_CUDA
  if (x.is_cuda()) {  // the fused tensor-core kernel, where it applies
    at::Tensor z = cuda::bn_relu_conv1x1(x, scale, shift, w);
    if (z.defined()) return z;
  }
#endif
  // BN-ReLU into a temporary, then ATen's convolution (oneDNN, cuDNN)
  at::Tensor u = at::empty(x.sizes(), x.options(), out_format(x));
  bn_relu_into(x, scale, shift, u);
  at::Tensor y = at::convolution(u, w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
  return y.is_contiguous(out_format(x)) ? y : y.contiguous(out_format(x));
}

Tensors3 bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                        const at::Tensor& var, double eps, at::ScalarType dtype) {
  check_bn_scale_shift(gamma, beta, mean, var, dtype);
  EFFDENSE_RANGE("bn_scale_shift");
  EFFDENSE_ON_CUDA(mean, bn_scale_shift(gamma, beta, mean, var, eps, dtype));
  TORCH_CHECK(mean.is_cpu(), "effdense::bn_scale_shift: expected mean on cpu or cuda, got ", mean.device());
  return cpu::bn_scale_shift(gamma, beta, mean, var, eps, dtype);
}

void batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out) {
  check_batch_norm_relu_into(x, gamma, beta, mean, var, out);
  EFFDENSE_RANGE("batch_norm_relu_into");
  EFFDENSE_ON_CUDA(x, batch_norm_relu_into(x, gamma, beta, mean, var, eps, out));
  cpu::batch_norm_relu_into(x, gamma, beta, mean, var, eps, out);
}

void bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                         const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  check_bn_relu_linear_into(x, gamma, beta, mean, var, w, out, out_mean, out_var);
  EFFDENSE_RANGE("bn_relu_linear_into");
  EFFDENSE_ON_CUDA(x, bn_relu_linear_into(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var));
  cpu::bn_relu_linear_into(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var);
}

void bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                          const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  check_bn_relu_conv3x3_into(x, gamma, beta, mean, var, w, out, out_mean, out_var);
  EFFDENSE_RANGE("bn_relu_conv3x3_into");
  EFFDENSE_ON_CUDA(x, bn_relu_conv3x3_into(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var));
  cpu::bn_relu_conv3x3_into(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var);
}

at::Tensor bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    double eps, const at::Tensor& w, const at::Tensor& ga) {
  check_bn_relu_conv3x3_backward(x, gy, gamma, beta, mean, var, w, ga);
  EFFDENSE_RANGE("bn_relu_conv3x3_backward");
  EFFDENSE_ON_CUDA(x, bn_relu_conv3x3_backward(x, gy, gamma, beta, mean, var, eps, w, ga));
  return cpu::bn_relu_conv3x3_backward(x, gy, gamma, beta, mean, var, eps, w, ga);
}

Tensors2 batch_norm_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                       const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                       double eps, bool batch_stats, const at::Tensor& gx, bool accumulate,
                                       const OptTensor& coef, const Sync* sync) {
  check_batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, gx, coef);
  EFFDENSE_RANGE("batch_norm_relu_backward_into");
  EFFDENSE_ON_CUDA(x, batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, eps, batch_stats, gx, accumulate,
                                                    coef, sync));
  return cpu::batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef,
                                            sync);
}

Tensors3 bn_relu_linear_backward(const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w,
                                 const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                 const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
                                 bool accumulate, const OptTensor& coef, const Sync* sync) {
  check_bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, gx, coef);
  EFFDENSE_RANGE("bn_relu_linear_backward");
  EFFDENSE_ON_CUDA(x, bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef,
                                              sync));
  return cpu::bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef, sync);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef, const Sync* sync) {
  check_bottleneck_backward(x, z, ga, w, gamma1, beta1, mean1, var1, gamma2, beta2, mean2, var2, gx, coef);
  EFFDENSE_RANGE("bottleneck_backward");
  EFFDENSE_ON_CUDA(x, bottleneck_backward(x, z, ga, w, gamma1, beta1, mean1, var1, eps1, batch_stats1, gamma2, beta2,
                                          mean2, var2, eps2, batch_stats2, gx, coef, sync));
  return cpu::bottleneck_backward(x, z, ga, w, gamma1, beta1, mean1, var1, eps1, batch_stats1, gamma2, beta2, mean2,
                                  var2, eps2, batch_stats2, gx, coef, sync);
}

void store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                    const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  check_store_channels(y, noise, p, out, mask, out_mean, out_var);
  EFFDENSE_RANGE("store_channels");
  EFFDENSE_ON_CUDA(y, store_channels(y, noise, p, out, mask, out_mean, out_var));
  cpu::store_channels(y, noise, p, out, mask, out_mean, out_var);
}

void gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out, const OptTensor& x,
                 const OptTensor& coef, const OptTensor& mean) {
  check_gather_grad(g, mask, p, out, x, coef, mean);
  EFFDENSE_RANGE("gather_grad");
  EFFDENSE_ON_CUDA(out, gather_grad(g, mask, p, out, x, coef, mean));
  cpu::gather_grad(g, mask, p, out, x, coef, mean);
}

// ------------------------------------------------------------------------------------- the registered ops

// The registered ops below have the dispatcher's profiler range already.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const OptTensor& running_mean,
    const OptTensor& running_var, double eps, const at::Tensor& w, const OptString& sync_group, int64_t sync_size) {
  check_transition_forward(x, gamma, beta, running_mean, running_var, w);
  const std::optional<Sync> sync = make_sync(sync_group, sync_size, 0, x, "transition_forward");
  const Sync* s = sync && !running_mean ? &*sync : nullptr;  // running statistics: nothing to merge
  const at::Tensor xd = x.is_contiguous(out_format(x)) ? x : x.contiguous(out_format(x));  // a channel slice: dense
  int64_t total = xd.size(0) * xd.size(2) * xd.size(3);
  at::Tensor y, mean, var;
#ifdef WITH_CUDA
  if (xd.is_cuda())
    std::tie(y, mean, var) = cuda::transition_forward(xd, gamma, beta, running_mean, running_var, eps, w, s, total);
#endif
  if (!y.defined())
    std::tie(y, mean, var) = cpu::transition_forward(xd, gamma, beta, running_mean, running_var, eps, w, s, total);
  return {y, mean, var, count_tensor(s, total)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const OptString& sync_group, int64_t sync_size, int64_t sync_count) {
  check_transition_backward(gy, x, gamma, beta, mean, var, w);
  const std::optional<Sync> sync = make_sync(sync_group, sync_size, sync_count, x, "transition_backward");
  const Sync* s = sync && batch_stats ? &*sync : nullptr;
  const at::Tensor xd = x.is_contiguous(out_format(x)) ? x : x.contiguous(out_format(x));
  EFFDENSE_ON_CUDA(xd, transition_backward(gy, xd, gamma, beta, mean, var, eps, batch_stats, w, s));
  return cpu::transition_backward(gy, xd, gamma, beta, mean, var, eps, batch_stats, w, s);
}

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                          at::ArrayRef<double> momentum, int64_t count) {
  check_update_running_stats(running_mean, running_var, nbt, mean, var, rows, momentum);
  if (running_mean.empty()) return;
  EFFDENSE_ON_CUDA(mean, update_running_stats(running_mean, running_var, nbt, mean, var, rows, momentum, count));
  cpu::update_running_stats(running_mean, running_var, nbt, mean, var, rows, momentum, count);
}

}  // namespace effdense
