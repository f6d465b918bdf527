// The CPU phases (phases.hpp): one shard reproduces forward / backward, a batch split into
// shards (uneven, empty) reproduces the whole batch, and bad records are refused before
// anything is written.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/phases.hpp>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "support/common.hpp"
#include "support/phases_cases.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::cpu;
using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::Shape;
using batchnorm::span;
namespace phases = batchnorm::phases;

using Case = bn_test::PhaseCase;
using bn_test::with_batch;

/// The contiguous slice of samples [begin, end) of an (N, ...) tensor, in either layout.
template <class T>
std::vector<T> samples(const std::vector<T>& v, std::int64_t per_sample, std::int64_t begin, std::int64_t end) {
  return std::vector<T>(v.begin() + begin * per_sample, v.begin() + end * per_sample);
}

template <class T>
class Phases : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Phases, Types);

// One shard: 1 → 2 → 3 is forward and 4 → 5 is backward (same loops, same order of operations).
TYPED_TEST(Phases, OneShardIsForwardAndBackward) {
  using T = TypeParam;
  for (const Case& k : bn_test::phase_cases()) {
    const Shape shape = bn_test::make_shape(k.extents, k.layout);
    const std::int64_t F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
    const auto x = bnref::cast<T>(bnref::normal(numel, 11, 3.0, 2.0));
    const auto z = bnref::cast<T>(bnref::normal(numel, 12));
    const auto dy = bnref::cast<T>(bnref::normal(numel, 13));
    const auto w = bnref::cast<T>(bnref::normal(F, 14, 1.0, 0.5)), b = bnref::cast<T>(bnref::normal(F, 15));
    std::vector<T> rm(F, T(0.5)), rv(F, T(2)), rm2 = rm, rv2 = rv, sm(F), si(F), sm2(F), si2(F);

    std::vector<T> y_ref(numel);
    batchnorm::ForwardArgs<T> fa;
    fa.x = x.data(); fa.y = y_ref.data(); fa.weight = {w.data(), F}; fa.bias = {b.data(), F};
    fa.running_mean = rm; fa.running_var = rv; fa.save_mean = sm; fa.save_invstd = si;
    fa.residual = k.residual ? z.data() : nullptr;
    batchnorm::ForwardConfig fc;
    fc.mode = k.mode; fc.activation = k.activation; fc.exponential_average_factor = 0.25;
    batchnorm::forward(cpu{}, shape, fa, fc);

    std::vector<double> stats(phases::shard_statistics_size(F)), norm(phases::normalization_size(F));
    phases::local_statistics(cpu{}, shape, k.mode, x.data(), span<double>(stats));
    phases::MergeArgs<T> ma;
    ma.shard_statistics = {stats.data(), static_cast<std::int64_t>(stats.size())};
    ma.normalization = norm; ma.running_mean = rm2; ma.running_var = rv2; ma.save_mean = sm2; ma.save_invstd = si2;
    phases::MergeConfig mc;
    mc.exponential_average_factor = 0.25;
    phases::merge_statistics(cpu{}, F, ma, mc);
    std::vector<T> y(numel);
    phases::NormalizeArgs<T> na;
    na.x = x.data(); na.y = y.data(); na.residual = fa.residual; na.weight = fa.weight; na.bias = fa.bias;
    na.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
    phases::ElementwiseConfig ec;
    ec.mode = k.mode; ec.activation = k.activation;
    phases::normalize(cpu{}, shape, na, ec);
    EXPECT_EQ(y, y_ref);
    EXPECT_EQ(rm2, rm);
    EXPECT_EQ(rv2, rv);
    EXPECT_EQ(sm2, sm);
    EXPECT_EQ(si2, si);
    EXPECT_EQ(norm[0], static_cast<double>(batchnorm::reduction_count(shape, k.mode)));

    // Backward: the phases keep the mean in double, backward corrects the saved (rounded)
    // mean with Σ(x − mean); both are the same dx up to rounding.
    std::vector<T> dx_ref(numel), gw_ref(F), gb_ref(F);
    batchnorm::BackwardArgs<T> ba;
    ba.x = x.data(); ba.dy = dy.data(); ba.y = y_ref.data(); ba.dx = dx_ref.data(); ba.weight = fa.weight;
    ba.mean = {sm.data(), F}; ba.invstd = {si.data(), F}; ba.grad_weight = gw_ref; ba.grad_bias = gb_ref;
    batchnorm::BackwardConfig bc;
    bc.mode = k.mode; bc.activation = k.activation;
    batchnorm::backward(cpu{}, shape, ba, bc);

    std::vector<double> sums(phases::gradient_sums_size(F));
    phases::GradientSumsArgs<T> ga;
    ga.x = x.data(); ga.dy = dy.data(); ga.y = y.data(); ga.normalization = na.normalization; ga.gradient_sums = sums;
    phases::local_gradient_sums(cpu{}, shape, ga, ec);
    std::vector<T> dx(numel), gw(F), gb(F);
    phases::InputGradientArgs<T> ia;
    ia.x = x.data(); ia.dy = dy.data(); ia.y = y.data(); ia.dx = dx.data(); ia.weight = fa.weight;
    ia.normalization = na.normalization; ia.gradient_sums = {sums.data(), static_cast<std::int64_t>(sums.size())};
    ia.grad_weight = gw; ia.grad_bias = gb;
    phases::input_gradient(cpu{}, shape, ia, ec);
    // float: saved invstd rounded to float in backward's coefficients (1 ulp), double: near exact.
    const double tol = sizeof(T) == 4 ? 2e-5 : 1e-12;
    EXPECT_LE(bnref::max_rel_error(dx, bnref::widen(dx_ref)), tol);
    EXPECT_LE(bnref::max_rel_error(gw, bnref::widen(gw_ref)), tol);
    EXPECT_EQ(gb, gb_ref);
  }
}

