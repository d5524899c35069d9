// Per-channel BN statistics, fused BN-ReLU forward and fused BN-ReLU backward: CUDA kernels and their
// raw-pointer launchers (kernels.h). No torch headers.
//
// Layouts: channels-last (the block's main layout: a channel prefix of the feature buffer is a [P, c]
// matrix with leading dimension C) and planar NCHW. Each thread handles V consecutive channels (cl) or
// pixels (planar) with one 16-byte load where pointers, leading dimensions and sizes allow (V = 16 /
// sizeof(T)), else V = 1. Reductions: per-chunk partial sums in a workspace, then a finalize kernel that
// adds them in a fixed order (deterministic, no atomics). Statistics use shifted sums (shift = the
// channel's first value), which stay accurate where a raw sum of squares cancels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>

#include "../bn_math.h"
#include "kernels.h"

namespace effdense {
namespace cuda {

// (kernels.h) Queried once per device: every launch plans its grid with it, and cudaDeviceGetAttribute is a
// driver call. A data race on a slot only writes the same value twice (relaxed atomics).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not queried yet (static storage: zero-initialized)
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 80;
  if (dev >= 0 && dev < kMaxDevices && (n = cache[dev].load(std::memory_order_relaxed)) > 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 80;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;      // cl reductions: a block is 32 channel groups x kRows pixel rows
constexpr int kFinRows = 16;  // finalize: a block is 32 channels x kFinRows chunk rows

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccT<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}


// ------------------------------------------------------------------------------------------- functors
// accumulate(a, b, j): the two per-element quantities summed per channel.

template <typename T>
struct StatsOp {  // s1 = sum (x - k), s2 = sum (x - k)^2 with k = the channel's first value (if finite)
  using A = Acc<T>;
  const T* x;
  int64_t ld, sC;  // first value of channel c at c * (cl ? 1 : sC)
  bool cl;
  __device__ __forceinline__ A shift(int64_t c) const { return bnmath::stat_shift(to_acc(x[cl ? c : c * sC])); }
};

template <typename T>
struct BwdOp {  // s1 = sum g, s2 = sum g * xhat
  using A = Acc<T>;
  const T* x;
  const T* gy;
  const A *scale, *shift, *mean, *invstd;
};

// --------------------------------------------------------------------------------------- reductions

template <typename T, int V, bool STATS>
__global__ void __launch_bounds__(32 * kRows, 1) reduce_cl_kernel(StatsOp<T> st, BwdOp<T> bw, int64_t ldx, int64_t ldg,
                                                              int64_t P, int64_t C, int64_t rows_per_chunk,
                                                              Acc<T>* partial) {
  using A = Acc<T>;
  __shared__ A sh[2][kRows][32 * V];
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * V;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t p1 = p0 + rows_per_chunk < P ? p0 + rows_per_chunk : P;
  A s1[V], s2[V], k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) s1[j] = s2[j] = k[j] = A(0);
  if (c0 < C) {
    if constexpr (STATS) {
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = st.shift(c0 + j);
    }
    for (int64_t p = p0 + threadIdx.y; p < p1; p += kRows) {
      const Vec<T, V> xv = load<T, V>((STATS ? st.x : bw.x) + p * ldx + c0);
      if constexpr (STATS) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A d = to_acc(xv.v[j]) - k[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      } else {
        const Vec<T, V> gv = load<T, V>(bw.gy + p * ldg + c0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t c = c0 + j;
          const A xa = to_acc(xv.v[j]);
          const A g = bnmath::relu_grad(xa, to_acc(gv.v[j]), bw.scale[c], bw.shift[c]);
          s1[j] += g;
          s2[j] += g * ((xa - bw.mean[c]) * bw.invstd[c]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh[0][threadIdx.y][threadIdx.x * V + j] = s1[j];
    sh[1][threadIdx.y][threadIdx.x * V + j] = s2[j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A a = A(0), b = A(0);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        a += sh[0][r][threadIdx.x * V + j];
        b += sh[1][r][threadIdx.x * V + j];
      }
      partial[(static_cast<int64_t>(blockIdx.y) * C + c0 + j) * 2] = a;
      partial[(static_cast<int64_t>(blockIdx.y) * C + c0 + j) * 2 + 1] = b;
    }
  }
}

template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A sh[2][kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) sh[0][w] = a, sh[1][w] = b;
  __syncthreads();
  if (threadIdx.x == 0) {
    a = b = A(0);
    for (int i = 0; i < kThreads / 32; ++i) a += sh[0][i], b += sh[1][i];
  }
}

// One block per (channel, chunk of images); V consecutive pixels of a plane per load.
template <typename T, int V, bool STATS>
__global__ void __launch_bounds__(kThreads) reduce_planar_kernel(StatsOp<T> st, BwdOp<T> bw, int64_t xsN, int64_t xsC,
                                                                int64_t gsN, int64_t gsC, int64_t N, int64_t C,
                                                                int64_t HW, int64_t n_per_chunk, Acc<T>* partial) {
  using A = Acc<T>;
  const int64_t c = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * n_per_chunk;
  const int64_t n1 = n0 + n_per_chunk < N ? n0 + n_per_chunk : N;
  const int64_t hwv = HW / V, total = (n1 - n0) * hwv;
  A s1 = A(0), s2 = A(0), k = A(0);
  if constexpr (STATS) k = st.shift(c);
  for (int64_t i = threadIdx.x; i < total; i += kThreads) {
    const int64_t n = n0 + i / hwv, hw = (i % hwv) * V;
    const Vec<T, V> xv = load<T, V>((STATS ? st.x : bw.x) + n * xsN + c * xsC + hw);
    if constexpr (STATS) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = to_acc(xv.v[j]) - k;
        s1 += d;
        s2 += d * d;
      }
    } else {
      const Vec<T, V> gv = load<T, V>(bw.gy + n * gsN + c * gsC + hw);
      const A sc = bw.scale[c], sh = bw.shift[c], mu = bw.mean[c], is = bw.invstd[c];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xa = to_acc(xv.v[j]);
        const A g = bnmath::relu_grad(xa, to_acc(gv.v[j]), sc, sh);
        s1 += g;
        s2 += g * ((xa - mu) * is);
      }
    }
  }
  block_sum2(s1, s2);
  if (threadIdx.x == 0) {
    partial[(static_cast<int64_t>(blockIdx.y) * C + c) * 2] = s1;
    partial[(static_cast<int64_t>(blockIdx.y) * C + c) * 2 + 1] = s2;
  }
}

