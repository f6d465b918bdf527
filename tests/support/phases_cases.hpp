/**
 * @file support/phases_cases.hpp
 * @brief The shapes that the phases tests run on both backends (tests/phases_test.cpp,
 *        tests/cuda/phases_test.cu): both layouts, both modes, relu and residual, (N, C) and
 *        3-D / 4-D / 5-D inputs, and a channel long enough to be split into many reduction
 *        tasks; with_batch() gives a shard of a case its own batch size.
 */
#pragma once

#include <cstdint>
#include <vector>

#include <batchnorm/args.hpp>
#include <batchnorm/options.hpp>
#include <batchnorm/shape.hpp>

#include "support/common.hpp"

namespace bn_test {

/// One phases test case: the whole batch's extents (batch first), layout, mode, activation, and
/// whether a residual is added.
struct PhaseCase {
  std::vector<std::int64_t> extents;
  batchnorm::Layout layout;
  batchnorm::Mode mode;
  batchnorm::Activation activation;
  bool residual;
};

inline std::vector<PhaseCase> phase_cases() {
  using batchnorm::Activation;
  using batchnorm::Layout;
  using batchnorm::Mode;
  return {
      {{6, 3, 5}, Layout::contiguous, Mode::per_channel, Activation::identity, false},
      {{7, 4, 3, 2}, Layout::contiguous, Mode::per_channel, Activation::relu, true},
      {{7, 4, 3, 2}, Layout::channels_last, Mode::per_channel, Activation::relu, false},
      {{5, 3, 2, 2, 2}, Layout::channels_last, Mode::per_channel, Activation::identity, true},
      {{9, 6}, Layout::contiguous, Mode::per_channel, Activation::identity, false},
      {{8, 3, 4}, Layout::contiguous, Mode::per_activation, Activation::relu, false},
      {{6, 3, 4}, Layout::channels_last, Mode::per_activation, Activation::identity, false},
      {{16, 5, 300}, Layout::contiguous, Mode::per_channel, Activation::identity, false},  // many splits
  };
}

/// The shape of case @p c with a batch of @p n samples (a shard's).
inline batchnorm::Shape with_batch(const PhaseCase& c, std::int64_t n) {
  auto e = c.extents;
  e[0] = n;
  return make_shape(e, c.layout);
}

}  // namespace bn_test
