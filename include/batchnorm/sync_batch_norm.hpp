/**
 * @file sync_batch_norm.hpp
 * @brief SyncBatchNorm1d / 2d / 3d: BatchNorm whose batch statistics are those of the global
 *        batch spread over the ranks of a communicator (PyTorch's nn.SyncBatchNorm), exact and
 *        the same bits on every rank. See docs/sync_batch_norm.md.
 */
#pragma once

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "batch_norm.hpp"
#include "comm/communicator.hpp"
#include "comm/error.hpp"
#include "detail/sync/ops.hpp"
#include "phases.hpp"

namespace batchnorm {

namespace detail::sync {

/// Status words: what a rank refused. 0: nothing. The argument codes name the argument that
/// every rank's exception reports (invalid_argument::argument()).
enum class fault : int {
  none = 0,
  shape = 1,
  x = 2,
  y = 3,
  residual = 4,
  dy = 5,
  dx = 6,
  dresidual = 7,
  other_argument = 8,  ///< an invalid_argument for another argument
  state = 9,           ///< a state_error (backward without a forward, wrong activation)
  internal = 10,       ///< any other exception (e.g. std::bad_alloc) on that rank
};

inline const char* argument_of(fault f) {
  switch (f) {
    case fault::shape: return "shape";
    case fault::x: return "x";
    case fault::y: return "y";
    case fault::residual: return "residual";
    case fault::dy: return "dy";
    case fault::dx: return "dx";
    case fault::dresidual: return "dresidual";
    default: return "input";
  }
}

inline fault fault_of_argument(const std::string& argument) {
  for (fault f : {fault::shape, fault::x, fault::y, fault::residual, fault::dy, fault::dx, fault::dresidual})
    if (argument == argument_of(f)) return f;
  return fault::other_argument;
}

/// What this rank refused, kept until every rank knows whether any rank refused.
struct LocalFault {
  fault code = fault::none;
  std::exception_ptr error;
};

/// Runs @p check (validation and the local phase); an exception becomes a status word.
template <class F>
LocalFault attempt(F&& check) {
  try {
    check();
    return {};
  } catch (const invalid_argument& e) {
    return {fault_of_argument(e.argument()), std::current_exception()};
  } catch (const state_error&) {
    return {fault::state, std::current_exception()};
  } catch (const communication_error&) {
    throw;  // not a local input fault: the communicator is broken
  } catch (...) {
    return {fault::internal, std::current_exception()};
  }
}

/**
 * Throws on every rank when any rank's status is not 0. A rank that refused its own call
 * throws its own error, prefixed with its rank (an exception that was not a batchnorm
 * argument or state error, e.g. std::bad_alloc or cuda_error, is rethrown as it was); the
 * other ranks throw the same type, naming the first rank that refused and the argument.
 * @p statuses empty: the backend checks them on the device (cuda, see detail/sync/ops.hpp):
 * then only a rank that refused its own call throws here, after it took part in the
 * collective; the other ranks carry on with NaN records and learn of it from
 * SyncBatchNorm::check_faults().
 */
inline void throw_if_any_fault(const std::vector<double>& statuses, const LocalFault& local, int rank, int ranks,
                               const std::string& where) {
  if (statuses.empty()) {
    if (!local.error) return;
    if (local.code == fault::internal) std::rethrow_exception(local.error);
    std::string text;
    try {
      std::rethrow_exception(local.error);
    } catch (const std::exception& e) {
      text = concat(where, ": rank ", rank, " of ", ranks,
                    " refused its input and changed nothing; it took part in the collective, and the other "
                    "ranks' outputs of this call are NaN (their check_faults() names this rank): ",
                    e.what());
    }
    if (local.code == fault::state) throw state_error(text);
    throw invalid_argument(argument_of(local.code), text);
  }
  int first = -1, faulty = 0;
  for (std::size_t r = 0; r < statuses.size(); ++r)
    if (statuses[r] != 0.0) {
      if (first < 0) first = static_cast<int>(r);
      ++faulty;
    }
  if (first < 0) return;
  const int named = local.error ? rank : first;  // a rank that refused its call names itself
  const auto code =
      local.error ? local.code : static_cast<fault>(static_cast<int>(statuses[static_cast<std::size_t>(first)]));
  const std::string others =
      faulty > 1 ? concat(" (", faulty, " ranks refused theirs, the first is rank ", first, ")") : std::string();
  const std::string head = concat(where, ": rank ", named, " of ", statuses.size(), " refused its input", others,
                                  ", so no rank changed anything");
  std::string text;
  if (local.error) {
    if (code == fault::internal) std::rethrow_exception(local.error);
    try {
      std::rethrow_exception(local.error);
    } catch (const std::exception& e) {
      text = concat(head, ": ", e.what());
    }
  } else {
    text = concat(head, " (", code == fault::state ? std::string("a call out of order") : concat("argument ", argument_of(code)),
                  "); that rank's error says why");
  }
  if (code == fault::state) throw state_error(text);
  if (code == fault::internal) throw std::runtime_error(text);
  throw invalid_argument(argument_of(code), text);
}

}  // namespace detail::sync

/**
 * @brief BatchNorm over a batch spread across the ranks of @p Communicator, as
 *        torch.nn.SyncBatchNorm: in training (and in eval without running statistics) it
 *        normalizes each rank's shard with the mean and variance of the global batch, and
 *        backward returns the gradients of the global loss.
 *
 * Everything else is BatchNorm's (it is one, privately): options, modes, layouts, the fused
 * relu / residual forward, state / load_state, gradients, train / eval, the raw buffers.
 * Eval forward with running statistics is BatchNorm's, without communication.
 *
 * Training forward, on every rank: validate the local input → phases::local_statistics →
 * one all_gather of `[status | count | mean × F | M2 × F]` (2F + 2 doubles per rank) → if a
 * rank refused its input every rank throws, naming the first such rank → merge in rank order
 * (phases::merge_statistics; running statistics updated) → phases::normalize. Backward:
 * validate → phases::local_gradient_sums → one all_gather of `[status | Σdy × F | Σdy·(x − mean) × F]`
 * (2F + 1 doubles) → sum in rank order → phases::input_gradient. All ranks reduce the same
 * gathered bits in the same order, so grad_weight, grad_bias, the running statistics, the
 * saved mean / invstd and num_batches_tracked end bit-identical on every rank; y and dx equal,
 * up to rounding, those of one BatchNorm run on the concatenated batch
 * (docs/sync_batch_norm.md derives the bounds). A rank may hold an empty shard (N = 0).
 *
 * @tparam T, Dims  as BatchNorm
 * @tparam Backend  `batchnorm::cpu` (with MpiCommunicator) or `batchnorm::cuda` (with the
 *                  NCCL communicator and the CUDA phases of <batchnorm/cuda.cuh>)
 * @tparam Communicator  see comm/communicator.hpp (rank, size, all_gather)
 *
 * @note Collective: every rank of the communicator must call forward / forward_relu /
 *       backward / backward_relu of its instance in the same order, with the same
 *       num_features and options (the layers must be built alike). A rank whose input is
 *       invalid still takes part, and every rank throws (cuda: see check_faults); a rank
 *       that does not call at all leaves the others waiting in the collective, as with any
 *       collective.
 * @note Synchronization: cpu is synchronous. cuda is stream-ordered (the communicator's
 *       all_gather is enqueued on the stream, counts and status words stay on the device):
 *       no forward / backward synchronizes the host, except the first call with a shape
 *       larger than any before (it grows the phase scratch with cudaMalloc). A rank's fault
 *       therefore reaches the others as NaN outputs and a device record that check_faults()
 *       turns into the exception (see there). Each rank's calls come from its own host thread
 *       (or process): NCCL's group calls would defer the all_gather behind the later phases.
 * @note Faults on cuda: the refusing rank throws after the collective; the others throw only
 *       from check_faults() (see there).
 * @note Keep the layers identical: load_state, weight_data() writes and optimizer steps must
 *       be applied alike on every rank (they are local calls).
 */
template <class T, int Dims, class Backend, class Communicator>
class SyncBatchNorm : private BatchNorm<T, Dims, Backend> {
  using base = BatchNorm<T, Dims, Backend>;
  using sync = detail::sync_ops<Backend>;
  using ops = detail::backend_ops<Backend>;
  template <class E>
  using buffer = typename ops::template buffer<E>;
  static_assert(is_communicator_v<Communicator, Backend>,
                "batchnorm: SyncBatchNorm's Communicator needs rank(), size() and "
                "all_gather(const double*, double*, std::int64_t, Backend::stream_type) (see comm/communicator.hpp)");

