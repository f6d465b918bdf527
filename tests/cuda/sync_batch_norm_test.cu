// SyncBatchNorm2d<float, cuda, NcclCommunicator> over the visible GPUs: one rank per device, one
// host thread per rank (NCCL's group calls would defer the layer's all_gather behind the later
// phases, so the ranks run concurrently, as in data-parallel training). 1 GPU: one rank.
//  - two training steps (forward + backward) and an eval step over uneven shards (rank 0
//    empty when there are several ranks) equal BatchNorm2d<float, cuda> on the concatenated
//    batch: y, dx, grad_weight, grad_bias, running statistics, within the float tolerance of
//    tests/cuda/semantics_test.cu, |got − ref| <= 1e-4 · (|ref| + 0.1 · max |ref|) (both sides
//    accumulate in float on the GPU, in different orders, so the CPU test's double-accumulation
//    bound of docs/sync_batch_norm.md does not apply); grad_weight, grad_bias and the running
//    statistics are the same bits on every rank;
//  - a CUDA graph captured (cudaStreamCaptureModeThreadLocal) around forward + backward on every
//    rank: capture fails if anything synchronizes the host or reads device memory on it; its
//    replay gives the same bits as the eager call;
//  - faults: a global batch of one value per channel gives NaN y and a check_faults() that
//    throws invalid_argument("shape") naming the global batch, running statistics unchanged; with
//    two or more GPUs, a rank with a wrong C throws its own error after the collective, the
//    others get NaN and check_faults() names that rank.
// Skipped without a device.
#include <gtest/gtest.h>
#include <nccl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <batchnorm/comm/nccl.cuh>
#include <batchnorm/cuda.cuh>
#include <batchnorm/sync_batch_norm.hpp>

#include "support/common.hpp"
#include "support/device_memory.cuh"
#include "support/nccl_ranks.cuh"
#include "support/reference.hpp"

namespace bn = batchnorm;

namespace {

using bn_test::device_array;
using bn_test::Ranks;
using Layer = bn::SyncBatchNorm2d<float, bn::cuda, bn::NcclCommunicator>;

/// Shard bounds in samples: rank 0 empty when there are several ranks, then 2, 3, 4, ...
std::vector<std::int64_t> shard_bounds(int ranks) {
  std::vector<std::int64_t> bounds{0};
  for (int r = 0; r < ranks; ++r) bounds.push_back(bounds.back() + (ranks > 1 && r == 0 ? 0 : r + 2));
  return bounds;
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, std::int64_t from, std::int64_t to) {
  return std::vector<T>(v.begin() + from, v.begin() + to);
}

bool close(double got, double want, double scale) {
  return std::fabs(got - want) <= 1e-4 * (std::fabs(want) + 0.1 * scale);
}

constexpr std::int64_t C = 3, H = 5, W = 4;

TEST(SyncBatchNormCuda, EqualsBatchNormOnTheConcatenatedBatch) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  const auto bounds = shard_bounds(n);
  const std::int64_t N = bounds.back(), per_sample = C * H * W;
  const bn::Shape whole({N, C, H, W});
  const std::vector<std::vector<float>> x{bnref::cast<float>(bnref::normal(N * per_sample, 81, 3.0, 2.0)),
                                          bnref::cast<float>(bnref::normal(N * per_sample, 82, -1.0, 0.5))};
  const std::vector<std::vector<float>> dy{bnref::cast<float>(bnref::normal(N * per_sample, 83)),
                                           bnref::cast<float>(bnref::normal(N * per_sample, 84))};

