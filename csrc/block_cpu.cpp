// CPU kernels of the block driver's ops (schemas and argument checks in ops.cpp, CUDA versions in
// cuda_block_ops.cpp): BN-ReLU, BN-ReLU-Linear (the bottleneck 1x1 convolution) forward and backward, the
// store of new channels into the feature buffer (dropout, statistics) and the gather of their gradient.
//
// Every kernel works on tiles of pixels (cpu_tiles.h). A tile is gathered from any strided [N, C, H, W] view
// into a small buffer in the accumulation type, computed on there with unit-stride loops, and scattered
// back: row-major [rows, C] for channels-last views (a channel prefix of the feature buffer: each pixel's
// channels contiguous) and anything else, channel-major [C, rows] for NCHW views (each channel's pixels a
// contiguous run of its plane: no transposition; the GEMMs take such tiles transposed). That is what makes the
// bottleneck 1x1 convolution cheap: a tile of relu(bn(x)) is a few hundred KiB, so it is multiplied with the
// weight (one GEMM per tile, sequential per thread: cpu_gemm.h's kernel or the BLAS) while it is in the
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu_tiles.h"

namespace effdense {
namespace {

using namespace cpu;  // NOLINT(build/namespaces)

// ------------------------------------------------------------------------------------ BN-ReLU forward

template <typename T, typename O>
void batch_norm_relu_impl(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& out) {
  using A = acc_t<T>;
  const View vx(x), vo(out);
  const int64_t c = vx.C, rows = tile_rows(c, vx.pixels());
  const T* px = x.const_data_ptr<T>();
  O* po = out.data_ptr<O>();
  const A *s = bn.scale.data(), *t = bn.shift.data();
  parallel_tiles(vx.pixels(), rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* u = scratch<A>(rows * c);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(vx.pixels(), p0 + rows);
      gather(vx, px, p0, p1, u, c, [&](A v, int64_t ch) { return relu(v * s[ch] + t[ch]); });
      scatter<false>(vo, po, p0, p1, u, c);
    }
  });
}

void batch_norm_relu_into_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out) {
  const char* op = "batch_norm_relu_into";
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_out(out, x.sizes(), x, true, op, "out");
  const bool same = out.scalar_type() == x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_batch_norm_relu", [&] {
    const auto bn = bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps);
    if (same) batch_norm_relu_impl<scalar_t, scalar_t>(x, bn, out);
    else batch_norm_relu_impl<scalar_t, acc_t<scalar_t>>(x, bn, out);
  });
}

// ---------------------------------------------------------------------------- BN-ReLU-Linear forward

// out[p, :] = relu(x[p, :] * scale + shift) @ W^T per pixel (the bottleneck 1x1 convolution), optionally with
// the per-channel batch statistics of out (what norm2 normalizes with) from the same tiles. The GEMM takes
// W^T [c, B] row-major (the untransposed B of cpu_gemm.h's kernel; MKL's faster NN case where the BLAS does
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

void bn_relu_linear_into_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                             const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "bn_relu_linear_into";
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_linear_weight(x, w, op);
  check_out(out, {x.size(0), w.size(0), x.size(2), x.size(3)}, x, false, op, "out");
  check_stats_out(out_mean, out_var, w.size(0), x, op);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_linear", [&] {
    bn_relu_linear_impl<scalar_t>(x, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps), w, out, out_mean,
                                  out_var);
  });
}

