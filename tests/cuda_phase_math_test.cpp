// The arithmetic of the CUDA phases (detail/cuda/phase_math.hpp) and the per-feature merge
// finalization both backends share (detail::finalize_merged_feature), run on the host in the
// GPU's precision: CI has no GPU, so this is where the hand-over between float kernels and
// double records is proven accurate. tests/cuda/phases_test.cu then proves the kernels.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/detail/cuda/phase_math.hpp>
#include <batchnorm/phases.hpp>
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "support/reference.hpp"

namespace bn = batchnorm;
namespace phases = batchnorm::phases;
using namespace batchnorm::detail;
using namespace batchnorm::detail::cuda_impl;

namespace {

/// What a GPU reduction does for one feature: Welford over x · prescale − pivot in float, in
/// chunks merged with Chan's formula.
Welford<float> pivoted_welford(const std::vector<float>& x, const Pivot<float>& pivot, std::size_t chunk) {
  Welford<float> total;
  for (std::size_t begin = 0; begin < x.size(); begin += chunk) {
    Welford<float> part;
    for (std::size_t i = begin; i < std::min(x.size(), begin + chunk); ++i) part.push(x[i] * pivot.prescale - pivot.value);
    total = merge(total, part);
  }
  return total;
}

/// Mean and M2 in double (two passes), the CPU's local_statistics of one feature.
void exact_moments(const std::vector<float>& x, double& mean, double& m2) {
  mean = 0.0;
  for (float v : x) mean += v;
  mean /= static_cast<double>(x.size());
  m2 = 0.0;
  for (float v : x) m2 += (v - mean) * (v - mean);
}

// The float Welford over pivoted values, converted to a double record, has the mean and M2 of
// the data to float's relative precision of the spread, at any offset and magnitude.
TEST(PhaseMath, PivotedWelfordToRecordInDataUnits) {
  for (double offset : {0.0, 1e4, 1e6, 1e20, 1e35}) {
    for (double spread : {1.0, 1e-3}) {
      const double scale = offset == 0.0 ? spread : offset * spread * 1e-5;
      std::vector<float> x;
      for (double v : bnref::normal(1000, 31, 0.0, 1.0)) x.push_back(static_cast<float>(offset + scale * v));
      const Pivot<float> pivot = make_pivot(x[0]);
      double mean = 0, m2 = 0, want_mean = 0, want_m2 = 0;
      pivoted_to_record(pivoted_welford(x, pivot, 96), pivot, &mean, &m2);
      exact_moments(x, want_mean, want_m2);
      const double sd = std::sqrt(want_m2 / x.size());
      EXPECT_LE(std::fabs(mean - want_mean), 1e-5 * sd) << "offset " << offset << " spread " << spread;
      EXPECT_LE(std::fabs(m2 - want_m2), 1e-4 * want_m2) << "offset " << offset << " spread " << spread;
    }
  }
  // A constant feature: M2 exactly 0, the mean exactly the value.
  const std::vector<float> constant(300, 3.0e30f);
  const Pivot<float> pivot = make_pivot(constant[0]);
  double mean = -1, m2 = -1;
  pivoted_to_record(pivoted_welford(constant, pivot, 64), pivot, &mean, &m2);
  EXPECT_EQ(mean, static_cast<double>(3.0e30f));
  EXPECT_EQ(m2, 0.0);
  // A rounding-negative M2 becomes 0; NaN stays NaN.
  pivoted_to_record(Welford<float>{0.5f, -1e-9f, 4}, Pivot<float>{1.0f, 2.0f}, &mean, &m2);
  EXPECT_EQ(mean, 2.5);
  EXPECT_EQ(m2, 0.0);
  pivoted_to_record(Welford<float>{0.5f, std::nanf(""), 4}, Pivot<float>{1.0f, 2.0f}, &mean, &m2);
  EXPECT_TRUE(std::isnan(m2));
}

// record_affine in float normalizes data near a large offset as well as double does, where the
// plain float affine (mean rounded to float) is off by the mean's rounding error.
TEST(PhaseMath, RecordAffineKeepsTheDoubleMean) {
  const double mean = 1e6 + 0.123456789, invstd = 1.0 / 0.05, weight = 1.5, bias = -0.25;
  const Affine<float> a = record_affine<float>(mean, invstd, weight, bias);
  // pivot + rest is the mean to float's precision squared (the rest keeps 24 bits of what
  // the pivot's rounding lost).
  EXPECT_NEAR(static_cast<double>(a.pivot) + static_cast<double>(a.mean), mean, 1e-14 * mean);
  const Affine<float> naive = normalize_affine<float>(static_cast<float>(mean), static_cast<float>(invstd),
                                                      static_cast<float>(weight), static_cast<float>(bias));
  double worst = 0, worst_naive = 0;
  for (double v : bnref::normal(500, 32, mean, 0.05)) {
    const float x = static_cast<float>(v);
    const double want = (static_cast<double>(x) - mean) * invstd * weight + bias;
    worst = std::max(worst, std::fabs(a.apply(x) - want));
    worst_naive = std::max(worst_naive, std::fabs(naive.apply(x) - want));
  }
  EXPECT_LE(worst, 1e-5);         // float rounding of (x − pivot), scale and the result
  EXPECT_GT(worst_naive, 10 * worst);  // the mean's float rounding (~0.03 at 1e6) times invstd · w
  // Double: pivot = mean, rest 0, the CPU's affine.
  const Affine<double> d = record_affine<double>(mean, invstd, weight, bias);
  EXPECT_EQ(d.pivot, mean);
  EXPECT_EQ(d.mean, 0.0);
  EXPECT_EQ(d.scale, invstd * weight);
  EXPECT_EQ(d.apply(mean + 0.1), ((mean + 0.1) - mean) * (invstd * weight) + bias);
  // A scale beyond float (a constant feature with a tiny eps) becomes the largest float, so a
  // value equal to the mean gives the bias instead of 0 · inf = NaN; weight 0 gives 0.
  const Affine<float> huge = record_affine<float>(2.0, 1e40, -1.0, 0.5);
  EXPECT_EQ(huge.scale, -FLT_MAX);
  EXPECT_EQ(huge.apply(2.0f), 0.5f);
  EXPECT_EQ(record_affine<float>(2.0, 1e40, 0.0, 0.5).scale, 0.0f);
  // NaN records give NaN outputs.
  EXPECT_TRUE(std::isnan(record_affine<float>(std::nan(""), std::nan(""), 1.0, 0.0).apply(1.0f)));
}

// Gradient sums taken against the float-rounded mean, converted to the double mean, equal the
// sums against the double mean; the dx coefficients recover x − mean the same way.
TEST(PhaseMath, GradientSumsAndCoefficientsAgainstTheDoubleMean) {
  const double mean = 4096.0 + 1.0 / 3.0;
  const float rounded = static_cast<float>(mean);
  const auto xs = bnref::normal(400, 33, mean, 0.5), dys = bnref::normal(400, 34, 0.3, 1.0);
  BackwardSums<double> against_rounded;
  double want_dy = 0, want_dy_xmu = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double x = static_cast<float>(xs[i]), dy = dys[i];
    against_rounded.dy += dy;
    against_rounded.dy_xmu += dy * (x - rounded);
    want_dy += dy;
    want_dy_xmu += dy * (x - mean);
  }
  double sum_dy = 0, sum_dy_xmu = 0;
  gradient_sums_to_record<float>(BackwardSums<float>{static_cast<float>(against_rounded.dy),
                                                      static_cast<float>(against_rounded.dy_xmu), 0.0f},
                                 mean, &sum_dy, &sum_dy_xmu);
  EXPECT_NEAR(sum_dy_xmu, want_dy_xmu, 1e-6 * (std::fabs(want_dy_xmu) + std::fabs(want_dy)) + 1e-3);
  // Without the correction the error is (mean − rounded) · Σdy.
  EXPECT_GT(std::fabs(static_cast<double>(static_cast<float>(against_rounded.dy_xmu)) - want_dy_xmu),
            0.5 * std::fabs((mean - rounded) * want_dy));
  const BackwardCoefficients<double> k{0.0, 2.0, -0.5, 0.25, 0.0, 0.0};
  const ColumnGrad<float> c = record_column_grad<float>(mean, k);
  EXPECT_EQ(c.mean, rounded);
  EXPECT_NEAR(static_cast<double>(c.mean) + static_cast<double>(c.mean_shift), mean, 1e-14 * mean);
  EXPECT_EQ(c.dy_scale, 2.0f);
  EXPECT_EQ(c.xmu_scale, -0.5f);
  EXPECT_EQ(c.constant, 0.25f);
  const float x = static_cast<float>(mean + 0.01);
  EXPECT_NEAR((x - c.mean) - c.mean_shift, static_cast<double>(x) - mean, 1e-6);
}

