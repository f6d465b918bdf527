/**
 * @file detail/convert.hpp
 * @brief Host-side conversion between a storage type and double, the CPU backend's
 *        accumulation type. Half types specialize it in <batchnorm/half.hpp> with the bit-exact,
 *        branch-free conversions below, written so that the CPU loops around them vectorize
 *        (the toolkit's host __double2half / __double2bfloat16 are branchy scalar code).
 */
#pragma once

#include <cstdint>
#include <cstring>

// Every conversion is forced inline: the CPU loops vectorize only with the conversion's body in
// them, and GCC's inliner gives up on double_to_half (the loop then calls it once per element).
// The instruction-set versions of the loops inline everything anyway (flatten); this covers a
// build whose flags already have the instruction set (no dispatch) and the baseline.
#if defined(__GNUC__) || defined(__clang__)
#define BN_CONVERT_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BN_CONVERT_INLINE __forceinline
#else
#define BN_CONVERT_INLINE inline
#endif

namespace batchnorm::detail {

template <class T>
struct convert {
  static BN_CONVERT_INLINE double to_double(T v) { return static_cast<double>(v); }
  static BN_CONVERT_INLINE T from_double(double v) { return static_cast<T>(v); }
};

namespace bits {

BN_CONVERT_INLINE std::uint32_t of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
BN_CONVERT_INLINE float to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
BN_CONVERT_INLINE std::uint64_t of(double d) {
  std::uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}
BN_CONVERT_INLINE double to_double(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

// Why these formulations: the CPU loops convert every element, so each function is a straight
// line of integer and float operations on plain values, with every candidate result computed
// unconditionally and chosen by an integer mask. GCC then vectorizes the loops around them (a
// ternary whose arm holds a float operation stays a branch under the default -ftrapping-math, and
// the loop then runs one element at a time). No floating-point operation here can be contracted
// into an FMA, so every instruction set gives the same bits.

/// All ones when @p condition holds, else 0: selects as masks, (a & m) | (b & ~m). Conditions
/// compare values below 2^31 as signed integers: one vector instruction (unsigned needs two).
BN_CONVERT_INLINE std::uint32_t mask(bool condition) { return 0u - static_cast<std::uint32_t>(condition); }
BN_CONVERT_INLINE std::int32_t as_signed(std::uint32_t u) { return static_cast<std::int32_t>(u); }

/// bfloat16 bits → float (exact: a bfloat16 is the top half of a float).
BN_CONVERT_INLINE float bfloat16_to_float(std::uint16_t h) { return to_float(std::uint32_t{h} << 16); }

/// bfloat16 bits → double (exact).
BN_CONVERT_INLINE double bfloat16_to_double(std::uint16_t h) { return static_cast<double>(bfloat16_to_float(h)); }

/// IEEE binary16 bits → float (exact; subnormals through an exact float subtraction of normal
/// floats, so that a denormals-are-zero FPU mode cannot flush them).
BN_CONVERT_INLINE float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (std::uint32_t{h} & 0x8000u) << 16;
  const std::uint32_t magnitude = std::uint32_t{h} & 0x7fffu;
  const std::uint32_t shifted = magnitude << 13;  // exponent and mantissa in float's places
  const std::uint32_t is_special = mask(as_signed(magnitude) >= 0x7c00);  // inf, NaN (payload kept)
  const std::uint32_t is_subnormal = mask(as_signed(magnitude) < 0x400);
  // rebias 15 → 127 (twice for inf / NaN: exponent 31 → 255)
  const std::uint32_t normal = shifted + ((127u - 15u) << 23) + (is_special & ((127u - 15u) << 23));
  // subnormal m·2^-24: the normal float 2^-14·(1 + m/1024), less 2^-14 (exact)
  const std::uint32_t subnormal = of(to_float(shifted + ((127u - 14u) << 23)) - 0x1p-14f);
  return to_float(((subnormal & is_subnormal) | (normal & ~is_subnormal)) | sign);
}

/// IEEE binary16 bits → double (exact).
BN_CONVERT_INLINE double half_to_double(std::uint16_t h) { return static_cast<double>(half_to_float(h)); }

/**
 * @brief @p d rounded *to odd* at @p Kept significant bits: its significand truncated to them,
 *        the last one set when a dropped bit was set. Rounding that once more to nearest even at
 *        2+ bits fewer gives exactly the nearest-even rounding of @p d: one rounding, as if
 *        directly. Integer operations on the bits only (a NaN stays NaN, ±inf stays ±inf).
 */
template <int Kept>
BN_CONVERT_INLINE double round_to_odd(double d) {
  static_assert(Kept >= 2 && Kept <= 52, "significant bits of the result");
  constexpr std::uint64_t dropped = (std::uint64_t{1} << (53 - Kept)) - 1;
  const std::uint64_t u = of(d);
  // (u & dropped) + dropped carries into the last kept bit exactly when a dropped bit is set
  return to_double((u | ((u & dropped) + dropped)) & ~dropped);
}

/// double → bfloat16 bits, one rounding to nearest even; NaN → 0x7fff with the sign of @p d.
BN_CONVERT_INLINE std::uint16_t double_to_bfloat16(double d) {
  // 10 significant bits (bfloat16's 8 + 2): the float conversion is exact down to 2^-140, and
  // anything smaller is below half the least bfloat16 subnormal whatever the float rounds it to.
  const std::uint32_t u = of(static_cast<float>(round_to_odd<10>(d)));
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = mask(as_signed(u & 0x7fffffffu) > 0x7f800000);
  return static_cast<std::uint16_t>((((u >> 16) | 0x7fffu) & nan) | (rounded & ~nan));
}

/// double → IEEE binary16 bits, one rounding to nearest even; beyond 65504 (after rounding)
/// ±inf; NaN → 0x7fff with the sign of @p d.
BN_CONVERT_INLINE std::uint16_t double_to_half(double d) {
  // 13 significant bits (half's 11 + 2): the float conversion is exact down to 2^-137, far below
  // half's least subnormal 2^-24.
  const std::uint32_t u = of(static_cast<float>(round_to_odd<13>(d)));
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // normal half: rebias the exponent, round the 13 dropped bits to nearest even
  const std::uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // subnormal half (|x| < 2^-14): align the mantissa by adding 0.5 (float addition rounds to
  // nearest even at 2^-24, the half subnormal step), then take the low bits
  const std::uint32_t magic = 126u << 23;
  const std::uint32_t subnormal = of(to_float(a) + to_float(magic)) - magic;
  const std::uint32_t is_subnormal = mask(as_signed(a) < as_signed(113u << 23));
  const std::uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const std::uint32_t is_nan = mask(as_signed(a) > 0x7f800000);
  const std::uint32_t is_inf = mask(as_signed(a) >= as_signed((127u + 16u) << 23)) & ~is_nan;
  const std::uint32_t r = (0x7fffu & is_nan) | (0x7c00u & is_inf) | (finite & ~(is_nan | is_inf));
  return static_cast<std::uint16_t>(r | sign);
}

/// Whether the float bits @p u have a magnitude in [min_bits, end_bits) (one unsigned compare).
BN_CONVERT_INLINE bool in_range(std::uint32_t u, std::uint32_t min_bits, std::uint32_t end_bits) {
  return (u & 0x7fffffffu) - min_bits < end_bits - min_bits;
}

/**
 * @brief The 16-bit formats seen as floats with fewer significand bits, for loops that compute
 *        in float and round to the format (the CPU's float route, detail/cpu/float_route.hpp).
 *
 * Where the format is a truncated float (bfloat16: every finite float; half: magnitudes in
 * [2^-14, 2^16), when checks_range), its values are the floats whose dropped_bits lowest bits
 * are 0, the midpoints between consecutive values the floats whose dropped bits are 100…0, and
 * round_off_midpoint(f) is the format's nearest value to f when f is not a midpoint (±inf beyond
 * the largest).
 */
struct bfloat16_format {
  static constexpr int dropped_bits = 16;
  static constexpr bool checks_range = false;
  static constexpr std::uint32_t min_bits = 0, end_bits = 0;
  static BN_CONVERT_INLINE float widen(std::uint16_t h) { return bfloat16_to_float(h); }
  /// The nearest bfloat16's bits to the finite float of bits @p u (sign kept), which is not a
  /// midpoint: ties are not rounded to even (the float route leaves them to the double formula).
  static BN_CONVERT_INLINE std::uint16_t round_off_midpoint(std::uint32_t u) {
    return static_cast<std::uint16_t>((u + 0x8000u) >> 16);
  }
};

/// IEEE binary16 as a float format (see bfloat16_format): the normal halves, and the rounding of
/// floats of magnitude in [2^-14, 2^16) (above 65520: ±inf).
struct half_format {
  static constexpr int dropped_bits = 13;
  static constexpr bool checks_range = true;
  static constexpr std::uint32_t min_bits = (127u - 14u) << 23;  ///< 2^-14, the least normal half
  static constexpr std::uint32_t end_bits = (127u + 16u) << 23;  ///< 2^16
  static BN_CONVERT_INLINE float widen(std::uint16_t h) { return half_to_float(h); }
  static BN_CONVERT_INLINE std::uint16_t round_off_midpoint(std::uint32_t u) {
    const std::uint32_t a = u & 0x7fffffffu;
    // rebias the exponent, round the 13 dropped bits to nearest (as double_to_half, but for ties)
    const std::uint32_t magnitude = (a + ((15u - 127u) << 23) + 0x1000u) >> 13;
    return static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | magnitude);
  }
};

}  // namespace bits

}  // namespace batchnorm::detail
