// Inference folding (include/batchnorm/fold.hpp): conv → BatchNorm(eval) equals the conv
// with the folded weight and bias, and linear → BatchNorm1d(eval) likewise, on the CPU.
//
// Tolerances: double, 1e-12 relative to Σ|w·x| (the scale of the dot products); float,
// 2e-6 relative to it (each folded weight is rounded to float once, ~6e-8 relative, and the
// reference path rounds the conv output and the BN output to float).
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/fold.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

struct ConvShape {
  std::int64_t n, cin, h, w, cout, k, pad;
  [[nodiscard]] std::int64_t ho() const { return h + 2 * pad - k + 1; }
  [[nodiscard]] std::int64_t wo() const { return w + 2 * pad - k + 1; }
};

/// Naive conv2d, stride 1, zero padding, weight OIHW, NCHW in and out; accumulates in
/// double and also returns Σ|w·x| per output (the scale for tolerances).
template <class T>
std::vector<T> conv2d(const std::vector<T>& x, const std::vector<T>& weight, const std::vector<T>& bias,
                      const ConvShape& s, std::vector<double>* magnitude = nullptr) {
  std::vector<T> y(static_cast<std::size_t>(s.n * s.cout * s.ho() * s.wo()));
  if (magnitude) magnitude->assign(y.size(), 0.0);
  for (std::int64_t n = 0; n < s.n; ++n)
    for (std::int64_t o = 0; o < s.cout; ++o)
      for (std::int64_t i = 0; i < s.ho(); ++i)
        for (std::int64_t j = 0; j < s.wo(); ++j) {
          double acc = bias.empty() ? 0.0 : static_cast<double>(bias[static_cast<std::size_t>(o)]);
          double mag = std::fabs(acc);
          for (std::int64_t c = 0; c < s.cin; ++c)
            for (std::int64_t a = 0; a < s.k; ++a)
              for (std::int64_t b = 0; b < s.k; ++b) {
                const std::int64_t r = i + a - s.pad, q = j + b - s.pad;
                if (r < 0 || r >= s.h || q < 0 || q >= s.w) continue;
                const double term = static_cast<double>(weight[static_cast<std::size_t>(((o * s.cin + c) * s.k + a) * s.k + b)]) *
                                    static_cast<double>(x[static_cast<std::size_t>(((n * s.cin + c) * s.h + r) * s.w + q)]);
                acc += term;
                mag += std::fabs(term);
              }
          const auto at = static_cast<std::size_t>(((n * s.cout + o) * s.ho() + i) * s.wo() + j);
          y[at] = static_cast<T>(acc);
          if (magnitude) (*magnitude)[at] = mag;
        }
  return y;
}

/// y = x W^T + b for x (N, in), W (out, in).
template <class T>
std::vector<T> linear(const std::vector<T>& x, const std::vector<T>& weight, const std::vector<T>& bias, std::int64_t n,
                      std::int64_t in, std::int64_t out, std::vector<double>* magnitude = nullptr) {
  std::vector<T> y(static_cast<std::size_t>(n * out));
  if (magnitude) magnitude->assign(y.size(), 0.0);
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double acc = bias.empty() ? 0.0 : static_cast<double>(bias[static_cast<std::size_t>(o)]);
      double mag = std::fabs(acc);
      for (std::int64_t i = 0; i < in; ++i) {
        const double term = static_cast<double>(weight[static_cast<std::size_t>(o * in + i)]) *
                            static_cast<double>(x[static_cast<std::size_t>(r * in + i)]);
        acc += term;
        mag += std::fabs(term);
      }
      y[static_cast<std::size_t>(r * out + o)] = static_cast<T>(acc);
      if (magnitude) (*magnitude)[static_cast<std::size_t>(r * out + o)] = mag;
    }
  return y;
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(u(rng));
  return v;
}

