// Small shared helpers of the effdense extension (torch side, no CUDA headers): dtypes and memory formats.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

namespace effdense {

using OptTensor = std::optional<at::Tensor>;

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

}  // namespace effdense
