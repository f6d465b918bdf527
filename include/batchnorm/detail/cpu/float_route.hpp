/**
 * @file detail/cpu/float_route.hpp
 * @brief Normalization and input gradient of half / bfloat16 values in float, giving exactly
 *        the bits of the double formulas: the float result is used where it provably rounds to
 *        the same 16-bit value, and the double formula is computed where it might not.
 *
 * The CPU backend defines y = round_T((x − mean)·scale + bias), computed in double (three
 * roundings far below T's precision, then one rounding to T). In double, converting and rounding
 * 32 bfloat16 values takes ~45 AVX-512 instructions; in float about half, which is what PyTorch
 * computes (and whose bits differ from ours in rare cases). The float route computes
 *
 *     c = fl(x − mean_f),  s = fl(c·scale_f),  y_f = fl(s + bias_f)      (mean_f = float(mean), …)
 *
 * and bounds its distance to the double result d. With u = 2^-24, one half-ulp per float
 * operation and per rounded coefficient (the coefficients are 0 or normal floats, FloatRoute):
 *
 *     |c − (x − mean)|      ≤ u|c| + u|mean|
 *     |s − (x − mean)·scale| ≤ u|s| + 2u|c·scale| + u|mean·scale|          (+ 2^-150 underflow)
 *     |y_f − exact|          ≤ u·(|y_f| + 3|s| + |mean·scale| + |bias|)·(1 + 2^-26) + 2^-148,
 *
 * the double formula's own error (2^-53 per operation) and products of u included in the last
 * factor. The route takes 1.25 times that, through |y_f| ≤ |s| + |bias| (to a rounding):
 *
 *     E = 5u·|s| + 1.25u·(|mean·scale| + 2|bias|) + 2^-140,
 *
 * whose float evaluation (three roundings, or fewer with FMA contraction under the consumer's
 * flags) stays above the need. If no rounding boundary of T (a midpoint between two consecutive
 * values) lies within E of y_f, then y_f and d are strictly inside the same rounding interval
 * and round to the same value of T: y = round_T(y_f). Otherwise, and whenever y_f is outside the
 * range where the format is a truncated float (NaN, inf, near 0; half: its subnormals and
 * overflow), the block is computed by the double formula. For typical data E is ~2^-20 of |y|
 * against a rounding interval of 2^-8 (bfloat16) or 2^-11 (half) of it: about one bfloat16 value
 * in 2^11 takes the double formula and one half value in 2^8 (so a block of 64 halves is redone
 * about once in five).
 *
 * The hand-written AVX-512 blocks of half planes (half_route_avx512) test the same bound another
 * way: they round both ends of [y_f − E, y_f + E] (rounded outwards) to half with the conversion
 * instruction, and a lane whose ends give the same half is clear, since rounding is monotonic.
 * That also covers half's subnormals and overflow, and costs fewer instructions.
 *
 * The input gradient (FloatGradientRoute) takes the same way with its own bound.
 *
 * The results are therefore the bits of the double formula for every input, instruction set and
 * thread count (tested over all 65536 inputs of each type for many coefficients, in both
 * layouts' loops and for every instruction set: tests/float_route_test.cpp).
 */
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../convert.hpp"
#include "target.hpp"

