// EFFDENSE_HD: the qualifiers of an inline function that host and device code share (bn_math.h, the CUDA kernels'
// index math in cuda/conv1x1_tiling.h): __host__ __device__ under nvcc, a plain inline function otherwise. No
// CUDA headers: plain C++ compilers include the same files (the CPU kernels, tests/csrc/cuda_tiling_check.cpp).
#pragma once

#if defined(__CUDACC__)
#define EFFDENSE_HD __host__ __device__ __forceinline__
#else
#define EFFDENSE_HD inline
#endif
