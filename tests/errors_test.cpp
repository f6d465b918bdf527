// Every error the CPU API can throw: its type, its argument() and what its message says (the
// argument, the value expected and the value given), and the strong guarantee: after the
// throw, state(), gradients(), num_batches_tracked, the saved statistics, the skip counter and
// every output buffer are exactly as they were.
//
// Set BATCHNORM_PRINT_ERRORS=1 to print every message (docs/errors.md quotes them).
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "support/common.hpp"
#include "support/reference.hpp"
#include "support/typed_cases.hpp"

namespace bn = batchnorm;

namespace {

constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_v = std::numeric_limits<double>::infinity();

/// What a failing call must throw.
struct Expect {
  enum Kind { invalid, state } kind = invalid;
  std::string argument;            ///< argument() of an invalid_argument
  std::vector<std::string> parts;  ///< substrings what() must contain
};

Expect invalid(std::string argument, std::vector<std::string> parts) {
  return {Expect::invalid, std::move(argument), std::move(parts)};
}
Expect state(std::vector<std::string> parts) { return {Expect::state, "", std::move(parts)}; }

void note(const char* kind, const std::string& argument, const std::string& what) {
  if (std::getenv("BATCHNORM_PRINT_ERRORS") == nullptr) return;
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::cout << "[error] " << info->test_suite_name() << "." << info->name() << " | " << kind << " | " << argument
            << " | " << what << "\n";
}

void check_parts(const std::string& what, const std::vector<std::string>& parts) {
  for (const auto& p : parts) EXPECT_NE(what.find(p), std::string::npos) << "message lacks \"" << p << "\": " << what;
}

/// Runs @p fn, which must throw what @p e describes. Returns the message.
template <class Fn>
std::string expect_error(Fn&& fn, const Expect& e) {
  try {
    fn();
  } catch (const bn::invalid_argument& ex) {  // before state_error: both are logic_errors
    EXPECT_EQ(e.kind, Expect::invalid) << "got invalid_argument, expected state_error: " << ex.what();
    EXPECT_EQ(ex.argument(), e.argument) << ex.what();
    check_parts(ex.what(), e.parts);
    note("batchnorm::invalid_argument", ex.argument(), ex.what());
    return ex.what();
  } catch (const bn::state_error& ex) {
    EXPECT_EQ(e.kind, Expect::state) << "got state_error, expected invalid_argument: " << ex.what();
    check_parts(ex.what(), e.parts);
    note("batchnorm::state_error", "", ex.what());
    return ex.what();
  } catch (const std::exception& ex) {
    ADD_FAILURE() << "unexpected exception type: " << ex.what();
    return ex.what();
  }
  ADD_FAILURE() << "no exception thrown";
  return {};
}

using bn_test::shape_of;

std::string str(const bn::Shape& s) { return ::testing::PrintToString(s); }

// ---- the layer classes ---------------------------------------------------------------------

template <class C>
class ClassErrors : public ::testing::Test {
 public:
  using T = typename C::value_type;
  using P = bn::param_t<T>;
  static constexpr int D = C::dims;
  using Layer = bn::BatchNorm<T, D, bn::cpu>;
  static constexpr std::int64_t F = 4;

  /// The good shape: (3, 4, 2[, 3[, 2]]).
  static bn::Shape good(bn::Layout layout = bn::Layout::contiguous) { return shape_of<D>(3, F, 2, 3, 2, layout); }

  /// Everything a call could change.
  struct Snapshot {
    bn::State<P> state;
    bn::Gradients<P> grads;
    std::int64_t batches;
    std::vector<P> save_mean, save_invstd;
    std::int64_t skipped;
    bool training;
  };
  static Snapshot snap(const Layer& l) {
    const auto n = l.num_features();
    return {l.state(),
            l.gradients(),
            l.num_batches_tracked(),
            std::vector<P>(l.save_mean_data(), l.save_mean_data() + n),
            std::vector<P>(l.save_invstd_data(), l.save_invstd_data() + n),
            l.nonfinite_batches_skipped(),
            l.is_training()};
  }
  static void expect_same(const Snapshot& a, const Snapshot& b) {
    EXPECT_EQ(a.state.weight, b.state.weight);
    EXPECT_EQ(a.state.bias, b.state.bias);
    EXPECT_EQ(a.state.running_mean, b.state.running_mean);
    EXPECT_EQ(a.state.running_var, b.state.running_var);
    EXPECT_EQ(a.state.num_batches_tracked, b.state.num_batches_tracked);
    EXPECT_EQ(a.grads.grad_weight, b.grads.grad_weight);
    EXPECT_EQ(a.grads.grad_bias, b.grads.grad_bias);
    EXPECT_EQ(a.batches, b.batches);
    EXPECT_EQ(a.save_mean, b.save_mean);
    EXPECT_EQ(a.save_invstd, b.save_invstd);
    EXPECT_EQ(a.skipped, b.skipped);
    EXPECT_EQ(a.training, b.training);
  }

