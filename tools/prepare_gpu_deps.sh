#!/usr/bin/env bash
# Prepares .deps/ (git-ignored) for tools/gpu_check.sh: the GPU machine has nvcc, CMake, ninja,
# PyTorch, cuDNN and compute-sanitizer, but neither GoogleTest nor Google Benchmark, and no
# network. Run this here (Debian, with network to the Debian archive), then carry `.deps` to
# the GPU machine with the working tree (the device tool's `carry: [".deps"]`).
#
#   .deps/googletest/   a copy of /usr/src/googletest (built from source: -DBATCHNORM_GTEST_SOURCE_DIR)
#   .deps/benchmark/    libbenchmark-dev + libbenchmark1debian unpacked (dpkg -x): headers, the
#                       shared library and its CMake package (-Dbenchmark_DIR=...)
#   .deps/json/         nlohmann-json3-dev unpacked (header-only; the tests need it and the GPU
#                       machine may not have it: -Dnlohmann_json_DIR=...)
#
# Checks that a program links against the unpacked benchmark and runs with it (not the system
# copy), and that the folder stays small (the device tool carries at most 64 MiB in all).
# Idempotent; `--force` rebuilds the folder from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
deps=$root/.deps
limit_kib=$((24 * 1024))

if [[ "${1:-}" == "--force" ]]; then rm -rf "$deps"; fi
mkdir -p "$deps"

# ---- GoogleTest (sources) -------------------------------------------------------------------
if [[ ! -f $deps/googletest/CMakeLists.txt ]]; then
  [[ -f /usr/src/googletest/CMakeLists.txt ]] || { echo "prepare_gpu_deps: /usr/src/googletest missing (apt-get install libgtest-dev)" >&2; exit 1; }
  rm -rf "$deps/googletest"
  cp -r /usr/src/googletest "$deps/googletest"
fi
echo "googletest: $deps/googletest"

# ---- Google Benchmark (Debian packages, unpacked) ------------------------------------------
bench=$deps/benchmark
config_dir=$bench/usr/lib/x86_64-linux-gnu/cmake/benchmark
if [[ ! -f $config_dir/benchmarkConfig.cmake ]]; then
  rm -rf "$bench" "$deps/debs"
  mkdir -p "$deps/debs"
  (cd "$deps/debs" && apt-get download libbenchmark-dev libbenchmark1debian)
  for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$bench"; done
  rm -rf "$deps/debs" "$bench/usr/share"  # documentation only
fi
echo "benchmark:  $config_dir"

# ---- nlohmann-json (header-only package, unpacked) ------------------------------------------
json=$deps/json
if [[ ! -f $json/usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake ]]; then
  rm -rf "$json" "$deps/debs"
  mkdir -p "$deps/debs"
  (cd "$deps/debs" && apt-get download nlohmann-json3-dev)
  for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$json"; done
  rm -rf "$deps/debs" "$json/usr/share/doc"
fi
echo "json:       $json/usr/share/cmake/nlohmann_json"

# ---- check: a program links against the unpacked library and loads it ------------------------
probe=$deps/probe
rm -rf "$probe"
mkdir -p "$probe/src"
cat > "$probe/src/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(benchmark_probe CXX)
find_package(benchmark REQUIRED CONFIG NO_DEFAULT_PATH PATHS ${benchmark_DIR})
add_executable(probe probe.cpp)
target_link_libraries(probe PRIVATE benchmark::benchmark)
CMAKE
cat > "$probe/src/probe.cpp" <<'CPP'
#include <benchmark/benchmark.h>
static void BM_Probe(benchmark::State& s) { for (auto _ : s) benchmark::DoNotOptimize(s.iterations()); }
BENCHMARK(BM_Probe)->Iterations(10);
BENCHMARK_MAIN();
CPP
cmake -S "$probe/src" -B "$probe/build" -G Ninja -Dbenchmark_DIR="$config_dir" >/dev/null
cmake --build "$probe/build" >/dev/null
loaded=$(ldd "$probe/build/probe" | awk '/libbenchmark/ {print $3}')
[[ "$loaded" == "$bench"/* ]] || { echo "prepare_gpu_deps: probe loads '$loaded', not the copy in $bench" >&2; exit 1; }
"$probe/build/probe" --benchmark_format=json >/dev/null
echo "probe: links and runs against $loaded"
rm -rf "$probe"

size_kib=$(du -sk "$deps" | cut -f1)
echo ".deps: ${size_kib} KiB"
((size_kib <= limit_kib)) || { echo "prepare_gpu_deps: .deps is over ${limit_kib} KiB" >&2; exit 1; }
echo "ready: carry .deps (see docs/gpu-validation.md)"
