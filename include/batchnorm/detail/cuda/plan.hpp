/**
 * @file detail/cuda/plan.hpp
 * @brief The index arithmetic of the CUDA backend in plain C++ (no CUDA headers), so that
 *        CI, which has no GPU, tests it on the host: tile and launch policies, the two
 *        tensor views, the walks each kernel thread makes over them, the Plan (view + grid
 *        for a shape) and the workspace layout. The kernels call these same functions.
 *
 * Views:
 *  - PlanarView (N, C, S), element (n, c, s) at (n * C + c) * S + s: a feature's values are
 *    N runs of S contiguous elements (NCHW / NCDHW, per channel). Its reduction splits each
 *    channel over many blocks, so small C with large N * S (e.g. (128, 4, 224, 224)) still
 *    fills the GPU, unlike PyTorch's one-block-per-channel kernel.
 *  - RowsView (R, F), element (r, j) at r * F + j: a feature is a column of a row-major
 *    matrix ((N, C); NHWC per channel with R = N * S; per activation with R = N and
 *    F = C * S). Blocks take 32 adjacent columns, so each warp reads whole cache lines.
 */
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../../args.hpp"
#include "../../errors.hpp"
#include "../moments.hpp"

#if defined(__CUDA_ARCH__)  // device pass only: host compilers warn about the pragma
#define BN_UNROLL _Pragma("unroll")
#else
#define BN_UNROLL
#endif

namespace batchnorm::detail::cuda_impl {

/**
 * @brief Tile shapes, fixed at compile time (they size shared memory and CUB temp storage).
 *
 * 256-thread blocks (8 warps) are CUB's and PyTorch's default for reductions; a 32 x 8 tile
 * reads 32 consecutive features (one 128-byte line of float) per warp in the row-major
 * kernels; four loads in flight per thread hide DRAM latency at that occupancy.
 */
struct TilePolicy {
  static constexpr int reduce_threads = 256;    ///< planar reduction block (1-D)
  static constexpr int rows_tile_columns = 32;  ///< row-major reduction: features per block (threadIdx.x)
  static constexpr int rows_tile_rows = 8;      ///< row-major reduction: rows in flight per block (threadIdx.y)
  static constexpr int loads_in_flight = 4;     ///< unrolled loads per thread in the reductions
  static constexpr int elementwise_threads = 256;
  static constexpr int finalize_warps = 4;  ///< features finalized per block (one warp each)
  static_assert(rows_tile_columns * rows_tile_rows == reduce_threads, "one block size for both reductions");
  static_assert(32 % rows_tile_rows == 0, "a feature's partials must sit in one hardware warp");
};

/**
 * @brief Grid targets, chosen at run time for the device. Reductions aim at
 *        `reduce_blocks_per_sm` blocks per SM and elementwise passes at
 *        `elementwise_blocks_per_sm`: every SM busy at least twice over, the usual rule for
 *        latency hiding. Not yet tuned on an H100/H200 (see docs/gpu-validation.md).
 */
struct LaunchPolicy {
  int sm_count = 1;
  int reduce_blocks_per_sm = 4;
  int elementwise_blocks_per_sm = 8;
  /// A reduction split below this many elements is not worth its partial result.
  std::int64_t min_elements_per_split = 4096;
  /// gridDim.y limit.
  int max_splits = 65535;

