// Every loop of the CPU backend (detail/cpu/kernels.hpp) against the naive double reference
// (support/reference.hpp): NCHW planes fused (a channel fits the cache budget) and unfused
// (split into tasks), (N, C) rows narrow and wide (column blocks), NHWC, per-activation in both
// layouts, relu / residual / dx / dresidual combinations, odd sizes, one sample, empty batches;
// the same bits for 1, 2, 3 and 7 OpenMP threads, for every instruction set the loops are
// compiled for, in place, and (element-wise passes) in either layout; constant features give
// exactly the bias. The rows loops that tensors over 8 MiB in rows of at most 512 values take
// (streaming) run on the same cases, forced (wider rows keep the in-cache loops). Every test
// runs for float and double and, when the CUDA toolkit's headers are on the include path, for
// __half and __nv_bfloat16 (float parameters, the float route): this
// is the one test file that checks every instruction-set version of every loop, so the other
// numeric tests can compile the loops once (BATCHNORM_NO_DISPATCH, tests/CMakeLists.txt).
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#define BN_TEST_HAVE_HALF 1
#include <batchnorm/half.hpp>
#else
#define BN_TEST_HAVE_HALF 0
#endif

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/phases.hpp>
#include <gtest/gtest.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
// After the library's headers on purpose: the library includes <cpuid.h> itself, and a consumer
// that includes it later must still find its functions in the global namespace.
#if defined(BATCHNORM_CPU_DISPATCH)
#include <cpuid.h>
#endif

#include "support/common.hpp"
#include "support/reference.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::cpu;
using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::Shape;

struct PathCase {
  const char* path;  // which loop it exercises (for failure messages)
  std::vector<std::int64_t> extents;
  Layout layout;
  Mode mode;
};

// Sizes are odd (not multiples of the lanes, of the four rows of the rows loops, or of a
// vector); most are large enough to cross chunk_elements (8192), row_chunk_elements (32768),
// task_elements (65536) and the thread threshold (32768 values), so that the thread-count test
// runs them on several threads; a few small ones cover the serial path.
std::vector<PathCase> path_cases() {
  return {
      {"planes fused", {5, 3, 7, 9}, Layout::contiguous, Mode::per_channel},
      {"planes fused, many chunks", {9, 4, 61, 67}, Layout::contiguous, Mode::per_channel},
      {"planes unfused (3 tasks per channel)", {3, 2, 150001}, Layout::contiguous, Mode::per_channel},
      // backward fused by fused_backward_bytes for float (x and dy: 2 × 360 KB) and the 16-bit
      // types (relu too); not for float with relu (three inputs) or double (two tasks a channel)
      // (CpuPathsEdges.BackwardFusionFollowsItsBudget)
      {"planes, backward fused by its own budget", {3, 2, 30001}, Layout::contiguous, Mode::per_channel},
      {"planes, one sample", {1, 5, 13}, Layout::contiguous, Mode::per_channel},
      {"rows narrow (N, C)", {12007, 3}, Layout::contiguous, Mode::per_channel},
      {"rows (N, C), C = 50", {2501, 50}, Layout::contiguous, Mode::per_channel},
      {"rows (N, C), C = 512: the widest streaming rows", {37, 512}, Layout::contiguous, Mode::per_channel},
      {"rows wide, column blocks", {67, 1100}, Layout::contiguous, Mode::per_channel},
      // features over threads too (for_each_feature: 2048 features and more), five tasks
      {"rows, 4099 features", {6, 4099}, Layout::contiguous, Mode::per_channel},
      {"rows NHWC", {5, 7, 9, 11}, Layout::channels_last, Mode::per_channel},
      {"rows NHWC, many row blocks", {9, 6, 37, 41}, Layout::channels_last, Mode::per_channel},
      {"rows per-activation", {33, 3, 5, 7}, Layout::contiguous, Mode::per_activation},
      {"rows per-activation channels_last", {401, 3, 5, 7}, Layout::channels_last, Mode::per_activation},
      {"rows per-activation wide", {7, 600}, Layout::contiguous, Mode::per_activation},
  };
}

/// Per-feature buffers (parameters, statistics, their gradients) are param_t<T>: T itself, float
/// for the 16-bit types.
template <class T>
using P = batchnorm::param_t<T>;

