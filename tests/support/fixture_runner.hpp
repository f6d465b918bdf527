/**
 * @file support/fixture_runner.hpp
 * @brief Replays one PyTorch fixture case (support/fixture.hpp) through the *class* API,
 *        `batchnorm::BatchNorm<T, Dims, Backend>`, and EXPECTs every tensor against it.
 *
 * Per case: construct the layer with the fixture's options, load_state() its initial weight,
 * bias and running statistics, then for every step: train()/eval(), forward(x) -> y,
 * backward(x, dy) -> dx, gradients(), state(), and compare y, dx, grad_weight, grad_bias,
 * running_mean, running_var, num_batches_tracked (and that weight/bias stay as loaded).
 *
 * Memory goes through `memory_policy<Backend>`, so the same runner serves both backends:
 * the `batchnorm::cpu` policy (host std::vector) is here; the `batchnorm::cuda` policy
 * (device arrays) is in support/device_memory.cuh, which a .cu test includes before using
 * this runner with `batchnorm::cuda`.
 *
 * Tolerances (|got - want| <= abs + rel * |want|, per element; see fixture_tolerance below):
 *  - float32: abs 1e-5, rel 1e-4. PyTorch's CPU kernels compute float32 data in float (in
 *    an order of their own); the library's CPU backend accumulates in double and its CUDA
 *    backend in float in yet another order, so results differ from PyTorch's by float
 *    rounding, amplified where a feature's variance is small (per-activation statistics over
 *    N = 3 values). Measured on the CPU backend over all cases: largest |diff| 1.2e-6 on y,
 *    1.2e-5 on dx (at 0.19 of its bound, bn3d_per_activation), 2e-6 on the gradients, 4e-7 on
 *    running statistics. Tight enough to catch formula errors: a 1 % change of eps, or a 0.1 %
 *    change of the projection term of dx, fails dozens of cases.
 *  - float64: abs 1e-12, rel 1e-10. Both sides compute in double; differences are
 *    summation-order rounding (largest measured |diff| 1.4e-14, at 2e-4 of its bound).
 * Set the environment variable BATCHNORM_FIXTURE_REPORT=1 to print, per compared tensor, the
 * largest absolute error and the largest error as a fraction of its bound.
 */
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <batchnorm/batchnorm.hpp>

#include "support/fixture.hpp"
#include "support/memory_policy.hpp"

namespace bn_test {

/// Bound |got - want| <= abs + rel * |want|.
struct Tolerance {
  double abs;
  double rel;
};

/// Tolerances of fixture comparisons by storage type (rationale in the file comment).
template <class T>
struct fixture_tolerance;
template <>
struct fixture_tolerance<float> {
  static constexpr Tolerance value{1e-5, 1e-4};
};
template <>
struct fixture_tolerance<double> {
  static constexpr Tolerance value{1e-12, 1e-10};
};

inline bool report_errors() {
  static const bool on = [] {
    const char* e = std::getenv("BATCHNORM_FIXTURE_REPORT");
    return e != nullptr && *e != '\0' && *e != '0';
  }();
  return on;
}

/**
 * @brief Elementwise closeness, as one assertion per tensor: reports the size mismatch or
 *        the number of bad elements, the first few of them, and the worst one.
 */
template <class G, class W>
::testing::AssertionResult all_close(const std::vector<G>& got, const std::vector<W>& want, Tolerance tol,
                                     const std::string& what = "") {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << ", expected " << want.size();
  std::size_t bad = 0, worst = 0;
  double worst_ratio = 0.0, max_abs = 0.0;
  std::ostringstream first;
  first.precision(17);
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    const double w = static_cast<double>(want[i]);
    const double err = std::fabs(g - w);
    const double bound = tol.abs + tol.rel * std::fabs(w);
    const double ratio = std::isnan(err) ? INFINITY : err / bound;
    if (ratio > worst_ratio || std::isnan(g) != std::isnan(w)) {
      worst_ratio = std::isnan(g) != std::isnan(w) ? INFINITY : ratio;
      worst = i;
    }
    if (!std::isnan(err)) max_abs = std::max(max_abs, err);
    if (!(err <= bound)) {
      if (bad < 5) first << "\n  [" << i << "] got " << g << ", expected " << w << " (|diff| " << err << ")";
      ++bad;
    }
  }
  if (report_errors())
    std::printf("  [report] %-40s n=%-5zu max|diff|=%.3g  max diff/bound=%.3g\n", what.c_str(), got.size(), max_abs,
                worst_ratio);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << got.size()
                                       << " elements outside |diff| <= " << tol.abs << " + " << tol.rel
                                       << " * |expected|; worst at [" << worst << "] (diff/bound " << worst_ratio
                                       << ")" << first.str();
}

