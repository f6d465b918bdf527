// Numerics of the CPU backend: large offsets and small scales in fp32, magnitudes near 1e30
// and near FLT_MAX, eps = 1e-12 with zero variance, NaN/Inf propagation as in PyTorch and the
// skip_nonfinite_updates option, misaligned pointers, and ~200 seeded random property cases
// (ranks 2-5, C 1..1024, N·spatial 2..1e5, both layouts, both modes, train and eval, forward
// and backward) against the independent double reference of support/reference.hpp.
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "support/reference.hpp"

namespace bn = batchnorm;

namespace {

constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_v = std::numeric_limits<double>::infinity();

template <class T>
std::vector<T> run_forward(bn::BatchNorm<T, 2, bn::cpu>& l, const std::vector<T>& x, const bn::Shape& s) {
  std::vector<T> y(x.size(), T(-777));
  l.forward(x.data(), y.data(), s);
  return y;
}

/// max |got − want| / max |want|: the error relative to the size of the quantity.
template <class T>
double normwise_error(const std::vector<T>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return inf_v;
  double err = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(e <= err)) err = e;
  }
  const double scale = bnref::max_abs(want);
  return scale > 0 ? err / scale : err;
}

template <class T>
bool all_finite(const std::vector<T>& v) {
  for (T e : v)
    if (!std::isfinite(static_cast<double>(e))) return false;
  return true;
}

// fp32 storage with a large common offset or a small scale: within 1e-4 relative of the double
// reference (E[x²] − E[x]² would lose everything at offset 1e4 in fp32), train, eval, backward.
TEST(Numerics, Fp32OffsetsAndScalesMatchDoubleReference) {
  struct Data {
    double offset, scale;
  };
  for (const Data d : {Data{1e4, 1.0}, Data{1e6, 1.0}, Data{0.0, 1e-3}, Data{-1e4, 0.5}, Data{1e6, 30.0}}) {
    for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
      for (auto mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
        const bn::Shape s({16, 3, 5, 7}, layout);
        const auto F = bnref::features(s, mode);
        bn::Options o;
        o.mode = mode;
        bn::BatchNorm2d<float, bn::cpu> layer(F, o);
        bnref::Layer ref(F, o);
        std::ostringstream where;
        where << "offset " << d.offset << " scale " << d.scale << " " << s << (F > 3 ? " per_activation" : "");
        for (int step = 0; step < 3; ++step) {
          const bool train = step < 2;
          layer.train(train);
          ref.training = train;
          const auto x = bnref::cast<float>(bnref::normal(s.numel(), 10 + step, d.offset, d.scale));
          const auto dy = bnref::cast<float>(bnref::normal(s.numel(), 20 + step));
          const auto y = run_forward(layer, x, s);
          const auto r = ref.forward(s, bnref::widen(x));
          if (!train) {
            // Eval normalizes with the running stats (≈ 0.19 · offset away from the data):
            // judge y against its own scale.
            EXPECT_LT(normwise_error(y, r.y), 1e-4) << where.str() << " eval y";
          } else {
            EXPECT_LT(bnref::max_rel_error(y, r.y), 1e-4) << where.str() << " y step " << step;
          }
          const auto st = layer.state();
          EXPECT_LT(bnref::max_rel_error(st.running_mean, ref.p.running_mean, 1e-3 * bnref::max_abs(ref.p.running_mean)),
                    1e-4)
              << where.str();
          EXPECT_LT(bnref::max_rel_error(st.running_var, ref.p.running_var, 0.0), 1e-4) << where.str();
          std::vector<float> dx(x.size());
          layer.backward(x.data(), dy.data(), dx.data(), s);
          const auto grads = layer.gradients();
          // End to end against the exact double reference: the gradient of the function the
          // forward computed (normalized with the exact batch mean), so the backward must not
          // differentiate with the fp32-rounded save_mean (at offset 1e6, ULP 0.0625: ~3%).
          const auto g = ref.backward(s, bnref::widen(x), bnref::widen(dy), r);
          EXPECT_LT(normwise_error(dx, g.dx), 1e-4) << where.str() << " dx";
          EXPECT_LT(normwise_error(grads.grad_weight, g.grad_weight), 1e-4) << where.str() << " grad_weight";
          EXPECT_LT(normwise_error(grads.grad_bias, g.grad_bias), 1e-4) << where.str() << " grad_bias";
        }
      }
    }
  }
}

