/**
 * @file detail/cpu/kernels.hpp
 * @brief The CPU backend's loops, one per memory layout, shared by forward / backward
 *        (functional.inl) and the phases (phases.inl).
 *
 * Two layouts cover every case (see Geometry):
 *  - planes: NCHW per-channel with spatial > 1. Feature c is N contiguous planes of S values.
 *  - rows:   everything else: (N, C), channels-last (NHWC), and per-activation. Memory is M rows of
 *            W values, the feature of a value given by its position in the row (a permutation for
 *            per-activation channels-last); loops run across the row, so they vectorize across
 *            features.
 *
 * Speed comes from keeping every loop busy on arithmetic rather than waiting:
 *  - independent accumulators: a plane reduction keeps 32 lanes (16 for the three gradient
 *    sums), added pairwise in a fixed order at the end, so no add waits for the previous one;
 *  - the rows loops handle four rows at once (rows_at_once): a lane's center, coefficients and
 *    accumulators are loaded once per four rows, which is what bounded them on data in cache;
 *  - rows tensors larger than the caches (streaming_bytes), in rows of up to 512 values
 *    (streaming_max_lanes), take loops that read a row at a time,
 *    one sequential stream per buffer, written with GCC vectors of eight doubles (double8):
 *    four interleaved rows ran at 1.5–1.8× the time of a copy there;
 *  - fusion per NCHW channel while it is in L2: training forward (statistics, then normalize)
 *    and backward (gradient sums, then input gradient) read their inputs from memory once;
 *  - inner loops without branches (relu, residual, null outputs are template parameters),
 *    compiled for the widest instruction set available (see run_vectorized);
 *  - no allocation in a steady state (scratch()).
 *
 * Determinism: a reduction is split into tasks and chunks whose bounds (and, for rows, the
 * choice of the streaming loops) depend only on the shape and the element size, never on the
 * thread count; each task's partial result has its own slot,
 * and the slots are combined in task order. So the same input gives the same bits for any number
 * of OpenMP threads (and without OpenMP). Threads only decide who computes which slot.
 *
 * Accuracy: statistics stay in double, in chunks merged by Chan's formula (detail::merge). A plane
 * chunk (chunk_elements values) takes two passes while it is in L1 (mean of x − pivot, pivot =
 * the chunk's first value, then M2 about that mean). A rows chunk (row_chunk_elements values) is
 * read once for Σd and Σd² about a center, and takes those two passes from L2 only where the
 * single-pass M2 would lose more than 6 bits to cancellation (row_block_moments). A constant
 * feature gives mean = the value and M2 = 0 exactly (every term is 0 and every merge adds 0).
 */
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../args.hpp"
#include "../../options.hpp"
#include "../../shape.hpp"
#include "../convert.hpp"
#include "../moments.hpp"
#include "float_route.hpp"
#include "target.hpp"

namespace batchnorm::detail::cpu_impl {

// ---- tuning constants (shape-independent; changing one changes results in the last bits) ----

/// Values per statistics chunk of a plane: both passes over it run while it is in L1/L2.
inline constexpr std::int64_t chunk_elements = 8192;
/// Values per statistics chunk of a rows block: both passes run while it is in L2. Larger than
/// a plane's chunk because each chunk ends in one merge per position of the block.
inline constexpr std::int64_t row_chunk_elements = 32768;
/// Values per reduction task (the unit of work of a thread, one partial result each).
inline constexpr std::int64_t task_elements = 65536;
/// A channel plane set of at most this many bytes is one task: forward then normalizes it right
/// after its statistics, while it is still in L2 (x read from memory once).
inline constexpr std::int64_t fused_channel_bytes = 512 * 1024;
/// A channel whose backward inputs (x and dy, and y with relu) take at most this many bytes
/// together, and whose sums are one task (plane_tasks), has its gradient sums and input gradient
/// fused (backward_fusable): the second pass then reads them from L2 rather than from memory.
/// It was fused_channel_bytes for the inputs together, which left float (8, 64, 112, 112)
/// (2 × 392 KiB a channel) to two passes from memory: 4.8–6.0 → 4.1–4.3 ms (harness, 1 thread,
/// the same bits). With dx's lines too, that is within this machine's 2 MiB of L2 per core; on a
/// core with less, the second pass reads what is left from L3. Unlike the constants above, it
/// changes no bit: plane_tasks alone decides how the sums are split.
inline constexpr std::int64_t fused_backward_bytes = 1024 * 1024;
/// Positions per block of a rows task (lane arrays live on the stack).
inline constexpr std::int64_t max_block_width = 512;
/// Narrow rows are processed in groups of rows giving at least this many lanes.
inline constexpr std::int64_t min_lanes = 64;
/// Lanes of a plane's statistics: independent add chains (4 AVX-512 / 8 AVX2 vectors of
/// doubles) so that the adds' latency is hidden.
inline constexpr std::int64_t plane_lanes = 32;
/// Lanes of a plane's gradient sums (three sums per lane: 12 AVX2 registers).
inline constexpr std::int64_t plane_gradient_lanes = 16;
/// Rows the rows-layout loops handle together: each lane's center, coefficients and
/// accumulators are loaded once for this many rows (those loops are bound by loads, not by
/// arithmetic; a lane's terms of these rows are added pairwise, then to the lane).
inline constexpr std::int64_t rows_at_once = 4;
/// A statistics chunk read once (rows; planes of half types) keeps its single-pass
/// M2 = Σd² − (Σd)²/m when Σd² ≤ this × M2 (the subtraction then loses at most 6 bits of 53);
/// otherwise it takes two passes.
inline constexpr double single_pass_loss = 64.0;
/// Below this many values a call stays on the calling thread (starting threads costs more).
inline constexpr std::int64_t parallel_threshold = 32768;
/// How far ahead of its reads a pass over a channel's planes asks for memory (software
/// prefetch). The planes of an NCHW channel are short streams (6 KiB each for bfloat16
/// (8, 256, 56, 56)) C·S values apart, and the first pass over a channel spent a third of a
/// bfloat16 training forward waiting for its reads (perf annotate); ahead of a plane's end the
/// requests run into the next channel's plane, a thread's likely next task. Measured (1 thread,
/// that forward, harness): 3.1–3.4 ms without, 2.5–2.6 ms at 2 KiB, 2.4–2.6 ms at 4, 8 and
/// 16 KiB. Prefetching does not change results.
inline constexpr std::int64_t prefetch_bytes = 4096;
/// Values of an input-gradient run between its prefetch requests (input_gradient_run): requests
/// for four lines per input, then the values. Segments of 256 values (sixteen requests per input
/// at once) did not gain on float (8, 64, 112, 112) in the harness; 64 did in bench_cpu.
inline constexpr std::int64_t prefetch_segment = 64;

// ---- instruction set ----
// The library is headers compiled with the consumer's flags, often the x86-64 baseline (SSE2:
// two doubles per vector). Where the compiler allows it, each loop is also compiled for AVX2 and
// for AVX-512 (target attribute, everything inlined into it by flatten; with clang, whose
// flatten reaches one level, by always_inline too: target.hpp) and the widest the processor has
// is chosen at run time. Never with FMA contraction (AVX2 without the fma target;
// AVX-512, whose F subset includes FMA, with fp-contract=off): every version rounds every
// operation the same way, and the lane structure of the loops is explicit (not the vector
// width), so all versions give the same bits (tested: cpu_paths_test, SameBitsForEveryIsa).
// Defining BATCHNORM_NO_DISPATCH compiles the loops for the build's own flags only (about half
// the compile time; e.g. with -march=native, or where the build time matters more).
//
// GCC vectorizes at -O2 too, but with its "very cheap" cost model, which leaves loops whose trip
// count is not known to divide the vector width scalar: every loop here. A consumer building
// with -O2 (CMake's RelWithDebInfo, most distributions' flags) got 2–4× the -O3 time (fp32
// (8, 256, 56, 56), 1 thread: inference 3.6 vs 1.2 ms, backward 8.3 vs 3.2 ms; the same with
// -march=native). So with GCC the AVX2 and AVX-512 versions are compiled with the loop passes that
// -O3 adds to -O2 (GCC 12's list; the cost model alone left training forward at 3.3 vs 2.9 ms,
// loop unswitching and peeling among the rest closed it). The version for the build's own
// instruction set (-march=native, BATCHNORM_NO_DISPATCH, a processor without AVX2) does not
// get them: the passes reach only code inlined into the attributed function, so it would have
// to be flattened too, which made such builds compile 1.7× slower (layout_test 18.5 → 31.3 s).
// They change no result: no floating-point option is among them (tests/cpu_paths_test.cpp
// compares the versions' bits).
// At -O0 GCC runs no optimization pass, whatever the attribute says; at -O1 the vectorizer
// stays off.

/// The instruction sets a loop can be compiled for, in increasing width.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && !defined(__NVCOMPILER) && \
    !defined(__INTEL_COMPILER)
#define BATCHNORM_CPU_LOOP_PASSES                                                                              \
  "vect-cost-model=dynamic", "unswitch-loops", "peel-loops", "split-loops", "split-paths", "predictive-commoning", \
      "tree-loop-distribution", "tree-partial-pre", "version-loops-for-strides", "loop-interchange",              \
      "loop-unroll-and-jam", "gcse-after-reload", "ipa-cp-clone"
#endif

#if defined(BATCHNORM_CPU_LOOP_PASSES)
#define BATCHNORM_CPU_WITH_LOOP_PASSES optimize(BATCHNORM_CPU_LOOP_PASSES),
#else
#define BATCHNORM_CPU_WITH_LOOP_PASSES
#endif

#if defined(BATCHNORM_CPU_DISPATCH)  // target.hpp
template <class F>
__attribute__((target("avx2,f16c"), BATCHNORM_CPU_WITH_LOOP_PASSES flatten)) void run_avx2(F& f) {
  f();
}
// GCC only: clang ignores the optimize attribute and would contract a·b + c into an FMA.
#if defined(BATCHNORM_CPU_LOOP_PASSES)
#define BATCHNORM_CPU_DISPATCH_AVX512 1
template <class F>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,f16c"), optimize("fp-contract=off", BATCHNORM_CPU_LOOP_PASSES),
               flatten)) void
run_avx512(F& f) {
  f();
}
#endif
#endif

// Every function from here on is inlined into the versions above, with clang too (target.hpp).
BATCHNORM_CPU_INLINE_ALL_BEGIN

#if defined(BATCHNORM_CPU_DISPATCH)
/// Whether the processor converts half values (F16C, CPUID leaf 1 ECX bit 29; clang 14's
/// __builtin_cpu_supports does not know the name). The AVX2 and AVX-512 versions use it
/// (float_route.hpp, HalfConversion); every processor with AVX2 has had it so far.
inline bool processor_has_f16c() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
#endif

/// The widest instruction set this processor and this build can use.
inline Isa best_isa() {
#if defined(BATCHNORM_CPU_DISPATCH_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && processor_has_f16c())
    return Isa::avx512;
#endif
#if defined(BATCHNORM_CPU_DISPATCH)
  if (__builtin_cpu_supports("avx2") && processor_has_f16c()) return Isa::avx2;
#endif
  return Isa::baseline;
}

/**
 * @brief The instruction set the loops use: the widest available, capped by the environment
 *        variable BATCHNORM_CPU_ISA (`baseline`, `avx2`, `avx512`; read once) or by assigning
 *        this value (tests compare the versions). Results are the same bits for every value.
 */
inline std::atomic<int>& isa_in_use() {
  static std::atomic<int> isa{[] {
    int best = static_cast<int>(best_isa());
    if (const char* cap = std::getenv("BATCHNORM_CPU_ISA")) {
      const std::string c(cap);
      const int limit = c == "baseline" ? 0 : c == "avx2" ? 1 : c == "avx512" ? 2 : best;
      best = std::min(best, limit);
    }
    return best;
  }()};
  return isa;
}

/// The half conversion of the instruction set in use (float_route.hpp, HalfConversion): the
/// AVX-512 and AVX2 versions of the loops (whose processors have F16C, checked) use the
/// conversion instructions of their width; a build for an instruction set with them, its own.
inline HalfConversion half_conversion_in_use() {
#if defined(BATCHNORM_CPU_DISPATCH)  // (implies BATCHNORM_CPU_X86_TARGETS)
  const int isa = isa_in_use().load(std::memory_order_relaxed);
  if (isa >= static_cast<int>(Isa::avx512)) return HalfConversion::avx512;
  if (isa >= static_cast<int>(Isa::avx2)) return HalfConversion::f16c;
  return HalfConversion::integer;
#elif defined(BATCHNORM_CPU_X86_TARGETS) && defined(__AVX512F__)
  return HalfConversion::avx512;
#elif defined(BATCHNORM_CPU_X86_TARGETS) && defined(__F16C__)
  return HalfConversion::f16c;
#else
  return HalfConversion::integer;
#endif
}

/// f(), compiled for the instruction set in use (see above).
template <class F>
void run_vectorized(F&& f) {
#if defined(BATCHNORM_CPU_DISPATCH)
  const int isa = isa_in_use().load(std::memory_order_relaxed);
#if defined(BATCHNORM_CPU_DISPATCH_AVX512)
  if (isa >= static_cast<int>(Isa::avx512)) return run_avx512(f);
#endif
  if (isa >= static_cast<int>(Isa::avx2)) return run_avx2(f);
#endif
  f();
}

// ---- threads ----

