/**
 * @file state.hpp
 * @brief Host copies of a layer's learnable parameters, buffers and gradients.
 */
#pragma once

#include <cstdint>
#include <vector>

namespace batchnorm {

/**
 * @brief A layer's state, as PyTorch's `state_dict()` holds it, in host memory.
 *
 * Vectors are empty where the layer has no such tensor: weight/bias when `affine` is
 * off, running_mean/running_var when `track_running_stats` is off.
 * @tparam P parameter type (`param_t<T>` of the layer's storage type T).
 */
template <class P>
struct State {
  std::vector<P> weight;
  std::vector<P> bias;
  std::vector<P> running_mean;
  std::vector<P> running_var;
  std::int64_t num_batches_tracked = 0;
};

/**
 * @brief Parameter gradients written by the last `backward`, in host memory
 *        (both empty when the layer is not affine).
 */
template <class P>
struct Gradients {
  std::vector<P> grad_weight;
  std::vector<P> grad_bias;
};

}  // namespace batchnorm
