// Issue 11, items 4, 5, 6 and 7: what the CUDA entry points check before they launch, and the
// rule for one layer used from two streams.
//  - LaunchChecks.*: checks that run on the host before any CUDA call (workspace alignment,
//    grid limits). They run with or without a device (CI has none) and give the same error.
//  - GpuLaunchChecks.*, GpuStreams.*: need a device; they skip with GTEST_SKIP() without one.
#include <batchnorm/cuda.cuh>
#include <batchnorm/half.hpp>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "support/device_memory.cuh"

namespace bn = batchnorm;

namespace {

/// The argument() of the invalid_argument @p fn throws ("" if it throws something else or nothing).
template <class Fn>
std::string rejected_argument(Fn&& fn, std::string* what = nullptr) {
  try {
    fn();
  } catch (const bn::invalid_argument& e) {
    if (what) *what = e.what();
    return e.argument();
  } catch (const std::exception& e) {
    if (what) *what = e.what();
    return "(not invalid_argument)";
  }
  return "(no exception)";
}

bool device_reads_pageable_memory() {
  int device = 0, pageable = 0;
  BN_TEST_CUDA_CHECK(cudaGetDevice(&device));
  BN_TEST_CUDA_CHECK(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device));
  return pageable != 0;
}

// ---- host-side checks (no device needed) --------------------------------------------------

// Item 4: the kernels store 8- and 16-byte records in the workspace; at an address ≡ 4 (mod 8)
// that is a sticky cudaErrorMisalignedAddress. Rejected by name, before any CUDA call (so the
// error is the same with and without a device).
TEST(LaunchChecks, MisalignedWorkspaceIsRejectedBeforeAnyCudaCall) {
  const bn::Shape shape{4, 3, 5};
  std::vector<float> x(60, 1.f), y(60), dy(60, 1.f), dx(60), stats(3, 1.f);
  alignas(64) static unsigned char arena[1024];
  for (const std::size_t offset : {std::size_t{4}, std::size_t{8}, std::size_t{12}, std::size_t{1}}) {
    void* workspace = arena + offset;
    bn::ForwardArgs<float> f;
    f.x = x.data();
    f.y = y.data();
    std::string what;
    EXPECT_EQ(rejected_argument([&] { bn::forward(bn::cuda{}, shape, f, {}, workspace, 1000, nullptr); }, &what),
              "workspace")
        << what;
    EXPECT_NE(what.find("aligned to 16 bytes"), std::string::npos) << what;
    bn::BackwardArgs<float> b;
    b.x = x.data();
    b.dy = dy.data();
    b.dx = dx.data();
    b.mean = bn::span<const float>(stats.data(), 3);
    b.invstd = bn::span<const float>(stats.data(), 3);
    EXPECT_EQ(rejected_argument([&] { bn::backward(bn::cuda{}, shape, b, {}, workspace, 1000, nullptr); }, &what),
              "workspace")
        << what;
  }
  EXPECT_EQ(bn::cuda_workspace_alignment, 16u);
}

// Item 7: one block per feature in gridDim.x (limit 2^31 − 1): more features are rejected as
// a shape error before any CUDA call, never launched with a truncated grid.
TEST(LaunchChecks, MoreFeaturesThanTheGridHoldsIsAShapeError) {
  std::vector<float> x(8, 1.f), stats(8, 1.f);  // never read: validation comes first
  const std::int64_t too_many = (std::int64_t{1} << 31);
  struct Case {
    bn::Shape shape;
    bn::Mode mode;
  };
  for (const Case& c : {Case{bn::Shape{2, too_many}, bn::Mode::per_channel},
                        Case{bn::Shape{2, 1 << 16, 1 << 15}, bn::Mode::per_activation},
                        Case{bn::Shape({2, 1 << 16, 1 << 8, 1 << 7}, bn::Layout::channels_last),
                             bn::Mode::per_activation}}) {
    SCOPED_TRACE(testing::Message() << c.shape);
    bn::ForwardArgs<float> f;
    f.x = x.data();
    f.y = x.data();
    bn::ForwardConfig fc;
    fc.mode = c.mode;
    std::string what;
    EXPECT_EQ(rejected_argument([&] { bn::forward(bn::cuda{}, c.shape, f, fc, nullptr, 0, nullptr); }, &what), "shape")
        << what;
    EXPECT_NE(what.find("expected at most 2147483647 features"), std::string::npos) << what;
    bn::BackwardArgs<float> b;
    b.x = x.data();
    b.dy = x.data();
    const std::int64_t F = bn::feature_count(c.shape, c.mode);
    b.mean = bn::span<const float>(stats.data(), F);
    b.invstd = bn::span<const float>(stats.data(), F);
    bn::BackwardConfig bc;
    bc.mode = c.mode;
    EXPECT_EQ(rejected_argument([&] { bn::backward(bn::cuda{}, c.shape, b, bc, nullptr, 0, nullptr); }, &what),
              "shape")
        << what;
  }
}

