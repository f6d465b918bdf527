/**
 * @file detail/cuda/dispatch.cuh
 * @brief Host side of the CUDA backend: reads the device's launch policy, checks pointers
 *        and workspace, and launches the kernels on the caller's stream for a Plan
 *        (plan.hpp). Nothing here synchronizes.
 */
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "../../args.hpp"
#include "../validate.hpp"
#include "error.cuh"
#include "kernels.cuh"
#include "plan.hpp"

namespace batchnorm::detail::cuda_impl {

/// Reads a device's attributes (no synchronization) and picks its policy.
inline LaunchPolicy query_launch_policy(int device) {
  int major = 0, minor = 0, sms = 0;
  BN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  BN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  BN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return launch_policy_for(major, minor, sms);
}

/// Policy for the current device, queried once per device per process (thread-safe).
inline LaunchPolicy current_launch_policy() {
  int device = 0;
  BN_CUDA_CHECK(cudaGetDevice(&device));
  static const std::vector<LaunchPolicy> policies = [] {
    int count = 0;
    BN_CUDA_CHECK(cudaGetDeviceCount(&count));
    std::vector<LaunchPolicy> all;
    for (int d = 0; d < count; ++d) all.push_back(query_launch_policy(d));
    return all;
  }();
  return device < static_cast<int>(policies.size()) ? policies[static_cast<std::size_t>(device)]
                                                    : query_launch_policy(device);
}

/// Rejects pointers the device cannot dereference (plain host memory).
inline void check_device_pointer(const void* p, const char* argument) {
  if (p == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, p);
  if (status == cudaErrorInvalidValue) {
    (void)cudaGetLastError();
    attributes.type = cudaMemoryTypeUnregistered;
  } else if (status != cudaSuccess) {
    throw_cuda_error(status, "cudaPointerGetAttributes", __FILE__, __LINE__);
  }
  require(attributes.type != cudaMemoryTypeUnregistered, argument, argument,
          ": expected device, managed or mapped pinned memory, got a plain host pointer");
}

struct NamedPointer {
  const void* pointer;
  const char* argument;
};
inline void check_device_pointers(std::initializer_list<NamedPointer> pointers) {
  for (const NamedPointer& p : pointers) check_device_pointer(p.pointer, p.argument);
}

inline void check_workspace(const void* workspace, std::size_t bytes, std::size_t required) {
  require(required == 0 || workspace != nullptr, "workspace", "workspace: expected ", required,
          " bytes of device memory, got nullptr");
  require(bytes >= required, "workspace_bytes", "workspace_bytes: expected at least ", required, ", got ", bytes);
}

/// Launches the partial reduction of @p plan with @p acc into @p partials.
template <class Accumulator>
void launch_reduce(const Plan& plan, const Accumulator& acc, typename Accumulator::state_type* partials,
                   cudaStream_t stream) {
  using Tile = TilePolicy;
  if (plan.planar) {
    const dim3 grid(static_cast<unsigned>(plan.planar_view.C), static_cast<unsigned>(plan.splits));
    planar_reduce_kernel<Tile::reduce_threads, Tile::loads_in_flight>
        <<<grid, Tile::reduce_threads, 0, stream>>>(acc, plan.planar_view, plan.chunk, partials);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(plan.features, Tile::rows_tile_columns)),
                    static_cast<unsigned>(plan.splits));
    const dim3 block(Tile::rows_tile_columns, Tile::rows_tile_rows);
    rows_reduce_kernel<Tile::rows_tile_columns, Tile::rows_tile_rows, Tile::loads_in_flight>
        <<<grid, block, 0, stream>>>(acc, plan.rows_view, plan.chunk, partials);
  }
  BN_CUDA_CHECK_LAUNCH();
}

/// Launches an elementwise pass of @p op over the tensor of @p plan.
template <class Op>
void launch_elementwise(const Plan& plan, const Op& op, std::int64_t numel, const LaunchPolicy& policy,
                        cudaStream_t stream) {
  constexpr int threads = TilePolicy::elementwise_threads;
  const auto blocks = static_cast<unsigned>(
      std::clamp<std::int64_t>(ceil_div(numel, threads), 1, policy.elementwise_block_target()));
  if (plan.planar)
    planar_elementwise_kernel<threads><<<blocks, threads, 0, stream>>>(op, plan.planar_view);
  else
    rows_elementwise_kernel<threads><<<blocks, threads, 0, stream>>>(op, plan.rows_view);
  BN_CUDA_CHECK_LAUNCH();
}

inline unsigned finalize_blocks(std::int64_t features) {
  return static_cast<unsigned>(ceil_div(features, TilePolicy::finalize_warps));
}

}  // namespace batchnorm::detail::cuda_impl
