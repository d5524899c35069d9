// The argument checks of every effdense step and op, written once per op and shared by its CPU and CUDA kernels
// (called from the device-generic entry points of steps.cpp; the dense-block ops check theirs in block.cpp's
// parse()). Each failure is one line naming what was expected.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common.h"

namespace effdense {

std::string shape_str(const at::Tensor& t);

// x a 4-D [N, C, H, W] tensor of a floating dtype, on the CPU or (in a CUDA build) a CUDA device.
void check_feature(const at::Tensor& x, const char* op, const char* name = "x");
// a of x's shape and device, of a floating dtype
void check_same_shape(const at::Tensor& a, const at::Tensor& x, const char* op, const char* name);
// The deferred-correction coefficients grad_coef [2, C] of x (accumulation dtype), if given.
void check_coef(const OptTensor& coef, const at::Tensor& x, const char* op);

// ---- the steps (steps.cpp), in the order of ops.h
void check_channel_stats(const at::Tensor& x);
void check_bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
void check_bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& gx);
void check_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& w);
void check_bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                          const at::Tensor& var, at::ScalarType dtype);
void check_batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& out);
void check_bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w,
                               const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
void check_bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w,
                                const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
void check_bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    const at::Tensor& w, const at::Tensor& ga);
void check_batch_norm_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                         const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                         const at::Tensor& gx, const OptTensor& coef);
void check_bn_relu_linear_backward(const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w,
                                   const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                   const at::Tensor& var, const at::Tensor& gx, const OptTensor& coef);
void check_bottleneck_backward(const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w,
                               const at::Tensor& gamma1, const at::Tensor& beta1, const at::Tensor& mean1,
                               const at::Tensor& var1, const at::Tensor& gamma2, const at::Tensor& beta2,
                               const at::Tensor& mean2, const at::Tensor& var2, const at::Tensor& gx,
                               const OptTensor& coef);
void check_store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                          const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var);
void check_gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                       const OptTensor& x, const OptTensor& coef, const OptTensor& mean);

// ---- the registered ops of steps.cpp
void check_transition_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                              const OptTensor& running_mean, const OptTensor& running_var, const at::Tensor& w);
void check_transition_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma,
                               const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                               const at::Tensor& w);
void check_update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                                const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                                at::ArrayRef<double> momentum);

}  // namespace effdense
