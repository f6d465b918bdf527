/**
 * @file detail/cuda/phase_math.hpp
 * @brief The arithmetic of the CUDA phases (detail/cuda/phases.inl) in plain C++ (no CUDA
 *        headers), so that CI, which has no GPU, tests it on the host
 *        (tests/cuda_phase_math_test.cpp): the kernels call these same functions.
 *
 * Records are doubles in the data's units (phases.hpp); the kernels accumulate in param_t<T>
 * (float for float / half / bfloat16). These functions are the hand-over in both directions:
 *  - a feature's float Welford over x · prescale − pivot → (mean, M2) in double, data units;
 *  - the merged double mean → a float pivot plus the rest, so that the float kernels form
 *    x − mean as (x − pivot) − rest: exact cancellation near the mean at any offset;
 *  - the shard counts → the total a merge may use, or NaN for records it must refuse.
 */
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../../args.hpp"
#include "../moments.hpp"
#include "../phase_checks.hpp"
#include "plan.hpp"

namespace batchnorm::detail::cuda_impl {

/// A feature's Welford over x · prescale − pivot (see Pivot) in the data's units, in double:
/// the shard record's mean and M2. Powers of two divide exactly; a rounding-negative M2 is 0.
template <class Acc>
BN_HOST_DEVICE void pivoted_to_record(const Welford<Acc>& w, const Pivot<Acc>& pivot, double* mean, double* m2) {
  const double s = static_cast<double>(pivot.prescale);
  *mean = (static_cast<double>(pivot.value) + static_cast<double>(w.mean)) / s;
  const double scaled_m2 = w.m2 < Acc(0) ? 0.0 : static_cast<double>(w.m2);
  *m2 = scaled_m2 / s / s;
}

/**
 * @brief The normalization of one feature from a normalization record's double mean and
 *        invstd: pivot = the mean rounded to Acc, Affine::mean = the rest (mean − pivot,
 *        rounded), so Affine::apply forms (x − pivot) − rest, which for float data near a
 *        large offset loses nothing that x − mean in double would keep. The scale is
 *        invstd · weight rounded once; when only the rounding to float overflows (a constant
 *        feature with a tiny eps), it is the largest finite value, as finalize_pivoted does.
 */
template <class Acc>
BN_HOST_DEVICE Affine<Acc> record_affine(double mean, double invstd, double weight, double bias) {
  const Acc pivot = static_cast<Acc>(mean);
  const Acc rest = static_cast<Acc>(mean - static_cast<double>(pivot));
  const double wide_scale = invstd * weight;
  Acc scale = static_cast<Acc>(wide_scale);
  if (!std::isfinite(scale) && std::isfinite(wide_scale)) {
    Acc largest;  // numeric_limits<Acc>::max() is host-only
    if constexpr (sizeof(Acc) == sizeof(float)) largest = FLT_MAX;
    else largest = static_cast<Acc>(DBL_MAX);
    scale = std::copysign(largest, static_cast<Acc>(wide_scale));
  }
  return {Acc(1), pivot, rest, scale, static_cast<Acc>(bias)};
}

/**
 * @brief A shard's gradient sums against the record's double @p mean from the kernels' sums
 *        against that mean rounded to Acc (GradAccumulator): Σdy·(x − mean) =
 *        Σdy·(x − mean_acc) − (mean − mean_acc)·Σdy, with mean − mean_acc exact in double.
 */
template <class Acc>
BN_HOST_DEVICE void gradient_sums_to_record(const BackwardSums<Acc>& sums, double mean, double* sum_dy,
                                            double* sum_dy_xmu) {
  const double shift = mean - static_cast<double>(static_cast<Acc>(mean));
  *sum_dy = static_cast<double>(sums.dy);
  *sum_dy_xmu = static_cast<double>(sums.dy_xmu) - shift * static_cast<double>(sums.dy);
}

/// The per-column coefficients of InputGradOp from the record's double mean and the double
/// coefficients: (x − mean_acc) − mean_shift with mean_shift = mean − mean_acc is x − mean.
template <class Acc>
BN_HOST_DEVICE ColumnGrad<Acc> record_column_grad(double mean, const BackwardCoefficients<double>& k) {
  const Acc rounded = static_cast<Acc>(mean);
  return {rounded, static_cast<Acc>(mean - static_cast<double>(rounded)), static_cast<Acc>(k.dy_scale),
          static_cast<Acc>(k.xmu_scale), static_cast<Acc>(k.constant)};
}

/**
 * @brief The total count of @p shards shard records (@p record_size doubles each, count
 *        first), as the merge kernel checks it on the device: NaN when a count is not a whole
 *        number >= 0, the total is above 2^53, or the total is 1 (one value per feature: no
 *        variance to train with). The CPU throws for the same records (check_counts).
 */
BN_HOST_DEVICE double merged_total(const double* records, std::int64_t shards, std::int64_t record_size) {
  double total = 0.0;
  bool valid = true;
  for (std::int64_t r = 0; r < shards; ++r) {
    const double count = records[r * record_size];
    valid = valid && phase_checks::is_count(count);
    total += count;
  }
  valid = valid && total <= phase_checks::max_exact_count && total != 1.0;
  return valid ? total : std::numeric_limits<double>::quiet_NaN();
}

/// The workspace of merge_statistics: with a deferred running update (skip_nonfinite_updates
/// and running statistics), every feature's statistics and one flag; otherwise nothing.
struct MergeLayout {
  std::size_t stats = 0, flag = 0, total = 0;
};
inline MergeLayout merge_layout(std::int64_t features, bool deferred) {
  if (!deferred) return {};
  MergeLayout m;
  m.flag = align_up(static_cast<std::size_t>(features) * sizeof(FeatureStats<double>));
  m.total = m.flag + sizeof(int);
  return m;
}

/// Workspace bytes of each phase on a non-empty shape (Plan) with accumulation type Acc.
template <class Acc>
std::size_t local_statistics_bytes(const Plan& p) {
  return static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(p.features) * sizeof(Welford<Acc>);
}
template <class Acc>
std::size_t gradient_sums_bytes(const Plan& p) {
  return static_cast<std::size_t>(p.splits) * static_cast<std::size_t>(p.features) * sizeof(BackwardSums<Acc>);
}
template <class Acc>
std::size_t normalize_bytes(std::int64_t features) {
  return static_cast<std::size_t>(features) * sizeof(Affine<Acc>);
}
template <class Acc>
std::size_t input_gradient_bytes(std::int64_t features) {
  return static_cast<std::size_t>(features) * sizeof(ColumnGrad<Acc>);
}

/// Enough for every phase of @p shape in @p mode (the merge with a deferred update included).
template <class Acc>
std::size_t phases_workspace_bytes(const Shape& shape, Mode mode, const LaunchPolicy& policy) {
  const std::int64_t features = feature_count(shape, mode);
  std::size_t bytes = merge_layout(features, true).total;
  if (shape.numel() == 0) return bytes;  // no reduction, no elementwise pass
  const Plan plan = make_plan(shape, mode, policy);
  bytes = std::max({bytes, local_statistics_bytes<Acc>(plan), gradient_sums_bytes<Acc>(plan),
                    normalize_bytes<Acc>(features), input_gradient_bytes<Acc>(features)});
  return bytes;
}

}  // namespace batchnorm::detail::cuda_impl
