/**
 * @file detail/cpu/functional.inl
 * @brief The CPU backend's forward and backward: validation, per-feature coefficients (every
 *        formula from detail/moments.hpp, shared with the CUDA kernels), and the loops of
 *        detail/cpu/kernels.hpp (shared with the phases), accumulating in double.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../convert.hpp"
#include "../moments.hpp"
#include "../validate.hpp"
#include "kernels.hpp"

namespace batchnorm::detail::cpu_impl {

template <class E>
double value_or(const span<E>& s, std::int64_t i, double fallback) {
  return s.data ? static_cast<double>(s.data[i]) : fallback;
}

/**
 * @brief Whether a training step folds its statistics into the running statistics: they are
 *        given (@p tracked), and with @p skip_nonfinite every feature's statistics, finalized
 *        from @p welford(f) and rounded to @p P as they would be stored, are finite (all
 *        features are updated or none); a skipped update increments *@p skipped (saturating).
 *        Forward and phases::merge_statistics share it.
 *        The check runs only where it decides something: finalize's divisions are most of a
 *        feature's cost.
 */
template <class P, class WelfordOf>
bool updates_running_statistics(std::int64_t features, WelfordOf&& welford, bool tracked, bool skip_nonfinite,
                                std::int64_t* skipped) {
  bool update = tracked;
  if (update && skip_nonfinite) {
    for (std::int64_t f = 0; f < features && update; ++f) update = is_finite_as<P>(finalize(welford(f)));
    if (!update && skipped) increment_saturating(*skipped);
  }
  return update;
}

}  // namespace batchnorm::detail::cpu_impl

