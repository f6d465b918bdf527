/**
 * @file detail/cpu/kernels.hpp
 * @brief The CPU backend's loops, one per memory layout, shared by forward / backward
 *        (functional.inl) and the phases (phases.inl).
 *
 * Two layouts cover every case (see Geometry):
 *  - planes: NCHW per-channel with spatial > 1. Feature c is N contiguous planes of S values.
 *  - rows:   everything else: (N, C), channels-last (NHWC), and per-activation. Memory is M rows of
 *            W values, the feature of a value given by its position in the row (a permutation for
 *            per-activation channels-last); loops run across the row, so they vectorize across
 *            features.
 *
 * Speed comes from independent accumulators: every reduction keeps L lanes (8 for a plane, the
 * row's positions, replicated to at least 64 for narrow rows) added in a fixed order at the end,
 * so no add waits for the previous one and the compiler vectorizes the lane loop. Inner loops
 * have no branches: relu, residual, null outputs are template parameters.
 *
 * Determinism: a reduction is split into tasks and chunks whose bounds depend only on the shape
 * and the element size, never on the thread count; each task's partial result has its own slot,
 * and the slots are combined in task order. So the same input gives the same bits for any number
 * of OpenMP threads (and without OpenMP). Threads only decide who computes which slot.
 *
 * Accuracy: statistics stay in double, two passes per chunk of <= chunk_elements values while
 * it is in cache (mean of x − pivot, pivot = the chunk's first value, then M2 about that mean),
 * chunks merged by Chan's formula (detail::merge). A constant feature gives mean = the value and
 * M2 = 0 exactly (every term is 0 and every merge adds 0).
 */
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../args.hpp"
#include "../../options.hpp"
#include "../../shape.hpp"
#include "../convert.hpp"
#include "../moments.hpp"

namespace batchnorm::detail::cpu_impl {

// ---- tuning constants (shape-independent; changing one changes results in the last bits) ----

/// Values per statistics chunk: both passes over it run while it is in L1/L2.
inline constexpr std::int64_t chunk_elements = 8192;
/// Values per reduction task (the unit of work of a thread, one partial result each).
inline constexpr std::int64_t task_elements = 65536;
/// A channel plane set of at most this many bytes is one task: forward then normalizes it right
/// after its statistics, while it is still in L2 (x read from memory once).
inline constexpr std::int64_t fused_channel_bytes = 512 * 1024;
/// Positions per block of a rows task (lane arrays live on the stack).
inline constexpr std::int64_t max_block_width = 512;
/// Narrow rows are processed in groups of rows giving at least this many lanes.
inline constexpr std::int64_t min_lanes = 64;
/// Lanes of a plane reduction.
inline constexpr std::int64_t plane_lanes = 8;
/// Below this many values a call stays on the calling thread (starting threads costs more).
inline constexpr std::int64_t parallel_threshold = 32768;

// ---- instruction set ----
// The library is headers compiled with the consumer's flags, often the x86-64 baseline (SSE2:
// two doubles per vector). Where the compiler allows it, each loop is also compiled for AVX2 and
// for AVX-512 (target attribute, everything inlined into it by flatten) and the widest the
// processor has is chosen at run time. Never with FMA contraction (AVX2 without the fma target;
// AVX-512, whose F subset includes FMA, with fp-contract=off): every version rounds every
// operation the same way, and the lane structure of the loops is explicit (not the vector
// width), so all versions give the same bits (tested: cpu_paths_test, SameBitsForEveryIsa).

/// The instruction sets a loop can be compiled for, in increasing width.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__AVX2__) && \
    !defined(__CUDACC__) && !defined(__NVCOMPILER) && !defined(__INTEL_COMPILER) && !defined(BATCHNORM_NO_DISPATCH)
#define BATCHNORM_CPU_DISPATCH 1
template <class F>
__attribute__((target("avx2"), flatten)) void run_avx2(F& f) {
  f();
}
// GCC only: clang ignores the optimize attribute and would contract a·b + c into an FMA.
#if !defined(__clang__)
#define BATCHNORM_CPU_DISPATCH_AVX512 1
template <class F>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"), optimize("fp-contract=off"), flatten)) void
run_avx512(F& f) {
  f();
}
#endif
#endif

/// The widest instruction set this processor and this build can use.
inline Isa best_isa() {
#if defined(BATCHNORM_CPU_DISPATCH_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
#endif
#if defined(BATCHNORM_CPU_DISPATCH)
  if (__builtin_cpu_supports("avx2")) return Isa::avx2;
#endif
  return Isa::baseline;
}

/**
 * @brief The instruction set the loops use: the widest available, capped by the environment
 *        variable BATCHNORM_CPU_ISA (`baseline`, `avx2`, `avx512`; read once) or by assigning
 *        this value (tests compare the versions). Results are the same bits for every value.
 */
inline std::atomic<int>& isa_in_use() {
  static std::atomic<int> isa{[] {
    int best = static_cast<int>(best_isa());
    if (const char* cap = std::getenv("BATCHNORM_CPU_ISA")) {
      const std::string c(cap);
      const int limit = c == "baseline" ? 0 : c == "avx2" ? 1 : c == "avx512" ? 2 : best;
      best = std::min(best, limit);
    }
    return best;
  }()};
  return isa;
}

/// f(), compiled for the instruction set in use (see above).
template <class F>
void run_vectorized(F&& f) {
#if defined(BATCHNORM_CPU_DISPATCH)
  const int isa = isa_in_use().load(std::memory_order_relaxed);
#if defined(BATCHNORM_CPU_DISPATCH_AVX512)
  if (isa >= static_cast<int>(Isa::avx512)) return run_avx512(f);
#endif
  if (isa >= static_cast<int>(Isa::avx2)) return run_avx2(f);
#endif
  f();
}

// ---- threads ----

/**
 * @brief body(i) for i in [0, count), on the caller's OpenMP threads (OMP_NUM_THREADS /
 *        omp_set_num_threads) when there are @p values >= parallel_threshold values to touch and
 *        the caller is not itself in a parallel region (no oversubscription); serially otherwise.
 *        body must not throw and must not depend on the thread running it.
 */
template <class Body>
void parallel_for(std::int64_t count, std::int64_t values, Body&& body) {
#if defined(_OPENMP)
  if (count > 1 && values >= parallel_threshold && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < count; ++i) run_vectorized([&] { body(i); });
    return;
  }
#else
  (void)values;
#endif
  for (std::int64_t i = 0; i < count; ++i) run_vectorized([&] { body(i); });
}

