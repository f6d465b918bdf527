// batchnorm::NcclCommunicator (comm/nccl.cuh) and the CUDA phases over NCCL, one process,
// one rank per visible GPU (ncclCommInitAll; the calls of all ranks grouped in
// ncclGroupStart / ncclGroupEnd, as NCCL requires when one thread drives several devices):
//  - rank() / size() of every rank, all_gather of doubles in rank order;
//  - SyncBatchNorm's data flow through the phases (local_statistics → all_gather → merge →
//    normalize; local_gradient_sums → all-reduce → input_gradient): every rank's y and dx,
//    and every rank's running statistics, equal the CPU's BatchNorm on the concatenated batch
//    (float tolerance of tests/cuda/semantics_test.cu), with shards of uneven size and an
//    empty shard on rank 0 when there are several GPUs;
//  - errors: a null communicator and a negative count are invalid_argument (the first runs
//    without a GPU); NCCL failures are communication_error naming the call.
// With one GPU the communicator has one rank; skipped without a device.
#include <gtest/gtest.h>
#include <nccl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <batchnorm/comm/nccl.cuh>
#include <batchnorm/cuda.cuh>

#include "support/common.hpp"
#include "support/device_memory.cuh"
#include "support/nccl_ranks.cuh"
#include "support/reference.hpp"

namespace bn = batchnorm;
namespace phases = batchnorm::phases;

namespace {

using bn::span;
using bn_test::device_array;
using bn_test::Ranks;

TEST(NcclCommunicator, NullCommIsRefused) {
  try {
    bn::NcclCommunicator c(nullptr);
    ADD_FAILURE() << "accepted a null ncclComm_t";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "comm");
  }
}

TEST(NcclCommunicator, ErrorsNameTheCall) {
  try {
    bn::detail::check_nccl(ncclInvalidArgument, "ncclAllGather");
    ADD_FAILURE() << "no exception";
  } catch (const bn::communication_error& e) {
    EXPECT_EQ(e.call(), "ncclAllGather");
    EXPECT_EQ(e.code(), static_cast<int>(ncclInvalidArgument));
    EXPECT_NE(std::string(e.what()).find("ncclAllGather failed"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(ncclGetErrorString(ncclInvalidArgument)), std::string::npos) << e.what();
  }
}

TEST(NcclCommunicator, RankSizeAndAllGatherInRankOrder) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  const std::int64_t count = 5;
  std::vector<std::unique_ptr<bn::NcclCommunicator>> comms;
  std::vector<device_array<double>> send, recv;
  ranks.each([&](int r) {
    comms.push_back(std::make_unique<bn::NcclCommunicator>(ranks.comm(r)));
    EXPECT_EQ(comms.back()->rank(), r);
    EXPECT_EQ(comms.back()->size(), n);
    std::vector<double> mine(count);
    for (std::int64_t i = 0; i < count; ++i) mine[i] = 100.0 * r + i + 0.25;
    send.emplace_back(mine);
    recv.emplace_back(std::vector<double>(static_cast<std::size_t>(n * count), -1.0));
  });
  ranks.grouped([&](int r) { comms[r]->all_gather(send[r].data(), recv[r].data(), count, ranks.stream(r)); });
  ranks.sync();
  ranks.each([&](int r) {
    const auto got = recv[r].download();
    for (int from = 0; from < n; ++from)
      for (std::int64_t i = 0; i < count; ++i) EXPECT_EQ(got[from * count + i], 100.0 * from + i + 0.25) << "rank " << r;
  });
  EXPECT_THROW(comms[0]->all_gather(send[0].data(), recv[0].data(), -1, ranks.stream(0)), bn::invalid_argument);
}

