/**
 * @file support/device_memory.cuh
 * @brief Test-side CUDA helpers (nvcc): gpu_available() / BN_TEST_REQUIRE_GPU(), a tiny RAII
 *        device array with checked copies, a non-blocking Stream, device_read(), and the
 *        `memory_policy<batchnorm::cuda>` that lets support/fixture_runner.hpp replay
 *        fixtures on the CUDA backend.
 *
 * Deliberately independent of the library's own device buffers, so that a bug there cannot
 * hide itself in the tests.
 */
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <batchnorm/types.hpp>

#include "support/memory_policy.hpp"

/// Throws std::runtime_error naming the call, file:line and the CUDA error.
#define BN_TEST_CUDA_CHECK(expression)                                                                   \
  do {                                                                                                   \
    const cudaError_t bn_test_status_ = (expression);                                                    \
    if (bn_test_status_ != cudaSuccess)                                                                  \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #expression \
                               " failed: " + cudaGetErrorName(bn_test_status_) + ": " +                  \
                               cudaGetErrorString(bn_test_status_));                                     \
  } while (0)

/// In a test body: skips the test when no CUDA device is usable.
#define BN_TEST_REQUIRE_GPU()                                          \
  do {                                                                 \
    if (!bn_test::gpu_available()) GTEST_SKIP() << "no CUDA device";  \
  } while (0)

namespace bn_test {

/// True when the CUDA runtime works and sees at least one device (checked once).
inline bool gpu_available() {
  static const bool available = [] {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear the error so that it does not leak into later calls
      return false;
    }
    return count > 0;
  }();
  return available;
}

/// An owning array of @p T in device memory. Copies are synchronous (cudaMemcpy).
template <class T>
class device_array {
 public:
  device_array() = default;
  explicit device_array(std::size_t n) : size_(n) {
    if (n > 0) BN_TEST_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)));
  }
  explicit device_array(const std::vector<T>& host) : device_array(host.size()) { upload(host); }
  device_array(device_array&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_array& operator=(device_array&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() { release(); }

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] const T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  void upload(const std::vector<T>& host) {
    if (host.size() != size_) throw std::length_error("device_array::upload: size mismatch");
    if (size_ > 0) {
      BN_TEST_CUDA_CHECK(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice));
      // A pageable-memory copy may return before its DMA lands; kernels on non-blocking
      // streams are not ordered after it.
      BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
  /// Copies to the host after the legacy default stream's work (cudaMemcpy's ordering); work
  /// on other streams must be synchronized by the caller first.
  [[nodiscard]] std::vector<T> download() const {
    std::vector<T> host(size_);
    if (size_ > 0) BN_TEST_CUDA_CHECK(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A non-blocking stream, so that work put on the legacy default stream by mistake races.
class Stream {
 public:
  Stream() { BN_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { (void)cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { BN_TEST_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

/// Waits for the whole device (every stream), then copies @p n values at device pointer @p p
/// to the host.
template <class E>
std::vector<E> device_read(const E* p, std::int64_t n) {
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<E> v(static_cast<std::size_t>(n));
  if (n > 0) BN_TEST_CUDA_CHECK(cudaMemcpy(v.data(), p, v.size() * sizeof(E), cudaMemcpyDeviceToHost));
  return v;
}

/// Device memory for `batchnorm::cuda` (see memory_policy<batchnorm::cpu> in memory_policy.hpp).
template <>
struct memory_policy<batchnorm::cuda> {
  template <class T>
  using array = device_array<T>;
  template <class T>
  static array<T> upload(const std::vector<T>& host) {
    return array<T>(host);
  }
  template <class T>
  static std::vector<T> download(const array<T>& a) {
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());  // also surfaces asynchronous kernel errors here
    return a.download();
  }
  template <class T>
  static T* data(array<T>& a) {
    return a.data();
  }
};

}  // namespace bn_test
