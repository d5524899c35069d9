// CPU kernels of the per-channel BN steps (cpu/kernels.h): channel statistics, BN-ReLU forward and backward
// (one tiled kernel family, for a BN given as (gamma, beta, mean, var, eps) or as scale/shift), scale/shift, the
// running-statistics update, the store of a layer's new channels into the feature buffer (dropout, statistics),
// the gather of their gradient, and the cross-process merge of statistics. The arithmetic is bn_math.h's; tiles
// (cpu/tiles.h) are gathered from any strided [N, C, H, W] view, computed on with unit-stride loops and scattered
// back (linear.cpp says why tiles). Arguments were checked by steps.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../bn_math.h"
#include "kernels.h"
#include "tiles.h"

namespace effdense {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------------- statistics

// Channels-last (or any other non-planar) x: TileMoments over tiles of pixel rows, read in place where x's rows
// are pixel rows of the accumulation type.
template <typename T>
void stats_rows(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  using A = acc_t<T>;
  const View v(x);
  const int64_t P = v.pixels(), c = v.C, rows = tile_rows(c, P);
  TileMoments mom(c, rows, P, true);
  const T* px = x.const_data_ptr<T>();
  int64_t ld = 0;
  const bool direct = std::is_same_v<T, A> && pixel_rows(v, ld);
  parallel_tiles(P, rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* u = scratch<A>(rows * c);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(P, p0 + rows);
      if (direct) {
        mom.add(ti, reinterpret_cast<const A*>(px) + p0 * ld, p1 - p0, ld);
      } else {
        gather(v, px, p0, p1, u, c);
        mom.add(ti, u, p1 - p0, c);
      }
    }
  });
  mom.finish<A>(mean, var);
}

// NCHW-like x: per channel, each image's plane two-pass (shifted, bn_math.h stat_shift: SIMD over a contiguous
// plane), planes merged with Chan's formula.
template <typename T>
void stats_planes(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  using O = acc_t<T>;
  const View v(x);
  const int64_t C = v.C;
  const T* px = x.const_data_ptr<T>();
  O* pm = mean.data_ptr<O>();
  O* pv = var.data_ptr<O>();
  const int64_t HW = v.H * v.W;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      bnmath::Moments acc;
      for (int64_t n = 0; n < v.N; ++n) {
        const T* plane = px + n * v.sN + c * v.sC;
        double m = 0, m2 = 0;
        if ((v.W == 1 || v.sW == 1) && (v.H == 1 || v.sH == v.W)) {  // a contiguous plane: two-pass, SIMD, shifted
          const O kk = bnmath::stat_shift(static_cast<O>(plane[0]));
          O s = 0, q = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < HW; ++i) s += static_cast<O>(plane[i]) - kk;
          const O mo = s / static_cast<O>(HW);
#pragma omp simd reduction(+ : q)
          for (int64_t i = 0; i < HW; ++i) {
            const O d = (static_cast<O>(plane[i]) - kk) - mo;
            q += d * d;
          }
          m = static_cast<double>(kk) + static_cast<double>(mo), m2 = static_cast<double>(q);
        } else {
          double s = 0;
          for (int64_t h = 0; h < v.H; ++h)
            for (int64_t w = 0; w < v.W; ++w) s += static_cast<double>(plane[h * v.sH + w * v.sW]);
          m = s / static_cast<double>(HW);
          for (int64_t h = 0; h < v.H; ++h)
            for (int64_t w = 0; w < v.W; ++w) {
              const double d = static_cast<double>(plane[h * v.sH + w * v.sW]) - m;
              m2 += d * d;
            }
        }
        acc.merge(static_cast<double>(HW), m, m2);
      }
      pm[c] = static_cast<O>(acc.mean_or_nan());
      pv[c] = static_cast<O>(acc.var());
    }
  });
}

// ---------------------------------------------------------------------------------------- BN-ReLU forward

template <typename T, typename O>
void bn_relu_impl(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& out) {
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

template <typename T>
void bn_relu_dispatch(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& out) {
  if (out.scalar_type() == x.scalar_type()) bn_relu_impl<T, T>(x, bn, out);
  else bn_relu_impl<T, acc_t<T>>(x, bn, out);
}

// ---------------------------------------------------------------------------------------- BN-ReLU backward

// The BN-ReLU backward of effdense.backends.bn.bn_relu_backward, gx (=|+=) scale * g (running statistics) or
// scale * (g - dbeta/P - xhat * dgamma/P) (batch statistics: a first sweep for the sums, a second for gx; with
// coef the correction is deferred instead, see apply_correction, and one sweep does). gx may be gy itself
// (in place, not accumulating): every tile is read before it is written. With sync, the correction's sums and
// count are every process's (returned: this process's sums).
template <typename T, typename O>
std::pair<std::vector<double>, std::vector<double>> batch_norm_relu_backward_impl(
    const at::Tensor& x, const at::Tensor& gy, const BN<acc_t<T>>& bn, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
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
    std::tie(al, be) = correction(dg, db, bn, P, sync);
    sweep(false);
  } else if (batch_stats) {
    apply_correction<T, O>(x, gx, bn, coef, dg, db, sync);
  }
  return {dg, db};
}

template <typename T>
std::pair<std::vector<double>, std::vector<double>> bn_relu_backward_dispatch(
    const at::Tensor& x, const at::Tensor& gy, const BN<acc_t<T>>& bn, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
  if (gx.scalar_type() == x.scalar_type())
    return batch_norm_relu_backward_impl<T, T>(x, gy, bn, batch_stats, gx, accumulate, coef, sync);
  return batch_norm_relu_backward_impl<T, acc_t<T>>(x, gy, bn, batch_stats, gx, accumulate, coef, sync);
}

