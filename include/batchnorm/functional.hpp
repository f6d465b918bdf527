/**
 * @file functional.hpp
 * @brief Stateless BatchNorm on raw pointers: what the layer classes call, and what a
 *        framework that owns its own tensors calls directly (as `F.batch_norm` in PyTorch).
 *
 * Backend is chosen by tag: `batchnorm::forward(batchnorm::cpu{}, shape, args, config)`
 * runs the CPU reference on host pointers; the CUDA overloads (declared in
 * <batchnorm/cuda.cuh>) take device pointers, a caller-provided workspace and a stream.
 *
 * Every call validates all of its arguments before it writes anything, and throws
 * batchnorm::invalid_argument naming the argument, the value expected and the value given.
 * That includes enum values that name no enumerator, and overlapping buffers: no buffer the
 * call writes may share a byte with another buffer of the call, except y == x, y == residual
 * (forward), dx == dy, dx == x and dresidual == dy (backward) at exactly the same address
 * (the table is in docs/errors.md).
 */
#pragma once

#include "args.hpp"
#include "options.hpp"
#include "shape.hpp"
#include "types.hpp"

namespace batchnorm {

/**
 * @brief Forward on the CPU backend (host pointers, double accumulation, synchronous).
 * @tparam T float or double (half types with <batchnorm/half.hpp>)
 * @param shape  extents and layout of x and y
 * @param args   pointers; see ForwardArgs
 * @param config scalars; see ForwardConfig
 * @throws batchnorm::invalid_argument for any bad argument (null or overlapping buffers, sizes,
 *         eps, factor, enum values), before anything is written
 * @throws std::bad_alloc when the per-feature scratch cannot be allocated (nothing written)
 */
template <class T>
void forward(cpu, const Shape& shape, const ForwardArgs<T>& args, const ForwardConfig& config);

/**
 * @brief Backward on the CPU backend (host pointers, double accumulation, synchronous).
 * @throws batchnorm::invalid_argument for any bad argument (null or overlapping buffers, sizes,
 *         enum values), before anything is written
 * @throws std::bad_alloc when the per-feature scratch cannot be allocated (nothing written)
 */
template <class T>
void backward(cpu, const Shape& shape, const BackwardArgs<T>& args, const BackwardConfig& config);

}  // namespace batchnorm

#include "detail/cpu/functional.inl"
