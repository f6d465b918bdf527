// SyncBatchNorm over MPI (issue 10, items 3 and 4). Run under mpirun with 1, 2, 3 and 4 ranks
// (ctest label "mpi"); every rank runs every test, in the same order (the layer's calls are
// collective).
//
// Item 3: the ranks' shards x_0..x_{S-1} (uneven, some empty) give the y, dx, dz of their
// slice, and grad_weight, grad_bias, running statistics and num_batches_tracked, of ONE
// BatchNorm on the concatenated batch (every rank computes that reference itself), within
//   double: max |got − ref| <= 1e-12 · max |ref| over the tensor;
//   float:  |got − ref| <= 2^-23 · |ref| + 2^-22 · max |ref| per element. Both sides compute
//           in double and round once to float (at most one unit in the last place apart,
//           2^-23 relative); and the one-process BatchNorm's backward works from its saved
//           mean / invstd, rounded to float (relative error 2^-24 each), which moves each
//           term of dx, grad_weight and grad_bias by up to 2^-24 of that term, so by a few
//           2^-24 of the largest value of the tensor: 2^-22 · max |ref| covers four such terms.
//           (SyncBatchNorm keeps the merged mean and invstd in double: it is the more exact one.)
// grad_weight, grad_bias, running statistics, save_mean / save_invstd and num_batches_tracked
// are also compared bit for bit across the ranks.
// Item 4: a global batch of one value per channel, a rank with wrong C, wrong rank, a null
// pointer, a backward of the wrong kind: every rank throws the same typed error naming the
// faulting rank, nothing changes, and the next call works (nobody was left in a collective).
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/comm/mpi.hpp>
#include <batchnorm/sync_batch_norm.hpp>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "support/common.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::cpu;
using batchnorm::Layout;
using batchnorm::Mode;
using batchnorm::MpiCommunicator;
using batchnorm::Options;
using batchnorm::Shape;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// Every rank's @p bytes; true when all equal rank 0's (all ranks get the same answer).
bool same_bits_on_every_rank(const std::vector<unsigned char>& bytes) {
  const int size = world_size();
  int length = static_cast<int>(bytes.size());
  std::vector<int> lengths(static_cast<std::size_t>(size));
  MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, MPI_COMM_WORLD);
  for (int l : lengths)
    if (l != length) return false;
  std::vector<unsigned char> all(static_cast<std::size_t>(size) * bytes.size());
  MPI_Allgather(bytes.data(), length, MPI_UNSIGNED_CHAR, all.data(), length, MPI_UNSIGNED_CHAR, MPI_COMM_WORLD);
  for (int r = 1; r < size; ++r)
    if (std::memcmp(all.data(), all.data() + static_cast<std::size_t>(r) * bytes.size(), bytes.size()) != 0)
      return false;
  return true;
}

template <class V>
void append_bytes(std::vector<unsigned char>& out, const V& v) {
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  out.insert(out.end(), p, p + v.size() * sizeof(typename V::value_type));
}

struct Case {
  std::vector<std::int64_t> extents;  // extents[0] is ignored: the shard sizes decide N
  Layout layout = Layout::contiguous;
  Mode mode = Mode::per_channel;
  bool relu_residual = false;
  Options options{};
  const char* what = "";
};

/// Shard sizes of the ranks for a pattern: all non-empty and uneven, every other rank empty,
/// or everything on the last rank.
enum class Pattern { uneven, with_empty, last_only };
std::vector<std::int64_t> shard_sizes(Pattern p, int size) {
  std::vector<std::int64_t> n(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) {
    auto& v = n[static_cast<std::size_t>(r)];
    switch (p) {
      case Pattern::uneven: v = r + 4 + (r % 2); break;
      case Pattern::with_empty: v = r % 2 == 0 ? r + 4 : 0; break;
      case Pattern::last_only: v = r == size - 1 ? 6 : 0; break;
    }
  }
  return n;
}

