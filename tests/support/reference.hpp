/**
 * @file tests/support/reference.hpp
 * @brief An independent, naive BatchNorm reference in double precision for the tests.
 *
 * Written from the formulas of torch.nn.BatchNorm / aten Normalization.cpp, not from the
 * library: it uses none of batchnorm::detail (only the public Shape / Options / Mode /
 * Layout vocabulary), gathers each feature's values by explicit (n, c, s) index math, takes
 * the mean and the variance in two plain passes, and writes the backward in the textbook
 * form dx = w·invstd/n · (n·dy − Σdy − x̂·Σ(dy·x̂)) rather than the library's folded one.
 *
 *  - forward(): training (batch statistics) or eval (running statistics), running-stat update
 *    with momentum or the cumulative average, affine or not, tracked or not, per_channel or
 *    per_activation, contiguous or channels_last, optional residual and fused relu;
 *  - backward(): dx, grad_weight, grad_bias (and dz for the fused relu);
 *  - Layer: the state machine of a torch.nn.BatchNormNd module around the two.
 */
#pragma once

#include <batchnorm/options.hpp>
#include <batchnorm/shape.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <vector>

namespace bnref {

using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::Options;
using batchnorm::Shape;

/// Offset of element (n, c, s) in memory (s: flat spatial index).
inline std::int64_t offset(const Shape& shape, std::int64_t n, std::int64_t c, std::int64_t s) {
  const std::int64_t C = shape.channels();
  std::int64_t S = 1;
  for (int d = 2; d < shape.rank(); ++d) S *= shape[d];
  if (shape.layout() == Layout::channels_last) return (n * S + s) * C + c;
  return (n * C + c) * S + s;
}

/// Number of statistics features: C (per_channel) or C·S (per_activation).
inline std::int64_t features(const Shape& shape, Mode mode) {
  std::int64_t S = 1;
  for (int d = 2; d < shape.rank(); ++d) S *= shape[d];
  return mode == Mode::per_channel ? shape.channels() : shape.channels() * S;
}

/// Calls f(offset, feature) for every element, in (n, c, s) order (not memory order).
template <class F>
void for_each(const Shape& shape, Mode mode, F&& f) {
  const std::int64_t N = shape[0], C = shape[1];
  std::int64_t S = 1;
  for (int d = 2; d < shape.rank(); ++d) S *= shape[d];
  const bool last = shape.layout() == Layout::channels_last;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t s = 0; s < S; ++s)
        f(last ? (n * S + s) * C + c : (n * C + c) * S + s, mode == Mode::per_channel ? c : c * S + s);
}

/// A layer's tensors in double. Empty vectors: not affine / not tracking.
struct Params {
  std::vector<double> weight, bias, running_mean, running_var;
  std::int64_t num_batches_tracked = 0;
};

struct ForwardResult {
  std::vector<double> y;
  std::vector<double> mean;      ///< the mean used (batch or running)
  std::vector<double> invstd;    ///< the 1/sqrt(var + eps) used
  std::vector<double> batch_var;           ///< biased batch variance (batch statistics only)
  std::vector<double> batch_var_unbiased;  ///< unbiased batch variance (batch statistics only)
  bool batch_statistics = true;
  bool updated = false;  ///< running stats were updated
  bool skipped = false;  ///< the update was skipped for non-finite statistics
};

struct ForwardSettings {
  Mode mode = Mode::per_channel;
  bool batch_statistics = true;
  double eps = 1e-5;
  double factor = 0.1;  ///< momentum or 1/num_batches_tracked
  bool skip_nonfinite = false;
  bool relu = false;
};

/**
 * @brief F.batch_norm: @p p supplies weight/bias (empty: identity) and running stats (empty:
 *        none; updated in place when batch statistics are used). @p residual may be empty.
 */
inline ForwardResult forward(const Shape& shape, const std::vector<double>& x, Params& p, const ForwardSettings& s,
                             const std::vector<double>& residual = {}) {
  const std::int64_t F = features(shape, s.mode);
  ForwardResult r;
  r.batch_statistics = s.batch_statistics;
  r.y.assign(x.size(), 0.0);
  r.mean.assign(static_cast<std::size_t>(F), 0.0);
  r.invstd.assign(static_cast<std::size_t>(F), 0.0);
  std::vector<double> var(static_cast<std::size_t>(F), 0.0);
  if (x.empty()) return r;  // zero-size batch: nothing computed, nothing updated
  if (s.batch_statistics) {
    std::vector<double> count(static_cast<std::size_t>(F), 0.0);
    for_each(shape, s.mode, [&](std::int64_t i, std::int64_t f) {
      r.mean[f] += x[i];
      count[f] += 1.0;
    });
    for (std::int64_t f = 0; f < F; ++f) r.mean[f] /= count[f];
    for_each(shape, s.mode, [&](std::int64_t i, std::int64_t f) { var[f] += (x[i] - r.mean[f]) * (x[i] - r.mean[f]); });
    r.batch_var.resize(static_cast<std::size_t>(F));
    r.batch_var_unbiased.resize(static_cast<std::size_t>(F));
    bool finite = true;
    for (std::int64_t f = 0; f < F; ++f) {
      const double ss = var[f];
      var[f] = ss / count[f];
      r.batch_var[f] = var[f];
      r.batch_var_unbiased[f] = ss / (count[f] - 1.0);
      finite = finite && std::isfinite(r.mean[f]) && std::isfinite(r.batch_var_unbiased[f]);
    }
    if (!p.running_mean.empty()) {
      if (finite || !s.skip_nonfinite) {
        for (std::int64_t f = 0; f < F; ++f) {
          p.running_mean[f] = (1.0 - s.factor) * p.running_mean[f] + s.factor * r.mean[f];
          p.running_var[f] = (1.0 - s.factor) * p.running_var[f] + s.factor * r.batch_var_unbiased[f];
        }
        r.updated = true;
      } else {
        r.skipped = true;
      }
    }
  } else {
    for (std::int64_t f = 0; f < F; ++f) {
      r.mean[f] = p.running_mean[f];
      var[f] = p.running_var[f];
    }
  }
  for (std::int64_t f = 0; f < F; ++f) r.invstd[f] = 1.0 / std::sqrt(var[f] + s.eps);
  for_each(shape, s.mode, [&](std::int64_t i, std::int64_t f) {
    const double w = p.weight.empty() ? 1.0 : p.weight[f];
    const double b = p.bias.empty() ? 0.0 : p.bias[f];
    double v = (x[i] - r.mean[f]) * r.invstd[f] * w + b;
    if (!residual.empty()) v += residual[i];
    if (s.relu && v < 0.0) v = 0.0;
    r.y[i] = v;
  });
  return r;
}

