/**
 * @file detail/validate.hpp
 * @brief Argument checks shared by both backends and by the layer classes. They run
 *        before anything is written, which is how every call keeps the strong guarantee.
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <ostream>
#include <string>
#include <string_view>

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

/**
 * One buffer of a call, for the overlap rule: its name in the API, its bytes, and whether
 * the call writes it. Null or empty buffers take no part.
 */
struct Region {
  const char* name;
  const void* data;
  std::uint64_t bytes;
  bool written;
};

/// A pair of buffers that may share one address exactly (an in-place call); `written` is
/// the one the call writes.
struct ExactAlias {
  const char* written;
  const char* other;
};

/**
 * The one overlap rule of every entry point: two buffers of a call, at least one of them
 * written by it, must not share a byte, except the pairs listed in @p exact_aliases, which
 * may also start at the same address with the same size (in place: every element is read
 * before it is written, at the same index). Throws invalid_argument naming the written
 * buffer (argument) and both buffers (message). Every pair is checked: a result that depends
 * on the order in which a backend reads and writes is never computed.
 */
inline void check_overlaps(std::initializer_list<Region> regions, std::initializer_list<ExactAlias> exact_aliases) {
  auto end_of = [](std::uintptr_t begin, std::uint64_t bytes) {  // saturates instead of wrapping
    const std::uintptr_t room = std::numeric_limits<std::uintptr_t>::max() - begin;
    return bytes > room ? std::numeric_limits<std::uintptr_t>::max() : begin + static_cast<std::uintptr_t>(bytes);
  };
  for (auto a = regions.begin(); a != regions.end(); ++a) {
    for (auto b = a + 1; b != regions.end(); ++b) {
      if (!a->written && !b->written) continue;
      if (a->data == nullptr || b->data == nullptr || a->bytes == 0 || b->bytes == 0) continue;
      const auto pa = reinterpret_cast<std::uintptr_t>(a->data);
      const auto pb = reinterpret_cast<std::uintptr_t>(b->data);
      if (!(pa < end_of(pb, b->bytes) && pb < end_of(pa, a->bytes))) continue;
      const Region& w = a->written ? *a : *b;  // the argument to blame: a buffer the call writes
      const Region& o = a->written ? *b : *a;
      bool alias_allowed = false;
      for (const ExactAlias& e : exact_aliases)
        alias_allowed = alias_allowed || (std::string_view(e.written) == w.name && std::string_view(e.other) == o.name);
      if (alias_allowed) {
        require(pa == pb && a->bytes == b->bytes, w.name, w.name, ": expected the same address as ", o.name,
                " (in place) or no overlap with it, got a partial overlap");
      } else {
        throw invalid_argument(w.name, concat(w.name, ": expected no overlap with ", o.name, " (", w.name,
                                              " is written by this call", o.written ? "" : " and ", o.written ? "" : o.name,
                                              o.written ? ", as is " : " is read by it", o.written ? o.name : "",
                                              "), got ", pa == pb ? "the same address" : "an overlap"));
      }
    }
  }
}

/// Bytes of @p count elements of E, or 0 for an absent buffer.
template <class E>
std::uint64_t bytes_of(const E* data, std::int64_t count) {
  return data == nullptr || count <= 0 ? 0 : static_cast<std::uint64_t>(count) * sizeof(E);
}
template <class E>
std::uint64_t bytes_of(const span<E>& s) {
  return bytes_of(s.data, s.size);
}

/// Enumerations from the caller are checked like any other value: a cast integer that names
/// no enumerator would otherwise act as one of them.
inline void check_mode(Mode mode, const char* argument = "mode") {
  require(mode == Mode::per_channel || mode == Mode::per_activation, argument, argument,
          ": expected Mode::per_channel (0) or Mode::per_activation (1), got ", static_cast<int>(mode));
}
inline void check_layout(const Shape& shape) {
  const Layout l = shape.layout();
  require(l == Layout::contiguous || l == Layout::channels_last, "shape",
          "shape: layout: expected Layout::contiguous (0) or Layout::channels_last (1), got ", static_cast<int>(l));
}
inline void check_activation(Activation activation) {
  require(activation == Activation::identity || activation == Activation::relu, "activation",
          "activation: expected Activation::identity (0) or Activation::relu (1), got ", static_cast<int>(activation));
}

