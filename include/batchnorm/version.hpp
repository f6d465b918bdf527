/**
 * @file version.hpp
 * @brief Library version (kept equal to the CMake project version).
 */
#pragma once

#define BATCHNORM_VERSION_MAJOR 0
#define BATCHNORM_VERSION_MINOR 1
#define BATCHNORM_VERSION_PATCH 0
