// CPU kernels of the bottleneck layers' 3x3 convolution (stride 1, zero padding 1), with BN2-ReLU fused into
// their input: y = conv3x3(a, w), a = relu(bn(x)), w [k, C, 3, 3], and its backward, grad_a and grad_w.
// The steps bn_relu_conv3x3_into / bn_relu_conv3x3_backward of ops.h (arguments checked by steps.cpp); the block
// driver (block.cpp) calls them on CPU instead of batch_norm_relu_into + the ATen (oneDNN) convolution, so
// a = BN2-ReLU(z) is never written to memory.
//
// Each of the 9 taps t = (dy, dx) is a GEMM over channels. With tap weights Wt[c, o] = w[o, c, dy, dx]:
//   forward   y[h, w] = sum_t a[h + dy - 1, w + dx - 1] Wt                   (terms outside the image are 0)
//             = sum_t T_t[h + dy - 1, w + dx - 1],  T = a @ [W_0 | ... | W_8]   ([pixels, C] @ [C, 9k])
//             one GEMM with 9k columns per tile of image rows (108 for k = 12: wide register tiles, where a
//             k-column GEMM per tap would be 12 columns wide), then each tap's k columns of T added into the
//             output pixel they shift to;
//   backward  grad_a[p] = sum_t grad_y[p - (dy - 1, dx - 1)] Wt^T = G @ [W_0 | ... | W_8]^T, where
//             G[p, t*k:(t+1)*k] = grad_y[h - dy + 1, w - dx + 1] (0 outside the image: im2col of grad_y), and
//             grad_w[:, :, dy, dx]^T = sum_p a[p]^T G[p, t*k:(t+1)*k], i.e. grad_Wcat [C, 9k] = a^T @ G;
//             both GEMMs share G's tile.
// Tiles are image rows (about 64 KiB of T or G each), images are split in contiguous groups over the threads
// (one image is one thread's, so the shifted adds need no synchronization), and grad_w's per-thread partial
// sums are merged in group order: results do not depend on scheduling (for a given thread count). GEMMs are
// gemm.h's kernel (the BLAS without AVX2, or with EFFDENSE_CPU_GEMM=blas).
//
// Why not oneDNN: a DenseNet-BC's 3x3 (C = 4k input channels, only k output channels) is a skinny convolution;
// as one GEMM onto 9k columns it runs at the register-tile kernel's rate, and fusing BN2-ReLU saves a write and
// a read of a per layer and direction. The kernels suite times both (``conv3x3`` rows: unfused-torch against
// cpp-fused), and the speed suite's step times compare them with EFFDENSE_CPU_CONV=onednn.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../ops.h"
#include "kernels.h"
#include "tiles.h"

namespace effdense {

bool cpu_conv3x3_enabled() {
  static const bool v = [] {
    const char* e = std::getenv("EFFDENSE_CPU_CONV");
    return EFFDENSE_AVX2_GEMM && !(e != nullptr && std::string(e) == "onednn");
  }();
  return v;
}

namespace cpu {
namespace {

constexpr int64_t kTaps = 9;

// The tap weights as one GEMM operand: [C, 9k] with (c, t*k + o) = w[o, c, t] (transposed: [9k, C]).
template <typename A>
std::vector<A> tap_weights(const at::Tensor& w, bool transposed) {
  const int64_t k = w.size(0), C = w.size(1), K9 = kTaps * k;
  std::vector<A> out(static_cast<size_t>(C * K9));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "effdense_tap_weights", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    const int64_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2), s3 = w.stride(3);
    for (int64_t o = 0; o < k; ++o)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < kTaps; ++t) {
          const A v = static_cast<A>(p[o * s0 + c * s1 + (t / 3) * s2 + (t % 3) * s3]);
          out[transposed ? (t * k + o) * C + c : c * K9 + t * k + o] = v;
        }
  });
  return out;
}

// Image rows per tile: about 16K elements of T / G ([rows * W, 9k]), at least one row.
inline int64_t conv_rows(int64_t H, int64_t W, int64_t k) {
  return std::clamp<int64_t>(16384 / std::max<int64_t>(W * kTaps * k, 1), 1, std::max<int64_t>(H, 1));
}

// y[h - dy + 1, w - dx + 1, :] += T[(h, w), t*k : (t+1)*k] for the r image rows h0.. of T, every tap t whose
// shifted pixel is inside the image (y: one image, [H * W, k]). K: k at compile time, or 0.
template <typename A, int64_t K>
void add_taps_k(const A* T, A* y, int64_t h0, int64_t r, int64_t H, int64_t W, int64_t k_) {
  const int64_t k = K > 0 ? K : k_, K9 = kTaps * k;
  for (int64_t hh = 0; hh < r; ++hh)
    for (int64_t dy = 0; dy < 3; ++dy) {
      const int64_t oh = h0 + hh - dy + 1;
      if (oh < 0 || oh >= H) continue;
      for (int64_t dx = 0; dx < 3; ++dx) {
        const int64_t w0 = std::max<int64_t>(0, dx - 1), w1 = std::min<int64_t>(W, W + dx - 1);
        const A* __restrict__ s = T + (hh * W + w0) * K9 + (dy * 3 + dx) * k;
        A* __restrict__ d = y + (oh * W + w0 - dx + 1) * k;
        for (int64_t q = 0; q < w1 - w0; ++q)
          for (int64_t o = 0; o < k; ++o) d[q * k + o] += s[q * K9 + o];
      }
    }
}

