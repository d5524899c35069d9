// Register-blocked AVX2/FMA GEMM for the CPU tiles (cpu_tiles.h's gemm() calls it where it applies):
//   C[m, n] (=|+=) sum_k A(i, k) B[k, j],   A(i, k) = a[i * sai + k * sak] (row-major A or a transposed one),
//   B row-major [k, n] (ld ldb), C row-major [m, n] (ld ldc).
// Why not the BLAS: the tiles' products are small and skinny (a few hundred pixel rows against the bottleneck
// width, 48 for growth rate 12), where MKL packs both operands on every call and scales C in a separate pass
// for beta = 1. This kernel packs nothing (the operands are tiles already in L1/L2) and its beta = 1 is a load
// of C into the accumulators; on these shapes it is the faster of the two (A/B: EFFDENSE_CPU_GEMM=blas).
// Blocking: C in register tiles of MR = 6 rows by NR = 2 vectors (16 floats / 8 doubles: 12 accumulators,
// two B vectors and one broadcast, 15 of the 16 ymm registers). For each column panel of B (K x NR, in L1),
// every row block of A streams past it; per k, two B loads, MR broadcasts of A and 2 * MR FMAs. Ragged edges:
// a row tail is a smaller MR (a template argument), a column tail uses masked loads and stores. Each C
// element is one FMA chain over k in order (deterministic, independent of m and n).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EFFDENSE_AVX2_GEMM 1
#else
#define EFFDENSE_AVX2_GEMM 0
#endif

namespace effdense {
namespace cpu {

#if EFFDENSE_AVX2_GEMM

// The AVX2 operations the kernel uses, per element type (8 floats or 4 doubles a vector).
template <typename A>
struct Simd;

template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int64_t L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static V maskload(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void maskstore(float* p, __m256i m, V v) { _mm256_maskstore_ps(p, m, v); }
  static __m256i mask(int64_t n) {  // lanes [0, n) on (n may be <= 0 or >= L)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, L))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int64_t L = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static V maskload(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void maskstore(double* p, __m256i m, V v) { _mm256_maskstore_pd(p, m, v); }
  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::clamp<int64_t>(n, 0, L)), _mm256_setr_epi64x(0, 1, 2, 3));
  }
};

// A vector load / store at p, of the lanes m allows where MASKED (the others read as 0, left unwritten).
template <bool MASKED, typename A>
inline typename Simd<A>::V vload(const A* p, __m256i m) {
  if constexpr (MASKED) return Simd<A>::maskload(p, m);
  else return Simd<A>::loadu(p);
}

template <bool MASKED, typename A>
inline void vstore(A* p, __m256i m, typename Simd<A>::V v) {
  if constexpr (MASKED) Simd<A>::maskstore(p, m, v);
  else Simd<A>::storeu(p, v);
}

// One register tile: C[MR, NR] (=|+=) sum_k A(i, k) B[k, 0:NR] (with MASKED, only the columns m0/m1 allow).
template <typename A, int MR, bool MASKED>
inline void gemm_tile(int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb, bool acc, A* c,
                      int64_t ldc, __m256i m0, __m256i m1) {
  using S = Simd<A>;
  typename S::V c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = acc ? vload<MASKED>(c + r * ldc, m0) : S::zero();
    c1[r] = acc ? vload<MASKED>(c + r * ldc + S::L, m1) : S::zero();
  }
  for (int64_t k = 0; k < K; ++k) {
    const A* bk = b + k * ldb;
    const typename S::V b0 = vload<MASKED>(bk, m0), b1 = vload<MASKED>(bk + S::L, m1);
    const A* ak = a + k * sak;
    for (int r = 0; r < MR; ++r) {
      const typename S::V av = S::bcast(ak + r * sai);
      c0[r] = S::fma(av, b0, c0[r]);
      c1[r] = S::fma(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore<MASKED>(c + r * ldc, m0, c0[r]);
    vstore<MASKED>(c + r * ldc + S::L, m1, c1[r]);
  }
}

template <typename A, bool MASKED>
inline void gemm_rows(int64_t mr, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb,
                      bool acc, A* c, int64_t ldc, __m256i m0, __m256i m1) {
  switch (mr) {
    case 6: return gemm_tile<A, 6, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
    case 5: return gemm_tile<A, 5, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
    case 4: return gemm_tile<A, 4, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
    case 3: return gemm_tile<A, 3, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
    case 2: return gemm_tile<A, 2, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
    default: return gemm_tile<A, 1, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, m0, m1);
  }
}

// C[m, n] (=|+=) A B as above (acc: +=, i.e. beta 1; otherwise beta 0: C is only written).
template <typename A>
void gemm_avx2(int64_t m, int64_t n, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb,
               bool acc, A* c, int64_t ldc) {
  using S = Simd<A>;
  constexpr int64_t MR = 6, NR = 2 * S::L;
  const __m256i all = S::mask(S::L);
  for (int64_t j = 0; j < n; j += NR) {
    const int64_t nj = std::min(NR, n - j);
    const __m256i m0 = S::mask(nj), m1 = S::mask(nj - S::L);
    for (int64_t i = 0; i < m; i += MR) {
      const int64_t mr = std::min(MR, m - i);
      if (nj == NR) gemm_rows<A, false>(mr, K, a + i * sai, sai, sak, b + j, ldb, acc, c + i * ldc + j, ldc, all, all);
      else gemm_rows<A, true>(mr, K, a + i * sai, sai, sak, b + j, ldb, acc, c + i * ldc + j, ldc, m0, m1);
    }
  }
}

#endif  // EFFDENSE_AVX2_GEMM

}  // namespace cpu
}  // namespace effdense
