// The overlap rule (detail::check_overlaps, docs/errors.md "Overlapping buffers"): two
// buffers of one call, at least one written by it, must not share a byte, except the listed
// in-place pairs at exactly the same address. Issue 13 item 4: before the rule, dx over y,
// dz == x, dz == dx, dz over dx or y, and dresidual over dx were accepted and gave wrong
// results; per-feature buffers that alias x or each other were not checked at all.
#include <gtest/gtest.h>

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/phases.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

constexpr std::int64_t N = 4, C = 3, S = 5, numel = N * C * S;
const bn::Shape shape({N, C, S});

std::vector<float> values(std::int64_t n, int seed) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(static_cast<float>(i * (seed + 1) + seed)) * 2.0f + 0.25f;
  return v;
}

/// @p fn must throw batchnorm::invalid_argument for @p argument, naming both buffers, and
/// leave every byte of @p memory as it was.
template <class Fn>
void expect_overlap(Fn&& fn, const std::string& argument, const std::string& other, std::vector<float>& memory) {
  const std::vector<float> before = memory;
  try {
    fn();
    ADD_FAILURE() << argument << " over " << other << ": accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
    const std::string what = e.what();
    EXPECT_EQ(what.rfind(argument + ": expected ", 0), 0u) << what;
    EXPECT_NE(what.find(" " + other + " "), std::string::npos) << what;
  }
  EXPECT_EQ(memory, before) << "a rejected call wrote";
}

/// One arena holding every buffer of a backward call; tests move buffers onto each other.
struct BackwardArena {
  std::vector<float> memory = values(8 * numel + 8 * C, 3);
  float* at(std::int64_t element) { return memory.data() + element; }
  // Disjoint defaults.
  float* x = at(0);
  float* dy = at(numel);
  float* y = at(2 * numel);
  float* dx = at(3 * numel);
  float* dz = at(4 * numel);
  float* mean = at(5 * numel);
  float* invstd = at(5 * numel + C);
  float* gw = at(5 * numel + 2 * C);
  float* gb = at(5 * numel + 3 * C);
  float* weight = at(5 * numel + 4 * C);

  bn::BackwardArgs<float> args() {
    for (std::int64_t c = 0; c < C; ++c) invstd[c] = 1.5f;  // positive, as saved
    bn::BackwardArgs<float> a;
    a.x = x;
    a.dy = dy;
    a.y = y;
    a.dx = dx;
    a.dresidual = dz;
    a.weight = {weight, C};
    a.mean = {mean, C};
    a.invstd = {invstd, C};
    a.grad_weight = {gw, C};
    a.grad_bias = {gb, C};
    return a;
  }
};

bn::BackwardConfig relu_config() {
  bn::BackwardConfig c;
  c.activation = bn::Activation::relu;
  return c;
}

TEST(Overlap, BackwardReluOutputsOverInputsAndEachOther) {
  // The reproducers of issue 13 item 4 (functional API, CPU).
  const bn::BackwardConfig c = relu_config();
  {
    BackwardArena m;  // dx partially over y
    auto a = m.args();
    a.dx = m.y + 1;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "y", m.memory);
  }
  {
    BackwardArena m;  // dx exactly y: not an allowed in-place pair
    auto a = m.args();
    a.dx = m.y;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "y", m.memory);
  }
  {
    BackwardArena m;  // dz == x
    auto a = m.args();
    a.dresidual = m.x;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dresidual", "x", m.memory);
  }
  {
    BackwardArena m;  // dz == dx
    auto a = m.args();
    a.dresidual = m.dx;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "dresidual", m.memory);
  }
  {
    BackwardArena m;  // dz partially over dx
    auto a = m.args();
    a.dresidual = m.dx + 7;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "dresidual", m.memory);
  }
  {
    BackwardArena m;  // dz over y
    auto a = m.args();
    a.dresidual = m.y;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dresidual", "y", m.memory);
  }
  {
    BackwardArena m;  // functional dresidual over dx (identity activation too)
    auto a = m.args();
    a.dresidual = m.dx - 2;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, bn::BackwardConfig{}); }, "dx", "dresidual", m.memory);
  }
}