// The merge kernel's check of the counts: the CPU's rules, with NaN instead of an exception.
TEST(PhaseMath, MergedTotalRefusesWhatTheCpuRefuses) {
  auto records = [](std::vector<double> counts) {
    std::vector<double> r;
    for (double c : counts) r.insert(r.end(), {c, 0.5, 0.25});  // F = 1: [count | mean | M2]
    return r;
  };
  auto total = [&](std::vector<double> counts) {
    const auto r = records(counts);
    return merged_total(r.data(), static_cast<std::int64_t>(counts.size()), phases::shard_statistics_size(1));
  };
  EXPECT_EQ(total({3, 0, 4}), 7.0);
  EXPECT_EQ(total({0, 0}), 0.0);
  EXPECT_EQ(total({2}), 2.0);
  for (const std::vector<double>& bad :
       {std::vector<double>{1}, {0, 1, 0}, {-1, 3}, {2.5, 1}, {std::nan(""), 2}, {INFINITY, 2}, {9007199254740992.0, 2}}) {
    EXPECT_TRUE(std::isnan(total(bad))) << bad[0];
    // The CPU merge throws for the same records.
    const auto r = records(bad);
    EXPECT_THROW(phase_checks::check_counts(r.data(), static_cast<std::int64_t>(bad.size()), 3), bn::invalid_argument);
  }
}

