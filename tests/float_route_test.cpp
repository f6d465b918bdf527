// The float routes of half / bfloat16 normalization and input gradient (detail/cpu/float_route.hpp)
// give exactly the bits of the double formulas, y = round_T(act((x − mean)·scale + bias)) and
// dx = round_T(g·dy_scale + ((x − mean) − shift)·xmu_scale + constant): for every one of the 65536
// inputs of each type, with coefficients drawn over many magnitudes and chosen to put results on,
// next to and around rounding boundaries, near 0, in half's subnormals and beyond its range, with
// and without relu, through the planes (NCHW) and the rows (channels-last) loops, in place, and
// for every instruction set the loops are compiled for. And the route does take typical data
// (a route that always fell back to double would pass the rest).
#include <gtest/gtest.h>

#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/detail/cpu/kernels.hpp>
#include <batchnorm/half.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace ci = batchnorm::detail::cpu_impl;
using batchnorm::Activation;
using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::Shape;
using batchnorm::detail::Affine;
using batchnorm::detail::convert;

template <class T>
class FloatRoute : public ::testing::Test {};
using HalfTypes = ::testing::Types<__half, __nv_bfloat16>;
TYPED_TEST_SUITE(FloatRoute, HalfTypes);

template <class T>
T from_bits(std::uint16_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof b);
  return v;
}
template <class T>
std::uint16_t to_bits(T v) {
  std::uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

struct Coefficients {
  double mean, scale, bias;
};

// Coefficients for (x − mean)·scale + bias: random over many magnitudes, results cancelling to
// near 0, large offsets, results exactly on (ties) and a float ulp or less off the rounding
// boundaries of values near 1, tiny and huge scales (half: subnormal and overflowing results).
std::vector<Coefficients> coefficient_sets() {
  std::vector<Coefficients> sets = {
      {0.0, 1.0, 0.0},                     // y = x: every result a value of T
      {0.0, 1.0, 0x1p-8},                  // bfloat16 ties for x in [1, 2)
      {0.0, 1.0, 0x1p-11},                 // half ties for x in [1, 2)
      {0.0, 1.0, 0x1p-8 + 0x1p-30},        // a hair above the ties (below a float ulp of 1)
      {0.0, 1.0, 0x1p-11 - 0x1p-31},       // a hair below
      {0.0, 1.0, 0x1p-8 + 0x1p-22},        // a float ulp or two above
      {0x1p-40, 1.0 + 0x1p-30, 0x1p-8},    // coefficients that are not floats
      {0.3, 0.7, 0.1},                     // typical
      {1.0e4, 1.0e-3, 0.5},                // large offset
      {-2.5, 3.0, 7.5},                    // results cancelling to 0 at x = 0
      {0.0, 0x1p-20, 0.0},                 // tiny results (half: subnormal)
      {0.0, 0x1p20, 0.0},                  // huge results (half: overflow to inf)
      {1.0, 0x1p-130, 0.0},                // scale too small for a float: the double formula
      {0.0, 1.0e30, 1.0},                  // mean·scale beyond the bound's range
  };
  std::mt19937_64 gen(20261205);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int i = 0; i < 18; ++i) {
    Coefficients c{u(gen) * std::pow(10.0, 4.0 * u(gen)), std::pow(10.0, 3.0 * u(gen)), u(gen) * std::pow(10.0, 2.0 * u(gen))};
    if (i % 3 == 0) c.bias = -c.mean * c.scale;  // results near 0 around x = mean
    sets.push_back(c);
  }
  return sets;
}

template <class T>
std::vector<T> every_value() {
  std::vector<T> x(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) x[b] = from_bits<T>(static_cast<std::uint16_t>(b));
  return x;
}

/// The double formula, one value: what every path must give.
template <class T>
std::uint16_t expected(T x, const Coefficients& c, bool relu) {
  double v = (convert<T>::to_double(x) - c.mean) * c.scale + c.bias;
  if (relu) batchnorm::detail::apply_relu(v);
  return to_bits(convert<T>::from_double(v));
}

Affine<double> affine_of(const Coefficients& c) { return {1.0, 0.0, c.mean, c.scale, c.bias}; }

/// normalize_elements for every instruction set; calls check(isa) after each.
template <class Check>
void for_each_isa(Check&& check) {
  const int best = static_cast<int>(ci::best_isa()), before = ci::isa_in_use().load();
  for (int isa = 0; isa <= best; ++isa) {
    ci::isa_in_use() = isa;
    check(isa);
  }
  ci::isa_in_use() = before;
}

