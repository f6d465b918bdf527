/**
 * @file detail/cpu/functional.inl
 * @brief The CPU reference: plain loops in memory order, accumulating in double (two passes
 *        per feature: the mean of x − pivot, then M2 about the mean). Every other formula
 *        comes from detail/moments.hpp, shared with the CUDA kernels.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../convert.hpp"
#include "../moments.hpp"
#include "../validate.hpp"

namespace batchnorm::detail::cpu_impl {

/**
 * @brief Visits every element of a tensor of @p shape in memory order, passing its
 *        offset and the index of the feature it belongs to (c, or c * S + s).
 */
template <class Visit>
void for_each_element(const Shape& shape, Mode mode, Visit&& visit) {
  const std::int64_t N = shape.batch(), C = shape.channels(), S = shape.spatial();
  const bool per_activation = mode == Mode::per_activation;
  std::int64_t offset = 0;
  if (shape.layout() == Layout::contiguous || S == 1) {
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t s = 0; s < S; ++s) visit(offset++, per_activation ? c * S + s : c);
  } else {
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t c = 0; c < C; ++c) visit(offset++, per_activation ? c * S + s : c);
  }
}

template <class E>
double value_or(const span<E>& s, std::int64_t i, double fallback) {
  return s.data ? static_cast<double>(s.data[i]) : fallback;
}

/**
 * @brief Mean and M2 of every feature of x, in double: two passes over x − pivot (the
 *        feature's first value, as on the GPU), the mean, then M2 about it. Exact for a
 *        constant feature (every term is 0), accurate at any offset, no division per element.
 *        Forward and phases::local_statistics share it. @p mean and @p m2 hold F values.
 */
template <class T>
void shard_moments(const Shape& shape, Mode mode, const T* x, double* mean, double* m2) {
  using conv = convert<T>;
  const std::int64_t features = feature_count(shape, mode);
  std::fill(mean, mean + features, 0.0);
  std::fill(m2, m2 + features, 0.0);
  const std::int64_t n = reduction_count(shape, mode);
  if (n == 0) return;
  std::vector<double> pivot(static_cast<std::size_t>(features));
  const Shape first({1, shape.channels(), shape.spatial()}, shape.layout());
  for_each_element(first, mode, [&](std::int64_t i, std::int64_t f) {
    const double v = conv::to_double(x[i]);
    pivot[f] = std::isfinite(v) ? v : 0.0;  // sample 0 holds one value of every feature; a
                                             // non-finite pivot would turn every term into NaN
  });
  for_each_element(shape, mode, [&](std::int64_t i, std::int64_t f) { mean[f] += conv::to_double(x[i]) - pivot[f]; });
  for (std::int64_t f = 0; f < features; ++f) mean[f] = pivot[f] + mean[f] / static_cast<double>(n);
  for_each_element(shape, mode, [&](std::int64_t i, std::int64_t f) {
    const double d = conv::to_double(x[i]) - mean[f];
    m2[f] += d * d;
  });
}

/**
 * @brief Turns F features' (mean, M2) over @p n values into mean and biased variance (in
 *        place of @p mean, into @p biased_var), and updates the running statistics with the
 *        unbiased variance, as PyTorch does; with @p skip_nonfinite they are left untouched
 *        (and *@p skipped incremented) when any feature's statistics are not finite.
 *        Forward and phases::merge_statistics share it.
 */