/// f(std::true_type{}) or f(std::false_type{}): lifts a runtime flag out of an inner loop.
template <class F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// ---- geometry ----

struct Geometry {
  bool planes;        ///< NCHW per-channel, spatial > 1
  std::int64_t N, C, S;
  std::int64_t rows;   ///< rows layout: M
  std::int64_t width;  ///< rows layout: W (values per row)
  bool permuted;       ///< rows: per-activation channels-last (position j holds feature (j % C)·S + j / C)

  /// The feature of row position @p j (rows layout).
  [[nodiscard]] std::int64_t feature_at(std::int64_t j) const { return permuted ? (j % C) * S + j / C : j; }
};

inline Geometry geometry(const Shape& shape, Mode mode) {
  Geometry g{};
  g.N = shape.batch();
  g.C = shape.channels();
  g.S = shape.spatial();
  const bool last = shape.layout() == Layout::channels_last && g.S > 1;
  if (mode == Mode::per_activation) {
    g.planes = false;
    g.rows = g.N;
    g.width = g.C * g.S;
    g.permuted = last;
  } else if (!last && g.S > 1) {
    g.planes = true;
    g.rows = 0;
    g.width = 0;
    g.permuted = false;
  } else {
    g.planes = false;
    g.rows = g.N * g.S;
    g.width = g.C;
    g.permuted = false;
  }
  return g;
}

/// Reduction tasks per channel in the planes layout (1: the channel fits the fused budget).
inline std::int64_t plane_tasks(std::int64_t per_channel, std::int64_t element_size) {
  if (per_channel * element_size <= fused_channel_bytes) return 1;
  return (per_channel + task_elements - 1) / task_elements;
}

/// Calls run(n, s, length) for each contiguous piece of flat indices [begin, end) of a channel
/// (flat index = n·S + s).
template <class Run>
void for_each_run(std::int64_t begin, std::int64_t end, std::int64_t S, Run&& run) {
  while (begin < end) {
    const std::int64_t n = begin / S, s = begin % S;
    const std::int64_t length = std::min(S - s, end - begin);
    run(n, s, length);
    begin += length;
  }
}

