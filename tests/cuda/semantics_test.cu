// The PyTorch checklist of tests/semantics_test.cpp on the CUDA backend: every case runs the
// same calls on `BatchNorm<T, D, batchnorm::cuda>` (device memory, its own non-blocking
// stream) and on `BatchNorm<T, D, batchnorm::cpu>`, and compares outputs, saved statistics,
// state and gradients; plus two instances on two streams against sequential runs.
//
// Tolerances (GPU vs CPU), per element, with `scale` the largest |cpu| value of the tensor:
//  - y, dx, save_mean, save_invstd, running stats:
//      float  |diff| <= 1e-4 · (|cpu| + 0.1 · scale)        double 1e-10 · (|cpu| + 0.1 · scale)
//  - grad_weight / grad_bias: |diff| <= 1e-4 · |cpu| + 32 · eps_T · L1, with L1 the per-feature
//    sum of |terms| (Σ|dy·x̂|, Σ|dy|) and eps_T the machine epsilon of T.
// The CPU backend accumulates in double; the GPU in param_t<T> (float for float data) with
// Welford + Chan merges, so float results differ by float rounding of the statistics (relative
// ~1e-6 for the sizes here; 1e-4 leaves room for the worst per-element cancellation in dx).
// Equalities that PyTorch guarantees exactly (repeated eval, constant channel == bias, train ==
// eval without tracking, in place == out of place) are compared bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <batchnorm/cuda.cuh>

#include "support/device_memory.cuh"
#include "support/common.hpp"
#include "support/reference.hpp"
#include "support/typed_cases.hpp"

namespace bn = batchnorm;

namespace {

using bn_test::device_read;
using bn_test::shape_of;
using bn_test::Stream;

template <class T>
constexpr double rtol() {
  return std::is_same_v<T, float> ? 1e-4 : 1e-10;
}

/// GPU vs CPU, per element: |g - c| <= rel · (|c| + 0.1 · max|c|); NaN must match NaN.
template <class E>
void expect_close(const std::vector<E>& gpu, const std::vector<E>& cpu, double rel, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double scale = 0.0;
  for (E v : cpu) scale = std::fmax(scale, std::fabs(static_cast<double>(v)));
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double g = static_cast<double>(gpu[i]), c = static_cast<double>(cpu[i]);
    if (std::isnan(c) && std::isnan(g)) continue;
    if (!(std::fabs(g - c) <= rel * (std::fabs(c) + 0.1 * scale))) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << g << ", cpu " << c << " (rel " << rel << ", scale " << scale
                    << ")";
      return;
    }
  }
}

/// The same layer on both backends, with the same calls.
template <class T, int D>
struct Pair {
  using P = bn::param_t<T>;
  bn::BatchNorm<T, D, bn::cpu> cpu;
  bn::BatchNorm<T, D, bn::cuda> gpu;
  Stream stream;
  std::int64_t F;

  Pair(std::int64_t features, const bn::Options& o = {}) : cpu(features, o), gpu(features, o), F(features) {}

