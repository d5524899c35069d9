// The memory-efficient dense block of ../shared/DESIGN.md, forward and backward, driven from C++.
//
// Device generic: the per-channel BN work goes through the effdense ops (dispatched to the CPU kernels in
// ops.cpp or the CUDA kernels in cuda/), the convolutions through ATen (oneDNN on CPU, cuDNN/cuBLAS on GPU).
//
// Storage, as in effdense/backends/torch_backend.py (the executable specification):
//  * one feature buffer F [N, C0 + L*k, H, W] in the input's memory format; layer l reads the prefix
//    F[:, :c_l] (a view) and its k new channels are copied into F[:, c_l:c_l+k]; F is the block output.
//  * per-channel batch statistics (mean, biased var) of F, computed once when a channel is written and
//    reused by every later layer's norm1; per-layer statistics of the bottleneck for norm2.
//  * one shared scratch buffer for BN-ReLU(F[:, :c_l]), sized for the widest layer and reused by every
//    layer (the "shared BN storage" of Pleiss et al.): a dense [N, c_l, H, W] view of its first N*c_l*H*W
//    elements, so the convolution reads a dense operand.
//  * dropout masks kept as bits (bool) of the k new channels per layer, linear in depth.
//  * backward: one gradient buffer G (accumulation dtype) shaped like F; layer l (from last to first)
//    recomputes BN-ReLU, conv1 and BN2-ReLU from F and the saved statistics and adds its input gradient into
//    G[:, :c_l] in place (fused into the BN-ReLU backward kernel).
// Running statistics are not touched here (the op is functional): effdense::update_running_stats does that
// once per forward, called by the Python backend.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common.h"

