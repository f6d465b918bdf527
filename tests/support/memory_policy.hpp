/**
 * @file tests/support/memory_policy.hpp
 * @brief `bn_test::memory_policy<Backend>`: the memory a test needs for a backend's tensors
 *        (array type, upload, download, raw pointer). The host one, for `batchnorm::cpu`, is
 *        here; the device one, for `batchnorm::cuda`, is in support/device_memory.cuh (nvcc).
 */
#pragma once

#include <vector>

#include <batchnorm/types.hpp>

namespace bn_test {

/// Memory of a backend as the runner needs it (specialized per backend).
template <class Backend>
struct memory_policy;

/// Host memory for `batchnorm::cpu`.
template <>
struct memory_policy<batchnorm::cpu> {
  template <class T>
  using array = std::vector<T>;
  template <class T>
  static array<T> upload(const std::vector<T>& host) {
    return host;
  }
  template <class T>
  static std::vector<T> download(const array<T>& a) {
    return a;
  }
  template <class T>
  static T* data(array<T>& a) {
    return a.data();
  }
};

}  // namespace bn_test
