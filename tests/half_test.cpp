// Mixed precision on the CPU backend (include/batchnorm/half.hpp): __half and __nv_bfloat16
// activations with float parameters, float running statistics and double accumulation.
//
// Reference: the double CPU path run on the same inputs rounded to the storage type (so
// both see identical values) with the same (float) parameters. The mixed path computes in
// double and rounds each output once, so the stated tolerances are half an ulp of the type
// plus nothing else:
//  - y, dx, dz: |got - ref| <= 2^-11 |ref| for __half (11-bit significand; 2^-25 absolute
//    below 2^-14, the subnormal spacing / 2), 2^-8 |ref| for bfloat16 (8-bit significand);
//  - running_mean, running_var, save_mean, save_invstd, grad_weight, grad_bias (float):
//    2^-24 |ref| (one float rounding), with the backward reference given the same saved
//    float statistics so that it differs only by the final roundings.
// Overflow cases after PyTorch's (#115500: half inputs near 65504 must not give inf/NaN
// statistics or running stats): float statistics, double accumulation, finite results.
//
// Needs <cuda_fp16.h>/<cuda_bf16.h> on the include path (the CUDA toolkit's include dir).
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#define BN_TEST_HAVE_HALF 1
#include <batchnorm/half.hpp>
#else
#define BN_TEST_HAVE_HALF 0
#endif

#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#if !BN_TEST_HAVE_HALF

TEST(Half, NeedsCudaHeaders) {
  GTEST_SKIP() << "<cuda_fp16.h> not on the include path: add "
                  "target_include_directories(cpu_half_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})";
}

#else

namespace bn = batchnorm;