template <typename A>
void add_taps(const A* T, A* y, int64_t h0, int64_t r, int64_t H, int64_t W, int64_t k) {
  with_width(k, [&](auto K) { add_taps_k<A, decltype(K)::value>(T, y, h0, r, H, W, k); });
}

// G[(h, w), t*k : (t+1)*k] = g[h - dy + 1, w - dx + 1, :] (0 outside the image) for the r image rows h0..
// (g: one image, [H * W, k]). K: k at compile time, or 0.
template <typename A, int64_t K>
void im2col_k(const A* g, A* G, int64_t h0, int64_t r, int64_t H, int64_t W, int64_t k_) {
  const int64_t k = K > 0 ? K : k_, K9 = kTaps * k;
  for (int64_t hh = 0; hh < r; ++hh)
    for (int64_t w = 0; w < W; ++w) {
      A* __restrict__ d = G + (hh * W + w) * K9;
      for (int64_t t = 0; t < kTaps; ++t) {
        const int64_t sh = h0 + hh - t / 3 + 1, sw = w - t % 3 + 1;
        A* __restrict__ dt = d + t * k;
        if (sh < 0 || sh >= H || sw < 0 || sw >= W) {
          for (int64_t o = 0; o < k; ++o) dt[o] = A(0);
        } else {
          const A* __restrict__ src = g + (sh * W + sw) * k;
          for (int64_t o = 0; o < k; ++o) dt[o] = src[o];
        }
      }
    }
}

template <typename A>
void im2col(const A* g, A* G, int64_t h0, int64_t r, int64_t H, int64_t W, int64_t k) {
  with_width(k, [&](auto K) { im2col_k<A, decltype(K)::value>(g, G, h0, r, H, W, k); });
}

// The weight-gradient GEMM (grad_Wcat += a^T G over a tile of image rows) multiplies every a[p] with G's entries of
// all 9 taps, those whose grad_y pixel is outside the image being 0: exact for a finite a[p], but a non-finite one
// (an Inf or NaN that reached a) would add Inf * 0 = NaN where the convolution has no term at all (the pairs of p
// with padding). If the tile holds one (a sum of a * 0 is 0 only for finite values: one vectorized pass, against the
// GEMM's 18k multiply-adds per value), those entries are taken out of the GEMM (zeroed in the tile) and added here
// over the taps inside the image: the NaN and Inf of PyTorch's, no others.
template <typename A>
void wgrad_nonfinite(A* u, const A* G, A* dw, int64_t h0, int64_t r, int64_t H, int64_t W, int64_t C, int64_t k) {
  const int64_t n = r * W * C, K9 = kTaps * k;
  A z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += u[i] * A(0);
  if (z == A(0)) return;
  for (int64_t q = 0; q < r * W; ++q)
    for (int64_t c = 0; c < C; ++c) {
      const A v = u[q * C + c];
      if (v - v == A(0)) continue;  // finite
      u[q * C + c] = A(0);
      for (int64_t t = 0; t < kTaps; ++t) {
        const int64_t sh = h0 + q / W - t / 3 + 1, sw = q % W - t % 3 + 1;  // tap t's grad_y pixel
        if (sh < 0 || sh >= H || sw < 0 || sw >= W) continue;
        for (int64_t o = 0; o < k; ++o) dw[c * K9 + t * k + o] += v * G[q * K9 + t * k + o];
      }
    }
}

// With out_mean/out_var, also the per-channel batch statistics of out (each image one TileMoments tile).
template <typename T>
void bn_relu_conv3x3_impl(const at::Tensor& x, const BN<acc_t<T>>& bn, const at::Tensor& w, const at::Tensor& out,
                          const OptTensor& out_mean, const OptTensor& out_var) {
  using A = acc_t<T>;
  const View vx(x), vo(out);
  const int64_t C = vx.C, H = vx.H, W = vx.W, HW = H * W, k = w.size(0), K9 = kTaps * k, R = conv_rows(H, W, k);
  const std::vector<A> wf = tap_weights<A>(w, false);
  TileMoments mom(k, HW, vx.N * HW, out_mean.has_value());
  const T* px = x.const_data_ptr<T>();
  T* po = out.data_ptr<T>();
  const A *s = bn.scale.data(), *t = bn.shift.data();
  auto f = [&](A v, int64_t ch) { return round_to<T>(relu(v * s[ch] + t[ch])); };
  parallel_tiles(vx.N, 1, [&](int64_t, int64_t n0, int64_t n1) {
    A* u = scratch<A>(R * W * (C + K9) + HW * k);  // a's tile [R * W, C], T's [R * W, 9k], one image of y
    A* tt = u + R * W * C;
    A* y = tt + R * W * K9;
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(y, y + HW * k, A(0));
      for (int64_t h0 = 0; h0 < H; h0 += R) {
        const int64_t r = std::min(R, H - h0), p0 = n * HW + h0 * W;
        gather(vx, px, p0, p0 + r * W, u, C, f);
        gemm<A>(false, false, r * W, K9, C, u, C, wf.data(), K9, A(0), tt, K9);
        add_taps(tt, y, h0, r, H, W, k);
      }
      if constexpr (!std::is_same_v<T, A>)
        for (int64_t i = 0; i < HW * k; ++i) y[i] = round_to<T>(y[i]);  // the statistics of the stored values
      if (out_mean) mom.add(n, y, HW, k);
      scatter<false>(vo, po, n * HW, (n + 1) * HW, y, k);
    }
  });
  if (out_mean) mom.finish<A>(*out_mean, *out_var);
}