/**
 * @brief body(i) for i in [0, count), on the caller's OpenMP threads (OMP_NUM_THREADS /
 *        omp_set_num_threads) when there are @p values >= parallel_threshold values to touch and
 *        the caller is not itself in a parallel region (no oversubscription); serially otherwise.
 *        body must not throw and must not depend on the thread running it.
 */
template <class Body>
void parallel_for(std::int64_t count, std::int64_t values, Body&& body) {
#if defined(_OPENMP)
  if (count > 1 && values >= parallel_threshold && !omp_in_parallel() && omp_get_max_threads() > 1) {
    // Each thread takes one contiguous range of the tasks (static), so it reads and writes one
    // long stream per buffer, which the hardware prefetchers follow. Tasks taken in runs of
    // 32 K values (dynamic) interleaved the threads' streams and were slower. bench_cpu at 2
    // threads (2-core AMD EPYC), time of PyTorch / ours in the same run, dynamic → static:
    // float NCHW (8, 256, 56, 56) training forward 2.16–2.21 → 3.13–3.29, its backward
    // 0.80–1.05 → 1.16–1.45; NHWC inference 0.93–0.96 → 1.12–1.16; bfloat16 NCHW backward
    // 0.66 → 0.93–0.97, inference 0.62–0.63 → 0.79–0.84. The tasks of one loop cost about the
    // same, so the split stays even.
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < count; ++i) run_vectorized([&] { body(i); });
    return;
  }
#else
  (void)values;
#endif
  for (std::int64_t i = 0; i < count; ++i) run_vectorized([&] { body(i); });
}

/// What one feature's coefficients cost (a square root and two or three divisions, ~10 ns) in
/// values of an elementwise pass, for parallel_for's threshold: 2048 features and more take the
/// threads.
inline constexpr std::int64_t feature_cost_values = 16;
/// Features per task of a per-feature pass.
inline constexpr std::int64_t features_per_task = 1024;

/**
 * @brief body(f) for every feature f in [0, count), on the caller's OpenMP threads when there are
 *        many (parallel_for), in the instruction set in use. A feature's coefficients cost as much
 *        as a few dozen values of the elementwise passes (square root and division run at ~3 ns
 *        each, also in vectors), so on wide rows tensors they were a quarter of an inference's
 *        time, all of it on one thread (float (128, 8192): 46 of 200 µs at 1 thread, of 124 µs
 *        at 2). body must write feature f's results only (so any partition gives the same bits).
 */
template <class Body>
void for_each_feature(std::int64_t count, Body&& body) {
  const std::int64_t tasks = (count + features_per_task - 1) / features_per_task;
  parallel_for(tasks, count * feature_cost_values, [&](std::int64_t task) {
    const std::int64_t end = std::min(count, (task + 1) * features_per_task);
    for (std::int64_t f = task * features_per_task; f < end; ++f) body(f);
  });
}

// ---- scratch memory ----

/// The roles of scratch memory; within one operation no role is in use twice.
enum class Scratch : int {
  feature_a, feature_b, feature_c, feature_d,  ///< per-feature arrays of forward / backward
  partial,                                     ///< per-task partial results of a reduction
  lanes,                                       ///< per-lane coefficient arrays of an elementwise pass
  route_lanes,                                 ///< per-lane float routes of a half-type elementwise pass
  roles
};

/// A cache line: the unit of scratch memory, so that every scratch array starts on a line (a
/// vector load of coefficients that straddles two lines costs two; measured 1.7× on a rows loop).
struct alignas(64) CacheLine {
  unsigned char bytes[64];
};

/// One thread's scratch buffer of one role.
struct ScratchBuffer {
  std::unique_ptr<CacheLine[]> data;
  std::size_t bytes = 0;
};

inline ScratchBuffer& scratch_buffer(Scratch role) {
  thread_local ScratchBuffer buffers[static_cast<int>(Scratch::roles)];
  return buffers[static_cast<int>(role)];
}

/**
 * @brief Memory for @p n values of @p E in role @p role, kept by the calling thread and reused by
 *        its later calls (grown, never shrunk). Why: a fresh allocation of a few hundred KiB is
 *        an mmap whose pages fault in on first touch, and on (N, C) shapes that cost more than the
 *        arithmetic; so in a steady state the CPU backend allocates nothing. Contents are
 *        undefined. Only the calling thread (outside parallel regions) takes scratch; the loops
 *        share its pointer.
 * @throws std::bad_alloc: every operation takes its scratch before its first write.
 */
template <class E>
E* scratch(Scratch role, std::int64_t n) {
  static_assert(std::is_trivially_copyable_v<E> && std::is_trivially_destructible_v<E> &&
                alignof(E) <= alignof(CacheLine));
  ScratchBuffer& b = scratch_buffer(role);
  const std::size_t bytes = static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(E);
  if (bytes > b.bytes) {
    const std::size_t units = (bytes + sizeof(CacheLine) - 1) / sizeof(CacheLine);
    b.data.reset(new CacheLine[units]);  // old buffer kept if this throws
    b.bytes = units * sizeof(CacheLine);
  }
  return std::launder(reinterpret_cast<E*>(b.data.get()));
}

/// f(std::true_type{}) or f(std::false_type{}): lifts a runtime flag out of an inner loop.
template <class F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// ---- geometry ----

struct Geometry {
  bool planes;        ///< NCHW per-channel, spatial > 1
  std::int64_t N, C, S;
  std::int64_t rows;   ///< rows layout: M
  std::int64_t width;  ///< rows layout: W (values per row)
  bool permuted;       ///< rows: per-activation channels-last (position j holds feature (j % C)·S + j / C)

  /// The feature of row position @p j (rows layout).
  [[nodiscard]] std::int64_t feature_at(std::int64_t j) const { return permuted ? (j % C) * S + j / C : j; }
};

inline Geometry geometry(const Shape& shape, Mode mode) {
  Geometry g{};
  g.N = shape.batch();
  g.C = shape.channels();
  g.S = shape.spatial();
  const bool last = shape.layout() == Layout::channels_last && g.S > 1;
  if (mode == Mode::per_activation) {
    g.planes = false;
    g.rows = g.N;
    g.width = g.C * g.S;
    g.permuted = last;
  } else if (!last && g.S > 1) {
    g.planes = true;
    g.rows = 0;
    g.width = 0;
    g.permuted = false;
  } else {
    g.planes = false;
    g.rows = g.N * g.S;
    g.width = g.C;
    g.permuted = false;
  }
  return g;
}

/// Reduction tasks per channel in the planes layout (1: the channel fits the fused budget).
inline std::int64_t plane_tasks(std::int64_t per_channel, std::int64_t element_size) {
  if (per_channel * element_size <= fused_channel_bytes) return 1;
  return (per_channel + task_elements - 1) / task_elements;
}

/// Calls run(n, s, length) for each contiguous piece of flat indices [begin, end) of a channel
/// (flat index = n·S + s).
template <class Run>
void for_each_run(std::int64_t begin, std::int64_t end, std::int64_t S, Run&& run) {
  while (begin < end) {
    const std::int64_t n = begin / S, s = begin % S;
    const std::int64_t length = std::min(S - s, end - begin);
    run(n, s, length);
    begin += length;
  }
}

/// The tiling of a rows-layout reduction: column blocks × row blocks (tasks), groups of rows.
struct RowTiling {
  std::int64_t block_width;    ///< positions per column block
  std::int64_t column_blocks;
  std::int64_t row_blocks;
  std::int64_t rows_per_block;
  std::int64_t group;          ///< rows per lane group (> 1 only when one block spans the row)

  RowTiling(std::int64_t M, std::int64_t W) {
    block_width = std::min<std::int64_t>(std::max<std::int64_t>(W, 1), max_block_width);
    column_blocks = (W + block_width - 1) / block_width;
    group = W < min_lanes ? (min_lanes + W - 1) / std::max<std::int64_t>(W, 1) : 1;
    const std::int64_t per_column_block = M * block_width;
    row_blocks = std::clamp<std::int64_t>(per_column_block / task_elements, 1, 256);
    row_blocks = std::min(row_blocks, std::max<std::int64_t>(M, 1));
    rows_per_block = (M + row_blocks - 1) / row_blocks;
  }
  [[nodiscard]] std::int64_t lanes(std::int64_t width) const { return group * width; }
};

/// The distance between per-lane coefficient arrays of @p lanes values of E in one scratch
/// buffer: whole cache lines, so that each array starts on a line as the buffer does.
template <class E = double>
std::int64_t lane_array_stride(std::int64_t lanes) {
  constexpr std::int64_t per_line = sizeof(CacheLine) / sizeof(E);
  return (lanes + per_line - 1) / per_line * per_line;
}

/// Whether a run of @p length values of @p size bytes prefetches: at least prefetch_bytes long.
inline bool prefetches(std::int64_t length, std::size_t size) {
  return length * static_cast<std::int64_t>(size) >= prefetch_bytes;
}

/// Asks for the cache lines prefetch_bytes ahead of the @p count values at @p p (one request per
/// 64-byte line). Integer arithmetic: the address may be past the buffer (a prefetch never faults).
template <class T>
BN_CONVERT_INLINE void prefetch_ahead(const T* p, std::int64_t count) {
#if defined(__GNUC__)
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(prefetch_bytes);
  for (std::int64_t o = 0; o < count * static_cast<std::int64_t>(sizeof(T)); o += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(first + static_cast<std::uintptr_t>(o)));
#else
  (void)p, (void)count;
#endif
}

// ---- eight values at a time (float, double and bfloat16 loops) ----

/// Whether T is bfloat16 storage: its float is its bits shifted left by 16, so eight values
/// widen with integer vector instructions (load8).
template <class T, class = void>
inline constexpr bool widens_by_shift = false;
template <class T>
inline constexpr bool widens_by_shift<T, std::void_t<typename convert<T>::format>> =
    std::is_same_v<typename convert<T>::format, bits::bfloat16_format>;

#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__NVCOMPILER)
#define BATCHNORM_CPU_EIGHT 1
/**
 * Eight doubles as a GCC / clang vector: the rows loops (for_lane_blocks) and the plane loops
 * (add_plane_rounds) of float, double and (reductions only) bfloat16 tensors, and of the floats
 * that half values are widened to, are written with it (load8 / store8; the reductions in the
 * AVX-512 version only, with_reduction_loads), so that eight values are loaded and widened at once, where GCC's own vectorization of a scalar loop loads sixteen
 * floats at full width and splits them. The type is lowered to SSE2 pairs, AVX2 or AVX-512 by
 * the instruction set in use; each operation is the scalar IEEE one per lane, so an element-wise
 * loop gives the bits of the scalar formula.
 */
using double8 = double __attribute__((vector_size(8 * sizeof(double))));
/// The types load8 widens: float, double and bfloat16 (the reductions take all three).
template <class T>
inline constexpr bool loads_eight = std::is_same_v<T, float> || std::is_same_v<T, double> || widens_by_shift<T>;
/// The types store8 rounds to: float and double (the element-wise loops take these). Rounding a
/// double to bfloat16 in one step is not a vector instruction; those loops keep convert<T>.
template <class T>
inline constexpr bool stores_eight = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Vectors pass by reference only: GCC and clang warn (-Wpsabi) that passing one by value without
// AVX-512 changes the ABI, even where every call is inlined.

/// Eight values from @p p (any alignment), widened to double exactly.
template <class T>
BN_CONVERT_INLINE void load8(const T* p, double8& v) {
  using float8 = float __attribute__((vector_size(8 * sizeof(float))));
  if constexpr (std::is_same_v<T, double>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, float>) {
    float8 narrow;
    std::memcpy(&narrow, p, sizeof narrow);
    v = __builtin_convertvector(narrow, double8);
  } else {
    static_assert(widens_by_shift<T>, "load8 widens float, double and bfloat16");
    using bits8 = std::uint16_t __attribute__((vector_size(8 * sizeof(std::uint16_t))));
    using word8 = std::uint32_t __attribute__((vector_size(8 * sizeof(std::uint32_t))));
    bits8 narrow;
    std::memcpy(&narrow, p, sizeof narrow);
    const word8 words = __builtin_convertvector(narrow, word8) << 16;
    float8 floats;
    std::memcpy(&floats, &words, sizeof floats);
    v = __builtin_convertvector(floats, double8);
  }
}

/// Eight values to @p p, rounded to T as static_cast does (convert<float>::from_double).
template <class T>
BN_CONVERT_INLINE void store8(T* p, const double8& v) {
  if constexpr (std::is_same_v<T, double>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    using float8 = float __attribute__((vector_size(8 * sizeof(float))));
    const float8 narrow = __builtin_convertvector(v, float8);
    std::memcpy(p, &narrow, sizeof narrow);
  }
}

/// Eight values loaded as load8 does, the loops' one way to load them (with_eight_loads).
struct PortableEightLoads {
  template <class T>
  BN_CONVERT_INLINE void operator()(const T* p, double8& v) const {
    load8(p, v);
  }
};

#if defined(BATCHNORM_CPU_X86_TARGETS)
/// Eight floats from @p p widened by one AVX-512 vcvtps2pd from memory. GCC 12 lowers load8's
/// __builtin_convertvector to two four-value conversions, an extract and an insert, even for
/// AVX-512: three more instructions on the shuffle port per eight values.
/// Outside the always_inline markers, as every function with a target of its own (target.hpp).
BATCHNORM_CPU_INLINE_ALL_END
__attribute__((target("avx512f"))) inline void load8_avx512(const float* p, double8& v) {
  // The zero-masked form with every lane kept: the same instruction, and GCC 12 does not warn
  // (-Wmaybe-uninitialized) about _mm512_cvtps_pd's undefined pass-through operand.
  const __m512d wide = _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_loadu_ps(p));
  std::memcpy(&v, &wide, sizeof v);
}

