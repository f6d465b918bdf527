/**
 * @file detail/cuda/functional.inl
 * @brief Definitions of the CUDA functional API declared in <batchnorm/cuda.cuh>.
 *
 * Training forward: partial Welford per (feature, split) -> merge + finalize (mean, invstd,
 * running stats on the device, factor passed from the host) -> normalize. Eval forward:
 * constants from the running stats -> normalize. Backward: partial (Σdy, Σdy(x−mean)) ->
 * parameter gradients + per-feature coefficients -> dx. The GPU accumulates in param_t<T>
 * (float for float and half types, double for double).
 */
#pragma once

#include <cuda_runtime.h>

#include "../validate.hpp"
#include "dispatch.cuh"

namespace batchnorm {

template <class T>
std::size_t forward_workspace_size(cuda, const Shape& shape, const ForwardConfig& config, bool tracking) {
  using namespace detail::cuda_impl;
  using detail::Affine;
  using detail::FeatureStats;
  using detail::Welford;
  const Plan plan = make_plan(shape, config.mode, current_launch_policy());
  return forward_layout<param_t<T>>(plan, config, tracking).total;
}

template <class T>
std::size_t backward_workspace_size(cuda, const Shape& shape, const BackwardConfig& config) {
  using namespace detail::cuda_impl;
  using detail::Affine;
  using detail::FeatureStats;
  using detail::Welford;
  return backward_layout<param_t<T>>(make_plan(shape, config.mode, current_launch_policy())).total;
}

template <class T>
std::size_t max_workspace_size(cuda, std::int64_t num_features) {
  using namespace detail::cuda_impl;
  using detail::Affine;
  using detail::FeatureStats;
  using detail::Welford;
  return max_workspace_bytes<param_t<T>>(num_features, current_launch_policy());
}

template <class T>
void forward(cuda, const Shape& shape, const ForwardArgs<T>& a, const ForwardConfig& c, void* workspace,
             std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using detail::Affine;
  using detail::FeatureStats;
  using detail::Welford;
  using P = param_t<T>;
  using Acc = P;
  detail::check_forward(shape, a, c, workspace, workspace_bytes);
  if (shape.numel() == 0) return;  // PyTorch: empty output, running stats untouched
  // Host-only checks first, then the caller's pending error, then the device queries.
  check_workspace_alignment(workspace, cuda_workspace_alignment);
  check_launch_limits(shape, c.mode);
  check_no_pending_error("forward");
  const DeviceInfo device = current_device_info();
  check_device_pointers({{a.x, "x"}, {a.y, "y"}, {a.residual, "residual"}, {a.weight.data, "weight"},
                         {a.bias.data, "bias"}, {a.running_mean.data, "running_mean"},
                         {a.running_var.data, "running_var"}, {a.save_mean.data, "save_mean"},
                         {a.save_invstd.data, "save_invstd"}, {a.skipped_updates, "skipped_updates"},
                         {workspace, "workspace"}},
                        device.pageable_memory_access);

  const LaunchPolicy policy = device.policy;
  const Plan plan = make_plan(shape, c.mode, policy);
  const bool tracking = a.running_mean.data != nullptr;
  const WorkspaceLayout layout = forward_layout<param_t<T>>(plan, c, tracking);
  check_workspace(workspace, workspace_bytes, layout.total);

  auto* base = static_cast<unsigned char*>(workspace);
  auto* affine = reinterpret_cast<Affine<Acc>*>(base + layout.columns);
  const ForwardFeatureArgs<P> features{a.weight.data, a.bias.data, a.running_mean.data, a.running_var.data,
                                       a.save_mean.data, a.save_invstd.data, c.eps, c.exponential_average_factor};
  const std::int64_t F = plan.features;

  if (c.batch_statistics) {
    auto* partials = reinterpret_cast<Welford<Acc>*>(base + layout.partials);
    const PivotIndex pivot_index{plan.planar ? plan.planar_view.S : 1};
    launch_reduce(plan, WelfordAccumulator<T, Acc>{a.x, pivot_index}, partials, stream);
    const bool deferred = tracking && c.skip_nonfinite_updates;
    auto* stats = reinterpret_cast<FeatureStats<Acc>*>(base + layout.stats);
    auto* nonfinite = reinterpret_cast<int*>(base + layout.flag);
    if (deferred) BN_CUDA_CHECK(cudaMemsetAsync(nonfinite, 0, sizeof(int), stream));
    forward_finalize_kernel<T, Acc, P><<<finalize_blocks(F), TilePolicy::finalize_warps * 32, 0, stream>>>(
        partials, plan.partials_layout(), F, plan.map, a.x, pivot_index, features, affine, deferred, stats, nonfinite);
    BN_CUDA_CHECK_LAUNCH();
    if (deferred) {
      constexpr int threads = TilePolicy::elementwise_threads;
      apply_running_update_kernel<Acc, P><<<grid_extent(ceil_div(F, threads), max_grid_x), threads, 0, stream>>>(
          stats, F, nonfinite, a.running_mean.data, a.running_var.data, c.exponential_average_factor,
          a.skipped_updates);
      BN_CUDA_CHECK_LAUNCH();
    }
  } else {
    constexpr int threads = TilePolicy::elementwise_threads;
    running_affine_kernel<Acc, P><<<grid_extent(ceil_div(F, threads), max_grid_x), threads, 0, stream>>>(
        F, plan.map, features, affine);
    BN_CUDA_CHECK_LAUNCH();
  }
  const NormalizeOp<T, Acc> normalize{a.x, a.residual, a.y, affine, c.activation == Activation::relu};
  launch_elementwise(plan, normalize, shape.numel(), policy, stream);
}

template <class T>
void backward(cuda, const Shape& shape, const BackwardArgs<T>& a, const BackwardConfig& c, void* workspace,
              std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail::cuda_impl;
  using detail::Affine;
  using detail::FeatureStats;
  using detail::Welford;
  using P = param_t<T>;
  using Acc = P;
  detail::check_backward(shape, a, c, workspace, workspace_bytes);
  check_workspace_alignment(workspace, cuda_workspace_alignment);
  check_launch_limits(shape, c.mode);
  check_no_pending_error("backward");
  const DeviceInfo device = current_device_info();
  check_device_pointers({{a.x, "x"}, {a.dy, "dy"}, {a.dx, "dx"}, {a.y, "y"}, {a.dresidual, "dresidual"},
                         {a.weight.data, "weight"}, {a.mean.data, "mean"}, {a.invstd.data, "invstd"},
                         {a.grad_weight.data, "grad_weight"}, {a.grad_bias.data, "grad_bias"},
                         {workspace, "workspace"}},
                        device.pageable_memory_access);
  if (shape.numel() == 0) {  // no values: the sums are zero
    if (!c.accumulate) {
      const auto bytes = static_cast<std::size_t>(feature_count(shape, c.mode)) * sizeof(P);
      if (a.grad_weight.data && bytes) BN_CUDA_CHECK(cudaMemsetAsync(a.grad_weight.data, 0, bytes, stream));
      if (a.grad_bias.data && bytes) BN_CUDA_CHECK(cudaMemsetAsync(a.grad_bias.data, 0, bytes, stream));
    }
    return;
  }

  const LaunchPolicy policy = device.policy;
  const Plan plan = make_plan(shape, c.mode, policy);
  const WorkspaceLayout layout = backward_layout<param_t<T>>(plan);
  check_workspace(workspace, workspace_bytes, layout.total);

  auto* base = static_cast<unsigned char*>(workspace);
  auto* partials = reinterpret_cast<detail::BackwardSums<Acc>*>(base + layout.partials);
  const bool relu = c.activation == Activation::relu;
  const GradAccumulator<T, Acc, P> sums{a.x, a.dy, relu ? a.y : nullptr, a.mean.data, plan.map};
  launch_reduce(plan, sums, partials, stream);

  const bool input_grads = a.dx != nullptr || a.dresidual != nullptr;
  auto* coefficients = input_grads ? reinterpret_cast<ColumnGrad<Acc>*>(base + layout.columns) : nullptr;
  const BackwardFeatureArgs<P> features{a.weight.data,      a.mean.data,
                                        a.invstd.data,      a.grad_weight.data,
                                        a.grad_bias.data,   reduction_count(shape, c.mode),
                                        c.batch_statistics, c.accumulate};
  backward_finalize_kernel<Acc, P><<<finalize_blocks(plan.features), TilePolicy::finalize_warps * 32, 0, stream>>>(
      partials, plan.partials_layout(), plan.features, plan.map, features, coefficients);
  BN_CUDA_CHECK_LAUNCH();
  if (input_grads) {
    const InputGradOp<T, Acc> op{a.x,         a.dy,         relu ? a.y : nullptr,
                                 a.dx,        a.dresidual,  coefficients,
                                 c.batch_statistics};
    launch_elementwise(plan, op, shape.numel(), policy, stream);
  }
}

}  // namespace batchnorm
