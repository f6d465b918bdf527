// Channels-last (NLC / NHWC / NDHWC) versus contiguous (NCL / NCHW / NCDHW) on the CPU
// backend: the same logical tensor in either memory order gives the same results.
//
// Tolerances (stated per check):
//  - eval (running statistics): outputs bitwise equal, as PyTorch requires — every element
//    is the same x * scale + shift, only the visiting order differs;
//  - training: the reductions run in another order, so statistics may differ in the last
//    bits: double 1e-13 relative, float 4 ulp (5e-7 relative) for outputs, saved and running
//    statistics; backward (dx, grad_weight, grad_bias) the same.
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "support/common.hpp"

namespace bn = batchnorm;

namespace {

using bn_test::from_channels_last;
using bn_test::make_shape;
using bn_test::to_channels_last;

template <class T>
double rel_tol() {
  return std::is_same_v<T, double> ? 1e-13 : 5e-7;
}

template <class T>
void expect_close(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    EXPECT_NEAR(x, y, rel_tol<T>() * std::max(1.0, std::fabs(y))) << what << "[" << i << "]";
  }
}

template <class T>
void expect_bitwise(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)), 0) << what << " differ bitwise";
}

/// Everything a forward + backward pair produces, with activations in contiguous order.
template <class T>
struct Results {
  std::vector<T> y, dx, dz;
  std::vector<T> running_mean, running_var, save_mean, save_invstd, grad_weight, grad_bias;
};

struct Case {
  std::vector<std::int64_t> extents;
  bn::Mode mode;
  bool training;
  bool relu_residual = false;
};

/// Runs forward and backward on the functional CPU API with activations in @p layout;
/// inputs and outputs are given/returned in contiguous order.
template <class T>
Results<T> run(const Case& k, bn::Layout layout, const std::vector<T>& x, const std::vector<T>& z,
               const std::vector<T>& dy) {
  const bn::Shape shape = make_shape(k.extents, layout);
  const std::int64_t n = shape.batch(), c = shape.channels(), s = shape.spatial();
  const std::int64_t f = bn::feature_count(shape, k.mode);
  auto in = [&](const std::vector<T>& v) { return layout == bn::Layout::channels_last ? to_channels_last(v, n, c, s) : v; };
  auto out = [&](const std::vector<T>& v) { return layout == bn::Layout::channels_last ? from_channels_last(v, n, c, s) : v; };
  using P = bn::param_t<T>;
  std::vector<P> weight(static_cast<std::size_t>(f)), bias(weight.size()), rm(weight.size()), rv(weight.size());
  for (std::int64_t i = 0; i < f; ++i) {
    weight[static_cast<std::size_t>(i)] = P(0.5) + P(0.125) * static_cast<P>(i % 7);
    bias[static_cast<std::size_t>(i)] = P(-0.25) + P(0.1) * static_cast<P>(i % 5);
    rm[static_cast<std::size_t>(i)] = P(0.3) * static_cast<P>(i % 3);
    rv[static_cast<std::size_t>(i)] = P(0.5) + P(0.25) * static_cast<P>(i % 4);
  }
  Results<T> r;
  r.save_mean.assign(weight.size(), P(0));
  r.save_invstd.assign(weight.size(), P(0));
  const auto xl = in(x), zl = in(z);
  std::vector<T> y(x.size());
  bn::ForwardArgs<T> fa;
  fa.x = xl.data();
  fa.y = y.data();
  fa.weight = bn::span<const P>(weight.data(), f);
  fa.bias = bn::span<const P>(bias.data(), f);
  fa.running_mean = bn::span<P>(rm);
  fa.running_var = bn::span<P>(rv);
  fa.save_mean = bn::span<P>(r.save_mean);
  fa.save_invstd = bn::span<P>(r.save_invstd);
  bn::ForwardConfig fc;
  fc.mode = k.mode;
  fc.batch_statistics = k.training;
  if (k.relu_residual) {
    fa.residual = zl.data();
    fc.activation = bn::Activation::relu;
  }
  bn::forward(bn::cpu{}, shape, fa, fc);

  const auto dyl = in(dy);
  std::vector<T> dx(x.size()), dz(x.size());
  r.grad_weight.assign(weight.size(), P(0));
  r.grad_bias.assign(weight.size(), P(0));
  bn::BackwardArgs<T> ba;
  ba.x = xl.data();
  ba.dy = dyl.data();
  ba.dx = dx.data();
  ba.y = y.data();
  if (k.relu_residual) ba.dresidual = dz.data();
  ba.weight = bn::span<const P>(weight.data(), f);
  ba.mean = bn::span<const P>(r.save_mean.data(), f);
  ba.invstd = bn::span<const P>(r.save_invstd.data(), f);
  ba.grad_weight = bn::span<P>(r.grad_weight);
  ba.grad_bias = bn::span<P>(r.grad_bias);
  bn::BackwardConfig bc;
  bc.mode = k.mode;
  bc.batch_statistics = k.training;
  bc.activation = fc.activation;
  bn::backward(bn::cpu{}, shape, ba, bc);

  r.y = out(y);
  r.dx = out(dx);
  r.dz = out(dz);
  r.running_mean = rm;
  r.running_var = rv;
  return r;
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937& rng, double offset = 0.0) {
  std::normal_distribution<double> d(offset, 1.5);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(d(rng));
  return v;
}

