/**
 * @file batch_norm.hpp
 * @brief The layer classes BatchNorm1d / BatchNorm2d / BatchNorm3d: they own the
 *        parameters, running statistics and saved statistics, keep the mode and counters,
 *        and call the functional layer. They do no arithmetic of their own.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "detail/backend.hpp"
#include "detail/validate.hpp"
#include "errors.hpp"
#include "functional.hpp"
#include "options.hpp"
#include "shape.hpp"
#include "state.hpp"
#include "types.hpp"

namespace batchnorm {

namespace detail {
/// True in a live object, false in one moved from (set by its move, restored by a move into it).
struct live_flag {
  bool live = true;
  live_flag() = default;
  live_flag(live_flag&& o) noexcept : live(std::exchange(o.live, false)) {}
  live_flag& operator=(live_flag&& o) noexcept {
    const bool incoming = std::exchange(o.live, false);
    live = incoming;
    return *this;
  }
  live_flag(const live_flag&) = delete;
  live_flag& operator=(const live_flag&) = delete;
};
}  // namespace detail

/**
 * @brief Batch Normalization over a (N, C, spatial...) input, with PyTorch's semantics.
 *
 * @tparam T       storage type of activations: float or double (half types with
 *                 <batchnorm/half.hpp>). Parameters and statistics use `param_t<T>`.
 * @tparam Dims    1, 2 or 3: accepts rank 2 or 3, rank 4, or rank 5 inputs.
 * @tparam Backend `batchnorm::cuda` (the default: device memory, needs nvcc and
 *                 <batchnorm/cuda.cuh>) or `batchnorm::cpu` (host memory, plain C++17).
 *                 The default does not follow the compiler on purpose: a header that
 *                 declares a `BatchNorm2d<float>` member must name the same type in the .cu
 *                 and the .cpp files that include it (a compiler-dependent default would be a
 *                 silent one-definition-rule violation). Plain C++ writes `batchnorm::cpu`;
 *                 `BatchNorm2d<float>` there stops with one static_assert that says so.
 *
 * Training forward: normalize with the batch's mean and biased variance per feature, then
 * (when tracking) `running = (1 - m) * running + m * batch` with the unbiased variance and
 * `num_batches_tracked += 1`; `m` is `momentum`, or `1 / num_batches_tracked` when momentum
 * is `std::nullopt`. Eval forward: normalize with the running statistics (with batch
 * statistics when `track_running_stats` is off).
 *
 * A zero-size batch (N = 0) gives an empty output and leaves running statistics untouched;
 * `num_batches_tracked` is still incremented in training, as PyTorch does.
 *
 * @note Synchronization (cuda backend): `forward`, `backward` and `zero_grad` are
 *       stream-ordered and never synchronize the device; `state`, `load_state`,
 *       `gradients`, `nonfinite_batches_skipped` and the constructor synchronize the device.
 * @note Thread safety: distinct instances may be used concurrently from different threads
 *       (and streams); one instance must not be used from two threads at once.
 * @note Streams (cuda backend): an instance is one mutable object on the device (its
 *       workspace, running statistics, saved mean/invstd, gradients), and every call writes
 *       some of it. Calls on one instance must therefore be ordered: on one stream, or on
 *       several streams that the caller orders (e.g. cudaEventRecord on the first,
 *       cudaStreamWaitEvent on the second), exactly as for any buffer used on two streams.
 *       Unordered calls on one instance from two streams race (on the workspace, on the
 *       running statistics) and give wrong results. Distinct instances may run on different
 *       streams at once and may share input tensors. Reading results (`y`, `dx`, the raw
 *       buffers) from another stream also needs that stream to wait for the call's stream.
 * @note Moved-from layers: a layer whose contents were moved into another owns no buffers.
 *       Every call that needs them (forward, backward, zero_grad, state, load_state,
 *       gradients, nonfinite_batches_skipped) throws batchnorm::state_error, the raw buffer
 *       accessors return nullptr, and the configuration queries (num_features, options,
 *       train/eval, num_batches_tracked, name) keep answering. Moving a layer into it makes
 *       it usable again.
 */