/// The tiling of a rows-layout reduction: column blocks × row blocks (tasks), groups of rows.
struct RowTiling {
  std::int64_t block_width;    ///< positions per column block
  std::int64_t column_blocks;
  std::int64_t row_blocks;
  std::int64_t rows_per_block;
  std::int64_t group;          ///< rows per lane group (> 1 only when one block spans the row)

  RowTiling(std::int64_t M, std::int64_t W) {
    block_width = std::min<std::int64_t>(std::max<std::int64_t>(W, 1), max_block_width);
    column_blocks = (W + block_width - 1) / block_width;
    group = W < min_lanes ? (min_lanes + W - 1) / std::max<std::int64_t>(W, 1) : 1;
    const std::int64_t per_column_block = M * block_width;
    row_blocks = std::clamp<std::int64_t>(per_column_block / task_elements, 1, 256);
    row_blocks = std::min(row_blocks, std::max<std::int64_t>(M, 1));
    rows_per_block = (M + row_blocks - 1) / row_blocks;
  }
  [[nodiscard]] std::int64_t lanes(std::int64_t width) const { return group * width; }
};

// ---- lane loops: acc[j] += f(x[i]), j = i mod L; coefficient per lane (PerLane) or one ----

template <bool PerLane>
inline double lane_value(const double* a, std::int64_t j) {
  return PerLane ? a[j] : a[0];
}

/// acc[i mod L] += x[i] − center, over @p length values (lanes restart at x).
template <bool PerLane, class T>
void add_deviations(const T* __restrict x, std::int64_t length, std::int64_t L, const double* __restrict center,
                    double* __restrict acc) {
  using conv = convert<T>;
  std::int64_t i = 0;
  for (; i + L <= length; i += L)
    for (std::int64_t j = 0; j < L; ++j) acc[j] += conv::to_double(x[i + j]) - lane_value<PerLane>(center, j);
  for (std::int64_t j = 0; i + j < length; ++j) acc[j] += conv::to_double(x[i + j]) - lane_value<PerLane>(center, j);
}

/// acc[i mod L] += (x[i] − center)².
template <bool PerLane, class T>
void add_squared_deviations(const T* __restrict x, std::int64_t length, std::int64_t L,
                            const double* __restrict center, double* __restrict acc) {
  using conv = convert<T>;
  std::int64_t i = 0;
  for (; i + L <= length; i += L)
    for (std::int64_t j = 0; j < L; ++j) {
      const double d = conv::to_double(x[i + j]) - lane_value<PerLane>(center, j);
      acc[j] += d * d;
    }
  for (std::int64_t j = 0; i + j < length; ++j) {
    const double d = conv::to_double(x[i + j]) - lane_value<PerLane>(center, j);
    acc[j] += d * d;
  }
}

/// Gradient flowing into the normalization: dy, masked where a fused relu was inactive (y <= 0).
template <bool Relu, class T>
inline double upstream(const T* dy, const T* y, std::int64_t i) {
  const double g = convert<T>::to_double(dy[i]);
  if constexpr (Relu) return relu_backward(g, convert<T>::to_double(y[i]));
  else return g;
}

/// Lanes of Σg, Σg·(x − mean), Σ(x − mean) (g the upstream gradient).
template <bool PerLane, bool Relu, class T>
void add_gradient_sums(const T* __restrict x, const T* __restrict dy, const T* __restrict y, std::int64_t length,
                       std::int64_t L, const double* __restrict mean, double* __restrict s_dy,
                       double* __restrict s_dy_xmu, double* __restrict s_xmu) {
  using conv = convert<T>;
  std::int64_t i = 0;
  auto step = [&](std::int64_t j) {
    const double g = upstream<Relu>(dy, y, i + j);
    const double xmu = conv::to_double(x[i + j]) - lane_value<PerLane>(mean, j);
    s_dy[j] += g;
    s_dy_xmu[j] += g * xmu;
    s_xmu[j] += xmu;
  };
  for (; i + L <= length; i += L)
    for (std::int64_t j = 0; j < L; ++j) step(j);
  for (std::int64_t j = 0; i + j < length; ++j) step(j);
}

