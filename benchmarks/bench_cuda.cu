// GPU throughput of the library against cuDNN, measured in the same process on the same
// buffers and stream with CUDA events (manual time). Reported bytes are the minimum
// traffic of the operation (forward: read x + write y; backward: read x, dy + write dx),
// so bytes_per_second compares directly with the device's memory bandwidth.
//
//   bench_cuda --benchmark_filter=Forward     # e.g.; see --help for Google Benchmark flags
#include <batchnorm/cuda.cuh>
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>
#if BATCHNORM_BENCH_CUDNN
#include <cudnn.h>
#endif

#include <cstdio>
#include <vector>

namespace bn = batchnorm;

namespace {

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/// Args: N, C, H, W, channels_last. H = W = 0 means a rank-2 (N, C) input.
bn::Shape shape_of(const benchmark::State& s) {
  const bn::Layout layout = s.range(4) ? bn::Layout::channels_last : bn::Layout::contiguous;
  if (s.range(2) == 0) return bn::Shape({s.range(0), s.range(1)}, layout);
  return bn::Shape({s.range(0), s.range(1), s.range(2), s.range(3)}, layout);
}

struct DeviceTensor {
  float* p = nullptr;
  explicit DeviceTensor(std::int64_t n) {
    if (cudaMalloc(&p, static_cast<std::size_t>(n) * sizeof(float)) != cudaSuccess) p = nullptr;
    else cudaMemset(p, 0, static_cast<std::size_t>(n) * sizeof(float));
  }
  ~DeviceTensor() { cudaFree(p); }
};

/// Times `launch` with CUDA events around each iteration (after one warm-up call).
template <class Launch>
void time_iterations(benchmark::State& state, cudaStream_t stream, Launch&& launch, std::int64_t bytes) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  launch();
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    launch();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(static_cast<double>(ms) / 1e3);
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

void BM_OursForwardTrain(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const bn::Shape shape = shape_of(state);
  bn::BatchNorm<float, 2> layer2d(shape.channels());
  bn::BatchNorm1d<float> layer1d(shape.channels());
  DeviceTensor x(shape.numel()), y(shape.numel());
  cudaStream_t stream = nullptr;
  time_iterations(state, stream, [&] {
    if (shape.rank() == 2) layer1d.forward(x.p, y.p, shape, stream);
    else layer2d.forward(x.p, y.p, shape, stream);
  }, 2 * shape.numel() * static_cast<std::int64_t>(sizeof(float)));
}

void BM_OursBackward(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const bn::Shape shape = shape_of(state);
  bn::BatchNorm<float, 2> layer2d(shape.channels());
  bn::BatchNorm1d<float> layer1d(shape.channels());
  DeviceTensor x(shape.numel()), y(shape.numel()), dy(shape.numel()), dx(shape.numel());
  cudaStream_t stream = nullptr;
  if (shape.rank() == 2) layer1d.forward(x.p, y.p, shape, stream);
  else layer2d.forward(x.p, y.p, shape, stream);
  time_iterations(state, stream, [&] {
    if (shape.rank() == 2) layer1d.backward(x.p, dy.p, dx.p, shape, stream);
    else layer2d.backward(x.p, dy.p, dx.p, shape, stream);
  }, 3 * shape.numel() * static_cast<std::int64_t>(sizeof(float)));
}

#if BATCHNORM_BENCH_CUDNN
/// cuDNN handle and descriptors for one shape; cuDNN's best mode per layout (persistent
/// spatial for NHWC, as PyTorch and Apex pick).
struct CudnnBatchNorm {
  cudnnHandle_t handle = nullptr;
  cudnnTensorDescriptor_t x = nullptr, params = nullptr;
  cudnnBatchNormMode_t mode = CUDNN_BATCHNORM_SPATIAL;
  cudnnStatus_t status = CUDNN_STATUS_SUCCESS;