namespace effdense {
namespace {

using OptList = c10::List<std::optional<at::Tensor>>;

struct BNParams {
  at::Tensor scale, shift, mean, invstd;
};

// (scale, shift, mean, invstd) in the accumulation dtype, as effdense.backends.bn.scale_shift.
BNParams scale_shift(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                     double eps, at::ScalarType acc) {
  at::Tensor m = mean.to(acc), invstd = at::rsqrt(var.to(acc) + eps);
  at::Tensor scale = gamma.to(acc) * invstd;
  return {scale, beta.to(acc) - m * scale, m, invstd};
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w) {
  return at::convolution(x, w, std::nullopt, {1, 1}, {w.size(2) / 2, w.size(3) / 2}, {1, 1}, false, {0, 0}, 1);
}

// (grad input, grad weight); the weight gradient takes the weight's strides (cuDNN/oneDNN may return it
// channels-last), as the fake implementation promises.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w) {
  auto [gx, gw, gb] = at::convolution_backward(gy, x, w, std::nullopt, {1, 1}, {w.size(2) / 2, w.size(3) / 2},
                                               {1, 1}, false, {0, 0}, 1, {true, true, false});
  if (gw.strides() != w.strides()) gw = at::empty_like(w).copy_(gw);
  return {gx, gw};
}

// A dense [N, c, H, W] view (in memory format mf) of the first N*c*H*W elements of a flat scratch buffer.
at::Tensor scratch_view(const at::Tensor& buf, int64_t N, int64_t c, int64_t H, int64_t W, at::MemoryFormat mf) {
  at::Tensor flat = buf.narrow(0, 0, N * c * H * W);
  if (mf == at::MemoryFormat::ChannelsLast) return flat.view({N, H, W, c}).permute({0, 3, 1, 2});
  return flat.view({N, c, H, W});
}

bool fused_conv1x1_enabled() {
  const char* v = std::getenv("EFFDENSE_FUSED_CONV1X1");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Shapes, modes and argument checks of one block call.
struct Block {
  int64_t L = 0, N = 0, C0 = 0, H = 0, W = 0, k = 0, B = 0, C = 0;
  bool bottleneck = false;
  at::MemoryFormat mf = at::MemoryFormat::Contiguous;
  at::ScalarType cdt = at::kFloat, acc = at::kFloat;
  std::vector<bool> bs1, bs2;  // batch statistics (true) or running statistics (false), per layer

  int64_t width(int64_t i) const { return C0 + i * k; }
  int64_t pixels() const { return N * H * W; }
};

Block parse(const at::Tensor& x, int64_t C_total, at::TensorList w1, at::TensorList w2, at::TensorList g1,
            at::TensorList b1, at::TensorList g2, at::TensorList b2, const OptList& rm1, const OptList& rv1,
            const OptList& rm2, const OptList& rv2, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
            at::ArrayRef<double> drop, const char* op) {
  Block b;
  check_feature(x, op, C_total < 0 ? "x" : "feat");
  b.L = static_cast<int64_t>(w1.size());
  TORCH_CHECK(b.L >= 1, "effdense::", op, ": expected w1 to hold one conv1 weight per layer (at least one), got 0");
  b.bottleneck = !w2.empty();
  const size_t L = static_cast<size_t>(b.L), L2 = b.bottleneck ? L : 0;
  TORCH_CHECK(g1.size() == L && b1.size() == L && rm1.size() == L && rv1.size() == L && eps1.size() == L &&
                  drop.size() == L,
              "effdense::", op, ": expected gamma1, beta1, running_mean1, running_var1, eps1 and drop_rate of "
              "length ", L, " (one per layer, as w1), got ", g1.size(), ", ", b1.size(), ", ", rm1.size(), ", ",
              rv1.size(), ", ", eps1.size(), ", ", drop.size());
  TORCH_CHECK(w2.size() == L2 && g2.size() == L2 && b2.size() == L2 && rm2.size() == L2 && rv2.size() == L2 &&
                  eps2.size() == L2,
              "effdense::", op, ": expected w2, gamma2, beta2, running_mean2, running_var2 and eps2 of length ",
              L2, " (", b.bottleneck ? "one per layer" : "none without a bottleneck", "), got ", w2.size(), ", ",
              g2.size(), ", ", b2.size(), ", ", rm2.size(), ", ", rv2.size(), ", ", eps2.size());
  b.cdt = x.scalar_type();
  b.acc = acc_type(b.cdt);
  b.N = x.size(0);
  b.H = x.size(2);
  b.W = x.size(3);
  b.k = b.bottleneck ? w2[0].size(0) : w1[0].size(0);
  b.B = b.bottleneck ? w1[0].size(0) : 0;
  b.C0 = C_total < 0 ? x.size(1) : C_total - b.L * b.k;
  b.C = b.C0 + b.L * b.k;
  TORCH_CHECK(b.C0 >= 1, "effdense::", op, ": feat has ", x.size(1), " channels, fewer than the ", b.L * b.k,
              " that ", b.L, " layers of growth rate ", b.k, " add");
  b.mf = out_format(x);
  auto check_w = [&](const at::Tensor& w, int64_t out, int64_t in, const char* name, size_t i, bool one) {
    TORCH_CHECK(w.dim() == 4 && w.size(0) == out && w.size(1) == in && w.size(2) % 2 == 1 && w.size(3) % 2 == 1 &&
                    (!one || (w.size(2) == 1 && w.size(3) == 1)) && w.scalar_type() == b.cdt &&
                    w.device() == x.device(),
                "effdense::", op, ": expected ", name, "[", i, "] of shape [", out, ", ", in,
                one ? ", 1, 1]" : ", kh, kw] (odd kh, kw)", " with dtype ", b.cdt, " (that of x) on ", x.device(),
                ", got shape ", shape_str(w), " with dtype ", w.scalar_type(), " on ", w.device());
  };
  auto check_v = [&](const at::Tensor& v, int64_t n, const char* name, size_t i) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == n && is_float_type(v.scalar_type()) && v.device() == x.device(),
                "effdense::", op, ": expected ", name, "[", i, "] of shape [", n, "] with a floating dtype on ",
                x.device(), ", got shape ", shape_str(v), " with dtype ", v.scalar_type(), " on ", v.device());
  };
  for (size_t i = 0; i < L; ++i) {
    const int64_t c = b.width(static_cast<int64_t>(i));
    check_w(w1[i], b.bottleneck ? b.B : b.k, c, "w1", i, b.bottleneck);
    check_v(g1[i], c, "gamma1", i);
    check_v(b1[i], c, "beta1", i);
    const std::optional<at::Tensor> m = rm1.get(i), v = rv1.get(i);
    TORCH_CHECK(m.has_value() == v.has_value(), "effdense::", op, ": running_mean1[", i, "] and running_var1[",
                i, "] must both be given (running statistics) or both be None (batch statistics)");
    b.bs1.push_back(!m.has_value());
    if (m) check_v(*m, c, "running_mean1", i), check_v(*v, c, "running_var1", i);
    TORCH_CHECK(drop[i] >= 0.0 && drop[i] < 1.0, "effdense::", op, ": expected drop_rate[", i,
                "] in [0, 1), got ", drop[i]);
    if (!b.bottleneck) continue;
    check_w(w2[i], b.k, b.B, "w2", i, false);
    check_v(g2[i], b.B, "gamma2", i);
    check_v(b2[i], b.B, "beta2", i);
    const std::optional<at::Tensor> m2 = rm2.get(i), v2 = rv2.get(i);
    TORCH_CHECK(m2.has_value() == v2.has_value(), "effdense::", op, ": running_mean2[", i, "] and running_var2[",
                i, "] must both be given or both be None");
    b.bs2.push_back(!m2.has_value());
    if (m2) check_v(*m2, b.B, "running_mean2", i), check_v(*v2, b.B, "running_var2", i);
  }
  bool any_batch = false;
  for (bool v : b.bs1) any_batch = any_batch || v;
  for (bool v : b.bs2) any_batch = any_batch || v;
  TORCH_CHECK(!any_batch || b.pixels() != 1, "Expected more than 1 value per channel when training, got input "
              "size [", b.N, ", ", C_total < 0 ? b.C0 : b.C, ", ", b.H, ", ", b.W, "]");
  return b;
}