/// Sum of @p count lanes in a fixed order (pairwise for the 8 lanes of a plane).
inline double sum_plane_lanes(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/// A pivot must be finite: a non-finite one would turn every term into NaN.
inline double finite_or_zero(double v) { return std::isfinite(v) ? v : 0.0; }

// ---- statistics ----

/// (count, mean, M2) of channel @p c's flat indices [begin, end), planes layout.
template <class T>
Welford<double> plane_range_moments(const Geometry& g, const T* x, std::int64_t c, std::int64_t begin,
                                    std::int64_t end) {
  using conv = convert<T>;
  Welford<double> total;
  const T* channel = x + c * g.S;
  const std::int64_t plane_stride = g.C * g.S;
  for (std::int64_t b = begin; b < end; b += chunk_elements) {
    const std::int64_t e = std::min(end, b + chunk_elements);
    const double pivot = finite_or_zero(conv::to_double(channel[(b / g.S) * plane_stride + b % g.S]));
    alignas(64) double acc[plane_lanes] = {};
    for_each_run(b, e, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
      add_deviations<false>(channel + n * plane_stride + s, length, plane_lanes, &pivot, acc);
    });
    const auto m = e - b;
    const double mean = pivot + sum_plane_lanes(acc) / static_cast<double>(m);
    std::fill(acc, acc + plane_lanes, 0.0);
    for_each_run(b, e, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
      add_squared_deviations<false>(channel + n * plane_stride + s, length, plane_lanes, &mean, acc);
    });
    total = merge(total, Welford<double>{mean, sum_plane_lanes(acc), m});
  }
  return total;
}

/// Moments of positions [c0, c0 + width) over rows [r0, r1), rows layout, merged into @p out.
template <class T>
void row_block_moments(const Geometry& g, const RowTiling& t, const T* x, std::int64_t r0, std::int64_t r1,
                       std::int64_t c0, std::int64_t width, Welford<double>* out) {
  using conv = convert<T>;
  const std::int64_t W = g.width;
  const std::int64_t L = t.lanes(width);
  alignas(64) double center[max_block_width];  // group·width <= max(2·min_lanes, max_block_width)
  alignas(64) double acc[max_block_width];
  const std::int64_t chunk_rows = std::max<std::int64_t>(t.group, chunk_elements / width);
  auto pass = [&](std::int64_t a, std::int64_t b, auto add) {
    std::fill(acc, acc + L, 0.0);
    if (t.group > 1) add(x + a * W, (b - a) * W);  // width == W: the rows are contiguous
    else
      for (std::int64_t r = a; r < b; ++r) add(x + r * W + c0, width);
  };
  for (std::int64_t a = r0; a < r1; a += chunk_rows) {
    const std::int64_t b = std::min(r1, a + chunk_rows);
    for (std::int64_t j = 0; j < width; ++j) center[j] = finite_or_zero(conv::to_double(x[a * W + c0 + j]));
    for (std::int64_t j = width; j < L; ++j) center[j] = center[j % width];
    pass(a, b, [&](const T* p, std::int64_t length) { add_deviations<true>(p, length, L, center, acc); });
    const double m = static_cast<double>(b - a);
    for (std::int64_t j = 0; j < width; ++j) {
      double s = acc[j];
      for (std::int64_t k = 1; k < t.group; ++k) s += acc[k * width + j];
      center[j] = center[j] + s / m;
    }
    for (std::int64_t j = width; j < L; ++j) center[j] = center[j % width];
    pass(a, b, [&](const T* p, std::int64_t length) { add_squared_deviations<true>(p, length, L, center, acc); });
    for (std::int64_t j = 0; j < width; ++j) {
      double s = acc[j];
      for (std::int64_t k = 1; k < t.group; ++k) s += acc[k * width + j];
      out[j] = merge(out[j], Welford<double>{center[j], s, b - a});
    }
  }
}

/**
 * @brief Mean and M2 of every feature of x (F = feature_count values each). Forward and
 *        phases::local_statistics share it, so that one shard reproduces forward exactly.
 */