// Planes (NCHW, one channel of 65536 values: every input once), separate buffers and in place.
TYPED_TEST(FloatRoute, PlanesGiveTheDoubleFormulasBitsForEveryInput) {
  using T = TypeParam;
  const std::vector<T> x = every_value<T>();
  const Shape shape(1, 1, 256, 256);
  for (const Coefficients& c : coefficient_sets())
    for (const bool relu : {false, true}) {
      SCOPED_TRACE(::testing::Message() << std::hexfloat << "mean " << c.mean << " scale " << c.scale << " bias "
                                        << c.bias << (relu ? " relu" : ""));
      std::vector<std::uint16_t> want(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) want[i] = expected(x[i], c, relu);
      const Affine<double> a = affine_of(c);
      for_each_isa([&](int isa) {
        for (const bool in_place : {false, true}) {
          std::vector<T> y = in_place ? x : std::vector<T>(x.size());
          ci::normalize_elements(shape, Mode::per_channel, in_place ? y.data() : x.data(), static_cast<const T*>(nullptr),
                                 relu ? Activation::relu : Activation::identity, &a, y.data());
          int failures = 0;
          for (std::size_t i = 0; i < x.size(); ++i)
            if (to_bits(y[i]) != want[i] && ++failures <= 5)
              ADD_FAILURE() << "isa " << isa << (in_place ? " in place" : "") << ": x bits 0x" << std::hex << i
                            << " gave 0x" << to_bits(y[i]) << ", want 0x" << want[i];
        }
      });
    }
}

// Rows (channels-last, one channel per coefficient set, every input in each channel: per-lane
// routes), with one run where a lane's coefficients do not fit a float (the double formula for all).
TYPED_TEST(FloatRoute, RowsGiveTheDoubleFormulasBitsForEveryInput) {
  using T = TypeParam;
  const std::vector<T> values = every_value<T>();
  std::vector<Coefficients> sets = coefficient_sets();
  for (const bool with_unusable : {false, true}) {
    std::vector<Coefficients> lanes;
    for (const Coefficients& c : sets)
      if (with_unusable || ci::float_route(c.mean, c.scale, c.bias).usable) lanes.push_back(c);
    const std::int64_t C = static_cast<std::int64_t>(lanes.size()), rows = 65536;
    const Shape shape({16, C, 64, 64}, Layout::channels_last);
    std::vector<T> x(static_cast<std::size_t>(rows * C));
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t ch = 0; ch < C; ++ch) x[r * C + ch] = values[(r + 4099 * ch) % 65536];
    std::vector<Affine<double>> affine;
    for (const Coefficients& c : lanes) affine.push_back(affine_of(c));
    for (const bool relu : {false, true}) {
      std::vector<std::uint16_t> want(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) want[i] = expected(x[i], lanes[i % C], relu);
      for_each_isa([&](int isa) {
        for (const bool in_place : {false, true}) {
          std::vector<T> y = in_place ? x : std::vector<T>(x.size());
          ci::normalize_elements(shape, Mode::per_channel, in_place ? y.data() : x.data(), static_cast<const T*>(nullptr),
                                 relu ? Activation::relu : Activation::identity, affine.data(), y.data());
          int failures = 0;
          for (std::size_t i = 0; i < x.size(); ++i)
            if (to_bits(y[i]) != want[i] && ++failures <= 5) {
              const Coefficients& c = lanes[i % C];
              ADD_FAILURE() << "isa " << isa << (in_place ? " in place" : "") << (relu ? " relu" : "")
                            << (with_unusable ? " (a lane off the route)" : "") << std::hexfloat << ", mean "
                            << c.mean << " scale " << c.scale << " bias " << c.bias << ": x bits 0x" << std::hex
                            << to_bits(x[i]) << " gave 0x" << to_bits(y[i]) << ", want 0x" << want[i];
            }
        }
      });
    }
  }
}

// The input gradient's route: dx = g·dy_scale + ((x − mean) − shift)·xmu_scale + constant, g = dy
// masked by relu where y <= 0, against the double formula (input_gradient_value): every x with
// random dy (a seventh of them 1000 times larger, so that either term dominates) and y, for
// coefficients over many magnitudes, through the planes loop and the rows loop (per-lane
// routes; one lane off the route in a second run), in place (dx = dy), every instruction set.
struct GradientCoefficients {
  double mean, shift, dy_scale, xmu_scale, constant;
};

