// CPU tile machinery shared by the CPU kernels (bn.cpp, linear.cpp, conv3x3.cpp, transition.cpp): strided
// [N, C, H, W] views gathered into / scattered from row-major [pixels, channels] tiles, per-thread tile groups,
// GEMMs on tiles (gemm.h's kernels, or the BLAS PyTorch's CPU library exports), BN parameters, statistics and the
// BN-ReLU backward pieces (the arithmetic itself is ../bn_math.h's). linear.cpp says why tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../bn_math.h"
#include "../common.h"
#include "../sync.h"
#include "gemm.h"

extern "C" {
// The BLAS GEMMs PyTorch's CPU library exports (MKL in the x86 wheels). Weak: a PyTorch without them falls back
// to at::addmm (gemm() below). MKL_Set_Num_Threads_Local keeps each tile's GEMM on its own thread.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C entry (the lowercase one is Fortran)
}

namespace effdense {
namespace cpu {

// ------------------------------------------------------------------------------------------------- GEMM

// Where the tile GEMMs go: EFFDENSE_CPU_GEMM=blas sends every one to the BLAS, =avx2 keeps an AVX-512 build on
// the AVX2 kernel (to compare, or to rule a kernel out); by default the widest kernel the build has.
enum class GemmRoute { kWidest, kAvx2, kBlas };

inline GemmRoute gemm_route() {
  static const GemmRoute v = [] {
    const char* e = std::getenv("EFFDENSE_CPU_GEMM");
    const std::string s = e != nullptr ? e : "";
    return s == "blas" ? GemmRoute::kBlas : s == "avx2" ? GemmRoute::kAvx2 : GemmRoute::kWidest;
  }();
  return v;
}

// Row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta * C, op(A) = A stored [m, k] (ld lda) or, with ta, A^T
// of A stored [k, m]. Untransposed B with beta 0 or 1 (every tile product of the channels-last paths) goes to
// gemm.h's kernels where the build has AVX2/FMA (AVX-512: the wider one); the rest to the BLAS, which is
// column-major, where a row-major matrix is its transpose: C^T = op(B)^T op(A)^T.
template <typename A>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const A* a, int64_t lda, const A* b, int64_t ldb,
          A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if EFFDENSE_AVX2_GEMM
  const GemmRoute route = gemm_route();
  if (!tb && (beta == A(0) || beta == A(1)) && route != GemmRoute::kBlas) {
    const bool wide = route == GemmRoute::kWidest;
    return ta ? gemm_simd<A>(wide, m, n, k, a, 1, lda, b, ldb, beta == A(1), c, ldc)
              : gemm_simd<A>(wide, m, n, k, a, lda, 1, b, ldb, beta == A(1), c, ldc);
  }
#endif
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1)),
            lc = static_cast<int>(ldc);
  const A one = 1;
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr) return sgemm_(&opb, &opa, &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&opb, &opa, &M, &N, &K, &one, b, &la, a, &lb, &beta, c, &lc);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto mat = [&](const A* p, int64_t r, int64_t cols, int64_t ld, bool t) {
    at::Tensor s = at::from_blob(const_cast<A*>(p), {t ? cols : r, t ? r : cols}, {ld, 1}, opts);
    return t ? s.t() : s;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(out, out, mat(a, m, k, lda, ta), mat(b, k, n, ldb, tb), beta, 1);
}

// ------------------------------------------------------------------------------------------ tiled views

// A 4-D strided tensor; pixel p = (n, h, w) in row-major order.
struct View {
  int64_t N, C, H, W, sN, sC, sH, sW;
  explicit View(const at::Tensor& t)
      : N(t.size(0)), C(t.size(1)), H(t.size(2)), W(t.size(3)),
        sN(t.stride(0)), sC(t.stride(1)), sH(t.stride(2)), sW(t.stride(3)) {}
  int64_t hw() const { return H * W; }
  int64_t pixels() const { return N * H * W; }
  bool rows() const { return sC == 1 || C == 1; }                               // a pixel's channels contiguous
  bool planes() const { return (W == 1 || sW == 1) && (H == 1 || sH == W); }  // an (n, c) plane contiguous
};

