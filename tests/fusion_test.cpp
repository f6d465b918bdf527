// Fused epilogues on the CPU backend: y = relu(bn(x)) and y = relu(bn(x) + z) equal the
// unfused composition (bn, then add, then relu, each as PyTorch does it), and the fused
// backward (mask from y) equals relu's backward followed by bn's backward: dx, dz,
// grad_weight, grad_bias. NaN propagates as in PyTorch.
//
// Tolerances: relu(bn(x)) is value-equal to relu applied to bn's rounded output (rounding
// commutes with relu). With a residual the composition rounds twice (bn output, then the
// add) where the fused path rounds once: double 1e-15 and float 2.4e-7 (2 ulp at 2^-23)
// relative to |bn(x)| + |z|. Statistics and the whole backward are bitwise equal.
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937& rng, double mean = 0.0, double sd = 1.0) {
  std::normal_distribution<double> d(mean, sd);
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(d(rng));
  return v;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

/// Parameters and statistics of one functional call.
template <class T>
struct Params {
  using P = bn::param_t<T>;
  std::vector<P> weight, bias, running_mean, running_var, save_mean, save_invstd;
  explicit Params(std::int64_t f) {
    for (std::int64_t i = 0; i < f; ++i) {
      weight.push_back(P(0.75) + P(0.25) * static_cast<P>(i % 3) - P(i % 2));  // some negative scales
      bias.push_back(P(0.2) * static_cast<P>(i % 4) - P(0.3));
      running_mean.push_back(P(0.1) * static_cast<P>(i));
      running_var.push_back(P(0.5) + P(0.5) * static_cast<P>(i % 3));
    }
    save_mean.assign(weight.size(), P(0));
    save_invstd.assign(weight.size(), P(0));
  }
};

template <class T>
std::vector<T> forward(const bn::Shape& shape, bn::Mode mode, bool training, Params<T>& p, const std::vector<T>& x,
                       const T* residual, bn::Activation act) {
  using P = bn::param_t<T>;
  std::vector<T> y(x.size());
  bn::ForwardArgs<T> a;
  a.x = x.data();
  a.y = y.data();
  a.weight = bn::span<const P>(p.weight.data(), static_cast<std::int64_t>(p.weight.size()));
  a.bias = bn::span<const P>(p.bias.data(), static_cast<std::int64_t>(p.bias.size()));
  a.running_mean = bn::span<P>(p.running_mean);
  a.running_var = bn::span<P>(p.running_var);
  a.save_mean = bn::span<P>(p.save_mean);
  a.save_invstd = bn::span<P>(p.save_invstd);
  a.residual = residual;
  bn::ForwardConfig c;
  c.mode = mode;
  c.batch_statistics = training;
  c.activation = act;
  bn::forward(bn::cpu{}, shape, a, c);
  return y;
}

template <class T>
struct Grads {
  std::vector<T> dx, dz;
  std::vector<bn::param_t<T>> grad_weight, grad_bias;
};

template <class T>
Grads<T> backward(const bn::Shape& shape, bn::Mode mode, bool training, const Params<T>& p, const std::vector<T>& x,
                  const std::vector<T>& y, const std::vector<T>& dy, bn::Activation act, bool want_dz) {
  using P = bn::param_t<T>;
  Grads<T> g;
  g.dx.assign(x.size(), T(0));
  g.dz.assign(x.size(), T(0));
  g.grad_weight.assign(p.weight.size(), P(0));
  g.grad_bias.assign(p.weight.size(), P(0));
  const auto f = static_cast<std::int64_t>(p.weight.size());
  bn::BackwardArgs<T> a;
  a.x = x.data();
  a.dy = dy.data();
  a.dx = g.dx.data();
  a.y = y.data();
  a.dresidual = want_dz ? g.dz.data() : nullptr;
  a.weight = bn::span<const P>(p.weight.data(), f);
  a.mean = bn::span<const P>(p.save_mean.data(), f);
  a.invstd = bn::span<const P>(p.save_invstd.data(), f);
  a.grad_weight = bn::span<P>(g.grad_weight);
  a.grad_bias = bn::span<P>(g.grad_bias);
  bn::BackwardConfig c;
  c.mode = mode;
  c.batch_statistics = training;
  c.activation = act;
  bn::backward(bn::cpu{}, shape, a, c);
  return g;
}

/// PyTorch's relu: max(v, 0), NaN stays NaN.
template <class T>
T relu(T v) {
  return std::isnan(static_cast<double>(v)) ? v : (v > T(0) ? v : T(0));
}

/// PyTorch's relu backward (threshold_backward(grad, result, 0)): result <= 0 ? 0 : grad.
template <class T>
T relu_backward(T grad, T result) {
  return result <= T(0) ? T(0) : grad;
}

template <class T>
double residual_tol() {
  return std::is_same_v<T, double> ? 1e-15 : 2.4e-7;
}

struct Case {
  bn::Shape shape;
  bn::Mode mode;
  bool training;
};

template <class T>
void check_fusion(const Case& k, bool with_residual) {
  const std::int64_t f = bn::feature_count(k.shape, k.mode);
  std::mt19937 rng(static_cast<unsigned>(k.shape.numel() + f));
  const auto x = random_vector<T>(static_cast<std::size_t>(k.shape.numel()), rng, 0.5, 2.0);
  const auto z = random_vector<T>(x.size(), rng, 0.0, 1.0);
  const auto dy = random_vector<T>(x.size(), rng);

  // Unfused: bn, then add (in T, as a framework's add kernel would), then relu.
  Params<T> pu(f);
  const auto bn_out = forward(k.shape, k.mode, k.training, pu, x, static_cast<const T*>(nullptr), bn::Activation::identity);
  std::vector<T> composed(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) composed[i] = relu(with_residual ? T(bn_out[i] + z[i]) : bn_out[i]);

  // Fused.
  Params<T> pf(f);
  const auto fused = forward(k.shape, k.mode, k.training, pf, x, with_residual ? z.data() : nullptr, bn::Activation::relu);

  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!with_residual) {
      EXPECT_EQ(fused[i], composed[i]) << "element " << i;
    } else {
      const double scale = std::fabs(static_cast<double>(bn_out[i])) + std::fabs(static_cast<double>(z[i]));
      EXPECT_NEAR(static_cast<double>(fused[i]), static_cast<double>(composed[i]), residual_tol<T>() * std::max(1.0, scale))
          << "element " << i;
    }
  }
  // The statistics do not depend on the epilogue.
  EXPECT_TRUE(same_bits(pf.running_mean, pu.running_mean));
  EXPECT_TRUE(same_bits(pf.running_var, pu.running_var));
  EXPECT_TRUE(same_bits(pf.save_mean, pu.save_mean));
  EXPECT_TRUE(same_bits(pf.save_invstd, pu.save_invstd));

  // Backward: relu's backward on the fused output, then the plain bn backward.
  const auto gf = backward(k.shape, k.mode, k.training, pf, x, fused, dy, bn::Activation::relu, with_residual);
  std::vector<T> masked(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) masked[i] = relu_backward(dy[i], fused[i]);
  const auto gu = backward(k.shape, k.mode, k.training, pu, x, bn_out, masked, bn::Activation::identity, false);
  EXPECT_TRUE(same_bits(gf.dx, gu.dx)) << "dx";
  EXPECT_TRUE(same_bits(gf.grad_weight, gu.grad_weight)) << "grad_weight";
  EXPECT_TRUE(same_bits(gf.grad_bias, gu.grad_bias)) << "grad_bias";
  if (with_residual) {
    EXPECT_TRUE(same_bits(gf.dz, masked)) << "dz (the add passes the masked gradient to z)";
  }
  // Some of each: the mask really masks and really passes.
  std::size_t zeros = 0;
  for (const T v : fused) zeros += v == T(0);
  EXPECT_GT(zeros, 0u);
  EXPECT_LT(zeros, fused.size());
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
    for (const bool training : {true, false}) {
      out.push_back({bn::Shape{16, 3}, mode, training});
      out.push_back({bn::Shape{4, 3, 5}, mode, training});
      out.push_back({bn::Shape{3, 4, 3, 5}, mode, training});
      out.push_back({bn::Shape({3, 4, 3, 5}, bn::Layout::channels_last), mode, training});
      out.push_back({bn::Shape{2, 2, 3, 2, 2}, mode, training});
    }
  return out;
}