// scale/shift (and the mean/invstd of a backward) in A: the BN of the scale/shift steps
template <typename A>
BN<A> given_bn(const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* mean = nullptr,
               const at::Tensor* invstd = nullptr) {
  return {load<A>(scale), load<A>(shift), mean ? load<A>(*mean) : std::vector<A>(),
          invstd ? load<A>(*invstd) : std::vector<A>()};
}

// running (R) lerp'd towards batch statistics (M), arithmetic in R's opmath type as torch's lerp_ does
template <typename R, typename M>
void running_update_cpu(const at::Tensor& rm, const at::Tensor& rv, const M* m, const M* v, int64_t sm,
                        double factor, int64_t count) {
  using O = acc_t<R>;
  R* pm = rm.data_ptr<R>();
  R* pv = rv.data_ptr<R>();
  const int64_t c = rm.numel(), s0 = rm.stride(0), s1 = rv.stride(0);
  const O w = static_cast<O>(factor);
  const M unb = static_cast<M>(bnmath::unbiased_factor(count));
  for (int64_t j = 0; j < c; ++j) {
    const O mb = static_cast<O>(static_cast<R>(m[j * sm]));
    const O vb = static_cast<O>(static_cast<R>(static_cast<M>(v[j * sm] * unb)));
    pm[j * s0] = static_cast<R>(bnmath::lerp(static_cast<O>(pm[j * s0]), mb, w));
    pv[j * s1] = static_cast<R>(bnmath::lerp(static_cast<O>(pv[j * s1]), vb, w));
  }
}

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

}  // namespace

// ------------------------------------------------------------------------------------------ the steps

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x) {
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, opts), var = at::empty({x.size(1)}, opts);
  if (x.numel() == 0) {  // torch.var_mean of an empty batch: NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const bool planes = out_format(x) != at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_channel_stats", [&] {
    if (planes) stats_planes<scalar_t>(x, mean, var);
    else stats_rows<scalar_t>(x, mean, var);
  });
  return {mean, var};
}

void bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu", [&] {
    bn_relu_dispatch<scalar_t>(x, given_bn<acc_t<scalar_t>>(scale, shift), out);
  });
}

void batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_batch_norm_relu", [&] {
    bn_relu_dispatch<scalar_t>(x, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps), out);
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy,
                                                         const at::Tensor& scale, const at::Tensor& shift,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         bool batch_stats, const at::Tensor& gx, bool accumulate,
                                                         const Sync* sync) {
  std::pair<std::vector<double>, std::vector<double>> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_bwd", [&] {
    r = bn_relu_backward_dispatch<scalar_t>(x, gy, given_bn<acc_t<scalar_t>>(scale, shift, &mean, &invstd),
                                            batch_stats, gx, accumulate, std::nullopt, sync);
  });
  return {tensor_like(r.first, scale), tensor_like(r.second, shift)};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
    bool accumulate, const OptTensor& coef, const Sync* sync) {
  std::pair<std::vector<double>, std::vector<double>> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_batch_norm_relu_bwd", [&] {
    r = bn_relu_backward_dispatch<scalar_t>(x, gy, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps),
                                            batch_stats, gx, accumulate, coef, sync);
  });
  return {tensor_like(r.first, gamma), tensor_like(r.second, beta)};
}

void store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                    const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "effdense_store_channels", [&] {
    store_channels_impl<scalar_t>(y, noise, p, out, mask, out_mean, out_var);
  });
}

void gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out, const OptTensor& x,
                 const OptTensor& coef, const OptTensor& mean) {
  const bool same = g.scalar_type() == out.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "effdense_gather_grad", [&] {
    if (same) gather_grad_impl<scalar_t, scalar_t>(g, mask, p, out, x, coef, mean);
    else gather_grad_impl<scalar_t, acc_t<scalar_t>>(g, mask, p, out, x, coef, mean);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps, at::ScalarType dtype) {
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

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                          at::ArrayRef<double> momentum, int64_t count) {
  for (size_t i = 0; i < running_mean.size(); ++i) {
    int64_t& tracked = *nbt[i].data_ptr<int64_t>();
    tracked += 1;
    if (count == 0) continue;  // an empty batch only counts, as nn.BatchNorm2d
    const double factor = bnmath::running_factor(momentum[i], tracked);
    const int64_t off = mean.dim() == 1 ? 0 : rows[i] * mean.stride(0);
    const int64_t sm = mean.stride(mean.dim() - 1);
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "effdense_running_stats_m", [&] {
      using M = scalar_t;
      const M* m = mean.const_data_ptr<M>() + off;
      const M* v = var.const_data_ptr<M>() + off;  // var has mean's strides (checked)
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean[i].scalar_type(),
                                      "effdense_running_stats_r", [&] {
        running_update_cpu<scalar_t, M>(running_mean[i], running_var[i], m, v, sm, factor, count);
      });
    });
  }
}

void merge_moments(const at::Tensor& gathered, const at::Tensor& mean, const at::Tensor& var) {
  const int64_t ranks = gathered.size(0), ld = gathered.size(1), C = mean.numel();
  const double* g = gathered.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "effdense_merge_moments", [&] {
    scalar_t* pm = mean.data_ptr<scalar_t>();
    scalar_t* pv = var.data_ptr<scalar_t>();
    const int64_t sm = mean.stride(0), sv = var.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      bnmath::Moments acc;
      for (int64_t r = 0; r < ranks; ++r) acc.merge(g[r * ld], g[r * ld + 1 + c], g[r * ld + 1 + C + c]);
      pm[c * sm] = static_cast<scalar_t>(acc.mean_or_nan());
      pv[c * sv] = static_cast<scalar_t>(acc.var());
    }
  });
}

}  // namespace cpu
}  // namespace effdense