/**
 * True when tensors of shapes @p a and @p b are the same elements at the same offsets: equal
 * extents, and equal layouts or a layout that makes no difference (one channel, or one
 * spatial position: (N, C), (N, C, 1, 1) and (N, 1, H, W) are stored alike in both layouts).
 */
inline bool same_memory_order(const Shape& a, const Shape& b) {
  if (a.rank() != b.rank()) return false;
  for (int d = 0; d < a.rank(); ++d)
    if (a[d] != b[d]) return false;
  return a.layout() == b.layout() || a.spatial() == 1 || a.channels() == 1;
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

/**
 * Checks every argument of a forward call. @p workspace (CUDA) is scratch memory the call
 * writes, so it takes part in the overlap rule like the other outputs.
 */
template <class T>
void check_forward(const Shape& shape, const ForwardArgs<T>& a, const ForwardConfig& c,
                   const void* workspace = nullptr, std::uint64_t workspace_bytes = 0) {
  check_layout(shape);
  check_mode(c.mode);
  check_activation(c.activation);
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  check_pointer(a.x, "x", numel);
  check_pointer(a.y, "y", numel);
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
  // Running statistics are written only when they are updated (batch statistics).
  const bool updates = c.batch_statistics;
  check_overlaps({{"y", a.y, bytes_of(a.y, numel), true},
                  {"x", a.x, bytes_of(a.x, numel), false},
                  {"residual", a.residual, bytes_of(a.residual, numel), false},
                  {"running_mean", a.running_mean.data, bytes_of(a.running_mean), updates},
                  {"running_var", a.running_var.data, bytes_of(a.running_var), updates},
                  {"save_mean", a.save_mean.data, bytes_of(a.save_mean), true},
                  {"save_invstd", a.save_invstd.data, bytes_of(a.save_invstd), true},
                  {"skipped_updates", a.skipped_updates, bytes_of(a.skipped_updates, 1), true},
                  {"workspace", workspace, workspace_bytes, true},
                  {"weight", a.weight.data, bytes_of(a.weight), false},
                  {"bias", a.bias.data, bytes_of(a.bias), false}},
                 {{"y", "x"}, {"y", "residual"}});
  if (c.batch_statistics) check_batch_statistics_count(shape, c.mode);
}

/// Checks every argument of a backward call (@p workspace as in check_forward()).
template <class T>
void check_backward(const Shape& shape, const BackwardArgs<T>& a, const BackwardConfig& c,
                    const void* workspace = nullptr, std::uint64_t workspace_bytes = 0) {
  check_layout(shape);
  check_mode(c.mode);
  check_activation(c.activation);
  const std::int64_t numel = shape.numel();
  const std::int64_t features = feature_count(shape, c.mode);
  const bool relu = c.activation != Activation::identity;
  check_pointer(a.x, "x", numel);
  check_pointer(a.dy, "dy", numel);
  if (relu) check_pointer(a.y, "y", numel);
  check_feature_span(a.weight, "weight", features, false);
  check_feature_span(a.mean, "mean", features, true);
  check_feature_span(a.invstd, "invstd", features, true);
  check_feature_span(a.grad_weight, "grad_weight", features, false);
  check_feature_span(a.grad_bias, "grad_bias", features, false);
  // y is read only for the relu mask.
  check_overlaps({{"dx", a.dx, bytes_of(a.dx, numel), true},
                  {"dresidual", a.dresidual, bytes_of(a.dresidual, numel), true},
                  {"grad_weight", a.grad_weight.data, bytes_of(a.grad_weight), true},
                  {"grad_bias", a.grad_bias.data, bytes_of(a.grad_bias), true},
                  {"workspace", workspace, workspace_bytes, true},
                  {"dy", a.dy, bytes_of(a.dy, numel), false},
                  {"x", a.x, bytes_of(a.x, numel), false},
                  {"y", relu ? a.y : nullptr, bytes_of(a.y, numel), false},
                  {"weight", a.weight.data, bytes_of(a.weight), false},
                  {"mean", a.mean.data, bytes_of(a.mean), false},
                  {"invstd", a.invstd.data, bytes_of(a.invstd), false}},
                 {{"dx", "dy"}, {"dx", "x"}, {"dresidual", "dy"}});
}

}  // namespace batchnorm::detail
