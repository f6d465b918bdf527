// The CPU backend's branch-free half / bfloat16 conversions (detail/convert.hpp, used by
// <batchnorm/half.hpp>) give the same bits as the CUDA toolkit's host conversions: every
// 16-bit pattern widened, and doubles at, between, and one double-ulp around every rounding
// boundary narrowed, plus random doubles over the whole exponent range and the specials; and
// the same again through loops over arrays, compiled as the CPU backend compiles its own (for the
// best instruction set the processor has, vectorized), which must give the same bits.
#include <gtest/gtest.h>

#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/detail/cpu/kernels.hpp>
#include <batchnorm/half.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

namespace bits = batchnorm::detail::bits;

std::uint16_t raw(__half h) { return static_cast<__half_raw>(h).x; }
std::uint16_t raw(__nv_bfloat16 h) { return static_cast<__nv_bfloat16_raw>(h).x; }
__half make_half(std::uint16_t b) {
  __half_raw r;
  r.x = b;
  return __half(r);
}
__nv_bfloat16 make_bf16(std::uint16_t b) {
  __nv_bfloat16_raw r;
  r.x = b;
  return __nv_bfloat16(r);
}

/// Doubles that probe every rounding decision: each 16-bit value, the midpoints to its
/// neighbour, and the doubles one ulp either side of those, with random doubles and specials.
std::vector<double> probes(double (*widen)(std::uint16_t)) {
  std::vector<double> v;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const double a = widen(static_cast<std::uint16_t>(b));
    const double next = widen(static_cast<std::uint16_t>(b + 1 < 0x10000u ? b + 1 : b));
    if (!std::isfinite(a)) continue;
    const double mid = std::isfinite(next) ? a + (next - a) / 2 : a;
    for (double p : {a, mid, std::nextafter(mid, 0.0), std::nextafter(mid, 1e300), std::nextafter(mid, -1e300),
                     std::nextafter(a, 0.0), std::nextafter(a, 1e300)})
      v.push_back(p);
  }
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::uint64_t> any;
  for (int i = 0; i < 200000; ++i) {
    std::uint64_t u = any(rng);
    // exponents around the half / bfloat16 range, and anywhere
    if (i % 2) u = (u & 0x800fffffffffffffull) | (std::uint64_t(1023 - 30 + (i / 2) % 180 - 100) << 52);
    double d;
    std::memcpy(&d, &u, sizeof d);
    v.push_back(d);
  }
  for (double s : {0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e300, -1e300, 3.4e38, 3.3961e38,
                   std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::denorm_min(), 5.96e-8, 2.98e-8, 2.9802322387695312e-08,
                   std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::quiet_NaN(),
                   static_cast<double>(std::numeric_limits<float>::max()), 1.0e-45, 9.2e-41})
    v.push_back(s);
  return v;
}

TEST(HalfConversion, WideningMatchesTheToolkitForEveryPattern) {
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto u = static_cast<std::uint16_t>(b);
    const double h = bits::half_to_double(u), want_h = static_cast<double>(__half2float(make_half(u)));
    const double f = bits::bfloat16_to_double(u), want_f = static_cast<double>(__bfloat162float(make_bf16(u)));
    if (std::isnan(want_h)) EXPECT_TRUE(std::isnan(h)) << std::hex << b;
    else EXPECT_EQ(std::memcmp(&h, &want_h, sizeof h), 0) << std::hex << b << " " << h << " " << want_h;
    if (std::isnan(want_f)) EXPECT_TRUE(std::isnan(f)) << std::hex << b;
    else EXPECT_EQ(std::memcmp(&f, &want_f, sizeof f), 0) << std::hex << b << " " << f << " " << want_f;
  }
}

TEST(HalfConversion, HalfNarrowingMatchesDouble2Half) {
  int failures = 0;
  for (double d : probes(bits::half_to_double)) {
    const std::uint16_t got = bits::double_to_half(d), want = raw(__double2half(d));
    const bool nan = std::isnan(d);
    if (nan ? (got & 0x7fffu) <= 0x7c00u || (got & 0x7c00u) != 0x7c00u : got != want) {
      if (++failures < 10) ADD_FAILURE() << std::hexfloat << d << ": got 0x" << std::hex << got << ", toolkit 0x" << want;
    }
  }
  EXPECT_EQ(failures, 0);
}