template <class T>
void all() {
  for (const auto& k : cases())
    for (const bool res : {false, true}) {
      std::ostringstream what;
      what << k.shape << (k.mode == bn::Mode::per_channel ? " per_channel" : " per_activation")
           << (k.training ? " training" : " eval") << (res ? " relu(bn(x) + z)" : " relu(bn(x))");
      SCOPED_TRACE(what.str());
      check_fusion<T>(k, res);
    }
}

}  // namespace

TEST(Fusion, FusedEqualsCompositionDouble) { all<double>(); }

TEST(Fusion, FusedEqualsCompositionFloat) { all<float>(); }

TEST(Fusion, ResidualMayAliasTheOutput) {
  // z may equal y (in-place residual add, as in ResNet blocks).
  const bn::Shape shape{4, 3, 2, 2};
  std::mt19937 rng(2);
  const auto x = random_vector<double>(static_cast<std::size_t>(shape.numel()), rng);
  const auto z = random_vector<double>(x.size(), rng);
  Params<double> p1(3), p2(3);
  const auto want = forward(shape, bn::Mode::per_channel, true, p1, x, z.data(), bn::Activation::relu);
  std::vector<double> y = z;
  bn::ForwardArgs<double> a;
  a.x = x.data();
  a.y = y.data();
  a.residual = y.data();
  a.weight = bn::span<const double>(p2.weight.data(), 3);
  a.bias = bn::span<const double>(p2.bias.data(), 3);
  bn::ForwardConfig c;
  c.activation = bn::Activation::relu;
  bn::forward(bn::cpu{}, shape, a, c);
  EXPECT_TRUE(same_bits(y, want));
}