  // BatchNorm2d on the concatenated batch, on device 0: two training steps, then eval.
  BN_TEST_CUDA_CHECK(cudaSetDevice(0));
  bn::BatchNorm2d<float, bn::cuda> reference(C);
  std::vector<std::vector<float>> y_ref, dx_ref;
  std::vector<bn::Gradients<float>> grad_ref;
  {
    device_array<float> dev_y(x[0].size()), dev_dx(x[0].size());
    for (int step = 0; step < 2; ++step) {
      device_array<float> dev_x(x[step]), dev_dy(dy[step]);
      reference.forward(dev_x.data(), dev_y.data(), whole);
      reference.backward(dev_x.data(), dev_dy.data(), dev_dx.data(), whole);
      BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
      y_ref.push_back(dev_y.download());
      dx_ref.push_back(dev_dx.download());
      grad_ref.push_back(reference.gradients());
    }
    reference.eval();
    device_array<float> dev_x(x[0]);
    reference.forward(dev_x.data(), dev_y.data(), whole);
    BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    y_ref.push_back(dev_y.download());
  }
  const bn::State<float> state_ref = reference.state();

  std::vector<std::vector<std::vector<float>>> y(3), dx(2);  // [step][rank]
  for (auto& v : y) v.resize(static_cast<std::size_t>(n));
  for (auto& v : dx) v.resize(static_cast<std::size_t>(n));
  std::vector<std::vector<bn::Gradients<float>>> grads(2, std::vector<bn::Gradients<float>>(static_cast<std::size_t>(n)));
  std::vector<bn::State<float>> states(static_cast<std::size_t>(n));
  ranks.concurrently([&](int r) {
    const std::size_t k = static_cast<std::size_t>(r);
    const std::int64_t from = bounds[k] * per_sample, to = bounds[k + 1] * per_sample;
    const bn::Shape shard({bounds[k + 1] - bounds[k], C, H, W});
    const cudaStream_t stream = ranks.stream(r);
    Layer layer(C, bn::NcclCommunicator(ranks.comm(r)));
    device_array<float> dev_y(static_cast<std::size_t>(to - from)), dev_dx(static_cast<std::size_t>(to - from));
    for (int step = 0; step < 2; ++step) {
      device_array<float> dev_x(slice(x[step], from, to)), dev_dy(slice(dy[step], from, to));
      layer.forward(dev_x.data(), dev_y.data(), shard, stream);
      layer.backward(dev_x.data(), dev_dy.data(), dev_dx.data(), shard, stream);
      BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
      y[step][k] = dev_y.download();
      dx[step][k] = dev_dx.download();
      grads[step][k] = layer.gradients();
    }
    layer.eval();
    device_array<float> dev_x(slice(x[0], from, to));
    layer.forward(dev_x.data(), dev_y.data(), shard, stream);
    BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
    y[2][k] = dev_y.download();
    states[k] = layer.state();
    layer.check_faults(stream);  // nothing refused: no exception
    EXPECT_EQ(layer.num_batches_tracked(), 2) << "rank " << r;
  });

  for (int step = 0; step < 3; ++step) {
    const double y_scale = bnref::max_abs(bnref::widen(y_ref[step]));
    for (int r = 0; r < n; ++r) {
      const auto& got = y[step][static_cast<std::size_t>(r)];
      for (std::size_t i = 0; i < got.size(); ++i) {
        const std::size_t at = static_cast<std::size_t>(bounds[static_cast<std::size_t>(r)] * per_sample) + i;
        ASSERT_TRUE(close(got[i], y_ref[step][at], y_scale))
            << "step " << step << " rank " << r << " y[" << at << "] " << got[i] << " vs " << y_ref[step][at];
        if (step < 2)
          ASSERT_TRUE(close(dx[step][static_cast<std::size_t>(r)][i], dx_ref[step][at],
                            bnref::max_abs(bnref::widen(dx_ref[step]))))
              << "step " << step << " rank " << r << " dx[" << at << "]";
      }
    }
  }
  for (int r = 0; r < n; ++r) {
    const std::size_t k = static_cast<std::size_t>(r);
    for (int step = 0; step < 2; ++step) {
      const auto& g = grads[step][k];
      const double gw_scale = bnref::max_abs(bnref::widen(grad_ref[step].grad_weight));
      const double gb_scale = bnref::max_abs(bnref::widen(grad_ref[step].grad_bias));
      for (std::int64_t c = 0; c < C; ++c) {
        EXPECT_TRUE(close(g.grad_weight[c], grad_ref[step].grad_weight[c], gw_scale)) << "rank " << r << " step " << step;
        EXPECT_TRUE(close(g.grad_bias[c], grad_ref[step].grad_bias[c], gb_scale)) << "rank " << r << " step " << step;
      }
      // Every rank reduced the same gathered bits in the same order.
      EXPECT_EQ(g.grad_weight, grads[step][0].grad_weight) << "rank " << r;
      EXPECT_EQ(g.grad_bias, grads[step][0].grad_bias) << "rank " << r;
    }
    for (std::int64_t c = 0; c < C; ++c) {
      EXPECT_TRUE(close(states[k].running_mean[c], state_ref.running_mean[c], 1.0)) << "rank " << r;
      EXPECT_TRUE(close(states[k].running_var[c], state_ref.running_var[c], 1.0)) << "rank " << r;
    }
    EXPECT_EQ(states[k].running_mean, states[0].running_mean) << "rank " << r;
    EXPECT_EQ(states[k].running_var, states[0].running_var) << "rank " << r;
  }
}

