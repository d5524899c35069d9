// effdense::* operator schemas (defined once, here) and their CPU implementations.
//
// The per-channel BN statistics, the fused BN-ReLU forward (into a caller-given buffer: the block's shared
// scratch storage) and the fused BN-ReLU backward with its per-channel reductions. The CUDA implementations
// of the same ops are in cuda_ops.cpp (torch glue) and cuda/*.cu (kernels); the block driver in block.cpp.
//
// CPU kernels: at::parallel_for, any strides (two loop orders: channels innermost for channels-last
// layouts, one channel plane at a time otherwise), float/double/half/bfloat16 with double accumulation of
// the per-channel sums. Statistics are exact two-pass per chunk of pixels, merged with Chan's formula.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

#include "bn_math.h"
#include "common.h"

namespace effdense {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_feature(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.defined(), "effdense::", op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(x.dim() == 4, "effdense::", op, ": expected ", name, " to be a 4-D tensor [N, C, H, W], got a ",
              x.dim(), "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(is_float_type(x.scalar_type()), "effdense::", op, ": expected ", name,
              " with dtype float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

void check_vec(const at::Tensor& v, const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(v.defined() && v.dim() == 1 && v.size(0) == x.size(1) && v.scalar_type() == dtype &&
                  v.device() == x.device(),
              "effdense::", op, ": expected ", name, " of shape [", x.size(1), "] (one value per channel of x ",
              shape_str(x), ") with dtype ", dtype, " on ", x.device(), ", got ",
              v.defined() ? "shape " + shape_str(v) : std::string("an undefined tensor"),
              v.defined() ? std::string(" with dtype ") + c10::toString(v.scalar_type()) + " on " + v.device().str()
                          : std::string());
}

void check_same_shape(const at::Tensor& a, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(a.defined() && a.sizes() == x.sizes() && a.device() == x.device(), "effdense::", op, ": expected ",
              name, " of shape ", shape_str(x), " on ", x.device(), " (the shape of x), got ",
              a.defined() ? "shape " + shape_str(a) + " on " + a.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK(is_float_type(a.scalar_type()), "effdense::", op, ": expected ", name,
              " with dtype float32, float64, float16 or bfloat16, got ", a.scalar_type());
}

void check_bn_params(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                     const at::Tensor& var, const char* op) {
  const char* names[] = {"gamma", "beta", "mean", "var"};
  const at::Tensor* ts[] = {&gamma, &beta, &mean, &var};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& v = *ts[i];
    TORCH_CHECK(v.defined() && v.dim() == 1 && v.size(0) == x.size(1) && is_float_type(v.scalar_type()) &&
                    v.device() == x.device(),
                "effdense::", op, ": expected ", names[i], " of shape [", x.size(1), "] (one value per channel of x ",
                shape_str(x), ") with a floating dtype on ", x.device(), ", got ",
                v.defined() ? "shape " + shape_str(v) + " with dtype " + c10::toString(v.scalar_type()) + " on " +
                                  v.device().str()
                            : std::string("an undefined tensor"));
  }
}

void check_stats_out(const OptTensor& mean, const OptTensor& var, int64_t n, const at::Tensor& x, const char* op) {
  TORCH_CHECK(mean.has_value() == var.has_value(), "effdense::", op, ": expected out_mean and out_var both given "
              "or both None");
  if (!mean) return;
  const auto a = acc_type(x.scalar_type());
  for (const at::Tensor* t : {&*mean, &*var})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == a && t->device() == x.device(),
                "effdense::", op, ": expected out_mean and out_var of shape [", n, "] with dtype ", a, " on ",
                x.device(), ", got shape ", shape_str(*t), " with dtype ", t->scalar_type(), " on ", t->device());
}

void check_out(const at::Tensor& out, at::IntArrayRef shape, const at::Tensor& x, bool acc_ok, const char* op,
               const char* name) {
  const auto dt = x.scalar_type(), a = acc_type(dt);
  TORCH_CHECK(out.defined() && out.sizes() == shape && out.device() == x.device() &&
                  (out.scalar_type() == dt || (acc_ok && out.scalar_type() == a)),
              "effdense::", op, ": expected ", name, " of shape ", shape, " with dtype ", dt,
              acc_ok ? std::string(" (that of x) or ") + c10::toString(a) : std::string(" (that of x)"), " on ",
              x.device(), ", got ",
              out.defined() ? "shape " + shape_str(out) + " with dtype " + c10::toString(out.scalar_type()) + " on " +
                                  out.device().str()
                            : std::string("an undefined tensor"));
}

static void check_gather_coef(const at::Tensor& out, const OptTensor& x, const OptTensor& coef,
                              const OptTensor& mean) {
  TORCH_CHECK(x.has_value() == coef.has_value() && x.has_value() == mean.has_value(), "effdense::gather_grad: "
              "expected x, coef and mean all given (deferred BN corrections) or all None");
  if (!x) return;
  const auto a = acc_type(out.scalar_type());
  TORCH_CHECK(x->sizes() == out.sizes() && x->scalar_type() == out.scalar_type() && x->device() == out.device(),
              "effdense::gather_grad: expected x of shape ", shape_str(out), " with dtype ", out.scalar_type(),
              " (those of out) on ", out.device());
  TORCH_CHECK(coef->dim() == 2 && coef->size(0) == 2 && coef->size(1) == out.size(1) && coef->scalar_type() == a &&
                  coef->device() == out.device(),
              "effdense::gather_grad: expected coef of shape [2, ", out.size(1), "] with dtype ", a, " on ",
              out.device(), ", got ", shape_str(*coef), " with dtype ", coef->scalar_type());
  TORCH_CHECK(mean->dim() == 1 && mean->size(0) == out.size(1) && is_float_type(mean->scalar_type()) &&
                  mean->device() == out.device(),
              "effdense::gather_grad: expected mean of shape [", out.size(1), "] with a floating dtype on ",
              out.device(), ", got ", shape_str(*mean));
}

// The argument checks of the ops with a CPU and a CUDA kernel (block_cpu.cpp, cuda_block_ops.cpp), shared.
void check_gather_grad_args(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                            const OptTensor& x, const OptTensor& coef, const OptTensor& mean) {
  const char* op = "gather_grad";
  check_feature(out, op, "out");
  TORCH_CHECK(g.defined() && g.sizes() == out.sizes() && g.device() == out.device() &&
                  (g.scalar_type() == out.scalar_type() || g.scalar_type() == acc_type(out.scalar_type())),
              "effdense::gather_grad: expected grad of shape ", shape_str(out), " with dtype ", out.scalar_type(),
              " or ", acc_type(out.scalar_type()), " (that of out or its accumulation dtype) on ", out.device());
  TORCH_CHECK(!mask || (mask->sizes() == out.sizes() && mask->scalar_type() == at::kBool &&
                        mask->device() == out.device()),
              "effdense::gather_grad: expected mask of shape ", shape_str(out), " with dtype bool on ", out.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "effdense::gather_grad: expected p in [0, 1), got ", p);
  check_gather_coef(out, x, coef, mean);
}

void check_store_channels_args(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                               const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "store_channels";
  check_feature(y, op, "y");
  check_out(out, y.sizes(), y, false, op, "out");
  if (noise) check_out(*noise, y.sizes(), y, false, op, "noise");
  TORCH_CHECK(!mask || (noise && mask->sizes() == y.sizes() && mask->scalar_type() == at::kBool &&
                        mask->device() == y.device()),
              "effdense::store_channels: expected mask (given only with noise) of shape ", shape_str(y),
              " with dtype bool on ", y.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "effdense::store_channels: expected p in [0, 1), got ", p);
  check_stats_out(out_mean, out_var, y.size(1), y, op);
}

void check_scale_shift_args(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                            const at::Tensor& var, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "effdense::bn_scale_shift: expected dtype float32 or "
              "float64, got ", dtype);
  for (const at::Tensor* t : {&gamma, &beta, &var})
    TORCH_CHECK(t->dim() == 1 && t->numel() == mean.numel() && t->device() == mean.device() &&
                    is_float_type(t->scalar_type()),
                "effdense::bn_scale_shift: expected gamma, beta and var of shape [", mean.numel(), "] (that of mean) "
                "with a floating dtype on ", mean.device(), ", got shape ", shape_str(*t), " with dtype ",
                t->scalar_type(), " on ", t->device());
}

// w [B, C, ks, ks] for x [N, C, H, W] ("B" names the output channels in the message: B for the 1x1, k for the 3x3)
void check_kernel_weight(const at::Tensor& x, const at::Tensor& w, int64_t ks, const char* out, const char* op) {
  TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == ks && w.size(3) == ks &&
                  w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "effdense::", op, ": expected weight of shape [", out, ", ", x.size(1), ", ", ks, ", ", ks,
              "] with dtype ", x.scalar_type(), " (that of x) on ", x.device(), ", got ",
              w.defined() ? shape_str(w) : std::string("undefined"),
              w.defined() ? std::string(" with dtype ") + c10::toString(w.scalar_type()) + " on " + w.device().str()
                          : std::string());
}

