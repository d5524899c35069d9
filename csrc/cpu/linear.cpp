// CPU kernels of BN-ReLU-Linear (the bottleneck 1x1 convolution) forward and backward and of a bottleneck's
// fused backward (cpu/kernels.h; the BN-ReLU steps are bn.cpp's, the CUDA versions cuda/block_ops.cpp's).
//
// Every kernel works on tiles of pixels (tiles.h). A tile is gathered from any strided [N, C, H, W] view
// into a small buffer in the accumulation type, computed on there with unit-stride loops, and scattered
// back: row-major [rows, C] for channels-last views (a channel prefix of the feature buffer: each pixel's
// channels contiguous) and anything else, channel-major [C, rows] for NCHW views (each channel's pixels a
// contiguous run of its plane: no transposition; the GEMMs take such tiles transposed). That is what makes the
// bottleneck 1x1 convolution cheap: a tile of relu(bn(x)) is a few hundred KiB, so it is multiplied with the
// weight (one GEMM per tile, sequential per thread: gemm.h's kernel or the BLAS) while it is in the
// core's L2 cache, and neither relu(bn(x)) nor, in backward, the dgrad gz @ W ([P, c] each, the two largest
// transients of a layer) is ever written to memory: the backward consumes each dgrad tile in the BN-ReLU
// backward at once, adding scale * g into the gradient buffer. The batch-statistics part of that backward,
// -scale * (dbeta/P + xhat * dgamma/P), needs the sums over all pixels first; it is affine in x per channel,
// so the block driver defers it (grad_coef): the corrections of every layer add up per channel and are applied
// once, when the channel's gradient is read (gather_grad), instead of in a second sweep over x and the gradient
// buffer per layer. Tiles are split into one contiguous group per thread, as many per thread, and per-thread
// partial sums are merged in group order: results do not depend on scheduling (for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../bn_math.h"
#include "kernels.h"
#include "tiles.h"

namespace effdense {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------- BN-ReLU-Linear forward

// out[p, :] = relu(x[p, :] * scale + shift) @ W^T per pixel (the bottleneck 1x1 convolution), optionally with
// the per-channel batch statistics of out (what norm2 normalizes with) from the same tiles. The GEMM takes
// W^T [c, B] row-major (the untransposed B of gemm.h's kernel; MKL's faster NN case where the BLAS does
// it) and writes straight into out where out's rows are pixel rows of out's own dtype.
template <typename T>
void bn_relu_linear_impl(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& w, const at::Tensor& out,
                         const OptTensor& out_mean, const OptTensor& out_var) {
  using A = acc_t<T>;
  const View vx(x), vo(out);
  const int64_t P = vx.pixels(), c = vx.C, B = w.size(0), rows = tile_rows(c + B, P);
  const std::vector<A> wt = transposed(weight_rows<A>(w), B, c);
  int64_t ldo = 0;
  const bool direct = std::is_same_v<T, A> && pixel_rows(vo, ldo);
  const bool cm = channel_major(vx);  // NCHW x: tiles of contiguous plane runs, no transposition
  TileMoments mom(B, rows, P, out_mean.has_value());
  const T* px = x.const_data_ptr<T>();
  T* po = out.data_ptr<T>();
  const A *s = bn.scale.data(), *t = bn.shift.data();
  parallel_tiles(P, rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* u = scratch<A>(rows * (c + B));
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows), n = p1 - p0;
      auto f = [&](A v, int64_t ch) { return round_to<T>(relu(v * s[ch] + t[ch])); };
      A* z = direct ? reinterpret_cast<A*>(po) + p0 * ldo : u + rows * c;
      const int64_t ldz = direct ? ldo : B;
      if (cm) {  // u channel-major [c, rows]: the GEMM takes it transposed
        gather_planes(vx, px, p0, p1, u, rows, f);
        gemm<A>(true, false, n, B, c, u, rows, wt.data(), B, A(0), z, ldz);
      } else {
        gather(vx, px, p0, p1, u, c, f);
        gemm<A>(false, false, n, B, c, u, c, wt.data(), B, A(0), z, ldz);
      }
      if (!direct)
        for (int64_t i = 0; i < n * B; ++i) z[i] = round_to<T>(z[i]);
      if (out_mean) mom.add(ti, z, n, ldz);
      if (!direct) scatter<false>(vo, po, p0, p1, z, B);
    }
  });
  if (out_mean) mom.finish<A>(*out_mean, *out_var);
}

// --------------------------------------------------------------------------- BN-ReLU-Linear backward