// Stream-ordered: forward + backward captured into a CUDA graph on every rank. Capture turns a
// host synchronization in this thread (cudaStreamSynchronize, a synchronous cudaMemcpy, other
// calls CUDA deems unsafe during a thread-local capture) into an error; the replay must
// reproduce the eager call's bits.
TEST(SyncBatchNormCuda, ForwardAndBackwardCaptureIntoACudaGraph) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  const auto bounds = shard_bounds(n);
  const std::int64_t N = bounds.back(), per_sample = C * H * W;
  const auto x = bnref::cast<float>(bnref::normal(N * per_sample, 91, 2.0, 3.0));
  const auto dy = bnref::cast<float>(bnref::normal(N * per_sample, 92));
  ranks.concurrently([&](int r) {
    const std::size_t k = static_cast<std::size_t>(r);
    const std::int64_t from = bounds[k] * per_sample, to = bounds[k + 1] * per_sample;
    const bn::Shape shard({bounds[k + 1] - bounds[k], C, H, W});
    const cudaStream_t stream = ranks.stream(r);
    Layer layer(C, bn::NcclCommunicator(ranks.comm(r)));
    device_array<float> dev_x(slice(x, from, to)), dev_dy(slice(dy, from, to));
    device_array<float> dev_y(static_cast<std::size_t>(to - from)), dev_dx(static_cast<std::size_t>(to - from));
    // Eager (also sizes the phase scratch: its growth is the one synchronizing step).
    layer.forward(dev_x.data(), dev_y.data(), shard, stream);
    layer.backward(dev_x.data(), dev_dy.data(), dev_dx.data(), shard, stream);
    BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto y_eager = dev_y.download(), dx_eager = dev_dx.download();
    const auto grads_eager = layer.gradients();

    if (dev_y.size() > 0) {  // the graph must write them again
      BN_TEST_CUDA_CHECK(cudaMemsetAsync(dev_y.data(), 0, dev_y.size() * sizeof(float), stream));
      BN_TEST_CUDA_CHECK(cudaMemsetAsync(dev_dx.data(), 0, dev_dx.size() * sizeof(float), stream));
    }
    layer.zero_grad(stream);
    BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));

    cudaGraph_t graph = nullptr;
    BN_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      layer.forward(dev_x.data(), dev_y.data(), shard, stream);
      layer.backward(dev_x.data(), dev_dy.data(), dev_dx.data(), shard, stream);
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph);
      if (graph) (void)cudaGraphDestroy(graph);
      throw;
    }
    BN_TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    ASSERT_NE(graph, nullptr);
    cudaGraphExec_t exec = nullptr;
    BN_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    BN_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(dev_y.download(), y_eager) << "rank " << r;
    EXPECT_EQ(dev_dx.download(), dx_eager) << "rank " << r;
    EXPECT_EQ(layer.gradients().grad_weight, grads_eager.grad_weight) << "rank " << r;
    EXPECT_EQ(layer.gradients().grad_bias, grads_eager.grad_bias) << "rank " << r;
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
    layer.check_faults(stream);
  });
}