template <class T>
struct Outputs {
  std::vector<T> y, dx, dresidual;
  std::vector<P<T>> save_mean, save_invstd, running_mean, running_var, grad_weight, grad_bias;
  std::vector<double> statistics, gradient_sums;
};

/// Forward (training), backward, and the phases' two reductions, on one shape.
template <class T>
Outputs<T> run_all(const Shape& shape, Mode mode, const std::vector<T>& x, const std::vector<T>& z,
                   const std::vector<T>& dy, const std::vector<P<T>>& w, const std::vector<P<T>>& b, bool relu,
                   bool residual, bool want_dx, bool want_dres) {
  const std::int64_t F = batchnorm::feature_count(shape, mode), numel = shape.numel();
  Outputs<T> r;
  r.y.assign(numel, T(0));
  r.save_mean.assign(F, P<T>(0));
  r.save_invstd.assign(F, P<T>(0));
  r.running_mean.assign(F, P<T>(0.5));
  r.running_var.assign(F, P<T>(2));
  batchnorm::ForwardArgs<T> fa;
  fa.x = x.data();
  fa.y = r.y.data();
  fa.weight = {w.data(), F};
  fa.bias = {b.data(), F};
  fa.running_mean = r.running_mean;
  fa.running_var = r.running_var;
  fa.save_mean = r.save_mean;
  fa.save_invstd = r.save_invstd;
  fa.residual = residual ? z.data() : nullptr;
  batchnorm::ForwardConfig fc;
  fc.mode = mode;
  fc.activation = relu ? Activation::relu : Activation::identity;
  batchnorm::forward(cpu{}, shape, fa, fc);

  r.dx.assign(numel, T(0));
  r.dresidual.assign(numel, T(0));
  r.grad_weight.assign(F, P<T>(0));
  r.grad_bias.assign(F, P<T>(0));
  batchnorm::BackwardArgs<T> ba;
  ba.x = x.data();
  ba.dy = dy.data();
  ba.y = r.y.data();
  ba.dx = want_dx ? r.dx.data() : nullptr;
  ba.dresidual = want_dres ? r.dresidual.data() : nullptr;
  ba.weight = {w.data(), F};
  ba.mean = {r.save_mean.data(), F};
  ba.invstd = {r.save_invstd.data(), F};
  ba.grad_weight = r.grad_weight;
  ba.grad_bias = r.grad_bias;
  batchnorm::BackwardConfig bc;
  bc.mode = mode;
  bc.activation = fc.activation;
  batchnorm::backward(cpu{}, shape, ba, bc);

  namespace phases = batchnorm::phases;
  r.statistics.assign(phases::shard_statistics_size(F), 0.0);
  phases::local_statistics(cpu{}, shape, mode, x.data(), batchnorm::span<double>(r.statistics));
  return r;
}

/// The reference's parameters for a run_all call: its weight and bias, widened, and the running
/// statistics run_all starts from (0.5, 2).
template <class E>
bnref::Params reference_params(const std::vector<E>& w, const std::vector<E>& b) {
  bnref::Params p;
  p.weight = bnref::widen(w);
  p.bias = bnref::widen(b);
  p.running_mean.assign(w.size(), 0.5);
  p.running_var.assign(w.size(), 2.0);
  return p;
}

/// The normalization coefficients of one shard (per channel, no affine): phases::local_statistics
/// of x, then merge_statistics of that shard alone.
template <class T>
std::vector<double> one_shard_normalization(const Shape& shape, std::int64_t F, const T* x) {
  namespace phases = batchnorm::phases;
  std::vector<double> stats(phases::shard_statistics_size(F)), norm(phases::normalization_size(F));
  phases::local_statistics(cpu{}, shape, Mode::per_channel, x, batchnorm::span<double>(stats));
  phases::MergeArgs<P<T>> ma;
  ma.shard_statistics = {stats.data(), static_cast<std::int64_t>(stats.size())};
  ma.normalization = norm;
  phases::merge_statistics(cpu{}, F, ma, {});
  return norm;
}

template <class T>
void expect_same_bits(const std::vector<T>& a, const std::vector<T>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_TRUE(a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0) << what;
}