/// Eight bfloat16 values at @p p widened as load8 does: zero-extended to 32 bits, shifted to a
/// float's high half, and one vcvtps2pd (load8's lowering converts twice four values).
__attribute__((target("avx512f"))) inline void load8_bfloat16_avx512(const void* p, double8& v) {
  const __m256i words = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16);
  const __m512d wide = _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_castsi256_ps(words));
  std::memcpy(&v, &wide, sizeof v);
}
BATCHNORM_CPU_INLINE_ALL_BEGIN

/// load8, with floats and bfloat16 widened by one AVX-512 conversion each (load8_avx512,
/// load8_bfloat16_avx512).
struct Avx512EightLoads {
  template <class T>
  BN_CONVERT_INLINE void operator()(const T* p, double8& v) const {
    if constexpr (std::is_same_v<T, float>) load8_avx512(p, v);
    else if constexpr (widens_by_shift<T>) load8_bfloat16_avx512(p, v);
    else load8(p, v);
  }
};
#endif

#else
template <class T>
inline constexpr bool loads_eight = false;
template <class T>
inline constexpr bool stores_eight = false;
#endif

// ---- loads and stores of a loop body written for both widths (double8 and double) ----

/// One value read as a double: the counterpart of the eight-value loads for the lanes a loop
/// does one at a time.
struct ScalarLoads {
  template <class T>
  BN_CONVERT_INLINE void operator()(const T* p, double& v) const {
    v = convert<T>::to_double(*p);
  }
};

/// One value to @p p, rounded to T as static_cast does (store8's counterpart).
template <class T>
BN_CONVERT_INLINE void store_lanes(T* p, const double& v) {
  *p = convert<T>::from_double(v);
}

#if defined(BATCHNORM_CPU_EIGHT)
/// Eight values to @p p (store8), for a body written for both widths.
template <class T>
BN_CONVERT_INLINE void store_lanes(T* p, const double8& v) {
  store8(p, v);
}
#endif

/**
 * @brief f(Avx512EightLoads{}) in the AVX-512 version of the loops (or a build for AVX-512), else
 *        f(Fallback{}): the one place where a loop's loads follow the instruction set in use
 *        (with_eight_loads, with_reduction_loads).
 *
 * A function cannot ask which target it is compiled for, so the choice is made at run time, once
 * per loop, like with_half_instructions: the AVX-512 loads inline into the AVX-512 version; the
 * other versions hold a call to them that never runs (isa_in_use picks the AVX-512 version
 * first). Every load gives the same values (widening a float or a bfloat16 to double is exact),
 * so the choice changes the time only, never the bits.
 */
template <class Fallback, class F>
BN_CONVERT_INLINE decltype(auto) with_avx512_loads_or(F&& f) {
#if defined(BATCHNORM_CPU_DISPATCH_AVX512)
  if (isa_in_use().load(std::memory_order_relaxed) >= static_cast<int>(Isa::avx512)) return f(Avx512EightLoads{});
#elif defined(BATCHNORM_CPU_X86_TARGETS) && defined(__AVX512F__)
  return f(Avx512EightLoads{});
#endif
  return f(Fallback{});
}

#if defined(BATCHNORM_CPU_EIGHT)
/**
 * @brief f(load) with the eight-value load of the instruction set in use: Avx512EightLoads in
 *        the AVX-512 version of the loops (or a build for AVX-512), else PortableEightLoads
 *        (with_avx512_loads_or).
 *
 * Used where the loads are part of the arithmetic's cost: the four-row element-wise loops of
 * rows in cache (normalize_rows, input_gradient_rows); the reductions take with_reduction_loads,
 * which keeps the eight-value loads to the AVX-512 version. The streaming element-wise loops wait
 * on memory: the streaming normalize with these loads took no less time on NHWC (8, 256, 56, 56)
 * and 5 % more on (125000, 50) inference, so they keep load8 (benchmarks/README, round
 * seventeen).
 */
template <class F>
BN_CONVERT_INLINE decltype(auto) with_eight_loads(F&& f) {
  return with_avx512_loads_or<PortableEightLoads>(std::forward<F>(f));
}
#endif

/**
 * @brief f(load) with the loads of the reductions (the plane loops, add_row_sums,
 *        add_row_gradient_sums): Avx512EightLoads (lanes as double8) in the AVX-512 version of
 *        the loops (or a build for AVX-512), else ScalarLoads (lanes as doubles, which GCC
 *        vectorizes).
 *
 * A plane loop holds Lanes accumulators per sum, 32 to 64 doubles in all, and a four-row block
 * of the rows sums 10 to 17 vectors: within AVX-512's 32 vector registers, but not AVX2's 16 (a
 * double8 is two of them), where the double8 loops spilled to the stack. 1 thread,
 * BATCHNORM_CPU_ISA=avx2, GCC's vectorization (round seventeen's loops) against double8 (round
 * eighteen's): float NCHW (8, 256, 56, 56) training forward 4.8–5.3 ms against 8.9–9.6, backward
 * 5.1–5.8 against 10.0–10.2; bfloat16 NHWC training forward 4.9–5.3 against 8.1
 * (benchmarks/README, round nineteen).
 */
template <class F>
BN_CONVERT_INLINE decltype(auto) with_reduction_loads(F&& f) {
  return with_avx512_loads_or<ScalarLoads>(std::forward<F>(f));
}

// ---- plane loops: Lanes independent accumulators, acc[i mod Lanes], one center ----

#if defined(BATCHNORM_CPU_EIGHT)
/// Lanes 8k to 8k + 7 of each of Sums sums held as acc[s][k]: column[s] is sum s's eight lanes
/// (add_plane_rounds' double8 vectors, in local variables).
template <std::size_t Sums, std::int64_t Vectors>
struct LaneColumn {
  double8 (&acc)[Sums][Vectors];
  std::int64_t k;
  BN_CONVERT_INLINE double8& operator[](std::size_t s) const { return acc[s][k]; }
};
#endif

/// Lane k of each of Sums sums in the caller's arrays: column[s] is sums[s][k] (the plane loops'
/// lanes taken one at a time).
template <std::size_t Sums>
struct SumsColumn {
  double* const (&sums)[Sums];
  std::int64_t k;
  BN_CONVERT_INLINE double& operator[](std::size_t s) const { return sums[s][k]; }
};

/**
 * @brief The whole rounds of a plane loop from position @p i to at most @p end: Sums sums of
 *        Lanes lanes each (@p sums), lane j of each taking the terms of the positions ≡ j mod
 *        Lanes (counted from the run's start), in order. Returns the first position it did not
 *        do (fewer than Lanes are left).
 *
 * Before each round, @p prepare(p, Lanes) (prefetch, or widen the round's values); then, for each
 * group of lanes at position p, body(load, lanes, p) adds the terms of the positions [p, p + the
 * group's width) to lanes[s], sum s's lanes. With an eight-value load (with_reduction_loads:
 * under AVX-512) the lanes are held in Lanes / 8 double8 local variables per sum, in registers
 * (a LaneColumn), and stored back after the last round. With ScalarLoads they are summed one at a
 * time in the caller's arrays (a SumsColumn), which GCC vectorizes: copied into local variables
 * and back once per run, as the double8 path does, they cost short planes ((8, 2048, 7, 7): one
 * round and a tail of 17) 1.75× round seventeen's time under AVX2, which perf put on the copies
 * and on the tail's loads of the lanes just stored. In the baseline (SSE2) version, whose 16
 * registers hold the lanes no better, summing in the arrays made large float planes take up to
 * 14 % more than the copy and short ones up to 17 % less (benchmarks/README, round twenty). One
 * body serves both widths and the tail (add_plane_tail), so a plane loop's formula is written
 * once; each lane adds the same terms in the same order at either width.
 */
template <std::int64_t Lanes, std::size_t Sums, class Load, class Prepare, class Body>
BN_CONVERT_INLINE std::int64_t add_plane_rounds(std::int64_t i, std::int64_t end, double* const (&sums)[Sums],
                                                Load load, Prepare&& prepare, Body&& body) {
  if constexpr (std::is_same_v<Load, ScalarLoads>) {
    for (; i + Lanes <= end; i += Lanes) {
      prepare(i, Lanes);
      for (std::int64_t k = 0; k < Lanes; ++k) body(load, SumsColumn<Sums>{sums, k}, i + k);
    }
  } else {
#if defined(BATCHNORM_CPU_EIGHT)
    if (i + Lanes > end) return i;  // a short run: no whole round, lanes untouched
    static_assert(Lanes % 8 == 0, "whole double8 vectors per round");
    constexpr std::int64_t vectors = Lanes / 8;
    // One array per sum, as the sums' own arrays
    double8 acc[Sums][vectors];
    for (std::size_t s = 0; s < Sums; ++s)
      for (std::int64_t k = 0; k < vectors; ++k) load8(sums[s] + 8 * k, acc[s][k]);
    for (; i + Lanes <= end; i += Lanes) {
      prepare(i, Lanes);
      for (std::int64_t k = 0; k < vectors; ++k) body(load, LaneColumn<Sums, vectors>{acc, k}, i + 8 * k);
    }
    for (std::size_t s = 0; s < Sums; ++s)
      for (std::int64_t k = 0; k < vectors; ++k) store8(sums[s] + 8 * k, acc[s][k]);
#else
    static_assert(!sizeof(Load*), "the eight-value loads exist with GCC vectors only");
#endif
  }
  return i;
}

/// The positions [i, end) after a plane loop's last whole round (i a round's start, fewer than
/// Lanes positions): @p prepare(i, end − i), then body as in add_plane_rounds, one lane at a time.
template <std::size_t Sums, class Prepare, class Body>
void add_plane_tail(std::int64_t i, std::int64_t end, double* const (&sums)[Sums], Prepare&& prepare, Body&& body) {
  if (i >= end) return;
  prepare(i, end - i);
  for (std::int64_t j = 0; i + j < end; ++j) body(ScalarLoads{}, SumsColumn<Sums>{sums, j}, i + j);
}

/// A plane loop over positions [i, length) of values of T: whole rounds with the reductions'
/// loads where T loads eight (float, double, bfloat16: with_reduction_loads), else one lane at a
/// time, then the tail (add_plane_rounds, add_plane_tail).
template <std::int64_t Lanes, class T, std::size_t Sums, class Prepare, class Body>
BN_CONVERT_INLINE void add_plane_lanes(std::int64_t i, std::int64_t length, double* const (&sums)[Sums],
                                       Prepare&& prepare, Body&& body) {
  if constexpr (loads_eight<T>)
    i = with_reduction_loads([&](auto load) { return add_plane_rounds<Lanes>(i, length, sums, load, prepare, body); });
  else
    i = add_plane_rounds<Lanes>(i, length, sums, ScalarLoads{}, prepare, body);
  add_plane_tail(i, length, sums, prepare, body);
}

/// acc[i mod Lanes] += x[i] − center (or its square), over @p length values (lanes restart at x).
template <bool Square, std::int64_t Lanes, class T>
void add_plane_deviations(const T* __restrict x, std::int64_t length, double center, double* __restrict acc) {
  // The first pass reads from memory: ahead, into the planes that follow (short runs belong to
  // small tensors, which stay in the caches).
  const bool ahead = !Square && prefetches(length, sizeof(T));
  double* const sums[] = {acc};
  add_plane_lanes<Lanes, T>(
      0, length, sums,
      [&](std::int64_t p, std::int64_t count) {
        if (ahead) prefetch_ahead(x + p, count);
      },
      [&](auto load, const auto& lanes, std::int64_t p) {
        std::remove_reference_t<decltype(lanes[0])> d;
        load(x + p, d);
        d -= center;
        if constexpr (Square) d *= d;
        lanes[0] += d;
      });
}

/// Adds d = v − center to sum[0] and d² to sum[1] for the values at @p v (one or eight, as the
/// V of @p sum): the single-pass statistics' terms (widen_adding_sums).
template <class Load, class Sums>
BN_CONVERT_INLINE void add_deviation_and_square(Load load, const float* v, double center, const Sums& sum) {
  std::remove_reference_t<decltype(sum[0])> d;
  load(v, d);
  d -= center;
  sum[0] += d;
  sum[1] += d * d;
}

/// wide[i] = x[i] widened to float (exact: half types), and, with d = x[i] − center,
/// acc[i mod Lanes] += d as add_plane_deviations<false, Lanes> adds it and square[i mod Lanes]
/// += d² (lanes restart at x), both summed from @p wide (add_plane_rounds). Half values
/// with @p conversion's instructions are widened a block at a time (float_route.hpp), each
/// block's terms added right after, while it is in L1: the whole run widened first (32 KiB of
/// floats besides its 16 KiB of halves, L1 being 48 KiB) and then added took 1.1–1.2× as long
/// (half (8, 256, 56, 56) training forward, harness). Other values are widened a round at a time.
template <std::int64_t Lanes, class T>
void widen_adding_sums(const T* __restrict x, std::int64_t length, double center, float* __restrict wide,
                       double* __restrict acc, double* __restrict square, HalfConversion conversion) {
  using Format = typename convert<T>::format;
  static_assert(float_route_block % Lanes == 0, "whole lane rounds per widened block");
  const bool ahead = prefetches(length, sizeof(T));  // as add_plane_deviations' first pass
  double* const sums[] = {acc, square};
  auto add = [&](auto load, const auto& lanes, std::int64_t p) { add_deviation_and_square(load, wide + p, center, lanes); };
  std::int64_t i = 0;
#if defined(BATCHNORM_CPU_X86_TARGETS)
  if (takes_half_instructions<T>(conversion)) {
    // Whole blocks by the conversion instructions, each added while it is in L1
    i = with_half_instructions(conversion, [&](auto widen, auto) {
      auto widen_block = [&](std::int64_t p, std::int64_t) {
        if (p % float_route_block != 0) return;
        if (ahead) prefetch_ahead(x + p, float_route_block);
        widen(x + p, wide + p);
      };
      return with_reduction_loads([&](auto load) {
        return add_plane_rounds<Lanes>(0, length / float_route_block * float_route_block, sums, load, widen_block,
                                       add);
      });
    });
  }
#endif
  (void)conversion;
  // The rest widened a round at a time (bfloat16's conversion is a shift; half without the
  // instructions by convert<T>), each round's floats then summed
  add_plane_lanes<Lanes, float>(
      i, length, sums,
      [&](std::int64_t p, std::int64_t count) {
        if (ahead) prefetch_ahead(x + p, count);
        for (std::int64_t j = p; j < p + count; ++j) wide[j] = Format::widen(bits_of(x + j));
      },
      add);
}