TEST(LaunchChecks, GridExtentsAreCheckedNotTruncated) {
  namespace ci = bn::detail::cuda_impl;
  EXPECT_EQ(ci::grid_extent(1, ci::max_grid_y), 1u);
  EXPECT_EQ(ci::grid_extent(65535, ci::max_grid_y), 65535u);
  EXPECT_EQ(ci::grid_extent(ci::max_grid_x, ci::max_grid_x), 2147483647u);
  EXPECT_THROW((void)ci::grid_extent(65536, ci::max_grid_y), bn::invalid_argument);
  EXPECT_THROW((void)ci::grid_extent(ci::max_grid_x + 1, ci::max_grid_x), bn::invalid_argument);
  EXPECT_THROW((void)ci::grid_extent(0, ci::max_grid_x), bn::invalid_argument);
  // Every grid a plan can make at the feature limit stays inside the limits.
  const ci::LaunchPolicy h200 = ci::launch_policy_for(9, 0, 132);
  const ci::Plan plan = ci::make_plan(bn::Shape{2, ci::max_features}, bn::Mode::per_channel, h200);
  EXPECT_NO_THROW((void)ci::grid_extent(ci::ceil_div(plan.features, ci::TilePolicy::rows_tile_columns), ci::max_grid_x));
  EXPECT_NO_THROW((void)ci::grid_extent(ci::ceil_div(plan.features, ci::TilePolicy::finalize_warps), ci::max_grid_x));
  EXPECT_NO_THROW((void)ci::grid_extent(plan.splits, ci::max_grid_y));
}

// ---- device checks -------------------------------------------------------------------------

/// Device buffers of a small training forward / backward on (8, 4, 6, 5).
struct Problem {
  bn::Shape shape{8, 4, 6, 5};
  std::vector<float> host_x;
  bn_test::device_array<float> x, y, dy, dx, mean, invstd;
  Problem() : host_x(static_cast<std::size_t>(shape.numel())) {
    for (std::size_t i = 0; i < host_x.size(); ++i) host_x[i] = static_cast<float>((i * 29) % 31) * 0.25f - 3.f;
    x = bn_test::device_array<float>(host_x);
    y = bn_test::device_array<float>(std::vector<float>(host_x.size(), -7.f));
    std::vector<float> g(host_x.size());
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>((i * 13) % 17) * 0.125f - 1.f;
    dy = bn_test::device_array<float>(g);
    dx = bn_test::device_array<float>(std::vector<float>(host_x.size(), -7.f));
    mean = bn_test::device_array<float>(std::vector<float>(4, 0.f));
    invstd = bn_test::device_array<float>(std::vector<float>(4, 0.f));
  }
  bn::ForwardArgs<float> forward_args() {
    bn::ForwardArgs<float> a;
    a.x = x.data();
    a.y = y.data();
    a.save_mean = bn::span<float>(mean.data(), 4);
    a.save_invstd = bn::span<float>(invstd.data(), 4);
    return a;
  }
};

// Item 5: a host workspace is rejected by name (not a fault in a kernel), unless the device
// reads pageable memory (HMM / ATS), where it works like device memory.
TEST(GpuLaunchChecks, HostWorkspaceIsRejectedUnlessTheDeviceReadsPageableMemory) {
  BN_TEST_REQUIRE_GPU();
  Problem p;
  const bn::ForwardConfig c;
  const std::size_t need = bn::forward_workspace_size<float>(bn::cuda{}, p.shape, c);
  std::unique_ptr<std::max_align_t[]> host(new std::max_align_t[need / sizeof(std::max_align_t) + 1]);
  const auto run = [&] { bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, host.get(), need, nullptr); };
  if (device_reads_pageable_memory()) {
    EXPECT_NO_THROW(run());
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    bn_test::device_array<unsigned char> ws(need);
    const std::vector<float> with_host_workspace = p.y.download();
    bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data(), need, nullptr);
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(with_host_workspace, p.y.download());
  } else {
    std::string what;
    EXPECT_EQ(rejected_argument(run, &what), "workspace") << what;
    EXPECT_NE(what.find("got a plain host pointer"), std::string::npos) << what;
    EXPECT_EQ(p.y.download(), std::vector<float>(p.host_x.size(), -7.f));  // nothing launched
  }
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
}

