/**
 * @file detail/cuda/error.cuh
 * @brief BN_CUDA_CHECK: turns a failed CUDA runtime call into batchnorm::cuda_error with
 *        the file, line, CUDA error name and message.
 */
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "../../errors.hpp"

namespace batchnorm::detail {

/// Throws batchnorm::cuda_error for a failed call of ours. The failure is consumed from the
/// thread's last-error state first (cudaGetLastError), so that it is reported once, by this
/// exception, and not again as an error pending before the next call (check_no_pending_error).
/// A sticky error (a broken context) cannot be consumed and keeps failing later calls.
[[noreturn]] inline void throw_cuda_error(cudaError_t code, const char* expression, const char* file, int line) {
  (void)cudaGetLastError();
  throw cuda_error(static_cast<int>(code), file, line,
                   concat(file, ":", line, ": ", expression, " failed: ", cudaGetErrorName(code), ": ",
                          cudaGetErrorString(code)));
}

}  // namespace batchnorm::detail

/// Evaluates a cudaError_t expression and throws batchnorm::cuda_error unless it is cudaSuccess.
#define BN_CUDA_CHECK(expression)                                                          \
  do {                                                                                     \
    const cudaError_t bn_cuda_status_ = (expression);                                      \
    if (bn_cuda_status_ != cudaSuccess)                                                    \
      ::batchnorm::detail::throw_cuda_error(bn_cuda_status_, #expression, __FILE__, __LINE__); \
  } while (0)

/// Checks the launch just made (configuration errors); never synchronizes. The entry points
/// call check_no_pending_error() before their first launch, so an error found here is ours.
#define BN_CUDA_CHECK_LAUNCH() BN_CUDA_CHECK(cudaGetLastError())
