/**
 * @file cuda.cuh
 * @brief The CUDA backend (compile with nvcc): everything in <batchnorm/batchnorm.hpp>,
 *        plus `BatchNorm*d<T, batchnorm::cuda>` (device memory) and the stateless CUDA
 *        forward / backward on device pointers with a caller-provided workspace and stream.
 *
 * @note Synchronization: forward and backward are stream-ordered. They launch kernels on
 *       @p stream and return without waiting; they never synchronize the device. The
 *       workspace must stay valid until the work on @p stream has finished.
 * @note Errors: arguments are validated before anything is launched or written
 *       (batchnorm::invalid_argument); a failing CUDA call or launch throws
 *       batchnorm::cuda_error with file:line and the CUDA error name and message.
 */
#pragma once

// CUDA code (kernels, CUB): a plain C++ compiler would fail deep inside CUB's headers.
// The include of a file that does not exist after the #error is fatal: compilation stops.
#if !defined(__CUDACC__)
#error "batchnorm/cuda.cuh is CUDA code: compile this file with nvcc (a .cu source; CMake: LANGUAGES CUDA). Plain C++ includes <batchnorm/batchnorm.hpp> and uses batchnorm::cpu"
#include "batchnorm/cuda.cuh needs nvcc"
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "batchnorm.hpp"
#include "detail/cuda/dispatch.cuh"
#include "detail/cuda/error.cuh"
#include "detail/cuda/memory.cuh"

namespace batchnorm {

/**
 * @brief Alignment in bytes the functional CUDA API requires of its workspace (cudaMalloc,
 *        cudaMallocAsync and PyTorch's caching allocator return 256-byte aligned memory; a
 *        workspace carved from a byte arena must be placed at a multiple of this).
 */
inline constexpr std::size_t cuda_workspace_alignment = 16;

/**
 * @brief Workspace bytes `forward(cuda{}, ...)` needs for @p shape on the current device.
 * @tparam T storage type
 * @throws batchnorm::cuda_error if the device cannot be queried
 */
template <class T>
std::size_t forward_workspace_size(cuda, const Shape& shape, const ForwardConfig& config, bool tracking = true);

/**
 * @brief Workspace bytes `backward(cuda{}, ...)` needs for @p shape on the current device.
 */
template <class T>
std::size_t backward_workspace_size(cuda, const Shape& shape, const BackwardConfig& config);

/**
 * @brief Workspace bytes that cover forward and backward of every shape with
 *        @p num_features features on the current device (what the layer classes allocate once).
 */
template <class T>
std::size_t max_workspace_size(cuda, std::int64_t num_features);

/**
 * @brief Forward on device pointers (see ForwardArgs / ForwardConfig for the contract).
 * @param workspace device memory of at least forward_workspace_size() bytes, aligned to
 *        cuda_workspace_alignment bytes; the call's scratch space, so two calls that may run
 *        at the same time (on two streams) need two workspaces
 * @param workspace_bytes its size
 * @param stream the stream every kernel runs on
 * @throws batchnorm::invalid_argument for a bad argument, before anything is launched:
 *         including plain host pointers (accepted only where the device reads pageable host
 *         memory, cudaDevAttrPageableMemoryAccess: HMM / ATS systems), a misaligned or too
 *         small workspace, and more than 2^31 − 1 features (`shape`, the grid limit)
 * @throws batchnorm::cuda_error when a CUDA call or launch fails, or when a CUDA error from
 *         the caller's earlier work is pending on this thread (it is left pending, and
 *         nothing is launched)
 * @note Stream-ordered; never synchronizes. Concurrent calls on different streams are safe
 *       when they write disjoint memory (outputs, running statistics, workspace); inputs may
 *       be shared.
 */
template <class T>
void forward(cuda, const Shape& shape, const ForwardArgs<T>& args, const ForwardConfig& config, void* workspace,
             std::size_t workspace_bytes, cudaStream_t stream = nullptr);

/**
 * @brief Backward on device pointers (see BackwardArgs / BackwardConfig).
 * @throws as forward()
 * @note Stream-ordered; never synchronizes.
 */
template <class T>
void backward(cuda, const Shape& shape, const BackwardArgs<T>& args, const BackwardConfig& config, void* workspace,
              std::size_t workspace_bytes, cudaStream_t stream = nullptr);

}  // namespace batchnorm

#include "detail/cuda/backend.cuh"
#include "detail/cuda/functional.inl"
#include "cuda_phases.cuh"  // the phases of phases.hpp on the CUDA backend (SyncBatchNorm's parts)