// f(r, offset) for pixels p0 + r, r < p1 - p0.
template <typename F>
inline void for_pixels(const View& v, int64_t p0, int64_t p1, F&& f) {
  const int64_t hw = v.hw();
  int64_t n = p0 / hw, rem = p0 - n * hw, h = rem / v.W, w = rem - h * v.W;
  for (int64_t r = 0; r < p1 - p0; ++r) {
    f(r, n * v.sN + h * v.sH + w * v.sW);
    if (++w == v.W) {
      w = 0;
      if (++h == v.H) h = 0, ++n;
    }
  }
}

// f(offset of channel 0's plane at the segment's first pixel, length, first row) per image of [p0, p1);
// for planes() views, where pixel q of a plane is at offset q.
template <typename F>
inline void for_segments(const View& v, int64_t p0, int64_t p1, F&& f) {
  const int64_t hw = v.hw();
  for (int64_t p = p0; p < p1;) {
    const int64_t n = p / hw, q = p - n * hw, len = std::min(p1 - p, hw - q);
    f(n * v.sN + q, len, p - p0);
    p += len;
  }
}

// Whether pixel p of v starts at offset p * ld with its channels contiguous (a dense channels-last tensor or a
// channel prefix of one): then a GEMM can write its rows in place.
inline bool pixel_rows(const View& v, int64_t& ld) {
  ld = v.W > 1 ? v.sW : v.H > 1 ? v.sH / std::max<int64_t>(v.W, 1) : v.N > 1 ? v.sN / std::max<int64_t>(v.hw(), 1) : v.C;
  return v.rows() && ld >= v.C && (v.W == 1 || v.sW == ld) && (v.H == 1 || v.sH == v.W * ld) &&
         (v.N == 1 || v.sN == v.hw() * ld);
}

constexpr int64_t kBlock = 8;  // channels per sweep of a plane gather/scatter (8 input streams, 8-wide stores)
constexpr int64_t kAhead = 16;  // rows a strided row gather/scatter prefetches ahead

// Prefetch every cache line of p[0, n) (W: for writing).
template <bool W = false, typename T>
inline void prefetch_span(const T* p, int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = 0; j < n; j += line) __builtin_prefetch(p + j, W ? 1 : 0);
  __builtin_prefetch(p + n - 1, W ? 1 : 0);
}

// dst[r * ld + ch] = f(A(x[pixel p0 + r, channel ch]), ch) for r < p1 - p0, ch < C.
template <typename A, typename T, typename F>
void gather(const View& v, const T* x, int64_t p0, int64_t p1, A* dst, int64_t ld, F&& f) {
  const int64_t C = v.C;
  int64_t lx = 0;
  if (pixel_rows(v, lx)) {  // rows at a constant stride (a channels-last buffer or prefix): prefetch every line
    // of a row ahead, as the hardware prefetchers lose the stream at each jump to the next row when only part of
    // a row is read (prefetching only a row's first and last lines left BN-ReLU-Linear on a 120-channel prefix
    // of a 216-channel buffer at about 1.5x its time with every line)
    for (int64_t r = 0; r < p1 - p0; ++r) {
      const T* __restrict__ s = x + (p0 + r) * lx;
      prefetch_span(s + kAhead * lx, C);
      A* __restrict__ d = dst + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) d[ch] = f(static_cast<A>(s[ch]), ch);
    }
  } else if (v.rows()) {
    for_pixels(v, p0, p1, [&](int64_t r, int64_t o) {
      const T* __restrict__ s = x + o;
      A* __restrict__ d = dst + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) d[ch] = f(static_cast<A>(s[ch]), ch);
    });
  } else if (v.planes()) {
    for_segments(v, p0, p1, [&](int64_t o, int64_t len, int64_t r0) {
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, C - c0);
        for (int64_t j = 0; j < len; ++j) {
          A* d = dst + (r0 + j) * ld + c0;
          const T* s = x + o + c0 * v.sC + j;
          for (int64_t b = 0; b < nb; ++b) d[b] = f(static_cast<A>(s[b * v.sC]), c0 + b);
        }
      }
    });
  } else {
    for_pixels(v, p0, p1, [&](int64_t r, int64_t o) {
      const T* s = x + o;
      A* d = dst + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) d[ch] = f(static_cast<A>(s[ch * v.sC]), ch);
    });
  }
}

template <typename A, typename T>
void gather(const View& v, const T* x, int64_t p0, int64_t p1, A* dst, int64_t ld) {
  gather(v, x, p0, p1, dst, ld, [](A a, int64_t) { return a; });
}

