// 01_quickstart.cu: train and evaluate a BatchNorm2d, on the GPU when there is one.
//
// The data: images with 4 channels, each channel drawn from its own normal distribution
// (its own mean and standard deviation). The task: make the layer's output equal a target
// that is the *standardized* input, rescaled per channel by a known scale and shift. A
// BatchNorm2d can do exactly that: it standardizes each channel with the batch's
// statistics, and its learnable weight and bias have to become the target's scale and
// shift. So we
//   1. train: for a few steps, forward a fresh batch (training mode: batch statistics,
//      running statistics updated), compute a mean squared error and its gradient on the
//      host, call backward, and take a plain SGD step on weight and bias, in place on the
//      layer's own buffers (weight_data() / grad_weight_data(): host memory for the CPU
//      backend, device memory for CUDA, where a small kernel does it), as an optimizer does;
//   2. evaluate: forward an unseen batch in eval mode, which normalizes with the running
//      statistics gathered in training (here their cumulative average, momentum = nullopt);
//   3. check ourselves: the same steps run on the CPU backend (batchnorm::cpu) and in a
//      naive double-precision implementation written below; every loss, output, gradient
//      and final parameter must agree. The program returns 1 when they do not.
//
// The same source builds with nvcc (this file) and with a plain C++ compiler
// (01_quickstart.cpp includes it). With nvcc it uses the CUDA backend (batchnorm::cuda,
// device pointers, <batchnorm/cuda.cuh>) when cudaGetDeviceCount finds a device, and the
// CPU backend otherwise; without nvcc it always uses the CPU backend.

#include <batchnorm/batchnorm.hpp>

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include <batchnorm/cuda.cuh>
#endif

#include "common/rng.hpp"  // Rng

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr std::int64_t N = 16, C = 4, H = 6, W = 6;
constexpr std::int64_t S = H * W;        // pixels per channel
constexpr std::int64_t NUMEL = N * C * S;
constexpr int kTrainSteps = 12;
constexpr double kLearningRate = 2.0;

// ---- deterministic data -----------------------------------------------------------------

using examples::Rng;  // common/rng.hpp: splitmix64, the same numbers on every platform and compiler

struct Problem {
  std::vector<double> channel_mean{3.0, -1.0, 10.0, 0.0};  // distribution of each channel
  std::vector<double> channel_std{2.0, 0.5, 4.0, 1.0};
  std::vector<double> target_scale{1.5, 0.5, 2.0, 1.0};    // what weight should learn
  std::vector<double> target_shift{-1.0, 2.0, 0.5, 0.0};   // what bias should learn
  double target_noise = 0.1;                               // standard deviation
  std::vector<std::vector<float>> train_x, train_target;  // kTrainSteps batches, NCHW
  std::vector<float> eval_x, eval_target;

  /// target = scale_c * (x - mean_c) / std_c + shift_c + noise, with the distribution's
  /// true mean and std. The noise keeps the gradient w.r.t. x away from zero: without it
  /// the residual would be linear in x, and BatchNorm's backward projects that out.
  Problem() {
    Rng rng(20261121);
    for (int b = 0; b <= kTrainSteps; ++b) {
      std::vector<float> x(static_cast<std::size_t>(NUMEL)), t(static_cast<std::size_t>(NUMEL));
      for (std::int64_t i = 0; i < NUMEL; ++i) {
        const auto c = static_cast<std::size_t>((i / S) % C);
        const double z = rng.normal();
        x[static_cast<std::size_t>(i)] = static_cast<float>(channel_mean[c] + channel_std[c] * z);
        t[static_cast<std::size_t>(i)] = static_cast<float>(target_scale[c] * z + target_shift[c] +
                                                            target_noise * rng.normal());
      }
      if (b < kTrainSteps) {
        train_x.push_back(std::move(x));
        train_target.push_back(std::move(t));
      } else {
        eval_x = std::move(x);
        eval_target = std::move(t);
      }
    }
  }