/// v ← act((v − mean)·scale + bias [+ residual]), for one value (V = double) or eight (double8).
template <bool Residual, bool Relu, class V>
BN_CONVERT_INLINE void normalize_value(V& v, const V& residual, const V& mean, const V& scale, const V& bias) {
  v = (v - mean) * scale + bias;
  if constexpr (Residual) v += residual;
  if constexpr (Relu) apply_relu(v);
}

/// dx ← g·dy_scale + ((x − mean) − shift)·xmu_scale + constant (Training), or g·dy_scale (x not
/// read), for one value (V = double) or eight (double8).
template <bool Training, class V>
BN_CONVERT_INLINE void input_gradient_value(V& dx, const V& g, const V& x, const V& mean, const V& shift,
                                            const V& dy_scale, const V& xmu_scale, const V& constant) {
  if constexpr (Training) dx = g * dy_scale + ((x - mean) - shift) * xmu_scale + constant;
  else dx = g * dy_scale;
}

/// Gradient flowing into the normalization: dy, masked where a fused relu was inactive (y <= 0).
template <bool Relu, class T>
inline double upstream(const T* dy, const T* y, std::int64_t i) {
  const double g = convert<T>::to_double(dy[i]);
  if constexpr (Relu) return relu_backward(g, convert<T>::to_double(y[i]));
  else return g;
}

/// Adds g (dy, masked by relu_backward from y where Relu), g·(x − mean) and x − mean to sum[0],
/// sum[1] and sum[2] for the values at @p x, @p dy and @p y (one or eight, as the V of @p sum):
/// the plane gradient sums' terms (add_plane_gradient_sums).
template <bool Relu, class Load, class T, class Sums>
BN_CONVERT_INLINE void add_gradient_terms(Load load, const T* x, const T* dy, const T* y, double mean,
                                          const Sums& sum) {
  using V = std::remove_reference_t<decltype(sum[0])>;
  V g, d;
  load(dy, g);
  if constexpr (Relu) {
    V yv;
    load(y, yv);
    apply_relu_backward(g, yv);
  }
  load(x, d);
  d -= mean;
  sum[0] += g;
  sum[1] += g * d;
  sum[2] += d;
}

/// Lanes of Σg, Σg·(x − mean), Σ(x − mean) (g the upstream gradient), one mean. Half values with
/// @p conversion's instructions are widened a block at a time (float_route.hpp), each block's
/// terms added right after from the floats (the same terms: the widening is exact); the software
/// conversion of each value took about two thirds of half backward (perf, harness).
template <bool Relu, std::int64_t Lanes, class T>
void add_plane_gradient_sums(const T* __restrict x, const T* __restrict dy, const T* __restrict y,
                             std::int64_t length, double mean, double* __restrict s_dy, double* __restrict s_dy_xmu,
                             double* __restrict s_xmu, HalfConversion conversion) {
  static_assert(float_route_block % Lanes == 0, "whole lane rounds per widened block");
  const bool ahead = prefetches(length, sizeof(T));  // backward's first reads (as add_plane_deviations)
  auto prefetch = [&](std::int64_t p, std::int64_t count) {
    if (!ahead) return;
    prefetch_ahead(x + p, count);
    prefetch_ahead(dy + p, count);
    if constexpr (Relu) prefetch_ahead(y + p, count);
  };
  double* const sums[] = {s_dy, s_dy_xmu, s_xmu};
  std::int64_t i = 0;
#if defined(BATCHNORM_CPU_X86_TARGETS)
  if constexpr (has_float_route<T>) {
    if (takes_half_instructions<T>(conversion)) {
      i = with_half_instructions(conversion, [&](auto widen, auto) {
        constexpr std::int64_t B = float_route_block;
        alignas(64) float xf[B], gf[B], yf[Relu ? B : 1];
        std::int64_t block = 0;  // the position of xf[0]: rounds never cross a block (B % Lanes == 0)
        auto widen_block = [&](std::int64_t p, std::int64_t) {
          if (p % B != 0) return;
          block = p;
          prefetch(p, B);
          widen(x + p, xf);
          widen(dy + p, gf);
          if constexpr (Relu) widen(y + p, yf);
        };
        auto add = [&](auto load, const auto& lanes, std::int64_t p) {
          const std::int64_t o = p - block;
          add_gradient_terms<Relu>(load, xf + o, gf + o, yf + (Relu ? o : 0), mean, lanes);
        };
        return with_reduction_loads(
            [&](auto load) { return add_plane_rounds<Lanes>(0, length / B * B, sums, load, widen_block, add); });
      });
    }
  }
#endif
  (void)conversion;
  add_plane_lanes<Lanes, T>(i, length, sums, prefetch, [&](auto load, const auto& lanes, std::int64_t p) {
    add_gradient_terms<Relu>(load, x + p, dy + p, Relu ? y + p : y, mean, lanes);
  });
}

/// Sum of the @p Lanes lanes of a plane reduction, pairwise in a fixed order.
template <std::int64_t Lanes>
inline double sum_plane_lanes(const double* acc) {
  if constexpr (Lanes == 1) return acc[0];
  else return sum_plane_lanes<Lanes / 2>(acc) + sum_plane_lanes<Lanes / 2>(acc + Lanes / 2);
}

/// A pivot must be finite: a non-finite one would turn every term into NaN.
inline double finite_or_zero(double v) { return std::isfinite(v) ? v : 0.0; }

// ---- rows loops: `rows` rows of `width` lanes, row r at r·stride; lane j is position j ----

/// Splits @p rows contiguous rows of @p W values into lane rows: groups of @p group rows as one
/// row of group·W lanes (narrow rows, see RowTiling), then the rows left over as rows of W lanes.
/// Calls f(first_row, row_count, lane_width).
template <class F>
void for_lane_rows(std::int64_t rows, std::int64_t W, std::int64_t group, F&& f) {
  const std::int64_t grouped = rows / group;
  if (grouped > 0) f(std::int64_t{0}, grouped, group * W);
  if (rows % group != 0) f(grouped * group, rows % group, W);
}

/// Rows passes over tensors of more than this many bytes of x (8 MiB) take the streaming loops
/// (for_lane_blocks, and the one_row reductions) when their rows are at most streaming_max_lanes
/// wide: x then comes from memory rather than from the caches. Tests lower it to run those loops
/// on small tensors. The element-wise streaming loops give the same bits as the in-cache ones;
/// the streaming reductions sum in another order.
inline std::atomic<std::int64_t>& streaming_bytes() {
  static std::atomic<std::int64_t> bytes{std::int64_t{8} << 20};
  return bytes;
}

/// The widest rows the streaming loops take: their coefficient arrays (at most five of 512
/// doubles, 20 KiB) stay in L1 across rows. Wider rows stay on the four-row loops even from
/// memory: the streaming loops took them in blocks of 512 lanes, jumping from row to row, at
/// about twice the time (1 thread, caches evicted, AVX-512: (16384, 1024) inference 11.0 → 5.4
/// ms, training forward 21.5 → 11.0; (1024, 8192) 5.3 → 2.4 and 8.8 → 5.5).
inline constexpr std::int64_t streaming_max_lanes = 512;

/// Whether a rows pass over @p numel values of T in rows of @p width values takes the streaming
/// loops (streaming_bytes, streaming_max_lanes).
template <class T>
bool streams_from_memory(std::int64_t numel, std::int64_t width) {
  return width <= streaming_max_lanes &&
         numel * static_cast<std::int64_t>(sizeof(T)) > streaming_bytes().load(std::memory_order_relaxed);
}

/**
 * @brief A tag for a rows loop's body: compute Rows consecutive rows of V's lanes (double8:
 *        eight lanes, double: one). A tag because vectors do not pass by value (-Wpsabi).
 */
template <class V, std::int64_t Rows>
struct LaneBlock {
  using type = V;
  static constexpr std::int64_t rows = Rows;
};

/// acc += the sum of a block's rows' values @p v, in the four-row loops' order:
/// (v0 + v1) + (v2 + v3) for four rows, v0 for one.
template <class V, std::size_t Rows>
BN_CONVERT_INLINE void add_rows(V& acc, const V (&v)[Rows]) {
  static_assert(Rows == 1 || Rows == 4, "blocks of one row or of rows_at_once rows");
  if constexpr (Rows == 1) acc += v[0];
  else acc += (v[0] + v[1]) + (v[2] + v[3]);
}

/**
 * @brief The rows loop: rows [first, rows) in blocks of Rows rows. For the rows [r, r + Rows),
 *        body(load, LaneBlock<double8, Rows>{}, r, j) computes lanes [j, j + 8) with the
 *        eight-value loads @p load (PortableEightLoads or Avx512EightLoads: float and double
 *        tensors, and bfloat16 in the reductions, which store no T), and
 *        body(ScalarLoads{}, LaneBlock<double, Rows>{}, r, j) lane j, for the lanes after the
 *        last eight, or for every lane where @p load is ScalarLoads (the other types, the
 *        reductions outside the AVX-512 version (with_reduction_loads), and every type where
 *        the compiler has no GCC vectors). Returns the first row it did not do (fewer
 *        than Rows rows are left).
 *
 * One body for the vector lanes and the lanes left over, so both compute one formula, written
 * once per loop. Rows rows_at_once, for rows in cache: a load of the lanes' coefficients (or
 * sums) serves four rows (1.2× on (3136, 256) and (128, 8192) against one row at a time).
 * Rows 1, for tensors that stream from memory (streams_from_memory): consecutive rows are then
 * one sequential stream per buffer. The four-row loops, as GCC vectorized them from scalar
 * code, interleaved four streams per buffer and loaded sixteen floats to split them: on an NHWC
 * tensor larger than the caches they ran at 1.5–1.8× the time of a copy, one row at a time at
 * 1.1–1.3× (AVX-512). GCC vectors rather than GCC's vectorization of a scalar loop: it loads
 * eight floats and widens them in one instruction (with_eight_loads). Element-wise bodies give
 * the same bits for any block; the sums add each block's rows in add_rows' order.
 */
template <std::int64_t Rows, class Load, class Body>
std::int64_t for_lane_blocks(std::int64_t first, std::int64_t rows, std::int64_t width, Load load, Body&& body) {
#if defined(BATCHNORM_CPU_EIGHT)
  constexpr bool eight_at_once = !std::is_same_v<Load, ScalarLoads>;
#else
  constexpr bool eight_at_once = false;  // load is ScalarLoads
  (void)load;
#endif
  const std::int64_t eights_end = eight_at_once ? width / 8 * 8 : 0;
  std::int64_t r = first;
  for (; r + Rows <= rows; r += Rows) {
#if defined(BATCHNORM_CPU_EIGHT)
    if constexpr (eight_at_once)
      for (std::int64_t j = 0; j < eights_end; j += 8) body(load, LaneBlock<double8, Rows>{}, r, j);
#endif
    for (std::int64_t j = eights_end; j < width; ++j) body(ScalarLoads{}, LaneBlock<double, Rows>{}, r, j);
  }
  return r;
}

/// Rows [0, rows) by for_lane_blocks: one row at a time where @p one_row, else rows_at_once at a
/// time and the rows left over one at a time.
template <class Load, class Body>
void for_lane_block_rows(std::int64_t rows, std::int64_t width, bool one_row, Load load, Body&& body) {
  const std::int64_t r = one_row ? 0 : for_lane_blocks<rows_at_once>(0, rows, width, load, body);
  for_lane_blocks<1>(r, rows, width, load, body);
}

/// @p n 16-bit values at @p in as floats at @p out (exact): half by the conversion instructions
/// where the processor has them (@p conversion), else by convert<T> (bfloat16: a shift).
template <class T>
void widen_values(const T* __restrict in, std::int64_t n, float* __restrict out, HalfConversion conversion) {
  std::int64_t j = 0;
#if defined(BATCHNORM_CPU_X86_TARGETS)
  if (takes_half_instructions<T>(conversion))
    j = with_half_instructions(conversion, [&](auto widen, auto) {
      std::int64_t k = 0;
      for (; k + float_route_block <= n; k += float_route_block) widen(in + k, out + k);
      return k;
    });
#else
  (void)conversion;
#endif
  for (; j < n; ++j) out[j] = static_cast<float>(convert<T>::to_double(in[j]));
}