TEST(Fusion, LayerClassForwardReluAndBackwardRelu) {
  const std::int64_t n = 5, c = 3, h = 2, w = 3;
  const bn::Shape shape{n, c, h, w};
  std::mt19937 rng(4);
  const auto x = random_vector<float>(static_cast<std::size_t>(shape.numel()), rng, 0.3);
  const auto z = random_vector<float>(x.size(), rng);
  const auto dy = random_vector<float>(x.size(), rng);
  bn::BatchNorm2d<float, bn::cpu> fused(c), plain(c);
  std::vector<float> y(x.size()), y0(x.size()), dx(x.size()), dz(x.size()), dx0(x.size());
  fused.forward_relu(x.data(), z.data(), y.data(), shape);
  plain.forward(x.data(), y0.data(), shape);
  std::vector<float> masked(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    EXPECT_NEAR(y[i], relu(y0[i] + z[i]), 2.4e-7f * std::max(1.0f, std::fabs(y0[i]) + std::fabs(z[i])));
    masked[i] = relu_backward(dy[i], y[i]);
  }
  EXPECT_THROW(fused.backward(x.data(), dy.data(), dx.data(), shape), bn::state_error);  // must use backward_relu
  EXPECT_THROW(plain.backward_relu(x.data(), y0.data(), dy.data(), dx.data(), dz.data(), shape), bn::state_error);
  fused.backward_relu(x.data(), y.data(), dy.data(), dx.data(), dz.data(), shape);
  plain.backward(x.data(), masked.data(), dx0.data(), shape);
  EXPECT_TRUE(same_bits(dx, dx0));
  EXPECT_TRUE(same_bits(dz, masked));
  EXPECT_TRUE(same_bits(fused.gradients().grad_weight, plain.gradients().grad_weight));
  EXPECT_TRUE(same_bits(fused.gradients().grad_bias, plain.gradients().grad_bias));
  EXPECT_TRUE(same_bits(fused.state().running_var, plain.state().running_var));
}

// ---- NaN propagation (PyTorch: relu(NaN) = NaN; statistics over a NaN are NaN) ------------

