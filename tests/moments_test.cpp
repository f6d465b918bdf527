// The arithmetic the CUDA kernels share with the CPU (detail/moments.hpp), exercised on the
// host in the GPU's precision: float Welford over x · prescale − pivot, split into chunks and
// merged with Chan's formula as the kernels do. CI has no GPU; this is where the GPU's
// numerics for large offsets and huge magnitudes are proven.
#include <batchnorm/detail/moments.hpp>
#include <gtest/gtest.h>

#include <cfloat>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif
#include <cmath>
#include <random>
#include <vector>

namespace d = batchnorm::detail;

namespace {

/// What a GPU reduction does for one feature: per-"thread" float Welford over chunks of the
/// pivoted values, then Chan merges in a tree.
d::Welford<float> gpu_like_welford(const std::vector<float>& x, const d::Pivot<float>& p, std::size_t chunk) {
  std::vector<d::Welford<float>> partials;
  for (std::size_t begin = 0; begin < x.size(); begin += chunk) {
    d::Welford<float> w;
    for (std::size_t i = begin; i < std::min(x.size(), begin + chunk); ++i) w.push(x[i] * p.prescale - p.value);
    partials.push_back(w);
  }
  while (partials.size() > 1) {
    std::vector<d::Welford<float>> next;
    for (std::size_t i = 0; i < partials.size(); i += 2)
      next.push_back(i + 1 < partials.size() ? d::merge(partials[i], partials[i + 1]) : partials[i]);
    partials = next;
  }
  return partials.front();
}

struct Exact {
  double mean, var, unbiased;
};
Exact exact(const std::vector<float>& x) {
  long double sum = 0;
  for (float v : x) sum += v;
  const long double mean = sum / x.size();
  long double m2 = 0;
  for (float v : x) m2 += (v - mean) * (v - mean);
  return {static_cast<double>(mean), static_cast<double>(m2 / x.size()), static_cast<double>(m2 / (x.size() - 1))};
}

std::vector<float> normal(std::size_t n, double offset, double scale, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g(0.0, 1.0);
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(offset + scale * g(rng));
  return x;
}

}  // namespace

TEST(Moments, WelfordAndChanMergeMatchTwoPassInDouble) {
  const auto x = normal(1000, 3.0, 2.0, 1);
  d::Welford<double> all, left, right;
  for (std::size_t i = 0; i < x.size(); ++i) {
    all.push(x[i]);
    (i < 377 ? left : right).push(x[i]);
  }
  const Exact e = exact(x);
  const auto merged = d::finalize(d::merge(left, right));
  EXPECT_NEAR(d::finalize(all).mean, e.mean, 1e-13);
  EXPECT_NEAR(merged.mean, e.mean, 1e-13);
  EXPECT_NEAR(merged.biased_var, e.var, 1e-12);
  EXPECT_NEAR(merged.unbiased_var, e.unbiased, 1e-12);
  // Merging with an empty side is the identity.
  EXPECT_EQ(d::merge(all, d::Welford<double>{}).m2, all.m2);
  EXPECT_EQ(d::merge(d::Welford<double>{}, all).mean, all.mean);
}

TEST(Moments, FinalizeKeepsNaNAndClampsNegativeRounding) {
  d::Welford<double> w;
  w.push(1.0);
  w.push(std::nan(""));
  EXPECT_TRUE(std::isnan(d::finalize(w).biased_var));
  EXPECT_FALSE(d::is_finite(d::finalize(w)));
  d::Welford<double> negative{5.0, -1e-18, 4};
  EXPECT_EQ(d::finalize(negative).biased_var, 0.0);
}

TEST(Moments, RunningUpdateUsesUnbiasedVariance) {
  double rm = 1.0, rv = 2.0;
  d::update_running(rm, rv, d::FeatureStats<double>{3.0, 4.0, 5.0}, 0.25);
  EXPECT_DOUBLE_EQ(rm, 0.25 * 3.0 + 0.75 * 1.0);
  EXPECT_DOUBLE_EQ(rv, 0.25 * 5.0 + 0.75 * 2.0);
}

