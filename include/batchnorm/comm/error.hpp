/**
 * @file comm/error.hpp
 * @brief The error a communicator throws when its collective library (MPI, NCCL) fails.
 */
#pragma once

#include <stdexcept>

namespace batchnorm {

/// @brief A failed collective call (MPI, NCCL); the message names the call and the library's error.
class communication_error : public std::runtime_error { using runtime_error::runtime_error; };

}  // namespace batchnorm
