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
#include "../../errors.hpp"
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

/// What the dispatch needs to know of a device: its launch policy, and whether it can read
/// plain (pageable) host memory.
struct DeviceInfo {
  LaunchPolicy policy;
  /// cudaDevAttrPageableMemoryAccess: the device reads any host memory coherently (HMM on
  /// Linux with the open kernel modules, or ATS on Grace Hopper / POWER9).
  bool pageable_memory_access = false;
};

inline DeviceInfo query_device_info(int device) {
  DeviceInfo info;
  info.policy = query_launch_policy(device);
  int pageable = 0;
  BN_CUDA_CHECK(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device));
  info.pageable_memory_access = pageable != 0;
  return info;
}

/// DeviceInfo of the current device, queried once per device per process (thread-safe).
inline DeviceInfo current_device_info() {
  int device = 0;
  BN_CUDA_CHECK(cudaGetDevice(&device));
  static const std::vector<DeviceInfo> devices = [] {
    int count = 0;
    BN_CUDA_CHECK(cudaGetDeviceCount(&count));
    std::vector<DeviceInfo> all;
    for (int d = 0; d < count; ++d) all.push_back(query_device_info(d));
    return all;
  }();
  return device < static_cast<int>(devices.size()) ? devices[static_cast<std::size_t>(device)]
                                                   : query_device_info(device);
}

/// Policy for the current device (cached, see current_device_info()).
inline LaunchPolicy current_launch_policy() { return current_device_info().policy; }

/**
 * @brief Throws batchnorm::cuda_error when a CUDA error is already pending on this thread
 *        before batchnorm has launched anything (an earlier kernel of the caller failed to
 *        launch, or the context is broken), instead of letting our launch check report it
 *        as ours. Peeks only: the caller's error stays pending for the caller to handle.
 *        (Our own failures are consumed when they are thrown; see throw_cuda_error.)
 */
inline void check_no_pending_error(const char* function) {
  const cudaError_t pending = cudaPeekAtLastError();
  if (pending == cudaSuccess) return;
  // A runtime that cannot start (no driver, no device) reports its initialization error here
  // too: that is the failure of our first call, not an error of the caller's.
  int device = 0;
  const cudaError_t usable = cudaGetDevice(&device);
  if (usable != cudaSuccess) throw_cuda_error(usable, "cudaGetDevice(&device)", __FILE__, __LINE__);
  throw cuda_error(static_cast<int>(pending), __FILE__, __LINE__,
                     concat(__FILE__, ":", __LINE__, ": batchnorm::", function,
                            ": a CUDA error from earlier work on this thread was pending (left pending, nothing "
                            "launched): ",
                            cudaGetErrorName(pending), ": ", cudaGetErrorString(pending)));
}

/**
 * @brief Rejects a workspace that is not aligned to cuda_workspace_alignment bytes (the
 *        kernels store 8- and 16-byte records in it; a misaligned store is a sticky
 *        cudaErrorMisalignedAddress that ends the caller's context). Host-only: runs before
 *        any CUDA call.
 */
inline void check_workspace_alignment(const void* workspace, std::size_t alignment) {
  const auto address = reinterpret_cast<std::uintptr_t>(workspace);
  require(address % alignment == 0, "workspace", "workspace: expected an address aligned to ", alignment,
          " bytes (as cudaMalloc returns), got one at offset ", address % alignment, " mod ", alignment);
}

/**
 * @brief Rejects a feature count beyond what the kernels can launch: one block per feature
 *        (planar reduction) or per few features in gridDim.x, whose limit is 2^31 − 1.
 *        Host-only: runs before any CUDA call.
 */
inline void check_launch_limits(const Shape& shape, Mode mode) {
  const std::int64_t features = feature_count(shape, mode);
  require(features <= max_features, "shape", "shape: expected at most ", max_features,
          " features for the CUDA backend (gridDim.x limit), got ", features);
}

/**
 * @brief Rejects pointers the device cannot dereference: plain host memory, unless the device
 *        reads pageable memory (DeviceInfo::pageable_memory_access: HMM / ATS systems, where
 *        malloc'd memory works in kernels, at host-memory speed).
 */
inline void check_device_pointer(const void* p, const char* argument, bool pageable_memory_access) {
  if (p == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, p);
  if (status == cudaErrorInvalidValue) {  // CUDA < 11 for unregistered host memory
    (void)cudaGetLastError();
    attributes.type = cudaMemoryTypeUnregistered;
  } else if (status != cudaSuccess) {
    throw_cuda_error(status, "cudaPointerGetAttributes", __FILE__, __LINE__);
  }
  require(attributes.type != cudaMemoryTypeUnregistered || pageable_memory_access, argument, argument,
          ": expected device, managed or mapped pinned memory, got a plain host pointer");
}

struct NamedPointer {
  const void* pointer;
  const char* argument;
};
inline void check_device_pointers(std::initializer_list<NamedPointer> pointers, bool pageable_memory_access) {
  for (const NamedPointer& p : pointers) check_device_pointer(p.pointer, p.argument, pageable_memory_access);
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
    const dim3 grid(grid_extent(plan.planar_view.C, max_grid_x), grid_extent(plan.splits, max_grid_y));
    planar_reduce_kernel<Tile::reduce_threads, Tile::loads_in_flight>
        <<<grid, Tile::reduce_threads, 0, stream>>>(acc, plan.planar_view, plan.chunk, partials);
  } else {
    const dim3 grid(grid_extent(ceil_div(plan.features, Tile::rows_tile_columns), max_grid_x),
                    grid_extent(plan.splits, max_grid_y));
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
  const unsigned blocks =
      grid_extent(std::clamp<std::int64_t>(ceil_div(numel, threads), 1, policy.elementwise_block_target()), max_grid_x);
  if (plan.planar)
    planar_elementwise_kernel<threads><<<blocks, threads, 0, stream>>>(op, plan.planar_view);
  else
    rows_elementwise_kernel<threads><<<blocks, threads, 0, stream>>>(op, plan.rows_view);
  BN_CUDA_CHECK_LAUNCH();
}

inline unsigned finalize_blocks(std::int64_t features) {
  return grid_extent(ceil_div(features, TilePolicy::finalize_warps), max_grid_x);
}

}  // namespace batchnorm::detail::cuda_impl