 public:
  using typename base::backend_type;
  using typename base::param_type;
  using typename base::stream_type;
  using typename base::value_type;
  using communicator_type = Communicator;

  /**
   * @brief The layer of this rank, with BatchNorm's initial state; @p communicator is moved in.
   * @throws batchnorm::invalid_argument as BatchNorm's constructor, or for a communicator
   *         whose size() < 1 or rank() outside [0, size())
   * @note Not collective (no communication); cuda: allocates and synchronizes the device.
   */
  SyncBatchNorm(std::int64_t num_features, Communicator communicator, const Options& options = {})
      : base(num_features, options), comm_(std::move(communicator)), ranks_(checked_size(comm_)) {
    const std::int64_t f = this->num_features_;
    stats_block_ = buffer<double>(phases::shard_statistics_size(f) + 1, 0.0);
    stats_gathered_ = buffer<double>(ranks_ * (phases::shard_statistics_size(f) + 1), 0.0);
    stats_records_ = buffer<double>(ranks_ * phases::shard_statistics_size(f), 0.0);
    normalization_ = buffer<double>(phases::normalization_size(f), 0.0);
    grad_block_ = buffer<double>(phases::gradient_sums_size(f) + 1, 0.0);
    grad_gathered_ = buffer<double>(ranks_ * (phases::gradient_sums_size(f) + 1), 0.0);
    grad_sums_ = buffer<double>(phases::gradient_sums_size(f), 0.0);
  }

