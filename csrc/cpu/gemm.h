// Register-blocked AVX2/FMA and AVX-512 GEMMs for the CPU tiles (tiles.h's gemm() calls them where they apply):
//   C[m, n] (=|+=) sum_k A(i, k) B[k, j],   A(i, k) = a[i * sai + k * sak] (row-major A or a transposed one),
//   B row-major [k, n] (ld ldb), C row-major [m, n] (ld ldc).
// Why not the BLAS: the tiles' products are small and skinny (a few hundred pixel rows against the bottleneck
// width, 48 for growth rate 12), where MKL packs both operands on every call and scales C in a separate pass
// for beta = 1. These kernels pack nothing (the operands are tiles
// already in L1/L2) and their beta = 1 is a load of C into the accumulators; on these shapes they are the
// faster (A/B: EFFDENSE_CPU_GEMM=blas, or =avx2 for the 256-bit kernel in an AVX-512 build).
// AVX2 blocking: C in register tiles of MR = 6 rows by NR = 2 vectors (16 floats / 8 doubles: 12 accumulators,
// two B vectors and one broadcast, 15 of the 16 ymm registers). For each column panel of B (K x NR, in L1),
// every row block of A streams past it; per k, two B loads, MR broadcasts of A and 2 * MR FMAs. Ragged edges:
// a row tail is a smaller MR (a template argument), a column tail uses masked loads and stores.
// AVX-512 blocking: MR = 8 rows by up to NV = 3 vectors (48 floats, the bottleneck width at k = 12; 24 doubles):
// 24 accumulators, three B vectors and a broadcast of the 32 zmm registers; a column tail of one or two vectors
// (the last one masked) keeps 8 or 16 accumulators. Masked loads and stores only in the panel that needs them
// (a template argument): in the inner loop of every panel they halved the kernel's rate on AMD Zen 5.
// Each C element is one FMA chain over k in order in both kernels: results are deterministic, independent of m
// and n, and the same bits from either kernel.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EFFDENSE_AVX2_GEMM 1
#else
#define EFFDENSE_AVX2_GEMM 0
#endif

#if EFFDENSE_AVX2_GEMM && defined(__AVX512F__)
#define EFFDENSE_AVX512_GEMM 1
#else
#define EFFDENSE_AVX512_GEMM 0
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

#if EFFDENSE_AVX512_GEMM

#define EFFDENSE_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define EFFDENSE_UNROLL(n) EFFDENSE_PRAGMA(unroll n)
#elif defined(__GNUC__)
#define EFFDENSE_UNROLL(n) EFFDENSE_PRAGMA(GCC unroll n)
#else
#define EFFDENSE_UNROLL(n)
#endif

// The AVX-512 operations the kernel uses, per element type (16 floats or 8 doubles a vector; masks of lanes).
template <typename A>
struct Simd512;

template <>
struct Simd512<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
};