// Magnitudes near 1e30 (x² = 1e60 overflows fp32; PyTorch #162489's Welford M2 did) and near
// FLT_MAX (the fp32 sum of a few such values overflows): the statistics the layer keeps are
// finite. A channel spread over ±1e30 has variance ~1e60, which fp32 cannot hold, so its
// running_var is checked in the double layer; the fp32 check is on constant channels.
TEST(Numerics, HugeMagnitudesGiveFiniteStatistics) {
  const bn::Shape s{6, 4, 3, 5};
  std::vector<double> xd(static_cast<std::size_t>(s.numel()));
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> u(0.5, 1.0);
  bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
    switch (c) {
      case 0: xd[i] = 1e30; break;                                          // constant near 1e30
      case 1: xd[i] = -3e30; break;                                         // constant, negative
      case 2: xd[i] = (i % 2 ? 1e30 : -1e30) * u(rng); break;               // spread ±1e30
      default: xd[i] = (i % 3 ? 3.0e38 : -3.0e38) * u(rng); break;          // near FLT_MAX
    }
  });
  const auto x = bnref::cast<float>(xd);
  bn::BatchNorm2d<float, bn::cpu> layer(4);
  bnref::Layer ref(4);
  const auto y = run_forward(layer, x, s);
  const auto r = ref.forward(s, bnref::widen(x));
  EXPECT_TRUE(all_finite(y));
  EXPECT_LT(bnref::max_rel_error(y, r.y), 1e-4);
  const std::vector<float> mean(layer.save_mean_data(), layer.save_mean_data() + 4);
  const std::vector<float> invstd(layer.save_invstd_data(), layer.save_invstd_data() + 4);
  EXPECT_TRUE(all_finite(mean));
  EXPECT_TRUE(all_finite(invstd));
  EXPECT_EQ(mean[0], 1e30f);
  EXPECT_EQ(mean[1], -3e30f);
  EXPECT_LT(bnref::max_rel_error(invstd, r.invstd, 0.0), 1e-4);
  const auto st = layer.state();
  EXPECT_TRUE(all_finite(st.running_mean));
  EXPECT_FLOAT_EQ(st.running_var[0], 0.9f);  // 0.9 · 1 + 0.1 · 0
  EXPECT_FLOAT_EQ(st.running_var[1], 0.9f);
  EXPECT_FLOAT_EQ(st.running_mean[0], 1e29f);
  // Outputs of the constant channels are exactly bias (0).
  bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
    if (c < 2) {
      ASSERT_EQ(y[i], 0.0f) << i;
    }
  });
  // Backward through such a batch is finite as well.
  const auto dy = bnref::cast<float>(bnref::normal(s.numel(), 4));
  std::vector<float> dx(x.size());
  layer.backward(x.data(), dy.data(), dx.data(), s);
  EXPECT_TRUE(all_finite(dx));
  EXPECT_TRUE(all_finite(layer.gradients().grad_weight));
  // In double every statistic, running_var ~1e59 included, is finite and accurate.
  bn::BatchNorm2d<double, bn::cpu> wide(4);
  std::vector<double> yd(xd.size());
  const auto xw = bnref::widen(x);
  wide.forward(xw.data(), yd.data(), s);
  EXPECT_TRUE(all_finite(yd));
  EXPECT_TRUE(all_finite(wide.state().running_var));
  EXPECT_LT(bnref::max_rel_error(wide.state().running_var, ref.p.running_var, 0.0), 1e-12);
  // Eval with those running stats: finite too.
  wide.eval();
  wide.forward(xw.data(), yd.data(), s);
  EXPECT_TRUE(all_finite(yd));
}