  SyncBatchNorm(SyncBatchNorm&&) noexcept = default;
  SyncBatchNorm& operator=(SyncBatchNorm&&) noexcept = default;
  SyncBatchNorm(const SyncBatchNorm&) = delete;
  SyncBatchNorm& operator=(const SyncBatchNorm&) = delete;
  ~SyncBatchNorm() = default;

  using base::bias_data;
  using base::eval;
  using base::grad_bias_data;
  using base::grad_weight_data;
  using base::gradients;
  using base::is_training;
  using base::load_state;
  using base::nonfinite_batches_skipped;
  using base::num_batches_tracked;
  using base::num_features;
  using base::options;
  using base::running_mean_data;
  using base::running_var_data;
  using base::save_invstd_data;
  using base::save_mean_data;
  using base::state;
  using base::train;
  using base::weight_data;
  using base::zero_grad;

  /// @brief The communicator (e.g. for the caller's own collectives on it).
  [[nodiscard]] Communicator& communicator() noexcept { return comm_; }
  [[nodiscard]] const Communicator& communicator() const noexcept { return comm_; }

  /**
   * @brief y = BN(x) with the statistics of the global batch (training, or eval without
   *        running statistics); eval with running statistics is BatchNorm::forward. Collective.
   * @param shape this rank's shard; N may differ between ranks and be 0
   * @throws batchnorm::invalid_argument on every rank when a rank's input is invalid (as
   *         BatchNorm::forward would refuse it), naming that rank; or when the global batch
   *         has one value per feature in training. Nothing changes on any rank.
   * @throws batchnorm::communication_error when the collective fails
   */
  void forward(const T* x, T* y, const Shape& shape, stream_type stream = stream_type{}) {
    forward_impl(x, nullptr, y, shape, Activation::identity, stream);
  }

