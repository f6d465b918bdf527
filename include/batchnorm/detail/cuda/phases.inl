/**
 * @file detail/cuda/phases.inl
 * @brief The CUDA phases (cuda_phases.cuh): forward's and backward's kernels (the split
 *        reductions, the normalize and dx passes) plus four small per-feature kernels that
 *        hand the statistics over in double records (their arithmetic: phase_math.hpp).
 *        Nothing here synchronizes or reads device memory on the host.
 */
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../phase_checks.hpp"
#include "dispatch.cuh"
#include "kernels.cuh"
#include "phase_math.hpp"

namespace batchnorm::detail::cuda_impl {

// ---- kernels -------------------------------------------------------------------------------

/// Phase 1: each feature's Welford partials (one warp per feature) → the record's mean and M2
/// in double, data units, at the feature's parameter index; the count from the host.
template <class T, class Acc>
BN_KERNEL void __launch_bounds__(TilePolicy::finalize_warps * 32)
    shard_record_kernel(const Welford<Acc>* __restrict__ partials, PartialsLayout layout, std::int64_t F,
                        FeatureMap map, const T* __restrict__ x, PivotIndex pivot_index, double count,
                        double* __restrict__ record) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * TilePolicy::finalize_warps + threadIdx.x / 32;
  if (column >= F) return;  // whole warps leave together
  const Welford<Acc> total = merge_partials<WelfordAccumulator<T, Acc>>(partials, layout, column);
  if (threadIdx.x % 32 != 0) return;
  if (column == 0) record[0] = count;
  const std::int64_t p = map.param(column);
  const Pivot<Acc> pivot = make_pivot(to_acc<Acc>(x[pivot_index(column)]));  // the reduction's pivot
  pivoted_to_record(total, pivot, record + 1 + p, record + 1 + F + p);
}

/// Phase 2, one thread per feature: the counts checked (merged_total), Chan's merge of every
/// shard in order, then finalize_merged_feature. With `deferred`, the statistics go to
/// `stats` and a non-finite one sets *nonfinite; merge_running_update_kernel decides.
template <class P>
BN_KERNEL void merge_records_kernel(const double* __restrict__ records, std::int64_t shards, std::int64_t F,
                                    double eps, double factor, double* __restrict__ normalization, P* running_mean,
                                    P* running_var, P* save_mean, P* save_invstd, bool deferred,
                                    FeatureStats<double>* __restrict__ stats, int* __restrict__ nonfinite) {
  const std::int64_t f = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t record_size = 2 * F + 1;
  const double total = merged_total(records, shards, record_size);  // the same in every thread
  if (f == 0) normalization[0] = total;
  if (f >= F) return;
  if (std::isnan(total)) {  // records the merge refuses: NaN out, state untouched
    const double nan = std::numeric_limits<double>::quiet_NaN();
    normalization[1 + f] = nan;
    normalization[1 + F + f] = nan;
    if (save_mean) save_mean[f] = static_cast<P>(nan);
    if (save_invstd) save_invstd[f] = static_cast<P>(nan);
    return;
  }
  if (total == 0.0) {  // every shard empty: nothing to normalize, running stats untouched (as forward)
    normalization[1 + f] = 0.0;
    normalization[1 + F + f] = 0.0;
    return;
  }
  Welford<double> merged;
  for (std::int64_t r = 0; r < shards; ++r) {
    const double* rec = records + r * record_size;
    merged = merge(merged, Welford<double>{rec[1 + f], rec[1 + F + f], static_cast<std::int64_t>(rec[0])});
  }
  const bool update_now = running_mean != nullptr && !deferred;
  const FeatureStats<double> s =
      finalize_merged_feature(merged, eps, factor, normalization + 1 + f, normalization + 1 + F + f,
                              update_now ? running_mean + f : nullptr, update_now ? running_var + f : nullptr,
                              save_mean ? save_mean + f : nullptr, save_invstd ? save_invstd + f : nullptr);
  if (deferred) {
    stats[f] = s;
    if (!is_finite_as<P>(s)) atomicOr(nonfinite, 1);
  }
}