// eps = 1e-12 and a channel of zero variance: invstd = 1e6, y exactly bias, nothing infinite.
TEST(Numerics, TinyEpsWithZeroVarianceStaysFinite) {
  bn::Options o;
  o.eps = 1e-12;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({5, 3, 4, 4}, layout);
    bn::BatchNorm2d<float, bn::cpu> layer(3, o);
    auto st = layer.state();
    st.weight = {2.0f, -1.5f, 0.75f};
    st.bias = {0.3f, -0.7f, 1.1f};
    layer.load_state(st);
    auto x = bnref::cast<float>(bnref::normal(s.numel(), 7, 3.0));
    bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
      if (c == 0) x[i] = 1e4f;
      if (c == 2) x[i] = -2.5f;
    });
    const auto y = run_forward(layer, x, s);
    EXPECT_TRUE(all_finite(y));
    bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
      if (c == 0) {
        ASSERT_EQ(y[i], 0.3f) << i;
      }
      if (c == 2) {
        ASSERT_EQ(y[i], 1.1f) << i;
      }
    });
    EXPECT_FLOAT_EQ(layer.save_invstd_data()[0], 1e6f);
    EXPECT_TRUE(all_finite(layer.state().running_var));
    const auto dy = bnref::cast<float>(bnref::normal(s.numel(), 8));
    std::vector<float> dx(x.size());
    layer.backward(x.data(), dy.data(), dx.data(), s);
    EXPECT_TRUE(all_finite(dx));
    EXPECT_TRUE(all_finite(layer.gradients().grad_weight));
    // Eval with a running variance of exactly 0.
    st = layer.state();
    st.running_var = {0.0f, 0.0f, 0.0f};
    layer.load_state(st);
    layer.eval();
    const auto ye = run_forward(layer, x, s);
    EXPECT_TRUE(all_finite(ye));
  }
}

/// A (4, 3, 2, 3) batch with @p bad placed at one element of channel 1.
std::vector<float> batch_with(double bad, const bn::Shape& s, std::int64_t* where = nullptr) {
  auto x = bnref::cast<float>(bnref::normal(s.numel(), 5, 1.0, 2.0));
  const auto at = bnref::offset(s, 2, 1, 4);
  x[static_cast<std::size_t>(at)] = static_cast<float>(bad);
  if (where) *where = at;
  return x;
}

// PyTorch: a NaN or ±Inf in channel c makes channel c's batch statistics NaN, so all of
// channel c's outputs are NaN and the other channels are untouched; running stats of channel c
// become NaN (the default). In eval only the bad element itself is not finite.
TEST(Numerics, NonFiniteInputsPropagateLikePyTorch) {
  for (double bad : {nan_v, inf_v, -inf_v}) {
    for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
      const bn::Shape s({4, 3, 2, 3}, layout);
      bn::BatchNorm2d<float, bn::cpu> layer(3);
      bnref::Layer ref(3);
      std::int64_t at = 0;
      const auto x = batch_with(bad, s, &at);
      const auto y = run_forward(layer, x, s);
      const auto r = ref.forward(s, bnref::widen(x));
      bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
        if (c == 1) {
          ASSERT_TRUE(std::isnan(y[i])) << "bad " << bad << " element " << i << " = " << y[i];
        } else {
          ASSERT_TRUE(std::isfinite(y[i])) << i;
          ASSERT_NEAR(y[i], r.y[i], 1e-5) << i;
        }
      });
      const auto st = layer.state();
      // The mean of a channel holding ±Inf is ±Inf (sum) or NaN (Welford, as PyTorch's
      // var_mean): not finite either way. Its variance is NaN either way, and so is invstd.
      EXPECT_FALSE(std::isfinite(st.running_mean[1])) << bad;
      // (Regression: a clamp `m2 > 0 ? m2 : 0` in finalize() once mapped a NaN M2 to 0, so
      // running_var stayed finite and save_invstd was 1/sqrt(eps).)
      EXPECT_TRUE(std::isnan(st.running_var[1])) << bad;
      EXPECT_TRUE(std::isnan(layer.save_invstd_data()[1])) << bad;
      EXPECT_TRUE(std::isfinite(st.running_mean[0]) && std::isfinite(st.running_var[0]));
      EXPECT_TRUE(std::isfinite(st.running_mean[2]) && std::isfinite(st.running_var[2]));
      EXPECT_EQ(layer.nonfinite_batches_skipped(), 0);
      EXPECT_EQ(layer.num_batches_tracked(), 1);

      // Eval (healthy running stats): only the bad element.
      bn::BatchNorm2d<float, bn::cpu> healthy(3);
      healthy.eval();
      const auto ye = run_forward(healthy, x, s);
      for (std::int64_t i = 0; i < s.numel(); ++i) {
        if (i == at)
          EXPECT_EQ(std::isnan(ye[i]), std::isnan(bad)) << bad;
        else
          ASSERT_TRUE(std::isfinite(ye[i])) << i;
      }
      EXPECT_FALSE(std::isfinite(ye[at]));
    }
  }
}