// Shards of 0, 1, 2, ... samples (uneven, some empty) give the whole batch's results.
TEST(Phases, ShardsReproduceTheWholeBatch) {
  using T = double;
  for (const Case& k : bn_test::phase_cases()) {
    const Shape shape = bn_test::make_shape(k.extents, k.layout);
    const std::int64_t N = shape.batch(), F = batchnorm::feature_count(shape, k.mode), numel = shape.numel();
    const std::int64_t per_sample = numel / N;
    const auto x = bnref::normal(numel, 21, 1e3, 2.0), dy = bnref::normal(numel, 22);
    const auto w = bnref::normal(F, 23, 1.0, 0.5), b = bnref::normal(F, 24);
    std::vector<T> rm(F, 0.5), rv(F, 2.0), y_ref(numel), sm(F), si(F), dx_ref(numel), gw_ref(F), gb_ref(F);
    batchnorm::ForwardArgs<T> fa;
    fa.x = x.data(); fa.y = y_ref.data(); fa.weight = {w.data(), F}; fa.bias = {b.data(), F};
    fa.running_mean = rm; fa.running_var = rv; fa.save_mean = sm; fa.save_invstd = si;
    batchnorm::ForwardConfig fc;
    fc.mode = k.mode; fc.activation = k.activation;
    batchnorm::forward(cpu{}, shape, fa, fc);
    batchnorm::BackwardArgs<T> ba;
    ba.x = x.data(); ba.dy = dy.data(); ba.y = y_ref.data(); ba.dx = dx_ref.data(); ba.weight = fa.weight;
    ba.mean = {sm.data(), F}; ba.invstd = {si.data(), F}; ba.grad_weight = gw_ref; ba.grad_bias = gb_ref;
    batchnorm::BackwardConfig bc;
    bc.mode = k.mode; bc.activation = k.activation;
    batchnorm::backward(cpu{}, shape, ba, bc);

    // Boundaries: an empty shard first, then growing shards; the last takes the rest.
    std::vector<std::int64_t> bounds{0, 0};
    for (std::int64_t size = 1; bounds.back() + size < N; ++size) bounds.push_back(bounds.back() + size);
    bounds.push_back(N);
    const std::int64_t shards = static_cast<std::int64_t>(bounds.size()) - 1;
    const std::int64_t rec = phases::shard_statistics_size(F);
    std::vector<double> all(static_cast<std::size_t>(shards * rec));
    for (std::int64_t r = 0; r < shards; ++r) {
      const auto xs = samples(x, per_sample, bounds[r], bounds[r + 1]);
      phases::local_statistics(cpu{}, with_batch(k, bounds[r + 1] - bounds[r]), k.mode, xs.data(),
                               span<double>(all.data() + r * rec, rec));
    }
    std::vector<double> norm(phases::normalization_size(F));
    std::vector<T> rm2(F, 0.5), rv2(F, 2.0);
    phases::MergeArgs<T> ma;
    ma.shard_statistics = {all.data(), static_cast<std::int64_t>(all.size())};
    ma.shards = shards; ma.normalization = norm; ma.running_mean = rm2; ma.running_var = rv2;
    phases::merge_statistics(cpu{}, F, ma, phases::MergeConfig{});
    EXPECT_LE(bnref::max_rel_error(rm2, bnref::widen(rm)), 1e-12);
    EXPECT_LE(bnref::max_rel_error(rv2, bnref::widen(rv)), 1e-12);

    phases::ElementwiseConfig ec;
    ec.mode = k.mode; ec.activation = k.activation;
    std::vector<T> y, ys_all;
    std::vector<double> summed(phases::gradient_sums_size(F), 0.0);
    std::vector<std::vector<T>> ys(static_cast<std::size_t>(shards));
    for (std::int64_t r = 0; r < shards; ++r) {
      const Shape s = with_batch(k, bounds[r + 1] - bounds[r]);
      const auto xs = samples(x, per_sample, bounds[r], bounds[r + 1]);
      const auto dys = samples(dy, per_sample, bounds[r], bounds[r + 1]);
      ys[r].resize(xs.size());
      phases::NormalizeArgs<T> na;
      na.x = xs.data(); na.y = ys[r].data(); na.weight = fa.weight; na.bias = fa.bias;
      na.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
      phases::normalize(cpu{}, s, na, ec);
      y.insert(y.end(), ys[r].begin(), ys[r].end());
      std::vector<double> sums(phases::gradient_sums_size(F));
      phases::GradientSumsArgs<T> ga;
      ga.x = xs.data(); ga.dy = dys.data(); ga.y = ys[r].data(); ga.normalization = na.normalization;
      ga.gradient_sums = sums;
      phases::local_gradient_sums(cpu{}, s, ga, ec);
      for (std::size_t i = 0; i < sums.size(); ++i) summed[i] += sums[i];
    }
    EXPECT_LE(bnref::max_rel_error(y, bnref::widen(y_ref)), 1e-12);
    std::vector<T> dx, gw(F), gb(F);
    for (std::int64_t r = 0; r < shards; ++r) {
      const Shape s = with_batch(k, bounds[r + 1] - bounds[r]);
      const auto xs = samples(x, per_sample, bounds[r], bounds[r + 1]);
      const auto dys = samples(dy, per_sample, bounds[r], bounds[r + 1]);
      std::vector<T> dxs(xs.size());
      phases::InputGradientArgs<T> ia;
      ia.x = xs.data(); ia.dy = dys.data(); ia.y = ys[r].data(); ia.dx = dxs.data(); ia.weight = fa.weight;
      ia.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
      ia.gradient_sums = {summed.data(), static_cast<std::int64_t>(summed.size())};
      ia.grad_weight = gw; ia.grad_bias = gb;
      phases::input_gradient(cpu{}, s, ia, ec);
      dx.insert(dx.end(), dxs.begin(), dxs.end());
    }
    EXPECT_LE(bnref::max_rel_error(dx, bnref::widen(dx_ref)), 1e-12);
    EXPECT_LE(bnref::max_rel_error(gw, bnref::widen(gw_ref)), 1e-12);
    EXPECT_LE(bnref::max_rel_error(gb, bnref::widen(gb_ref)), 1e-12);
  }
}