template <class T>
void check_case(const Case& k) {
  std::int64_t numel = 1;
  for (auto e : k.extents) numel *= e;
  std::mt19937 rng(static_cast<unsigned>(numel * 31 + k.extents.size()));
  const auto x = random_vector<T>(static_cast<std::size_t>(numel), rng, 0.75);
  const auto z = random_vector<T>(static_cast<std::size_t>(numel), rng);
  const auto dy = random_vector<T>(static_cast<std::size_t>(numel), rng);
  const auto a = run<T>(k, bn::Layout::contiguous, x, z, dy);
  const auto b = run<T>(k, bn::Layout::channels_last, x, z, dy);
  if (!k.training) {
    expect_bitwise(b.y, a.y, "eval y");
    expect_bitwise(b.save_mean, a.save_mean, "eval save_mean");
    expect_bitwise(b.save_invstd, a.save_invstd, "eval save_invstd");
    expect_bitwise(b.running_mean, a.running_mean, "eval running_mean (untouched)");
    expect_bitwise(b.running_var, a.running_var, "eval running_var (untouched)");
    // Eval backward is elementwise for dx too: dx = dy * invstd * weight.
    expect_bitwise(b.dx, a.dx, "eval dx");
    expect_bitwise(b.dz, a.dz, "eval dz");
  } else {
    expect_close(b.y, a.y, "train y");
    expect_close(b.save_mean, a.save_mean, "save_mean");
    expect_close(b.save_invstd, a.save_invstd, "save_invstd");
    expect_close(b.running_mean, a.running_mean, "running_mean");
    expect_close(b.running_var, a.running_var, "running_var");
    expect_close(b.dx, a.dx, "train dx");
    expect_close(b.dz, a.dz, "train dz");
  }
  expect_close(b.grad_weight, a.grad_weight, "grad_weight");
  expect_close(b.grad_bias, a.grad_bias, "grad_bias");
}

std::string describe(const Case& k) {
  std::string s = "extents (";
  for (std::size_t i = 0; i < k.extents.size(); ++i) s += (i ? ", " : "") + std::to_string(k.extents[i]);
  return s + ") " + (k.mode == bn::Mode::per_channel ? "per_channel" : "per_activation") +
         (k.training ? " training" : " eval") + (k.relu_residual ? " relu+residual" : "");
}

const std::vector<std::vector<std::int64_t>> shapes = {
    {4, 3, 7},           // NLC
    {2, 5, 3, 4},        // NHWC
    {3, 8, 1, 1},        // 1x1 spatial: both orders coincide
    {2, 3, 2, 3, 4},     // NDHWC
    {5, 16, 6, 6},       // more channels than a line
    {2, 1, 5, 5},        // a single channel
};

template <class T>
void all_cases() {
  for (const auto& e : shapes)
    for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
      for (const bool training : {true, false})
        for (const bool fused : {false, true}) {
          const Case k{e, mode, training, fused};
          SCOPED_TRACE(describe(k));
          check_case<T>(k);
        }
}

}  // namespace

TEST(Layout, ChannelsLastMatchesContiguousDouble) { all_cases<double>(); }

TEST(Layout, ChannelsLastMatchesContiguousFloat) { all_cases<float>(); }

