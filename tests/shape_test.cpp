// Shape, Options and error types: the small vocabulary every other test relies on.
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <limits>
#include <sstream>

namespace bn = batchnorm;

TEST(Shape, HoldsExtentsAndDerivedCounts) {
  bn::Shape s{2, 3, 4, 5};
  EXPECT_EQ(s.rank(), 4);
  EXPECT_EQ(s.batch(), 2);
  EXPECT_EQ(s.channels(), 3);
  EXPECT_EQ(s.spatial(), 20);
  EXPECT_EQ(s.numel(), 120);
  EXPECT_EQ(s.layout(), bn::Layout::contiguous);
  EXPECT_EQ(bn::feature_count(s, bn::Mode::per_channel), 3);
  EXPECT_EQ(bn::feature_count(s, bn::Mode::per_activation), 60);
  EXPECT_EQ(bn::reduction_count(s, bn::Mode::per_channel), 40);
  EXPECT_EQ(bn::reduction_count(s, bn::Mode::per_activation), 2);
  std::ostringstream os;
  os << bn::Shape({1, 2, 3}, bn::Layout::channels_last);
  EXPECT_EQ(os.str(), "(1, 2, 3) channels_last");
}

TEST(Shape, RejectsBadRankNegativeExtentAndOverflow) {
  EXPECT_THROW((bn::Shape{7}), bn::invalid_argument);
  EXPECT_THROW((bn::Shape{1, 2, 3, 4, 5, 6}), bn::invalid_argument);
  EXPECT_THROW((bn::Shape{2, -1}), bn::invalid_argument);
  const std::int64_t big = std::numeric_limits<std::int64_t>::max() / 2;
  try {
    bn::Shape s{big, 3};
    FAIL() << "expected overflow to throw";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "shape");
    EXPECT_NE(std::string(e.what()).find("overflows int64"), std::string::npos) << e.what();
  }
}

TEST(Options, DefaultsArePyTorchs) {
  bn::Options o;
  EXPECT_DOUBLE_EQ(o.eps, 1e-5);
  ASSERT_TRUE(o.momentum.has_value());
  EXPECT_DOUBLE_EQ(*o.momentum, 0.1);
  EXPECT_TRUE(o.affine);
  EXPECT_TRUE(o.track_running_stats);
  EXPECT_EQ(o.mode, bn::Mode::per_channel);
  EXPECT_FALSE(o.skip_nonfinite_updates);
}
