// Shared helpers of the effdense extension (torch side, no CUDA headers).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace effdense {

// Accumulation dtype of statistics and BN arithmetic: double stays double, everything else is float.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The memory format outputs take: channels-last when `x` is laid out channels-last (also as a strided prefix
// view of a channels-last buffer), else contiguous. Same rule as effdense.backends.torch_backend.memory_format
// and the fake (meta) functions in effdense/backends/cpp_backend.py, so real and fake strides agree.
inline at::MemoryFormat out_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.size(1) > 1) {
    const auto s = x.strides();
    const int64_t m = std::min(std::min(s[0], s[1]), std::min(s[2], s[3]));
    if (s[1] == m) return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Argument checks shared by the CPU and CUDA implementations; messages name what was expected.
std::string shape_str(const at::Tensor& t);
void check_feature(const at::Tensor& x, const char* op, const char* name = "x");
void check_vec(const at::Tensor& v, const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name);
void check_same_shape(const at::Tensor& a, const at::Tensor& x, const char* op, const char* name);

void check_bn_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const char* op);
void check_bwd_args(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& mean, const at::Tensor& invstd, const char* op);
void check_grad_x(const at::Tensor& x, const at::Tensor& gx, const char* op);
void check_conv1x1_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& w);
// BN-ReLU into a scratch tensor, then ATen's 1x1 convolution (the reference of the fused CUDA kernel).
at::Tensor bn_relu_conv1x1_composite(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                     const at::Tensor& w);

// Raw dispatcher handles of the per-device ops, used by the device-generic block driver (block.cpp).
std::tuple<at::Tensor, at::Tensor> call_channel_stats(const at::Tensor& x);
void call_bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
at::Tensor call_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_relu_backward(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats);
std::tuple<at::Tensor, at::Tensor> call_bn_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats, const at::Tensor& gx, bool accumulate);

}  // namespace effdense