namespace batchnorm {

template <class T>
void forward(cpu, const Shape& shape, const ForwardArgs<T>& a, const ForwardConfig& c) {
  using P = param_t<T>;
  using detail::cpu_impl::value_or;
  detail::check_forward(shape, a, c);

  const std::int64_t features = feature_count(shape, c.mode);
  if (shape.numel() == 0) return;  // PyTorch: empty output, running stats untouched

  // All scratch is taken before the first write (the loops take theirs below: the partial results
  // and lane arrays, sized here first), so that std::bad_alloc cannot leave running statistics
  // updated and y unwritten.
  namespace ci = detail::cpu_impl;
  double* mean = ci::scratch<double>(ci::Scratch::feature_a, features);
  auto* affine = ci::scratch<detail::Affine<double>>(ci::Scratch::feature_c, features);
  double* m2 = ci::scratch<double>(ci::Scratch::feature_d, features);
  ci::reserve_scratch<T>(shape, c.mode);
  const bool fused = c.batch_statistics && ci::fusable<T>(shape, c.mode);
  const std::int64_t n = reduction_count(shape, c.mode);
  bool update = false;  // the running statistics take this batch's
  if (c.batch_statistics) {
    if (fused) {
      // Statistics and normalization per channel while it is in cache. The affine map is the
      // one computed below from the finalized variance (same operations, same bits).
      auto make_affine = [&](std::int64_t f, double mean_f, double m2_f) {
        const double biased_var = detail::finalize(detail::Welford<double>{mean_f, m2_f, n}).biased_var;
        return detail::normalize_affine(mean_f, detail::inverse_std(biased_var, c.eps), value_or(a.weight, f, 1.0),
                                        value_or(a.bias, f, 0.0));
      };
      detail::cpu_impl::fused_forward_planes(detail::cpu_impl::geometry(shape, c.mode), a.x, a.residual,
                                             c.activation == Activation::relu, mean, m2, make_affine, a.y);
    } else {
      detail::cpu_impl::shard_moments(shape, c.mode, a.x, mean, m2);
    }
    update = ci::updates_running_statistics<P>(
        features, [&](std::int64_t f) { return detail::Welford<double>{mean[f], m2[f], n}; },
        a.running_mean.data != nullptr, c.skip_nonfinite_updates, a.skipped_updates);
  }

  // One pass over the features (nothing here can throw: the fused path has already written y):
  // the batch's mean and biased variance (running statistics updated with the unbiased one, as
  // PyTorch does), or the running statistics; then the affine map.
  ci::for_each_feature(features, [&](std::int64_t f) {
    double var = 0.0;
    if (c.batch_statistics) {
      const detail::FeatureStats<double> stats = detail::finalize(detail::Welford<double>{mean[f], m2[f], n});
      mean[f] = stats.mean;
      var = stats.biased_var;
      if (update) detail::update_running(a.running_mean[f], a.running_var[f], stats, c.exponential_average_factor);
    } else {
      mean[f] = static_cast<double>(a.running_mean[f]);
      var = static_cast<double>(a.running_var[f]);
    }
    const double invstd = detail::inverse_std(var, c.eps);
    if (a.save_mean.data) a.save_mean[f] = static_cast<P>(mean[f]);
    if (a.save_invstd.data) a.save_invstd[f] = static_cast<P>(invstd);
    affine[f] = detail::normalize_affine(mean[f], invstd, value_or(a.weight, f, 1.0), value_or(a.bias, f, 0.0));
  });
  if (!fused) detail::cpu_impl::normalize_elements(shape, c.mode, a.x, a.residual, c.activation, affine, a.y);
}

template <class T>
void backward(cpu, const Shape& shape, const BackwardArgs<T>& a, const BackwardConfig& c) {
  using P = param_t<T>;
  using detail::cpu_impl::value_or;
  detail::check_backward(shape, a, c);

  const std::int64_t features = feature_count(shape, c.mode);
  const std::int64_t n = reduction_count(shape, c.mode);
  if (shape.numel() == 0) {  // no values: the sums are zero (loops bounded by buffers that exist)
    if (!c.accumulate && a.grad_weight.data) std::fill(a.grad_weight.data, a.grad_weight.data + features, P(0));
    if (!c.accumulate && a.grad_bias.data) std::fill(a.grad_bias.data, a.grad_bias.data + features, P(0));
    return;
  }

  namespace ci = detail::cpu_impl;
  double* mean = ci::scratch<double>(ci::Scratch::feature_a, features);
  auto* sums = ci::scratch<detail::BackwardSums<double>>(ci::Scratch::feature_b, features);
  auto* k = ci::scratch<detail::BackwardCoefficients<double>>(ci::Scratch::feature_c, features);
  ci::reserve_scratch<T>(shape, c.mode);
  for (std::int64_t f = 0; f < features; ++f) mean[f] = static_cast<double>(a.mean[f]);
  // Feature f's coefficients, and its weight and bias gradients stored.
  auto coefficients = [&](std::int64_t f, const detail::BackwardSums<double>& s) {
    const auto kf = detail::backward_coefficients(s, static_cast<double>(a.invstd[f]), value_or(a.weight, f, 1.0), n,
                                                  c.batch_statistics);
    detail::store_gradient(a.grad_weight.data ? a.grad_weight.data + f : nullptr, kf.grad_weight, c.accumulate);
    detail::store_gradient(a.grad_bias.data ? a.grad_bias.data + f : nullptr, kf.grad_bias, c.accumulate);
    return kf;
  };
  if (ci::backward_fusable<T>(shape, c.mode, c.activation)) {
    // Sums, coefficients and input gradient per channel while it is in cache (the same bits).
    ci::fused_backward_planes(ci::geometry(shape, c.mode), a.x, a.dy, a.y, c.activation, mean, c.batch_statistics,
                              coefficients, a.dx, a.dresidual);
    return;
  }
  std::fill(sums, sums + features, detail::BackwardSums<double>{});
  ci::gradient_sums_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, mean, sums);
  ci::for_each_feature(features, [&](std::int64_t f) { k[f] = coefficients(f, sums[f]); });
  ci::input_gradient_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, mean, k, c.batch_statistics, a.dx,
                              a.dresidual);
}

}  // namespace batchnorm
