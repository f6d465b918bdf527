// The CUDA phases (cuda_phases.cuh) against the CPU phases and BatchNorm on the whole batch:
//  - one shard: 1 → 2 → 3 is forward and 4 → 5 backward (GPU vs GPU, within float rounding);
//    the merge of one record is the CPU's merge bit for bit (the same double formulas);
//  - shards of 0, 1, 2, ... samples (uneven, empty) reproduce the CPU's forward / backward of
//    the concatenated batch: y, dx, grad_weight, grad_bias, running stats, saved statistics;
//  - an all-empty batch, records the merge refuses (NaN record, state untouched),
//    skip_nonfinite_updates across shards;
//  - a forward and a backward captured into a CUDA graph: no phase synchronizes the host;
//  - the host-side checks, which run without a GPU.
//
// Tolerances (GPU vs CPU, per element, `scale` = max |cpu| of the tensor): float
// |diff| <= 1e-4 · (|cpu| + 0.1 · scale) (tests/cuda/semantics_test.cu's bound: float rounding
// of the statistics, ~1e-6 relative here, with room for cancellation in dx); double 1e-10.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <batchnorm/cuda.cuh>
#include <batchnorm/half.hpp>

#include "support/common.hpp"
#include "support/device_memory.cuh"
#include "support/phases_cases.hpp"
#include "support/reference.hpp"

namespace bn = batchnorm;
namespace phases = batchnorm::phases;

namespace {

using bn::Activation;
using bn::Layout;
using bn::Mode;
using bn::Shape;
using bn::span;
using bn_test::device_array;
using bn_test::Stream;

template <class T>
constexpr double rtol() {
  // half: outputs round to 11 bits, so the GPU's and the CPU's roundings may differ by an ulp.
  return std::is_same_v<T, double> ? 1e-10 : std::is_same_v<T, float> ? 1e-4 : 4e-3;
}

/// |g − c| <= rel · (|c| + 0.1 · max|c|) per element; NaN must match NaN.
template <class A, class B>
void expect_close(const std::vector<A>& gpu, const std::vector<B>& cpu, double rel, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double scale = 0.0;
  for (B v : cpu) scale = std::fmax(scale, std::fabs(static_cast<double>(v)));
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double g = static_cast<double>(gpu[i]), c = static_cast<double>(cpu[i]);
    if (std::isnan(c) && std::isnan(g)) continue;
    if (!(std::fabs(g - c) <= rel * (std::fabs(c) + 0.1 * scale))) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << g << ", cpu " << c << " (rel " << rel << ")";
      return;
    }
  }
}

using Case = bn_test::PhaseCase;
using bn_test::with_batch;

template <class T>
span<T> dspan(device_array<T>& a) {
  return {a.data(), static_cast<std::int64_t>(a.size())};
}
template <class T>
span<const T> cspan(const device_array<T>& a) {
  return {a.data(), static_cast<std::int64_t>(a.size())};
}

/// Host data of one case: the whole batch, parameters, initial running statistics.
template <class T>
struct Batch {
  Shape shape;
  std::int64_t F, per_sample;
  std::vector<T> x, dy, z;
  std::vector<bn::param_t<T>> w, b;
};

template <class T>
Batch<T> make_batch(const Case& k, double offset, std::uint64_t seed) {
  Batch<T> d{bn_test::make_shape(k.extents, k.layout), 0, 0, {}, {}, {}, {}, {}};
  d.F = bn::feature_count(d.shape, k.mode);
  const std::int64_t numel = d.shape.numel();
  d.per_sample = numel / d.shape.batch();
  d.x = bnref::cast<T>(bnref::normal(numel, seed, offset, 2.0));
  d.dy = bnref::cast<T>(bnref::normal(numel, seed + 1));
  d.z = bnref::cast<T>(bnref::normal(numel, seed + 2));
  d.w = bnref::cast<bn::param_t<T>>(bnref::normal(d.F, seed + 3, 1.0, 0.5));
  d.b = bnref::cast<bn::param_t<T>>(bnref::normal(d.F, seed + 4));
  return d;
}

template <class T>
std::vector<T> samples(const std::vector<T>& v, std::int64_t per_sample, std::int64_t begin, std::int64_t end) {
  return std::vector<T>(v.begin() + begin * per_sample, v.begin() + end * per_sample);
}

/// What the GPU phases produce for the whole batch, gathered on the host.
template <class T>
struct PhaseResults {
  std::vector<double> records, normalization;
  std::vector<T> y, dx;
  std::vector<bn::param_t<T>> running_mean, running_var, save_mean, save_invstd, grad_weight, grad_bias;
};