// Adds the chunks' partial sums in a fixed order (deterministic), parallel over chunks: thread (x, y) of a
// 32 x kFinRows block sums chunks y, y + kFinRows, ... of channel c = blockIdx.x * 32 + x (a warp reads 32
// consecutive channels' pairs), then row y = 0 adds the kFinRows row sums in order. A chunk plan has at most
// 1,024 chunks (plan_reduce): at most 64 serial loads per thread instead of 1,024 with a thread per channel.
// STATS: mean = k + s1 / P, var = s2 / P - (s1 / P)^2; else out1 = dbeta = s1, out2 = dgamma = s2.
template <typename T, bool STATS>
__global__ void __launch_bounds__(32 * kFinRows) finalize_kernel(StatsOp<T> st, const Acc<T>* partial,
                                                                 int64_t chunks, int64_t C, int64_t P, Acc<T>* out1,
                                                                 Acc<T>* out2) {
  using A = Acc<T>;
  __shared__ A sh[2][kFinRows][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A a = A(0), b = A(0);
  if (c < C) {
    for (int64_t i = threadIdx.y; i < chunks; i += kFinRows) {
      a += partial[(i * C + c) * 2];
      b += partial[(i * C + c) * 2 + 1];
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = a;
  sh[1][threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return;
  a = b = A(0);
#pragma unroll
  for (int r = 0; r < kFinRows; ++r) a += sh[0][r][threadIdx.x], b += sh[1][r][threadIdx.x];
  if constexpr (STATS) {
    const A m = a / static_cast<A>(P);
    const A v = b / static_cast<A>(P) - m * m;
    out1[c] = st.shift(c) + m;
    out2[c] = v < A(0) ? A(0) : v;  // rounding may leave a tiny negative; a NaN (an Inf among the values) stays
  } else {
    out1[c] = a;  // dbeta
    out2[c] = b;  // dgamma
  }
}

// ------------------------------------------------------------------------------------------ elementwise

template <typename T, typename O, int V, bool BWD>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const T* x, Out out, Feat xf, const T* gy, Feat gf,
                                                              const Acc<T>* scale, const Acc<T>* shift,
                                                              const Acc<T>* mean, const Acc<T>* invstd,
                                                              const Acc<T>* dgamma, const Acc<T>* dbeta, int64_t count,
                                                              bool batch_stats, bool accumulate) {
  using A = Acc<T>;
  O* o = static_cast<O*>(out.data);
  // cl: items are (pixel, group of V channels); planar: (image, channel, group of V pixels)
  const int64_t inner = xf.cl ? xf.C / V : xf.HW / V;
  const int64_t total = xf.cl ? xf.N * xf.HW * inner : xf.N * xf.C * inner;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t q = i / inner, r = i - q * inner;
    int64_t xo, go, oo, c0;
    int cstep;
    if (xf.cl) {
      c0 = r * V;
      xo = q * xf.ld + c0, go = q * gf.ld + c0, oo = q * out.ld + c0;
      cstep = 1;
    } else {
      const int64_t n = q / xf.C;
      c0 = q - n * xf.C;
      xo = n * xf.sN + c0 * xf.sC + r * V, go = n * gf.sN + c0 * gf.sC + r * V, oo = n * out.sN + c0 * out.sC + r * V;
      cstep = 0;
    }
    const Vec<T, V> xv = load<T, V>(x + xo);
    Vec<O, V> ov;
    if constexpr (BWD) {
      const Vec<T, V> gv = load<T, V>(gy + go);
      Vec<O, V> prev;
      if (accumulate) prev = load<O, V>(o + oo);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = c0 + j * cstep;
        const A xa = to_acc(xv.v[j]), s = scale[c];
        A d = s * bnmath::relu_grad(xa, to_acc(gv.v[j]), s, shift[c]);
        if (batch_stats) {
          A alpha, beta;
          bnmath::correction(s, invstd[c], dbeta[c], dgamma[c], count, alpha, beta);
          d = bnmath::corrected(d, xa, mean[c], alpha, beta);
        }
        if (accumulate) d += to_acc(prev.v[j]);
        ov.v[j] = from_acc<O>(d);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = c0 + j * cstep;
        ov.v[j] = from_acc<O>(bnmath::relu(to_acc(xv.v[j]) * scale[c] + shift[c]));
      }
    }
    store<O, V>(o + oo, ov);
  }
}

// -------------------------------------------------------------------------------------------- planning

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    default: return 2;
  }
}

