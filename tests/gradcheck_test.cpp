// Finite-difference gradient checks of the CPU backend's backward, in double, and
// properties of the gradients that hold whatever the data.
//
// Loss L(x, weight, bias) = Σ y·r for a fixed random r, so dL/dy = r is fed to backward.
// Each partial derivative is checked against the central difference
//   (L(θ + h) − L(θ − h)) / 2h,  h = 1e-5,
// which is exact up to h²·L'''/6 ≈ 1e-10 (data of unit scale) plus rounding ≈ 1e-16·|L|/h;
// the tolerance |numeric − analytic| <= 1e-7 + 1e-6·|analytic| sits well above both and far
// below any error of a formula (a missing term is O(1)).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include <batchnorm/batchnorm.hpp>

#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"

namespace {

using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::Options;
using batchnorm::State;
using Vec = std::vector<double>;

/// A small gradcheck problem.
struct GradCase {
  std::string name;
  int dims;                         // BatchNorm1d / 2d / 3d
  std::vector<std::int64_t> shape;  // (N, C, spatial...)
  Mode mode = Mode::per_channel;
  bool affine = true;
  bool track = true;
  bool training = true;
  double eps = 1e-5;
};

void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }

std::int64_t numel_of(const std::vector<std::int64_t>& e) {
  return std::accumulate(e.begin(), e.end(), std::int64_t{1}, std::multiplies<>());
}

using bn_test::spatial_of;

std::int64_t features_of(const GradCase& c) {
  return c.mode == Mode::per_channel ? c.shape[1] : c.shape[1] * spatial_of(c.shape);
}

Vec random_vec(std::mt19937_64& rng, std::size_t n, double scale = 1.0, double offset = 0.0) {
  std::normal_distribution<double> d(0.0, 1.0);
  Vec v(n);
  for (auto& e : v) e = offset + scale * d(rng);
  return v;
}

Options options_of(const GradCase& c) {
  Options o;
  o.affine = c.affine;
  o.track_running_stats = c.track;
  o.mode = c.mode;
  o.eps = c.eps;
  return o;
}

/// Everything a problem needs: the layer's state before the forward, x and r.
struct Problem {
  GradCase c;
  State<double> state;
  Vec x, r;
};

Problem make_problem(const GradCase& c, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Problem p{c, {}, {}, {}};
  const auto nf = static_cast<std::size_t>(features_of(c));
  if (c.affine) {
    p.state.weight = random_vec(rng, nf, 0.7, 0.3);
    p.state.bias = random_vec(rng, nf);
  }
  if (c.track) {
    p.state.running_mean = random_vec(rng, nf, 0.5);
    p.state.running_var = random_vec(rng, nf, 0.3);
    for (auto& v : p.state.running_var) v = 0.5 + v * v;  // positive
    p.state.num_batches_tracked = 3;
  }
  const auto n = static_cast<std::size_t>(numel_of(c.shape));
  p.x = random_vec(rng, n, 1.3, 0.4);
  p.r = random_vec(rng, n);
  return p;
}

template <int Dims>
double loss(const Problem& p, const Vec& x, const State<double>& s) {
  batchnorm::BatchNorm<double, Dims, batchnorm::cpu> bn(features_of(p.c), options_of(p.c));
  bn.load_state(s);
  bn.train(p.c.training);
  Vec y(x.size());
  bn.forward(x.data(), y.data(), bn_test::make_shape(p.c.shape));
  double l = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) l += y[i] * p.r[i];
  return l;
}

struct Analytic {
  Vec y, dx;
  batchnorm::Gradients<double> g;
};

template <int Dims>
Analytic analytic(const Problem& p) {
  batchnorm::BatchNorm<double, Dims, batchnorm::cpu> bn(features_of(p.c), options_of(p.c));
  bn.load_state(p.state);
  bn.train(p.c.training);
  Analytic a;
  a.y.resize(p.x.size());
  a.dx.resize(p.x.size());
  const auto shape = bn_test::make_shape(p.c.shape);
  bn.forward(p.x.data(), a.y.data(), shape);
  bn.backward(p.x.data(), p.r.data(), a.dx.data(), shape);
  a.g = bn.gradients();
  return a;
}

constexpr double kStep = 1e-5;
constexpr bn_test::Tolerance kFdTol{1e-7, 1e-6};

