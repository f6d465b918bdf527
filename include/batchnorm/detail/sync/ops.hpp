/**
 * @file detail/sync/ops.hpp
 * @brief The seam between SyncBatchNorm and a backend's phases: `sync_ops<Backend>`,
 *        specialized here for `cpu`; the `cuda` specialization (detail/sync/cuda_ops.cuh) is
 *        included by <batchnorm/cuda.cuh> and has the same members.
 *
 * Every span below is in the backend's memory (host for cpu, device for cuda) and every
 * function is stream-ordered on @p stream (synchronous on cpu). The layer owns all buffers
 * (allocated once, at construction, through backend_ops<Backend>::buffer), so no call allocates
 * backend memory. A gathered buffer holds `ranks` blocks of `stride` doubles, rank order; each
 * block starts with the status word of its rank (0 = accepted), then the rank's record.
 *
 *  - workspace, make_workspace(): scratch state the layer owns and passes (by reference) to
 *    every phase call below; empty for cpu. The CUDA phases take a workspace whose size
 *    depends on the shape (phases_workspace_size), so the cuda specialization can keep a
 *    device allocation here that it grows when a call needs more;
 *  - set_status(block, status, payload_written, stream): block[0] = status; when
 *    !payload_written the rest of the block is zeroed (a rank that refused its input still
 *    sends a well-formed block);
 *  - local_statistics(workspace, shape, mode, x, statistics, stream): phases::local_statistics;
 *  - statuses(gathered, ranks, stream) -> std::vector<double>: the ranks' status words on the
 *    host. cpu reads them; a backend that cannot read them without synchronizing the host may
 *    return an empty vector, and then its merge / sum_gradient_records must see the faults on
 *    the device (e.g. poison the normalization record and report at the next synchronizing
 *    call) — see docs/sync_batch_norm.md;
 *  - merge(workspace, features, gathered, ranks, records, args, config, stream): copies the ranks'
 *    records (stride 2F + 2) into @p records (ranks × (2F + 1), contiguous) and calls
 *    phases::merge_statistics on them, rank 0 first;
 *  - normalize / local_gradient_sums / input_gradient(workspace, shape, args, config, stream):
 *    the phases;
 *  - sum_gradient_records(workspace, features, gathered, ranks, sums, stream): sums[i] = Σ
 *    over ranks, rank 0 first, starting from +0.0, of the ranks' gradient records (stride 2F + 1);
 *  - take_fault(workspace, stream) -> sync_fault: a fault the backend saw on the device since
 *    the last take_fault (and clears it); cpu has none (its statuses are read on the host and
 *    throw in the call). cuda synchronizes @p stream to read it.
 */
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../phases.hpp"
#include "../../types.hpp"
#include "../backend.hpp"

namespace batchnorm::detail {

/// A fault seen on the device (sync_ops::take_fault): the first refusing rank's status word
/// and that rank, or rank −1 when the merge refused the global batch's counts; code 0: none.
struct sync_fault {
  int code = 0;
  int rank = -1;
};

/// Reached only for a backend whose specialization is not visible (cuda without
/// <batchnorm/cuda.cuh>, or an unknown tag).
template <class Backend>
struct sync_ops {
  static_assert(!std::is_same_v<Backend, cuda>,
                "batchnorm: SyncBatchNorm<..., cuda, ...> needs the CUDA phases: compile with nvcc and "
                "#include <batchnorm/cuda.cuh> before <batchnorm/sync_batch_norm.hpp>");
  static_assert(std::is_same_v<Backend, cuda>, "batchnorm: unknown backend; use batchnorm::cpu or batchnorm::cuda");
};

template <>
struct sync_ops<cpu> {
  using stream_type = cpu::stream_type;
  struct workspace {};
  static workspace make_workspace() { return {}; }

  static void set_status(span<double> block, double status, bool payload_written, stream_type) {
    block[0] = status;
    if (!payload_written) std::fill(block.data + 1, block.data + block.size, 0.0);
  }

  template <class T>
  static void local_statistics(workspace&, const Shape& shape, Mode mode, const T* x, span<double> statistics, stream_type) {
    phases::local_statistics(cpu{}, shape, mode, x, statistics);
  }

  static std::vector<double> statuses(span<const double> gathered, int ranks, stream_type) {
    const std::int64_t stride = gathered.size / ranks;
    std::vector<double> s(static_cast<std::size_t>(ranks));
    for (int r = 0; r < ranks; ++r) s[static_cast<std::size_t>(r)] = gathered[r * stride];
    return s;
  }

  template <class P>
  static void merge(workspace&, std::int64_t features, span<const double> gathered, int ranks, span<double> records,
                    phases::MergeArgs<P> args, const phases::MergeConfig& config, stream_type) {
    const std::int64_t record = phases::shard_statistics_size(features);
    for (int r = 0; r < ranks; ++r) {
      const double* block = gathered.data + r * (record + 1);
      std::copy(block + 1, block + 1 + record, records.data + r * record);
    }
    args.shard_statistics = span<const double>(records.data, records.size);
    args.shards = ranks;
    phases::merge_statistics(cpu{}, features, args, config);
  }

  template <class T>
  static void normalize(workspace&, const Shape& shape, const phases::NormalizeArgs<T>& args,
                        const phases::ElementwiseConfig& config, stream_type) {
    phases::normalize(cpu{}, shape, args, config);
  }

  template <class T>
  static void local_gradient_sums(workspace&, const Shape& shape, const phases::GradientSumsArgs<T>& args,
                                  const phases::ElementwiseConfig& config, stream_type) {
    phases::local_gradient_sums(cpu{}, shape, args, config);
  }

  static void sum_gradient_records(workspace&, std::int64_t features, span<const double> gathered, int ranks,
                                   span<double> sums, stream_type) {
    const std::int64_t record = phases::gradient_sums_size(features);
    std::fill(sums.data, sums.data + record, 0.0);
    for (int r = 0; r < ranks; ++r) {
      const double* block = gathered.data + r * (record + 1) + 1;
      for (std::int64_t i = 0; i < record; ++i) sums[i] += block[i];
    }
  }

  template <class T>
  static void input_gradient(workspace&, const Shape& shape, const phases::InputGradientArgs<T>& args,
                             const phases::ElementwiseConfig& config, stream_type) {
    phases::input_gradient(cpu{}, shape, args, config);
  }

  static sync_fault take_fault(workspace&, stream_type) { return {}; }
};

}  // namespace batchnorm::detail