// The merge is a fixed left fold: the same records in the same order give the same bits,
// and a different order gives the same values to rounding.
TEST(Phases, MergeIsDeterministicInShardOrder) {
  const std::int64_t F = 3, rec = phases::shard_statistics_size(F);
  std::vector<double> all;
  for (int r = 0; r < 4; ++r) {
    const auto x = bnref::normal(5 * F * (r + 1), 31 + r, 1e4 * r, 1.0 + r);
    std::vector<double> s(rec);
    phases::local_statistics(cpu{}, Shape({5 * (r + 1), F}), Mode::per_channel, x.data(), span<double>(s));
    all.insert(all.end(), s.begin(), s.end());
  }
  auto merged = [&](const std::vector<double>& records) {
    std::vector<double> norm(phases::normalization_size(F));
    phases::MergeArgs<double> ma;
    ma.shard_statistics = {records.data(), static_cast<std::int64_t>(records.size())};
    ma.shards = 4; ma.normalization = norm;
    phases::merge_statistics(cpu{}, F, ma, phases::MergeConfig{});
    return norm;
  };
  const auto first = merged(all);
  EXPECT_EQ(merged(all), first);
  std::vector<double> reversed;
  for (int r = 3; r >= 0; --r) reversed.insert(reversed.end(), all.begin() + r * rec, all.begin() + (r + 1) * rec);
  const auto other = merged(reversed);
  for (std::size_t i = 0; i < first.size(); ++i) EXPECT_NEAR(other[i], first[i], 1e-12 * (1.0 + std::abs(first[i])));
}