/// A state far from the initial one: scales, shifts, means and variances of several magnitudes.
template <class P>
bn::State<P> eval_state(std::int64_t c, std::mt19937& rng, bool affine = true) {
  bn::State<P> s;
  if (affine) {
    s.weight = random_vector<P>(static_cast<std::size_t>(c), rng, -2.0, 2.0);
    s.bias = random_vector<P>(static_cast<std::size_t>(c), rng, -1.0, 1.0);
  }
  s.running_mean = random_vector<P>(static_cast<std::size_t>(c), rng, -3.0, 3.0);
  s.running_var = random_vector<P>(static_cast<std::size_t>(c), rng, 0.01, 5.0);
  s.num_batches_tracked = 17;
  return s;
}

template <class T>
double tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-6;
}

template <class T>
void conv_then_bn_equals_folded_conv(bool conv_bias, bool affine) {
  std::mt19937 rng(42);
  const ConvShape s{2, 3, 6, 5, 4, 3, 1};
  const auto x = random_vector<T>(static_cast<std::size_t>(s.n * s.cin * s.h * s.w), rng);
  const auto w = random_vector<T>(static_cast<std::size_t>(s.cout * s.cin * s.k * s.k), rng);
  const auto b = conv_bias ? random_vector<T>(static_cast<std::size_t>(s.cout), rng) : std::vector<T>{};

  bn::Options o;
  o.affine = affine;
  o.eps = 1e-3;
  bn::BatchNorm2d<T, bn::cpu> norm(s.cout, o);
  norm.load_state(eval_state<T>(s.cout, rng, affine));
  norm.eval();

  std::vector<double> mag;
  const auto conv_out = conv2d(x, w, b, s, &mag);
  std::vector<T> reference(conv_out.size());
  norm.forward(conv_out.data(), reference.data(), {s.n, s.cout, s.ho(), s.wo()});

  const bn::Folded<T> f = bn::fold(w, b, norm);
  ASSERT_EQ(f.weight.size(), w.size());
  ASSERT_EQ(f.bias.size(), static_cast<std::size_t>(s.cout));
  const auto folded = conv2d(x, f.weight, f.bias, s);
  const auto scale = bn::eval_affine(norm).scale;
  for (std::size_t i = 0; i < folded.size(); ++i) {
    const std::size_t c = (i / static_cast<std::size_t>(s.ho() * s.wo())) % static_cast<std::size_t>(s.cout);
    const double tol = tolerance<T>() * (1.0 + mag[i]) * std::max(1.0, std::fabs(scale[c]));
    EXPECT_NEAR(static_cast<double>(folded[i]), static_cast<double>(reference[i]), tol) << "output " << i;
  }
}

}  // namespace

TEST(Fold, Conv2dThenBatchNormEqualsFoldedConvDouble) {
  conv_then_bn_equals_folded_conv<double>(true, true);
  conv_then_bn_equals_folded_conv<double>(false, true);
  conv_then_bn_equals_folded_conv<double>(true, false);
}

TEST(Fold, Conv2dThenBatchNormEqualsFoldedConvFloat) {
  conv_then_bn_equals_folded_conv<float>(true, true);
  conv_then_bn_equals_folded_conv<float>(false, true);
}

TEST(Fold, LinearThenBatchNorm1dEqualsFoldedLinear) {
  std::mt19937 rng(7);
  const std::int64_t n = 5, in = 7, out = 3;
  const auto x = random_vector<double>(static_cast<std::size_t>(n * in), rng);
  const auto w = random_vector<double>(static_cast<std::size_t>(out * in), rng);
  for (const bool with_bias : {true, false}) {
    const auto b = with_bias ? random_vector<double>(static_cast<std::size_t>(out), rng) : std::vector<double>{};
    const bn::State<double> st = eval_state<double>(out, rng);
    bn::BatchNorm1d<double, bn::cpu> norm(out);
    norm.load_state(st);
    norm.eval();
    std::vector<double> mag;
    const auto lin = linear(x, w, b, n, in, out, &mag);
    std::vector<double> reference(lin.size());
    norm.forward(lin.data(), reference.data(), {n, out});
    // The State + eps overload and the layer overload agree bitwise.
    const auto f = bn::fold(w, b, st, norm.options().eps);
    const auto g = bn::fold(w, b, norm);
    EXPECT_EQ(f.weight, g.weight);
    EXPECT_EQ(f.bias, g.bias);
    const auto folded = linear(x, f.weight, f.bias, n, in, out);
    for (std::size_t i = 0; i < folded.size(); ++i)
      EXPECT_NEAR(folded[i], reference[i], 1e-12 * (1.0 + mag[i]) * 10.0) << i;
  }
}