size_t acc_size(DType dt) { return dt == DType::F64 ? 8 : 4; }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// V = 16 / sizeof(T) when every pointer, leading dimension and the vectorized extent allow it, else 1.
int pick_vec(const Feat& x, const Feat* g, const Out* o, size_t osize, DType dt) {
  const int v = static_cast<int>(16 / dtype_size(dt));
  const int64_t extent = x.cl ? x.C : x.HW;
  if (extent % v != 0) return 1;
  auto ok = [&](const void* p, int64_t a, int64_t b, bool cl, size_t esize) {
    return aligned(p, esize * v > 16 ? 16 : esize * v) && (cl ? a % v == 0 : (a % v == 0 && b % v == 0));
  };
  if (!ok(x.data, x.cl ? x.ld : x.sN, x.sC, x.cl, dtype_size(dt))) return 1;
  if (g && !ok(g->data, g->cl ? g->ld : g->sN, g->sC, g->cl, dtype_size(dt))) return 1;
  if (o && !ok(o->data, x.cl ? o->ld : o->sN, o->sC, x.cl, osize)) return 1;
  if (o && osize * v > 16 && !aligned(o->data, osize * v)) return 1;
  return v;
}

struct Plan {
  dim3 grid, block;
  int64_t chunk;  // cl: pixel rows per chunk; planar: images per chunk
  int64_t chunks;
};