/// Every output of run_all bit for bit, failures prefixed by @p what.
template <class T>
void expect_same_outputs(const Outputs<T>& r, const Outputs<T>& ref, const std::string& what) {
  expect_same_bits(r.y, ref.y, what + "y");
  expect_same_bits(r.save_mean, ref.save_mean, what + "save_mean");
  expect_same_bits(r.save_invstd, ref.save_invstd, what + "save_invstd");
  expect_same_bits(r.running_var, ref.running_var, what + "running_var");
  expect_same_bits(r.dx, ref.dx, what + "dx");
  expect_same_bits(r.dresidual, ref.dresidual, what + "dresidual");
  expect_same_bits(r.grad_weight, ref.grad_weight, what + "grad_weight");
  expect_same_bits(r.grad_bias, ref.grad_bias, what + "grad_bias");
  expect_same_bits(r.statistics, ref.statistics, what + "local_statistics");
}

/// The inputs of one path case: x ~ N(x_mean, x_sd), residual z, upstream dy, weight, bias,
/// drawn with seeds seed .. seed + 4.
template <class T>
struct PathInputs {
  std::vector<T> x, z, dy;
  std::vector<P<T>> w, b;
};

template <class T>
PathInputs<T> path_inputs(std::int64_t numel, std::int64_t F, std::uint64_t seed, double x_mean, double x_sd) {
  return {bnref::cast<T>(bnref::normal(numel, seed, x_mean, x_sd)), bnref::cast<T>(bnref::normal(numel, seed + 1)),
          bnref::cast<T>(bnref::normal(numel, seed + 2)), bnref::cast<P<T>>(bnref::normal(F, seed + 3, 1.0, 0.5)),
          bnref::cast<P<T>>(bnref::normal(F, seed + 4))};
}

/// Relative tolerances against the double reference (bnref::max_rel_error, floor 1) of values
/// of type V: forward outputs and statistics, and backward's, which also carry the rounding of
/// the saved statistics. For float and double, a few roundings of the output; for the 16-bit
/// types, which are rounded once from the double formula, one ulp (twice that rounding's half ulp).
template <class V>
double forward_tolerance() {
  if constexpr (std::is_same_v<V, double>) return 1e-11;
  else if constexpr (std::is_same_v<V, float>) return 2e-6;  // output rounding (0.5 ulp) dominates
#if BN_TEST_HAVE_HALF
  else if constexpr (std::is_same_v<V, __half>) return std::ldexp(1.0, -10);
  else if constexpr (std::is_same_v<V, __nv_bfloat16>) return std::ldexp(1.0, -7);
#endif
}
template <class V>
double backward_tolerance() {
  if constexpr (std::is_same_v<V, double>) return 1e-10;
  else if constexpr (std::is_same_v<V, float>) return 2e-5;
  else return forward_tolerance<V>();
}

