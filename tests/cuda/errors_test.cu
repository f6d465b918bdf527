// The errors of tests/errors_test.cpp on the CUDA backend: every scenario runs on
// `BatchNorm<T, D, batchnorm::cpu>` (host memory) and on `BatchNorm<T, D, batchnorm::cuda>`
// (device memory, its own stream); both must throw the same type with the same argument() and
// the same message, and leave the layer (state, gradients, counters, saved statistics, skip
// counter) and every output buffer exactly as it was: on the GPU nothing may have been launched
// that writes (no partially applied running-stat update). Plus the CUDA-only errors: host
// pointers given to the device backend, and a missing or too small functional workspace.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <batchnorm/cuda.cuh>

#include "support/device_memory.cuh"
#include "support/common.hpp"
#include "support/reference.hpp"
#include "support/typed_cases.hpp"

namespace bn = batchnorm;

namespace {

/// What a call threw (type "none" when it returned).
struct Outcome {
  std::string type = "none", argument, what;
  bool operator==(const Outcome& o) const { return type == o.type && argument == o.argument && what == o.what; }
};
std::ostream& operator<<(std::ostream& os, const Outcome& o) {
  return os << o.type << " [" << o.argument << "] " << o.what;
}

template <class Fn>
Outcome outcome_of(Fn&& fn) {
  Outcome o;
  try {
    fn();
  } catch (const bn::invalid_argument& e) {
    o = {"invalid_argument", e.argument(), e.what()};
  } catch (const bn::state_error& e) {
    o = {"state_error", "", e.what()};
  } catch (const bn::cuda_error& e) {
    o = {"cuda_error", "", e.what()};
  } catch (const std::exception& e) {
    o = {"other", "", e.what()};
  }
  return o;
}

// ---- memory of each backend ---------------------------------------------------------------

/// A backend's memory for these tests: memory_policy plus reads of raw pointers and a stream.
template <class Backend>
struct Mem;

template <>
struct Mem<bn::cpu> : bn_test::memory_policy<bn::cpu> {
  template <class E>
  static std::vector<E> read(const E* p, std::int64_t n) {
    return bn_test::read(p, n);
  }
  struct Stream {
    bn::cpu::stream_type get() const { return {}; }
  };
};

template <>
struct Mem<bn::cuda> : bn_test::memory_policy<bn::cuda> {
  template <class E>
  static std::vector<E> read(const E* p, std::int64_t n) {
    return bn_test::device_read(p, n);
  }
  using Stream = bn_test::Stream;
};

using bn_test::shape_of;

/// How the layer of a scenario is prepared.
struct Setup {
  bn::Options options{};
  bool training = true;  ///< mode left set after the preparation
  bool fused = false;    ///< the last forward of the preparation is forward_relu
  bool reload = false;   ///< load_state at the end (forgets the saved statistics)
};

/// One backend's world for a scenario: a trained layer, data, sentinel outputs, a stream.
template <class Backend, class T, int D>
struct Env {
  using M = Mem<Backend>;
  using P = bn::param_t<T>;
  using Layer = bn::BatchNorm<T, D, Backend>;
  template <class E>
  using array = typename M::template array<E>;

  bn::Options options;
  bn::Shape good;
  typename M::Stream stream;
  Layer layer;
  array<T> x, dy, y, dx, dz, big;  // big: 2n + 2 elements, for overlaps

  static std::int64_t features_for(const bn::Options& o) {
    const bn::Shape s = shape_of<D>(3, 4, 2, 3, 2);
    return o.mode == bn::Mode::per_channel ? 4 : 4 * s.spatial();
  }

