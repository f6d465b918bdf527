// PyTorch's own BatchNorm checklist on the CPU backend, for BatchNorm1d/2d/3d in float and
// double, against the independent double reference in support/reference.hpp:
// cumulative average, affine identity, repeated eval, tracking off, constant channel, large
// offsets, C = 1 / 2047, prime sizes, in-place, N = 0, eval with one value per channel,
// defaults, load_state round trip, per_activation == BatchNorm1d(C·S) on the flattened input.
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "support/common.hpp"
#include "support/reference.hpp"
#include "support/typed_cases.hpp"

namespace bn = batchnorm;

namespace {

using bn_test::read;
using bn_test::shape_of;

/// Relative tolerance of one computed value of type T against the double reference.
template <class T>
constexpr double tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1e-12;
}

template <class T>
void expect_close(const std::vector<T>& got, const std::vector<double>& want, double rel, const std::string& what,
                  double floor = 1.0) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!(std::fabs(g - want[i]) <= rel * (std::fabs(want[i]) + floor))) {
      ADD_FAILURE() << what << "[" << i << "]: got " << g << ", want " << want[i] << " (rel tol " << rel << ")";
      return;
    }
  }
}

template <class C>
class Semantics : public ::testing::Test {
 public:
  using T = typename C::value_type;
  using P = bn::param_t<T>;
  static constexpr int D = C::dims;
  using Layer = bn::BatchNorm<T, D, bn::cpu>;

  static std::vector<T> forward(Layer& layer, const std::vector<T>& x, const bn::Shape& shape) {
    std::vector<T> y(x.size(), T(-777));
    layer.forward(x.data(), y.data(), shape);
    return y;
  }
  static std::vector<T> backward(Layer& layer, const std::vector<T>& x, const std::vector<T>& dy,
                                 const bn::Shape& shape) {
    std::vector<T> dx(x.size(), T(-777));
    layer.backward(x.data(), dy.data(), dx.data(), shape);
    return dx;
  }
  /// Random affine parameters and running stats (running_var > 0), as a State to load.
  static bn::State<P> random_state(std::int64_t F, std::uint64_t seed, const bn::Options& o = {}) {
    return bn_test::random_state<P>(F, seed, o);
  }
  /// Reference parameters equal to the library's state.
  static void load_reference(bnref::Layer& ref, const bn::State<P>& s) {
    ref.p.weight = bnref::widen(s.weight);
    ref.p.bias = bnref::widen(s.bias);
    ref.p.running_mean = bnref::widen(s.running_mean);
    ref.p.running_var = bnref::widen(s.running_var);
    ref.p.num_batches_tracked = s.num_batches_tracked;
  }
  static void expect_state_close(const bn::State<P>& got, const bnref::Params& want, double rel,
                                 const std::string& what) {
    expect_close(got.weight, want.weight, rel, what + " weight");
    expect_close(got.bias, want.bias, rel, what + " bias");
    expect_close(got.running_mean, want.running_mean, rel, what + " running_mean");
    expect_close(got.running_var, want.running_var, rel, what + " running_var");
    EXPECT_EQ(got.num_batches_tracked, want.num_batches_tracked) << what;
  }

  /// Trains @p steps batches, evaluates once and runs backward on the library and the
  /// reference; every output, state and gradient must agree.
  static void check_against_reference(const bn::Shape& shape, const bn::Options& o, int steps, std::uint64_t seed,
                                      double rel = tol<T>()) {
    const std::int64_t F = bnref::features(shape, o.mode);
    Layer layer(F, o);
    bnref::Layer ref(F, o);
    const auto st = random_state(F, seed, o);
    layer.load_state(st);
    load_reference(ref, st);
    const std::string where = ::testing::PrintToString(shape);
    for (int step = 0; step <= steps; ++step) {
      const bool train = step < steps;
      layer.train(train);
      ref.training = train;
      const auto x = bnref::cast<T>(bnref::normal(shape.numel(), seed + 10 + step, 0.3 * step - 1.0, 1.0 + step));
      const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), seed + 100 + step));
      const auto y = forward(layer, x, shape);
      const auto r = ref.forward(shape, bnref::widen(x));
      expect_close(y, r.y, rel, where + " y step " + std::to_string(step));
      expect_close(read(layer.save_mean_data(), F), r.mean, rel, where + " save_mean");
      expect_close(read(layer.save_invstd_data(), F), r.invstd, rel, where + " save_invstd");
      expect_state_close(layer.state(), ref.p, rel, where + " state step " + std::to_string(step));
      const auto dx = backward(layer, x, dy, shape);
      const auto g = ref.backward(shape, bnref::widen(x), bnref::widen(dy), r);
      // dx and the parameter gradients are sums over N·S terms: scale the floor by their size.
      expect_close(dx, g.dx, rel, where + " dx", 1.0 + bnref::max_abs(g.dx));
      if (o.affine) {
        const auto grads = layer.gradients();
        expect_close(grads.grad_weight, g.grad_weight, rel * 10, where + " grad_weight", 1.0 + bnref::max_abs(g.grad_weight));
        expect_close(grads.grad_bias, g.grad_bias, rel * 10, where + " grad_bias", 1.0 + bnref::max_abs(g.grad_bias));
      }
    }
  }
};

