/**
 * @file phases.hpp
 * @brief BatchNorm split into its five phases, for a batch spread over several shards
 *        (processes, devices): what SyncBatchNorm is built from, and what a framework with
 *        its own collectives (a PyTorch ProcessGroup, Horovod, its own NCCL communicator)
 *        calls directly. PyTorch's names for them are in parentheses.
 *
 * Forward, on every shard:
 *  1. local_statistics (`batch_norm_stats`): x → this shard's record
 *     `[count | mean × F | M2 × F]` (F = feature_count(), shard_statistics_size(F) doubles);
 *  2. merge_statistics (`batch_norm_gather_stats_with_counts`): the records of all shards, in
 *     one fixed order (rank order), → the normalization record `[count | mean × F | invstd × F]`
 *     (normalization_size(F) doubles), running statistics, save_mean / save_invstd;
 *  3. normalize (`batch_norm_elemt`): x, the normalization record → y (+ residual, relu).
 *
 * Backward, on every shard:
 *  4. local_gradient_sums (`batch_norm_backward_reduce`): x, dy [, y] → `[Σdy × F | Σdy·(x − mean) × F]`
 *     (gradient_sums_size(F) doubles), taken against the merged mean;
 *  5. input_gradient (`batch_norm_backward_elemt`): the element-wise sum of every shard's
 *     record → dx [, dresidual], grad_weight, grad_bias.
 *
 * Between 1 and 2 the caller all-gathers the shard records; between 4 and 5 it all-reduces
 * (sums) the gradient records. Records are doubles on every backend, so nothing is lost in
 * transit: the merge is Chan's exact parallel formula on (count, mean, M2), never a round trip
 * through invstd, and every shard that merges the same records in the same order gets the same
 * bits. With one shard, 1 → 2 → 3 gives the same y as `forward` and 4 → 5 the same dx as
 * `backward` up to rounding (the chain keeps the mean in double between phases).
 *
 * Every phase validates its arguments before it writes anything and throws
 * batchnorm::invalid_argument naming the argument and the value expected.
 * The CPU overloads are declared here; the CUDA overloads (device pointers, a stream) in
 * <batchnorm/cuda.cuh>.
 */
#pragma once

#include <cstdint>

#include "args.hpp"
#include "options.hpp"
#include "shape.hpp"
#include "types.hpp"