template <class T>
std::vector<T> cast_values(const Values& v) {
  std::vector<T> r(v.size());
  std::transform(v.begin(), v.end(), r.begin(), [](double d) { return static_cast<T>(d); });
  return r;
}

/// How a case is replayed, beyond what the fixture fixes.
struct RunConfig {
  /// Memory order given to the library; fixture data is permuted to it and results back.
  batchnorm::Layout layout = batchnorm::Layout::contiguous;
  /// forward(x, y = x) and backward(..., dx = dy), each with its own copy of the input.
  bool in_place = false;
};

template <class T, int Dims, class Backend>
void run_fixture_dims(const FixtureCase& fc, const RunConfig& rc) {
  using P = batchnorm::param_t<T>;
  using mem = memory_policy<Backend>;
  const Tolerance tol = fixture_tolerance<T>::value;
  const bool cl = rc.layout == batchnorm::Layout::channels_last;

  batchnorm::BatchNorm<T, Dims, Backend> bn(fc.num_features, fc.options());
  batchnorm::State<P> init;
  if (fc.initial.weight) init.weight = cast_values<P>(*fc.initial.weight);
  if (fc.initial.bias) init.bias = cast_values<P>(*fc.initial.bias);
  if (fc.initial.running_mean) init.running_mean = cast_values<P>(*fc.initial.running_mean);
  if (fc.initial.running_var) init.running_var = cast_values<P>(*fc.initial.running_var);
  init.num_batches_tracked = fc.initial.num_batches_tracked.value_or(0);
  bn.load_state(init);

  for (std::size_t i = 0; i < fc.steps.size(); ++i) {
    const FixtureStep& st = fc.steps[i];
    std::ostringstream where;
    where << fc.name << " step " << i << (st.training ? " (train)" : " (eval)") << " shape ("
          << [&] {
               std::string s;
               for (std::size_t d = 0; d < st.shape.size(); ++d) s += (d ? ", " : "") + std::to_string(st.shape[d]);
               return s;
             }()
          << ")" << (cl ? " channels_last" : "") << (rc.in_place ? " in-place" : "");
    SCOPED_TRACE(where.str());
    const std::string w = where.str() + ": ";
    const batchnorm::Shape shape = make_shape(st.shape, rc.layout);

    auto in_layout = [&](const Values& v) {
      auto t = cast_values<T>(v);
      return cl ? to_channels_last(t, st.shape) : t;
    };
    auto out_layout = [&](const std::vector<T>& v) { return cl ? from_channels_last(v, st.shape) : v; };

    bn.train(st.training);
    ASSERT_EQ(bn.is_training(), st.training);

    // forward
    auto x = mem::upload(in_layout(st.x));
    std::vector<T> y_host;
    if (rc.in_place) {
      auto xy = mem::upload(in_layout(st.x));
      ASSERT_NO_THROW(bn.forward(mem::data(xy), mem::data(xy), shape));
      y_host = mem::download(xy);
    } else {
      auto y = mem::upload(std::vector<T>(st.x.size(), T(0)));
      ASSERT_NO_THROW(bn.forward(mem::data(x), mem::data(y), shape));
      y_host = mem::download(y);
    }
    EXPECT_TRUE(all_close(out_layout(y_host), st.y, tol, w + "y"));

    // backward
    auto dy = mem::upload(in_layout(st.dy));
    std::vector<T> dx_host;
    if (rc.in_place) {
      ASSERT_NO_THROW(bn.backward(mem::data(x), mem::data(dy), mem::data(dy), shape));
      dx_host = mem::download(dy);
    } else {
      auto dx = mem::upload(std::vector<T>(st.x.size(), T(0)));
      ASSERT_NO_THROW(bn.backward(mem::data(x), mem::data(dy), mem::data(dx), shape));
      dx_host = mem::download(dx);
    }
    EXPECT_TRUE(all_close(out_layout(dx_host), st.dx, tol, w + "dx"));

    const batchnorm::Gradients<P> g = bn.gradients();
    if (fc.affine) {
      EXPECT_TRUE(all_close(g.grad_weight, *st.grad_weight, tol, w + "grad_weight"));
      EXPECT_TRUE(all_close(g.grad_bias, *st.grad_bias, tol, w + "grad_bias"));
    } else {
      EXPECT_TRUE(g.grad_weight.empty() && g.grad_bias.empty()) << w << "gradients of a layer without affine";
    }

    const batchnorm::State<P> s = bn.state();
    if (fc.track_running_stats) {
      EXPECT_TRUE(all_close(s.running_mean, *st.running_mean, tol, w + "running_mean"));
      EXPECT_TRUE(all_close(s.running_var, *st.running_var, tol, w + "running_var"));
      EXPECT_EQ(s.num_batches_tracked, *st.num_batches_tracked) << w << "num_batches_tracked";
      EXPECT_EQ(bn.num_batches_tracked(), *st.num_batches_tracked) << w << "num_batches_tracked()";
    } else {
      // PyTorch has no num_batches_tracked buffer then; the library keeps its counter at 0.
      EXPECT_TRUE(s.running_mean.empty() && s.running_var.empty()) << w << "running stats of an untracked layer";
      EXPECT_EQ(s.num_batches_tracked, 0) << w << "num_batches_tracked of an untracked layer";
    }
    // Parameters are not touched by forward/backward (no optimizer here).
    EXPECT_EQ(s.weight, init.weight) << w << "weight changed";
    EXPECT_EQ(s.bias, init.bias) << w << "bias changed";
  }
}