void check_linear_weight(const at::Tensor& x, const at::Tensor& w, const char* op) {
  check_kernel_weight(x, w, 1, "B", op);
}

static void check_bn_conv3x3_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                  const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w, const char* op) {
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_kernel_weight(x, w, 3, "k", op);
}

void check_conv3x3_into_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                             const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w, const at::Tensor& out,
                             const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "bn_relu_conv3x3_into";
  check_bn_conv3x3_args(x, gamma, beta, mean, var, w, op);
  check_out(out, {x.size(0), w.size(0), x.size(2), x.size(3)}, x, false, op, "out");
  check_stats_out(out_mean, out_var, w.size(0), x, op);
}

void check_conv3x3_backward_args(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                 const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& w, const at::Tensor& ga) {
  const char* op = "bn_relu_conv3x3_backward";
  check_bn_conv3x3_args(x, gamma, beta, mean, var, w, op);
  check_out(gy, {x.size(0), w.size(0), x.size(2), x.size(3)}, x, false, op, "grad_y");
  check_out(ga, x.sizes(), x, false, op, "grad_a");
}

// ------------------------------------------------------------------------------------------------ geometry

// Element (n, c, h, w) of a 4-D strided tensor; pixels p = (n, h, w) in row-major order.
struct Geo {
  int64_t N, C, H, W, sN, sC, sH, sW;
  explicit Geo(const at::Tensor& t)
      : N(t.size(0)), C(t.size(1)), H(t.size(2)), W(t.size(3)),
        sN(t.stride(0)), sC(t.stride(1)), sH(t.stride(2)), sW(t.stride(3)) {}
  int64_t pixels() const { return N * H * W; }
  int64_t pix(int64_t p) const {
    const int64_t hw = H * W;
    const int64_t n = p / hw, r = p - n * hw, h = r / W, w = r - h * W;
    return n * sN + h * sH + w * sW;
  }
};

// Channels innermost: loop over pixels outside, channels inside.
bool channels_inner(const at::Tensor& x) { return out_format(x) == at::MemoryFormat::ChannelsLast; }

constexpr int64_t kChunk = 256;  // pixels per task of the channels-innermost loops

// ---------------------------------------------------------------------------------------------- statistics

