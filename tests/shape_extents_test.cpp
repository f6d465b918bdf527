// Shape from extents as a framework holds them: unsigned integers, mixed integer types, a
// pointer and a run-time rank, any contiguous range. Shape's code is compiled here with
// conversion warnings as errors (the suite's flags add -Wall -Wextra -Wpedantic -Werror), so
// that unsigned extents can never warn in a user's build.
#if defined(__GNUC__)
#pragma GCC diagnostic error "-Wconversion"
#pragma GCC diagnostic error "-Wsign-conversion"
#endif
#include <batchnorm/shape.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

void expect_extents(const bn::Shape& s, std::vector<std::int64_t> want, bn::Layout layout) {
  ASSERT_EQ(s.rank(), static_cast<int>(want.size()));
  for (int d = 0; d < s.rank(); ++d) EXPECT_EQ(s[d], want[static_cast<std::size_t>(d)]) << "extent " << d;
  EXPECT_EQ(s.layout(), layout);
}

template <class F>
std::string shape_error(F make) {
  try {
    make();
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "shape");
    return e.what();
  }
  ADD_FAILURE() << "expected batchnorm::invalid_argument";
  return {};
}

// Run-time values (not constants), as a framework's tensor sizes are.
std::size_t runtime(std::size_t v) {
  static volatile std::size_t zero = 0;
  return v + zero;
}

}  // namespace

TEST(ShapeExtents, UnsignedAndMixedIntegerTypesInABracedList) {
  const std::size_t n = runtime(8), c = runtime(64), h = runtime(4);
  const unsigned w = 5u;
  expect_extents(bn::Shape{n, c}, {8, 64}, bn::Layout::contiguous);
  expect_extents(bn::Shape{n, 64, h, w}, {8, 64, 4, 5}, bn::Layout::contiguous);
  expect_extents(bn::Shape({n, c, h, w}, bn::Layout::channels_last), {8, 64, 4, 5}, bn::Layout::channels_last);
  const std::uint16_t small = 3;
  const long long big = 7;
  expect_extents(bn::Shape{small, big, 2}, {3, 7, 2}, bn::Layout::contiguous);
  const bn::Shape copy_list_initialized = {n, c, h};  // as a function argument {n, c, h} is
  expect_extents(copy_list_initialized, {8, 64, 4}, bn::Layout::contiguous);
}

TEST(ShapeExtents, PointerAndRunTimeRank) {
  const std::int64_t sizes[] = {2, 3, 4, 5, 6};  // e.g. at::Tensor::sizes().data()
  for (int rank = 2; rank <= 5; ++rank) {
    const bn::Shape s(sizes, rank);  // rank of type int, as tensor.dim() returns int64_t
    EXPECT_EQ(s.rank(), rank);
    EXPECT_EQ(s.batch(), 2);
    EXPECT_EQ(s.channels(), 3);
    EXPECT_EQ(s[rank - 1], rank + 1);
  }
  const std::vector<std::size_t> dims{8, 64, 7};
  expect_extents(bn::Shape(dims.data(), dims.size(), bn::Layout::channels_last), {8, 64, 7},
                 bn::Layout::channels_last);
  const std::int64_t dim = 4;
  expect_extents(bn::Shape(sizes, dim), {2, 3, 4, 5}, bn::Layout::contiguous);
}

TEST(ShapeExtents, AnyContiguousRangeOfIntegers) {
  expect_extents(bn::Shape(std::vector<std::int64_t>{2, 3, 4}), {2, 3, 4}, bn::Layout::contiguous);
  expect_extents(bn::Shape(std::vector<std::size_t>{2, 3}), {2, 3}, bn::Layout::contiguous);
  expect_extents(bn::Shape(std::array<unsigned, 4>{1u, 2u, 3u, 4u}, bn::Layout::channels_last), {1, 2, 3, 4},
                 bn::Layout::channels_last);
  const int c_array[] = {5, 6, 7, 8, 9};
  expect_extents(bn::Shape(c_array), {5, 6, 7, 8, 9}, bn::Layout::contiguous);
  // The same extents give equal shapes however they were given.
  EXPECT_EQ(bn::Shape(std::vector<long>{4, 3, 2}), (bn::Shape{4, 3, 2}));
}

TEST(ShapeExtents, BadRankFromRunTimeCountsIsATypedError) {
  const std::int64_t sizes[] = {2, 3, 4, 5, 6, 7};
  for (int rank : {-1, 0, 1, 6}) {
    const std::string what = shape_error([&] { bn::Shape s(sizes, rank); });
    EXPECT_NE(what.find("expected 2 to 5 extents (N, C, spatial...), got " + std::to_string(rank)), std::string::npos)
        << what;
  }
  EXPECT_NE(shape_error([] { bn::Shape s(std::vector<std::size_t>{}); }).find("got 0"), std::string::npos);
  EXPECT_NE(shape_error([] { bn::Shape s(std::vector<int>{1, 2, 3, 4, 5, 6}); }).find("got 6"), std::string::npos);
  EXPECT_NE(shape_error([] { bn::Shape s({1, 2, 3, 4, 5, 6, 7}, bn::Layout::contiguous); }).find("got 7"),
            std::string::npos);
  EXPECT_NE(shape_error([] { bn::Shape s{9}; }).find("got 1"), std::string::npos);
  const std::int64_t* null = nullptr;
  EXPECT_NE(shape_error([&] { bn::Shape s(null, 4); }).find("got nullptr"), std::string::npos);
}

TEST(ShapeExtents, ExtentsOutsideInt64AreTypedErrors) {
  const std::size_t too_big = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()) + 1u;
  const std::string what = shape_error([&] { bn::Shape s{runtime(2), too_big}; });
  EXPECT_NE(what.find("extent 1 does not fit in int64"), std::string::npos) << what;
  EXPECT_NE(shape_error([] { bn::Shape s(std::vector<int>{2, -3}); }).find("extent 1 must be >= 0, got -3"),
            std::string::npos);
  const std::int64_t negative[] = {2, 3, -1};
  EXPECT_NE(shape_error([&] { bn::Shape s(negative, 3); }).find("extent 2 must be >= 0, got -1"), std::string::npos);
  const std::size_t huge = runtime(std::size_t{1} << 40);
  EXPECT_NE(shape_error([&] { bn::Shape s{huge, huge}; }).find("overflows int64"), std::string::npos);
}
