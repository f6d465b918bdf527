/**
 * @file comm/nccl.cuh
 * @brief batchnorm::NcclCommunicator: the communicator SyncBatchNorm uses on the CUDA backend,
 *        over a caller's NCCL communicator (link with -lnccl; NCCL ships with the CUDA
 *        toolkit's redistributables and with PyTorch).
 *
 * @note Synchronization: all_gather enqueues ncclAllGather on the caller's stream and returns;
 *       it never synchronizes the host. Like every NCCL collective it must be called by every
 *       rank of the communicator, in the same order; with several devices driven from one
 *       thread, the caller groups the ranks' calls in ncclGroupStart() / ncclGroupEnd().
 */
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../errors.hpp"
#include "error.hpp"

namespace batchnorm {

namespace detail {
/// Throws batchnorm::communication_error naming the NCCL call and NCCL's message.
inline void check_nccl(ncclResult_t result, const char* call) {
  if (result == ncclSuccess) return;
  throw communication_error(call, static_cast<int>(result),
                            std::string(call) + " failed: " + ncclGetErrorString(result) + " (ncclResult_t " +
                                std::to_string(static_cast<int>(result)) + ")");
}
}  // namespace detail

/**
 * @brief The SyncBatchNorm communicator for NCCL: rank(), size() and a stream-ordered
 *        all_gather of doubles, over an ncclComm_t the caller created and keeps (this class
 *        does not own it and never destroys it; it must outlive the communicator).
 */
class NcclCommunicator {
 public:
  /**
   * @param comm an initialized NCCL communicator (ncclCommInitRank, ncclCommInitAll, or the
   *        one of a framework's process group)
   * @throws batchnorm::invalid_argument for a null @p comm
   * @throws batchnorm::communication_error when ncclCommUserRank or ncclCommCount fails
   */
  explicit NcclCommunicator(ncclComm_t comm) : comm_(comm) {
    if (comm == nullptr) throw invalid_argument("comm", "comm: expected an initialized ncclComm_t, got nullptr");
    detail::check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    detail::check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount");
  }

  /// @brief This process's (device's) rank in the communicator, 0 .. size() − 1.
  [[nodiscard]] int rank() const noexcept { return rank_; }
  /// @brief The number of ranks.
  [[nodiscard]] int size() const noexcept { return size_; }
  /// @brief The wrapped NCCL communicator.
  [[nodiscard]] ncclComm_t comm() const noexcept { return comm_; }

  /**
   * @brief recv[r · count .. (r + 1) · count) = rank r's send[0 .. count), for every rank r,
   *        in rank order (ncclAllGather of ncclDouble). @p send and @p recv are device memory;
   *        send may be recv + rank() · count (in place).
   * @throws batchnorm::invalid_argument for a negative @p count
   * @throws batchnorm::communication_error when ncclAllGather fails (its name and NCCL's message)
   * @note Stream-ordered on @p stream; never synchronizes.
   */
  void all_gather(const double* send, double* recv, std::int64_t count, cudaStream_t stream) {
    if (count < 0) throw invalid_argument("count", detail::concat("count: expected a value >= 0, got ", count));
    detail::check_nccl(ncclAllGather(send, recv, static_cast<std::size_t>(count), ncclDouble, comm_, stream),
                       "ncclAllGather");
  }

 private:
  ncclComm_t comm_;
  int rank_ = 0;
  int size_ = 0;
};

}  // namespace batchnorm
