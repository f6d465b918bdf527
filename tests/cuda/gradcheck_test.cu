// GPU equals CPU: forward and backward of the CUDA backend against the CPU backend (the
// reference that tests/gradcheck_test.cpp checks against finite differences), through the
// class API, for float and double, on the gradcheck shapes and on bigger ones that exercise
// the kernels' work splitting (small C with large N·spatial, many channels, BN1d with large N,
// channels_last). Each case runs several train/eval steps with fresh data, and every step
// compares y, dx, grad_weight, grad_bias, running_mean, running_var and num_batches_tracked.
//
// The GPU runs on its own non-blocking stream (forward/backward take the stream), so a
// kernel launched on the wrong stream races with the synchronization below.
//
// Tolerances, with eps_T the machine epsilon of T and L1 the per-feature sum of |terms| the
// reduction adds up (Σ|dy| for grad_bias, Σ|dy·(x − mean)·invstd| for grad_weight):
//  - y, dx:                float |diff| <= 5e-5 + 1e-4·|cpu|,  double 1e-12 + 1e-10·|cpu|
//  - running_mean/var:     same as y
//  - grad_weight/bias:     |diff| <= abs + 16·eps_T·L1  (abs: float 1e-6, double 1e-13)
// The CPU backend accumulates in double; the GPU in float for float data (Welford + Chan
// merges, block reductions), so float results differ by float rounding of the statistics:
// for the largest case here (65536 values per channel) a worst-case summation bound is
// ~log2(n)·eps·L1, which the gradient bound covers. These bounds come from that analysis;
// run with BATCHNORM_FIXTURE_REPORT=1 on a GPU to print the measured errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <batchnorm/cuda.cuh>

#include "support/device_memory.cuh"
#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"