  /// loss = 0.5 * mean over elements of (y - target)^2; writes dloss/dy into @p dy when given.
  static double loss(const std::vector<float>& y, const std::vector<float>& target, std::vector<float>* dy) {
    double sum = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      const double diff = static_cast<double>(y[i]) - static_cast<double>(target[i]);
      sum += diff * diff;
      if (dy) (*dy)[i] = static_cast<float>(diff / static_cast<double>(y.size()));
    }
    return 0.5 * sum / static_cast<double>(y.size());
  }
};

/// What one run produces; compared between runs.
struct Run {
  std::vector<float> losses;          // per training step, then the eval loss
  std::vector<float> last_train_y;    // output of the last training forward
  std::vector<float> last_dx;         // gradient w.r.t. its input
  std::vector<float> last_grad_weight, last_grad_bias;
  batchnorm::State<float> state;      // after training
  std::vector<float> eval_y;
};

// ---- memory of each backend ----------------------------------------------------------

/// An array of floats in the backend's memory: host memory for batchnorm::cpu.
template <class Backend>
class Array {
 public:
  explicit Array(std::int64_t n) : data_(static_cast<std::size_t>(n)) {}
  float* get() { return data_.data(); }
  void upload(const std::vector<float>& host) { data_ = host; }
  [[nodiscard]] std::vector<float> download() const { return data_; }

 private:
  std::vector<float> data_;
};

#ifdef __CUDACC__
void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