TYPED_TEST_SUITE(Semantics, Cases);

// momentum = None: running_mean is the plain mean of the batch means and running_var the
// plain mean of the unbiased batch variances (PyTorch's cumulative moving average).
TYPED_TEST(Semantics, CumulativeAverageIsMeanOfBatchStatistics) {
  using T = typename TestFixture::T;
  const auto shape = shape_of<TestFixture::D>(3, 4, 5, 2, 3);
  bn::Options o;
  o.momentum = std::nullopt;
  typename TestFixture::Layer layer(4, o);
  constexpr int K = 6;
  std::vector<double> mean_sum(4, 0.0), var_sum(4, 0.0);
  for (int k = 0; k < K; ++k) {
    const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 40 + k, 2.0 * k - 3.0, 0.5 + k));
    bnref::Params none;  // no running stats: batch statistics only
    bnref::ForwardSettings s;
    const auto r = bnref::forward(shape, bnref::widen(x), none, s);
    for (int c = 0; c < 4; ++c) {
      mean_sum[c] += r.mean[c];
      var_sum[c] += r.batch_var_unbiased[c];
    }
    (void)TestFixture::forward(layer, x, shape);
    const auto st = layer.state();
    EXPECT_EQ(st.num_batches_tracked, k + 1);
    std::vector<double> want_mean(4), want_var(4);
    for (int c = 0; c < 4; ++c) {
      want_mean[c] = mean_sum[c] / (k + 1);
      want_var[c] = var_sum[c] / (k + 1);
    }
    // The first batch copies its statistics; after K batches the running stats are the
    // arithmetic means, up to a few roundings per step.
    expect_close(st.running_mean, want_mean, 4 * tol<T>(), "running_mean after " + std::to_string(k + 1));
    expect_close(st.running_var, want_var, 4 * tol<T>(), "running_var after " + std::to_string(k + 1));
  }
}

// weight 1 / bias 0 gives exactly what affine = false gives (outputs, stats and dx).
TYPED_TEST(Semantics, AffineIdentityEqualsAffineOff) {
  using T = typename TestFixture::T;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto shape = shape_of<TestFixture::D>(4, 3, 3, 5, 2, layout);
    bn::Options off;
    off.affine = false;
    typename TestFixture::Layer a(3), b(3, off);
    const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 1, 0.7, 2.0));
    const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 2));
    EXPECT_EQ(TestFixture::forward(a, x, shape), TestFixture::forward(b, x, shape));
    EXPECT_EQ(a.state().running_mean, b.state().running_mean);
    EXPECT_EQ(a.state().running_var, b.state().running_var);
    EXPECT_EQ(TestFixture::backward(a, x, dy, shape), TestFixture::backward(b, x, dy, shape));
    EXPECT_TRUE(b.state().weight.empty() && b.state().bias.empty());
    EXPECT_TRUE(b.gradients().grad_weight.empty() && b.gradients().grad_bias.empty());
    a.eval();
    b.eval();
    EXPECT_EQ(TestFixture::forward(a, x, shape), TestFixture::forward(b, x, shape));
    EXPECT_EQ(TestFixture::backward(a, x, dy, shape), TestFixture::backward(b, x, dy, shape));
  }
}

