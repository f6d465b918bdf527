/**
 * @file detail/cuda/memory.cuh
 * @brief device_buffer: an owning, move-only array in device memory (RAII), with the
 *        buffer interface the layer classes use (see detail/backend.hpp).
 */
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "error.cuh"

namespace batchnorm::detail {

template <class E>
class device_buffer {
 public:
  device_buffer() = default;
  /// Allocates @p n elements, all set to @p value. Synchronous (a construction-time call).
  explicit device_buffer(std::int64_t n, E value = E{}) : size_(n) {
    if (n > 0) {
      BN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), bytes()));
      from_host(std::vector<E>(static_cast<std::size_t>(n), value));
    }
  }
  device_buffer(device_buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { release(); }

  [[nodiscard]] E* data() noexcept { return data_; }
  [[nodiscard]] const E* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return static_cast<std::size_t>(size_) * sizeof(E); }

  /// Stream-ordered: sets every byte to zero on @p stream.
  void fill_zero(cudaStream_t stream) {
    if (size_ > 0) BN_CUDA_CHECK(cudaMemsetAsync(data_, 0, bytes(), stream));
  }
  /// Waits for all device work, then copies to the host.
  [[nodiscard]] std::vector<E> to_host() const {
    std::vector<E> v(static_cast<std::size_t>(size_));
    if (size_ > 0) {
      BN_CUDA_CHECK(cudaDeviceSynchronize());
      BN_CUDA_CHECK(cudaMemcpy(v.data(), data_, bytes(), cudaMemcpyDeviceToHost));
    }
    return v;
  }
  /// Waits for all device work, copies from the host, and waits for the copy to land (a
  /// copy from pageable memory may return before its DMA finishes, and kernels on
  /// non-blocking streams are not ordered after it). Precondition: `v.size() == size()`.
  void from_host(const std::vector<E>& v) {
    if (size_ > 0) {
      BN_CUDA_CHECK(cudaDeviceSynchronize());
      BN_CUDA_CHECK(cudaMemcpy(data_, v.data(), bytes(), cudaMemcpyHostToDevice));
      BN_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }

 private:
  void release() noexcept {
    if (data_) cudaFree(data_);  // a destructor cannot throw; an error here is sticky and surfaces later
    data_ = nullptr;
    size_ = 0;
  }
  E* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace batchnorm::detail