/// The rows of @p inputs 16-bit tensors (@p in, @p width values a row, @p stride apart),
/// rows_at_once at a time, widened to floats (exact) into @p buffers (rows of @p width), then
/// @p f(first, count) for rows [first, first + count): f sees the same values as the 16-bit rows,
/// in groups that start where the rows loops' groups start, so its sums keep their order.
/// Why: the rows loops converted each value alone (half: about 20 integer operations); the
/// widening converts 16 at once with the instructions. @p width ≤ max_block_width.
template <class T, class F>
void for_widened_rows(std::int64_t rows, std::int64_t width, std::int64_t stride, const T* const* in,
                      std::size_t inputs, float* const* buffers, F&& f) {
  const HalfConversion conversion = half_conversion_in_use();
  for (std::int64_t r = 0; r < rows; r += rows_at_once) {
    const std::int64_t count = std::min(rows_at_once, rows - r);
    for (std::size_t k = 0; k < inputs; ++k)
      for (std::int64_t q = 0; q < count; ++q)
        widen_values(in[k] + (r + q) * stride, width, buffers[k] + q * width, conversion);
    f(r, count);
  }
}

/// sum[j] += Σ_r (x[r][j] − center[j]) and square_sum[j] += Σ_r (x[r][j] − center[j])², both in
/// one read (row_block_moments: its single pass, and its two passes where that cancels).
/// @p one_row: a row at a time (tensors that stream from memory: one sequential stream instead
/// of four interleaved); otherwise four rows at once (for_lane_blocks). The two sum in different
/// orders.
template <class T>
void add_row_sums(const T* __restrict x, std::int64_t rows, std::int64_t width, std::int64_t stride,
                  const double* __restrict center, double* __restrict sum, double* __restrict square_sum,
                  bool one_row) {
#if defined(BATCHNORM_CPU_X86_TARGETS)
  // Half with the conversion instructions: widened, in the four-row order (one_row is for the
  // eight-value loads' streams). Harness, half NHWC (8, 256, 56, 56) training forward, 1 thread: see
  // benchmarks/README. bfloat16's conversion is a shift, which load8 does below; widened first
  // it took 2-3 % longer than GCC's vectorization of the scalar loop (round fourteen).
  if constexpr (has_float_route<T>) {
    if (takes_half_instructions<T>(half_conversion_in_use())) {
      alignas(64) float wide[rows_at_once * max_block_width];
      float* const buffers[] = {wide};
      const T* const inputs[] = {x};
      for_widened_rows(rows, width, stride, inputs, 1, buffers, [&](std::int64_t, std::int64_t count) {
        add_row_sums(static_cast<const float*>(wide), count, width, width, center, sum, square_sum, false);
      });
      return;
    }
  }
#endif
  auto sums_block = [&](auto load, auto block, std::int64_t r, std::int64_t j) {
    using Block = decltype(block);
    using V = typename Block::type;
    V c, d[Block::rows], squares[Block::rows], s, q;
    load(center + j, c);
    for (std::int64_t k = 0; k < Block::rows; ++k) {
      load(x + (r + k) * stride + j, d[k]);
      d[k] -= c;
      squares[k] = d[k] * d[k];
    }
    load(sum + j, s);
    load(square_sum + j, q);
    add_rows(s, d);
    add_rows(q, squares);
    store_lanes(sum + j, s);
    store_lanes(square_sum + j, q);
  };
#if defined(BATCHNORM_CPU_EIGHT)
  if constexpr (loads_eight<T>) {  // float, double, bfloat16
    with_reduction_loads([&](auto load) { for_lane_block_rows(rows, width, one_row, load, sums_block); });
    return;
  }
#endif
  // Half without the conversion instructions, and every type without GCC vectors: a lane at a
  // time, four rows at once (one_row is for the loads of float, double and bfloat16; half rows
  // sum in the four-row order with or without the instructions).
  (void)one_row;
  for_lane_block_rows(rows, width, false, ScalarLoads{}, sums_block);
}

/// Lanes of Σg, Σg·(x − mean), Σ(x − mean) over rows (g the upstream gradient). @p one_row: a
/// row at a time (tensors that stream from memory, as add_row_sums); otherwise four rows at
/// once. The two sum in different orders.
template <bool Relu, class T>
void add_row_gradient_sums(const T* __restrict x, const T* __restrict dy, const T* __restrict y, std::int64_t rows,
                           std::int64_t width, std::int64_t stride, const double* __restrict mean,
                           double* __restrict s_dy, double* __restrict s_dy_xmu, double* __restrict s_xmu,
                           bool one_row) {
#if defined(BATCHNORM_CPU_X86_TARGETS)
  // Half with the conversion instructions: widened, in the four-row order (as add_row_sums)
  if constexpr (has_float_route<T>) {
    if (takes_half_instructions<T>(half_conversion_in_use())) {
      alignas(64) float wide[3][rows_at_once * max_block_width];
      float* const buffers[] = {wide[0], wide[1], wide[2]};
      const T* const inputs[] = {x, dy, y};
      for_widened_rows(rows, width, stride, inputs, Relu ? 3 : 2, buffers, [&](std::int64_t, std::int64_t count) {
        add_row_gradient_sums<Relu>(static_cast<const float*>(wide[0]), wide[1], wide[2], count, width, width, mean,
                                    s_dy, s_dy_xmu, s_xmu, false);
      });
      return;
    }
  }
#endif
  auto gradient_sums_block = [&](auto load, auto block, std::int64_t r, std::int64_t j) {
    using Block = decltype(block);
    using V = typename Block::type;
    V m, g[Block::rows], d[Block::rows], gd[Block::rows], a, b, c;
    load(mean + j, m);
    for (std::int64_t k = 0; k < Block::rows; ++k) {
      const std::int64_t i = (r + k) * stride + j;
      load(dy + i, g[k]);
      if constexpr (Relu) {
        V yv;
        load(y + i, yv);
        apply_relu_backward(g[k], yv);
      }
      load(x + i, d[k]);
      d[k] -= m;
      gd[k] = g[k] * d[k];
    }
    load(s_dy + j, a);
    load(s_dy_xmu + j, b);
    load(s_xmu + j, c);
    add_rows(a, g);
    add_rows(b, gd);
    add_rows(c, d);
    store_lanes(s_dy + j, a);
    store_lanes(s_dy_xmu + j, b);
    store_lanes(s_xmu + j, c);
  };
#if defined(BATCHNORM_CPU_EIGHT)
  if constexpr (loads_eight<T>) {  // float, double, bfloat16
    with_reduction_loads([&](auto load) { for_lane_block_rows(rows, width, one_row, load, gradient_sums_block); });
    return;
  }
#endif
  // Half without the conversion instructions, and every type without GCC vectors, as add_row_sums
  (void)one_row;
  for_lane_block_rows(rows, width, false, ScalarLoads{}, gradient_sums_block);
}

/// y[i] = act((x[i] − mean)·scale + bias [+ residual[i]]).
template <bool Residual, bool Relu, class T>
inline void normalize_at(const T* x, const T* residual, T* y, std::int64_t i, double mean, double scale, double bias) {
  using conv = convert<T>;
  double v = conv::to_double(x[i]), r = 0.0;
  if constexpr (Residual) r = conv::to_double(residual[i]);
  normalize_value<Residual, Relu>(v, r, mean, scale, bias);
  y[i] = conv::from_double(v);
}

/// The four-row loop of normalize_rows for distinct buffers of 16-bit types (float and double
/// take for_lane_blocks where the compiler has GCC vectors); returns the rows it did.
template <bool Residual, bool Relu, class T>
std::int64_t normalize_rows_distinct(const T* __restrict x, const T* __restrict residual, T* __restrict y,
                                     std::int64_t rows, std::int64_t width, std::int64_t stride,
                                     const double* __restrict mean, const double* __restrict scale,
                                     const double* __restrict bias) {
  static_assert(rows_at_once == 4, "the loop below is written out for four rows");
  std::int64_t r = 0;
  for (; r + rows_at_once <= rows; r += rows_at_once) {
    const std::int64_t o0 = r * stride, o1 = o0 + stride, o2 = o1 + stride, o3 = o2 + stride;
    for (std::int64_t j = 0; j < width; ++j) {
      const double m = mean[j], sc = scale[j], b = bias[j];
      normalize_at<Residual, Relu>(x, residual, y, o0 + j, m, sc, b);
      normalize_at<Residual, Relu>(x, residual, y, o1 + j, m, sc, b);
      normalize_at<Residual, Relu>(x, residual, y, o2 + j, m, sc, b);
      normalize_at<Residual, Relu>(x, residual, y, o3 + j, m, sc, b);
    }
  }
  return r;
}

/// y = act((x − mean)·scale + bias [+ residual]) over rows, coefficients per lane. y may be x or
/// residual (in place: float and double as usual, each element read before it is written;
/// 16-bit types then one row at a time). @p streaming: the tensor is larger than the caches (see
/// for_lane_blocks).
/// Half types without residual take the float route row by row when every lane's coefficients
/// fit it (@p routes.usable: float_route.hpp, the same bits).
template <bool Residual, bool Relu, class T>
void normalize_rows(const T* x, const T* residual, T* y, std::int64_t rows, std::int64_t width, std::int64_t stride,
                    const double* mean, const double* scale, const double* bias, bool streaming,
                    const FloatRouteLanes& routes) {
  (void)streaming;  // without GCC vectors there is one loop
  // The exact (double) formula at element @p offset of lane @p lane: every path below ends with
  // it, for the elements its vector loop leaves (tails, float-route misses).
  auto exact_at = [&](std::int64_t offset, std::int64_t lane) {
    normalize_at<Residual, Relu>(x, residual, y, offset, mean[lane], scale[lane], bias[lane]);
  };
  if constexpr (!Residual && has_float_route<T>) {
    if (routes.usable) {
      const HalfConversion conversion = half_conversion_in_use();
#if defined(BATCHNORM_CPU_X86_TARGETS)
      // Under AVX-512, all rows at once by the hand-written blocks (misses pooled over rows), the
      // rows' tails after them
      if (conversion == HalfConversion::avx512) {
        const std::int64_t done = normalize_blocks_avx512<Relu>(x, y, rows, width, stride,
                                                                LaneFloatRoute{routes, mean, scale, bias}, exact_at);
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t j = done; j < width; ++j) exact_at(r * stride + j, j);
        return;
      }
#endif
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t row = r * stride;
        auto exact = [&](std::int64_t begin, std::int64_t end) {
          for (std::int64_t j = begin; j < end; ++j) exact_at(row + j, j);
        };
        exact(normalize_float_route<Relu>(x + row, y + row, width, routes, exact, conversion), width);
      }
      return;
    }
  }
#if defined(BATCHNORM_CPU_EIGHT)
  if constexpr (stores_eight<T>) {  // store8 takes float and double
    // Each value is read before it is written, so in place too.
    auto normalize_block = [&](auto load, auto block, std::int64_t r, std::int64_t j) {
      using Block = decltype(block);
      using V = typename Block::type;
      V m, sc, b;
      load(mean + j, m);
      load(scale + j, sc);
      load(bias + j, b);
      for (std::int64_t k = 0; k < Block::rows; ++k) {
        const std::int64_t i = (r + k) * stride + j;
        V v, res{};
        load(x + i, v);
        if constexpr (Residual) load(residual + i, res);
        normalize_value<Residual, Relu>(v, res, m, sc, b);
        store_lanes(y + i, v);
      }
    };
    // Streaming: load8, as the loop waits on memory (with_eight_loads' note)
    if (streaming) for_lane_block_rows(rows, width, true, PortableEightLoads{}, normalize_block);
    else with_eight_loads([&](auto load) { for_lane_block_rows(rows, width, false, load, normalize_block); });
    return;
  }
#endif
  std::int64_t r = 0;
  if (y != x && (!Residual || y != residual))
    r = normalize_rows_distinct<Residual, Relu>(x, residual, y, rows, width, stride, mean, scale, bias);
  for (; r < rows; ++r)
    for (std::int64_t j = 0; j < width; ++j) exact_at(r * stride + j, j);
}

// ---- statistics ----