Shape with_batch(const Case& c, std::int64_t n) {
  auto e = c.extents;
  e[0] = n;
  return bn_test::make_shape(e, c.layout);
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, std::int64_t per_sample, std::int64_t begin, std::int64_t count) {
  return std::vector<T>(v.begin() + begin * per_sample, v.begin() + (begin + count) * per_sample);
}

/// The bound of the file comment; returns the worst |got − ref| / allowed (<= 1 passes).
template <class T, class U>
double bound_ratio(const std::vector<T>& got, const std::vector<U>& ref, double scale) {
  double worst = got.size() == ref.size() ? 0.0 : INFINITY;
  for (std::size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    const double allowed = std::is_same_v<T, double> ? 1e-12 * scale + 1e-300
                                                     : std::ldexp(std::fabs(r), -23) + std::ldexp(scale, -22) + 1e-30;
    const double e = std::fabs(g - r) / allowed;
    if (!(e <= worst)) worst = e;
  }
  return worst;
}

template <class U>
double max_abs_of(const std::vector<U>& v) {
  double m = 0.0;
  for (const U& e : v) m = std::max(m, std::fabs(static_cast<double>(e)));
  return m;
}

#define EXPECT_WITHIN_BOUND(got, ref, scale, label)                               \
  do {                                                                             \
    const double ratio_ = bound_ratio(got, ref, scale);                           \
    EXPECT_LE(ratio_, 1.0) << label << " (worst error / allowed) on rank " << rank; \
  } while (0)

template <class T, int Dims>
void check_equivalence(const Case& c, Pattern pattern) {
  using P = batchnorm::param_t<T>;
  const int rank = world_rank(), size = world_size();
  SCOPED_TRACE(::testing::Message() << c.what << ", pattern " << static_cast<int>(pattern) << ", " << size
                                    << " ranks, " << (std::is_same_v<T, double> ? "double" : "float"));
  const auto sizes = shard_sizes(pattern, size);
  std::int64_t global_n = 0, begin = 0;
  for (int r = 0; r < size; ++r) {
    if (r < rank) begin += sizes[static_cast<std::size_t>(r)];
    global_n += sizes[static_cast<std::size_t>(r)];
  }
  const std::int64_t local_n = sizes[static_cast<std::size_t>(rank)];
  const Shape global = with_batch(c, global_n), local = with_batch(c, local_n);
  const std::int64_t per_sample = global.numel() / global_n;
  const std::int64_t features = batchnorm::feature_count(global, c.mode);
  Options options = c.options;
  options.mode = c.mode;

  batchnorm::BatchNorm<T, Dims, cpu> reference(features, options);
  batchnorm::SyncBatchNorm<T, Dims, cpu, MpiCommunicator> layer(features, MpiCommunicator(MPI_COMM_WORLD), options);
  const auto initial = bn_test::random_state<P>(features, 11, options);
  reference.load_state(initial);
  layer.load_state(initial);

  // Two training steps (running statistics updated twice, gradients accumulated when asked),
  // then one eval forward.
  for (int step = 0; step < 3; ++step) {
    const bool training = step < 2;
    reference.train(training);
    layer.train(training);
    const std::uint64_t seed = 100 + 10 * static_cast<std::uint64_t>(step);
    const auto x = bnref::cast<T>(bnref::normal(global.numel(), seed, 0.7, 2.0));
    const auto z = bnref::cast<T>(bnref::normal(global.numel(), seed + 1));
    const auto dy = bnref::cast<T>(bnref::normal(global.numel(), seed + 2));
    std::vector<T> y_ref(x.size()), dx_ref(x.size()), dz_ref(x.size());
    const auto x_local = slice(x, per_sample, begin, local_n), z_local = slice(z, per_sample, begin, local_n);
    const auto dy_local = slice(dy, per_sample, begin, local_n);
    std::vector<T> y(x_local.size()), dx(x_local.size()), dz(x_local.size());
    if (c.relu_residual) {
      reference.forward_relu(x.data(), z.data(), y_ref.data(), global);
      layer.forward_relu(x_local.data(), z_local.data(), y.data(), local);
    } else {
      reference.forward(x.data(), y_ref.data(), global);
      layer.forward(x_local.data(), y.data(), local);
    }
    EXPECT_WITHIN_BOUND(y, slice(y_ref, per_sample, begin, local_n), max_abs_of(y_ref), "y, step " << step);
    if (training) {
      if (c.relu_residual) {
        reference.backward_relu(x.data(), y_ref.data(), dy.data(), dx_ref.data(), dz_ref.data(), global);
        layer.backward_relu(x_local.data(), y.data(), dy_local.data(), dx.data(), dz.data(), local);
        EXPECT_WITHIN_BOUND(dz, slice(dz_ref, per_sample, begin, local_n), max_abs_of(dz_ref), "dz, step " << step);
      } else {
        reference.backward(x.data(), dy.data(), dx_ref.data(), global);
        layer.backward(x_local.data(), dy_local.data(), dx.data(), local);
      }
      EXPECT_WITHIN_BOUND(dx, slice(dx_ref, per_sample, begin, local_n), max_abs_of(dx_ref), "dx, step " << step);
      const auto g = layer.gradients(), g_ref = reference.gradients();
      EXPECT_WITHIN_BOUND(g.grad_weight, g_ref.grad_weight, max_abs_of(g_ref.grad_weight), "grad_weight");
      EXPECT_WITHIN_BOUND(g.grad_bias, g_ref.grad_bias, max_abs_of(g_ref.grad_bias), "grad_bias");
    }
    const auto s = layer.state(), s_ref = reference.state();
    EXPECT_WITHIN_BOUND(s.running_mean, s_ref.running_mean, max_abs_of(s_ref.running_mean), "running_mean");
    EXPECT_WITHIN_BOUND(s.running_var, s_ref.running_var, max_abs_of(s_ref.running_var), "running_var");
    EXPECT_EQ(s.num_batches_tracked, s_ref.num_batches_tracked);

    std::vector<unsigned char> bits;
    const auto g = layer.gradients();
    for (const auto* v : {&s.running_mean, &s.running_var, &g.grad_weight, &g.grad_bias}) append_bytes(bits, *v);
    if (training || !options.track_running_stats) {  // synchronized: an eval forward on an empty shard saves nothing
      append_bytes(bits, bn_test::read(layer.save_mean_data(), features));
      append_bytes(bits, bn_test::read(layer.save_invstd_data(), features));
    }
    append_bytes(bits, std::vector<std::int64_t>{s.num_batches_tracked});
    EXPECT_TRUE(same_bits_on_every_rank(bits)) << "statistics / gradients differ between ranks, step " << step;
  }
}