/// Phase 2, deferred running update: all features or none (and count a skipped batch); nothing
/// for a record the merge refused or an all-empty batch (count NaN or 0).
template <class P>
BN_KERNEL void merge_running_update_kernel(const FeatureStats<double>* __restrict__ stats, std::int64_t F,
                                           const int* __restrict__ nonfinite,
                                           const double* __restrict__ normalization, P* running_mean,
                                           P* running_var, double factor, std::int64_t* skipped_updates) {
  const std::int64_t f = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (!(normalization[0] > 0.0)) return;
  if (*nonfinite) {
    if (f == 0 && skipped_updates) increment_saturating(*skipped_updates);
    return;
  }
  if (f < F) update_running(running_mean[f], running_var[f], stats[f], factor);
}

/// Phase 3: each column's normalization constants from the record (record_affine).
template <class Acc, class P>
BN_KERNEL void record_affine_kernel(std::int64_t F, FeatureMap map, const double* __restrict__ normalization,
                                    const P* __restrict__ weight, const P* __restrict__ bias,
                                    Affine<Acc>* __restrict__ affine) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= F) return;
  const std::int64_t p = map.param(column);
  affine[column] = record_affine<Acc>(normalization[1 + p], normalization[1 + F + p],
                                      weight ? static_cast<double>(weight[p]) : 1.0,
                                      bias ? static_cast<double>(bias[p]) : 0.0);
}

/// Phase 4: each feature's partial sums (one warp per feature) → the record, against the
/// record's double mean (gradient_sums_to_record).
template <class T, class Acc>
BN_KERNEL void __launch_bounds__(TilePolicy::finalize_warps * 32)
    gradient_record_kernel(const BackwardSums<Acc>* __restrict__ partials, PartialsLayout layout, std::int64_t F,
                           FeatureMap map, const double* __restrict__ normalization, double* __restrict__ sums) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * TilePolicy::finalize_warps + threadIdx.x / 32;
  if (column >= F) return;
  const BackwardSums<Acc> total = merge_partials<GradAccumulator<T, Acc, double>>(partials, layout, column);
  if (threadIdx.x % 32 != 0) return;
  const std::int64_t p = map.param(column);
  gradient_sums_to_record(total, normalization[1 + p], sums + p, sums + F + p);
}

/// Phase 5, one thread per column: the double coefficients over the record's global count
/// (read here, on the device), the parameter gradients, and the column's dx coefficients.
template <class Acc, class P>
BN_KERNEL void record_coefficients_kernel(std::int64_t F, FeatureMap map, const double* __restrict__ normalization,
                                          const double* __restrict__ gradient_sums, const P* __restrict__ weight,
                                          P* grad_weight, P* grad_bias, bool accumulate,
                                          ColumnGrad<Acc>* __restrict__ coefficients) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= F) return;
  const std::int64_t p = map.param(column);
  const double total = normalization[0];
  BackwardCoefficients<double> k{0, 0, 0, 0, 0, 0};
  if (std::isnan(total)) {  // a record the merge refused: NaN out
    const double nan = std::numeric_limits<double>::quiet_NaN();
    k = {nan, nan, nan, nan, nan, nan};
  } else if (total > 0.0) {
    // Σ(x − mean) is 0: the sums are taken against the record's double mean.
    const BackwardSums<double> sums{gradient_sums[p], gradient_sums[F + p], 0.0};
    k = backward_coefficients(sums, normalization[1 + F + p], weight ? static_cast<double>(weight[p]) : 1.0,
                              static_cast<std::int64_t>(total), true);
  }
  store_gradient(grad_weight ? grad_weight + p : nullptr, k.grad_weight, accumulate);
  store_gradient(grad_bias ? grad_bias + p : nullptr, k.grad_bias, accumulate);
  if (coefficients) coefficients[column] = record_column_grad<Acc>(normalization[1 + p], k);
}

/// SyncBatchNorm's reduction after an all-gather: out[i] = Σ_r gathered[r · stride + offset + i]
/// over r = 0, 1, ... in rank order (a left fold, so every rank gets the same bits). A template
/// only so that a header may define it in every translation unit.
template <class E>
BN_KERNEL void sum_gathered_kernel(const E* __restrict__ gathered, std::int64_t ranks, std::int64_t stride,
                                   std::int64_t offset, std::int64_t count, E* __restrict__ out) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  E sum = E(0);
  for (std::int64_t r = 0; r < ranks; ++r) sum += gathered[r * stride + offset + i];
  out[i] = sum;
}

// ---- host side -----------------------------------------------------------------------------

