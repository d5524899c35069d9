// Host-side check of the index math of the fused BN-ReLU-Conv1x1 CUDA kernel (csrc/cuda/conv1x1.cu), run by
// tests/csrc/test_cuda_tiling.py: no GPU here, so the kernel's staging loops are replayed on the CPU with the same
// tiling functions (csrc/cuda/conv1x1_tiling.h), thread by thread and k-step by k-step, through both stage
// buffers, and the result is compared with the plain product z = relu(x * scale + shift) @ w^T.
//
// Checked per shape and per operand path (16-byte chunks or elements): every shared-memory element of a stage
// is written exactly once per k-step; chunk copies read only inside the matrices (a read past a row's C
// channels or past the last pixel aborts: x's padding columns hold NaN, so a masked read would also show in
// z) and are 16-byte aligned at both ends; the zero fill of partial and out-of-range chunks is left
// untransformed; z matches exactly (small integers: every sum is exact in double).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "conv1x1_tiling.h"

using namespace effdense::cuda::conv1x1;

namespace {

int failures = 0;

void check(bool ok, const char* what, long a, long b, long c) {
  if (!ok && failures++ < 20) std::printf("FAIL: %s (%ld, %ld, %ld)\n", what, a, b, c);
}

struct Problem {
  long P, C, ld, B;
  std::vector<double> x, w, scale, shift;  // x [P][ld] (columns >= C: NaN padding), w [B][C]
};

Problem make(long P, long C, long ld, long B) {
  Problem pr{P, C, ld, B, std::vector<double>(P * ld, NAN), std::vector<double>(B * C), {}, {}};
  for (long p = 0; p < P; ++p)
    for (long c = 0; c < C; ++c) pr.x[p * ld + c] = static_cast<double>((p * 7 + c * 3) % 11) - 5;
  for (long i = 0; i < B * C; ++i) pr.w[i] = static_cast<double>((i * 5) % 7) - 3;
  for (long c = 0; c < C; ++c) {
    pr.scale.push_back(static_cast<double>(c % 3) - 1);  // -1, 0, 1
    pr.shift.push_back(static_cast<double>(c % 4) - 1);  // relu(0 * scale + shift) != 0 for some channels
  }
  return pr;
}

double bn_relu(const Problem& pr, long p, long c) {
  const double v = pr.x[p * pr.ld + c] * pr.scale[c] + pr.shift[c];
  return v <= 0 ? 0 : v;
}

// One stage buffer of one operand: [rows][LDS], with a write count per element for the coverage check.
struct Tile {
  double v[BM > BN ? BM : BN][LDS];
  int writes[BM > BN ? BM : BN][LDS];
};

// The kernel's stage() for one operand: x (rows = pixels, BN-ReLU on the element path) or w (rows = outputs).
void stage(Tile& t, const Problem& pr, bool is_x, bool vec, long r0, long k0) {
  const long R = is_x ? pr.P : pr.B, ldm = is_x ? pr.ld : pr.C;
  const std::vector<double>& m = is_x ? pr.x : pr.w;
  const int rows = is_x ? BM : BN;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < BK; ++c) t.writes[r][c] = 0;
  for (int tid = 0; tid < kThreads; ++tid) {
    if (vec) {
      for (int i = tid; i < (is_x ? kXChunks : kWChunks); i += kThreads) {
        const Chunk ch = chunk_of(i);
        const long row = r0 + ch.row, c = k0 + ch.col;
        const int n = chunk_valid(row, R, c, pr.C);
        check(n >= 0 && n <= kVec, "chunk size", row, c, n);
        if (n > 0) {  // the source range [row * ldm + c, + n) lies inside the row's first C channels
          check(row < R && c + n <= pr.C && (row * ldm + c) * 2 % 16 == 0, "chunk source", row, c, n);
        }
        check((ch.row * LDS + ch.col) * 2 % 16 == 0 && ch.col + kVec <= BK, "chunk destination", ch.row, ch.col, 0);
        for (int j = 0; j < kVec; ++j) {
          t.v[ch.row][ch.col + j] = j < n ? m.at(row * ldm + c + j) : 0.0;  // cp.async: n elements, zero fill
          t.writes[ch.row][ch.col + j]++;
        }
      }
    } else {
      for (int e = tid; e < rows * BK; e += kThreads) {
        const Chunk el = element_of(e);
        const long row = r0 + el.row, c = k0 + el.col;
        const bool in = row < R && c < pr.C;
        t.v[el.row][el.col] = !in ? 0.0 : is_x ? bn_relu(pr, row, c) : m.at(row * ldm + c);
        t.writes[el.row][el.col]++;
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < BK; ++c) check(t.writes[r][c] == 1, "stage element written once", r, c, t.writes[r][c]);
}

// The kernel's bn_relu_staged(): each thread transforms the x chunks it copied.
void bn_relu_staged(Tile& t, const Problem& pr, long p0, long k0) {
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = tid; i < kXChunks; i += kThreads) {
      const Chunk ch = chunk_of(i);
      const long c = k0 + ch.col;
      const int n = chunk_valid(p0 + ch.row, pr.P, c, pr.C);
      for (int j = 0; j < n; ++j) {
        const double f = t.v[ch.row][ch.col + j] * pr.scale[c + j] + pr.shift[c + j];
        t.v[ch.row][ch.col + j] = f <= 0 ? 0 : f;
      }
    }
}

// One block's k-loop and epilogue, with the kernel's stage-buffer schedule; writes its tile of z.
void run_block(const Problem& pr, bool vx, bool vw, long p0, long n0, std::vector<double>& z, std::vector<int>& zw) {
  static Tile As[2], Bs[2];
  static double acc[BM][BN];
  for (auto& row : acc)
    for (double& v : row) v = 0;
  const long steps = k_steps(pr.C);
  stage(As[0], pr, true, vx, p0, 0);
  stage(Bs[0], pr, false, vw, n0, 0);
  for (long t = 0; t < steps; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < steps) {
      stage(As[cur ^ 1], pr, true, vx, p0, (t + 1) * BK);
      stage(Bs[cur ^ 1], pr, false, vw, n0, (t + 1) * BK);
    }
    if (vx) bn_relu_staged(As[cur], pr, p0, t * BK);
    for (int r = 0; r < BM; ++r)
      for (int n = 0; n < BN; ++n)
        for (int k = 0; k < BK; ++k) acc[r][n] += As[cur].v[r][k] * Bs[cur].v[n][k];
  }
  for (int i = 0; i < BM * BN; ++i) {
    const int r = i / BN, cc = i % BN;
    const long p = p0 + r, n = n0 + cc;
    if (p < pr.P && n < pr.B) {
      z[p * pr.B + n] = acc[r][cc];
      zw[p * pr.B + n]++;
    }
  }
}