std::vector<Case> cases_1d() {
  Options cumulative;
  cumulative.momentum = std::nullopt;
  return {{{0, 5}, Layout::contiguous, Mode::per_channel, false, cumulative, "1d (N, C), cumulative average"},
          {{0, 4, 3}, Layout::contiguous, Mode::per_channel, true, {}, "1d (N, C, L), relu + residual"}};
}
std::vector<Case> cases_2d() {
  Options not_affine;
  not_affine.affine = false;
  Options no_running;
  no_running.track_running_stats = false;
  Options accumulate;
  accumulate.accumulate_gradients = true;
  return {{{0, 3, 4, 5}, Layout::contiguous, Mode::per_channel, false, accumulate, "2d NCHW, accumulated gradients"},
          {{0, 3, 4, 5}, Layout::channels_last, Mode::per_channel, true, {}, "2d channels_last, relu + residual"},
          {{0, 2, 3, 2}, Layout::contiguous, Mode::per_activation, false, not_affine, "2d per_activation, not affine"},
          {{0, 3, 2, 3}, Layout::contiguous, Mode::per_channel, true, no_running,
           "2d relu + residual, no running stats (eval synchronizes too)"}};
}
std::vector<Case> cases_3d() {
  return {{{0, 2, 3, 2, 2}, Layout::contiguous, Mode::per_channel, false, {}, "3d NCDHW"},
          {{0, 3, 2, 2, 3}, Layout::channels_last, Mode::per_channel, true, {}, "3d channels_last_3d, relu + residual"}};
}

