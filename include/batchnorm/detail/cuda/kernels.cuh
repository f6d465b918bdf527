/**
 * @file detail/cuda/kernels.cuh
 * @brief The __global__ kernels. Their index walks live in plan.hpp (host-testable); here
 *        is what each thread does with the values: reductions are generic over an
 *        "accumulator" (forward: Welford; backward: the two sums) and elementwise passes
 *        over an "element op", so one kernel body serves forward and backward. Reductions go
 *        through CUB (BlockReduce, WarpReduce) with the Chan merge of detail/moments.hpp.
 *        All indexing is 64-bit. Kernels have hidden visibility so that shared objects
 *        which each instantiate them never clash.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "../moments.hpp"
#include "plan.hpp"

#if defined(_WIN32)
#define BN_KERNEL __global__
#else
#define BN_KERNEL __global__ __attribute__((visibility("hidden")))
#endif

namespace batchnorm::detail::cuda_impl {

// ---- storage <-> accumulation ------------------------------------------------------------

/// Conversions between a storage type and the accumulation type. The half types go through
/// their intrinsics, never through implicit conversions: PyTorch extensions are built with
/// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_OPERATORS__,
/// which remove them (tests/cuda/torch_extension_flags_test.cu builds with those macros).
template <class T>
struct storage_conversion {
  template <class Acc>
  __device__ static Acc to_acc(T v) { return static_cast<Acc>(v); }
  template <class Acc>
  __device__ static T from_acc(Acc v) { return from_acc<T>(v); }
};
template <>
struct storage_conversion<__half> {
  template <class Acc>
  __device__ static Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
  template <class Acc>
  __device__ static __half from_acc(Acc v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct storage_conversion<__nv_bfloat16> {
  template <class Acc>
  __device__ static Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }
  template <class Acc>
  __device__ static __nv_bfloat16 from_acc(Acc v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

/// A stored value as the accumulation type.
template <class Acc, class T>
__device__ __forceinline__ Acc to_acc(T v) {
  return storage_conversion<T>::template to_acc<Acc>(v);
}
/// An accumulation-type value rounded to the storage type (round to nearest even).
template <class T, class Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return storage_conversion<T>::template from_acc<Acc>(v);
}

// ---- accumulators ------------------------------------------------------------------------

/// Where the pivot of feature `column` is: x[column * stride] (its first element: (0, c, 0)
/// of a PlanarView, row 0 of a RowsView).
struct PivotIndex {
  std::int64_t stride;
  __device__ std::int64_t operator()(std::int64_t column) const { return column * stride; }
};

/// Forward statistics: Welford over x · prescale − pivot (see Pivot in moments.hpp), so that
/// float accumulators hold values of the size of the spread, whatever the offset or magnitude.
template <class T, class Acc>
struct WelfordAccumulator {
  using state_type = Welford<Acc>;
  using value_type = Acc;
  using merge_type = WelfordMerge;
  const T* __restrict__ x;
  PivotIndex pivot_index;
  Pivot<Acc> pivot{Acc(1), Acc(0)};
  __device__ void bind(std::int64_t column) { pivot = make_pivot(to_acc<Acc>(x[pivot_index(column)])); }
  __device__ value_type load(std::int64_t i) const { return to_acc<Acc>(x[i]) * pivot.prescale - pivot.value; }
  __device__ static void push(state_type& s, value_type v) { s.push(v); }
};

/// Backward sums over (dy, x) against the saved mean, with dy masked by y > 0 after a fused relu.
template <class T, class Acc, class P>
struct GradAccumulator {
  struct value_type {
    Acc g, x;
  };
  using state_type = BackwardSums<Acc>;
  using merge_type = BackwardSumsAdd;
  const T* __restrict__ x;
  const T* __restrict__ dy;
  const T* __restrict__ y;  ///< non-null: relu mask
  const P* __restrict__ mean;
  FeatureMap map;
  Acc column_mean = Acc(0);
  __device__ void bind(std::int64_t column) { column_mean = to_acc<Acc>(mean[map.param(column)]); }
  __device__ value_type load(std::int64_t i) const {
    Acc g = to_acc<Acc>(dy[i]);
    if (y != nullptr) g = relu_backward(g, to_acc<Acc>(y[i]));
    return {g, to_acc<Acc>(x[i])};
  }
  __device__ void push(state_type& s, const value_type& v) const {
    const Acc xmu = v.x - column_mean;
    s.dy += v.g;
    s.dy_xmu += v.g * xmu;
    s.xmu += xmu;
  }
};

template <class Accumulator>
__device__ typename Accumulator::state_type empty_state() {
  typename Accumulator::state_type s{};
  return s;
}

// ---- reductions ---------------------------------------------------------------------------

/**
 * @brief Partial reduction of a PlanarView. grid = (C, splits); block (c, k) reduces the
 *        k-th chunk of channel c's N * S values and writes partials[c * splits + k].
 */