// Item 7: plain malloc memory for x and y: accepted exactly where the device reads pageable
// memory, with the same result as device memory; rejected by name elsewhere.
TEST(GpuLaunchChecks, MallocMemoryIsAcceptedOnlyWhereTheDeviceReadsIt) {
  BN_TEST_REQUIRE_GPU();
  Problem p;
  const bn::ForwardConfig c;
  bn_test::device_array<unsigned char> ws(bn::forward_workspace_size<float>(bn::cuda{}, p.shape, c));
  const std::size_t n = p.host_x.size();
  std::unique_ptr<float, decltype(&std::free)> hx(static_cast<float*>(std::malloc(n * sizeof(float))), &std::free);
  std::unique_ptr<float, decltype(&std::free)> hy(static_cast<float*>(std::malloc(n * sizeof(float))), &std::free);
  std::copy(p.host_x.begin(), p.host_x.end(), hx.get());
  std::fill(hy.get(), hy.get() + n, -7.f);
  bn::ForwardArgs<float> a = p.forward_args();
  a.x = hx.get();
  a.y = hy.get();
  const auto run = [&] { bn::forward(bn::cuda{}, p.shape, a, c, ws.data(), ws.size(), nullptr); };
  if (device_reads_pageable_memory()) {
    EXPECT_NO_THROW(run());
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data(), ws.size(), nullptr);
    EXPECT_EQ(std::vector<float>(hy.get(), hy.get() + n), p.y.download());
  } else {
    EXPECT_EQ(rejected_argument(run), "x");
    EXPECT_EQ(std::vector<float>(hy.get(), hy.get() + n), std::vector<float>(n, -7.f));
  }
}

// Item 4 on a device: a misaligned (but large enough) device workspace is rejected, and the
// context stays usable (no sticky misaligned-address error).
TEST(GpuLaunchChecks, MisalignedDeviceWorkspaceIsRejectedAndTheContextSurvives) {
  BN_TEST_REQUIRE_GPU();
  Problem p;
  const bn::ForwardConfig c;
  const std::size_t need = bn::forward_workspace_size<float>(bn::cuda{}, p.shape, c);
  bn_test::device_array<unsigned char> ws(need + 64);
  EXPECT_EQ(rejected_argument([&] { bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data() + 4, need, nullptr); }),
            "workspace");
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(p.y.download(), std::vector<float>(p.host_x.size(), -7.f));
  bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data() + 16, need, nullptr);  // aligned offsets work
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_NE(p.y.download(), std::vector<float>(p.host_x.size(), -7.f));
}

__global__ void bn_test_noop_kernel() {}