/// (count, mean, M2) of channel @p c's flat indices [begin, end), planes layout.
template <class T>
Welford<double> plane_range_moments(const Geometry& g, const T* x, std::int64_t c, std::int64_t begin,
                                    std::int64_t end) {
  using conv = convert<T>;
  Welford<double> total;
  const T* channel = x + c * g.S;
  const std::int64_t plane_stride = g.C * g.S;
  for (std::int64_t b = begin; b < end; b += chunk_elements) {
    const std::int64_t e = std::min(end, b + chunk_elements);
    const double pivot = finite_or_zero(conv::to_double(channel[(b / g.S) * plane_stride + b % g.S]));
    const auto m = e - b;
    double mean = 0.0;
    alignas(64) double acc[plane_lanes] = {};
    if constexpr (has_float_route<T>) {
      // Half types: one read, as row_block_moments: Σd and Σd² about a center (the range's
      // running mean after its first chunk, the pivot before), M2 = Σd² − (Σd)²/m, kept while
      // the subtraction loses at most log2(single_pass_loss) bits. The chunk is widened to floats
      // as it goes (exact; 32 KiB, in L1); on cancellation (a pivot far from the mean, or a
      // non-finite value) the second pass of the two-pass formula runs over those floats.
      // Measured (bfloat16 (8, 256, 56, 56), 1 thread, harness): see benchmarks/README.
      alignas(64) float wide[chunk_elements];
      alignas(64) double square[plane_lanes] = {};
      const double center = total.count == 0 ? pivot : finite_or_zero(total.mean);
      std::int64_t k = 0;
      const HalfConversion conversion = half_conversion_in_use();
      for_each_run(b, e, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
        widen_adding_sums<plane_lanes>(channel + n * plane_stride + s, length, center, wide + k, acc, square,
                                       conversion);
        k += length;
      });
      const double sum = sum_plane_lanes<plane_lanes>(acc);
      const double square_sum = sum_plane_lanes<plane_lanes>(square);
      mean = center + sum / static_cast<double>(m);
      const double m2 = square_sum - sum * (sum / static_cast<double>(m));
      if (m2 * single_pass_loss >= square_sum) {  // false for NaN
        total = merge(total, Welford<double>{mean, m2, m});
        continue;
      }
      std::fill(acc, acc + plane_lanes, 0.0);
      std::int64_t o = 0;
      for_each_run(b, e, g.S, [&](std::int64_t, std::int64_t, std::int64_t length) {
        add_plane_deviations<true, plane_lanes>(wide + o, length, mean, acc);
        o += length;
      });
    } else {
      for_each_run(b, e, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
        add_plane_deviations<false, plane_lanes>(channel + n * plane_stride + s, length, pivot, acc);
      });
      mean = pivot + sum_plane_lanes<plane_lanes>(acc) / static_cast<double>(m);
      std::fill(acc, acc + plane_lanes, 0.0);
      for_each_run(b, e, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
        add_plane_deviations<true, plane_lanes>(channel + n * plane_stride + s, length, mean, acc);
      });
    }
    total = merge(total, Welford<double>{mean, sum_plane_lanes<plane_lanes>(acc), m});
  }
  return total;
}

/**
 * @brief Moments of positions [c0, c0 + width) over rows [r0, r1), rows layout, merged into @p out.
 *
 * Chunks of row_chunk_elements values are read once (add_row_sums: Σd and Σd², d = x − center),
 * with the block's running mean as the center after its first chunk (that chunk's first row
 * before). M2 = Σd² − (Σd)²/m loses log2(Σd² / M2) bits to cancellation: when that passes
 * log2(single_pass_loss) for some position of the chunk (a center far from the mean, or a
 * non-finite value), the chunk is taken again in two passes from L2 (mean about its first row,
 * then M2 about that mean), as every chunk was before: one read instead of two cut the (3136,
 * 256) training forward 0.213 → 0.187 ms (1 thread, in cache, AVX-512). @p streaming (x larger
 * than the caches): the read goes a row at a time, one sequential stream instead of four
 * interleaved (1.16× on an NHWC (8, 256, 56, 56) float tensor, 1.2× slower on data in cache).
 */
template <class T>
void row_block_moments(const Geometry& g, const RowTiling& t, const T* x, std::int64_t r0, std::int64_t r1,
                       std::int64_t c0, std::int64_t width, bool streaming, Welford<double>* out) {
  using conv = convert<T>;
  const std::int64_t W = g.width;
  const std::int64_t L = t.lanes(width);
  alignas(64) double center[max_block_width];  // group·width <= max(2·min_lanes, max_block_width)
  alignas(64) double acc[max_block_width];
  const std::int64_t chunk_rows = std::max<std::int64_t>(t.group, row_chunk_elements / width);
  // The block's running (mean, M2) per position, merged chunk by chunk; every position has the
  // same count, so the merge runs without count branches over all positions (vectorized).
  alignas(64) double run_mean[max_block_width];
  alignas(64) double run_m2[max_block_width];
  alignas(64) double square_sum[max_block_width];
  std::int64_t run_count = 0;
  // Σd into acc and Σd² into square_sum over rows [a, b), each summed over the lane groups.
  auto sums = [&](std::int64_t a, std::int64_t b, bool one_row) {
    std::fill(acc, acc + L, 0.0);
    std::fill(square_sum, square_sum + L, 0.0);
    if (t.group > 1)  // width == W: the rows are contiguous
      for_lane_rows(b - a, W, t.group, [&](std::int64_t first, std::int64_t count, std::int64_t lanes) {
        add_row_sums(x + (a + first) * W, count, lanes, lanes, center, acc, square_sum, one_row);
      });
    else
      add_row_sums(x + a * W + c0, b - a, width, W, center, acc, square_sum, one_row);
    for (std::int64_t j = 0; j < width; ++j) {
      double s = acc[j], q = square_sum[j];
      for (std::int64_t k = 1; k < t.group; ++k) {
        s += acc[k * width + j];
        q += square_sum[k * width + j];
      }
      acc[j] = s;
      square_sum[j] = q;
    }
  };
  auto set_center = [&](auto&& value) {
    for (std::int64_t j = 0; j < width; ++j) center[j] = value(j);
    for (std::int64_t j = width; j < L; ++j) center[j] = center[j % width];
  };
  for (std::int64_t a = r0; a < r1; a += chunk_rows) {
    const std::int64_t b = std::min(r1, a + chunk_rows);
    const double m = static_cast<double>(b - a);
    auto first_row = [&](std::int64_t j) { return finite_or_zero(conv::to_double(x[a * W + c0 + j])); };
    // One read: Σd and Σd² about a center (the block's running mean, or the chunk's first row),
    // M2 = Σd² − (Σd)²/m. The subtraction loses log2(Σd² / M2) bits; while that is at most
    // single_pass_loss (the center within ~8 standard deviations of the mean) M2 keeps 47 bits.
    if (run_count == 0) set_center(first_row);
    else set_center([&](std::int64_t j) { return finite_or_zero(run_mean[j]); });
    sums(a, b, streaming);
    bool exact = true;
    for (std::int64_t j = 0; j < width; ++j) {
      const double m2 = square_sum[j] - acc[j] * (acc[j] / m);
      exact &= m2 * single_pass_loss >= square_sum[j];  // false for NaN
    }
    if (exact) {
      for (std::int64_t j = 0; j < width; ++j) {
        const double s = acc[j];
        acc[j] = square_sum[j] - s * (s / m);
        center[j] = center[j] + s / m;
      }
    } else {
      // Cancellation (or a non-finite value): two passes from L2, the mean about the chunk's
      // first row, then M2 (Σd² of the second pass) about that mean.
      set_center(first_row);
      sums(a, b, false);
      set_center([&](std::int64_t j) { return center[j] + acc[j] / m; });
      sums(a, b, false);
      std::copy(square_sum, square_sum + width, acc);
    }
    if (run_count == 0) {
      std::copy(center, center + width, run_mean);
      std::copy(acc, acc + width, run_m2);
    } else {
      const double b_share = static_cast<double>(b - a) / static_cast<double>(run_count + (b - a));
      const double count_a = static_cast<double>(run_count);
      for (std::int64_t j = 0; j < width; ++j) merge_nonempty(run_mean[j], run_m2[j], center[j], acc[j], count_a, b_share);
    }
    run_count += b - a;
  }
  if (run_count == 0) return;
  for (std::int64_t j = 0; j < width; ++j) out[j] = merge(out[j], Welford<double>{run_mean[j], run_m2[j], run_count});
}

/**
 * @brief Takes, ahead of an operation's first write, the largest scratch its loops will take
 *        (partial results, lane arrays), so that none of them can throw std::bad_alloc later.
 */
template <class T>
void reserve_scratch(const Shape& shape, Mode mode) {
  const Geometry g = geometry(shape, mode);
  if (g.planes) {
    scratch<Welford<double>>(Scratch::partial, g.C * plane_tasks(g.N * g.S, sizeof(T)));
    return;
  }
  const RowTiling t(g.rows, g.width);
  scratch<Welford<double>>(Scratch::partial, t.row_blocks * g.width);
  scratch<double>(Scratch::lanes, 5 * lane_array_stride(t.lanes(g.width)));
  // the float routes' arrays, normalize's or the input gradient's (the more)
  constexpr std::int64_t route_arrays = std::max(FloatRouteLanes::count, FloatGradientRouteLanes::count);
  if constexpr (has_float_route<T>)
    scratch<float>(Scratch::route_lanes, route_arrays * lane_array_stride<float>(t.lanes(g.width)));
}

/**
 * @brief Mean and M2 of every feature of x (F = feature_count values each). Forward and
 *        phases::local_statistics share it, so that one shard reproduces forward exactly.
 */
template <class T>
void shard_moments(const Shape& shape, Mode mode, const T* x, double* mean, double* m2) {
  const std::int64_t features = feature_count(shape, mode);
  std::fill(mean, mean + features, 0.0);
  std::fill(m2, m2 + features, 0.0);
  if (reduction_count(shape, mode) == 0 || features == 0) return;
  const Geometry g = geometry(shape, mode);
  const std::int64_t numel = shape.numel();
  if (g.planes) {
    const std::int64_t per_channel = g.N * g.S;
    const std::int64_t tasks = plane_tasks(per_channel, sizeof(T));
    const std::int64_t per_task = (per_channel + tasks - 1) / tasks;
    Welford<double>* partial = scratch<Welford<double>>(Scratch::partial, g.C * tasks);
    parallel_for(g.C * tasks, numel, [&](std::int64_t i) {
      const std::int64_t c = i / tasks, k = i % tasks;
      partial[i] = plane_range_moments(g, x, c, k * per_task, std::min(per_channel, (k + 1) * per_task));
    });
    for_each_feature(g.C, [&](std::int64_t c) {
      Welford<double> w;
      for (std::int64_t k = 0; k < tasks; ++k) w = merge(w, partial[c * tasks + k]);
      mean[c] = w.mean;
      m2[c] = w.m2;
    });
    return;
  }
  const RowTiling t(g.rows, g.width);
  Welford<double>* partial = scratch<Welford<double>>(Scratch::partial, t.row_blocks * g.width);
  std::fill(partial, partial + t.row_blocks * g.width, Welford<double>{});
  const bool streaming = streams_from_memory<T>(numel, g.width);
  parallel_for(t.row_blocks * t.column_blocks, numel, [&](std::int64_t i) {
    const std::int64_t rb = i / t.column_blocks, cb = i % t.column_blocks;
    const std::int64_t r0 = rb * t.rows_per_block, r1 = std::min(g.rows, r0 + t.rows_per_block);
    const std::int64_t c0 = cb * t.block_width, width = std::min(g.width - c0, t.block_width);
    row_block_moments(g, t, x, r0, r1, c0, width, streaming, partial + rb * g.width + c0);
  });
  for_each_feature(g.width, [&](std::int64_t j) {  // position j holds one feature
    Welford<double> w;
    for (std::int64_t rb = 0; rb < t.row_blocks; ++rb) w = merge(w, partial[rb * g.width + j]);
    const std::int64_t f = g.feature_at(j);
    mean[f] = w.mean;
    m2[f] = w.m2;
  });
}

// ---- normalize ----

/// y = act((x − mean)·scale + bias [+ residual]) over @p length values, one feature (x may be y).
/// Half types without residual take the float route (float_route.hpp: the same bits, ~2× fewer
/// instructions), the values it misses and the rest the double formula.
template <bool Residual, bool Relu, class T>
void normalize_run(const T* x, const T* residual, T* y, std::int64_t length, double mean, double scale, double bias) {
  auto exact = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) normalize_at<Residual, Relu>(x, residual, y, i, mean, scale, bias);
  };
  if constexpr (!Residual && has_float_route<T>) {
    const SameFloatRoute route(mean, scale, bias);
    const std::int64_t done = route.k.usable ? normalize_float_route<Relu>(x, y, length, route, exact, half_conversion_in_use()) : 0;
    if (done == length) return;
    // the tail as a run of its own (a loop from `done` draws a false -Waggressive-loop-optimizations)
    x += done;
    y += done;
    length -= done;
  }
  exact(0, length);
}

/// Rows per elementwise piece (any partition gives the same bits: elementwise).
inline std::int64_t rows_per_piece(std::int64_t W) { return std::max<std::int64_t>(1, task_elements / std::max<std::int64_t>(W, 1)); }

/// y = act(affine(x) [+ residual]) for plane @p p = n·C + c (planes layout; x may be y).
template <class T>
void normalize_plane(const Geometry& g, std::int64_t p, const T* x, const T* residual, bool relu_on,
                     const Affine<double>& affine, T* y) {
  const std::int64_t o = p * g.S;
  with_flag(residual != nullptr, [&](auto res) {
    with_flag(relu_on, [&](auto rl) {
      normalize_run<decltype(res)::value, decltype(rl)::value>(x + o, residual ? residual + o : nullptr, y + o, g.S,
                                                                affine.mean, affine.scale, affine.bias);
    });
  });
}