TYPED_TEST(Semantics, RepeatedEvalCallsAreIdentical) {
  using T = typename TestFixture::T;
  const auto shape = shape_of<TestFixture::D>(2, 5, 3, 3, 2);
  typename TestFixture::Layer layer(5);
  for (int k = 0; k < 3; ++k) (void)TestFixture::forward(layer, bnref::cast<T>(bnref::normal(shape.numel(), k, k)), shape);
  layer.eval();
  EXPECT_FALSE(layer.is_training());
  const auto before = layer.state();
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 9, 0.5, 3.0));
  const auto y1 = TestFixture::forward(layer, x, shape);
  const auto y2 = TestFixture::forward(layer, x, shape);
  const auto y3 = TestFixture::forward(layer, x, shape);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(y1, y3);
  const auto after = layer.state();
  EXPECT_EQ(after.running_mean, before.running_mean);
  EXPECT_EQ(after.running_var, before.running_var);
  EXPECT_EQ(after.num_batches_tracked, 3);
}

// track_running_stats = false: no buffers, and eval normalizes with batch statistics too.
TYPED_TEST(Semantics, TrackingOffGivesSameOutputInTrainAndEval) {
  using T = typename TestFixture::T;
  const auto shape = shape_of<TestFixture::D>(3, 4, 2, 3, 3);
  bn::Options o;
  o.track_running_stats = false;
  typename TestFixture::Layer layer(4, o);
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 5, 1.5, 2.0));
  const auto y_train = TestFixture::forward(layer, x, shape);
  layer.eval();
  const auto y_eval = TestFixture::forward(layer, x, shape);
  EXPECT_EQ(y_train, y_eval);
  bnref::Layer ref(4, o);
  expect_close(y_eval, ref.forward(shape, bnref::widen(x)).y, tol<T>(), "y");
  const auto st = layer.state();
  EXPECT_TRUE(st.running_mean.empty());
  EXPECT_TRUE(st.running_var.empty());
  EXPECT_EQ(st.num_batches_tracked, 0);
  EXPECT_EQ(layer.running_mean_data(), nullptr);
  EXPECT_EQ(layer.running_var_data(), nullptr);
  // eval backward differentiates through the batch statistics as well.
  const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 6));
  const auto dx = TestFixture::backward(layer, x, dy, shape);
  const auto r = ref.forward(shape, bnref::widen(x));
  expect_close(dx, ref.backward(shape, bnref::widen(x), bnref::widen(dy), r).dx, tol<T>(), "dx", 2.0);
}

// A channel whose values are all equal has variance 0: (x - mean) = 0 and y is exactly bias.
// 7.25 is dyadic (n · 7.25 is exact in double, so even a plain sum gives the exact mean);
// 7.3 is not (in double its running sum rounds, so the mean must come from a method that is
// exact for constant data, e.g. Welford's update, which leaves mean == x when every x is equal).
TYPED_TEST(Semantics, ConstantChannelGivesExactlyBias) {
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    for (const T constant : {T(7.25), T(7.3)}) {
      const auto shape = shape_of<TestFixture::D>(3, 3, 4, 3, 2, layout);
      typename TestFixture::Layer layer(3);
      const auto st = TestFixture::random_state(3, 77);
      layer.load_state(st);
      auto x = bnref::cast<T>(bnref::normal(shape.numel(), 3));
      bnref::for_each(shape, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
        if (c == 1) x[i] = constant;
      });
      const auto y = TestFixture::forward(layer, x, shape);
      int wrong = 0, nonfinite = 0;
      std::int64_t first = -1;
      bnref::for_each(shape, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
        if (c == 1 && y[i] != static_cast<T>(st.bias[1]) && wrong++ == 0) first = i;
        if (c != 1 && !std::isfinite(static_cast<double>(y[i]))) ++nonfinite;
      });
      EXPECT_EQ(wrong, 0) << "constant " << constant << " " << shape << ": first wrong element " << first << " = "
                          << (first >= 0 ? static_cast<double>(y[first]) : 0.0) << ", bias "
                          << static_cast<double>(st.bias[1]) << " (difference "
                          << (first >= 0 ? static_cast<double>(y[first]) - static_cast<double>(st.bias[1]) : 0.0)
                          << ")";
      EXPECT_EQ(nonfinite, 0);
      EXPECT_EQ(layer.save_mean_data()[1], static_cast<P>(constant));
      EXPECT_EQ(layer.save_invstd_data()[1], static_cast<P>(1.0 / std::sqrt(1e-5)));
      // The unbiased variance 0 enters running_var: 0.9 * v.
      EXPECT_NEAR(layer.state().running_var[1], 0.9 * st.running_var[1], 4 * tol<T>());
    }
  }
}