template <class T>
class SyncEquivalence : public ::testing::Test {};
using Types = ::testing::Types<double, float>;
TYPED_TEST_SUITE(SyncEquivalence, Types);

TYPED_TEST(SyncEquivalence, BatchNorm1dEqualsOneProcessOnTheConcatenatedBatch) {
  for (const Case& c : cases_1d())
    for (Pattern p : {Pattern::uneven, Pattern::with_empty, Pattern::last_only}) check_equivalence<TypeParam, 1>(c, p);
}
TYPED_TEST(SyncEquivalence, BatchNorm2dEqualsOneProcessOnTheConcatenatedBatch) {
  for (const Case& c : cases_2d())
    for (Pattern p : {Pattern::uneven, Pattern::with_empty, Pattern::last_only}) check_equivalence<TypeParam, 2>(c, p);
}
TYPED_TEST(SyncEquivalence, BatchNorm3dEqualsOneProcessOnTheConcatenatedBatch) {
  for (const Case& c : cases_3d())
    for (Pattern p : {Pattern::uneven, Pattern::with_empty, Pattern::last_only}) check_equivalence<TypeParam, 3>(c, p);
}

// ---- item 4: faults ----------------------------------------------------------------------

using Layer2d = batchnorm::SyncBatchNorm2d<double, cpu, MpiCommunicator>;
constexpr std::int64_t kC = 3;

/// Everything a failed call must leave as it was, as bytes.
std::vector<unsigned char> snapshot(const Layer2d& layer) {
  std::vector<unsigned char> bits;
  const auto s = layer.state();
  const auto g = layer.gradients();
  for (const auto* v : {&s.weight, &s.bias, &s.running_mean, &s.running_var, &g.grad_weight, &g.grad_bias})
    append_bytes(bits, *v);
  append_bytes(bits, bn_test::read(layer.save_mean_data(), kC));
  append_bytes(bits, bn_test::read(layer.save_invstd_data(), kC));
  append_bytes(bits, std::vector<std::int64_t>{s.num_batches_tracked});
  return bits;
}

/// Runs @p call on every rank; expects it to throw E on every rank with the same what() on
/// every rank when @p same_message, and returns this rank's exception message and argument.
template <class E, class F>
std::pair<std::string, std::string> expect_throw_everywhere(F&& call, bool same_message) {
  std::string message = "(no exception)", argument;
  bool thrown = false;
  try {
    call();
  } catch (const E& e) {
    thrown = true;
    message = e.what();
    if constexpr (std::is_base_of_v<batchnorm::invalid_argument, E>) argument = e.argument();
  } catch (const std::exception& e) {
    message = std::string("wrong exception type: ") + e.what();
  }
  EXPECT_TRUE(thrown) << "rank " << world_rank() << ": " << message;
  if (std::getenv("BATCHNORM_PRINT_ERRORS"))  // docs/errors.md copies these
    std::fprintf(stderr, "[rank %d] %s\n", world_rank(), message.c_str());
  int all_thrown = thrown ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all_thrown, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(all_thrown, 1) << "a rank did not throw";
  if (same_message) {
    EXPECT_TRUE(same_bits_on_every_rank(std::vector<unsigned char>(message.begin(), message.end())))
        << "rank " << world_rank() << " says: " << message;
  }
  return {message, argument};
}

struct FaultFixture {
  int rank = world_rank(), size = world_size();
  Layer2d layer{kC, MpiCommunicator(MPI_COMM_WORLD)};
  Shape shape{std::int64_t{2}, kC, std::int64_t{2}, std::int64_t{3}};
  std::vector<double> x = bnref::normal(shape.numel(), 7 + static_cast<std::uint64_t>(world_rank()), 1.0, 3.0);
  std::vector<double> y = std::vector<double>(x.size()), dy = bnref::normal(shape.numel(), 99), dx = y;