template <class T, int Dims, class Backend = cuda>
class BatchNorm {
  static_assert(Dims >= 1 && Dims <= 3, "batchnorm: Dims must be 1, 2 or 3");
  using ops = detail::backend_ops<Backend>;
  template <class E>
  using buffer = typename ops::template buffer<E>;

 public:
  using value_type = T;
  using param_type = param_t<T>;
  using backend_type = Backend;
  using stream_type = typename Backend::stream_type;

  /**
   * @brief Creates the layer with weight 1, bias 0, running_mean 0, running_var 1 and
   *        num_batches_tracked 0 (buffers only where the options ask for them).
   * @param num_features C (per_channel) or C * spatial (per_activation)
   * @param options see Options
   * @throws batchnorm::invalid_argument for num_features < 1 or larger than an array of
   *         param_type can be (PTRDIFF_MAX / sizeof(param_type)), eps not > 0, momentum
   *         outside [0, 1], or a mode that is not a Mode enumerator
   * @throws std::bad_alloc when the host cannot hold the buffers (cpu backend);
   *         batchnorm::cuda_error when the device cannot (cuda backend)
   */
  explicit BatchNorm(std::int64_t num_features, const Options& options = {})
      : num_features_(checked_features(num_features)),
        options_(checked_options(options)),
        workspace_(ops::template make_workspace<T>(num_features_)) {
    if (options_.affine) {
      weight_ = buffer<param_type>(num_features_, param_type(1));
      bias_ = buffer<param_type>(num_features_, param_type(0));
      grad_weight_ = buffer<param_type>(num_features_, param_type(0));
      grad_bias_ = buffer<param_type>(num_features_, param_type(0));
    }
    if (options_.track_running_stats) {
      running_mean_ = buffer<param_type>(num_features_, param_type(0));
      running_var_ = buffer<param_type>(num_features_, param_type(1));
    }
    save_mean_ = buffer<param_type>(num_features_, param_type(0));
    save_invstd_ = buffer<param_type>(num_features_, param_type(0));
    skipped_updates_ = buffer<std::int64_t>(1, 0);
  }

  BatchNorm(BatchNorm&&) noexcept = default;
  BatchNorm& operator=(BatchNorm&&) noexcept = default;
  BatchNorm(const BatchNorm&) = delete;
  BatchNorm& operator=(const BatchNorm&) = delete;
  ~BatchNorm() = default;

  /// @brief Training mode (batch statistics, running-stat updates) when @p mode is true.
  void train(bool mode = true) noexcept { training_ = mode; }
  /// @brief Evaluation mode: running statistics (batch statistics when not tracking).
  void eval() noexcept { training_ = false; }
  [[nodiscard]] bool is_training() const noexcept { return training_; }
  [[nodiscard]] std::int64_t num_features() const noexcept { return num_features_; }
  [[nodiscard]] const Options& options() const noexcept { return options_; }
  /// @brief Number of training batches so far (counted on the host; no synchronization;
  ///        saturates at 2^63 - 1).
  [[nodiscard]] std::int64_t num_batches_tracked() const noexcept { return num_batches_tracked_; }

  /**
   * @brief y = BN(x). @p x and @p y are in the backend's memory; y may equal x.
   * @param shape (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for BatchNorm2d,
   *              (N, C, D, H, W) for BatchNorm3d, in either Layout
   * @param stream CUDA stream (cuda backend); ignored on cpu
   * @throws batchnorm::invalid_argument on a wrong rank, a channel count other than
   *         num_features, a single value per feature in training, null or partially
   *         overlapping pointers (the overlap table is in docs/errors.md), an enum value
   *         that names no enumerator. Nothing is changed when it throws.
   * @throws batchnorm::state_error on a moved-from layer
   * @throws batchnorm::cuda_error when a CUDA call or launch fails. Arguments are checked
   *         before any launch, so this means a broken device or context: the layer's device
   *         buffers are then in an unknown state.
   * @note Stream-ordered on cuda: returns without waiting for the kernels.
   */
  void forward(const T* x, T* y, const Shape& shape, stream_type stream = stream_type{}) {
    forward_impl(x, nullptr, y, shape, Activation::identity, stream);
  }