// finalize_merged_feature: the formulas of forward's finalization, one feature at a time.
TEST(PhaseMath, FinalizeMergedFeature) {
  const Welford<double> merged{2.5, 12.0, 6};
  double mean = 0, invstd = 0;
  float rm = 1.0f, rv = 3.0f, sm = 0, si = 0;
  const FeatureStats<double> s = finalize_merged_feature<float>(merged, 1e-5, 0.25, &mean, &invstd, &rm, &rv, &sm, &si);
  EXPECT_EQ(s.mean, 2.5);
  EXPECT_EQ(s.biased_var, 2.0);
  EXPECT_EQ(s.unbiased_var, 12.0 / 5.0);
  EXPECT_EQ(mean, 2.5);
  EXPECT_EQ(invstd, 1.0 / std::sqrt(2.0 + 1e-5));
  EXPECT_EQ(sm, 2.5f);
  EXPECT_EQ(si, static_cast<float>(invstd));
  EXPECT_EQ(rm, static_cast<float>(0.25 * 2.5 + 0.75 * 1.0));
  EXPECT_EQ(rv, static_cast<float>(0.25 * (12.0 / 5.0) + 0.75 * 3.0));
  // No running statistics, no save: only the record.
  double m2 = 0, i2 = 0;
  finalize_merged_feature<double>(merged, 1e-5, 0.25, &m2, &i2, nullptr, nullptr, nullptr, nullptr);
  EXPECT_EQ(m2, mean);
  EXPECT_EQ(i2, invstd);
}

// The workspace of the phases covers each phase; the merge needs one only for a deferred update.
TEST(PhaseMath, WorkspaceCoversEveryPhase) {
  EXPECT_EQ(merge_layout(10, false).total, 0u);
  const MergeLayout m = merge_layout(10, true);
  EXPECT_GE(m.flag, 10 * sizeof(FeatureStats<double>));
  EXPECT_EQ(m.flag % 256, 0u);
  EXPECT_EQ(m.total, m.flag + sizeof(int));
  for (int sms : {1, 132}) {
    const LaunchPolicy policy = launch_policy_for(9, 0, sms);
    for (const bn::Shape& shape : {bn::Shape({64, 3, 32, 32}), bn::Shape({5, 7}), bn::Shape({2, 4, 6}, bn::Layout::channels_last)})
      for (bn::Mode mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
        const std::size_t bytes = phases_workspace_bytes<float>(shape, mode, policy);
        const Plan plan = make_plan(shape, mode, policy);
        const std::int64_t F = bn::feature_count(shape, mode);
        EXPECT_GE(bytes, local_statistics_bytes<float>(plan));
        EXPECT_GE(bytes, gradient_sums_bytes<float>(plan));
        EXPECT_GE(bytes, normalize_bytes<float>(F));
        EXPECT_GE(bytes, input_gradient_bytes<float>(F));
        EXPECT_GE(bytes, merge_layout(F, true).total);
        EXPECT_GE(phases_workspace_bytes<double>(shape, mode, policy), local_statistics_bytes<double>(plan));
      }
    EXPECT_EQ(phases_workspace_bytes<float>(bn::Shape({0, 5, 3}), bn::Mode::per_channel, policy),
              merge_layout(5, true).total);
  }
}

}  // namespace