  explicit CudnnBatchNorm(const bn::Shape& shape) {
    const int N = static_cast<int>(shape.batch()), C = static_cast<int>(shape.channels());
    const int H = shape.rank() == 2 ? 1 : static_cast<int>(shape[2]);
    const int W = shape.rank() == 2 ? 1 : static_cast<int>(shape[3]);
    const auto format = shape.layout() == bn::Layout::channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    mode = format == CUDNN_TENSOR_NHWC ? CUDNN_BATCHNORM_SPATIAL_PERSISTENT : CUDNN_BATCHNORM_SPATIAL;
    if ((status = cudnnCreate(&handle)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnCreateTensorDescriptor(&x)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnCreateTensorDescriptor(&params)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnSetTensor4dDescriptor(x, format, CUDNN_DATA_FLOAT, N, C, H, W)) != CUDNN_STATUS_SUCCESS) return;
    status = cudnnDeriveBNTensorDescriptor(params, x, mode);
  }
  ~CudnnBatchNorm() {
    if (params) cudnnDestroyTensorDescriptor(params);
    if (x) cudnnDestroyTensorDescriptor(x);
    if (handle) cudnnDestroy(handle);
  }
  cudnnStatus_t forward_training(const float* in, float* out, const float* scale, const float* bias, float* rm,
                                 float* rv, float* save_mean, float* save_invstd) const {
    const float one = 1.f, zero = 0.f;
    return cudnnBatchNormalizationForwardTraining(handle, mode, &one, &zero, x, in, x, out, params, scale, bias, 0.1,
                                                  rm, rv, 1e-5, save_mean, save_invstd);
  }
};

void BM_CudnnForwardTrain(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const bn::Shape shape = shape_of(state);
  const CudnnBatchNorm cudnn(shape);
  if (cudnn.status != CUDNN_STATUS_SUCCESS) return state.SkipWithError(cudnnGetErrorString(cudnn.status));
  const std::int64_t C = shape.channels();
  DeviceTensor x(shape.numel()), y(shape.numel()), scale(C), bias(C), rm(C), rv(C), sm(C), si(C);
  time_iterations(state, nullptr, [&] { cudnn.forward_training(x.p, y.p, scale.p, bias.p, rm.p, rv.p, sm.p, si.p); },
                  2 * shape.numel() * static_cast<std::int64_t>(sizeof(float)));
}

void BM_CudnnBackward(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  const bn::Shape shape = shape_of(state);
  const CudnnBatchNorm cudnn(shape);
  if (cudnn.status != CUDNN_STATUS_SUCCESS) return state.SkipWithError(cudnnGetErrorString(cudnn.status));
  const std::int64_t C = shape.channels();
  DeviceTensor x(shape.numel()), y(shape.numel()), dy(shape.numel()), dx(shape.numel());
  DeviceTensor scale(C), bias(C), rm(C), rv(C), sm(C), si(C), gs(C), gb(C);
  cudnn.forward_training(x.p, y.p, scale.p, bias.p, rm.p, rv.p, sm.p, si.p);
  const float one = 1.f, zero = 0.f;
  time_iterations(state, nullptr, [&] {
    cudnnBatchNormalizationBackward(cudnn.handle, cudnn.mode, &one, &zero, &one, &zero, cudnn.x, x.p, cudnn.x, dy.p,
                                    cudnn.x, dx.p, cudnn.params, scale.p, gs.p, gb.p, 1e-5, sm.p, si.p);
  }, 3 * shape.numel() * static_cast<std::int64_t>(sizeof(float)));
}
#endif

/// The shapes the issues name (small C with large N*H*W, BN1d (125000, 50)) plus
/// ResNet-50-like layers, NCHW and NHWC.
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "C", "H", "W", "nhwc"});
  b->Args({128, 4, 224, 224, 0});
  b->Args({125000, 50, 0, 0, 0});
  b->Args({32, 64, 112, 112, 0});
  b->Args({32, 256, 56, 56, 0});
  b->Args({256, 1024, 14, 14, 0});
  b->Args({32, 64, 112, 112, 1});
  b->Args({256, 1024, 14, 14, 1});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_OursForwardTrain)->Apply(shapes);
BENCHMARK(BM_OursBackward)->Apply(shapes);
#if BATCHNORM_BENCH_CUDNN
BENCHMARK(BM_CudnnForwardTrain)->Apply(shapes);
BENCHMARK(BM_CudnnBackward)->Apply(shapes);
#endif

BENCHMARK_MAIN();