  /// A layer with non-trivial state: random parameters, two training forwards, one backward
  /// on the good shape, left in @p training mode.
  static Layer prepared(const bn::Options& o = {}, bool training = true, std::int64_t features = F) {
    Layer l(features, o);
    bn::State<P> s = l.state();
    for (auto* v : {&s.weight, &s.bias, &s.running_mean, &s.running_var}) {
      for (std::size_t i = 0; i < v->size(); ++i) (*v)[i] = static_cast<P>(0.5 + 0.25 * static_cast<double>(i));
    }
    s.num_batches_tracked = 3;
    l.load_state(s);
    const auto shape = o.mode == bn::Mode::per_channel ? good() : shape_of<D>(3, features / spatial(), 2, 3, 2);
    std::vector<T> x = bnref::cast<T>(bnref::normal(shape.numel(), 1, 0.5, 2.0)), y(x.size());
    l.forward(x.data(), y.data(), shape);
    x = bnref::cast<T>(bnref::normal(shape.numel(), 2, -0.5, 1.0));
    l.forward(x.data(), y.data(), shape);
    const auto dy = bnref::cast<T>(bnref::normal(shape.numel(), 3));
    std::vector<T> dx(x.size());
    l.backward(x.data(), dy.data(), dx.data(), shape);
    l.train(training);
    return l;
  }
  static std::int64_t spatial() { return good().spatial(); }

  /// Runs @p fn on @p layer expecting @p e; then the layer and every buffer in @p outputs
  /// must be unchanged. Returns the message.
  template <class Fn>
  static std::string fails_cleanly(Layer& layer, std::vector<std::vector<T>*> outputs, Fn&& fn, const Expect& e) {
    const Snapshot before = snap(layer);
    std::vector<std::vector<T>> copies;
    for (auto* o : outputs) copies.push_back(*o);
    const std::string what = expect_error(fn, e);
    expect_same(snap(layer), before);
    for (std::size_t i = 0; i < outputs.size(); ++i) EXPECT_EQ(*outputs[i], copies[i]) << "output buffer " << i;
    return what;
  }
  static std::vector<T> sentinel(std::int64_t n) { return std::vector<T>(static_cast<std::size_t>(n), T(-12345)); }
  static std::vector<T> data(std::int64_t n, std::uint64_t seed = 9) { return bnref::cast<T>(bnref::normal(n, seed)); }
};

TYPED_TEST_SUITE(ClassErrors, Cases);

TYPED_TEST(ClassErrors, WrongRankNamesClassExpectedAndGivenRank) {
  using L = typename TestFixture::Layer;
  constexpr int D = TestFixture::D;
  const std::string expected = D == 1 ? "a rank 2 (N, C) or rank 3 (N, C, L) input"
                                      : (D == 2 ? "a rank 4 (N, C, H, W) input" : "a rank 5 (N, C, D, H, W) input");
  for (bool training : {true, false}) {
    auto layer = TestFixture::prepared({}, training);
    for (const bn::Shape& s : {bn::Shape{3, 4}, bn::Shape{3, 4, 5}, bn::Shape{3, 4, 5, 2}, bn::Shape{3, 4, 5, 2, 2}}) {
      const bool ok = D == 1 ? (s.rank() == 2 || s.rank() == 3) : s.rank() == D + 2;
      if (ok) continue;
      auto x = TestFixture::data(s.numel());
      auto y = TestFixture::sentinel(s.numel());
      TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward(x.data(), y.data(), s); },
                                 invalid("shape", {L::name() + ": expected " + expected,
                                                   "got rank " + std::to_string(s.rank()), str(s)}));
      TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward_relu(x.data(), nullptr, y.data(), s); },
                                 invalid("shape", {L::name(), "got rank " + std::to_string(s.rank())}));
    }
  }
}

TYPED_TEST(ClassErrors, ChannelCountOtherThanNumFeaturesNamesBoth) {
  using L = typename TestFixture::Layer;
  constexpr int D = TestFixture::D;
  for (bool training : {true, false}) {
    auto layer = TestFixture::prepared({}, training);
    for (std::int64_t C : {3, 5, 1}) {
      for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
        const auto s = shape_of<D>(2, C, 3, 2, 2, layout);
        auto x = TestFixture::data(s.numel());
        auto y = TestFixture::sentinel(s.numel());
        TestFixture::fails_cleanly(
            layer, {&y}, [&] { layer.forward(x.data(), y.data(), s); },
            invalid("shape", {L::name(), "expected C = 4", "got " + std::to_string(C), str(s)}));
      }
    }
  }
}

TYPED_TEST(ClassErrors, PerActivationFeatureMismatchNamesBoth) {
  using L = typename TestFixture::Layer;
  constexpr int D = TestFixture::D;
  bn::Options o;
  o.mode = bn::Mode::per_activation;
  const std::int64_t S = TestFixture::spatial();
  auto layer = TestFixture::prepared(o, true, 4 * S);
  // Right C with another spatial size; C = num_features (what per_channel would want).
  for (const auto& s : {shape_of<D>(3, 4, 3, 3, 2), shape_of<D>(3, 4 * S, 2, 3, 2)}) {
    auto x = TestFixture::data(s.numel());
    auto y = TestFixture::sentinel(s.numel());
    const std::string given = std::to_string(s.channels()) + " * " + std::to_string(s.spatial()) + " = " +
                              std::to_string(s.channels() * s.spatial());
    TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward(x.data(), y.data(), s); },
                               invalid("shape", {L::name(), "expected C * spatial = " + std::to_string(4 * S),
                                                 "per_activation", "got " + given, str(s)}));
  }
}