  void train(bool t) {
    cpu.train(t);
    gpu.train(t);
  }
  void load_state(const bn::State<P>& s) {
    cpu.load_state(s);
    gpu.load_state(s);
  }
  /// y on both backends: {gpu, cpu}.
  std::pair<std::vector<T>, std::vector<T>> forward(const std::vector<T>& x, const bn::Shape& s) {
    std::vector<T> yc(x.size());
    cpu.forward(x.data(), yc.data(), s);
    bn_test::device_array<T> xd(x), yd(x.size());
    gpu.forward(xd.data(), yd.data(), s, stream.get());
    stream.sync();
    return {yd.download(), yc};
  }
  std::pair<std::vector<T>, std::vector<T>> backward(const std::vector<T>& x, const std::vector<T>& dy,
                                                     const bn::Shape& s) {
    std::vector<T> dxc(x.size());
    cpu.backward(x.data(), dy.data(), dxc.data(), s);
    bn_test::device_array<T> xd(x), dyd(dy), dxd(x.size());
    gpu.backward(xd.data(), dyd.data(), dxd.data(), s, stream.get());
    stream.sync();
    return {dxd.download(), dxc};
  }
  void expect_state_close(const std::string& what) {
    const auto g = gpu.state(), c = cpu.state();
    expect_close(g.weight, c.weight, 0.0, what + " weight");  // never written by forward
    expect_close(g.bias, c.bias, 0.0, what + " bias");
    expect_close(g.running_mean, c.running_mean, rtol<T>(), what + " running_mean");
    expect_close(g.running_var, c.running_var, rtol<T>(), what + " running_var");
    EXPECT_EQ(g.num_batches_tracked, c.num_batches_tracked) << what;
    expect_close(device_read(gpu.save_mean_data(), F), std::vector<P>(cpu.save_mean_data(), cpu.save_mean_data() + F),
                 rtol<T>(), what + " save_mean");
    expect_close(device_read(gpu.save_invstd_data(), F),
                 std::vector<P>(cpu.save_invstd_data(), cpu.save_invstd_data() + F), rtol<T>(), what + " save_invstd");
    EXPECT_EQ(gpu.nonfinite_batches_skipped(), cpu.nonfinite_batches_skipped()) << what;
  }
  /// Gradients with the L1 bound (see the file comment); x, dy: the last backward's.
  void expect_gradients_close(const std::vector<T>& x, const std::vector<T>& dy, const bn::Shape& s,
                              const std::string& what) {
    const auto g = gpu.gradients(), c = cpu.gradients();
    ASSERT_EQ(g.grad_weight.size(), c.grad_weight.size()) << what;
    if (c.grad_weight.empty()) return;
    std::vector<double> l1w(static_cast<std::size_t>(F), 0.0), l1b(static_cast<std::size_t>(F), 0.0);
    const P* m = cpu.save_mean_data();
    const P* inv = cpu.save_invstd_data();
    bnref::for_each(s, cpu.options().mode, [&](std::int64_t i, std::int64_t f) {
      l1b[f] += std::fabs(double(dy[i]));
      l1w[f] += std::fabs(double(dy[i]) * (double(x[i]) - double(m[f])) * double(inv[f]));
    });
    const double eps = std::numeric_limits<T>::epsilon();
    for (std::int64_t f = 0; f < F; ++f) {
      EXPECT_LE(std::fabs(double(g.grad_weight[f]) - double(c.grad_weight[f])),
                rtol<T>() * std::fabs(double(c.grad_weight[f])) + 32 * eps * l1w[f] + 1e-30)
          << what << " grad_weight[" << f << "] gpu " << g.grad_weight[f] << " cpu " << c.grad_weight[f];
      EXPECT_LE(std::fabs(double(g.grad_bias[f]) - double(c.grad_bias[f])),
                rtol<T>() * std::fabs(double(c.grad_bias[f])) + 32 * eps * l1b[f] + 1e-30)
          << what << " grad_bias[" << f << "] gpu " << g.grad_bias[f] << " cpu " << c.grad_bias[f];
    }
  }
};

using bn_test::random_state;

template <class C>
class GpuSemantics : public ::testing::Test {
 public:
  using T = typename C::value_type;
  using P = bn::param_t<T>;
  static constexpr int D = C::dims;

  /// @p steps training steps then one eval step, forward + backward each, GPU vs CPU.
  static void compare(const bn::Shape& s, const bn::Options& o, int steps, std::uint64_t seed) {
    const auto F = bnref::features(s, o.mode);
    Pair<T, D> p(F, o);
    p.load_state(random_state<P>(F, seed, o));
    const std::string where = ::testing::PrintToString(s);
    for (int step = 0; step <= steps; ++step) {
      p.train(step < steps);
      const auto x = bnref::cast<T>(bnref::normal(s.numel(), seed + 10 + step, 0.5 * step - 1.0, 1.0 + step));
      const auto dy = bnref::cast<T>(bnref::normal(s.numel(), seed + 100 + step));
      const auto [yg, yc] = p.forward(x, s);
      expect_close(yg, yc, rtol<T>(), where + " y step " + std::to_string(step));
      p.expect_state_close(where + " step " + std::to_string(step));
      const auto [dxg, dxc] = p.backward(x, dy, s);
      expect_close(dxg, dxc, rtol<T>(), where + " dx step " + std::to_string(step));
      p.expect_gradients_close(x, dy, s, where + " step " + std::to_string(step));
    }
  }
};

TYPED_TEST_SUITE(GpuSemantics, Cases);