/// Blocks of `threads` threads covering @p count per-feature threads (at least one block).
inline unsigned feature_blocks(std::int64_t count, int threads) {
  return grid_extent(std::max<std::int64_t>(1, ceil_div(count, threads)), max_grid_x);
}

/// The host-side steps every CUDA phase takes before launching: alignment, the caller's
/// pending error, pointers the device can read. Returns the device's launch policy.
inline LaunchPolicy prepare_phase(const char* function, const void* workspace,
                                  std::initializer_list<NamedPointer> pointers) {
  check_workspace_alignment(workspace, cuda_workspace_alignment);
  check_no_pending_error(function);
  const DeviceInfo device = current_device_info();
  check_device_pointers(pointers, device.pageable_memory_access);
  check_device_pointer(workspace, "workspace", device.pageable_memory_access);
  return device.policy;
}

/**
 * @brief For SyncBatchNorm on CUDA after an all-gather of @p ranks blocks of @p stride doubles
 *        (device memory): @p out[i] = the sum over ranks, in rank order, of element
 *        @p offset + i of each block, i < @p count (e.g. the gradient records behind a status
 *        word: offset 1, count 2F). Stream-ordered; never synchronizes.
 */
inline void sum_gathered(const double* gathered, std::int64_t ranks, std::int64_t stride, std::int64_t offset,
                         std::int64_t count, double* out, cudaStream_t stream) {
  require(ranks >= 1 && offset >= 0 && count >= 0 && offset + count <= stride, "gathered",
          "gathered: expected ranks >= 1 and offset + count <= stride, got ranks ", ranks, ", stride ", stride,
          ", offset ", offset, ", count ", count);
  if (count == 0) return;
  constexpr int threads = TilePolicy::elementwise_threads;
  sum_gathered_kernel<double><<<feature_blocks(count, threads), threads, 0, stream>>>(gathered, ranks, stride, offset, count,
                                                                              out);
  BN_CUDA_CHECK_LAUNCH();
}

/**
 * @brief For SyncBatchNorm on CUDA: copies element [@p offset, @p offset + @p count) of each of
 *        @p ranks gathered blocks of @p stride doubles into @p records, one after the other
 *        (e.g. the shard records behind a status word, for merge_statistics). One strided
 *        cudaMemcpy2DAsync; stream-ordered, never synchronizes.
 */
inline void compact_gathered(const double* gathered, std::int64_t ranks, std::int64_t stride, std::int64_t offset,
                             std::int64_t count, double* records, cudaStream_t stream) {
  require(ranks >= 1 && offset >= 0 && count >= 0 && offset + count <= stride, "gathered",
          "gathered: expected ranks >= 1 and offset + count <= stride, got ranks ", ranks, ", stride ", stride,
          ", offset ", offset, ", count ", count);
  if (count == 0) return;
  const std::size_t width = static_cast<std::size_t>(count) * sizeof(double);
  BN_CUDA_CHECK(cudaMemcpy2DAsync(records, width, gathered + offset, static_cast<std::size_t>(stride) * sizeof(double),
                                  width, static_cast<std::size_t>(ranks), cudaMemcpyDeviceToDevice, stream));
}

}  // namespace batchnorm::detail::cuda_impl

namespace batchnorm {

template <class T>
std::size_t phases_workspace_size(cuda, const Shape& shape, Mode mode) {
  using namespace detail::cuda_impl;
  return phases_workspace_bytes<param_t<T>>(shape, mode, current_launch_policy());
}

}  // namespace batchnorm

namespace batchnorm::phases {

template <class T>
void local_statistics(cuda, const Shape& shape, Mode mode, const T* x, span<double> statistics, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using Acc = param_t<T>;
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, mode);
  pc::check_local_statistics(shape, x, statistics, shard_statistics_size(features));
  check_launch_limits(shape, mode);
  const LaunchPolicy policy = prepare_phase("phases::local_statistics", workspace, {{x, "x"}, {statistics.data, "statistics"}});
  if (shape.numel() == 0) {  // an empty shard: count 0, zeros (0.0 is all zero bytes)
    BN_CUDA_CHECK(cudaMemsetAsync(statistics.data, 0, static_cast<std::size_t>(statistics.size) * sizeof(double), stream));
    return;
  }
  const Plan plan = make_plan(shape, mode, policy);
  check_workspace(workspace, workspace_bytes, local_statistics_bytes<Acc>(plan));
  auto* partials = static_cast<detail::Welford<Acc>*>(workspace);
  const PivotIndex pivot_index{plan.planar ? plan.planar_view.S : 1};
  launch_reduce(plan, WelfordAccumulator<T, Acc>{x, pivot_index}, partials, stream);
  shard_record_kernel<T, Acc><<<finalize_blocks(plan.features), TilePolicy::finalize_warps * 32, 0, stream>>>(
      partials, plan.partials_layout(), plan.features, plan.map, x, pivot_index,
      static_cast<double>(reduction_count(shape, mode)), statistics.data);
  BN_CUDA_CHECK_LAUNCH();
}

