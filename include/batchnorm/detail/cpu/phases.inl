/**
 * @file detail/cpu/phases.inl
 * @brief The CPU phases (see phases.hpp): the same loops as forward / backward
 *        (detail/cpu/functional.inl), with the statistics handed over in double records.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../moments.hpp"
#include "../phase_checks.hpp"
#include "../validate.hpp"
#include "functional.inl"

namespace batchnorm::phases {

template <class T>
void local_statistics(cpu, const Shape& shape, Mode mode, const T* x, span<double> statistics) {
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, mode);
  pc::check_local_statistics(shape, x, statistics, shard_statistics_size(features));
  // The record's two halves are the mean and M2 arrays (scratch of the loops taken first).
  detail::cpu_impl::reserve_scratch<T>(shape, mode);
  detail::cpu_impl::shard_moments(shape, mode, x, statistics.data + 1, statistics.data + 1 + features);
  statistics[0] = static_cast<double>(reduction_count(shape, mode));
}

template <class P>
void merge_statistics(cpu, std::int64_t features, const MergeArgs<P>& a, const MergeConfig& c) {
  namespace pc = detail::phase_checks;
  pc::check_merge(features, a, c, shard_statistics_size(features), normalization_size(features));
  const std::int64_t record = shard_statistics_size(features);
  const double total = pc::check_counts(a.shard_statistics.data, a.shards, record);

  // Chan's merge, shard after shard in the given order: the same records in the same order
  // give the same bits on every participant.
  namespace ci = detail::cpu_impl;
  auto* merged = ci::scratch<detail::Welford<double>>(ci::Scratch::feature_a, features);
  std::fill(merged, merged + features, detail::Welford<double>{});
  for (std::int64_t r = 0; r < a.shards; ++r) {
    const double* rec = a.shard_statistics.data + r * record;
    const auto count = static_cast<std::int64_t>(rec[0]);
    for (std::int64_t f = 0; f < features; ++f)
      merged[f] = detail::merge(merged[f], detail::Welford<double>{rec[1 + f], rec[1 + features + f], count});
  }
  double* out = a.normalization.data;
  if (total == 0.0) {  // every shard empty: nothing to normalize, running stats untouched (as forward)
    std::fill(out, out + normalization_size(features), 0.0);
    return;
  }
  // Running statistics: all features or none (skip_nonfinite_updates), as forward.
  const bool update = ci::updates_running_statistics<P>(
      features, [&](std::int64_t f) { return merged[f]; }, a.running_mean.data != nullptr, c.skip_nonfinite_updates,
      a.skipped_updates);
  out[0] = total;
  ci::for_each_feature(features, [&](std::int64_t f) {
    detail::finalize_merged_feature(merged[f], c.eps, c.exponential_average_factor, out + 1 + f,
                                    out + 1 + features + f, update ? a.running_mean.data + f : nullptr,
                                    update ? a.running_var.data + f : nullptr,
                                    a.save_mean.data ? a.save_mean.data + f : nullptr,
                                    a.save_invstd.data ? a.save_invstd.data + f : nullptr);
  });
}

template <class T>
void normalize(cpu, const Shape& shape, const NormalizeArgs<T>& a, const ElementwiseConfig& c) {
  namespace pc = detail::phase_checks;
  using detail::cpu_impl::value_or;
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_normalize(shape, a, c, normalization_size(features));
  pc::check_normalization_count(a.normalization, numel);
  if (numel == 0) return;
  namespace ci = detail::cpu_impl;
  auto* affine = ci::scratch<detail::Affine<double>>(ci::Scratch::feature_c, features);
  ci::reserve_scratch<T>(shape, c.mode);
  const double* rec = a.normalization.data;
  for (std::int64_t f = 0; f < features; ++f)
    affine[f] = detail::normalize_affine(rec[1 + f], rec[1 + features + f], value_or(a.weight, f, 1.0),
                                         value_or(a.bias, f, 0.0));
  detail::cpu_impl::normalize_elements(shape, c.mode, a.x, a.residual, c.activation, affine, a.y);
}

template <class T>
void local_gradient_sums(cpu, const Shape& shape, const GradientSumsArgs<T>& a, const ElementwiseConfig& c) {
  namespace pc = detail::phase_checks;
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_gradient_sums(shape, a, c, normalization_size(features), gradient_sums_size(features));
  pc::check_normalization_count(a.normalization, numel);
  namespace ci = detail::cpu_impl;
  auto* sums = ci::scratch<detail::BackwardSums<double>>(ci::Scratch::feature_b, features);
  ci::reserve_scratch<T>(shape, c.mode);
  std::fill(sums, sums + features, detail::BackwardSums<double>{});
  detail::cpu_impl::gradient_sums_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, a.normalization.data + 1,
                                           sums);
  for (std::int64_t f = 0; f < features; ++f) {
    a.gradient_sums[f] = sums[f].dy;
    a.gradient_sums[features + f] = sums[f].dy_xmu;
  }
}

template <class T>
void input_gradient(cpu, const Shape& shape, const InputGradientArgs<T>& a, const ElementwiseConfig& c) {
  namespace pc = detail::phase_checks;
  using detail::cpu_impl::value_or;
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_input_gradient(shape, a, c, normalization_size(features), gradient_sums_size(features));
  // A shard may be empty while the others are not (its parameter gradients still come from the
  // summed records); a count of 0 over all shards is only valid for an empty shard.
  pc::check_normalization_count(a.normalization, numel);
  const double* rec = a.normalization.data;
  const double total = rec[0];
  namespace ci = detail::cpu_impl;
  auto* k = ci::scratch<detail::BackwardCoefficients<double>>(ci::Scratch::feature_c, features);
  ci::reserve_scratch<T>(shape, c.mode);
  ci::for_each_feature(features, [&](std::int64_t f) {
    // Σ(x − mean) is 0: the mean is the merged one, in double (no saved-mean rounding to undo).
    const detail::BackwardSums<double> sums{a.gradient_sums[f], a.gradient_sums[features + f], 0.0};
    k[f] = total > 0.0 ? detail::backward_coefficients(sums, rec[1 + features + f], value_or(a.weight, f, 1.0),
                                                       static_cast<std::int64_t>(total), true)
                       : detail::BackwardCoefficients<double>{0, 0, 0, 0, 0, 0};
    detail::store_gradient(a.grad_weight.data ? a.grad_weight.data + f : nullptr, k[f].grad_weight, c.accumulate);
    detail::store_gradient(a.grad_bias.data ? a.grad_bias.data + f : nullptr, k[f].grad_bias, c.accumulate);
  });
  if (numel == 0) return;
  detail::cpu_impl::input_gradient_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, rec + 1, k, true,
                                            a.dx, a.dresidual);
}

}  // namespace batchnorm::phases
