/**
 * @file tests/support/common.hpp
 * @brief Small host-side helpers shared by the tests (CPU and CUDA): shapes by class rank or
 *        from extents, NC(spatial) <-> N(spatial)C permutations, host copies of parameter
 *        arrays, random states to load. No CUDA headers.
 */
#pragma once

#include <batchnorm/options.hpp>
#include <batchnorm/shape.hpp>
#include <batchnorm/state.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
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

/// A batchnorm::Shape from a list of 2 to 5 extents.
inline batchnorm::Shape make_shape(const std::vector<std::int64_t>& e,
                                   batchnorm::Layout layout = batchnorm::Layout::contiguous) {
  switch (e.size()) {
    case 2: return batchnorm::Shape({e[0], e[1]}, layout);
    case 3: return batchnorm::Shape({e[0], e[1], e[2]}, layout);
    case 4: return batchnorm::Shape({e[0], e[1], e[2], e[3]}, layout);
    case 5: return batchnorm::Shape({e[0], e[1], e[2], e[3], e[4]}, layout);
    default: throw std::invalid_argument("make_shape: expected 2 to 5 extents, got " + std::to_string(e.size()));
  }
}

/// NC(spatial) -> N(spatial)C for @p n batches, @p c channels, @p s spatial positions.
template <class T>
std::vector<T> to_channels_last(const std::vector<T>& x, std::int64_t n, std::int64_t c, std::int64_t s) {
  std::vector<T> out(x.size());
  for (std::int64_t a = 0; a < n; ++a)
    for (std::int64_t b = 0; b < c; ++b)
      for (std::int64_t k = 0; k < s; ++k)
        out[static_cast<std::size_t>((a * s + k) * c + b)] = x[static_cast<std::size_t>((a * c + b) * s + k)];
  return out;
}

/// N(spatial)C -> NC(spatial): inverse of to_channels_last.
template <class T>
std::vector<T> from_channels_last(const std::vector<T>& x, std::int64_t n, std::int64_t c, std::int64_t s) {
  std::vector<T> out(x.size());
  for (std::int64_t a = 0; a < n; ++a)
    for (std::int64_t b = 0; b < c; ++b)
      for (std::int64_t k = 0; k < s; ++k)
        out[static_cast<std::size_t>((a * c + b) * s + k)] = x[static_cast<std::size_t>((a * s + k) * c + b)];
  return out;
}

/// Product of the extents after the first two (1 for rank 2).
inline std::int64_t spatial_of(const std::vector<std::int64_t>& e) {
  std::int64_t s = 1;
  for (std::size_t d = 2; d < e.size(); ++d) s *= e[d];
  return s;
}

/// (N, C, S) contiguous -> (N, S, C) channels_last, for extents @p e (rank 2: unchanged).
template <class T>
std::vector<T> to_channels_last(const std::vector<T>& v, const std::vector<std::int64_t>& e) {
  return to_channels_last(v, e[0], e[1], spatial_of(e));
}

/// Inverse of to_channels_last(v, e).
template <class T>
std::vector<T> from_channels_last(const std::vector<T>& v, const std::vector<std::int64_t>& e) {
  return from_channels_last(v, e[0], e[1], spatial_of(e));
}

/// NC(spatial) -> N(spatial)C for the extents of @p s (its layout is not looked at); empty stays empty.
template <class T>
std::vector<T> to_channels_last(const std::vector<T>& x, const batchnorm::Shape& s) {
  if (x.empty()) return {};
  return to_channels_last(x, s.batch(), s.channels(), s.spatial());
}

/// N(spatial)C -> NC(spatial) for the extents of @p s; empty stays empty.
template <class T>
std::vector<T> from_channels_last(const std::vector<T>& x, const batchnorm::Shape& s) {
  if (x.empty()) return {};
  return from_channels_last(x, s.batch(), s.channels(), s.spatial());
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