TYPED_TEST(ClassErrors, OneValuePerChannelInTraining) {
  constexpr int D = TestFixture::D;
  const auto s = shape_of<D>(1, 4, 1, 1, 1);
  auto layer = TestFixture::prepared();
  auto x = TestFixture::data(s.numel());
  auto y = TestFixture::sentinel(s.numel());
  const Expect e = invalid("shape", {"expected more than 1 value per channel when training", str(s)});
  TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward(x.data(), y.data(), s); }, e);
  TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward_relu(x.data(), nullptr, y.data(), s); }, e);
  if constexpr (D == 1) {
    const bn::Shape r2{1, 4};
    TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward(x.data(), y.data(), r2); },
                               invalid("shape", {"expected more than 1 value per channel when training", "(1, 4)"}));
  }
  // Not tracking: eval normalizes with batch statistics, so eval refuses it too (as PyTorch).
  bn::Options o;
  o.track_running_stats = false;
  auto untracked = TestFixture::prepared(o, false);
  TestFixture::fails_cleanly(untracked, {&y}, [&] { untracked.forward(x.data(), y.data(), s); }, e);
  // per_activation: N = 1 is one value per feature whatever the spatial size.
  bn::Options pa;
  pa.mode = bn::Mode::per_activation;
  auto act = TestFixture::prepared(pa, true, 4 * TestFixture::spatial());
  const auto s1 = shape_of<D>(1, 4, 2, 3, 2);
  auto x1 = TestFixture::data(s1.numel());
  auto y1 = TestFixture::sentinel(s1.numel());
  TestFixture::fails_cleanly(act, {&y1}, [&] { act.forward(x1.data(), y1.data(), s1); },
                             invalid("shape", {"expected more than 1 value per channel when training", str(s1)}));
}

TYPED_TEST(ClassErrors, NullPointers) {
  using T = typename TestFixture::T;
  const auto s = TestFixture::good();
  const std::string n = std::to_string(s.numel());
  for (bool training : {true, false}) {
    auto layer = TestFixture::prepared({}, training);
    auto x = TestFixture::data(s.numel());
    auto y = TestFixture::sentinel(s.numel());
    TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward(nullptr, y.data(), s); },
                               invalid("x", {"x: expected a non-null pointer to " + n + " elements, got nullptr"}));
    TestFixture::fails_cleanly(layer, {}, [&] { layer.forward(x.data(), nullptr, s); },
                               invalid("y", {"y: expected a non-null pointer to " + n + " elements, got nullptr"}));
    TestFixture::fails_cleanly(layer, {&y}, [&] { layer.forward_relu(nullptr, nullptr, y.data(), s); },
                               invalid("x", {"x: expected a non-null pointer"}));
  }
  auto layer = TestFixture::prepared();
  auto x = TestFixture::data(s.numel());
  auto dy = TestFixture::data(s.numel(), 4);
  auto dx = TestFixture::sentinel(s.numel());
  TestFixture::fails_cleanly(layer, {&dx}, [&] { layer.backward(nullptr, dy.data(), dx.data(), s); },
                             invalid("x", {"x: expected a non-null pointer to " + n + " elements, got nullptr"}));
  TestFixture::fails_cleanly(layer, {&dx}, [&] { layer.backward(x.data(), nullptr, dx.data(), s); },
                             invalid("dy", {"dy: expected a non-null pointer to " + n + " elements, got nullptr"}));
  // A fused forward, then backward_relu without y (the relu mask).
  auto y = TestFixture::sentinel(s.numel());
  layer.forward_relu(x.data(), nullptr, y.data(), s);
  auto dz = TestFixture::sentinel(s.numel());
  TestFixture::fails_cleanly(
      layer, {&dx, &dz}, [&] { layer.backward_relu(x.data(), nullptr, dy.data(), dx.data(), dz.data(), s); },
      invalid("y", {"y: expected a non-null pointer to " + n + " elements, got nullptr"}));
  // dx = nullptr is allowed: parameter gradients only.
  std::vector<T> y2(y);
  EXPECT_NO_THROW(layer.backward_relu(x.data(), y2.data(), dy.data(), nullptr, nullptr, s));
}

