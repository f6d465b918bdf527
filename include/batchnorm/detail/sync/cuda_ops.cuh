/**
 * @file detail/sync/cuda_ops.cuh
 * @brief sync_ops<cuda>: SyncBatchNorm's seam onto the CUDA phases (cuda_phases.cuh), included
 *        by <batchnorm/cuda.cuh> (at the end of cuda_phases.cuh; compile with nvcc). The members are those of sync_ops<cpu>
 *        (detail/sync/ops.hpp); everything is stream-ordered and nothing reads device memory on
 *        the host, except take_fault (documented as synchronizing).
 *
 * Status words on the device. The ranks' status words arrive with the records, in device
 * memory, and reading them on the host would synchronize every forward and backward (the
 * defect of PyTorch's SyncBatchNorm this backend avoids). So statuses() returns nothing and
 * the faults are seen on the device:
 *  - merge: when any rank's status is not 0, the count of rank 0's record is replaced by NaN
 *    before the merge, which then refuses the records as it refuses bad counts
 *    (cuda_phases.cuh): normalization record, save_mean and save_invstd NaN, running statistics
 *    and skipped_updates untouched; the normalize phase then writes NaN;
 *  - sum_gradient_records: when any rank's status is not 0 the summed gradient records are NaN,
 *    so grad_weight, grad_bias and dx are NaN;
 *  - in both cases the first faulty rank (rank order) and its status go to a two-int device
 *    record in the workspace, unless one is already there; a merge that refused the counts of
 *    an accepted global batch (one value per feature in training, a count above 2^53) records
 *    rank −1. take_fault() synchronizes the stream, reads and clears that record.
 *
 * The workspace holds the device scratch of the CUDA phases, grown (cudaMalloc, synchronous)
 * when a call's shape needs more than the largest one so far: the first call with a new,
 * larger shape synchronizes; later calls with that shape or smaller ones do not (capture a
 * CUDA graph after such a warm-up call).
 */
#pragma once

#if !defined(__CUDACC__)
#error "batchnorm/detail/sync/cuda_ops.cuh is CUDA code: compile this file with nvcc (a .cu source)"
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../cuda_phases.cuh"  // and <batchnorm/cuda.cuh>; this file is included at its end
#include "ops.hpp"

namespace batchnorm::detail {

namespace cuda_impl {

/// SyncBatchNorm's status word: block[0] = status and, when @p zero_payload, the rest of the
/// block zeroed (a rank that refused its input still sends a well-formed block). The status
/// is a kernel argument, so a captured graph replays it by value. A template only so that a
/// header may define it in every translation unit.
template <class E>
BN_KERNEL void set_status_kernel(E* block, std::int64_t size, E status, bool zero_payload) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i == 0) {
    block[0] = status;
  } else if (zero_payload && i < size) {
    block[i] = E(0);
  }
}

/// When any of the @p ranks gathered blocks (stride @p stride, status first) has a status
/// other than 0: target[0 .. count) = NaN, and the first such rank and its status go to
/// fault[0..1] (status, rank) unless a fault is recorded already. Every thread reads the
/// statuses (a few doubles); only thread 0 writes the fault record.
template <class E>
BN_KERNEL void poison_if_refused_kernel(const E* __restrict__ gathered, std::int64_t ranks, std::int64_t stride,
                                        E* __restrict__ target, std::int64_t count, int* __restrict__ fault) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t first = -1;
  for (std::int64_t r = 0; r < ranks; ++r)
    if (gathered[r * stride] != E(0)) {
      first = r;
      break;
    }
  if (first < 0) return;
  if (i == 0 && fault[0] == 0) {
    const int status = static_cast<int>(gathered[first * stride]);
    fault[0] = status != 0 ? status : -1;  // a fractional status still counts as a fault
    fault[1] = static_cast<int>(first);
  }
  if (i < count) target[i] = static_cast<E>(__longlong_as_double(0x7ff8000000000000LL));  // quiet NaN
}

/// After the merge: a NaN count in the normalization record with no fault recorded means the
/// merge refused the counts of the global batch; recorded as (1, −1).
template <class E>
BN_KERNEL void note_refused_merge_kernel(const E* __restrict__ normalization, int* __restrict__ fault) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && normalization[0] != normalization[0] && fault[0] == 0) {
    fault[0] = 1;
    fault[1] = -1;
  }
}

}  // namespace cuda_impl

template <>
struct sync_ops<cuda> {
  using stream_type = cuda::stream_type;

  /// Device scratch of the phases (grown on demand) and the device fault record (status, rank).
  struct workspace {
    device_buffer<unsigned char> bytes;
    device_buffer<int> fault;
  };
  /// Allocates the fault record (synchronous: the layer's constructor).
  static workspace make_workspace() { return workspace{device_buffer<unsigned char>(), device_buffer<int>(2, 0)}; }