template <typename T>
void stats_cpu_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  using O = acc_t<T>;
  const Geo g(x);
  const int64_t P = g.pixels(), C = g.C;
  const T* px = x.data_ptr<T>();
  O* pm = mean.data_ptr<O>();
  O* pv = var.data_ptr<O>();
  if (P == 0) {  // torch.var_mean of an empty batch: NaN
    for (int64_t c = 0; c < C; ++c) pm[c] = pv[c] = std::numeric_limits<O>::quiet_NaN();
    return;
  }
  if (channels_inner(x)) {
    const int64_t nchunks = (P + kChunk - 1) / kChunk;
    std::vector<double> cm(nchunks * C), cm2(nchunks * C);
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t p0 = k * kChunk, p1 = std::min(P, p0 + kChunk);
        // two-pass within the chunk in the accumulation type (exact enough over kChunk pixels), unit-stride
        // channel loops when channels are contiguous (they vectorize); chunks merge in double below
        // (shifted by the chunk's first row: bnmath::stat_shift, see cpu_tiles.h TileMoments)
        thread_local std::vector<O> sk, sm, sq;
        sk.resize(static_cast<size_t>(C));
        sm.assign(static_cast<size_t>(C), O(0));
        sq.assign(static_cast<size_t>(C), O(0));
        O* __restrict__ kk = sk.data();
        O* __restrict__ a = sm.data();
        O* __restrict__ q = sq.data();
        const int64_t sc = C == 1 ? 1 : g.sC;
        const T* first = px + g.pix(p0);
        for (int64_t c = 0; c < C; ++c) kk[c] = bnmath::stat_shift(static_cast<O>(first[c * sc]));
        for (int64_t p = p0; p < p1; ++p) {
          const T* __restrict__ row = px + g.pix(p);
          if (sc == 1)
            for (int64_t c = 0; c < C; ++c) a[c] += static_cast<O>(row[c]) - kk[c];
          else
            for (int64_t c = 0; c < C; ++c) a[c] += static_cast<O>(row[c * sc]) - kk[c];
        }
        const O inv = O(1) / static_cast<O>(p1 - p0);
        for (int64_t c = 0; c < C; ++c) a[c] *= inv;
        for (int64_t p = p0; p < p1; ++p) {
          const T* __restrict__ row = px + g.pix(p);
          for (int64_t c = 0; c < C; ++c) {
            const O d = (static_cast<O>(row[c * sc]) - kk[c]) - a[c];
            q[c] += d * d;
          }
        }
        double* m = cm.data() + k * C;
        double* m2 = cm2.data() + k * C;
        for (int64_t c = 0; c < C; ++c)
          m[c] = static_cast<double>(kk[c]) + static_cast<double>(a[c]), m2[c] = static_cast<double>(q[c]);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        bnmath::Moments acc;
        for (int64_t k = 0; k < nchunks; ++k) {
          const int64_t cnt = std::min(P, (k + 1) * kChunk) - k * kChunk;
          acc.merge(static_cast<double>(cnt), cm[k * C + c], cm2[k * C + c]);
        }
        pm[c] = static_cast<O>(acc.mean_or_nan());
        pv[c] = static_cast<O>(acc.var());
      }
    });
    return;
  }
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      bnmath::Moments acc;
      for (int64_t n = 0; n < g.N; ++n) {
        const T* plane = px + n * g.sN + c * g.sC;
        double m = 0, m2 = 0;
        if ((g.W == 1 || g.sW == 1) && (g.H == 1 || g.sH == g.W)) {  // a contiguous plane: two-pass, SIMD, shifted
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
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) s += static_cast<double>(plane[h * g.sH + w * g.sW]);
          m = s / static_cast<double>(HW);
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) {
              const double d = static_cast<double>(plane[h * g.sH + w * g.sW]) - m;
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

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x) {
  check_feature(x, "channel_stats");
  const auto opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, opts), var = at::empty({x.size(1)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_channel_stats_cpu",
                                  [&] { stats_cpu_impl<scalar_t>(x, mean, var); });
  return {mean, var};
}

// ------------------------------------------------------------------------------------------ BN-ReLU forward

template <typename T, typename O>
void bn_relu_cpu_impl(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  using A = acc_t<T>;
  const Geo gx(x), go(out);
  const T* px = x.data_ptr<T>();
  O* po = out.data_ptr<O>();
  const A* s = scale.data_ptr<A>();
  const A* t = shift.data_ptr<A>();
  const int64_t C = gx.C;
  auto f = [&](T v, int64_t c) {
    const A y = static_cast<A>(v) * s[c] + t[c];
    return static_cast<O>(y <= A(0) ? A(0) : y);  // NaN passes, as torch.relu
  };
  if (channels_inner(x)) {
    at::parallel_for(0, gx.pixels(), std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const T* xr = px + gx.pix(p);
        O* orow = po + go.pix(p);
        if (gx.sC == 1 && go.sC == 1) {
          for (int64_t c = 0; c < C; ++c) orow[c] = f(xr[c], c);
        } else {
          for (int64_t c = 0; c < C; ++c) orow[c * go.sC] = f(xr[c * gx.sC], c);
        }
      }
    });
    return;
  }
  at::parallel_for(0, gx.N * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / C, c = q - n * C;
      const T* xp = px + n * gx.sN + c * gx.sC;
      O* op = po + n * go.sN + c * go.sC;
      for (int64_t h = 0; h < gx.H; ++h)
        for (int64_t w = 0; w < gx.W; ++w) op[h * go.sH + w * go.sW] = f(xp[h * gx.sH + w * gx.sW], c);
    }
  });
}

void check_bn_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const char* op) {
  check_feature(x, op);
  const auto a = acc_type(x.scalar_type());
  check_vec(scale, x, a, op, "scale");
  check_vec(shift, x, a, op, "shift");
}

