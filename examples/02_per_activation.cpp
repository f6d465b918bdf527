// 02_per_activation.cpp: statistics per (channel, spatial location), Mode::per_activation.
//
// PyTorch's BatchNorm2d keeps one mean and one variance per channel, taken over the batch
// and every pixel. Some normalizations want more: one mean and variance for every
// (channel, row, column) location, taken over the batch only. cuDNN calls this
// PER_ACTIVATION; batchnorm calls it Mode::per_activation. A layer in that mode has
// C * H * W features (weights, biases, running statistics), one per location.
//
// Such a layer is, by definition, a BatchNorm1d(C * H * W) applied to the input viewed as
// (N, C * H * W): a contiguous NCHW tensor already is that matrix, so no copy is needed.
// This example trains both side by side on the same data (forward, running statistics,
// backward with parameter gradients, an SGD update) and then evaluates both, and checks
// that they agree. It also checks
//   - the first training output against a naive per-location computation written here,
//   - a third layer fed the same data in channels_last (NHWC) order, whose parameters are
//     still indexed c * H * W + h * W + w, and
//   - that per-channel statistics give a different result on this data (the twist matters:
//     every location has its own offset and spread).
// It returns 0 when everything agrees and 1 otherwise. CPU backend, plain C++17.

#include <batchnorm/batchnorm.hpp>

#include "common/rng.hpp"  // Rng

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using Layer2d = batchnorm::BatchNorm2d<float, batchnorm::cpu>;
using Layer1d = batchnorm::BatchNorm1d<float, batchnorm::cpu>;

constexpr std::int64_t N = 8, C = 3, H = 4, W = 5;
constexpr std::int64_t S = H * W;      // spatial locations per channel
constexpr std::int64_t F = C * S;      // features in per-activation mode
constexpr std::int64_t NUMEL = N * F;  // elements of one batch
constexpr int kSteps = 3;
constexpr float kLearningRate = 0.1f;

using examples::Rng;  // common/rng.hpp: splitmix64, the same numbers on every platform and compiler

/// Records the largest difference seen per check and whether it stayed within tolerance.
class Checker {
 public:
  void compare(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
               double tolerance = 1e-6) {
    double worst = got.size() == want.size() ? 0.0 : INFINITY;
    for (std::size_t i = 0; i < got.size() && i < want.size(); ++i)
      worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])) /
                                  std::max(1.0, std::fabs(static_cast<double>(want[i]))));
    const bool ok = worst <= tolerance;  // false for NaN too
    if (!ok) ++failures_;
    std::printf("  %-58s max diff %.2e  %s\n", what.c_str(), worst, ok ? "ok" : "MISMATCH");
  }
  void expect(const std::string& what, bool ok) {
    if (!ok) ++failures_;
    std::printf("  %-58s %s\n", what.c_str(), ok ? "ok" : "FAILED");
  }
  [[nodiscard]] int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

/// NCHW -> NHWC.
std::vector<float> to_channels_last(const std::vector<float>& nchw) {
  std::vector<float> nhwc(nchw.size());
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t s = 0; s < S; ++s) nhwc[static_cast<std::size_t>((n * S + s) * C + c)] =
          nchw[static_cast<std::size_t>((n * C + c) * S + s)];
  return nhwc;
}

/// NHWC -> NCHW.
std::vector<float> to_contiguous(const std::vector<float>& nhwc) {
  std::vector<float> nchw(nhwc.size());
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t s = 0; s < S; ++s) nchw[static_cast<std::size_t>((n * C + c) * S + s)] =
          nhwc[static_cast<std::size_t>((n * S + s) * C + c)];
  return nchw;
}

/// y = (x - mean) / sqrt(biased var + eps) * weight + bias, statistics over the batch only,
/// for every (c, h, w): the definition, in double, independent of the library.
std::vector<float> naive_per_location(const std::vector<float>& x, const std::vector<float>& weight,
                                      const std::vector<float>& bias, double eps) {
  std::vector<float> y(x.size());
  for (std::int64_t f = 0; f < F; ++f) {  // f = c * S + s; element (n, f) at n * F + f
    double mean = 0.0, var = 0.0;
    for (std::int64_t n = 0; n < N; ++n) mean += x[static_cast<std::size_t>(n * F + f)];
    mean /= static_cast<double>(N);
    for (std::int64_t n = 0; n < N; ++n) {
      const double d = x[static_cast<std::size_t>(n * F + f)] - mean;
      var += d * d;
    }
    var /= static_cast<double>(N);
    const double invstd = 1.0 / std::sqrt(var + eps);
    for (std::int64_t n = 0; n < N; ++n) {
      const auto i = static_cast<std::size_t>(n * F + f);
      y[i] = static_cast<float>((x[i] - mean) * invstd * weight[static_cast<std::size_t>(f)] +
                                bias[static_cast<std::size_t>(f)]);
    }
  }
  return y;
}