template <int Threads, int Loads, class Accumulator>
BN_KERNEL void __launch_bounds__(Threads)
    planar_reduce_kernel(Accumulator acc, PlanarView v, std::int64_t chunk,
                         typename Accumulator::state_type* __restrict__ partials) {
  using State = typename Accumulator::state_type;
  const std::int64_t c = blockIdx.x;
  const std::int64_t split = blockIdx.y;
  const std::int64_t count = v.N * v.S;
  const std::int64_t end = min64(count, (split + 1) * chunk);
  acc.bind(c);
  State state = empty_state<Accumulator>();
  walk_planar_reduce<Threads, Loads>(
      v, c, split * chunk + threadIdx.x, end, [&](std::int64_t i) { return acc.load(i); },
      [&](const typename Accumulator::value_type& value) { acc.push(state, value); });
  using BlockReduce = cub::BlockReduce<State, Threads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const State total = BlockReduce(temp).Reduce(state, typename Accumulator::merge_type{});
  if (threadIdx.x == 0) partials[c * gridDim.y + split] = total;
}

/**
 * @brief Partial reduction of a RowsView. block = (Columns, Rows), grid = (ceil(F / Columns),
 *        splits); block (t, k) reduces columns [t * Columns, ...) over the k-th chunk of rows
 *        and writes partials[k * F + column].
 */
template <int Columns, int Rows, int Loads, class Accumulator>
BN_KERNEL void __launch_bounds__(Columns* Rows)
    rows_reduce_kernel(Accumulator acc, RowsView v, std::int64_t rows_per_split,
                       typename Accumulator::state_type* __restrict__ partials) {
  using State = typename Accumulator::state_type;
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * Columns + threadIdx.x;
  const std::int64_t split = blockIdx.y;
  const std::int64_t end = min64(v.R, (split + 1) * rows_per_split);
  State state = empty_state<Accumulator>();
  if (column < v.F) {
    acc.bind(column);
    walk_rows_reduce<Rows, Loads>(
        v, column, split * rows_per_split + threadIdx.y, end, [&](std::int64_t i) { return acc.load(i); },
        [&](const typename Accumulator::value_type& value) { acc.push(state, value); });
  }
  // Transpose through shared memory so that a column's `Rows` partials sit in adjacent
  // lanes, then reduce each group with a logical warp of `Rows` threads.
  __shared__ cub::Uninitialized<State[Rows * Columns]> staged_storage;
  State* staged = staged_storage.Alias();
  staged[threadIdx.y * Columns + threadIdx.x] = state;
  __syncthreads();
  const int t = threadIdx.y * Columns + threadIdx.x;
  const int my_column = t / Rows, my_row = t % Rows;
  using WarpReduce = cub::WarpReduce<State, Rows>;
  __shared__ typename WarpReduce::TempStorage temp[Columns];
  const State total = WarpReduce(temp[my_column]).Reduce(staged[my_row * Columns + my_column],
                                                          typename Accumulator::merge_type{});
  const std::int64_t out_column = static_cast<std::int64_t>(blockIdx.x) * Columns + my_column;
  if (my_row == 0 && out_column < v.F) partials[split * v.F + out_column] = total;
}

/// One warp merges one feature's partials (lanes stride over them, then a CUB warp reduce).
template <class Accumulator>
__device__ typename Accumulator::state_type merge_partials(const typename Accumulator::state_type* partials,
                                                           PartialsLayout layout, std::int64_t column) {
  using State = typename Accumulator::state_type;
  const int lane = threadIdx.x % 32;
  State state = empty_state<Accumulator>();
  const typename Accumulator::merge_type merge{};
  for (std::int64_t k = lane; k < layout.splits; k += 32)
    state = merge(state, partials[column * layout.feature_stride + k * layout.split_stride]);
  using WarpReduce = cub::WarpReduce<State>;
  __shared__ typename WarpReduce::TempStorage temp[TilePolicy::finalize_warps];
  return WarpReduce(temp[threadIdx.x / 32]).Reduce(state, merge);
}

