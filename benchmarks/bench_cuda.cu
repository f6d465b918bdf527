// GPU throughput of the library against cuDNN and the device's own copy bandwidth, measured
// in the same process, on the same buffers and stream, with CUDA events (manual time).
//
// Suite (issue 11): the 12 distinct BatchNorm2d shapes of ResNet-50 (torchvision, 224x224) at
// N = 32 and N = 256, NCHW and NHWC; (128, 4, 224, 224) (few channels, many values each);
// BatchNorm1d (125000, 50), (3136, 256), (128, 8192); per-activation (64, 256, 32, 32). Each in
// fp32, fp16 and bf16 (fp32 parameters), for training forward (batch statistics + running
// update), inference forward (running statistics) and backward (dx, grad_weight, grad_bias).
//
// Bytes are the minimum traffic of the operation (forward: read x + write y; backward: read x
// and dy + write dx), so GB/s compares directly with the copy bandwidth (cudaMemcpyAsync device
// to device: read + write), measured first in the same process (benchmark DeviceCopy).
// Counters of each benchmark:
//   GBps        our bandwidth;  pct_copy  GBps as % of the copy bandwidth;  copy_GBps
//   cudnn_GBps  cuDNN's on the same buffers;  x_cudnn = cuDNN time / our time (> 1: faster)
//   cudnn_ok    1: cuDNN computed the same result (checked before timing: y, or dx, within
//               the type's tolerance); 0: it did not (not timed; cudnn_err says by how much);
//               -1: cuDNN does not run this case (or was not built in)
//
//   bench_cuda --benchmark_format=json --benchmark_out=bench.json
//   bench_cuda --suite_json=suite.json   # also write the suite, for tools/gpu_peer.py
//   bench_cuda --benchmark_filter='train_forward/f16/'
#include <batchnorm/cuda.cuh>
#include <batchnorm/half.hpp>
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if BATCHNORM_BENCH_CUDNN
#include <cudnn.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

// ---- the suite ------------------------------------------------------------------------------

enum class Op { train_forward, infer_forward, backward };
enum class DType { f32, f16, bf16 };

const char* name_of(Op op) {
  return op == Op::train_forward ? "train_forward" : op == Op::infer_forward ? "infer_forward" : "backward";
}
const char* name_of(DType t) { return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : "bf16"; }

/// One input shape. H = W = 0: a rank-2 (N, C) input (BatchNorm1d).
struct Case {
  const char* group;
  std::int64_t N, C, H, W;
  bool nhwc;
  bool per_activation;

  [[nodiscard]] bn::Shape shape() const {
    const bn::Layout layout = nhwc ? bn::Layout::channels_last : bn::Layout::contiguous;
    if (H == 0) return bn::Shape({N, C}, layout);
    return bn::Shape({N, C, H, W}, layout);
  }
  [[nodiscard]] bn::Mode mode() const { return per_activation ? bn::Mode::per_activation : bn::Mode::per_channel; }
  [[nodiscard]] std::int64_t numel() const { return N * C * std::max<std::int64_t>(H, 1) * std::max<std::int64_t>(W, 1); }
  [[nodiscard]] std::int64_t features() const { return bn::feature_count(shape(), mode()); }
  [[nodiscard]] std::string key() const {
    return std::string(group) + "/" + std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
           std::to_string(W) + "/" + (nhwc ? "nhwc" : "nchw");
  }
};

std::vector<Case> suite() {
  std::vector<Case> s;
  // ResNet-50's distinct BN shapes (C, H = W): stem, then layer1..4 (incl. the downsample BNs).
  const std::int64_t resnet50[][2] = {{64, 112}, {64, 56},  {256, 56},  {128, 56}, {128, 28}, {512, 28},
                                      {256, 28}, {256, 14}, {1024, 14}, {512, 14}, {512, 7},  {2048, 7}};
  for (const std::int64_t N : {32, 256})
    for (const bool nhwc : {false, true})
      for (const auto& l : resnet50) s.push_back({"resnet50", N, l[0], l[1], l[1], nhwc, false});
  // (32, 2048, 7, 7) is ResNet-50's last BN at N = 32 (above).
  s.push_back({"few_channels", 128, 4, 224, 224, false, false});
  s.push_back({"bn1d", 125000, 50, 0, 0, false, false});
  s.push_back({"bn1d", 3136, 256, 0, 0, false, false});
  s.push_back({"bn1d", 128, 8192, 0, 0, false, false});
  s.push_back({"per_activation", 64, 256, 32, 32, false, true});
  return s;
}

