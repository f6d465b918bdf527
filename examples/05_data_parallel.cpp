// 05_data_parallel.cpp: data-parallel training on MPI ranks, with SyncBatchNorm.
//
// Run it with 4 ranks:   mpirun -np 4 example_data_parallel
// (as root add --allow-run-as-root; on a machine with fewer cores add --oversubscribe).
//
// The digits MLP of 03_convergence (64 -> Linear(64) -> BN -> ReLU -> Linear(64) -> BN -> ReLU
// -> Linear(10) -> softmax cross-entropy, plain SGD), here in double precision, is trained
// three times on the same global mini-batches (global batch = ranks x per-rank batch):
//
//   single    ONE process (every rank computes it, alone) on the whole global batch, with
//             batchnorm::BatchNorm1d: the reference;
//   sync      each rank a replica on its shard of the global batch, with
//             batchnorm::SyncBatchNorm1d over MPI: BN statistics of the global batch;
//   per-rank  the same replicas with plain BatchNorm1d: BN statistics of each rank's shard
//             only (what data-parallel training does without SyncBatchNorm).
//
// The replicas stay identical as data-parallel training keeps them: after backward, every
// gradient that is not already global (the linear layers'; the per-rank BN's weight and bias)
// is summed over the ranks (all-gather, then a sum in rank order, so every rank gets the same
// bits), and each replica takes the same SGD step. SyncBatchNorm's grad_weight / grad_bias are
// already those of the global batch and are used as they are.
//
// Output (rank 0): the global mini-batch loss of every step for the three runs, compared: the
// largest |sync - single| (rounding only: sums taken in a different order) and the largest
// |per-rank - single| (a different model: BN normalizes with 8-sample statistics), and the test
// accuracy of each after training. Exits 1 unless sync stays within 1e-9 of single and
// per-rank does not (> 1e-3): ctest runs it under mpirun -np 4 (label "mpi").
//
// Usage: example_data_parallel [--epochs N] [--batch B] [--lr R] [--seed S] [--data digits.csv]
//        (B is the per-rank batch, default 8)

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/comm/mpi.hpp>
#include <batchnorm/sync_batch_norm.hpp>
#include <mpi.h>

#include "common/cli.hpp"     // Options: the command-line table
#include "common/linear.hpp"  // Linear, Rng

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef BATCHNORM_DIGITS_CSV
#define BATCHNORM_DIGITS_CSV "examples/data/digits.csv"
#endif

namespace {

constexpr int kPixels = 64, kClasses = 10, kHidden = 64, kTestCount = 360;

struct Config {
  int epochs = 4;
  int batch = 8;  // per rank
  double lr = 0.5;
  std::uint64_t seed = 1;
  std::string data = BATCHNORM_DIGITS_CSV;
};

Config parse_args(int argc, char** argv) {
  Config c;
  examples::Options options("usage: example_data_parallel [--epochs N] [--batch B] [--lr R] [--seed S] [--data F]\n");
  options.value("--epochs", "N", c.epochs, "epochs (default 4)")
      .value("--batch", "B", c.batch, "per-rank mini-batch size (default 8)")
      .value("--lr", "R", c.lr, "learning rate (default 0.5)")
      .value("--seed", "S", c.seed, "seed of the initial weights and of the batch order (default 1)")
      .value("--data", "F", c.data, "the digits CSV (default: the copy in the source tree)");
  options.parse(argc, argv);
  if (c.epochs < 1 || c.batch < 1 || !(c.lr > 0)) throw std::invalid_argument("--epochs, --batch, --lr must be > 0");
  return c;
}

using examples::Rng;  // common/rng.hpp: splitmix64, the same numbers on every platform and every rank

struct Dataset {
  std::vector<double> x;  // rows x 64, pixels / 16
  std::vector<int> label;
  [[nodiscard]] int count() const { return static_cast<int>(label.size()); }
  void append(const Dataset& from, int row) {
    x.insert(x.end(), from.x.begin() + row * kPixels, from.x.begin() + (row + 1) * kPixels);
    label.push_back(from.label[static_cast<std::size_t>(row)]);
  }
};

Dataset load_digits(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path + " (pass --data PATH)");
  Dataset d;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line == "\r") continue;
    std::stringstream fields(line);
    std::vector<double> v;
    for (std::string f; std::getline(fields, f, ',');) v.push_back(std::stod(f));
    if (v.size() != kPixels + 1) throw std::runtime_error(path + ": expected 64 pixels and a label per row");
    for (int p = 0; p < kPixels; ++p) d.x.push_back(v[static_cast<std::size_t>(p)] / 16.0);
    d.label.push_back(static_cast<int>(v.back()));
  }
  return d;
}

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int mpi_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// Sums @p v over the ranks in rank order (all-gather, then add rank 0, 1, ...): the same
/// bits on every rank, whatever MPI's reduction order would be.
void sum_over_ranks(std::vector<double>& v) {
  const int size = mpi_size();
  std::vector<double> all(v.size() * static_cast<std::size_t>(size));
  MPI_Allgather(v.data(), static_cast<int>(v.size()), MPI_DOUBLE, all.data(), static_cast<int>(v.size()), MPI_DOUBLE,
                MPI_COMM_WORLD);
  std::fill(v.begin(), v.end(), 0.0);
  for (int r = 0; r < size; ++r)
    for (std::size_t i = 0; i < v.size(); ++i) v[i] += all[static_cast<std::size_t>(r) * v.size() + i];
}