/// Device memory for batchnorm::cuda. cudaMemcpy on the legacy default stream orders the
/// copies after the layer's kernels (which run on that stream here).
template <>
class Array<batchnorm::cuda> {
 public:
  explicit Array(std::int64_t n) : size_(static_cast<std::size_t>(n)) {
    cuda_check(cudaMalloc(&data_, size_ * sizeof(float)), "cudaMalloc");
  }
  ~Array() { cudaFree(data_); }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  float* get() { return data_; }
  void upload(const std::vector<float>& host) {
    cuda_check(cudaMemcpy(data_, host.data(), size_ * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  [[nodiscard]] std::vector<float> download() const {
    std::vector<float> host(size_);
    cuda_check(cudaMemcpy(host.data(), data_, size_ * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return host;
  }

 private:
  float* data_ = nullptr;
  std::size_t size_;
};
#endif

// ---- the optimizer step, on the layer's own buffers --------------------------------------

/// param -= lr * grad over n elements of host memory.
void sgd_update(batchnorm::cpu, float* param, const float* grad, std::int64_t n, double lr) {
  for (std::int64_t i = 0; i < n; ++i) param[i] = static_cast<float>(param[i] - lr * grad[i]);
}

#ifdef __CUDACC__
__global__ void sgd_kernel(float* param, const float* grad, std::int64_t n, double lr) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) param[i] = static_cast<float>(param[i] - lr * grad[i]);
}

/// The same on device memory, on the legacy default stream: ordered after the backward that
/// wrote the gradients and before the next forward, which run on that stream too.
void sgd_update(batchnorm::cuda, float* param, const float* grad, std::int64_t n, double lr) {
  const auto blocks = static_cast<unsigned>((n + 255) / 256);
  sgd_kernel<<<blocks, 256>>>(param, grad, n, lr);
  cuda_check(cudaGetLastError(), "sgd_kernel");
}
#endif

/// Plain SGD on weight and bias through the raw buffers: no copies, and the layer's saved
/// statistics and running statistics stay as they are (unlike a state() / load_state()
/// round trip). The gradients are those of the last backward (written, not accumulated,
/// unless Options::accumulate_gradients is set).
template <class Backend>
void sgd_step(batchnorm::BatchNorm2d<float, Backend>& bn, double lr) {
  sgd_update(Backend{}, bn.weight_data(), bn.grad_weight_data(), bn.num_features(), lr);
  sgd_update(Backend{}, bn.bias_data(), bn.grad_bias_data(), bn.num_features(), lr);
}

// ---- the demo, written once for both backends ------------------------------------------

template <class Backend>
Run train_and_eval(const Problem& problem, bool verbose) {
  const batchnorm::Shape shape{N, C, H, W};
  batchnorm::Options options;
  options.momentum = std::nullopt;  // running stats = cumulative average of the batch stats
  batchnorm::BatchNorm2d<float, Backend> bn(C, options);

  Array<Backend> x(NUMEL), y(NUMEL), dy(NUMEL), dx(NUMEL);
  std::vector<float> dy_host(static_cast<std::size_t>(NUMEL));
  Run run;

  bn.train();
  for (int step = 0; step < kTrainSteps; ++step) {
    const auto k = static_cast<std::size_t>(step);
    x.upload(problem.train_x[k]);
    bn.forward(x.get(), y.get(), shape);  // batch statistics; running statistics updated
    run.last_train_y = y.download();
    run.losses.push_back(static_cast<float>(Problem::loss(run.last_train_y, problem.train_target[k], &dy_host)));
    dy.upload(dy_host);
    bn.backward(x.get(), dy.get(), dx.get(), shape);  // dx, grad_weight, grad_bias

    if (step == kTrainSteps - 1) {  // host copies of the last gradients, for the check
      const batchnorm::Gradients<float> g = bn.gradients();
      run.last_grad_weight = g.grad_weight;
      run.last_grad_bias = g.grad_bias;
      run.last_dx = dx.download();
    }
    sgd_step(bn, kLearningRate);  // weight -= lr * grad_weight, bias -= lr * grad_bias, in place
    if (verbose && (step < 3 || step == kTrainSteps - 1))
      std::printf("  train step %2d: loss %.6f\n", step + 1, static_cast<double>(run.losses.back()));
    else if (verbose && step == 3)
      std::printf("  ...\n");
  }
  run.state = bn.state();

  bn.eval();
  x.upload(problem.eval_x);
  bn.forward(x.get(), y.get(), shape);  // running statistics
  run.eval_y = y.download();
  run.losses.push_back(static_cast<float>(Problem::loss(run.eval_y, problem.eval_target, nullptr)));
  if (verbose) std::printf("  eval on an unseen batch: loss %.6f\n", static_cast<double>(run.losses.back()));
  return run;
}

/// The same computation in double with plain loops, from the formulas (PyTorch's
/// BatchNorm2d with momentum=None), independent of the library.
Run naive_train_and_eval(const Problem& problem) {
  const double eps = 1e-5;
  const double n = static_cast<double>(N * S);
  std::vector<double> weight(C, 1.0), bias(C, 0.0), running_mean(C, 0.0), running_var(C, 1.0);
  std::vector<float> dy(static_cast<std::size_t>(NUMEL));
  auto at = [](std::int64_t b, std::int64_t c, std::int64_t s) { return static_cast<std::size_t>((b * C + c) * S + s); };
  Run run;
  for (int step = 0; step < kTrainSteps; ++step) {
    const std::vector<float>& x = problem.train_x[static_cast<std::size_t>(step)];
    std::vector<double> mean(C, 0.0), var(C, 0.0);
    for (std::int64_t c = 0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(c);
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t s = 0; s < S; ++s) mean[k] += x[at(b, c, s)];
      mean[k] /= n;
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t s = 0; s < S; ++s) var[k] += (x[at(b, c, s)] - mean[k]) * (x[at(b, c, s)] - mean[k]);
      var[k] /= n;  // biased, to normalize
      const double factor = 1.0 / (step + 1);  // cumulative moving average
      running_mean[k] = (1.0 - factor) * running_mean[k] + factor * mean[k];
      running_var[k] = (1.0 - factor) * running_var[k] + factor * var[k] * n / (n - 1.0);  // unbiased
    }
    std::vector<float> y(static_cast<std::size_t>(NUMEL));
    for (std::int64_t b = 0; b < N; ++b)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t s = 0; s < S; ++s) {
          const auto k = static_cast<std::size_t>(c);
          y[at(b, c, s)] = static_cast<float>((x[at(b, c, s)] - mean[k]) / std::sqrt(var[k] + eps) * weight[k] + bias[k]);
        }
    run.losses.push_back(static_cast<float>(Problem::loss(y, problem.train_target[static_cast<std::size_t>(step)], &dy)));
    run.last_train_y = y;
    // Backward: dxhat = dy * w; dx = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    std::vector<float> dx(static_cast<std::size_t>(NUMEL));
    std::vector<float> grad_weight(C), grad_bias(C);
    for (std::int64_t c = 0; c < C; ++c) {
      const auto k = static_cast<std::size_t>(c);
      const double invstd = 1.0 / std::sqrt(var[k] + eps);
      double sum_dy = 0.0, sum_dy_xhat = 0.0;
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t s = 0; s < S; ++s) {
          sum_dy += dy[at(b, c, s)];
          sum_dy_xhat += dy[at(b, c, s)] * (x[at(b, c, s)] - mean[k]) * invstd;
        }
      for (std::int64_t b = 0; b < N; ++b)
        for (std::int64_t s = 0; s < S; ++s) {
          const double xhat = (x[at(b, c, s)] - mean[k]) * invstd;
          dx[at(b, c, s)] = static_cast<float>(weight[k] * invstd * (dy[at(b, c, s)] - sum_dy / n - xhat * sum_dy_xhat / n));
        }
      grad_weight[k] = static_cast<float>(sum_dy_xhat);
      grad_bias[k] = static_cast<float>(sum_dy);
      weight[k] -= kLearningRate * sum_dy_xhat;
      bias[k] -= kLearningRate * sum_dy;
    }
    run.last_dx = dx;
    run.last_grad_weight = grad_weight;
    run.last_grad_bias = grad_bias;
  }
  for (std::int64_t c = 0; c < C; ++c) {
    const auto k = static_cast<std::size_t>(c);
    run.state.weight.push_back(static_cast<float>(weight[k]));
    run.state.bias.push_back(static_cast<float>(bias[k]));
    run.state.running_mean.push_back(static_cast<float>(running_mean[k]));
    run.state.running_var.push_back(static_cast<float>(running_var[k]));
  }
  run.state.num_batches_tracked = kTrainSteps;
  run.eval_y.resize(static_cast<std::size_t>(NUMEL));
  const std::vector<float>& x = problem.eval_x;
  for (std::int64_t b = 0; b < N; ++b)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t s = 0; s < S; ++s) {
        const auto k = static_cast<std::size_t>(c);
        run.eval_y[at(b, c, s)] = static_cast<float>(
            (x[at(b, c, s)] - running_mean[k]) / std::sqrt(running_var[k] + eps) * weight[k] + bias[k]);
      }
  run.losses.push_back(static_cast<float>(Problem::loss(run.eval_y, problem.eval_target, nullptr)));
  return run;
}