template <typename T, typename A>
inline T put(A v) {
  if constexpr (std::is_same_v<T, bool>) return v != A(0);
  else return static_cast<T>(v);
}

// y[pixel p0 + r, ch] = src[r * ld + ch] (ACC: +=) for r < p1 - p0, ch < C.
template <bool ACC, typename T, typename A>
void scatter(const View& v, T* y, int64_t p0, int64_t p1, const A* src, int64_t ld) {
  const int64_t C = v.C;
  auto st = [](T& d, A a) {
    if constexpr (ACC) d = put<T>(static_cast<A>(d) + a);
    else d = put<T>(a);
  };
  int64_t ly = 0;
  if (pixel_rows(v, ly)) {
    for (int64_t r = 0; r < p1 - p0; ++r) {
      T* __restrict__ d = y + (p0 + r) * ly;
      prefetch_span<true>(d + kAhead * ly, C);
      const A* __restrict__ s = src + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) st(d[ch], s[ch]);
    }
  } else if (v.rows()) {
    for_pixels(v, p0, p1, [&](int64_t r, int64_t o) {
      T* __restrict__ d = y + o;
      const A* __restrict__ s = src + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) st(d[ch], s[ch]);
    });
  } else if (v.planes()) {
    for_segments(v, p0, p1, [&](int64_t o, int64_t len, int64_t r0) {
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, C - c0);
        for (int64_t j = 0; j < len; ++j) {
          const A* s = src + (r0 + j) * ld + c0;
          T* d = y + o + c0 * v.sC + j;
          for (int64_t b = 0; b < nb; ++b) st(d[b * v.sC], s[b]);
        }
      }
    });
  } else {
    for_pixels(v, p0, p1, [&](int64_t r, int64_t o) {
      T* d = y + o;
      const A* s = src + r * ld;
      for (int64_t ch = 0; ch < C; ++ch) st(d[ch * v.sC], s[ch]);
    });
  }
}

// Channel-major tiles for NCHW-like views (planes(), channel stride > 1): dst[ch * ld + r] = f(x[p0 + r, ch]),
// each channel's pixels a contiguous run of its plane (no transposition; a GEMM takes the tile transposed).
template <typename A, typename T, typename F>
void gather_planes(const View& v, const T* x, int64_t p0, int64_t p1, A* dst, int64_t ld, F&& f) {
  constexpr int64_t line = 64 / sizeof(T);
  for_segments(v, p0, p1, [&](int64_t o, int64_t len, int64_t r0) {
    for (int64_t ch = 0; ch < v.C; ++ch) {
      const T* __restrict__ s = x + o + ch * v.sC;
      // the start of a run two channels ahead: a new stream, which the hardware prefetchers pick up late
      prefetch_span(s + 2 * v.sC, std::min(len, 4 * line));
      A* __restrict__ d = dst + ch * ld + r0;
      for (int64_t j = 0; j < len; ++j) d[j] = f(static_cast<A>(s[j]), ch);
    }
  });
}

template <typename A, typename T>
void gather_planes(const View& v, const T* x, int64_t p0, int64_t p1, A* dst, int64_t ld) {
  gather_planes(v, x, p0, p1, dst, ld, [](A a, int64_t) { return a; });
}

template <bool ACC, typename T, typename A>
void scatter_planes(const View& v, T* y, int64_t p0, int64_t p1, const A* src, int64_t ld) {
  for_segments(v, p0, p1, [&](int64_t o, int64_t len, int64_t r0) {
    for (int64_t ch = 0; ch < v.C; ++ch) {
      T* __restrict__ d = y + o + ch * v.sC;
      const A* __restrict__ s = src + ch * ld + r0;
      if constexpr (ACC)
        for (int64_t j = 0; j < len; ++j) d[j] = static_cast<T>(static_cast<A>(d[j]) + s[j]);
      else
        for (int64_t j = 0; j < len; ++j) d[j] = static_cast<T>(s[j]);
    }
  });
}

inline bool channel_major(const View& v) { return v.planes() && !v.rows(); }

