/**
 * @file support/nccl_ranks.cuh
 * @brief Test-side NCCL ranks (nvcc, NCCL): one communicator (ncclCommInitAll) and one
 *        non-blocking stream per visible device, and three ways to run a body per rank: in one
 *        NCCL group from this thread (grouped), one after the other (each), or each on its own
 *        thread (concurrently). Shared by tests/cuda/nccl_test.cu and
 *        tests/cuda/sync_batch_norm_test.cu.
 */
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstddef>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

#include <batchnorm/comm/nccl.cuh>

#include "support/device_memory.cuh"

namespace bn_test {

/// One NCCL communicator and one non-blocking stream per visible device, destroyed at the end.
class Ranks {
 public:
  Ranks() {
    BN_TEST_CUDA_CHECK(cudaGetDeviceCount(&count_));
    comms_.resize(static_cast<std::size_t>(count_));
    batchnorm::detail::check_nccl(ncclCommInitAll(comms_.data(), count_, nullptr), "ncclCommInitAll");
    for (int d = 0; d < count_; ++d) {
      BN_TEST_CUDA_CHECK(cudaSetDevice(d));
      cudaStream_t s = nullptr;
      BN_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      streams_.push_back(s);
    }
  }
  ~Ranks() {
    for (int d = 0; d < count_; ++d) {
      (void)cudaSetDevice(d);
      (void)cudaStreamDestroy(streams_[static_cast<std::size_t>(d)]);
      (void)ncclCommDestroy(comms_[static_cast<std::size_t>(d)]);
    }
    (void)cudaSetDevice(0);
  }
  Ranks(const Ranks&) = delete;
  Ranks& operator=(const Ranks&) = delete;
  int count() const { return count_; }
  ncclComm_t comm(int r) const { return comms_[static_cast<std::size_t>(r)]; }
  cudaStream_t stream(int r) const { return streams_[static_cast<std::size_t>(r)]; }

  /// Runs @p per_rank(r) for every rank, on its device, inside one NCCL group (one thread
  /// driving several devices must group their collectives).
  template <class F>
  void grouped(F&& per_rank) const {
    batchnorm::detail::check_nccl(ncclGroupStart(), "ncclGroupStart");
    each(per_rank);
    batchnorm::detail::check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  }
  /// Runs @p per_rank(r) for every rank on its device, one after the other (no group: phases only).
  template <class F>
  void each(F&& per_rank) const {
    for (int r = 0; r < count_; ++r) {
      BN_TEST_CUDA_CHECK(cudaSetDevice(r));
      per_rank(r);
    }
  }
  /// Waits for every rank's stream.
  void sync() const {
    each([&](int r) { BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream(r))); });
  }
  /// Runs @p per_rank(r) for every rank concurrently, each on its own thread and device; an
  /// exception escaping a rank fails the test (with the rank).
  void concurrently(const std::function<void(int)>& per_rank) const {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(count_));
    std::vector<std::thread> threads;
    for (int r = 0; r < count_; ++r)
      threads.emplace_back([&, r] {
        try {
          BN_TEST_CUDA_CHECK(cudaSetDevice(r));
          per_rank(r);
        } catch (...) {
          errors[static_cast<std::size_t>(r)] = std::current_exception();
        }
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < count_; ++r)
      if (errors[static_cast<std::size_t>(r)]) {
        try {
          std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "rank " << r << ": " << e.what();
        }
      }
  }

 private:
  int count_ = 0;
  std::vector<ncclComm_t> comms_;
  std::vector<cudaStream_t> streams_;
};

}  // namespace bn_test