TYPED_TEST(ClassErrors, PartialOverlapIsRejectedExactAliasingIsNot) {
  using T = typename TestFixture::T;
  const auto s = TestFixture::good();
  const auto n = s.numel();
  auto layer = TestFixture::prepared();
  // One buffer of 2n + 2 elements; x at +1.
  std::vector<T> buf(static_cast<std::size_t>(2 * n + 2));
  const auto xs = TestFixture::data(n);
  std::copy(xs.begin(), xs.end(), buf.begin() + 1);
  T* x = buf.data() + 1;
  const Expect e = invalid("y", {"y: expected the same address as x (in place) or no overlap with it",
                                 "got a partial overlap"});
  for (std::int64_t shift : {std::int64_t{1}, std::int64_t{-1}, n - 1}) {
    auto before = buf;
    TestFixture::fails_cleanly(layer, {&buf}, [&] { layer.forward(x, x + shift, s); }, e);
    TestFixture::fails_cleanly(layer, {&buf}, [&] { layer.forward_relu(x, nullptr, x + shift, s); }, e);
  }
  // Adjacent (no overlap) and exact aliasing are fine.
  EXPECT_NO_THROW(layer.forward(x, x + n, s));
  EXPECT_NO_THROW(layer.forward(x, x, s));

  // forward_relu: z may equal y, must not partially overlap it.
  std::vector<T> xz = TestFixture::data(n), zy(static_cast<std::size_t>(n + 1), T(0.5));
  TestFixture::fails_cleanly(layer, {&zy}, [&] { layer.forward_relu(xz.data(), zy.data() + 1, zy.data(), s); },
                             invalid("y", {"y: expected the same address as residual (in place) or no overlap",
                                           "got a partial overlap"}));
  EXPECT_NO_THROW(layer.forward_relu(xz.data(), zy.data(), zy.data(), s));

  // backward: dx may equal dy (or x); partial overlap with either is an error.
  layer.forward(xz.data(), zy.data(), s);
  std::vector<T> g(static_cast<std::size_t>(n + 1));
  const auto dys = TestFixture::data(n, 5);
  std::copy(dys.begin(), dys.end(), g.begin());
  const Expect ed = invalid("dx", {"dx: expected the same address as dy (in place) or no overlap with it",
                                   "got a partial overlap"});
  TestFixture::fails_cleanly(layer, {&g}, [&] { layer.backward(xz.data(), g.data(), g.data() + 1, s); }, ed);
  std::vector<T> xb(static_cast<std::size_t>(n + 1));
  std::copy(xz.begin(), xz.end(), xb.begin() + 1);
  TestFixture::fails_cleanly(layer, {&xb}, [&] { layer.backward(xb.data() + 1, dys.data(), xb.data(), s); },
                             invalid("dx", {"dx: expected the same address as x (in place) or no overlap with it",
                                            "got a partial overlap"}));
  EXPECT_NO_THROW(layer.backward(xz.data(), g.data(), g.data(), s));

  // backward_relu: dz may equal dy, must not partially overlap it.
  std::vector<T> yr(static_cast<std::size_t>(n));
  layer.forward_relu(xz.data(), nullptr, yr.data(), s);
  std::vector<T> d(static_cast<std::size_t>(n + 1), T(0.25)), dxr = TestFixture::sentinel(n);
  TestFixture::fails_cleanly(
      layer, {&d, &dxr}, [&] { layer.backward_relu(xz.data(), yr.data(), d.data(), dxr.data(), d.data() + 1, s); },
      invalid("dresidual", {"dresidual: expected the same address as dy (in place) or no overlap with it",
                            "partial overlap"}));
}

TYPED_TEST(ClassErrors, ConstructorRejectsNumFeaturesEpsMomentum) {
  using L = typename TestFixture::Layer;
  for (std::int64_t n : {std::int64_t{0}, std::int64_t{-3}}) {
    expect_error([&] { L l(n); },
                 invalid("num_features", {L::name() + ": num_features: expected a value >= 1, got " + std::to_string(n)}));
  }
  for (double eps : {0.0, -1e-5, nan_v, inf_v, -inf_v}) {
    bn::Options o;
    o.eps = eps;
    const auto what = expect_error([&] { L l(4, o); }, invalid("eps", {"eps: expected a finite value > 0, got "}));
    std::ostringstream given;
    given << "got " << eps;
    EXPECT_NE(what.find(given.str()), std::string::npos) << what;
  }
  for (double m : {-0.1, 1.5, nan_v, inf_v, -1e-300}) {
    bn::Options o;
    o.momentum = m;
    expect_error([&] { L l(4, o); }, invalid("momentum", {"momentum: expected a value in [0, 1], got "}));
  }
  // The edges are valid.
  bn::Options edge;
  edge.momentum = 0.0;
  edge.eps = std::numeric_limits<double>::denorm_min();
  EXPECT_NO_THROW(L(1, edge));
  edge.momentum = 1.0;
  EXPECT_NO_THROW(L(1, edge));
}

TYPED_TEST(ClassErrors, BackwardBeforeAnyForward) {
  using L = typename TestFixture::Layer;
  const auto s = TestFixture::good();
  L layer(4);
  auto x = TestFixture::data(s.numel());
  auto dy = TestFixture::data(s.numel(), 2);
  auto dx = TestFixture::sentinel(s.numel());
  auto dz = TestFixture::sentinel(s.numel());
  const Expect e = state({L::name() + "::backward: no forward to differentiate", "call forward first"});
  TestFixture::fails_cleanly(layer, {&dx}, [&] { layer.backward(x.data(), dy.data(), dx.data(), s); }, e);
  TestFixture::fails_cleanly(
      layer, {&dx, &dz}, [&] { layer.backward_relu(x.data(), x.data(), dy.data(), dx.data(), dz.data(), s); }, e);
  // load_state forgets the saved statistics: backward is refused again.
  auto trained = TestFixture::prepared();
  trained.load_state(trained.state());
  TestFixture::fails_cleanly(trained, {&dx}, [&] { trained.backward(x.data(), dy.data(), dx.data(), s); }, e);
}