template <class T>
void shard_moments(const Shape& shape, Mode mode, const T* x, double* mean, double* m2) {
  const std::int64_t features = feature_count(shape, mode);
  std::fill(mean, mean + features, 0.0);
  std::fill(m2, m2 + features, 0.0);
  if (reduction_count(shape, mode) == 0 || features == 0) return;
  const Geometry g = geometry(shape, mode);
  const std::int64_t numel = shape.numel();
  if (g.planes) {
    const std::int64_t per_channel = g.N * g.S;
    const std::int64_t tasks = plane_tasks(per_channel, sizeof(T));
    const std::int64_t per_task = (per_channel + tasks - 1) / tasks;
    std::vector<Welford<double>> partial(static_cast<std::size_t>(g.C * tasks));
    parallel_for(g.C * tasks, numel, [&](std::int64_t i) {
      const std::int64_t c = i / tasks, k = i % tasks;
      partial[i] = plane_range_moments(g, x, c, k * per_task, std::min(per_channel, (k + 1) * per_task));
    });
    for (std::int64_t c = 0; c < g.C; ++c) {
      Welford<double> w;
      for (std::int64_t k = 0; k < tasks; ++k) w = merge(w, partial[c * tasks + k]);
      mean[c] = w.mean;
      m2[c] = w.m2;
    }
    return;
  }
  const RowTiling t(g.rows, g.width);
  std::vector<Welford<double>> partial(static_cast<std::size_t>(t.row_blocks * g.width));
  parallel_for(t.row_blocks * t.column_blocks, numel, [&](std::int64_t i) {
    const std::int64_t rb = i / t.column_blocks, cb = i % t.column_blocks;
    const std::int64_t r0 = rb * t.rows_per_block, r1 = std::min(g.rows, r0 + t.rows_per_block);
    const std::int64_t c0 = cb * t.block_width, width = std::min(g.width - c0, t.block_width);
    row_block_moments(g, t, x, r0, r1, c0, width, partial.data() + rb * g.width + c0);
  });
  for (std::int64_t j = 0; j < g.width; ++j) {
    Welford<double> w;
    for (std::int64_t rb = 0; rb < t.row_blocks; ++rb) w = merge(w, partial[rb * g.width + j]);
    const std::int64_t f = g.feature_at(j);
    mean[f] = w.mean;
    m2[f] = w.m2;
  }
}

// ---- normalize ----

/// y = (x − mean)·scale + bias [+ residual] [relu] over @p length values; coefficients per lane.
template <bool PerLane, bool Residual, bool Relu, class T>
void normalize_run(const T* x, const T* residual, T* y, std::int64_t length, std::int64_t L,
                   const double* __restrict mean, const double* __restrict scale, const double* __restrict bias) {
  using conv = convert<T>;
  auto step = [&](std::int64_t i, std::int64_t j) {
    double v = (conv::to_double(x[i]) - lane_value<PerLane>(mean, j)) * lane_value<PerLane>(scale, j) +
               lane_value<PerLane>(bias, j);
    if constexpr (Residual) v += conv::to_double(residual[i]);
    if constexpr (Relu) v = relu(v);
    y[i] = conv::from_double(v);
  };
  if constexpr (!PerLane) {
    for (std::int64_t i = 0; i < length; ++i) step(i, 0);
  } else {
    std::int64_t i = 0;
    for (; i + L <= length; i += L)
      for (std::int64_t j = 0; j < L; ++j) step(i + j, j);
    for (std::int64_t j = 0; i + j < length; ++j) step(i + j, j);
  }
}

/// Per-lane coefficient arrays of a rows layout: position order, replicated to group·W lanes.
struct LaneCoefficients {
  std::int64_t lanes = 0;
  std::vector<double> a, b, c, d, e;
};

/// Rows per elementwise piece (any partition gives the same bits: elementwise).
inline std::int64_t rows_per_piece(std::int64_t W) { return std::max<std::int64_t>(1, task_elements / std::max<std::int64_t>(W, 1)); }

/// y = act(affine(x) [+ residual]) for plane @p p = n·C + c (planes layout; x may be y).
template <class T>
void normalize_plane(const Geometry& g, std::int64_t p, const T* x, const T* residual, bool relu_on,
                     const Affine<double>& affine, T* y) {
  const std::int64_t o = p * g.S;
  with_flag(residual != nullptr, [&](auto res) {
    with_flag(relu_on, [&](auto rl) {
      normalize_run<false, decltype(res)::value, decltype(rl)::value>(x + o, residual ? residual + o : nullptr, y + o,
                                                                       g.S, 1, &affine.mean, &affine.scale,
                                                                       &affine.bias);
    });
  });
}

