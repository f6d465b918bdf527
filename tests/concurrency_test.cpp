// Independent layer instances used from different std::threads (CPU backend) give exactly the
// results of sequential runs: the library keeps no shared mutable state. (One instance must not
// be used from two threads at once; that is documented, not tested.)
#include <batchnorm/batchnorm.hpp>
#include <gtest/gtest.h>

#include <cstdint>
#include <thread>
#include <vector>

#include "support/reference.hpp"

namespace bn = batchnorm;

namespace {

/// Everything one worker produces: outputs, input gradients, state and gradients after each step.
template <class P, class T>
struct Trace {
  std::vector<std::vector<T>> y, dx;
  std::vector<bn::State<P>> states;
  std::vector<bn::Gradients<P>> grads;
  std::vector<std::int64_t> skipped;
};

template <class T, int D>
bn::Shape shape_for(int worker) {
  const auto layout = worker % 2 ? bn::Layout::channels_last : bn::Layout::contiguous;
  if constexpr (D == 1) return bn::Shape({16 + worker, 12, 9}, layout);
  else if constexpr (D == 2) return bn::Shape({4 + worker, 12, 7, 9}, layout);
  else return bn::Shape({2 + worker, 12, 3, 5, 7}, layout);
}

/// One worker's whole life: a layer of its own (options vary by worker), several training
/// steps with backward, then eval. Deterministic in @p worker.
template <class T, int D>
Trace<bn::param_t<T>, T> work(int worker) {
  const bn::Shape s = shape_for<T, D>(worker);
  bn::Options o;
  o.momentum = worker % 3 == 0 ? std::optional<double>() : std::optional<double>(0.1 * (worker % 5));
  o.mode = worker % 4 == 3 ? bn::Mode::per_activation : bn::Mode::per_channel;
  o.accumulate_gradients = worker % 2 == 0;
  o.skip_nonfinite_updates = true;
  const auto F = bnref::features(s, o.mode);
  bn::BatchNorm<T, D, bn::cpu> layer(F, o);
  Trace<bn::param_t<T>, T> t;
  for (int step = 0; step < 6; ++step) {
    layer.train(step < 5);
    auto x = bnref::cast<T>(bnref::normal(s.numel(), 1000 * worker + step, step - 2.0, 1.0 + worker));
    if (step == 3 && worker % 2) x[5] = T(NAN);  // some workers count a skipped update
    const auto dy = bnref::cast<T>(bnref::normal(s.numel(), 5000 * worker + step));
    std::vector<T> y(x.size()), dx(x.size());
    if (step % 2)
      layer.forward(x.data(), y.data(), s);
    else
      layer.forward_relu(x.data(), nullptr, y.data(), s);
    if (step % 2)
      layer.backward(x.data(), dy.data(), dx.data(), s);
    else
      layer.backward_relu(x.data(), y.data(), dy.data(), dx.data(), nullptr, s);
    t.y.push_back(std::move(y));
    t.dx.push_back(std::move(dx));
    t.states.push_back(layer.state());
    t.grads.push_back(layer.gradients());
    t.skipped.push_back(layer.nonfinite_batches_skipped());
  }
  return t;
}

/// NaN-aware bitwise equality of two vectors.
template <class E>
bool same(const std::vector<E>& a, const std::vector<E>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i] || (a[i] != a[i] && b[i] != b[i]))) return false;
  return true;
}

template <class P, class T>
void expect_same(const Trace<P, T>& a, const Trace<P, T>& b, int worker) {
  ASSERT_EQ(a.y.size(), b.y.size());
  for (std::size_t k = 0; k < a.y.size(); ++k) {
    EXPECT_TRUE(same(a.y[k], b.y[k])) << "worker " << worker << " step " << k << " y";
    EXPECT_TRUE(same(a.dx[k], b.dx[k])) << "worker " << worker << " step " << k << " dx";
    EXPECT_TRUE(same(a.states[k].running_mean, b.states[k].running_mean)) << "worker " << worker << " step " << k;
    EXPECT_TRUE(same(a.states[k].running_var, b.states[k].running_var)) << "worker " << worker << " step " << k;
    EXPECT_EQ(a.states[k].num_batches_tracked, b.states[k].num_batches_tracked);
    EXPECT_TRUE(same(a.grads[k].grad_weight, b.grads[k].grad_weight)) << "worker " << worker << " step " << k;
    EXPECT_TRUE(same(a.grads[k].grad_bias, b.grads[k].grad_bias)) << "worker " << worker << " step " << k;
    EXPECT_EQ(a.skipped[k], b.skipped[k]);
  }
}

