/**
 * @file shape.hpp
 * @brief Shape (extents of an activation tensor) and its memory Layout.
 */
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <ostream>

#include "errors.hpp"

namespace batchnorm {

/**
 * @brief Memory order of an activation tensor. Extents are always given as (N, C, spatial...).
 *
 * - `contiguous`: NCL / NCHW / NCDHW, element (n, c, s) at `(n * C + c) * S + s`.
 * - `channels_last`: NLC / NHWC / NDHWC, element (n, c, s) at `(n * S + s) * C + c`.
 * For rank 2, `(N, C)`, both are the same order.
 */
enum class Layout { contiguous, channels_last };

/**
 * @brief Extents of an activation tensor: a braced list of 2 to 5 `std::int64_t`,
 *        `(N, C, spatial...)`, plus its Layout (contiguous unless set).
 *
 * @throws batchnorm::invalid_argument (argument "shape") if the list has fewer than 2 or
 *         more than 5 extents, an extent is negative, or the product of the non-zero
 *         extents overflows int64.
 */
class Shape {
 public:
  static constexpr int max_rank = 5;

  Shape(std::initializer_list<std::int64_t> extents, Layout layout = Layout::contiguous)
      : layout_(layout) {
    detail::require(extents.size() >= 2 && extents.size() <= max_rank, "shape",
                    "shape: expected 2 to 5 extents (N, C, spatial...), got ", extents.size());
    rank_ = static_cast<int>(extents.size());
    int i = 0;
    for (std::int64_t e : extents) {
      detail::require(e >= 0, "shape", "shape: extent ", i, " must be >= 0, got ", e);
      extents_[static_cast<std::size_t>(i++)] = e;
    }
    // Reject shapes whose extents multiply past int64 before any index math runs. Zero
    // extents count as 1 here, so that every partial product (C * spatial, N * spatial, ...)
    // fits even when the tensor is empty.
    std::int64_t product = 1;
    for (int d = 0; d < rank_; ++d) {
      const std::int64_t e = extents_[static_cast<std::size_t>(d)];
      if (e == 0) continue;
      detail::require(product <= std::numeric_limits<std::int64_t>::max() / e, "shape",
                      "shape: element count overflows int64 at extent ", d, " (", e, ")");
      product *= e;
    }
  }

  [[nodiscard]] int rank() const noexcept { return rank_; }
  [[nodiscard]] Layout layout() const noexcept { return layout_; }
  /// @brief Extent @p d (0 = N, 1 = C, 2.. = spatial). Precondition: 0 <= d < rank().
  [[nodiscard]] std::int64_t operator[](int d) const { return extents_[static_cast<std::size_t>(d)]; }
  [[nodiscard]] std::int64_t batch() const noexcept { return extents_[0]; }
  [[nodiscard]] std::int64_t channels() const noexcept { return extents_[1]; }
  /// @brief Product of the spatial extents (1 for rank 2).
  [[nodiscard]] std::int64_t spatial() const noexcept {
    std::int64_t s = 1;
    for (int d = 2; d < rank_; ++d) s *= extents_[static_cast<std::size_t>(d)];
    return s;
  }
  /// @brief Number of elements, N * C * spatial.
  [[nodiscard]] std::int64_t numel() const noexcept { return batch() * channels() * spatial(); }

  friend bool operator==(const Shape& a, const Shape& b) noexcept {
    if (a.rank_ != b.rank_ || a.layout_ != b.layout_) return false;
    for (int d = 0; d < a.rank_; ++d)
      if (a[d] != b[d]) return false;
    return true;
  }
  friend bool operator!=(const Shape& a, const Shape& b) noexcept { return !(a == b); }

  /// Prints `(2, 3, 4, 4)`, with ` channels_last` appended when that is the layout.
  friend std::ostream& operator<<(std::ostream& os, const Shape& s) {
    os << '(';
    for (int d = 0; d < s.rank_; ++d) os << (d ? ", " : "") << s[d];
    os << ')';
    if (s.layout_ == Layout::channels_last) os << " channels_last";
    return os;
  }

 private:
  std::array<std::int64_t, max_rank> extents_{};
  int rank_ = 0;
  Layout layout_ = Layout::contiguous;
};

}  // namespace batchnorm