void bn_relu_into_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_args(x, scale, shift, "bn_relu_into");
  check_same_shape(out, x, "bn_relu_into", "out");
  const bool same = out.scalar_type() == x.scalar_type();
  TORCH_CHECK(same || out.scalar_type() == acc_type(x.scalar_type()),
              "effdense::bn_relu_into: expected out with dtype ", x.scalar_type(), " (that of x) or ",
              acc_type(x.scalar_type()), ", got ", out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_cpu", [&] {
    if (same) bn_relu_cpu_impl<scalar_t, scalar_t>(x, scale, shift, out);
    else bn_relu_cpu_impl<scalar_t, acc_t<scalar_t>>(x, scale, shift, out);
  });
}

// ----------------------------------------------------------------------------------------- BN-ReLU backward

template <typename T, typename O>
void bn_relu_bwd_cpu_impl(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                          const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                          bool batch_stats, const at::Tensor& gx, bool accumulate, const at::Tensor& dgamma,
                          const at::Tensor& dbeta) {
  using A = acc_t<T>;
  const Geo g(x), gg(gy), go(gx);
  const int64_t P = g.pixels(), C = g.C;
  const T* px = x.data_ptr<T>();
  const T* pg = gy.data_ptr<T>();
  O* po = gx.data_ptr<O>();
  const A* s = scale.data_ptr<A>();
  const A* t = shift.data_ptr<A>();
  const A* mu = mean.data_ptr<A>();
  const A* is = invstd.data_ptr<A>();
  A* pdg = dgamma.data_ptr<A>();
  A* pdb = dbeta.data_ptr<A>();
  // g = grad_y where relu's input is positive (or NaN), xhat = (x - mean) * invstd. Both operands are loaded
  // before the select: a load inside the condition compiles to a branch, mispredicted half the time (~15x slower)
  auto grad = [&](T xv, T gv, int64_t c, A& xhat) {
    const A xa = static_cast<A>(xv), ga = static_cast<A>(gv);
    xhat = (xa - mu[c]) * is[c];
    return (xa * s[c] + t[c] <= A(0)) ? A(0) : ga;
  };
  auto finish = [&](A gval, A xhat, int64_t c, A k1, A k2) {
    return batch_stats ? s[c] * (gval - k1 - xhat * k2) : s[c] * gval;
  };
  auto store = [&](O* dst, A v) { *dst = accumulate ? static_cast<O>(static_cast<A>(*dst) + v) : static_cast<O>(v); };
  const A invP = P > 0 ? A(1) / static_cast<A>(P) : A(0);
  if (channels_inner(x)) {
    const int64_t nchunks = (P + kChunk - 1) / kChunk;
    std::vector<double> sg(nchunks * C), sgx(nchunks * C);
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        double* a = sg.data() + k * C;
        double* bb = sgx.data() + k * C;
        std::fill(a, a + C, 0.0);
        std::fill(bb, bb + C, 0.0);
        for (int64_t p = k * kChunk, p1 = std::min(P, (k + 1) * kChunk); p < p1; ++p) {
          const T* xr = px + g.pix(p);
          const T* gr = pg + gg.pix(p);
          for (int64_t c = 0; c < C; ++c) {
            A xhat;
            const A gv = grad(xr[c * g.sC], gr[c * gg.sC], c, xhat);
            a[c] += gv;
            bb[c] += static_cast<double>(gv) * xhat;
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, bb = 0;
      for (int64_t k = 0; k < nchunks; ++k) a += sg[k * C + c], bb += sgx[k * C + c];
      pdb[c] = static_cast<A>(a);
      pdg[c] = static_cast<A>(bb);
    }
    at::parallel_for(0, P, std::max<int64_t>(1, 2048 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const T* xr = px + g.pix(p);
        const T* gr = pg + gg.pix(p);
        O* orow = po + go.pix(p);
        for (int64_t c = 0; c < C; ++c) {
          A xhat;
          const A gv = grad(xr[c * g.sC], gr[c * gg.sC], c, xhat);
          store(orow + c * go.sC, finish(gv, xhat, c, pdb[c] * invP, pdg[c] * invP));
        }
      }
    });
    return;
  }
  if (g.sW == 1 && g.sH == g.W && gg.sW == 1 && gg.sH == gg.W && go.sW == 1 && go.sH == go.W) {
    // contiguous H*W planes (NCHW, also channel slices of the feature buffer): planes q = (n, c) in memory order
    // (a channel-major sweep jumps a page per plane: 2x slower), SIMD over a plane, per-plane partial sums merged
    // per channel in double; sum(g * xhat) = invstd * sum(g * (x - mean))
    const int64_t HW = g.H * g.W, NC = g.N * C;
    std::vector<double> plane_g(NC), plane_gx(NC);
    at::parallel_for(0, NC, 1, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / C, c = q - n * C;
        const A sc = s[c], sh = t[c], m = mu[c];
        const T* xp = px + n * g.sN + c * g.sC;
        const T* gp = pg + n * gg.sN + c * gg.sC;
        A pa = 0, pb = 0;
#pragma omp simd reduction(+ : pa, pb)
        for (int64_t i = 0; i < HW; ++i) {
          const A xa = static_cast<A>(xp[i]), ga = static_cast<A>(gp[i]);  // both loaded: a select, no branch
          const A gv = xa * sc + sh <= A(0) ? A(0) : ga;
          pa += gv;
          pb += gv * (xa - m);
        }
        plane_g[q] = pa;
        plane_gx[q] = pb;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double a = 0, bb = 0;
      for (int64_t n = 0; n < g.N; ++n) a += plane_g[n * C + c], bb += plane_gx[n * C + c];
      pdb[c] = static_cast<A>(a);
      pdg[c] = static_cast<A>(bb * static_cast<double>(is[c]));
    }
    at::parallel_for(0, NC, 1, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / C, c = q - n * C;
        const A sc = s[c], sh = t[c], m = mu[c];
        const A k1 = pdb[c] * invP, k2 = pdg[c] * invP * is[c];  // dx = scale * (g - k1 - (x - mean) * k2)
        const T* xp = px + n * g.sN + c * g.sC;
        const T* gp = pg + n * gg.sN + c * gg.sC;
        O* op = po + n * go.sN + c * go.sC;
        if (batch_stats) {
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) {
            const A xa = static_cast<A>(xp[i]), ga = static_cast<A>(gp[i]);
            const A gv = xa * sc + sh <= A(0) ? A(0) : ga;
            const A v = sc * (gv - k1 - (xa - m) * k2);
            op[i] = accumulate ? static_cast<O>(static_cast<A>(op[i]) + v) : static_cast<O>(v);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) {
            const A xa = static_cast<A>(xp[i]), ga = static_cast<A>(gp[i]);
            const A v = sc * (xa * sc + sh <= A(0) ? A(0) : ga);
            op[i] = accumulate ? static_cast<O>(static_cast<A>(op[i]) + v) : static_cast<O>(v);
          }
        }
      }
    });
    return;
  }
  // any other strides: one channel at a time, both passes over its planes, (x, gy, offset into gx) per element
  auto plane = [&](int64_t c, auto&& f) {
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w)
          f(px[n * g.sN + c * g.sC + h * g.sH + w * g.sW], pg[n * gg.sN + c * gg.sC + h * gg.sH + w * gg.sW],
            n * go.sN + c * go.sC + h * go.sH + w * go.sW);
  };
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double a = 0, bb = 0;
      plane(c, [&](T xv, T gv, int64_t) {
        A xhat;
        const A gval = grad(xv, gv, c, xhat);
        a += gval;
        bb += static_cast<double>(gval) * xhat;
      });
      pdb[c] = static_cast<A>(a);
      pdg[c] = static_cast<A>(bb);
      const A k1 = pdb[c] * invP, k2 = pdg[c] * invP;
      plane(c, [&](T xv, T gv, int64_t off) {
        A xhat;
        const A gval = grad(xv, gv, c, xhat);
        store(po + off, finish(gval, xhat, c, k1, k2));
      });
    }
  });
}