  FaultFixture() { layer.load_state(bn_test::random_state<double>(kC, 5)); }
  /// A valid step on every rank: proves no rank is still inside an earlier collective.
  void valid_step() {
    layer.forward(x.data(), y.data(), shape);
    layer.backward(x.data(), dy.data(), dx.data(), shape);
  }
};

TEST(SyncFaults, GlobalBatchOfOneValuePerChannelThrowsTheSameErrorOnEveryRank) {
  FaultFixture f;
  // Only the last rank has a sample: one value per channel in the global batch.
  const Shape mine = f.rank == f.size - 1 ? Shape{std::int64_t{1}, kC, std::int64_t{1}, std::int64_t{1}}
                                          : Shape{std::int64_t{0}, kC, std::int64_t{1}, std::int64_t{1}};
  const auto before = snapshot(f.layer);
  const auto [message, argument] =
      expect_throw_everywhere<batchnorm::invalid_argument>([&] { f.layer.forward(f.x.data(), f.y.data(), mine); }, true);
  EXPECT_EQ(argument, "shape");
  EXPECT_NE(message.find("more than 1 value per channel"), std::string::npos) << message;
  EXPECT_NE(message.find("SyncBatchNorm2d::forward"), std::string::npos) << message;
  EXPECT_EQ(snapshot(f.layer), before);
  f.valid_step();
  EXPECT_EQ(f.layer.num_batches_tracked(), 8);  // random_state's 7, plus the valid step only
}

TEST(SyncFaults, ARankWithWrongChannelsMakesEveryRankThrowNamingIt) {
  FaultFixture f;
  const int bad = f.size - 1;
  const Shape wrong{std::int64_t{2}, kC + 1, std::int64_t{1}, std::int64_t{3}};  // same numel as f.shape? no matter
  std::vector<double> big(static_cast<std::size_t>(wrong.numel()) + f.x.size(), 1.0), out(big.size());
  const auto before = snapshot(f.layer);
  const auto [message, argument] = expect_throw_everywhere<batchnorm::invalid_argument>(
      [&] {
        if (f.rank == bad)
          f.layer.forward(big.data(), out.data(), wrong);
        else
          f.layer.forward(f.x.data(), f.y.data(), f.shape);
      },
      false);
  EXPECT_EQ(argument, "shape");
  EXPECT_NE(message.find("rank " + std::to_string(bad) + " of " + std::to_string(f.size)), std::string::npos)
      << message;
  if (f.rank == bad) {
    EXPECT_NE(message.find("expected C = 3"), std::string::npos) << message;
  }
  EXPECT_EQ(snapshot(f.layer), before);
  f.valid_step();
}

TEST(SyncFaults, WrongTensorRankAndNullOutputOnRankZero) {
  FaultFixture f;
  const auto before = snapshot(f.layer);
  const Shape rank3{std::int64_t{2}, kC, std::int64_t{6}};
  auto [message, argument] = expect_throw_everywhere<batchnorm::invalid_argument>(
      [&] { f.layer.forward(f.x.data(), f.y.data(), f.rank == 0 ? rank3 : f.shape); }, false);
  EXPECT_EQ(argument, "shape");
  EXPECT_NE(message.find("rank 0 of"), std::string::npos) << message;
  std::tie(message, argument) = expect_throw_everywhere<batchnorm::invalid_argument>(
      [&] { f.layer.forward(f.x.data(), f.rank == 0 ? nullptr : f.y.data(), f.shape); }, false);
  EXPECT_EQ(argument, "y");
  EXPECT_NE(message.find("rank 0 of"), std::string::npos) << message;
  EXPECT_EQ(snapshot(f.layer), before);
  f.valid_step();
}