// Item 7: an error the caller's own earlier launch left pending is reported as pending (not
// as ours), left pending (cudaPeekAtLastError semantics), and nothing is launched.
TEST(GpuLaunchChecks, PendingCallerErrorIsReportedAsSuchAndLeftPending) {
  BN_TEST_REQUIRE_GPU();
  Problem p;
  const bn::ForwardConfig c;
  bn_test::device_array<unsigned char> ws(bn::forward_workspace_size<float>(bn::cuda{}, p.shape, c));
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  bn_test_noop_kernel<<<1, 4096>>>();  // more threads than a block may have: a launch error
  ASSERT_EQ(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
  try {
    bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data(), ws.size(), nullptr);
    ADD_FAILURE() << "expected batchnorm::cuda_error";
  } catch (const bn::cuda_error& e) {
    EXPECT_EQ(e.code(), static_cast<int>(cudaErrorInvalidConfiguration));
    EXPECT_NE(std::string(e.what()).find("pending"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);  // still the caller's to handle
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(p.y.download(), std::vector<float>(p.host_x.size(), -7.f));  // nothing launched
  // Once the caller has handled it, the same call works and leaves no error behind.
  bn::forward(bn::cuda{}, p.shape, p.forward_args(), c, ws.data(), ws.size(), nullptr);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
  EXPECT_NE(p.y.download(), std::vector<float>(p.host_x.size(), -7.f));
}

// Item 1 end to end: a constant channel at 1e20 (and -1e19, 3e38) normalizes to the bias on
// the GPU, with invstd = 1/sqrt(eps), in float and bfloat16, like the CPU.
template <class T>
void expect_constant_channels_give_the_bias(float (*to_float)(T), T (*from_float)(float)) {
  const bn::Shape shape{6, 3, 7};
  const float values[3] = {1e20f, -1e19f, 3e38f};
  std::vector<T> x(static_cast<std::size_t>(shape.numel()));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = from_float(values[(i / 7) % 3]);
  bn_test::device_array<T> dxin(x), dy(x.size());
  bn::BatchNorm1d<T, bn::cuda> layer(3);
  std::vector<float> bias = {0.25f, -0.5f, 2.f};
  BN_TEST_CUDA_CHECK(cudaMemcpy(layer.bias_data(), bias.data(), 3 * sizeof(float), cudaMemcpyHostToDevice));
  layer.forward(dxin.data(), dy.data(), shape);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<T> y = dy.download();
  for (std::size_t i = 0; i < y.size(); ++i) EXPECT_EQ(to_float(y[i]), bias[(i / 7) % 3]) << i;
  std::vector<float> invstd(3);
  BN_TEST_CUDA_CHECK(cudaMemcpy(invstd.data(), layer.save_invstd_data(), 3 * sizeof(float), cudaMemcpyDeviceToHost));
  for (float v : invstd) EXPECT_NEAR(v, 316.227766f, 1e-3f);
}
float float_id(float v) { return v; }
float bf16_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__nv_bfloat16 float_to_bf16(float v) { return __float2bfloat16_rn(v); }

TEST(GpuNumerics, ConstantChannelsOfHugeMagnitudeGiveTheBias) {
  BN_TEST_REQUIRE_GPU();
  expect_constant_channels_give_the_bias<float>(&float_id, &float_id);
  expect_constant_channels_give_the_bias<__nv_bfloat16>(&bf16_to_float, &float_to_bf16);
}

// ---- every kernel once, small: the compute-sanitizer subset of tools/gpu_check.sh -----------
//
// planar_reduce_kernel and rows_reduce_kernel (Welford and backward sums), forward_finalize_kernel
// (direct and deferred running update), apply_running_update_kernel, running_affine_kernel,
// backward_finalize_kernel, planar_elementwise_kernel and rows_elementwise_kernel (normalize with
// residual + relu, input gradients with dz), in float and __half, against the CPU backend.

template <class T>
std::vector<T> pattern(std::size_t n, unsigned seed) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = bn::from_double<T>(static_cast<double>((i * 2654435761u + seed * 97u) % 1009) / 300.0 - 1.5);
  return v;
}

template <class T>
void expect_close(const std::vector<T>& gpu, const std::vector<T>& cpu, double tol, const char* what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double g = bn::to_double(gpu[i]), c = bn::to_double(cpu[i]);
    if (!(std::fabs(g - c) <= tol * (1 + std::fabs(c))) && bad++ < 5) ADD_FAILURE() << what << "[" << i << "]: " << g << " vs " << c;
  }
  EXPECT_EQ(bad, 0u) << what;
}