/// Runs the five CUDA phases over shards [bounds[r], bounds[r + 1]) of the batch on one device
/// and one stream: the all-gather is the records written side by side in one device buffer,
/// the all-reduce a sum on the host in shard order.
template <class T>
PhaseResults<T> run_phases(const Case& k, const Batch<T>& d, const std::vector<std::int64_t>& bounds, double momentum) {
  using P = bn::param_t<T>;
  const std::int64_t F = d.F, shards = static_cast<std::int64_t>(bounds.size()) - 1;
  const std::int64_t rec = phases::shard_statistics_size(F);
  Stream stream;
  std::size_t ws_bytes = 0;
  for (std::int64_t r = 0; r < shards; ++r)
    ws_bytes = std::max(ws_bytes, bn::phases_workspace_size<T>(bn::cuda{}, with_batch(k, bounds[r + 1] - bounds[r]), k.mode));
  device_array<unsigned char> ws(ws_bytes);
  device_array<double> records(static_cast<std::size_t>(shards * rec));
  std::vector<device_array<T>> xs, dys, zs, ys, dxs;
  for (std::int64_t r = 0; r < shards; ++r) {
    xs.emplace_back(samples(d.x, d.per_sample, bounds[r], bounds[r + 1]));
    dys.emplace_back(samples(d.dy, d.per_sample, bounds[r], bounds[r + 1]));
    zs.emplace_back(samples(d.z, d.per_sample, bounds[r], bounds[r + 1]));
    ys.emplace_back(xs.back().size());
    dxs.emplace_back(xs.back().size());
  }
  for (std::int64_t r = 0; r < shards; ++r)
    phases::local_statistics(bn::cuda{}, with_batch(k, bounds[r + 1] - bounds[r]), k.mode, xs[r].data(),
                             span<double>(records.data() + r * rec, rec), ws.data(), ws.size(), stream.get());

  device_array<double> norm(static_cast<std::size_t>(phases::normalization_size(F)));
  device_array<P> rm(std::vector<P>(F, P(0.5))), rv(std::vector<P>(F, P(2))), sm(F), si(F);
  device_array<P> w(d.w), b(d.b);
  phases::MergeArgs<P> ma;
  ma.shard_statistics = cspan(records);
  ma.shards = shards;
  ma.normalization = dspan(norm);
  ma.running_mean = dspan(rm);
  ma.running_var = dspan(rv);
  ma.save_mean = dspan(sm);
  ma.save_invstd = dspan(si);
  phases::MergeConfig mc;
  mc.exponential_average_factor = momentum;
  phases::merge_statistics(bn::cuda{}, F, ma, mc, ws.data(), ws.size(), stream.get());

  phases::ElementwiseConfig ec;
  ec.mode = k.mode;
  ec.activation = k.activation;
  std::vector<double> summed(static_cast<std::size_t>(phases::gradient_sums_size(F)), 0.0);
  device_array<double> sums(summed.size());
  for (std::int64_t r = 0; r < shards; ++r) {
    const Shape s = with_batch(k, bounds[r + 1] - bounds[r]);
    phases::NormalizeArgs<T> na;
    na.x = xs[r].data();
    na.y = ys[r].data();
    na.residual = k.residual ? zs[r].data() : nullptr;
    na.weight = cspan(w);
    na.bias = cspan(b);
    na.normalization = cspan(norm);
    phases::normalize(bn::cuda{}, s, na, ec, ws.data(), ws.size(), stream.get());
    phases::GradientSumsArgs<T> ga;
    ga.x = xs[r].data();
    ga.dy = dys[r].data();
    ga.y = ys[r].data();
    ga.normalization = cspan(norm);
    ga.gradient_sums = dspan(sums);
    phases::local_gradient_sums(bn::cuda{}, s, ga, ec, ws.data(), ws.size(), stream.get());
    stream.sync();
    const auto part = sums.download();
    for (std::size_t i = 0; i < part.size(); ++i) summed[i] += part[i];
  }
  sums.upload(summed);
  device_array<P> gw(F), gb(F);
  PhaseResults<T> out;
  for (std::int64_t r = 0; r < shards; ++r) {
    phases::InputGradientArgs<T> ia;
    ia.x = xs[r].data();
    ia.dy = dys[r].data();
    ia.y = ys[r].data();
    ia.dx = dxs[r].data();
    ia.weight = cspan(w);
    ia.normalization = cspan(norm);
    ia.gradient_sums = cspan(sums);
    ia.grad_weight = dspan(gw);
    ia.grad_bias = dspan(gb);
    phases::input_gradient(bn::cuda{}, with_batch(k, bounds[r + 1] - bounds[r]), ia, ec, ws.data(), ws.size(),
                           stream.get());
  }
  stream.sync();
  out.records = records.download();
  out.normalization = norm.download();
  for (std::int64_t r = 0; r < shards; ++r) {
    const auto y = ys[r].download(), dx = dxs[r].download();
    out.y.insert(out.y.end(), y.begin(), y.end());
    out.dx.insert(out.dx.end(), dx.begin(), dx.end());
  }
  out.running_mean = rm.download();
  out.running_var = rv.download();
  out.save_mean = sm.download();
  out.save_invstd = si.download();
  out.grad_weight = gw.download();
  out.grad_bias = gb.download();
  return out;
}