TEST(SyncFaults, WhenSeveralRanksRefuseEachNamesItselfAndTheFirst) {
  FaultFixture f;
  const auto before = snapshot(f.layer);
  // Every odd rank, and rank 0, pass a null y.
  const bool refuses = f.rank == 0 || f.rank % 2 == 1;
  int refusing = 0;
  for (int r = 0; r < f.size; ++r) refusing += (r == 0 || r % 2 == 1) ? 1 : 0;
  const auto [message, argument] = expect_throw_everywhere<batchnorm::invalid_argument>(
      [&] { f.layer.forward(f.x.data(), refuses ? nullptr : f.y.data(), f.shape); }, false);
  EXPECT_EQ(argument, "y");
  EXPECT_NE(message.find("rank " + std::to_string(refuses ? f.rank : 0) + " of"), std::string::npos) << message;
  if (refusing > 1) {
    EXPECT_NE(message.find(std::to_string(refusing) + " ranks refused theirs, the first is rank 0"), std::string::npos)
        << message;
  }
  if (refuses) {
    EXPECT_NE(message.find("y: expected a non-null pointer"), std::string::npos) << message;
  }
  EXPECT_EQ(snapshot(f.layer), before);
  f.valid_step();
}

TEST(SyncFaults, BackwardFaultsOnOneRankThrowEverywhereAndLeaveGradientsAlone) {
  FaultFixture f;
  f.valid_step();
  f.layer.forward(f.x.data(), f.y.data(), f.shape);
  const auto before = snapshot(f.layer);
  const int bad = f.size - 1;
  auto [message, argument] = expect_throw_everywhere<batchnorm::invalid_argument>(
      [&] { f.layer.backward(f.x.data(), f.rank == bad ? nullptr : f.dy.data(), f.dx.data(), f.shape); }, false);
  EXPECT_EQ(argument, "dy");
  EXPECT_NE(message.find("rank " + std::to_string(bad)), std::string::npos) << message;
  EXPECT_EQ(snapshot(f.layer), before);
  // backward_relu after a plain forward on rank 0 only: a state_error everywhere.
  const auto [state_message, unused] = expect_throw_everywhere<batchnorm::state_error>(
      [&] {
        if (f.rank == 0)
          f.layer.backward_relu(f.x.data(), f.y.data(), f.dy.data(), f.dx.data(), nullptr, f.shape);
        else
          f.layer.backward(f.x.data(), f.dy.data(), f.dx.data(), f.shape);
      },
      false);
  EXPECT_NE(state_message.find("rank 0 of"), std::string::npos) << state_message;
  EXPECT_EQ(snapshot(f.layer), before);
  f.layer.backward(f.x.data(), f.dy.data(), f.dx.data(), f.shape);
}

TEST(SyncFaults, MpiErrorsBecomeCommunicationErrorsNamingTheCall) {
  // On MPI_COMM_NULL, MPI_Comm_dup fails; the error is raised on MPI_COMM_WORLD's handler,
  // which main() sets to MPI_ERRORS_RETURN.
  try {
    MpiCommunicator broken(MPI_COMM_NULL);
    ADD_FAILURE() << "no exception";
  } catch (const batchnorm::communication_error& e) {
    EXPECT_EQ(e.call(), "MPI_Comm_dup");
    if (std::getenv("BATCHNORM_PRINT_ERRORS")) std::fprintf(stderr, "[rank %d] %s\n", world_rank(), e.what());
    EXPECT_NE(std::string(e.what()).find("MPI_Comm_dup failed: "), std::string::npos) << e.what();
    EXPECT_NE(e.code(), MPI_SUCCESS);
  }
  MpiCommunicator comm(MPI_COMM_WORLD);
  EXPECT_THROW(comm.all_gather(nullptr, nullptr, -1), batchnorm::invalid_argument);
  EXPECT_EQ(comm.rank(), world_rank());
  EXPECT_EQ(comm.size(), world_size());
}

TEST(SyncFaults, MessageSizesAreTwoFeaturesPlusTwoAndPlusOne) {
  Layer2d layer(kC, MpiCommunicator(MPI_COMM_WORLD));
  EXPECT_EQ(layer.forward_message_size(), 2 * kC + 2);
  EXPECT_EQ(layer.backward_message_size(), 2 * kC + 1);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  ::testing::InitGoogleTest(&argc, argv);
  if (world_rank() != 0) GTEST_FLAG_SET(brief, true);  // the other ranks print only failures
  const int result = RUN_ALL_TESTS();
  int worst = result;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
