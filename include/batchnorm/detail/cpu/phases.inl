/**
 * @file detail/cpu/phases.inl
 * @brief The CPU phases (see phases.hpp): the same loops as forward / backward
 *        (detail/cpu/functional.inl), with the statistics handed over in double records.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../moments.hpp"
#include "../validate.hpp"
#include "functional.inl"

namespace batchnorm::detail::phase_checks {

inline void check_features(std::int64_t features) {
  require(features >= 0, "features", "features: expected a value >= 0, got ", features);
}

template <class E>
void check_record(const span<E>& record, const char* argument, std::int64_t expected) {
  require(record.data != nullptr && record.size == expected, argument, argument, ": expected a buffer of ", expected,
          " doubles, got ", record.data ? record.size : 0, record.data ? "" : " (nullptr)");
}

/// A count in a record: a whole number >= 0 that a double holds exactly.
inline bool is_count(double c) { return c >= 0.0 && c <= 9007199254740992.0 && std::floor(c) == c; }

/// Checks a normalization record's count before a pass over @p numel elements uses it.
inline void check_normalization(const span<const double>& normalization, std::int64_t features, std::int64_t numel) {
  check_record(normalization, "normalization", phases::normalization_size(features));
  const double count = normalization.data[0];
  require(is_count(count) && (numel == 0 || count > 0.0), "normalization",
          "normalization: expected a record from merge_statistics (count > 0), got count ", count);
}

template <class P>
void check_weight_bias(const span<const P>& weight, const span<const P>& bias, std::int64_t features, bool need_pair) {
  if (need_pair) check_pair(weight, bias, "weight", "bias");
  check_feature_span(weight, "weight", features, false);
  if (need_pair) check_feature_span(bias, "bias", features, false);
}

}  // namespace batchnorm::detail::phase_checks

namespace batchnorm::phases {

template <class T>
void local_statistics(cpu, const Shape& shape, Mode mode, const T* x, span<double> statistics) {
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, mode);
  detail::check_pointer(x, "x", shape.numel());
  pc::check_record(statistics, "statistics", shard_statistics_size(features));
  std::vector<double> mean(static_cast<std::size_t>(features)), m2(static_cast<std::size_t>(features));
  detail::cpu_impl::shard_moments(shape, mode, x, mean.data(), m2.data());
  statistics[0] = static_cast<double>(reduction_count(shape, mode));
  std::copy(mean.begin(), mean.end(), statistics.data + 1);
  std::copy(m2.begin(), m2.end(), statistics.data + 1 + features);
}

template <class P>
void merge_statistics(cpu, std::int64_t features, const MergeArgs<P>& a, const MergeConfig& c) {
  namespace pc = detail::phase_checks;
  pc::check_features(features);
  detail::require(a.shards >= 1, "shards", "shards: expected a value >= 1, got ", a.shards);
  const std::int64_t record = shard_statistics_size(features);
  detail::require(a.shard_statistics.data != nullptr && a.shard_statistics.size == a.shards * record,
                  "shard_statistics", "shard_statistics: expected ", a.shards, " records of ", record,
                  " doubles (", a.shards * record, "), got ", a.shard_statistics.data ? a.shard_statistics.size : 0);
  pc::check_record(a.normalization, "normalization", normalization_size(features));
  detail::check_eps(c.eps);
  detail::check_momentum(c.exponential_average_factor, "exponential_average_factor");
  detail::check_pair(a.running_mean, a.running_var, "running_mean", "running_var");
  detail::check_feature_span(a.running_mean, "running_mean", features, false);
  detail::check_feature_span(a.running_var, "running_var", features, false);
  detail::check_feature_span(a.save_mean, "save_mean", features, false);
  detail::check_feature_span(a.save_invstd, "save_invstd", features, false);

  // Chan's merge, shard after shard in the given order: the same records in the same order
  // give the same bits on every participant.
  std::vector<detail::Welford<double>> merged(static_cast<std::size_t>(features));
  double total = 0.0;
  for (std::int64_t r = 0; r < a.shards; ++r) {
    const double* rec = a.shard_statistics.data + r * record;
    detail::require(pc::is_count(rec[0]), "shard_statistics", "shard_statistics: expected the count of shard ", r,
                    " to be a whole number >= 0, got ", rec[0]);
    total += rec[0];
  }
  detail::require(total <= 9007199254740992.0, "shard_statistics",
                  "shard_statistics: expected a total count below 2^53, got ", total);
  detail::require(total != 1.0, "shard_statistics",
                  "shard_statistics: expected more than 1 value per channel when training, got 1 over all ",
                  a.shards, " shards");
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
  std::vector<double> mean(static_cast<std::size_t>(features)), m2(static_cast<std::size_t>(features)),
      var(static_cast<std::size_t>(features));
  for (std::int64_t f = 0; f < features; ++f) {
    mean[f] = merged[f].mean;
    m2[f] = merged[f].m2;
  }
  detail::cpu_impl::finalize_batch_statistics(features, static_cast<std::int64_t>(total), mean.data(), m2.data(),
                                              var.data(), a.running_mean, a.running_var, c.exponential_average_factor,
                                              c.skip_nonfinite_updates, a.skipped_updates);
  out[0] = total;
  for (std::int64_t f = 0; f < features; ++f) {
    const double invstd = detail::inverse_std(var[f], c.eps);
    out[1 + f] = mean[f];
    out[1 + features + f] = invstd;
    if (a.save_mean.data) a.save_mean[f] = static_cast<P>(mean[f]);
    if (a.save_invstd.data) a.save_invstd[f] = static_cast<P>(invstd);
  }
}

template <class T>
void normalize(cpu, const Shape& shape, const NormalizeArgs<T>& a, const ElementwiseConfig& c) {
  namespace pc = detail::phase_checks;
  using detail::cpu_impl::value_or;
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  detail::check_pointer(a.x, "x", numel);
  detail::check_pointer(a.y, "y", numel);
  detail::require(!detail::partially_overlap(a.x, a.y, numel), "y",
                  "y: expected the same address as x (in place) or no overlap with it, got a partial overlap");
  detail::require(!detail::partially_overlap(a.residual, a.y, numel), "residual",
                  "residual: expected the same address as y or no overlap with it, got a partial overlap");
  pc::check_weight_bias(a.weight, a.bias, features, true);
  pc::check_normalization(a.normalization, features, numel);
  if (numel == 0) return;
  std::vector<detail::Affine<double>> affine(static_cast<std::size_t>(features));
  const double* rec = a.normalization.data;
  for (std::int64_t f = 0; f < features; ++f)
    affine[f] = detail::normalize_affine(rec[1 + f], rec[1 + features + f], value_or(a.weight, f, 1.0),
                                         value_or(a.bias, f, 0.0));
  detail::cpu_impl::normalize_elements(shape, c.mode, a.x, a.residual, c.activation, affine.data(), a.y);
}

template <class T>
void local_gradient_sums(cpu, const Shape& shape, const GradientSumsArgs<T>& a, const ElementwiseConfig& c) {
  namespace pc = detail::phase_checks;
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  detail::check_pointer(a.x, "x", numel);
  detail::check_pointer(a.dy, "dy", numel);
  if (c.activation != Activation::identity) detail::check_pointer(a.y, "y", numel);
  pc::check_normalization(a.normalization, features, numel);
  pc::check_record(a.gradient_sums, "gradient_sums", gradient_sums_size(features));
  std::vector<detail::BackwardSums<double>> sums(static_cast<std::size_t>(features));
  detail::cpu_impl::gradient_sums_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, a.normalization.data + 1,
                                           sums.data());
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
  detail::check_pointer(a.x, "x", numel);
  detail::check_pointer(a.dy, "dy", numel);
  if (c.activation != Activation::identity) detail::check_pointer(a.y, "y", numel);
  detail::require(!detail::partially_overlap(a.dx, a.dy, numel) && !detail::partially_overlap(a.dx, a.x, numel), "dx",
                  "dx: expected the same address as dy or x, or no overlap with them, got a partial overlap");
  detail::require(!detail::partially_overlap(a.dresidual, a.dy, numel), "dresidual",
                  "dresidual: expected the same address as dy or no overlap with it, got a partial overlap");
  pc::check_weight_bias(a.weight, span<const param_t<T>>{}, features, false);
  // A shard may be empty while the others are not (its parameter gradients still come from the
  // summed records); a count of 0 over all shards is only valid for an empty shard.
  pc::check_normalization(a.normalization, features, numel);
  pc::check_record(a.gradient_sums, "gradient_sums", gradient_sums_size(features));
  detail::check_feature_span(a.grad_weight, "grad_weight", features, false);
  detail::check_feature_span(a.grad_bias, "grad_bias", features, false);
  const double* rec = a.normalization.data;
  const double total = rec[0];
  std::vector<detail::BackwardCoefficients<double>> k(static_cast<std::size_t>(features));
  for (std::int64_t f = 0; f < features; ++f) {
    // Σ(x − mean) is 0: the mean is the merged one, in double (no saved-mean rounding to undo).
    const detail::BackwardSums<double> sums{a.gradient_sums[f], a.gradient_sums[features + f], 0.0};
    k[f] = total > 0.0 ? detail::backward_coefficients(sums, rec[1 + features + f], value_or(a.weight, f, 1.0),
                                                       static_cast<std::int64_t>(total), true)
                       : detail::BackwardCoefficients<double>{0, 0, 0, 0, 0, 0};
  }
  for (std::int64_t f = 0; f < features; ++f) {
    detail::store_gradient(a.grad_weight.data ? a.grad_weight.data + f : nullptr, k[f].grad_weight, c.accumulate);
    detail::store_gradient(a.grad_bias.data ? a.grad_bias.data + f : nullptr, k[f].grad_bias, c.accumulate);
  }
  if (numel == 0) return;
  detail::cpu_impl::input_gradient_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, rec + 1, k.data(), true,
                                            a.dx, a.dresidual);
}

}  // namespace batchnorm::phases