// ---- the network (double precision) ------------------------------------------------------

using Linear = examples::Linear<double>;  // common/linear.hpp: y = x W^T + b, PyTorch init, SGD step

/// The MLP with BN layers of type @p BN (BatchNorm1d or SyncBatchNorm1d: the same calls).
template <class BN>
class Network {
 public:
  Network(std::uint64_t seed, const std::function<std::unique_ptr<BN>()>& make_bn)
      : rng_(seed), l1_(kPixels, kHidden, rng_), l2_(kHidden, kHidden, rng_), l3_(kHidden, kClasses, rng_),
        bn1_(make_bn()), bn2_(make_bn()) {}

  const std::vector<double>& forward(const double* x, int rows, bool training) {
    for (auto* v : {&z1_, &n1_, &a1_, &z2_, &n2_, &a2_, &d1_, &d2_, &dz1_, &dz2_})
      v->resize(static_cast<std::size_t>(rows) * kHidden);
    logits_.resize(static_cast<std::size_t>(rows) * kClasses);
    bn1_->train(training);
    bn2_->train(training);
    const batchnorm::Shape shape{rows, kHidden};
    x_ = x;
    l1_.forward(x, rows, z1_.data());
    bn1_->forward(z1_.data(), n1_.data(), shape);
    relu(n1_, a1_);
    l2_.forward(a1_.data(), rows, z2_.data());
    bn2_->forward(z2_.data(), n2_.data(), shape);
    relu(n2_, a2_);
    l3_.forward(a2_.data(), rows, logits_.data());
    return logits_;
  }

  /// Backward of the last training forward. @p global_gradients: the BN layers' parameter
  /// gradients are already those of the global batch (SyncBatchNorm); otherwise they are summed
  /// over the ranks like the linear layers'. @p data_parallel: sum the gradients over ranks.
  void backward_and_step(const std::vector<double>& dlogits, int rows, double lr, bool data_parallel,
                         bool global_bn_gradients) {
    const batchnorm::Shape shape{rows, kHidden};
    l3_.backward(a2_.data(), dlogits.data(), rows, d2_.data());
    relu_backward(n2_, d2_);
    bn2_->backward(z2_.data(), d2_.data(), dz2_.data(), shape);
    l2_.backward(a1_.data(), dz2_.data(), rows, d1_.data());
    relu_backward(n1_, d1_);
    bn1_->backward(z1_.data(), d1_.data(), dz1_.data(), shape);
    l1_.backward(x_, dz1_.data(), rows, nullptr);

    // The gradients to sum over the ranks, in one message (one collective per step).
    std::vector<std::vector<double>*> grads;
    for (Linear* l : {&l1_, &l2_, &l3_}) grads.insert(grads.end(), {&l->gw, &l->gb});
    std::vector<double> bn_grads[4];
    for (int k = 0; k < 2; ++k) {
      const BN* bn = k == 0 ? bn1_.get() : bn2_.get();
      const auto f = static_cast<std::size_t>(bn->num_features());
      bn_grads[2 * k].assign(bn->grad_weight_data(), bn->grad_weight_data() + f);
      bn_grads[2 * k + 1].assign(bn->grad_bias_data(), bn->grad_bias_data() + f);
      if (!global_bn_gradients) grads.insert(grads.end(), {&bn_grads[2 * k], &bn_grads[2 * k + 1]});
    }
    if (data_parallel) {
      std::vector<double> flat;
      for (const auto* g : grads) flat.insert(flat.end(), g->begin(), g->end());
      sum_over_ranks(flat);
      auto at = flat.begin();
      for (auto* g : grads) {
        std::copy(at, at + static_cast<std::ptrdiff_t>(g->size()), g->begin());
        at += static_cast<std::ptrdiff_t>(g->size());
      }
    }
    for (Linear* l : {&l1_, &l2_, &l3_}) l->sgd(lr);
    for (int k = 0; k < 2; ++k) {
      BN* bn = k == 0 ? bn1_.get() : bn2_.get();
      for (std::size_t i = 0; i < bn_grads[2 * k].size(); ++i) {
        bn->weight_data()[i] -= lr * bn_grads[2 * k][i];
        bn->bias_data()[i] -= lr * bn_grads[2 * k + 1][i];
      }
    }
  }

