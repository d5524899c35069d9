// The CUDA versions of the block driver's steps (cuda/ops.h; CPU kernels in cpu/). Compiled only when the extension
// is built with CUDA. Arguments were checked by steps.cpp.
//
// Two small kernels of their own (block_kernels.cu): a BN's scale/shift from (gamma, beta, mean, var, eps),
// and the running-statistics update of all layers of a block, which reads num_batches_tracked on the device (no
// host synchronization). The rest composes the per-channel CUDA steps (bn_ops.cpp: channel statistics, BN-ReLU
// forward and backward, called through ops.h's entries, each a profiled step) with cuBLAS GEMMs (at::mm_out on the
// [P, c] channels-last views) and ATen elementwise ops: the same math as the CPU kernels, without their tile fusion (each step is a launch of its own). The
// deferred BN correction of the CPU kernels (grad_coef) is not used here: the correction is applied at once and
// grad_coef stays untouched (zero), which gather_grad then adds as nothing.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../ops.h"
#include "block_kernels.h"
#include "ops.h"

namespace effdense {
namespace cuda {
namespace {

VType vtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return VType::F32;
    case at::kDouble: return VType::F64;
    case at::kHalf: return VType::F16;
    case at::kBFloat16: return VType::BF16;
    default: TORCH_CHECK(false, "effdense: no CUDA kernels for dtype ", t);
  }
  return VType::F32;
}

Vec vec(const at::Tensor& t) { return Vec{t.data_ptr(), vtype(t.scalar_type()), t.stride(0)}; }

void check_cuda(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "effdense::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(e), ": ",
              cudaGetErrorString(e));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct Affine {
  at::Tensor scale, shift, invstd;
};

Affine affine(const at::Tensor& x, const at::Tensor& g, const at::Tensor& b, const at::Tensor& m, const at::Tensor& v,
              double eps) {
  auto [s, t, i] = effdense::bn_scale_shift(g, b, m, v, eps, acc_type(x.scalar_type()));
  return {s, t, i};
}

at::Tensor cl_empty(const at::Tensor& like, int64_t c, at::ScalarType dt) {
  return at::empty({like.size(0), c, like.size(2), like.size(3)}, like.options().dtype(dt),
                   at::MemoryFormat::ChannelsLast);
}

// The [P, c] matrix of a dense channels-last [N, c, H, W] tensor (a view).
at::Tensor rows(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

bool dense_cl(const at::Tensor& t) { return t.is_contiguous(at::MemoryFormat::ChannelsLast); }

void copy_stats(const at::Tensor& t, const OptTensor& out_mean, const OptTensor& out_var) {
  if (!out_mean) return;
  auto [m, v] = effdense::channel_stats(t);
  const_cast<at::Tensor&>(*out_mean).copy_(m);
  const_cast<at::Tensor&>(*out_var).copy_(v);
}

// The BN-ReLU backward of (x, gy) into gx (through a temporary when gx is gy itself); dgamma/dbeta in the
// parameters' dtypes.
std::tuple<at::Tensor, at::Tensor> bn_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                               const at::Tensor& beta, const at::Tensor& mean, const Affine& p,
                                               bool batch_stats, const at::Tensor& gx, bool accumulate) {
  const bool alias = gx.data_ptr() == gy.data_ptr();
  at::Tensor dst = alias ? at::empty(gx.sizes(), gx.options(), out_format(gx)) : gx;
  auto [dg, db] = effdense::bn_relu_backward_into(x, gy, p.scale, p.shift, mean.to(p.scale.scalar_type()), p.invstd,
                                                  batch_stats, dst, accumulate);
  if (alias) const_cast<at::Tensor&>(gx).copy_(dst);
  return {dg.to(gamma.scalar_type()), db.to(beta.scalar_type())};
}

// The bottleneck 3x3 convolution steps (the CPU kernels are cpu/conv3x3.cpp) as BN2-ReLU into a channels-last a
// and cuDNN, the path the block driver itself takes on CUDA: so the steps exist, and agree, on both devices.
at::Tensor bn_relu_cl(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                      const at::Tensor& var, double eps) {
  at::Tensor a = at::empty(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
  effdense::batch_norm_relu_into(x, gamma, beta, mean, var, eps, a);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto opts = mean.options().dtype(dtype);
  at::Tensor scale = at::empty({mean.numel()}, opts), shift = at::empty_like(scale), inv = at::empty_like(scale);
  check_cuda(bn_scale_shift(vec(gamma), vec(beta), vec(mean), vec(var), eps, mean.numel(), vtype(dtype),
                            scale.data_ptr(), shift.data_ptr(), inv.data_ptr(), stream()),
             "bn_scale_shift");
  return {scale, shift, inv};
}

void batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Affine p = affine(x, gamma, beta, mean, var, eps);
  effdense::bn_relu_into(x, p.scale, p.shift, out);
}

void bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                         const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Affine p = affine(x, gamma, beta, mean, var, eps);
  at::Tensor u = cl_empty(x, x.size(1), x.scalar_type());
  effdense::bn_relu_into(x, p.scale, p.shift, u);
  const at::Tensor w2 = w.reshape({w.size(0), w.size(1)});
  if (dense_cl(out)) {
    at::Tensor z = rows(out);
    at::mm_out(z, rows(u), w2.t());
  } else {
    const_cast<at::Tensor&>(out).copy_(at::mm(rows(u), w2.t()).view({x.size(0), x.size(2), x.size(3), -1})
                                           .permute({0, 3, 1, 2}));
  }
  copy_stats(out, out_mean, out_var);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
  (void)coef;  // the correction is applied at once (see the file comment)
  (void)sync;  // CPU only (make_sync refuses CUDA tensors)
  const c10::cuda::CUDAGuard guard(x.device());
  return bn_backward(x, gy, gamma, beta, mean, affine(x, gamma, beta, mean, var, eps), batch_stats, gx, accumulate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_linear_backward(
    const at::Tensor& x, const at::Tensor& gz_, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
  (void)coef;
  (void)sync;
  const c10::cuda::CUDAGuard guard(x.device());
  const Affine p = affine(x, gamma, beta, mean, var, eps);
  const at::Tensor gz = dense_cl(gz_) ? gz_ : gz_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor u = cl_empty(x, x.size(1), x.scalar_type());
  effdense::bn_relu_into(x, p.scale, p.shift, u);
  at::Tensor dw = at::empty_like(w);
  at::Tensor dw2 = dw.view({w.size(0), w.size(1)});  // [B, c] with strides (c, 1) for a dense 1x1 weight
  at::mm_out(dw2, rows(gz).t(), rows(u));
  at::Tensor gu = cl_empty(x, x.size(1), x.scalar_type());
  at::Tensor gu2 = rows(gu);
  at::mm_out(gu2, rows(gz), w.reshape({w.size(0), w.size(1)}));
  auto [dg, db] = bn_backward(x, gu, gamma, beta, mean, p, batch_stats, gx, accumulate);
  return {dw, dg, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef, const Sync* sync) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gz = at::empty(z.sizes(), z.options(), at::MemoryFormat::ChannelsLast);
  auto [dg2, db2] = bn_backward(z, ga, gamma2, beta2, mean2, affine(z, gamma2, beta2, mean2, var2, eps2),
                                batch_stats2, gz, false);
  auto [dw, dg1, db1] = effdense::bn_relu_linear_backward(x, gz, w, gamma1, beta1, mean1, var1, eps1, batch_stats1,
                                                          gx, true, coef, sync);
  return {dw, dg1, db1, dg2, db2};
}

void store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                    const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  const c10::cuda::CUDAGuard guard(y.device());
  if (noise) {
    const_cast<at::Tensor&>(out).copy_(y * noise->div(1.0 - p));  // F.dropout's arithmetic
    if (mask) const_cast<at::Tensor&>(*mask).copy_(noise->ne(0));
  } else {
    const_cast<at::Tensor&>(out).copy_(y);
  }
  copy_stats(out, out_mean, out_var);
}

void gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out, const OptTensor& x,
                 const OptTensor& coef, const OptTensor& mean) {
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor v = g;
  if (x) {  // bnmath::corrected: no beta * (x - mean) where beta is 0, so a NaN of x stays out
    const auto a = coef->scalar_type();
    const at::Tensor beta = coef->select(0, 1).view({1, -1, 1, 1});
    v = v.to(a) + coef->select(0, 0).view({1, -1, 1, 1}) +
        at::where(beta != 0, beta * (x->to(a) - mean->to(a).view({1, -1, 1, 1})), 0);
  }
  if (mask) v = v * mask->to(out.scalar_type()).div(1.0 - p);
  const_cast<at::Tensor&>(out).copy_(v);
}