/// A fused relu forward (training, then eval) and backward_relu on both backends.
template <class T, int D>
void every_kernel_case(const bn::Shape& shape, const bn::Options& options, double tol) {
  const auto n = static_cast<std::size_t>(shape.numel());
  const std::vector<T> x = pattern<T>(n, 1), z = pattern<T>(n, 2), dy = pattern<T>(n, 3);
  const std::int64_t F = bn::feature_count(shape, options.mode);
  bn::BatchNorm<T, D, bn::cpu> cpu(F, options);
  bn::BatchNorm<T, D, bn::cuda> gpu(F, options);
  std::vector<T> y(n), dx(n), dz(n), y_eval(n), dx_eval(n);
  bn_test::device_array<T> gx(x), gz(z), gdy(dy), gy(n), gdx(n), gdz(n), gy_eval(n), gdx_eval(n);
  cpu.forward_relu(x.data(), z.data(), y.data(), shape);
  cpu.backward_relu(x.data(), y.data(), dy.data(), dx.data(), dz.data(), shape);
  gpu.forward_relu(gx.data(), gz.data(), gy.data(), shape);
  gpu.backward_relu(gx.data(), gy.data(), gdy.data(), gdx.data(), gdz.data(), shape);
  cpu.eval();
  gpu.eval();
  cpu.forward(x.data(), y_eval.data(), shape);
  cpu.backward(x.data(), dy.data(), dx_eval.data(), shape);
  gpu.forward(gx.data(), gy_eval.data(), shape);
  gpu.backward(gx.data(), gdy.data(), gdx_eval.data(), shape);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  expect_close(gy.download(), y, tol, "y");
  expect_close(gdx.download(), dx, tol, "dx");
  expect_close(gdz.download(), dz, tol, "dz");
  expect_close(gy_eval.download(), y_eval, tol, "y (eval)");
  expect_close(gdx_eval.download(), dx_eval, tol, "dx (eval)");
  expect_close(gpu.state().running_mean, cpu.state().running_mean, tol, "running_mean");
  expect_close(gpu.state().running_var, cpu.state().running_var, tol, "running_var");
  expect_close(gpu.gradients().grad_weight, cpu.gradients().grad_weight, tol, "grad_weight");
}

TEST(GpuKernels, EveryKernelMatchesTheCpuBackend) {
  BN_TEST_REQUIRE_GPU();
  bn::Options deferred;
  deferred.skip_nonfinite_updates = true;  // forward_finalize (deferred) + apply_running_update
  bn::Options per_activation;
  per_activation.mode = bn::Mode::per_activation;
  {
    SCOPED_TRACE("NCHW float: planar kernels, deferred running update");
    every_kernel_case<float, 2>(bn::Shape{6, 3, 5, 7}, deferred, 1e-4);
  }
  {
    SCOPED_TRACE("NHWC float: rows kernels, direct running update");
    every_kernel_case<float, 2>(bn::Shape({6, 3, 5, 7}, bn::Layout::channels_last), {}, 1e-4);
  }
  {
    SCOPED_TRACE("NHWC half, per activation: rows kernels with the permuted feature map");
    every_kernel_case<__half, 2>(bn::Shape({6, 3, 5, 7}, bn::Layout::channels_last), per_activation, 4e-3);
  }
  {
    SCOPED_TRACE("(N, C) bfloat16 with a split reduction over many rows");
    every_kernel_case<__nv_bfloat16, 1>(bn::Shape{3000, 40}, deferred, 3e-2);
  }
}

// ---- item 6: streams -----------------------------------------------------------------------
//
// The rule (batch_norm.hpp @note, README "Synchronization"): a layer is one mutable object (its
// workspace, running statistics, saved statistics, gradients). Calls on one layer must be
// ordered: on one stream, or on several streams ordered by the caller (events). Distinct
// layers, or functional calls with distinct workspaces and outputs, may run concurrently on
// different streams and may share inputs.

struct TrainingRun {
  std::vector<float> y1, y2, dx, running_mean, running_var, grad_weight;
};