void check_bwd_args(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& mean, const at::Tensor& invstd, const char* op) {
  check_bn_args(x, scale, shift, op);
  check_same_shape(gy, x, op, "grad_y");
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), "effdense::", op, ": expected grad_y with dtype ",
              x.scalar_type(), " (that of x), got ", gy.scalar_type());
  const auto a = acc_type(x.scalar_type());
  check_vec(mean, x, a, op, "mean");
  check_vec(invstd, x, a, op, "invstd");
}

void check_grad_x(const at::Tensor& x, const at::Tensor& gx, const char* op) {
  check_same_shape(gx, x, op, "grad_x");
  TORCH_CHECK(gx.scalar_type() == x.scalar_type() || gx.scalar_type() == acc_type(x.scalar_type()),
              "effdense::", op, ": expected grad_x with dtype ", x.scalar_type(), " (that of x) or ",
              acc_type(x.scalar_type()), ", got ", gx.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_into_cpu(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats, const at::Tensor& gx, bool accumulate) {
  check_bwd_args(x, gy, scale, shift, mean, invstd, "bn_relu_backward_into");
  check_grad_x(x, gx, "bn_relu_backward_into");
  at::Tensor dgamma = at::empty({x.size(1)}, scale.options()), dbeta = at::empty({x.size(1)}, scale.options());
  const bool same = gx.scalar_type() == x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_bwd_cpu", [&] {
    if (same)
      bn_relu_bwd_cpu_impl<scalar_t, scalar_t>(x, gy, scale, shift, mean, invstd, batch_stats, gx, accumulate,
                                               dgamma, dbeta);
    else
      bn_relu_bwd_cpu_impl<scalar_t, acc_t<scalar_t>>(x, gy, scale, shift, mean, invstd, batch_stats, gx,
                                                      accumulate, dgamma, dbeta);
  });
  return {dgamma, dbeta};
}

// BN-ReLU then a 1x1 convolution (no bias). The CPU version composes the fused BN-ReLU with ATen's
// convolution; the CUDA version is one tensor-core kernel (cuda/conv1x1.cu) where it applies.
void check_conv1x1_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& w) {
  check_bn_args(x, scale, shift, "bn_relu_conv1x1");
  TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == 1 && w.size(3) == 1 &&
                  w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "effdense::bn_relu_conv1x1: expected weight of shape [B, ", x.size(1), ", 1, 1] with dtype ",
              x.scalar_type(), " on ", x.device(), ", got ", w.defined() ? shape_str(w) : std::string("undefined"),
              w.defined() ? std::string(" with dtype ") + c10::toString(w.scalar_type()) + " on " + w.device().str()
                          : std::string());
}

at::Tensor bn_relu_conv1x1_composite(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                     const at::Tensor& w) {
  check_conv1x1_args(x, scale, shift, w);
  at::Tensor u = at::empty(x.sizes(), x.options(), out_format(x));
  call_bn_relu_into(x, scale, shift, u);
  at::Tensor y = at::convolution(u, w, {}, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
  const auto mf = out_format(x);
  return y.is_contiguous(mf) ? y : y.contiguous(mf);
}


// ------------------------------------------------------------------------------ functional forms (any device)

// The functional ops allocate their output in x's memory format and call the `_into` op of x's device.
at::Tensor bn_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_bn_args(x, scale, shift, "bn_relu");
  at::Tensor out = at::empty(x.sizes(), x.options(), out_format(x));
  call_bn_relu_into(x, scale, shift, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats) {
  check_bwd_args(x, gy, scale, shift, mean, invstd, "bn_relu_backward");
  at::Tensor gx = at::empty(x.sizes(), x.options(), out_format(x));
  auto [dg, db] = call_bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, gx, false);
  return {gx, dg, db};
}