std::int64_t bytes_moved(const Case& c, Op op, std::size_t element_size) {
  return (op == Op::backward ? 3 : 2) * c.numel() * static_cast<std::int64_t>(element_size);
}

void write_suite_json(const std::string& path) {
  std::ofstream out(path);
  out << "[\n";
  const auto cases = suite();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    out << "  {\"key\": \"" << c.key() << "\", \"group\": \"" << c.group << "\", \"N\": " << c.N << ", \"C\": " << c.C
        << ", \"H\": " << c.H << ", \"W\": " << c.W << ", \"nhwc\": " << (c.nhwc ? "true" : "false")
        << ", \"per_activation\": " << (c.per_activation ? "true" : "false") << "}" << (i + 1 < cases.size() ? "," : "")
        << "\n";
  }
  out << "]\n";
}

// ---- device memory shared by every benchmark -------------------------------------------------

bool have_gpu() {
  static const bool available = [] {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    if (!ok) (void)cudaGetLastError();
    return ok;
  }();
  return available;
}

#define BENCH_CHECK(expression)                                                                 \
  do {                                                                                          \
    const cudaError_t bench_status_ = (expression);                                             \
    if (bench_status_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expression,                  \
                   cudaGetErrorString(bench_status_));                                          \
      std::abort();                                                                             \
    }                                                                                           \
  } while (0)

/// Buffers sized for the largest case in fp32, allocated once: ours (x, y, dy, dx), cuDNN's
/// outputs (y, dx) for the comparison, per-feature arrays, and a scratch workspace.
struct Arena {
  std::size_t bytes = 0, feature_bytes = 0;
  void *x = nullptr, *y = nullptr, *dy = nullptr, *dx = nullptr, *peer_y = nullptr, *peer_dx = nullptr;
  float *weight = nullptr, *bias = nullptr, *running_mean = nullptr, *running_var = nullptr, *save_mean = nullptr,
        *save_invstd = nullptr, *grad_weight = nullptr, *grad_bias = nullptr, *peer_mean = nullptr,
        *peer_invstd = nullptr, *peer_grad_weight = nullptr, *peer_grad_bias = nullptr, *error = nullptr;
  cudaStream_t stream = nullptr;

  Arena() {
    std::int64_t numel = 0, features = 0;
    for (const Case& c : suite()) {
      numel = std::max(numel, c.numel());
      features = std::max(features, c.features());
    }
    bytes = static_cast<std::size_t>(numel) * sizeof(float);
    feature_bytes = static_cast<std::size_t>(features) * sizeof(float);
    for (void** p : {&x, &y, &dy, &dx, &peer_y, &peer_dx}) BENCH_CHECK(cudaMalloc(p, bytes));
    for (float** p : {&weight, &bias, &running_mean, &running_var, &save_mean, &save_invstd, &grad_weight, &grad_bias,
                      &peer_mean, &peer_invstd, &peer_grad_weight, &peer_grad_bias})
      BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(p), feature_bytes));
    BENCH_CHECK(cudaMalloc(reinterpret_cast<void**>(&error), sizeof(float)));
    BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  static Arena& get() {
    static Arena arena;
    return arena;
  }
};

