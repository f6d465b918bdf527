// SyncBatchNorm vs BatchNorm on the CPU backend under MPI (issue 10, item 7): forward +
// backward of one training step per iteration, each rank on its own shard of the same size.
// Run:  mpirun -np R bench_sync [--benchmark_* flags]     (R = 1, 2, 4; rank 0 reports)
//
// SyncBatchNorm's calls are collective, so every rank must run the same number of iterations:
// Google Benchmark's adaptive iteration count (timed per process) could differ between ranks
// and leave one waiting in a collective. Every benchmark therefore has a fixed iteration count
// and repetitions, and the ranks start each benchmark together (an MPI_Barrier in setup).
// The counters: ranks, doubles and bytes each rank sends per step (forward + backward), and
// bytes it receives.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/comm/mpi.hpp>
#include <batchnorm/sync_batch_norm.hpp>
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <cstdint>
#include <vector>

namespace bn = batchnorm;

namespace {

int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

struct Buffers {
  std::vector<float> x, y, dy, dx;
  explicit Buffers(const bn::Shape& shape)
      : x(static_cast<std::size_t>(shape.numel())), y(x.size()), dy(x.size()), dx(x.size()) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = static_cast<float>(i % 97) * 0.01f;
      dy[i] = static_cast<float>(i % 13) * 0.1f - 0.6f;
    }
  }
};

template <class Layer>
void step_loop(benchmark::State& state, Layer& layer, const bn::Shape& shape) {
  Buffers b(shape);
  MPI_Barrier(MPI_COMM_WORLD);
  for (auto _ : state) {
    layer.forward(b.x.data(), b.y.data(), shape);
    layer.backward(b.x.data(), b.dy.data(), b.dx.data(), shape);
    benchmark::DoNotOptimize(b.dx.data());
  }
  state.counters["ranks"] = world_size();
}

/// Per-rank shard (N, C, H, W) = (range(0), range(1), range(2), range(2)).
bn::Shape shard(const benchmark::State& state) {
  return bn::Shape{state.range(0), state.range(1), state.range(2), state.range(2)};
}

void BM_BatchNorm2d_PerRank(benchmark::State& state) {
  const bn::Shape shape = shard(state);
  bn::BatchNorm2d<float, bn::cpu> layer(shape.channels());
  step_loop(state, layer, shape);
  state.counters["bytes_sent"] = 0;
}

void BM_SyncBatchNorm2d(benchmark::State& state) {
  const bn::Shape shape = shard(state);
  bn::SyncBatchNorm2d<float, bn::cpu, bn::MpiCommunicator> layer(shape.channels(),
                                                                  bn::MpiCommunicator(MPI_COMM_WORLD));
  step_loop(state, layer, shape);
  const auto doubles = layer.forward_message_size() + layer.backward_message_size();
  state.counters["bytes_sent"] = static_cast<double>(8 * doubles);
  state.counters["bytes_received"] = static_cast<double>(8 * doubles * world_size());
}

// Fixed iterations (see the file comment): ~0.1-1 s per benchmark on one core.
void shards(benchmark::internal::Benchmark* b) {
  b->Args({8, 64, 16})->Args({32, 64, 16})->Args({8, 256, 8})->Args({2, 512, 1});
  b->Iterations(200)->Repetitions(3)->ReportAggregatesOnly(true)->UseRealTime()->Unit(benchmark::kMicrosecond);
}
BENCHMARK(BM_BatchNorm2d_PerRank)->Apply(shards);
BENCHMARK(BM_SyncBatchNorm2d)->Apply(shards);

/// Rank 0 reports; the other ranks run the same benchmarks silently.
class SilentReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  benchmark::Initialize(&argc, argv);
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