  [[nodiscard]] std::int64_t reduce_block_target() const {
    return static_cast<std::int64_t>(sm_count) * reduce_blocks_per_sm;
  }
  [[nodiscard]] std::int64_t elementwise_block_target() const {
    return static_cast<std::int64_t>(sm_count) * elementwise_blocks_per_sm;
  }
};

/// Policy for compute capability @p major.minor with @p sm_count SMs.
inline LaunchPolicy launch_policy_for(int major, int /*minor*/, int sm_count) {
  LaunchPolicy p;
  p.sm_count = sm_count > 0 ? sm_count : 1;
  if (major >= 9) p.reduce_blocks_per_sm = 8;  // Hopper: 3+ TB/s needs more bytes in flight per SM
  return p;
}

struct PlanarView {
  std::int64_t N, C, S;
};
struct RowsView {
  std::int64_t R, F;
};

/// Column of a view -> index of the parameter / running-stat entry. Only per activation on
/// channels-last data permutes: column s * C + c holds parameter c * S + s.
struct FeatureMap {
  std::int64_t C = 1, S = 1;
  bool permuted = false;
  BN_HOST_DEVICE std::int64_t param(std::int64_t column) const {
    return permuted ? (column % C) * S + column / C : column;
  }
};

BN_HOST_DEVICE std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

/// Steps a (major, minor) position, minor < extent, by a fixed linear stride, with one
/// division at the start and none per step.
struct Cursor {
  std::int64_t major, minor, extent, step_major, step_minor;
  BN_HOST_DEVICE Cursor(std::int64_t linear, std::int64_t extent_, std::int64_t stride)
      : major(linear / extent_), minor(linear % extent_), extent(extent_), step_major(stride / extent_),
        step_minor(stride % extent_) {}
  BN_HOST_DEVICE void advance() {
    minor += step_minor;
    major += step_major;
    if (minor >= extent) {
      minor -= extent;
      ++major;
    }
  }
};

/**
 * @brief One thread's walk in the planar reduction: elements e = first, first + Threads, ...
 *        < end of channel @p c (e indexes the channel's N * S values). `load(offset)` is
 *        called for `Loads` elements before `push(value)` consumes them.
 */
template <int Threads, int Loads, class Load, class Push>
BN_HOST_DEVICE void walk_planar_reduce(const PlanarView& v, std::int64_t c, std::int64_t first, std::int64_t end,
                                       Load&& load, Push&& push) {
  std::int64_t e = first;
  if (e >= end) return;
  Cursor at(e, v.S, Threads);  // (n, s) of element e
  for (; e + (Loads - 1) * static_cast<std::int64_t>(Threads) < end; e += Loads * static_cast<std::int64_t>(Threads)) {
    decltype(load(std::int64_t{0})) values[Loads];
BN_UNROLL
    for (int u = 0; u < Loads; ++u) {
      values[u] = load((at.major * v.C + c) * v.S + at.minor);
      at.advance();
    }
BN_UNROLL
    for (int u = 0; u < Loads; ++u) push(values[u]);
  }
  for (; e < end; e += Threads) {
    push(load((at.major * v.C + c) * v.S + at.minor));
    at.advance();
  }
}

/// One thread's walk in the row-major reduction: rows first, first + Rows, ... < end of @p column.
template <int Rows, int Loads, class Load, class Push>
BN_HOST_DEVICE void walk_rows_reduce(const RowsView& v, std::int64_t column, std::int64_t first, std::int64_t end,
                                     Load&& load, Push&& push) {
  std::int64_t r = first;
  for (; r + (Loads - 1) * Rows < end; r += Loads * Rows) {
    decltype(load(std::int64_t{0})) values[Loads];
BN_UNROLL
    for (int u = 0; u < Loads; ++u) values[u] = load((r + u * Rows) * v.F + column);
BN_UNROLL
    for (int u = 0; u < Loads; ++u) push(values[u]);
  }
  for (; r < end; r += Rows) push(load(r * v.F + column));
}

/// One thread's grid-stride walk over a PlanarView in memory order: op(i, channel).
template <class Op>
BN_HOST_DEVICE void walk_planar_elementwise(const PlanarView& v, std::int64_t first, std::int64_t stride, Op&& op) {
  const std::int64_t total = v.N * v.C * v.S;
  std::int64_t i = first;
  if (i >= total) return;
  Cursor plane(i, v.S, stride);  // major = n * C + c, minor = s
  std::int64_t c = plane.major % v.C;
  const std::int64_t c_step = plane.step_major % v.C;
  for (; i < total; i += stride) {
    op(i, c);
    const std::int64_t before = plane.major;
    plane.advance();
    c += c_step + (plane.major - before - plane.step_major);  // + 1 when s wrapped
    if (c >= v.C) c -= v.C;
  }
}

/// One thread's grid-stride walk over a RowsView in memory order: op(i, i mod F).
template <class Op>
BN_HOST_DEVICE void walk_rows_elementwise(const RowsView& v, std::int64_t first, std::int64_t stride, Op&& op) {
  const std::int64_t total = v.R * v.F;
  std::int64_t i = first;
  if (i >= total) return;
  Cursor at(i, v.F, stride);
  for (; i < total; i += stride) {
    op(i, at.minor);
    at.advance();
  }
}

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

/// Grid limits of every device since compute capability 3.0: gridDim.x <= 2^31 − 1,
/// gridDim.y <= 65535.
constexpr std::int64_t max_grid_x = 2147483647;
constexpr std::int64_t max_grid_y = 65535;
/// The most features a launch handles: the planar reduction has one block per feature in
/// gridDim.x (the other grids need fewer blocks).
constexpr std::int64_t max_features = max_grid_x;

/// A grid extent as launched, checked against its @p limit (never a silent truncation).
inline unsigned grid_extent(std::int64_t blocks, std::int64_t limit) {
  if (blocks < 1 || blocks > limit)
    throw invalid_argument("shape", concat("shape: needs a grid of ", blocks, " blocks in one dimension; the CUDA "
                                           "limit is ", limit));
  return static_cast<unsigned>(blocks);
}

/// Where feature `column`'s partial `k` lives: partials[column * feature_stride + k * split_stride].
struct PartialsLayout {
  std::int64_t splits, feature_stride, split_stride;
};

/// How a shape is reduced: which view, how many splits per feature, and their size.
struct Plan {
  bool planar = true;
  PlanarView planar_view{1, 1, 1};
  RowsView rows_view{1, 1};
  FeatureMap map;
  std::int64_t features = 0;  ///< F: columns of the view = entries of each per-feature buffer
  std::int64_t splits = 1;    ///< partial results per feature
  std::int64_t chunk = 1;     ///< elements (planar) or rows (rows view) per split