TYPED_TEST(GpuSemantics, CumulativeAverageIsMeanOfBatchStatistics) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  const auto s = shape_of<TestFixture::D>(3, 4, 5, 2, 3);
  bn::Options o;
  o.momentum = std::nullopt;
  Pair<T, TestFixture::D> p(4, o);
  std::vector<double> mean_sum(4, 0.0), var_sum(4, 0.0);
  for (int k = 0; k < 6; ++k) {
    const auto x = bnref::cast<T>(bnref::normal(s.numel(), 40 + k, 2.0 * k - 3.0, 0.5 + k));
    bnref::Params none;
    const auto r = bnref::forward(s, bnref::widen(x), none, bnref::ForwardSettings{});
    for (int c = 0; c < 4; ++c) {
      mean_sum[c] += r.mean[c];
      var_sum[c] += r.batch_var_unbiased[c];
    }
    (void)p.forward(x, s);
    p.expect_state_close("batch " + std::to_string(k));
    const auto st = p.gpu.state();
    for (int c = 0; c < 4; ++c) {
      EXPECT_NEAR(st.running_mean[c], mean_sum[c] / (k + 1), rtol<T>() * (1 + std::fabs(mean_sum[c] / (k + 1))));
      EXPECT_NEAR(st.running_var[c], var_sum[c] / (k + 1), rtol<T>() * (1 + var_sum[c] / (k + 1)));
    }
    EXPECT_EQ(st.num_batches_tracked, k + 1);
  }
}

TYPED_TEST(GpuSemantics, AffineIdentityEqualsAffineOff) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto s = shape_of<D>(4, 3, 3, 5, 2, layout);
    bn::Options off;
    off.affine = false;
    Pair<T, D> a(3), b(3, off);
    const auto x = bnref::cast<T>(bnref::normal(s.numel(), 1, 0.7, 2.0));
    const auto dy = bnref::cast<T>(bnref::normal(s.numel(), 2));
    expect_close(a.forward(x, s).first, b.forward(x, s).first, rtol<T>() / 100, "y");
    expect_close(a.gpu.state().running_var, b.gpu.state().running_var, rtol<T>() / 100, "running_var");
    expect_close(a.backward(x, dy, s).first, b.backward(x, dy, s).first, rtol<T>() / 100, "dx");
    EXPECT_TRUE(b.gpu.state().weight.empty() && b.gpu.gradients().grad_weight.empty());
    EXPECT_EQ(b.gpu.weight_data(), nullptr);
  }
}

TYPED_TEST(GpuSemantics, RepeatedEvalCallsAreIdentical) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  const auto s = shape_of<TestFixture::D>(2, 5, 3, 3, 2);
  Pair<T, TestFixture::D> p(5);
  for (int k = 0; k < 3; ++k) (void)p.forward(bnref::cast<T>(bnref::normal(s.numel(), k, k)), s);
  p.train(false);
  const auto before = p.gpu.state();
  const auto x = bnref::cast<T>(bnref::normal(s.numel(), 9, 0.5, 3.0));
  const auto y1 = p.forward(x, s);
  const auto y2 = p.forward(x, s);
  EXPECT_EQ(y1.first, y2.first);
  expect_close(y1.first, y1.second, rtol<T>(), "eval y vs cpu");
  EXPECT_EQ(p.gpu.state().running_mean, before.running_mean);
  EXPECT_EQ(p.gpu.state().running_var, before.running_var);
  EXPECT_EQ(p.gpu.num_batches_tracked(), 3);
}

TYPED_TEST(GpuSemantics, TrackingOffGivesSameOutputInTrainAndEval) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  const auto s = shape_of<TestFixture::D>(3, 4, 2, 3, 3);
  bn::Options o;
  o.track_running_stats = false;
  Pair<T, TestFixture::D> p(4, o);
  const auto x = bnref::cast<T>(bnref::normal(s.numel(), 5, 1.5, 2.0));
  const auto train = p.forward(x, s);
  p.train(false);
  const auto eval = p.forward(x, s);
  EXPECT_EQ(train.first, eval.first);
  expect_close(eval.first, eval.second, rtol<T>(), "y vs cpu");
  EXPECT_TRUE(p.gpu.state().running_mean.empty());
  EXPECT_EQ(p.gpu.running_mean_data(), nullptr);
  EXPECT_EQ(p.gpu.num_batches_tracked(), 0);
}