TEST(FusionNaN, ForwardPropagatesNaNNotZero) {
  const bn::Shape shape{4, 3, 2, 2};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::mt19937 rng(8);
  auto x = random_vector<double>(static_cast<std::size_t>(shape.numel()), rng);
  const auto z = random_vector<double>(x.size(), rng);
  const auto clean_x = x;
  x[static_cast<std::size_t>((1 * 3 + 1) * 4 + 2)] = nan;  // n = 1, c = 1, s = 2
  auto channel = [](std::size_t i) { return (i / 4) % 3; };

  // Training: channel 1's statistics are NaN, so its whole output is NaN (not relu'd to 0);
  // the other channels are as without the NaN. Running stats of channel 1 become NaN, as in PyTorch.
  Params<double> p(3), q(3);
  const auto y = forward(shape, bn::Mode::per_channel, true, p, x, z.data(), bn::Activation::relu);
  const auto y_clean = forward(shape, bn::Mode::per_channel, true, q, clean_x, z.data(), bn::Activation::relu);
  for (std::size_t i = 0; i < y.size(); ++i) {
    if (channel(i) == 1) {
      EXPECT_TRUE(std::isnan(y[i])) << i;
    } else {
      EXPECT_EQ(y[i], y_clean[i]) << i;
    }
  }
  EXPECT_TRUE(std::isnan(p.running_mean[1]));
  EXPECT_FALSE(std::isnan(p.running_mean[0]));

  // Eval: only the NaN element is NaN.
  Params<double> e(3);
  const auto ye = forward(shape, bn::Mode::per_channel, false, e, x, static_cast<const double*>(nullptr), bn::Activation::relu);
  for (std::size_t i = 0; i < ye.size(); ++i) EXPECT_EQ(std::isnan(ye[i]), i == 18u) << i;

  // A NaN in the residual poisons only its element, in training and eval.
  auto zn = z;
  zn[5] = nan;
  for (const bool training : {true, false}) {
    Params<double> r(3);
    const auto yr = forward(shape, bn::Mode::per_channel, training, r, clean_x, zn.data(), bn::Activation::relu);
    for (std::size_t i = 0; i < yr.size(); ++i) EXPECT_EQ(std::isnan(yr[i]), i == 5u) << i << " training " << training;
  }
  // -inf through relu is 0, +inf stays +inf (eval, so the statistics stay finite).
  auto zi = z;
  zi[0] = -std::numeric_limits<double>::infinity();
  zi[1] = std::numeric_limits<double>::infinity();
  Params<double> s(3);
  const auto yi = forward(shape, bn::Mode::per_channel, false, s, clean_x, zi.data(), bn::Activation::relu);
  EXPECT_EQ(yi[0], 0.0);
  EXPECT_EQ(yi[1], std::numeric_limits<double>::infinity());
}