// One value per channel over the whole global batch: the merge refuses it on the device.
TEST(SyncBatchNormCuda, AGlobalBatchOfOneValuePerChannelIsReportedByCheckFaults) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  ranks.concurrently([&](int r) {
    const cudaStream_t stream = ranks.stream(r);
    Layer layer(C, bn::NcclCommunicator(ranks.comm(r)));
    const bn::State<float> before = layer.state();
    const std::int64_t samples = r == n - 1 ? 1 : 0;  // the last rank holds the one sample
    const bn::Shape shard({samples, C, 1, 1});
    device_array<float> dev_x(std::vector<float>(static_cast<std::size_t>(samples * C), 2.5f));
    device_array<float> dev_y(static_cast<std::size_t>(samples * C));
    layer.forward(dev_x.data(), dev_y.data(), shard, stream);  // no exception: no host sync
    BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (float v : dev_y.download()) EXPECT_TRUE(std::isnan(v)) << "rank " << r;
    try {
      layer.check_faults(stream);
      ADD_FAILURE() << "rank " << r << ": check_faults() did not throw";
    } catch (const bn::invalid_argument& e) {
      EXPECT_EQ(e.argument(), "shape");
      EXPECT_NE(std::string(e.what()).find("global batch"), std::string::npos) << e.what();
    }
    layer.check_faults(stream);  // cleared
    EXPECT_EQ(layer.state().running_mean, before.running_mean) << "rank " << r;
    EXPECT_EQ(layer.state().running_var, before.running_var) << "rank " << r;
  });
}

// A rank with a wrong C: it throws its own error after the collective; the others are told on
// the device. Needs two ranks.
TEST(SyncBatchNormCuda, ARankRefusingItsInputThrowsAndTheOthersSeeItInCheckFaults) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  if (n < 2) GTEST_SKIP() << "needs two or more GPUs (one rank each)";
  const int faulty = n - 1;
  ranks.concurrently([&](int r) {
    const cudaStream_t stream = ranks.stream(r);
    Layer layer(C, bn::NcclCommunicator(ranks.comm(r)));
    const bn::State<float> before = layer.state();
    const std::int64_t channels = r == faulty ? C + 1 : C;
    const bn::Shape shard({2, channels, H, W});
    device_array<float> dev_x(bnref::cast<float>(bnref::normal(shard.numel(), 100 + r)));
    device_array<float> dev_y(static_cast<std::size_t>(shard.numel()));
    if (r == faulty) {
      try {
        layer.forward(dev_x.data(), dev_y.data(), shard, stream);
        ADD_FAILURE() << "the faulty rank did not throw";
      } catch (const bn::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(faulty)), std::string::npos) << e.what();
      }
      BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));  // its all_gather completed
      EXPECT_EQ(layer.num_batches_tracked(), 0);
      layer.check_faults(stream);  // it threw already: nothing recorded here
    } else {
      layer.forward(dev_x.data(), dev_y.data(), shard, stream);
      BN_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
      for (float v : dev_y.download()) ASSERT_TRUE(std::isnan(v)) << "rank " << r;
      try {
        layer.check_faults(stream);
        ADD_FAILURE() << "rank " << r << ": check_faults() did not throw";
      } catch (const bn::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(faulty) + " of " + std::to_string(n)),
                  std::string::npos)
            << e.what();
      }
    }
    EXPECT_EQ(layer.state().running_mean, before.running_mean) << "rank " << r;
    EXPECT_EQ(layer.state().running_var, before.running_var) << "rank " << r;
  });
}

}  // namespace
