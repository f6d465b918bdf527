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

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>

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
 * @brief merge()'s arithmetic for two non-empty sides, in place on side a's (@p mean, @p m2),
 *        given a's count and b's share of the total, count_b / (count_a + count_b). Split out
 *        so that a loop over many features with the same counts (the CPU rows statistics) runs
 *        it without the count branches, vectorized, with the same bits as merge().
 */
template <class Acc>
BN_HOST_DEVICE void merge_nonempty(Acc& mean, Acc& m2, Acc mean_b, Acc m2_b, Acc count_a, Acc b_share) {
  const Acc delta = mean_b - mean;
  mean = mean + delta * b_share;
  m2 = m2 + m2_b + delta * delta * count_a * b_share;
}

/**
 * @brief Chan et al.'s pairwise merge of two partial results; exact in real arithmetic,
 *        associative up to rounding, and safe when either side is empty.
 */
template <class Acc>
BN_HOST_DEVICE Welford<Acc> merge(const Welford<Acc>& a, const Welford<Acc>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  Welford<Acc> r = a;
  r.count = a.count + b.count;
  const Acc b_share = static_cast<Acc>(b.count) / static_cast<Acc>(r.count);
  merge_nonempty(r.mean, r.m2, b.mean, b.m2, static_cast<Acc>(a.count), b_share);
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
  // Rounding can make M2 a hair negative; variance is never negative. NaN stays NaN, so
  // that non-finite input is seen as such (by skip_nonfinite_updates, and in the output).
  const Acc m2 = w.m2 < Acc(0) ? Acc(0) : w.m2;
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

/**
 * @brief True when the statistics can be folded into running stats of type @p P without
 *        poisoning them: finite once rounded to P, the type update_running() stores.
 *
 * Checking in the accumulator type alone is not enough: a float batch {1e30, -1e30, ...}
 * has a variance that is finite in double and +inf in float. Finite in P suffices: the
 * update is a convex combination (factor in [0, 1]) of the running value and the statistic,
 * both below P's rounding threshold to infinity, so the stored value is finite too.
 */
template <class P, class Acc>
BN_HOST_DEVICE bool is_finite_as(const FeatureStats<Acc>& s) {
  return std::isfinite(static_cast<P>(s.mean)) && std::isfinite(static_cast<P>(s.biased_var)) &&
         std::isfinite(static_cast<P>(s.unbiased_var));
}

/// is_finite_as() where the running stats have the accumulator's type (the CUDA forward kernels,
/// Acc = P). Statistics accumulated in double for float running stats need is_finite_as<P>.
template <class Acc>
BN_HOST_DEVICE bool is_finite(const FeatureStats<Acc>& s) {
  return is_finite_as<Acc>(s);
}

/// Adds one to a caller's counter, saturating at 2^63 - 1 instead of overflowing (undefined).
BN_HOST_DEVICE void increment_saturating(std::int64_t& counter) {
  if (counter < INT64_MAX) ++counter;
}

/**
 * @brief One feature of phases::merge_statistics, once every shard's (count, mean, M2) is
 *        merged in double: its normalization-record entries (mean, invstd), save_mean /
 *        save_invstd rounded to P, and the running statistics (update_running, unbiased
 *        variance). The CPU and CUDA merges both call it, so they compute the same formulas.
 *        Whether to update is the caller's decision for all features at once
 *        (skip_nonfinite_updates needs every feature's is_finite_as<P>(finalize(merged))): a null
 *        @p running_mean means no update. @p merged.count > 0.
 * @return the feature's statistics, for a running update the caller defers
 */
template <class P>
BN_HOST_DEVICE FeatureStats<double> finalize_merged_feature(const Welford<double>& merged, double eps, double factor,
                                                            double* record_mean, double* record_invstd,
                                                            P* running_mean, P* running_var, P* save_mean,
                                                            P* save_invstd) {
  const FeatureStats<double> s = finalize(merged);
  const double invstd = inverse_std(s.biased_var, eps);
  *record_mean = s.mean;
  *record_invstd = invstd;
  if (save_mean) *save_mean = static_cast<P>(s.mean);
  if (save_invstd) *save_invstd = static_cast<P>(invstd);
  if (running_mean) update_running(*running_mean, *running_var, s, factor);
  return s;
}

/**
 * @brief y = ((x * prescale - pivot) - mean) * scale + bias, the normalization of one
 *        feature: (x − batch mean) · invstd · weight + bias, in a form that stays accurate
 *        and finite for any float data.
 *
 * (x − mean) is formed before scaling, as PyTorch's CUDA kernel does: folding the mean into
 * a shift (x · scale + shift) cancels catastrophically at large offsets. On the CPU,
 * prescale = 1 and pivot = 0. The GPU takes its float statistics of x · prescale − pivot
 * (see Pivot), so `pivot` and `mean` are in prescaled units and `scale` includes 1/prescale.
 */
template <class Acc>
struct Affine {
  Acc prescale;
  Acc pivot;
  Acc mean;  ///< relative to pivot
  Acc scale;
  Acc bias;
  BN_HOST_DEVICE Acc apply(Acc x) const { return ((x * prescale - pivot) - mean) * scale + bias; }
};

/// The affine map for a plain mean and inverse std (CPU statistics, running statistics).
template <class Acc>
BN_HOST_DEVICE Affine<Acc> normalize_affine(Acc mean, Acc invstd, Acc weight, Acc bias) {
  return {Acc(1), Acc(0), mean, invstd * weight, bias};
}

/**
 * @brief The reference point of a feature's float statistics on the GPU: one of its values,
 *        and a power of two that brings values of that magnitude near 1.
 *
 * Accumulating x · prescale − pivot instead of x keeps the accumulators at the size of the
 * spread rather than the offset (the mean keeps its digits at an offset of 1e6), and the
 * power-of-two prescale (exact) keeps M2 finite for data near 1e30 or FLT_MAX, whose
 * squared deviations overflow float (PyTorch #162489). Magnitudes below 2^32 are not
 * rescaled (tiny data needs no rescue: where x² underflows, var is far below any eps).
 */
template <class Acc>
struct Pivot {
  Acc prescale;  ///< 1, or 2^-e (<= 1) for a pivot of binary exponent e > 32
  Acc value;     ///< the pivot times prescale
};

template <class Acc>
BN_HOST_DEVICE Pivot<Acc> make_pivot(Acc x) {
  if (!std::isfinite(x) || x == Acc(0)) return {Acc(1), std::isfinite(x) ? x : Acc(0)};
  int exponent = 0;
  (void)std::frexp(x, &exponent);
  // The prescale stays a normal number (2^-126 at most for float): a subnormal one is 0 under
  // flush-to-zero. Values of exponent 127 or 128 then land near 2 or 4, which is as good.
  constexpr int smallest_normal_exponent = std::numeric_limits<Acc>::min_exponent - 1;  // -126 for float
  const int shift = exponent < -smallest_normal_exponent ? exponent : -smallest_normal_exponent;
  const Acc prescale = exponent > 32 ? std::ldexp(Acc(1), -shift) : Acc(1);
  return {prescale, x * prescale};
}

/// Statistics and normalization of a feature from Welford over x · prescale − pivot.
template <class Acc>
struct PivotedStats {
  FeatureStats<Acc> stats;  ///< in the data's units, for the running statistics
  Acc mean;                 ///< in the data's units (save_mean)
  Acc invstd;               ///< 1 / sqrt(var + eps) (save_invstd)
  Affine<Acc> affine;
};

template <class Acc>
BN_HOST_DEVICE PivotedStats<Acc> finalize_pivoted(const Welford<Acc>& w, const Pivot<Acc>& p, double eps, Acc weight,
                                                  Acc bias) {
  const FeatureStats<Acc> scaled = finalize(w);
  const Acc s = p.prescale;
  // Back to the data's units: division by a power of two is exact (s * s could underflow).
  const Acc var = scaled.biased_var / s / s;
  PivotedStats<Acc> r;
  r.mean = (p.value + scaled.mean) / s;
  r.stats = {r.mean, var, scaled.unbiased_var / s / s};
  Acc unit_scale;  // invstd in prescaled units: invstd / s
  if (std::isfinite(var) || std::isnan(var)) {
    // eps is added in the data's units, never as eps · s², which underflows for s < 2^-64
    // (data above ~1e19; ~2e16 with flush-to-zero) and made a constant feature's invstd inf.
    r.invstd = Acc(1) / std::sqrt(var + static_cast<Acc>(eps));
    unit_scale = r.invstd / s;
  } else {
    // var overflows the type (data near 1e30 or FLT_MAX): eps is negligible next to it, and
    // 1 / sqrt(var_s) in prescaled units stays finite.
    const Acc root = std::sqrt(scaled.biased_var);
    r.invstd = s / root;
    unit_scale = Acc(1) / root;
  }
  // invstd / s overflows only for a feature whose values are all equal (at magnitudes where
  // invstd / s > FLT_MAX, two distinct values differ by far more than sqrt(eps)): then every
  // x · s − pivot − mean is exactly 0, and any finite scale (the largest; 0 for weight 0) gives
  // y = bias, as on the CPU, instead of 0 · inf = NaN.
  Acc scale = unit_scale * weight;
  if (!std::isfinite(scale) && std::isfinite(r.invstd * weight)) {
    Acc largest;  // numeric_limits<Acc>::max() is host-only
    if constexpr (sizeof(Acc) == sizeof(float)) largest = FLT_MAX;
    else largest = static_cast<Acc>(DBL_MAX);
    scale = weight == Acc(0) ? Acc(0) : std::copysign(largest, weight);
  }
  r.affine = {s, p.value, scaled.mean, scale, bias};
  return r;
}

/// relu as torch.relu, in place: NaN and -0 pass through. Also for GCC vectors (the CPU
/// backend's eight-value loops), which is why it takes a reference and writes Acc{} for zero.
template <class Acc>
BN_HOST_DEVICE void apply_relu(Acc& v) {
  v = v < Acc{} ? Acc{} : v;
}

/// relu as torch.relu: NaN and -0 pass through.
template <class Acc>
BN_HOST_DEVICE Acc relu(Acc v) {
  apply_relu(v);
  return v;
}

/// Gradient through relu from its output y, as PyTorch's threshold_backward, in place on @p g:
/// zero where y <= 0, g elsewhere (also where y is NaN). Also for GCC vectors, as apply_relu.
template <class Acc>
BN_HOST_DEVICE void apply_relu_backward(Acc& g, const Acc& y) {
  g = y <= Acc{} ? Acc{} : g;
}

/// Gradient through relu from its output y, as PyTorch's threshold_backward:
/// zero where y <= 0, dy elsewhere (also where y is NaN).
template <class Acc>
BN_HOST_DEVICE Acc relu_backward(Acc dy, Acc y) {
  apply_relu_backward(dy, y);
  return dy;
}

/**
 * @brief The three sums of the backward pass over one feature's n values, each taken
 *        against the mean the forward *saved* (rounded to the parameter type):
 *        Σ dy, Σ dy·(x − saved_mean) and Σ (x − saved_mean). The third measures the
 *        saved mean's rounding error, so backward stays accurate when the data has a
 *        large offset (a float mean of data around 1e6 is off by up to 0.03).
 */
template <class Acc>
struct BackwardSums {
  Acc dy = Acc(0);
  Acc dy_xmu = Acc(0);
  Acc xmu = Acc(0);
};

/// Functor that adds two BackwardSums (for cub::BlockReduce / WarpReduce).
struct BackwardSumsAdd {
  template <class Acc>
  BN_HOST_DEVICE BackwardSums<Acc> operator()(const BackwardSums<Acc>& a, const BackwardSums<Acc>& b) const {
    return {a.dy + b.dy, a.dy_xmu + b.dy_xmu, a.xmu + b.xmu};
  }
};

/**
 * @brief Per-feature results of the backward pass (PyTorch's native_batch_norm_backward),
 *        with sum_dy = Σ dy, sum_dy_xmu = Σ dy·(x − mean) over n values:
 *  - grad_weight = sum_dy_xmu · invstd, grad_bias = sum_dy;
 *  - training (batch statistics): dx = (dy − sum_dy/n − (x−mean)·invstd²·sum_dy_xmu/n)·invstd·w
 *  - eval (running statistics):   dx = dy · invstd · w
 * In the form dx = dy · dy_scale + ((x − saved_mean) − mean_shift) · xmu_scale + constant,
 * where mean_shift = Σ(x − saved_mean)/n corrects the saved mean's rounding (training only;
 * in eval the running mean is exact by definition).
 */
template <class Acc>
struct BackwardCoefficients {
  Acc mean_shift;
  Acc dy_scale;   ///< multiplies dy
  Acc xmu_scale;  ///< multiplies (x − mean)
  Acc constant;   ///< added
  Acc grad_weight;
  Acc grad_bias;
};

template <class Acc>
BN_HOST_DEVICE BackwardCoefficients<Acc> backward_coefficients(const BackwardSums<Acc>& sums, Acc invstd, Acc weight,
                                                               std::int64_t n, bool batch_statistics) {
  const Acc dy_scale = invstd * weight;
  if (!batch_statistics) return {Acc(0), dy_scale, Acc(0), Acc(0), sums.dy_xmu * invstd, sums.dy};
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const Acc shift = sums.xmu * inv_n;
  const Acc dy_xmu = sums.dy_xmu - shift * sums.dy;  // Σ dy·(x − true mean)
  const Acc proj = dy_xmu * inv_n * invstd * invstd;
  return {shift, dy_scale, -proj * dy_scale, -sums.dy * inv_n * dy_scale, dy_xmu * invstd, sums.dy};
}

/// Writes a parameter gradient, or adds it (PyTorch's `.grad` accumulation); null: not wanted.
template <class P, class Acc>
BN_HOST_DEVICE void store_gradient(P* gradient, Acc value, bool accumulate) {
  if (gradient == nullptr) return;
  *gradient = static_cast<P>(accumulate ? static_cast<Acc>(*gradient) + value : value);
}

}  // namespace batchnorm::detail