// ------------------------------------------------------------------------------------ running statistics

// nn.BatchNorm2d's running-statistics update for a list of layers at once: num_batches_tracked += 1, then
// running = lerp(running, batch, factor) with factor = momentum, or 1/num_batches_tracked when momentum < 0
// (PyTorch's momentum=None); running_var takes the unbiased variance var * n / (n - 1). `mean`/`var` are
// either the block's per-channel statistics [C] (layer i takes the prefix its running_mean is long) or the
// per-layer bottleneck statistics [L, B] (layer i takes row rows[i]). One call, no host synchronization:
// on CPU one loop over the layers' memory, on CUDA one kernel (cuda_block_ops.cpp) reading
// num_batches_tracked on the device.
void check_running_stats_args(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                              const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                              at::ArrayRef<double> momentum) {
  const size_t L = running_mean.size();
  TORCH_CHECK(running_var.size() == L && nbt.size() == L && rows.size() == L && momentum.size() == L,
              "effdense::update_running_stats: expected running_var, num_batches_tracked, rows and momentum of "
              "length ", L, " (that of running_mean), got ", running_var.size(), ", ", nbt.size(), ", ",
              rows.size(), ", ", momentum.size());
  TORCH_CHECK(mean.dim() == 1 || mean.dim() == 2, "effdense::update_running_stats: expected mean of shape [C] "
              "or [L, B], got ", shape_str(mean));
  TORCH_CHECK(var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type() && is_float_type(mean.scalar_type()),
              "effdense::update_running_stats: expected var of shape ", shape_str(mean), " with dtype ",
              mean.scalar_type(), " (that of mean, a floating dtype), got ", shape_str(var), " with dtype ",
              var.scalar_type());
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor &rm = running_mean[i], &rv = running_var[i];
    const int64_t c = rm.numel();
    TORCH_CHECK(rm.dim() == 1 && rv.dim() == 1 && rv.numel() == c && is_float_type(rm.scalar_type()) &&
                    rv.scalar_type() == rm.scalar_type() && rm.device() == mean.device() &&
                    rv.device() == mean.device(),
                "effdense::update_running_stats: expected running_mean[", i, "] and running_var[", i, "] 1-D of ",
                "equal length and floating dtype on ", mean.device(), ", got ", shape_str(rm), " ",
                rm.scalar_type(), " and ", shape_str(rv), " ", rv.scalar_type());
    TORCH_CHECK(nbt[i].numel() == 1 && nbt[i].scalar_type() == at::kLong && nbt[i].device() == mean.device(),
                "effdense::update_running_stats: expected num_batches_tracked[", i, "] a one-element int64 tensor "
                "on ", mean.device());
    if (mean.dim() == 1) {
      TORCH_CHECK(c <= mean.size(0), "effdense::update_running_stats: running_mean[", i, "] has ", c,
                  " channels, more than the ", mean.size(0), " of mean");
    } else {
      TORCH_CHECK(rows[i] >= 0 && rows[i] < mean.size(0) && mean.size(1) == c, "effdense::update_running_stats:"
                  " expected row ", rows[i], " of mean ", shape_str(mean), " to hold ", c, " channels");
    }
  }
}

namespace {

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

}  // namespace

void update_running_stats_cpu(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                              const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                              at::ArrayRef<double> momentum, int64_t count) {
  check_running_stats_args(running_mean, running_var, nbt, mean, var, rows, momentum);
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
      const M* v = var.const_data_ptr<M>() + (mean.dim() == 1 ? 0 : rows[i] * var.stride(0));
      TORCH_CHECK(var.stride(var.dim() - 1) == sm, "effdense::update_running_stats: expected var with the strides "
                  "of mean");
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean[i].scalar_type(),
                                      "effdense_running_stats_r", [&] {
        running_update_cpu<scalar_t, M>(running_mean[i], running_var[i], m, v, sm, factor, count);
      });
    });
  }
}

// ------------------------------------------------------------------------------ dispatcher entry points

std::tuple<at::Tensor, at::Tensor> call_channel_stats(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effdense::channel_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

void call_bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effdense::bn_relu_into", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(x, scale, shift, out);
}

at::Tensor call_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effdense::bn_relu_conv1x1", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, scale, shift, w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_relu_backward(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effdense::bn_relu_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(x, gy, scale, shift, mean, invstd, batch_stats);
}

std::tuple<at::Tensor, at::Tensor> call_bn_relu_backward_into(
    const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats, const at::Tensor& gx, bool accumulate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("effdense::bn_relu_backward_into", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool, const at::Tensor&, bool)>();
  return op.call(x, gy, scale, shift, mean, invstd, batch_stats, gx, accumulate);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using T_ = const at::Tensor&;
using O_ = const OptTensor&;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_scale_shift(T_ gamma, T_ beta, T_ mean, T_ var, double eps,
                                                                   at::ScalarType dtype) {
  static auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T_, T_, T_, T_, double, at::ScalarType)>(
      "effdense::bn_scale_shift");
  return op.call(gamma, beta, mean, var, eps, dtype);
}

void call_batch_norm_relu_into(T_ x, T_ gamma, T_ beta, T_ mean, T_ var, double eps, T_ out) {
  static auto op = handle<void(T_, T_, T_, T_, T_, double, T_)>("effdense::batch_norm_relu_into");
  op.call(x, gamma, beta, mean, var, eps, out);
}

