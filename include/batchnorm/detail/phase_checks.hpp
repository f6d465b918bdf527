/**
 * @file detail/phase_checks.hpp
 * @brief Argument checks of the phases (phases.hpp), shared by the CPU and CUDA backends:
 *        everything that can be checked on the host without reading a record. The CPU
 *        backend additionally checks the counts inside the records (is_count, check_counts);
 *        the CUDA backend cannot without a host synchronisation (its records are in device
 *        memory), see detail/cuda/phases.inl for what it does instead.
 *
 * The record sizes are passed in by the callers (phases.hpp's shard_statistics_size() etc.):
 * phases.hpp includes the CPU implementation, which includes this header, so this header
 * cannot include phases.hpp back and still compile on its own.
 */
#pragma once

#include <cmath>
#include <cstdint>

#include "../args.hpp"
#include "../options.hpp"
#include "../shape.hpp"
#include "../types.hpp"
#include "moments.hpp"
#include "validate.hpp"

namespace batchnorm::detail::phase_checks {

/// The largest whole number a double holds exactly (2^53): counts above it are not exact.
constexpr double max_exact_count = 9007199254740992.0;

/// A count in a record: a whole number >= 0 that a double holds exactly. Host and device.
BN_HOST_DEVICE bool is_count(double c) { return c >= 0.0 && c <= max_exact_count && std::floor(c) == c; }

inline void check_features(std::int64_t features) {
  require(features >= 0, "features", "features: expected a value >= 0, got ", features);
}

/// A record buffer of exactly @p expected doubles.
template <class E>
void check_record(const span<E>& record, const char* argument, std::int64_t expected) {
  require(record.data != nullptr && record.size == expected, argument, argument, ": expected a buffer of ", expected,
          " doubles, got ", record.data ? record.size : 0, record.data ? "" : " (nullptr)");
}

/// The count of a normalization record that is in host memory, before a pass over @p numel
/// elements uses it (CPU only).
inline void check_normalization_count(const span<const double>& normalization, std::int64_t numel) {
  const double count = normalization.data[0];
  require(is_count(count) && (numel == 0 || count > 0.0), "normalization",
          "normalization: expected a record from merge_statistics (count > 0), got count ", count);
}

/// The counts of @p shards shard records of @p record_size doubles in host memory (CPU only):
/// each a whole number >= 0, their total below 2^53 and not 1. Returns the total.
inline double check_counts(const double* records, std::int64_t shards, std::int64_t record_size) {
  double total = 0.0;
  for (std::int64_t r = 0; r < shards; ++r) {
    const double count = records[r * record_size];
    require(is_count(count), "shard_statistics", "shard_statistics: expected the count of shard ", r,
            " to be a whole number >= 0, got ", count);
    total += count;
  }
  require(total <= max_exact_count, "shard_statistics", "shard_statistics: expected a total count below 2^53, got ",
          total);
  require(total != 1.0, "shard_statistics",
          "shard_statistics: expected more than 1 value per channel when training, got 1 over all ", shards,
          " shards");
  return total;
}

template <class P>
void check_weight_bias(const span<const P>& weight, const span<const P>& bias, std::int64_t features, bool need_pair) {
  if (need_pair) check_pair(weight, bias, "weight", "bias");
  check_feature_span(weight, "weight", features, false);
  if (need_pair) check_feature_span(bias, "bias", features, false);
}

/// Phase 1: x and the output record.
template <class T>
void check_local_statistics(const Shape& shape, const T* x, const span<double>& statistics,
                            std::int64_t record_size) {
  check_pointer(x, "x", shape.numel());
  check_record(statistics, "statistics", record_size);
  check_overlaps({{"statistics", statistics.data, bytes_of(statistics), true}, {"x", x, bytes_of(x, shape.numel()), false}},
                 {});
}

/// Phase 2, everything but the counts inside the records (phases::MergeArgs, MergeConfig).
template <class MergeArgs, class MergeConfig>
void check_merge(std::int64_t features, const MergeArgs& a, const MergeConfig& c, std::int64_t record_size,
                 std::int64_t normalization_size) {
  check_features(features);
  require(a.shards >= 1, "shards", "shards: expected a value >= 1, got ", a.shards);
  require(a.shard_statistics.data != nullptr && a.shard_statistics.size == a.shards * record_size, "shard_statistics",
          "shard_statistics: expected ", a.shards, " records of ", record_size, " doubles (", a.shards * record_size,
          "), got ", a.shard_statistics.data ? a.shard_statistics.size : 0);
  check_record(a.normalization, "normalization", normalization_size);
  check_eps(c.eps);
  check_momentum(c.exponential_average_factor, "exponential_average_factor");
  check_pair(a.running_mean, a.running_var, "running_mean", "running_var");
  check_feature_span(a.running_mean, "running_mean", features, false);
  check_feature_span(a.running_var, "running_var", features, false);
  check_feature_span(a.save_mean, "save_mean", features, false);
  check_feature_span(a.save_invstd, "save_invstd", features, false);
  // The overlap rule of forward (detail/validate.hpp): every written buffer against every other.
  check_overlaps({{"normalization", a.normalization.data, bytes_of(a.normalization), true},
                  {"running_mean", a.running_mean.data, bytes_of(a.running_mean), true},
                  {"running_var", a.running_var.data, bytes_of(a.running_var), true},
                  {"save_mean", a.save_mean.data, bytes_of(a.save_mean), true},
                  {"save_invstd", a.save_invstd.data, bytes_of(a.save_invstd), true},
                  {"skipped_updates", a.skipped_updates, bytes_of(a.skipped_updates, 1), true},
                  {"shard_statistics", a.shard_statistics.data, bytes_of(a.shard_statistics), false}},
                 {});
}

/// Phase 3, everything but the record's count (phases::NormalizeArgs, ElementwiseConfig).
template <class NormalizeArgs, class Config>
void check_normalize(const Shape& shape, const NormalizeArgs& a, const Config& c, std::int64_t normalization_size) {
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  check_pointer(a.x, "x", numel);
  check_pointer(a.y, "y", numel);
  check_weight_bias(a.weight, a.bias, features, true);
  check_record(a.normalization, "normalization", normalization_size);
  check_overlaps({{"y", a.y, bytes_of(a.y, numel), true},
                  {"x", a.x, bytes_of(a.x, numel), false},
                  {"residual", a.residual, bytes_of(a.residual, numel), false},
                  {"weight", a.weight.data, bytes_of(a.weight), false},
                  {"bias", a.bias.data, bytes_of(a.bias), false},
                  {"normalization", a.normalization.data, bytes_of(a.normalization), false}},
                 {{"y", "x"}, {"y", "residual"}});
}

/// Phase 4, everything but the normalization record's count (phases::GradientSumsArgs).
template <class GradientSumsArgs, class Config>
void check_gradient_sums(const Shape& shape, const GradientSumsArgs& a, const Config& c,
                         std::int64_t normalization_size, std::int64_t sums_size) {
  const std::int64_t numel = shape.numel();
  check_pointer(a.x, "x", numel);
  check_pointer(a.dy, "dy", numel);
  if (c.activation != Activation::identity) check_pointer(a.y, "y", numel);
  check_record(a.normalization, "normalization", normalization_size);
  check_record(a.gradient_sums, "gradient_sums", sums_size);
  const bool relu = c.activation != Activation::identity;
  check_overlaps({{"gradient_sums", a.gradient_sums.data, bytes_of(a.gradient_sums), true},
                  {"x", a.x, bytes_of(a.x, numel), false},
                  {"dy", a.dy, bytes_of(a.dy, numel), false},
                  {"y", relu ? a.y : nullptr, bytes_of(a.y, numel), false},
                  {"normalization", a.normalization.data, bytes_of(a.normalization), false}},
                 {});
}

/// Phase 5, everything but the normalization record's count (phases::InputGradientArgs).
template <class InputGradientArgs, class Config>
void check_input_gradient(const Shape& shape, const InputGradientArgs& a, const Config& c,
                          std::int64_t normalization_size, std::int64_t sums_size) {
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  check_pointer(a.x, "x", numel);
  check_pointer(a.dy, "dy", numel);
  if (c.activation != Activation::identity) check_pointer(a.y, "y", numel);
  check_weight_bias(a.weight, decltype(a.weight){}, features, false);
  check_record(a.normalization, "normalization", normalization_size);
  check_record(a.gradient_sums, "gradient_sums", sums_size);
  check_feature_span(a.grad_weight, "grad_weight", features, false);
  check_feature_span(a.grad_bias, "grad_bias", features, false);
  // The overlap rule of backward (detail/validate.hpp).
  const bool relu = c.activation != Activation::identity;
  check_overlaps({{"dx", a.dx, bytes_of(a.dx, numel), true},
                  {"dresidual", a.dresidual, bytes_of(a.dresidual, numel), true},
                  {"grad_weight", a.grad_weight.data, bytes_of(a.grad_weight), true},
                  {"grad_bias", a.grad_bias.data, bytes_of(a.grad_bias), true},
                  {"dy", a.dy, bytes_of(a.dy, numel), false},
                  {"x", a.x, bytes_of(a.x, numel), false},
                  {"y", relu ? a.y : nullptr, bytes_of(a.y, numel), false},
                  {"weight", a.weight.data, bytes_of(a.weight), false},
                  {"normalization", a.normalization.data, bytes_of(a.normalization), false},
                  {"gradient_sums", a.gradient_sums.data, bytes_of(a.gradient_sums), false}},
                 {{"dx", "dy"}, {"dx", "x"}, {"dresidual", "dy"}});
}

}  // namespace batchnorm::detail::phase_checks
