# MPI for SyncBatchNorm's tests, example and benchmark (issue 10): finds MPI's C++ bindings
# and sets BATCHNORM_HAVE_MPI and BATCHNORM_MPIEXEC_FLAGS (extra mpiexec flags: Open MPI needs
# --oversubscribe to start more ranks than cores, and --allow-run-as-root as root).
# The library's headers need none of this: <batchnorm/comm/mpi.hpp> needs <mpi.h>, which the
# consumer's MPI::MPI_CXX provides.
find_package(MPI COMPONENTS CXX QUIET)
set(BATCHNORM_HAVE_MPI OFF)
set(BATCHNORM_MPIEXEC_FLAGS "")
if(MPI_CXX_FOUND AND MPIEXEC_EXECUTABLE)
  set(BATCHNORM_HAVE_MPI ON)
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _bn_mpiexec_version ERROR_QUIET)
  if(_bn_mpiexec_version MATCHES "Open MPI|OpenRTE")
    list(APPEND BATCHNORM_MPIEXEC_FLAGS --oversubscribe)
    execute_process(COMMAND id -u OUTPUT_VARIABLE _bn_uid OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_bn_uid STREQUAL "0")
      list(APPEND BATCHNORM_MPIEXEC_FLAGS --allow-run-as-root)
    endif()
  endif()
endif()

# batchnorm_mpi_test(NAME <name> RANKS <n> COMMAND <exe> [args...]): a ctest running <exe>
# under mpiexec with <n> ranks.
function(batchnorm_mpi_test)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;RANKS" "COMMAND")
  add_test(NAME ${arg_NAME}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${arg_RANKS} ${BATCHNORM_MPIEXEC_FLAGS}
                   ${MPIEXEC_PREFLAGS} ${arg_COMMAND} ${MPIEXEC_POSTFLAGS})
endfunction()