  explicit Env(const Setup& setup = {})
      : options(setup.options),
        good(shape_of<D>(3, 4, 2, 3, 2)),
        layer(features_for(setup.options), setup.options),
        x(M::upload(bnref::cast<T>(bnref::normal(good.numel(), 1, 0.5, 2.0)))),
        dy(M::upload(bnref::cast<T>(bnref::normal(good.numel(), 2)))),
        y(M::upload(sentinel(good.numel()))),
        dx(M::upload(sentinel(good.numel()))),
        dz(M::upload(sentinel(good.numel()))),
        big(M::upload(bnref::cast<T>(bnref::normal(2 * good.numel() + 2, 3)))) {
    // Non-trivial state: loaded parameters, two training forwards and a backward.
    bn::State<P> s = layer.state();
    for (auto* v : {&s.weight, &s.bias, &s.running_mean, &s.running_var})
      for (std::size_t i = 0; i < v->size(); ++i) (*v)[i] = static_cast<P>(0.5 + 0.25 * static_cast<double>(i));
    s.num_batches_tracked = 3;
    layer.load_state(s);
    array<T> t = M::upload(sentinel(good.numel()));
    layer.forward(data(x), data(t), good, stream.get());
    layer.forward(data(dy), data(t), good, stream.get());
    layer.backward(data(dy), data(x), data(t), good, stream.get());
    if (setup.fused) layer.forward_relu(data(x), nullptr, data(t), good, stream.get());
    if (setup.reload) layer.load_state(layer.state());
    layer.train(setup.training);
    (void)M::download(t);
  }
  static std::vector<T> sentinel(std::int64_t n) { return std::vector<T>(static_cast<std::size_t>(n), T(-12345)); }
  template <class E>
  static E* data(array<E>& a) {
    return a.data();
  }
  /// An array of @p n elements (sentinel) for another shape.
  array<T> make(std::int64_t n) { return M::upload(sentinel(n)); }

  struct Snapshot {
    bn::State<P> state;
    bn::Gradients<P> grads;
    std::vector<P> save_mean, save_invstd;
    std::int64_t batches, skipped;
    bool training;
  };
  Snapshot snap() const {
    const auto n = layer.num_features();
    return {layer.state(),
            layer.gradients(),
            M::read(layer.save_mean_data(), n),
            M::read(layer.save_invstd_data(), n),
            layer.num_batches_tracked(),
            layer.nonfinite_batches_skipped(),
            layer.is_training()};
  }
  std::vector<std::vector<T>> outputs() const {
    return {M::download(x), M::download(dy), M::download(y), M::download(dx), M::download(dz), M::download(big)};
  }
};

template <class S>
void expect_same_snapshot(const S& a, const S& b, const char* backend) {
  EXPECT_EQ(a.state.weight, b.state.weight) << backend;
  EXPECT_EQ(a.state.bias, b.state.bias) << backend;
  EXPECT_EQ(a.state.running_mean, b.state.running_mean) << backend;
  EXPECT_EQ(a.state.running_var, b.state.running_var) << backend;
  EXPECT_EQ(a.state.num_batches_tracked, b.state.num_batches_tracked) << backend;
  EXPECT_EQ(a.grads.grad_weight, b.grads.grad_weight) << backend;
  EXPECT_EQ(a.grads.grad_bias, b.grads.grad_bias) << backend;
  EXPECT_EQ(a.save_mean, b.save_mean) << backend;
  EXPECT_EQ(a.save_invstd, b.save_invstd) << backend;
  EXPECT_EQ(a.batches, b.batches) << backend;
  EXPECT_EQ(a.skipped, b.skipped) << backend;
  EXPECT_EQ(a.training, b.training) << backend;
}

/// Runs @p scenario (a generic callable taking Env&) on one backend; checks the strong guarantee.
template <class Backend, class T, int D, class Scenario>
Outcome run_on(const Setup& setup, Scenario&& scenario, const char* backend) {
  Env<Backend, T, D> env(setup);
  const auto before = env.snap();
  const auto out_before = env.outputs();
  const Outcome got = outcome_of([&] { scenario(env); });
  if (got.type != "none") {
    expect_same_snapshot(env.snap(), before, backend);
    const auto out_after = env.outputs();
    for (std::size_t i = 0; i < out_after.size(); ++i) EXPECT_EQ(out_after[i], out_before[i]) << backend << " buffer " << i;
  }
  return got;
}

/// The scenario on both backends: same outcome, which must be @p type with @p argument.
template <class T, int D, class Scenario>
void same_error(const char* type, const char* argument, Scenario&& scenario, const Setup& setup = {}) {
  const Outcome c = run_on<bn::cpu, T, D>(setup, scenario, "cpu");
  const Outcome g = run_on<bn::cuda, T, D>(setup, scenario, "cuda");
  EXPECT_EQ(c.type, type) << c;
  EXPECT_EQ(c.argument, argument) << c;
  EXPECT_EQ(g, c) << "cuda: " << g << "\ncpu:  " << c;
}

template <class C>
class GpuErrors : public ::testing::Test {
 public:
  using T = typename C::value_type;
  static constexpr int D = C::dims;
};
TYPED_TEST_SUITE(GpuErrors, Cases);

TYPED_TEST(GpuErrors, WrongRank) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  for (bool training : {true, false}) {
    for (const bn::Shape& s : {bn::Shape{3, 4}, bn::Shape{3, 4, 5}, bn::Shape{3, 4, 5, 2}, bn::Shape{3, 4, 5, 2, 2}}) {
      const bool ok = D == 1 ? (s.rank() == 2 || s.rank() == 3) : s.rank() == D + 2;
      if (ok) continue;
      same_error<T, D>("invalid_argument", "shape", [&](auto& e) {
        auto xs = e.make(s.numel()), ys = e.make(s.numel());
        e.layer.forward(e.data(xs), e.data(ys), s, e.stream.get());
      }, Setup{{}, training});
    }
  }
}

