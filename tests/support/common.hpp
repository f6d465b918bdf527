/**
 * @file tests/support/common.hpp
 * @brief Small host-side helpers shared by the tests (CPU and CUDA): shapes by class rank,
 *        host copies of parameter arrays, random states to load. No CUDA headers.
 */
#pragma once

#include <batchnorm/options.hpp>
#include <batchnorm/shape.hpp>
#include <batchnorm/state.hpp>

#include <cstdint>
#include <vector>

#include "support/reference.hpp"

namespace bn_test {

/// (N, C, a) for BatchNorm1d, (N, C, a, b) for 2d, (N, C, a, b, c) for 3d.
template <int D>
batchnorm::Shape shape_of(std::int64_t N, std::int64_t C, std::int64_t a, std::int64_t b, std::int64_t c,
                          batchnorm::Layout layout = batchnorm::Layout::contiguous) {
  if constexpr (D == 1) {
    (void)b;
    (void)c;
    return batchnorm::Shape({N, C, a}, layout);
  } else if constexpr (D == 2) {
    (void)c;
    return batchnorm::Shape({N, C, a, b}, layout);
  } else {
    return batchnorm::Shape({N, C, a, b, c}, layout);
  }
}

/// Copy of @p n host values at @p p.
template <class P>
std::vector<P> read(const P* p, std::int64_t n) {
  return std::vector<P>(p, p + n);
}

/// Random affine parameters and running stats (running_var > 0), as a State to load;
/// num_batches_tracked = 7.
template <class P>
batchnorm::State<P> random_state(std::int64_t F, std::uint64_t seed, const batchnorm::Options& o = {}) {
  batchnorm::State<P> s;
  const auto w = bnref::normal(F, seed, 1.0, 0.5), b = bnref::normal(F, seed + 1, 0.0, 0.5);
  const auto m = bnref::normal(F, seed + 2, 0.5, 1.0), v = bnref::normal(F, seed + 3, 0.0, 1.0);
  if (o.affine) {
    s.weight = bnref::cast<P>(w);
    s.bias = bnref::cast<P>(b);
  }
  if (o.track_running_stats) {
    s.running_mean = bnref::cast<P>(m);
    for (double e : v) s.running_var.push_back(static_cast<P>(0.5 + e * e));
  }
  s.num_batches_tracked = 7;
  return s;
}

}  // namespace bn_test