template <class P>
void finalize_batch_statistics(std::int64_t features, std::int64_t n, double* mean, const double* m2,
                               double* biased_var, span<P> running_mean, span<P> running_var, double factor,
                               bool skip_nonfinite, std::int64_t* skipped) {
  std::vector<FeatureStats<double>> stats(static_cast<std::size_t>(features));
  bool all_finite = true;
  for (std::int64_t f = 0; f < features; ++f) {
    stats[f] = finalize(Welford<double>{mean[f], m2[f], n});
    all_finite = all_finite && is_finite_as<P>(stats[f]);
  }
  // Allocation is done: nothing below can throw.
  for (std::int64_t f = 0; f < features; ++f) {
    mean[f] = stats[f].mean;
    biased_var[f] = stats[f].biased_var;
  }
  if (running_mean.data == nullptr) return;
  if (all_finite || !skip_nonfinite) {
    for (std::int64_t f = 0; f < features; ++f) update_running(running_mean[f], running_var[f], stats[f], factor);
  } else if (skipped) {
    increment_saturating(*skipped);
  }
}

/// y = act(affine_f(x) [+ residual]) for every element: forward's and phases::normalize's last pass.
template <class T>
void normalize_elements(const Shape& shape, Mode mode, const T* x, const T* residual, Activation activation,
                        const Affine<double>* affine, T* y) {
  using conv = convert<T>;
  const bool relu = activation == Activation::relu;
  for_each_element(shape, mode, [&](std::int64_t i, std::int64_t f) {
    double v = affine[f].apply(conv::to_double(x[i]));
    if (residual) v += conv::to_double(residual[i]);
    if (relu) v = detail::relu(v);
    y[i] = conv::from_double(v);
  });
}

/// Gradient flowing into the normalization at element i: dy, masked where a fused relu was inactive.
template <class T>
double upstream_gradient(const T* dy, const T* y, bool relu, std::int64_t i) {
  const double g = convert<T>::to_double(dy[i]);
  return relu ? relu_backward(g, convert<T>::to_double(y[i])) : g;
}

/// Per feature Σg, Σg·(x − mean) and Σ(x − mean), g the upstream gradient: backward's and
/// phases::local_gradient_sums' reduction. @p sums holds F zero-initialized entries.
template <class T>
void gradient_sums_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                            Activation activation, const double* mean, BackwardSums<double>* sums) {
  const bool relu = activation == Activation::relu;
  for_each_element(shape, mode, [&](std::int64_t i, std::int64_t f) {
    const double g = upstream_gradient(dy, y, relu, i);
    const double xmu = convert<T>::to_double(x[i]) - mean[f];
    sums[f].dy += g;
    sums[f].dy_xmu += g * xmu;
    sums[f].xmu += xmu;
  });
}

/// dresidual = g and dx = g·dy_scale + ((x − mean) − mean_shift)·xmu_scale + constant (training),
/// g·dy_scale (eval: x is not read, so a NaN in x stays out): backward's and
/// phases::input_gradient's last pass. Either output may be null.
template <class T>
void input_gradient_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                             Activation activation, const double* mean, const BackwardCoefficients<double>* k,
                             bool batch_statistics, T* dx, T* dresidual) {
  using conv = convert<T>;
  if (dx == nullptr && dresidual == nullptr) return;
  const bool relu = activation == Activation::relu;
  for_each_element(shape, mode, [&](std::int64_t i, std::int64_t f) {
    const double g = upstream_gradient(dy, y, relu, i);
    if (dresidual) dresidual[i] = conv::from_double(g);
    if (dx == nullptr) return;
    if (!batch_statistics) {
      dx[i] = conv::from_double(g * k[f].dy_scale);
      return;
    }
    const double xmu = (conv::to_double(x[i]) - mean[f]) - k[f].mean_shift;
    dx[i] = conv::from_double(g * k[f].dy_scale + xmu * k[f].xmu_scale + k[f].constant);
  });
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
  if (c.batch_statistics) {
    std::vector<double> m2(static_cast<std::size_t>(features));
    detail::cpu_impl::shard_moments(shape, c.mode, a.x, mean.data(), m2.data());
    detail::cpu_impl::finalize_batch_statistics(features, reduction_count(shape, c.mode), mean.data(), m2.data(),
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
  detail::cpu_impl::normalize_elements(shape, c.mode, a.x, a.residual, c.activation, affine.data(), a.y);
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