template <class T>
__device__ T from_float(float v);
template <>
__device__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ float to_float(float v) { return v; }
__device__ float to_float(__half v) { return __half2float(v); }
__device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/// Deterministic pseudo-random values in [offset - scale, offset + scale).
template <class T>
__global__ void fill_kernel(T* p, std::int64_t n, std::uint32_t seed, float offset, float scale) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed ^ static_cast<std::uint32_t>(i >> 32);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = from_float<T>(offset + scale * (static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f));
  }
}
template <class T>
void fill(T* p, std::int64_t n, std::uint32_t seed, float offset, float scale, cudaStream_t s) {
  fill_kernel<T><<<1024, 256, 0, s>>>(p, n, seed, offset, scale);
  BENCH_CHECK(cudaGetLastError());
}

/// max over i of |a[i] − b[i]| / (1 + |b[i]|), into *out (as float bits: non-negative floats
/// order like their bit patterns; NaN counts as the largest).
template <class T>
__global__ void max_error_kernel(const T* a, const T* b, std::int64_t n, float* out) {
  float worst = 0.f;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float u = to_float(a[i]), v = to_float(b[i]);
    float e = fabsf(u - v) / (1.f + fabsf(v));
    if (!(e == e)) e = 3.0e38f;
    worst = fmaxf(worst, e);
  }
  atomicMax(reinterpret_cast<int*>(out), __float_as_int(worst));
}
template <class T>
float max_error(const T* a, const T* b, std::int64_t n, cudaStream_t s) {
  Arena& arena = Arena::get();
  BENCH_CHECK(cudaMemsetAsync(arena.error, 0, sizeof(float), s));
  max_error_kernel<T><<<1024, 256, 0, s>>>(a, b, n, arena.error);
  BENCH_CHECK(cudaGetLastError());
  float e = 0.f;
  BENCH_CHECK(cudaMemcpyAsync(&e, arena.error, sizeof(float), cudaMemcpyDeviceToHost, s));
  BENCH_CHECK(cudaStreamSynchronize(s));
  return e;
}

/// Tolerance of the cuDNN comparison, in units of |difference| / (1 + |value|): a few roundings
/// of the storage type on O(1) normalized values.
double tolerance(DType t) { return t == DType::f32 ? 1e-3 : t == DType::f16 ? 1e-2 : 6e-2; }

/// Mean time in seconds of @p iterations runs of @p launch (after 2 warm-ups), CUDA events.
template <class Launch>
double time_of(cudaStream_t s, int iterations, Launch&& launch) {
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  launch();
  launch();
  BENCH_CHECK(cudaEventRecord(start, s));
  for (int i = 0; i < iterations; ++i) launch();
  BENCH_CHECK(cudaEventRecord(stop, s));
  BENCH_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  return static_cast<double>(ms) / 1e3 / iterations;
}

/// Device-to-device copy bandwidth (read + write bytes per second) on the arena, best of 5
/// rounds of 10 copies of the largest buffer; measured once per process.
double copy_bandwidth() {
  static const double bandwidth = [] {
    Arena& a = Arena::get();
    double best = 0;
    for (int round = 0; round < 5; ++round) {
      const double t = time_of(a.stream, 10, [&] {
        BENCH_CHECK(cudaMemcpyAsync(a.y, a.x, a.bytes, cudaMemcpyDeviceToDevice, a.stream));
      });
      best = std::max(best, 2.0 * static_cast<double>(a.bytes) / t);
    }
    return best;
  }();
  return bandwidth;
}

void BM_DeviceCopy(benchmark::State& state) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Arena& a = Arena::get();
  for (auto _ : state) {
    const double t = time_of(a.stream, 10, [&] {
      BENCH_CHECK(cudaMemcpyAsync(a.y, a.x, a.bytes, cudaMemcpyDeviceToDevice, a.stream));
    });
    state.SetIterationTime(t);
  }
  state.counters["GBps"] = copy_bandwidth() / 1e9;
  state.counters["copy_GBps"] = copy_bandwidth() / 1e9;
  state.counters["pct_copy"] = 100.0;
  state.counters["bytes"] = 2.0 * static_cast<double>(a.bytes);
}

// ---- the library -----------------------------------------------------------------------------

template <class T>
struct Ours {
  const Case& c;
  bn::Shape shape;
  bn::Mode mode;
  std::int64_t F;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;