  /// @brief Fused y = relu(BN(x) + z), z optional (as BatchNorm::forward_relu). Collective.
  /// @throws as forward()
  void forward_relu(const T* x, const T* z, T* y, const Shape& shape, stream_type stream = stream_type{}) {
    forward_impl(x, z, y, shape, Activation::relu, stream);
  }

  /**
   * @brief Gradients of the global loss for this rank's shard: dx (if not null), and
   *        grad_weight / grad_bias over the global batch (the same bits on every rank).
   *        Collective after a synchronized forward; after an eval forward with running
   *        statistics it is BatchNorm::backward (local: grad_weight / grad_bias of this shard).
   * @throws batchnorm::state_error / batchnorm::invalid_argument on every rank when a rank's
   *         call is invalid (as BatchNorm::backward would refuse it), naming that rank
   * @throws batchnorm::communication_error when the collective fails
   */
  void backward(const T* x, const T* dy, T* dx, const Shape& shape, stream_type stream = stream_type{}) {
    backward_impl(x, nullptr, dy, dx, nullptr, shape, Activation::identity, stream);
  }

  /// @brief Backward of forward_relu (as BatchNorm::backward_relu). Collective.
  /// @throws as backward()
  void backward_relu(const T* x, const T* y, const T* dy, T* dx, T* dz, const Shape& shape,
                     stream_type stream = stream_type{}) {
    backward_impl(x, y, dy, dx, dz, shape, Activation::relu, stream);
  }

  /**
   * @brief Throws the first fault that this rank learnt of on the device since the last
   *        check_faults(): another rank refused its input in a collective call (its status word
   *        arrived with the records), or the merge refused the global batch (one value per
   *        feature in training, a count above 2^53). cpu: never throws (there every rank throws
   *        in the call itself).
   *
   * On cuda the status words stay on the device, so a forward / backward that a fault spoiled
   * does not throw on the ranks that accepted their input: their y (forward) or dx,
   * grad_weight and grad_bias (backward) of that call are NaN, save_mean / save_invstd are NaN,
   * the running statistics and nonfinite_batches_skipped are unchanged, num_batches_tracked
   * counted the call. The rank that refused its input throws in the call, after taking part in
   * the collective, and changes nothing. Call this where the host synchronizes anyway (e.g.
   * when reading the loss) to turn the fault into an exception.
   * @throws batchnorm::invalid_argument naming the rank and the argument it refused (argument
   *         "shape" for the global batch), batchnorm::state_error for a call out of order on
   *         that rank, std::runtime_error for another failure on that rank; the record is
   *         cleared
   * @note cuda: synchronizes @p stream (reads two ints). Not collective.
   */
  void check_faults(stream_type stream = stream_type{}) {
    const detail::sync_fault found = sync::take_fault(phase_workspace_, stream);
    if (found.code == 0) return;
    if (found.rank < 0)
      throw invalid_argument("shape", detail::concat(name(), ": over all ", ranks_,
                                                     " ranks (the global batch): the merge refused the shard counts (a "
                                                     "global batch of one value per feature in training, or a total "
                                                     "above 2^53); the outputs of that call are NaN"));
    const auto code = static_cast<detail::sync::fault>(found.code);
    const std::string text = detail::concat(
        name(), ": rank ", found.rank, " of ", ranks_, " refused its input in a collective call (",
        code == detail::sync::fault::state ? std::string("a call out of order")
                                           : detail::concat("argument ", detail::sync::argument_of(code)),
        "); this rank's outputs of that call are NaN; that rank's error says why");
    if (code == detail::sync::fault::state) throw state_error(text);
    if (code == detail::sync::fault::internal || code == detail::sync::fault::none || found.code < 0 ||
        found.code > static_cast<int>(detail::sync::fault::internal))
      throw std::runtime_error(text);
    throw invalid_argument(detail::sync::argument_of(code), text);
  }

  /// @brief "SyncBatchNorm1d", "SyncBatchNorm2d" or "SyncBatchNorm3d".
  static std::string name() { return "SyncBatchNorm" + std::to_string(Dims) + "d"; }