// Options::skip_nonfinite_updates: the bad batch leaves running_mean / running_var as they
// were (all channels) and is counted; the outputs are those of PyTorch all the same.
TEST(Numerics, SkipNonfiniteUpdatesKeepsRunningStats) {
  for (double bad : {nan_v, inf_v, -inf_v}) {
    const bn::Shape s{4, 3, 2, 3};
    bn::Options o;
    o.skip_nonfinite_updates = true;
    bn::BatchNorm2d<float, bn::cpu> layer(3, o), plain(3);
    const auto good = bnref::cast<float>(bnref::normal(s.numel(), 6, 0.5));
    (void)run_forward(layer, good, s);
    (void)run_forward(plain, good, s);
    const auto before = layer.state();
    EXPECT_EQ(before.running_mean, plain.state().running_mean);  // finite batches update as usual
    EXPECT_EQ(layer.nonfinite_batches_skipped(), 0);
    const auto x = batch_with(bad, s);
    const auto y = run_forward(layer, x, s);
    const auto yp = run_forward(plain, x, s);
    for (std::size_t i = 0; i < y.size(); ++i) {
      if (std::isnan(yp[i]))
        ASSERT_TRUE(std::isnan(y[i])) << i;
      else
        ASSERT_EQ(y[i], yp[i]) << i;
    }
    const auto after = layer.state();
    EXPECT_EQ(after.running_mean, before.running_mean) << bad;
    EXPECT_EQ(after.running_var, before.running_var) << bad;
    EXPECT_EQ(layer.nonfinite_batches_skipped(), 1);
    // Without the option the running stats are poisoned (PyTorch's behaviour).
    EXPECT_FALSE(std::isfinite(plain.state().running_mean[1]));
    EXPECT_FALSE(std::isfinite(plain.state().running_var[1]));
    // A second bad batch counts again; eval batches are never counted.
    (void)run_forward(layer, x, s);
    EXPECT_EQ(layer.nonfinite_batches_skipped(), 2);
    layer.eval();
    (void)run_forward(layer, x, s);
    EXPECT_EQ(layer.nonfinite_batches_skipped(), 2);
    EXPECT_EQ(layer.state().running_mean, before.running_mean);
    // Back to training: a finite batch updates again.
    layer.train();
    (void)run_forward(layer, good, s);
    EXPECT_NE(layer.state().running_mean, before.running_mean);
    EXPECT_TRUE(all_finite(layer.state().running_var));
    EXPECT_EQ(layer.nonfinite_batches_skipped(), 2);
  }
}

// The functional layer reports the skip through ForwardArgs::skipped_updates.
TEST(Numerics, FunctionalSkipCounter) {
  const bn::Shape s{4, 3, 2, 3};
  const auto x = batch_with(nan_v, s);
  std::vector<float> y(x.size()), rm(3, 0.5f), rv(3, 2.0f);
  std::int64_t skipped = 0;
  bn::ForwardArgs<float> a;
  a.x = x.data();
  a.y = y.data();
  a.running_mean = rm;
  a.running_var = rv;
  a.skipped_updates = &skipped;
  bn::ForwardConfig c;
  c.skip_nonfinite_updates = true;
  bn::forward(bn::cpu{}, s, a, c);
  EXPECT_EQ(skipped, 1);
  EXPECT_EQ(rm, std::vector<float>(3, 0.5f));
  EXPECT_EQ(rv, std::vector<float>(3, 2.0f));
  c.skip_nonfinite_updates = false;
  bn::forward(bn::cpu{}, s, a, c);
  EXPECT_EQ(skipped, 1);
  EXPECT_TRUE(std::isnan(rm[1]));
}