TYPED_TEST(ClassErrors, BackwardWithAnotherShapeThanTheForward) {
  using L = typename TestFixture::Layer;
  constexpr int D = TestFixture::D;
  auto layer = TestFixture::prepared();  // last forward: good()
  const auto good = TestFixture::good();
  for (const auto& s : {shape_of<D>(2, 4, 2, 3, 2), shape_of<D>(3, 4, 2, 3, 2, bn::Layout::channels_last),
                        shape_of<D>(3, 4, 3, 2, 2)}) {
    auto x = TestFixture::data(s.numel());
    auto dy = TestFixture::data(s.numel(), 2);
    auto dx = TestFixture::sentinel(s.numel());
    TestFixture::fails_cleanly(layer, {&dx}, [&] { layer.backward(x.data(), dy.data(), dx.data(), s); },
                               invalid("shape", {L::name() + "::backward: expected the shape of the last forward " +
                                                     str(good),
                                                 "got " + str(s)}));
  }
}

TYPED_TEST(ClassErrors, BackwardFlavourMustMatchTheForward) {
  using L = typename TestFixture::Layer;
  const auto s = TestFixture::good();
  auto layer = TestFixture::prepared();  // last forward not fused
  auto x = TestFixture::data(s.numel());
  auto y = TestFixture::data(s.numel(), 3);
  auto dy = TestFixture::data(s.numel(), 2);
  auto dx = TestFixture::sentinel(s.numel());
  auto dz = TestFixture::sentinel(s.numel());
  TestFixture::fails_cleanly(
      layer, {&dx, &dz}, [&] { layer.backward_relu(x.data(), y.data(), dy.data(), dx.data(), dz.data(), s); },
      state({L::name() + "::backward_relu: the last forward was not fused with relu; call backward"}));
  layer.forward_relu(x.data(), nullptr, y.data(), s);
  TestFixture::fails_cleanly(layer, {&dx}, [&] { layer.backward(x.data(), dy.data(), dx.data(), s); },
                             state({L::name() + "::backward: the last forward was fused with relu; call backward_relu"}));
}

TYPED_TEST(ClassErrors, LoadStateWithWrongSizesOrNegativeCount) {
  using P = typename TestFixture::P;
  const auto s = TestFixture::good();
  for (bool affine : {true, false}) {
    for (bool track : {true, false}) {
      bn::Options o;
      o.affine = affine;
      o.track_running_stats = track;
      auto layer = TestFixture::prepared(o);
      const auto good_state = layer.state();
      struct Member {
        const char* name;
        std::vector<P> bn::State<P>::*ptr;
        bool present;
      };
      for (const Member m : {Member{"weight", &bn::State<P>::weight, affine}, Member{"bias", &bn::State<P>::bias, affine},
                             Member{"running_mean", &bn::State<P>::running_mean, track},
                             Member{"running_var", &bn::State<P>::running_var, track}}) {
        for (std::size_t size : {std::size_t{0}, std::size_t{3}, std::size_t{5}}) {
          const std::size_t expected = m.present ? 4 : 0;
          if (size == expected) continue;
          auto bad = good_state;
          (bad.*m.ptr).assign(size, P(2));
          std::vector<std::string> parts = {std::string("load_state: ") + m.name + ": expected " +
                                                std::to_string(expected) + " elements",
                                            "got " + std::to_string(size)};
          if (!m.present) parts.push_back("(the layer has no such tensor)");
          TestFixture::fails_cleanly(layer, {}, [&] { layer.load_state(bad); }, invalid(m.name, parts));
        }
      }
      auto bad = good_state;
      bad.num_batches_tracked = -1;
      TestFixture::fails_cleanly(
          layer, {}, [&] { layer.load_state(bad); },
          invalid("num_batches_tracked", {"load_state: num_batches_tracked: expected a value >= 0, got -1"}));
      // The failed load_state did not forget the saved statistics: backward still works.
      auto x = TestFixture::data(s.numel());
      auto dy = TestFixture::data(s.numel(), 2);
      auto dx = TestFixture::sentinel(s.numel());
      EXPECT_NO_THROW(layer.backward(x.data(), dy.data(), dx.data(), s));
    }
  }
}