// Pixels per tile for row width `width` (the sum of the tile buffers' widths) over P pixels: about 256 KiB of
// float tiles per thread (within a core's L2 with the weight), at most 1024 rows, and as many tiles as make
// an equal share for every thread (small P: no thread idles on the last tile while another works).
inline int64_t tile_rows(int64_t width, int64_t P) {
  const int64_t cap = std::clamp<int64_t>((65536 / std::max<int64_t>(width, 1)) / 16 * 16, 16, 1024);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t ntiles = (P + cap - 1) / cap;
  ntiles = (ntiles + threads - 1) / threads * threads;
  return std::max<int64_t>(1, std::min(cap, (P + ntiles - 1) / std::max<int64_t>(ntiles, 1)));
}

// f(group, first tile, end tile) for contiguous groups of the ceil(P / rows) tiles, one group per thread.
template <typename F>
int64_t parallel_tiles(int64_t P, int64_t rows, F&& f) {
  const int64_t ntiles = (P + rows - 1) / rows;
  if (ntiles == 0) return 0;
  const int64_t groups = std::min<int64_t>(at::get_num_threads(), ntiles);
  at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
    const int prev = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t g = b; g < e; ++g) f(g, ntiles * g / groups, ntiles * (g + 1) / groups);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  });
  return groups;
}

inline int64_t num_groups(int64_t P, int64_t rows) {
  const int64_t ntiles = (P + rows - 1) / rows;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntiles));
}

// n elements of thread-local scratch (64-byte aligned), reused across calls.
template <typename A>
A* scratch(int64_t n) {
  thread_local std::vector<char> buf;
  const size_t need = static_cast<size_t>(n) * sizeof(A) + 64;
  if (buf.size() < need) buf.resize(need);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<A*>((p + 63) & ~uintptr_t(63));
}

// ----------------------------------------------------------------------------------------- BN arithmetic

template <typename T, typename A>
inline A round_to(A v) {  // the value as stored in T (what the torch backend's low-precision tensors hold)
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) return static_cast<A>(T(v));
  else return v;
}

using bnmath::relu;  // NaN passes, as torch.relu

template <typename A>
std::vector<A> load(const at::Tensor& t) {  // a CPU vector of any floating dtype and stride, as A
  std::vector<A> out(static_cast<size_t>(t.numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "effdense_load", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t s = t.dim() ? t.stride(0) : 1;
    for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<A>(p[i * s]);
  });
  return out;
}

template <typename V>
at::Tensor tensor_like(const V& v, const at::Tensor& like) {  // v ([n] numbers) in like's dtype and device
  at::Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "effdense_store", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

template <typename A, typename V>
void write_vec(const V& v, const at::Tensor& out) {  // into an A-typed vector of any stride
  A* p = out.data_ptr<A>();
  const int64_t s = out.stride(0);
  for (size_t i = 0; i < v.size(); ++i) p[static_cast<int64_t>(i) * s] = static_cast<A>(v[i]);
}

// scale = gamma * invstd, shift = beta - mean * scale, invstd = 1 / sqrt(var + eps), in A, as
// effdense.backends.bn.scale_shift.
template <typename A>
struct BN {
  std::vector<A> scale, shift, mean, invstd;
};

template <typename A>
BN<A> bn_params(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                double eps) {
  BN<A> p{load<A>(gamma), load<A>(beta), load<A>(mean), load<A>(var)};
  for (size_t i = 0; i < p.scale.size(); ++i)
    bnmath::scale_shift(p.scale[i], p.shift[i], p.mean[i], p.invstd[i], static_cast<A>(eps), p.scale[i], p.shift[i],
                        p.invstd[i]);
  return p;
}

template <typename A>
std::vector<A> weight_rows(const at::Tensor& w) {  // w [B, c, 1, 1] (any strides) as a row-major [B, c] matrix
  const int64_t B = w.size(0), c = w.size(1);
  std::vector<A> out(static_cast<size_t>(B * c));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "effdense_weight", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    const int64_t s0 = w.stride(0), s1 = w.stride(1);  // hoisted: a serial loop of every call, B * c long
    for (int64_t b = 0; b < B; ++b)
      for (int64_t ch = 0; ch < c; ++ch) out[b * c + ch] = static_cast<A>(p[b * s0 + ch * s1]);
  });
  return out;
}

