// Tiling and index math of the fused BN-ReLU-Conv1x1 kernel (conv1x1.cu), shared with its host-side test
// (tests/csrc/cuda_tiling_check.cpp, compiled with a plain C++ compiler): which thread stages which part of which
// tile, and how much of it lies inside the matrices. No CUDA headers.
//
// The kernel computes z[P, B] = relu(x[P, C] * scale + shift) @ w[B, C]^T; a block owns a BM x BN tile of z
// (pixels p0.., outputs n0..) and walks C in steps of BK. Per step it stages an x tile [BM][BK] and a w tile
// [BN][BK] in shared memory, either in chunks of kVec consecutive elements (16 bytes: cp.async) or element by
// element. Out-of-range elements are staged as 0 (a zero row/column adds nothing to the product).
#pragma once

#include <cstdint>

#include "../hd.h"

namespace effdense {
namespace cuda {
namespace conv1x1 {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int PAD = 8, LDS = BK + PAD;  // shared row stride: a multiple of 8 elements (WMMA), 80 bytes (banks)
constexpr int kWarps = 4, kThreads = 32 * kWarps, LDC = BN + 4;
constexpr int kVec = 8;                       // 16-bit elements per 16-byte chunk
constexpr int kChunksPerRow = BK / kVec;      // 4
constexpr int kXChunks = BM * BK / kVec;      // 256: two per thread
constexpr int kWChunks = BN * BK / kVec;      // 256: two per thread
static_assert(kXChunks % kThreads == 0 && kWChunks % kThreads == 0, "every thread stages whole chunks");
static_assert(BM % 32 == 0 && BN % 32 == 0 && BK % 16 == 0, "four warps of 32 x 32, WMMA k-steps of 16");

struct Chunk {
  int row;  // tile row (pixel or output offset)
  int col;  // tile column (channel offset), a multiple of kVec
};

// Chunk i of a [rows][BK] tile; a thread stages chunks tid, tid + kThreads, ...
EFFDENSE_HD Chunk chunk_of(int i) { return Chunk{i / kChunksPerRow, (i % kChunksPerRow) * kVec}; }

// Elements of a chunk at (row index r of R, channel c of C) that lie inside the matrix: 0..kVec. A partial chunk
// (the last channels when C % kVec != 0) is zero-filled past C by cp.async's src-size operand.
EFFDENSE_HD int chunk_valid(int64_t r, int64_t R, int64_t c, int64_t C) {
  if (r >= R || c >= C) return 0;
  return C - c < kVec ? static_cast<int>(C - c) : kVec;
}

// Element e of a [rows][BK] tile staged element by element: thread tid stages e = tid, tid + kThreads, ...
EFFDENSE_HD Chunk element_of(int e) { return Chunk{e / BK, e % BK}; }

// The k-steps of a block: ceil(C / BK).
EFFDENSE_HD int64_t k_steps(int64_t C) { return (C + BK - 1) / BK; }

// The 16-byte path needs 16-byte aligned rows: a leading dimension that is a multiple of kVec elements and an
// aligned base pointer. x (a channel prefix of the feature buffer, leading dimension ld) and w (rows of C)
// qualify independently: x needs ld % 8 == 0 (padded buffers), w needs C % 8 == 0.
EFFDENSE_HD bool rows_vectorizable(int64_t ld, uintptr_t base) { return ld % kVec == 0 && base % 16 == 0; }

}  // namespace conv1x1
}  // namespace cuda
}  // namespace effdense