/// y = act(affine_f(x) [+ residual]) for every element: forward's and phases::normalize's last
/// pass. On the CPU an Affine has prescale 1 and pivot 0, so affine(x) = (x − mean)·scale + bias
/// (the same bits as Affine::apply).
template <class T>
void normalize_elements(const Shape& shape, Mode mode, const T* x, const T* residual, Activation activation,
                        const Affine<double>* affine, T* y) {
  const std::int64_t numel = shape.numel();
  if (numel == 0) return;
  const Geometry g = geometry(shape, mode);
  const bool relu_on = activation == Activation::relu;
  if (g.planes) {
    parallel_for(g.N * g.C, numel,
                 [&](std::int64_t p) { normalize_plane(g, p, x, residual, relu_on, affine[p % g.C], y); });
    return;
  }
  const RowTiling t(g.rows, g.width);
  const std::int64_t W = g.width, L = t.lanes(W);
  std::vector<double> mean(static_cast<std::size_t>(L)), scale(mean.size()), bias(mean.size());
  for (std::int64_t j = 0; j < L; ++j) {
    const Affine<double>& a = affine[g.feature_at(j % W)];
    mean[j] = a.mean;
    scale[j] = a.scale;
    bias[j] = a.bias;
  }
  const std::int64_t piece = std::max(t.group, rows_per_piece(W) / t.group * t.group);
  const std::int64_t pieces = (g.rows + piece - 1) / piece;
  with_flag(residual != nullptr, [&](auto res) {
    with_flag(relu_on, [&](auto rl) {
      parallel_for(pieces, numel, [&](std::int64_t p) {
        const std::int64_t r0 = p * piece, r1 = std::min(g.rows, r0 + piece);
        normalize_run<true, decltype(res)::value, decltype(rl)::value>(
            x + r0 * W, residual ? residual + r0 * W : nullptr, y + r0 * W, (r1 - r0) * W, L, mean.data(),
            scale.data(), bias.data());
      });
    });
  });
}

/**
 * @brief Training forward in the planes layout when every channel is one task: per channel,
 *        its statistics (the same bits as shard_moments), then @p make_affine(c, mean, m2) and
 *        its normalization while the channel is still in L2, so x comes from memory once.
 *        Writes @p mean and @p m2 (C values) as shard_moments does.
 */
template <class T, class MakeAffine>
void fused_forward_planes(const Geometry& g, const T* x, const T* residual, bool relu_on, double* mean, double* m2,
                          MakeAffine&& make_affine, T* y) {
  parallel_for(g.C, g.N * g.C * g.S, [&](std::int64_t c) {
    const Welford<double> w = merge(Welford<double>{}, plane_range_moments(g, x, c, 0, g.N * g.S));
    mean[c] = w.mean;
    m2[c] = w.m2;
    const Affine<double> affine = make_affine(c, w.mean, w.m2);
    for (std::int64_t n = 0; n < g.N; ++n) normalize_plane(g, n * g.C + c, x, residual, relu_on, affine, y);
  });
}

/// True when forward's training statistics and normalization can be fused per channel.
template <class T>
bool fusable(const Shape& shape, Mode mode) {
  const Geometry g = geometry(shape, mode);
  return g.planes && shape.numel() > 0 && plane_tasks(g.N * g.S, sizeof(T)) == 1;
}

// ---- backward ----

