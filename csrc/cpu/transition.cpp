// The DenseNet transition conv1x1(avgpool2x2(relu(bn(x)))) (effdense.models.Transition, pooling first: the 1x1
// convolution and the pool are both linear and act on different axes, so they commute and the GEMM does a
// quarter of the work): the CPU kernels of the transition ops (cpu/kernels.h; their arguments checked by
// steps.cpp; the CUDA version is cuda/transition.cpp).
//
// Tiles of output pixels (the tile machinery of tiles.h). A tile's pooled input, the mean over each
// 2x2 window of relu(x * scale + shift), is formed in cache from the window's four input pixels and multiplied
// with the weight at once; nothing of the size of x is stored (PyTorch's transition keeps BN's and ReLU's outputs,
// each as large as the block output, for backward). Backward recomputes the pooled tile for the weight gradient,
// spreads gy @ W over each window (a quarter to each pixel) and runs the BN-ReLU backward on the window's pixels
// in the same tile; the batch-statistics correction is a second sweep over x and the gradient.
//
// An odd last row or column (outside every window, as avg_pool2d's floor mode drops it) gets no gradient from
// the pool; its BN gradient is the batch-statistics correction alone.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <vector>

#include "kernels.h"
#include "tiles.h"

namespace effdense {
namespace cpu {
namespace {

// Tiles are runs of R output rows of one image, (n, i0, i0 + R): their windows are the input rows 2*i0 ..
// 2*(i0 + R), a contiguous range of input pixels, which the gather brings into a dense row-major tile whatever
// x's layout (NCHW planes transposed in blocks, channels-last rows copied); the output rows are a contiguous
// range of output pixels too. Everything after the gather runs on unit-stride channel rows.
struct RowTiles {
  int64_t N, H, W, Ho, Wo, R, per;
  RowTiles(const View& v, int64_t width) : N(v.N), H(v.H), W(v.W), Ho(v.H / 2), Wo(v.W / 2) {
    R = std::max<int64_t>(1, std::min<int64_t>(Ho, 65536 / std::max<int64_t>(width * 2 * W, 1)));
    per = (Ho + R - 1) / R;
  }
  int64_t count() const { return N * per; }
  // (first input pixel, end input pixel, first output pixel, output rows) of tile t
  std::array<int64_t, 4> operator()(int64_t t) const {
    const int64_t n = t / per, i0 = (t - n * per) * R, r = std::min(R, Ho - i0);
    const int64_t p0 = n * H * W + 2 * i0 * W;
    return {p0, p0 + 2 * r * W, n * Ho * Wo + i0 * Wo, r};
  }
};

// f(q, a) for the output pixels q < rows * Wo of a tile and the row a of their window's top-left input pixel in the
// tile's input rows (the others: a + 1, a + W, a + W + 1).
template <typename F>
inline void for_tile_windows(const RowTiles& rt, int64_t rows, F&& f) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < rt.Wo; ++j) f(i * rt.Wo + j, 2 * i * rt.W + 2 * j);
}

// pooled[q, ch] = the window mean of u = relu(bn(x)) (u's rows already rounded to T, as PyTorch's relu(bn(x))
// is), summed in row-major order and divided by 4, rounded as avg_pool2d in T is.
template <typename T, typename A>
void pool_tile(const RowTiles& rt, int64_t rows, int64_t C, const A* __restrict__ u, A* __restrict__ pooled) {
  const int64_t W = rt.W;
  for_tile_windows(rt, rows, [&](int64_t q, int64_t a) {
    const A* __restrict__ u0 = u + a * C;
    const A* __restrict__ u1 = u0 + C;
    const A* __restrict__ u2 = u0 + W * C;
    const A* __restrict__ u3 = u2 + C;
    A* __restrict__ o = pooled + q * C;
    for (int64_t ch = 0; ch < C; ++ch) o[ch] = round_to<T>((((u0[ch] + u1[ch]) + u2[ch]) + u3[ch]) / A(4));
  });
}

// y = conv1x1(avgpool2x2(relu(bn(x))), w) with x dense in its memory format (steps.cpp)
template <typename T>
at::Tensor transition_forward_impl(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& w) {
  using A = acc_t<T>;
  const View vx(x);
  const int64_t N = vx.N, C = vx.C, B = w.size(0);
  const T* px = x.const_data_ptr<T>();
  const std::vector<A> wt = transposed(weight_rows<A>(w), B, C);
  const RowTiles rt(vx, C);
  at::Tensor y = at::empty({N, B, rt.Ho, rt.Wo}, x.options(), out_format(x));
  const View vy(y);
  T* py = y.data_ptr<T>();
  int64_t ldy = 0;
  const bool direct = std::is_same_v<T, A> && pixel_rows(vy, ldy);
  const A *s = bn.scale.data(), *t = bn.shift.data();
  parallel_tiles(rt.count(), 1, [&](int64_t, int64_t t0, int64_t t1) {
    const int64_t in_rows = 2 * rt.R * rt.W, out_rows = rt.R * rt.Wo;
    A* u = scratch<A>(in_rows * C + out_rows * (C + B));
    A* pooled = u + in_rows * C;
    A* zt = pooled + out_rows * C;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const auto [p0, p1, q0, r] = rt(ti);
      const int64_t n = r * rt.Wo;
      gather(vx, px, p0, p1, u, C, [&](A v, int64_t ch) { return round_to<T>(relu(v * s[ch] + t[ch])); });
      pool_tile<T>(rt, r, C, u, pooled);
      A* z = direct ? reinterpret_cast<A*>(py) + q0 * ldy : zt;
      gemm<A>(false, false, n, B, C, pooled, C, wt.data(), B, A(0), z, direct ? ldy : B);
      if (!direct) {
        for (int64_t i = 0; i < n * B; ++i) z[i] = round_to<T>(z[i]);
        scatter<false>(vy, py, q0, q0 + n, z, B);
      }
    }
  });
  return y;
}

