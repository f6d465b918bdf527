/**
 * @file tests/support/typed_cases.hpp
 * @brief The (value type, class rank) list of the typed tests: BatchNorm1d/2d/3d in float and
 *        double.
 *
 * In an unnamed namespace on purpose: GoogleTest prints the type into each typed test's name
 * ("Suite.Name<(anonymous namespace)::Case<float, 1>>"), so the spelling must stay the one the
 * test files used when they each defined it themselves. Include from test sources only.
 */
#pragma once

#include <gtest/gtest.h>

namespace {

template <class T, int D>
struct Case {
  using value_type = T;
  static constexpr int dims = D;
};
using Cases = ::testing::Types<Case<float, 1>, Case<float, 2>, Case<float, 3>, Case<double, 1>, Case<double, 2>,
                               Case<double, 3>>;

}  // namespace