  explicit Ours(const Case& c_) : c(c_), shape(c_.shape()), mode(c_.mode()), F(c_.features()) {
    bn::ForwardConfig fc;
    fc.mode = mode;
    bn::BackwardConfig bc;
    bc.mode = mode;
    workspace_bytes = std::max(bn::forward_workspace_size<T>(bn::cuda{}, shape, fc),
                               bn::backward_workspace_size<T>(bn::cuda{}, shape, bc));
    BENCH_CHECK(cudaMalloc(&workspace, workspace_bytes));
  }
  ~Ours() { cudaFree(workspace); }

  void forward(bool training, T* y) const {
    Arena& a = Arena::get();
    bn::ForwardArgs<T> args;
    args.x = static_cast<const T*>(a.x);
    args.y = y;
    args.weight = bn::span<const float>(a.weight, F);
    args.bias = bn::span<const float>(a.bias, F);
    args.running_mean = bn::span<float>(a.running_mean, F);
    args.running_var = bn::span<float>(a.running_var, F);
    if (training) {
      args.save_mean = bn::span<float>(a.save_mean, F);
      args.save_invstd = bn::span<float>(a.save_invstd, F);
    }
    bn::ForwardConfig config;
    config.mode = mode;
    config.batch_statistics = training;
    bn::forward(bn::cuda{}, shape, args, config, workspace, workspace_bytes, a.stream);
  }
  void backward(T* dx) const {
    Arena& a = Arena::get();
    bn::BackwardArgs<T> args;
    args.x = static_cast<const T*>(a.x);
    args.dy = static_cast<const T*>(a.dy);
    args.dx = dx;
    args.weight = bn::span<const float>(a.weight, F);
    args.mean = bn::span<const float>(a.save_mean, F);
    args.invstd = bn::span<const float>(a.save_invstd, F);
    args.grad_weight = bn::span<float>(a.grad_weight, F);
    args.grad_bias = bn::span<float>(a.grad_bias, F);
    bn::BackwardConfig config;
    config.mode = mode;
    bn::backward(bn::cuda{}, shape, args, config, workspace, workspace_bytes, a.stream);
  }
};

// ---- cuDNN -----------------------------------------------------------------------------------

#if BATCHNORM_BENCH_CUDNN
template <class T>
cudnnDataType_t cudnn_type() {
  if constexpr (std::is_same_v<T, float>) return CUDNN_DATA_FLOAT;
  else if constexpr (std::is_same_v<T, __half>) return CUDNN_DATA_HALF;
  else return CUDNN_DATA_BFLOAT16;
}

/// cuDNN's BatchNormalization (legacy API, what PyTorch calls) for one case: spatial mode
/// (persistent for NHWC, as PyTorch picks for channels-last; plain spatial when it refuses),
/// per-activation mode for per_activation.
template <class T>
struct Cudnn {
  cudnnHandle_t handle = nullptr;
  cudnnTensorDescriptor_t x_desc = nullptr, param_desc = nullptr;
  cudnnBatchNormMode_t mode = CUDNN_BATCHNORM_SPATIAL;
  cudnnStatus_t status = CUDNN_STATUS_SUCCESS;