TYPED_TEST(GpuErrors, ChannelCountAndPerActivationMismatch) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  for (auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const auto s = shape_of<D>(2, 3, 3, 2, 2, layout);
    same_error<T, D>("invalid_argument", "shape", [&](auto& e) {
      auto xs = e.make(s.numel()), ys = e.make(s.numel());
      e.layer.forward(e.data(xs), e.data(ys), s, e.stream.get());
    });
  }
  bn::Options pa;
  pa.mode = bn::Mode::per_activation;
  const auto s = shape_of<D>(3, 4, 3, 3, 2);
  same_error<T, D>("invalid_argument", "shape", [&](auto& e) {
    auto xs = e.make(s.numel()), ys = e.make(s.numel());
    e.layer.forward(e.data(xs), e.data(ys), s, e.stream.get());
  }, Setup{pa});
}

TYPED_TEST(GpuErrors, OneValuePerChannelInTraining) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  const auto s = shape_of<D>(1, 4, 1, 1, 1);
  auto call = [&](auto& e) {
    auto xs = e.make(s.numel()), ys = e.make(s.numel());
    e.layer.forward(e.data(xs), e.data(ys), s, e.stream.get());
  };
  same_error<T, D>("invalid_argument", "shape", call);
  bn::Options untracked;
  untracked.track_running_stats = false;
  same_error<T, D>("invalid_argument", "shape", call, Setup{untracked, /*training=*/false});
}

