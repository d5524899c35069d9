// Shared helpers of the effdense extension (torch side, no CUDA headers).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace effdense {

// Accumulation dtype of statistics and BN arithmetic: double stays double, everything else is float.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

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

// The CPU channel statistics (ops.cpp), called directly by other CPU kernels.
std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x);

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

// ---- the block driver's ops, which take a BN's (gamma, beta, mean, var, eps) and derive scale/shift inside
// (schemas and argument checks in ops.cpp, CPU kernels in block_cpu.cpp, CUDA in cuda_block_ops.cpp)
using OptTensor = std::optional<at::Tensor>;
void check_bn_params(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                     const at::Tensor& var, const char* op);
void check_stats_out(const OptTensor& mean, const OptTensor& var, int64_t n, const at::Tensor& x, const char* op);
void check_out(const at::Tensor& out, at::IntArrayRef shape, const at::Tensor& x, bool acc_ok, const char* op,
               const char* name);
void check_linear_weight(const at::Tensor& x, const at::Tensor& w, const char* op);
// The arguments of bn_relu_conv3x3_into / _backward (x a feature tensor, a BN over its channels, w [k, C, 3, 3] of
// its dtype and device, the outputs' shapes), shared by the CPU and CUDA implementations.
void check_conv3x3_into_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w, const at::Tensor& out,
                             const OptTensor& out_mean, const OptTensor& out_var);
void check_conv3x3_backward_args(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                 const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& w, const at::Tensor& ga);
void check_running_stats_args(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                              const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                              at::ArrayRef<double> momentum);

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                                   const at::Tensor& mean, const at::Tensor& var,
                                                                   double eps, at::ScalarType dtype);
void call_batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out);
void call_bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                              const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
void call_bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                               const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var);
at::Tensor call_bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                         const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                         double eps, const at::Tensor& w, const at::Tensor& ga);
// Whether the CPU block driver runs its bottleneck 3x3 convolutions on conv3x3_cpu.cpp's kernels (the default
// where the build has AVX2/FMA) rather than on ATen's (oneDNN; EFFDENSE_CPU_CONV=onednn).
bool cpu_conv3x3_enabled();
std::tuple<at::Tensor, at::Tensor> call_batch_norm_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_relu_linear_backward(
    const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& g1,
    const at::Tensor& b1, const at::Tensor& m1, const at::Tensor& v1, double eps1, bool bs1, const at::Tensor& g2,
    const at::Tensor& b2, const at::Tensor& m2, const at::Tensor& v2, double eps2, bool bs2, const at::Tensor& gx,
    const OptTensor& coef);
void call_store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                         const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var);
void call_gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                      const OptTensor& x, const OptTensor& coef, const OptTensor& mean);
// argument checks of the ops with a CPU and a CUDA kernel (ops.cpp), one line of error each
void check_gather_grad_args(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                            const OptTensor& x, const OptTensor& coef, const OptTensor& mean);
void check_store_channels_args(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                               const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var);
void check_scale_shift_args(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                            const at::Tensor& var, at::ScalarType dtype);

// The process-wide scratch memory of the CPU block driver (block.cpp): grown to the largest request and kept
// across calls and steps (see block.cpp), released by effdense._C.release_workspace().
int64_t workspace_bytes();
void release_workspace();

}  // namespace effdense