int check_problem(long P, long C, long ld, long B) {
  const Problem pr = make(P, C, ld, B);
  std::vector<double> ref(P * B, 0);
  for (long p = 0; p < P; ++p)
    for (long n = 0; n < B; ++n)
      for (long c = 0; c < C; ++c) ref[p * B + n] += bn_relu(pr, p, c) * pr.w[n * C + c];
  int variants = 0;
  for (int vx = 0; vx < 2; ++vx)
    for (int vw = 0; vw < 2; ++vw) {
      // the launcher's choice (base pointers of a caching allocator are 16-byte aligned)
      if ((vx && !rows_vectorizable(ld, 0)) || (vw && !rows_vectorizable(C, 0))) continue;
      std::vector<double> z(P * B, NAN);
      std::vector<int> zw(P * B, 0);
      for (long p0 = 0; p0 < P; p0 += BM)
        for (long n0 = 0; n0 < B; n0 += BN) run_block(pr, vx, vw, p0, n0, z, zw);
      for (long i = 0; i < P * B; ++i) {
        check(zw[i] == 1, "z element written once", P, C, i);
        check(z[i] == ref[i], "z equals the reference", P * 1000 + C, vx * 10 + vw, i);
      }
      ++variants;
    }
  return variants;
}

}  // namespace

int main() {
  // P, C, ld, B: full and partial tiles in every dimension, C % 8 != 0 with a padded ld % 8 == 0 (x chunked, w by
  // element), C % 8 == 0 (both chunked), odd ld (element path only), a partial last chunk, several k-steps
  const long shapes[][4] = {{1, 1, 1, 1},      {64, 32, 32, 64},  {100, 36, 40, 48}, {130, 24, 64, 12},
                            {77, 8, 8, 130},   {64, 60, 64, 48},  {5, 100, 104, 70}, {70, 37, 37, 33},
                            {129, 96, 96, 65}, {3, 12, 16, 200},  {65, 33, 48, 1}};
  int variants = 0;
  for (const auto& s : shapes) variants += check_problem(s[0], s[1], s[2], s[3]);
  std::printf("%zu shapes, %d operand-path variants checked, %d failures\n", sizeof(shapes) / sizeof(shapes[0]),
              variants, failures);
  return failures == 0 ? 0 : 1;
}