TYPED_TEST(GpuErrors, NullPointersAndOverlaps) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  same_error<T, D>("invalid_argument", "x", [](auto& e) { e.layer.forward(nullptr, e.data(e.y), e.good, e.stream.get()); });
  same_error<T, D>("invalid_argument", "y", [](auto& e) { e.layer.forward(e.data(e.x), nullptr, e.good, e.stream.get()); });
  same_error<T, D>("invalid_argument", "x",
                   [](auto& e) { e.layer.backward(nullptr, e.data(e.dy), e.data(e.dx), e.good, e.stream.get()); });
  same_error<T, D>("invalid_argument", "dy",
                   [](auto& e) { e.layer.backward(e.data(e.x), nullptr, e.data(e.dx), e.good, e.stream.get()); });
  // y partially overlapping x (both ways), in one device allocation.
  for (int shift : {1, -1}) {
    same_error<T, D>("invalid_argument", "y", [shift](auto& e) {
      T* base = e.data(e.big) + 1;
      e.layer.forward(base, base + shift, e.good, e.stream.get());
    });
  }
  // z partially over y: the written buffer, y, is named (docs/errors.md, overlap table).
  same_error<T, D>("invalid_argument", "y", [](auto& e) {
    T* base = e.data(e.big) + 1;
    e.layer.forward_relu(e.data(e.x), base + 1, base, e.good, e.stream.get());
  });
  same_error<T, D>("invalid_argument", "dx", [](auto& e) {
    T* base = e.data(e.big) + 1;
    e.layer.backward(e.data(e.x), base, base + 1, e.good, e.stream.get());
  });
  // backward_relu without y after a fused forward.
  Setup fused;
  fused.fused = true;
  same_error<T, D>("invalid_argument", "y", [](auto& e) {
    e.layer.backward_relu(e.data(e.x), nullptr, e.data(e.dy), e.data(e.dx), e.data(e.dz), e.good, e.stream.get());
  }, fused);
  // A plain backward after a fused forward.
  same_error<T, D>("state_error", "", [](auto& e) {
    e.layer.backward(e.data(e.x), e.data(e.dy), e.data(e.dx), e.good, e.stream.get());
  }, fused);
}

TYPED_TEST(GpuErrors, BackwardStateErrors) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  // After load_state there is nothing to differentiate.
  Setup reloaded;
  reloaded.reload = true;
  same_error<T, D>("state_error", "", [](auto& e) {
    e.layer.backward(e.data(e.x), e.data(e.dy), e.data(e.dx), e.good, e.stream.get());
  }, reloaded);
  same_error<T, D>("state_error", "", [](auto& e) {
    e.layer.backward_relu(e.data(e.x), e.data(e.x), e.data(e.dy), e.data(e.dx), e.data(e.dz), e.good, e.stream.get());
  }, reloaded);
  // A fused backward after a plain forward (the Env's last forward was not fused).
  same_error<T, D>("state_error", "", [](auto& e) {
    e.layer.backward_relu(e.data(e.x), e.data(e.x), e.data(e.dy), e.data(e.dx), e.data(e.dz), e.good, e.stream.get());
  });
  // Another shape than the forward's.
  const auto other = shape_of<D>(2, 4, 2, 3, 2);
  same_error<T, D>("invalid_argument", "shape", [&](auto& e) {
    e.layer.backward(e.data(e.x), e.data(e.dy), e.data(e.dx), other, e.stream.get());
  });
}

TYPED_TEST(GpuErrors, LoadStateWrongSizesAndNegativeCount) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  using P = bn::param_t<T>;
  constexpr int D = TestFixture::D;
  for (const char* member : {"weight", "bias", "running_mean", "running_var"}) {
    same_error<T, D>("invalid_argument", member, [member](auto& e) {
      auto s = e.layer.state();
      std::vector<P>& v = std::string(member) == "weight" ? s.weight
                          : std::string(member) == "bias" ? s.bias
                          : std::string(member) == "running_mean" ? s.running_mean
                                                                  : s.running_var;
      v.push_back(P(1));
      e.layer.load_state(s);
    });
  }
  same_error<T, D>("invalid_argument", "num_batches_tracked", [](auto& e) {
    auto s = e.layer.state();
    s.num_batches_tracked = -1;
    e.layer.load_state(s);
  });
}