/// Per feature Σg, Σg·(x − mean) and Σ(x − mean), g the upstream gradient: backward's and
/// phases::local_gradient_sums' reduction. @p sums holds F zero-initialized entries.
template <class T>
void gradient_sums_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                            Activation activation, const double* mean, BackwardSums<double>* sums) {
  const std::int64_t numel = shape.numel();
  if (numel == 0) return;
  const Geometry g = geometry(shape, mode);
  with_flag(activation == Activation::relu, [&](auto rl) {
    constexpr bool Relu = decltype(rl)::value;
    if (g.planes) {
      const std::int64_t per_channel = g.N * g.S;
      const std::int64_t tasks = plane_tasks(per_channel, sizeof(T));
      const std::int64_t per_task = (per_channel + tasks - 1) / tasks;
      std::vector<BackwardSums<double>> partial(static_cast<std::size_t>(g.C * tasks));
      parallel_for(g.C * tasks, numel, [&](std::int64_t i) {
        const std::int64_t c = i / tasks, k = i % tasks;
        alignas(64) double a[plane_lanes] = {}, b[plane_lanes] = {}, d[plane_lanes] = {};
        for_each_run(k * per_task, std::min(per_channel, (k + 1) * per_task), g.S,
                     [&](std::int64_t n, std::int64_t s, std::int64_t length) {
                       const std::int64_t o = (n * g.C + c) * g.S + s;
                       add_gradient_sums<false, Relu>(x + o, dy + o, Relu ? y + o : nullptr, length, plane_lanes,
                                                      mean + c, a, b, d);
                     });
        partial[i] = {sum_plane_lanes(a), sum_plane_lanes(b), sum_plane_lanes(d)};
      });
      for (std::int64_t c = 0; c < g.C; ++c)
        for (std::int64_t k = 0; k < tasks; ++k) sums[c] = BackwardSumsAdd{}(sums[c], partial[c * tasks + k]);
      return;
    }
    const RowTiling t(g.rows, g.width);
    const std::int64_t W = g.width;
    std::vector<double> center(static_cast<std::size_t>(W));
    for (std::int64_t j = 0; j < W; ++j) center[j] = mean[g.feature_at(j)];
    std::vector<BackwardSums<double>> partial(static_cast<std::size_t>(t.row_blocks * W));
    parallel_for(t.row_blocks * t.column_blocks, numel, [&](std::int64_t i) {
      const std::int64_t rb = i / t.column_blocks, cb = i % t.column_blocks;
      const std::int64_t r0 = rb * t.rows_per_block, r1 = std::min(g.rows, r0 + t.rows_per_block);
      const std::int64_t c0 = cb * t.block_width, width = std::min(W - c0, t.block_width);
      const std::int64_t L = t.lanes(width);
      alignas(64) double lane_mean[max_block_width], a[max_block_width], b[max_block_width], d[max_block_width];
      for (std::int64_t j = 0; j < L; ++j) lane_mean[j] = center[c0 + j % width];
      std::fill(a, a + L, 0.0);
      std::fill(b, b + L, 0.0);
      std::fill(d, d + L, 0.0);
      if (t.group > 1) {
        const std::int64_t o = r0 * W;
        add_gradient_sums<true, Relu>(x + o, dy + o, Relu ? y + o : nullptr, (r1 - r0) * W, L, lane_mean, a, b, d);
      } else {
        for (std::int64_t r = r0; r < r1; ++r) {
          const std::int64_t o = r * W + c0;
          add_gradient_sums<true, Relu>(x + o, dy + o, Relu ? y + o : nullptr, width, L, lane_mean, a, b, d);
        }
      }
      for (std::int64_t j = 0; j < width; ++j) {
        BackwardSums<double> s{a[j], b[j], d[j]};
        for (std::int64_t k = 1; k < t.group; ++k)
          s = BackwardSumsAdd{}(s, BackwardSums<double>{a[k * width + j], b[k * width + j], d[k * width + j]});
        partial[rb * W + c0 + j] = s;
      }
    });
    for (std::int64_t j = 0; j < W; ++j) {
      const std::int64_t f = g.feature_at(j);
      for (std::int64_t rb = 0; rb < t.row_blocks; ++rb) sums[f] = BackwardSumsAdd{}(sums[f], partial[rb * W + j]);
    }
  });
}