namespace {

template <class T>
std::uint16_t bits(T v) {
  std::uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

template <class T>
T from_bits(std::uint16_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = b;
    return __half(r);
  } else {
    __nv_bfloat16_raw r;
    r.x = b;
    return __nv_bfloat16(r);
  }
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, __half> ? "__half" : "__nv_bfloat16";
}

/// Half an ulp, relative: the most one rounding to T can move a value.
template <class T>
double half_ulp() {
  return std::is_same_v<T, __half> ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

/// Below the smallest normal, the spacing is fixed: half of it, absolute.
template <class T>
double half_ulp_abs() {
  return std::is_same_v<T, __half> ? std::ldexp(1.0, -25) : std::ldexp(1.0, -134);
}

template <class T>
void expect_rounded_from(const std::vector<T>& got, const std::vector<double>& ref, const char* what) {
  ASSERT_EQ(got.size(), ref.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = bn::to_double(got[i]);
    // 1e-12 relative slack: the reference's own double rounding differs in the last bits.
    const double tol = half_ulp<T>() * std::fabs(ref[i]) * (1 + 1e-9) + half_ulp_abs<T>() + 1e-12 * std::fabs(ref[i]);
    EXPECT_NEAR(g, ref[i], tol) << what << "[" << i << "] (" << type_name<T>() << ")";
  }
}

void expect_float_of(const std::vector<float>& got, const std::vector<double>& ref, const char* what) {
  ASSERT_EQ(got.size(), ref.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(static_cast<double>(got[i]), ref[i], std::ldexp(std::fabs(ref[i]), -24) * (1 + 1e-6) + 1e-300)
        << what << "[" << i << "]";
}

std::vector<double> to_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

struct Case {
  bn::Shape shape;
  bn::Mode mode;
  bool training;
  double offset;  ///< mean of the data
  double scale;   ///< its spread
};

std::string describe(const Case& k) {
  std::ostringstream os;
  os << k.shape << (k.mode == bn::Mode::per_channel ? " per_channel" : " per_activation")
     << (k.training ? " training" : " eval") << " offset " << k.offset << " scale " << k.scale;
  return os.str();
}

/// Forward + backward of the mixed type T against the double reference.
template <class T>
void check_against_double(const Case& k) {
  const std::int64_t f = bn::feature_count(k.shape, k.mode);
  const auto numel = static_cast<std::size_t>(k.shape.numel());
  std::mt19937 rng(static_cast<unsigned>(numel * 7 + static_cast<std::size_t>(f)));
  std::normal_distribution<double> d(0.0, 1.0);
  // Inputs rounded to T; the reference sees exactly those values.
  std::vector<T> x(numel), dy(numel);
  std::vector<double> xd(numel), dyd(numel);
  for (std::size_t i = 0; i < numel; ++i) {
    x[i] = bn::from_double<T>(k.offset + k.scale * d(rng));
    xd[i] = bn::to_double(x[i]);
    dy[i] = bn::from_double<T>(d(rng));
    dyd[i] = bn::to_double(dy[i]);
  }
  std::vector<float> weight, bias, rm, rv;
  for (std::int64_t i = 0; i < f; ++i) {
    weight.push_back(0.5f + 0.25f * static_cast<float>(i % 5) - static_cast<float>(i % 2));
    bias.push_back(0.1f * static_cast<float>(i % 7) - 0.2f);
    rm.push_back(static_cast<float>(k.offset) + 0.5f * static_cast<float>(i % 3));
    rv.push_back(static_cast<float>(k.scale * k.scale) * (0.75f + 0.125f * static_cast<float>(i % 4)));
  }
  std::vector<double> weight_d(weight.begin(), weight.end()), bias_d(bias.begin(), bias.end());
  std::vector<double> rm_d(rm.begin(), rm.end()), rv_d(rv.begin(), rv.end());
  std::vector<float> save_mean(weight.size()), save_invstd(weight.size());
  std::vector<double> save_mean_d(weight.size()), save_invstd_d(weight.size());

  bn::ForwardConfig fc;
  fc.mode = k.mode;
  fc.batch_statistics = k.training;
  std::vector<T> y(numel);
  {
    bn::ForwardArgs<T> a;
    a.x = x.data();
    a.y = y.data();
    a.weight = bn::span<const float>(weight.data(), f);
    a.bias = bn::span<const float>(bias.data(), f);
    a.running_mean = bn::span<float>(rm);
    a.running_var = bn::span<float>(rv);
    a.save_mean = bn::span<float>(save_mean);
    a.save_invstd = bn::span<float>(save_invstd);
    bn::forward(bn::cpu{}, k.shape, a, fc);
  }
  std::vector<double> yd(numel);
  {
    bn::ForwardArgs<double> a;
    a.x = xd.data();
    a.y = yd.data();
    a.weight = bn::span<const double>(weight_d.data(), f);
    a.bias = bn::span<const double>(bias_d.data(), f);
    a.running_mean = bn::span<double>(rm_d);
    a.running_var = bn::span<double>(rv_d);
    a.save_mean = bn::span<double>(save_mean_d);
    a.save_invstd = bn::span<double>(save_invstd_d);
    bn::forward(bn::cpu{}, k.shape, a, fc);
  }
  expect_rounded_from(y, yd, "y");
  expect_float_of(rm, rm_d, "running_mean");
  expect_float_of(rv, rv_d, "running_var");
  expect_float_of(save_mean, save_mean_d, "save_mean");
  expect_float_of(save_invstd, save_invstd_d, "save_invstd");

  // Backward: the reference gets the same float saved statistics, so only roundings differ.
  bn::BackwardConfig bc;
  bc.mode = k.mode;
  bc.batch_statistics = k.training;
  std::vector<T> dx(numel);
  std::vector<float> gw(weight.size()), gb(weight.size());
  {
    bn::BackwardArgs<T> a;
    a.x = x.data();
    a.dy = dy.data();
    a.dx = dx.data();
    a.weight = bn::span<const float>(weight.data(), f);
    a.mean = bn::span<const float>(save_mean.data(), f);
    a.invstd = bn::span<const float>(save_invstd.data(), f);
    a.grad_weight = bn::span<float>(gw);
    a.grad_bias = bn::span<float>(gb);
    bn::backward(bn::cpu{}, k.shape, a, bc);
  }
  const auto mean_f = to_doubles(save_mean), invstd_f = to_doubles(save_invstd);
  std::vector<double> dxd(numel), gwd(weight.size()), gbd(weight.size());
  {
    bn::BackwardArgs<double> a;
    a.x = xd.data();
    a.dy = dyd.data();
    a.dx = dxd.data();
    a.weight = bn::span<const double>(weight_d.data(), f);
    a.mean = bn::span<const double>(mean_f.data(), f);
    a.invstd = bn::span<const double>(invstd_f.data(), f);
    a.grad_weight = bn::span<double>(gwd);
    a.grad_bias = bn::span<double>(gbd);
    bn::backward(bn::cpu{}, k.shape, a, bc);
  }
  expect_rounded_from(dx, dxd, "dx");
  expect_float_of(gw, gwd, "grad_weight");
  expect_float_of(gb, gbd, "grad_bias");
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const bn::Shape shapes[] = {bn::Shape{32, 5},
                              bn::Shape{4, 3, 9},
                              bn::Shape{3, 4, 5, 6},
                              bn::Shape({3, 4, 5, 6}, bn::Layout::channels_last),
                              bn::Shape{2, 3, 2, 3, 4},
                              bn::Shape({2, 3, 2, 3, 4}, bn::Layout::channels_last)};
  for (const auto& s : shapes)
    for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
      for (const bool training : {true, false}) {
        out.push_back({s, mode, training, 0.0, 1.0});
        out.push_back({s, mode, training, 100.0, 0.01});  // offset much larger than spread
        out.push_back({s, mode, training, -3.0, 20.0});
      }
  return out;
}

template <class T>
void all_cases() {
  for (const auto& k : cases()) {
    SCOPED_TRACE(describe(k));
    check_against_double<T>(k);
  }
}

}  // namespace

// ---- conversions -------------------------------------------------------------------------

TEST(HalfConvert, EveryHalfRoundTripsExactly) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = from_bits<__half>(static_cast<std::uint16_t>(b));
    const double v = bn::to_double(h);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(bn::to_double(bn::from_double<__half>(v))));
      continue;
    }
    ASSERT_EQ(bits(bn::from_double<__half>(v)), b) << "bits " << b << " value " << v;
  }
}