TYPED_TEST(GpuErrors, ConstructorErrorsAreTheCpuOnes) {
  BN_TEST_REQUIRE_GPU();
  using T = typename TestFixture::T;
  constexpr int D = TestFixture::D;
  auto both = [](std::int64_t n, const bn::Options& o) {
    const Outcome c = outcome_of([&] { bn::BatchNorm<T, D, bn::cpu> l(n, o); });
    const Outcome g = outcome_of([&] { bn::BatchNorm<T, D, bn::cuda> l(n, o); });
    EXPECT_EQ(c.type, "invalid_argument") << c;
    EXPECT_EQ(g, c);
  };
  both(0, {});
  bn::Options o;
  o.eps = -1.0;
  both(4, o);
  o.eps = 1e-5;
  o.momentum = std::numeric_limits<double>::quiet_NaN();
  both(4, o);
}

// ---- CUDA only ----------------------------------------------------------------------------

TEST(GpuOnlyErrors, HostPointersAreRejectedBeforeAnyLaunch) {
  BN_TEST_REQUIRE_GPU();
  {  // HMM / ATS: the device reads plain host memory, and the library accepts it there
    int device = 0, pageable = 0;
    BN_TEST_CUDA_CHECK(cudaGetDevice(&device));
    BN_TEST_CUDA_CHECK(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device));
    if (pageable) GTEST_SKIP() << "device reads pageable memory: see GpuLaunchChecks.MallocMemoryIsAcceptedOnlyWhereTheDeviceReadsIt";
  }
  Env<bn::cuda, float, 2> e;
  std::vector<float> host(static_cast<std::size_t>(e.good.numel()), 1.0f);
  const auto before = e.snap();
  const auto outputs = e.outputs();
  auto check = [&](const char* argument, auto&& fn) {
    const Outcome o = outcome_of(fn);
    EXPECT_EQ(o.type, "invalid_argument") << o;
    EXPECT_EQ(o.argument, argument) << o;
    EXPECT_NE(o.what.find("expected device, managed or mapped pinned memory, got a plain host pointer"),
              std::string::npos)
        << o;
  };
  check("x", [&] { e.layer.forward(host.data(), e.data(e.y), e.good, e.stream.get()); });
  check("y", [&] { e.layer.forward(e.data(e.x), host.data(), e.good, e.stream.get()); });
  check("residual", [&] { e.layer.forward_relu(e.data(e.x), host.data(), e.data(e.y), e.good, e.stream.get()); });
  check("dy", [&] { e.layer.backward(e.data(e.x), host.data(), e.data(e.dx), e.good, e.stream.get()); });
  expect_same_snapshot(e.snap(), before, "cuda");
  EXPECT_EQ(e.outputs(), outputs);
  EXPECT_EQ(host, std::vector<float>(host.size(), 1.0f));
}

TEST(GpuOnlyErrors, FunctionalWorkspaceMissingOrTooSmall) {
  BN_TEST_REQUIRE_GPU();
  const bn::Shape s({64, 8, 16, 16}, bn::Layout::channels_last);
  const auto n = static_cast<std::size_t>(s.numel());
  bn_test::device_array<float> x(bnref::cast<float>(bnref::normal(s.numel(), 1))), y(std::vector<float>(n, -1.f));
  bn_test::device_array<float> rm(std::vector<float>(8, 0.f)), rv(std::vector<float>(8, 1.f));
  bn::ForwardArgs<float> a;
  a.x = x.data();
  a.y = y.data();
  a.running_mean = bn::span<float>(rm.data(), 8);
  a.running_var = bn::span<float>(rv.data(), 8);
  bn::ForwardConfig c;
  const std::size_t need = bn::forward_workspace_size<float>(bn::cuda{}, s, c);
  if (need > 0) {
    const Outcome none = outcome_of([&] { bn::forward(bn::cuda{}, s, a, c, nullptr, 0, nullptr); });
    EXPECT_EQ(none.type, "invalid_argument") << none;
    EXPECT_EQ(none.argument, "workspace") << none;
    EXPECT_NE(none.what.find("workspace: expected " + std::to_string(need) + " bytes of device memory, got nullptr"),
              std::string::npos)
        << none;
    bn_test::device_array<unsigned char> small(need - 1);
    const Outcome too_small = outcome_of([&] { bn::forward(bn::cuda{}, s, a, c, small.data(), need - 1, nullptr); });
    EXPECT_EQ(too_small.type, "invalid_argument") << too_small;
    EXPECT_EQ(too_small.argument, "workspace_bytes") << too_small;
    EXPECT_NE(too_small.what.find("expected at least " + std::to_string(need) + ", got " + std::to_string(need - 1)),
              std::string::npos)
        << too_small;
  }
  EXPECT_EQ(y.download(), std::vector<float>(n, -1.f));
  EXPECT_EQ(rm.download(), std::vector<float>(8, 0.f));
  EXPECT_EQ(rv.download(), std::vector<float>(8, 1.f));
  // With enough workspace the same call works.
  bn_test::device_array<unsigned char> ws(need);
  EXPECT_NO_THROW(bn::forward(bn::cuda{}, s, a, c, ws.data(), need, nullptr));
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
}