TEST(HalfConversion, BFloat16NarrowingMatchesDouble2BFloat16) {
  int failures = 0;
  for (double d : probes(bits::bfloat16_to_double)) {
    const std::uint16_t got = bits::double_to_bfloat16(d), want = raw(__double2bfloat16(d));
    const bool nan = std::isnan(d);
    if (nan ? (got & 0x7fffu) <= 0x7f80u || (got & 0x7f80u) != 0x7f80u : got != want) {
      if (++failures < 10) ADD_FAILURE() << std::hexfloat << d << ": got 0x" << std::hex << got << ", toolkit 0x" << want;
    }
  }
  EXPECT_EQ(failures, 0);
}

/// Narrowing and widening over whole arrays, in the CPU backend's loop dispatch (run_vectorized:
/// the AVX2 or wider version where the processor has it, and the loops vectorize), against the
/// toolkit element by element.
TEST(HalfConversion, VectorizedLoopsGiveTheToolkitBits) {
  std::vector<std::uint16_t> patterns(0x10000);
  for (std::uint32_t b = 0; b < 0x10000u; ++b) patterns[b] = static_cast<std::uint16_t>(b);
  std::vector<double> wide_half(patterns.size()), wide_bf16(patterns.size());
  batchnorm::detail::cpu_impl::run_vectorized([&] {
    for (std::size_t i = 0; i < patterns.size(); ++i) wide_half[i] = bits::half_to_double(patterns[i]);
    for (std::size_t i = 0; i < patterns.size(); ++i) wide_bf16[i] = bits::bfloat16_to_double(patterns[i]);
  });
  int failures = 0;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const double want_h = static_cast<double>(__half2float(make_half(patterns[b])));
    const double want_f = static_cast<double>(__bfloat162float(make_bf16(patterns[b])));
    const bool ok_h = std::isnan(want_h) ? std::isnan(wide_half[b]) : std::memcmp(&wide_half[b], &want_h, 8) == 0;
    const bool ok_f = std::isnan(want_f) ? std::isnan(wide_bf16[b]) : std::memcmp(&wide_bf16[b], &want_f, 8) == 0;
    if ((!ok_h || !ok_f) && ++failures < 10) ADD_FAILURE() << "widening 0x" << std::hex << b;
  }
  for (auto widen : {bits::half_to_double, bits::bfloat16_to_double}) {
    const std::vector<double> in = probes(widen);
    std::vector<std::uint16_t> half(in.size()), bf16(in.size());
    batchnorm::detail::cpu_impl::run_vectorized([&] {
      for (std::size_t i = 0; i < in.size(); ++i) half[i] = bits::double_to_half(in[i]);
      for (std::size_t i = 0; i < in.size(); ++i) bf16[i] = bits::double_to_bfloat16(in[i]);
    });
    for (std::size_t i = 0; i < in.size(); ++i) {
      // NaN: the scalar tests above pin the NaN patterns; here the loops must agree with them
      const std::uint16_t want_h = std::isnan(in[i]) ? bits::double_to_half(in[i]) : raw(__double2half(in[i]));
      const std::uint16_t want_f =
          std::isnan(in[i]) ? bits::double_to_bfloat16(in[i]) : raw(__double2bfloat16(in[i]));
      if ((half[i] != want_h || bf16[i] != want_f) && ++failures < 10)
        ADD_FAILURE() << std::hexfloat << in[i] << ": half 0x" << std::hex << half[i] << " (want 0x" << want_h
                      << "), bf16 0x" << bf16[i] << " (want 0x" << want_f << ")";
    }
  }
  EXPECT_EQ(failures, 0);
}

}  // namespace

#else
TEST(HalfConversion, NeedsTheCudaHeaders) { GTEST_SKIP() << "<cuda_fp16.h> / <cuda_bf16.h> not found"; }
#endif