TEST(Fold, TrainedLayerFoldsWithItsRunningStatistics) {
  // Running stats from real training steps (not loaded), then eval: conv → BN == folded conv.
  std::mt19937 rng(3);
  const ConvShape s{4, 2, 5, 5, 3, 3, 0};
  const auto w = random_vector<double>(static_cast<std::size_t>(s.cout * s.cin * s.k * s.k), rng);
  const auto b = random_vector<double>(static_cast<std::size_t>(s.cout), rng);
  bn::BatchNorm2d<double, bn::cpu> norm(s.cout);
  for (int step = 0; step < 5; ++step) {
    const auto x = random_vector<double>(static_cast<std::size_t>(s.n * s.cin * s.h * s.w), rng, -2.0 + step, 3.0);
    const auto c = conv2d(x, w, b, s);
    std::vector<double> y(c.size());
    norm.forward(c.data(), y.data(), {s.n, s.cout, s.ho(), s.wo()});
  }
  norm.eval();
  const auto x = random_vector<double>(static_cast<std::size_t>(s.n * s.cin * s.h * s.w), rng);
  std::vector<double> mag;
  const auto c = conv2d(x, w, b, s, &mag);
  std::vector<double> reference(c.size());
  norm.forward(c.data(), reference.data(), {s.n, s.cout, s.ho(), s.wo()});
  const auto f = bn::fold(w, b, norm);
  const auto folded = conv2d(x, f.weight, f.bias, s);
  for (std::size_t i = 0; i < folded.size(); ++i) EXPECT_NEAR(folded[i], reference[i], 1e-11 * (1.0 + mag[i])) << i;
}

TEST(Fold, OutLastLayoutMatchesOutFirst) {
  // HWIO (TensorFlow) weights: the same folded values as OIHW, element for element.
  std::mt19937 rng(11);
  const std::int64_t o = 4, i = 3, k = 2;
  const auto oihw = random_vector<float>(static_cast<std::size_t>(o * i * k * k), rng);
  std::vector<float> hwio(oihw.size());
  for (std::int64_t a = 0; a < o; ++a)
    for (std::int64_t b = 0; b < i; ++b)
      for (std::int64_t h = 0; h < k; ++h)
        for (std::int64_t w = 0; w < k; ++w)
          hwio[static_cast<std::size_t>(((h * k + w) * i + b) * o + a)] = oihw[static_cast<std::size_t>(((a * i + b) * k + h) * k + w)];
  const auto st = eval_state<float>(o, rng);
  const auto bias = random_vector<float>(static_cast<std::size_t>(o), rng);
  const auto first = bn::fold(oihw, bias, st, 1e-5);
  const auto last = bn::fold(hwio, bias, st, 1e-5, bn::WeightLayout::out_last);
  EXPECT_EQ(first.bias, last.bias);
  for (std::int64_t a = 0; a < o; ++a)
    for (std::int64_t b = 0; b < i; ++b)
      for (std::int64_t h = 0; h < k; ++h)
        for (std::int64_t w = 0; w < k; ++w)
          EXPECT_EQ(last.weight[static_cast<std::size_t>(((h * k + w) * i + b) * o + a)],
                    first.weight[static_cast<std::size_t>(((a * i + b) * k + h) * k + w)]);
}

