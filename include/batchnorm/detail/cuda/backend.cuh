/**
 * @file detail/cuda/backend.cuh
 * @brief backend_ops<cuda>: device buffers for the layer classes, a workspace allocated
 *        once per layer (so forward/backward never allocate), and the calls into the
 *        functional CUDA API.
 */
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../backend.hpp"
#include "memory.cuh"

namespace batchnorm {
template <class T>
std::size_t max_workspace_size(cuda, std::int64_t num_features);
template <class T>
void forward(cuda, const Shape&, const ForwardArgs<T>&, const ForwardConfig&, void*, std::size_t, cudaStream_t);
template <class T>
void backward(cuda, const Shape&, const BackwardArgs<T>&, const BackwardConfig&, void*, std::size_t, cudaStream_t);
}  // namespace batchnorm

namespace batchnorm::detail {

template <>
struct backend_ops<cuda> {
  template <class E>
  using buffer = device_buffer<E>;
  struct workspace {
    device_buffer<unsigned char> bytes;
  };

  template <class T>
  static workspace make_workspace(std::int64_t num_features) {
    const auto size = static_cast<std::int64_t>(batchnorm::max_workspace_size<T>(cuda{}, num_features));
    return workspace{device_buffer<unsigned char>(size, 0)};
  }
  template <class T>
  static void forward(const Shape& shape, const ForwardArgs<T>& args, const ForwardConfig& config, workspace& ws,
                      cudaStream_t stream) {
    batchnorm::forward(cuda{}, shape, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
  }
  template <class T>
  static void backward(const Shape& shape, const BackwardArgs<T>& args, const BackwardConfig& config,
                       workspace& ws, cudaStream_t stream) {
    batchnorm::backward(cuda{}, shape, args, config, ws.bytes.data(), ws.bytes.bytes(), stream);
  }
};

}  // namespace batchnorm::detail