  /// @brief Doubles each rank sends per forward / backward collective (8 bytes each).
  [[nodiscard]] std::int64_t forward_message_size() const noexcept {
    return phases::shard_statistics_size(this->num_features_) + 1;
  }
  [[nodiscard]] std::int64_t backward_message_size() const noexcept {
    return phases::gradient_sums_size(this->num_features_) + 1;
  }

 private:
  static int checked_size(const Communicator& c) {
    const int size = c.size(), rank = c.rank();
    detail::require(size >= 1 && rank >= 0 && rank < size, "communicator", name(),
                    ": communicator: expected size() >= 1 and 0 <= rank() < size(), got rank ", rank, " of ", size);
    return size;
  }

  template <class E>
  static span<E> whole(buffer<E>& b) {
    return span<E>(b.data(), b.size());
  }
  template <class E>
  static span<const E> whole_const(const buffer<E>& b) {
    return span<const E>(b.data(), b.size());
  }

  void forward_impl(const T* x, const T* z, T* y, const Shape& shape, Activation activation, stream_type stream) {
    const typename base::Step step = this->next_step();
    if (!step.batch_statistics) {  // eval with running statistics: local, as BatchNorm
      base::forward_impl(x, z, y, shape, activation, stream);
      return;
    }
    const std::string where = name() + (activation == Activation::relu ? "::forward_relu" : "::forward");
    const Mode mode = this->options_.mode;
    const std::int64_t f = this->num_features_;
    span<double> block = whole(stats_block_);

    // The arguments of the last phase are known now: checked before the collective, with the
    // phase's own checks, so that a rank refuses before any rank changes anything.
    phases::NormalizeArgs<T> normalize;
    normalize.x = x;
    normalize.y = y;
    normalize.residual = z;
    normalize.weight = base::feature_span(std::as_const(this->weight_), this->options_.affine);
    normalize.bias = base::feature_span(std::as_const(this->bias_), this->options_.affine);
    normalize.normalization = whole_const(normalization_);
    phases::ElementwiseConfig elementwise;
    elementwise.mode = mode;
    elementwise.activation = activation;

    // 1. Everything this rank could refuse, before any rank changes anything.
    const detail::sync::LocalFault local = detail::sync::attempt([&] {
      this->check_live(activation == Activation::relu ? "forward_relu" : "forward");
      this->check_shape(shape);
      detail::phase_checks::check_normalize(shape, normalize, elementwise, phases::normalization_size(f));
      sync::local_statistics(phase_workspace_, shape, mode, x, span<double>(block.data + 1, block.size - 1), stream);
    });
    sync::set_status(block, static_cast<double>(local.code), local.code == detail::sync::fault::none, stream);

    // 2. The one collective of the forward.
    comm_.all_gather(block.data, stats_gathered_.data(), block.size, stream);
    const span<const double> gathered = whole_const(stats_gathered_);
    detail::sync::throw_if_any_fault(sync::statuses(gathered, ranks_, stream), local, comm_.rank(), ranks_, where);

    // 3. Merge in rank order (running statistics, save_mean / save_invstd), then normalize.
    phases::MergeArgs<param_type> merge;
    merge.normalization = whole(normalization_);
    merge.running_mean = base::feature_span(this->running_mean_, this->options_.track_running_stats);
    merge.running_var = base::feature_span(this->running_var_, this->options_.track_running_stats);
    merge.save_mean = whole(this->save_mean_);
    merge.save_invstd = whole(this->save_invstd_);
    merge.skipped_updates = this->skipped_updates_.data();
    phases::MergeConfig config;
    config.eps = this->options_.eps;
    config.exponential_average_factor = step.factor;
    config.skip_nonfinite_updates = this->options_.skip_nonfinite_updates;
    try {
      sync::merge(phase_workspace_, f, gathered, ranks_, whole(stats_records_), merge, config, stream);
    } catch (const invalid_argument& e) {
      // The same gathered bits on every rank: every rank refuses the same global batch.
      throw invalid_argument("shape", detail::concat(where, ": over all ", ranks_, " ranks (the global batch): ", e.what()));
    }

    sync::normalize(phase_workspace_, shape, normalize, elementwise, stream);

    this->num_batches_tracked_ = step.batches;
    this->saved_ = typename base::Saved{shape, true, activation};
  }