TEST(Fold, MatchesPyTorchsFormula) {
  // torch.nn.utils.fusion.fuse_conv_bn_weights: w * (bn_w * rsqrt(rv + eps)), (b - rm) * bn_w * rsqrt(rv + eps) + bn_b.
  bn::State<double> st;
  st.weight = {2.0, -0.5};
  st.bias = {0.25, 1.0};
  st.running_mean = {1.0, -2.0};
  st.running_var = {3.0, 0.0};
  const auto f = bn::fold(std::vector<double>{1.0, 2.0, -1.0, 4.0}, std::vector<double>{0.5, -0.5}, st, 1.0);
  EXPECT_DOUBLE_EQ(f.weight[0], 1.0 * 2.0 / 2.0);
  EXPECT_DOUBLE_EQ(f.weight[1], 2.0 * 2.0 / 2.0);
  EXPECT_DOUBLE_EQ(f.weight[2], -1.0 * -0.5);
  EXPECT_DOUBLE_EQ(f.weight[3], 4.0 * -0.5);
  EXPECT_DOUBLE_EQ(f.bias[0], (0.5 - 1.0) * 1.0 + 0.25);
  EXPECT_DOUBLE_EQ(f.bias[1], (-0.5 + 2.0) * -0.5 + 1.0);
}

TEST(Fold, TypedErrorsOnSizeMismatchAndNothingChanges) {
  std::mt19937 rng(5);
  const auto st = eval_state<float>(4, rng);
  auto expect_arg = [](auto&& call, const std::string& argument) {
    try {
      call();
      ADD_FAILURE() << "expected invalid_argument for " << argument;
    } catch (const bn::invalid_argument& e) {
      EXPECT_EQ(e.argument(), argument) << e.what();
    }
  };
  const std::vector<float> w(4 * 9, 1.0f), b(4, 0.5f);
  expect_arg([&] { (void)bn::fold(std::vector<float>(4 * 9 + 1, 1.0f), b, st, 1e-5); }, "weight");
  expect_arg([&] { (void)bn::fold(std::vector<float>{}, b, st, 1e-5); }, "weight");
  expect_arg([&] { (void)bn::fold(std::vector<float>(3 * 9, 1.0f), std::vector<float>{}, st, 1e-5); }, "weight");
  expect_arg([&] { (void)bn::fold(w, std::vector<float>(3, 0.0f), st, 1e-5); }, "bias");
  expect_arg([&] { (void)bn::fold(w, b, st, 0.0); }, "eps");
  auto no_stats = st;
  no_stats.running_mean.clear();
  no_stats.running_var.clear();
  expect_arg([&] { (void)bn::fold(w, b, no_stats, 1e-5); }, "running_mean");
  auto short_var = st;
  short_var.running_var.pop_back();
  expect_arg([&] { (void)bn::fold(w, b, short_var, 1e-5); }, "running_var");
  auto short_weight = st;
  short_weight.weight.pop_back();
  expect_arg([&] { (void)bn::fold(w, b, short_weight, 1e-5); }, "bias");

  // fold_into: nothing is written when it throws.
  std::vector<float> wi = w, bi(3, 0.25f);
  const auto a = bn::eval_affine(st, 1e-5);
  expect_arg([&] { bn::fold_into(bn::span<float>(wi), bn::span<float>(bi), a); }, "bias");
  EXPECT_EQ(wi, w);
  EXPECT_EQ(bi, std::vector<float>(3, 0.25f));

  // A layer without running statistics, and a per-activation BatchNorm2d, cannot be folded.
  bn::Options untracked;
  untracked.track_running_stats = false;
  bn::BatchNorm2d<float, bn::cpu> u(4, untracked);
  expect_arg([&] { (void)bn::fold(w, b, u); }, "running_mean");
  bn::Options per_act;
  per_act.mode = bn::Mode::per_activation;
  bn::BatchNorm2d<float, bn::cpu> p(4, per_act);
  expect_arg([&] { (void)bn::fold(w, b, p); }, "mode");
  bn::BatchNorm1d<float, bn::cpu> p1(4, per_act);  // (N, C) input: per-activation is per-channel
  EXPECT_NO_THROW((void)bn::fold(w, b, p1));
}