TYPED_TEST(GpuSemantics, ConstantChannelGivesExactlyBias) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    for (const T constant : {T(7.25), T(7.3), T(1e4)}) {
      // Large enough that the reduction is split over blocks (Chan merges of constant parts).
      const auto s = shape_of<TestFixture::D>(64, 3, 40, 6, 2, layout);
      Pair<T, TestFixture::D> p(3);
      const auto st = random_state<P>(3, 77);
      p.load_state(st);
      auto x = bnref::cast<T>(bnref::normal(s.numel(), 3));
      bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
        if (c == 1) x[i] = constant;
      });
      const auto y = p.forward(x, s).first;
      std::int64_t wrong = 0, first = -1;
      bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
        if (c == 1 && y[i] != static_cast<T>(st.bias[1]) && wrong++ == 0) first = i;
      });
      EXPECT_EQ(wrong, 0) << "constant " << constant << " " << s << ": first wrong element " << first << " = "
                          << (first >= 0 ? double(y[first]) : 0.0) << ", bias " << st.bias[1];
      EXPECT_EQ(device_read(p.gpu.save_mean_data(), 3)[1], static_cast<P>(constant));
    }
  }
}

// fp32 data at offset 1e4 (std 1) against the double reference, < 1e-4 relative (the
// criterion of tests/semantics_test.cpp and of issue 5). The float mean itself is representable
// only to ULP(1e4)/2 = 4.9e-4, so a GPU that accumulates and normalizes float data with a float
// mean cannot meet it: a host simulation of a sequential float Welford over these 280 values per
// channel gives mean errors up to 6e-3 and y errors up to 6e-3 relative. Not yet run on a GPU.
TYPED_TEST(GpuSemantics, LargeOffsetMatchesDoubleReference) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  const auto s = shape_of<TestFixture::D>(8, 3, 7, 5, 3);
  Pair<T, TestFixture::D> p(3);
  bnref::Layer ref(3);
  const auto x = bnref::cast<T>(bnref::normal(s.numel(), 11, 1e4, 1.0));
  const auto y = p.forward(x, s).first;
  const auto r = ref.forward(s, bnref::widen(x));
  EXPECT_LT(bnref::max_rel_error(y, r.y), 1e-4);
  EXPECT_LT(bnref::max_rel_error(p.gpu.state().running_var, ref.p.running_var), 1e-4);
  EXPECT_LT(bnref::max_rel_error(p.gpu.state().running_mean, ref.p.running_mean), 1e-4);
}

TYPED_TEST(GpuSemantics, OneChannelAndManyChannels) {
  BN_TEST_REQUIRE_GPU();
  constexpr int D = TestFixture::D;
  TestFixture::compare(shape_of<D>(7, 1, 3, 2, 2), {}, 2, 200);
  TestFixture::compare(shape_of<D>(3, 2047, 2, 1, 1), {}, 2, 300);
  TestFixture::compare(shape_of<D>(3, 2047, 2, 1, 1, bn::Layout::channels_last), {}, 1, 400);
  // Small C with a large N·spatial (the reduction of one channel split over many blocks).
  TestFixture::compare(shape_of<D>(64, 1, 64, 8, 2), {}, 1, 450);
}

TYPED_TEST(GpuSemantics, OddPrimeSizesInBothLayoutsAndModes) {
  BN_TEST_REQUIRE_GPU();
  constexpr int D = TestFixture::D;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    for (auto mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
      bn::Options o;
      o.mode = mode;
      o.momentum = 0.3;
      TestFixture::compare(shape_of<D>(5, 3, 7, 11, 2, layout), o, 3, 500);
      TestFixture::compare(shape_of<D>(13, 7, 3, 5, 3, layout), o, 2, 600);
    }
  }
}

TYPED_TEST(GpuSemantics, OptionCombinations) {
  BN_TEST_REQUIRE_GPU();
  constexpr int D = TestFixture::D;
  std::uint64_t seed = 1000;
  for (std::optional<double> momentum :
       {std::optional<double>(0.1), std::optional<double>(0.0), std::optional<double>(1.0), std::optional<double>()}) {
    for (bool affine : {true, false}) {
      for (bool track : {true, false}) {
        bn::Options o;
        o.momentum = momentum;
        o.affine = affine;
        o.track_running_stats = track;
        o.eps = affine ? 1e-3 : 1e-5;
        TestFixture::compare(shape_of<D>(4, 3, 2, 3, 2), o, 3, seed += 10);
      }
    }
  }
}