  /**
   * @brief Fused y = relu(BN(x) + z) (with @p z null: y = relu(BN(x))), one pass over memory.
   *        @p z has x's shape and layout and may equal y.
   * @throws as forward()
   */
  void forward_relu(const T* x, const T* z, T* y, const Shape& shape, stream_type stream = stream_type{}) {
    forward_impl(x, z, y, shape, Activation::relu, stream);
  }

  /**
   * @brief Gradients of the last forward: dx (when @p dx is not null) and, when affine,
   *        grad_weight = Σ dy·(x − mean)·invstd and grad_bias = Σ dy, written (or added,
   *        with Options::accumulate_gradients) into the layer's gradient buffers.
   *
   * Uses the mean and inverse std the last forward saved: batch statistics after a training
   * forward (or an eval forward without running stats), running statistics after an eval
   * forward. @p x must be that forward's input and @p shape its shape.
   * @throws batchnorm::state_error when there was no forward since construction or load_state,
   *         or on a moved-from layer
   * @throws batchnorm::invalid_argument when @p shape differs from the forward's (a shape
   *         with the same extents whose layout does not change the memory order, e.g. rank 2,
   *         is the same), or for a null or overlapping pointer (dx may equal dy or x)
   * @note Stream-ordered on cuda.
   */
  void backward(const T* x, const T* dy, T* dx, const Shape& shape, stream_type stream = stream_type{}) {
    backward_impl(x, nullptr, dy, dx, nullptr, shape, Activation::identity, stream);
  }

  /**
   * @brief Backward of forward_relu(): the relu mask is recomputed from @p y (the forward's
   *        output). Writes dx (if not null) and, if @p dz is not null, the gradient of z
   *        (dy masked by y > 0).
   * @throws as backward(), and batchnorm::state_error when the last forward was not fused
   */
  void backward_relu(const T* x, const T* y, const T* dy, T* dx, T* dz, const Shape& shape,
                     stream_type stream = stream_type{}) {
    backward_impl(x, y, dy, dx, dz, shape, Activation::relu, stream);
  }

  /// @brief Sets grad_weight and grad_bias to zero. @note Stream-ordered on cuda.
  /// @throws batchnorm::state_error on a moved-from layer
  void zero_grad(stream_type stream = stream_type{}) {
    check_live("zero_grad");
    if (options_.affine) {
      grad_weight_.fill_zero(stream);
      grad_bias_.fill_zero(stream);
    }
  }

  /**
   * @brief Host copies of weight, bias, running_mean, running_var, num_batches_tracked.
   * @throws batchnorm::state_error on a moved-from layer
   * @note Synchronizes the device (cuda backend).
   */
  [[nodiscard]] State<param_type> state() const {
    check_live("state");
    State<param_type> s;
    if (options_.affine) {
      s.weight = weight_.to_host();
      s.bias = bias_.to_host();
    }
    if (options_.track_running_stats) {
      s.running_mean = running_mean_.to_host();
      s.running_var = running_var_.to_host();
    }
    s.num_batches_tracked = num_batches_tracked_;
    return s;
  }