namespace {

using batchnorm::Layout;
using batchnorm::Mode;
using bn_test::gpu_available;

struct GpuCase {
  std::string name;
  int dims;
  std::vector<std::int64_t> shape;
  std::vector<bool> steps;  // training flag of each step
  Mode mode = Mode::per_channel;
  bool affine = true;
  bool track = true;
  Layout layout = Layout::contiguous;
  std::optional<double> momentum = 0.1;
  double eps = 1e-5;
};

void PrintTo(const GpuCase& c, std::ostream* os) { *os << c.name; }

const std::vector<bool> kTrain{true, true, false, true};  // train, train, eval, train again
const std::vector<bool> kEval{false, false};
const std::vector<bool> kTrainEval{true, true, false};

std::vector<GpuCase> gpu_cases() {
  std::vector<GpuCase> v;
  auto add = [&](GpuCase c) { v.push_back(std::move(c)); };
  // -- the shapes of tests/gradcheck_test.cpp
  add({"bn1d_nc", 1, {5, 3}, kTrain});
  add({"bn1d_ncl", 1, {3, 2, 4}, kTrain});
  add({"bn2d", 2, {2, 3, 2, 3}, kTrain});
  add({"bn3d", 3, {2, 2, 2, 1, 3}, kTrain});
  add({"bn1d_ncl_n1", 1, {1, 3, 5}, kTrain});
  add({"bn2d_n1", 2, {1, 2, 3, 3}, kTrain});
  add({"bn3d_n1", 3, {1, 2, 2, 2, 2}, kTrain});
  add({"bn1d_nc_c1", 1, {7, 1}, kTrain});
  add({"bn2d_c1", 2, {3, 1, 2, 2}, kTrain});
  add({"bn1d_ncl_per_activation", 1, {4, 2, 3}, kTrain, Mode::per_activation});
  add({"bn2d_per_activation", 2, {3, 2, 2, 2}, kTrain, Mode::per_activation});
  add({"bn3d_per_activation_c1", 3, {3, 1, 2, 1, 2}, kTrain, Mode::per_activation});
  add({"bn2d_eval", 2, {2, 3, 2, 2}, kEval});
  add({"bn1d_nc_eval_n1", 1, {1, 4}, kEval});
  add({"bn1d_ncl_per_activation_eval", 1, {3, 2, 3}, kEval, Mode::per_activation});
  add({"bn3d_eval_n1", 3, {1, 2, 1, 2, 2}, kEval});
  add({"bn2d_affine_off", 2, {2, 2, 2, 3}, kTrain, Mode::per_channel, false});
  add({"bn1d_nc_affine_off_eval", 1, {4, 3}, kEval, Mode::per_channel, false});
  add({"bn2d_untracked", 2, {2, 2, 3, 2}, {false, true, false}, Mode::per_channel, true, false});
  add({"bn1d_nc_untracked", 1, {4, 3}, kTrainEval, Mode::per_channel, true, false});
  add({"bn2d_eps0p5", 2, {2, 3, 2, 2}, kTrain, Mode::per_channel, true, true, Layout::contiguous, 0.1, 0.5});
  add({"bn2d_momentum_none", 2, {2, 3, 2, 2}, kTrain, Mode::per_channel, true, true, Layout::contiguous,
       std::nullopt});
  add({"bn2d_channels_last", 2, {2, 3, 2, 3}, kTrain, Mode::per_channel, true, true, Layout::channels_last});
  add({"bn2d_per_activation_channels_last", 2, {3, 2, 2, 2}, kTrain, Mode::per_activation, true, true,
       Layout::channels_last});
  // -- bigger shapes
  add({"big_bn2d_64x4x32x32", 2, {64, 4, 32, 32}, kTrainEval});
  add({"big_bn1d_5000x50", 1, {5000, 50}, kTrainEval});
  add({"big_bn2d_3x2047x5x5", 2, {3, 2047, 5, 5}, kTrainEval});
  add({"big_bn2d_c1_2x1x128x128", 2, {2, 1, 128, 128}, kTrainEval, Mode::per_channel, true, true,
       Layout::contiguous, std::nullopt});
  add({"big_bn1d_2x4096", 1, {2, 4096}, kTrainEval});
  add({"big_bn1d_ncl_8x64x300", 1, {8, 64, 300}, kTrainEval});
  add({"big_bn3d_4x3x8x8x8", 3, {4, 3, 8, 8, 8}, kTrainEval, Mode::per_channel, false});
  add({"big_bn2d_channels_last_16x32x8x8", 2, {16, 32, 8, 8}, kTrainEval, Mode::per_channel, true, true,
       Layout::channels_last});
  add({"big_bn1d_ncl_per_activation_512x4x16", 1, {512, 4, 16}, kTrainEval, Mode::per_activation});
  add({"big_bn2d_per_activation_channels_last_64x8x4x4", 2, {64, 8, 4, 4}, kTrainEval, Mode::per_activation,
       true, true, Layout::channels_last});
  add({"big_bn2d_untracked_32x16x12x12", 2, {32, 16, 12, 12}, kTrainEval, Mode::per_channel, true, false});
  return v;
}

using bn_test::spatial_of;

template <class T>
struct gpu_tolerance;
template <>
struct gpu_tolerance<float> {
  static constexpr bn_test::Tolerance elementwise{5e-5, 1e-4};
  static constexpr double reduction_abs = 1e-6;
};
template <>
struct gpu_tolerance<double> {
  static constexpr bn_test::Tolerance elementwise{1e-12, 1e-10};
  static constexpr double reduction_abs = 1e-13;
};

/// |got - want| <= abs + 16·eps_T·l1, per feature.
template <class P>
::testing::AssertionResult reduction_close(const std::vector<P>& got, const std::vector<P>& want,
                                           const std::vector<double>& l1, double abs, const std::string& what) {
  if (got.size() != want.size() || want.size() != l1.size())
    return ::testing::AssertionFailure() << what << ": sizes " << got.size() << " / " << want.size();
  const double k = 16.0 * std::numeric_limits<P>::epsilon();
  std::size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  first.precision(17);
  for (std::size_t f = 0; f < got.size(); ++f) {
    const double diff = std::fabs(static_cast<double>(got[f]) - static_cast<double>(want[f]));
    const double bound = abs + k * l1[f];
    worst = std::max(worst, std::isnan(diff) ? INFINITY : diff / bound);
    if (!(diff <= bound)) {
      if (bad < 5) first << "\n  [" << f << "] gpu " << got[f] << ", cpu " << want[f] << " (bound " << bound << ")";
      ++bad;
    }
  }
  if (bn_test::report_errors()) std::printf("  [report] %-60s max diff/bound=%.3g\n", what.c_str(), worst);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << got.size() << " features out of bounds"
                                       << first.str();
}

using bn_test::Stream;

template <class T, int Dims>
void compare(const GpuCase& c) {
  using P = batchnorm::param_t<T>;
  const auto& tol = gpu_tolerance<T>::elementwise;
  const double red_abs = gpu_tolerance<T>::reduction_abs;
  const std::int64_t N = c.shape[0], C = c.shape[1], S = spatial_of(c.shape);
  const std::int64_t features = c.mode == Mode::per_channel ? C : C * S;
  const auto numel = static_cast<std::size_t>(N * C * S);
  const batchnorm::Shape shape = bn_test::make_shape(c.shape, c.layout);
  const bool cl = c.layout == Layout::channels_last;

  batchnorm::Options o;
  o.mode = c.mode;
  o.affine = c.affine;
  o.track_running_stats = c.track;
  o.momentum = c.momentum;
  o.eps = c.eps;

  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.5, 1.5);