template <typename T>
at::Tensor bn_relu_conv3x3_backward_impl(const at::Tensor& x, const at::Tensor& gy, const BN<acc_t<T>>& bn,
                                         const at::Tensor& w, const at::Tensor& ga) {
  using A = acc_t<T>;
  const View vx(x), vg(gy), va(ga);
  const int64_t C = vx.C, H = vx.H, W = vx.W, HW = H * W, k = w.size(0), K9 = kTaps * k, R = conv_rows(H, W, k);
  const std::vector<A> wd = tap_weights<A>(w, true);
  int64_t lda = 0;
  const bool direct = std::is_same_v<T, A> && pixel_rows(va, lda);  // the dgrad GEMM writes grad_a's rows
  const T* px = x.const_data_ptr<T>();
  const T* pg = gy.const_data_ptr<T>();
  T* pa = ga.data_ptr<T>();
  const A *s = bn.scale.data(), *t = bn.shift.data();
  auto f = [&](A v, int64_t ch) { return round_to<T>(relu(v * s[ch] + t[ch])); };
  const int64_t groups = num_groups(vx.N, 1), nw = C * K9;
  std::vector<A> part(static_cast<size_t>(groups * nw), A(0));  // grad_Wcat [C, 9k] per thread
  parallel_tiles(vx.N, 1, [&](int64_t grp, int64_t n0, int64_t n1) {
    A* u = scratch<A>(R * W * (2 * C + K9) + HW * k);  // a's tile, grad_a's, G's, one image of grad_y
    A* gat = u + R * W * C;
    A* G = gat + R * W * C;
    A* g = G + R * W * K9;
    A* dw = part.data() + grp * nw;
    for (int64_t n = n0; n < n1; ++n) {
      gather(vg, pg, n * HW, (n + 1) * HW, g, k);
      for (int64_t h0 = 0; h0 < H; h0 += R) {
        const int64_t r = std::min(R, H - h0), p0 = n * HW + h0 * W;
        im2col(g, G, h0, r, H, W, k);
        A* dst = direct ? reinterpret_cast<A*>(pa) + p0 * lda : gat;
        gemm<A>(false, false, r * W, C, K9, G, K9, wd.data(), C, A(0), dst, direct ? lda : C);
        if (!direct) scatter<false>(va, pa, p0, p0 + r * W, gat, C);
        gather(vx, px, p0, p0 + r * W, u, C, f);
        wgrad_nonfinite(u, G, dw, h0, r, H, W, C, k);
        gemm<A>(true, false, C, K9, r * W, u, C, G, K9, A(1), dw, K9);
      }
    }
  });
  for (int64_t g = 1; g < groups; ++g)
    for (int64_t i = 0; i < nw; ++i) part[i] += part[g * nw + i];
  at::Tensor gw = at::empty_like(w);
  T* pw = gw.data_ptr<T>();
  const int64_t s0 = gw.stride(0), s1 = gw.stride(1), s2 = gw.stride(2), s3 = gw.stride(3);
  for (int64_t o = 0; o < k; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t tap = 0; tap < kTaps; ++tap)
        pw[o * s0 + c * s1 + (tap / 3) * s2 + (tap % 3) * s3] = static_cast<T>(part[c * K9 + tap * k + o]);
  return gw;
}

}  // namespace

void bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                          const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& w,
                          const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_conv3x3", [&] {
    bn_relu_conv3x3_impl<scalar_t>(x, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps), w, out, out_mean,
                                   out_var);
  });
}

at::Tensor bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    double eps, const at::Tensor& w, const at::Tensor& ga) {
  at::Tensor gw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effdense_bn_relu_conv3x3_bwd", [&] {
    gw = bn_relu_conv3x3_backward_impl<scalar_t>(x, gy, bn_params<acc_t<scalar_t>>(gamma, beta, mean, var, eps), w,
                                                 ga);
  });
  return gw;
}

}  // namespace cpu
}  // namespace effdense
