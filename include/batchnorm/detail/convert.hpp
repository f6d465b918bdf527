/**
 * @file detail/convert.hpp
 * @brief Host-side conversion between a storage type and double, the CPU backend's
 *        accumulation type. Half types specialize it in <batchnorm/half.hpp>.
 */
#pragma once

namespace batchnorm::detail {

template <class T>
struct convert {
  static double to_double(T v) { return static_cast<double>(v); }
  static T from_double(double v) { return static_cast<T>(v); }
};

}  // namespace batchnorm::detail