// Backward: dW += gy^T pooled, gp = gy @ W, each window pixel's relu input gradient gp / 4, then the BN-ReLU
// backward on the window pixels (scale * g into gx, sums for dgamma/dbeta), then the batch-statistics correction.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward_impl(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const Sync* sync) {
  using A = acc_t<T>;
  const View vx(x), vg(gy);
  const int64_t C = vx.C, B = w.size(0);
  const BN<A> bn = bn_params<A>(gamma, beta, mean, var, eps);
  const std::vector<A> wm = weight_rows<A>(w);
  const RowTiles rt(vx, 2 * C);
  at::Tensor gx = at::empty(x.sizes(), x.options(), out_format(x));
  if (vx.H % 2 != 0) gx.zero_();  // the last input row is in no window: no pool gradient
  const View vo(gx);
  const T* px = x.const_data_ptr<T>();
  const T* pg = gy.const_data_ptr<T>();
  T* po = gx.data_ptr<T>();
  const int64_t groups = num_groups(rt.count(), 1);
  std::vector<A> dwp(static_cast<size_t>(groups * B * C), A(0));
  Sums sums(groups, C);
  parallel_tiles(rt.count(), 1, [&](int64_t grp, int64_t t0, int64_t t1) {
    const int64_t in_rows = 2 * rt.R * rt.W, out_rows = rt.R * rt.Wo;
    A* xt = scratch<A>(2 * in_rows * C + out_rows * (2 * C + B) + 2 * C);
    A* gxt = xt + in_rows * C;
    A* pooled = gxt + in_rows * C;
    A* gp = pooled + out_rows * C;
    A* gyt = gp + out_rows * C;
    A* __restrict__ sg = gyt + out_rows * B;
    A* __restrict__ sgx = sg + C;
    const A* __restrict__ s = bn.scale.data();
    const A* __restrict__ t = bn.shift.data();
    const A* __restrict__ mu = bn.mean.data();
    for (int64_t ti = t0; ti < t1; ++ti) {
      const auto [p0, p1, q0, r] = rt(ti);
      const int64_t n = r * rt.Wo, m = p1 - p0;
      gather(vx, px, p0, p1, xt, C);
      for (int64_t i = 0; i < m; ++i) {  // u = relu(bn(x)) into gxt for the pool (gxt is rewritten below)
        const A* __restrict__ xr = xt + i * C;
        A* __restrict__ ur = gxt + i * C;
        for (int64_t ch = 0; ch < C; ++ch) ur[ch] = round_to<T>(relu(xr[ch] * s[ch] + t[ch]));
      }
      pool_tile<T>(rt, r, C, gxt, pooled);
      gather(vg, pg, q0, q0 + n, gyt, B);
      gemm<A>(true, false, B, C, n, gyt, B, pooled, C, A(1), dwp.data() + grp * B * C, C);  // dW += gy^T pooled
      gemm<A>(false, false, n, C, B, gyt, B, wm.data(), C, A(0), gp, C);                     // gp = gy W
      if (rt.W % 2 != 0) std::fill(gxt, gxt + m * C, A(0));  // the last column is in no window
      std::fill(sg, sg + C, A(0));
      std::fill(sgx, sgx + C, A(0));
      for (int64_t i = 0; i < n * C; ++i) gp[i] = round_to<T>(round_to<T>(gp[i]) / A(4));  // avg_pool2d's bwd
      for_tile_windows(rt, r, [&](int64_t q, int64_t a) {
        for (const int64_t d : std::array<int64_t, 4>{a, a + 1, a + rt.W, a + rt.W + 1})
          relu_grad_row(xt + d * C, gp + q * C, gxt + d * C, C, s, t, mu, sg, sgx);
      });
      sums.add(grp, sg, sgx);
      scatter<false>(vo, po, p0, p1, gxt, C);
    }
  });
  std::vector<A> dW(static_cast<size_t>(B * C), A(0));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < B * C; ++i) dW[i] += dwp[g * B * C + i];
  auto [dg, db] = sums.finish(bn.invstd, vx.pixels());
  if (batch_stats) apply_correction<T, T>(x, gx, bn, std::nullopt, dg, db, sync);
  at::Tensor dw = at::empty_like(w);
  write_weight<T>(dW, dw);
  return {gx, tensor_like(dg, gamma), tensor_like(db, beta), dw};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_forward(const at::Tensor& x, const at::Tensor& gamma,
                                                                  const at::Tensor& beta, const OptTensor& rm,
                                                                  const OptTensor& rv, double eps,
                                                                  const at::Tensor& w, const Sync* sync,
                                                                  int64_t& count) {
  const auto aopts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = at::empty({0}, aopts), var = at::empty({0}, aopts);
  if (!rm) {  // the batch's statistics (bn.cpp: plane- or row-wise), over every process with sync
    std::tie(mean, var) = channel_stats(x);
    if (sync != nullptr) count = merge_stats(*sync, mean, var, count);
  }
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_transition_fwd", [&] {
    using A = acc_t<scalar_t>;
    y = transition_forward_impl<scalar_t>(
        x, rm ? bn_params<A>(gamma, beta, *rm, *rv, eps) : bn_params<A>(gamma, beta, mean, var, eps), w);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transition_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& w,
    const Sync* sync) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_transition_bwd", [&] {
    r = transition_backward_impl<scalar_t>(gy, x, gamma, beta, mean, var, eps, batch_stats, w, sync);
  });
  return r;
}

}  // namespace cpu
}  // namespace effdense
