/**
 * @file cuda_phases.cuh
 * @brief The five phases of phases.hpp on the CUDA backend (compile with nvcc; included by
 *        <batchnorm/cuda.cuh>): device pointers, records in device memory (doubles, the same
 *        layout as on the CPU), a caller workspace and a stream.
 *
 * Between local_statistics and merge_statistics the caller all-gathers the shard records
 * (e.g. NcclCommunicator::all_gather, <batchnorm/comm/nccl.cuh>); between local_gradient_sums
 * and input_gradient it all-reduces (sums) the gradient records. Nothing here reads a record
 * on the host: the counts stay on the device, so a whole forward or backward is stream-ordered
 * without a host synchronisation.
 *
 * Precision: the kernels accumulate in param_t<T> (float for float / half / bfloat16, double
 * for double), as forward() does; the records carry double. A shard record's mean and M2 are
 * converted from the float Welford over x · prescale − pivot to double in the data's units;
 * the merge is Chan's formula in double in the order of the records; normalize and the
 * gradient phases take x − mean as (x − mean rounded to float) − the rest, so large offsets
 * cost nothing beyond float's rounding of the spread.
 *
 * Records the merge cannot use. The CPU merge throws for a shard count that is not a whole
 * number >= 0, a total above 2^53, or a total of 1 (one value per feature in training). The
 * counts are in device memory here, and checking them on the host would synchronise, so the
 * merge kernel checks them on the device instead and then writes a normalization record of
 * NaN (count, means and invstd: the record's count is NaN exactly in this case), NaN to
 * save_mean / save_invstd, and leaves the running statistics and skipped_updates untouched;
 * the later phases then produce NaN outputs. A caller that wants an exception reads the
 * record's count (one double) at its next synchronisation: `std::isnan(count)`.
 */
#pragma once

#if !defined(__CUDACC__)
#error "batchnorm/cuda_phases.cuh is CUDA code: compile this file with nvcc (a .cu source)"
#include "batchnorm/cuda_phases.cuh needs nvcc"
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda.cuh"
#include "phases.hpp"

namespace batchnorm {

/**
 * @brief Workspace bytes that every CUDA phase of @p shape in @p mode needs on the current
 *        device (one query for all five: the largest of them). merge_statistics needs at most
 *        the part for feature_count(shape, mode) features.
 * @tparam T storage type of the activations
 * @throws batchnorm::cuda_error if the device cannot be queried
 */
template <class T>
std::size_t phases_workspace_size(cuda, const Shape& shape, Mode mode);

}  // namespace batchnorm

namespace batchnorm::phases {

/**
 * @brief Phase 1 on the device: this shard's record `[count | mean × F | M2 × F]` (the split
 *        Welford reduction of forward, then one kernel to double in data units). An empty
 *        shard gives count 0 and zeros.
 * @param statistics device memory, shard_statistics_size(F) doubles
 * @param workspace device memory of phases_workspace_size() bytes, aligned to
 *        cuda_workspace_alignment; @param workspace_bytes its size
 * @throws batchnorm::invalid_argument for a bad argument (as on the CPU; plus host pointers,
 *         workspace), before anything is launched; batchnorm::cuda_error as forward()
 * @note Stream-ordered on @p stream; never synchronizes.
 */
template <class T>
void local_statistics(cuda, const Shape& shape, Mode mode, const T* x, span<double> statistics, void* workspace,
                      std::size_t workspace_bytes, cudaStream_t stream = nullptr);

/**
 * @brief Phase 2 on the device: one thread per feature merges the records in their order
 *        (Chan, in double), then the normalization record, save_mean / save_invstd and the
 *        running statistics as on the CPU (detail::finalize_merged_feature). With
 *        skip_nonfinite_updates and running statistics, a second kernel applies the update to
 *        all features or none and counts a skipped one in *skipped_updates (device memory).
 * @param workspace needed only with skip_nonfinite_updates and running statistics (then
 *        phases_workspace_size() bytes suffice); may be null otherwise
 * @throws batchnorm::invalid_argument for a bad argument, before anything is launched. Bad
 *         counts inside the records are not seen on the host: see the file comment.
 * @note Stream-ordered; never synchronizes; reads the counts on the device.
 */
template <class P>
void merge_statistics(cuda, std::int64_t features, const MergeArgs<P>& args, const MergeConfig& config,
                      void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr);

/**
 * @brief Phase 3 on the device: y = act((x − mean) · invstd · weight + bias [+ residual]),
 *        forward's normalize kernel with constants from the record.
 * @note Stream-ordered; never synchronizes.
 */
template <class T>
void normalize(cuda, const Shape& shape, const NormalizeArgs<T>& args, const ElementwiseConfig& config,
               void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr);

/**
 * @brief Phase 4 on the device: this shard's `[Σdy × F | Σdy·(x − mean) × F]` against the
 *        record's mean (backward's split reduction, then one kernel to double).
 * @note Stream-ordered; never synchronizes.
 */
template <class T>
void local_gradient_sums(cuda, const Shape& shape, const GradientSumsArgs<T>& args, const ElementwiseConfig& config,
                         void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr);

/**
 * @brief Phase 5 on the device: grad_weight / grad_bias and the dx coefficients from the
 *        summed gradient records and the normalization record's count (read on the device),
 *        then backward's dx kernel. An empty shard writes only the parameter gradients.
 * @note Stream-ordered; never synchronizes.
 */
template <class T>
void input_gradient(cuda, const Shape& shape, const InputGradientArgs<T>& args, const ElementwiseConfig& config,
                    void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr);

}  // namespace batchnorm::phases

#include "detail/cuda/phases.inl"
#include "detail/sync/cuda_ops.cuh"  // sync_ops<cuda>: SyncBatchNorm on these phases (last: it needs them)
