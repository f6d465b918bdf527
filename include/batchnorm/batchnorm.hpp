/**
 * @file batchnorm.hpp
 * @brief Umbrella header for plain C++17 users: options, shapes, errors, the functional
 *        API and the layer classes with the CPU backend. Needs no CUDA.
 *        Add <batchnorm/cuda.cuh> (compiled by nvcc) for the CUDA backend.
 */
#pragma once

#include "args.hpp"
#include "batch_norm.hpp"
#include "errors.hpp"
#include "functional.hpp"
#include "options.hpp"
#include "shape.hpp"
#include "state.hpp"
#include "types.hpp"
#include "version.hpp"