/// The CPU's forward + backward of the whole batch (double accumulation), same settings.
template <class T>
PhaseResults<T> run_cpu(const Case& k, const Batch<T>& d, double momentum) {
  const std::int64_t F = d.F, numel = d.shape.numel();
  PhaseResults<T> r;
  r.y.resize(numel);
  r.dx.resize(numel);
  using P = bn::param_t<T>;
  r.running_mean.assign(F, P(0.5));
  r.running_var.assign(F, P(2));
  r.save_mean.resize(F);
  r.save_invstd.resize(F);
  r.grad_weight.resize(F);
  r.grad_bias.resize(F);
  bn::ForwardArgs<T> fa;
  fa.x = d.x.data();
  fa.y = r.y.data();
  fa.weight = {d.w.data(), F};
  fa.bias = {d.b.data(), F};
  fa.running_mean = r.running_mean;
  fa.running_var = r.running_var;
  fa.save_mean = r.save_mean;
  fa.save_invstd = r.save_invstd;
  fa.residual = k.residual ? d.z.data() : nullptr;
  bn::ForwardConfig fc;
  fc.mode = k.mode;
  fc.activation = k.activation;
  fc.exponential_average_factor = momentum;
  bn::forward(bn::cpu{}, d.shape, fa, fc);
  bn::BackwardArgs<T> ba;
  ba.x = d.x.data();
  ba.dy = d.dy.data();
  ba.y = r.y.data();
  ba.dx = r.dx.data();
  ba.weight = fa.weight;
  ba.mean = {r.save_mean.data(), F};
  ba.invstd = {r.save_invstd.data(), F};
  ba.grad_weight = r.grad_weight;
  ba.grad_bias = r.grad_bias;
  bn::BackwardConfig bc;
  bc.mode = k.mode;
  bc.activation = k.activation;
  bn::backward(bn::cpu{}, d.shape, ba, bc);
  return r;
}

template <class T>
void expect_same_results(const PhaseResults<T>& gpu, const PhaseResults<T>& cpu, const std::string& what) {
  const double rel = rtol<T>();
  expect_close(gpu.y, cpu.y, rel, what + " y");
  expect_close(gpu.dx, cpu.dx, rel, what + " dx");
  expect_close(gpu.running_mean, cpu.running_mean, rel, what + " running_mean");
  expect_close(gpu.running_var, cpu.running_var, rel, what + " running_var");
  expect_close(gpu.save_mean, cpu.save_mean, rel, what + " save_mean");
  expect_close(gpu.save_invstd, cpu.save_invstd, rel, what + " save_invstd");
  expect_close(gpu.grad_weight, cpu.grad_weight, rel, what + " grad_weight");
  expect_close(gpu.grad_bias, cpu.grad_bias, rel, what + " grad_bias");
}

std::string describe(const Case& k) {
  std::string s = "shape (";
  for (std::size_t i = 0; i < k.extents.size(); ++i) s += (i ? "," : "") + std::to_string(k.extents[i]);
  return s + (k.layout == Layout::channels_last ? ") channels_last" : ") contiguous") +
         (k.mode == Mode::per_channel ? " per_channel" : " per_activation");
}

template <class T>
class CudaPhases : public ::testing::Test {};
using Types = ::testing::Types<float, double, __half>;
TYPED_TEST_SUITE(CudaPhases, Types);