TYPED_TEST(GpuSemantics, InPlaceEqualsOutOfPlace) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto s = shape_of<TestFixture::D>(3, 4, 5, 2, 2, layout);
    Pair<T, TestFixture::D> a(4), b(4);
    const auto x = bnref::cast<T>(bnref::normal(s.numel(), 21, 1.0, 2.0));
    const auto dy = bnref::cast<T>(bnref::normal(s.numel(), 22));
    const auto y = a.forward(x, s).first;
    const auto dx = a.backward(x, dy, s).first;
    bn_test::device_array<T> buf(x), xd(x), g(dy);
    b.gpu.forward(buf.data(), buf.data(), s, b.stream.get());
    b.gpu.backward(xd.data(), g.data(), g.data(), s, b.stream.get());
    b.stream.sync();
    EXPECT_EQ(buf.download(), y);
    EXPECT_EQ(g.download(), dx);
    EXPECT_EQ(a.gpu.state().running_var, b.gpu.state().running_var);
  }
}

TYPED_TEST(GpuSemantics, EmptyBatch) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  const auto empty = shape_of<TestFixture::D>(0, 3, 4, 2, 2);
  bn::Options o;
  o.momentum = std::nullopt;
  Pair<T, TestFixture::D> p(3, o);
  auto st = random_state<P>(3, 5);
  st.num_batches_tracked = 0;
  p.load_state(st);
  bn_test::device_array<T> sentinel(std::vector<T>{T(-99)});
  p.gpu.forward(sentinel.data(), sentinel.data(), empty, p.stream.get());
  p.gpu.forward(nullptr, nullptr, empty, p.stream.get());
  p.stream.sync();
  EXPECT_EQ(sentinel.download(), std::vector<T>{T(-99)});
  EXPECT_EQ(p.gpu.state().running_mean, st.running_mean);
  EXPECT_EQ(p.gpu.state().running_var, st.running_var);
  EXPECT_EQ(p.gpu.num_batches_tracked(), 2);
  p.gpu.backward(nullptr, nullptr, nullptr, empty, p.stream.get());
  p.stream.sync();
  EXPECT_EQ(p.gpu.gradients().grad_bias, std::vector<P>(3, P(0)));
  EXPECT_EQ(p.gpu.gradients().grad_weight, std::vector<P>(3, P(0)));
  // The cumulative average counts the empty batches, as on the CPU.
  std::vector<T> cx(1);
  p.cpu.forward(cx.data(), cx.data(), empty);
  p.cpu.forward(cx.data(), cx.data(), empty);
  const auto s = shape_of<TestFixture::D>(2, 3, 4, 2, 2);
  const auto x = bnref::cast<T>(bnref::normal(s.numel(), 8, 2.0));
  const auto [yg, yc] = p.forward(x, s);
  expect_close(yg, yc, rtol<T>(), "y after empty batches");
  p.expect_state_close("after empty batches");
}

TYPED_TEST(GpuSemantics, EvalAllowsOneValuePerChannel) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  const auto s = shape_of<TestFixture::D>(1, 6, 1, 1, 1);
  Pair<T, TestFixture::D> p(6);
  p.load_state(random_state<P>(6, 31));
  p.train(false);
  const auto [yg, yc] = p.forward(bnref::cast<T>(bnref::normal(s.numel(), 32)), s);
  expect_close(yg, yc, rtol<T>(), "y");
}

