# install() + exported target + batchnormConfig.cmake + version file, so that
# find_package(batchnorm CONFIG REQUIRED) and target batchnorm::batchnorm work from an install.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS batchnorm EXPORT batchnormTargets)
install(DIRECTORY include/batchnorm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT batchnormTargets NAMESPACE batchnorm::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchnorm)

configure_package_config_file(cmake/batchnormConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/batchnormConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchnorm)
# Header-only and architecture independent: any 64-bit or 32-bit consumer may use it.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/batchnormConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/batchnormConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/batchnormConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/batchnorm)