template <class P>
void merge_statistics(cuda, std::int64_t features, const MergeArgs<P>& a, const MergeConfig& c, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  namespace pc = detail::phase_checks;
  pc::check_merge(features, a, c, shard_statistics_size(features), normalization_size(features));
  detail::require(features <= max_features, "features", "features: expected at most ", max_features,
                  " for the CUDA backend (gridDim.x limit), got ", features);
  prepare_phase("phases::merge_statistics", workspace,
                {{a.shard_statistics.data, "shard_statistics"}, {a.normalization.data, "normalization"},
                 {a.running_mean.data, "running_mean"}, {a.running_var.data, "running_var"},
                 {a.save_mean.data, "save_mean"}, {a.save_invstd.data, "save_invstd"},
                 {a.skipped_updates, "skipped_updates"}});
  const bool deferred = a.running_mean.data != nullptr && c.skip_nonfinite_updates;
  const MergeLayout layout = merge_layout(features, deferred);
  check_workspace(workspace, workspace_bytes, layout.total);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* stats = deferred ? reinterpret_cast<detail::FeatureStats<double>*>(base + layout.stats) : nullptr;
  auto* nonfinite = deferred ? reinterpret_cast<int*>(base + layout.flag) : nullptr;
  if (deferred) BN_CUDA_CHECK(cudaMemsetAsync(nonfinite, 0, sizeof(int), stream));
  constexpr int threads = TilePolicy::elementwise_threads;
  merge_records_kernel<P><<<feature_blocks(features, threads), threads, 0, stream>>>(
      a.shard_statistics.data, a.shards, features, c.eps, c.exponential_average_factor, a.normalization.data,
      a.running_mean.data, a.running_var.data, a.save_mean.data, a.save_invstd.data, deferred, stats, nonfinite);
  BN_CUDA_CHECK_LAUNCH();
  if (deferred) {
    merge_running_update_kernel<P><<<feature_blocks(features, threads), threads, 0, stream>>>(
        stats, features, nonfinite, a.normalization.data, a.running_mean.data, a.running_var.data,
        c.exponential_average_factor, a.skipped_updates);
    BN_CUDA_CHECK_LAUNCH();
  }
}

template <class T>
void normalize(cuda, const Shape& shape, const NormalizeArgs<T>& a, const ElementwiseConfig& c, void* workspace,
               std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using Acc = param_t<T>;
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_normalize(shape, a, c, normalization_size(features));
  check_launch_limits(shape, c.mode);
  const LaunchPolicy policy = prepare_phase(
      "phases::normalize", workspace,
      {{a.x, "x"}, {a.y, "y"}, {a.residual, "residual"}, {a.weight.data, "weight"}, {a.bias.data, "bias"},
       {a.normalization.data, "normalization"}});
  if (shape.numel() == 0) return;
  const Plan plan = make_plan(shape, c.mode, policy);
  check_workspace(workspace, workspace_bytes, normalize_bytes<Acc>(plan.features));
  auto* affine = static_cast<detail::Affine<Acc>*>(workspace);
  constexpr int threads = TilePolicy::elementwise_threads;
  record_affine_kernel<Acc, param_t<T>><<<feature_blocks(plan.features, threads), threads, 0, stream>>>(
      plan.features, plan.map, a.normalization.data, a.weight.data, a.bias.data, affine);
  BN_CUDA_CHECK_LAUNCH();
  const NormalizeOp<T, Acc> op{a.x, a.residual, a.y, affine, c.activation == Activation::relu};
  launch_elementwise(plan, op, shape.numel(), policy, stream);
}