// ---- comparison ------------------------------------------------------------------------

/// Largest |got - want|, relative to the largest |want| of the array (so that arrays of
/// small numbers, such as dx, are judged on their own scale). Infinity on a size mismatch
/// or a NaN.
double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size() || want.empty()) return INFINITY;
  double worst = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(d == d)) return INFINITY;
    worst = std::max(worst, d);
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  return worst / std::max(scale, 1e-30);
}

/// Compares two runs; prints one line; returns true when they agree within @p tolerance.
bool agree(const Run& got, const Run& want, const char* against, double tolerance) {
  const std::pair<const char*, double> errors[] = {
      {"losses", relative_error(got.losses, want.losses)},
      {"train output", relative_error(got.last_train_y, want.last_train_y)},
      {"dx", relative_error(got.last_dx, want.last_dx)},
      {"grad_weight", relative_error(got.last_grad_weight, want.last_grad_weight)},
      {"grad_bias", relative_error(got.last_grad_bias, want.last_grad_bias)},
      {"weight", relative_error(got.state.weight, want.state.weight)},
      {"bias", relative_error(got.state.bias, want.state.bias)},
      {"running_mean", relative_error(got.state.running_mean, want.state.running_mean)},
      {"running_var", relative_error(got.state.running_var, want.state.running_var)},
      {"eval output", relative_error(got.eval_y, want.eval_y)},
  };
  double worst = 0.0;
  const char* worst_name = "";
  for (const auto& [name, error] : errors) {
    if (!(error <= worst)) {
      worst = error;
      worst_name = name;
    }
  }
  const bool counters = got.state.num_batches_tracked == want.state.num_batches_tracked;
  const bool ok = worst <= tolerance && counters;
  std::printf("check against %s: largest relative difference %.2e (%s), tolerance %.0e, "
              "num_batches_tracked %lld vs %lld: %s\n",
              against, worst, worst_name, tolerance, static_cast<long long>(got.state.num_batches_tracked),
              static_cast<long long>(want.state.num_batches_tracked), ok ? "OK" : "MISMATCH");
  for (const auto& [name, error] : errors)
    if (!(error <= tolerance)) std::printf("  MISMATCH in %s: relative difference %.2e\n", name, error);
  return ok;
}

