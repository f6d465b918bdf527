/**
 * @file shape.hpp
 * @brief Shape (extents of an activation tensor) and its memory Layout.
 */
#pragma once

#include <array>
#include <cstdint>
#include <cstddef>
#include <iterator>
#include <limits>
#include <ostream>
#include <type_traits>
#include <utility>

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

namespace detail {

/// Integer types Shape accepts as extents (bool and character types are not extents).
template <class I>
constexpr bool is_extent_type = std::is_integral_v<I> && !std::is_same_v<I, bool> && !std::is_same_v<I, char> &&
                                !std::is_same_v<I, wchar_t> && !std::is_same_v<I, char16_t> &&
                                !std::is_same_v<I, char32_t>;

/// 2 <= count <= 5 for a count of any integer type, without sign-conversion warnings.
template <class N>
constexpr bool valid_rank(N count) {
  if constexpr (std::is_signed_v<N>) {
    return count >= 2 && count <= 5;
  } else {
    return count >= 2u && count <= 5u;
  }
}

/// An extent of any integer type as int64, rejecting what does not fit. Explicit casts
/// only, so that unsigned extents compile without -Wconversion / -Wsign-conversion warnings.
template <class I>
std::int64_t to_extent(I value, std::size_t index) {
  if constexpr (std::is_signed_v<I>) {
    require(value >= 0, "shape", "shape: extent ", index, " must be >= 0, got ", value);
  } else if constexpr (sizeof(I) >= sizeof(std::int64_t)) {
    require(value <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), "shape", "shape: extent ",
            index, " does not fit in int64, got ", value);
  }
  return static_cast<std::int64_t>(value);
}

}  // namespace detail

/**
 * @brief Extents of an activation tensor, `(N, C, spatial...)` (2 to 5 of them), plus its
 *        Layout (contiguous unless given).
 *
 * Ways to make one (extents of any integer type, signed or unsigned, without narrowing
 * warnings; they are checked and stored as `std::int64_t`):
 * @code
 * batchnorm::Shape a{32, 64, 56, 56};                                  // a braced list
 * batchnorm::Shape b{n, c};                                            // std::size_t n, c
 * batchnorm::Shape c({32, 64, 56, 56}, batchnorm::Layout::channels_last);
 * batchnorm::Shape d(sizes.data(), sizes.size());                      // pointer + run-time rank
 * batchnorm::Shape e(sizes);                                           // any contiguous range with
 *                                                                      // data() and size(): std::vector,
 *                                                                      // std::array, std::span, at::IntArrayRef
 * @endcode
 *
 * @throws batchnorm::invalid_argument (argument "shape") if there are fewer than 2 or more
 *         than 5 extents, the pointer is null with a non-zero count, an extent is negative or
 *         above the int64 range, or the product of the non-zero extents overflows int64.
 */
class Shape {
 public:
  static constexpr int max_rank = 5;

  /**
   * @brief The extents list of `Shape({...}, layout)`: any number of integers of any
   *        integer types (a braced list that mixes `std::size_t` and `int` included).
   *        The count is checked by Shape.
   */
  class Extents {
   public:
    Extents() = default;
    template <class... I, class = std::enable_if_t<(detail::is_extent_type<I> && ...)>>
    Extents(I... extents) : count_(sizeof...(I)) {  // NOLINT: implicit, from a braced list
      // More than max_rank extents are counted (Shape reports the count), not stored.
      std::size_t i = 0;
      ((i < max_rank ? void(values_[i] = detail::to_extent(extents, i)) : void(), ++i), ...);
    }

   private:
    friend class Shape;
    std::array<std::int64_t, max_rank> values_{};
    std::size_t count_ = 0;
  };

  /// @brief `Shape{n, c, h, w}`: 2 to 5 integers (of any integer types), contiguous layout.
  template <class... I, class = std::enable_if_t<sizeof...(I) != 1 && (detail::is_extent_type<I> && ...)>>
  Shape(I... extents) : Shape(Extents(extents...), Layout::contiguous) {}  // NOLINT: implicit from {...}
  /// @brief `Shape{n}`: one extent is not a shape; throws (explicit, so that an integer never
  ///        converts to a Shape by accident).
  template <class I, class = std::enable_if_t<detail::is_extent_type<I>>>
  explicit Shape(I extent) : Shape(Extents(extent), Layout::contiguous) {}

  /// @brief `Shape({n, c, h, w}, layout)`.
  Shape(const Extents& extents, Layout layout) : layout_(layout) {
    detail::require(extents.count_ >= 2 && extents.count_ <= max_rank, "shape",
                    "shape: expected 2 to 5 extents (N, C, spatial...), got ", extents.count_);
    extents_ = extents.values_;
    rank_ = static_cast<int>(extents.count_);
    validate();
  }

  /**
   * @brief Extents from a pointer and a count known at run time (a framework's sizes array).
   * @param extents @p rank integers, (N, C, spatial...)
   * @param rank number of extents, 2 to 5 (any integer type: `tensor.dim()`, `sizes.size()`)
   */
  template <class I, class N,
            class = std::enable_if_t<detail::is_extent_type<I> && detail::is_extent_type<N>>>
  Shape(const I* extents, N rank, Layout layout = Layout::contiguous) : layout_(layout) {
    detail::require(detail::valid_rank(rank), "shape", "shape: expected 2 to 5 extents (N, C, spatial...), got ", rank);
    detail::require(extents != nullptr, "shape", "shape: expected a pointer to ", rank, " extents, got nullptr");
    for (std::size_t i = 0; i < static_cast<std::size_t>(rank); ++i) {
      if constexpr (std::is_same_v<I, std::int64_t>) {
        extents_[i] = extents[i];
      } else {
        extents_[i] = detail::to_extent(extents[i], i);
      }
    }
    rank_ = static_cast<int>(rank);
    validate();
  }

  /**
   * @brief Extents from any contiguous range of integers with `data()` and `size()`:
   *        `std::vector<std::size_t>`, `std::array<int, 4>`, `std::span<const long>`,
   *        PyTorch's `tensor.sizes()`, ...
   */
  template <class Range, class E = std::remove_cv_t<std::remove_pointer_t<decltype(std::data(std::declval<const Range&>()))>>,
            class = std::enable_if_t<detail::is_extent_type<E>>, class = decltype(std::size(std::declval<const Range&>()))>
  explicit Shape(const Range& extents, Layout layout = Layout::contiguous)
      : Shape(std::data(extents), std::size(extents), layout) {}

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
  /// Negative extents (int64 input) and products past int64, before any index math runs.
  void validate() const {
    for (int d = 0; d < rank_; ++d)
      detail::require(extents_[static_cast<std::size_t>(d)] >= 0, "shape", "shape: extent ", d, " must be >= 0, got ",
                      extents_[static_cast<std::size_t>(d)]);
    // Zero extents count as 1 here, so that every partial product (C * spatial, N * spatial,
    // ...) fits even when the tensor is empty.
    std::int64_t product = 1;
    for (int d = 0; d < rank_; ++d) {
      const std::int64_t e = extents_[static_cast<std::size_t>(d)];
      if (e == 0) continue;
      detail::require(product <= std::numeric_limits<std::int64_t>::max() / e, "shape",
                      "shape: element count overflows int64 at extent ", d, " (", e, ")");
      product *= e;
    }
  }

  std::array<std::int64_t, max_rank> extents_{};
  int rank_ = 0;
  Layout layout_ = Layout::contiguous;
};

}  // namespace batchnorm