// Pointers one element past an aligned allocation (no 16-byte alignment for vector loads):
// results equal the aligned ones bit for bit, forward, backward and the functional API.
template <class T>
void check_misaligned() {
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({5, 6, 7, 3}, layout);
    const std::size_t n = static_cast<std::size_t>(s.numel());
    const auto x = bnref::cast<T>(bnref::normal(s.numel(), 1, 2.0));
    const auto dy = bnref::cast<T>(bnref::normal(s.numel(), 2));
    bn::BatchNorm2d<T, bn::cpu> a(6), b(6);
    std::vector<T> y(n), dx(n);
    a.forward(x.data(), y.data(), s);
    a.backward(x.data(), dy.data(), dx.data(), s);
    std::vector<T> xb(n + 1), yb(n + 1), dyb(n + 1), dxb(n + 1);
    std::copy(x.begin(), x.end(), xb.begin() + 1);
    std::copy(dy.begin(), dy.end(), dyb.begin() + 1);
    b.forward(xb.data() + 1, yb.data() + 1, s);
    b.backward(xb.data() + 1, dyb.data() + 1, dxb.data() + 1, s);
    EXPECT_EQ(std::vector<T>(yb.begin() + 1, yb.end()), y);
    EXPECT_EQ(std::vector<T>(dxb.begin() + 1, dxb.end()), dx);
    EXPECT_EQ(a.state().running_var, b.state().running_var);
    EXPECT_EQ(a.gradients().grad_weight, b.gradients().grad_weight);
    // In place on the misaligned buffer.
    b.forward(xb.data() + 1, xb.data() + 1, s);
    a.forward(x.data(), y.data(), s);
    EXPECT_EQ(std::vector<T>(xb.begin() + 1, xb.end()), y);
    // Functional API with misaligned per-feature buffers.
    using P = bn::param_t<T>;
    std::vector<P> w(7, P(1.5)), bias(7, P(-0.5)), rm(7, P(0)), rv(7, P(1));
    std::vector<T> y1(n), y2(n + 1);
    bn::ForwardArgs<T> args;
    args.x = x.data();
    args.y = y1.data();
    args.weight = bn::span<const P>(w.data() + 1, 6);
    args.bias = bn::span<const P>(bias.data() + 1, 6);
    args.running_mean = bn::span<P>(rm.data() + 1, 6);
    args.running_var = bn::span<P>(rv.data() + 1, 6);
    bn::forward(bn::cpu{}, s, args, bn::ForwardConfig{});
    std::vector<P> w6(6, P(1.5)), b6(6, P(-0.5)), rm6(6, P(0)), rv6(6, P(1));
    args.y = y2.data() + 1;
    args.weight = w6;
    args.bias = b6;
    args.running_mean = rm6;
    args.running_var = rv6;
    bn::forward(bn::cpu{}, s, args, bn::ForwardConfig{});
    EXPECT_EQ(std::vector<T>(y2.begin() + 1, y2.end()), y1);
    EXPECT_EQ(std::vector<P>(rv.begin() + 1, rv.end()), rv6);
    EXPECT_EQ(rv[0], P(1));  // the element before the span is not touched
  }
}
TEST(Numerics, MisalignedPointersFloat) { check_misaligned<float>(); }
TEST(Numerics, MisalignedPointersDouble) { check_misaligned<double>(); }

