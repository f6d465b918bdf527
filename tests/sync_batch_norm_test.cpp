// SyncBatchNorm without MPI: the layer against the communicator interface
// (comm/communicator.hpp), with in-process communicators. The MPI suite (tests/mpi, label
// "mpi") covers the full matrix of item 3 and 4 of issue 10; this one runs wherever the cpu
// tests run: ranks as threads of one process, a failing communicator, the interface trait.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/comm/communicator.hpp>
#include <batchnorm/sync_batch_norm.hpp>
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "support/common.hpp"

namespace {

using batchnorm::cpu;
using batchnorm::Shape;

/// Ranks as threads: all_gather through a shared buffer and a generation barrier.
class ThreadHub {
 public:
  explicit ThreadHub(int size) : size_(size) {}
  int size() const { return size_; }
  void all_gather(int rank, const double* send, double* recv, std::int64_t count) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (buffer_.size() != static_cast<std::size_t>(count * size_)) buffer_.assign(static_cast<std::size_t>(count * size_), 0.0);
    std::copy(send, send + count, buffer_.begin() + rank * count);
    wait(lock);  // everyone has written
    std::copy(buffer_.begin(), buffer_.end(), recv);
    wait(lock);  // everyone has read: the buffer may be reused
  }

 private:
  void wait(std::unique_lock<std::mutex>& lock) {
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }
  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<double> buffer_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
};

class ThreadCommunicator {
 public:
  ThreadCommunicator(ThreadHub& hub, int rank) : hub_(&hub), rank_(rank) {}
  int rank() const { return rank_; }
  int size() const { return hub_->size(); }
  void all_gather(const double* send, double* recv, std::int64_t count, cpu::stream_type) {
    ++calls;
    hub_->all_gather(rank_, send, recv, count);
  }
  int calls = 0;

 private:
  ThreadHub* hub_;
  int rank_;
};

/// One rank whose collective fails, as a broken MPI would.
class FailingCommunicator {
 public:
  int rank() const { return 0; }
  int size() const { return 1; }
  void all_gather(const double*, double*, std::int64_t, cpu::stream_type) {
    throw batchnorm::communication_error("Fake_Allgather", 5, "Fake_Allgather failed: the network is down");
  }
};

static_assert(batchnorm::is_communicator_v<ThreadCommunicator, cpu>);
static_assert(batchnorm::is_communicator_v<FailingCommunicator, cpu>);
static_assert(!batchnorm::is_communicator_v<int, cpu>);
static_assert(!batchnorm::is_communicator_v<FailingCommunicator, batchnorm::cuda>);  // wrong stream type

using Layer = batchnorm::SyncBatchNorm2d<double, cpu, ThreadCommunicator>;

// Three thread-ranks with shards of 3, 0 and 4 samples: one collective per forward and per
// backward, the same bits on every rank, and one BatchNorm on the concatenated batch.
TEST(SyncBatchNormThreads, ThreeRanksEqualOneProcessAndAgreeBitForBit) {
  constexpr int kRanks = 3;
  const std::vector<std::int64_t> sizes{3, 0, 4};
  constexpr std::int64_t C = 3, H = 2, W = 5, per_sample = C * H * W;
  const Shape global{std::int64_t{7}, C, H, W};
  const auto x = bnref::normal(global.numel(), 1, 0.5, 2.0), dy = bnref::normal(global.numel(), 2);
  const auto initial = bn_test::random_state<double>(C, 3);

  batchnorm::BatchNorm2d<double, cpu> reference(C);
  reference.load_state(initial);
  std::vector<double> y_ref(x.size()), dx_ref(x.size());
  reference.forward(x.data(), y_ref.data(), global);
  reference.backward(x.data(), dy.data(), dx_ref.data(), global);

  ThreadHub hub(kRanks);
  std::vector<std::vector<double>> y(kRanks), dx(kRanks);
  std::vector<batchnorm::State<double>> states(kRanks);
  std::vector<batchnorm::Gradients<double>> grads(kRanks);
  std::vector<int> calls(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      std::int64_t begin = 0;
      for (int q = 0; q < r; ++q) begin += sizes[static_cast<std::size_t>(q)];
      const std::int64_t n = sizes[static_cast<std::size_t>(r)];
      const Shape shape{n, C, H, W};
      const std::vector<double> xs(x.begin() + begin * per_sample, x.begin() + (begin + n) * per_sample);
      const std::vector<double> dys(dy.begin() + begin * per_sample, dy.begin() + (begin + n) * per_sample);
      Layer layer(C, ThreadCommunicator(hub, r));
      layer.load_state(initial);
      auto& yr = y[static_cast<std::size_t>(r)];
      auto& dxr = dx[static_cast<std::size_t>(r)];
      yr.resize(xs.size());
      dxr.resize(xs.size());
      layer.forward(xs.data(), yr.data(), shape);
      layer.backward(xs.data(), dys.data(), dxr.data(), shape);
      states[static_cast<std::size_t>(r)] = layer.state();
      grads[static_cast<std::size_t>(r)] = layer.gradients();
      calls[static_cast<std::size_t>(r)] = layer.communicator().calls;
    });
  for (auto& t : threads) t.join();

  std::int64_t begin = 0;
  for (int r = 0; r < kRanks; ++r) {
    SCOPED_TRACE(r);
    EXPECT_EQ(calls[static_cast<std::size_t>(r)], 2);  // one all-gather per direction
    for (std::size_t i = 0; i < y[static_cast<std::size_t>(r)].size(); ++i) {
      const auto k = static_cast<std::size_t>(begin * per_sample) + i;
      EXPECT_NEAR(y[static_cast<std::size_t>(r)][i], y_ref[k], 1e-12 * 4);
      EXPECT_NEAR(dx[static_cast<std::size_t>(r)][i], dx_ref[k], 1e-12 * 4);
    }
    begin += sizes[static_cast<std::size_t>(r)];
    const auto& s = states[static_cast<std::size_t>(r)];
    const auto& g = grads[static_cast<std::size_t>(r)];
    EXPECT_EQ(s.num_batches_tracked, reference.num_batches_tracked());
    for (std::int64_t c = 0; c < C; ++c) {
      const auto f = static_cast<std::size_t>(c);
      EXPECT_NEAR(s.running_mean[f], reference.state().running_mean[f], 1e-12);
      EXPECT_NEAR(s.running_var[f], reference.state().running_var[f], 1e-12);
      EXPECT_NEAR(g.grad_weight[f], reference.gradients().grad_weight[f], 1e-11);
      EXPECT_NEAR(g.grad_bias[f], reference.gradients().grad_bias[f], 1e-11);
      // bit for bit equal to rank 0's
      EXPECT_EQ(std::memcmp(&s.running_var[f], &states[0].running_var[f], sizeof(double)), 0);
      EXPECT_EQ(std::memcmp(&g.grad_weight[f], &grads[0].grad_weight[f], sizeof(double)), 0);
      EXPECT_EQ(std::memcmp(&g.grad_bias[f], &grads[0].grad_bias[f], sizeof(double)), 0);
    }
  }
}