template <int Dims>
void gradcheck(const GradCase& c) {
  const Problem p = make_problem(c, 0x5eed0000u + std::hash<std::string>{}(c.name) % 1000u);
  const Analytic a = analytic<Dims>(p);

  Vec num_dx(p.x.size());
  for (std::size_t i = 0; i < p.x.size(); ++i) {
    Vec xp = p.x, xm = p.x;
    xp[i] += kStep;
    xm[i] -= kStep;
    num_dx[i] = (loss<Dims>(p, xp, p.state) - loss<Dims>(p, xm, p.state)) / (2 * kStep);
  }
  EXPECT_TRUE(bn_test::all_close(a.dx, num_dx, kFdTol, c.name + ": dx"));

  if (!c.affine) {
    EXPECT_TRUE(a.g.grad_weight.empty() && a.g.grad_bias.empty());
    return;
  }
  auto numeric_param = [&](Vec State<double>::*member) {
    const std::size_t nf = (p.state.*member).size();
    Vec d(nf);
    for (std::size_t f = 0; f < nf; ++f) {
      State<double> sp = p.state, sm = p.state;
      (sp.*member)[f] += kStep;
      (sm.*member)[f] -= kStep;
      d[f] = (loss<Dims>(p, p.x, sp) - loss<Dims>(p, p.x, sm)) / (2 * kStep);
    }
    return d;
  };
  EXPECT_TRUE(bn_test::all_close(a.g.grad_weight, numeric_param(&State<double>::weight), kFdTol,
                                 c.name + ": grad_weight"));
  EXPECT_TRUE(bn_test::all_close(a.g.grad_bias, numeric_param(&State<double>::bias), kFdTol,
                                 c.name + ": grad_bias"));
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> v;
  auto add = [&](GradCase c) { v.push_back(std::move(c)); };
  // training, per channel, every rank
  add({"bn1d_nc", 1, {5, 3}});
  add({"bn1d_ncl", 1, {3, 2, 4}});
  add({"bn2d", 2, {2, 3, 2, 3}});
  add({"bn3d", 3, {2, 2, 2, 1, 3}});
  // N = 1 with spatial > 1
  add({"bn1d_ncl_n1", 1, {1, 3, 5}});
  add({"bn2d_n1", 2, {1, 2, 3, 3}});
  add({"bn3d_n1", 3, {1, 2, 2, 2, 2}});
  // C = 1
  add({"bn1d_nc_c1", 1, {7, 1}});
  add({"bn2d_c1", 2, {3, 1, 2, 2}});
  // per activation
  add({"bn1d_ncl_per_activation", 1, {4, 2, 3}, Mode::per_activation});
  add({"bn2d_per_activation", 2, {3, 2, 2, 2}, Mode::per_activation});
  add({"bn3d_per_activation_c1", 3, {3, 1, 2, 1, 2}, Mode::per_activation});
  // eval: running statistics
  add({"bn2d_eval", 2, {2, 3, 2, 2}, Mode::per_channel, true, true, false});
  add({"bn1d_nc_eval_n1", 1, {1, 4}, Mode::per_channel, true, true, false});
  add({"bn1d_ncl_per_activation_eval", 1, {3, 2, 3}, Mode::per_activation, true, true, false});
  add({"bn3d_eval_n1", 3, {1, 2, 1, 2, 2}, Mode::per_channel, true, true, false});
  // affine off
  add({"bn2d_affine_off", 2, {2, 2, 2, 3}, Mode::per_channel, false});
  add({"bn1d_nc_affine_off_eval", 1, {4, 3}, Mode::per_channel, false, true, false});
  // tracking off: eval normalizes with batch statistics, so the train gradient applies
  add({"bn2d_untracked_eval", 2, {2, 2, 3, 2}, Mode::per_channel, true, false, false});
  add({"bn1d_nc_untracked_train", 1, {4, 3}, Mode::per_channel, true, false, true});
  // eps of the order of the variance
  GradCase big_eps{"bn2d_eps0p5", 2, {2, 3, 2, 2}};
  big_eps.eps = 0.5;
  add(big_eps);
  return v;
}

class GradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(GradCheck, BackwardMatchesCentralDifferences) {
  const GradCase& c = GetParam();
  switch (c.dims) {
    case 1: gradcheck<1>(c); break;
    case 2: gradcheck<2>(c); break;
    case 3: gradcheck<3>(c); break;
    default: FAIL() << "dims " << c.dims;
  }
}

INSTANTIATE_TEST_SUITE_P(Cpu, GradCheck, ::testing::ValuesIn(grad_cases()),
                         [](const ::testing::TestParamInfo<GradCase>& i) { return i.param.name; });

// ---- properties ------------------------------------------------------------------------------

/// Feature of the element at contiguous offset i: c, or c * S + s.
std::int64_t feature_at(std::int64_t i, const std::vector<std::int64_t>& e, Mode mode) {
  const std::int64_t C = e[1], S = spatial_of(e);
  const std::int64_t c = (i / S) % C, s = i % S;
  return mode == Mode::per_channel ? c : c * S + s;
}