TEST(FusionNaN, BackwardPassesGradientWhereOutputIsNaN) {
  // PyTorch's relu backward is threshold_backward(grad, result, 0) = (result <= 0 ? 0 : grad):
  // where the forward output is NaN the comparison is false and the gradient passes
  //   torch: x = tensor([nan, 1., -1.], requires_grad=True); relu(x).backward(ones(3))
  //          -> x.grad == [1., 1., 0.]
  // so backward_relu must equal that relu backward followed by bn's backward, NaN or not.
  // Here y is NaN because the residual is (x stays finite, so nothing else is NaN).
  //
  // KNOWN CORE BUG (left failing on purpose, not weakened): include/batchnorm/detail/cpu/
  // functional.inl, backward(), the `upstream` lambda masks with `!(y > 0) ? 0 : dy`, which
  // zeroes the gradient where y is NaN; PyTorch's mask is `y <= 0 ? 0 : dy`. Got for the
  // element below: dz == 0 and dx == 0 (eval) instead of dz == dy and dx == dy * invstd * weight,
  // and grad_bias without that element's dy.
  const bn::Shape shape{4, 3, 2, 2};
  const std::size_t at = (1 * 3 + 2) * 4 + 1;  // n = 1, c = 2, s = 1
  std::mt19937 rng(8);
  const auto x = random_vector<double>(static_cast<std::size_t>(shape.numel()), rng);
  auto z = random_vector<double>(x.size(), rng);
  const auto dy = random_vector<double>(x.size(), rng);
  z[at] = std::numeric_limits<double>::quiet_NaN();
  for (const bool training : {false, true}) {
    SCOPED_TRACE(training ? "training" : "eval");
    Params<double> p(3), pu(3);
    const auto y = forward(shape, bn::Mode::per_channel, training, p, x, z.data(), bn::Activation::relu);
    ASSERT_TRUE(std::isnan(y[at]));
    const auto g = backward(shape, bn::Mode::per_channel, training, p, x, y, dy, bn::Activation::relu, true);
    std::vector<double> masked(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) masked[i] = relu_backward(dy[i], y[i]);
    ASSERT_EQ(masked[at], dy[at]);
    const auto bn_out = forward(shape, bn::Mode::per_channel, training, pu, x, static_cast<const double*>(nullptr),
                                bn::Activation::identity);
    const auto gu = backward(shape, bn::Mode::per_channel, training, pu, x, bn_out, masked, bn::Activation::identity, false);
    EXPECT_EQ(g.dz[at], dy[at]) << "dz where y is NaN: PyTorch passes the gradient";
    if (!training) {
      EXPECT_DOUBLE_EQ(g.dx[at], dy[at] * static_cast<double>(p.save_invstd[2]) * static_cast<double>(p.weight[2]))
          << "dx where y is NaN (eval: dx = dy * invstd * weight)";
    }
    EXPECT_TRUE(same_bits(g.dx, gu.dx)) << "dx";
    EXPECT_TRUE(same_bits(g.dz, masked)) << "dz";
    EXPECT_TRUE(same_bits(g.grad_weight, gu.grad_weight)) << "grad_weight";
    EXPECT_TRUE(same_bits(g.grad_bias, gu.grad_bias)) << "grad_bias includes dy where y is NaN, as in PyTorch";
  }
}

TEST(FusionNaN, EvalBackwardIsFiniteWhereInputIsNaN) {
  // PyTorch's eval-mode (running statistics) backward is dx = dy * invstd * weight, which
  // does not read x, so a NaN input element gets a finite dx:
  //   torch: bn = BatchNorm2d(3).double().eval(); x[1, 2, 0, 1] = nan; bn(x).backward(dy)
  //          -> x.grad[1, 2, 0, 1] == dy[1, 2, 0, 1] / sqrt(1 + 1e-5)   (finite)
  // (grad_weight of that channel is NaN in PyTorch too: it sums dy * (x - mean) * invstd.)
  //
  // KNOWN CORE BUG (left failing on purpose, not weakened): include/batchnorm/detail/cpu/
  // functional.inl, backward(), last loop: dx = g * dy_scale + xmu * xmu_scale + constant is
  // evaluated with xmu_scale == 0 in eval mode, and NaN * 0 (or inf * 0) is NaN. Expected
  // dx[at] == dy[at] * invstd[2] * weight[2], got NaN. Fix: skip the xmu term when
  // !config.batch_statistics (same for the CUDA kernels if they share the formula).
  const bn::Shape shape{4, 3, 2, 2};
  const std::size_t at = (1 * 3 + 2) * 4 + 1;
  std::mt19937 rng(8);
  auto x = random_vector<double>(static_cast<std::size_t>(shape.numel()), rng);
  const auto dy = random_vector<double>(x.size(), rng);
  x[at] = std::numeric_limits<double>::quiet_NaN();
  for (const auto act : {bn::Activation::identity, bn::Activation::relu}) {
    SCOPED_TRACE(act == bn::Activation::identity ? "bn" : "relu(bn)");
    Params<double> p(3);
    const auto y = forward(shape, bn::Mode::per_channel, false, p, x, static_cast<const double*>(nullptr), act);
    const auto g = backward(shape, bn::Mode::per_channel, false, p, x, y, dy, act, false);
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (i != at) {
        EXPECT_FALSE(std::isnan(g.dx[i])) << i;
      }
    }
    EXPECT_DOUBLE_EQ(g.dx[at], dy[at] * static_cast<double>(p.save_invstd[2]) * static_cast<double>(p.weight[2]))
        << "dx of the NaN input element (eval)";
    EXPECT_TRUE(std::isnan(g.grad_weight[2]));
    EXPECT_FALSE(std::isnan(g.grad_bias[2]));
  }
}