std::vector<GradientCoefficients> gradient_coefficient_sets() {
  std::vector<GradientCoefficients> sets = {
      {0.0, 0.0, 1.0, 0.0, 0.0},              // dx = g: every result a value of T
      {0.3, 1e-3, 0.8, -0.05, 0.01},          // typical
      {1.0e4, 0.1, 1e-2, 1e-4, 0.0},          // large offset
      {0.0, 0.0, 1.0, 1.0, 0x1p-8},           // ties where g + x lands on them
      {0.0, 0.0, 0x1p-20, 0x1p-20, 0.0},      // tiny results (half: subnormal)
      {0.0, 0.0, 1.0, 0x1p-130, 0.0},         // a coefficient too small for a float: double
  };
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int i = 0; i < 14; ++i)
    sets.push_back({u(gen) * std::pow(10.0, 2.0 * u(gen)), u(gen) * 1e-3, std::pow(10.0, u(gen)),
                    u(gen) * std::pow(10.0, 2.0 * u(gen)), i % 4 == 0 ? 0.0 : u(gen) * std::pow(10.0, u(gen))});
  return sets;
}

template <class T>
std::uint16_t expected_gradient(T x, T dy, T y, const GradientCoefficients& c, bool relu) {
  double g = convert<T>::to_double(dy), v;
  if (relu) g = batchnorm::detail::relu_backward(g, convert<T>::to_double(y));
  batchnorm::detail::cpu_impl::input_gradient_value<true>(v, g, convert<T>::to_double(x), c.mean, c.shift, c.dy_scale,
                                                          c.xmu_scale, c.constant);
  return to_bits(convert<T>::from_double(v));
}

template <class T>
void random_gradients(std::vector<T>& dy, std::vector<T>& y, std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  dy.resize(n);
  y.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    dy[i] = convert<T>::from_double(normal(gen) * (i % 7 == 0 ? 1e3 : 1.0));
    y[i] = convert<T>::from_double(normal(gen));
  }
}

TYPED_TEST(FloatRoute, InputGradientGivesTheDoubleFormulasBits) {
  using T = TypeParam;
  const std::vector<T> x = every_value<T>();
  std::vector<T> dy, y;
  random_gradients(dy, y, x.size(), 11);
  const std::int64_t n = static_cast<std::int64_t>(x.size());
  for (const GradientCoefficients& c : gradient_coefficient_sets())
    for (const bool relu : {false, true}) {
      SCOPED_TRACE(::testing::Message() << std::hexfloat << "mean " << c.mean << " shift " << c.shift << " dy_scale "
                                        << c.dy_scale << " xmu_scale " << c.xmu_scale << " constant " << c.constant
                                        << (relu ? " relu" : ""));
      std::vector<std::uint16_t> want(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) want[i] = expected_gradient(x[i], dy[i], y[i], c, relu);
      const ci::GradientLane lane{c.mean, c.shift, c.dy_scale, c.xmu_scale, c.constant};
      for_each_isa([&](int isa) {
        for (const bool in_place : {false, true}) {
          std::vector<T> dyv = dy, dx(x.size());
          T* out = in_place ? dyv.data() : dx.data();
          ci::run_vectorized([&] {
            if (relu)
              ci::input_gradient_run<true, true, false, true>(x.data(), dyv.data(), y.data(), out, static_cast<T*>(nullptr),
                                                              n, lane);
            else
              ci::input_gradient_run<false, true, false, true>(x.data(), dyv.data(), y.data(), out,
                                                               static_cast<T*>(nullptr), n, lane);
          });
          int failures = 0;
          for (std::size_t i = 0; i < x.size(); ++i)
            if (to_bits(out[i]) != want[i] && ++failures <= 5)
              ADD_FAILURE() << "isa " << isa << (in_place ? " in place" : "") << ": x bits 0x" << std::hex << i
                            << " dy 0x" << to_bits(dy[i]) << " gave 0x" << to_bits(out[i]) << ", want 0x" << want[i];
        }
      });
    }
}