// The CUDA running-statistics update: one kernel per call, reading num_batches_tracked on the device.
void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows_,
                          at::ArrayRef<double> momentum, int64_t count) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto rt = running_mean[0].scalar_type();
  std::vector<RunningLayer> layers;
  for (size_t i = 0; i < running_mean.size(); ++i) {
    const int64_t off = mean.dim() == 1 ? 0 : rows_[i] * mean.stride(0);
    const int64_t sm = mean.stride(mean.dim() - 1);
    const size_t es = c10::elementSize(mean.scalar_type());
    layers.push_back(RunningLayer{running_mean[i].data_ptr(), running_var[i].data_ptr(), nbt[i].data_ptr<int64_t>(),
                                  static_cast<const char*>(mean.data_ptr()) + off * es,
                                  static_cast<const char*>(var.data_ptr()) + off * es, running_mean[i].numel(),
                                  running_mean[i].stride(0), running_var[i].stride(0), sm, momentum[i]});
  }
  check_cuda(update_running_stats(layers.data(), static_cast<int>(layers.size()), vtype(rt),
                                  vtype(mean.scalar_type()), count, stream()),
             "update_running_stats");
}

void bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                          const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor a = bn_relu_cl(x, gamma, beta, mean, var, eps);
  const_cast<at::Tensor&>(out).copy_(at::convolution(a, w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1));
  copy_stats(out, out_mean, out_var);
}

at::Tensor bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    double eps, const at::Tensor& w, const at::Tensor& ga) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor a = bn_relu_cl(x, gamma, beta, mean, var, eps);
  auto [gi, gw, gb] = at::convolution_backward(gy, a, w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                               {true, true, false});
  const_cast<at::Tensor&>(ga).copy_(gi);
  return gw.strides() == w.strides() ? gw : at::empty_like(w).copy_(gw);
}

}  // namespace cuda
}  // namespace effdense

#endif  // WITH_CUDA