  void backward_impl(const T* x, const T* y, const T* dy, T* dx, T* dz, const Shape& shape, Activation activation,
                     stream_type stream) {
    if (this->saved_ && !this->saved_->batch_statistics) {  // after an eval forward: local
      base::backward_impl(x, y, dy, dx, dz, shape, activation, stream);
      return;
    }
    const std::string where = name() + (activation == Activation::relu ? "::backward_relu" : "::backward");
    const std::int64_t f = this->num_features_;
    span<double> block = whole(grad_block_);
    phases::ElementwiseConfig elementwise;
    elementwise.mode = this->options_.mode;
    elementwise.activation = activation;
    elementwise.accumulate = this->options_.accumulate_gradients;

    phases::InputGradientArgs<T> grad;
    grad.x = x;
    grad.dy = dy;
    grad.y = y;
    grad.dx = dx;
    grad.dresidual = dz;
    grad.weight = base::feature_span(std::as_const(this->weight_), this->options_.affine);
    grad.normalization = whole_const(normalization_);
    grad.gradient_sums = whole_const(grad_sums_);
    grad.grad_weight = base::feature_span(this->grad_weight_, this->options_.affine);
    grad.grad_bias = base::feature_span(this->grad_bias_, this->options_.affine);

    const detail::sync::LocalFault local = detail::sync::attempt([&] {
      this->check_live(activation == Activation::relu ? "backward_relu" : "backward");
      this->check_backward_call(shape, activation);
      detail::phase_checks::check_input_gradient(shape, grad, elementwise, phases::normalization_size(f),
                                                 phases::gradient_sums_size(f));
      phases::GradientSumsArgs<T> sums;
      sums.x = x;
      sums.dy = dy;
      sums.y = y;
      sums.normalization = whole_const(normalization_);
      sums.gradient_sums = span<double>(block.data + 1, block.size - 1);
      sync::local_gradient_sums(phase_workspace_, shape, sums, elementwise, stream);
    });
    sync::set_status(block, static_cast<double>(local.code), local.code == detail::sync::fault::none, stream);

    comm_.all_gather(block.data, grad_gathered_.data(), block.size, stream);
    const span<const double> gathered = whole_const(grad_gathered_);
    detail::sync::throw_if_any_fault(sync::statuses(gathered, ranks_, stream), local, comm_.rank(), ranks_, where);
    sync::sum_gradient_records(phase_workspace_, f, gathered, ranks_, whole(grad_sums_), stream);

    sync::input_gradient(phase_workspace_, shape, grad, elementwise, stream);
  }

  Communicator comm_;
  int ranks_;
  typename sync::workspace phase_workspace_ = sync::make_workspace();  // the backend's phase scratch
  // Messages and records in the backend's memory, sized once: this rank's block, every rank's
  // blocks, the compacted shard records, the merged normalization record (kept for backward,
  // so that the mean stays in double), and the summed gradient records.
  buffer<double> stats_block_, stats_gathered_, stats_records_, normalization_;
  buffer<double> grad_block_, grad_gathered_, grad_sums_;
};

/// @brief SyncBatchNorm over (N, C) or (N, C, L) shards.
template <class T, class Backend, class Communicator>
using SyncBatchNorm1d = SyncBatchNorm<T, 1, Backend, Communicator>;
/// @brief SyncBatchNorm over (N, C, H, W) shards.
template <class T, class Backend, class Communicator>
using SyncBatchNorm2d = SyncBatchNorm<T, 2, Backend, Communicator>;
/// @brief SyncBatchNorm over (N, C, D, H, W) shards.
template <class T, class Backend, class Communicator>
using SyncBatchNorm3d = SyncBatchNorm<T, 3, Backend, Communicator>;

}  // namespace batchnorm