/// y = act(affine_f(x) [+ residual]) for every element: forward's and phases::normalize's last
/// pass. On the CPU an Affine has prescale 1 and pivot 0, so affine(x) = (x − mean)·scale + bias
/// (the same bits as Affine::apply).
template <class T>
void normalize_elements(const Shape& shape, Mode mode, const T* x, const T* residual, Activation activation,
                        const Affine<double>* affine, T* y) {
  const std::int64_t numel = shape.numel();
  if (numel == 0) return;
  const Geometry g = geometry(shape, mode);
  const bool relu_on = activation == Activation::relu;
  if (g.planes) {
    parallel_for(g.N * g.C, numel,
                 [&](std::int64_t p) { normalize_plane(g, p, x, residual, relu_on, affine[p % g.C], y); });
    return;
  }
  const RowTiling t(g.rows, g.width);
  const std::int64_t W = g.width, L = t.lanes(W);
  const std::int64_t stride = lane_array_stride(L);
  double* mean = scratch<double>(Scratch::lanes, 3 * stride);
  double* scale = mean + stride;
  double* bias = scale + stride;
  // lane j holds position j mod W (counted along: a division per lane cost as much as the copy)
  for (std::int64_t j = 0, position = 0; j < L; ++j, position = position + 1 == W ? 0 : position + 1) {
    const Affine<double>& a = affine[g.feature_at(position)];
    mean[j] = a.mean;
    scale[j] = a.scale;
    bias[j] = a.bias;
  }
  FloatRouteLanes routes;
  if constexpr (has_float_route<T>) {
    if (residual == nullptr) {
      const std::int64_t float_stride = lane_array_stride<float>(L);
      routes.place(scratch<float>(Scratch::route_lanes, FloatRouteLanes::count * float_stride), float_stride);
      for (std::int64_t j = 0; j < L; ++j) routes.set(j, float_route(mean[j], scale[j], bias[j]));
    }
  }
  const std::int64_t piece = std::max(t.group, rows_per_piece(W) / t.group * t.group);
  const std::int64_t pieces = (g.rows + piece - 1) / piece;
  const bool streaming = streams_from_memory<T>(numel, g.width);
  with_flag(residual != nullptr, [&](auto res) {
    with_flag(relu_on, [&](auto rl) {
      parallel_for(pieces, numel, [&](std::int64_t p) {
        const std::int64_t r0 = p * piece, r1 = std::min(g.rows, r0 + piece);
        for_lane_rows(r1 - r0, W, t.group, [&](std::int64_t first, std::int64_t count, std::int64_t lanes) {
          const std::int64_t o = (r0 + first) * W;
          normalize_rows<decltype(res)::value, decltype(rl)::value>(x + o, residual ? residual + o : nullptr, y + o,
                                                                    count, lanes, lanes, mean, scale, bias, streaming,
                                                                    routes);
        });
      });
    });
  });
}

/**
 * @brief Training forward in the planes layout when every channel is one task: per channel,
 *        its statistics (the same bits as shard_moments), then @p make_affine(c, mean, m2) and
 *        its normalization while the channel is still in L2, so x comes from memory once.
 *        Writes @p mean and @p m2 (C values) as shard_moments does.
 */
template <class T, class MakeAffine>
void fused_forward_planes(const Geometry& g, const T* x, const T* residual, bool relu_on, double* mean, double* m2,
                          MakeAffine&& make_affine, T* y) {
  parallel_for(g.C, g.N * g.C * g.S, [&](std::int64_t c) {
    const Welford<double> w = merge(Welford<double>{}, plane_range_moments(g, x, c, 0, g.N * g.S));
    mean[c] = w.mean;
    m2[c] = w.m2;
    const Affine<double> affine = make_affine(c, w.mean, w.m2);
    for (std::int64_t n = 0; n < g.N; ++n) normalize_plane(g, n * g.C + c, x, residual, relu_on, affine, y);
  });
}

/// True when forward's training statistics and normalization can be fused per channel: planes,
/// each channel's reduction one task (plane_tasks), so fused and split passes sum alike.
/// Backward's fusion (backward_fusable) asks this too.
template <class T>
bool fusable(const Shape& shape, Mode mode) {
  const Geometry g = geometry(shape, mode);
  return g.planes && shape.numel() > 0 && plane_tasks(g.N * g.S, sizeof(T)) == 1;
}

// ---- backward ----

/// Σg, Σg·(x − mean), Σ(x − mean) of channel @p c's flat indices [begin, end), planes layout.
template <bool Relu, class T>
BackwardSums<double> plane_range_gradient_sums(const Geometry& g, const T* x, const T* dy, const T* y, std::int64_t c,
                                               std::int64_t begin, std::int64_t end, double mean) {
  alignas(64) double a[plane_gradient_lanes] = {}, b[plane_gradient_lanes] = {}, d[plane_gradient_lanes] = {};
  const HalfConversion conversion = half_conversion_in_use();
  for_each_run(begin, end, g.S, [&](std::int64_t n, std::int64_t s, std::int64_t length) {
    const std::int64_t o = (n * g.C + c) * g.S + s;
    add_plane_gradient_sums<Relu, plane_gradient_lanes>(x + o, dy + o, Relu ? y + o : nullptr, length, mean, a, b, d,
                                                        conversion);
  });
  return {sum_plane_lanes<plane_gradient_lanes>(a), sum_plane_lanes<plane_gradient_lanes>(b),
          sum_plane_lanes<plane_gradient_lanes>(d)};
}

/// Per feature Σg, Σg·(x − mean) and Σ(x − mean), g the upstream gradient: backward's and
/// phases::local_gradient_sums' reduction. @p sums holds F zero-initialized entries.
template <class T>
void gradient_sums_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                            Activation activation, const double* mean, BackwardSums<double>* sums) {
  const std::int64_t numel = shape.numel();
  if (numel == 0) return;
  const Geometry g = geometry(shape, mode);
  with_flag(activation == Activation::relu, [&](auto rl) {
    constexpr bool Relu = decltype(rl)::value;
    if (g.planes) {
      const std::int64_t per_channel = g.N * g.S;
      const std::int64_t tasks = plane_tasks(per_channel, sizeof(T));
      const std::int64_t per_task = (per_channel + tasks - 1) / tasks;
      BackwardSums<double>* partial = scratch<BackwardSums<double>>(Scratch::partial, g.C * tasks);
      parallel_for(g.C * tasks, numel, [&](std::int64_t i) {
        const std::int64_t c = i / tasks, k = i % tasks;
        partial[i] = plane_range_gradient_sums<Relu>(g, x, dy, y, c, k * per_task,
                                                     std::min(per_channel, (k + 1) * per_task), mean[c]);
      });
      for (std::int64_t c = 0; c < g.C; ++c)
        for (std::int64_t k = 0; k < tasks; ++k) sums[c] = BackwardSumsAdd{}(sums[c], partial[c * tasks + k]);
      return;
    }
    const RowTiling t(g.rows, g.width);
    const std::int64_t W = g.width;
    const bool streaming = streams_from_memory<T>(numel, g.width);
    double* center = scratch<double>(Scratch::lanes, W);
    for (std::int64_t j = 0; j < W; ++j) center[j] = mean[g.feature_at(j)];
    BackwardSums<double>* partial = scratch<BackwardSums<double>>(Scratch::partial, t.row_blocks * W);
    parallel_for(t.row_blocks * t.column_blocks, numel, [&](std::int64_t i) {
      const std::int64_t rb = i / t.column_blocks, cb = i % t.column_blocks;
      const std::int64_t r0 = rb * t.rows_per_block, r1 = std::min(g.rows, r0 + t.rows_per_block);
      const std::int64_t c0 = cb * t.block_width, width = std::min(W - c0, t.block_width);
      const std::int64_t L = t.lanes(width);
      alignas(64) double lane_mean[max_block_width], a[max_block_width], b[max_block_width], d[max_block_width];
      for (std::int64_t j = 0; j < L; ++j) lane_mean[j] = center[c0 + j % width];
      std::fill(a, a + L, 0.0);
      std::fill(b, b + L, 0.0);
      std::fill(d, d + L, 0.0);
      if (t.group > 1) {  // width == W: the rows are contiguous
        for_lane_rows(r1 - r0, W, t.group, [&](std::int64_t first, std::int64_t count, std::int64_t lanes) {
          const std::int64_t o = (r0 + first) * W;
          add_row_gradient_sums<Relu>(x + o, dy + o, Relu ? y + o : nullptr, count, lanes, lanes, lane_mean, a, b, d,
                                      streaming);
        });
      } else {
        const std::int64_t o = r0 * W + c0;
        add_row_gradient_sums<Relu>(x + o, dy + o, Relu ? y + o : nullptr, r1 - r0, width, W, lane_mean, a, b, d,
                                    streaming);
      }
      for (std::int64_t j = 0; j < width; ++j) {
        BackwardSums<double> s{a[j], b[j], d[j]};
        for (std::int64_t k = 1; k < t.group; ++k)
          s = BackwardSumsAdd{}(s, BackwardSums<double>{a[k * width + j], b[k * width + j], d[k * width + j]});
        partial[rb * W + c0 + j] = s;
      }
    });
    for (std::int64_t j = 0; j < W; ++j) {
      const std::int64_t f = g.feature_at(j);
      for (std::int64_t rb = 0; rb < t.row_blocks; ++rb) sums[f] = BackwardSumsAdd{}(sums[f], partial[rb * W + j]);
    }
  });
}

/// The input gradient's coefficients of one feature (or lane).
struct GradientLane {
  double mean, shift, dy_scale, xmu_scale, constant;
};

/// Element @p i of the input gradient: dresidual = g; dx = g·dy_scale + ((x − mean) −
/// mean_shift)·xmu_scale + constant (Training) or g·dy_scale (x not read).
template <bool Relu, bool Dx, bool Dres, bool Training, class T>
inline void input_gradient_at(const T* x, const T* dy, const T* y, T* dx, T* dresidual, std::int64_t i, double mean,
                              double shift, double dy_scale, double xmu_scale, double constant) {
  using conv = convert<T>;
  const double g = upstream<Relu>(dy, y, i);
  if constexpr (Dres) dresidual[i] = conv::from_double(g);
  if constexpr (Dx) {
    double xv = 0.0, v;
    if constexpr (Training) xv = conv::to_double(x[i]);
    input_gradient_value<Training>(v, g, xv, mean, shift, dy_scale, xmu_scale, constant);
    dx[i] = conv::from_double(v);
  }
}

/// dx through the float route (float_route_blocks, or half_route_blocks with @p conversion's
/// instructions), @p route(i) the coefficients of value i.
template <bool Relu, class T, class Route, class Exact>
std::int64_t input_gradient_float_route(const T* x, const T* dy, const T* y, T* dx, std::int64_t length,
                                        const Route& route, Exact&& exact, HalfConversion conversion) {
  using Format = typename convert<T>::format;
#if defined(BATCHNORM_CPU_X86_TARGETS)
  if (takes_half_instructions<T>(conversion)) {
    return with_half_instructions(conversion, [&](auto widen, auto narrow) {
      float xf[float_route_block], gf[float_route_block], yf[Relu ? float_route_block : 1];
      return half_route_blocks(
          dx, is_an_input(dx, x, dy, y), length,
          [&](std::int64_t i) {
            widen(x + i, xf);
            widen(dy + i, gf);
            if constexpr (Relu) widen(y + i, yf);
          },
          [&](std::int64_t i, std::int64_t j, float& bound) {
            float g = gf[j];
            if constexpr (Relu) apply_relu_backward(g, yf[j]);
            return gradient_route_value(xf[j], g, route(i + j), bound);
          },
          [](float v) { return v; }, exact, narrow);
    });
  }
#endif
  (void)conversion;
  return float_route_blocks(
      dx, length,
      [&](std::int64_t i, std::uint16_t& out) {
        float g = Format::widen(bits_of(dy + i));
        if constexpr (Relu) apply_relu_backward(g, Format::widen(bits_of(y + i)));
        return float_gradient_value<Format>(bits_of(x + i), g, route(i), out);
      },
      exact);
}

/// The input gradient over @p length values with one feature's coefficients, without prefetching
/// (input_gradient_run's parts): through the float route's blocks where @p route is usable (half
/// types computing dx alone in training: float_route.hpp, the same bits), the rest by the double
/// formula.
template <bool Relu, bool Dx, bool Dres, bool Training, class T>
void input_gradient_part(const T* x, const T* dy, const T* y, T* dx, T* dresidual, std::int64_t length,
                         const GradientLane& k, const FloatGradientRoute& route) {
  const double m = k.mean, sh = k.shift, ds = k.dy_scale, xs = k.xmu_scale, co = k.constant;
  auto exact = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i)
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, i, m, sh, ds, xs, co);
  };
  if constexpr (Dx && !Dres && Training && has_float_route<T>) {
    if (route.usable) {
      const HalfConversion conversion = half_conversion_in_use();
      std::int64_t done;
#if defined(BATCHNORM_CPU_X86_TARGETS)
      // Half under AVX-512: the hand-written blocks (float_route.hpp)
      if (std::is_same_v<typename convert<T>::format, bits::half_format> && conversion == HalfConversion::avx512)
        done = gradient_blocks_avx512<Relu>(x, dy, y, dx, length, route, exact);
      else
#endif
        done = input_gradient_float_route<Relu>(x, dy, y, dx, length, [&](std::int64_t) { return route; }, exact,
                                                conversion);
      if (done == length) return;
      // the tail as a run of its own (a loop from `done` draws a false -Waggressive-loop-optimizations)
      x += done;
      dy += done;
      if constexpr (Relu) y += done;
      dx += done;
      length -= done;
    }
  } else {
    (void)route;
  }
  exact(0, length);
}

