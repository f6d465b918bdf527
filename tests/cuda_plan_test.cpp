// The CUDA backend's index arithmetic (detail/cuda/plan.hpp), run on the host: CI has no
// GPU, so this is where the kernels' walks are proven to visit every element exactly once
// and to attribute it to the same feature as the CPU reference does. A GPU run then only
// has to prove the cooperation (CUB reductions, launches), not the indexing.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/detail/cuda/plan.hpp>
#include <gtest/gtest.h>

#include <set>
#include <sstream>
#include <vector>

#include "support/reference.hpp"

namespace bn = batchnorm;
using namespace batchnorm::detail::cuda_impl;

namespace {

struct Case {
  bn::Shape shape;
  bn::Mode mode;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  const std::vector<std::vector<std::int64_t>> extents = {
      {2, 3, 4, 5}, {1, 1, 7}, {5, 1}, {4, 50}, {3, 37, 1, 1}, {2, 3, 5, 7, 2}, {1, 4, 300}, {7, 3, 1}, {9, 2, 33}, {1, 70, 3}};
  for (const auto& e : extents)
    for (bn::Layout layout : {bn::Layout::contiguous, bn::Layout::channels_last})
      for (bn::Mode mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
        bn::Shape s = e.size() == 2   ? bn::Shape({e[0], e[1]}, layout)
                      : e.size() == 3 ? bn::Shape({e[0], e[1], e[2]}, layout)
                      : e.size() == 4 ? bn::Shape({e[0], e[1], e[2], e[3]}, layout)
                                      : bn::Shape({e[0], e[1], e[2], e[3], e[4]}, layout);
        out.push_back({s, mode});
      }
  return out;
}

std::vector<LaunchPolicy> policies() {
  std::vector<LaunchPolicy> out;
  for (int sms : {1, 3, 132}) {
    LaunchPolicy p = launch_policy_for(9, 0, sms);
    out.push_back(p);
    p.min_elements_per_split = 8;  // force many splits on small tensors
    out.push_back(p);
  }
  return out;
}

/// The feature index the double reference (support/reference.hpp) gives each memory offset.
std::vector<std::int64_t> cpu_features(const bn::Shape& s, bn::Mode mode) {
  std::vector<std::int64_t> f(static_cast<std::size_t>(s.numel()), -1);
  bnref::for_each(s, mode, [&](std::int64_t i, std::int64_t feature) { f[i] = feature; });
  return f;
}

std::string describe(const Case& c, const LaunchPolicy& p) {
  std::ostringstream os;
  os << c.shape << (c.mode == bn::Mode::per_channel ? " per_channel" : " per_activation") << " sms=" << p.sm_count
     << " min_split=" << p.min_elements_per_split;
  return os.str();
}

}  // namespace