  explicit Cudnn(const Case& c) {
    const int N = static_cast<int>(c.N), C = static_cast<int>(c.C);
    const int H = c.H ? static_cast<int>(c.H) : 1, W = c.W ? static_cast<int>(c.W) : 1;
    const auto format = c.nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    mode = c.per_activation ? CUDNN_BATCHNORM_PER_ACTIVATION
                            : c.nhwc ? CUDNN_BATCHNORM_SPATIAL_PERSISTENT : CUDNN_BATCHNORM_SPATIAL;
    if ((status = cudnnCreate(&handle)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnCreateTensorDescriptor(&x_desc)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnCreateTensorDescriptor(&param_desc)) != CUDNN_STATUS_SUCCESS) return;
    if ((status = cudnnSetTensor4dDescriptor(x_desc, format, cudnn_type<T>(), N, C, H, W)) != CUDNN_STATUS_SUCCESS)
      return;
    status = cudnnDeriveBNTensorDescriptor(param_desc, x_desc, mode);
  }
  ~Cudnn() {
    if (param_desc) cudnnDestroyTensorDescriptor(param_desc);
    if (x_desc) cudnnDestroyTensorDescriptor(x_desc);
    if (handle) cudnnDestroy(handle);
  }
  cudnnStatus_t forward(bool training, void* y) {
    Arena& a = Arena::get();
    cudnnSetStream(handle, a.stream);
    const float one = 1.f, zero = 0.f;
    if (training)
      return cudnnBatchNormalizationForwardTraining(handle, mode, &one, &zero, x_desc, a.x, x_desc, y, param_desc,
                                                    a.weight, a.bias, 0.1, a.running_mean, a.running_var, 1e-5,
                                                    a.peer_mean, a.peer_invstd);
    return cudnnBatchNormalizationForwardInference(handle, mode, &one, &zero, x_desc, a.x, x_desc, y, param_desc,
                                                   a.weight, a.bias, a.running_mean, a.running_var, 1e-5);
  }
  cudnnStatus_t backward(void* dx) {
    Arena& a = Arena::get();
    cudnnSetStream(handle, a.stream);
    const float one = 1.f, zero = 0.f;
    return cudnnBatchNormalizationBackward(handle, mode, &one, &zero, &one, &zero, x_desc, a.x, x_desc, a.dy, x_desc,
                                           dx, param_desc, a.weight, a.peer_grad_weight, a.peer_grad_bias, 1e-5,
                                           a.peer_mean, a.peer_invstd);
  }
};
#endif

// ---- one benchmark: ours timed by Google Benchmark, cuDNN checked then timed alongside ------

/// Running statistics and parameters that make inference normalize like training: the
/// running stats of x's distribution (uniform in [-0.5, 1.5): mean 0.5, var 1/3).
void reset_parameters(std::int64_t F) {
  Arena& a = Arena::get();
  fill(a.weight, F, 11, 1.0f, 0.25f, a.stream);
  fill(a.bias, F, 12, 0.0f, 0.25f, a.stream);
  fill(a.running_mean, F, 13, 0.5f, 0.0f, a.stream);
  fill(a.running_var, F, 14, 1.0f / 3.0f, 0.0f, a.stream);
}

constexpr int timed_iterations = 20;