  [[nodiscard]] PartialsLayout partials_layout() const {
    return planar ? PartialsLayout{splits, splits, 1} : PartialsLayout{splits, 1, features};
  }
};

/// Chooses the view and the split of a non-empty @p shape.
inline Plan make_plan(const Shape& shape, Mode mode, const LaunchPolicy& policy) {
  using Tile = TilePolicy;
  const std::int64_t N = shape.batch(), C = shape.channels(), S = shape.spatial();
  Plan p;
  p.features = feature_count(shape, mode);
  const bool channels_last = shape.layout() == Layout::channels_last && S > 1;
  if (mode == Mode::per_channel && !channels_last && S > 1) {
    p.planar_view = {N, C, S};
  } else {
    p.planar = false;
    p.rows_view = {mode == Mode::per_channel ? N * S : N, p.features};
    p.map = {C, S, mode == Mode::per_activation && channels_last && C > 1};
    if (p.features == 1) {  // one column is one contiguous run: reduce it as a plane
      p.planar = true;
      p.planar_view = {1, 1, p.rows_view.R};
      p.map = {};
    }
  }
  const std::int64_t target = policy.reduce_block_target();
  if (p.planar) {
    const std::int64_t count = p.planar_view.N * p.planar_view.S;
    std::int64_t splits = std::min(ceil_div(target, p.planar_view.C), ceil_div(count, policy.min_elements_per_split));
    splits = std::clamp<std::int64_t>(splits, 1, policy.max_splits);
    p.chunk = std::max<std::int64_t>(1, ceil_div(ceil_div(count, splits), Tile::reduce_threads)) * Tile::reduce_threads;
    p.splits = std::max<std::int64_t>(1, ceil_div(count, p.chunk));
  } else {
    const std::int64_t tiles = ceil_div(p.features, Tile::rows_tile_columns);
    const std::int64_t rows_min = std::max<std::int64_t>(1, policy.min_elements_per_split / Tile::rows_tile_columns);
    std::int64_t splits = std::min(ceil_div(target, tiles), ceil_div(p.rows_view.R, rows_min));
    splits = std::clamp<std::int64_t>(splits, 1, policy.max_splits);
    p.chunk = std::max<std::int64_t>(1, ceil_div(p.rows_view.R, splits));
    p.splits = std::max<std::int64_t>(1, ceil_div(p.rows_view.R, p.chunk));
  }
  return p;
}

/// dx = g * dy_scale + ((x − mean) − mean_shift) * xmu_scale + constant, per column.
template <class Acc>
struct ColumnGrad {
  Acc mean, mean_shift, dy_scale, xmu_scale, constant;
};

inline std::size_t align_up(std::size_t bytes) { return (bytes + 255) & ~static_cast<std::size_t>(255); }

/// Byte offsets of the workspace regions; `total` is what the caller must provide.
struct WorkspaceLayout {
  std::size_t partials = 0, columns = 0, stats = 0, flag = 0, total = 0;
};

inline WorkspaceLayout carve(std::size_t partial_bytes, std::size_t column_bytes, std::size_t stats_bytes) {
  WorkspaceLayout w;
  w.columns = align_up(partial_bytes);
  w.stats = w.columns + align_up(column_bytes);
  w.flag = w.stats + align_up(stats_bytes);
  w.total = w.flag + sizeof(int);
  return w;
}

template <class Acc>
WorkspaceLayout forward_layout(const Plan& p, const ForwardConfig& c, bool tracking) {
  const auto F = static_cast<std::size_t>(p.features);
  const std::size_t partials = c.batch_statistics ? static_cast<std::size_t>(p.splits) * F * sizeof(Welford<Acc>) : 0;
  const bool deferred = c.batch_statistics && tracking && c.skip_nonfinite_updates;
  return carve(partials, F * sizeof(Affine<Acc>), deferred ? F * sizeof(FeatureStats<Acc>) : 0);
}

template <class Acc>
WorkspaceLayout backward_layout(const Plan& p) {
  const auto F = static_cast<std::size_t>(p.features);
  return carve(static_cast<std::size_t>(p.splits) * F * sizeof(BackwardSums<Acc>), F * sizeof(ColumnGrad<Acc>), 0);
}

/// Enough for every shape with @p features features under @p policy: make_plan never
/// makes more than features + 32 * reduce_block_target() partial results.
template <class Acc>
std::size_t max_workspace_bytes(std::int64_t features, const LaunchPolicy& policy) {
  const auto F = static_cast<std::size_t>(features);
  const auto partials = F + static_cast<std::size_t>(TilePolicy::rows_tile_columns * policy.reduce_block_target());
  const std::size_t state = std::max(sizeof(Welford<Acc>), sizeof(BackwardSums<Acc>));
  const std::size_t column = std::max(sizeof(Affine<Acc>), sizeof(ColumnGrad<Acc>));
  return carve(partials * state, F * column, F * sizeof(FeatureStats<Acc>)).total;
}

}  // namespace batchnorm::detail::cuda_impl