/// The input gradient over @p length values with one feature's coefficients (a plane, or a run
/// of one). A run of at least prefetch_bytes asks for its inputs prefetch_bytes ahead, a
/// prefetch_segment at a time, as the gradient sums do. bench_cpu, float, PyTorch's time / ours
/// in the same run (5 runs at 1 thread, 2 at 2 threads, alternating with the loop before):
/// backward of (8, 64, 112, 112) 1.02–1.08 → 1.11–1.23 (1 thread), 1.05–1.09 → 1.17–1.22
/// (2 threads); of (8, 256, 56, 56) 1.15–1.27 → 1.28–1.35, 1.13–1.19 → 1.26–1.27. The bfloat16
/// backward, which takes the float route, did not gain (0.94–1.03 → 0.93–1.00), so runs on the
/// route do not prefetch. The double formula is elementwise: the segments do not change a bit.
template <bool Relu, bool Dx, bool Dres, bool Training, class T>
void input_gradient_run(const T* x, const T* dy, const T* y, T* dx, T* dresidual, std::int64_t length,
                        const GradientLane& k) {
  FloatGradientRoute route;  // unusable unless the float route applies
  if constexpr (Dx && !Dres && Training && has_float_route<T>)
    route = float_gradient_route(k.mean, k.shift, k.dy_scale, k.xmu_scale, k.constant);
  if (route.usable || !prefetches(length, sizeof(T))) {
    input_gradient_part<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, length, k, route);
    return;
  }
  auto from = [](auto* p, std::int64_t s) { return p != nullptr ? p + s : p; };  // outputs and inputs it skips may be null
  for (std::int64_t s = 0; s < length; s += prefetch_segment) {
    const std::int64_t n = std::min(prefetch_segment, length - s);
    prefetch_ahead(dy + s, n);
    if constexpr (Dx && Training) prefetch_ahead(x + s, n);
    if constexpr (Relu) prefetch_ahead(y + s, n);
    input_gradient_part<Relu, Dx, Dres, Training>(from(x, s), dy + s, from(y, s), from(dx, s), from(dresidual, s), n,
                                                  k, route);
  }
}

/// The four-row loop of input_gradient_rows for distinct buffers of 16-bit types (float and
/// double take for_lane_blocks where the compiler has GCC vectors); returns the rows it did.
template <bool Relu, bool Dx, bool Dres, bool Training, class T>
std::int64_t input_gradient_rows_distinct(const T* __restrict x, const T* __restrict dy, const T* __restrict y,
                                          T* __restrict dx, T* __restrict dresidual, std::int64_t rows,
                                          std::int64_t width, std::int64_t stride, const double* __restrict mean,
                                          const double* __restrict shift, const double* __restrict dy_scale,
                                          const double* __restrict xmu_scale, const double* __restrict constant) {
  static_assert(rows_at_once == 4, "the loop below is written out for four rows");
  std::int64_t r = 0;
  for (; r + rows_at_once <= rows; r += rows_at_once) {
    const std::int64_t o0 = r * stride, o1 = o0 + stride, o2 = o1 + stride, o3 = o2 + stride;
    for (std::int64_t j = 0; j < width; ++j) {
      const double m = mean[j], sh = shift[j], ds = dy_scale[j], xs = xmu_scale[j], co = constant[j];
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, o0 + j, m, sh, ds, xs, co);
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, o1 + j, m, sh, ds, xs, co);
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, o2 + j, m, sh, ds, xs, co);
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, o3 + j, m, sh, ds, xs, co);
    }
  }
  return r;
}

/// The input gradient over rows, coefficients per lane (five arrays of @p width). dx may be dy
/// or x, dresidual may be dy (in place: for 16-bit types one row at a time, as normalize_rows).
/// @p streaming: as normalize_rows.
template <bool Relu, bool Dx, bool Dres, bool Training, class T>
void input_gradient_rows(const T* x, const T* dy, const T* y, T* dx, T* dresidual, std::int64_t rows,
                         std::int64_t width, std::int64_t stride, const double* mean, const double* shift,
                         const double* dy_scale, const double* xmu_scale, const double* constant, bool streaming,
                         const FloatGradientRouteLanes& routes) {
  (void)streaming;  // without GCC vectors there is one loop
  if constexpr (Dx && !Dres && Training && has_float_route<T>) {
    if (routes.usable) {  // half types computing dx alone: the float route, row by row
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t o = r * stride;
        const T* yr = Relu ? y + o : nullptr;
        auto exact = [&](std::int64_t begin, std::int64_t end) {
          for (std::int64_t j = begin; j < end; ++j)
            input_gradient_at<Relu, true, false, true>(x + o, dy + o, yr, dx + o, dresidual, j, mean[j], shift[j],
                                                       dy_scale[j], xmu_scale[j], constant[j]);
        };
        const HalfConversion conversion = half_conversion_in_use();
#if defined(BATCHNORM_CPU_X86_TARGETS)
        // Half under AVX-512: the hand-written blocks with per-lane coefficients (float_route.hpp)
        if (std::is_same_v<typename convert<T>::format, bits::half_format> && conversion == HalfConversion::avx512) {
          exact(gradient_blocks_avx512<Relu>(x + o, dy + o, yr, dx + o, width, routes, exact), width);
          continue;
        }
#endif
        exact(input_gradient_float_route<Relu>(x + o, dy + o, yr, dx + o, width, routes, exact, conversion), width);
      }
      return;
    }
  }
#if defined(BATCHNORM_CPU_EIGHT)
  if constexpr (stores_eight<T>) {  // store8 takes float and double
    // Each value is read before any output is written, so in place too.
    auto gradient_block = [&](auto load, auto block, std::int64_t r, std::int64_t j) {
      using Block = decltype(block);
      using V = typename Block::type;
      V m{}, sh{}, ds, xs{}, co{};
      load(dy_scale + j, ds);
      if constexpr (Training) {
        load(mean + j, m);
        load(shift + j, sh);
        load(xmu_scale + j, xs);
        load(constant + j, co);
      }
      for (std::int64_t k = 0; k < Block::rows; ++k) {
        const std::int64_t i = (r + k) * stride + j;
        V g, out, xv{};
        load(dy + i, g);
        if constexpr (Relu) {
          V yv;
          load(y + i, yv);
          apply_relu_backward(g, yv);
        }
        if constexpr (Dx) {
          if constexpr (Training) load(x + i, xv);
          input_gradient_value<Training>(out, g, xv, m, sh, ds, xs, co);
        }
        if constexpr (Dres) store_lanes(dresidual + i, g);
        if constexpr (Dx) store_lanes(dx + i, out);
      }
    };
    // Streaming: load8, as normalize_rows
    if (streaming) for_lane_block_rows(rows, width, true, PortableEightLoads{}, gradient_block);
    else with_eight_loads([&](auto load) { for_lane_block_rows(rows, width, false, load, gradient_block); });
    return;
  }
#endif
  std::int64_t r = 0;
  const bool in_place = (Dx && (dx == dy || dx == x)) || (Dres && dresidual == dy);
  if (!in_place)
    r = input_gradient_rows_distinct<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, rows, width, stride, mean,
                                                               shift, dy_scale, xmu_scale, constant);
  for (; r < rows; ++r)
    for (std::int64_t j = 0; j < width; ++j)
      input_gradient_at<Relu, Dx, Dres, Training>(x, dy, y, dx, dresidual, r * stride + j, mean[j], shift[j],
                                                  dy_scale[j], xmu_scale[j], constant[j]);
}

/// The coefficients of feature @p f's input gradient.
inline GradientLane gradient_lane(const double* mean, const BackwardCoefficients<double>* k, std::int64_t f) {
  return {mean[f], k[f].mean_shift, k[f].dy_scale, k[f].xmu_scale, k[f].constant};
}

/// Calls f(Relu, Dx, Dres, Training) with the four flags of an input gradient as types.
template <class F>
void with_gradient_flags(bool relu_on, bool dx, bool dresidual, bool training, F&& f) {
  with_flag(relu_on, [&](auto rl) {
    with_flag(dx, [&](auto wdx) {
      with_flag(dresidual, [&](auto wdr) { with_flag(training, [&](auto tr) { f(rl, wdx, wdr, tr); }); });
    });
  });
}

/// dresidual = g and dx = g·dy_scale + ((x − mean) − mean_shift)·xmu_scale + constant (training),
/// g·dy_scale (eval: x is not read, so a NaN in x stays out): backward's and
/// phases::input_gradient's last pass. Either output may be null.
template <class T>
void input_gradient_elements(const Shape& shape, Mode mode, const T* x, const T* dy, const T* y,
                             Activation activation, const double* mean, const BackwardCoefficients<double>* k,
                             bool batch_statistics, T* dx, T* dresidual) {
  const std::int64_t numel = shape.numel();
  if ((dx == nullptr && dresidual == nullptr) || numel == 0) return;
  const Geometry g = geometry(shape, mode);
  with_gradient_flags(activation == Activation::relu, dx != nullptr, dresidual != nullptr, batch_statistics,
                      [&](auto rl, auto wdx, auto wdr, auto tr) {
    constexpr bool Relu = decltype(rl)::value, Dx = decltype(wdx)::value, Dres = decltype(wdr)::value,
                   Training = decltype(tr)::value;
    if (g.planes) {
      parallel_for(g.N * g.C, numel, [&](std::int64_t p) {
        const std::int64_t o = p * g.S;
        input_gradient_run<Relu, Dx, Dres, Training>(x + o, dy + o, Relu ? y + o : nullptr, Dx ? dx + o : nullptr,
                                                     Dres ? dresidual + o : nullptr, g.S,
                                                     gradient_lane(mean, k, p % g.C));
      });
      return;
    }
    // Per-lane arrays in position order, replicated to group·W lanes.
    const RowTiling t(g.rows, g.width);
    const std::int64_t W = g.width, L = t.lanes(W);
    const std::int64_t stride = lane_array_stride(L);
    double* lanes = scratch<double>(Scratch::lanes, 5 * stride);
    double *m = lanes, *sh = m + stride, *ds = sh + stride, *xs = ds + stride, *co = xs + stride;
    FloatGradientRouteLanes routes;
    if constexpr (Dx && !Dres && Training && has_float_route<T>) {
      const std::int64_t float_stride = lane_array_stride<float>(L);
      routes.place(scratch<float>(Scratch::route_lanes, FloatGradientRouteLanes::count * float_stride), float_stride);
    }
    for (std::int64_t j = 0, position = 0; j < L; ++j, position = position + 1 == W ? 0 : position + 1) {
      const GradientLane lane = gradient_lane(mean, k, g.feature_at(position));
      m[j] = lane.mean;
      sh[j] = lane.shift;
      ds[j] = lane.dy_scale;
      xs[j] = lane.xmu_scale;
      co[j] = lane.constant;
      if (routes.placed())
        routes.set(j, float_gradient_route(lane.mean, lane.shift, lane.dy_scale, lane.xmu_scale, lane.constant));
    }
    const std::int64_t piece = std::max(t.group, rows_per_piece(W) / t.group * t.group);
    const std::int64_t pieces = (g.rows + piece - 1) / piece;
    const bool streaming = streams_from_memory<T>(numel, g.width);
    parallel_for(pieces, numel, [&](std::int64_t p) {
      const std::int64_t r0 = p * piece, r1 = std::min(g.rows, r0 + piece);
      for_lane_rows(r1 - r0, W, t.group, [&](std::int64_t first, std::int64_t count, std::int64_t width) {
        const std::int64_t o = (r0 + first) * W;
        input_gradient_rows<Relu, Dx, Dres, Training>(x + o, dy + o, Relu ? y + o : nullptr, Dx ? dx + o : nullptr,
                                                      Dres ? dresidual + o : nullptr, count, width, width, m, sh, ds,
                                                      xs, co, streaming, routes);
      });
    });
  });
}

/// True when backward's gradient sums and input gradient can be fused per channel: where
/// forward's can (fusable: a channel's sums one task, so the same bits as
/// gradient_sums_elements), and a channel's x, dy (and y, with relu) are within
/// fused_backward_bytes together.
template <class T>
bool backward_fusable(const Shape& shape, Mode mode, Activation activation) {
  if (!fusable<T>(shape, mode)) return false;
  const Geometry g = geometry(shape, mode);
  const std::int64_t inputs = activation == Activation::relu ? 3 : 2;
  return g.N * g.S * static_cast<std::int64_t>(sizeof(T)) * inputs <= fused_backward_bytes;
}

/**
 * @brief Backward in the planes layout, one task per channel (backward_fusable): the channel's
 *        gradient sums (the same bits as gradient_sums_elements: one task per channel there too),
 *        then @p make_coefficients(c, sums), then its input gradient while x and dy are still in
 *        L2, so they come from memory once.
 */
template <class T, class MakeCoefficients>
void fused_backward_planes(const Geometry& g, const T* x, const T* dy, const T* y, Activation activation,
                           const double* mean, bool batch_statistics, MakeCoefficients&& make_coefficients, T* dx,
                           T* dresidual) {
  with_gradient_flags(activation == Activation::relu, dx != nullptr, dresidual != nullptr, batch_statistics,
                      [&](auto rl, auto wdx, auto wdr, auto tr) {
    [[maybe_unused]] constexpr bool Relu = decltype(rl)::value, Dx = decltype(wdx)::value,
                                    Dres = decltype(wdr)::value, Training = decltype(tr)::value;
    parallel_for(g.C, g.N * g.C * g.S, [&](std::int64_t c) {
      const BackwardSums<double> sums =
          BackwardSumsAdd{}(BackwardSums<double>{}, plane_range_gradient_sums<Relu>(g, x, dy, y, c, 0, g.N * g.S, mean[c]));
      const BackwardCoefficients<double> k = make_coefficients(c, sums);
      if constexpr (Dx || Dres) {
        const GradientLane lane{mean[c], k.mean_shift, k.dy_scale, k.xmu_scale, k.constant};
        for (std::int64_t n = 0; n < g.N; ++n) {
          const std::int64_t o = (n * g.C + c) * g.S;
          input_gradient_run<Relu, Dx, Dres, Training>(x + o, dy + o, Relu ? y + o : nullptr, Dx ? dx + o : nullptr,
                                                       Dres ? dresidual + o : nullptr, g.S, lane);
        }
      }
    });
  });
}

BATCHNORM_CPU_INLINE_ALL_END
}  // namespace batchnorm::detail::cpu_impl
