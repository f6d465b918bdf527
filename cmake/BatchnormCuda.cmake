# Decides whether the CUDA parts (tests, examples, benchmarks) are built, and picks
# CMAKE_CUDA_ARCHITECTURES when the user gave none.
#
# The default must work with and without a GPU present (CI has nvcc but no GPU), so it is
# never "native": it is the compute capability nvidia-smi reports when a GPU is there, and
# otherwise 90 (H100/H200, the GPUs this project is validated on).
set(BATCHNORM_HAVE_CUDA OFF)
if(BATCHNORM_ENABLE_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
      set(_bn_arch 90)
      find_program(_bn_nvidia_smi nvidia-smi)
      if(_bn_nvidia_smi)
        execute_process(COMMAND ${_bn_nvidia_smi} --query-gpu=compute_cap --format=csv,noheader
                        OUTPUT_VARIABLE _bn_cc RESULT_VARIABLE _bn_rc ERROR_QUIET
                        OUTPUT_STRIP_TRAILING_WHITESPACE)
        if(_bn_rc EQUAL 0 AND _bn_cc MATCHES "^([0-9]+)\\.([0-9]+)")
          set(_bn_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
        endif()
      endif()
      set(CMAKE_CUDA_ARCHITECTURES ${_bn_arch} CACHE STRING "CUDA architectures (batchnorm default)")
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(BATCHNORM_HAVE_CUDA ON)
    message(STATUS "batchnorm: CUDA enabled, architectures ${CMAKE_CUDA_ARCHITECTURES}")
  else()
    message(STATUS "batchnorm: no CUDA compiler found; building the CPU backend only")
  endif()
else()
  message(STATUS "batchnorm: CUDA disabled (BATCHNORM_ENABLE_CUDA=OFF)")
endif()