// fp32 data with a large common offset: the statistics must not cancel (E[x²] − E[x]² would).
TYPED_TEST(Semantics, LargeOffsetMatchesDoubleReference) {
  using T = typename TestFixture::T;
  const auto shape = shape_of<TestFixture::D>(8, 3, 7, 5, 3);
  typename TestFixture::Layer layer(3);
  bnref::Layer ref(3);
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 11, 1e4, 1.0));
  const auto y = TestFixture::forward(layer, x, shape);
  const auto r = ref.forward(shape, bnref::widen(x));
  EXPECT_LT(bnref::max_rel_error(y, r.y), 1e-4);
  EXPECT_LT(bnref::max_rel_error(layer.state().running_var, ref.p.running_var), 1e-4);
  EXPECT_LT(bnref::max_rel_error(layer.state().running_mean, ref.p.running_mean), 1e-4);
}

TYPED_TEST(Semantics, OneChannelAndManyChannels) {
  constexpr int D = TestFixture::D;
  TestFixture::check_against_reference(shape_of<D>(7, 1, 3, 2, 2), {}, 2, 200);
  TestFixture::check_against_reference(shape_of<D>(3, 2047, 2, 1, 1), {}, 2, 300);
  TestFixture::check_against_reference(shape_of<D>(3, 2047, 2, 1, 1, bn::Layout::channels_last), {}, 1, 400);
}

TYPED_TEST(Semantics, OddPrimeSizesInBothLayoutsAndModes) {
  constexpr int D = TestFixture::D;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    for (auto mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
      bn::Options o;
      o.mode = mode;
      o.momentum = 0.3;
      TestFixture::check_against_reference(shape_of<D>(5, 3, 7, 11, 2, layout), o, 3, 500);
      TestFixture::check_against_reference(shape_of<D>(13, 7, 3, 5, 3, layout), o, 2, 600);
    }
  }
}

// Every combination of the options against the reference (momentum 0, 1, None included).
TYPED_TEST(Semantics, OptionCombinationsMatchReference) {
  constexpr int D = TestFixture::D;
  std::uint64_t seed = 1000;
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>(0.0),
                                         std::optional<double>(1.0), std::optional<double>()}) {
    for (bool affine : {true, false}) {
      for (bool track : {true, false}) {
        bn::Options o;
        o.momentum = momentum;
        o.affine = affine;
        o.track_running_stats = track;
        o.eps = affine ? 1e-3 : 1e-5;
        TestFixture::check_against_reference(shape_of<D>(4, 3, 2, 3, 2), o, 3, seed += 10);
      }
    }
  }
}

// BatchNorm1d also takes rank 2 (N, C), where both layouts are the same order.
template <class T>
void check_rank_two() {
  using F = Semantics<Case<T, 1>>;
  F::check_against_reference(bn::Shape{9, 5}, {}, 3, 700);
  F::check_against_reference(bn::Shape({9, 5}, bn::Layout::channels_last), {}, 2, 705);
  bn::Options o;
  o.mode = bn::Mode::per_activation;
  F::check_against_reference(bn::Shape{9, 5}, o, 2, 710);
}
TEST(SemanticsRank2, BatchNorm1dAcceptsRankTwoFloat) { check_rank_two<float>(); }
TEST(SemanticsRank2, BatchNorm1dAcceptsRankTwoDouble) { check_rank_two<double>(); }

// y == x (in place) gives what an out-of-place call gives; dx == dy likewise.
TYPED_TEST(Semantics, InPlaceEqualsOutOfPlace) {
  using T = typename TestFixture::T;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto shape = shape_of<TestFixture::D>(3, 4, 5, 2, 2, layout);
    typename TestFixture::Layer a(4), b(4);
    const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 21, 1.0, 2.0));
    const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 22));
    const auto y = TestFixture::forward(a, x, shape);
    const auto dx = TestFixture::backward(a, x, dy, shape);
    auto inplace = x;
    b.forward(inplace.data(), inplace.data(), shape);
    EXPECT_EQ(inplace, y);
    EXPECT_EQ(a.state().running_mean, b.state().running_mean);
    EXPECT_EQ(a.state().running_var, b.state().running_var);
    auto g = dy;
    b.backward(x.data(), g.data(), g.data(), shape);
    EXPECT_EQ(g, dx);
    EXPECT_EQ(a.gradients().grad_weight, b.gradients().grad_weight);
    EXPECT_EQ(a.gradients().grad_bias, b.gradients().grad_bias);
    // in place in eval too
    a.eval();
    b.eval();
    const auto ye = TestFixture::forward(a, x, shape);
    inplace = x;
    b.forward(inplace.data(), inplace.data(), shape);
    EXPECT_EQ(inplace, ye);
  }
}