  /**
   * @brief Replaces the state. Vectors must have num_features entries where the layer has
   *        that tensor and be empty where it has not; num_batches_tracked must be >= 0.
   * @throws batchnorm::invalid_argument naming the first mismatching member; nothing changes.
   * @throws batchnorm::state_error on a moved-from layer
   * @note Synchronizes the device (cuda backend). Forgets the statistics saved for backward.
   */
  void load_state(const State<param_type>& s) {
    check_live("load_state");
    check_member(s.weight, "weight", options_.affine);
    check_member(s.bias, "bias", options_.affine);
    check_member(s.running_mean, "running_mean", options_.track_running_stats);
    check_member(s.running_var, "running_var", options_.track_running_stats);
    detail::require(s.num_batches_tracked >= 0, "num_batches_tracked",
                    "load_state: num_batches_tracked: expected a value >= 0, got ", s.num_batches_tracked);
    if (options_.affine) {
      weight_.from_host(s.weight);
      bias_.from_host(s.bias);
    }
    if (options_.track_running_stats) {
      running_mean_.from_host(s.running_mean);
      running_var_.from_host(s.running_var);
    }
    num_batches_tracked_ = s.num_batches_tracked;
    saved_.reset();
  }

  /**
   * @brief Host copies of grad_weight / grad_bias (empty when not affine).
   * @throws batchnorm::state_error on a moved-from layer
   * @note Synchronizes the device (cuda backend).
   */
  [[nodiscard]] Gradients<param_type> gradients() const {
    check_live("gradients");
    Gradients<param_type> g;
    if (options_.affine) {
      g.grad_weight = grad_weight_.to_host();
      g.grad_bias = grad_bias_.to_host();
    }
    return g;
  }

  /**
   * @brief Training batches whose running-stat update was skipped because their statistics
   *        were not finite (only with Options::skip_nonfinite_updates); saturates at 2^63 - 1.
   * @throws batchnorm::state_error on a moved-from layer
   * @note Synchronizes the device (cuda backend).
   */
  [[nodiscard]] std::int64_t nonfinite_batches_skipped() const {
    check_live("nonfinite_batches_skipped");
    return skipped_updates_.to_host()[0];
  }

  /// @name Raw buffers in the backend's memory (nullptr where the layer has none), for
  ///       optimizers and interop (nullptr in a moved-from layer too). Writes through them are
  ///       the caller's to order.
  /// @{
  param_type* weight_data() noexcept { return has(options_.affine) ? weight_.data() : nullptr; }
  param_type* bias_data() noexcept { return has(options_.affine) ? bias_.data() : nullptr; }
  param_type* running_mean_data() noexcept { return has(options_.track_running_stats) ? running_mean_.data() : nullptr; }
  param_type* running_var_data() noexcept { return has(options_.track_running_stats) ? running_var_.data() : nullptr; }
  const param_type* grad_weight_data() const noexcept { return has(options_.affine) ? grad_weight_.data() : nullptr; }
  const param_type* grad_bias_data() const noexcept { return has(options_.affine) ? grad_bias_.data() : nullptr; }
  /// Mean and inverse std the last forward used (PyTorch's save_mean / save_invstd).
  const param_type* save_mean_data() const noexcept { return has(true) ? save_mean_.data() : nullptr; }
  const param_type* save_invstd_data() const noexcept { return has(true) ? save_invstd_.data() : nullptr; }
  /// @}

  /// @brief "BatchNorm1d", "BatchNorm2d" or "BatchNorm3d", as used in error messages.
  static std::string name() { return "BatchNorm" + std::to_string(Dims) + "d"; }

 protected:
  // Protected, not private: SyncBatchNorm (sync_batch_norm.hpp) is a BatchNorm whose batch
  // statistics span several processes; it reuses this state and these checks.
  struct Saved {
    Shape shape;
    bool batch_statistics;
    Activation activation;
  };

  /// Largest num_features whose buffers have a representable size in bytes (the bound of
  /// std::vector<param_type>::max_size()): beyond it allocation would fail with length_error.
  static constexpr std::int64_t max_features =
      static_cast<std::int64_t>(std::numeric_limits<std::ptrdiff_t>::max() / sizeof(param_type));

  static std::int64_t checked_features(std::int64_t n) {
    detail::require(n >= 1, "num_features", name(), ": num_features: expected a value >= 1, got ", n);
    detail::require(n <= max_features, "num_features", name(), ": num_features: expected a value <= ", max_features,
                    " (the most elements of ", sizeof(param_type), " bytes an array can hold), got ", n);
    return n;
  }

