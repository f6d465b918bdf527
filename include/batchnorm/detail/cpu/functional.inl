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

}  // namespace batchnorm::detail::cpu_impl

namespace batchnorm {

template <class T>
void forward(cpu, const Shape& shape, const ForwardArgs<T>& a, const ForwardConfig& c) {
  using P = param_t<T>;
  using conv = detail::convert<T>;
  using detail::cpu_impl::for_each_element;
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
    // Two passes in double over x − pivot (the feature's first value, as on the GPU): the
    // mean, then M2 about it. Exact for a constant feature (every term is 0), accurate at any
    // offset, and no division per element.
    const std::int64_t n = reduction_count(shape, c.mode);
    std::vector<double> pivot(static_cast<std::size_t>(features));
    const Shape first({1, shape.channels(), shape.spatial()}, shape.layout());
    for_each_element(first, c.mode, [&](std::int64_t i, std::int64_t f) {
      const double v = conv::to_double(a.x[i]);
      pivot[f] = std::isfinite(v) ? v : 0.0;  // sample 0 holds one value of every feature; a
                                               // non-finite pivot would turn every term into NaN
    });
    for_each_element(shape, c.mode, [&](std::int64_t i, std::int64_t f) { mean[f] += conv::to_double(a.x[i]) - pivot[f]; });
    for (std::int64_t f = 0; f < features; ++f) mean[f] = pivot[f] + mean[f] / static_cast<double>(n);
    std::vector<double> m2(static_cast<std::size_t>(features), 0.0);
    for_each_element(shape, c.mode, [&](std::int64_t i, std::int64_t f) {
      const double d = conv::to_double(a.x[i]) - mean[f];
      m2[f] += d * d;
    });
    std::vector<detail::FeatureStats<double>> stats(static_cast<std::size_t>(features));
    bool all_finite = true;
    for (std::int64_t f = 0; f < features; ++f) {
      stats[f] = detail::finalize(detail::Welford<double>{mean[f], m2[f], n});
      mean[f] = stats[f].mean;
      var[f] = stats[f].biased_var;
      all_finite = all_finite && detail::is_finite_as<P>(stats[f]);
    }
    if (a.running_mean.data) {
      if (all_finite || !c.skip_nonfinite_updates) {
        for (std::int64_t f = 0; f < features; ++f)
          detail::update_running(a.running_mean[f], a.running_var[f], stats[f], c.exponential_average_factor);
      } else if (a.skipped_updates) {
        detail::increment_saturating(*a.skipped_updates);
      }
    }
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
  const bool relu = c.activation == Activation::relu;
  for_each_element(shape, c.mode, [&](std::int64_t i, std::int64_t f) {
    double v = affine[f].apply(conv::to_double(a.x[i]));
    if (a.residual) v += conv::to_double(a.residual[i]);
    if (relu) v = detail::relu(v);
    a.y[i] = conv::from_double(v);
  });
}

template <class T>
void backward(cpu, const Shape& shape, const BackwardArgs<T>& a, const BackwardConfig& c) {
  using P = param_t<T>;
  using conv = detail::convert<T>;
  using detail::cpu_impl::for_each_element;
  using detail::cpu_impl::value_or;
  detail::check_backward(shape, a, c);

  const std::int64_t features = feature_count(shape, c.mode);
  const std::int64_t n = reduction_count(shape, c.mode);
  const bool relu = c.activation == Activation::relu;
  // Gradient flowing into the normalization: dy, masked where the fused relu was inactive.
  auto upstream = [&](std::int64_t i) {
    const double g = conv::to_double(a.dy[i]);
    return relu ? detail::relu_backward(g, conv::to_double(a.y[i])) : g;
  };
  if (shape.numel() == 0) {  // no values: the sums are zero (loops bounded by buffers that exist)
    if (!c.accumulate && a.grad_weight.data) std::fill(a.grad_weight.data, a.grad_weight.data + features, P(0));
    if (!c.accumulate && a.grad_bias.data) std::fill(a.grad_bias.data, a.grad_bias.data + features, P(0));
    return;
  }

  std::vector<detail::BackwardSums<double>> sums(static_cast<std::size_t>(features));
  for_each_element(shape, c.mode, [&](std::int64_t i, std::int64_t f) {
    const double g = upstream(i);
    const double xmu = conv::to_double(a.x[i]) - static_cast<double>(a.mean[f]);
    sums[f].dy += g;
    sums[f].dy_xmu += g * xmu;
    sums[f].xmu += xmu;
  });
  std::vector<detail::BackwardCoefficients<double>> k(static_cast<std::size_t>(features));
  for (std::int64_t f = 0; f < features; ++f) {
    k[f] = detail::backward_coefficients(sums[f], static_cast<double>(a.invstd[f]), value_or(a.weight, f, 1.0), n,
                                         c.batch_statistics);
    detail::store_gradient(a.grad_weight.data ? a.grad_weight.data + f : nullptr, k[f].grad_weight, c.accumulate);
    detail::store_gradient(a.grad_bias.data ? a.grad_bias.data + f : nullptr, k[f].grad_bias, c.accumulate);
  }
  if (a.dx == nullptr && a.dresidual == nullptr) return;
  for_each_element(shape, c.mode, [&](std::int64_t i, std::int64_t f) {
    const double g = upstream(i);
    if (a.dresidual) a.dresidual[i] = conv::from_double(g);
    if (a.dx == nullptr) return;
    if (!c.batch_statistics) {  // eval: dx = dy * invstd * w, x is not read (a NaN in x stays out)
      a.dx[i] = conv::from_double(g * k[f].dy_scale);
      return;
    }
    const double xmu = (conv::to_double(a.x[i]) - static_cast<double>(a.mean[f])) - k[f].mean_shift;
    a.dx[i] = conv::from_double(g * k[f].dy_scale + xmu * k[f].xmu_scale + k[f].constant);
  });
}

}  // namespace batchnorm