// N = 0: an empty output, running stats untouched, num_batches_tracked still incremented in
// training (torch.nn.BatchNorm increments it before F.batch_norm sees the empty batch).
TYPED_TEST(Semantics, EmptyBatch) {
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  const auto empty = shape_of<TestFixture::D>(0, 3, 4, 2, 2);
  bn::Options o;
  o.momentum = std::nullopt;
  typename TestFixture::Layer layer(3, o);
  const auto st = TestFixture::random_state(3, 5);
  auto loaded = st;
  loaded.num_batches_tracked = 0;
  layer.load_state(loaded);
  std::vector<T> x(1, T(1)), y(1, T(-99));  // one sentinel element: nothing may be written
  layer.forward(x.data(), y.data(), empty);
  EXPECT_EQ(y[0], T(-99));
  auto after = layer.state();
  EXPECT_EQ(after.running_mean, loaded.running_mean);
  EXPECT_EQ(after.running_var, loaded.running_var);
  EXPECT_EQ(after.num_batches_tracked, 1);
  layer.forward(nullptr, nullptr, empty);  // null is fine when there is nothing to touch
  EXPECT_EQ(layer.num_batches_tracked(), 2);
  // Backward of the empty batch: nothing to write, parameter gradients are empty sums.
  layer.backward(nullptr, nullptr, nullptr, empty);
  EXPECT_EQ(layer.gradients().grad_bias, std::vector<P>(3, P(0)));
  EXPECT_EQ(layer.gradients().grad_weight, std::vector<P>(3, P(0)));
  // The cumulative average counts the empty batches: the next factor is 1/3.
  const auto shape = shape_of<TestFixture::D>(2, 3, 4, 2, 2);
  const auto xs = bnref::cast<T>(bnref::normal(shape.numel(), 8, 2.0));
  bnref::Layer ref(3, o);
  TestFixture::load_reference(ref, loaded);
  ref.forward(empty, {});
  ref.forward(empty, {});
  const auto r = ref.forward(shape, bnref::widen(xs));
  expect_close(TestFixture::forward(layer, xs, shape), r.y, tol<T>(), "y");
  TestFixture::expect_state_close(layer.state(), ref.p, 4 * tol<T>(), "after empty batches");
  EXPECT_NEAR(ref.p.running_mean[0], (2.0 * loaded.running_mean[0] + r.mean[0]) / 3.0, 1e-12);
  // eval with N = 0 changes nothing
  layer.eval();
  const auto before = layer.state();
  layer.forward(x.data(), y.data(), empty);
  EXPECT_EQ(y[0], T(-99));
  EXPECT_EQ(layer.state().running_mean, before.running_mean);
  EXPECT_EQ(layer.num_batches_tracked(), 3);
  // per_activation: N = 0 too
  bn::Options pa;
  pa.mode = bn::Mode::per_activation;
  typename TestFixture::Layer act(empty.channels() * empty.spatial(), pa);
  act.forward(x.data(), y.data(), empty);
  EXPECT_EQ(act.num_batches_tracked(), 1);
  EXPECT_EQ(act.state().running_var, std::vector<P>(static_cast<std::size_t>(act.num_features()), P(1)));
}

// Eval uses the running statistics, so one value per channel is fine there.
TYPED_TEST(Semantics, EvalAllowsOneValuePerChannel) {
  using T = typename TestFixture::T;
  const auto shape = shape_of<TestFixture::D>(1, 6, 1, 1, 1);
  typename TestFixture::Layer layer(6);
  const auto st = TestFixture::random_state(6, 31);
  layer.load_state(st);
  layer.eval();
  bnref::Layer ref(6);
  TestFixture::load_reference(ref, st);
  ref.training = false;
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 32));
  expect_close(TestFixture::forward(layer, x, shape), ref.forward(shape, bnref::widen(x)).y, tol<T>(), "y");
  EXPECT_EQ(layer.state().num_batches_tracked, st.num_batches_tracked);
  if constexpr (TestFixture::D == 1) {
    const bn::Shape rank2{1, 6};
    expect_close(TestFixture::forward(layer, x, rank2), ref.forward(rank2, bnref::widen(x)).y, tol<T>(), "y rank 2");
  }
}