struct BackwardResult {
  std::vector<double> dx, dz, grad_weight, grad_bias;
};

/**
 * @brief native_batch_norm_backward with the statistics of @p fwd (batch or running).
 *        For a fused relu, the gradient is masked by fwd.y > 0.
 */
inline BackwardResult backward(const Shape& shape, const std::vector<double>& x, const std::vector<double>& dy,
                               const Params& p, const ForwardResult& fwd, Mode mode, bool relu = false) {
  const std::int64_t F = features(shape, mode);
  BackwardResult r;
  r.dx.assign(x.size(), 0.0);
  r.dz.assign(x.size(), 0.0);
  r.grad_weight.assign(static_cast<std::size_t>(F), 0.0);
  r.grad_bias.assign(static_cast<std::size_t>(F), 0.0);
  std::vector<double> g(dy);
  if (relu)
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = fwd.y[i] > 0.0 ? dy[i] : 0.0;
  r.dz = g;
  std::vector<double> count(static_cast<std::size_t>(F), 0.0);
  auto xhat = [&](std::int64_t i, std::int64_t f) { return (x[i] - fwd.mean[f]) * fwd.invstd[f]; };
  for_each(shape, mode, [&](std::int64_t i, std::int64_t f) {
    r.grad_bias[f] += g[i];
    r.grad_weight[f] += g[i] * xhat(i, f);
    count[f] += 1.0;
  });
  for_each(shape, mode, [&](std::int64_t i, std::int64_t f) {
    const double w = p.weight.empty() ? 1.0 : p.weight[f];
    if (fwd.batch_statistics) {
      const double n = count[f];
      r.dx[i] = w * fwd.invstd[f] / n * (n * g[i] - r.grad_bias[f] - xhat(i, f) * r.grad_weight[f]);
    } else {
      r.dx[i] = g[i] * fwd.invstd[f] * w;
    }
  });
  return r;
}

/// The state machine of torch.nn.BatchNormNd (training flag, counters, factor choice).
struct Layer {
  Options options;
  bool training = true;
  Params p;
  std::int64_t skipped = 0;
  std::int64_t num_features;

  explicit Layer(std::int64_t features, const Options& o = {}) : options(o), num_features(features) {
    if (o.affine) {
      p.weight.assign(static_cast<std::size_t>(features), 1.0);
      p.bias.assign(static_cast<std::size_t>(features), 0.0);
    }
    if (o.track_running_stats) {
      p.running_mean.assign(static_cast<std::size_t>(features), 0.0);
      p.running_var.assign(static_cast<std::size_t>(features), 1.0);
    }
  }

  ForwardResult forward(const Shape& shape, const std::vector<double>& x, bool relu = false,
                        const std::vector<double>& residual = {}) {
    const bool track = options.track_running_stats;
    ForwardSettings s;
    s.mode = options.mode;
    s.eps = options.eps;
    s.skip_nonfinite = options.skip_nonfinite_updates;
    s.relu = relu;
    s.batch_statistics = training || !track;
    s.factor = 0.0;
    if (training && track) {
      p.num_batches_tracked += 1;  // PyTorch increments before choosing the factor, even for N = 0
      s.factor = options.momentum ? *options.momentum : 1.0 / static_cast<double>(p.num_batches_tracked);
    }
    ForwardResult r = bnref::forward(shape, x, p, s, residual);
    if (r.skipped) ++skipped;
    return r;
  }

  BackwardResult backward(const Shape& shape, const std::vector<double>& x, const std::vector<double>& dy,
                          const ForwardResult& fwd, bool relu = false) const {
    return bnref::backward(shape, x, dy, p, fwd, options.mode, relu);
  }
};

// ---- small helpers shared by the tests -------------------------------------------------

/// Deterministic normal values offset + scale * N(0, 1), as double.
inline std::vector<double> normal(std::int64_t n, std::uint64_t seed, double offset = 0.0, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = offset + scale * d(rng);
  return v;
}

/// Converts to T (rounding once), e.g. to build the library's input.
template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

/// Converts to double: the reference's view of the very values the library got.
template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// Largest |got − want| / (|want| + floor) over the elements; floor keeps values near 0 fair.
template <class T>
double max_rel_error(const std::vector<T>& got, const std::vector<double>& want, double floor = 1.0) {
  double worst = got.size() == want.size() ? 0.0 : INFINITY;
  for (std::size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    const double e = std::fabs(g - want[i]) / (std::fabs(want[i]) + floor);
    if (!(e <= worst)) worst = e;  // NaN counts as the worst
  }
  return worst;
}

/// max |v|
inline double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double e : v) m = std::fmax(m, std::fabs(e));
  return m;
}

}  // namespace bnref