// The BN-ReLU backward of effdense.backends.bn.bn_relu_backward, gx (=|+=) scale * g (running statistics) or
// scale * (g - dbeta/P - xhat * dgamma/P) (batch statistics: a first sweep for the sums, a second for gx; with
// coef the correction is deferred instead, see apply_correction, and one sweep does). gx may be gy itself
// (in place, not accumulating): every tile is read before it is written.
template <typename T, typename O>
std::pair<std::vector<double>, std::vector<double>> batch_norm_relu_backward_impl(
    const at::Tensor& x, const at::Tensor& gy, const BN<acc_t<T>>& bn, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef) {
  using A = acc_t<T>;
  const View vx(x), vg(gy), vo(gx);
  const int64_t P = vx.pixels(), c = vx.C, rows = tile_rows(3 * c, P);
  const T* px = x.const_data_ptr<T>();
  const T* pg = gy.const_data_ptr<T>();
  O* po = gx.data_ptr<O>();
  const bool two_sweeps = batch_stats && !coef;
  std::vector<A> al(c, A(0)), be(c, A(0));  // the correction of the second sweep
  Sums sums(num_groups(P, rows), c);
  auto sweep = [&](bool sums_only) {
    parallel_tiles(P, rows, [&](int64_t grp, int64_t t0, int64_t t1) {
      A* xt = scratch<A>(3 * rows * c + 2 * c);
      A* gi = xt + rows * c;
      A* gt = gi + rows * c;
      A* sg = gt + rows * c;
      A* sgx = sg + c;
      const A* __restrict__ a = al.data();
      const A* __restrict__ b = be.data();
      const A* __restrict__ mu = bn.mean.data();
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows), n = p1 - p0;
        gather(vx, px, p0, p1, xt, c);
        gather(vg, pg, p0, p1, gi, c);
        relu_grad_tile(xt, gi, gt, n, c, bn, sg, sgx);
        if (sums_only) {
          sums.add(grp, sg, sgx);
          continue;
        }
        if (two_sweeps) {
          for (int64_t r = 0; r < n; ++r) {
            const A* __restrict__ xr = xt + r * c;
            A* __restrict__ gr = gt + r * c;
            for (int64_t ch = 0; ch < c; ++ch) gr[ch] = bnmath::corrected(gr[ch], xr[ch], mu[ch], a[ch], b[ch]);
          }
        } else {
          sums.add(grp, sg, sgx);
        }
        if (accumulate) scatter<true>(vo, po, p0, p1, gt, c);
        else scatter<false>(vo, po, p0, p1, gt, c);
      }
    });
  };
  sweep(two_sweeps);
  auto [dg, db] = sums.finish(bn.invstd, P);
  if (two_sweeps) {
    std::tie(al, be) = correction(dg, db, bn, P);
    sweep(false);
  } else if (batch_stats) {
    apply_correction<T, O>(x, gx, bn, coef, dg, db);
  }
  return {dg, db};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_relu_backward_into_cpu(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef) {
  const char* op = "batch_norm_relu_backward_into";
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_out(gy, x.sizes(), x, false, op, "grad_y");
  check_out(gx, x.sizes(), x, true, op, "grad_x");
  check_coef(coef, x, op);
  const bool same = gx.scalar_type() == x.scalar_type();
  std::pair<std::vector<double>, std::vector<double>> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_bwd", [&] {
    const auto bn = bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps);
    r = same ? batch_norm_relu_backward_impl<scalar_t, scalar_t>(x, gy, bn, batch_stats, gx, accumulate, coef)
             : batch_norm_relu_backward_impl<scalar_t, acc_t<scalar_t>>(x, gy, bn, batch_stats, gx, accumulate,
                                                                       coef);
  });
  return {tensor_like(r.first, gamma), tensor_like(r.second, beta)};
}

// --------------------------------------------------------------------------- BN-ReLU-Linear backward

