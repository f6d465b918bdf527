/**
 * @file half.hpp
 * @brief Makes `__half` and `__nv_bfloat16` (from the CUDA toolkit's <cuda_fp16.h> and
 *        <cuda_bf16.h>) usable as storage types on the CPU backend, as PyTorch's "mixed"
 *        mode: half-precision activations, `float` parameters and running statistics
 *        (`param_t<__half> == float`), accumulation in double on the host.
 *
 * The CPU backend reads and writes activations through detail::convert<T>; this header
 * specializes it with branch-free bit conversions (detail/convert.hpp) that give the same bits
 * as the toolkit's host `__half2float` / `__double2half` / `__double2bfloat16` (tested), at a
 * fraction of their cost (they vectorize): half → double is exact, and double → half rounds
 * once, to nearest even (the double first rounded *to odd* at two bits more than the half type
 * keeps, an exact float then, never float's nearest, which would round twice).
 * Overflow gives ±inf, NaN stays NaN.
 *
 * Needs the CUDA toolkit's include directory (CMake: `${CUDAToolkit_INCLUDE_DIRS}` from
 * `find_package(CUDAToolkit)`, best as a SYSTEM include) but not nvcc: g++ and clang++
 * compile the CUDA half headers in host code. It is not included by <batchnorm/batchnorm.hpp>,
 * so the core stays free of CUDA headers.
 *
 * @code
 * #include <batchnorm/batchnorm.hpp>
 * #include <batchnorm/half.hpp>
 * batchnorm::BatchNorm2d<__half, batchnorm::cpu> bn(64);   // float weights and running stats
 * bn.forward(x, y, {8, 64, 32, 32});                       // x, y: host __half buffers
 * @endcode
 */
#pragma once

#if defined(__has_include)
#if !__has_include(<cuda_fp16.h>) || !__has_include(<cuda_bf16.h>)
#error "batchnorm/half.hpp needs <cuda_fp16.h> and <cuda_bf16.h> from the CUDA toolkit; CMake: find_package(batchnorm CONFIG REQUIRED COMPONENTS half) and link batchnorm::half"
#endif
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "detail/convert.hpp"
#include "types.hpp"

namespace batchnorm {

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "batchnorm: unexpected size of the CUDA half types");

namespace detail {

/// @brief Host conversions of IEEE binary16 (`__half`): exact widening, one rounding when narrowing.
template <>
struct convert<__half> {
  /// The format as a float with fewer significand bits (the CPU's float route).
  using format = bits::half_format;
  /**
   * @brief Exact value of @p v as a double.
   * @param v a half value (any, including inf and NaN)
   */
  static BN_CONVERT_INLINE double to_double(__half v) { return bits::half_to_double(static_cast<__half_raw>(v).x); }
  /**
   * @brief @p v rounded to the nearest half (ties to even); beyond ±65504 (after rounding) ±inf.
   * @param v the value to store
   */
  static BN_CONVERT_INLINE __half from_double(double v) {
    __half_raw r;
    r.x = bits::double_to_half(v);
    return __half(r);
  }
};

/// @brief Host conversions of bfloat16 (`__nv_bfloat16`): exact widening, one rounding when narrowing.
template <>
struct convert<__nv_bfloat16> {
  /// The format as a float with fewer significand bits (the CPU's float route).
  using format = bits::bfloat16_format;
  /**
   * @brief Exact value of @p v as a double.
   * @param v a bfloat16 value (any, including inf and NaN)
   */
  static BN_CONVERT_INLINE double to_double(__nv_bfloat16 v) {
    return bits::bfloat16_to_double(static_cast<__nv_bfloat16_raw>(v).x);
  }
  /**
   * @brief @p v rounded to the nearest bfloat16 (ties to even).
   * @param v the value to store
   */
  static BN_CONVERT_INLINE __nv_bfloat16 from_double(double v) {
    __nv_bfloat16_raw r;
    r.x = bits::double_to_bfloat16(v);
    return __nv_bfloat16(r);
  }
};

}  // namespace detail

/**
 * @brief Converts a value of storage type @p T to double (exact for every supported type).
 * @tparam T float, double, `__half` or `__nv_bfloat16`
 * @param v the value
 */
template <class T>
double to_double(T v) {
  return detail::convert<T>::to_double(v);
}

/**
 * @brief Rounds @p v to storage type @p T (once, to nearest even), e.g. to fill a host
 *        `__half` buffer: `x[i] = batchnorm::from_double<__half>(value)`.
 * @tparam T float, double, `__half` or `__nv_bfloat16`
 * @param v the value
 */
template <class T>
T from_double(double v) {
  return detail::convert<T>::from_double(v);
}

}  // namespace batchnorm