// Zero-size tensors with huge other extents: nothing to visit, so forward and backward return
// at once (found by tests/fuzz/validation_fuzz.cpp: backward once looped over N = 2^40 batch
// rows of zero channels). Without the early return this test would run for hours.
TEST(Numerics, ZeroSizeShapesWithHugeExtentsReturnAtOnce) {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t huge = std::int64_t{1} << 40;
  for (const bn::Shape& s : {bn::Shape{huge, 0, 4}, bn::Shape{huge, 0}, bn::Shape({huge, 0, 1 << 20}, bn::Layout::channels_last),
                             bn::Shape{0, 3, 1 << 20, 1 << 20}}) {
    const std::int64_t F = s.channels();
    std::vector<float> w(static_cast<std::size_t>(F), 1.f), b(static_cast<std::size_t>(F), 0.f);
    std::vector<float> rm(static_cast<std::size_t>(F), 0.f), rv(static_cast<std::size_t>(F), 1.f);
    std::vector<float> gw(static_cast<std::size_t>(F), 5.f), gb(static_cast<std::size_t>(F), 5.f);
    bn::ForwardArgs<float> fa;
    fa.weight = bn::span<const float>(w.data(), F);
    fa.bias = bn::span<const float>(b.data(), F);
    fa.running_mean = bn::span<float>(rm.data(), F);
    fa.running_var = bn::span<float>(rv.data(), F);
    EXPECT_NO_THROW(bn::forward(bn::cpu{}, s, fa, bn::ForwardConfig{})) << s;
    bn::BackwardArgs<float> ba;
    ba.weight = bn::span<const float>(w.data(), F);
    ba.mean = bn::span<const float>(rm.data(), F);
    ba.invstd = bn::span<const float>(rv.data(), F);
    ba.grad_weight = bn::span<float>(gw.data(), F);
    ba.grad_bias = bn::span<float>(gb.data(), F);
    EXPECT_NO_THROW(bn::backward(bn::cpu{}, s, ba, bn::BackwardConfig{})) << s;
    EXPECT_EQ(gw, std::vector<float>(static_cast<std::size_t>(F), 0.f)) << s;  // empty sums
    EXPECT_EQ(rm, std::vector<float>(static_cast<std::size_t>(F), 0.f)) << s;  // untouched
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 1.0);
}

// ---- property tests ------------------------------------------------------------------------

/// One random case: a shape, options, mode and data, run through the library and the reference.
struct PropertyCase {
  bn::Shape shape{2, 1};
  bn::Options options;
  bool training = true;
  bool is_double = false;
  double offset = 0, scale = 1;
  std::uint64_t seed = 0;
};

std::ostream& operator<<(std::ostream& os, const PropertyCase& c) {
  os << "case seed " << c.seed << ": " << (c.is_double ? "double " : "float ") << c.shape
     << (c.options.mode == bn::Mode::per_activation ? " per_activation" : " per_channel")
     << (c.training ? " train" : " eval") << " affine " << c.options.affine << " track "
     << c.options.track_running_stats << " momentum "
     << (c.options.momentum ? std::to_string(*c.options.momentum) : std::string("None")) << " eps "
     << c.options.eps << " data " << c.offset << " + " << c.scale << " * N(0,1)";
  return os;
}

constexpr std::int64_t max_case_elements = std::int64_t{1} << 17;

PropertyCase make_case(std::uint64_t seed, std::int64_t force_C = 0, std::int64_t force_M = 0) {
  std::mt19937_64 rng(seed);
  auto uni = [&](double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); };
  auto pick = [&](std::int64_t a, std::int64_t b) { return std::uniform_int_distribution<std::int64_t>(a, b)(rng); };
  PropertyCase c;
  c.seed = seed;
  const int rank = static_cast<int>(pick(2, 5));
  // C log-uniform in [1, 1024]; N·spatial log-uniform in [2, 1e5], capped by the element budget.
  std::int64_t C = force_C ? force_C : std::min<std::int64_t>(1024, std::llround(std::exp(uni(0.0, std::log(1024.0)))));
  std::int64_t M = force_M ? force_M : std::llround(std::exp(uni(std::log(2.0), std::log(1e5))));
  M = std::max<std::int64_t>(2, std::min(M, max_case_elements / C));
  // Split M into N and rank - 2 spatial extents (roughly; the product may fall a bit short).
  std::int64_t ext[5] = {1, C, 1, 1, 1};
  const int k = rank - 2;
  std::int64_t N = k == 0 ? M : std::max<std::int64_t>(1, std::llround(std::pow(double(M), uni(0.0, 1.0))));
  std::int64_t rest = std::max<std::int64_t>(1, M / N);
  for (int d = 0; d < k; ++d) {
    const std::int64_t e = d == k - 1 ? rest : std::max<std::int64_t>(1, std::llround(std::pow(double(rest), uni(0.0, 1.0))));
    ext[2 + d] = e;
    rest = std::max<std::int64_t>(1, rest / e);
  }
  c.options.mode = pick(0, 3) == 0 ? bn::Mode::per_activation : bn::Mode::per_channel;
  std::int64_t S = 1;
  for (int d = 0; d < k; ++d) S *= ext[2 + d];
  if (c.options.mode == bn::Mode::per_activation) N = std::max<std::int64_t>(N, 2);  // N values per feature
  if (N * S < 2) N = 2;
  ext[0] = N;
  const auto layout = pick(0, 1) ? bn::Layout::channels_last : bn::Layout::contiguous;
  switch (rank) {
    case 2: c.shape = bn::Shape({ext[0], ext[1]}, layout); break;
    case 3: c.shape = bn::Shape({ext[0], ext[1], ext[2]}, layout); break;
    case 4: c.shape = bn::Shape({ext[0], ext[1], ext[2], ext[3]}, layout); break;
    default: c.shape = bn::Shape({ext[0], ext[1], ext[2], ext[3], ext[4]}, layout); break;
  }
  c.training = pick(0, 9) < 7;
  c.is_double = pick(0, 1) == 1;
  c.options.affine = pick(0, 4) != 0;
  c.options.track_running_stats = pick(0, 4) != 0;
  switch (pick(0, 3)) {
    case 0: c.options.momentum = std::nullopt; break;
    case 1: c.options.momentum = 0.1; break;
    default: c.options.momentum = uni(0.0, 1.0); break;
  }
  c.options.eps = std::pow(10.0, uni(-8.0, -1.0));
  c.scale = std::pow(10.0, uni(-3.0, 2.0));
  c.offset = pick(0, 2) == 0 ? 0.0 : (pick(0, 1) ? 1 : -1) * c.scale * std::pow(10.0, uni(0.0, 4.0));
  return c;
}