// One shard, then shards of 0, 1, 2, ... samples (two empty ones first): the CPU's forward and
// backward of the whole batch, at offsets 0 and 1e4 (where a float mean in data units loses
// digits: the records keep the mean in double, normalize subtracts it as pivot + rest).
TYPED_TEST(CudaPhases, ShardsReproduceTheWholeBatch) {
  BN_TEST_REQUIRE_GPU();
  using T = TypeParam;
  for (const Case& k : bn_test::phase_cases())
    for (double offset : {0.0, 1e4}) {
      const Batch<T> d = make_batch<T>(k, offset, 41);
      const std::int64_t N = d.shape.batch();
      const PhaseResults<T> cpu = run_cpu(k, d, 0.25);
      expect_same_results(run_phases(k, d, {0, N}, 0.25), cpu, describe(k) + " one shard");
      std::vector<std::int64_t> bounds{0, 0, 0};
      for (std::int64_t size = 1; bounds.back() + size < N; ++size) bounds.push_back(bounds.back() + size);
      bounds.push_back(N);
      const PhaseResults<T> sharded = run_phases(k, d, bounds, 0.25);
      expect_same_results(sharded, cpu, describe(k) + " " + std::to_string(bounds.size() - 1) + " shards");
      EXPECT_EQ(sharded.normalization[0], static_cast<double>(bn::reduction_count(d.shape, k.mode)));
    }
}

// The GPU's records and merge against the CPU's: local statistics within accumulation
// rounding; the merge of the same records is the CPU's merge — bit for bit for one record
// (a merge with an empty accumulator returns the record; the same double formulas follow),
// within a few ulps for several (nvcc contracts a·b + c into fma).
TYPED_TEST(CudaPhases, RecordsAndMergeMatchTheCpu) {
  BN_TEST_REQUIRE_GPU();
  using T = TypeParam;
  using P = bn::param_t<T>;
  for (const Case& k : bn_test::phase_cases()) {
    const Batch<T> d = make_batch<T>(k, 1e4, 43);
    const std::int64_t N = d.shape.batch(), F = d.F, rec = phases::shard_statistics_size(F);
    const std::vector<std::int64_t> bounds{0, 1, N / 2, N};
    const PhaseResults<T> gpu = run_phases(k, d, bounds, 0.5);
    for (std::int64_t r = 0; r + 1 < static_cast<std::int64_t>(bounds.size()); ++r) {
      const auto xs = samples(d.x, d.per_sample, bounds[r], bounds[r + 1]);
      std::vector<double> cpu_rec(rec);
      phases::local_statistics(bn::cpu{}, with_batch(k, bounds[r + 1] - bounds[r]), k.mode, xs.data(),
                               span<double>(cpu_rec));
      const std::vector<double> gpu_rec(gpu.records.begin() + r * rec, gpu.records.begin() + (r + 1) * rec);
      EXPECT_EQ(gpu_rec[0], cpu_rec[0]);
      // Means: relative to the spread (2) at an offset of 1e4; M2: relative.
      for (std::int64_t f = 0; f < F; ++f) {
        EXPECT_NEAR(gpu_rec[1 + f], cpu_rec[1 + f], (std::is_same_v<T, double> ? 1e-12 : 1e-5) * 2.0) << describe(k);
        EXPECT_NEAR(gpu_rec[1 + F + f], cpu_rec[1 + F + f],
                    (std::is_same_v<T, double> ? 1e-10 : 1e-4) * (cpu_rec[1 + F + f] + 1e-300))
            << describe(k);
      }
    }
    for (std::int64_t shards : {std::int64_t{1}, std::int64_t{3}}) {
      // The CPU merge of the GPU's own records.
      std::vector<double> records(gpu.records.begin(), gpu.records.begin() + shards * rec);
      std::vector<double> cpu_norm(phases::normalization_size(F));
      std::vector<P> cpu_rm(F, P(0.5)), cpu_rv(F, P(2));
      phases::MergeArgs<P> ma;
      ma.shard_statistics = {records.data(), shards * rec};
      ma.shards = shards;
      ma.normalization = cpu_norm;
      ma.running_mean = cpu_rm;
      ma.running_var = cpu_rv;
      phases::MergeConfig mc;
      mc.exponential_average_factor = 0.5;
      double total = 0;
      for (std::int64_t r = 0; r < shards; ++r) total += records[r * rec];
      if (total == 1.0) continue;  // one value per feature: refused (RefusedRecords below)
      phases::merge_statistics(bn::cpu{}, F, ma, mc);
      device_array<double> dev_records(records), dev_norm(cpu_norm.size());
      device_array<P> rm(std::vector<P>(F, P(0.5))), rv(std::vector<P>(F, P(2)));
      phases::MergeArgs<P> ga = ma;
      ga.shard_statistics = cspan(dev_records);
      ga.normalization = dspan(dev_norm);
      ga.running_mean = dspan(rm);
      ga.running_var = dspan(rv);
      phases::merge_statistics(bn::cuda{}, F, ga, mc, nullptr, 0, nullptr);
      const auto gpu_norm = dev_norm.download();
      if (shards == 1) {
        EXPECT_EQ(gpu_norm, cpu_norm) << describe(k);
      } else {
        expect_close(gpu_norm, cpu_norm, 1e-14, describe(k) + " merged record");
      }
      expect_close(rm.download(), cpu_rm, std::is_same_v<P, double> ? 1e-14 : 1e-7, describe(k) + " running_mean");
      expect_close(rv.download(), cpu_rv, std::is_same_v<P, double> ? 1e-14 : 1e-7, describe(k) + " running_var");
    }
  }
}