TEST(Overlap, BackwardPerFeatureBuffers) {
  const bn::BackwardConfig c = relu_config();
  {
    BackwardArena m;  // grad_weight over mean
    auto a = m.args();
    a.grad_weight = {m.mean, C};
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "grad_weight", "mean", m.memory);
  }
  {
    BackwardArena m;  // grad_bias == grad_weight
    auto a = m.args();
    a.grad_bias = {m.gw, C};
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "grad_weight", "grad_bias", m.memory);
  }
  {
    BackwardArena m;  // grad_bias inside dx
    auto a = m.args();
    a.grad_bias = {m.dx + 5, C};
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "grad_bias", m.memory);
  }
  {
    BackwardArena m;  // dx over invstd
    auto a = m.args();
    a.invstd = {m.dx + numel - 1, C};
    for (std::int64_t k = 0; k < C; ++k) m.dx[numel - 1 + k] = 1.0f;
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "dx", "invstd", m.memory);
  }
  {
    BackwardArena m;  // grad_weight inside x
    auto a = m.args();
    a.grad_weight = {m.x + 2, C};
    expect_overlap([&] { bn::backward(bn::cpu{}, shape, a, c); }, "grad_weight", "x", m.memory);
  }
}

TEST(Overlap, AllowedInPlacePairsStillWorkAndMatchOutOfPlace) {
  // dx == dy, dx == x and dresidual == dy are element-wise in place: same results.
  for (int pair = 0; pair < 3; ++pair) {
    BackwardArena ref, alias;
    auto ra = ref.args();
    bn::backward(bn::cpu{}, shape, ra, relu_config());
    auto aa = alias.args();
    if (pair == 0) aa.dx = alias.dy;
    if (pair == 1) aa.dx = alias.x;
    if (pair == 2) aa.dresidual = alias.dy;
    ASSERT_NO_THROW(bn::backward(bn::cpu{}, shape, aa, relu_config())) << pair;
    const float* got_dx = aa.dx;
    const float* got_dz = aa.dresidual;
    for (std::int64_t i = 0; i < numel; ++i) {
      EXPECT_EQ(got_dx[i], ref.dx[i]) << "pair " << pair << " at " << i;
      EXPECT_EQ(got_dz[i], ref.dz[i]) << "pair " << pair << " at " << i;
    }
  }
}

struct ForwardArena {
  std::vector<float> memory = values(4 * numel + 8 * C + 2, 7);
  float* at(std::int64_t element) { return memory.data() + element; }
  float* x = at(0);
  float* z = at(numel);
  float* y = at(2 * numel);
  float* rm = at(3 * numel);
  float* rv = at(3 * numel + C);
  float* sm = at(3 * numel + 2 * C);
  float* si = at(3 * numel + 3 * C);
  float* w = at(3 * numel + 4 * C);
  float* b = at(3 * numel + 5 * C);
  std::int64_t skipped = 0;

  bn::ForwardArgs<float> args() {
    for (std::int64_t c = 0; c < C; ++c) rv[c] = 1.0f;
    bn::ForwardArgs<float> a;
    a.x = x;
    a.residual = z;
    a.y = y;
    a.running_mean = {rm, C};
    a.running_var = {rv, C};
    a.save_mean = {sm, C};
    a.save_invstd = {si, C};
    a.weight = {w, C};
    a.bias = {b, C};
    a.skipped_updates = &skipped;
    return a;
  }
};