/// One SGD step on weight and bias, through the raw host buffers.
template <class Layer>
void sgd_step(Layer& layer, std::int64_t features) {
  float* w = layer.weight_data();
  float* b = layer.bias_data();
  const float* gw = layer.grad_weight_data();
  const float* gb = layer.grad_bias_data();
  for (std::int64_t f = 0; f < features; ++f) {
    w[f] -= kLearningRate * gw[f];
    b[f] -= kLearningRate * gb[f];
  }
}

int run() {
  const batchnorm::Shape nchw{N, C, H, W};
  const batchnorm::Shape nhwc({N, C, H, W}, batchnorm::Layout::channels_last);
  const batchnorm::Shape flat{N, F};

  batchnorm::Options per_activation;
  per_activation.mode = batchnorm::Mode::per_activation;
  Layer2d by_location(F, per_activation);     // BatchNorm2d, one feature per (c, h, w)
  Layer2d by_location_nhwc(F, per_activation);  // the same, fed channels_last data
  Layer1d flattened(F);                       // BatchNorm1d(C*H*W) on (N, C*H*W)
  Layer2d by_channel(C);                      // PyTorch's usual per-channel BatchNorm2d

  // Every location gets its own offset and spread, so per-location and per-channel
  // statistics differ; weight and bias start away from 1 and 0 so that they matter.
  Rng rng(2026);
  std::vector<double> loc_mean(F), loc_std(F);
  for (std::int64_t f = 0; f < F; ++f) {
    loc_mean[static_cast<std::size_t>(f)] = 4.0 * rng.normal();
    loc_std[static_cast<std::size_t>(f)] = 0.5 + 2.0 * rng.uniform();
  }
  batchnorm::State<float> start = by_location.state();
  for (std::int64_t f = 0; f < F; ++f) {
    start.weight[static_cast<std::size_t>(f)] = static_cast<float>(0.5 + rng.uniform());
    start.bias[static_cast<std::size_t>(f)] = static_cast<float>(rng.normal());
  }
  by_location.load_state(start);
  by_location_nhwc.load_state(start);
  flattened.load_state(start);
  const double eps = by_location.options().eps;

  std::printf("per-activation BatchNorm2d(%lld) on (N, C, H, W) = (%lld, %lld, %lld, %lld)\n"
              "versus BatchNorm1d(%lld) on the same memory as (N, C*H*W) = (%lld, %lld)\n\n",
              static_cast<long long>(F), static_cast<long long>(N), static_cast<long long>(C),
              static_cast<long long>(H), static_cast<long long>(W), static_cast<long long>(F),
              static_cast<long long>(N), static_cast<long long>(F));

  Checker check;
  std::vector<float> x(NUMEL), dy(NUMEL);
  std::vector<float> y_loc(NUMEL), y_flat(NUMEL), y_nhwc(NUMEL), y_chan(NUMEL);
  std::vector<float> dx_loc(NUMEL), dx_flat(NUMEL), dx_nhwc(NUMEL);

  for (int step = 1; step <= kSteps + 1; ++step) {
    const bool training = step <= kSteps;
    by_location.train(training);
    by_location_nhwc.train(training);
    flattened.train(training);
    by_channel.train(training);
    std::printf("%s %d:\n", training ? "training step" : "eval (running statistics), step", step);

    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t f = 0; f < F; ++f) {
        const auto i = static_cast<std::size_t>(n * F + f);
        x[i] = static_cast<float>(loc_mean[static_cast<std::size_t>(f)] +
                                  loc_std[static_cast<std::size_t>(f)] * rng.normal());
        dy[i] = static_cast<float>(rng.normal());
      }
    const std::vector<float> x_nhwc = to_channels_last(x);
    const batchnorm::State<float> before = by_location.state();  // parameters used by this forward

    by_location.forward(x.data(), y_loc.data(), nchw);
    flattened.forward(x.data(), y_flat.data(), flat);
    by_location_nhwc.forward(x_nhwc.data(), y_nhwc.data(), nhwc);
    by_channel.forward(x.data(), y_chan.data(), nchw);

    check.compare("forward: per-activation 2d vs flattened 1d", y_loc, y_flat);
    check.compare("forward: channels_last vs contiguous", to_contiguous(y_nhwc), y_loc);
    if (step == 1)
      check.compare("forward: vs naive per-location formula (double)", y_loc,
                    naive_per_location(x, before.weight, before.bias, eps), 1e-5);

    by_location.backward(x.data(), dy.data(), dx_loc.data(), nchw);
    flattened.backward(x.data(), dy.data(), dx_flat.data(), flat);
    by_location_nhwc.backward(x_nhwc.data(), to_channels_last(dy).data(), dx_nhwc.data(), nhwc);
    check.compare("backward dx: per-activation 2d vs flattened 1d", dx_loc, dx_flat);
    check.compare("backward dx: channels_last vs contiguous", to_contiguous(dx_nhwc), dx_loc);
    const batchnorm::Gradients<float> g_loc = by_location.gradients(), g_flat = flattened.gradients(),
                                      g_nhwc = by_location_nhwc.gradients();
    check.compare("grad_weight: per-activation 2d vs flattened 1d", g_loc.grad_weight, g_flat.grad_weight);
    check.compare("grad_bias:   per-activation 2d vs flattened 1d", g_loc.grad_bias, g_flat.grad_bias);
    check.compare("grad_weight: channels_last vs contiguous", g_nhwc.grad_weight, g_loc.grad_weight);
    check.compare("grad_bias: channels_last vs contiguous", g_nhwc.grad_bias, g_loc.grad_bias);

    if (training) {
      sgd_step(by_location, F);
      sgd_step(flattened, F);
      sgd_step(by_location_nhwc, F);
    }
    const batchnorm::State<float> s_loc = by_location.state(), s_flat = flattened.state(),
                                  s_nhwc = by_location_nhwc.state();
    check.compare("running_mean: per-activation 2d vs flattened 1d", s_loc.running_mean, s_flat.running_mean);
    check.compare("running_var:  per-activation 2d vs flattened 1d", s_loc.running_var, s_flat.running_var);
    check.compare("weight after SGD: 2d vs 1d", s_loc.weight, s_flat.weight);
    check.compare("bias after SGD: 2d vs 1d", s_loc.bias, s_flat.bias);
    check.compare("running_mean: channels_last vs contiguous", s_nhwc.running_mean, s_loc.running_mean);
    check.compare("running_var: channels_last vs contiguous", s_nhwc.running_var, s_loc.running_var);
    check.compare("weight after SGD: channels_last vs contiguous", s_nhwc.weight, s_loc.weight);
    check.expect("num_batches_tracked equal (" + std::to_string(s_loc.num_batches_tracked) + ")",
                 s_loc.num_batches_tracked == s_flat.num_batches_tracked &&
                     s_loc.num_batches_tracked == s_nhwc.num_batches_tracked &&
                     s_loc.num_batches_tracked == std::min(step, kSteps));
  }

  // The twist: per-channel statistics mix locations with different offsets, so they do
  // not normalize each location; here they give a visibly different output.
  double channel_vs_location = 0.0;
  for (std::size_t i = 0; i < y_loc.size(); ++i)
    channel_vs_location = std::max(channel_vs_location, std::fabs(static_cast<double>(y_chan[i]) - y_loc[i]));
  std::printf("\nper-channel BatchNorm2d(%lld) on the same eval batch differs from per-location by up to %.3f\n",
              static_cast<long long>(C), channel_vs_location);
  check.expect("per-channel statistics give a different result here", channel_vs_location > 0.5);

  std::printf("\n");
  if (check.failures() != 0) {
    std::printf("FAILED: %d check(s) did not hold\n", check.failures());
    return 1;
  }
  std::printf("OK: per-activation BatchNorm2d equals BatchNorm1d(C*H*W) on the flattened input\n");
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