// With u = relu(bn(x)) and z = u @ W^T: dW = gz^T @ u, gu = gz @ W, then the BN-ReLU backward of gu into gx.
// Per tile: u and gu are recomputed / computed in cache; dW accumulates per thread (beta = 1 GEMMs). gz_of(p0,
// p1, buf) gives the tile's gz rows (pointer, leading dimension): read in place, or formed in buf (3 * rows * B
// elements of thread scratch), e.g. by the BN2 backward of the bottleneck op.
template <typename T, typename O, typename GZ>
std::tuple<std::vector<acc_t<T>>, std::vector<double>, std::vector<double>> linear_backward_tiles(
    const at::Tensor& x, const at::Tensor& w, const BN<acc_t<T>>& bn, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, GZ&& gz_of) {
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
  if (batch_stats) apply_correction<T, O>(x, gx, bn, coef, dg, db);
  return {dW, dg, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_linear_backward_cpu(
    const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef) {
  const char* op = "bn_relu_linear_backward";
  check_feature(x, op);
  check_coef(coef, x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_linear_weight(x, w, op);
  check_out(gz, {x.size(0), w.size(0), x.size(2), x.size(3)}, x, false, op, "grad_z");
  check_out(gx, x.sizes(), x, true, op, "grad_x");
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
    auto r = same ? linear_backward_tiles<scalar_t, scalar_t>(x, w, bn, batch_stats, gx, accumulate, coef, gz_of)
                  : linear_backward_tiles<scalar_t, A>(x, w, bn, batch_stats, gx, accumulate, coef, gz_of);
    write_weight<scalar_t>(std::get<0>(r), dw);
    dg = std::move(std::get<1>(r));
    db = std::move(std::get<2>(r));
  });
  return {dw, tensor_like(dg, gamma), tensor_like(db, beta)};
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

// The backward of a bottleneck's conv1 side, z = conv1x1(relu(bn1(x)), W1) and a = relu(bn2(z)), from the
// gradient of a (the 3x3 convolution's dgrad): the BN2-ReLU backward gives gz, which feeds the BN1-ReLU-Linear
// backward. Fused: after one sweep over (z, ga) for BN2's sums, each tile's gz is formed in cache from its z and
// ga rows, so gz is never written (one op where two were: batch_norm_relu_backward_into + this backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_backward_cpu(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w, const at::Tensor& gamma1,
    const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1, double eps1, bool batch_stats1,
    const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2, const at::Tensor& var2, double eps2,
    bool batch_stats2, const at::Tensor& gx, const OptTensor& coef) {
  const char* op = "bottleneck_backward";
  check_feature(x, op);
  check_coef(coef, x, op);
  check_bn_params(x, gamma1, beta1, mean1, var1, op);
  check_linear_weight(x, w, op);
  check_out(z, {x.size(0), w.size(0), x.size(2), x.size(3)}, x, false, op, "z");
  check_out(ga, z.sizes(), x, false, op, "grad_a");
  check_bn_params(z, gamma2, beta2, mean2, var2, op);
  check_out(gx, x.sizes(), x, true, op, "grad_x");
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
    if (batch_stats2) std::tie(al, be) = correction(dg2, db2, bn2, z.size(0) * z.size(2) * z.size(3));
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
    auto r = same ? linear_backward_tiles<T, T>(x, w, bn1, batch_stats1, gx, true, coef, gz_of)
                  : linear_backward_tiles<T, A>(x, w, bn1, batch_stats1, gx, true, coef, gz_of);
    write_weight<T>(std::get<0>(r), dw);
    dg1 = std::move(std::get<1>(r));
    db1 = std::move(std::get<2>(r));
  });
  return {dw, tensor_like(dg1, gamma1), tensor_like(db1, beta1), tensor_like(dg2, gamma2), tensor_like(db2, beta2)};
}

// ------------------------------------------------------------------------------- channel store / gather

// out = y, or with dropout y * (noise / (1 - p)) (noise: F.dropout's Bernoulli draw, 0 or 1, in out's
// layout; the product rounded as F.dropout's is) and mask = noise != 0; the statistics of the stored values.
template <typename T>
void store_channels_impl(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                         const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  using A = acc_t<T>;
  const View vy(y), vo(out);
  const int64_t P = vy.pixels(), c = vy.C, rows = tile_rows(2 * c, P);
  TileMoments mom(c, rows, P, out_mean.has_value());
  const T* py = y.const_data_ptr<T>();
  const T* pn = noise ? noise->const_data_ptr<T>() : nullptr;
  T* po = out.data_ptr<T>();
  bool* pm = mask ? mask->data_ptr<bool>() : nullptr;
  const std::optional<View> vn = noise ? std::optional<View>(View(*noise)) : std::nullopt;
  const std::optional<View> vm = mask ? std::optional<View>(View(*mask)) : std::nullopt;
  const A keep = static_cast<A>(1.0 - p);
  parallel_tiles(P, rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* yt = scratch<A>(2 * rows * c);
    A* nt = yt + rows * c;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows), n = p1 - p0;
      gather(vy, py, p0, p1, yt, c);
      if (pn != nullptr) {
        gather(*vn, pn, p0, p1, nt, c);
        for (int64_t i = 0; i < n * c; ++i) yt[i] = round_to<T>(yt[i] * round_to<T>(nt[i] / keep));
        if (pm != nullptr) scatter<false>(*vm, pm, p0, p1, nt, c);
      }
      if (out_mean) mom.add(ti, yt, n, c);
      scatter<false>(vo, po, p0, p1, yt, c);
    }
  });
  if (out_mean) mom.finish<A>(*out_mean, *out_var);
}

void store_channels_cpu(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                        const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  check_store_channels_args(y, noise, p, out, mask, out_mean, out_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "effdense_store_channels", [&] {
    store_channels_impl<scalar_t>(y, noise, p, out, mask, out_mean, out_var);
  });
}