template <typename T>
void write_weight(const std::vector<acc_t<T>>& m, const at::Tensor& dw) {  // row-major [B, c] into dw's strides
  T* pw = dw.data_ptr<T>();
  const int64_t B = dw.size(0), c = dw.size(1), s0 = dw.stride(0), s1 = dw.stride(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ch = 0; ch < c; ++ch) pw[b * s0 + ch * s1] = static_cast<T>(m[b * c + ch]);
}

// f(std::integral_constant<int64_t, K>) with K = n for the usual growth rates (and a bottleneck's 4k), else
// K = 0 (n at run time). For loops over a row of n channels per pixel: with a run-time n GCC's vectorized loop
// falls to its scalar remainder on every row (12 < 16 floats of a zmm); a compile-time n unrolls into full and
// masked vector moves.
template <typename F>
inline void with_width(int64_t n, F&& f) {
  switch (n) {
    case 12: return f(std::integral_constant<int64_t, 12>());
    case 16: return f(std::integral_constant<int64_t, 16>());
    case 24: return f(std::integral_constant<int64_t, 24>());
    case 32: return f(std::integral_constant<int64_t, 32>());
    case 40: return f(std::integral_constant<int64_t, 40>());
    case 48: return f(std::integral_constant<int64_t, 48>());
    default: return f(std::integral_constant<int64_t, 0>());
  }
}

// ---------------------------------------------------------------------------------------------- statistics

// Per tile and channel: (mean, M2) of the tile's rows, two-pass on values shifted by the tile's first row
// (bnmath::stat_shift): sums of x - k stay of the size of the spread, not of the mean, so a channel of mean 1e4
// and spread 1 keeps float's precision in its spread (a plain float sum of the values loses the spread's
// low digits to the mean's: issue 25.6). The tile's mean is k + mean(x - k), kept in double; tiles are merged with
// Chan et al.'s formula in tile order (bnmath::Moments).
struct TileMoments {
  int64_t C = 0, rows = 0, P = 0;
  std::vector<double> mean, m2;
  TileMoments(int64_t C_, int64_t rows_, int64_t P_, bool on)
      : C(C_), rows(rows_), P(P_), mean(on ? ((P_ + rows_ - 1) / rows_) * C_ : 0), m2(mean.size()) {}

  template <typename A>
  void add(int64_t tile, const A* z, int64_t n, int64_t ld) {
    with_width(C, [&](auto K) { add_k<A, decltype(K)::value>(tile, z, n, ld); });
  }

  template <typename A, int64_t K>  // K: C at compile time, or 0
  void add_k(int64_t tile, const A* z, int64_t n, int64_t ld) {
    const int64_t c = K > 0 ? K : C;
    thread_local std::vector<A> kv, sv, s2v;
    kv.resize(static_cast<size_t>(c));
    sv.assign(static_cast<size_t>(c), A(0));
    s2v.assign(static_cast<size_t>(c), A(0));
    A* __restrict__ k = kv.data();
    A* __restrict__ s = sv.data();
    A* __restrict__ s2 = s2v.data();
    for (int64_t ch = 0; ch < c; ++ch) k[ch] = bnmath::stat_shift(z[ch]);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t ch = 0; ch < c; ++ch) s[ch] += z[r * ld + ch] - k[ch];
    for (int64_t ch = 0; ch < c; ++ch) s[ch] /= static_cast<A>(n);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t ch = 0; ch < c; ++ch) {
        const A d = (z[r * ld + ch] - k[ch]) - s[ch];
        s2[ch] += d * d;
      }
    for (int64_t ch = 0; ch < c; ++ch)
      mean[tile * C + ch] = static_cast<double>(k[ch]) + static_cast<double>(s[ch]), m2[tile * C + ch] = s2[ch];
  }

  template <typename A>
  void finish(const at::Tensor& out_mean, const at::Tensor& out_var) const {
    std::vector<double> mu(static_cast<size_t>(C)), var(static_cast<size_t>(C));
    const int64_t ntiles = rows > 0 ? (P + rows - 1) / rows : 0;
    for (int64_t ch = 0; ch < C; ++ch) {
      bnmath::Moments acc;
      for (int64_t t = 0; t < ntiles; ++t)
        acc.merge(static_cast<double>(std::min(P, (t + 1) * rows) - t * rows), mean[t * C + ch], m2[t * C + ch]);
      mu[ch] = acc.mean_or_nan();  // torch.var_mean of nothing: NaN
      var[ch] = acc.var();
    }
    write_vec<A>(mu, out_mean);
    write_vec<A>(var, out_var);
  }
};