TEST(CudaPlan, ReductionWalksVisitEveryElementOnceUnderItsFeature) {
  constexpr int threads = TilePolicy::reduce_threads, loads = TilePolicy::loads_in_flight;
  constexpr int columns = TilePolicy::rows_tile_columns, rows = TilePolicy::rows_tile_rows;
  for (const Case& c : cases())
    for (const LaunchPolicy& policy : policies()) {
      SCOPED_TRACE(describe(c, policy));
      const Plan plan = make_plan(c.shape, c.mode, policy);
      const auto expected = cpu_features(c.shape, c.mode);
      std::vector<int> hits(expected.size(), 0);
      std::int64_t wrong_feature = 0;
      ASSERT_EQ(plan.features, bn::feature_count(c.shape, c.mode));
      ASSERT_GE(plan.splits, 1);
      ASSERT_LE(plan.splits, policy.max_splits);
      auto visit = [&](std::int64_t column) {
        return [&, column](std::int64_t i) {
          ++hits[static_cast<std::size_t>(i)];
          if (plan.map.param(column) != expected[static_cast<std::size_t>(i)]) ++wrong_feature;
          return 0.0;
        };
      };
      auto ignore = [](double) {};
      if (plan.planar) {
        const PlanarView& v = plan.planar_view;
        const std::int64_t count = v.N * v.S;
        for (std::int64_t ch = 0; ch < v.C; ++ch)
          for (std::int64_t split = 0; split < plan.splits; ++split)
            for (int t = 0; t < threads; ++t)
              walk_planar_reduce<threads, loads>(v, ch, split * plan.chunk + t,
                                                 std::min(count, (split + 1) * plan.chunk), visit(ch), ignore);
      } else {
        const RowsView& v = plan.rows_view;
        for (std::int64_t tile = 0; tile < ceil_div(v.F, columns); ++tile)
          for (std::int64_t split = 0; split < plan.splits; ++split)
            for (int ty = 0; ty < rows; ++ty)
              for (int tx = 0; tx < columns; ++tx) {
                const std::int64_t column = tile * columns + tx;
                if (column >= v.F) continue;
                walk_rows_reduce<rows, loads>(v, column, split * plan.chunk + ty,
                                              std::min(v.R, (split + 1) * plan.chunk), visit(column), ignore);
              }
      }
      for (std::size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << "offset " << i;
      EXPECT_EQ(wrong_feature, 0);
    }
}

TEST(CudaPlan, ElementwiseWalksVisitEveryElementOnceWithItsColumn) {
  constexpr int threads = TilePolicy::elementwise_threads;
  for (const Case& c : cases())
    for (std::int64_t blocks : {1, 2, 3, 7}) {
      SCOPED_TRACE(describe(c, LaunchPolicy{}) + " blocks=" + std::to_string(blocks));
      const Plan plan = make_plan(c.shape, c.mode, LaunchPolicy{});
      const auto expected = cpu_features(c.shape, c.mode);
      std::vector<int> hits(expected.size(), 0);
      std::int64_t wrong_feature = 0;
      auto op = [&](std::int64_t i, std::int64_t column) {
        ++hits[static_cast<std::size_t>(i)];
        if (plan.map.param(column) != expected[static_cast<std::size_t>(i)]) ++wrong_feature;
      };
      for (std::int64_t t = 0; t < blocks * threads; ++t) {
        if (plan.planar)
          walk_planar_elementwise(plan.planar_view, t, blocks * threads, op);
        else
          walk_rows_elementwise(plan.rows_view, t, blocks * threads, op);
      }
      for (std::size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << "offset " << i;
      EXPECT_EQ(wrong_feature, 0);
    }
}

TEST(CudaPlan, PartialsAreDistinctAndFitTheWorkspace) {
  for (const Case& c : cases())
    for (const LaunchPolicy& policy : policies()) {
      SCOPED_TRACE(describe(c, policy));
      const Plan plan = make_plan(c.shape, c.mode, policy);
      const PartialsLayout l = plan.partials_layout();
      std::set<std::int64_t> slots;
      for (std::int64_t f = 0; f < plan.features; ++f)
        for (std::int64_t k = 0; k < l.splits; ++k) slots.insert(f * l.feature_stride + k * l.split_stride);
      EXPECT_EQ(static_cast<std::int64_t>(slots.size()), plan.features * plan.splits);
      EXPECT_EQ(*slots.rbegin(), plan.features * plan.splits - 1);
      const std::size_t bound = max_workspace_bytes<float>(plan.features, policy);
      bn::ForwardConfig train;
      train.skip_nonfinite_updates = true;
      EXPECT_LE(forward_layout<float>(plan, train, true).total, bound);
      EXPECT_LE(backward_layout<float>(plan).total, bound);
      EXPECT_LE(backward_layout<double>(plan).total, max_workspace_bytes<double>(plan.features, policy));
    }
}

TEST(CudaPlan, SmallChannelCountStillSplitsAcrossTheGpu) {
  // PyTorch's NCHW kernel gives (128, 4, 224, 224) four blocks; the plan must fill 132 SMs.
  const LaunchPolicy h100 = launch_policy_for(9, 0, 132);
  const Plan plan = make_plan(bn::Shape{128, 4, 224, 224}, bn::Mode::per_channel, h100);
  EXPECT_TRUE(plan.planar);
  // (chunks are rounded to whole blocks, so allow a few percent below the target)
  EXPECT_GE(plan.planar_view.C * plan.splits * 100, h100.reduce_block_target() * 95);
  EXPECT_GE(plan.chunk, h100.min_elements_per_split);
  // BN1d (125000, 50): a row-major reduction over 2 column tiles, split over rows.
  const Plan rows = make_plan(bn::Shape{125000, 50}, bn::Mode::per_channel, h100);
  EXPECT_FALSE(rows.planar);
  EXPECT_GE(ceil_div(50, TilePolicy::rows_tile_columns) * rows.splits * 100, h100.reduce_block_target() * 95);
}

TEST(CudaPlan, IndexingIs64Bit) {
  // 2^31 + elements per channel: offsets must not wrap.
  const LaunchPolicy h100 = launch_policy_for(9, 0, 132);
  const bn::Shape big{3, 2, 1 << 19, 1 << 11};
  const Plan plan = make_plan(big, bn::Mode::per_channel, h100);
  std::int64_t last = -1;
  const std::int64_t count = plan.planar_view.N * plan.planar_view.S;
  walk_planar_reduce<TilePolicy::reduce_threads, TilePolicy::loads_in_flight>(
      plan.planar_view, 1, count - 1, count, [&](std::int64_t i) { last = i; return 0.0; }, [](double) {});
  EXPECT_EQ(last, big.numel() - 1);
}