// With u = relu(bn(x)) and z = u @ W^T: dW = gz^T @ u, gu = gz @ W, then the BN-ReLU backward of gu into gx.
// Per tile: u and gu are recomputed / computed in cache; dW accumulates per thread (beta = 1 GEMMs). gz_of(p0,
// p1, buf) gives the tile's gz rows (pointer, leading dimension): read in place, or formed in buf (3 * rows * B
// elements of thread scratch), e.g. by the BN2 backward of the bottleneck op.
template <typename T, typename O, typename GZ>
std::tuple<std::vector<acc_t<T>>, std::vector<double>, std::vector<double>> linear_backward_tiles(
    const at::Tensor& x, const at::Tensor& w, const BN<acc_t<T>>& bn, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync, GZ&& gz_of) {
  using A = acc_t<T>;
  const View vx(x), vo(gx);
  const int64_t P = vx.pixels(), c = vx.C, B = w.size(0), rows = tile_rows(3 * c + B, P);
  const std::vector<A> wt = weight_rows<A>(w);
  const int64_t groups = num_groups(P, rows);
  std::vector<A> dwp(static_cast<size_t>(groups * B * c), A(0));
  Sums sums(groups, c);
  const T* px = x.const_data_ptr<T>();
  O* po = gx.data_ptr<O>();
  const A *s = bn.scale.data(), *t = bn.shift.data();
  // NCHW x and gx: channel-major tiles [c, rows] (contiguous plane runs; the GEMMs take them transposed)
  const bool cm = channel_major(vx) && channel_major(vo);
  const std::vector<A> wtt = cm ? transposed(wt, B, c) : std::vector<A>();
  parallel_tiles(P, rows, [&](int64_t grp, int64_t t0, int64_t t1) {
    A* xt = scratch<A>(rows * (3 * c + 3 * B) + 2 * c);
    A* ut = xt + rows * c;
    A* gut = ut + rows * c;
    A* gzbuf = gut + rows * c;
    A* sg = gzbuf + 3 * rows * B;
    A* sgx = sg + c;
    A* dw = dwp.data() + grp * B * c;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows), n = p1 - p0;
      const auto [gzr, ldz] = gz_of(p0, p1, gzbuf);
      if (cm) {
        gather_planes(vx, px, p0, p1, xt, rows);
        for (int64_t ch = 0; ch < c; ++ch) {
          const A* __restrict__ xr = xt + ch * rows;
          A* __restrict__ ur = ut + ch * rows;
          const A sc = s[ch], sh = t[ch];
          for (int64_t j = 0; j < n; ++j) ur[j] = round_to<T>(relu(xr[j] * sc + sh));
        }
        gemm<A>(true, true, B, c, n, gzr, ldz, ut, rows, A(1), dw, c);              // dW += gz^T u
        gemm<A>(false, true, c, n, B, wtt.data(), B, gzr, ldz, A(0), ut, rows);     // gu^T = W^T gz^T (over u)
        for (int64_t ch = 0; ch < c; ++ch)
          for (int64_t j = 0; j < n; ++j) ut[ch * rows + j] = round_to<T>(ut[ch * rows + j]);
        relu_grad_planes(xt, ut, gut, n, c, rows, bn, sg, sgx);
        sums.add(grp, sg, sgx);
        if (accumulate) scatter_planes<true>(vo, po, p0, p1, gut, rows);
        else scatter_planes<false>(vo, po, p0, p1, gut, rows);
        continue;
      }
      gather(vx, px, p0, p1, xt, c);
      for (int64_t r = 0; r < n; ++r) {
        const A* __restrict__ xr = xt + r * c;
        A* __restrict__ ur = ut + r * c;
        for (int64_t ch = 0; ch < c; ++ch) ur[ch] = round_to<T>(relu(xr[ch] * s[ch] + t[ch]));
      }
      gemm<A>(true, false, B, c, n, gzr, ldz, ut, c, A(1), dw, c);            // dW += gz^T u
      gemm<A>(false, false, n, c, B, gzr, ldz, wt.data(), c, A(0), ut, c);    // gu = gz W (over u)
      for (int64_t i = 0; i < n * c; ++i) ut[i] = round_to<T>(ut[i]);
      relu_grad_tile(xt, ut, gut, n, c, bn, sg, sgx);
      sums.add(grp, sg, sgx);
      if (accumulate) scatter<true>(vo, po, p0, p1, gut, c);
      else scatter<false>(vo, po, p0, p1, gut, c);
    }
  });
  std::vector<A> dW(static_cast<size_t>(B * c), A(0));
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < B * c; ++i) dW[i] += dwp[g * B * c + i];
  auto [dg, db] = sums.finish(bn.invstd, P);
  if (batch_stats) apply_correction<T, O>(x, gx, bn, coef, dg, db, sync);
  return {dW, dg, db};
}