TEST(Phases, BadRecordsAreRefusedBeforeAnyWrite) {
  const std::int64_t F = 2;
  std::vector<double> rec{3.0, 1.0, 2.0, 0.5, 0.5}, norm(phases::normalization_size(F), -7.0);
  std::vector<double> rm(F, 0.25), rv(F, 4.0);
  phases::MergeArgs<double> ma;
  ma.shard_statistics = {rec.data(), 5};
  ma.normalization = norm; ma.running_mean = rm; ma.running_var = rv;
  auto expect_refused = [&](const char* argument) {
    try {
      phases::merge_statistics(cpu{}, F, ma, phases::MergeConfig{});
      ADD_FAILURE() << "accepted a bad " << argument;
    } catch (const batchnorm::invalid_argument& e) {
      EXPECT_EQ(e.argument(), std::string(argument)) << e.what();
    }
    EXPECT_EQ(norm, std::vector<double>(phases::normalization_size(F), -7.0));
    EXPECT_EQ(rm, std::vector<double>(F, 0.25));
    EXPECT_EQ(rv, std::vector<double>(F, 4.0));
  };
  rec[0] = 2.5;  // not a whole count
  expect_refused("shard_statistics");
  rec[0] = -1.0;
  expect_refused("shard_statistics");
  rec[0] = 1.0;  // one value per channel over all shards
  expect_refused("shard_statistics");
  rec[0] = 3.0;
  ma.shard_statistics = {rec.data(), 4};  // a record of the wrong size
  expect_refused("shard_statistics");
  ma.shard_statistics = {rec.data(), 5};
  ma.normalization = {norm.data(), 4};
  expect_refused("normalization");
  ma.normalization = norm;
  ma.shards = 0;
  expect_refused("shards");
}

TEST(Phases, AllShardsEmptyLeavesRunningStatsAlone) {
  const std::int64_t F = 2;
  std::vector<double> recs(2 * phases::shard_statistics_size(F), 0.0), norm(phases::normalization_size(F), 9.0);
  std::vector<float> rm(F, 0.25f), rv(F, 4.0f);
  phases::MergeArgs<float> ma;
  ma.shard_statistics = {recs.data(), static_cast<std::int64_t>(recs.size())};
  ma.shards = 2; ma.normalization = norm; ma.running_mean = rm; ma.running_var = rv;
  phases::merge_statistics(cpu{}, F, ma, phases::MergeConfig{});
  EXPECT_EQ(norm[0], 0.0);
  EXPECT_EQ(rm, std::vector<float>(F, 0.25f));
  EXPECT_EQ(rv, std::vector<float>(F, 4.0f));
  // A non-empty shard cannot be normalized with an empty record.
  std::vector<float> x(2 * F, 1.0f), y(2 * F);
  phases::NormalizeArgs<float> na;
  na.x = x.data(); na.y = y.data(); na.normalization = {norm.data(), static_cast<std::int64_t>(norm.size())};
  EXPECT_THROW(phases::normalize(cpu{}, Shape({2, F}), na, phases::ElementwiseConfig{}), batchnorm::invalid_argument);
}

}  // namespace