TEST(HalfConvert, EveryBfloat16RoundTripsExactly) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = from_bits<__nv_bfloat16>(static_cast<std::uint16_t>(b));
    const double v = bn::to_double(h);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(bn::to_double(bn::from_double<__nv_bfloat16>(v))));
      continue;
    }
    ASSERT_EQ(bits(bn::from_double<__nv_bfloat16>(v)), b) << "bits " << b << " value " << v;
  }
}

TEST(HalfConvert, NarrowingRoundsOnceToNearestEven) {
  // Just above a tie: rounds up. Through float first, the 2^-40 would be lost and the tie
  // would round to even (down): the double-rounding error half.hpp avoids.
  const double above_tie_half = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  EXPECT_EQ(bn::to_double(bn::from_double<__half>(above_tie_half)), 1.0 + std::ldexp(1.0, -10));
  const double above_tie_bf16 = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  EXPECT_EQ(bn::to_double(bn::from_double<__nv_bfloat16>(above_tie_bf16)), 1.0 + std::ldexp(1.0, -7));
  // Exact ties go to even.
  EXPECT_EQ(bn::to_double(bn::from_double<__half>(1.0 + std::ldexp(1.0, -11))), 1.0);
  EXPECT_EQ(bn::to_double(bn::from_double<__half>(1.0 + 3 * std::ldexp(1.0, -11))), 1.0 + std::ldexp(1.0, -9));
  // Range: 65504 is the largest half; 65520 and up round to inf.
  EXPECT_EQ(bn::to_double(bn::from_double<__half>(65519.0)), 65504.0);
  EXPECT_TRUE(std::isinf(bn::to_double(bn::from_double<__half>(65520.0))));
  EXPECT_TRUE(std::isinf(bn::to_double(bn::from_double<__nv_bfloat16>(1e39))));
  EXPECT_EQ(bn::to_double(bn::from_double<__half>(std::ldexp(1.0, -24))), std::ldexp(1.0, -24));  // subnormal
  EXPECT_TRUE(std::signbit(bn::to_double(bn::from_double<__half>(-0.0))));
}

// ---- forward / backward against the double reference -----------------------------------

TEST(HalfVsDouble, HalfForwardBackward) { all_cases<__half>(); }

TEST(HalfVsDouble, Bfloat16ForwardBackward) { all_cases<__nv_bfloat16>(); }