TEST(Moments, BackwardShiftCorrectsARoundedSavedMean) {
  // Sums taken against a saved mean that is off by delta must give the gradients of the true mean.
  const auto x = normal(64, 0.0, 1.0, 2), dy = normal(64, 0.5, 1.0, 3);
  double mean = 0;
  for (float v : x) mean += v;
  mean /= x.size();
  const double delta = 1e-3, invstd = 0.7, weight = 1.3;
  d::BackwardSums<double> exact_sums, shifted_sums;
  for (std::size_t i = 0; i < x.size(); ++i) {
    exact_sums.dy += dy[i];
    exact_sums.dy_xmu += dy[i] * (x[i] - mean);
    exact_sums.xmu += x[i] - mean;
    shifted_sums.dy += dy[i];
    shifted_sums.dy_xmu += dy[i] * (x[i] - (mean + delta));
    shifted_sums.xmu += x[i] - (mean + delta);
  }
  const auto a = d::backward_coefficients(exact_sums, invstd, weight, 64, true);
  const auto b = d::backward_coefficients(shifted_sums, invstd, weight, 64, true);
  EXPECT_NEAR(a.grad_weight, b.grad_weight, 1e-12);
  EXPECT_NEAR(b.mean_shift, -delta, 1e-15);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double dx_a = dy[i] * a.dy_scale + ((x[i] - mean) - a.mean_shift) * a.xmu_scale + a.constant;
    const double dx_b = dy[i] * b.dy_scale + ((x[i] - (mean + delta)) - b.mean_shift) * b.xmu_scale + b.constant;
    EXPECT_NEAR(dx_a, dx_b, 1e-12);
  }
  // Eval: no shift, dx = dy * invstd * weight.
  const auto e = d::backward_coefficients(shifted_sums, invstd, weight, 64, false);
  EXPECT_EQ(e.mean_shift, 0.0);
  EXPECT_EQ(e.xmu_scale, 0.0);
  EXPECT_DOUBLE_EQ(e.dy_scale, invstd * weight);
}

TEST(Moments, PivotRescalesOnlyHugeOrTinyMagnitudes) {
  EXPECT_EQ(d::make_pivot(12345.0f).prescale, 1.0f);
  EXPECT_EQ(d::make_pivot(12345.0f).value, 12345.0f);
  EXPECT_EQ(d::make_pivot(0.0f).prescale, 1.0f);
  EXPECT_EQ(d::make_pivot(std::nanf("")).prescale, 1.0f);
  EXPECT_EQ(d::make_pivot(INFINITY).value, 0.0f);
  const auto huge = d::make_pivot(3e30f);
  EXPECT_LT(huge.prescale, 1e-29f);
  EXPECT_GT(std::fabs(huge.value), 0.5f);
  EXPECT_LE(std::fabs(huge.value), 1.0f);
  EXPECT_EQ(d::make_pivot(1e-30f).prescale, 1.0f);  // tiny data: var far below eps anyway
}

