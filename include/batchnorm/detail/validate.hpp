/**
 * @file detail/validate.hpp
 * @brief Argument checks shared by both backends and by the layer classes. They run
 *        before anything is written, which is how every call keeps the strong guarantee.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>

#include "../errors.hpp"
#include "../args.hpp"

namespace batchnorm::detail {

/**
 * Appended to a channel-count mismatch (streamed only when the message is built). When the
 * last extent is the expected channel count, the extents were most likely given in the
 * memory order of a channels-last tensor, (N, H, W, C); extents are (N, C, spatial...) in
 * every layout, so the hint spells out the Shape to write.
 */
struct channels_last_hint {
  const Shape& shape;
  std::int64_t expected_channels;

  friend std::ostream& operator<<(std::ostream& os, const channels_last_hint& h) {
    const Shape& s = h.shape;
    const int r = s.rank();
    if (r < 3 || s[r - 1] != h.expected_channels || s.channels() == h.expected_channels) return os;
    os << (s.layout() == Layout::contiguous ? "; did you mean Layout::channels_last? For an (N, H, W, C) tensor write "
                                            : "; extents are (N, C, spatial...) in every layout: did you mean ")
       << "Shape({" << s[0] << ", " << s[r - 1];
    for (int d = 1; d < r - 1; ++d) os << ", " << s[d];
    return os << "}, Layout::channels_last)" << (s.layout() == Layout::contiguous ? "" : "?");
  }
};

inline void check_eps(double eps) {
  require(std::isfinite(eps) && eps > 0.0, "eps", "eps: expected a finite value > 0, got ", eps);
}

inline void check_momentum(double momentum, const char* argument = "momentum") {
  require(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0, argument, argument,
          ": expected a value in [0, 1], got ", momentum);
}

/// True when [a, a + n) and [b, b + n) share memory but do not start at the same address.
template <class A, class B>
bool partially_overlap(const A* a, const B* b, std::int64_t n) {
  if (a == nullptr || b == nullptr || n <= 0) return false;
  const auto pa = reinterpret_cast<std::uintptr_t>(a);
  const auto pb = reinterpret_cast<std::uintptr_t>(b);
  if (pa == pb) return false;
  const auto bytes = static_cast<std::uintptr_t>(n) * sizeof(A);
  return pa < pb + bytes && pb < pa + bytes;
}

inline void check_pointer(const void* p, const char* argument, std::int64_t numel) {
  require(numel == 0 || p != nullptr, argument, argument, ": expected a non-null pointer to ", numel,
          " elements, got nullptr");
}

template <class E>
void check_feature_span(const span<E>& s, const char* argument, std::int64_t features, bool required) {
  if (s.data == nullptr) {
    require(!required || features == 0, argument, argument, ": expected a buffer of ", features,
            " elements, got nullptr");
    return;
  }
  require(s.size == features, argument, argument, ": expected ", features, " elements (num_features), got ",
          s.size);
}

template <class E>
void check_pair(const span<E>& a, const span<E>& b, const char* name_a, const char* name_b) {
  require((a.data == nullptr) == (b.data == nullptr), a.data ? name_b : name_a, name_a, " and ", name_b,
          ": expected both or neither, got only ", a.data ? name_a : name_b);
}

/// PyTorch's _verify_batch_size: statistics over a single value are undefined.
inline void check_batch_statistics_count(const Shape& shape, Mode mode) {
  require(reduction_count(shape, mode) != 1 || shape.numel() == 0, "shape",
          "shape: expected more than 1 value per channel when training, got input size ", shape);
}

template <class T>
void check_forward(const Shape& shape, const ForwardArgs<T>& a, const ForwardConfig& c) {
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  check_pointer(a.x, "x", numel);
  check_pointer(a.y, "y", numel);
  require(!partially_overlap(a.x, a.y, numel), "y",
          "y: expected the same address as x (in place) or no overlap with it, got a partial overlap");
  check_eps(c.eps);
  check_momentum(c.exponential_average_factor, "exponential_average_factor");
  check_pair(a.weight, a.bias, "weight", "bias");
  check_feature_span(a.weight, "weight", features, false);
  check_feature_span(a.bias, "bias", features, false);
  check_pair(a.running_mean, a.running_var, "running_mean", "running_var");
  check_feature_span(a.running_mean, "running_mean", features, !c.batch_statistics);
  check_feature_span(a.running_var, "running_var", features, !c.batch_statistics);
  check_feature_span(a.save_mean, "save_mean", features, false);
  check_feature_span(a.save_invstd, "save_invstd", features, false);
  require(!partially_overlap(a.residual, a.y, numel), "residual",
          "residual: expected the same address as y or no overlap with it, got a partial overlap");
  if (c.batch_statistics) check_batch_statistics_count(shape, c.mode);
}

template <class T>
void check_backward(const Shape& shape, const BackwardArgs<T>& a, const BackwardConfig& c) {
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  check_pointer(a.x, "x", numel);
  check_pointer(a.dy, "dy", numel);
  if (c.activation != Activation::identity) check_pointer(a.y, "y", numel);
  require(!partially_overlap(a.dx, a.dy, numel) && !partially_overlap(a.dx, a.x, numel), "dx",
          "dx: expected the same address as dy or x, or no overlap with them, got a partial overlap");
  require(!partially_overlap(a.dresidual, a.dy, numel), "dresidual",
          "dresidual: expected the same address as dy or no overlap with it, got a partial overlap");
  check_feature_span(a.weight, "weight", features, false);
  check_feature_span(a.mean, "mean", features, true);
  check_feature_span(a.invstd, "invstd", features, true);
  check_feature_span(a.grad_weight, "grad_weight", features, false);
  check_feature_span(a.grad_bias, "grad_bias", features, false);
}

}  // namespace batchnorm::detail