// num_batches_tracked = INT64_MAX is a valid value to load; the next training forward must not
// overflow it (signed overflow is undefined behaviour): it may throw a typed error and change
// nothing, or saturate, but it must never leave a negative count (which load_state rejects).
TYPED_TEST(ClassErrors, MaximalBatchCountDoesNotOverflow) {
  using T = typename TestFixture::T;
  const auto s = TestFixture::good();
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>()}) {
    bn::Options o;
    o.momentum = momentum;
    typename TestFixture::Layer layer(4, o);
    auto st = layer.state();
    st.num_batches_tracked = std::numeric_limits<std::int64_t>::max();
    try {
      layer.load_state(st);
    } catch (const bn::invalid_argument&) {
      continue;  // refusing the value is an answer too
    }
    auto x = TestFixture::data(s.numel());
    std::vector<T> y = TestFixture::sentinel(s.numel());
    try {
      // (Regression: forward_impl once computed num_batches_tracked_ + 1 unchecked: signed
      // overflow, wrapping to INT64_MIN, and with momentum = None the factor 1 / INT64_MIN was
      // refused as "exponential_average_factor". It saturates now.)
      layer.forward(x.data(), y.data(), s);
    } catch (const bn::state_error&) {
      EXPECT_EQ(layer.num_batches_tracked(), std::numeric_limits<std::int64_t>::max());
      continue;
    } catch (const bn::invalid_argument& e) {
      ADD_FAILURE() << "a valid call on a valid state was refused as a bad argument: " << e.what();
      EXPECT_EQ(layer.num_batches_tracked(), std::numeric_limits<std::int64_t>::max());
      continue;
    }
    EXPECT_GE(layer.num_batches_tracked(), 0);
    EXPECT_NO_THROW(layer.load_state(layer.state()));
  }
}

// ---- Shape -------------------------------------------------------------------------------

TEST(ShapeErrors, BadRank) {
  expect_error([] { bn::Shape s{7}; }, invalid("shape", {"shape: expected 2 to 5 extents (N, C, spatial...), got 1"}));
  expect_error([] { bn::Shape s{1, 2, 3, 4, 5, 6}; },
               invalid("shape", {"shape: expected 2 to 5 extents (N, C, spatial...), got 6"}));
  expect_error([] { bn::Shape s({}, bn::Layout::channels_last); }, invalid("shape", {"expected 2 to 5 extents", "got 0"}));
}

TEST(ShapeErrors, NegativeExtent) {
  expect_error([] { bn::Shape s{2, -1}; }, invalid("shape", {"shape: extent 1 must be >= 0, got -1"}));
  expect_error([] { bn::Shape s{-5, 3, 4}; }, invalid("shape", {"extent 0 must be >= 0, got -5"}));
  expect_error([] { bn::Shape s{2, 3, 4, 5, std::numeric_limits<std::int64_t>::min()}; },
               invalid("shape", {"extent 4 must be >= 0, got -9223372036854775808"}));
}

TEST(ShapeErrors, ElementCountOverflow) {
  const std::int64_t big = std::int64_t{1} << 32;
  expect_error([&] { bn::Shape s{big, big}; }, invalid("shape", {"shape: element count overflows int64 at extent 1",
                                                                "(4294967296)"}));
  expect_error([&] { bn::Shape s{2, 3, big, big, 2}; }, invalid("shape", {"overflows int64 at extent 3"}));
  EXPECT_NO_THROW((bn::Shape{std::int64_t{1} << 31, std::int64_t{1} << 31}));
  EXPECT_NO_THROW((bn::Shape{std::numeric_limits<std::int64_t>::max(), 1}));
}

// A zero extent makes numel() 0, but spatial() and C · spatial (per_activation's feature
// count) are still computed from the other extents and must not overflow either.
TEST(ShapeErrors, ZeroSizeShapeWhoseOtherExtentsOverflow) {
  const std::int64_t big = std::int64_t{1} << 40;
  // (Regression: the overflow check once stopped at the first zero extent, so (0, 3, 2^40, 2^40)
  // was accepted and spatial() overflowed.)
  expect_error([&] { bn::Shape s{0, 3, big, big}; }, invalid("shape", {"overflows int64"}));
  // C · spatial = 2^80 (per_activation's feature count) with N = 0.
  expect_error([&] { bn::Shape s{0, big, big}; }, invalid("shape", {"overflows int64"}));
}

// ---- the functional API ------------------------------------------------------------------

template <class T>
class FunctionalErrors : public ::testing::Test {
 public:
  using P = bn::param_t<T>;
  static constexpr std::int64_t C = 4;
  bn::Shape shape{3, C, 5};
  std::vector<T> x = bnref::cast<T>(bnref::normal(60, 1, 1.0, 2.0)), y = std::vector<T>(60, T(-12345));
  std::vector<P> weight = std::vector<P>(C, P(1.5)), bias = std::vector<P>(C, P(0.5));
  std::vector<P> rmean = std::vector<P>(C, P(0.25)), rvar = std::vector<P>(C, P(2));
  std::vector<P> smean = std::vector<P>(C, P(-7)), sinvstd = std::vector<P>(C, P(-8));
  std::int64_t skipped = 0;

  bn::ForwardArgs<T> args() {
    bn::ForwardArgs<T> a;
    a.x = x.data();
    a.y = y.data();
    a.weight = weight;
    a.bias = bias;
    a.running_mean = rmean;
    a.running_var = rvar;
    a.save_mean = smean;
    a.save_invstd = sinvstd;
    a.skipped_updates = &skipped;
    return a;
  }
  /// Calls forward, which must fail as @p e says and leave every buffer as it was.
  void fails(const bn::ForwardArgs<T>& a, const bn::ForwardConfig& c, const Expect& e, const bn::Shape* s = nullptr) {
    const auto x0 = x, y0 = y;
    const auto w0 = weight, b0 = bias, m0 = rmean, v0 = rvar, sm0 = smean, si0 = sinvstd;
    const auto k0 = skipped;
    expect_error([&] { bn::forward(bn::cpu{}, s ? *s : shape, a, c); }, e);
    EXPECT_EQ(x, x0);
    EXPECT_EQ(y, y0);
    EXPECT_EQ(weight, w0);
    EXPECT_EQ(bias, b0);
    EXPECT_EQ(rmean, m0);
    EXPECT_EQ(rvar, v0);
    EXPECT_EQ(smean, sm0);
    EXPECT_EQ(sinvstd, si0);
    EXPECT_EQ(skipped, k0);
  }
};