TYPED_TEST(FloatRoute, RowsInputGradientGivesTheDoubleFormulasBits) {
  using T = TypeParam;
  const std::vector<T> values = every_value<T>();
  const std::vector<GradientCoefficients> sets = gradient_coefficient_sets();
  for (const bool with_unusable : {false, true}) {
    std::vector<GradientCoefficients> lanes;
    for (const GradientCoefficients& c : sets)
      if (with_unusable || ci::float_gradient_route(c.mean, c.shift, c.dy_scale, c.xmu_scale, c.constant).usable)
        lanes.push_back(c);
    // The sets repeated over more than two blocks of lanes and a tail, so that whole blocks take
    // the block loops (half under AVX-512: per-lane coefficient vectors) and the tail the rest.
    for (std::size_t j = 0, S = lanes.size(); lanes.size() < static_cast<std::size_t>(2 * ci::float_route_block + 3); ++j)
      lanes.push_back(lanes[j % S]);
    const std::int64_t W = static_cast<std::int64_t>(lanes.size()), rows = 65536;
    std::vector<T> x(static_cast<std::size_t>(rows * W)), dy, y;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < W; ++j) x[r * W + j] = values[(r + 4099 * j) % 65536];
    random_gradients(dy, y, x.size(), 13);
    std::vector<double> m(W), sh(W), ds(W), xs(W), co(W);
    std::vector<float> route_arrays(ci::FloatGradientRouteLanes::count * W);
    ci::FloatGradientRouteLanes routes;
    routes.place(route_arrays.data(), W);
    for (std::int64_t j = 0; j < W; ++j) {
      const GradientCoefficients& c = lanes[j];
      m[j] = c.mean, sh[j] = c.shift, ds[j] = c.dy_scale, xs[j] = c.xmu_scale, co[j] = c.constant;
      routes.set(j, ci::float_gradient_route(c.mean, c.shift, c.dy_scale, c.xmu_scale, c.constant));
    }
    ASSERT_EQ(routes.usable, !with_unusable);
    for (const bool relu : {false, true}) {
      std::vector<std::uint16_t> want(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) want[i] = expected_gradient(x[i], dy[i], y[i], lanes[i % W], relu);
      for_each_isa([&](int isa) {
        std::vector<T> dx(x.size());
        ci::run_vectorized([&] {
          auto run = [&](auto relu_flag) {
            ci::input_gradient_rows<decltype(relu_flag)::value, true, false, true>(
                x.data(), dy.data(), y.data(), dx.data(), static_cast<T*>(nullptr), rows, W, W, m.data(), sh.data(),
                ds.data(), xs.data(), co.data(), false, routes);
          };
          if (relu) run(std::true_type{});
          else run(std::false_type{});
        });
        int failures = 0;
        for (std::size_t i = 0; i < x.size(); ++i)
          if (to_bits(dx[i]) != want[i] && ++failures <= 5)
            ADD_FAILURE() << "isa " << isa << (relu ? " relu" : "") << (with_unusable ? " (a lane off the route)" : "")
                          << ": lane " << std::dec << (i % W) << " x 0x" << std::hex << to_bits(x[i]) << " dy 0x"
                          << to_bits(dy[i]) << " gave 0x" << to_bits(dx[i]) << ", want 0x" << want[i];
      });
    }
  }
}

// Typical data (x ~ N(0.5, 2²), the coefficients of a trained layer) takes the normalize route: fewer than
// one block in 10 is redone in double for bfloat16, one in 3 for half (whose rounding intervals
// are 8 times narrower).
TYPED_TEST(FloatRoute, TypicalDataTakesTheRoute) {
  using T = TypeParam;
  using Format = typename convert<T>::format;
  std::mt19937 gen(7);
  std::normal_distribution<double> normal(0.5, 2.0);
  const ci::FloatRoute k = ci::float_route(0.47, 0.61, -0.2);
  ASSERT_TRUE(k.usable);
  const std::int64_t blocks = 4096, B = ci::float_route_block;
  std::int64_t missed_blocks = 0;
  for (std::int64_t b = 0; b < blocks; ++b) {
    std::uint32_t missed = 0;
    for (std::int64_t j = 0; j < B; ++j) {
      std::uint16_t out;
      missed |= ci::float_route_value<Format, false>(to_bits(convert<T>::from_double(normal(gen))), k, out);
    }
    missed_blocks += missed != 0;
  }
  const std::int64_t limit = Format::dropped_bits == 16 ? blocks / 10 : blocks / 3;
  EXPECT_LT(missed_blocks, limit) << missed_blocks << " of " << blocks << " blocks missed";
}

// Results on a rounding boundary (ties) or within the error bound of one are not taken from the
// float result: y = x + bias for x in [1, 2), bias a tie offset, or a tie offset plus 2^-22 (two
// float ulps of y: the float result is then on the far side of nothing, but the bound covers it).
TYPED_TEST(FloatRoute, ValuesNearABoundaryMissTheRoute) {
  using T = TypeParam;
  using Format = typename convert<T>::format;
  const double tie = std::ldexp(1.0, Format::dropped_bits - 24);  // half a step of T at 1
  for (const double bias : {tie, tie + 0x1p-22, tie - 0x1p-22}) {
    const ci::FloatRoute k = ci::float_route(0.0, 1.0, bias);
    ASSERT_TRUE(k.usable);
    int taken = 0;
    for (double x = 1.0; x < 2.0; x += 2.0 * tie) {  // every value of T in [1, 2)
      std::uint16_t out;
      taken += ci::float_route_value<Format, false>(to_bits(convert<T>::from_double(x)), k, out) == 0;
    }
    EXPECT_EQ(taken, 0) << std::hexfloat << "bias " << bias;
  }
}

}  // namespace

#else
TEST(FloatRoute, NeedsTheCudaHeaders) { GTEST_SKIP() << "<cuda_fp16.h> / <cuda_bf16.h> not found"; }
#endif