/// Runs @p c on the library (BatchNorm<T, D>) and the reference; mismatches are test failures.
template <class T, int D>
void run_case_as(const PropertyCase& c) {
  using P = bn::param_t<T>;
  const bn::Shape& s = c.shape;
  const std::int64_t F = bnref::features(s, c.options.mode);
  bn::BatchNorm<T, D, bn::cpu> layer(F, c.options);
  bnref::Layer ref(F, c.options);
  // Random state: weight around 1, bias around 0, running_var > 0, a few batches seen.
  bn::State<P> st = layer.state();
  const auto w = bnref::normal(F, c.seed + 1, 1.0, 0.5), b = bnref::normal(F, c.seed + 2, 0.0, 0.5);
  const auto m = bnref::normal(F, c.seed + 3, c.offset, c.scale), v = bnref::normal(F, c.seed + 4);
  for (std::int64_t f = 0; f < F; ++f) {
    if (c.options.affine) {
      st.weight[f] = static_cast<P>(w[f]);
      st.bias[f] = static_cast<P>(b[f]);
    }
    if (c.options.track_running_stats) {
      st.running_mean[f] = static_cast<P>(m[f]);
      st.running_var[f] = static_cast<P>(c.scale * c.scale * (0.25 + v[f] * v[f]));
    }
  }
  st.num_batches_tracked = static_cast<std::int64_t>(c.seed % 5);
  layer.load_state(st);
  ref.p.weight = bnref::widen(st.weight);
  ref.p.bias = bnref::widen(st.bias);
  ref.p.running_mean = bnref::widen(st.running_mean);
  ref.p.running_var = bnref::widen(st.running_var);
  ref.p.num_batches_tracked = st.num_batches_tracked;
  layer.train(c.training);
  ref.training = c.training;

  const auto x = bnref::cast<T>(bnref::normal(s.numel(), c.seed + 5, c.offset, c.scale));
  const auto dy = bnref::cast<T>(bnref::normal(s.numel(), c.seed + 6));
  std::vector<T> y(x.size()), dx(x.size());
  layer.forward(x.data(), y.data(), s);
  layer.backward(x.data(), dy.data(), dx.data(), s);
  const auto xd = bnref::widen(x);
  const auto r = ref.forward(s, xd);
  const auto g = ref.backward(s, xd, bnref::widen(dy), r);

  const double rel = std::is_same_v<T, float> ? 2e-5 : 1e-9;
  // y and the running stats are O(1) (or O(offset)) per element; dx and the gradients are
  // judged against their own scale (sums of up to 1e5 terms).
  EXPECT_LT(bnref::max_rel_error(y, r.y), rel) << c;
  const auto got = layer.state();
  EXPECT_LT(bnref::max_rel_error(got.running_mean, ref.p.running_mean, c.scale + 1e-30), rel) << c;
  EXPECT_LT(bnref::max_rel_error(got.running_var, ref.p.running_var, 1e-3 * c.scale * c.scale), rel) << c;
  EXPECT_EQ(got.num_batches_tracked, ref.p.num_batches_tracked) << c;
  const std::vector<P> mean(layer.save_mean_data(), layer.save_mean_data() + F);
  const std::vector<P> invstd(layer.save_invstd_data(), layer.save_invstd_data() + F);
  EXPECT_LT(bnref::max_rel_error(mean, r.mean, c.scale), rel) << c;
  EXPECT_LT(bnref::max_rel_error(invstd, r.invstd, 0.0), rel) << c;
  // dx and the gradients are differences and sums of terms that can cancel (N = 2 with
  // var >> eps makes dx ~ eps/var of its terms): judge the error against the size of the
  // terms, max |w·invstd·dy| for dx and max_f Σ|dy·x̂| / Σ|dy| for the gradients.
  double dx_terms = 0.0;
  std::vector<double> l1_w(static_cast<std::size_t>(F), 0.0), l1_b(static_cast<std::size_t>(F), 0.0);
  const auto dyd = bnref::widen(dy);
  bnref::for_each(s, c.options.mode, [&](std::int64_t i, std::int64_t f) {
    const double w = ref.p.weight.empty() ? 1.0 : ref.p.weight[f];
    dx_terms = std::fmax(dx_terms, std::fabs(w * r.invstd[f] * dyd[i]));
    l1_w[f] += std::fabs(dyd[i] * (xd[i] - r.mean[f]) * r.invstd[f]);
    l1_b[f] += std::fabs(dyd[i]);
  });
  auto error_against = [](const auto& got, const std::vector<double>& want, double scale) {
    double err = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i) err = std::fmax(err, std::fabs(double(got[i]) - want[i]));
    return err / std::fmax(scale, bnref::max_abs(want));
  };
  EXPECT_LT(error_against(dx, g.dx, dx_terms), 10 * rel) << c;
  if (c.options.affine) {
    EXPECT_LT(error_against(layer.gradients().grad_weight, g.grad_weight, bnref::max_abs(l1_w)), 10 * rel) << c;
    EXPECT_LT(error_against(layer.gradients().grad_bias, g.grad_bias, bnref::max_abs(l1_b)), 10 * rel) << c;
  }
}