// Every shard empty: count 0, zeros, running statistics untouched, outputs of size 0; the
// parameter gradients are 0.
TEST(CudaPhasesEdges, AllShardsEmpty) {
  BN_TEST_REQUIRE_GPU();
  const std::int64_t F = 3, rec = phases::shard_statistics_size(F);
  const Shape empty({0, F, 4});
  Stream stream;
  device_array<unsigned char> ws(bn::phases_workspace_size<float>(bn::cuda{}, empty, Mode::per_channel));
  device_array<double> records(std::vector<double>(2 * rec, -5.0)), norm(std::vector<double>(rec, -5.0));
  device_array<float> x(1);
  for (int r = 0; r < 2; ++r)
    phases::local_statistics(bn::cuda{}, empty, Mode::per_channel, x.data(), span<double>(records.data() + r * rec, rec),
                             ws.data(), ws.size(), stream.get());
  device_array<float> rm(std::vector<float>(F, 0.5f)), rv(std::vector<float>(F, 2.0f));
  phases::MergeArgs<float> ma;
  ma.shard_statistics = cspan(records);
  ma.shards = 2;
  ma.normalization = dspan(norm);
  ma.running_mean = dspan(rm);
  ma.running_var = dspan(rv);
  phases::merge_statistics(bn::cuda{}, F, ma, phases::MergeConfig{}, ws.data(), ws.size(), stream.get());
  device_array<double> sums(std::vector<double>(2 * F, 0.0));
  device_array<float> gw(std::vector<float>(F, 9.0f)), gb(std::vector<float>(F, 9.0f));
  phases::InputGradientArgs<float> ia;
  ia.x = x.data();
  ia.dy = x.data();
  ia.normalization = cspan(norm);
  ia.gradient_sums = cspan(sums);
  ia.grad_weight = dspan(gw);
  ia.grad_bias = dspan(gb);
  phases::input_gradient(bn::cuda{}, empty, ia, phases::ElementwiseConfig{}, ws.data(), ws.size(), stream.get());
  stream.sync();
  EXPECT_EQ(records.download(), std::vector<double>(2 * rec, 0.0));
  EXPECT_EQ(norm.download(), std::vector<double>(rec, 0.0));
  EXPECT_EQ(rm.download(), std::vector<float>(F, 0.5f));
  EXPECT_EQ(rv.download(), std::vector<float>(F, 2.0f));
  EXPECT_EQ(gw.download(), std::vector<float>(F, 0.0f));
  EXPECT_EQ(gb.download(), std::vector<float>(F, 0.0f));
}