  static void set_status(span<double> block, double status, bool payload_written, stream_type stream) {
    constexpr int threads = cuda_impl::TilePolicy::elementwise_threads;
    const std::int64_t covered = payload_written ? 1 : block.size;
    cuda_impl::set_status_kernel<double>
        <<<cuda_impl::feature_blocks(covered, threads), threads, 0, stream>>>(block.data, block.size, status,
                                                                              !payload_written);
    BN_CUDA_CHECK_LAUNCH();
  }

  template <class T>
  static void local_statistics(workspace& ws, const Shape& shape, Mode mode, const T* x, span<double> statistics,
                               stream_type stream) {
    reserve(ws, phases_workspace_size<T>(cuda{}, shape, mode));
    phases::local_statistics(cuda{}, shape, mode, x, statistics, ws.bytes.data(), ws.bytes.bytes(), stream);
  }

  /// Empty: the statuses stay on the device (see the file comment).
  static std::vector<double> statuses(span<const double>, int, stream_type) { return {}; }

  template <class P>
  static void merge(workspace& ws, std::int64_t features, span<const double> gathered, int ranks,
                    span<double> records, phases::MergeArgs<P> args, const phases::MergeConfig& config,
                    stream_type stream) {
    const std::int64_t record = phases::shard_statistics_size(features);
    reserve(ws, cuda_impl::merge_layout(features, true).total);
    cuda_impl::compact_gathered(gathered.data, ranks, record + 1, 1, record, records.data, stream);
    cuda_impl::poison_if_refused_kernel<double>
        <<<1, 32, 0, stream>>>(gathered.data, ranks, record + 1, records.data, 1, ws.fault.data());
    BN_CUDA_CHECK_LAUNCH();
    args.shard_statistics = span<const double>(records.data, records.size);
    args.shards = ranks;
    phases::merge_statistics(cuda{}, features, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
    cuda_impl::note_refused_merge_kernel<double><<<1, 1, 0, stream>>>(args.normalization.data, ws.fault.data());
    BN_CUDA_CHECK_LAUNCH();
  }

  template <class T>
  static void normalize(workspace& ws, const Shape& shape, const phases::NormalizeArgs<T>& args,
                        const phases::ElementwiseConfig& config, stream_type stream) {
    reserve(ws, phases_workspace_size<T>(cuda{}, shape, config.mode));
    phases::normalize(cuda{}, shape, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
  }

  template <class T>
  static void local_gradient_sums(workspace& ws, const Shape& shape, const phases::GradientSumsArgs<T>& args,
                                  const phases::ElementwiseConfig& config, stream_type stream) {
    reserve(ws, phases_workspace_size<T>(cuda{}, shape, config.mode));
    phases::local_gradient_sums(cuda{}, shape, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
  }

  static void sum_gradient_records(workspace& ws, std::int64_t features, span<const double> gathered, int ranks,
                                   span<double> sums, stream_type stream) {
    const std::int64_t record = phases::gradient_sums_size(features);
    cuda_impl::sum_gathered(gathered.data, ranks, record + 1, 1, record, sums.data, stream);
    constexpr int threads = cuda_impl::TilePolicy::elementwise_threads;
    cuda_impl::poison_if_refused_kernel<double><<<cuda_impl::feature_blocks(record, threads), threads, 0, stream>>>(
        gathered.data, ranks, record + 1, sums.data, record, ws.fault.data());
    BN_CUDA_CHECK_LAUNCH();
  }

  template <class T>
  static void input_gradient(workspace& ws, const Shape& shape, const phases::InputGradientArgs<T>& args,
                             const phases::ElementwiseConfig& config, stream_type stream) {
    reserve(ws, phases_workspace_size<T>(cuda{}, shape, config.mode));
    phases::input_gradient(cuda{}, shape, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
  }

  /// Synchronizes @p stream, then reads and clears the device fault record.
  static sync_fault take_fault(workspace& ws, stream_type stream) {
    BN_CUDA_CHECK(cudaStreamSynchronize(stream));
    int record[2] = {0, 0};
    BN_CUDA_CHECK(cudaMemcpy(record, ws.fault.data(), sizeof(record), cudaMemcpyDeviceToHost));
    if (record[0] != 0) BN_CUDA_CHECK(cudaMemset(ws.fault.data(), 0, sizeof(record)));
    return sync_fault{record[0], record[1]};
  }

 private:
  /// Grows the phase scratch to @p bytes (synchronous cudaMalloc; only when it grows).
  static void reserve(workspace& ws, std::size_t bytes) {
    if (ws.bytes.bytes() < bytes) ws.bytes = device_buffer<unsigned char>(static_cast<std::int64_t>(bytes), 0);
  }
};

}  // namespace batchnorm::detail
