/**
 * @file detail/moments.hpp
 * @brief The one home of BatchNorm's arithmetic, compiled for host and device alike:
 *        Welford accumulation, Chan's merge of partial results, finalization into
 *        mean / biased variance / inverse std, the running-statistics update, and the
 *        per-feature backward coefficients.
 *
 * CI has no GPU, so every formula the CUDA kernels use is here and tested on the host;
 * a GPU run then only has to prove the kernels' indexing and cooperation.
 */
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BN_HOST_DEVICE inline
#endif

namespace batchnorm::detail {

/**
 * @brief Count, mean and sum of squared deviations (M2) of a set of values.
 *
 * Never E[x^2] - E[x]^2: that cancels catastrophically for data with a large offset.
 * @tparam Acc accumulation type (float on the GPU for float data, double otherwise).
 */
template <class Acc>
struct Welford {
  Acc mean = Acc(0);
  Acc m2 = Acc(0);
  std::int64_t count = 0;

  /// Adds one value (Welford 1962).
  BN_HOST_DEVICE void push(Acc x) {
    ++count;
    const Acc delta = x - mean;
    mean += delta / static_cast<Acc>(count);
    m2 += delta * (x - mean);
  }
};

/**
 * @brief Chan et al.'s pairwise merge of two partial results; exact in real arithmetic,
 *        associative up to rounding, and safe when either side is empty.
 */
template <class Acc>
BN_HOST_DEVICE Welford<Acc> merge(const Welford<Acc>& a, const Welford<Acc>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  Welford<Acc> r;
  r.count = a.count + b.count;
  const Acc delta = b.mean - a.mean;
  const Acc b_share = static_cast<Acc>(b.count) / static_cast<Acc>(r.count);
  r.mean = a.mean + delta * b_share;
  r.m2 = a.m2 + b.m2 + delta * delta * static_cast<Acc>(a.count) * b_share;
  return r;
}

/// Functor form of merge(), for cub::BlockReduce / WarpReduce.
struct WelfordMerge {
  template <class Acc>
  BN_HOST_DEVICE Welford<Acc> operator()(const Welford<Acc>& a, const Welford<Acc>& b) const {
    return merge(a, b);
  }
};

/// 1 / sqrt(var + eps), the factor PyTorch saves as `save_invstd`.
template <class Acc>
BN_HOST_DEVICE Acc inverse_std(Acc biased_var, double eps) {
  return Acc(1) / std::sqrt(biased_var + static_cast<Acc>(eps));
}

/// Statistics of one feature, derived from its Welford result.
template <class Acc>
struct FeatureStats {
  Acc mean;
  Acc biased_var;    ///< M2 / n: used to normalize
  Acc unbiased_var;  ///< M2 / (n - 1): used for running_var (n > 1 guaranteed by validation)
};

template <class Acc>
BN_HOST_DEVICE FeatureStats<Acc> finalize(const Welford<Acc>& w) {
  const Acc n = static_cast<Acc>(w.count);
  // Rounding can make M2 a hair negative for constant data; variance is never negative.
  const Acc m2 = w.m2 > Acc(0) ? w.m2 : Acc(0);
  return {w.mean, m2 / n, w.count > 1 ? m2 / (n - Acc(1)) : Acc(0)};
}

/**
 * @brief running = (1 - factor) * running + factor * batch, in PyTorch's operand order
 *        (`factor * batch + (1 - factor) * running`), for running_mean with the batch
 *        mean and for running_var with the unbiased batch variance.
 *
 * @p factor is `momentum`, or `1 / num_batches_tracked` for the cumulative average.
 */
template <class P, class Acc>
BN_HOST_DEVICE void update_running(P& running_mean, P& running_var, const FeatureStats<Acc>& s,
                                   double factor) {
  const Acc f = static_cast<Acc>(factor);
  running_mean = static_cast<P>(f * s.mean + (Acc(1) - f) * static_cast<Acc>(running_mean));
  running_var = static_cast<P>(f * s.unbiased_var + (Acc(1) - f) * static_cast<Acc>(running_var));
}

/// True when the statistics can be folded into running stats without poisoning them.
template <class Acc>
BN_HOST_DEVICE bool is_finite(const FeatureStats<Acc>& s) {
  return std::isfinite(s.mean) && std::isfinite(s.biased_var) && std::isfinite(s.unbiased_var);
}

/**
 * @brief y = (x - mean) * scale + bias with scale = invstd * weight (weight 1 and bias 0
 *        when the layer is not affine). (x - mean) is formed first, as PyTorch's CUDA kernel
 *        does: folding the mean into the shift (x * scale + shift) would cancel
 *        catastrophically for inputs with a large offset.
 */
template <class Acc>
struct Affine {
  Acc mean;
  Acc scale;
  Acc bias;
  BN_HOST_DEVICE Acc apply(Acc x) const { return (x - mean) * scale + bias; }
};

template <class Acc>
BN_HOST_DEVICE Affine<Acc> normalize_affine(Acc mean, Acc invstd, Acc weight, Acc bias) {
  return {mean, invstd * weight, bias};
}

/// relu that lets NaN through, as torch.relu does (and maps -0 to +0).
template <class Acc>
BN_HOST_DEVICE Acc relu(Acc v) {
  return v <= Acc(0) ? Acc(0) : v;
}

/**
 * @brief Per-feature coefficients of the backward pass, from the two reductions
 *        sum_dy = Σ dy and sum_dy_xmu = Σ dy·(x − mean) over n elements, so that
 *        dx = dy * dy_scale + (x − mean) * xmu_scale + constant   (PyTorch's
 *        native_batch_norm_backward):
 *  - training (batch statistics): dx = (dy − sum_dy/n − (x−mean)·invstd²·sum_dy_xmu/n)·invstd·w
 *  - eval (running statistics):   dx = dy · invstd · w
 */
template <class Acc>
struct BackwardCoefficients {
  Acc dy_scale;   ///< multiplies dy
  Acc xmu_scale;  ///< multiplies (x - mean)
  Acc constant;   ///< added
};

template <class Acc>
BN_HOST_DEVICE BackwardCoefficients<Acc> backward_coefficients(Acc sum_dy, Acc sum_dy_xmu, Acc invstd,
                                                               Acc weight, std::int64_t n,
                                                               bool batch_statistics) {
  const Acc dy_scale = invstd * weight;
  if (!batch_statistics) return {dy_scale, Acc(0), Acc(0)};
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const Acc mean_dy = sum_dy * inv_n;
  const Acc proj = sum_dy_xmu * inv_n * invstd * invstd;
  return {dy_scale, -proj * dy_scale, -mean_dy * dy_scale};
}

}  // namespace batchnorm::detail