template <>
struct Simd512<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t L = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V loadu(const double* p) { return _mm512_loadu_pd(p); }
  static V load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static void storeu(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void store(double* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
};

// Lanes [0, n) of a vector (n in [1, L]).
template <typename A>
inline typename Simd512<A>::M lanes512(int64_t n) {
  return static_cast<typename Simd512<A>::M>((uint32_t{1} << n) - 1);
}

// Vector v of a row of NV vectors at p: the last one only in the lanes of `last` where MASKED (a masked load or
// store in the inner loop costs: full panels use plain ones).
template <typename A, int NV, bool MASKED>
inline typename Simd512<A>::V vload512(const A* p, int v, typename Simd512<A>::M last) {
  if (MASKED && v == NV - 1) return Simd512<A>::load(p, last);
  return Simd512<A>::loadu(p);
}

template <typename A, int NV, bool MASKED>
inline void vstore512(A* p, int v, typename Simd512<A>::M last, typename Simd512<A>::V x) {
  if (MASKED && v == NV - 1) Simd512<A>::store(p, last, x);
  else Simd512<A>::storeu(p, x);
}

// One register tile: C[MR, NV vectors] (=|+=) sum_k A(i, k) B[k, :] (with MASKED, the last vector only in the
// lanes of `last`).
template <typename A, int MR, int NV, bool MASKED>
inline void gemm_tile512(int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb, bool acc, A* c,
                         int64_t ldc, typename Simd512<A>::M last) {
  using S = Simd512<A>;
  // Every loop over r and v fully unrolled (the pragmas): otherwise GCC 12 may keep cv in memory, storing all
  // 24 accumulators to the stack on every k (seen in the 8 x 3 tiles: a third of the kernel's rate).
  typename S::V cv[MR][NV];
  EFFDENSE_UNROLL(8) for (int r = 0; r < MR; ++r)
    EFFDENSE_UNROLL(3) for (int v = 0; v < NV; ++v)
      cv[r][v] = acc ? vload512<A, NV, MASKED>(c + r * ldc + v * S::L, v, last) : S::zero();
  for (int64_t k = 0; k < K; ++k) {
    const A* bk = b + k * ldb;
    typename S::V bv[NV];
    EFFDENSE_UNROLL(3) for (int v = 0; v < NV; ++v) bv[v] = vload512<A, NV, MASKED>(bk + v * S::L, v, last);
    const A* ak = a + k * sak;
    EFFDENSE_UNROLL(8) for (int r = 0; r < MR; ++r) {
      const typename S::V av = S::bcast(ak + r * sai);
      EFFDENSE_UNROLL(3) for (int v = 0; v < NV; ++v) cv[r][v] = S::fma(av, bv[v], cv[r][v]);
    }
  }
  EFFDENSE_UNROLL(8) for (int r = 0; r < MR; ++r)
    EFFDENSE_UNROLL(3) for (int v = 0; v < NV; ++v)
      vstore512<A, NV, MASKED>(c + r * ldc + v * S::L, v, last, cv[r][v]);
}

template <typename A, int NV, bool MASKED>
inline void gemm_rows512(int64_t mr, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb,
                         bool acc, A* c, int64_t ldc, typename Simd512<A>::M last) {
  switch (mr) {
    case 8: return gemm_tile512<A, 8, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 7: return gemm_tile512<A, 7, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 6: return gemm_tile512<A, 6, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 5: return gemm_tile512<A, 5, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 4: return gemm_tile512<A, 4, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 3: return gemm_tile512<A, 3, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    case 2: return gemm_tile512<A, 2, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
    default: return gemm_tile512<A, 1, NV, MASKED>(K, a, sai, sak, b, ldb, acc, c, ldc, last);
  }
}

// One column panel of NV vectors (the last masked where MASKED) over all row blocks.
template <typename A, int NV, bool MASKED>
void gemm_panel512(int64_t m, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb, bool acc,
                   A* c, int64_t ldc, typename Simd512<A>::M last) {
  constexpr int64_t MR = 8;
  for (int64_t i = 0; i < m; i += MR)
    gemm_rows512<A, NV, MASKED>(std::min(MR, m - i), K, a + i * sai, sai, sak, b, ldb, acc, c + i * ldc, ldc, last);
}

// C[m, n] (=|+=) A B as gemm_avx2, in column panels of up to 3 vectors; where 3-vector panels would leave one
// vector over, the last four vectors are two panels of 2 (16 accumulators each instead of 24 + 8: an 8 x 1-vector
// tile waits on its FMA latency; n = 9k = 108 of the 3x3 convolution's GEMMs is such a case).
template <typename A>
void gemm_avx512(int64_t m, int64_t n, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b, int64_t ldb,
                 bool acc, A* c, int64_t ldc) {
  using S = Simd512<A>;
  const int64_t nvec = (n + S::L - 1) / S::L;
  for (int64_t j = 0, done = 0; j < n;) {  // done: vectors of columns done
    const int64_t left = nvec - done, nv = left % 3 == 1 && left > 1 && left <= 4 ? 2 : std::min<int64_t>(3, left);
    const int64_t nj = std::min(nv * S::L, n - j);
    const typename S::M last = lanes512<A>(nj - (nv - 1) * S::L);
    const bool masked = nj % S::L != 0;
    auto panel = [&](auto f) { f(m, K, a, sai, sak, b + j, ldb, acc, c + j, ldc, last); };
    if (nv == 3) masked ? panel(gemm_panel512<A, 3, true>) : panel(gemm_panel512<A, 3, false>);
    else if (nv == 2) masked ? panel(gemm_panel512<A, 2, true>) : panel(gemm_panel512<A, 2, false>);
    else masked ? panel(gemm_panel512<A, 1, true>) : panel(gemm_panel512<A, 1, false>);
    j += nj;
    done += nv;
  }
}

#endif  // EFFDENSE_AVX512_GEMM

#if EFFDENSE_AVX2_GEMM
// C[m, n] (=|+=) A B on the AVX-512 kernel where the build has it and `wide`, else on the AVX2 one.
template <typename A>
void gemm_simd(bool wide, int64_t m, int64_t n, int64_t K, const A* a, int64_t sai, int64_t sak, const A* b,
               int64_t ldb, bool acc, A* c, int64_t ldc) {
#if EFFDENSE_AVX512_GEMM
  if (wide) return gemm_avx512<A>(m, n, K, a, sai, sak, b, ldb, acc, c, ldc);
#endif
  gemm_avx2<A>(m, n, K, a, sai, sak, b, ldb, acc, c, ldc);
}
#endif

}  // namespace cpu
}  // namespace effdense