/// forward, backward, forward on one layer: on one stream, or alternating between two
/// streams ordered by events.
TrainingRun train_steps(bool two_streams) {
  const bn::Shape shape{64, 16, 32, 32};
  std::vector<float> hx(static_cast<std::size_t>(shape.numel())), hdy(hx.size());
  for (std::size_t i = 0; i < hx.size(); ++i) {
    hx[i] = static_cast<float>((i * 7919) % 1000) * 0.01f - 5.f + static_cast<float>((i / 1024) % 16);
    hdy[i] = static_cast<float>((i * 104729) % 997) * 0.002f - 1.f;
  }
  bn_test::device_array<float> x(hx), dy(hdy), y1(hx.size()), y2(hx.size()), dx(hx.size());
  bn_test::Stream s1, s2;
  cudaEvent_t done1, done2;
  BN_TEST_CUDA_CHECK(cudaEventCreateWithFlags(&done1, cudaEventDisableTiming));
  BN_TEST_CUDA_CHECK(cudaEventCreateWithFlags(&done2, cudaEventDisableTiming));
  bn::BatchNorm2d<float, bn::cuda> layer(16);
  const cudaStream_t a = s1.get(), b = two_streams ? s2.get() : s1.get();
  layer.forward(x.data(), y1.data(), shape, a);
  BN_TEST_CUDA_CHECK(cudaEventRecord(done1, a));
  BN_TEST_CUDA_CHECK(cudaStreamWaitEvent(b, done1, 0));  // b after a: the layer's rule
  layer.backward(x.data(), dy.data(), dx.data(), shape, b);
  BN_TEST_CUDA_CHECK(cudaEventRecord(done2, b));
  BN_TEST_CUDA_CHECK(cudaStreamWaitEvent(a, done2, 0));
  layer.forward(x.data(), y2.data(), shape, a);
  s1.sync();
  s2.sync();
  BN_TEST_CUDA_CHECK(cudaEventDestroy(done1));
  BN_TEST_CUDA_CHECK(cudaEventDestroy(done2));
  TrainingRun r{y1.download(), y2.download(), dx.download(), {}, {}, {}};
  const bn::State<float> st = layer.state();
  r.running_mean = st.running_mean;
  r.running_var = st.running_var;
  const auto g = layer.gradients();
  r.grad_weight = g.grad_weight;
  return r;
}

TEST(GpuStreams, OneLayerOnTwoStreamsOrderedByEventsEqualsOneStream) {
  BN_TEST_REQUIRE_GPU();
  const TrainingRun one = train_steps(false), two = train_steps(true);
  EXPECT_EQ(one.y1, two.y1);
  EXPECT_EQ(one.dx, two.dx);
  EXPECT_EQ(one.y2, two.y2);
  EXPECT_EQ(one.running_mean, two.running_mean);
  EXPECT_EQ(one.running_var, two.running_var);
  EXPECT_EQ(one.grad_weight, two.grad_weight);
}

// Functional calls on two streams at once, sharing x, weight and bias, each with its own
// workspace, outputs and running statistics: each equals the same call run alone.
TEST(GpuStreams, FunctionalCallsWithTheirOwnWorkspacesRunConcurrentlyOnSharedInputs) {
  BN_TEST_REQUIRE_GPU();
  const bn::Shape shape({128, 32, 28, 28}, bn::Layout::channels_last);
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<float> hx(n);
  for (std::size_t i = 0; i < n; ++i) hx[i] = static_cast<float>((i * 2654435761u) % 4093) * 1e-3f - 2.f;
  bn_test::device_array<float> x(hx), w(std::vector<float>(32, 1.5f)), bias(std::vector<float>(32, -0.5f));
  struct Outputs {
    bn_test::device_array<float> y, rm, rv;
    bn_test::device_array<unsigned char> ws;
  };
  const bn::ForwardConfig c;
  const std::size_t need = bn::forward_workspace_size<float>(bn::cuda{}, shape, c);
  auto make = [&] {
    return Outputs{bn_test::device_array<float>(n), bn_test::device_array<float>(std::vector<float>(32, 0.f)),
                   bn_test::device_array<float>(std::vector<float>(32, 1.f)), bn_test::device_array<unsigned char>(need)};
  };
  auto launch = [&](Outputs& o, cudaStream_t s) {
    bn::ForwardArgs<float> a;
    a.x = x.data();
    a.y = o.y.data();
    a.weight = bn::span<const float>(w.data(), 32);
    a.bias = bn::span<const float>(bias.data(), 32);
    a.running_mean = bn::span<float>(o.rm.data(), 32);
    a.running_var = bn::span<float>(o.rv.data(), 32);
    bn::forward(bn::cuda{}, shape, a, c, o.ws.data(), o.ws.size(), s);
  };
  bn_test::Stream s1, s2;
  Outputs alone = make(), first = make(), second = make();
  launch(alone, s1.get());
  s1.sync();
  for (int repeat = 0; repeat < 3; ++repeat) {  // both queued before either is waited for
    launch(first, s1.get());
    launch(second, s2.get());
  }
  s1.sync();
  s2.sync();
  const std::vector<float> y = alone.y.download();
  EXPECT_EQ(first.y.download(), y);
  EXPECT_EQ(second.y.download(), y);
  EXPECT_EQ(first.rm.download(), second.rm.download());
  EXPECT_EQ(first.rv.download(), second.rv.download());
}

}  // namespace