// out = grad (+ coef[0] + coef[1] * (x - mean): the deferred BN corrections, see apply_correction), with
// dropout times mask / (1 - p) (the mask F.dropout multiplied by, in out's dtype).
template <typename T, typename G>
void gather_grad_impl(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                      const OptTensor& x, const OptTensor& coef, const OptTensor& mean) {
  using A = acc_t<T>;
  const View vg(g), vo(out);
  const int64_t P = vg.pixels(), c = vg.C, rows = tile_rows(2 * c, P);
  const G* pg = g.const_data_ptr<G>();
  const bool* pm = mask ? mask->const_data_ptr<bool>() : nullptr;
  const std::optional<View> vm = mask ? std::optional<View>(View(*mask)) : std::nullopt;
  T* po = out.data_ptr<T>();
  const A keep = static_cast<A>(1.0 - p);
  std::vector<A> c0, c1, mu;
  if (coef) c0 = load<A>(coef->select(0, 0)), c1 = load<A>(coef->select(0, 1)), mu = load<A>(*mean);
  const std::optional<View> vx = x ? std::optional<View>(View(*x)) : std::nullopt;
  const T* px = x ? x->const_data_ptr<T>() : nullptr;
  parallel_tiles(P, rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* gt = scratch<A>(2 * rows * c);
    A* mt = gt + rows * c;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows), n = p1 - p0;
      gather(vg, pg, p0, p1, gt, c);
      if (px != nullptr) {
        gather(*vx, px, p0, p1, mt, c);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t ch = 0; ch < c; ++ch)
            gt[r * c + ch] = bnmath::corrected(gt[r * c + ch], mt[r * c + ch], mu[ch], c0[ch], c1[ch]);
      }
      if (pm != nullptr) {
        gather(*vm, pm, p0, p1, mt, c);
        for (int64_t i = 0; i < n * c; ++i) gt[i] *= round_to<T>(mt[i] / keep);
      }
      scatter<false>(vo, po, p0, p1, gt, c);
    }
  });
}

void gather_grad_cpu(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                     const OptTensor& x, const OptTensor& coef, const OptTensor& mean) {
  check_gather_grad_args(g, mask, p, out, x, coef, mean);
  const bool same = g.scalar_type() == out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "effdense_gather_grad", [&] {
    if (same) gather_grad_impl<scalar_t, scalar_t>(g, mask, p, out, x, coef, mean);
    else gather_grad_impl<scalar_t, acc_t<scalar_t>>(g, mask, p, out, x, coef, mean);
  });
}

// ------------------------------------------------------------------------------------------ scale/shift

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift_cpu(const at::Tensor& gamma, const at::Tensor& beta,
                                                                  const at::Tensor& mean, const at::Tensor& var,
                                                                  double eps, at::ScalarType dtype) {
  check_scale_shift_args(gamma, beta, mean, var, dtype);
  const auto opts = mean.options().dtype(dtype);
  at::Tensor scale = at::empty({mean.numel()}, opts), shift = at::empty_like(scale), inv = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(dtype, "effdense_bn_scale_shift", [&] {
    const BN<scalar_t> p = bn_params<scalar_t>(gamma, beta, mean, var, eps);
    write_vec<scalar_t>(p.scale, scale);
    write_vec<scalar_t>(p.shift, shift);
    write_vec<scalar_t>(p.invstd, inv);
  });
  return {scale, shift, inv};
}

}  // namespace
}  // namespace effdense

TORCH_LIBRARY_IMPL(effdense, CPU, m) {
  m.impl("bn_scale_shift", &effdense::bn_scale_shift_cpu);
  m.impl("batch_norm_relu_into", &effdense::batch_norm_relu_into_cpu);
  m.impl("bn_relu_linear_into", &effdense::bn_relu_linear_into_cpu);
  m.impl("batch_norm_relu_backward_into", &effdense::batch_norm_relu_backward_into_cpu);
  m.impl("bn_relu_linear_backward", &effdense::bn_relu_linear_backward_cpu);
  m.impl("bottleneck_backward", &effdense::bottleneck_backward_cpu);
  m.impl("store_channels", &effdense::store_channels_cpu);
  m.impl("gather_grad", &effdense::gather_grad_cpu);
}