// ---------------------------------------------------------------------------------- bottleneck backward

// One row of the BN2-ReLU backward into out: scale * g + alpha + beta * (z - mean) with the batch's statistics
// (BATCH), scale * g with running ones (z not read beyond relu's mask: a NaN of z stays out of the gradient, as in
// PyTorch), g = ga where relu's input is positive (restrict-qualified arguments: the loop vectorizes).
template <typename T, bool BATCH, typename A>
inline void bn2_grad_row(const A* __restrict__ zr, const A* __restrict__ gr, A* __restrict__ out, int64_t n,
                         const A* __restrict__ s, const A* __restrict__ t, const A* __restrict__ mu,
                         const A* __restrict__ al, const A* __restrict__ be) {
  for (int64_t ch = 0; ch < n; ++ch) {
    const A za = zr[ch], g = bnmath::relu_grad(za, gr[ch], s[ch], t[ch]);
    if constexpr (BATCH) out[ch] = round_to<T>(bnmath::corrected(s[ch] * g, za, mu[ch], al[ch], be[ch]));
    else out[ch] = round_to<T>(s[ch] * g);
  }
}

// The sums of the BN-ReLU backward of (z, ga) over all pixels, (dgamma, dbeta) (a sweep without output). Rows of
// z and ga in the accumulation type at a constant stride (the block driver's channels-last transients) are read
// in place; anything else is gathered into tiles first.
template <typename T>
std::pair<std::vector<double>, std::vector<double>> relu_grad_sums(const at::Tensor& z, const at::Tensor& ga,
                                                                   const BN<acc_t<T>>& bn) {
  using A = acc_t<T>;
  const View vz(z), vg(ga);
  const int64_t P = vz.pixels(), c = vz.C, rows = tile_rows(3 * c, P);
  const T* pz = z.const_data_ptr<T>();
  const T* pg = ga.const_data_ptr<T>();
  int64_t lz = 0, lg = 0;
  const bool direct = std::is_same_v<T, A> && pixel_rows(vz, lz) && pixel_rows(vg, lg);
  Sums sums(num_groups(P, rows), c);
  parallel_tiles(P, rows, [&](int64_t grp, int64_t t0, int64_t t1) {
    A* zt = scratch<A>(2 * rows * c + 2 * c);
    A* gt = zt + rows * c;
    A* sg = gt + rows * c;
    A* sgx = sg + c;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows);
      const A *zs = zt, *gs = gt;
      int64_t ldz = c, ldg = c;
      if (direct) {
        zs = reinterpret_cast<const A*>(pz) + p0 * lz, gs = reinterpret_cast<const A*>(pg) + p0 * lg;
        ldz = lz, ldg = lg;
      } else {
        gather(vz, pz, p0, p1, zt, c);
        gather(vg, pg, p0, p1, gt, c);
      }
      std::fill(sg, sg + 2 * c, A(0));
      for (int64_t r = 0; r < p1 - p0; ++r)
        relu_grad_row<A, false>(zs + r * ldz, gs + r * ldg, nullptr, c, bn.scale.data(), bn.shift.data(),
                                bn.mean.data(), sg, sgx);
      sums.add(grp, sg, sgx);
    }
  });
  return sums.finish(bn.invstd, P);
}

}  // namespace

// ------------------------------------------------------------------------------------------ the steps

void bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                         const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_linear", [&] {
    bn_relu_linear_impl<scalar_t>(x, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps), w, out, out_mean,
                                  out_var);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_linear_backward(
    const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
  const bool same = gx.scalar_type() == x.scalar_type();
  at::Tensor dw = at::empty_like(w);
  std::vector<double> dg, db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_linear_bwd", [&] {
    using A = acc_t<scalar_t>;
    const auto bn = bn_params<A>(gamma, beta, mean, var, eps);
    const View vz(gz);
    const scalar_t* pz = gz.const_data_ptr<scalar_t>();
    const int64_t B = w.size(0);
    int64_t ldz = 0;
    const bool direct = std::is_same_v<scalar_t, A> && pixel_rows(vz, ldz);  // gz's rows read in place
    auto gz_of = [&](int64_t p0, int64_t p1, A* buf) -> std::pair<const A*, int64_t> {
      if (direct) return {reinterpret_cast<const A*>(pz) + p0 * ldz, ldz};
      gather(vz, pz, p0, p1, buf, B);
      return {buf, B};
    };
    auto r = same ? linear_backward_tiles<scalar_t, scalar_t>(x, w, bn, batch_stats, gx, accumulate, coef, sync, gz_of)
                  : linear_backward_tiles<scalar_t, A>(x, w, bn, batch_stats, gx, accumulate, coef, sync, gz_of);
    write_weight<scalar_t>(std::get<0>(r), dw);
    dg = std::move(std::get<1>(r));
    db = std::move(std::get<2>(r));
  });
  return {dw, tensor_like(dg, gamma), tensor_like(db, beta)};
}

// The backward of a bottleneck's conv1 side, z = conv1x1(relu(bn1(x)), W1) and a = relu(bn2(z)), from the
// gradient of a (the 3x3 convolution's dgrad): the BN2-ReLU backward gives gz, which feeds the BN1-ReLU-Linear
// backward. Fused: after one sweep over (z, ga) for BN2's sums, each tile's gz is formed in cache from its z and
// ga rows, so gz is never written (one op where two were: batch_norm_relu_backward_into + this backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef, const Sync* sync) {
  const bool same = gx.scalar_type() == x.scalar_type();
  at::Tensor dw = at::empty_like(w);
  std::vector<double> dg1, db1, dg2, db2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bottleneck_bwd", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto bn1 = bn_params<A>(gamma1, beta1, mean1, var1, eps1);
    const auto bn2 = bn_params<A>(gamma2, beta2, mean2, var2, eps2);
    std::tie(dg2, db2) = relu_grad_sums<T>(z, ga, bn2);
    std::vector<A> al(dg2.size(), A(0)), be(dg2.size(), A(0));  // BN2's batch-statistics correction
    if (batch_stats2) std::tie(al, be) = correction(dg2, db2, bn2, z.size(0) * z.size(2) * z.size(3), sync);
    const View vz(z), vg(ga);
    const T* pz = z.const_data_ptr<T>();
    const T* pg = ga.const_data_ptr<T>();
    const int64_t B = w.size(0);
    int64_t lz = 0, lg = 0;
    const bool direct = std::is_same_v<T, A> && pixel_rows(vz, lz) && pixel_rows(vg, lg);  // rows read in place
    auto gz_of = [&](int64_t p0, int64_t p1, A* buf) -> std::pair<const A*, int64_t> {
      // gz = scale * g + alpha + beta * (z - mean) into buf, rounded as gz.to(T); z and ga read in place, or
      // gathered beside it first
      const int64_t n = p1 - p0;
      const A *zs = buf + n * B, *gs = buf + 2 * n * B;
      int64_t ldz = B, ldg = B;
      if (direct) {
        zs = reinterpret_cast<const A*>(pz) + p0 * lz, gs = reinterpret_cast<const A*>(pg) + p0 * lg;
        ldz = lz, ldg = lg;
      } else {
        gather(vz, pz, p0, p1, buf + n * B, B);
        gather(vg, pg, p0, p1, buf + 2 * n * B, B);
      }
      for (int64_t r = 0; r < n; ++r) {
        const A *zr = zs + r * ldz, *gr = gs + r * ldg;
        if (batch_stats2)
          bn2_grad_row<T, true>(zr, gr, buf + r * B, B, bn2.scale.data(), bn2.shift.data(), bn2.mean.data(),
                                al.data(), be.data());
        else
          bn2_grad_row<T, false>(zr, gr, buf + r * B, B, bn2.scale.data(), bn2.shift.data(), bn2.mean.data(),
                                 al.data(), be.data());
      }
      return {buf, B};
    };
    auto r = same ? linear_backward_tiles<T, T>(x, w, bn1, batch_stats1, gx, true, coef, sync, gz_of)
                  : linear_backward_tiles<T, A>(x, w, bn1, batch_stats1, gx, true, coef, sync, gz_of);
    write_weight<T>(std::get<0>(r), dw);
    dg1 = std::move(std::get<1>(r));
    db1 = std::move(std::get<2>(r));
  });
  return {dw, tensor_like(dg1, gamma1), tensor_like(db1, beta1), tensor_like(dg2, gamma2), tensor_like(db2, beta2)};
}

}  // namespace cpu
}  // namespace effdense