/// dresidual = g; dx = g·dy_scale + ((x − mean) − mean_shift)·xmu_scale + constant (Training) or
/// g·dy_scale (x not read), over @p length values, coefficients per lane or one.
template <bool PerLane, bool Relu, bool Dx, bool Dres, bool Training, class T>
void input_gradient_run(const T* x, const T* dy, const T* y, T* dx, T* dresidual, std::int64_t length, std::int64_t L,
                        const double* __restrict mean, const double* __restrict shift,
                        const double* __restrict dy_scale, const double* __restrict xmu_scale,
                        const double* __restrict constant) {
  using conv = convert<T>;
  auto step = [&](std::int64_t i, std::int64_t j) {
    const double g = upstream<Relu>(dy, y, i);
    if constexpr (Dres) dresidual[i] = conv::from_double(g);
    if constexpr (Dx) {
      if constexpr (Training) {
        const double xmu = (conv::to_double(x[i]) - lane_value<PerLane>(mean, j)) - lane_value<PerLane>(shift, j);
        dx[i] = conv::from_double(g * lane_value<PerLane>(dy_scale, j) + xmu * lane_value<PerLane>(xmu_scale, j) +
                                  lane_value<PerLane>(constant, j));
      } else {
        dx[i] = conv::from_double(g * lane_value<PerLane>(dy_scale, j));
      }
    }
  };
  if constexpr (!PerLane) {
    for (std::int64_t i = 0; i < length; ++i) step(i, 0);
  } else {
    std::int64_t i = 0;
    for (; i + L <= length; i += L)
      for (std::int64_t j = 0; j < L; ++j) step(i + j, j);
    for (std::int64_t j = 0; i + j < length; ++j) step(i + j, j);
  }
}

/// dresidual = g and dx = g·dy_scale + ((x − mean) − mean_shift)·xmu_scale + constant (training),
/// g·dy_scale (eval: x is not read, so a NaN in x stays out): backward's and
/// phases::input_gradient's last pass. Either output may be null.
template <class T>
void input_gradient_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                             Activation activation, const double* mean, const BackwardCoefficients<double>* k,
                             bool batch_statistics, T* dx, T* dresidual) {
  const std::int64_t numel = shape.numel();
  if ((dx == nullptr && dresidual == nullptr) || numel == 0) return;
  const Geometry g = geometry(shape, mode);
  const std::int64_t features = feature_count(shape, mode);
  // Per-lane arrays (rows layout: position order, replicated); planes use entry c of each.
  const RowTiling t(g.planes ? 1 : g.rows, g.planes ? features : g.width);
  const std::int64_t W = g.planes ? features : g.width;
  const std::int64_t L = g.planes ? features : t.lanes(W);
  std::vector<double> m(static_cast<std::size_t>(L)), sh(m.size()), ds(m.size()), xs(m.size()), co(m.size());
  for (std::int64_t j = 0; j < L; ++j) {
    const std::int64_t f = g.planes ? j : g.feature_at(j % W);
    m[j] = mean[f];
    sh[j] = k[f].mean_shift;
    ds[j] = k[f].dy_scale;
    xs[j] = k[f].xmu_scale;
    co[j] = k[f].constant;
  }
  with_flag(activation == Activation::relu, [&](auto rl) {
    with_flag(dx != nullptr, [&](auto wdx) {
      with_flag(dresidual != nullptr, [&](auto wdr) {
        with_flag(batch_statistics, [&](auto tr) {
          constexpr bool Relu = decltype(rl)::value, Dx = decltype(wdx)::value, Dres = decltype(wdr)::value,
                         Training = decltype(tr)::value;
          if (g.planes) {
            parallel_for(g.N * g.C, numel, [&](std::int64_t p) {
              const std::int64_t c = p % g.C, o = p * g.S;
              input_gradient_run<false, Relu, Dx, Dres, Training>(
                  x + o, dy + o, Relu ? y + o : nullptr, Dx ? dx + o : nullptr, Dres ? dresidual + o : nullptr, g.S, 1,
                  &m[c], &sh[c], &ds[c], &xs[c], &co[c]);
            });
            return;
          }
          const std::int64_t piece = std::max(t.group, rows_per_piece(W) / t.group * t.group);
          const std::int64_t pieces = (g.rows + piece - 1) / piece;
          parallel_for(pieces, numel, [&](std::int64_t p) {
            const std::int64_t r0 = p * piece, r1 = std::min(g.rows, r0 + piece), o = r0 * W;
            input_gradient_run<true, Relu, Dx, Dres, Training>(
                x + o, dy + o, Relu ? y + o : nullptr, Dx ? dx + o : nullptr, Dres ? dresidual + o : nullptr,
                (r1 - r0) * W, L, m.data(), sh.data(), ds.data(), xs.data(), co.data());
          });
        });
      });
    });
  });
}

}  // namespace batchnorm::detail::cpu_impl
