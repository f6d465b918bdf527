/**
 * @file fold.hpp
 * @brief Inference folding: merge an eval-mode BatchNorm into the weight and bias of the
 *        convolution or linear layer before it, so that deployment runs one layer instead
 *        of two (PyTorch's torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights).
 *
 * In eval mode BatchNorm is the per-channel affine map `y = x * scale + shift` with
 * `scale = weight / sqrt(running_var + eps)` and `shift = bias - running_mean * scale`.
 * Applied to a layer `x = W * u + b` whose output channel c owns the slice `W[c, ...]`:
 * `W'[c, ...] = W[c, ...] * scale[c]` and `b'[c] = (b[c] - running_mean[c]) * scale[c] + bias[c]`
 * (`b = 0` when the layer has no bias). Arithmetic is in double, rounded once to the
 * weight type.
 *
 * Weight layouts: every layout with the output channel as the outermost (slowest) index
 * — conv OIHW / OIDHW / OIL, channels-last conv weights OHWI, linear `(out_features,
 * in_features)` — is WeightLayout::out_first; TensorFlow's HWIO and a transposed linear
 * `(in_features, out_features)` are WeightLayout::out_last. (A ConvTranspose weight,
 * `(in, out / groups, k...)`, is neither and is not supported.)
 *
 * @code
 * batchnorm::BatchNorm2d<float, batchnorm::cpu> bn(64);   // ... trained, then
 * auto folded = batchnorm::fold(conv_weight, conv_bias, bn);  // conv_weight: 64 x 32 x 3 x 3
 * // conv(u; folded.weight, folded.bias) == bn.eval(), bn(conv(u; conv_weight, conv_bias))
 * @endcode
 */
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "batch_norm.hpp"
#include "errors.hpp"
#include "options.hpp"
#include "state.hpp"
#include "types.hpp"