namespace batchnorm::detail::cpu_impl {
BATCHNORM_CPU_INLINE_ALL_BEGIN

/// Whether T is a 16-bit type with a float route (convert<T>::format, see bits::bfloat16_format).
template <class T, class = void>
inline constexpr bool has_float_route = false;
template <class T>
inline constexpr bool has_float_route<T, std::void_t<typename convert<T>::format>> = true;

/// One feature's coefficients in float and the constant part of the route's error bound.
struct FloatRoute {
  float mean = 0.0f, scale = 0.0f, bias = 0.0f;
  float slack = 0.0f;   ///< 1.25·2^-24·(|mean·scale| + 2|bias|) + 2^-140
  bool usable = false;  ///< coefficients are 0 or normal floats far from overflow
  /// The coefficients, as RouteLanes stores them.
  static constexpr std::array<float FloatRoute::*, 4> coefficients() {
    return {&FloatRoute::mean, &FloatRoute::scale, &FloatRoute::bias, &FloatRoute::slack};
  }
};

/// Whether a coefficient's float is within a relative 2^-24 of it: 0 or a normal float, far
/// from overflow and underflow.
inline bool fits_float_route(double v) {
  const double a = std::fabs(v);
  return a == 0.0 || (a >= 0x1p-100 && a <= 0x1p100);
}

/// The float route's coefficients for (x − mean)·scale + bias.
inline FloatRoute float_route(double mean, double scale, double bias) {
  FloatRoute r;
  r.usable = fits_float_route(mean) && fits_float_route(scale) && fits_float_route(bias);
  if (!r.usable) return r;
  r.mean = static_cast<float>(mean);
  r.scale = static_cast<float>(scale);
  r.bias = static_cast<float>(bias);
  // ≤ 2^200 in double, so finite; it becomes +inf as a float when |mean·scale| passes ~2^151,
  // and then no value passes the check (no distance exceeds inf): the double formula runs.
  r.slack = static_cast<float>((std::fabs(mean * scale) + 2.0 * std::fabs(bias)) * 0x1.4p-24 + 0x1p-140);
  return r;
}

/**
 * @brief Per-lane routes of a rows pass, one float array per coefficient (lane j's coefficient
 *        i at coefficient[i][j]), so that consecutive lanes load as vectors; used only when
 *        every lane's coefficients fit (usable).
 * @tparam Route FloatRoute or FloatGradientRoute (its coefficients() list the arrays)
 */
template <class Route>
struct RouteLanes {
  static constexpr std::size_t count = Route::coefficients().size();
  float* coefficient[count] = {};
  bool usable = false;
  /// The arrays at @p storage, @p stride floats apart (count·stride floats); usable until set()
  /// meets a route that is not.
  void place(float* storage, std::int64_t stride) {
    for (std::size_t i = 0; i < count; ++i) coefficient[i] = storage + static_cast<std::int64_t>(i) * stride;
    usable = true;
  }
  bool placed() const { return coefficient[0] != nullptr; }
  /// Sets lane @p j; usable stays true while every lane's coefficients fit.
  void set(std::int64_t j, const Route& k) {
    for (std::size_t i = 0; i < count; ++i) coefficient[i][j] = k.*(Route::coefficients()[i]);
    usable = usable && k.usable;
  }
  BN_CONVERT_INLINE Route operator()(std::int64_t j) const {
    Route k;
    for (std::size_t i = 0; i < count; ++i) k.*(Route::coefficients()[i]) = coefficient[i][j];
    return k;
  }
};
using FloatRouteLanes = RouteLanes<FloatRoute>;

/// The route of a single feature, the same for every value (planes), with the double formula's
/// coefficients (the hand-written AVX-512 blocks redo the values the route misses with them).
struct SameFloatRoute {
  FloatRoute k;
  double mean = 0.0, scale = 0.0, bias = 0.0;
  SameFloatRoute(double mean_, double scale_, double bias_)
      : k(float_route(mean_, scale_, bias_)), mean(mean_), scale(scale_), bias(bias_) {}
  BN_CONVERT_INLINE const FloatRoute& operator()(std::int64_t) const { return k; }
};

/// The routes of a rows pass, one per lane (value j of a row is lane j's), with the double
/// formula's coefficients per lane (the hand-written AVX-512 blocks redo the values the route
/// misses with them).
struct LaneFloatRoute {
  const FloatRouteLanes& k;
  const double* mean;
  const double* scale;
  const double* bias;
};

/**
 * @brief 0 when no rounding boundary of the format lies within @p bound of the float @p y and y
 *        is in the range where the format is a truncated float (then y and any value within
 *        the bound round to the same value of it), else all ones.
 */
template <class Format>
BN_CONVERT_INLINE std::uint32_t boundary_miss(float y, float bound) {
  using bits::mask;
  const std::uint32_t u = bits::of(y);
  // The midpoint of y's rounding interval: y's bits with the dropped ones 100…0. Same sign and
  // binade as y, so |y − midpoint| is exact (Sterbenz).
  constexpr std::uint32_t dropped = (1u << Format::dropped_bits) - 1;
  const float midpoint = bits::to_float((u & ~dropped) | (1u << (Format::dropped_bits - 1)));
  // The boundary below the interval is at least a quarter interval away, even across a binade
  // (steps half as large below): more than 2^(dropped_bits − 26)·|y|.
  constexpr float quarter_interval = 1.0f / static_cast<float>(1u << (26 - Format::dropped_bits));
  const float to_mid = std::fabs(y - midpoint);
  const float to_lower = std::fabs(y) * quarter_interval;
  const float distance = to_mid < to_lower ? to_mid : to_lower;
  // NaN and ±inf fail (a comparison with NaN is false; the bound is then not finite).
  std::uint32_t inside = mask(distance > bound);
  if constexpr (Format::checks_range) inside &= mask(bits::in_range(u, Format::min_bits, Format::end_bits));
  return ~inside;
}

/**
 * @brief @p out = act(round_T(y)) for a float @p y within @p bound of the double formula's value.
 * @return 0 when @p out is the double formula's rounded value, else all ones (then @p out is to
 *         be discarded): a rounding boundary of T within @p bound of y, or y out of range.
 */
template <class Format, bool Relu>
BN_CONVERT_INLINE std::uint32_t round_when_clear(float y, float bound, std::uint16_t& out) {
  const std::uint32_t miss = boundary_miss<Format>(y, bound);
  // y is not a midpoint (its distance to one is more than the bound), so no tie to break.
  std::uint32_t r = Format::round_off_midpoint(bits::of(y));
  // relu after rounding: y is far from 0 (2^-130 at least) and rounds with its sign, so the sign
  // bit of the rounded value tells a negative d (→ +0) as relu before rounding does.
  if constexpr (Relu) r &= ~bits::mask((r >> 15) != 0u);
  out = static_cast<std::uint16_t>(r);
  return miss;
}

/// y_f = (x − mean)·scale + bias in float for the value @p x (exact as a float), and in
/// @p bound its error bound (see the file's comment): 1.25·2^-24·(|y| + 3|scaled| +
/// |mean·scale| + |bias|) ≤ 5·2^-24·|scaled| + slack, as |y| ≤ |scaled| + |bias| (to a float
/// rounding).
BN_CONVERT_INLINE float route_value(float x, const FloatRoute& k, float& bound) {
  const float centered = x - k.mean;
  const float scaled = centered * k.scale;
  bound = std::fabs(scaled) * 0x1.4p-22f + k.slack;
  return scaled + k.bias;
}

/**
 * @brief One value of the float route: @p out = act(round_T(y_f)) for the 16-bit input @p in.
 * @return 0 when @p out is the double formula's value, else all ones (then @p out is to be
 *         discarded).
 */
template <class Format, bool Relu>
BN_CONVERT_INLINE std::uint32_t float_route_value(std::uint16_t in, const FloatRoute& k, std::uint16_t& out) {
  float bound;
  const float y = route_value(Format::widen(in), k, bound);
  return round_when_clear<Format, Relu>(y, bound, out);
}

/**
 * @brief The float route of the input gradient of one feature (or lane): dx = g·dy_scale +
 *        ((x − mean) − shift)·xmu_scale + constant, g the upstream gradient, as
 *        input_gradient_value (Training). Error bound, as for FloatRoute, with q = g·dy_scale and
 *        p = ((x − mean) − shift)·xmu_scale as computed, and dx within |q| + |p| + |constant|:
 *
 *     |dx_f − dx| ≤ u·(4|q| + 6|p| + |mean·xmu_scale| + 2|shift·xmu_scale| + 2|constant|)·(1 + 2^-26),
 *
 * taken 1.25 times: 5u|q| + 7.5u|p| + slack.
 */
struct FloatGradientRoute {
  float mean = 0.0f, shift = 0.0f, dy_scale = 0.0f, xmu_scale = 0.0f, constant = 0.0f;
  float slack = 0.0f;  ///< 1.25·2^-24·(|mean·xmu_scale| + 2|shift·xmu_scale| + 2|constant|) + 2^-140
  bool usable = false;
  /// The coefficients, as RouteLanes stores them.
  static constexpr std::array<float FloatGradientRoute::*, 6> coefficients() {
    return {&FloatGradientRoute::mean,      &FloatGradientRoute::shift,    &FloatGradientRoute::dy_scale,
            &FloatGradientRoute::xmu_scale, &FloatGradientRoute::constant, &FloatGradientRoute::slack};
  }
};

inline FloatGradientRoute float_gradient_route(double mean, double shift, double dy_scale, double xmu_scale,
                                               double constant) {
  FloatGradientRoute r;
  r.usable = fits_float_route(mean) && fits_float_route(shift) && fits_float_route(dy_scale) &&
             fits_float_route(xmu_scale) && fits_float_route(constant);
  if (!r.usable) return r;
  r.mean = static_cast<float>(mean);
  r.shift = static_cast<float>(shift);
  r.dy_scale = static_cast<float>(dy_scale);
  r.xmu_scale = static_cast<float>(xmu_scale);
  r.constant = static_cast<float>(constant);
  const double a = std::fabs(xmu_scale);
  r.slack = static_cast<float>((std::fabs(mean) * a + 2.0 * std::fabs(shift) * a + 2.0 * std::fabs(constant)) *
                                   0x1.4p-24 +
                               0x1p-140);
  return r;
}

/// Per-lane input-gradient routes of a rows pass.
using FloatGradientRouteLanes = RouteLanes<FloatGradientRoute>;

/// dx_f for the value @p x and upstream gradient @p g (floats, exact), and in @p bound its error
/// bound (FloatGradientRoute).
BN_CONVERT_INLINE float gradient_route_value(float x, float g, const FloatGradientRoute& k, float& bound) {
  const float p = ((x - k.mean) - k.shift) * k.xmu_scale;
  const float q = g * k.dy_scale;
  bound = std::fabs(q) * 0x1.4p-22f + std::fabs(p) * 0x1.ep-22f + k.slack;
  return (q + p) + k.constant;
}

/// One input-gradient value of the float route, from the bits of x and of the upstream gradient
/// g (already masked by a fused relu: exact). @return as float_route_value.
template <class Format>
BN_CONVERT_INLINE std::uint32_t float_gradient_value(std::uint16_t x, float g, const FloatGradientRoute& k,
                                                     std::uint16_t& out) {
  float bound;
  const float dx = gradient_route_value(Format::widen(x), g, k, bound);
  return round_when_clear<Format, false>(dx, bound, out);
}

/// The bits of a 16-bit value.
template <class T>
BN_CONVERT_INLINE std::uint16_t bits_of(const T* p) {
  std::uint16_t b;
  std::memcpy(&b, p, sizeof b);
  return b;
}

/// Values of a float route block. Testing a block for misses costs a horizontal reduction; 64
/// values amortize it. On typical data a block has a miss about once in 30 in bfloat16 and once
/// in six in half (harness: 2.8 % and 17 % of the blocks).
inline constexpr std::int64_t float_route_block = 64;
/// Blocks per call of a hand-written block function (normalize_blocks_avx512): one call sets up
/// its constants for this many blocks.
inline constexpr std::int64_t blocks_per_call = 16;

/// The index of the lowest set bit of @p mask, which is not 0.
BN_CONVERT_INLINE int lowest_set_bit(std::uint64_t mask) {
#if defined(__GNUC__)
  return __builtin_ctzll(mask);
#else
  int j = 0;
  for (; (mask & 1u) == 0; mask >>= 1) ++j;
  return j;
#endif
}

/// The misses of a block of float_route_block values as a mask (bit j set where misses[j] != 0).
inline std::uint64_t miss_mask(const std::uint8_t* misses) {
  std::uint64_t mask = 0;
  for (std::int64_t w = 0; w < float_route_block; w += 8) {
    std::uint64_t word;  // eight misses at once: a block has one or two
    std::memcpy(&word, misses + w, sizeof word);
    if (word == 0) continue;
    for (std::int64_t j = w; j < w + 8; ++j) mask |= static_cast<std::uint64_t>(misses[j] != 0) << j;
  }
  return mask;
}

/**
 * @brief The values of a block that the float route missed (the set bits j of @p missed), each by
 *        @p exact(begin + j, begin + j + 1), the double formula, which writes out[begin + j];
 *        where the block is in a buffer (@p block not null), that result then replaces block[j].
 *        Only those values: redoing each block with a miss whole in double made half's
 *        normalization 1.4× slower (0.037 vs 0.026 ms in cache, with the conversion
 *        instructions, harness).
 */
template <class T, class Exact>
void redo_missed(std::uint64_t missed, std::int64_t begin, T* out, std::uint16_t* block, Exact& exact) {
  for (; missed != 0; missed &= missed - 1) {  // the set bits alone
    const int j = lowest_set_bit(missed);
    exact(begin + j, begin + j + 1);
    if (block != nullptr) block[j] = bits_of(out + begin + j);
  }
}

/// Whether @p out is one of @p inputs (a call in place; BackwardArgs: dx may be dy or x).
template <class T, class... Inputs>
BN_CONVERT_INLINE bool is_an_input(const T* out, const Inputs*... inputs) {
  return ((static_cast<const void*>(out) == static_cast<const void*>(inputs)) || ...);
}

/**
 * @brief Where the blocks of float_route_block outputs at out + i are written: straight there,
 *        or, where out is one of their inputs (in place), through a buffer copied to out once a
 *        block's inputs are read and its missed values redone (the double formula reads them).
 *
 * Why straight where it can be: a buffer costs its copy, and the copy's wide loads wait on the
 * block's narrower stores (a store forward that fails, most likely): perf put 9 % of half NCHW
 * (8, 256, 56, 56) backward on that copy (benchmarks/README, round twenty-one).
 */
template <class T>
class BlockOutput {
 public:
  /// @param out_is_input whether out may be an input of the blocks (in place)
  BlockOutput(T* out, bool out_is_input) : out_(out), out_is_input_(out_is_input) {}
  /// Whether the blocks go through the buffer (out is an input): one block at a time then.
  BN_CONVERT_INLINE bool buffered() const { return out_is_input_; }
  /// Where the block at @p i is to be written (the buffer holds one block).
  BN_CONVERT_INLINE void* block(std::int64_t i) {
    return out_is_input_ ? static_cast<void*>(buffer_) : static_cast<void*>(out_ + i);
  }
  /// The block at @p i written: its missed values (the set bits of @p missed) redone by
  /// @p exact(j, j + 1), then the block copied to out where it is buffered.
  template <class Exact>
  BN_CONVERT_INLINE void finish(std::int64_t i, std::uint64_t missed, Exact& exact) {
    redo_missed(missed, i, out_, out_is_input_ ? buffer_ : nullptr, exact);
    copy(i);
  }
  /// The block at @p i copied to out where it is buffered (its misses redone by the caller).
  BN_CONVERT_INLINE void copy(std::int64_t i) {
    if (out_is_input_) std::memcpy(static_cast<void*>(out_ + i), buffer_, sizeof buffer_);
  }

