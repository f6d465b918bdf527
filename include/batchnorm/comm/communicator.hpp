/**
 * @file comm/communicator.hpp
 * @brief What SyncBatchNorm needs from a communicator, and how it uses it.
 *
 * A communicator for backend `B` (`batchnorm::cpu`, `batchnorm::cuda`) is any class with
 * @code
 *   int rank() const;   // this participant, 0 <= rank() < size()
 *   int size() const;   // number of participants, >= 1
 *   void all_gather(const double* send, double* recv, std::int64_t count, typename B::stream_type stream);
 * @endcode
 * `all_gather` is collective: every participant calls it with the same @p count; each
 * contributes @p count doubles from @p send, and @p recv (size() * count doubles) receives
 * every participant's contribution in rank order, the same bits on every participant. Memory
 * is the backend's: host memory for cpu (and the call is synchronous); device memory for cuda,
 * where the call is stream-ordered on @p stream and must not synchronize the host. Failures
 * throw batchnorm::communication_error (comm/error.hpp) naming the library call.
 *
 * Provided: batchnorm::MpiCommunicator (comm/mpi.hpp, cpu, over MPI_Allgather). A framework
 * with its own collectives writes a class of the three members above around them.
 *
 * ## Why all-gather, in both directions
 * SyncBatchNorm makes exactly one collective per forward and one per backward, and both are
 * all-gathers followed by a local reduction **in rank order**:
 *  - forward: each rank sends `[status | count | mean × F | M2 × F]` (2F + 2 doubles) and
 *    merges the size() records with Chan's formula, rank 0 first (phases::merge_statistics);
 *  - backward: each rank sends `[status | Σdy × F | Σdy·(x − mean) × F]` (2F + 1 doubles) and
 *    sums the size() records element-wise, rank 0 first.
 * An all-reduce (MPI_Allreduce, ncclAllReduce) would send about half as much in backward,
 * but neither MPI nor NCCL specifies the order in which it adds the contributions, and
 * implementations pick different trees by message size and rank count: the sums could differ
 * in the last bits between runs, rank counts or libraries, and (for some algorithms) between
 * ranks. Gathering the records and reducing them locally in a fixed order makes every rank
 * compute the same bits with any MPI implementation, and the merge of (count, mean, M2) is not
 * a sum anyway. The price is size() * (2F + 2) doubles received per forward instead of
 * 2F + 1: negligible next to the activations for any realistic F and rank count.
 *
 * The status word (0 = this rank's input was accepted, otherwise the code of what it refused)
 * rides in the same message, so a rank with bad input still takes part in the collective and
 * every rank learns of the fault from the same gathered data: all ranks throw together and no
 * rank is left waiting in a collective that another rank skipped.
 *
 * Bytes sent per call, per rank: forward 8 (2F + 2), backward 8 (2F + 1); received: size()
 * times that. F is num_features (C, or C × spatial per activation).
 */
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "error.hpp"

namespace batchnorm {

/**
 * @brief True when @p Communicator has the members SyncBatchNorm needs for @p Backend
 *        (rank(), size(), all_gather(const double*, double*, std::int64_t, stream_type)).
 * @tparam Communicator the class to check (e.g. MpiCommunicator, NcclCommunicator, a
 *         framework's own wrapper)
 * @tparam Backend batchnorm::cpu or batchnorm::cuda: gives the stream type all_gather takes
 * @note A compile-time check only: it says nothing of the semantics the file comment asks for
 *       (a collective, rank order, the same bits everywhere; synchronous on cpu, stream-ordered
 *       on cuda; failures thrown as batchnorm::communication_error). The SyncBatchNorm class
 *       template static_asserts it, so a class lacking a member fails to compile with
 *       that message rather than deep inside the layer.
 */
template <class Communicator, class Backend, class = void>
struct is_communicator : std::false_type {};

template <class Communicator, class Backend>
struct is_communicator<
    Communicator, Backend,
    std::void_t<decltype(static_cast<int>(std::declval<const Communicator&>().rank())),
                decltype(static_cast<int>(std::declval<const Communicator&>().size())),
                decltype(std::declval<Communicator&>().all_gather(
                    std::declval<const double*>(), std::declval<double*>(), std::declval<std::int64_t>(),
                    std::declval<typename Backend::stream_type>()))>> : std::true_type {};

/// @brief Shorthand for is_communicator<Communicator, Backend>::value.
template <class Communicator, class Backend>
inline constexpr bool is_communicator_v = is_communicator<Communicator, Backend>::value;

}  // namespace batchnorm