TYPED_TEST(Semantics, NewLayerDefaults) {
  using P = typename TestFixture::P;
  typename TestFixture::Layer layer(5);
  EXPECT_TRUE(layer.is_training());
  EXPECT_EQ(layer.num_features(), 5);
  const auto s = layer.state();
  EXPECT_EQ(s.weight, std::vector<P>(5, P(1)));
  EXPECT_EQ(s.bias, std::vector<P>(5, P(0)));
  EXPECT_EQ(s.running_mean, std::vector<P>(5, P(0)));
  EXPECT_EQ(s.running_var, std::vector<P>(5, P(1)));
  EXPECT_EQ(s.num_batches_tracked, 0);
  EXPECT_EQ(layer.gradients().grad_weight, std::vector<P>(5, P(0)));
  EXPECT_EQ(layer.gradients().grad_bias, std::vector<P>(5, P(0)));
  EXPECT_EQ(layer.nonfinite_batches_skipped(), 0);
  EXPECT_EQ(layer.name(), "BatchNorm" + std::to_string(TestFixture::D) + "d");
  EXPECT_EQ(layer.options().eps, 1e-5);
  EXPECT_EQ(layer.options().momentum, std::optional<double>(0.1));

  bn::Options o;
  o.affine = false;
  o.track_running_stats = false;
  typename TestFixture::Layer bare(5, o);
  const auto b = bare.state();
  EXPECT_TRUE(b.weight.empty() && b.bias.empty() && b.running_mean.empty() && b.running_var.empty());
  EXPECT_EQ(b.num_batches_tracked, 0);
  EXPECT_TRUE(bare.gradients().grad_weight.empty() && bare.gradients().grad_bias.empty());
  EXPECT_EQ(bare.weight_data(), nullptr);
  EXPECT_EQ(bare.bias_data(), nullptr);
  EXPECT_EQ(bare.running_mean_data(), nullptr);
  EXPECT_EQ(bare.grad_weight_data(), nullptr);
  EXPECT_NE(bare.save_mean_data(), nullptr);
}

TYPED_TEST(Semantics, LoadStateRoundTrip) {
  using T = typename TestFixture::T;
  for (bool affine : {true, false}) {
    for (bool track : {true, false}) {
      bn::Options o;
      o.affine = affine;
      o.track_running_stats = track;
      o.momentum = std::nullopt;
      typename TestFixture::Layer layer(4, o);
      const auto st = TestFixture::random_state(4, 50, o);
      layer.load_state(st);
      const auto got = layer.state();
      EXPECT_EQ(got.weight, st.weight);
      EXPECT_EQ(got.bias, st.bias);
      EXPECT_EQ(got.running_mean, st.running_mean);
      EXPECT_EQ(got.running_var, st.running_var);
      EXPECT_EQ(got.num_batches_tracked, st.num_batches_tracked);
      // A second layer loaded from the first's state behaves identically; the loaded
      // num_batches_tracked (7) sets the next cumulative-average factor (1/8).
      typename TestFixture::Layer copy(4, o);
      copy.load_state(got);
      bnref::Layer ref(4, o);
      TestFixture::load_reference(ref, st);
      const auto shape = shape_of<TestFixture::D>(3, 4, 3, 2, 2);
      const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 51, 1.0));
      const auto y = TestFixture::forward(layer, x, shape);
      EXPECT_EQ(y, TestFixture::forward(copy, x, shape));
      expect_close(y, ref.forward(shape, bnref::widen(x)).y, tol<T>(), "train y");
      TestFixture::expect_state_close(layer.state(), ref.p, 4 * tol<T>(), "after train");
      layer.eval();
      ref.training = false;
      expect_close(TestFixture::forward(layer, x, shape), ref.forward(shape, bnref::widen(x)).y, tol<T>(), "eval y");
    }
  }
}