 private:
  T* out_;
  bool out_is_input_;
  std::uint16_t buffer_[float_route_block];
};

/// Whether the float route of format F redoes only the missed values of a block (redo_missed)
/// or the whole block: where blocks rarely miss (bfloat16), recording each value's miss costs
/// more than it saves (bfloat16 inference and backward 3 % slower, harness).
template <class Format>
inline constexpr bool redoes_missed_values = std::is_same_v<Format, bits::half_format>;

/**
 * @brief out[i] for the whole blocks of [0, length) through the float route: @p value(i, bits)
 *        gives value i's bits and 0, or all ones where the route misses it; the missed values
 *        are computed by @p exact(i, i + 1) (redo_missed), or a block with a miss whole by
 *        @p exact(begin, end), the double formula (redoes_missed_values). Value i's inputs are
 *        read before out[i] is written, and a block's outputs after all of its inputs (so out
 *        may be an input; the formulas are elementwise).
 * @return the number of values done, a multiple of float_route_block.
 */
template <class T, class Value, class Exact>
std::int64_t float_route_blocks(T* out, std::int64_t length, Value&& value, Exact&& exact) {
  static_assert(sizeof(T) == sizeof(std::uint16_t), "a 16-bit storage type");
  constexpr bool per_value = redoes_missed_values<typename convert<T>::format>;
  constexpr std::int64_t B = float_route_block;
  std::int64_t i = 0;
  for (; i + B <= length; i += B) {
    // Through a buffer always, unlike BlockOutput's blocks: the compiler's vectorized loop
    // writing straight to out (where out was not an input) was no faster, bfloat16 NCHW
    // (8, 256, 56, 56) backward 4.35–4.38 ms against 4.20–4.26 (harness, 1 thread, the best of
    // 100 in three alternated rounds, the same outputs; benchmarks/README, round twenty-two).
    std::uint16_t block[B];
    std::uint8_t misses[per_value ? B : 1];
    std::uint32_t missed = 0;
    for (std::int64_t j = 0; j < B; ++j) {
      const std::uint32_t miss = value(i + j, block[j]);
      if constexpr (per_value) misses[j] = static_cast<std::uint8_t>(miss);
      missed |= miss & 1u;  // the low bit only: see half_route_blocks
    }
    if constexpr (per_value) {
      if (missed != 0) redo_missed(miss_mask(misses), i, out, block, exact);
    } else if (missed != 0) {
      exact(i, i + B);
      continue;
    }
    std::memcpy(static_cast<void*>(out + i), block, sizeof block);
  }
  return i;
}

/**
 * @brief How half values are converted to and from float: by the integer formulas of
 *        bits::half_format (any processor), or by the processor's conversion instructions
 *        (F16C: vcvtph2ps and vcvtps2ph on 8 values, or their AVX-512 forms on 16), which
 *        give the same floats and, off midpoints, the same rounding.
 *
 * With the instructions, half normalization took 0.040 instead of 0.058 ms on (2, 64, 32, 32)
 * in cache (AVX-512, one thread, GCC 12 -O3, a harness; the same bits). The loops of an
 * instruction set use the conversion of the same width: a block written by 8-value stores and
 * read by 16-value loads stalled on store forwarding (0.094 ms).
 */
enum class HalfConversion { integer, f16c, avx512 };

#if defined(BATCHNORM_CPU_X86_TARGETS)
BATCHNORM_CPU_INLINE_ALL_END  // functions with target attributes of their own (target.hpp)
/// float_route_block halves at @p in to floats at @p out, 8 at a time (F16C).
__attribute__((target("f16c"))) inline void widen_halves_f16c(const void* in, float* out) {
  const auto* h = static_cast<const std::uint16_t*>(in);
  for (int j = 0; j < float_route_block; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + j))));
}
/// float_route_block floats at @p in rounded to nearest even halves at @p out, 8 at a time.
__attribute__((target("f16c"))) inline void narrow_halves_f16c(const float* in, void* out) {
  auto* h = static_cast<std::uint16_t*>(out);
  for (int j = 0; j < float_route_block; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// The AVX-512 forms with an all-ones zeroing mask: GCC 12's unmasked ones merge into an
// "undefined" register that -Wmaybe-uninitialized reports (an error under -Werror).
constexpr __mmask16 all_16_lanes = 0xffff;
/// As widen_halves_f16c, 16 at a time (AVX-512 F).
__attribute__((target("avx512f"))) inline void widen_halves_avx512(const void* in, float* out) {
  const auto* h = static_cast<const std::uint16_t*>(in);
  for (int j = 0; j < float_route_block; j += 16)
    _mm512_storeu_ps(out + j, _mm512_maskz_cvtph_ps(all_16_lanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j))));
}
/// As narrow_halves_f16c, 16 at a time (AVX-512 F).
__attribute__((target("avx512f"))) inline void narrow_halves_avx512(const float* in, void* out) {
  auto* h = static_cast<std::uint16_t*>(out);
  for (int j = 0; j < float_route_block; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + j),
                        _mm512_maskz_cvtps_ph(all_16_lanes, _mm512_loadu_ps(in + j),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/**
 * @brief route_value and boundary_miss<Format> on 16 bfloat16 values at once (AVX-512): @p y =
 *        y_f for the floats @p v, and the lanes where no rounding boundary of Format lies within
 *        the error bound, computed as those two functions do, in their order, with
 *        min(to_mid, to_lower) > bound as two comparisons (NaN fails both).
 */
/// The float route's coefficients of 16 consecutive values (FloatRoute's, per lane).
struct RouteVectors {
  __m512 mean, scale, bias, slack;
};

/// The coefficients of values [i, i + 16): a feature's, the same for all (planes).
__attribute__((target("avx512f"))) inline RouteVectors route_vectors(const SameFloatRoute& route, std::int64_t) {
  return {_mm512_set1_ps(route.k.mean), _mm512_set1_ps(route.k.scale), _mm512_set1_ps(route.k.bias),
          _mm512_set1_ps(route.k.slack)};
}
/// The coefficients of values [i, i + 16): lanes i to i + 15's (rows).
__attribute__((target("avx512f"))) inline RouteVectors route_vectors(const LaneFloatRoute& route, std::int64_t i) {
  const auto& c = route.k.coefficient;
  return {_mm512_loadu_ps(c[0] + i), _mm512_loadu_ps(c[1] + i), _mm512_loadu_ps(c[2] + i), _mm512_loadu_ps(c[3] + i)};
}
static_assert(FloatRoute::coefficients()[0] == &FloatRoute::mean && FloatRoute::coefficients()[1] == &FloatRoute::scale &&
                  FloatRoute::coefficients()[2] == &FloatRoute::bias && FloatRoute::coefficients()[3] == &FloatRoute::slack,
              "route_vectors reads RouteLanes' arrays in this order");

/// route_value on 16 floats @p v at once (AVX-512), with their coefficients @p k: y_f, and in
/// @p bound its error bound.
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline __m512 route_value_avx512(const __m512& v,
                                                                                            const RouteVectors& k,
                                                                                            __m512& bound) {
  const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(v, k.mean), k.scale);
  bound = _mm512_add_ps(_mm512_mul_ps(_mm512_abs_ps(scaled), _mm512_set1_ps(0x1.4p-22f)), k.slack);
  return _mm512_add_ps(scaled, k.bias);
}

template <class Format>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline __mmask16 route_clear_avx512(
    const __m512& v, const RouteVectors& k, __m512& y) {
  // Half takes half_route_avx512 (whose conversion instruction rounds its whole range)
  static_assert(!Format::checks_range, "a format that is a truncated float over its whole range");
  constexpr std::uint32_t dropped = (1u << Format::dropped_bits) - 1;
  __m512 bound;
  y = route_value_avx512(v, k, bound);
  // boundary_miss: the midpoint (u & ~dropped) | half an interval, and a quarter interval below
  const __m512i u = _mm512_castps_si512(y);
  const __m512 midpoint = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      u, _mm512_set1_epi32(static_cast<int>(~dropped)), _mm512_set1_epi32(1 << (Format::dropped_bits - 1)), 0xea));
  const __m512 to_mid = _mm512_abs_ps(_mm512_sub_ps(y, midpoint));
  const __m512 to_lower =
      _mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(1.0f / static_cast<float>(1u << (26 - Format::dropped_bits))));
  __mmask16 clear = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(to_mid, bound, _CMP_GT_OQ), to_lower, bound, _CMP_GT_OQ);
  return clear;
}

