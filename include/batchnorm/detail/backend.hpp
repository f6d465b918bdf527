/**
 * @file detail/backend.hpp
 * @brief The seam between the layer classes and a backend. `backend_ops<Backend>` is
 *        specialized once per backend: here for `cpu`, in detail/cuda/backend.cuh for `cuda`.
 *
 * A specialization provides
 *  - `buffer<E>`: an owning, move-only array of E in the backend's memory with
 *    `data()`, `size()`, `fill_zero(stream)`, `to_host()` and `from_host(const std::vector<E>&)`;
 *  - `workspace` and `make_workspace<T>(num_features)`: scratch memory sized once for a
 *    layer, so that no forward or backward ever allocates;
 *  - `forward(shape, args, config, workspace&, stream)` and `backward(...)`.
 */
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../functional.hpp"

namespace batchnorm::detail {

/// Host memory with the buffer interface backends share.
template <class E>
class host_buffer;

/**
 * The primary template is reached only for a backend whose specialization is not visible:
 * `cuda` in a translation unit that did not include <batchnorm/cuda.cuh> (most often plain
 * C++ writing `BatchNorm2d<float>`, whose default backend is cuda), or an unknown tag. It
 * stops with one static_assert that says what to write, and provides the members the layer
 * classes use so that no further errors follow it.
 */
template <class Backend>
struct backend_ops {
  static_assert(!std::is_same_v<Backend, cuda>,
                "batchnorm: this layer uses the CUDA backend (the default); in plain C++ write "
                "BatchNorm2d<T, batchnorm::cpu> (1d/3d alike), or compile with nvcc and #include <batchnorm/cuda.cuh>");
  static_assert(std::is_same_v<Backend, cuda>, "batchnorm: unknown backend; use batchnorm::cpu or batchnorm::cuda");
  template <class E>
  using buffer = host_buffer<E>;
  struct workspace {};
  template <class T>
  static workspace make_workspace(std::int64_t) {
    return {};
  }
  template <class T, class Stream>
  static void forward(const Shape&, const ForwardArgs<T>&, const ForwardConfig&, workspace&, Stream) {}
  template <class T, class Stream>
  static void backward(const Shape&, const BackwardArgs<T>&, const BackwardConfig&, workspace&, Stream) {}
};

template <class E>
class host_buffer {
 public:
  host_buffer() = default;
  explicit host_buffer(std::int64_t n, E value = E{}) : data_(static_cast<std::size_t>(n), value) {}
  [[nodiscard]] E* data() noexcept { return data_.data(); }
  [[nodiscard]] const E* data() const noexcept { return data_.data(); }
  [[nodiscard]] std::int64_t size() const noexcept { return static_cast<std::int64_t>(data_.size()); }
  void fill_zero(cpu::stream_type = {}) { std::fill(data_.begin(), data_.end(), E(0)); }
  [[nodiscard]] std::vector<E> to_host() const { return data_; }
  /// Precondition (checked by callers before anything changes): `v.size() == size()`.
  void from_host(const std::vector<E>& v) { std::copy(v.begin(), v.end(), data_.begin()); }

 private:
  std::vector<E> data_;
};

template <>
struct backend_ops<cpu> {
  template <class E>
  using buffer = host_buffer<E>;
  struct workspace {};
  template <class T>
  static workspace make_workspace(std::int64_t /*num_features*/) {
    return {};
  }

  template <class T>
  static void forward(const Shape& shape, const ForwardArgs<T>& args, const ForwardConfig& config, workspace&,
                      cpu::stream_type) {
    batchnorm::forward(cpu{}, shape, args, config);
  }
  template <class T>
  static void backward(const Shape& shape, const BackwardArgs<T>& args, const BackwardConfig& config,
                       workspace&, cpu::stream_type) {
    batchnorm::backward(cpu{}, shape, args, config);
  }
};

}  // namespace batchnorm::detail