bool any_of(const std::vector<bool>& v) {
  for (bool e : v)
    if (e) return true;
  return false;
}

BNParams norm1_params(const Block& b, size_t i, at::TensorList g1, at::TensorList b1, const OptList& rm1,
                      const OptList& rv1, at::ArrayRef<double> eps1, const at::Tensor& mean, const at::Tensor& var) {
  const int64_t c = b.width(static_cast<int64_t>(i));
  if (b.bs1[i]) return scale_shift(g1[i], b1[i], mean.narrow(0, 0, c), var.narrow(0, 0, c), eps1[i], b.acc);
  return scale_shift(g1[i], b1[i], *rm1.get(i), *rv1.get(i), eps1[i], b.acc);
}

// z = conv1(relu(bn1(F[:, :c]))): the fused tensor-core kernel when enabled, else BN-ReLU into the shared
// scratch buffer and ATen's convolution. `u` receives the scratch view (undefined on the fused path).
at::Tensor stage1(const Block& b, const at::Tensor& xin, const BNParams& p, const at::Tensor& w,
                  const at::Tensor& scratch, at::Tensor& u) {
  if (b.bottleneck && fused_conv1x1_enabled()) return call_bn_relu_conv1x1(xin, p.scale, p.shift, w);
  u = scratch_view(scratch, b.N, xin.size(1), b.H, b.W, b.mf);
  call_bn_relu_into(xin, p.scale, p.shift, u);
  return conv(u, w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_block_forward(
    const at::Tensor& x, at::TensorList w1, at::TensorList w2, at::TensorList g1, at::TensorList b1,
    at::TensorList g2, at::TensorList b2, const OptList& rm1, const OptList& rv1, const OptList& rm2,
    const OptList& rv2, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2, at::ArrayRef<double> drop) {
  const Block b = parse(x, -1, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1, eps2, drop, "dense_block_forward");
  const c10::DeviceGuard guard(x.device());
  at::NoGradGuard no_grad;
  const auto opts = x.options(), aopts = x.options().dtype(b.acc);
  at::Tensor feat = at::empty({b.N, b.C, b.H, b.W}, opts, b.mf);
  feat.narrow(1, 0, b.C0).copy_(x);
  const bool stats1 = any_of(b.bs1);
  at::Tensor mean = at::empty({stats1 ? b.C : 0}, aopts), var = at::empty({stats1 ? b.C : 0}, aopts);
  auto write_stats = [&](int64_t c0, int64_t n) {
    auto [m, v] = call_channel_stats(feat.narrow(1, c0, n));
    mean.narrow(0, c0, n).copy_(m);
    var.narrow(0, c0, n).copy_(v);
  };
  if (stats1) write_stats(0, b.C0);
  at::Tensor mean2 = at::zeros({b.bottleneck ? b.L : 0, b.B}, aopts), var2 = at::zeros_like(mean2);
  bool any_drop = false;
  for (double p : drop) any_drop = any_drop || p > 0;
  const std::vector<int64_t> mask_shape = any_drop ? std::vector<int64_t>{b.N, b.L * b.k, b.H, b.W}
                                                   : std::vector<int64_t>{0};
  at::Tensor mask = at::empty(mask_shape, opts.dtype(at::kBool), any_drop ? b.mf : at::MemoryFormat::Contiguous);
  mask.zero_();
  at::Tensor scratch = at::empty({b.N * (b.C - b.k) * b.H * b.W}, opts);
  for (int64_t i = 0; i < b.L; ++i) {
    const size_t li = static_cast<size_t>(i);
    const int64_t c = b.width(i);
    const BNParams p1 = norm1_params(b, li, g1, b1, rm1, rv1, eps1, mean, var);
    at::Tensor u;
    at::Tensor y = stage1(b, feat.narrow(1, 0, c), p1, w1[li], scratch, u);
    if (b.bottleneck) {
      BNParams p2;
      if (b.bs2[li]) {
        auto [m2, v2] = call_channel_stats(y);
        mean2.select(0, i).copy_(m2);
        var2.select(0, i).copy_(v2);
        p2 = scale_shift(g2[li], b2[li], m2, v2, eps2[li], b.acc);
      } else {
        p2 = scale_shift(g2[li], b2[li], *rm2.get(li), *rv2.get(li), eps2[li], b.acc);
      }
      call_bn_relu_into(y, p2.scale, p2.shift, y);  // in place: the bottleneck is not needed again
      y = conv(y, w2[li]);
    }
    at::Tensor out = feat.narrow(1, c, b.k);
    if (drop[li] > 0) {
      // the same draw as F.dropout(ones_like(new channels)) in the torch backend, so masks agree
      at::Tensor noise = at::dropout(at::ones_like(out), drop[li], true);
      y = y * noise;
      mask.narrow(1, i * b.k, b.k).copy_(noise.ne(0));
    }
    out.copy_(y);
    if (stats1) write_stats(c, b.k);
  }
  return {feat, mean, var, mean2, var2, mask};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
dense_block_backward(const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& mean, const at::Tensor& var,
                     const at::Tensor& mean2, const at::Tensor& var2, const at::Tensor& mask, at::TensorList w1,
                     at::TensorList w2, at::TensorList g1, at::TensorList b1, at::TensorList g2, at::TensorList b2,
                     const OptList& rm1, const OptList& rv1, const OptList& rm2, const OptList& rv2,
                     at::ArrayRef<double> eps1, at::ArrayRef<double> eps2, at::ArrayRef<double> drop) {
  const char* op = "dense_block_backward";
  const Block b = parse(feat, feat.dim() == 4 ? feat.size(1) : 0, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1,
                        eps2, drop, op);
  check_same_shape(grad_out, feat, op, "grad_out");
  const bool stats1 = any_of(b.bs1);
  TORCH_CHECK(!stats1 || (mean.dim() == 1 && mean.size(0) == b.C && var.sizes() == mean.sizes()),
              "effdense::", op, ": expected mean and var of shape [", b.C, "] (the forward's channel statistics), "
              "got ", shape_str(mean), " and ", shape_str(var));
  TORCH_CHECK(!b.bottleneck || (mean2.dim() == 2 && mean2.size(0) == b.L && mean2.size(1) == b.B &&
                                var2.sizes() == mean2.sizes()),
              "effdense::", op, ": expected mean2 and var2 of shape [", b.L, ", ", b.B, "], got ", shape_str(mean2),
              " and ", shape_str(var2));
  bool any_drop = false;
  for (double p : drop) any_drop = any_drop || p > 0;
  TORCH_CHECK(!any_drop || (mask.dim() == 4 && mask.size(1) == b.L * b.k && mask.scalar_type() == at::kBool),
              "effdense::", op, ": expected drop_mask of shape [", b.N, ", ", b.L * b.k, ", ", b.H, ", ", b.W,
              "] with dtype bool, got ", shape_str(mask), " with dtype ", mask.scalar_type());
  const c10::DeviceGuard guard(feat.device());
  at::NoGradGuard no_grad;
  at::Tensor G = at::empty(feat.sizes(), feat.options().dtype(b.acc), b.mf);
  G.copy_(grad_out);
  at::Tensor scratch = at::empty({b.N * (b.C - b.k) * b.H * b.W}, feat.options());
  const size_t L = static_cast<size_t>(b.L);
  std::vector<at::Tensor> dw1(L), dw2(b.bottleneck ? L : 0), dg1(L), db1(L), dg2(b.bottleneck ? L : 0),
      db2(b.bottleneck ? L : 0);
  for (int64_t i = b.L - 1; i >= 0; --i) {
    const size_t li = static_cast<size_t>(i);
    const int64_t c = b.width(i);
    const at::Tensor x = feat.narrow(1, 0, c);
    const BNParams p1 = norm1_params(b, li, g1, b1, rm1, rv1, eps1, mean, var);
    at::Tensor gy = G.narrow(1, c, b.k);
    if (drop[li] > 0) gy = gy * mask.narrow(1, i * b.k, b.k).to(b.cdt).div_(1.0 - drop[li]);
    gy = gy.to(b.cdt);
    at::Tensor u = scratch_view(scratch, b.N, c, b.H, b.W, b.mf);
    call_bn_relu_into(x, p1.scale, p1.shift, u);
    at::Tensor gu;
    if (b.bottleneck) {
      at::Tensor z = conv(u, w1[li]);
      const BNParams p2 = b.bs2[li]
                              ? scale_shift(g2[li], b2[li], mean2.select(0, i), var2.select(0, i), eps2[li], b.acc)
                              : scale_shift(g2[li], b2[li], *rm2.get(li), *rv2.get(li), eps2[li], b.acc);
      at::Tensor a = at::empty(z.sizes(), z.options(), out_format(z));
      call_bn_relu_into(z, p2.scale, p2.shift, a);
      auto [ga, gw2] = conv_backward(gy, a, w2[li]);
      a.reset();
      auto [gz, gg2, gb2] = call_bn_relu_backward(z, ga, p2.scale, p2.shift, p2.mean, p2.invstd, b.bs2[li]);
      ga.reset();
      z.reset();
      auto [gu1, gw1] = conv_backward(gz, u, w1[li]);
      gu = gu1;
      dw1[li] = gw1;
      dw2[li] = gw2;
      dg2[li] = gg2.to(g2[li].scalar_type());
      db2[li] = gb2.to(b2[li].scalar_type());
    } else {
      auto [gu1, gw1] = conv_backward(gy, u, w1[li]);
      gu = gu1;
      dw1[li] = gw1;
    }
    auto [gg1, gb1] = call_bn_relu_backward_into(x, gu, p1.scale, p1.shift, p1.mean, p1.invstd, b.bs1[li],
                                                 G.narrow(1, 0, c), true);
    dg1[li] = gg1.to(g1[li].scalar_type());
    db1[li] = gb1.to(b1[li].scalar_type());
  }
  at::Tensor gx = at::empty({b.N, b.C0, b.H, b.W}, feat.options(), b.mf);
  gx.copy_(G.narrow(1, 0, b.C0));
  return {gx, dw1, dw2, dg1, db1, dg2, db2};
}

}  // namespace
}  // namespace effdense

TORCH_LIBRARY_IMPL(effdense, CPU, m) {
  m.impl("dense_block_forward", &effdense::dense_block_forward);
  m.impl("dense_block_backward", &effdense::dense_block_backward);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(effdense, CUDA, m) {
  m.impl("dense_block_forward", &effdense::dense_block_forward);
  m.impl("dense_block_backward", &effdense::dense_block_backward);
}
#endif