TEST(Layout, RankTwoIsTheSameMemoryInBothLayouts) {
  // (N, C): both layouts name the same order, so results are bitwise equal even in training.
  std::mt19937 rng(1);
  const auto x = random_vector<float>(6 * 5, rng), z = random_vector<float>(30, rng), dy = random_vector<float>(30, rng);
  for (const bool training : {true, false}) {
    const Case k{{6, 5}, bn::Mode::per_channel, training};
    const auto a = run<float>(k, bn::Layout::contiguous, x, z, dy);
    const auto b = run<float>(k, bn::Layout::channels_last, x, z, dy);
    expect_bitwise(b.y, a.y, "y");
    expect_bitwise(b.dx, a.dx, "dx");
    expect_bitwise(b.running_var, a.running_var, "running_var");
    expect_bitwise(b.grad_weight, a.grad_weight, "grad_weight");
  }
}

TEST(Layout, PerActivationParametersAreIndexedLogically) {
  // per_activation features are c * S + s whatever the layout: a weight that differs per
  // location must land on the same logical element in NHWC as in NCHW.
  const std::int64_t n = 3, c = 2, h = 2, w = 2, s = h * w;
  std::vector<double> x(static_cast<std::size_t>(n * c * s));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(1.3 * static_cast<double>(i)) + 0.1 * static_cast<double>(i);
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    bn::Options o;
    o.mode = bn::Mode::per_activation;
    bn::BatchNorm2d<double, bn::cpu> layer(c * s, o);
    bn::State<double> st = layer.state();
    for (std::int64_t f = 0; f < c * s; ++f) st.bias[static_cast<std::size_t>(f)] = 100.0 * static_cast<double>(f);
    layer.load_state(st);
    const auto xl = layout == bn::Layout::channels_last ? to_channels_last(x, n, c, s) : x;
    std::vector<double> y(x.size());
    layer.forward(xl.data(), y.data(), bn::Shape({n, c, h, w}, layout));
    const auto yc = layout == bn::Layout::channels_last ? from_channels_last(y, n, c, s) : y;
    // Each (c, s) column is normalized to mean bias[c * S + s].
    for (std::int64_t ch = 0; ch < c; ++ch)
      for (std::int64_t k = 0; k < s; ++k) {
        double mean = 0.0;
        for (std::int64_t a = 0; a < n; ++a) mean += yc[static_cast<std::size_t>((a * c + ch) * s + k)];
        EXPECT_NEAR(mean / static_cast<double>(n), 100.0 * static_cast<double>(ch * s + k), 1e-9)
            << (layout == bn::Layout::channels_last ? "channels_last" : "contiguous") << " c=" << ch << " s=" << k;
      }
  }
}

TEST(Layout, LayerClassWithChannelsLastShape) {
  // The class path: forward/backward with an NHWC shape equal the NCHW run; backward must be
  // given the forward's shape, layout included.
  const std::int64_t n = 4, c = 3, h = 3, w = 2, s = h * w;
  std::mt19937 rng(9);
  const auto x = random_vector<double>(static_cast<std::size_t>(n * c * s), rng, 2.0);
  const auto dy = random_vector<double>(x.size(), rng);
  bn::BatchNorm2d<double, bn::cpu> a(c), b(c);
  std::vector<double> ya(x.size()), yb(x.size()), dxa(x.size()), dxb(x.size());
  const bn::Shape nchw{n, c, h, w}, nhwc({n, c, h, w}, bn::Layout::channels_last);
  a.forward(x.data(), ya.data(), nchw);
  const auto xl = to_channels_last(x, n, c, s);
  b.forward(xl.data(), yb.data(), nhwc);
  expect_close(from_channels_last(yb, n, c, s), ya, "y");
  EXPECT_THROW(b.backward(xl.data(), dy.data(), dxb.data(), nchw), bn::invalid_argument);
  a.backward(x.data(), dy.data(), dxa.data(), nchw);
  const auto dyl = to_channels_last(dy, n, c, s);
  b.backward(xl.data(), dyl.data(), dxb.data(), nhwc);
  expect_close(from_channels_last(dxb, n, c, s), dxa, "dx");
  expect_close(b.gradients().grad_weight, a.gradients().grad_weight, "grad_weight");
  expect_close(b.state().running_var, a.state().running_var, "running_var");
  // Eval: bitwise.
  a.eval();
  b.eval();
  a.forward(x.data(), ya.data(), nchw);
  b.forward(xl.data(), yb.data(), nhwc);
  expect_bitwise(from_channels_last(yb, n, c, s), ya, "eval y");
}
