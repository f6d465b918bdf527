/**
 * @file detail/cpu/target.hpp
 * @brief Which instruction-set versions of the CPU loops this compiler and these flags allow
 *        (the one place that decides it; kernels.hpp dispatches, float_route.hpp converts).
 *
 * - BATCHNORM_CPU_X86_TARGETS: an x86 host compiler with GCC's target attributes,
 *   <immintrin.h> and <cpuid.h> (GCC, clang; not nvcc's device pass, nvc++ or icc).
 * - BATCHNORM_CPU_DISPATCH: the loops get AVX2 (and, with GCC, AVX-512) versions chosen at run
 *   time, because the build's own flags stop below AVX2 and BATCHNORM_NO_DISPATCH is not set.
 * - BATCHNORM_CPU_INLINE_ALL_BEGIN / _END: around the loops' code. A version is a function with
 *   a target attribute and `flatten`, so that the loops it calls are compiled into it for its
 *   instruction set. GCC's flatten inlines the whole call tree. Clang's (clang 14 here; LLVM
 *   issue 60689, made recursive only in 2026) inlines only the calls written in the function
 *   itself: every loop below them stayed a separate function compiled for the build's flags
 *   (x86-64: SSE2), so a clang build ran at about 2× GCC's time on float (8, 256, 56, 56) and at
 *   10× on half inference (harness, 1 thread, clang 14 -O3). With clang and dispatch, the
 *   functions between the markers are therefore declared always_inline (clang's attribute
 *   pragma), which makes the one level clang flattens reach every loop. Functions with a target
 *   attribute of their own stay outside the markers (clang refuses to force them into a caller
 *   without that target).
 */
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__CUDACC__) && \
    !defined(__NVCOMPILER) && !defined(__INTEL_COMPILER)
#define BATCHNORM_CPU_X86_TARGETS 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#if defined(BATCHNORM_CPU_X86_TARGETS) && !defined(__AVX2__) && !defined(BATCHNORM_NO_DISPATCH)
#define BATCHNORM_CPU_DISPATCH 1
#endif

#if defined(BATCHNORM_CPU_DISPATCH) && defined(__clang__)
#define BATCHNORM_CPU_INLINE_ALL_BEGIN \
  _Pragma("clang attribute push(__attribute__((always_inline)), apply_to = function)")
#define BATCHNORM_CPU_INLINE_ALL_END _Pragma("clang attribute pop")
#else
#define BATCHNORM_CPU_INLINE_ALL_BEGIN
#define BATCHNORM_CPU_INLINE_ALL_END
#endif
