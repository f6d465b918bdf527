/**
 * @file types.hpp
 * @brief Backend tags, the parameter type that goes with each storage type, and a
 *        minimal span used by the functional API.
 */
#pragma once

#include <cstdint>
#include <type_traits>

// Forward declarations so that plain C++ code can name the CUDA types without CUDA
// headers. They are the exact types the CUDA headers define (cudaStream_t is CUstream_st*).
struct CUstream_st;
struct __half;
struct __nv_bfloat16;

namespace batchnorm {

/// @brief Backend tag: host memory, reference loops accumulating in double. Plain C++17.
struct cpu {
  /// The CPU backend runs synchronously; the stream argument exists for symmetry only.
  struct stream_type {};
};

/// @brief Backend tag: device memory, CUDA kernels (compile with nvcc, include
///        <batchnorm/cuda.cuh>). The default backend of the layer classes, in every
///        compiler (see BatchNorm), so that `BatchNorm2d<float>` is one type in .cu and .cpp files.
struct cuda {
  /// Identical to cudaStream_t; the default (null) stream is the legacy default stream.
  using stream_type = CUstream_st*;
};

/**
 * @brief Type of parameters, running statistics and accumulators for storage type @p T.
 *
 * `float` and `double` keep their own type; `__half` and `__nv_bfloat16` use `float`
 * (PyTorch's "mixed" mode: half activations, float module).
 */
template <class T>
struct param_type {
  static_assert(std::is_floating_point_v<T>, "batchnorm: unsupported storage type");
  using type = T;
};
template <>
struct param_type<__half> {
  using type = float;
};
template <>
struct param_type<__nv_bfloat16> {
  using type = float;
};
/// @brief Shorthand for `typename param_type<T>::type`.
template <class T>
using param_t = typename param_type<T>::type;

/**
 * @brief A pointer and an element count: how the functional API receives per-feature
 *        buffers, so that their sizes can be checked. `{nullptr, 0}` means "absent".
 */
template <class E>
struct span {
  E* data = nullptr;
  std::int64_t size = 0;

  constexpr span() = default;
  constexpr span(E* d, std::int64_t n) : data(d), size(n) {}
  /// From any contiguous container with data()/size() (e.g. std::vector).
  template <class C, class = decltype(std::declval<C&>().data()),
            class = std::enable_if_t<std::is_convertible_v<decltype(std::declval<C&>().data()), E*>>>
  constexpr span(C& c) : data(c.data()), size(static_cast<std::int64_t>(c.size())) {}  // NOLINT
  [[nodiscard]] constexpr bool empty() const noexcept { return data == nullptr; }
  constexpr E& operator[](std::int64_t i) const { return data[i]; }
};

}  // namespace batchnorm