  batchnorm::State<P> init;
  if (c.affine) {
    for (std::int64_t f = 0; f < features; ++f) {
      init.weight.push_back(static_cast<P>(uniform(rng) * (f % 2 ? -1 : 1)));
      init.bias.push_back(static_cast<P>(normal(rng)));
    }
  }
  if (c.track) {
    for (std::int64_t f = 0; f < features; ++f) {
      init.running_mean.push_back(static_cast<P>(0.5 * normal(rng)));
      init.running_var.push_back(static_cast<P>(uniform(rng)));
    }
    init.num_batches_tracked = 2;
  }
  std::vector<double> ch_offset(static_cast<std::size_t>(C)), ch_scale(static_cast<std::size_t>(C));
  for (std::int64_t ch = 0; ch < C; ++ch) {
    ch_offset[static_cast<std::size_t>(ch)] = 2.0 * normal(rng);
    ch_scale[static_cast<std::size_t>(ch)] = uniform(rng);
  }

  batchnorm::BatchNorm<T, Dims, batchnorm::cpu> cpu_bn(features, o);
  batchnorm::BatchNorm<T, Dims, batchnorm::cuda> gpu_bn(features, o);
  cpu_bn.load_state(init);
  gpu_bn.load_state(init);
  Stream stream;

  for (std::size_t step = 0; step < c.steps.size(); ++step) {
    const bool training = c.steps[step];
    const std::string w = c.name + " step " + std::to_string(step) + (training ? " (train)" : " (eval)") + ": ";
    SCOPED_TRACE(w);
    // Data in the case's memory order (the offset and scale depend on the channel only).
    std::vector<T> x(numel), dy(numel);
    for (std::size_t i = 0; i < numel; ++i) {
      const auto idx = static_cast<std::int64_t>(i);
      const std::int64_t ch = cl ? idx % C : (idx / S) % C;
      x[i] = static_cast<T>(ch_offset[static_cast<std::size_t>(ch)] +
                            ch_scale[static_cast<std::size_t>(ch)] * normal(rng));
      dy[i] = static_cast<T>(normal(rng));
    }

    cpu_bn.train(training);
    gpu_bn.train(training);
    std::vector<T> y_cpu(numel), dx_cpu(numel);
    cpu_bn.forward(x.data(), y_cpu.data(), shape);
    cpu_bn.backward(x.data(), dy.data(), dx_cpu.data(), shape);

    bn_test::device_array<T> x_d(x), dy_d(dy), y_d(numel), dx_d(numel);
    gpu_bn.forward(x_d.data(), y_d.data(), shape, stream.get());
    gpu_bn.backward(x_d.data(), dy_d.data(), dx_d.data(), shape, stream.get());
    stream.sync();
    EXPECT_TRUE(bn_test::all_close(y_d.download(), y_cpu, tol, w + "y"));
    EXPECT_TRUE(bn_test::all_close(dx_d.download(), dx_cpu, tol, w + "dx"));

    // Per-feature L1 of the reduced terms, from the CPU's saved statistics.
    std::vector<double> l1_dy(static_cast<std::size_t>(features), 0.0), l1_dyx(l1_dy);
    const P* mean = cpu_bn.save_mean_data();
    const P* invstd = cpu_bn.save_invstd_data();
    for (std::size_t i = 0; i < numel; ++i) {
      const auto idx = static_cast<std::int64_t>(i);
      const std::int64_t ch = cl ? idx % C : (idx / S) % C;
      const std::int64_t s = cl ? (idx / C) % S : idx % S;
      const auto f = static_cast<std::size_t>(c.mode == Mode::per_channel ? ch : ch * S + s);
      const double g = static_cast<double>(dy[i]);
      l1_dy[f] += std::fabs(g);
      l1_dyx[f] += std::fabs(g * (static_cast<double>(x[i]) - static_cast<double>(mean[f])) *
                             static_cast<double>(invstd[f]));
    }
    const auto g_cpu = cpu_bn.gradients(), g_gpu = gpu_bn.gradients();
    if (c.affine) {
      EXPECT_TRUE(reduction_close(g_gpu.grad_weight, g_cpu.grad_weight, l1_dyx, red_abs, w + "grad_weight"));
      EXPECT_TRUE(reduction_close(g_gpu.grad_bias, g_cpu.grad_bias, l1_dy, red_abs, w + "grad_bias"));
    } else {
      EXPECT_TRUE(g_gpu.grad_weight.empty() && g_gpu.grad_bias.empty());
    }

    const auto s_cpu = cpu_bn.state(), s_gpu = gpu_bn.state();
    EXPECT_TRUE(bn_test::all_close(s_gpu.running_mean, s_cpu.running_mean, tol, w + "running_mean"));
    EXPECT_TRUE(bn_test::all_close(s_gpu.running_var, s_cpu.running_var, tol, w + "running_var"));
    EXPECT_EQ(s_gpu.num_batches_tracked, s_cpu.num_batches_tracked);
    EXPECT_EQ(s_gpu.weight, s_cpu.weight);
    EXPECT_EQ(s_gpu.bias, s_cpu.bias);
  }
}