/**
 * @brief The half rounding of 16 float route values at once (AVX-512): @p rounded =
 *        act(round_half(y_f)), and the lanes where that is the double formula's value, for the
 *        floats @p y (y_f) and their error bounds @p bound (E).
 *
 * The double formula's value d lies within E of y_f, so in [lo, hi] = [y_f − E rounded down,
 * y_f + E rounded up]. Rounding to half (to nearest even, the conversion instruction's;
 * subnormals and overflow included) and relu are monotonic, so when lo and hi give the same
 * half, d gives it too; NaN ends miss (so do y_f = ±inf with an infinite bound). This clears
 * about the lanes boundary_miss clears (give or take an end within a float step of a boundary),
 * and also those of the range it leaves to the double formula, with fewer instructions: two
 * roundings and a 16-bit comparison instead of the distances to the midpoint and to the interval
 * below and the range test. Either way a lane's output is the double formula's bits. Measured
 * (harness, (8, 256, 56, 56) inference, 1 thread, in cache): that check took about half of the
 * time.
 */
template <bool Relu>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline __mmask16 half_interval_avx512(
    const __m512& y, const __m512& bound, __m256i& rounded) {
  __m512 lo = _mm512_maskz_sub_round_ps(all_16_lanes, y, bound, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 hi = _mm512_maskz_add_round_ps(all_16_lanes, y, bound, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  const __mmask16 ordered = _mm512_cmp_ps_mask(lo, hi, _CMP_ORD_Q);
  if constexpr (Relu) {  // max(v, +0): both zeros give +0, as half_route_blocks' activate
    lo = _mm512_maskz_max_ps(all_16_lanes, lo, _mm512_setzero_ps());
    hi = _mm512_maskz_max_ps(all_16_lanes, hi, _mm512_setzero_ps());
  }
  rounded = _mm512_maskz_cvtps_ph(all_16_lanes, lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i upper = _mm512_maskz_cvtps_ph(all_16_lanes, hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_mask_cmpeq_epi16_mask(ordered, rounded, upper);
}

/// route_value on 16 half values at once (AVX-512), rounded by half_interval_avx512.
template <bool Relu>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline __mmask16 half_route_avx512(
    const __m512& v, const RouteVectors& k, __m256i& rounded) {
  __m512 bound;
  const __m512 y = route_value_avx512(v, k, bound);
  return half_interval_avx512<Relu>(y, bound, rounded);
}

/// 16 halves at @p h widened to floats (AVX-512 F).
__attribute__((target("avx512f,avx512vl"))) inline __m512 widen_16_halves_avx512(const std::uint16_t* h) {
  return _mm512_maskz_cvtph_ps(all_16_lanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
}

/// The input gradient route's coefficients of 16 consecutive values (FloatGradientRoute's).
struct GradientRouteVectors {
  __m512 mean, shift, dy_scale, xmu_scale, constant, slack;
};
/// The coefficients of values [i, i + 16): a feature's, the same for all (planes).
__attribute__((target("avx512f"))) inline GradientRouteVectors route_vectors(const FloatGradientRoute& k, std::int64_t) {
  return {_mm512_set1_ps(k.mean),      _mm512_set1_ps(k.shift),    _mm512_set1_ps(k.dy_scale),
          _mm512_set1_ps(k.xmu_scale), _mm512_set1_ps(k.constant), _mm512_set1_ps(k.slack)};
}
/// The coefficients of values [i, i + 16): lanes i to i + 15's (rows).
__attribute__((target("avx512f"))) inline GradientRouteVectors route_vectors(const FloatGradientRouteLanes& k,
                                                                          std::int64_t i) {
  const auto& c = k.coefficient;
  return {_mm512_loadu_ps(c[0] + i), _mm512_loadu_ps(c[1] + i), _mm512_loadu_ps(c[2] + i),
          _mm512_loadu_ps(c[3] + i), _mm512_loadu_ps(c[4] + i), _mm512_loadu_ps(c[5] + i)};
}
static_assert(FloatGradientRoute::coefficients()[0] == &FloatGradientRoute::mean &&
                  FloatGradientRoute::coefficients()[1] == &FloatGradientRoute::shift &&
                  FloatGradientRoute::coefficients()[2] == &FloatGradientRoute::dy_scale &&
                  FloatGradientRoute::coefficients()[3] == &FloatGradientRoute::xmu_scale &&
                  FloatGradientRoute::coefficients()[4] == &FloatGradientRoute::constant &&
                  FloatGradientRoute::coefficients()[5] == &FloatGradientRoute::slack,
              "route_vectors reads RouteLanes' arrays in this order");

/**
 * @brief gradient_route_value on a block of float_route_block half values (AVX-512): @p out =
 *        round_half(dx_f) for the inputs x and dy (and relu's y: g = 0 where y <= 0), rounded
 *        by half_interval_avx512, value j with @p route's coefficients of value first + j
 *        (route_vectors). @return the block's misses, bit j for value j.
 * Why: through the generic loop (GCC's vectorization of the scalar check and its reduction),
 * the input gradient was a third of half backward (perf, harness).
 */
template <bool Relu, class Route>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline std::uint64_t half_gradient_block_avx512(
    const void* x, const void* dy, const void* y, void* out, const Route& route, std::int64_t first) {
  auto* o = static_cast<std::uint16_t*>(out);
  const auto* xs = static_cast<const std::uint16_t*>(x);
  const auto* gs = static_cast<const std::uint16_t*>(dy);
  const auto* ys = static_cast<const std::uint16_t*>(y);
  std::uint64_t missed = 0;
  for (int q = 0; q < float_route_block; q += 16) {
    __m512 g = widen_16_halves_avx512(gs + q);
    if constexpr (Relu)  // apply_relu_backward: 0 where y <= 0 (NaN keeps g)
      g = _mm512_mask_mov_ps(g, _mm512_cmp_ps_mask(widen_16_halves_avx512(ys + q), _mm512_setzero_ps(), _CMP_LE_OQ),
                             _mm512_setzero_ps());
    // gradient_route_value, in its order
    const GradientRouteVectors k = route_vectors(route, first + q);
    const __m512 p =
        _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(widen_16_halves_avx512(xs + q), k.mean), k.shift), k.xmu_scale);
    const __m512 qv = _mm512_mul_ps(g, k.dy_scale);
    const __m512 bound = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_abs_ps(qv), _mm512_set1_ps(0x1.4p-22f)),
                                                     _mm512_mul_ps(_mm512_abs_ps(p), _mm512_set1_ps(0x1.ep-22f))),
                                       k.slack);
    const __m512 dx = _mm512_add_ps(_mm512_add_ps(qv, p), k.constant);
    __m256i rounded;
    const __mmask16 clear = half_interval_avx512<false>(dx, bound, rounded);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + q), rounded);
    missed |= static_cast<std::uint64_t>(static_cast<std::uint16_t>(~clear)) << q;
  }
  return missed;
}