// A failing collective propagates as communication_error, and nothing changes.
TEST(SyncBatchNormThreads, CommunicationErrorPropagatesAndNothingChanges) {
  constexpr std::int64_t C = 2;
  batchnorm::SyncBatchNorm1d<double, cpu, FailingCommunicator> layer(C, FailingCommunicator{});
  layer.load_state(bn_test::random_state<double>(C, 9));
  const auto before = layer.state();
  const Shape shape{std::int64_t{4}, C};
  std::vector<double> x = bnref::normal(shape.numel(), 4), y(x.size(), -7.0);
  try {
    layer.forward(x.data(), y.data(), shape);
    ADD_FAILURE() << "no exception";
  } catch (const batchnorm::communication_error& e) {
    EXPECT_EQ(e.call(), "Fake_Allgather");
    EXPECT_EQ(e.code(), 5);
  }
  const auto after = layer.state();
  EXPECT_EQ(after.running_mean, before.running_mean);
  EXPECT_EQ(after.running_var, before.running_var);
  EXPECT_EQ(after.num_batches_tracked, before.num_batches_tracked);
  EXPECT_EQ(y, std::vector<double>(x.size(), -7.0));
  // eval with running statistics does not communicate
  layer.eval();
  layer.forward(x.data(), y.data(), shape);
  EXPECT_NE(y[0], -7.0);
}

TEST(SyncBatchNormThreads, NameAndMessageSizes) {
  EXPECT_EQ(Layer::name(), "SyncBatchNorm2d");
  ThreadHub hub(1);
  Layer layer(5, ThreadCommunicator(hub, 0));
  EXPECT_EQ(layer.forward_message_size(), 12);  // [status | count | mean x 5 | M2 x 5]
  EXPECT_EQ(layer.backward_message_size(), 11);  // [status | sum dy x 5 | sum dy (x - mean) x 5]
  EXPECT_THROW(Layer(5, ThreadCommunicator(hub, 1)), batchnorm::invalid_argument);  // rank 1 of 1
}


// The host side of the cuda path (statuses checked on the device, detail/sync/cuda_ops.cuh):
// with no statuses on the host only the rank that refused its own call throws, naming itself,
// and an accepted call passes; on cpu check_faults() never throws.
TEST(SyncBatchNormThreads, DeviceStatusesOnlyTheRefusingRankThrows) {
  namespace sync = batchnorm::detail::sync;
  const std::vector<double> on_device;  // what sync_ops<cuda>::statuses returns
  EXPECT_NO_THROW(sync::throw_if_any_fault(on_device, sync::LocalFault{}, 1, 3, "SyncBatchNorm2d::forward"));
  const sync::LocalFault wrong_x = sync::attempt([] { throw batchnorm::invalid_argument("x", "x: expected 4 channels"); });
  ASSERT_EQ(wrong_x.code, sync::fault::x);
  try {
    sync::throw_if_any_fault(on_device, wrong_x, 1, 3, "SyncBatchNorm2d::forward");
    ADD_FAILURE() << "no exception";
  } catch (const batchnorm::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "x");
    const std::string what = e.what();
    EXPECT_NE(what.find("SyncBatchNorm2d::forward: rank 1 of 3 refused its input"), std::string::npos) << what;
    EXPECT_NE(what.find("x: expected 4 channels"), std::string::npos) << what;
  }
  const sync::LocalFault out_of_order = sync::attempt([] { throw batchnorm::state_error("backward before forward"); });
  EXPECT_THROW(sync::throw_if_any_fault(on_device, out_of_order, 0, 2, "b"), batchnorm::state_error);
  const sync::LocalFault other = sync::attempt([] { throw std::bad_alloc(); });
  EXPECT_THROW(sync::throw_if_any_fault(on_device, other, 0, 2, "b"), std::bad_alloc);  // rethrown as it was

  ThreadHub hub(1);
  Layer layer(5, ThreadCommunicator(hub, 0));
  EXPECT_NO_THROW(layer.check_faults());
}

}  // namespace