Plan plan_reduce(const Feat& x, int V) {
  Plan p;
  const int64_t P = x.N * x.HW, target = 4LL * sm_count();
  if (x.cl) {
    const int64_t groups = (x.C + 32LL * V - 1) / (32LL * V);
    int64_t chunks = std::max<int64_t>(1, (target + groups - 1) / groups);
    chunks = std::min<int64_t>({chunks, 1024, std::max<int64_t>(1, P / (4 * kRows))});
    p.chunk = (P + chunks - 1) / chunks;
    p.chunks = (P + p.chunk - 1) / p.chunk;
    p.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(p.chunks));
    p.block = dim3(32, kRows);
  } else {
    int64_t chunks = std::max<int64_t>(1, (target + x.C - 1) / x.C);
    chunks = std::min<int64_t>({chunks, 1024, std::max<int64_t>(1, x.N)});
    p.chunk = (x.N + chunks - 1) / chunks;
    p.chunks = (x.N + p.chunk - 1) / p.chunk;
    p.grid = dim3(static_cast<unsigned>(x.C), static_cast<unsigned>(p.chunks));
    p.block = dim3(kThreads);
  }
  return p;
}

unsigned elementwise_blocks(int64_t items) {
  const int64_t cap = 32LL * sm_count();
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, cap)));
}

// ----------------------------------------------------------------------------------------- launchers

template <typename T, bool STATS, int V>
cudaError_t reduce_launch(const Feat& x, const Feat& g, StatsOp<T> st, BwdOp<T> bw, const Plan& p, Acc<T>* partial,
                          cudaStream_t s) {
  if (x.cl)
    reduce_cl_kernel<T, V, STATS><<<p.grid, p.block, 0, s>>>(st, bw, x.ld, g.ld, x.N * x.HW, x.C, p.chunk, partial);
  else
    reduce_planar_kernel<T, V, STATS><<<p.grid, p.block, 0, s>>>(st, bw, x.sN, x.sC, g.sN, g.sC, x.N, x.C, x.HW,
                                                                 p.chunk, partial);
  return cudaGetLastError();
}

template <typename T, bool STATS>
cudaError_t reduce(const Feat& x, const Feat& g, StatsOp<T> st, BwdOp<T> bw, void* ws, Acc<T>* out1, Acc<T>* out2,
                   cudaStream_t s) {
  const int V = pick_vec(x, STATS ? nullptr : &g, nullptr, 0, sizeof(T) == 8 ? DType::F64
                                                               : sizeof(T) == 4 ? DType::F32 : DType::F16);
  const Plan p = plan_reduce(x, V);
  Acc<T>* partial = static_cast<Acc<T>*>(ws);
  constexpr int VV = static_cast<int>(16 / sizeof(T));
  cudaError_t e = V == VV ? reduce_launch<T, STATS, VV>(x, g, st, bw, p, partial, s)
                          : reduce_launch<T, STATS, 1>(x, g, st, bw, p, partial, s);
  if (e != cudaSuccess) return e;
  finalize_kernel<T, STATS><<<static_cast<unsigned>((x.C + 31) / 32), dim3(32, kFinRows), 0, s>>>(
      st, partial, p.chunks, x.C, x.N * x.HW, out1, out2);
  return cudaGetLastError();
}