using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(FunctionalErrors, Types);

TYPED_TEST(FunctionalErrors, ForwardWeightWithoutBiasAndStatsWithoutPartner) {
  using P = typename TestFixture::P;
  bn::ForwardConfig c;
  auto a = this->args();
  a.bias = {};
  this->fails(a, c, invalid("bias", {"weight and bias: expected both or neither, got only weight"}));
  a = this->args();
  a.weight = {};
  this->fails(a, c, invalid("weight", {"weight and bias: expected both or neither, got only bias"}));
  a = this->args();
  a.running_var = {};
  this->fails(a, c, invalid("running_var", {"running_mean and running_var: expected both or neither, got only running_mean"}));
  a = this->args();
  a.running_mean = bn::span<P>();
  this->fails(a, c, invalid("running_mean", {"running_mean and running_var: expected both or neither, got only running_var"}));
}

TYPED_TEST(FunctionalErrors, ForwardBuffersOfTheWrongSize) {
  using P = typename TestFixture::P;
  std::vector<P> short3(3, P(1)), long5(5, P(1));
  for (bool batch_statistics : {true, false}) {
    bn::ForwardConfig c;
    c.batch_statistics = batch_statistics;
    for (auto* v : {&short3, &long5}) {
      const std::string got = "got " + std::to_string(v->size());
      auto a = this->args();
      a.weight = bn::span<const P>(v->data(), static_cast<std::int64_t>(v->size()));
      this->fails(a, c, invalid("weight", {"weight: expected 4 elements (num_features), " + got}));
      a = this->args();
      a.bias = bn::span<const P>(v->data(), static_cast<std::int64_t>(v->size()));
      this->fails(a, c, invalid("bias", {"bias: expected 4 elements (num_features), " + got}));
      a = this->args();
      a.running_mean = *v;
      this->fails(a, c, invalid("running_mean", {"running_mean: expected 4 elements (num_features), " + got}));
      a = this->args();
      a.running_var = *v;
      this->fails(a, c, invalid("running_var", {"running_var: expected 4 elements (num_features), " + got}));
      a = this->args();
      a.save_mean = *v;
      this->fails(a, c, invalid("save_mean", {"save_mean: expected 4 elements (num_features), " + got}));
      a = this->args();
      a.save_invstd = *v;
      this->fails(a, c, invalid("save_invstd", {"save_invstd: expected 4 elements (num_features), " + got}));
    }
  }
  // per_activation: the count is C · spatial = 20.
  bn::ForwardConfig pa;
  pa.mode = bn::Mode::per_activation;
  this->fails(this->args(), pa, invalid("weight", {"weight: expected 20 elements (num_features), got 4"}));
  auto a = this->args();
  std::vector<P> w20(20, P(1)), b20(20, P(0));
  a.weight = w20;
  a.bias = b20;
  this->fails(a, pa, invalid("running_mean", {"running_mean: expected 20 elements (num_features), got 4"}));
}

TYPED_TEST(FunctionalErrors, ForwardEvalWithoutRunningStats) {
  bn::ForwardConfig c;
  c.batch_statistics = false;
  auto a = this->args();
  a.running_mean = {};
  a.running_var = {};
  this->fails(a, c, invalid("running_mean", {"running_mean: expected a buffer of 4 elements, got nullptr"}));
}

TYPED_TEST(FunctionalErrors, ForwardEpsAndFactor) {
  for (double eps : {0.0, -1.0, nan_v, inf_v}) {
    bn::ForwardConfig c;
    c.eps = eps;
    this->fails(this->args(), c, invalid("eps", {"eps: expected a finite value > 0, got"}));
  }
  for (double f : {-0.5, 1.0000001, nan_v, -inf_v}) {
    bn::ForwardConfig c;
    c.exponential_average_factor = f;
    this->fails(this->args(), c, invalid("exponential_average_factor",
                                         {"exponential_average_factor: expected a value in [0, 1], got"}));
  }
}

TYPED_TEST(FunctionalErrors, ForwardPointersAndOverlap) {
  using T = TypeParam;
  bn::ForwardConfig c;
  auto a = this->args();
  a.x = nullptr;
  this->fails(a, c, invalid("x", {"x: expected a non-null pointer to 60 elements, got nullptr"}));
  a = this->args();
  a.y = nullptr;
  this->fails(a, c, invalid("y", {"y: expected a non-null pointer to 60 elements, got nullptr"}));
  std::vector<T> buf(61, T(3));
  a = this->args();
  a.x = buf.data();
  a.y = buf.data() + 1;
  expect_error([&] { bn::forward(bn::cpu{}, this->shape, a, c); }, invalid("y", {"partial overlap"}));
  EXPECT_EQ(buf, std::vector<T>(61, T(3)));
  a = this->args();
  std::vector<T> z(61, T(1));
  a.y = z.data() + 1;
  a.residual = z.data();
  expect_error([&] { bn::forward(bn::cpu{}, this->shape, a, c); }, invalid("y", {"y: expected the same address as residual", "partial overlap"}));
  EXPECT_EQ(z, std::vector<T>(61, T(1)));
  EXPECT_EQ(this->rmean, std::vector<typename TestFixture::P>(4, 0.25));
}