template <class T>
void run_case(benchmark::State& state, const Case& c, Op op, DType dtype) {
  if (!have_gpu()) return state.SkipWithError("no CUDA device");
  Arena& a = Arena::get();
  const std::int64_t n = c.numel(), F = c.features();
  fill(static_cast<T*>(a.x), n, 1, 0.5f, 1.0f, a.stream);
  fill(static_cast<T*>(a.dy), n, 2, 0.0f, 1.0f, a.stream);
  reset_parameters(F);
  Ours<T> ours(c);
  T* y = static_cast<T*>(a.y);
  T* dx = static_cast<T*>(a.dx);
  if (op == Op::backward) ours.forward(true, y);  // saved statistics for backward
  auto launch = [&] {
    if (op == Op::backward) ours.backward(dx);
    else ours.forward(op == Op::train_forward, y);
  };
  // cuDNN: same inputs, its own outputs; compared with ours once, then timed.
  double cudnn_ok = -1, cudnn_err = -1, cudnn_time = 0;
#if BATCHNORM_BENCH_CUDNN
  {
    Cudnn<T> cudnn(c);
    cudnnStatus_t status = cudnn.status;
    if (status == CUDNN_STATUS_SUCCESS && cudnn.mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT) {
      // Try the persistent kernel once; fall back to plain spatial when it refuses the case.
      reset_parameters(F);
      if (cudnn.forward(true, a.peer_y) != CUDNN_STATUS_SUCCESS) {
        cudnn.mode = CUDNN_BATCHNORM_SPATIAL;
        status = cudnnDeriveBNTensorDescriptor(cudnn.param_desc, cudnn.x_desc, cudnn.mode);
      }
    }
    if (status == CUDNN_STATUS_SUCCESS) {
      // Fresh parameters for both, then one call each on the same input.
      reset_parameters(F);
      launch();
      reset_parameters(F);
      status = cudnn.forward(op != Op::infer_forward, a.peer_y);
      if (status == CUDNN_STATUS_SUCCESS && op == Op::backward) status = cudnn.backward(a.peer_dx);
    }
    if (status == CUDNN_STATUS_SUCCESS) {
      cudnn_err = op == Op::backward ? max_error(dx, static_cast<T*>(a.peer_dx), n, a.stream)
                                     : max_error(y, static_cast<T*>(a.peer_y), n, a.stream);
      cudnn_ok = cudnn_err <= tolerance(dtype) ? 1 : 0;
      if (cudnn_ok == 1)
        cudnn_time = time_of(a.stream, timed_iterations, [&] {
          if (op == Op::backward) cudnn.backward(a.peer_dx);
          else cudnn.forward(op == Op::train_forward, a.peer_y);
        });
    } else {
      state.SetLabel(std::string("cuDNN: ") + cudnnGetErrorString(status));
    }
    BENCH_CHECK(cudaStreamSynchronize(a.stream));
  }
  reset_parameters(F);
  if (op == Op::backward) ours.forward(true, y);
#endif
  (void)dtype;
  double ours_time = 0;  // mean seconds per call (Iterations(1): one batch of timed_iterations)
  for (auto _ : state) {
    ours_time = time_of(a.stream, timed_iterations, launch);
    state.SetIterationTime(ours_time);
  }
  BENCH_CHECK(cudaStreamSynchronize(a.stream));
  const double bytes = static_cast<double>(bytes_moved(c, op, sizeof(T)));
  const double gbps = bytes / ours_time / 1e9, copy_gbps = copy_bandwidth() / 1e9;
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * static_cast<std::int64_t>(state.iterations()));
  state.counters["bytes"] = bytes;
  state.counters["us"] = ours_time * 1e6;
  state.counters["GBps"] = gbps;
  state.counters["copy_GBps"] = copy_gbps;
  state.counters["pct_copy"] = 100.0 * gbps / copy_gbps;
  state.counters["cudnn_ok"] = cudnn_ok;
  state.counters["cudnn_err"] = cudnn_err;
  state.counters["cudnn_us"] = cudnn_time * 1e6;
  state.counters["cudnn_GBps"] = cudnn_time > 0 ? bytes / cudnn_time / 1e9 : 0;
  state.counters["x_cudnn"] = cudnn_time > 0 ? cudnn_time / ours_time : 0;
}

void register_suite() {
  benchmark::RegisterBenchmark("DeviceCopy", BM_DeviceCopy)->UseManualTime()->Iterations(3)->Unit(benchmark::kMicrosecond);
  for (const Op op : {Op::train_forward, Op::infer_forward, Op::backward})
    for (const DType dtype : {DType::f32, DType::f16, DType::bf16})
      for (const Case& c : suite()) {
        const std::string name = std::string(name_of(op)) + "/" + name_of(dtype) + "/" + c.key();
        auto* b = benchmark::RegisterBenchmark(name.c_str(), [c, op, dtype](benchmark::State& state) {
          if (dtype == DType::f32) run_case<float>(state, c, op, dtype);
          else if (dtype == DType::f16) run_case<__half>(state, c, op, dtype);
          else run_case<__nv_bfloat16>(state, c, op, dtype);
        });
        b->UseManualTime()->Iterations(1)->Unit(benchmark::kMicrosecond);
      }
}

}  // namespace

int main(int argc, char** argv) {
  // --suite_json=PATH (ours, not Google Benchmark's): write the suite for tools/gpu_peer.py.
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const char* flag = "--suite_json=";
    if (std::strncmp(argv[i], flag, std::strlen(flag)) == 0) write_suite_json(argv[i] + std::strlen(flag));
    else argv[kept++] = argv[i];
  }
  argc = kept;
  register_suite();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (have_gpu()) {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&prop, device) == cudaSuccess)
      benchmark::AddCustomContext("device", prop.name);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
