# cmake -DCHECK=<name> -DSOURCE_DIR=... -DCONSUMER_DIR=... -DWORK_DIR=... -DGENERATOR=...
#       -DCXX_COMPILER=... [-DCUDA_COMPILER=...] -P check.cmake
# One packaging check (see CMakeLists.txt beside this file). Builds use -j2.
cmake_minimum_required(VERSION 3.25)
set(prefix ${WORK_DIR}/prefix)           # the install of the "install" check
set(libbuild ${WORK_DIR}/library-build)  # its build tree
set(common -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER})

# run(<expect: 0 | fail> <log name> COMMAND...): runs, keeps the output, checks the exit code.
function(run expect name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  file(WRITE ${WORK_DIR}/${CHECK}-${name}.log "${out}")
  set(last_output "${out}" PARENT_SCOPE)
  if(expect STREQUAL "0" AND NOT rc EQUAL 0)
    message(FATAL_ERROR "${name}: failed (${rc}): ${ARGN}\n${out}")
  elseif(expect STREQUAL "fail" AND rc EQUAL 0)
    message(FATAL_ERROR "${name}: expected a failure, got success: ${ARGN}\n${out}")
  endif()
  message(STATUS "${name}: ok")
endfunction()
function(require_output name regex)
  if(NOT last_output MATCHES "${regex}")
    message(FATAL_ERROR "${name}: output does not match '${regex}':\n${last_output}")
  endif()
  message(STATUS "${name}: says '${CMAKE_MATCH_0}'")
endfunction()
function(require_file path)
  if(NOT EXISTS ${path})
    message(FATAL_ERROR "missing: ${path}")
  endif()
endfunction()

# configure_consumer(<dir> <expect> args...) / build_consumer(<dir> targets...)
function(configure_consumer dir expect)
  file(REMOVE_RECURSE ${dir})
  run(${expect} configure-${dir} ${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/${dir} ${common} ${ARGN})
  set(last_output "${last_output}" PARENT_SCOPE)
endfunction()
function(build_consumer dir)
  run(0 build-${dir} ${CMAKE_COMMAND} --build ${WORK_DIR}/${dir} -j2)
endfunction()

# A subproject consumer must find in its cache nothing of ours and no CUDA, and CUDA must
# not be among its languages. (project() itself always records batchnorm_SOURCE_DIR,
# _BINARY_DIR and _IS_TOP_LEVEL; a consumer that opted in to installing gets GNUInstallDirs'
# CMAKE_INSTALL_*DIR entries: pass "installing".)
function(check_consumer_untouched dir)
  set(forbidden "^(BATCHNORM|_bn|CMAKE_CUDA|CUDA|nvcc|CMAKE_INSTALL_[A-Z]*DIR)")
  if(ARGV1 STREQUAL "installing")
    set(forbidden "^(BATCHNORM|_bn|CMAKE_CUDA|CUDA|nvcc)")
  endif()
  file(STRINGS ${WORK_DIR}/${dir}/CMakeCache.txt entries REGEX "^[A-Za-z_][^:]*:")
  foreach(e IN LISTS entries)
    if(e MATCHES "^batchnorm_(SOURCE_DIR|BINARY_DIR|IS_TOP_LEVEL):")
      continue()
    endif()
    if(e MATCHES "${forbidden}" OR e MATCHES "^batchnorm")
      message(FATAL_ERROR "${dir}: batchnorm wrote a cache entry into the consumer: ${e}")
    endif()
  endforeach()
  file(READ ${WORK_DIR}/${dir}/enabled_languages.txt languages)
  if("CUDA" IN_LIST languages)
    message(FATAL_ERROR "${dir}: batchnorm enabled CUDA in a consumer that did not ask for it")
  endif()
  message(STATUS "${dir}: no batchnorm/CUDA cache entries, languages ${languages}")
endfunction()

if(CHECK STREQUAL "install")
  # What a user types, with every test/benchmark dependency hidden.
  file(REMOVE_RECURSE ${libbuild} ${prefix})
  run(0 configure ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${libbuild} ${common}
      -DCMAKE_DISABLE_FIND_PACKAGE_GTest=TRUE -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE
      -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=TRUE)
  require_output(configure "tests need GoogleTest.*nlohmann-json")
  run(0 install ${CMAKE_COMMAND} --install ${libbuild} --prefix ${prefix})
  foreach(f include/batchnorm/batchnorm.hpp include/batchnorm/cuda.cuh include/batchnorm/io/safetensors.hpp
            share/doc/batchnorm/LICENSE share/cmake/batchnorm/batchnormConfig.cmake
            share/cmake/batchnorm/batchnormConfigVersion.cmake share/cmake/batchnorm/batchnormTargets.cmake)
    require_file(${prefix}/${f})
  endforeach()
  message(STATUS "installed: headers, LICENSE, package")

elseif(CHECK STREQUAL "find_package")
  configure_consumer(fp 0 -DCONSUMER_HOW=find_package -DCMAKE_PREFIX_PATH=${prefix} -DCONSUMER_SAFETENSORS=ON
                     -DCONSUMER_COMPONENTS=cpu,safetensors)
  build_consumer(fp)
  run(0 run-fp ${WORK_DIR}/fp/consumer)
  run(0 run-fp-safetensors ${WORK_DIR}/fp/consumer_safetensors)
  # A component whose dependency is missing, and an unknown one: one clear message each.
  configure_consumer(fp-missing fail -DCONSUMER_HOW=find_package -DCMAKE_PREFIX_PATH=${prefix}
                     -DCONSUMER_COMPONENTS=safetensors -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=TRUE)
  require_output(missing-dependency "component \"safetensors\" needs nlohmann-json 3")
  configure_consumer(fp-bogus fail -DCONSUMER_HOW=find_package -DCMAKE_PREFIX_PATH=${prefix}
                     -DCONSUMER_COMPONENTS=bogus)
  require_output(unknown-component "batchnorm has no component \"bogus\"")
  # The build tree is a package too (headers from the source tree).
  configure_consumer(fp-buildtree 0 -DCONSUMER_HOW=find_package -Dbatchnorm_DIR=${libbuild})
  require_output(build-tree "batchnorm 0\\.1\\.0 from [^\n]*library-build")
  build_consumer(fp-buildtree)
  run(0 run-fp-buildtree ${WORK_DIR}/fp-buildtree/consumer)

elseif(CHECK STREQUAL "find_package_cuda")
  # nvcc compiles <batchnorm/cuda.cuh> against the installed package (no GPU needed to build).
  configure_consumer(fp-cuda 0 -DCONSUMER_HOW=find_package -DCMAKE_PREFIX_PATH=${prefix} -DCONSUMER_CUDA=ON
                     -DCONSUMER_COMPONENTS=cuda -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER} -DCMAKE_CUDA_ARCHITECTURES=90)
  build_consumer(fp-cuda)

elseif(CHECK STREQUAL "add_subdirectory")
  configure_consumer(subdir 0 -DCONSUMER_HOW=add_subdirectory -DCONSUMER_SOURCE=${SOURCE_DIR} -DCONSUMER_SAFETENSORS=ON)
  check_consumer_untouched(subdir)
  build_consumer(subdir)
  run(0 run-subdir ${WORK_DIR}/subdir/consumer)
  run(0 run-subdir-safetensors ${WORK_DIR}/subdir/consumer_safetensors)
  # Installing the consumer installs the consumer only.
  file(REMOVE_RECURSE ${WORK_DIR}/subdir-prefix)
  run(0 install-subdir ${CMAKE_COMMAND} --install ${WORK_DIR}/subdir --prefix ${WORK_DIR}/subdir-prefix)
  if(EXISTS ${WORK_DIR}/subdir-prefix/include/batchnorm OR EXISTS ${WORK_DIR}/subdir-prefix/share/cmake/batchnorm)
    message(FATAL_ERROR "subdir: the consumer's install installed batchnorm without being asked")
  endif()
  message(STATUS "subdir: the consumer's install holds only the consumer")

elseif(CHECK STREQUAL "fetchcontent")
  configure_consumer(fetch 0 -DCONSUMER_HOW=fetchcontent -DCONSUMER_SOURCE=${SOURCE_DIR} -DCONSUMER_INSTALL_BATCHNORM=ON)
  check_consumer_untouched(fetch installing)
  build_consumer(fetch)
  run(0 run-fetch ${WORK_DIR}/fetch/consumer)
  # This consumer opted in (BATCHNORM_INSTALL ON): its install carries batchnorm's package.
  file(REMOVE_RECURSE ${WORK_DIR}/fetch-prefix)
  run(0 install-fetch ${CMAKE_COMMAND} --install ${WORK_DIR}/fetch --prefix ${WORK_DIR}/fetch-prefix)
  require_file(${WORK_DIR}/fetch-prefix/include/batchnorm/batchnorm.hpp)
  require_file(${WORK_DIR}/fetch-prefix/share/cmake/batchnorm/batchnormConfig.cmake)
  message(STATUS "fetch: BATCHNORM_INSTALL=ON installs batchnorm with the consumer")

elseif(CHECK STREQUAL "first_lines")
  # The first lines a C++ user writes that cannot work stop with one error naming the fix.
  # compile_snippet(<name> <regex the output must match>)
  function(compile_snippet name regex)
    run(fail ${name} ${CXX_COMPILER} -std=c++17 -I${SOURCE_DIR}/include -I/usr/local/cuda/include
        -c ${CMAKE_CURRENT_LIST_DIR}/snippets/${name}.cpp -o ${WORK_DIR}/${name}.o)
    require_output(${name} "${regex}")
    string(REGEX MATCHALL "error:" errors "${last_output}")  # diagnostics, not echoed source lines
    list(LENGTH errors count)
    # The one error, plus at most the fatal "No such file" that stops the preprocessor.
    if(count GREATER 2)
      message(FATAL_ERROR "${name}: expected one error, got ${count}:\n${last_output}")
    endif()
  endfunction()
  compile_snippet(default_backend_in_plain_cpp "in plain C\\+\\+ write BatchNorm2d<T, batchnorm::cpu>")
  compile_snippet(cuda_header_in_plain_cpp "cuda.cuh is CUDA code: compile this file with nvcc")

else()
  message(FATAL_ERROR "unknown CHECK '${CHECK}'")
endif()
