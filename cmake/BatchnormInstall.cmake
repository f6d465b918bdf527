# Installs the headers, LICENSE and a relocatable CMake package:
#   <prefix>/include/batchnorm/...
#   <prefix>/share/doc/batchnorm/LICENSE
#   <prefix>/share/cmake/batchnorm/{batchnormConfig,batchnormConfigVersion,batchnormTargets}.cmake
# so that find_package(batchnorm CONFIG REQUIRED [COMPONENTS cuda half safetensors]) gives
# batchnorm::batchnorm (and batchnorm::<component>). Nothing here needs a compiler run or a
# test dependency: `cmake -S . -B build && cmake --install build --prefix P` is enough.
#
# The package goes to share/ (not lib/): the library is header-only and the same for every
# architecture, like fmt's and CUTLASS's header-only installs; find_package searches both.
# Only the top-level project (or a consumer that set BATCHNORM_INSTALL) includes this file.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(BATCHNORM_INSTALL_CMAKEDIR ${CMAKE_INSTALL_DATAROOTDIR}/cmake/batchnorm)

target_include_directories(batchnorm INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
install(TARGETS batchnorm batchnorm_cuda batchnorm_half batchnorm_safetensors EXPORT batchnormTargets)
install(DIRECTORY include/batchnorm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DOCDIR})
install(EXPORT batchnormTargets NAMESPACE batchnorm:: DESTINATION ${BATCHNORM_INSTALL_CMAKEDIR})

# When batchnorm links OpenMP (the CPU backend's threads), the installed package finds OpenMP
# before it defines the targets (cmake/batchnormConfig.cmake.in).
get_target_property(_bn_links batchnorm INTERFACE_LINK_LIBRARIES)
set(BATCHNORM_DEPENDS_OPENMP OFF)
if(_bn_links MATCHES "OpenMP::OpenMP_CXX")
  set(BATCHNORM_DEPENDS_OPENMP ON)
endif()

# The generated files live in a folder of their own, so that pointing batchnorm_DIR at the
# build tree does not pick up the install-tree config; the build tree has its own below.
set(_bn_pkg ${CMAKE_CURRENT_BINARY_DIR}/cmake/install)
configure_package_config_file(cmake/batchnormConfig.cmake.in ${_bn_pkg}/batchnormConfig.cmake
  INSTALL_DESTINATION ${BATCHNORM_INSTALL_CMAKEDIR})
# Header-only and architecture independent: any 64-bit or 32-bit consumer may use it.
write_basic_package_version_file(${_bn_pkg}/batchnormConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${_bn_pkg}/batchnormConfig.cmake ${_bn_pkg}/batchnormConfigVersion.cmake
        DESTINATION ${BATCHNORM_INSTALL_CMAKEDIR})

# Build-tree package (top level only): -Dbatchnorm_DIR=<build dir> uses the headers of this
# source tree without installing. Same config file, targets exported from the build tree.
if(PROJECT_IS_TOP_LEVEL)
  export(EXPORT batchnormTargets NAMESPACE batchnorm:: FILE ${CMAKE_CURRENT_BINARY_DIR}/batchnormTargets.cmake)
  configure_package_config_file(cmake/batchnormConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/batchnormConfig.cmake
    INSTALL_DESTINATION ${CMAKE_CURRENT_BINARY_DIR} INSTALL_PREFIX ${CMAKE_CURRENT_BINARY_DIR})
  file(COPY_FILE ${_bn_pkg}/batchnormConfigVersion.cmake ${CMAKE_CURRENT_BINARY_DIR}/batchnormConfigVersion.cmake)
endif()