template <class T>
void compare_dispatch(const GpuCase& c) {
  switch (c.dims) {
    case 1: compare<T, 1>(c); break;
    case 2: compare<T, 2>(c); break;
    case 3: compare<T, 3>(c); break;
    default: FAIL() << "dims " << c.dims;
  }
}

class GpuVsCpu : public ::testing::TestWithParam<GpuCase> {};

TEST_P(GpuVsCpu, Float) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  compare_dispatch<float>(GetParam());
}

TEST_P(GpuVsCpu, Double) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  compare_dispatch<double>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cuda, GpuVsCpu, ::testing::ValuesIn(gpu_cases()),
                         [](const ::testing::TestParamInfo<GpuCase>& i) { return i.param.name; });

// In training, Σ dx over each feature is 0 on the GPU too (as checked on the CPU in
// tests/gradcheck_test.cpp), here on a shape whose reduction is split across blocks.
TEST(GpuGradProperties, DxSumsToZeroPerFeatureInTraining) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  const std::int64_t N = 32, C = 3, H = 40, W = 40, S = H * W;
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(static_cast<std::size_t>(N * C * S)), dy(x.size());
  for (auto& v : x) v = 1.0 + normal(rng);
  for (auto& v : dy) v = normal(rng);
  batchnorm::BatchNorm2d<double, batchnorm::cuda> bn(C);
  bn_test::device_array<double> x_d(x), dy_d(dy), y_d(x.size()), dx_d(x.size());
  const batchnorm::Shape shape{N, C, H, W};
  bn.forward(x_d.data(), y_d.data(), shape);
  bn.backward(x_d.data(), dy_d.data(), dx_d.data(), shape);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const auto dx = dx_d.download();
  for (std::int64_t c = 0; c < C; ++c) {
    double sum = 0.0, sum_abs = 0.0;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t s = 0; s < S; ++s) {
        const double v = dx[static_cast<std::size_t>((n * C + c) * S + s)];
        sum += v;
        sum_abs += std::fabs(v);
      }
    ASSERT_GT(sum_abs, 0.0);
    EXPECT_LE(std::fabs(sum), 1e-12 * sum_abs) << "channel " << c;
  }
}

}  // namespace