// ------------------------------------------------------------------------------------ row layouts

template <typename A>
std::vector<A> transposed(const std::vector<A>& m, int64_t rows, int64_t cols) {  // row-major [rows, cols]^T
  std::vector<A> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

// ---------------------------------------------------------------------------------- BN-ReLU backward

// Per-thread partial sums of the BN backward, merged in group order (deterministic).
struct Sums {
  int64_t C;
  std::vector<double> g, gx;  // [groups, C]: sum(g), sum(g * (x - mean))
  Sums(int64_t groups, int64_t C_) : C(C_), g(groups * C_, 0.0), gx(groups * C_, 0.0) {}
  template <typename A>
  void add(int64_t group, const A* sg, const A* sgx) {
    for (int64_t ch = 0; ch < C; ++ch) g[group * C + ch] += sg[ch], gx[group * C + ch] += sgx[ch];
  }
  // (dgamma, dbeta) over `count` pixels: dbeta = sum(g), dgamma = sum(g * xhat) = invstd * sum(g * (x - mean))
  template <typename A>
  std::pair<std::vector<double>, std::vector<double>> finish(const std::vector<A>& invstd, int64_t count) const {
    const int64_t groups = static_cast<int64_t>(g.size()) / std::max<int64_t>(C, 1);
    std::vector<double> dg(static_cast<size_t>(C), 0.0), db(static_cast<size_t>(C), 0.0);
    for (int64_t k = 0; k < groups; ++k)
      for (int64_t ch = 0; ch < C; ++ch) db[ch] += g[k * C + ch], dg[ch] += gx[k * C + ch];
    for (int64_t ch = 0; ch < C; ++ch) dg[ch] = bnmath::dgamma(dg[ch], static_cast<double>(invstd[ch]), count);
    return {dg, db};
  }
};

// g = grad where relu's input is positive (or NaN), out = scale * g (out may not alias gt); the tile's sums of g
// and g * (x - mean) into sg/sgx. xt holds x.
// One pixel row of relu_grad_tile: gv = grad where relu's input is positive (or NaN), out = scale * gv (without
// OUT only the sums; out unused). A function of its own with restrict-qualified arguments: so the channel loop
// vectorizes, branch-free.
template <typename A, bool OUT = true>
inline void relu_grad_row(const A* __restrict__ xr, const A* __restrict__ gr, A* __restrict__ out, int64_t c,
                          const A* __restrict__ s, const A* __restrict__ t, const A* __restrict__ mu,
                          A* __restrict__ sg, A* __restrict__ sgx) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const A xa = xr[ch], gv = bnmath::relu_grad(xa, gr[ch], s[ch], t[ch]);
    sg[ch] += gv;
    sgx[ch] += gv * (xa - mu[ch]);
    if constexpr (OUT) out[ch] = s[ch] * gv;
  }
}

template <typename A>
void relu_grad_tile(const A* xt, const A* gt, A* out, int64_t n, int64_t c, const BN<A>& bn, A* sg, A* sgx) {
  std::fill(sg, sg + c, A(0));
  std::fill(sgx, sgx + c, A(0));
  for (int64_t r = 0; r < n; ++r)
    relu_grad_row(xt + r * c, gt + r * c, out + r * c, c, bn.scale.data(), bn.shift.data(), bn.mean.data(), sg, sgx);
}

// The same on a channel-major tile (channel ch's n pixels at ch * ld): per-channel reductions over a contiguous
// run.
template <typename A>
void relu_grad_planes(const A* xt, const A* gt, A* out, int64_t n, int64_t c, int64_t ld, const BN<A>& bn,
                      A* sg, A* sgx) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const A* __restrict__ xr = xt + ch * ld;
    const A* __restrict__ gr = gt + ch * ld;
    A* __restrict__ o = out + ch * ld;
    const A s = bn.scale[ch], t = bn.shift[ch], mu = bn.mean[ch];
    A a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < n; ++j) {
      const A xa = xr[j], gv = bnmath::relu_grad(xa, gr[j], s, t);
      a += gv;
      b += gv * (xa - mu);
      o[j] = s * gv;
    }
    sg[ch] = a;
    sgx[ch] = b;
  }
}

