// CPU backend throughput (the reference path; it must not be pathologically slow).
#include <batchnorm/batchnorm.hpp>
#include <benchmark/benchmark.h>

#include <vector>

namespace bn = batchnorm;

static void BM_CpuForwardTrain(benchmark::State& state) {
  const std::int64_t N = state.range(0), C = state.range(1), HW = state.range(2);
  const bn::Shape shape{N, C, HW, HW};
  bn::BatchNorm2d<float, bn::cpu> layer(C);
  std::vector<float> x(static_cast<std::size_t>(shape.numel())), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 97) * 0.01f;
  for (auto _ : state) {
    layer.forward(x.data(), y.data(), shape);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * shape.numel() * static_cast<std::int64_t>(3 * sizeof(float)));
}
BENCHMARK(BM_CpuForwardTrain)->Args({8, 16, 32})->Args({32, 64, 16})->Args({2, 3, 128});

static void BM_CpuBackward(benchmark::State& state) {
  const std::int64_t N = state.range(0), C = state.range(1), HW = state.range(2);
  const bn::Shape shape{N, C, HW, HW};
  bn::BatchNorm2d<float, bn::cpu> layer(C);
  std::vector<float> x(static_cast<std::size_t>(shape.numel())), y(x.size()), dy(x.size(), 0.5f), dx(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 89) * 0.02f;
  layer.forward(x.data(), y.data(), shape);
  for (auto _ : state) {
    layer.backward(x.data(), dy.data(), dx.data(), shape);
    benchmark::DoNotOptimize(dx.data());
  }
  state.SetBytesProcessed(state.iterations() * shape.numel() * static_cast<std::int64_t>(5 * sizeof(float)));
}
BENCHMARK(BM_CpuBackward)->Args({8, 16, 32})->Args({32, 64, 16});

BENCHMARK_MAIN();