/// The double formula's coefficients of the values of @p lanes (8): a feature's (planes).
__attribute__((target("avx512f"))) inline void formula_vectors(const SameFloatRoute& route, const std::int64_t*,
                                                             __m512d& mean, __m512d& scale, __m512d& bias) {
  mean = _mm512_set1_pd(route.mean);
  scale = _mm512_set1_pd(route.scale);
  bias = _mm512_set1_pd(route.bias);
}
/// The double formula's coefficients of the values of @p lanes (8): those lanes' (rows).
__attribute__((target("avx512f"))) inline void formula_vectors(const LaneFloatRoute& route, const std::int64_t* lanes,
                                                             __m512d& mean, __m512d& scale, __m512d& bias) {
  const __m512i at = _mm512_load_si512(lanes);
  const __m512d zero = _mm512_setzero_pd();  // the masked form (see all_16_lanes)
  mean = _mm512_mask_i64gather_pd(zero, 0xff, at, route.mean, 8);
  scale = _mm512_mask_i64gather_pd(zero, 0xff, at, route.scale, 8);
  bias = _mm512_mask_i64gather_pd(zero, 0xff, at, route.bias, 8);
}

/**
 * @brief The double formula for @p count 16-bit values of Format, vectorized, eight at a time:
 *        y[at[i]] = act((x − mean)·scale + bias) for x the value of bits input[i] and the
 *        coefficients of lane[i] (formula_vectors: a feature's for all, or that lane's), as
 *        normalize_at computes it (in double, each operation rounded on its own: the _round_
 *        forms are never contracted into an FMA), rounded to Format as double_to_half and
 *        double_to_bfloat16 do (to odd at the format's bits + 2, exactly to float, to nearest
 *        even; NaN → 0x7fff with the sign).
 *
 * Why: the values the hand-written blocks miss, pooled. The route misses a half value in ~300
 * on bench_cpu's data (values near 0, where half's steps are fine), a block in five. The scalar
 * formula and conversion, a value at a time, took about a quarter of half inference (harness,
 * (8, 256, 56, 56), 1 thread: 0.80 ms, 0.60 with the misses left wrong); redone per block of 64,
 * bfloat16's rarer misses cost a 64-value pass each. A 16-value group with a miss redone at once
 * in the block loop gained nothing: a group holds one miss.
 */