 private:
  static void relu(const std::vector<double>& in, std::vector<double>& out) {
    for (std::size_t i = 0; i < in.size(); ++i) out[i] = in[i] > 0.0 ? in[i] : 0.0;
  }
  static void relu_backward(const std::vector<double>& in, std::vector<double>& d) {
    for (std::size_t i = 0; i < in.size(); ++i)
      if (!(in[i] > 0.0)) d[i] = 0.0;
  }

  Rng rng_;
  Linear l1_, l2_, l3_;
  std::unique_ptr<BN> bn1_, bn2_;
  const double* x_ = nullptr;
  std::vector<double> z1_, n1_, a1_, z2_, n2_, a2_, logits_, d1_, d2_, dz1_, dz2_;
};

/// Sum of the softmax cross-entropy over @p rows, correct predictions, and d(sum / scale)/dlogits.
double cross_entropy(const std::vector<double>& logits, const int* labels, int rows, double scale,
                     std::vector<double>* dlogits, int* correct) {
  double total = 0.0;
  if (dlogits) dlogits->assign(logits.size(), 0.0);
  for (int n = 0; n < rows; ++n) {
    const double* z = &logits[static_cast<std::size_t>(n) * kClasses];
    const int top_k = static_cast<int>(std::max_element(z, z + kClasses) - z);
    if (correct) *correct += top_k == labels[n] ? 1 : 0;
    double sum = 0.0;
    for (int k = 0; k < kClasses; ++k) sum += std::exp(z[k] - z[top_k]);
    total += std::log(sum) + z[top_k] - z[labels[n]];
    if (dlogits)
      for (int k = 0; k < kClasses; ++k)
        (*dlogits)[static_cast<std::size_t>(n * kClasses + k)] =
            (std::exp(z[k] - z[top_k]) / sum - (k == labels[n] ? 1.0 : 0.0)) / scale;
  }
  return total;
}

struct Run {
  std::vector<double> losses;  // global mini-batch loss of every step
  double test_accuracy = 0.0;  // this rank's replica, eval mode (running statistics)
};