template <class T, int D>
void check_threads(int workers, int rounds) {
  using Tr = Trace<bn::param_t<T>, T>;
  std::vector<Tr> sequential;
  for (int w = 0; w < workers; ++w) sequential.push_back(work<T, D>(w));
  // The traces differ between workers (so a mix-up between threads would show).
  for (int w = 1; w < workers; ++w) EXPECT_FALSE(same(sequential[0].y[0], sequential[w].y[0]));
  EXPECT_GT(sequential[1].skipped.back(), 0);  // the NaN batch of an odd worker was counted
  for (int round = 0; round < rounds; ++round) {
    std::vector<Tr> parallel(static_cast<std::size_t>(workers));
    std::vector<std::thread> threads;
    for (int w = 0; w < workers; ++w) threads.emplace_back([&parallel, w] { parallel[w] = work<T, D>(w); });
    for (auto& t : threads) t.join();
    for (int w = 0; w < workers; ++w) expect_same(parallel[w], sequential[w], w);
  }
}

TEST(Concurrency, BatchNorm1dFloatThreadsEqualSequential) { check_threads<float, 1>(8, 2); }
TEST(Concurrency, BatchNorm2dFloatThreadsEqualSequential) { check_threads<float, 2>(8, 2); }
TEST(Concurrency, BatchNorm3dDoubleThreadsEqualSequential) { check_threads<double, 3>(6, 2); }

// Mixed element types and classes at once.
TEST(Concurrency, MixedLayersAtOnce) {
  const auto a_seq = work<float, 2>(1);
  const auto b_seq = work<double, 1>(2);
  const auto c_seq = work<float, 3>(3);
  Trace<float, float> a;
  Trace<double, double> b;
  Trace<float, float> c;
  std::thread ta([&] { a = work<float, 2>(1); }), tb([&] { b = work<double, 1>(2); }), tc([&] { c = work<float, 3>(3); });
  ta.join();
  tb.join();
  tc.join();
  expect_same(a, a_seq, 1);
  expect_same(b, b_seq, 2);
  expect_same(c, c_seq, 3);
}

// The stateless functional API from many threads, sharing read-only parameters.
TEST(Concurrency, FunctionalApiSharedReadOnlyParameters) {
  const bn::Shape s({6, 16, 8, 8}, bn::Layout::channels_last);
  const std::vector<float> weight = bnref::cast<float>(bnref::normal(16, 1, 1.0, 0.3));
  const std::vector<float> bias = bnref::cast<float>(bnref::normal(16, 2));
  const std::vector<float> x = bnref::cast<float>(bnref::normal(s.numel(), 3, 0.5, 2.0));
  auto run = [&](int seed) {
    std::vector<float> y(x.size()), rm(16, 0.f), rv(16, 1.f);
    bn::ForwardArgs<float> a;
    a.x = x.data();
    a.y = y.data();
    a.weight = bn::span<const float>(weight.data(), 16);
    a.bias = bn::span<const float>(bias.data(), 16);
    a.running_mean = rm;
    a.running_var = rv;
    bn::ForwardConfig c;
    c.exponential_average_factor = 0.05 * (seed % 7);
    bn::forward(bn::cpu{}, s, a, c);
    y.insert(y.end(), rm.begin(), rm.end());
    y.insert(y.end(), rv.begin(), rv.end());
    return y;
  };
  constexpr int n = 8;
  std::vector<std::vector<float>> seq, par(n);
  for (int i = 0; i < n; ++i) seq.push_back(run(i));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { par[i] = run(i); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < n; ++i) EXPECT_EQ(par[i], seq[i]) << i;
}

// A layer moved into a thread keeps its state and goes on where it was.
TEST(Concurrency, LayerMovedIntoThread) {
  const bn::Shape s{8, 4, 5};
  const auto x = bnref::cast<float>(bnref::normal(s.numel(), 1));
  bn::BatchNorm1d<float, bn::cpu> ref(4), moved(4);
  std::vector<float> y(x.size()), y2(x.size());
  ref.forward(x.data(), y.data(), s);
  moved.forward(x.data(), y.data(), s);
  std::thread t([&, layer = std::move(moved)]() mutable { layer.forward(x.data(), y2.data(), s); });
  t.join();
  std::vector<float> y1(x.size());
  ref.forward(x.data(), y1.data(), s);
  EXPECT_EQ(y1, y2);
}

}  // namespace