// per_activation on (N, C, S...) equals BatchNorm1d(C·S) on the input flattened to (N, C·S)
// (parameters indexed c·S + s whatever the layout).
TYPED_TEST(Semantics, PerActivationEqualsBatchNorm1dOnFlattenedInput) {
  using T = typename TestFixture::T;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto shape = shape_of<TestFixture::D>(6, 3, 2, 3, 2, layout);
    const std::int64_t N = shape.batch(), C = shape.channels(), S = shape.spatial(), F = C * S;
    const bn::Shape flat{N, F};
    bn::Options o;
    o.mode = bn::Mode::per_activation;
    o.momentum = 0.25;
    typename TestFixture::Layer act(F, o);
    bn::Options of;
    of.momentum = 0.25;
    bn::BatchNorm1d<T, bn::cpu> ref(F, of);
    const auto st = TestFixture::random_state(F, 60);
    act.load_state(st);
    ref.load_state(st);
    auto flatten = [&](const std::vector<T>& v) {
      std::vector<T> f(v.size());
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t s = 0; s < S; ++s) f[n * F + c * S + s] = v[bnref::offset(shape, n, c, s)];
      return f;
    };
    for (int step = 0; step < 3; ++step) {
      act.train(step < 2);
      ref.train(step < 2);
      const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 61 + step, step, 1.0 + step));
      const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 71 + step));
      const auto y = TestFixture::forward(act, x, shape);
      std::vector<T> yf(x.size());
      ref.forward(flatten(x).data(), yf.data(), flat);
      expect_close(flatten(y), bnref::widen(yf), tol<T>(), "y");
      const auto sa = act.state(), sr = ref.state();
      expect_close(sa.running_mean, bnref::widen(sr.running_mean), tol<T>(), "running_mean");
      expect_close(sa.running_var, bnref::widen(sr.running_var), tol<T>(), "running_var");
      EXPECT_EQ(sa.num_batches_tracked, sr.num_batches_tracked);
      const auto dx = TestFixture::backward(act, x, dy, shape);
      std::vector<T> dxf(x.size());
      ref.backward(flatten(x).data(), flatten(dy).data(), dxf.data(), flat);
      expect_close(flatten(dx), bnref::widen(dxf), tol<T>(), "dx", 2.0);
      expect_close(act.gradients().grad_weight, bnref::widen(ref.gradients().grad_weight), tol<T>(), "grad_weight");
      expect_close(act.gradients().grad_bias, bnref::widen(ref.gradients().grad_bias), tol<T>(), "grad_bias");
    }
  }
}

// Options::accumulate_gradients adds into the gradients; zero_grad() clears them.
TYPED_TEST(Semantics, AccumulatedGradientsAreSums) {
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  const auto shape = shape_of<TestFixture::D>(4, 3, 2, 2, 3);
  bn::Options o;
  o.accumulate_gradients = true;
  typename TestFixture::Layer acc(3, o), once(3);
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 81, 1.0));
  const auto dy1 = bnref::cast<T>(bnref::normal(shape.numel(), 82));
  const auto dy2 = bnref::cast<T>(bnref::normal(shape.numel(), 83));
  (void)TestFixture::forward(acc, x, shape);
  (void)TestFixture::forward(once, x, shape);
  (void)TestFixture::backward(acc, x, dy1, shape);
  (void)TestFixture::backward(acc, x, dy2, shape);
  (void)TestFixture::backward(once, x, dy1, shape);
  const auto g1 = once.gradients();
  (void)TestFixture::backward(once, x, dy2, shape);
  const auto g2 = once.gradients();
  const auto g = acc.gradients();
  for (int c = 0; c < 3; ++c) {
    EXPECT_NEAR(g.grad_bias[c], g1.grad_bias[c] + g2.grad_bias[c], 1e3 * tol<T>());
    EXPECT_NEAR(g.grad_weight[c], g1.grad_weight[c] + g2.grad_weight[c], 1e3 * tol<T>());
  }
  // Without accumulation the second backward overwrites.
  EXPECT_EQ(once.gradients().grad_bias, g2.grad_bias);
  acc.zero_grad();
  EXPECT_EQ(acc.gradients().grad_weight, std::vector<P>(3, P(0)));
  EXPECT_EQ(acc.gradients().grad_bias, std::vector<P>(3, P(0)));
}

}  // namespace