template <class Format, bool Relu, class Route>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline void exact_values_avx512(
    const std::uint16_t* input, const std::int64_t* at, const std::int64_t* lane, std::int64_t count,
    const Route& route, void* y) {
  constexpr bool is_half = std::is_same_v<Format, bits::half_format>;
  constexpr int current = _MM_FROUND_CUR_DIRECTION;
  constexpr __mmask8 all_8 = 0xff;
  const __m512d zero = _mm512_setzero_pd();
  // round_to_odd at the format's significant bits + 2 (13 for half, 10 for bfloat16)
  constexpr int kept = is_half ? 13 : 10;
  const __m512i dropped = _mm512_set1_epi64((std::int64_t{1} << (53 - kept)) - 1);
  const __m128i magnitude = _mm_set1_epi16(0x7fff);
  auto* out = static_cast<std::uint16_t*>(y);
  for (std::int64_t k = 0; k < count; k += 8) {
    const std::int64_t n = std::min<std::int64_t>(8, count - k);
    alignas(16) std::uint16_t values[8];
    alignas(64) std::int64_t lanes[8];
    for (std::int64_t l = 0; l < 8; ++l) {  // padded: the last again
      values[l] = input[k + std::min(l, n - 1)];
      lanes[l] = lane[k + std::min(l, n - 1)];
    }
    const __m128i in8 = _mm_load_si128(reinterpret_cast<const __m128i*>(values));
    __m512d mean, scale, bias;
    formula_vectors(route, lanes, mean, scale, bias);
    const __m256 widened = is_half ? _mm256_maskz_cvtph_ps(all_8, in8)
                                   : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(in8), 16));
    __m512d d = _mm512_maskz_sub_round_pd(all_8, _mm512_maskz_cvtps_pd(all_8, widened), mean, current);
    d = _mm512_maskz_add_round_pd(all_8, _mm512_maskz_mul_round_pd(all_8, d, scale, current), bias, current);
    if constexpr (Relu) d = _mm512_mask_mov_pd(d, _mm512_cmp_pd_mask(d, zero, _CMP_LT_OQ), zero);  // apply_relu
    const __m512i u = _mm512_castpd_si512(d);
    const __m512i odd = _mm512_maskz_andnot_epi64(
        all_8, dropped, _mm512_or_si512(u, _mm512_add_epi64(_mm512_and_si512(u, dropped), dropped)));
    const __m256 narrowed = _mm512_maskz_cvtpd_ps(all_8, _mm512_castsi512_pd(odd));  // exact
    __m128i r;
    if constexpr (is_half) {
      r = _mm256_maskz_cvtps_ph(all_8, narrowed, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // double_to_bfloat16's nearest even on the float's bits
      const __m256i f = _mm256_castps_si256(narrowed);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(f, 16), _mm256_set1_epi32(1));
      r = _mm256_cvtepi32_epi16(
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(f, _mm256_set1_epi32(0x7fff)), lsb), 16));
    }
    // NaN: 0x7fff with the sign, as the conversion functions (the instruction keeps a payload)
    const __mmask8 nan = _mm_cmpgt_epi16_mask(_mm_and_si128(r, magnitude), _mm_set1_epi16(is_half ? 0x7c00 : 0x7f80));
    r = _mm_mask_mov_epi16(r, nan, _mm_or_si128(r, magnitude));
    alignas(16) std::uint16_t results[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(results), r);
    for (std::int64_t l = 0; l < n; ++l) out[at[k + l]] = results[l];
  }
}

/**
 * @brief @p count float_route_blocks of Format's values through the float route, AVX-512, as the
 *        generic loops compute them (their operations in their order): bfloat16 as
 *        float_route_value, out[j] = act(round(y_f)); half as half_route_blocks with the AVX-512
 *        conversions, out[j] = round(act(y_f)).
 * @param route value i's coefficients (route_vectors): one feature's for all (SameFloatRoute,
 *        planes) or lane i's (LaneFloatRoute, rows; i counted from the row's start)
 * @param first the index of the first value, in @p route's counting
 * @param misses per block b, bit j set where its value j missed: that out is then to be replaced
 *        by the double formula's (normalize_blocks_avx512 pools them for exact_values_avx512).
 *
 * A separate function (its target attribute), so a consumer's FMA contraction (GCC's default in
 * its GNU modes, which CMake's C++17 selects) may fuse a product and a sum in it, which the
 * dispatched loops never do. The outputs stay the double formula's bits: one rounding fewer only
 * shrinks the error that the bound covers; which values miss may change. (float_route_test runs
 * in such a build.)
 *
 * Why by hand: GCC vectorizes float_route_blocks with each lane's miss as a 32-bit mask and ends
 * every block with a chain of shuffles and ors to reduce them to one integer; the check and that
 * reduction were about 60 % of bfloat16 inference on (8, 256, 56, 56) (1.06 ms against 0.40 ms
 * without the check: harness, 1 thread, in cache). Here both comparisons and the block's result
 * stay in mask registers: bfloat16 inference 1.00–1.17 → 0.85–0.90 ms (the same harness, the
 * same outputs; bench_cpu, 1 thread: 0.81–0.82 → 0.93–0.96 of PyTorch's time). Training
 * forward, whose time is mostly the statistics, moved within the noise. Rows take the same
 * blocks with per-lane coefficients loaded beside the values (half NHWC (8, 256, 56, 56)
 * inference, 1 thread, harness: 3.41 → 2.17 ms, the same outputs; bfloat16 within the noise;
 * 1.73 ms once normalize_blocks_avx512 pooled the misses over rows).
 *
 * A block's misses come back as one 64-bit mask, and the caller visits only its set bits. Half
 * misses far more often than bfloat16 (a value in ~300 on bench_cpu's data, a block in five), so
 * that visit mattered: half inference on (8, 256, 56, 56) with that data, 1 thread, in cache,
 * 2.32–2.66 → 1.36–1.79 ms (harness, the same outputs), and writing blocks straight to y when it
 * is not x took part in it. Blocks in groups of blocks_per_call per call (constants set up once;
 * the misses visited after the group): half inference 1.39–1.46 → 1.26–1.33 ms (the same
 * harness, three rounds alternated); bfloat16's time did not move.
 */