TYPED_TEST(GpuSemantics, NewLayerDefaultsAndLoadStateRoundTrip) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  bn::BatchNorm<T, TestFixture::D, bn::cuda> layer(5);
  const auto s = layer.state();
  EXPECT_EQ(s.weight, std::vector<P>(5, P(1)));
  EXPECT_EQ(s.bias, std::vector<P>(5, P(0)));
  EXPECT_EQ(s.running_mean, std::vector<P>(5, P(0)));
  EXPECT_EQ(s.running_var, std::vector<P>(5, P(1)));
  EXPECT_EQ(s.num_batches_tracked, 0);
  EXPECT_EQ(layer.gradients().grad_weight, std::vector<P>(5, P(0)));
  EXPECT_EQ(layer.nonfinite_batches_skipped(), 0);
  EXPECT_TRUE(layer.is_training());
  const auto st = random_state<P>(5, 50);
  layer.load_state(st);
  const auto got = layer.state();
  EXPECT_EQ(got.weight, st.weight);
  EXPECT_EQ(got.bias, st.bias);
  EXPECT_EQ(got.running_mean, st.running_mean);
  EXPECT_EQ(got.running_var, st.running_var);
  EXPECT_EQ(got.num_batches_tracked, st.num_batches_tracked);
  bn::Options o;
  o.affine = false;
  o.track_running_stats = false;
  bn::BatchNorm<T, TestFixture::D, bn::cuda> bare(5, o);
  const auto b = bare.state();
  EXPECT_TRUE(b.weight.empty() && b.bias.empty() && b.running_mean.empty() && b.running_var.empty());
}

TYPED_TEST(GpuSemantics, PerActivationEqualsBatchNorm1dOnFlattenedInput) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = typename TestFixture::P;
  const auto shape = shape_of<TestFixture::D>(6, 3, 2, 3, 2);  // contiguous: same memory as (N, C·S)
  const std::int64_t F = shape.channels() * shape.spatial();
  const bn::Shape flat{shape.batch(), F};
  bn::Options o;
  o.mode = bn::Mode::per_activation;
  bn::BatchNorm<T, TestFixture::D, bn::cuda> act(F, o);
  bn::BatchNorm1d<T, bn::cuda> ref(F);
  const auto st = random_state<P>(F, 60);
  act.load_state(st);
  ref.load_state(st);
  const auto x = bnref::cast<T>(bnref::normal(shape.numel(), 61, 1.0, 2.0));
  const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 62));
  bn_test::device_array<T> xd(x), dyd(dy), ya(x.size()), yr(x.size()), dxa(x.size()), dxr(x.size());
  act.forward(xd.data(), ya.data(), shape);
  ref.forward(xd.data(), yr.data(), flat);
  act.backward(xd.data(), dyd.data(), dxa.data(), shape);
  ref.backward(xd.data(), dyd.data(), dxr.data(), flat);
  expect_close(ya.download(), yr.download(), rtol<T>(), "y");
  expect_close(dxa.download(), dxr.download(), rtol<T>(), "dx");
  expect_close(act.state().running_var, ref.state().running_var, rtol<T>(), "running_var");
  expect_close(act.gradients().grad_weight, ref.gradients().grad_weight, rtol<T>(), "grad_weight");
}

// Options::skip_nonfinite_updates on the GPU: the counter lives on the device.
TEST(GpuNumerics, SkipNonfiniteUpdates) {
  BN_TEST_REQUIRE_GPU();
  const bn::Shape s{4, 3, 2, 3};
  bn::Options o;
  o.skip_nonfinite_updates = true;
  Pair<float, 2> p(3, o);
  (void)p.forward(bnref::cast<float>(bnref::normal(s.numel(), 6)), s);
  const auto before = p.gpu.state();
  auto x = bnref::cast<float>(bnref::normal(s.numel(), 7));
  x[static_cast<std::size_t>(bnref::offset(s, 2, 1, 4))] = NAN;
  const auto [yg, yc] = p.forward(x, s);
  expect_close(yg, yc, rtol<float>(), "y (NaN channel NaN on both)");
  EXPECT_EQ(p.gpu.state().running_mean, before.running_mean);
  EXPECT_EQ(p.gpu.state().running_var, before.running_var);
  EXPECT_EQ(p.gpu.nonfinite_batches_skipped(), 1);
  EXPECT_EQ(p.cpu.nonfinite_batches_skipped(), 1);
}

// ---- concurrency: two instances, each on its own stream --------------------------------------

/// Per step: y, dx, running_var and grad_weight of one layer.
struct StreamTrace {
  std::vector<std::vector<float>> y, dx, running_var, grad_weight;
};