// Records the CPU merge throws for (a count of 1 over all shards, a negative or fractional
// count): the device merge writes a NaN record and NaN save_mean / save_invstd, leaves the
// running statistics and skipped_updates alone, and normalize then gives NaN.
TEST(CudaPhasesEdges, RefusedRecordsGiveANanRecordAndChangeNoState) {
  BN_TEST_REQUIRE_GPU();
  const std::int64_t F = 2, rec = phases::shard_statistics_size(F);
  for (const std::vector<double>& counts : {std::vector<double>{1, 0}, {-1, 3}, {2.5, 2}}) {
    std::vector<double> host;
    for (double c : counts) host.insert(host.end(), {c, 1.0, 2.0, 0.5, 0.5});
    device_array<double> records(host), norm(std::vector<double>(rec, -5.0));
    device_array<float> rm(std::vector<float>(F, 0.5f)), rv(std::vector<float>(F, 2.0f)), sm(F), si(F);
    device_array<std::int64_t> skipped(std::vector<std::int64_t>{0});
    phases::MergeArgs<float> ma;
    ma.shard_statistics = cspan(records);
    ma.shards = 2;
    ma.normalization = dspan(norm);
    ma.running_mean = dspan(rm);
    ma.running_var = dspan(rv);
    ma.save_mean = dspan(sm);
    ma.save_invstd = dspan(si);
    ma.skipped_updates = skipped.data();
    for (bool skip : {false, true}) {
      phases::MergeConfig mc;
      mc.skip_nonfinite_updates = skip;
      device_array<unsigned char> ws(bn::phases_workspace_size<float>(bn::cuda{}, Shape({4, F}), Mode::per_channel));
      phases::merge_statistics(bn::cuda{}, F, ma, mc, ws.data(), ws.size(), nullptr);
      for (double v : norm.download()) EXPECT_TRUE(std::isnan(v)) << counts[0];
      for (float v : sm.download()) EXPECT_TRUE(std::isnan(v));
      for (float v : si.download()) EXPECT_TRUE(std::isnan(v));
      EXPECT_EQ(rm.download(), std::vector<float>(F, 0.5f));
      EXPECT_EQ(rv.download(), std::vector<float>(F, 2.0f));
      EXPECT_EQ(skipped.download()[0], 0);
    }
    device_array<float> x(std::vector<float>(4 * F, 1.0f)), y(4 * F);
    device_array<unsigned char> ws(bn::phases_workspace_size<float>(bn::cuda{}, Shape({4, F}), Mode::per_channel));
    phases::NormalizeArgs<float> na;
    na.x = x.data();
    na.y = y.data();
    na.normalization = cspan(norm);
    phases::normalize(bn::cuda{}, Shape({4, F}), na, phases::ElementwiseConfig{}, ws.data(), ws.size(), nullptr);
    for (float v : y.download()) EXPECT_TRUE(std::isnan(v));
  }
}

// skip_nonfinite_updates over the merged statistics: a NaN in one shard leaves every
// feature's running statistics alone and counts one skipped update on the device.
TEST(CudaPhasesEdges, SkipNonfiniteUpdatesAcrossShards) {
  BN_TEST_REQUIRE_GPU();
  const std::int64_t F = 3, rec = phases::shard_statistics_size(F);
  const Shape shard({4, F});
  std::vector<float> a = bnref::cast<float>(bnref::normal(4 * F, 51)), b = bnref::cast<float>(bnref::normal(4 * F, 52));
  b[4] = std::numeric_limits<float>::quiet_NaN();  // feature 1 of shard 1
  device_array<float> xa(a), xb(b);
  device_array<unsigned char> ws(bn::phases_workspace_size<float>(bn::cuda{}, shard, Mode::per_channel));
  device_array<double> records(2 * rec), norm(rec);
  phases::local_statistics(bn::cuda{}, shard, Mode::per_channel, xa.data(), span<double>(records.data(), rec), ws.data(),
                           ws.size(), nullptr);
  phases::local_statistics(bn::cuda{}, shard, Mode::per_channel, xb.data(), span<double>(records.data() + rec, rec),
                           ws.data(), ws.size(), nullptr);
  device_array<float> rm(std::vector<float>(F, 0.5f)), rv(std::vector<float>(F, 2.0f));
  device_array<std::int64_t> skipped(std::vector<std::int64_t>{0});
  phases::MergeArgs<float> ma;
  ma.shard_statistics = cspan(records);
  ma.shards = 2;
  ma.normalization = dspan(norm);
  ma.running_mean = dspan(rm);
  ma.running_var = dspan(rv);
  ma.skipped_updates = skipped.data();
  phases::MergeConfig mc;
  mc.skip_nonfinite_updates = true;
  phases::merge_statistics(bn::cuda{}, F, ma, mc, ws.data(), ws.size(), nullptr);
  EXPECT_EQ(rm.download(), std::vector<float>(F, 0.5f));
  EXPECT_EQ(rv.download(), std::vector<float>(F, 2.0f));
  EXPECT_EQ(skipped.download()[0], 1);
  // Without the option the NaN reaches feature 1's running statistics only (as forward).
  mc.skip_nonfinite_updates = false;
  phases::merge_statistics(bn::cuda{}, F, ma, mc, ws.data(), ws.size(), nullptr);
  const auto m = rm.download();
  EXPECT_FALSE(std::isnan(m[0]));
  EXPECT_TRUE(std::isnan(m[1]));
  EXPECT_EQ(skipped.download()[0], 1);
}