void print_learned(const Problem& problem, const Run& run) {
  std::printf("  after %d steps   weight (target scale)   bias (target shift)   running_mean (true)   "
              "running_var (true)\n", kTrainSteps);
  for (std::size_t c = 0; c < static_cast<std::size_t>(C); ++c)
    std::printf("  channel %zu        %7.4f (%6.3f)         %7.4f (%6.3f)        %8.4f (%6.3f)      %8.4f (%6.3f)\n", c,
                static_cast<double>(run.state.weight[c]), problem.target_scale[c],
                static_cast<double>(run.state.bias[c]), problem.target_shift[c],
                static_cast<double>(run.state.running_mean[c]), problem.channel_mean[c],
                static_cast<double>(run.state.running_var[c]), problem.channel_std[c] * problem.channel_std[c]);
}

int run_demo() {
  const Problem problem;
  std::string device = "CPU (batchnorm::cpu backend)";
  bool gpu = false;
#ifdef __CUDACC__
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess && count > 0) {
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    device = std::string("GPU 0: ") + prop.name + " (batchnorm::cuda backend)";
    gpu = true;
  } else {
    device += status == cudaSuccess ? ", no CUDA device found"
                                    : std::string(", no usable CUDA device: ") + cudaGetErrorName(status);
    (void)cudaGetLastError();  // reset the error cudaGetDeviceCount recorded
  }
#else
  device += ", built without CUDA";
#endif
  std::printf("batchnorm %d.%d.%d quickstart\n", BATCHNORM_VERSION_MAJOR, BATCHNORM_VERSION_MINOR,
              BATCHNORM_VERSION_PATCH);
  std::printf("device: %s\n", device.c_str());
  std::printf("BatchNorm2d(%lld) on (N, C, H, W) = (%lld, %lld, %lld, %lld): %d training steps of SGD "
              "(lr %.2f) on a mean squared error, then eval\n",
              static_cast<long long>(C), static_cast<long long>(N), static_cast<long long>(C),
              static_cast<long long>(H), static_cast<long long>(W), kTrainSteps, kLearningRate);

  const Run cpu_run = train_and_eval<batchnorm::cpu>(problem, !gpu);
  std::optional<Run> gpu_run;
#ifdef __CUDACC__
  if (gpu) gpu_run = train_and_eval<batchnorm::cuda>(problem, true);
#endif
  const Run& result = gpu_run ? *gpu_run : cpu_run;
  print_learned(problem, result);

  bool ok = true;
  if (gpu_run) ok = agree(*gpu_run, cpu_run, "the CPU backend", 1e-4) && ok;
  ok = agree(cpu_run, naive_train_and_eval(problem), "a naive double implementation", 1e-4) && ok;
  // The point of the exercise: the layer learned the task and generalizes to new data.
  const double first = result.losses.front(), eval = result.losses.back();
  const bool learned = eval < 0.05 * first;
  std::printf("eval loss %.6f vs first training loss %.6f: %s\n", eval, first,
              learned ? "learned" : "DID NOT LEARN");
  ok = ok && learned;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run_demo();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