TEST(GpuConcurrency, TwoInstancesOnTwoStreamsEqualSequential) {
  BN_TEST_REQUIRE_GPU();
  // Big enough that kernels of the two streams overlap on the device.
  const bn::Shape sa({32, 16, 32, 32}, bn::Layout::contiguous);
  const bn::Shape sb({48, 24, 16, 16}, bn::Layout::channels_last);
  constexpr int steps = 4;
  auto data = [](const bn::Shape& s, int layer, int step, int what) {
    return bnref::cast<float>(bnref::normal(s.numel(), 100 * layer + 10 * step + what, step, 1.0 + layer));
  };
  bn::Options ob;
  ob.momentum = std::nullopt;
  auto run = [&](bool concurrent) {
    Stream s1, s2;
    bn::BatchNorm2d<float, bn::cuda> a(16), b(24, ob);
    std::vector<bn_test::device_array<float>> xa, dya, ya, dxa, xb, dyb, yb, dxb;
    for (int k = 0; k < steps; ++k) {
      xa.emplace_back(data(sa, 1, k, 0));
      dya.emplace_back(data(sa, 1, k, 1));
      ya.emplace_back(static_cast<std::size_t>(sa.numel()));
      dxa.emplace_back(static_cast<std::size_t>(sa.numel()));
      xb.emplace_back(data(sb, 2, k, 0));
      dyb.emplace_back(data(sb, 2, k, 1));
      yb.emplace_back(static_cast<std::size_t>(sb.numel()));
      dxb.emplace_back(static_cast<std::size_t>(sb.numel()));
    }
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    StreamTrace ta, tb;
    for (int k = 0; k < steps; ++k) {
      a.train(k < steps - 1);
      b.train(k < steps - 1);
      // Concurrent: both layers' work is queued before anyone waits. Sequential: each
      // layer's step finishes before the other's starts.
      a.forward(xa[k].data(), ya[k].data(), sa, s1.get());
      a.backward(xa[k].data(), dya[k].data(), dxa[k].data(), sa, s1.get());
      if (!concurrent) s1.sync();
      b.forward(xb[k].data(), yb[k].data(), sb, s2.get());
      b.backward(xb[k].data(), dyb[k].data(), dxb[k].data(), sb, s2.get());
      if (!concurrent) s2.sync();
      if (concurrent && k % 2 == 0) continue;  // let two steps pile up on each stream
      s1.sync();
      s2.sync();
      ta.running_var.push_back(a.state().running_var);
      tb.running_var.push_back(b.state().running_var);
      ta.grad_weight.push_back(a.gradients().grad_weight);
      tb.grad_weight.push_back(b.gradients().grad_weight);
    }
    s1.sync();
    s2.sync();
    for (int k = 0; k < steps; ++k) {
      ta.y.push_back(ya[k].download());
      ta.dx.push_back(dxa[k].download());
      tb.y.push_back(yb[k].download());
      tb.dx.push_back(dxb[k].download());
    }
    return std::make_pair(ta, tb);
  };
  const auto sequential = run(false);
  const auto concurrent = run(true);
  for (int k = 0; k < steps; ++k) {
    EXPECT_EQ(concurrent.first.y[k], sequential.first.y[k]) << "a y step " << k;
    EXPECT_EQ(concurrent.first.dx[k], sequential.first.dx[k]) << "a dx step " << k;
    EXPECT_EQ(concurrent.second.y[k], sequential.second.y[k]) << "b y step " << k;
    EXPECT_EQ(concurrent.second.dx[k], sequential.second.dx[k]) << "b dx step " << k;
  }
  // State snapshots are taken after odd steps in the concurrent run (every step sequentially).
  ASSERT_EQ(concurrent.first.running_var.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(concurrent.first.running_var[i], sequential.first.running_var[2 * i + 1]);
    EXPECT_EQ(concurrent.second.running_var[i], sequential.second.running_var[2 * i + 1]);
    EXPECT_EQ(concurrent.first.grad_weight[i], sequential.first.grad_weight[2 * i + 1]);
    EXPECT_EQ(concurrent.second.grad_weight[i], sequential.second.grad_weight[2 * i + 1]);
  }
  // And both agree with the CPU backend.
  bn::BatchNorm2d<float, bn::cpu> ca(16);
  std::vector<float> y(static_cast<std::size_t>(sa.numel()));
  const auto x0 = data(sa, 1, 0, 0);
  ca.forward(x0.data(), y.data(), sa);
  expect_close(sequential.first.y[0], y, rtol<float>(), "a y step 0 vs cpu");
}

}  // namespace