// The GPU's float statistics, for data at offsets and magnitudes where plain float Welford
// loses the mean's digits or overflows M2: mean and invstd within 1e-5 relative of exact.
TEST(Moments, PivotedFloatStatisticsAreAccurateAtAnyOffsetAndMagnitude) {
  struct Data {
    double offset, scale;
  };
  for (const Data data : {Data{0.0, 1.0}, Data{1e4, 1.0}, Data{1e6, 1.0}, Data{0.0, 1e-3}, Data{1e30, 1e29},
                          Data{0.0, 1e30}, Data{0.0, 1e36}, Data{1e-30, 1e-31}}) {
    for (std::size_t chunk : {1u, 7u, 256u, 5000u}) {
      const auto x = normal(5000, data.offset, data.scale, 4);
      const Exact e = exact(x);
      const auto p = d::make_pivot(x[0]);
      const auto r = d::finalize_pivoted(gpu_like_welford(x, p, chunk), p, 1e-5, 1.0f, 0.0f);
      SCOPED_TRACE(testing::Message() << "offset " << data.offset << " scale " << data.scale << " chunk " << chunk);
      const double true_invstd = 1.0 / std::sqrt(e.var + 1e-5);
      ASSERT_TRUE(std::isfinite(r.mean));
      ASSERT_TRUE(std::isfinite(r.invstd));
      EXPECT_NEAR(r.mean, e.mean, 2e-5 * std::sqrt(e.var) + 1e-7 * std::fabs(e.mean));
      EXPECT_NEAR(r.invstd, true_invstd, 1e-5 * true_invstd);
      // Normalized values: (x - mean) * invstd to 1e-4 of the exact one (O(1) values).
      for (std::size_t i = 0; i < x.size(); i += 97) {
        const double want = (x[i] - e.mean) * true_invstd;
        EXPECT_NEAR(r.affine.apply(x[i]), want, 1e-4 * (1.0 + std::fabs(want))) << i;
      }
      if (e.var < 1e37) {
        EXPECT_NEAR(r.stats.biased_var, e.var, 1e-5 * e.var + 1e-12);
      } else {
        EXPECT_TRUE(std::isinf(r.stats.biased_var));  // cannot be held in float; invstd above is still right
      }
    }
  }
}

TEST(Moments, PivotedStatisticsOfDataNearFloatMaxAreFinite) {
  std::vector<float> x;
  for (int i = 0; i < 100; ++i) x.push_back((i % 2 ? 3.0e38f : -3.0e38f) * (0.5f + 0.005f * static_cast<float>(i)));
  const auto p = d::make_pivot(x[0]);
  const auto r = d::finalize_pivoted(gpu_like_welford(x, p, 16), p, 1e-5, 1.0f, 0.0f);
  const Exact e = exact(x);
  EXPECT_TRUE(std::isfinite(r.mean));
  EXPECT_NEAR(r.invstd, 1.0 / std::sqrt(e.var), 1e-5 / std::sqrt(e.var));
  for (float v : x) EXPECT_TRUE(std::isfinite(r.affine.apply(v)));
}

TEST(Moments, ConstantFeatureIsExact) {
  const std::vector<float> x(1000, 7.3f);
  const auto p = d::make_pivot(x[0]);
  const auto r = d::finalize_pivoted(gpu_like_welford(x, p, 33), p, 1e-5, 2.0f, 0.25f);
  EXPECT_EQ(r.mean, 7.3f);
  EXPECT_EQ(r.stats.biased_var, 0.0f);
  EXPECT_EQ(r.affine.apply(7.3f), 0.25f);
}