  /// A layer moved from has no buffers: calls that need them say so instead of reading null.
  void check_live(const char* function) const {
    if (!live_.live)
      throw state_error(name() + "::" + function + ": this layer was moved from (it owns no buffers); "
                                                   "move or assign a layer into it before using it");
  }
  [[nodiscard]] bool has(bool member_exists) const noexcept { return live_.live && member_exists; }

  static Options checked_options(const Options& o) {
    detail::check_mode(o.mode, "options.mode");
    detail::check_eps(o.eps);
    if (o.momentum) detail::check_momentum(*o.momentum);
    return o;
  }

  template <class E>
  void check_member(const std::vector<E>& v, const char* member, bool present) const {
    const std::int64_t expected = present ? num_features_ : 0;
    detail::require(static_cast<std::int64_t>(v.size()) == expected, member, "load_state: ", member,
                    ": expected ", expected, " elements", present ? "" : " (the layer has no such tensor)",
                    ", got ", v.size());
  }

  /// Rank and feature-count checks that depend on the class (the functional layer checks the rest).
  void check_shape(const Shape& shape) const {
    const int r = shape.rank();
    const bool rank_ok = Dims == 1 ? (r == 2 || r == 3) : r == Dims + 2;
    detail::require(rank_ok, "shape", name(), ": expected ",
                    Dims == 1 ? "a rank 2 (N, C) or rank 3 (N, C, L)"
                              : (Dims == 2 ? "a rank 4 (N, C, H, W)" : "a rank 5 (N, C, D, H, W)"),
                    " input, got rank ", r, " ", shape);
    const std::int64_t features = feature_count(shape, options_.mode);
    if (options_.mode == Mode::per_channel) {
      detail::require(features == num_features_, "shape", name(), ": expected C = ", num_features_,
                      " channels (num_features), got ", features, " in input of shape ", shape,
                      detail::channels_last_hint{shape, num_features_});
    } else {
      detail::require(features == num_features_, "shape", name(), ": expected C * spatial = ", num_features_,
                      " features (num_features, per_activation), got ", shape.channels(), " * ", shape.spatial(),
                      " = ", features, " in input of shape ", shape);
    }
  }

  template <class E>
  static span<E> feature_span(buffer<E>& b, bool present) {
    return present ? span<E>(b.data(), b.size()) : span<E>();
  }
  template <class E>
  static span<const E> feature_span(const buffer<E>& b, bool present) {
    return present ? span<const E>(b.data(), b.size()) : span<const E>();
  }

  /// What the next forward does: batch or running statistics, the running-stat factor, the
  /// num_batches_tracked it leaves (committed only when the forward succeeds).
  struct Step {
    bool batch_statistics;
    std::int64_t batches;
    double factor;
  };
  [[nodiscard]] Step next_step() const noexcept {
    const bool tracking = options_.track_running_stats;
    const bool updates = training_ && tracking;
    // Saturates instead of wrapping at 2^63 - 1 (PyTorch's int64 tensor would wrap negative).
    const bool saturated = num_batches_tracked_ == std::numeric_limits<std::int64_t>::max();
    const std::int64_t batches = updates && !saturated ? num_batches_tracked_ + 1 : num_batches_tracked_;
    const double factor = !updates ? 0.0 : (options_.momentum ? *options_.momentum : 1.0 / static_cast<double>(batches));
    return {training_ || !tracking, batches, factor};
  }