template <class T>
void run_case(const PropertyCase& c) {
  switch (c.shape.rank()) {
    case 2:
    case 3: run_case_as<T, 1>(c); break;
    case 4: run_case_as<T, 2>(c); break;
    default: run_case_as<T, 3>(c); break;
  }
}

TEST(Property, RandomCasesMatchReference) {
  constexpr int cases = 200;
  const auto start = std::chrono::steady_clock::now();
  std::int64_t elements = 0;
  int per_activation = 0, channels_last = 0, eval = 0, doubles = 0;
  for (int i = 0; i < cases; ++i) {
    // The first cases pin the corners: C = 1 and 1024 with N·spatial = 2 and the largest.
    const std::int64_t corner_C[] = {1, 1024, 1, 1024};
    const std::int64_t corner_M[] = {2, 2, 100000, 128};
    const auto c = i < 4 ? make_case(9000 + i, corner_C[i], corner_M[i]) : make_case(9000 + i);
    elements += c.shape.numel();
    per_activation += c.options.mode == bn::Mode::per_activation;
    channels_last += c.shape.layout() == bn::Layout::channels_last;
    eval += !c.training;
    doubles += c.is_double;
    if (c.is_double)
      run_case<double>(c);
    else
      run_case<float>(c);
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << "stopping at the first failing case";
      break;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!::testing::Test::HasFailure()) {
    // Coverage of the draw itself (a generator bug must not silently test one kind only).
    EXPECT_GT(per_activation, 20);
    EXPECT_GT(channels_last, 60);
    EXPECT_GT(eval, 30);
    EXPECT_GT(doubles, 60);
  }
  ::testing::Test::RecordProperty("elements", std::to_string(elements));
  std::cout << "[property] " << cases << " cases, " << elements << " elements, " << per_activation
            << " per_activation, " << channels_last << " channels_last, " << eval << " eval, " << doubles
            << " double, " << seconds << " s\n";
}

}  // namespace