TEST(HalfVsDouble, LayerClassWithHalfStorageAndFloatParameters) {
  static_assert(std::is_same_v<bn::BatchNorm2d<__half, bn::cpu>::param_type, float>);
  const bn::Shape shape{4, 3, 2, 5};
  const auto numel = static_cast<std::size_t>(shape.numel());
  std::vector<__half> x(numel), y(numel), dy(numel), dx(numel), z(numel), dz(numel);
  std::vector<double> xd(numel), dyd(numel), yd(numel), dxd(numel);
  for (std::size_t i = 0; i < numel; ++i) {
    x[i] = bn::from_double<__half>(std::sin(0.37 * static_cast<double>(i)) * 3.0 + 1.0);
    xd[i] = bn::to_double(x[i]);
    dy[i] = bn::from_double<__half>(std::cos(0.11 * static_cast<double>(i)));
    dyd[i] = bn::to_double(dy[i]);
  }
  bn::BatchNorm2d<__half, bn::cpu> h(3);
  bn::BatchNorm2d<double, bn::cpu> d(3);
  for (int step = 0; step < 3; ++step) {
    h.forward(x.data(), y.data(), shape);
    d.forward(xd.data(), yd.data(), shape);
  }
  expect_rounded_from(y, yd, "y");
  h.backward(x.data(), dy.data(), dx.data(), shape);
  d.backward(xd.data(), dyd.data(), dxd.data(), shape);
  // Saved statistics are float in h, double in d: dx agrees to half an ulp plus float noise.
  for (std::size_t i = 0; i < numel; ++i)
    EXPECT_NEAR(bn::to_double(dx[i]), dxd[i], std::ldexp(std::fabs(dxd[i]), -11) + 1e-6) << i;
  expect_float_of(h.state().running_var, d.state().running_var, "running_var");
  EXPECT_EQ(h.num_batches_tracked(), 3);
  // The fused path works in half too.
  h.forward_relu(x.data(), x.data(), z.data(), shape);
  h.backward_relu(x.data(), z.data(), dy.data(), dx.data(), dz.data(), shape);
  for (std::size_t i = 0; i < numel; ++i) EXPECT_GE(bn::to_double(z[i]), 0.0);
}

// ---- overflow: float statistics keep half data near its range finite ----------------------

namespace {

template <class T>
struct Overflow {
  std::vector<T> y;
  std::vector<float> save_mean, save_invstd, running_mean, running_var;
};

template <class T>
Overflow<T> train_step(const std::vector<T>& x, const bn::Shape& shape) {
  bn::BatchNorm2d<T, bn::cpu> layer(shape.channels());
  Overflow<T> o;
  o.y.resize(x.size());
  layer.forward(x.data(), o.y.data(), shape);
  const auto s = layer.state();
  o.running_mean = s.running_mean;
  o.running_var = s.running_var;
  o.save_mean.assign(layer.save_mean_data(), layer.save_mean_data() + shape.channels());
  o.save_invstd.assign(layer.save_invstd_data(), layer.save_invstd_data() + shape.channels());
  return o;
}

template <class T>
void expect_all_finite(const Overflow<T>& o) {
  for (const T v : o.y) ASSERT_TRUE(std::isfinite(bn::to_double(v)));
  for (const auto* v : {&o.save_mean, &o.save_invstd, &o.running_mean, &o.running_var})
    for (const float e : *v) ASSERT_TRUE(std::isfinite(e)) << e;
}

}  // namespace

TEST(HalfOverflow, ValuesNear65504GiveFiniteStatistics) {
  // All inputs in [60000, 65504]: Σx and Σ(x - mean)^2 overflow half (and x^2 alone does),
  // mean ≈ 62750, variance ≈ 2.5e6 — far beyond half, easy for float statistics.
  const bn::Shape shape{8, 2, 16, 16};
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(60000.0, 65504.0);
  std::vector<__half> x(static_cast<std::size_t>(shape.numel()));
  for (auto& v : x) v = bn::from_double<__half>(u(rng));
  const auto o = train_step(x, shape);
  expect_all_finite(o);
  for (int c = 0; c < 2; ++c) {
    EXPECT_NEAR(o.save_mean[static_cast<std::size_t>(c)], 62752.0, 200.0);
    EXPECT_GT(o.running_var[static_cast<std::size_t>(c)], 1e5f);  // 0.9 * 1 + 0.1 * ~2.5e6
  }
  for (const __half v : o.y) EXPECT_LE(std::fabs(bn::to_double(v)), 1.8);  // uniform: |z| <= sqrt(3)
}