template <int Dims>
void check_dx_orthogonality(const GradCase& c) {
  const Problem p = make_problem(c, 77);
  const Analytic a = analytic<Dims>(p);
  const auto nf = static_cast<std::size_t>(features_of(c));
  Vec sum(nf, 0.0), sum_abs(nf, 0.0), mean(nf, 0.0), cnt(nf, 0.0), sum_xmu(nf, 0.0), sum_abs_xmu(nf, 0.0);
  for (std::size_t i = 0; i < p.x.size(); ++i) {
    const auto f = static_cast<std::size_t>(feature_at(static_cast<std::int64_t>(i), c.shape, c.mode));
    mean[f] += p.x[i];
    cnt[f] += 1;
  }
  for (std::size_t f = 0; f < nf; ++f) mean[f] /= cnt[f];
  for (std::size_t i = 0; i < p.x.size(); ++i) {
    const auto f = static_cast<std::size_t>(feature_at(static_cast<std::int64_t>(i), c.shape, c.mode));
    sum[f] += a.dx[i];
    sum_abs[f] += std::fabs(a.dx[i]);
    sum_xmu[f] += a.dx[i] * (p.x[i] - mean[f]);
    sum_abs_xmu[f] += std::fabs(a.dx[i] * (p.x[i] - mean[f]));
  }
  for (std::size_t f = 0; f < nf; ++f) {
    ASSERT_GT(sum_abs[f], 0.0) << c.name << " feature " << f << ": dx is all zero";
    // In training, y is invariant to shifting and (up to eps) scaling x within a feature, so
    // dx is orthogonal to the constant vector, and nearly to (x − mean).
    EXPECT_LE(std::fabs(sum[f]), 1e-12 * sum_abs[f]) << c.name << " feature " << f << ": Σ dx = " << sum[f];
    if (c.eps <= 1e-5) {
      EXPECT_LE(std::fabs(sum_xmu[f]), 1e-4 * sum_abs_xmu[f])
          << c.name << " feature " << f << ": Σ dx·(x − mean) = " << sum_xmu[f];
    }
  }
}

TEST(GradProperties, DxSumsToZeroPerFeatureInTraining) {
  check_dx_orthogonality<1>({"bn1d_nc", 1, {16, 5}});
  check_dx_orthogonality<1>({"bn1d_ncl", 1, {6, 3, 7}});
  check_dx_orthogonality<2>({"bn2d", 2, {8, 3, 4, 4}});
  check_dx_orthogonality<2>({"bn2d_n1", 2, {1, 3, 4, 5}});
  check_dx_orthogonality<3>({"bn3d", 3, {2, 2, 3, 2, 3}});
  check_dx_orthogonality<2>({"bn2d_per_activation", 2, {9, 2, 3, 3}, Mode::per_activation});
  check_dx_orthogonality<1>({"bn1d_nc_affine_off", 1, {10, 4}, Mode::per_channel, false});
  check_dx_orthogonality<2>({"bn2d_untracked_eval", 2, {4, 3, 2, 2}, Mode::per_channel, true, false, false});
}

TEST(GradProperties, DxDoesNotSumToZeroInEval) {
  // The counterpart: with running statistics dx = dy·invstd·w has no mean-removal term, so
  // the property above must not hold; this guards against eval silently using train formulas.
  const GradCase c{"bn2d_eval", 2, {4, 3, 2, 2}, Mode::per_channel, true, true, false};
  const Problem p = make_problem(c, 78);
  const Analytic a = analytic<2>(p);
  for (std::int64_t f = 0; f < 3; ++f) {
    double sum = 0.0, sum_abs = 0.0;
    for (std::size_t i = 0; i < p.x.size(); ++i) {
      if (feature_at(static_cast<std::int64_t>(i), c.shape, c.mode) == f) {
        sum += a.dx[i];
        sum_abs += std::fabs(a.dx[i]);
      }
    }
    EXPECT_GT(std::fabs(sum), 1e-3 * sum_abs) << "feature " << f;
  }
}

template <class A, class B>
void expect_same_results(A& a, B& b, const Vec& x, const Vec& r, const batchnorm::Shape& sa,
                         const batchnorm::Shape& sb, const Vec& xb, const Vec& rb, const std::string& what,
                         const std::vector<std::int64_t>& shape_a, bool a_channels_last) {
  const bn_test::Tolerance tight{1e-13, 1e-12};
  Vec ya(x.size()), yb(x.size()), dxa(x.size()), dxb(x.size());
  a.forward(x.data(), ya.data(), sa);
  b.forward(xb.data(), yb.data(), sb);
  a.backward(x.data(), r.data(), dxa.data(), sa);
  b.backward(xb.data(), rb.data(), dxb.data(), sb);
  if (a_channels_last) {  // b works on the contiguous flattening: compare in that order
    ya = bn_test::from_channels_last(ya, shape_a);
    dxa = bn_test::from_channels_last(dxa, shape_a);
  }
  EXPECT_TRUE(bn_test::all_close(ya, yb, tight, what + ": y"));
  EXPECT_TRUE(bn_test::all_close(dxa, dxb, tight, what + ": dx"));
  const auto ga = a.gradients(), gb = b.gradients();
  EXPECT_TRUE(bn_test::all_close(ga.grad_weight, gb.grad_weight, tight, what + ": grad_weight"));
  EXPECT_TRUE(bn_test::all_close(ga.grad_bias, gb.grad_bias, tight, what + ": grad_bias"));
  EXPECT_FALSE(ga.grad_weight.empty());
  const auto s1 = a.state(), s2 = b.state();
  EXPECT_TRUE(bn_test::all_close(s1.running_mean, s2.running_mean, tight, what + ": running_mean"));
  EXPECT_TRUE(bn_test::all_close(s1.running_var, s2.running_var, tight, what + ": running_var"));
}