TEST(Overlap, ForwardEveryWrittenBufferAgainstEveryOther) {
  bn::ForwardConfig train;
  bn::ForwardConfig eval;
  eval.batch_statistics = false;
  {
    ForwardArena m;  // save_mean == running_mean: the update and the save fight
    auto a = m.args();
    a.save_mean = {m.rm, C};
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, train); }, "running_mean", "save_mean", m.memory);
  }
  {
    ForwardArena m;  // running_var inside x
    auto a = m.args();
    a.running_var = {m.x + 4, C};
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, train); }, "running_var", "x", m.memory);
  }
  {
    ForwardArena m;  // y over weight
    auto a = m.args();
    a.weight = {m.y + numel - 1, C};
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, eval); }, "y", "weight", m.memory);
  }
  {
    ForwardArena m;  // save_invstd inside y
    auto a = m.args();
    a.save_invstd = {m.y + 10, C};
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, eval); }, "y", "save_invstd", m.memory);
  }
  {
    ForwardArena m;  // residual partially over y
    auto a = m.args();
    a.residual = m.y + 1;
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, train); }, "y", "residual", m.memory);
  }
  {
    ForwardArena m;  // skipped_updates counter inside save_mean
    auto a = m.args();
    a.skipped_updates = reinterpret_cast<std::int64_t*>(m.sm);
    expect_overlap([&] { bn::forward(bn::cpu{}, shape, a, train); }, "save_mean", "skipped_updates", m.memory);
  }
  {
    // In eval the running statistics are only read: weight == running_mean is two reads.
    ForwardArena m;
    auto a = m.args();
    a.weight = {m.rm, C};
    EXPECT_NO_THROW(bn::forward(bn::cpu{}, shape, a, eval));
  }
}

TEST(Overlap, WorkspaceTakesPartAsAWrittenBuffer) {
  // The CUDA entry points pass their workspace to the same check (no GPU needed to test it).
  ForwardArena m;
  const auto a = m.args();
  try {
    bn::detail::check_forward(shape, a, bn::ForwardConfig{}, m.x + 8, 64);
    ADD_FAILURE() << "workspace over x accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "workspace") << e.what();
    EXPECT_NE(std::string(e.what()).find("x"), std::string::npos) << e.what();
  }
  BackwardArena b;
  try {
    bn::detail::check_backward(shape, b.args(), relu_config(), b.gw, 4);
    ADD_FAILURE() << "workspace over grad_weight accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("grad_weight"), std::string::npos) << e.what();
  }
  std::vector<unsigned char> separate(64);
  EXPECT_NO_THROW(bn::detail::check_forward(shape, a, bn::ForwardConfig{}, separate.data(), separate.size()));
}

TEST(Overlap, LayerBackwardReluRejectsDzOverX) {
  // The layer API reaches the same rule.
  bn::BatchNorm1d<float, bn::cpu> layer(C);
  std::vector<float> x = values(numel, 1), y(static_cast<std::size_t>(numel)), dy = values(numel, 2),
                     dx(static_cast<std::size_t>(numel));
  layer.forward_relu(x.data(), nullptr, y.data(), shape);
  const auto state = layer.state();
  expect_overlap([&] { layer.backward_relu(x.data(), y.data(), dy.data(), dx.data(), x.data(), shape); }, "dresidual",
                 "x", x);
  EXPECT_EQ(layer.gradients().grad_weight, std::vector<float>(C, 0.0f));
  EXPECT_EQ(layer.state().running_mean, state.running_mean);
}

TEST(Overlap, PhasesUseTheSameRule) {
  namespace phases = bn::phases;
  std::vector<float> memory = values(3 * numel + 2 * C, 5);
  std::vector<double> normalization(static_cast<std::size_t>(phases::normalization_size(C)), 1.0),
      sums(static_cast<std::size_t>(phases::gradient_sums_size(C)), 0.5);
  float* x = memory.data();
  float* y = memory.data() + numel;
  phases::NormalizeArgs<float> n;
  n.x = x;
  n.y = y;
  n.weight = {y + 3, C};  // read while y is written
  n.bias = {memory.data() + 3 * numel, C};
  n.normalization = normalization;
  expect_overlap([&] { phases::normalize(bn::cpu{}, shape, n, phases::ElementwiseConfig{}); }, "y", "weight", memory);
  phases::InputGradientArgs<float> g;
  g.x = x;
  g.dy = y;
  g.dx = memory.data() + 2 * numel;
  g.dresidual = x;  // written over x, which the same call reads
  g.normalization = normalization;
  g.gradient_sums = sums;
  expect_overlap([&] { phases::input_gradient(bn::cpu{}, shape, g, phases::ElementwiseConfig{}); }, "dresidual", "x",
                 memory);
}

}  // namespace
