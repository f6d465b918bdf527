/**
 * @file comm/mpi.hpp
 * @brief batchnorm::MpiCommunicator: the communicator of SyncBatchNorm<T, Dims, cpu, ...>
 *        over MPI (host memory, MPI_Allgather on MPI_DOUBLE). Needs <mpi.h> (link MPI::MPI_CXX).
 */
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <string>

#include "../errors.hpp"
#include "../types.hpp"
#include "communicator.hpp"
#include "error.hpp"

namespace batchnorm {

namespace detail {

/// Throws batchnorm::communication_error for an MPI return code other than MPI_SUCCESS.
inline void check_mpi(int code, const char* call, const char* doing) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  int error_class = code;
  if (MPI_Error_class(code, &error_class) != MPI_SUCCESS) error_class = code;
  throw communication_error(call, error_class,
                            concat(call, " failed: ", length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                                                 : std::string("MPI error code ") + std::to_string(code),
                                   " (", doing, ")"));
}

}  // namespace detail

/**
 * @brief A communicator (comm/communicator.hpp) over an MPI communicator, for the cpu backend.
 *
 * It works on its own duplicate of the communicator it is given (MPI_Comm_dup), with the
 * error handler MPI_ERRORS_RETURN, so that an MPI error becomes a batchnorm::communication_error
 * instead of aborting, without changing the error handler of the caller's communicator, and
 * so that its collectives never match messages of the caller's own traffic.
 *
 * The caller initializes MPI (MPI_Init / MPI_Init_thread) before constructing one and
 * finalizes it after the last one is destroyed; the destructor frees the duplicate
 * (MPI_Comm_free) unless MPI is already finalized. Move-only.
 *
 * @note Thread safety: one instance must not be used from two threads at once; with several
 *       instances used concurrently MPI must be initialized with MPI_THREAD_MULTIPLE.
 */
class MpiCommunicator {
 public:
  using backend_type = cpu;

  /**
   * @brief Duplicates @p comm (collective over @p comm: every rank of it constructs one).
   * @throws batchnorm::communication_error when MPI is not initialized or MPI_Comm_dup,
   *         MPI_Comm_set_errhandler, MPI_Comm_rank or MPI_Comm_size fails
   */
  explicit MpiCommunicator(MPI_Comm comm) {
    int initialized = 0;
    detail::check_mpi(MPI_Initialized(&initialized), "MPI_Initialized", "MpiCommunicator");
    if (!initialized)
      throw communication_error("MPI_Initialized", MPI_ERR_OTHER,
                                "MpiCommunicator: MPI is not initialized; call MPI_Init before constructing it");
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup", "MpiCommunicator: duplicating the communicator");
    try {
      detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler",
                        "MpiCommunicator");
      detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", "MpiCommunicator");
      detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", "MpiCommunicator");
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
  }

  MpiCommunicator(MpiCommunicator&& other) noexcept
      : comm_(other.comm_), rank_(other.rank_), size_(other.size_) {
    other.comm_ = MPI_COMM_NULL;
  }
  MpiCommunicator& operator=(MpiCommunicator&& other) noexcept {
    if (this != &other) {
      release();
      comm_ = other.comm_;
      rank_ = other.rank_;
      size_ = other.size_;
      other.comm_ = MPI_COMM_NULL;
    }
    return *this;
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() { release(); }

  /// @brief This process's rank in the communicator.
  [[nodiscard]] int rank() const noexcept { return rank_; }
  /// @brief Number of processes in the communicator.
  [[nodiscard]] int size() const noexcept { return size_; }
  /// @brief The duplicated communicator this instance uses (owned by it).
  [[nodiscard]] MPI_Comm comm() const noexcept { return comm_; }

  /**
   * @brief MPI_Allgather of @p count doubles from every rank into @p recv (size() * count
   *        doubles, rank order). Collective; synchronous.
   * @throws batchnorm::invalid_argument for a negative @p count, one above INT_MAX, or a null
   *         buffer, before any communication (the caller's bug: the other ranks will wait)
   * @throws batchnorm::communication_error naming MPI_Allgather when MPI reports an error
   */
  void all_gather(const double* send, double* recv, std::int64_t count, cpu::stream_type = {}) {
    detail::require(count >= 0 && count <= INT_MAX, "count", "MpiCommunicator::all_gather: count: expected a value in [0, ",
                    INT_MAX, "], got ", count);
    detail::require(count == 0 || (send != nullptr && recv != nullptr), send ? "recv" : "send",
                    "MpiCommunicator::all_gather: expected non-null send and recv buffers");
    detail::check_mpi(MPI_Allgather(send, static_cast<int>(count), MPI_DOUBLE, recv, static_cast<int>(count), MPI_DOUBLE,
                                    comm_),
                      "MPI_Allgather", "MpiCommunicator::all_gather");
  }

 private:
  void release() noexcept {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(is_communicator_v<MpiCommunicator, cpu>);

}  // namespace batchnorm