TYPED_TEST(FunctionalErrors, ForwardOneValuePerFeatureWithBatchStatistics) {
  bn::ForwardConfig c;
  const bn::Shape one{1, 4};
  this->fails(this->args(), c,
              invalid("shape", {"shape: expected more than 1 value per channel when training, got input size (1, 4)"}),
              &one);
  c.batch_statistics = false;  // running statistics: fine
  EXPECT_NO_THROW(bn::forward(bn::cpu{}, one, this->args(), c));
}

TYPED_TEST(FunctionalErrors, BackwardArguments) {
  using T = TypeParam;
  using P = typename TestFixture::P;
  const bn::Shape s = this->shape;
  std::vector<T> dy = bnref::cast<T>(bnref::normal(60, 2)), dx(60, T(-1)), dz(60, T(-2));
  std::vector<P> mean(4, P(0.5)), invstd(4, P(2)), gw(4, P(9)), gb(4, P(8)), w(4, P(1));
  auto args = [&] {
    bn::BackwardArgs<T> a;
    a.x = this->x.data();
    a.dy = dy.data();
    a.dx = dx.data();
    a.y = this->x.data();
    a.dresidual = dz.data();
    a.weight = w;
    a.mean = mean;
    a.invstd = invstd;
    a.grad_weight = gw;
    a.grad_bias = gb;
    return a;
  };
  auto fails = [&](const bn::BackwardArgs<T>& a, const bn::BackwardConfig& c, const Expect& e) {
    const auto dx0 = dx, dz0 = dz;
    const auto gw0 = gw, gb0 = gb;
    expect_error([&] { bn::backward(bn::cpu{}, s, a, c); }, e);
    EXPECT_EQ(dx, dx0);
    EXPECT_EQ(dz, dz0);
    EXPECT_EQ(gw, gw0);
    EXPECT_EQ(gb, gb0);
  };
  bn::BackwardConfig c;
  auto a = args();
  a.x = nullptr;
  fails(a, c, invalid("x", {"x: expected a non-null pointer to 60 elements, got nullptr"}));
  a = args();
  a.dy = nullptr;
  fails(a, c, invalid("dy", {"dy: expected a non-null pointer to 60 elements, got nullptr"}));
  bn::BackwardConfig relu;
  relu.activation = bn::Activation::relu;
  a = args();
  a.y = nullptr;
  fails(a, relu, invalid("y", {"y: expected a non-null pointer to 60 elements, got nullptr"}));
  a = args();
  a.mean = {};
  fails(a, c, invalid("mean", {"mean: expected a buffer of 4 elements, got nullptr"}));
  a = args();
  a.invstd = {};
  fails(a, c, invalid("invstd", {"invstd: expected a buffer of 4 elements, got nullptr"}));
  std::vector<P> three(3, P(1));
  a = args();
  a.mean = bn::span<const P>(three.data(), 3);
  fails(a, c, invalid("mean", {"mean: expected 4 elements (num_features), got 3"}));
  a = args();
  a.invstd = bn::span<const P>(three.data(), 3);
  fails(a, c, invalid("invstd", {"invstd: expected 4 elements (num_features), got 3"}));
  a = args();
  a.weight = bn::span<const P>(three.data(), 3);
  fails(a, c, invalid("weight", {"weight: expected 4 elements (num_features), got 3"}));
  a = args();
  a.grad_weight = three;
  fails(a, c, invalid("grad_weight", {"grad_weight: expected 4 elements (num_features), got 3"}));
  a = args();
  a.grad_bias = three;
  fails(a, c, invalid("grad_bias", {"grad_bias: expected 4 elements (num_features), got 3"}));
  bn::BackwardConfig pa;
  pa.mode = bn::Mode::per_activation;
  fails(args(), pa, invalid("weight", {"weight: expected 20 elements (num_features), got 4"}));
  a = args();
  a.weight = {};
  fails(a, pa, invalid("mean", {"mean: expected 20 elements (num_features), got 4"}));
  // overlaps
  std::vector<T> g(61, T(1));
  a = args();
  a.dy = g.data();
  a.dx = g.data() + 1;
  expect_error([&] { bn::backward(bn::cpu{}, s, a, c); }, invalid("dx", {"partial overlap"}));
  a = args();
  a.dy = g.data() + 1;
  a.dresidual = g.data();
  expect_error([&] { bn::backward(bn::cpu{}, s, a, c); }, invalid("dresidual", {"partial overlap"}));
  EXPECT_EQ(g, std::vector<T>(61, T(1)));
  EXPECT_EQ(gw, std::vector<P>(4, P(9)));
}

}  // namespace
