/**
 * @file detail/convert.hpp
 * @brief Host-side conversion between a storage type and double, the CPU backend's
 *        accumulation type. Half types specialize it in <batchnorm/half.hpp> with the bit-exact,
 *        branch-free conversions below (the toolkit's host __double2half / __double2bfloat16 are
 *        branchy software code: most of a bf16 forward's time went there).
 */
#pragma once

#include <cstdint>
#include <cstring>

namespace batchnorm::detail {

template <class T>
struct convert {
  static double to_double(T v) { return static_cast<double>(v); }
  static T from_double(double v) { return static_cast<T>(v); }
};

namespace bits {

inline std::uint32_t of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// bfloat16 bits → double (exact: a bfloat16 is the top half of a float).
inline double bfloat16_to_double(std::uint16_t h) { return static_cast<double>(to_float(std::uint32_t{h} << 16)); }

/// IEEE binary16 bits → double (exact; subnormals through an exact integer product, so that a
/// denormals-are-zero FPU mode cannot flush them).
inline double half_to_double(std::uint16_t h) {
  const std::uint32_t sign = (std::uint32_t{h} & 0x8000u) << 16;
  const std::uint32_t magnitude = std::uint32_t{h} & 0x7fffu;
  const std::uint32_t normal = (magnitude << 13) + ((127u - 15u) << 23);
  const std::uint32_t special = (magnitude << 13) | 0x7f800000u;  // inf, NaN (payload kept)
  const std::uint32_t subnormal = of(static_cast<float>(static_cast<std::int32_t>(magnitude)) * 0x1p-24f);
  const std::uint32_t u = magnitude >= 0x7c00u ? special : magnitude < 0x400u ? subnormal : normal;
  return static_cast<double>(to_float(u | sign));
}

/**
 * @brief @p d rounded to float *to odd*: the truncation, with its last bit set when inexact.
 *        Rounding that float once more to nearest even at 2+ bits fewer (bfloat16: 8, half: 11
 *        bits) gives exactly the nearest-even rounding of @p d: one rounding, as if directly.
 */
inline std::uint32_t round_to_odd_float_bits(double d) {
  const float f = static_cast<float>(d);  // nearest even: the truncation or the next float out
  const std::uint32_t u = of(f);
  const bool inexact = static_cast<double>(f) != d && d == d;  // NaN: not a rounding
  const bool away = (static_cast<double>(f) < 0 ? -static_cast<double>(f) : static_cast<double>(f)) >
                    (d < 0 ? -d : d);
  const std::uint32_t odd = away ? u - 1 : u + 1;  // the other neighbour: the one with bit 0 set
  return inexact && (u & 1u) == 0 ? odd : u;
}

/// double → bfloat16 bits, one rounding to nearest even; NaN → 0x7fff with the sign of @p d.
inline std::uint16_t double_to_bfloat16(double d) {
  const std::uint32_t u = round_to_odd_float_bits(d);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<std::uint16_t>(nan ? ((u >> 16) & 0x8000u) | 0x7fffu : rounded);
}

/// double → IEEE binary16 bits, one rounding to nearest even; beyond 65504 (after rounding)
/// ±inf; NaN → 0x7fff with the sign of @p d.
inline std::uint16_t double_to_half(double d) {
  const std::uint32_t u = round_to_odd_float_bits(d);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // normal half: rebias the exponent, round the 13 dropped bits to nearest even
  const std::uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // subnormal half (|x| < 2^-14): align the mantissa by adding 0.5 (float addition rounds to
  // nearest even at 2^-24, the half subnormal step), then take the low bits
  const std::uint32_t magic = 126u << 23;
  const std::uint32_t subnormal = of(to_float(a) + to_float(magic)) - magic;
  const std::uint32_t finite = a < (113u << 23) ? subnormal : normal;
  const std::uint32_t r = a > 0x7f800000u ? 0x7fffu : a >= ((127u + 16u) << 23) ? 0x7c00u : finite;
  return static_cast<std::uint16_t>(r | sign);
}

}  // namespace bits

}  // namespace batchnorm::detail