// A whole forward (1 → 2 → 3) and backward (4 → 5) captured into one CUDA graph: stream capture
// fails on any synchronizing call, so this proves the phases never wait for the device; the
// graph's results then equal the same calls run directly.
TEST(CudaPhasesEdges, ForwardAndBackwardCaptureIntoAGraph) {
  BN_TEST_REQUIRE_GPU();
  const Case k{{8, 3, 16}, Layout::contiguous, Mode::per_channel, Activation::relu, false};
  const Batch<float> d = make_batch<float>(k, 3.0, 61);
  const std::int64_t F = d.F;
  Stream stream;
  device_array<unsigned char> ws(bn::phases_workspace_size<float>(bn::cuda{}, d.shape, k.mode));
  device_array<float> x(d.x), dy(d.dy), y(d.x.size()), dx(d.x.size()), w(d.w), b(d.b), rm(std::vector<float>(F, 0.f)),
      rv(std::vector<float>(F, 1.f)), gw(F), gb(F);
  device_array<double> stats(phases::shard_statistics_size(F)), norm(phases::normalization_size(F)),
      sums(phases::gradient_sums_size(F));
  device_array<std::int64_t> skipped(std::vector<std::int64_t>{0});
  phases::ElementwiseConfig ec;
  ec.activation = k.activation;
  auto enqueue = [&] {
    phases::local_statistics(bn::cuda{}, d.shape, k.mode, x.data(), dspan(stats), ws.data(), ws.size(), stream.get());
    phases::MergeArgs<float> ma;
    ma.shard_statistics = cspan(stats);
    ma.normalization = dspan(norm);
    ma.running_mean = dspan(rm);
    ma.running_var = dspan(rv);
    ma.skipped_updates = skipped.data();
    phases::MergeConfig mc;
    mc.skip_nonfinite_updates = true;  // the deferred path: a memset and two kernels
    phases::merge_statistics(bn::cuda{}, F, ma, mc, ws.data(), ws.size(), stream.get());
    phases::NormalizeArgs<float> na;
    na.x = x.data();
    na.y = y.data();
    na.weight = cspan(w);
    na.bias = cspan(b);
    na.normalization = cspan(norm);
    phases::normalize(bn::cuda{}, d.shape, na, ec, ws.data(), ws.size(), stream.get());
    phases::GradientSumsArgs<float> ga;
    ga.x = x.data();
    ga.dy = dy.data();
    ga.y = y.data();
    ga.normalization = cspan(norm);
    ga.gradient_sums = dspan(sums);
    phases::local_gradient_sums(bn::cuda{}, d.shape, ga, ec, ws.data(), ws.size(), stream.get());
    phases::InputGradientArgs<float> ia;
    ia.x = x.data();
    ia.dy = dy.data();
    ia.y = y.data();
    ia.dx = dx.data();
    ia.weight = cspan(w);
    ia.normalization = cspan(norm);
    ia.gradient_sums = cspan(sums);
    ia.grad_weight = dspan(gw);
    ia.grad_bias = dspan(gb);
    phases::input_gradient(bn::cuda{}, d.shape, ia, ec, ws.data(), ws.size(), stream.get());
  };
  enqueue();
  stream.sync();
  const auto y_direct = y.download(), dx_direct = dx.download(), gw_direct = gw.download();
  rm.upload(std::vector<float>(F, 0.f));
  rv.upload(std::vector<float>(F, 1.f));
  y.upload(std::vector<float>(d.x.size(), 0.f));
  dx.upload(std::vector<float>(d.x.size(), 0.f));
  cudaGraph_t graph = nullptr;
  BN_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal));
  try {
    enqueue();
  } catch (...) {
    (void)cudaStreamEndCapture(stream.get(), &graph);
    throw;
  }
  BN_TEST_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  cudaGraphExec_t exec = nullptr;
  BN_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BN_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
  stream.sync();
  EXPECT_EQ(y.download(), y_direct);
  EXPECT_EQ(dx.download(), dx_direct);
  EXPECT_EQ(gw.download(), gw_direct);
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}

