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
#include <vector>

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
 * @brief Turns F features' (mean, M2) over @p n values into mean and biased variance (in
 *        place of @p mean, into @p biased_var), and updates the running statistics with the
 *        unbiased variance, as PyTorch does; with @p skip_nonfinite they are left untouched
 *        (and *@p skipped incremented, saturating) when any feature's statistics, rounded to
 *        @p P as they would be stored, are not finite.
 *        Forward and phases::merge_statistics share it.
 */
template <class P>
void finalize_batch_statistics(std::int64_t features, std::int64_t n, double* mean, const double* m2,
                               double* biased_var, span<P> running_mean, span<P> running_var, double factor,
                               bool skip_nonfinite, std::int64_t* skipped) {
  // No allocation: nothing here can throw (forward's fused path has already written y).
  bool all_finite = true;
  for (std::int64_t f = 0; f < features; ++f) all_finite = all_finite && is_finite_as<P>(finalize(Welford<double>{mean[f], m2[f], n}));
  for (std::int64_t f = 0; f < features; ++f) {
    const FeatureStats<double> stats = finalize(Welford<double>{mean[f], m2[f], n});
    mean[f] = stats.mean;
    biased_var[f] = stats.biased_var;
    if (running_mean.data && (all_finite || !skip_nonfinite)) update_running(running_mean[f], running_var[f], stats, factor);
  }
  if (running_mean.data && !(all_finite || !skip_nonfinite) && skipped) increment_saturating(*skipped);
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

  // Everything is allocated before the first write, so that std::bad_alloc cannot leave
  // running statistics updated and y unwritten.
  std::vector<double> mean(static_cast<std::size_t>(features));
  std::vector<double> var(static_cast<std::size_t>(features));  // biased (used to normalize)
  std::vector<detail::Affine<double>> affine(static_cast<std::size_t>(features));
  const bool fused = c.batch_statistics && detail::cpu_impl::fusable<T>(shape, c.mode);
  if (c.batch_statistics) {
    std::vector<double> m2(static_cast<std::size_t>(features));
    const std::int64_t n = reduction_count(shape, c.mode);
    if (fused) {
      // Statistics and normalization per channel while it is in cache. The affine map is the
      // one computed below from finalize_batch_statistics' variance (same operations, same bits).
      auto make_affine = [&](std::int64_t f, double mean_f, double m2_f) {
        const double biased_var = detail::finalize(detail::Welford<double>{mean_f, m2_f, n}).biased_var;
        return detail::normalize_affine(mean_f, detail::inverse_std(biased_var, c.eps), value_or(a.weight, f, 1.0),
                                        value_or(a.bias, f, 0.0));
      };
      detail::cpu_impl::fused_forward_planes(detail::cpu_impl::geometry(shape, c.mode), a.x, a.residual,
                                             c.activation == Activation::relu, mean.data(), m2.data(), make_affine,
                                             a.y);
    } else {
      detail::cpu_impl::shard_moments(shape, c.mode, a.x, mean.data(), m2.data());
    }
    detail::cpu_impl::finalize_batch_statistics(features, n, mean.data(), m2.data(),
                                                var.data(), a.running_mean, a.running_var,
                                                c.exponential_average_factor, c.skip_nonfinite_updates,
                                                a.skipped_updates);
  } else {
    for (std::int64_t f = 0; f < features; ++f) {
      mean[f] = static_cast<double>(a.running_mean[f]);
      var[f] = static_cast<double>(a.running_var[f]);
    }
  }

  for (std::int64_t f = 0; f < features; ++f) {
    const double invstd = detail::inverse_std(var[f], c.eps);
    if (a.save_mean.data) a.save_mean[f] = static_cast<P>(mean[f]);
    if (a.save_invstd.data) a.save_invstd[f] = static_cast<P>(invstd);
    affine[f] = detail::normalize_affine(mean[f], invstd, value_or(a.weight, f, 1.0), value_or(a.bias, f, 0.0));
  }
  if (!fused) detail::cpu_impl::normalize_elements(shape, c.mode, a.x, a.residual, c.activation, affine.data(), a.y);
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

  std::vector<double> mean(static_cast<std::size_t>(features));
  for (std::int64_t f = 0; f < features; ++f) mean[f] = static_cast<double>(a.mean[f]);
  std::vector<detail::BackwardSums<double>> sums(static_cast<std::size_t>(features));
  detail::cpu_impl::gradient_sums_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, mean.data(), sums.data());
  std::vector<detail::BackwardCoefficients<double>> k(static_cast<std::size_t>(features));
  for (std::int64_t f = 0; f < features; ++f) {
    k[f] = detail::backward_coefficients(sums[f], static_cast<double>(a.invstd[f]), value_or(a.weight, f, 1.0), n,
                                         c.batch_statistics);
    detail::store_gradient(a.grad_weight.data ? a.grad_weight.data + f : nullptr, k[f].grad_weight, c.accumulate);
    detail::store_gradient(a.grad_bias.data ? a.grad_bias.data + f : nullptr, k[f].grad_bias, c.accumulate);
  }
  detail::cpu_impl::input_gradient_elements(shape, c.mode, a.x, a.dy, a.y, c.activation, mean.data(), k.data(),
                                            c.batch_statistics, a.dx, a.dresidual);
}

}  // namespace batchnorm