namespace batchnorm::phases {

/// @brief Doubles in one shard's statistics record: `[count | mean × F | M2 × F]`.
constexpr std::int64_t shard_statistics_size(std::int64_t features) { return 2 * features + 1; }
/// @brief Doubles in a normalization record: `[count | mean × F | invstd × F]`.
constexpr std::int64_t normalization_size(std::int64_t features) { return 2 * features + 1; }
/// @brief Doubles in a gradient-sums record: `[Σdy × F | Σdy·(x − mean) × F]`.
constexpr std::int64_t gradient_sums_size(std::int64_t features) { return 2 * features; }

/**
 * @brief Pointers of merge_statistics (phase 2), in the backend's memory.
 * @tparam P parameter type (`param_t<T>` of the activations' type T)
 */
template <class P>
struct MergeArgs {
  /// `shards` records of shard_statistics_size(F) doubles, one after the other, in the order
  /// every participant uses (rank order). Shards with count 0 contribute nothing.
  span<const double> shard_statistics;
  std::int64_t shards = 1;
  span<double> normalization;  ///< output: normalization_size(F) doubles
  span<P> running_mean;        ///< running statistics (absent: not tracked); both or neither
  span<P> running_var;
  span<P> save_mean;    ///< optional output: the merged mean, rounded to P
  span<P> save_invstd;  ///< optional output: 1 / sqrt(biased var + eps), rounded to P
  /// Optional counter, incremented when ForwardConfig-style skip_nonfinite_updates leaves the
  /// running statistics untouched because the merged statistics are not finite.
  std::int64_t* skipped_updates = nullptr;
};

/// @brief Scalars of merge_statistics: the subset of ForwardConfig that phase 2 uses.
struct MergeConfig {
  double eps = 1e-5;
  double exponential_average_factor = 0.1;  ///< momentum, or 1 / num_batches_tracked
  bool skip_nonfinite_updates = false;
};

/// @brief Pointers of normalize (phase 3). y may equal x (in place).
template <class T>
struct NormalizeArgs {
  using P = param_t<T>;
  const T* x = nullptr;
  T* y = nullptr;
  const T* residual = nullptr;  ///< optional z of `y = act(bn(x) + z)`
  span<const P> weight;         ///< absent: 1; both or neither
  span<const P> bias;           ///< absent: 0
  span<const double> normalization;  ///< from merge_statistics
};

/// @brief Pointers of local_gradient_sums (phase 4).
template <class T>
struct GradientSumsArgs {
  const T* x = nullptr;
  const T* dy = nullptr;
  const T* y = nullptr;  ///< forward output; required with a fused relu (its mask)
  span<const double> normalization;  ///< from merge_statistics
  span<double> gradient_sums;        ///< output: gradient_sums_size(F) doubles
};

/// @brief Pointers of input_gradient (phase 5).
template <class T>
struct InputGradientArgs {
  using P = param_t<T>;
  const T* x = nullptr;
  const T* dy = nullptr;
  const T* y = nullptr;      ///< forward output; required with a fused relu
  T* dx = nullptr;           ///< optional output; may equal dy
  T* dresidual = nullptr;    ///< optional output: gradient w.r.t. the fused residual
  span<const P> weight;      ///< absent: 1
  span<const double> normalization;  ///< from merge_statistics
  span<const double> gradient_sums;  ///< every shard's local_gradient_sums, summed element-wise
  span<P> grad_weight;       ///< optional output: Σ dy·(x − mean)·invstd over all shards
  span<P> grad_bias;         ///< optional output: Σ dy over all shards
};

/// @brief Scalars of the element-wise and gradient phases.
struct ElementwiseConfig {
  Mode mode = Mode::per_channel;
  Activation activation = Activation::identity;
  bool accumulate = false;  ///< input_gradient: add into grad_weight / grad_bias
};

/**
 * @brief Phase 1: this shard's count and, per feature, mean and M2 (in double, in chunks merged
 *        by Chan's formula: each chunk's M2 keeps at least 47 bits, and a constant feature gives
 *        M2 = 0 exactly). An empty shard (N = 0) gives count 0.
 * @param statistics output, shard_statistics_size(feature_count(shape, mode)) doubles
 * @throws batchnorm::invalid_argument for a bad argument, before anything is written
 * @note CPU: synchronous.
 */
template <class T>
void local_statistics(cpu, const Shape& shape, Mode mode, const T* x, span<double> statistics);

/**
 * @brief Phase 2: merges the shard records in the given order (Chan et al.), then computes the
 *        normalization record and updates the running statistics as `forward` does.
 * @param features F, the number of features of every shard
 * @throws batchnorm::invalid_argument when a record is malformed (negative or non-integral
 *         count), or when the merged count is 1 ("expected more than 1 value per channel when
 *         training", as forward), before anything is written
 * @note CPU: synchronous.
 */
template <class P>
void merge_statistics(cpu, std::int64_t features, const MergeArgs<P>& args, const MergeConfig& config);

/**
 * @brief Phase 3: y = act((x − mean) · invstd · weight + bias [+ residual]).
 * @throws batchnorm::invalid_argument for a bad argument, before anything is written
 * @note CPU: synchronous.
 */
template <class T>
void normalize(cpu, const Shape& shape, const NormalizeArgs<T>& args, const ElementwiseConfig& config);

/**
 * @brief Phase 4: this shard's Σdy and Σdy·(x − mean) per feature (dy masked by a fused relu).
 * @throws batchnorm::invalid_argument for a bad argument, before anything is written
 * @note CPU: synchronous.
 */
template <class T>
void local_gradient_sums(cpu, const Shape& shape, const GradientSumsArgs<T>& args, const ElementwiseConfig& config);

/**
 * @brief Phase 5: dx (training formula, over the global count of the normalization record),
 *        dresidual, grad_weight and grad_bias from the summed gradient records.
 * @throws batchnorm::invalid_argument for a bad argument, before anything is written
 * @note CPU: synchronous.
 */
template <class T>
void input_gradient(cpu, const Shape& shape, const InputGradientArgs<T>& args, const ElementwiseConfig& config);

}  // namespace batchnorm::phases

#include "detail/cpu/phases.inl"