namespace {

/// Flush-to-zero and denormals-are-zero on the host's SSE unit, for the span of a scope: the
/// float arithmetic of a GPU built with -ftz=true (or --use_fast_math). No-op elsewhere.
class FlushToZero {
 public:
  explicit FlushToZero(bool on) {
#if defined(__SSE__) || defined(__x86_64__)
    saved_ = _mm_getcsr();
    if (on) _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#else
    (void)on;
#endif
  }
  ~FlushToZero() {
#if defined(__SSE__) || defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  FlushToZero(const FlushToZero&) = delete;
  FlushToZero& operator=(const FlushToZero&) = delete;

 private:
  unsigned saved_ = 0;
};

}  // namespace

// Issue 11, item 1: a constant feature of any magnitude normalizes to exactly the bias and has
// invstd = 1/sqrt(eps), as on the CPU. With eps added in prescaled units (eps · s², s = 2^-e),
// eps · s² underflowed for |x| >~ 1e20 (>~ 2e16 with flush-to-zero): invstd = inf, y = NaN;
// and lost digits from ~1e19 (invstd 316.013 instead of 316.228).
TEST(Moments, ConstantFeatureAtAnyMagnitudeNormalizesToTheBias) {
  for (const bool ftz : {false, true}) {
    for (const float value : {7.25f, 1e4f, 4.5e9f, 2e16f, 1e19f, -1e19f, 1e20f, 3e25f, 1e30f, -1e35f, 3e38f,
                              FLT_MAX, -FLT_MAX}) {
      for (const double eps : {1e-5, 1e-3, 1.0}) {
        SCOPED_TRACE(testing::Message() << "value " << value << " eps " << eps << " ftz " << ftz);
        const FlushToZero mode(ftz);
        const std::vector<float> x(257, value);
        const auto p = d::make_pivot(x[0]);
        const auto r = d::finalize_pivoted(gpu_like_welford(x, p, 32), p, eps, 2.0f, 0.25f);
        const float want_invstd = 1.0f / std::sqrt(static_cast<float>(eps));
        EXPECT_EQ(r.mean, value);
        EXPECT_EQ(r.stats.biased_var, 0.0f);
        EXPECT_EQ(r.stats.unbiased_var, 0.0f);
        EXPECT_NEAR(r.invstd, want_invstd, 2e-7f * want_invstd);
        EXPECT_TRUE(std::isfinite(r.affine.scale)) << r.affine.scale;
        EXPECT_EQ(r.affine.apply(value), 0.25f);
        // weight 0 (zero-initialized last BN of a residual block) and a negative weight
        for (const float weight : {0.0f, -3.0f}) {
          const auto rw = d::finalize_pivoted(gpu_like_welford(x, p, 32), p, eps, weight, 0.25f);
          EXPECT_EQ(rw.affine.apply(value), 0.25f) << "weight " << weight;
        }
      }
    }
  }
}

// Around the same magnitudes, a feature that is not constant keeps an accurate invstd and
// normalization (the fix must not trade one regime for the other): spreads from 1e-3 relative
// (var >> eps) down to a few ulps, and with var comparable to eps in data units.
TEST(Moments, NearConstantFeatureAtLargeMagnitudeHasAccurateInvstd) {
  for (const bool ftz : {false, true}) {
    for (const double offset : {1e10, 1e19, 1e20, 1e30}) {
      for (const double relative_spread : {1e-3, 1e-6}) {
        SCOPED_TRACE(testing::Message() << "offset " << offset << " spread " << relative_spread << " ftz " << ftz);
        const FlushToZero mode(ftz);
        const auto x = normal(2000, offset, offset * relative_spread, 5);
        const Exact e = exact(x);
        const auto p = d::make_pivot(x[0]);
        const auto r = d::finalize_pivoted(gpu_like_welford(x, p, 64), p, 1e-5, 1.0f, 0.0f);
        const double true_invstd = 1.0 / std::sqrt(e.var + 1e-5);
        EXPECT_NEAR(r.invstd, true_invstd, 1e-4 * true_invstd);
        for (std::size_t i = 0; i < x.size(); i += 101) {
          const double want = (x[i] - e.mean) * true_invstd;
          EXPECT_NEAR(r.affine.apply(x[i]), want, 1e-3 * (1.0 + std::fabs(want))) << i;
        }
      }
    }
  }
  // var ~ eps in data units at a magnitude where eps · s² underflows: only data-unit eps is right.
  {
    std::vector<float> x(1000, 1e20f);
    for (std::size_t i = 0; i < x.size(); i += 2) x[i] = std::nextafter(1e20f, INFINITY);
    const Exact e = exact(x);
    const auto p = d::make_pivot(x[0]);
    for (const double eps : {1e-5, 1e26}) {
      const auto r = d::finalize_pivoted(gpu_like_welford(x, p, 64), p, eps, 1.0f, 0.0f);
      const double true_invstd = 1.0 / std::sqrt(e.var + eps);
      EXPECT_NEAR(r.invstd, true_invstd, 1e-5 * true_invstd) << eps;
    }
  }
}