/// Trains one network. @p parallel: each rank its shard (rows [rank * b, (rank + 1) * b) of
/// every global batch); otherwise this process alone on the whole global batch.
template <class BN>
Run train(const Config& c, const Dataset& train_set, const Dataset& test_set, bool parallel, bool global_bn_gradients,
          const std::function<std::unique_ptr<BN>()>& make_bn) {
  const int rank = mpi_rank(), ranks = mpi_size();
  const int global_batch = c.batch * ranks;
  Network<BN> net(c.seed, make_bn);
  Rng order(c.seed + 1000);
  std::vector<int> rows(static_cast<std::size_t>(train_set.count()));
  std::iota(rows.begin(), rows.end(), 0);
  Run run;
  std::vector<double> dlogits;
  for (int epoch = 0; epoch < c.epochs; ++epoch) {
    order.shuffle(rows);
    for (std::size_t begin = 0; begin + static_cast<std::size_t>(global_batch) <= rows.size();
         begin += static_cast<std::size_t>(global_batch)) {
      Dataset batch;
      const int first = parallel ? rank * c.batch : 0, count = parallel ? c.batch : global_batch;
      for (int k = 0; k < count; ++k) batch.append(train_set, rows[begin + static_cast<std::size_t>(first + k)]);
      const auto& logits = net.forward(batch.x.data(), count, true);
      std::vector<double> loss{cross_entropy(logits, batch.label.data(), count, global_batch, &dlogits, nullptr)};
      if (parallel) sum_over_ranks(loss);
      run.losses.push_back(loss[0] / global_batch);
      net.backward_and_step(dlogits, count, c.lr, parallel, global_bn_gradients);
    }
  }
  int correct = 0;
  cross_entropy(net.forward(test_set.x.data(), test_set.count(), false), test_set.label.data(), test_set.count(), 1.0,
                nullptr, &correct);
  run.test_accuracy = 100.0 * correct / test_set.count();
  return run;
}

double largest_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = a.size() == b.size() ? 0.0 : INFINITY;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (!(d <= worst)) worst = d;  // NaN counts as the worst
  }
  return worst;
}

int run_example(int argc, char** argv) {
  const Config c = parse_args(argc, argv);
  const int rank = mpi_rank(), ranks = mpi_size();
  const Dataset all = load_digits(c.data);
  // The split of 03_convergence: a seeded shuffle, 360 images for testing.
  std::vector<int> order(static_cast<std::size_t>(all.count()));
  std::iota(order.begin(), order.end(), 0);
  Rng split(12345);
  split.shuffle(order);
  Dataset test_set, train_set;
  for (std::size_t i = 0; i < order.size(); ++i) (i < kTestCount ? test_set : train_set).append(all, order[i]);

  using Plain = batchnorm::BatchNorm1d<double, batchnorm::cpu>;
  using Sync = batchnorm::SyncBatchNorm1d<double, batchnorm::cpu, batchnorm::MpiCommunicator>;
  const Run single = train<Plain>(c, train_set, test_set, false, false, [] { return std::make_unique<Plain>(kHidden); });
  const Run sync = train<Sync>(c, train_set, test_set, true, true, [] {
    return std::make_unique<Sync>(kHidden, batchnorm::MpiCommunicator(MPI_COMM_WORLD));
  });
  const Run per_rank =
      train<Plain>(c, train_set, test_set, true, false, [] { return std::make_unique<Plain>(kHidden); });

  const double sync_diff = largest_difference(sync.losses, single.losses);
  const double per_rank_diff = largest_difference(per_rank.losses, single.losses);
  const bool ok = sync_diff <= 1e-9 && per_rank_diff > 1e-3;
  if (rank == 0) {
    std::printf("data-parallel digits MLP (double): %d ranks x %d samples = global batch %d, %d epochs, %zu steps, lr %g\n",
                ranks, c.batch, ranks * c.batch, c.epochs, single.losses.size(), c.lr);
    std::printf("%-44s %14s %14s %10s\n", "run", "first loss", "last loss", "test acc");
    std::printf("%-44s %14.10f %14.10f %9.2f%%\n", "single process, BatchNorm1d, global batch", single.losses.front(),
                single.losses.back(), single.test_accuracy);
    std::printf("%-44s %14.10f %14.10f %9.2f%%\n", "data parallel, SyncBatchNorm1d", sync.losses.front(),
                sync.losses.back(), sync.test_accuracy);
    std::printf("%-44s %14.10f %14.10f %9.2f%%\n", "data parallel, per-rank BatchNorm1d", per_rank.losses.front(),
                per_rank.losses.back(), per_rank.test_accuracy);
    std::printf("largest |loss - single| over all steps: SyncBatchNorm %.3g, per-rank BatchNorm %.3g\n", sync_diff,
                per_rank_diff);
    std::printf("%s\n", ok ? "OK: SyncBatchNorm trains as one process on the global batch; per-rank BatchNorm does not"
                           : "FAILED: expected SyncBatchNorm within 1e-9 of the single process and per-rank BN > 1e-3 away");
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 1;
  try {
    status = run_example(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "example_data_parallel (rank %d): %s\n", mpi_rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