// SyncBatchNorm's data flow over NCCL: every rank ends with the whole batch's results.
TEST(NcclCommunicator, PhasesOverNcclEqualTheWholeBatch) {
  BN_TEST_REQUIRE_GPU();
  Ranks ranks;
  const int n = ranks.count();
  const std::int64_t C = 3, S = 7;
  // Uneven shards: rank 0 empty when there are several ranks, then 2, 3, 4, ... samples.
  std::vector<std::int64_t> bounds{0};
  for (int r = 0; r < n; ++r) bounds.push_back(bounds.back() + (n > 1 && r == 0 ? 0 : r + 2));
  const std::int64_t N = bounds.back(), per_sample = C * S;
  const bn::Shape whole({N, C, S});
  const auto x = bnref::cast<float>(bnref::normal(N * per_sample, 71, 5.0, 2.0));
  const auto dy = bnref::cast<float>(bnref::normal(N * per_sample, 72));
  const auto w = bnref::cast<float>(bnref::normal(C, 73, 1.0, 0.5)), b = bnref::cast<float>(bnref::normal(C, 74));

  // The CPU on the concatenated batch.
  std::vector<float> y_ref(x.size()), dx_ref(x.size()), rm_ref(C, 0.f), rv_ref(C, 1.f), sm(C), si(C), gw_ref(C),
      gb_ref(C);
  bn::ForwardArgs<float> fa;
  fa.x = x.data(); fa.y = y_ref.data(); fa.weight = {w.data(), C}; fa.bias = {b.data(), C};
  fa.running_mean = rm_ref; fa.running_var = rv_ref; fa.save_mean = sm; fa.save_invstd = si;
  bn::forward(bn::cpu{}, whole, fa, bn::ForwardConfig{});
  bn::BackwardArgs<float> ba;
  ba.x = x.data(); ba.dy = dy.data(); ba.dx = dx_ref.data(); ba.weight = fa.weight;
  ba.mean = {sm.data(), C}; ba.invstd = {si.data(), C}; ba.grad_weight = gw_ref; ba.grad_bias = gb_ref;
  bn::backward(bn::cpu{}, whole, ba, bn::BackwardConfig{});

  struct Rank {
    bn::Shape shape = bn::Shape({0, 1, 1});
    device_array<float> x, dy, y, dx, w, b, rm, rv, gw, gb;
    device_array<double> stats, gathered, norm, sums;
    device_array<unsigned char> ws;
  };
  const std::int64_t rec = phases::shard_statistics_size(C);
  std::vector<Rank> rank(static_cast<std::size_t>(n));
  std::vector<std::unique_ptr<bn::NcclCommunicator>> comms;
  ranks.each([&](int r) {
    Rank& k = rank[r];
    k.shape = bn::Shape({bounds[r + 1] - bounds[r], C, S});
    const std::vector<float> xs(x.begin() + bounds[r] * per_sample, x.begin() + bounds[r + 1] * per_sample);
    const std::vector<float> dys(dy.begin() + bounds[r] * per_sample, dy.begin() + bounds[r + 1] * per_sample);
    k.x = device_array<float>(xs);
    k.dy = device_array<float>(dys);
    k.y = device_array<float>(xs.size());
    k.dx = device_array<float>(xs.size());
    k.w = device_array<float>(w);
    k.b = device_array<float>(b);
    k.rm = device_array<float>(std::vector<float>(C, 0.f));
    k.rv = device_array<float>(std::vector<float>(C, 1.f));
    k.gw = device_array<float>(C);
    k.gb = device_array<float>(C);
    k.stats = device_array<double>(rec);
    k.gathered = device_array<double>(n * rec);
    k.norm = device_array<double>(phases::normalization_size(C));
    k.sums = device_array<double>(phases::gradient_sums_size(C));
    k.ws = device_array<unsigned char>(bn::phases_workspace_size<float>(bn::cuda{}, k.shape, bn::Mode::per_channel));
    comms.push_back(std::make_unique<bn::NcclCommunicator>(ranks.comm(r)));
    phases::local_statistics(bn::cuda{}, k.shape, bn::Mode::per_channel, k.x.data(),
                             span<double>(k.stats.data(), rec), k.ws.data(), k.ws.size(), ranks.stream(r));
  });
  ranks.grouped([&](int r) { comms[r]->all_gather(rank[r].stats.data(), rank[r].gathered.data(), rec, ranks.stream(r)); });
  const phases::ElementwiseConfig ec;
  ranks.each([&](int r) {
    Rank& k = rank[r];
    phases::MergeArgs<float> ma;
    ma.shard_statistics = {k.gathered.data(), n * rec};
    ma.shards = n;
    ma.normalization = {k.norm.data(), rec};
    ma.running_mean = {k.rm.data(), C};
    ma.running_var = {k.rv.data(), C};
    phases::merge_statistics(bn::cuda{}, C, ma, phases::MergeConfig{}, k.ws.data(), k.ws.size(), ranks.stream(r));
    phases::NormalizeArgs<float> na;
    na.x = k.x.data(); na.y = k.y.data(); na.weight = {k.w.data(), C}; na.bias = {k.b.data(), C};
    na.normalization = {k.norm.data(), rec};
    phases::normalize(bn::cuda{}, k.shape, na, ec, k.ws.data(), k.ws.size(), ranks.stream(r));
    phases::GradientSumsArgs<float> ga;
    ga.x = k.x.data(); ga.dy = k.dy.data(); ga.normalization = na.normalization;
    ga.gradient_sums = {k.sums.data(), 2 * C};
    phases::local_gradient_sums(bn::cuda{}, k.shape, ga, ec, k.ws.data(), k.ws.size(), ranks.stream(r));
  });
  // The backward all-reduce (the test's own: the communicator's interface is all_gather).
  ranks.grouped([&](int r) {
    bn::detail::check_nccl(ncclAllReduce(rank[r].sums.data(), rank[r].sums.data(), 2 * C, ncclDouble, ncclSum,
                                         ranks.comm(r), ranks.stream(r)),
                           "ncclAllReduce");
  });
  ranks.each([&](int r) {
    Rank& k = rank[r];
    phases::InputGradientArgs<float> ia;
    ia.x = k.x.data(); ia.dy = k.dy.data(); ia.dx = k.dx.data(); ia.weight = {k.w.data(), C};
    ia.normalization = {k.norm.data(), rec}; ia.gradient_sums = {k.sums.data(), 2 * C};
    ia.grad_weight = {k.gw.data(), C}; ia.grad_bias = {k.gb.data(), C};
    phases::input_gradient(bn::cuda{}, k.shape, ia, ec, k.ws.data(), k.ws.size(), ranks.stream(r));
  });
  ranks.sync();

  auto close = [](double got, double want, double scale) { return std::fabs(got - want) <= 1e-4 * (std::fabs(want) + 0.1 * scale); };
  const double y_scale = bnref::max_abs(bnref::widen(y_ref)), dx_scale = bnref::max_abs(bnref::widen(dx_ref));
  std::vector<double> first_norm;
  ranks.each([&](int r) {
    Rank& k = rank[r];
    const auto y = k.y.download(), dx = k.dx.download();
    for (std::size_t i = 0; i < y.size(); ++i) {
      const std::size_t at = static_cast<std::size_t>(bounds[r] * per_sample) + i;
      ASSERT_TRUE(close(y[i], y_ref[at], y_scale)) << "rank " << r << " y[" << at << "] " << y[i] << " vs " << y_ref[at];
      ASSERT_TRUE(close(dx[i], dx_ref[at], dx_scale)) << "rank " << r << " dx[" << at << "]";
    }
    const auto rm = k.rm.download(), rv = k.rv.download(), gw = k.gw.download(), gb = k.gb.download();
    for (std::int64_t c = 0; c < C; ++c) {
      EXPECT_TRUE(close(rm[c], rm_ref[c], 1.0)) << "rank " << r;
      EXPECT_TRUE(close(rv[c], rv_ref[c], 1.0)) << "rank " << r;
      EXPECT_TRUE(close(gw[c], gw_ref[c], 10.0)) << "rank " << r;
      EXPECT_TRUE(close(gb[c], gb_ref[c], 10.0)) << "rank " << r;
    }
    // Every rank merged the same records in the same order: the same bits.
    const auto norm = k.norm.download();
    if (r == 0) first_norm = norm;
    EXPECT_EQ(norm, first_norm) << "rank " << r;
    EXPECT_EQ(norm[0], static_cast<double>(N * S));
  });
}

}  // namespace