void set_threads(int n) {
#if defined(_OPENMP)
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Runs @p body with the loops the sizes here choose (in cache) and again with the streaming loops
/// that tensors over 8 MiB take (detail::cpu_impl::streaming_bytes lowered to 0).
template <class Body>
void for_each_loop_family(Body&& body) {
  namespace ci = batchnorm::detail::cpu_impl;
  const std::int64_t before = ci::streaming_bytes().load();
  for (const std::int64_t bytes : {before, std::int64_t{0}}) {
    ci::streaming_bytes() = bytes;
    SCOPED_TRACE(bytes == 0 ? "streaming loops" : "in-cache loops");
    body();
  }
  ci::streaming_bytes() = before;
}

template <class T>
class CpuPaths : public ::testing::Test {};
#if BN_TEST_HAVE_HALF
using Types = ::testing::Types<float, double, __half, __nv_bfloat16>;
#else
using Types = ::testing::Types<float, double>;
#endif
TYPED_TEST_SUITE(CpuPaths, Types);

// Each path against the naive double reference (on the same rounded inputs), every relu /
// residual / dx / dresidual combination.
TYPED_TEST(CpuPaths, MatchTheReference) {
  using T = TypeParam;
  for_each_loop_family([&] {
    const double tol = forward_tolerance<T>(), ptol = forward_tolerance<P<T>>();
    for (const PathCase& k : path_cases()) {
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      const auto [x, z, dy, w, b] = path_inputs<T>(numel, F, 31, 100.0, 3.0);
      for (int combo = 0; combo < 4; ++combo) {
        const bool relu = combo & 1, residual = combo & 2;
        SCOPED_TRACE(std::string(k.path) + (relu ? " relu" : "") + (residual ? " residual" : ""));
        const Outputs<T> r = run_all(shape, k.mode, x, z, dy, w, b, relu, residual, true, combo != 3);

        bnref::Params p = reference_params(w, b);
        bnref::ForwardSettings s;
        s.mode = k.mode;
        s.relu = relu;
        const auto ref = bnref::forward(shape, bnref::widen(x), p, s, residual ? bnref::widen(z) : std::vector<double>{});
        EXPECT_LE(bnref::max_rel_error(r.y, ref.y), tol);
        EXPECT_LE(bnref::max_rel_error(r.save_mean, ref.mean), ptol);
        EXPECT_LE(bnref::max_rel_error(r.save_invstd, ref.invstd), ptol);
        EXPECT_LE(bnref::max_rel_error(r.running_mean, p.running_mean), ptol);
        EXPECT_LE(bnref::max_rel_error(r.running_var, p.running_var), ptol);
        // The local statistics record: count, mean, M2 (double, no output rounding).
        for (std::int64_t f = 0; f < F; ++f) {
          const double n = r.statistics[0];
          ASSERT_EQ(n, static_cast<double>(batchnorm::reduction_count(shape, k.mode)));
          EXPECT_NEAR(r.statistics[1 + f], ref.mean[f], 1e-12 * std::abs(ref.mean[f]));
          EXPECT_NEAR(r.statistics[1 + F + f] / n, ref.batch_var[f], 1e-11 * ref.batch_var[f]);
        }

        // Backward with the invstd forward saved (rounded to T) and the exact mean (backward
        // corrects the saved mean's rounding with Σ(x − saved mean)), y as the relu mask.
        bnref::ForwardResult saved = ref;
        saved.invstd = bnref::widen(r.save_invstd);
        saved.y = bnref::widen(r.y);
        const auto bref = bnref::backward(shape, bnref::widen(x), bnref::widen(dy), p, saved, k.mode, relu);
        const double btol = backward_tolerance<T>(), pbtol = backward_tolerance<P<T>>();
        EXPECT_LE(bnref::max_rel_error(r.dx, bref.dx), btol);
        EXPECT_LE(bnref::max_rel_error(r.grad_weight, bref.grad_weight), pbtol);
        EXPECT_LE(bnref::max_rel_error(r.grad_bias, bref.grad_bias), pbtol);
        if (combo != 3) EXPECT_LE(bnref::max_rel_error(r.dresidual, bref.dz), 0.0);
        else expect_same_bits(r.dresidual, std::vector<T>(numel, T(0)), "dresidual not requested: untouched");
      }
    }
  });
}

// The same bits for 1, 2, 3 and 7 threads (fixed partition of every reduction, fixed order).
TYPED_TEST(CpuPaths, SameBitsForAnyThreadCount) {
  using T = TypeParam;
  for_each_loop_family([&] {
    const int before = max_threads();
    for (const PathCase& k : path_cases()) {
      SCOPED_TRACE(k.path);
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      const auto [x, z, dy, w, b] = path_inputs<T>(numel, F, 41, -7.0, 5.0);
      set_threads(1);
      const Outputs<T> one = run_all(shape, k.mode, x, z, dy, w, b, true, true, true, true);
      for (int threads : {2, 3, 7}) {
        set_threads(threads);
        const Outputs<T> r = run_all(shape, k.mode, x, z, dy, w, b, true, true, true, true);
        expect_same_outputs(r, one, std::to_string(threads) + " threads: ");
      }
    }
    set_threads(before);
  });
}

// The same bits from every instruction set the loops are compiled for (baseline x86-64, AVX2,
// AVX-512 where the processor has them): lanes are explicit and nothing is contracted into FMA.
TYPED_TEST(CpuPaths, SameBitsForEveryIsa) {
  using T = TypeParam;
  for_each_loop_family([&] {
    namespace ci = batchnorm::detail::cpu_impl;
    const int best = static_cast<int>(ci::best_isa()), before = ci::isa_in_use().load();
    for (const PathCase& k : path_cases()) {
      SCOPED_TRACE(k.path);
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      const auto [x, z, dy, w, b] = path_inputs<T>(numel, F, 51, 3.0, 2.0);
      ci::isa_in_use() = static_cast<int>(ci::Isa::baseline);
      for (const bool relu : {false, true}) {
        const Outputs<T> base = run_all(shape, k.mode, x, z, dy, w, b, relu, relu, true, relu);
        for (int isa = 1; isa <= best; ++isa) {
          ci::isa_in_use() = isa;
          const Outputs<T> r = run_all(shape, k.mode, x, z, dy, w, b, relu, relu, true, relu);
          ci::isa_in_use() = static_cast<int>(ci::Isa::baseline);
          expect_same_outputs(r, base, "isa " + std::to_string(isa) + (relu ? " relu+residual: " : ": "));
        }
      }
    }
    ci::isa_in_use() = before;
  });
}

// In place (y = x, y = residual; dx = dy, dresidual = dy) gives the same bits as
// separate buffers, in every path (the rows loops take another loop when buffers coincide).
TYPED_TEST(CpuPaths, InPlaceGivesTheSameBits) {
  using T = TypeParam;
  for_each_loop_family([&] {
    for (const PathCase& k : path_cases()) {
      SCOPED_TRACE(k.path);
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      const auto [x, z, dy, w, b] = path_inputs<T>(numel, F, 71, 3.0, 2.0);
      // Reference: separate buffers, relu with residual, then backward with dx and dresidual.
      const Outputs<T> sep = run_all(shape, k.mode, x, z, dy, w, b, true, true, true, true);
      std::vector<P<T>> mean(F), invstd(F);
      for (const bool onto_residual : {false, true}) {
        std::vector<T> buf = onto_residual ? z : x;
        std::vector<P<T>> rm(F, P<T>(0.5)), rv(F, P<T>(2));
        batchnorm::ForwardArgs<T> fa;
        fa.x = onto_residual ? x.data() : buf.data();
        fa.residual = onto_residual ? buf.data() : z.data();
        fa.y = buf.data();
        fa.weight = {w.data(), F};
        fa.bias = {b.data(), F};
        fa.running_mean = rm;
        fa.running_var = rv;
        fa.save_mean = mean;
        fa.save_invstd = invstd;
        batchnorm::ForwardConfig fc;
        fc.mode = k.mode;
        fc.activation = Activation::relu;
        batchnorm::forward(cpu{}, shape, fa, fc);
        expect_same_bits(buf, sep.y, onto_residual ? "y = residual" : "y = x");
      }
      // Backward: dx onto dy (with dresidual separate), then dresidual onto dy (dx separate).
      for (const bool dres_onto_dy : {false, true}) {
        std::vector<T> g = dy, other(numel, T(0));
        std::vector<P<T>> gw(F, P<T>(0)), gb(F, P<T>(0));
        batchnorm::BackwardArgs<T> ba;
        ba.x = x.data();
        ba.dy = g.data();
        ba.y = sep.y.data();
        ba.dx = dres_onto_dy ? other.data() : g.data();
        ba.dresidual = dres_onto_dy ? g.data() : other.data();
        ba.weight = {w.data(), F};
        ba.mean = {sep.save_mean.data(), F};
        ba.invstd = {sep.save_invstd.data(), F};
        ba.grad_weight = gw;
        ba.grad_bias = gb;
        batchnorm::BackwardConfig bc;
        bc.mode = k.mode;
        bc.activation = Activation::relu;
        batchnorm::backward(cpu{}, shape, ba, bc);
        expect_same_bits(dres_onto_dy ? other : g, sep.dx, dres_onto_dy ? "dx (dresidual = dy)" : "dx = dy");
        expect_same_bits(dres_onto_dy ? g : other, sep.dresidual, dres_onto_dy ? "dresidual = dy" : "dresidual (dx = dy)");
        expect_same_bits(gw, sep.grad_weight, "grad_weight");
      }
    }
  });
}

// A constant feature (at an offset, at 1e30) gives exactly the bias (rounded to T) and variance
// 0, in every path. Values T cannot hold (__half's range ends at 65504) are left out.
TYPED_TEST(CpuPaths, ConstantFeaturesGiveExactlyTheBias) {
  using T = TypeParam;
  using Convert = batchnorm::detail::convert<T>;
  for_each_loop_family([&] {
    for (const PathCase& k : path_cases()) {
      SCOPED_TRACE(k.path);
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      for (double value : {0.1, 12345.678, -1e6 - 0.3, 1e30}) {
        const T x_value = Convert::from_double(value);
        if (!std::isfinite(Convert::to_double(x_value))) continue;
        const std::vector<T> x(numel, x_value);
        const auto w = bnref::cast<P<T>>(bnref::normal(F, 51, 1.0, 0.5)), b = bnref::cast<P<T>>(bnref::normal(F, 52));
        const Outputs<T> r = run_all(shape, k.mode, x, x, x, w, b, false, false, false, false);
        const std::int64_t C = shape.channels(), S = shape.spatial();
        for (std::int64_t i = 0; i < numel; ++i) {
          const bool last = shape.layout() == Layout::channels_last;
          const std::int64_t c = last ? i % C : (i / S) % C, s = last ? (i / C) % S : i % S;
          const std::int64_t f = k.mode == Mode::per_channel ? c : c * S + s;
          const double y = Convert::to_double(r.y[i]), bias = Convert::to_double(Convert::from_double(b[f]));
          if (y != bias) {
            ADD_FAILURE() << "element " << i << " value " << value << ": " << y << " != bias " << bias;
            break;
          }
        }
        for (std::int64_t f = 0; f < F; ++f) {
          EXPECT_EQ(static_cast<double>(r.save_mean[f]), static_cast<double>(static_cast<P<T>>(Convert::to_double(x_value))));
          EXPECT_EQ(r.statistics[1 + F + f], 0.0);  // M2
        }
      }
    }
  });
}

// Rows statistics, and the planes of half types, read a chunk once for Σd and Σd² about a
// center (the chunk's first row or value, or the running mean of the chunks before it) and take
// M2 = Σd² − (Σd)²/m, which loses log2(Σd² / M2) bits; past 6 bits the chunk is taken again in
// two passes. A first row far above the rest (1000 over N(0, 1)) puts Σd² / M2 near the chunk's
// row count; planes take as pivot the first value of a channel, so there that value alone is
// 1000, which puts Σd² / M2 near the chunk's value count. Measured on
// doubles (standalone, the same data): the single-pass M2 alone was off by up to 6.5e-12 on
// (12007, 3) (10922-row chunks) and 7e-13 on (2501, 50); with the two passes, 1.3e-15 there and
// 6.3e-14 on (67, 1100). The fused planes are held to the same bounds (float planes take two
// passes everywhere); the unfused case is not asked this much: it merges three tasks per
// channel to 1.6e-12 on this data.
TYPED_TEST(CpuPaths, OutlyingFirstRowKeepsTheVarianceExact) {
  using T = TypeParam;
  for_each_loop_family([&] {
    for (const PathCase& k : path_cases()) {
      const std::string path = k.path;
      if (path.rfind("rows", 0) != 0 && path.rfind("planes fused", 0) != 0) continue;
      SCOPED_TRACE(k.path);
      const Shape shape = bn_test::make_shape(k.extents, k.layout);
      const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
      std::vector<double> v = bnref::normal(numel, 61);
      // the values of the first memory row: one position of NHWC per-channel, else a sample
      const bool positions = k.layout == Layout::channels_last && k.mode == Mode::per_channel;
      const std::int64_t first_row = positions ? shape.channels() : numel / shape.batch();
      if (path.rfind("planes", 0) == 0) {
        for (std::int64_t c = 0; c < shape.channels(); ++c) v[static_cast<std::size_t>(c * shape.spatial())] = 1000.0;
      } else {
        for (std::int64_t i = 0; i < first_row; ++i) v[static_cast<std::size_t>(i)] = 1000.0;
      }
      const std::vector<T> x = bnref::cast<T>(v);
      const auto w = bnref::cast<P<T>>(bnref::normal(F, 62, 1.0, 0.5)), b = bnref::cast<P<T>>(bnref::normal(F, 63));
      const Outputs<T> r = run_all(shape, k.mode, x, x, x, w, b, false, false, false, false);
      bnref::Params p = reference_params(w, b);
      bnref::ForwardSettings s;
      s.mode = k.mode;
      const auto ref = bnref::forward(shape, bnref::widen(x), p, s, {});
      EXPECT_LE(bnref::max_rel_error(r.y, ref.y), forward_tolerance<T>());
      const double n = r.statistics[0];
      for (std::int64_t f = 0; f < F; ++f) {
        const double sd = std::sqrt(ref.batch_var[f]);
        EXPECT_NEAR(r.statistics[1 + f], ref.mean[f], 1e-13 * sd) << "feature " << f;
        EXPECT_NEAR(r.statistics[1 + F + f] / n, ref.batch_var[f], 2e-13 * ref.batch_var[f]) << "feature " << f;
      }
    }
  });
}

// The element-wise passes (normalize, input gradient) compute each value with one formula,
// whichever loop runs it: NCHW planes (scalar loop, one feature's coefficients) and NHWC rows
// (eight values at a time, per-lane coefficient arrays, a scalar tail) give the same bits for
// the same normalization and gradient sums. Channel counts 11 and 21 leave a tail after the
// eights (and 11 is grouped into wider lane rows); 16 leaves none.
TYPED_TEST(CpuPaths, ElementwisePassesGiveTheSameBitsInEveryLayout) {
  using T = TypeParam;
  namespace phases = batchnorm::phases;
  const std::vector<std::vector<std::int64_t>> extents = {{3, 11, 5, 7}, {2, 16, 9, 9}, {4, 21, 3, 5}};
  for_each_loop_family([&] {
    for (const auto& e : extents) {
      const Shape nchw = bn_test::make_shape(e), nhwc = bn_test::make_shape(e, Layout::channels_last);
      const std::int64_t F = e[1], numel = nchw.numel();
      const auto [x, z, dy, w, b] = path_inputs<T>(numel, F, 81, 3.0, 2.0);
      std::vector<double> norm = one_shard_normalization(nchw, F, x.data());
      for (const bool relu : {false, true}) {
        SCOPED_TRACE("(" + std::to_string(e[0]) + "," + std::to_string(F) + "," + std::to_string(e[2]) + "," +
                     std::to_string(e[3]) + ")" + (relu ? " relu + residual" : ""));
        phases::ElementwiseConfig config;
        config.activation = relu ? Activation::relu : Activation::identity;
        // y in both layouts, then the input gradient with the planes' gradient sums in both.
        std::vector<T> y(numel), y_last(numel);
        const std::vector<T> x_last = bn_test::to_channels_last(x, nchw), z_last = bn_test::to_channels_last(z, nchw);
        for (const bool last : {false, true}) {
          phases::NormalizeArgs<T> na;
          na.x = (last ? x_last : x).data();
          na.y = (last ? y_last : y).data();
          na.residual = relu ? (last ? z_last : z).data() : nullptr;
          na.weight = {w.data(), F};
          na.bias = {b.data(), F};
          na.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
          phases::normalize(cpu{}, last ? nhwc : nchw, na, config);
        }
        expect_same_bits(bn_test::from_channels_last(y_last, nchw), y, "normalize");

        std::vector<double> sums(phases::gradient_sums_size(F));
        phases::GradientSumsArgs<T> ga;
        ga.x = x.data();
        ga.dy = dy.data();
        ga.y = y.data();
        ga.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
        ga.gradient_sums = sums;
        phases::local_gradient_sums(cpu{}, nchw, ga, config);
        const std::vector<T> dy_last = bn_test::to_channels_last(dy, nchw);
        std::vector<T> dx(numel), dx_last(numel), dres(numel), dres_last(numel);
        for (const bool last : {false, true}) {
          phases::InputGradientArgs<T> ia;
          ia.x = (last ? x_last : x).data();
          ia.dy = (last ? dy_last : dy).data();
          ia.y = (last ? y_last : y).data();
          ia.dx = (last ? dx_last : dx).data();
          ia.dresidual = relu ? (last ? dres_last : dres).data() : nullptr;
          ia.weight = {w.data(), F};
          ia.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
          ia.gradient_sums = {sums.data(), static_cast<std::int64_t>(sums.size())};
          phases::input_gradient(cpu{}, last ? nhwc : nchw, ia, config);
        }
        expect_same_bits(bn_test::from_channels_last(dx_last, nchw), dx, "input_gradient dx");
        expect_same_bits(bn_test::from_channels_last(dres_last, nchw), dres, "input_gradient dresidual");
      }
    }
  });
}

// Empty batches (N = 0) leave y untouched and give zero parameter gradients; a tensor with one
// value per feature in per-activation mode is refused as PyTorch does (checked elsewhere).
TEST(CpuPathsEdges, EmptyBatchEveryLayout) {
  for (const PathCase& k : path_cases()) {
    SCOPED_TRACE(k.path);
    auto e = k.extents;
    e[0] = 0;
    const Shape shape = bn_test::make_shape(e, k.layout);
    const std::int64_t F = batchnorm::feature_count(shape, k.mode);
    std::vector<float> none, w(F, 1.0f), b(F, 0.0f);
    const Outputs<float> r = run_all(shape, k.mode, none, none, none, w, b, true, true, true, true);
    EXPECT_EQ(r.running_mean, std::vector<float>(F, 0.5f));  // untouched
    EXPECT_EQ(r.grad_weight, std::vector<float>(F, 0.0f));
    EXPECT_EQ(r.statistics[0], 0.0);
  }
}

// A large unfused shape: forward equals local_statistics → merge → normalize bit for bit (the
// fused and the split paths compute the statistics with the same chunks).
TEST(CpuPathsEdges, UnfusedForwardIsThePhases) {
  namespace phases = batchnorm::phases;
  const Shape shape({2, 3, 200003});
  const std::int64_t F = 3, numel = shape.numel();
  const auto x = bnref::cast<float>(bnref::normal(numel, 61, 1e4, 1.0));
  std::vector<float> y(numel), y2(numel), sm(F), si(F);
  batchnorm::ForwardArgs<float> fa;
  fa.x = x.data();
  fa.y = y.data();
  fa.save_mean = sm;
  fa.save_invstd = si;
  batchnorm::forward(cpu{}, shape, fa, {});
  std::vector<double> norm = one_shard_normalization(shape, F, x.data());
  phases::NormalizeArgs<float> na;
  na.x = x.data();
  na.y = y2.data();
  na.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
  phases::normalize(cpu{}, shape, na, {});
  EXPECT_EQ(y, y2);
  for (std::int64_t f = 0; f < F; ++f) EXPECT_EQ(static_cast<float>(norm[1 + f]), sm[f]);
}

// Backward fuses a channel's two passes where its sums are one task and its inputs fit
// fused_backward_bytes: the path cases reach the loops their names say, and float
// (8, 64, 112, 112) (2 × 392 KiB a channel, unfused before that budget) is fused.
TEST(CpuPathsEdges, BackwardFusionFollowsItsBudget) {
  namespace ci = batchnorm::detail::cpu_impl;
  const Shape own({3, 2, 30001}), unfused({3, 2, 150001});
  auto fusable = [](auto element, const Shape& s, Activation a) {
    return ci::backward_fusable<decltype(element)>(s, Mode::per_channel, a);
  };
  EXPECT_TRUE(fusable(float{}, own, Activation::identity));
  EXPECT_FALSE(fusable(float{}, own, Activation::relu));
  EXPECT_FALSE(fusable(double{}, own, Activation::identity));
  EXPECT_FALSE(fusable(float{}, unfused, Activation::identity));
  EXPECT_TRUE(fusable(float{}, Shape({8, 64, 112, 112}), Activation::identity));
#if BN_TEST_HAVE_HALF
  EXPECT_TRUE(fusable(__half{}, own, Activation::relu));
  EXPECT_TRUE(fusable(__nv_bfloat16{}, own, Activation::relu));
#endif
}

#if defined(BATCHNORM_CPU_DISPATCH)
// The AVX2 and AVX-512 versions convert half values with F16C: they are chosen only on a
// processor that has it (CPUID leaf 1, ECX bit 29, read here independently).
TEST(CpuPathsEdges, InstructionSetVersionsNeedF16C) {
  namespace ci = batchnorm::detail::cpu_impl;
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = ::__get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && ((ecx >> 29) & 1u) != 0;
  EXPECT_EQ(ci::processor_has_f16c(), f16c);
  if (!f16c) {
    EXPECT_EQ(ci::best_isa(), ci::Isa::baseline);
  }
}
#endif

}  // namespace