/**
 * @brief Replays @p fc with storage type @p T (float for "float32", double for "float64"
 *        fixtures) on @p Backend. Failures are reported with EXPECT/ASSERT.
 */
template <class T, class Backend>
void run_fixture(const FixtureCase& fc, const RunConfig& rc = {}) {
  switch (fc.class_dims) {
    case 1: run_fixture_dims<T, 1, Backend>(fc, rc); break;
    case 2: run_fixture_dims<T, 2, Backend>(fc, rc); break;
    case 3: run_fixture_dims<T, 3, Backend>(fc, rc); break;
    default: ADD_FAILURE() << fc.file << ": class_dims " << fc.class_dims;
  }
}

/// Dispatches on the fixture's dtype.
template <class Backend>
void run_fixture(const FixtureCase& fc, const RunConfig& rc = {}) {
  if (fc.dtype == "float32") {
    run_fixture<float, Backend>(fc, rc);
  } else if (fc.dtype == "float64") {
    run_fixture<double, Backend>(fc, rc);
  } else {
    ADD_FAILURE() << fc.file << ": dtype " << fc.dtype;
  }
}

/// One test instance: a fixture file replayed in one memory order, in place or not.
struct FixtureParam {
  std::string file;
  batchnorm::Layout layout = batchnorm::Layout::contiguous;
  bool in_place = false;
};

/// Replays the fixture of @p p on @p Backend in p's memory order, in place or not.
template <class Backend>
void run_fixture_param(const FixtureParam& p) {
  const FixtureCase fc = load_fixture(p.file);
  RunConfig rc;
  rc.layout = p.layout;
  rc.in_place = p.in_place;
  run_fixture<Backend>(fc, rc);
}

/// How GoogleTest prints a parameter (instead of its bytes).
inline void PrintTo(const FixtureParam& p, std::ostream* os) {
  *os << stem(p.file) << (p.layout == batchnorm::Layout::channels_last ? " channels_last" : " contiguous")
      << (p.in_place ? " in-place" : "");
}

/**
 * @brief Every fixture file three times: contiguous; contiguous in place; channels_last.
 */
inline std::vector<FixtureParam> fixture_params(const std::string& dir
#ifdef BATCHNORM_FIXTURE_DIR
                                                = BATCHNORM_FIXTURE_DIR
#endif
) {
  std::vector<FixtureParam> ps;
  for (const std::string& f : list_fixture_files(dir)) {
    ps.push_back({f, batchnorm::Layout::contiguous, false});
    ps.push_back({f, batchnorm::Layout::contiguous, true});
    // For rank-2 steps channels_last is the same memory order: running them checks that the
    // layout flag is harmless there.
    ps.push_back({f, batchnorm::Layout::channels_last, false});
  }
  return ps;
}

inline std::string fixture_param_name(const ::testing::TestParamInfo<FixtureParam>& info) {
  const FixtureParam& p = info.param;
  return identifier(stem(p.file)) + (p.layout == batchnorm::Layout::channels_last ? "_channels_last" : "") +
         (p.in_place ? "_in_place" : "");
}

}  // namespace bn_test