template <typename T, typename O, bool BWD>
cudaError_t elementwise(const Feat& x, const Feat& g, const Out& o, const void* scale, const void* shift,
                        const void* mean, const void* invstd, const void* dgamma, const void* dbeta, bool batch_stats,
                        bool accumulate, cudaStream_t s) {
  using A = Acc<T>;
  const DType dt = sizeof(T) == 8 ? DType::F64 : sizeof(T) == 4 ? DType::F32 : DType::F16;
  const int V = pick_vec(x, BWD ? &g : nullptr, &o, sizeof(O), dt);
  const int64_t items = x.N * x.C * x.HW / V;
  const int64_t count = x.N * x.HW;
  const auto* sc = static_cast<const A*>(scale);
  const auto* sh = static_cast<const A*>(shift);
  const auto* mu = static_cast<const A*>(mean);
  const auto* is = static_cast<const A*>(invstd);
  const auto* dg = static_cast<const A*>(dgamma);
  const auto* db = static_cast<const A*>(dbeta);
  const T* xp = static_cast<const T*>(x.data);
  const T* gp = static_cast<const T*>(g.data);
  constexpr int VV = static_cast<int>(16 / sizeof(T));
  const unsigned blocks = elementwise_blocks(items);
  if (V == VV)
    elementwise_kernel<T, O, VV, BWD><<<blocks, kThreads, 0, s>>>(xp, o, x, gp, g, sc, sh, mu, is, dg, db, count,
                                                                  batch_stats, accumulate);
  else
    elementwise_kernel<T, O, 1, BWD><<<blocks, kThreads, 0, s>>>(xp, o, x, gp, g, sc, sh, mu, is, dg, db, count,
                                                                 batch_stats, accumulate);
  return cudaGetLastError();
}

template <typename F>
cudaError_t by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t reduce_workspace_bytes(const Feat& x, DType dt) {
  // enough for the scalar and the vectorized plan (the launch picks one of them)
  const int vmax = static_cast<int>(16 / dtype_size(dt));
  const int64_t chunks = std::max(plan_reduce(x, 1).chunks, plan_reduce(x, vmax).chunks);
  return static_cast<size_t>(chunks * x.C * 2) * acc_size(dt);
}

cudaError_t channel_stats(const Feat& x, DType dt, void* mean, void* var, void* workspace, cudaStream_t stream) {
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    StatsOp<T> st{static_cast<const T*>(x.data), x.ld, x.sC, x.cl};
    BwdOp<T> bw{};
    return reduce<T, true>(x, x, st, bw, workspace, static_cast<Acc<T>*>(mean), static_cast<Acc<T>*>(var), stream);
  });
}

cudaError_t bn_relu(const Feat& x, DType dt, const void* scale, const void* shift, const Out& out,
                    cudaStream_t stream) {
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return elementwise<T, T, false>(x, x, out, scale, shift, nullptr, nullptr, nullptr, nullptr, false, false, stream);
  });
}

cudaError_t bn_relu_backward(const Feat& x, const Feat& gy, DType dt, const void* scale, const void* shift,
                             const void* mean, const void* invstd, bool batch_stats, const Out& gx, bool gx_acc,
                             bool accumulate, void* dgamma, void* dbeta, void* workspace, cudaStream_t stream) {
  return by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    StatsOp<T> st{};
    BwdOp<T> bw{static_cast<const T*>(x.data), static_cast<const T*>(gy.data), static_cast<const A*>(scale),
                static_cast<const A*>(shift), static_cast<const A*>(mean), static_cast<const A*>(invstd)};
    cudaError_t e = reduce<T, false>(x, gy, st, bw, workspace, static_cast<A*>(dbeta), static_cast<A*>(dgamma), stream);
    if (e != cudaSuccess) return e;
    if (gx_acc)
      return elementwise<T, A, true>(x, gy, gx, scale, shift, mean, invstd, dgamma, dbeta, batch_stats, accumulate,
                                     stream);
    return elementwise<T, T, true>(x, gy, gx, scale, shift, mean, invstd, dgamma, dbeta, batch_stats, accumulate,
                                   stream);
  });
}

}  // namespace cuda
}  // namespace effdense
