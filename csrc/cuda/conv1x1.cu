// Fused BN-ReLU-Conv1x1 on tensor cores: z[p, b] = sum_c relu(x[p, c] * scale[c] + shift[c]) * w[b, c].
//
// x is a channels-last [P, C] matrix with leading dimension ld (a channel prefix of the block's feature
// buffer, read in place), w is [B, C] row-major (conv1's weight), z is [P, B] dense. Half or bfloat16
// operands, fp32 accumulation (WMMA 16x16x16). One block computes a 64 (pixels) x 64 (outputs) tile with
// four warps of 32 x 32 and walks C in k-steps of 32 (tiling and index math: conv1x1_tiling.h).
//
// Pipeline: two shared-memory stages. While the warps multiply step t, the 16-byte cp.async copies of step
// t + 1 are in flight (sm_80+; cp.async bypasses registers, and its src-size operand zero-fills a partial
// chunk past C). After its copies of step t land, each thread applies BN-ReLU in place to the x chunks it
// copied (its own cp.async writes are visible to it after cp.async.wait_group; other threads' only after the
// barrier that follows). Out-of-range chunks stay 0 and are not transformed: relu(0 * scale + shift) is not 0.
// The 16-byte path is taken per operand: x when ld % 8 == 0 (padded feature buffers), w when C % 8 == 0, each
// with a 16-byte aligned base; otherwise that operand is loaded element by element (and for x transformed on
// the way). The BN-ReLU output is never stored to global memory. Not yet: split-K, epilogue statistics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "conv1x1_tiling.h"
#include "kernels.h"

namespace effdense {
namespace cuda {
namespace {

using namespace nvcuda;
using namespace conv1x1;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct alignas(16) Vec8 {
  T v[kVec];
};

union SharedTiles {
  struct {
    unsigned short a[2][BM][LDS];  // two stages; 16-bit storage of T (half / bfloat16)
    unsigned short b[2][BN][LDS];
  } in;
  float c[BM][LDC];  // the epilogue's fp32 tile, after the last k-step
};

// 16 bytes global -> shared, of which the first `bytes` are read and the rest zero-filled (cp.async on sm_80+,
// a plain copy before). With bytes == 0 nothing is read, and src is any valid address.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
#else
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (bytes == 16) v = *static_cast<const uint4*>(src);
  else
    for (int i = 0; i < bytes; ++i) reinterpret_cast<unsigned char*>(&v)[i] = static_cast<const unsigned char*>(src)[i];
  *static_cast<uint4*>(dst) = v;
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>  // wait until at most N committed groups of this thread are pending
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

struct Args {
  int64_t ld, P, C, B;
  const float* scale;
  const float* shift;
};

// Stage step k0's x tile [BM][BK] (relu(bn(x)) for the element path; raw x for the 16-byte path, transformed by
// bn_relu_staged once it lands) and w tile [BN][BK] into stage buffers As/Bs.
template <typename T, bool VX, bool VW>
__device__ __forceinline__ void stage(T (*As)[LDS], T (*Bs)[LDS], const T* __restrict__ x, const T* __restrict__ w,
                                      const Args& a, int64_t p0, int64_t n0, int64_t k0) {
  if constexpr (VX) {
    for (int i = threadIdx.x; i < kXChunks; i += kThreads) {
      const Chunk ch = chunk_of(i);
      const int64_t p = p0 + ch.row, c = k0 + ch.col;
      const int n = chunk_valid(p, a.P, c, a.C);
      copy16_async(&As[ch.row][ch.col], n > 0 ? x + p * a.ld + c : x, n * static_cast<int>(sizeof(T)));
    }
  } else {
#pragma unroll 2  // full unrolling made ptxas spill (sm_90, half, element path)
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const Chunk el = element_of(e);
      const int64_t p = p0 + el.row, c = k0 + el.col;
      float v = 0.0f;
      if (p < a.P && c < a.C) {
        v = to_f(x[p * a.ld + c]) * a.scale[c] + a.shift[c];
        v = v <= 0.0f ? 0.0f : v;  // lets NaN through, as torch.relu
      }
      As[el.row][el.col] = from_f<T>(v);
    }
  }
  if constexpr (VW) {
    for (int i = threadIdx.x; i < kWChunks; i += kThreads) {
      const Chunk ch = chunk_of(i);
      const int64_t n = n0 + ch.row, c = k0 + ch.col;
      const int valid = chunk_valid(n, a.B, c, a.C);
      copy16_async(&Bs[ch.row][ch.col], valid > 0 ? w + n * a.C + c : w, valid * static_cast<int>(sizeof(T)));
    }
  } else {
#pragma unroll 2
    for (int e = threadIdx.x; e < BN * BK; e += kThreads) {
      const Chunk el = element_of(e);
      const int64_t n = n0 + el.row, c = k0 + el.col;
      Bs[el.row][el.col] = (n < a.B && c < a.C) ? w[n * a.C + c] : from_f<T>(0.0f);
    }
  }
}

// BN-ReLU in place on the x chunks this thread copied for step k0 (the same chunks as in stage<VX = true>).
template <typename T>
__device__ __forceinline__ void bn_relu_staged(T (*As)[LDS], const Args& a, int64_t p0, int64_t k0) {
  for (int i = threadIdx.x; i < kXChunks; i += kThreads) {
    const Chunk ch = chunk_of(i);
    const int64_t c = k0 + ch.col;
    const int n = chunk_valid(p0 + ch.row, a.P, c, a.C);
    if (n == 0) continue;
    Vec8<T> v = *reinterpret_cast<const Vec8<T>*>(&As[ch.row][ch.col]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < n) {  // past C: stays the zero cp.async filled in
        const float f = to_f(v.v[j]) * a.scale[c + j] + a.shift[c + j];
        v.v[j] = from_f<T>(f <= 0.0f ? 0.0f : f);
      }
    }
    *reinterpret_cast<Vec8<T>*>(&As[ch.row][ch.col]) = v;
  }
}

template <typename T, bool VX, bool VW>
__global__ void __launch_bounds__(kThreads) bn_relu_conv1x1_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                  T* __restrict__ z, Args a) {
  __shared__ __align__(128) SharedTiles sm;
  T(*As)[BM][LDS] = reinterpret_cast<T(*)[BM][LDS]>(sm.in.a);
  T(*Bs)[BN][LDS] = reinterpret_cast<T(*)[BN][LDS]>(sm.in.b);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t steps = k_steps(a.C);
  stage<T, VX, VW>(As[0], Bs[0], x, w, a, p0, n0, 0);
  async_commit();
  for (int64_t t = 0; t < steps; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < steps) {
      // the other stage was last read by step t - 1's MMA, which every warp finished (barrier below)
      stage<T, VX, VW>(As[cur ^ 1], Bs[cur ^ 1], x, w, a, p0, n0, (t + 1) * BK);
      async_commit();
      async_wait<1>();  // this thread's copies of step t landed; step t + 1's stay in flight
    } else {
      async_wait<0>();
    }
    if constexpr (VX) bn_relu_staged<T>(As[cur], a, p0, t * BK);
    __syncthreads();  // step t's tiles complete and transformed, for every warp
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[cur][wm * 32 + i * 16][kk], LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[cur][wn * 32 + j * 16][kk], LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // step t's stage is free for step t + 2 (and, after the last step, for the epilogue)
  }
  // epilogue: fragments -> shared (fp32) -> z with bounds checks
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
    const int r = i / BN, cc = i % BN;
    const int64_t p = p0 + r, n = n0 + cc;
    if (p < a.P && n < a.B) z[p * a.B + n] = from_f<T>(sm.c[r][cc]);
  }
}