template <class Format, bool Relu, class Route>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) inline void route_blocks_avx512(
    const void* in, void* out, std::int64_t count, const Route& route, std::int64_t first, std::uint64_t* misses) {
  constexpr bool is_half = std::is_same_v<Format, bits::half_format>;
  static_assert(is_half || std::is_same_v<Format, bits::bfloat16_format>, "a 16-bit format");
  const auto* x = static_cast<const std::uint16_t*>(in);
  auto* o = static_cast<std::uint16_t*>(out);
  const __m512i half_interval = _mm512_set1_epi32(0x8000);  // of bfloat16's 16 dropped bits
  for (std::int64_t b = 0; b < count; ++b, x += float_route_block, o += float_route_block) {
    std::uint64_t missed = 0;
    for (int q = 0; q < float_route_block; q += 16) {
      const RouteVectors k = route_vectors(route, first + b * float_route_block + q);
      const __m256i in16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + q));
      __m512 v;
      if constexpr (is_half)
        v = _mm512_maskz_cvtph_ps(all_16_lanes, in16);
      else  // the bits in the upper half of a float (bfloat16_to_float)
        v = _mm512_castsi512_ps(
            _mm512_maskz_slli_epi32(all_16_lanes, _mm512_maskz_cvtepu16_epi32(all_16_lanes, in16), 16));
      __m256i rounded;
      __mmask16 clear;
      if constexpr (is_half) {
        clear = half_route_avx512<Relu>(v, k, rounded);
      } else {
        __m512 y;
        clear = route_clear_avx512<Format>(v, k, y);
        // bfloat16_format::round_off_midpoint, then relu as round_when_clear (a set sign bit → +0)
        __m512i r = _mm512_maskz_srli_epi32(all_16_lanes, _mm512_add_epi32(_mm512_castps_si512(y), half_interval), 16);
        if constexpr (Relu) r = _mm512_maskz_mov_epi32(_mm512_testn_epi32_mask(r, half_interval), r);
        rounded = _mm512_maskz_cvtepi32_epi16(all_16_lanes, r);
      }
      missed |= static_cast<std::uint64_t>(static_cast<std::uint16_t>(~clear)) << q;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + q), rounded);
    }
    misses[b] = missed;
  }
}
BATCHNORM_CPU_INLINE_ALL_BEGIN

/**
 * @brief A feature's planes (@p route a SameFloatRoute, one row) or @p rows rows of a rows pass
 *        (a LaneFloatRoute, value j of a row lane j's) through the float route with the
 *        hand-written AVX-512 blocks (route_blocks_avx512), the whole blocks of each row's
 *        [0, length): y = act((x − mean)·scale + bias), the values the route misses pooled
 *        (over rows too) and redone by the double formula, eight at a time
 *        (exact_values_avx512), or by @p exact(offset, lane) (normalize_at for the value at
 *        x + offset with lane's coefficients) in a build for its own flags. Row r starts at
 *        x + r·stride and y + r·stride; x may be y.
 * @return the number of values done in each row, a multiple of float_route_block.
 *
 * Why pooled over rows: a channels-last row of 256 half values has a miss about four times in
 * five, and a pass of exact_values_avx512 per row took a quarter of half NHWC (8, 256, 56, 56)
 * inference (harness, 1 thread: 2.42 ms, 1.83 with the misses left wrong).
 */
// GCC 12 reports the pool's entries, written as misses arrive and read only below `pooled`, as
// maybe uninitialized where they are passed on; zeroing them cost 2 % of bfloat16 planes'
// normalization (harness).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <bool Relu, class T, class Route, class Exact>
std::int64_t normalize_blocks_avx512(const T* x, T* y, std::int64_t rows, std::int64_t length, std::int64_t stride,
                                     const Route& route, Exact&& exact) {
  using Format = typename convert<T>::format;
  constexpr std::int64_t B = float_route_block;
  // Blocks are written straight to y, a group at a time, or, in place, one at a time through a
  // buffer (BlockOutput): the missed values' inputs are pooled before it is copied.
  BlockOutput<T> to(y, is_an_input(y, x));
  const std::int64_t group = to.buffered() ? 1 : blocks_per_call;
  // The missed values' offsets, lanes and inputs, redone when a block's misses might not fit.
  constexpr std::int64_t pool_size = 2 * B;
  std::int64_t at[pool_size];
  std::int64_t lane[pool_size];
  std::uint16_t input[pool_size];
  std::int64_t pooled = 0;
  auto redo_pooled = [&] {
#if defined(BATCHNORM_CPU_DISPATCH)
    (void)exact;
    exact_values_avx512<Format, Relu>(input, at, lane, pooled, route, y);
#else
    // A build for its own flags may contract normalize_at's (x − mean)·scale + bias into an
    // FMA, which exact_values_avx512 never does (as the dispatched versions): the scalar formula
    // keeps every loop of such a build on the same bits. In place, the input is put back first.
    for (std::int64_t k = 0; k < pooled; ++k) {
      if (to.buffered()) std::memcpy(static_cast<void*>(y + at[k]), input + k, sizeof(T));
      exact(at[k], lane[k]);
    }
#endif
    pooled = 0;
  };
  auto pool = [&](std::int64_t row_offset, std::int64_t j) {
    at[pooled] = row_offset + j;
    lane[pooled] = j;
    input[pooled] = bits_of(x + row_offset + j);
  };
  const std::int64_t whole = length / B * B;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t o = r * stride;
    for (std::int64_t i = 0; i < whole;) {
      const std::int64_t count = std::min(group, (whole - i) / B);
      std::uint64_t misses[blocks_per_call];
      route_blocks_avx512<Format, Relu>(x + o + i, to.block(o + i), count, route, i, misses);
      for (std::int64_t b = 0; b < count; ++b, i += B) {
        std::uint64_t missed = misses[b];
        if constexpr (std::is_same_v<Format, bits::half_format>) {
          // Half: a block's first miss is pooled without a branch. One block in five or six has
          // a miss, at random, and the branch on it mispredicts (harness, (8, 256, 56, 56)
          // inference, 1 thread: 1.05-1.09 -> 0.97-0.99 ms). The entry is written anyway
          // (position 63 when there is no miss) and counted for a miss only. bfloat16 misses a
          // block in 30: its branch predicts, and the unconditional entry cost more (0.86-0.89
          // -> 0.98-1.0 ms).
          pool(o, i + lowest_set_bit(missed | (std::uint64_t{1} << (B - 1))));
          pooled += missed != 0;
          missed &= missed - 1;
        }
        for (; missed != 0; missed &= missed - 1) {
          pool(o, i + lowest_set_bit(missed));
          ++pooled;
        }
        to.copy(o + i);
        if (pooled > pool_size - B) redo_pooled();
      }
    }
  }
  redo_pooled();
  return whole;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/**
 * @brief A feature's half input gradient (@p route a FloatGradientRoute) or a row's (a
 *        FloatGradientRouteLanes, value i lane i's) through the float route with the hand-written
 *        AVX-512 blocks (half_gradient_block_avx512), whole blocks of [0, length): dx as
 *        input_gradient_value (training), the values the route misses by @p exact(i, i + 1)
 *        (redo_missed). A block's outputs are written after all of its inputs are read (dx may
 *        be x or dy: BlockOutput). @p y: relu's output, or null.
 * @return the number of values done, a multiple of float_route_block.
 *
 * Blocks are written straight to dx unless dx is an input (BlockOutput). Through a buffer
 * always, perf put 9 % of half NCHW (8, 256, 56, 56) backward on the copy, most likely its wide
 * loads waiting on the block's 32-byte stores (a store forward that fails). Written straight:
 * bench_cpu, 1 thread, PyTorch's time / ours, three processes each, alternated: NHWC
 * 0.80–0.86 → 0.92–0.95, NCHW 0.78–0.81 → 0.80–0.85 (bfloat16, not on this path: 0.83–0.86
 * both; benchmarks/README, round twenty-one).
 */