TEST(GradProperties, PerChannelEqualsPerActivationWhenSpatialIsOne) {
  // BatchNorm2d per channel on (N, C, 1, 1) and BatchNorm1d per activation on the flattened
  // (N, C): the same statistics, so the same y, dx, dweight, dbias and running stats.
  const std::int64_t N = 6, C = 4;
  std::mt19937_64 rng(5);
  const Vec x = random_vec(rng, N * C, 1.5, 0.5), r = random_vec(rng, N * C);
  State<double> s;
  s.weight = random_vec(rng, C, 0.5, 1.0);
  s.bias = random_vec(rng, C);
  s.running_mean = Vec(C, 0.0);
  s.running_var = Vec(C, 1.0);
  for (bool training : {true, false}) {
    Options pc;
    Options pa;
    pa.mode = Mode::per_activation;
    batchnorm::BatchNorm2d<double, batchnorm::cpu> a(C, pc);
    batchnorm::BatchNorm1d<double, batchnorm::cpu> b(C, pa);
    a.load_state(s);
    b.load_state(s);
    a.train(training);
    b.train(training);
    expect_same_results(a, b, x, r, batchnorm::Shape{N, C, 1, 1}, batchnorm::Shape{N, C}, x, r,
                        training ? "train" : "eval", {N, C, 1, 1}, false);
  }
}

TEST(GradProperties, PerActivationEqualsBatchNorm1dOnFlattenedInput) {
  // The definition of per_activation: BatchNorm2d(C·H·W, per_activation) on (N, C, H, W)
  // equals BatchNorm1d(C·H·W) on (N, C·H·W), forward and backward, in either layout.
  const std::int64_t N = 5, C = 2, H = 3, W = 2, F = C * H * W;
  const std::vector<std::int64_t> e{N, C, H, W};
  std::mt19937_64 rng(6);
  const Vec x = random_vec(rng, N * F, 1.1, -0.3), r = random_vec(rng, N * F);
  State<double> s;
  s.weight = random_vec(rng, F, 0.5, 1.0);
  s.bias = random_vec(rng, F);
  s.running_mean = random_vec(rng, F, 0.2);
  s.running_var = Vec(F, 1.3);
  for (Layout layout : {Layout::contiguous, Layout::channels_last}) {
    for (bool training : {true, false}) {
      Options pa;
      pa.mode = Mode::per_activation;
      pa.momentum = std::nullopt;
      Options pc;
      pc.momentum = std::nullopt;
      batchnorm::BatchNorm2d<double, batchnorm::cpu> a(F, pa);
      batchnorm::BatchNorm1d<double, batchnorm::cpu> b(F, pc);
      a.load_state(s);
      b.load_state(s);
      a.train(training);
      b.train(training);
      const bool cl = layout == Layout::channels_last;
      const Vec xa = cl ? bn_test::to_channels_last(x, e) : x;
      const Vec ra = cl ? bn_test::to_channels_last(r, e) : r;
      expect_same_results(a, b, xa, ra, batchnorm::Shape({N, C, H, W}, layout), batchnorm::Shape{N, F}, x, r,
                          std::string(training ? "train" : "eval") + (cl ? " channels_last" : ""), e, cl);
    }
  }
}

TEST(GradProperties, NullDxGivesTheSameParameterGradients) {
  const GradCase c{"bn2d", 2, {3, 2, 2, 2}};
  const Problem p = make_problem(c, 9);
  const Analytic full = analytic<2>(p);
  batchnorm::BatchNorm2d<double, batchnorm::cpu> bn(2);
  bn.load_state(p.state);
  Vec y(p.x.size());
  const auto shape = bn_test::make_shape(c.shape);
  bn.forward(p.x.data(), y.data(), shape);
  bn.backward(p.x.data(), p.r.data(), nullptr, shape);
  const auto g = bn.gradients();
  EXPECT_EQ(g.grad_weight, full.g.grad_weight);
  EXPECT_EQ(g.grad_bias, full.g.grad_bias);
}

}  // namespace