template <typename T, bool VX, bool VW>
void launch_variant(dim3 grid, cudaStream_t stream, const T* x, const T* w, T* z, const Args& a) {
  bn_relu_conv1x1_kernel<T, VX, VW><<<grid, kThreads, 0, stream>>>(x, w, z, a);
}

template <typename T>
cudaError_t launch(const Feat& x, const float* scale, const float* shift, const void* w, int64_t B, void* z,
                   cudaStream_t stream) {
  const Args a{x.ld, x.N * x.HW, x.C, B, scale, shift};
  const dim3 grid(static_cast<unsigned>((a.P + BM - 1) / BM), static_cast<unsigned>((B + BN - 1) / BN));
  const T* xp = static_cast<const T*>(x.data);
  const T* wp = static_cast<const T*>(w);
  T* zp = static_cast<T*>(z);
  const bool vx = rows_vectorizable(x.ld, reinterpret_cast<uintptr_t>(xp));
  const bool vw = rows_vectorizable(x.C, reinterpret_cast<uintptr_t>(wp));
  if (vx && vw) launch_variant<T, true, true>(grid, stream, xp, wp, zp, a);
  else if (vx) launch_variant<T, true, false>(grid, stream, xp, wp, zp, a);
  else if (vw) launch_variant<T, false, true>(grid, stream, xp, wp, zp, a);
  else launch_variant<T, false, false>(grid, stream, xp, wp, zp, a);
  return cudaGetLastError();
}

}  // namespace

bool bn_relu_conv1x1_supported(const Feat& x, DType dt) {
  const int64_t P = x.N * x.HW;
  return x.cl && (dt == DType::F16 || dt == DType::BF16) && P > 0 && (P + BM - 1) / BM < (1LL << 31) &&
         x.C > 0;
}

cudaError_t bn_relu_conv1x1(const Feat& x, DType dt, const float* scale, const float* shift, const void* w,
                            int64_t B, void* z, cudaStream_t stream) {
  if (!bn_relu_conv1x1_supported(x, dt) || B <= 0 || (B + BN - 1) / BN > 65535) return cudaErrorInvalidValue;
  if (dt == DType::F16) return launch<__half>(x, scale, shift, w, B, z, stream);
  return launch<__nv_bfloat16>(x, scale, shift, w, B, z, stream);
}

}  // namespace cuda
}  // namespace effdense