namespace batchnorm {

/// @brief Where the output-channel index sits in a weight tensor's memory order.
enum class WeightLayout {
  out_first,  ///< output channel outermost: OIHW, OHWI, linear (out, in)
  out_last    ///< output channel innermost: HWIO, linear stored as (in, out)
};

/**
 * @brief The eval-mode BatchNorm as a per-channel affine map `y = x * scale + shift`.
 */
struct EvalAffine {
  std::vector<double> scale;  ///< weight / sqrt(running_var + eps)
  std::vector<double> shift;  ///< bias - running_mean * scale
};

/**
 * @brief Weight and bias of a layer with a BatchNorm folded in (see fold()).
 * @tparam W element type of the layer's weight and bias
 */
template <class W>
struct Folded {
  std::vector<W> weight;  ///< same size and layout as the weight given
  std::vector<W> bias;    ///< one entry per output channel (present even when the layer had none)
};

/**
 * @brief The affine map an eval-mode BatchNorm with @p state applies per feature.
 * @tparam P parameter type (float or double)
 * @param state the layer's state; weight/bias may be empty (non-affine: 1 and 0),
 *        running_mean/running_var must be present (a layer without running statistics
 *        normalizes with batch statistics even in eval mode, and cannot be folded)
 * @param eps the layer's eps
 * @throws batchnorm::invalid_argument (argument "running_mean", "running_var", "weight",
 *         "bias" or "eps") when running statistics are missing, sizes disagree, or eps is
 *         not finite and > 0
 */
template <class P>
EvalAffine eval_affine(const State<P>& state, double eps) {
  const auto features = static_cast<std::int64_t>(state.running_mean.size());
  detail::require(features > 0, "running_mean",
                  "fold: running_mean: expected the running statistics of a layer with track_running_stats "
                  "(eval mode without them uses batch statistics, which cannot be folded), got none");
  detail::require(static_cast<std::int64_t>(state.running_var.size()) == features, "running_var",
                  "fold: running_var: expected ", features, " elements (as running_mean), got ",
                  state.running_var.size());
  detail::require(state.weight.size() == state.bias.size(), "bias", "fold: weight and bias: expected both or neither (",
                  "equal sizes), got ", state.weight.size(), " and ", state.bias.size(), " elements");
  detail::require(state.weight.empty() || static_cast<std::int64_t>(state.weight.size()) == features, "weight",
                  "fold: weight: expected ", features, " elements (as running_mean) or none, got ",
                  state.weight.size());
  detail::require(std::isfinite(eps) && eps > 0.0, "eps", "fold: eps: expected a finite value > 0, got ", eps);
  EvalAffine a;
  a.scale.resize(static_cast<std::size_t>(features));
  a.shift.resize(static_cast<std::size_t>(features));
  for (std::size_t c = 0; c < a.scale.size(); ++c) {
    const double w = state.weight.empty() ? 1.0 : static_cast<double>(state.weight[c]);
    const double b = state.bias.empty() ? 0.0 : static_cast<double>(state.bias[c]);
    const double invstd = 1.0 / std::sqrt(static_cast<double>(state.running_var[c]) + eps);
    a.scale[c] = w * invstd;
    a.shift[c] = b - static_cast<double>(state.running_mean[c]) * a.scale[c];
  }
  return a;
}

/**
 * @brief The eval-mode affine map of a layer: eval_affine(layer.state(), layer.options().eps).
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param layer a layer with track_running_stats (train or eval mode does not matter). A
 *        per_activation layer folds only as BatchNorm1d (its features are then the previous
 *        layer's outputs, e.g. a linear layer's); BatchNorm2d/3d must be per_channel.
 * @throws batchnorm::invalid_argument as eval_affine(const State<P>&, double), and
 *         (argument "mode") for a per_activation BatchNorm2d/3d
 * @note Synchronizes the device (cuda backend), as BatchNorm::state().
 */
template <class T, int Dims, class Backend>
EvalAffine eval_affine(const BatchNorm<T, Dims, Backend>& layer) {
  detail::require(Dims == 1 || layer.options().mode == Mode::per_channel, "mode",
                  "fold: mode: expected a per_channel ", layer.name(),
                  " (per-activation statistics differ across a channel's locations), got per_activation");
  return eval_affine(layer.state(), layer.options().eps);
}

/**
 * @brief Folds @p bn into a weight and bias in place: the strong guarantee holds (every
 *        check runs before anything is written).
 * @tparam W weight element type (float or double)
 * @param weight the layer's weight, `out_channels * k` elements with the output channel
 *        outermost (WeightLayout::out_first) or innermost (WeightLayout::out_last)
 * @param bias the layer's bias, `out_channels` elements (pass zeros if the layer had none)
 * @param bn the BatchNorm's eval-mode map (eval_affine()); out_channels = its size
 * @param layout where the output channel sits in @p weight
 * @throws batchnorm::invalid_argument (argument "weight" or "bias") when a pointer is
 *         null, weight's size is not a positive multiple of out_channels, or bias's size
 *         is not out_channels
 */
template <class W>
void fold_into(span<W> weight, span<W> bias, const EvalAffine& bn, WeightLayout layout = WeightLayout::out_first) {
  const auto out = static_cast<std::int64_t>(bn.scale.size());
  detail::require(out > 0 && static_cast<std::int64_t>(bn.shift.size()) == out, "bn",
                  "fold: bn: expected scale and shift of equal, positive size, got ", bn.scale.size(), " and ",
                  bn.shift.size());
  detail::require(weight.data != nullptr && weight.size > 0 && weight.size % out == 0, "weight",
                  "fold: weight: expected a positive multiple of out_channels = ", out,
                  " elements (out_channels = the BatchNorm's num_features), got ", weight.data ? weight.size : 0);
  detail::require(bias.data != nullptr && bias.size == out, "bias", "fold: bias: expected out_channels = ", out,
                  " elements, got ", bias.data ? bias.size : 0);
  const std::int64_t per_channel = weight.size / out;
  for (std::int64_t i = 0; i < weight.size; ++i) {
    const std::int64_t c = layout == WeightLayout::out_first ? i / per_channel : i % out;
    weight[i] = static_cast<W>(static_cast<double>(weight[i]) * bn.scale[static_cast<std::size_t>(c)]);
  }
  for (std::int64_t c = 0; c < out; ++c) {
    const auto k = static_cast<std::size_t>(c);
    bias[c] = static_cast<W>(static_cast<double>(bias[c]) * bn.scale[k] + bn.shift[k]);
  }
}

/**
 * @brief Returns the weight and bias of a convolution or linear layer with @p bn folded in.
 * @tparam W weight element type (float or double)
 * @param weight the layer's weight (see fold_into(); e.g. conv OIHW, linear (out, in))
 * @param bias the layer's bias: out_channels elements, or empty when the layer has none
 * @param bn the BatchNorm's eval-mode map (eval_affine())
 * @param layout where the output channel sits in @p weight
 * @throws batchnorm::invalid_argument (argument "weight" or "bias") on a size mismatch
 */
template <class W>
Folded<W> fold(const std::vector<W>& weight, const std::vector<W>& bias, const EvalAffine& bn,
               WeightLayout layout = WeightLayout::out_first) {
  detail::require(bias.empty() || bias.size() == bn.scale.size(), "bias", "fold: bias: expected out_channels = ",
                  bn.scale.size(), " elements or none, got ", bias.size());
  Folded<W> f{weight, bias.empty() ? std::vector<W>(bn.scale.size(), W(0)) : bias};
  fold_into(span<W>(f.weight), span<W>(f.bias), bn, layout);
  return f;
}

/**
 * @brief fold() with the BatchNorm given by its state and eps.
 * @tparam W weight element type
 * @tparam P the BatchNorm's parameter type
 * @param weight the layer's weight
 * @param bias its bias (or empty)
 * @param state the BatchNorm's state (running statistics required)
 * @param eps the BatchNorm's eps
 * @param layout where the output channel sits in @p weight
 * @throws batchnorm::invalid_argument as eval_affine() and fold()
 */
template <class W, class P>
Folded<W> fold(const std::vector<W>& weight, const std::vector<W>& bias, const State<P>& state, double eps,
               WeightLayout layout = WeightLayout::out_first) {
  return fold(weight, bias, eval_affine(state, eps), layout);
}

/**
 * @brief fold() with the BatchNorm given as a layer (its state and eps).
 * @tparam W       weight element type
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param weight the layer's weight
 * @param bias its bias (or empty)
 * @param layer the BatchNorm that follows the layer (track_running_stats required)
 * @param layout where the output channel sits in @p weight
 * @throws batchnorm::invalid_argument as eval_affine() and fold()
 * @note Synchronizes the device (cuda backend).
 */
template <class W, class T, int Dims, class Backend>
Folded<W> fold(const std::vector<W>& weight, const std::vector<W>& bias, const BatchNorm<T, Dims, Backend>& layer,
               WeightLayout layout = WeightLayout::out_first) {
  return fold(weight, bias, eval_affine(layer), layout);
}

}  // namespace batchnorm