// The functional API's shared validation gives the CPU's errors, before any launch.
TEST(GpuOnlyErrors, FunctionalValidationEqualsCpu) {
  BN_TEST_REQUIRE_GPU();
  const bn::Shape s{3, 4, 5};
  const auto x = bnref::cast<float>(bnref::normal(s.numel(), 1));
  std::vector<float> yh(x.size(), -1.f), w(4, 1.f), b3(3, 0.f), rmh(4, 0.f), rvh(4, 1.f);
  bn_test::device_array<float> xd(x), yd(yh), wd(w), bd(b3), rmd(rmh), rvd(rvh);
  bn::ForwardConfig c;
  bn_test::device_array<unsigned char> ws(bn::forward_workspace_size<float>(bn::cuda{}, s, c) + 1);
  auto run = [&](auto backend, float* xp, float* yp, float* wp, float* bp, float* rmp, float* rvp, std::int64_t bsize,
                 const bn::ForwardConfig& cfg) {
    bn::ForwardArgs<float> a;
    a.x = xp;
    a.y = yp;
    a.weight = bn::span<const float>(wp, 4);
    a.bias = bn::span<const float>(bp, bsize);
    a.running_mean = bn::span<float>(rmp, 4);
    a.running_var = bn::span<float>(rvp, 4);
    return outcome_of([&] {
      if constexpr (std::is_same_v<decltype(backend), bn::cpu>)
        bn::forward(bn::cpu{}, s, a, cfg);
      else
        bn::forward(bn::cuda{}, s, a, cfg, ws.data(), ws.size(), nullptr);
    });
  };
  // bias of 3 elements where 4 are needed
  const Outcome c1 = run(bn::cpu{}, const_cast<float*>(x.data()), yh.data(), w.data(), b3.data(), rmh.data(), rvh.data(), 3, c);
  const Outcome g1 = run(bn::cuda{}, xd.data(), yd.data(), wd.data(), bd.data(), rmd.data(), rvd.data(), 3, c);
  EXPECT_EQ(c1.argument, "bias") << c1;
  EXPECT_EQ(g1, c1);
  // eps <= 0
  bn::ForwardConfig bad = c;
  bad.eps = 0.0;
  std::vector<float> b4(4, 0.f);
  bn_test::device_array<float> b4d(b4);
  const Outcome c2 = run(bn::cpu{}, const_cast<float*>(x.data()), yh.data(), w.data(), b4.data(), rmh.data(), rvh.data(), 4, bad);
  const Outcome g2 = run(bn::cuda{}, xd.data(), yd.data(), wd.data(), b4d.data(), rmd.data(), rvd.data(), 4, bad);
  EXPECT_EQ(c2.argument, "eps") << c2;
  EXPECT_EQ(g2, c2);
  EXPECT_EQ(yd.download(), std::vector<float>(x.size(), -1.f));
  EXPECT_EQ(rmd.download(), rmh);
  EXPECT_EQ(rvd.download(), rvh);
}

}  // namespace
