# The CPU backend's threads: OpenMP, as PyTorch and oneDNN use. The headers compile to serial
# code without it (every `#pragma omp` is inside `#if defined(_OPENMP)`), so a compiler without
# OpenMP still builds and runs everything, single-threaded. When it is found,
# batchnorm::batchnorm carries OpenMP::OpenMP_CXX (the flag and the runtime) to its consumers;
# the installed package then finds OpenMP itself (cmake/BatchnormInstall.cmake sees the target
# in the link interface and batchnormConfig.cmake calls find_dependency(OpenMP)).
# BATCHNORM_USE_OPENMP=OFF leaves it out (a consumer that wants serial code, or its own flags).
if(PROJECT_IS_TOP_LEVEL)
  option(BATCHNORM_USE_OPENMP "Give the CPU backend OpenMP threads when OpenMP is found" ON)
elseif(NOT DEFINED BATCHNORM_USE_OPENMP)
  set(BATCHNORM_USE_OPENMP ON)
endif()
if(BATCHNORM_USE_OPENMP)
  find_package(OpenMP QUIET COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(batchnorm INTERFACE OpenMP::OpenMP_CXX)
  else()
    message(STATUS "batchnorm: OpenMP not found; the CPU backend runs single-threaded")
  endif()
endif()
