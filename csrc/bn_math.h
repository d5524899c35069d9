// The per-channel batch-norm arithmetic of the extension, each formula written once for the CPU kernels and the
// CUDA kernels (host and device inline functions; no torch headers, so plain nvcc compiles it). The Python
// specification is effdense/backends/bn.py; the notation is its own:
//
//   mean, var (biased) over the P pixels of a channel; invstd = 1 / sqrt(var + eps)
//   scale = gamma * invstd, shift = beta - mean * scale: BN-ReLU is relu(x * scale + shift)
//   backward:  g = grad_y where x * scale + shift > 0 (or NaN: relu lets NaN through, as threshold_backward),
//              dbeta = sum g,  dgamma = sum g * xhat = invstd * sum g * (x - mean),
//              grad_x = scale * g  (running statistics: constants)  or, with the batch's statistics (d mean / dx =
//              1/P, d invstd / dx = -invstd^3 (x - mean) / P),
//              grad_x = scale * (g - dbeta / P - xhat * dgamma / P) = scale * g + alpha + beta * (x - mean),
//              alpha = -scale * dbeta / P,  beta = -scale * invstd * dgamma / P   (a per-channel affine correction)
//   running statistics (nn.BatchNorm2d): num_batches_tracked += 1, factor = momentum or 1 / num_batches_tracked
//              (momentum None), running = lerp(running, batch, factor), running_var towards var * n / (n - 1)
//   statistics of parts (tiles, chunks, processes) merged with Chan et al.'s formula on (count, mean, M2)
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "hd.h"

namespace effdense {
namespace bnmath {

// (scale, shift, invstd) of a BN from (gamma, beta, mean, var, eps), in A.
template <typename A>
EFFDENSE_HD void scale_shift(A gamma, A beta, A mean, A var, A eps, A& scale, A& shift, A& invstd) {
#if defined(__CUDA_ARCH__)
  invstd = A(1) / sqrt(var + eps);
#else
  invstd = A(1) / std::sqrt(var + eps);
#endif
  scale = gamma * invstd;
  shift = beta - mean * scale;
}

template <typename A>
EFFDENSE_HD A relu(A y) {
  return y <= A(0) ? A(0) : y;  // NaN passes, as torch.relu
}

// g = grad_y where relu's input x * scale + shift is positive or NaN (both operands loaded before the select: a
// branch-free select that vectorizes).
template <typename A>
EFFDENSE_HD A relu_grad(A x, A gy, A scale, A shift) {
  return x * scale + shift <= A(0) ? A(0) : gy;
}

// dgamma = invstd * sum g * (x - mean) over `count` pixels; with no pixels 0 (nn.BatchNorm2d's gradient of an
// empty batch), not 0 * invstd, which is NaN there (the statistics of nothing are NaN).
template <typename A>
EFFDENSE_HD A dgamma(A sum_gx, A invstd, int64_t count) {
  return count > 0 ? sum_gx * invstd : A(0);
}

// The batch-statistics correction grad_x = scale * g + alpha + beta * (x - mean) from the sums dbeta, dgamma over
// `count` pixels (of this process, or of every process under --sync-bn); no pixels, no correction.
template <typename A>
EFFDENSE_HD void correction(A scale, A invstd, A dbeta, A dgamma, int64_t count, A& alpha, A& beta) {
  const A inv = count > 0 ? A(1) / static_cast<A>(count) : A(0);
  alpha = count > 0 ? -scale * (dbeta * inv) : A(0);
  beta = count > 0 ? -scale * (dgamma * inv) * invstd : A(0);
}

// grad_x from scale * g: + alpha + beta * (x - mean), where beta * (x - mean) is nothing where beta is 0 (running
// statistics, or a channel no batch-statistics BN read), so that a NaN or Inf of x does not reach grad_x through
// 0 * (x - mean): the gradient with running statistics is scale * g whatever x is.
template <typename A>
EFFDENSE_HD A corrected(A scaled_g, A x, A mean, A alpha, A beta) {
  return scaled_g + alpha + (beta != A(0) ? beta * (x - mean) : A(0));
}

// torch's lerp (arithmetic as at::lerp: weight < 0.5 ? a + w (b - a) : b - (b - a)(1 - w)).
template <typename O>
EFFDENSE_HD O lerp(O a, O b, O w) {
  return w < O(0.5) ? a + w * (b - a) : b - (b - a) * (O(1) - w);
}

// The running statistics' lerp factor after num_batches_tracked became `tracked`: momentum, or 1 / tracked
// (a cumulative average) for momentum None (passed as a negative momentum).
EFFDENSE_HD double running_factor(double momentum, int64_t tracked) {
  return momentum < 0 ? 1.0 / static_cast<double>(tracked) : momentum;
}

// n / (n - 1): the biased batch variance to the unbiased one running_var takes (1 for a single value).
EFFDENSE_HD double unbiased_factor(int64_t count) {
  return count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
}

// A part's shift for its shifted sums: its first value when finite, else 0 (x - Inf would turn the Inf of an
// infinite value into NaN, where the mean of the values is Inf).
template <typename A>
EFFDENSE_HD A stat_shift(A first) {
  return first - first == A(0) ? first : A(0);  // finite: x - x is 0 (NaN for Inf and NaN)
}

// (count, mean, M2 = sum (x - mean)^2) of a set of values, merged with another set's by Chan et al.'s formula.
// A set with no values adds nothing. Where one mean is infinite, the merged mean is the weighted sum (Inf, or NaN
// for Inf and -Inf, as a sum over the values gives), not Inf + (finite - Inf) * w = NaN.
struct Moments {
  double n = 0, mean = 0, m2 = 0;

  EFFDENSE_HD void merge(double nb, double meanb, double m2b) {
    if (nb == 0) return;
    const double tot = n + nb, delta = meanb - mean;
    mean = delta - delta == 0.0 ? mean + delta * (nb / tot) : (n * mean + nb * meanb) / tot;
    m2 += m2b + delta * delta * (n * nb / tot);
    n = tot;
  }
  // the biased variance; NaN for no values (torch.var_mean of nothing)
  EFFDENSE_HD double var() const { return n > 0 ? m2 / n : std::numeric_limits<double>::quiet_NaN(); }
  EFFDENSE_HD double mean_or_nan() const { return n > 0 ? mean : std::numeric_limits<double>::quiet_NaN(); }
};

}  // namespace bnmath
}  // namespace effdense
