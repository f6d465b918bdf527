/**
 * @file comm/error.hpp
 * @brief batchnorm::communication_error: a collective of a communicator (MPI, NCCL) failed.
 */
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace batchnorm {

/**
 * @brief A failed call of a communication library (e.g. `MPI_Allgather`, `ncclAllGather`).
 *
 * `call()` names the library function, `code()` is the library's own error code (an MPI
 * error class or an ncclResult_t, as an int so that this header needs neither library), and
 * `what()` reads "<call> failed: <the library's error string>" plus what the layer was doing.
 * After a failed collective the ranks may disagree on what happened (a collective that fails
 * on one rank may have completed on another): treat the communicator, and any SyncBatchNorm
 * that was using it, as broken, as MPI and NCCL themselves do.
 */
class communication_error : public std::runtime_error {
 public:
  communication_error(std::string call, int code, const std::string& message)
      : std::runtime_error(message), call_(std::move(call)), code_(code) {}
  /// @brief The library function that failed, e.g. "MPI_Allgather".
  [[nodiscard]] const std::string& call() const noexcept { return call_; }
  /// @brief The library's error code (MPI error class, ncclResult_t).
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  std::string call_;
  int code_;
};

}  // namespace batchnorm
