// The CUDA per-channel BN steps (cuda/ops.h: channel statistics, BN-ReLU forward and backward, the fused
// BN-ReLU-Conv1x1): torch glue around the raw-pointer launchers of bn_kernels.cu and conv1x1.cu. Compiled only
// when the extension is built with CUDA (setup.py defines WITH_CUDA and adds this file).
//
// Arguments were checked by steps.cpp. The glue sets the device, describes each tensor as
// channels-last [P, C] with a leading dimension or as planar NCHW planes (copying to a dense layout only
// when neither fits), allocates the reduction workspace through PyTorch's caching allocator and launches
// on the current stream; every launcher's error becomes a TORCH_CHECK failure naming the op.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <optional>

#include "../sync.h"
#include "kernels.h"
#include "ops.h"

namespace effdense {
namespace cuda {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "effdense: no CUDA kernels for dtype ", t);
  }
  return DType::F32;
}

void check_cuda(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "effdense::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(e), ": ",
              cudaGetErrorString(e));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Describes t [N, C, H, W] in the kernels' channels-last (cl) or planar layout, if its strides fit.
std::optional<Feat> describe(const at::Tensor& t, bool cl) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const auto s = t.strides();
  Feat f{t.data_ptr(), N, C, H * W, cl, 0, 0, 0};
  if (cl) {
    const int64_t ld = W > 1 ? s[3] : H > 1 ? s[2] : N > 1 ? s[0] : C;
    const bool ok = (C == 1 || s[1] == 1) && (W == 1 || s[3] == ld) && (H == 1 || s[2] == W * ld) &&
                    (N == 1 || s[0] == H * W * ld) && ld >= C;
    if (!ok) return std::nullopt;
    f.ld = ld;
  } else {
    if (!((W == 1 || s[3] == 1) && (H == 1 || s[2] == W))) return std::nullopt;
    f.sN = s[0];
    f.sC = s[1];
  }
  return f;
}

Out out_of(const Feat& f) { return Out{const_cast<void*>(f.data), f.ld, f.sN, f.sC}; }

// x in a layout the kernels read (a dense copy when its strides fit neither), and that layout kind.
at::Tensor readable(const at::Tensor& x, bool& cl) {
  cl = out_format(x) == at::MemoryFormat::ChannelsLast;
  if (describe(x, cl)) return x;
  if (describe(x, !cl)) {
    cl = !cl;
    return x;
  }
  return x.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// t in layout kind `cl` (a copy when its strides do not fit).
at::Tensor as_kind(const at::Tensor& t, bool cl) {
  if (describe(t, cl)) return t;
  return t.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor workspace(const Feat& f, const at::Tensor& like) {
  const size_t bytes = reduce_workspace_bytes(f, dtype_of(like.scalar_type()));
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto opts = x_.options().dtype(acc_type(x_.scalar_type()));
  at::Tensor mean = at::empty({x_.size(1)}, opts), var = at::empty({x_.size(1)}, opts);
  if (x_.size(1) == 0) return {mean, var};
  if (x_.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  bool cl;
  const at::Tensor x = readable(x_, cl);
  const Feat f = *describe(x, cl);
  at::Tensor ws = workspace(f, x);
  check_cuda(channel_stats(f, dtype_of(x.scalar_type()), mean.data_ptr(), var.data_ptr(), ws.data_ptr(), stream()),
             "channel_stats");
  return {mean, var};
}

void bn_relu_into(const at::Tensor& x_, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x_.device());
  if (x_.numel() == 0) return;
  bool cl;
  const at::Tensor x = readable(x_, cl);
  const auto sc = scale.contiguous(), sh = shift.contiguous();
  // the kernel writes x's dtype in x's layout kind; anything else goes through a temporary
  const bool direct = out.scalar_type() == x.scalar_type() && describe(out, cl).has_value();
  at::Tensor dst = direct ? out : at::empty(x.sizes(), x.options(), cl ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous);
  check_cuda(bn_relu(*describe(x, cl), dtype_of(x.scalar_type()), sc.data_ptr(), sh.data_ptr(),
                         out_of(*describe(dst, cl)), stream()),
             "bn_relu");
  if (!direct) const_cast<at::Tensor&>(out).copy_(dst);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into(const at::Tensor& x_, const at::Tensor& gy_,
                                                         const at::Tensor& scale, const at::Tensor& shift,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         bool batch_stats, const at::Tensor& gx, bool accumulate,
                                                         const Sync* sync) {
  const char* op = "bn_relu_backward_into";
  (void)sync;  // CPU only (make_sync refuses CUDA tensors)
  const c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor dgamma = at::zeros({x_.size(1)}, scale.options()), dbeta = at::zeros({x_.size(1)}, scale.options());
  if (x_.numel() == 0) return {dgamma, dbeta};
  bool cl;
  const at::Tensor x = readable(x_, cl);
  const at::Tensor gy = as_kind(gy_, cl);
  const auto sc = scale.contiguous(), sh = shift.contiguous(), mu = mean.contiguous(), is = invstd.contiguous();
  const bool direct = describe(gx, cl).has_value();
  const auto mf = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor dst = direct ? gx : (accumulate ? gx.contiguous(mf) : at::empty(gx.sizes(), gx.options(), mf));
  const Feat f = *describe(x, cl);
  at::Tensor ws = workspace(f, x);
  check_cuda(bn_relu_backward(f, *describe(gy, cl), dtype_of(x.scalar_type()), sc.data_ptr(), sh.data_ptr(),
                              mu.data_ptr(), is.data_ptr(), batch_stats, out_of(*describe(dst, cl)),
                              dst.scalar_type() != x.scalar_type(), accumulate, dgamma.data_ptr(), dbeta.data_ptr(),
                              ws.data_ptr(), stream()),
             op);
  if (!direct) const_cast<at::Tensor&>(gx).copy_(dst);
  return {dgamma, dbeta};
}

// The fused tensor-core kernel where it applies (channels-last half/bfloat16 x); else an undefined tensor
// (steps.cpp then composes BN-ReLU and ATen's convolution).
at::Tensor bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& w) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = out_format(x) == at::MemoryFormat::ChannelsLast;
  const auto f = cl ? describe(x, true) : std::nullopt;
  if (!f || !bn_relu_conv1x1_supported(*f, dtype_of(x.scalar_type())) || w.size(0) > 65535LL * 64)
    return at::Tensor();
  const at::Tensor wc = w.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  at::Tensor z = at::empty({x.size(0), w.size(0), x.size(2), x.size(3)}, x.options(), at::MemoryFormat::ChannelsLast);
  check_cuda(bn_relu_conv1x1(*f, dtype_of(x.scalar_type()), sc.data_ptr<float>(), sh.data_ptr<float>(),
                             wc.data_ptr(), w.size(0), z.data_ptr(), stream()),
             "bn_relu_conv1x1");
  return z;
}

}  // namespace cuda
}  // namespace effdense

#endif  // WITH_CUDA
