/**
 * @file args.hpp
 * @brief Argument structs of the functional API (see functional.hpp) and the two counts
 *        that follow from a shape and a mode.
 */
#pragma once

#include <cstdint>

#include "options.hpp"
#include "shape.hpp"
#include "types.hpp"

namespace batchnorm {

/**
 * @brief Pointers of a forward call, in the backend's memory. Element type @p T for
 *        activations, `param_t<T>` for per-feature buffers (each feature_count() long).
 * @tparam T storage type of activations
 */
template <class T>
struct ForwardArgs {
  using P = param_t<T>;
  const T* x = nullptr;  ///< input, `shape.numel()` elements in `shape.layout()`
  T* y = nullptr;        ///< output, same shape; may equal x or residual (in place), must overlap nothing else
  span<const P> weight;  ///< scale (absent: 1); weight and bias are both present or both absent
  span<const P> bias;    ///< shift (absent: 0)
  span<P> running_mean;  ///< running statistics (absent: not tracked); both or neither
  span<P> running_var;
  span<P> save_mean;    ///< optional output: the mean used (batch or running), for backward
  span<P> save_invstd;  ///< optional output: the 1/sqrt(var + eps) used, for backward
  const T* residual = nullptr;  ///< optional z of the fused `y = act(bn(x) + z)`, same shape as x
  /// Optional counter (one int64 in the backend's memory), incremented when the running
  /// stats update is skipped because ForwardConfig::skip_nonfinite_updates found
  /// non-finite batch statistics (non-finite once rounded to P, the type they are stored
  /// in). On CUDA it is updated on the device, so no sync is needed. On the CPU it saturates
  /// at 2^63 - 1.
  std::int64_t* skipped_updates = nullptr;
};

/// @brief Elementwise epilogue applied after the affine transform (and residual add).
enum class Activation { identity, relu };

/// @brief Scalars of a forward call.
struct ForwardConfig {
  Mode mode = Mode::per_channel;
  /// Normalize with batch statistics (PyTorch's `training` argument of F.batch_norm).
  /// When set and running stats are given, they are updated with `exponential_average_factor`.
  /// When not set, running stats must be given and are used as they are.
  bool batch_statistics = true;
  double eps = 1e-5;
  /// momentum, or 1 / num_batches_tracked for the cumulative average; in [0, 1].
  double exponential_average_factor = 0.1;
  /// Leave running stats untouched when a batch's statistics are not finite.
  bool skip_nonfinite_updates = false;
  Activation activation = Activation::identity;
};

/**
 * @brief Pointers of a backward call (PyTorch's native_batch_norm_backward).
 *
 * `mean`/`invstd` are what the forward saved (save_mean/save_invstd). Absent outputs are
 * not computed: `dx` null gives parameter gradients only.
 * @tparam T storage type of activations
 */
template <class T>
struct BackwardArgs {
  using P = param_t<T>;
  const T* x = nullptr;        ///< forward input
  const T* dy = nullptr;       ///< gradient of the loss w.r.t. the forward output
  T* dx = nullptr;             ///< optional output; may equal dy or x, must overlap nothing else
  const T* y = nullptr;        ///< forward output; required with a fused relu (its mask)
  T* dresidual = nullptr;      ///< optional output: gradient w.r.t. the fused residual z; may equal dy
  span<const P> weight;        ///< as in forward (absent: 1)
  span<const P> mean;          ///< saved mean
  span<const P> invstd;        ///< saved inverse std
  span<P> grad_weight;         ///< optional output: Σ dy·(x − mean)·invstd
  span<P> grad_bias;           ///< optional output: Σ dy
};

/// @brief Scalars of a backward call.
struct BackwardConfig {
  Mode mode = Mode::per_channel;
  /// The saved statistics were batch statistics (training forward): dx then includes the
  /// terms through mean and variance. Otherwise dx = dy * invstd * weight.
  bool batch_statistics = true;
  /// Add into grad_weight / grad_bias instead of overwriting them (PyTorch's `.grad` +=).
  bool accumulate = false;
  /// The forward fused this activation; its mask is taken from `y`.
  Activation activation = Activation::identity;
};

/**
 * @brief Number of per-feature entries for @p shape in @p mode: C, or C * spatial.
 * @note Does not validate; see the forward/backward functions.
 */
inline std::int64_t feature_count(const Shape& shape, Mode mode) {
  return mode == Mode::per_channel ? shape.channels() : shape.channels() * shape.spatial();
}

/**
 * @brief Number of values each feature's statistics are taken over: N * spatial, or N.
 */
inline std::int64_t reduction_count(const Shape& shape, Mode mode) {
  return mode == Mode::per_channel ? shape.batch() * shape.spatial() : shape.batch();
}

}  // namespace batchnorm