TEST(HalfOverflow, AlternatingPlusMinus65504) {
  // mean 0, biased variance 65504^2 ≈ 4.29e9 (inf in half): y = ±1 (to half precision),
  // running_var = 0.9 + 0.1 * 65504^2 * n / (n - 1).
  const bn::Shape shape{4, 3, 4, 4};
  std::vector<__half> x(static_cast<std::size_t>(shape.numel()));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = bn::from_double<__half>(i % 2 ? 65504.0 : -65504.0);
  const auto o = train_step(x, shape);
  expect_all_finite(o);
  const double n = 4 * 16;
  for (std::size_t c = 0; c < 3; ++c) {
    EXPECT_NEAR(o.save_mean[c], 0.0f, 1e-9 * 65504.0);  // exactly 0 in exact arithmetic
    EXPECT_NEAR(o.running_var[c], 0.9 + 0.1 * 65504.0 * 65504.0 * n / (n - 1), 1e3);
  }
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(bn::to_double(o.y[i]), i % 2 ? 1.0 : -1.0, 1e-3) << i;
}

TEST(HalfOverflow, ConstantMaxValueGivesBiasExactly) {
  // Zero variance at the top of the range: (x - mean) = 0, so y = bias exactly, no NaN.
  const bn::Shape shape{4, 2, 3, 3};
  std::vector<__half> x(static_cast<std::size_t>(shape.numel()), bn::from_double<__half>(65504.0));
  bn::BatchNorm2d<__half, bn::cpu> layer(2);
  auto s = layer.state();
  s.bias = {0.5f, -0.25f};
  layer.load_state(s);
  std::vector<__half> y(x.size());
  layer.forward(x.data(), y.data(), shape);
  for (std::size_t i = 0; i < y.size(); ++i) EXPECT_EQ(bn::to_double(y[i]), (i / 9) % 2 ? -0.25 : 0.5) << i;
  const auto st = layer.state();
  EXPECT_FLOAT_EQ(st.running_mean[0], 0.1f * 65504.0f);
  EXPECT_FLOAT_EQ(st.running_var[0], 0.9f);
  // Eval with those running stats: finite.
  layer.eval();
  layer.forward(x.data(), y.data(), shape);
  for (const __half v : y) EXPECT_TRUE(std::isfinite(bn::to_double(v)));
}

TEST(HalfOverflow, EvalWithHugeRunningVarianceIsFinite) {
  // Running stats accumulated from near-max batches, then eval on ordinary data.
  const bn::Shape shape{4, 3, 4, 4};
  std::vector<__half> big(static_cast<std::size_t>(shape.numel())), small(big.size()), y(big.size());
  for (std::size_t i = 0; i < big.size(); ++i) {
    big[i] = bn::from_double<__half>(i % 2 ? 65504.0 : -65504.0);
    small[i] = bn::from_double<__half>(static_cast<double>(i % 7) - 3.0);
  }
  bn::BatchNorm2d<__half, bn::cpu> layer(3);
  for (int i = 0; i < 10; ++i) layer.forward(big.data(), y.data(), shape);
  layer.eval();
  layer.forward(small.data(), y.data(), shape);
  for (const __half v : y) ASSERT_TRUE(std::isfinite(bn::to_double(v)));
  for (const float v : layer.state().running_var) EXPECT_TRUE(std::isfinite(v));
}

TEST(HalfOverflow, Bfloat16NearItsMax) {
  // bfloat16 reaches 3.39e38. Alternating ±3e38: the normalized output is ±1 and the mean
  // is finite. The variance (9e76) exceeds float itself, so running_var, a float as in
  // PyTorch's mixed mode, becomes +inf there (PyTorch's float running_var would too) — a
  // limit of float statistics, not of the accumulation. At ±1e19 (variance 1e38 < float
  // max) everything is finite. (Even spatial size: each channel gets as many +m as -m.)
  const bn::Shape shape{4, 2, 4, 4};
  for (const double m : {3e38, 1e19}) {
    SCOPED_TRACE(m);
    std::vector<__nv_bfloat16> x(static_cast<std::size_t>(shape.numel()));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = bn::from_double<__nv_bfloat16>(i % 2 ? m : -m);
    const auto o = train_step(x, shape);
    for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(bn::to_double(o.y[i]), i % 2 ? 1.0 : -1.0, 1e-2) << i;
    for (const float v : o.save_mean) EXPECT_TRUE(std::isfinite(v));
    for (const float v : o.running_mean) EXPECT_TRUE(std::isfinite(v));
    if (m < 1e30) expect_all_finite(o);
  }
}

#endif  // BN_TEST_HAVE_HALF