template <bool Relu, class T, class Route, class Exact>
std::int64_t gradient_blocks_avx512(const T* x, const T* dy, const T* y, T* dx, std::int64_t length, const Route& route,
                                    Exact&& exact) {
  constexpr std::int64_t B = float_route_block;
  BlockOutput<T> to(dx, is_an_input(dx, x, dy, y));
  std::int64_t i = 0;
  for (; i + B <= length; i += B)
    to.finish(i, half_gradient_block_avx512<Relu>(x + i, dy + i, Relu ? y + i : nullptr, to.block(i), route, i), exact);
  return i;
}

/**
 * @brief The float route for half values with the conversion instructions, whole blocks of
 *        [0, length): @p widen_inputs(i) widens the block at i's inputs at once (into the
 *        caller's buffers); @p value(i, j, bound) gives value i + j in float and its error
 *        bound, checked as round_when_clear does, then passed through @p activate; the block
 *        is rounded at once (the instructions' nearest-even rounding is round_off_midpoint's
 *        off midpoints, and a value near one misses), and the missed values are computed by
 *        @p exact (redo_missed). A block's outputs are written after all of its inputs are read
 *        (out may be an input: @p out_is_input, BlockOutput).
 * @param narrow a narrow_halves_* of the width of the widening
 */
template <class T, class WidenInputs, class Value, class Activate, class Exact, class Narrow>
std::int64_t half_route_blocks(T* out, bool out_is_input, std::int64_t length, WidenInputs&& widen_inputs,
                               Value&& value, Activate&& activate, Exact&& exact, Narrow&& narrow) {
  constexpr std::int64_t B = float_route_block;
  BlockOutput<T> to(out, out_is_input);
  std::int64_t i = 0;
  for (; i + B <= length; i += B) {
    float result[B];
    std::uint8_t misses[B];
    widen_inputs(i);
    std::uint32_t missed = 0;
    for (std::int64_t j = 0; j < B; ++j) {
      float bound;
      const float v = value(i, j, bound);
      const std::uint32_t miss = boundary_miss<bits::half_format>(v, bound);
      misses[j] = static_cast<std::uint8_t>(miss);
      // The low bit only: clang 14 does not vectorize an or-reduction of the whole mask (the
      // loop then ran one value at a time, 10× GCC's time on half inference).
      missed |= miss & 1u;
      result[j] = activate(v);
    }
    if (missed == 0) {  // the inputs are read (widened): straight to out, in place too
      narrow(result, out + i);
    } else {
      narrow(result, to.block(i));
      to.finish(i, miss_mask(misses), exact);
    }
  }
  return i;
}

/// The widen and narrow functions of @p conversion (f16c or avx512) as f(widen, narrow).
template <class F>
BN_CONVERT_INLINE auto with_half_instructions(HalfConversion conversion, F&& f) {
  if (conversion == HalfConversion::avx512)
    return f([](const void* in, float* to) { widen_halves_avx512(in, to); },
             [](const float* from, void* to) { narrow_halves_avx512(from, to); });
  return f([](const void* in, float* to) { widen_halves_f16c(in, to); },
           [](const float* from, void* to) { narrow_halves_f16c(from, to); });
}

/// Whether the float route of T takes half_route_blocks with @p conversion.
template <class T>
BN_CONVERT_INLINE bool takes_half_instructions(HalfConversion conversion) {
  return std::is_same_v<typename convert<T>::format, bits::half_format> && conversion != HalfConversion::integer;
}
#endif

/**
 * @brief y[i] = act((x[i] − mean_i)·scale_i + bias_i) through the float route (float_route_blocks),
 *        @p route(i) the coefficients of value i. x may be y.
 * @param conversion how half values are converted (bfloat16's conversions are shifts)
 */
template <bool Relu, class T, class Route, class Exact>
std::int64_t normalize_float_route(const T* x, T* y, std::int64_t length, const Route& route, Exact&& exact,
                                   HalfConversion conversion) {
  using Format = typename convert<T>::format;
#if defined(BATCHNORM_CPU_X86_TARGETS)
  // A feature's planes by hand under AVX-512 (whose half conversion is chosen with it; bfloat16's
  // conversions are shifts, so the same choice stands for AVX-512 in use; rows: normalize_rows)
  if constexpr (std::is_same_v<Route, SameFloatRoute>)
    if (conversion == HalfConversion::avx512)
      return normalize_blocks_avx512<Relu>(x, y, 1, length, length, route,
                                           [&](std::int64_t i, std::int64_t) { exact(i, i + 1); });
  if (takes_half_instructions<T>(conversion)) {
    return with_half_instructions(conversion, [&](auto widen, auto narrow) {
      float xf[float_route_block];
      return half_route_blocks(
          y, is_an_input(y, x), length, [&](std::int64_t i) { widen(x + i, xf); },
          [&](std::int64_t i, std::int64_t j, float& bound) { return route_value(xf[j], route(i + j), bound); },
          // relu: max(y_f, 0), as rounding first and then clearing a negative (a value that
          // would round to 0 misses)
          [](float v) { return Relu ? (v > 0.0f ? v : 0.0f) : v; }, exact, narrow);
    });
  }
#endif
  (void)conversion;
  return float_route_blocks(
      y, length,
      [&](std::int64_t i, std::uint16_t& out) { return float_route_value<Format, Relu>(bits_of(x + i), route(i), out); },
      exact);
}

BATCHNORM_CPU_INLINE_ALL_END
}  // namespace batchnorm::detail::cpu_impl