  void forward_impl(const T* x, const T* z, T* y, const Shape& shape, Activation activation, stream_type stream) {
    check_live(activation == Activation::relu ? "forward_relu" : "forward");
    check_shape(shape);
    const Step step = next_step();
    const bool tracking = options_.track_running_stats;
    const bool batch_statistics = step.batch_statistics;
    const std::int64_t batches = step.batches;
    const double factor = step.factor;

    ForwardArgs<T> args;
    args.x = x;
    args.y = y;
    args.residual = z;
    args.weight = feature_span(std::as_const(weight_), options_.affine);
    args.bias = feature_span(std::as_const(bias_), options_.affine);
    // Tracking: updated in training (batch_statistics), only read in eval.
    args.running_mean = feature_span(running_mean_, tracking);
    args.running_var = feature_span(running_var_, tracking);
    args.save_mean = feature_span(save_mean_, true);
    args.save_invstd = feature_span(save_invstd_, true);
    args.skipped_updates = skipped_updates_.data();

    ForwardConfig config;
    config.mode = options_.mode;
    config.batch_statistics = batch_statistics;
    config.eps = options_.eps;
    config.exponential_average_factor = factor;
    config.skip_nonfinite_updates = options_.skip_nonfinite_updates;
    config.activation = activation;

    ops::forward(shape, args, config, workspace_, stream);  // validates before it writes
    num_batches_tracked_ = batches;
    saved_ = Saved{shape, batch_statistics, activation};
  }

  /// State checks of backward / backward_relu: a forward to differentiate, its shape, its activation.
  void check_backward_call(const Shape& shape, Activation activation) const {
    if (!saved_)
      throw state_error(name() + "::backward: no forward to differentiate (none since construction or "
                                 "load_state); call forward first");
    // Any spelling of the same memory is the same tensor (e.g. a rank-2 shape in either layout).
    detail::require(detail::same_memory_order(shape, saved_->shape), "shape", name(),
                    "::backward: expected the shape of the last forward ", saved_->shape, ", got ", shape);
    if (saved_->activation != activation)
      throw state_error(name() + (activation == Activation::relu
                                      ? "::backward_relu: the last forward was not fused with relu; call backward"
                                      : "::backward: the last forward was fused with relu; call backward_relu"));
  }

  void backward_impl(const T* x, const T* y, const T* dy, T* dx, T* dz, const Shape& shape,
                     Activation activation, stream_type stream) {
    check_live(activation == Activation::relu ? "backward_relu" : "backward");
    check_backward_call(shape, activation);
    BackwardArgs<T> args;
    args.x = x;
    args.y = y;
    args.dy = dy;
    args.dx = dx;
    args.dresidual = dz;
    args.weight = feature_span(std::as_const(weight_), options_.affine);
    args.mean = feature_span(std::as_const(save_mean_), true);
    args.invstd = feature_span(std::as_const(save_invstd_), true);
    args.grad_weight = feature_span(grad_weight_, options_.affine);
    args.grad_bias = feature_span(grad_bias_, options_.affine);

    BackwardConfig config;
    config.mode = options_.mode;
    config.batch_statistics = saved_->batch_statistics;
    config.accumulate = options_.accumulate_gradients;
    config.activation = activation;
    ops::backward(shape, args, config, workspace_, stream);
  }

  detail::live_flag live_;  // first: set before, and moved before, the buffers
  std::int64_t num_features_;
  Options options_;
  typename ops::workspace workspace_;
  bool training_ = true;
  std::int64_t num_batches_tracked_ = 0;
  buffer<param_type> weight_, bias_, running_mean_, running_var_;
  buffer<param_type> grad_weight_, grad_bias_;
  buffer<param_type> save_mean_, save_invstd_;
  buffer<std::int64_t> skipped_updates_;
  std::optional<Saved> saved_;
};

/// @brief BatchNorm over (N, C) or (N, C, L) inputs, as torch.nn.BatchNorm1d.
template <class T, class Backend = cuda>
using BatchNorm1d = BatchNorm<T, 1, Backend>;
/// @brief BatchNorm over (N, C, H, W) inputs, as torch.nn.BatchNorm2d.
template <class T, class Backend = cuda>
using BatchNorm2d = BatchNorm<T, 2, Backend>;
/// @brief BatchNorm over (N, C, D, H, W) inputs, as torch.nn.BatchNorm3d.
template <class T, class Backend = cuda>
using BatchNorm3d = BatchNorm<T, 3, Backend>;

}  // namespace batchnorm