// ---- per-feature finalization ------------------------------------------------------------

/// Pointers the forward finalization reads and writes (parameter order).
template <class P>
struct ForwardFeatureArgs {
  const P* weight;  ///< may be null
  const P* bias;
  P* running_mean;  ///< null: not tracked (or eval: read-only use in running_affine_kernel)
  P* running_var;
  P* save_mean;  ///< may be null
  P* save_invstd;
  double eps;
  double factor;
};

/// Writes save_mean / save_invstd and the column's normalization constants.
template <class Acc, class P>
__device__ void write_column(Affine<Acc>* affine, std::int64_t column, std::int64_t p, Acc mean, Acc invstd,
                             const Affine<Acc>& constants, const ForwardFeatureArgs<P>& a) {
  if (a.save_mean) a.save_mean[p] = from_acc<P>(mean);
  if (a.save_invstd) a.save_invstd[p] = from_acc<P>(invstd);
  affine[column] = constants;
}

template <class Acc, class P>
__device__ Acc weight_of(const ForwardFeatureArgs<P>& a, std::int64_t p) {
  return a.weight ? to_acc<Acc>(a.weight[p]) : Acc(1);
}
template <class Acc, class P>
__device__ Acc bias_of(const ForwardFeatureArgs<P>& a, std::int64_t p) {
  return a.bias ? to_acc<Acc>(a.bias[p]) : Acc(0);
}

/**
 * @brief Merges each feature's Welford partials, then writes save_mean / save_invstd, the
 *        column's normalization constants and (when tracking) the running stats. With
 *        `deferred_update`, statistics go to `stats` and a non-finite one sets `*nonfinite`;
 *        apply_running_update_kernel then decides for the whole batch.
 */
template <class T, class Acc, class P>
BN_KERNEL void __launch_bounds__(TilePolicy::finalize_warps * 32)
    forward_finalize_kernel(const Welford<Acc>* __restrict__ partials, PartialsLayout layout, std::int64_t F,
                            FeatureMap map, const T* __restrict__ x, PivotIndex pivot_index, ForwardFeatureArgs<P> a,
                            Affine<Acc>* __restrict__ affine, bool deferred_update,
                            FeatureStats<Acc>* __restrict__ stats, int* __restrict__ nonfinite) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * TilePolicy::finalize_warps + threadIdx.x / 32;
  if (column >= F) return;  // whole warps leave together
  const Welford<Acc> total = merge_partials<WelfordAccumulator<T, Acc>>(partials, layout, column);
  if (threadIdx.x % 32 != 0) return;
  const std::int64_t p = map.param(column);
  const Pivot<Acc> pivot = make_pivot(to_acc<Acc>(x[pivot_index(column)]));
  const PivotedStats<Acc> r = finalize_pivoted(total, pivot, a.eps, weight_of<Acc>(a, p), bias_of<Acc>(a, p));
  write_column(affine, column, p, r.mean, r.invstd, r.affine, a);
  const FeatureStats<Acc>& s = r.stats;
  if (a.running_mean == nullptr) return;
  if (!deferred_update) {
    update_running(a.running_mean[p], a.running_var[p], s, a.factor);
  } else {
    stats[p] = s;
    if (!is_finite(s)) atomicOr(nonfinite, 1);
  }
}

/// Second half of a deferred update: all features or none, and count a skipped batch.
template <class Acc, class P>
BN_KERNEL void apply_running_update_kernel(const FeatureStats<Acc>* __restrict__ stats, std::int64_t F,
                                           const int* __restrict__ nonfinite, P* running_mean, P* running_var,
                                           double factor, std::int64_t* skipped_updates) {
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (*nonfinite) {
    if (p == 0 && skipped_updates) increment_saturating(*skipped_updates);
    return;
  }
  if (p < F) update_running(running_mean[p], running_var[p], stats[p], factor);
}

/// Eval with running statistics: constants from running_mean / running_var.
template <class Acc, class P>
BN_KERNEL void running_affine_kernel(std::int64_t F, FeatureMap map, ForwardFeatureArgs<P> a,
                                     Affine<Acc>* __restrict__ affine) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= F) return;
  const std::int64_t p = map.param(column);
  const Acc mean = to_acc<Acc>(a.running_mean[p]);
  const Acc invstd = inverse_std(to_acc<Acc>(a.running_var[p]), a.eps);
  write_column(affine, column, p, mean, invstd, normalize_affine(mean, invstd, weight_of<Acc>(a, p), bias_of<Acc>(a, p)),
               a);
}