template <class T>
void local_gradient_sums(cuda, const Shape& shape, const GradientSumsArgs<T>& a, const ElementwiseConfig& c,
                         void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using Acc = param_t<T>;
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_gradient_sums(shape, a, c, normalization_size(features), gradient_sums_size(features));
  check_launch_limits(shape, c.mode);
  const bool relu = c.activation == Activation::relu;
  const LaunchPolicy policy = prepare_phase("phases::local_gradient_sums", workspace,
                                            {{a.x, "x"}, {a.dy, "dy"}, {relu ? a.y : nullptr, "y"},
                                             {a.normalization.data, "normalization"},
                                             {a.gradient_sums.data, "gradient_sums"}});
  if (shape.numel() == 0) {  // an empty shard: the sums are zero
    BN_CUDA_CHECK(cudaMemsetAsync(a.gradient_sums.data, 0,
                                  static_cast<std::size_t>(a.gradient_sums.size) * sizeof(double), stream));
    return;
  }
  const Plan plan = make_plan(shape, c.mode, policy);
  check_workspace(workspace, workspace_bytes, gradient_sums_bytes<Acc>(plan));
  auto* partials = static_cast<detail::BackwardSums<Acc>*>(workspace);
  // The mean is the record's (double, at parameter indices), rounded to Acc by the accumulator.
  const GradAccumulator<T, Acc, double> sums{a.x, a.dy, relu ? a.y : nullptr, a.normalization.data + 1, plan.map};
  launch_reduce(plan, sums, partials, stream);
  gradient_record_kernel<T, Acc><<<finalize_blocks(plan.features), TilePolicy::finalize_warps * 32, 0, stream>>>(
      partials, plan.partials_layout(), plan.features, plan.map, a.normalization.data, a.gradient_sums.data);
  BN_CUDA_CHECK_LAUNCH();
}

template <class T>
void input_gradient(cuda, const Shape& shape, const InputGradientArgs<T>& a, const ElementwiseConfig& c,
                    void* workspace, std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using Acc = param_t<T>;
  namespace pc = detail::phase_checks;
  const std::int64_t features = feature_count(shape, c.mode);
  pc::check_input_gradient(shape, a, c, normalization_size(features), gradient_sums_size(features));
  check_launch_limits(shape, c.mode);
  const bool relu = c.activation == Activation::relu;
  const LaunchPolicy policy = prepare_phase(
      "phases::input_gradient", workspace,
      {{a.x, "x"}, {a.dy, "dy"}, {relu ? a.y : nullptr, "y"}, {a.dx, "dx"}, {a.dresidual, "dresidual"},
       {a.weight.data, "weight"}, {a.normalization.data, "normalization"}, {a.gradient_sums.data, "gradient_sums"},
       {a.grad_weight.data, "grad_weight"}, {a.grad_bias.data, "grad_bias"}});
  constexpr int threads = TilePolicy::elementwise_threads;
  const bool input_grads = shape.numel() > 0 && (a.dx != nullptr || a.dresidual != nullptr);
  if (!input_grads) {  // parameter gradients only (an empty shard still writes them)
    record_coefficients_kernel<Acc, param_t<T>><<<feature_blocks(features, threads), threads, 0, stream>>>(
        features, FeatureMap{}, a.normalization.data, a.gradient_sums.data, a.weight.data, a.grad_weight.data,
        a.grad_bias.data, c.accumulate, nullptr);
    BN_CUDA_CHECK_LAUNCH();
    return;
  }
  const Plan plan = make_plan(shape, c.mode, policy);
  check_workspace(workspace, workspace_bytes, input_gradient_bytes<Acc>(plan.features));
  auto* coefficients = static_cast<ColumnGrad<Acc>*>(workspace);
  record_coefficients_kernel<Acc, param_t<T>><<<feature_blocks(plan.features, threads), threads, 0, stream>>>(
      plan.features, plan.map, a.normalization.data, a.gradient_sums.data, a.weight.data, a.grad_weight.data,
      a.grad_bias.data, c.accumulate, coefficients);
  BN_CUDA_CHECK_LAUNCH();
  const InputGradOp<T, Acc> op{a.x, a.dy, relu ? a.y : nullptr, a.dx, a.dresidual, coefficients, true};
  launch_elementwise(plan, op, shape.numel(), policy, stream);
}

}  // namespace batchnorm::phases
