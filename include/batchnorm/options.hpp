/**
 * @file options.hpp
 * @brief Construction options of a BatchNorm layer (PyTorch's constructor arguments).
 */
#pragma once

#include <optional>

namespace batchnorm {

/**
 * @brief Which elements share one set of statistics.
 *
 * - `per_channel` (PyTorch's BatchNorm, cuDNN's SPATIAL): one mean/variance per channel,
 *   over the batch and every spatial location. `num_features == C`.
 * - `per_activation` (cuDNN's PER_ACTIVATION): one mean/variance per (channel, spatial
 *   location), over the batch only. `num_features == C * spatial`, and the layer equals a
 *   `BatchNorm1d(C * spatial)` applied to the input flattened to `(N, C * spatial)`;
 *   parameters are indexed `c * spatial + s` whatever the memory layout.
 */
enum class Mode { per_channel, per_activation };

/**
 * @brief Options of a layer; the defaults are PyTorch's.
 *
 * Validated when a layer is constructed: `eps` must be finite and > 0, `momentum` (when
 * set) finite and in [0, 1]; otherwise batchnorm::invalid_argument is thrown.
 */
struct Options {
  /// Added to the variance before the square root.
  double eps = 1e-5;
  /// Running-stat update weight; `std::nullopt` selects the cumulative moving average
  /// (weight `1 / num_batches_tracked`, counted after the increment).
  std::optional<double> momentum = 0.1;
  /// Learnable per-feature weight (init 1) and bias (init 0); off means identity.
  bool affine = true;
  /// Keep running_mean / running_var / num_batches_tracked. Off: no buffers, and eval
  /// mode normalizes with batch statistics too (as PyTorch does).
  bool track_running_stats = true;
  /// Statistics per channel (default) or per activation.
  Mode mode = Mode::per_channel;
  /// Off by default (PyTorch's behaviour: NaN/Inf in a batch poison the running stats).
  /// On: a training batch whose statistics are not all finite leaves running_mean /
  /// running_var untouched and is counted (see BatchNorm::nonfinite_batches_skipped()).
  /// `num_batches_tracked` still counts that batch: it is a host counter, and on CUDA the host
  /// learns about the skip only by synchronizing (so with momentum = nullopt the batches
  /// after a skip get the weight 1 / num_batches_tracked of the full count).
  bool skip_nonfinite_updates = false;
  /// `backward` adds into grad_weight / grad_bias (PyTorch's `.grad` accumulation) instead
  /// of overwriting them; `zero_grad()` resets them.
  bool accumulate_gradients = false;
};

}  // namespace batchnorm