void call_bn_relu_linear_into(T_ x, T_ gamma, T_ beta, T_ mean, T_ var, double eps, T_ w, T_ out, O_ out_mean,
                              O_ out_var) {
  static auto op = handle<void(T_, T_, T_, T_, T_, double, T_, T_, O_, O_)>("effdense::bn_relu_linear_into");
  op.call(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var);
}

void call_bn_relu_conv3x3_into(T_ x, T_ gamma, T_ beta, T_ mean, T_ var, double eps, T_ w, T_ out, O_ out_mean,
                               O_ out_var) {
  static auto op = handle<void(T_, T_, T_, T_, T_, double, T_, T_, O_, O_)>("effdense::bn_relu_conv3x3_into");
  op.call(x, gamma, beta, mean, var, eps, w, out, out_mean, out_var);
}

at::Tensor call_bn_relu_conv3x3_backward(T_ x, T_ gy, T_ gamma, T_ beta, T_ mean, T_ var, double eps, T_ w, T_ ga) {
  static auto op = handle<at::Tensor(T_, T_, T_, T_, T_, T_, double, T_, T_)>("effdense::bn_relu_conv3x3_backward");
  return op.call(x, gy, gamma, beta, mean, var, eps, w, ga);
}

std::tuple<at::Tensor, at::Tensor> call_batch_norm_relu_backward_into(T_ x, T_ gy, T_ gamma, T_ beta, T_ mean,
                                                                      T_ var, double eps, bool batch_stats, T_ gx,
                                                                      bool accumulate, O_ coef) {
  static auto op = handle<std::tuple<at::Tensor, at::Tensor>(T_, T_, T_, T_, T_, T_, double, bool, T_, bool, O_)>(
      "effdense::batch_norm_relu_backward_into");
  return op.call(x, gy, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_relu_linear_backward(T_ x, T_ gz, T_ w, T_ gamma, T_ beta,
                                                                            T_ mean, T_ var, double eps,
                                                                            bool batch_stats, T_ gx, bool accumulate,
                                                                            O_ coef) {
  static auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T_, T_, T_, T_, T_, T_, T_, double, bool,
                                                                          T_, bool, O_)>(
      "effdense::bn_relu_linear_backward");
  return op.call(x, gz, w, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bottleneck_backward(
    T_ x, T_ z, T_ ga, T_ w, T_ g1, T_ b1, T_ m1, T_ v1, double eps1, bool bs1, T_ g2, T_ b2, T_ m2, T_ v2, double eps2,
    bool bs2, T_ gx, O_ coef) {
  using R = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op = handle<R(T_, T_, T_, T_, T_, T_, T_, T_, double, bool, T_, T_, T_, T_, double, bool, T_, O_)>(
      "effdense::bottleneck_backward");
  return op.call(x, z, ga, w, g1, b1, m1, v1, eps1, bs1, g2, b2, m2, v2, eps2, bs2, gx, coef);
}

void call_store_channels(T_ y, O_ noise, double p, T_ out, O_ mask, O_ out_mean, O_ out_var) {
  static auto op = handle<void(T_, O_, double, T_, O_, O_, O_)>("effdense::store_channels");
  op.call(y, noise, p, out, mask, out_mean, out_var);
}

void call_gather_grad(T_ g, O_ mask, double p, T_ out, O_ x, O_ coef, O_ mean) {
  static auto op = handle<void(T_, O_, double, T_, O_, O_, O_)>("effdense::gather_grad");
  op.call(g, mask, p, out, x, coef, mean);
}

}  // namespace effdense

// ------------------------------------------------------------------------------------------ registration

TORCH_LIBRARY(effdense, m) {
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("bn_relu_into(Tensor x, Tensor scale, Tensor shift, Tensor(a!) out) -> ()");
  m.def("bn_relu_backward(Tensor x, Tensor grad_y, Tensor scale, Tensor shift, Tensor mean, Tensor invstd, "
        "bool batch_stats) -> (Tensor grad_x, Tensor grad_gamma, Tensor grad_beta)");
  m.def("bn_relu_backward_into(Tensor x, Tensor grad_y, Tensor scale, Tensor shift, Tensor mean, "
        "Tensor invstd, bool batch_stats, Tensor(a!) grad_x, bool accumulate) -> (Tensor grad_gamma, "
        "Tensor grad_beta)");
  m.def("bn_relu_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight) -> Tensor");
  // the block driver's ops: a BN given as (gamma, beta, mean, var, eps), scale/shift derived inside
  m.def("bn_scale_shift(Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, ScalarType dtype) -> "
        "(Tensor scale, Tensor shift, Tensor invstd)");
  m.def("batch_norm_relu_into(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, "
        "Tensor(a!) out) -> ()");
  m.def("bn_relu_linear_into(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, "
        "Tensor weight, Tensor(a!) out, Tensor(b!)? out_mean, Tensor(c!)? out_var) -> ()");
  m.def("bn_relu_conv3x3_into(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, "
        "Tensor weight, Tensor(a!) out, Tensor(b!)? out_mean=None, Tensor(c!)? out_var=None) -> ()");
  m.def("bn_relu_conv3x3_backward(Tensor x, Tensor grad_y, Tensor gamma, Tensor beta, Tensor mean, Tensor var, "
        "float eps, Tensor weight, Tensor(a!) grad_a) -> Tensor grad_weight");
  m.def("batch_norm_relu_backward_into(Tensor x, Tensor grad_y, Tensor gamma, Tensor beta, Tensor mean, "
        "Tensor var, float eps, bool batch_stats, Tensor(a!) grad_x, bool accumulate, Tensor(b!)? grad_coef=None) "
        "-> (Tensor grad_gamma, Tensor grad_beta)");
  m.def("bn_relu_linear_backward(Tensor x, Tensor grad_z, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, "
        "Tensor var, float eps, bool batch_stats, Tensor(a!) grad_x, bool accumulate, Tensor(b!)? grad_coef=None) "
        "-> (Tensor grad_weight, Tensor grad_gamma, Tensor grad_beta)");
  m.def("bottleneck_backward(Tensor x, Tensor z, Tensor grad_a, Tensor weight, Tensor gamma1, Tensor beta1, "
        "Tensor mean1, Tensor var1, float eps1, bool batch_stats1, Tensor gamma2, Tensor beta2, Tensor mean2, "
        "Tensor var2, float eps2, bool batch_stats2, Tensor(a!) grad_x, Tensor(b!)? grad_coef=None) -> "
        "(Tensor grad_weight, Tensor grad_gamma1, Tensor grad_beta1, Tensor grad_gamma2, Tensor grad_beta2)");
  m.def("store_channels(Tensor y, Tensor? noise, float p, Tensor(a!) out, Tensor(b!)? mask, "
        "Tensor(c!)? out_mean, Tensor(d!)? out_var) -> ()");
  m.def("gather_grad(Tensor grad, Tensor? mask, float p, Tensor(a!) out, Tensor? x=None, Tensor? coef=None, "
        "Tensor? mean=None) -> ()");
  m.def("transition_forward(Tensor x, Tensor gamma, Tensor beta, Tensor? running_mean, Tensor? running_var, "
        "float eps, Tensor weight) -> (Tensor y, Tensor mean, Tensor var)");
  m.def("transition_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, "
        "float eps, bool batch_stats, Tensor weight) -> (Tensor grad_x, Tensor grad_gamma, Tensor grad_beta, "
        "Tensor grad_weight)");
  m.def("update_running_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, "
        "Tensor(c!)[] num_batches_tracked, Tensor mean, Tensor var, int[] rows, float[] momentum, int count) -> ()");
  m.def("dense_block_forward(Tensor x, Tensor[] w1, Tensor[] w2, Tensor[] gamma1, Tensor[] beta1, "
        "Tensor[] gamma2, Tensor[] beta2, Tensor?[] running_mean1, Tensor?[] running_var1, "
        "Tensor?[] running_mean2, Tensor?[] running_var2, float[] eps1, float[] eps2, float[] drop_rate, "
        "bool keep_bottleneck, bool reserve_backward) -> (Tensor feat, Tensor mean, Tensor var, "
        "Tensor mean2, Tensor var2, Tensor drop_mask, Tensor bottleneck)");
  m.def("dense_block_backward(Tensor grad_out, Tensor feat, Tensor mean, Tensor var, Tensor mean2, "
        "Tensor var2, Tensor drop_mask, Tensor bottleneck, Tensor[] w1, Tensor[] w2, Tensor[] gamma1, "
        "Tensor[] beta1, Tensor[] gamma2, Tensor[] beta2, Tensor?[] running_mean1, Tensor?[] running_var1, "
        "Tensor?[] running_mean2, Tensor?[] running_var2, float[] eps1, float[] eps2, float[] drop_rate) "
        "-> (Tensor grad_x, Tensor[] grad_w1, Tensor[] grad_w2, Tensor[] grad_gamma1, Tensor[] grad_beta1, "
        "Tensor[] grad_gamma2, Tensor[] grad_beta2)");
}

TORCH_LIBRARY_IMPL(effdense, CPU, m) {
  m.impl("channel_stats", &effdense::channel_stats_cpu);
  m.impl("bn_relu", &effdense::bn_relu);
  m.impl("bn_relu_into", &effdense::bn_relu_into_cpu);
  m.impl("bn_relu_backward", &effdense::bn_relu_backward);
  m.impl("bn_relu_backward_into", &effdense::bn_relu_backward_into_cpu);
  m.impl("bn_relu_conv1x1", &effdense::bn_relu_conv1x1_composite);
  m.impl("update_running_stats", &effdense::update_running_stats_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(effdense, CUDA, m) {  // device generic; the CUDA kernels are in cuda_ops.cpp
  m.impl("bn_relu", &effdense::bn_relu);
  m.impl("bn_relu_backward", &effdense::bn_relu_backward);
}
#endif

// `import effdense._C` loads this library, whose static initializers register the ops above. No pybind11:
// a bare module keeps the build fast. Its functions report and release the CPU block driver's workspace and say
// which 3x3 convolutions it runs.
namespace {
PyObject* py_workspace_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(effdense::workspace_bytes()); }
PyObject* py_release_workspace(PyObject*, PyObject*) {
  effdense::release_workspace();
  Py_RETURN_NONE;
}
PyObject* py_cpu_conv3x3(PyObject*, PyObject*) { return PyBool_FromLong(effdense::cpu_conv3x3_enabled()); }
PyMethodDef methods[] = {
    {"workspace_bytes", py_workspace_bytes, METH_NOARGS,
     "Bytes of CPU scratch memory the cpp backend's block driver holds for reuse across layers and steps."},
    {"release_workspace", py_release_workspace, METH_NOARGS,
     "Free that scratch memory (the next block call allocates it again)."},
    {"cpu_conv3x3", py_cpu_conv3x3, METH_NOARGS,
     "Whether the CPU block driver runs bottleneck 3x3 convolutions on effdense's own kernels (AVX2 build, "
     "EFFDENSE_CPU_CONV unset) rather than on ATen's."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "effdense's C++/CUDA operators (torch.ops.effdense)",
                                   -1, methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