// The batch-statistics part of the BN backward, -scale * (dbeta/P + xhat * dgamma/P), is affine in x per
// channel: alpha + beta * (x - mean) (bnmath::correction), from the sums over P pixels: this process's, or with
// sync (--sync-bn) every process's sums over their pixels.
template <typename A>
std::pair<std::vector<A>, std::vector<A>> correction(const std::vector<double>& dg, const std::vector<double>& db,
                                                     const BN<A>& bn, int64_t P, const Sync* sync = nullptr) {
  if (sync != nullptr) {
    std::vector<double> dg_all = dg, db_all = db;
    sum_over_processes(*sync, dg_all, db_all);
    return correction(dg_all, db_all, bn, sync->count);
  }
  std::vector<A> al(db.size()), be(db.size());
  for (size_t ch = 0; ch < db.size(); ++ch)
    bnmath::correction(bn.scale[ch], bn.invstd[ch], static_cast<A>(db[ch]), static_cast<A>(dg[ch]), P, al[ch],
                       be[ch]);
  return {al, be};
}

// gx += alpha + beta * (x - mean), a second sweep over x and gx, or (coef given) deferred: the per-channel
// coefficients are added into coef [2, c] instead, for whoever reads gx next to apply (gather_grad). Summed over
// the layers of a block (all normalizing with the block's batch mean), the corrections of a channel stay one
// affine function of it: applying them once, when the channel's gradient is read, saves every layer a sweep over
// x and the gradient buffer.
template <typename T, typename O>
void apply_correction(const at::Tensor& x, const at::Tensor& gx, const BN<acc_t<T>>& bn, const OptTensor& coef,
                      const std::vector<double>& dg, const std::vector<double>& db, const Sync* sync) {
  using A = acc_t<T>;
  const View vx(x), vo(gx);
  const auto [al, be] = correction(dg, db, bn, vx.pixels(), sync);
  if (coef) {
    A* pc = coef->data_ptr<A>();
    const int64_t s0 = coef->stride(0), s1 = coef->stride(1);
    for (int64_t ch = 0; ch < vx.C; ++ch) pc[ch * s1] += al[ch], pc[s0 + ch * s1] += be[ch];
    return;
  }
  const int64_t c = vx.C, rows = tile_rows(2 * c, vx.pixels());
  const T* px = x.const_data_ptr<T>();
  O* po = gx.data_ptr<O>();
  if (vx.planes() && vo.planes() && !vx.rows()) {  // NCHW: plane by plane, in memory order, no transposition
    const int64_t hw = vx.hw();
    at::parallel_for(0, vx.N * c, 1, [&](int64_t b0, int64_t e0) {
      for (int64_t q = b0; q < e0; ++q) {
        const int64_t n = q / c, ch = q - n * c;
        const T* __restrict__ xp = px + n * vx.sN + ch * vx.sC;
        O* __restrict__ gp = po + n * vo.sN + ch * vo.sC;
        const A a = al[ch], b = be[ch], m = bn.mean[ch];
        for (int64_t i = 0; i < hw; ++i)
          gp[i] = static_cast<O>(bnmath::corrected(static_cast<A>(gp[i]), static_cast<A>(xp[i]), m, a, b));
      }
    });
    return;
  }
  parallel_tiles(vx.pixels(), rows, [&](int64_t, int64_t t0, int64_t t1) {
    A* xt = scratch<A>(2 * rows * c);
    A* gt = xt + rows * c;
    const A* __restrict__ a = al.data();
    const A* __restrict__ b = be.data();
    const A* __restrict__ mu = bn.mean.data();
    for (int64_t ti = t0; ti < t1; ++ti) {
      const int64_t p0 = ti * rows, p1 = std::min(vx.pixels(), p0 + rows);
      gather(vx, px, p0, p1, xt, c);
      gather(vo, static_cast<const O*>(po), p0, p1, gt, c);
      for (int64_t r = 0; r < p1 - p0; ++r) {
        const A* __restrict__ xr = xt + r * c;
        A* __restrict__ gr = gt + r * c;
        for (int64_t ch = 0; ch < c; ++ch) gr[ch] = bnmath::corrected(gr[ch], xr[ch], mu[ch], a[ch], b[ch]);
      }
      scatter<false>(vo, po, p0, p1, gt, c);
    }
  });
}

}  // namespace cpu
}  // namespace effdense
