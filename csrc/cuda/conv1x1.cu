// Fused BN-ReLU-Conv1x1 on tensor cores: z[p, b] = sum_c relu(x[p, c] * scale[c] + shift[c]) * w[b, c].
//
// x is a channels-last [P, C] matrix with leading dimension ld (a channel prefix of the block's feature
// buffer, read in place), w is [B, C] row-major (conv1's weight), z is [P, B] dense. Half or bfloat16
// operands, fp32 accumulation (WMMA 16x16x16). One block computes a 64 (pixels) x 64 (outputs) tile with
// four warps of 32 x 32; each K step stages a 64 x 32 tile of x, with BN-ReLU applied, and a 64 x 32 tile
// of w in shared memory (16-byte loads where C, ld and the pointers allow). The BN-ReLU output is never
// stored to global memory. A first, correct version: no cp.async pipelining, no split-K, no epilogue
// statistics yet (to be tuned on a GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "kernels.h"

namespace effdense {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32, PAD = 8, LDS = BK + PAD;  // LDS: multiple of 8 elements (WMMA)
constexpr int kWarps = 4, kThreads = 32 * kWarps, LDC = BN + 4;

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
  T v[8];
};

union SharedTiles {
  struct {
    unsigned short a[BM][LDS];  // 16-bit storage of T (half / bfloat16)
    unsigned short b[BN][LDS];
  } in;
  float c[BM][LDC];
};

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) bn_relu_conv1x1_kernel(const T* __restrict__ x, int64_t ld,
                                                                  const float* __restrict__ scale,
                                                                  const float* __restrict__ shift,
                                                                  const T* __restrict__ w, T* __restrict__ z,
                                                                  int64_t P, int64_t C, int64_t B) {
  __shared__ __align__(128) SharedTiles sm;
  T(*As)[LDS] = reinterpret_cast<T(*)[LDS]>(sm.in.a);
  T(*Bs)[LDS] = reinterpret_cast<T(*)[LDS]>(sm.in.b);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < C; k0 += BK) {
    // stage BM x BK of relu(bn(x)) and BN x BK of w; zero outside [P, C] / [B, C]
    if constexpr (VEC) {
      for (int i = threadIdx.x; i < BM * BK / 8; i += kThreads) {
        const int r = i / (BK / 8), cc = (i % (BK / 8)) * 8;
        const int64_t p = p0 + r, c = k0 + cc;
        Vec8<T> a, b;
        if (p < P && c < C) {
          a = *reinterpret_cast<const Vec8<T>*>(x + p * ld + c);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float v = to_f(a.v[j]) * scale[c + j] + shift[c + j];
            a.v[j] = from_f<T>(v <= 0.0f ? 0.0f : v);
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) a.v[j] = from_f<T>(0.0f);
        }
        *reinterpret_cast<Vec8<T>*>(&As[r][cc]) = a;
        const int64_t n = n0 + r;
        if (n < B && c < C) {
          b = *reinterpret_cast<const Vec8<T>*>(w + n * C + c);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) b.v[j] = from_f<T>(0.0f);
        }
        *reinterpret_cast<Vec8<T>*>(&Bs[r][cc]) = b;
      }
    } else {
      for (int i = threadIdx.x; i < BM * BK; i += kThreads) {
        const int r = i / BK, cc = i % BK;
        const int64_t p = p0 + r, c = k0 + cc, n = n0 + r;
        float v = 0.0f;
        if (p < P && c < C) {
          v = to_f(x[p * ld + c]) * scale[c] + shift[c];
          v = v <= 0.0f ? 0.0f : v;
        }
        As[r][cc] = from_f<T>(v);
        Bs[r][cc] = (n < B && c < C) ? w[n * C + c] : from_f<T>(0.0f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wm * 32 + i * 16][kk], LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[wn * 32 + j * 16][kk], LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
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
    if (p < P && n < B) z[p * B + n] = from_f<T>(sm.c[r][cc]);
  }
}

template <typename T>
cudaError_t launch(const Feat& x, const float* scale, const float* shift, const void* w, int64_t B, void* z,
                   cudaStream_t stream) {
  const int64_t P = x.N * x.HW;
  const dim3 grid(static_cast<unsigned>((P + BM - 1) / BM), static_cast<unsigned>((B + BN - 1) / BN));
  const T* xp = static_cast<const T*>(x.data);
  const T* wp = static_cast<const T*>(w);
  const bool vec = x.C % 8 == 0 && x.ld % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(wp) % 16 == 0;
  if (vec)
    bn_relu_conv1x1_kernel<T, true><<<grid, kThreads, 0, stream>>>(xp, x.ld, scale, shift, wp, static_cast<T*>(z), P,
                                                                   x.C, B);
  else
    bn_relu_conv1x1_kernel<T, false><<<grid, kThreads, 0, stream>>>(xp, x.ld, scale, shift, wp, static_cast<T*>(z), P,
                                                                    x.C, B);
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