// SyncBatchNorm's helpers after an all-gather of [status | record] blocks: the records behind
// the status words summed in rank order, and compacted one after the other.
TEST(CudaPhasesEdges, SumAndCompactGatheredBlocks) {
  BN_TEST_REQUIRE_GPU();
  const std::int64_t ranks = 3, stride = 7, offset = 1, count = 6;
  std::vector<double> host(ranks * stride);
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = 0.1 * static_cast<double>(i * i) + (i % 7 == 0 ? 1e9 : 0.0);
  device_array<double> gathered(host), sum(std::vector<double>(count, -1.0)), records(ranks * count);
  Stream stream;
  bn::detail::cuda_impl::sum_gathered(gathered.data(), ranks, stride, offset, count, sum.data(), stream.get());
  bn::detail::cuda_impl::compact_gathered(gathered.data(), ranks, stride, offset, count, records.data(), stream.get());
  stream.sync();
  const auto got = sum.download(), compact = records.download();
  for (std::int64_t i = 0; i < count; ++i) {
    double want = 0.0;
    for (std::int64_t r = 0; r < ranks; ++r) want += host[r * stride + offset + i];  // rank order
    EXPECT_EQ(got[i], want) << i;
    for (std::int64_t r = 0; r < ranks; ++r) EXPECT_EQ(compact[r * count + i], host[r * stride + offset + i]);
  }
  EXPECT_THROW(bn::detail::cuda_impl::sum_gathered(gathered.data(), ranks, stride, 2, count, sum.data(), nullptr),
               bn::invalid_argument);
}

// The checks that run on the host before any CUDA call: they run without a GPU too.
TEST(CudaPhasesHostChecks, BadArgumentsThrowBeforeAnyCudaCall) {
  const Shape shape({4, 3, 5});
  float* x = reinterpret_cast<float*>(std::uintptr_t{4096});  // never dereferenced
  auto expect_argument = [](const char* argument, auto&& call) {
    try {
      call();
      ADD_FAILURE() << "accepted a bad " << argument;
    } catch (const bn::invalid_argument& e) {
      EXPECT_EQ(e.argument(), std::string(argument)) << e.what();
    }
  };
  double* rec = reinterpret_cast<double*>(std::uintptr_t{8192});
  expect_argument("statistics", [&] {
    phases::local_statistics(bn::cuda{}, shape, Mode::per_channel, x, span<double>(rec, 6), nullptr, 0, nullptr);
  });
  expect_argument("x", [&] {
    phases::local_statistics(bn::cuda{}, shape, Mode::per_channel, static_cast<float*>(nullptr), span<double>(rec, 7),
                             nullptr, 0, nullptr);
  });
  expect_argument("workspace", [&] {
    phases::local_statistics(bn::cuda{}, shape, Mode::per_channel, x, span<double>(rec, 7),
                             reinterpret_cast<void*>(std::uintptr_t{4100}), 1024, nullptr);
  });
  phases::MergeArgs<float> ma;
  ma.shard_statistics = {rec, 14};
  ma.shards = 2;
  ma.normalization = {rec, 7};
  expect_argument("shard_statistics", [&] {
    phases::MergeArgs<float> bad = ma;
    bad.shards = 3;
    phases::merge_statistics(bn::cuda{}, 3, bad, phases::MergeConfig{}, nullptr, 0, nullptr);
  });
  expect_argument("eps", [&] {
    phases::MergeConfig mc;
    mc.eps = -1.0;
    phases::merge_statistics(bn::cuda{}, 3, ma, mc, nullptr, 0, nullptr);
  });
  phases::NormalizeArgs<float> na;
  na.x = x;
  na.y = x;
  na.normalization = {rec, 6};
  expect_argument("normalization",
                  [&] { phases::normalize(bn::cuda{}, shape, na, phases::ElementwiseConfig{}, nullptr, 0, nullptr); });
  phases::GradientSumsArgs<float> ga;
  ga.x = x;
  ga.dy = x;
  ga.normalization = {rec, 7};
  ga.gradient_sums = {rec, 7};
  expect_argument("gradient_sums", [&] {
    phases::local_gradient_sums(bn::cuda{}, shape, ga, phases::ElementwiseConfig{}, nullptr, 0, nullptr);
  });
  phases::ElementwiseConfig relu;
  relu.activation = Activation::relu;
  ga.gradient_sums = {rec, 6};
  expect_argument("y", [&] { phases::local_gradient_sums(bn::cuda{}, shape, ga, relu, nullptr, 0, nullptr); });
  phases::InputGradientArgs<float> ia;
  ia.x = x;
  ia.dy = x;
  ia.dx = x + 1;  // partial overlap with dy
  ia.normalization = {rec, 7};
  ia.gradient_sums = {rec, 6};
  expect_argument("dx",
                  [&] { phases::input_gradient(bn::cuda{}, shape, ia, phases::ElementwiseConfig{}, nullptr, 0, nullptr); });
}

}  // namespace