template <class P>
struct BackwardFeatureArgs {
  const P* weight;  ///< may be null
  const P* mean;
  const P* invstd;
  P* grad_weight;  ///< may be null
  P* grad_bias;    ///< may be null
  std::int64_t n;
  bool batch_statistics;
  bool accumulate;
};

template <class Acc, class P>
BN_KERNEL void __launch_bounds__(TilePolicy::finalize_warps * 32)
    backward_finalize_kernel(const BackwardSums<Acc>* __restrict__ partials, PartialsLayout layout, std::int64_t F,
                             FeatureMap map, BackwardFeatureArgs<P> a, ColumnGrad<Acc>* __restrict__ coefficients) {
  const std::int64_t column = static_cast<std::int64_t>(blockIdx.x) * TilePolicy::finalize_warps + threadIdx.x / 32;
  if (column >= F) return;
  const BackwardSums<Acc> sums = merge_partials<GradAccumulator<float, Acc, P>>(partials, layout, column);
  if (threadIdx.x % 32 != 0) return;
  const std::int64_t p = map.param(column);
  const Acc w = a.weight ? to_acc<Acc>(a.weight[p]) : Acc(1);
  const BackwardCoefficients<Acc> k =
      backward_coefficients(sums, to_acc<Acc>(a.invstd[p]), w, a.n, a.batch_statistics);
  store_gradient(a.grad_weight ? a.grad_weight + p : nullptr, k.grad_weight, a.accumulate);
  store_gradient(a.grad_bias ? a.grad_bias + p : nullptr, k.grad_bias, a.accumulate);
  if (coefficients)
    coefficients[column] = {to_acc<Acc>(a.mean[p]), k.mean_shift, k.dy_scale, k.xmu_scale, k.constant};
}

// ---- elementwise passes ------------------------------------------------------------------

/// y = act((x − mean) · scale + bias [+ z]).
template <class T, class Acc>
struct NormalizeOp {
  const T* x;  ///< not __restrict__: y may alias it
  const T* residual;  ///< may alias y
  T* y;               ///< may alias x
  const Affine<Acc>* __restrict__ affine;
  bool relu;
  __device__ void operator()(std::int64_t i, std::int64_t column) const {
    Acc v = affine[column].apply(to_acc<Acc>(x[i]));
    if (residual) v += to_acc<Acc>(residual[i]);
    if (relu) v = batchnorm::detail::relu(v);
    y[i] = from_acc<T>(v);
  }
};

/// dx and dz from the per-column coefficients.
template <class T, class Acc>
struct InputGradOp {
  const T* x;
  const T* dy;
  const T* __restrict__ y;  ///< non-null: relu mask
  T* dx;                    ///< may alias dy or x; may be null
  T* dz;                    ///< may be null
  const ColumnGrad<Acc>* __restrict__ k;
  bool batch_statistics;
  __device__ void operator()(std::int64_t i, std::int64_t column) const {
    Acc g = to_acc<Acc>(dy[i]);
    if (y != nullptr) g = relu_backward(g, to_acc<Acc>(y[i]));
    const ColumnGrad<Acc> c = k[column];
    if (dz) dz[i] = from_acc<T>(g);
    if (dx == nullptr) return;
    if (!batch_statistics) {  // eval: dx = dy * invstd * w, x is not read
      dx[i] = from_acc<T>(g * c.dy_scale);
      return;
    }
    const Acc xmu = (to_acc<Acc>(x[i]) - c.mean) - c.mean_shift;
    dx[i] = from_acc<T>(g * c.dy_scale + xmu * c.xmu_scale + c.constant);
  }
};

/// Grid-stride over a PlanarView in memory order; the column is the channel.
template <int Threads, class Op>
BN_KERNEL void __launch_bounds__(Threads) planar_elementwise_kernel(Op op, PlanarView v) {
  walk_planar_elementwise(v, static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x,
                          static_cast<std::int64_t>(gridDim.x) * Threads, op);
}

/// Grid-stride over a RowsView in memory order; the column is i mod F.
template <int Threads, class Op>
BN_KERNEL void __launch_bounds__(Threads) rows_elementwise_kernel(Op op, RowsView v) {
  walk_rows_elementwise(v, static_cast<std::int64_t>(blockIdx.x) * Threads + threadIdx.x,
                        static_cast<std::int64_t>(gridDim.x) * Threads, op);
}

}  // namespace batchnorm::detail::cuda_impl
