// GPU equals CPU for the features of issue 4: half / bfloat16 storage, channels-last layouts,
// the fused relu / residual epilogues, the functional CUDA API with its workspace, and shapes
// large enough that every reduction is split over many blocks. The CPU backend
// (`batchnorm::cpu`, double accumulation, checked against PyTorch and finite differences in
// the CPU tests) is the oracle; every GPU call runs on its own non-blocking stream.
//
// Tolerances (GPU vs CPU, per element; `scale` = the largest finite |cpu| of the tensor,
// u_T = 2^-p the relative spacing bound of the storage type: half 2^-10, bfloat16 2^-7,
// float 2^-23; s_T its subnormal spacing):
//
//  - y, dx (storage T):  |gpu − cpu| <= 1.01·u_T·|cpu| + 2^-16·scale + s_T
//    (for dx, scale also covers the size of the terms dx is the difference of,
//    max|dy|·max(invstd·|w|): with two values per feature dx cancels to ~0)
//    The CPU rounds the exact result r (double) once to T. The GPU computes f in float
//    (param_t<T>) with |f − r| <= δ, then rounds f to T. So |round(f) − round(r)| <= ulp/2 +
//    δ + ulp/2, and the ulp of T at |r| is at most u_T·|r|: one ulp of the storage type,
//    relative to the element, plus the float noise δ. δ comes from the float statistics
//    (Welford over x·prescale − pivot, Chan merges: the largest case here chains ~55 float
//    roundings, 55·2^-24 ≈ 2^-18 relative to the feature's spread) and from the float
//    arithmetic of ((x·prescale − pivot) − mean)·scale + bias, whose terms are bounded by the
//    output's scale, not by the element (bias and the normalized term may cancel): 2^-16·scale
//    covers it with a margin of 4 over the worst case. For float storage the ulp term is negligible and this
//    is a plain float-accumulation bound.
//  - dz (the masked dy of the fused backward) and every "bitwise" check: bit for bit.
//  - save_mean, running_mean (float): |gpu − cpu| <= 2^-16·(|cpu| + spread), spread = the
//    largest per-feature standard deviation seen (1 / CPU save_invstd): the GPU's mean is
//    (pivot + mean of x·prescale − pivot) / prescale, accurate to float noise of the spread,
//    plus one rounding.
//  - save_invstd, running_var (float): 2^-16·|cpu| (sums of positive terms: relative).
//  - grad_weight, grad_bias (float): 2^-16·|cpu| + 64·eps_f·L1 + |Δmean|·invstd·Σ|dy|, with L1
//    the per-feature sum of |terms| (Σ|dy·x̂|, Σ|dy|, dy masked by the relu) and eps_f = 2^-23:
//    a float sum of n terms chained k deep is off by at most k·2^-24·L1 (k <= 55 here), plus
//    the invstd the GPU saved differing from the CPU's by float rounding. Δmean is the measured
//    difference of the saved means: in eval each backend differentiates around its own running
//    mean (training corrects the saved mean's error through Σ(x − mean), eval does not), and
//    where x ≈ running_mean that difference is not small relative to Σ|dy·x̂|.
//
// Layout: eval outputs (and eval dx, dz, saved statistics) of NCHW and NHWC are compared bit for
// bit on the GPU, as PyTorch's test_batchnorm_nhwc_cuda requires; training within the bounds
// above (the reductions run in another order).
//
// NaN: y = relu(bn(x) + z) is NaN where z is NaN (relu(NaN) = NaN, as torch.relu), and a
// training NaN in x makes its whole channel NaN; the fused backward masks with PyTorch's
// threshold_backward (y <= 0 ? 0 : dy), which passes dy where y is NaN; eval backward
// (dx = dy·invstd·w) never reads x, so a NaN input element gets a finite dx.
//
// Half overflow (PyTorch #115500): half inputs near 65504 overflow half sums and squares but
// not float statistics, so statistics, running stats and outputs are finite on the GPU, like
// on the CPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <batchnorm/cuda.cuh>
#include <batchnorm/half.hpp>

#include "support/common.hpp"
#include "support/device_memory.cuh"
#include "support/reference.hpp"

namespace bn = batchnorm;

namespace {

using bn_test::device_array;
using bn_test::gpu_available;

// ---- storage types -------------------------------------------------------------------------

template <class T>
struct storage;
template <>
struct storage<float> {
  static constexpr int digits = 23;
  static double subnormal_spacing() { return std::ldexp(1.0, -149); }
  static const char* name() { return "float"; }
};
template <>
struct storage<__half> {
  static constexpr int digits = 10;
  static double subnormal_spacing() { return std::ldexp(1.0, -24); }
  static const char* name() { return "half"; }
};
template <>
struct storage<__nv_bfloat16> {
  static constexpr int digits = 7;
  static double subnormal_spacing() { return std::ldexp(1.0, -133); }
  static const char* name() { return "bfloat16"; }
};

struct StorageNames {
  template <class T>
  static std::string GetName(int) {
    return storage<T>::name();
  }
};

/// Float noise allowed relative to a tensor's scale (see the file comment).
constexpr double kNoise = 1.0 / 65536.0;  // 2^-16
constexpr double kEpsF = 1.0 / 8388608.0;  // 2^-23, FLT_EPSILON

template <class T>
double dbl(T v) {
  return bn::to_double(v);
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = dbl(v[i]);
  return out;
}

// ---- comparisons ---------------------------------------------------------------------------

/// |gpu − cpu| <= rel·|cpu| + scale_rel·scale + abs, scale = max finite |cpu|.
struct Tol {
  double rel = 0.0, scale_rel = 0.0, abs = 0.0;
};

template <class T>
Tol output_tol() {
  return {1.01 * std::ldexp(1.0, -storage<T>::digits), kNoise, storage<T>::subnormal_spacing()};
}

template <class V>
double max_finite_abs(const std::vector<V>& v) {
  double m = 0.0;
  for (const V& e : v) {
    const double d = dbl(e);
    if (std::isfinite(d)) m = std::max(m, std::fabs(d));
  }
  return m;
}

/// BATCHNORM_MIXED_REPORT=1 prints the worst |diff|/bound of every comparison (to see the margins).
bool report() {
  static const bool on = [] {
    const char* v = std::getenv("BATCHNORM_MIXED_REPORT");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  return on;
}

/// Element i passes when both are NaN, both the same infinity, or |gpu − cpu| <= bound(i, cpu).
template <class G, class C, class Bound>
::testing::AssertionResult within(const std::vector<G>& gpu, const std::vector<C>& cpu, Bound&& bound,
                                  const std::string& what) {
  if (gpu.size() != cpu.size())
    return ::testing::AssertionFailure() << what << ": gpu has " << gpu.size() << " elements, cpu " << cpu.size();
  std::size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  first.precision(10);
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double g = dbl(gpu[i]), c = dbl(cpu[i]);
    bool ok;
    double b = 0.0;
    if (std::isnan(g) || std::isnan(c)) {
      ok = std::isnan(g) && std::isnan(c);
    } else if (std::isinf(g) || std::isinf(c)) {
      ok = g == c;
    } else {
      b = bound(i, c);
      const double d = std::fabs(g - c);
      ok = d <= b;
      if (b > 0) worst = std::max(worst, d / b);
    }
    if (!ok) {
      if (bad < 5) first << "\n  [" << i << "] gpu " << g << ", cpu " << c << ", bound " << b;
      ++bad;
    }
  }
  if (report()) std::printf("  [report] %-70s worst |diff|/bound %.3g\n", what.c_str(), worst);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << gpu.size()
                                       << " elements out of bounds (worst finite |diff|/bound " << worst << ")"
                                       << first.str();
}

template <class G, class C>
::testing::AssertionResult all_close(const std::vector<G>& gpu, const std::vector<C>& cpu, const Tol& t,
                                     const std::string& what, double min_scale = 0.0) {
  const double scale = std::max(max_finite_abs(cpu), min_scale);
  return within(
      gpu, cpu, [&](std::size_t, double c) { return t.rel * std::fabs(c) + t.scale_rel * scale + t.abs; }, what);
}

template <class E>
::testing::AssertionResult same_bits(const std::vector<E>& a, const std::vector<E>& b, const std::string& what) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << what << ": sizes " << a.size() << " and " << b.size();
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(E)) != 0 && bad++ == 0) first = i;
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(10);
  os << what << ": " << bad << " of " << a.size() << " elements differ bitwise, first [" << first << "] "
     << dbl(a[first]) << " vs " << dbl(b[first]);
  return ::testing::AssertionFailure() << os.str();
}

/// Means (save_mean, running_mean): float noise of the spread plus a rounding of the value.
template <class P>
::testing::AssertionResult mean_close(const std::vector<P>& gpu, const std::vector<P>& cpu, double spread,
                                      const std::string& what) {
  return within(gpu, cpu, [&](std::size_t, double c) { return kNoise * (std::fabs(c) + spread) + 1e-30; }, what);
}

/// Positive statistics (save_invstd, running_var): relative.
template <class P>
::testing::AssertionResult positive_close(const std::vector<P>& gpu, const std::vector<P>& cpu,
                                          const std::string& what) {
  return within(gpu, cpu, [&](std::size_t, double c) { return kNoise * std::fabs(c) + 1e-30; }, what);
}

/// Reductions: 2^-16·|cpu| + 64·eps_f·L1 (+ extra) per feature.
template <class P>
::testing::AssertionResult sum_close(const std::vector<P>& gpu, const std::vector<P>& cpu,
                                     const std::vector<double>& l1, const std::string& what,
                                     const std::vector<double>& extra = {}) {
  return within(
      gpu, cpu,
      [&](std::size_t f, double c) {
        return kNoise * std::fabs(c) + 64.0 * kEpsF * l1[f] + (extra.empty() ? 0.0 : extra[f]) + 1e-30;
      },
      what);
}

/// The size of the terms dx sums: |dy|·invstd·|w|. In training dx is their difference and
/// can be far smaller (two values per feature: dx ≈ 0), so float noise scales with them.
template <class T, class P>
double dx_terms(const std::vector<T>& dy, const P* invstd, const std::vector<P>& weight, std::int64_t F) {
  double k = 0.0;
  for (std::int64_t f = 0; f < F; ++f) {
    const double w = weight.empty() ? 1.0 : std::fabs(double(weight[static_cast<std::size_t>(f)]));
    const double v = double(invstd[f]) * w;
    if (std::isfinite(v)) k = std::max(k, v);
  }
  return k * max_finite_abs(dy);
}

// ---- device helpers ------------------------------------------------------------------------

using bn_test::Stream;  // non-blocking: work put on the legacy default stream by mistake races

/// Waits for all device work. Also after every upload: cudaMemcpy from pageable memory may
/// return before its DMA has landed (CUDA's documented synchronization behaviour), and the
/// kernels here run on non-blocking streams, which do not wait for the legacy stream.
void settle() { BN_TEST_CUDA_CHECK(cudaDeviceSynchronize()); }

/// A device copy of @p v, complete when this returns.
template <class E>
device_array<E> to_device(const std::vector<E>& v) {
  device_array<E> a(v);
  settle();
  return a;
}

/// Waits for the whole device (every stream), then copies back.
template <class E>
std::vector<E> fetch(const device_array<E>& a) {
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  return a.download();
}

/// Waits for the whole device, then copies @p n values at device pointer @p p back.
template <class E>
std::vector<E> fetch(const E* p, std::int64_t n) {
  return bn_test::device_read(p, n);
}

// ---- data ------------------------------------------------------------------------------------

using bn_test::from_channels_last;
using bn_test::make_shape;
using bn_test::to_channels_last;

std::string describe(const bn::Shape& s, bn::Mode mode) {
  std::ostringstream os;
  os << s << (mode == bn::Mode::per_channel ? " per_channel" : " per_activation");
  return os.str();
}

/// Values in the memory order of @p s: channel c is offset[c] + scale[c]·N(0, 1), rounded to T.
template <class T>
std::vector<T> channel_data(const bn::Shape& s, std::mt19937_64& rng, const std::vector<double>& offset,
                            const std::vector<double>& scale) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<T> v(static_cast<std::size_t>(s.numel()));
  bnref::for_each(s, bn::Mode::per_channel, [&](std::int64_t i, std::int64_t c) {
    v[static_cast<std::size_t>(i)] = bn::from_double<T>(offset[static_cast<std::size_t>(c)] +
                                                        scale[static_cast<std::size_t>(c)] * d(rng));
  });
  return v;
}

template <class T>
std::vector<T> noise(std::size_t n, std::mt19937_64& rng, double sd = 1.0) {
  std::normal_distribution<double> d(0.0, sd);
  std::vector<T> v(n);
  for (auto& e : v) e = bn::from_double<T>(d(rng));
  return v;
}

/// Weights of both signs, biases, running stats: every feature different, so that a feature
/// mapped to the wrong parameter shows.
bn::State<float> random_state(std::int64_t F, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  std::uniform_real_distribution<double> u(0.5, 1.5);
  bn::State<float> s;
  for (std::int64_t f = 0; f < F; ++f) {
    s.weight.push_back(static_cast<float>(u(rng) * (f % 3 == 1 ? -1.0 : 1.0)));
    s.bias.push_back(static_cast<float>(0.5 * n(rng)));
    s.running_mean.push_back(static_cast<float>(0.5 * n(rng)));
    s.running_var.push_back(static_cast<float>(u(rng)));
  }
  s.num_batches_tracked = 3;
  return s;
}

/// PyTorch's relu backward mask (threshold_backward(dy, y, 0)): y <= 0 ? 0 : dy; NaN y passes dy.
template <class T>
std::vector<T> relu_masked(const std::vector<T>& dy, const std::vector<T>& y) {
  std::vector<T> g(dy.size());
  for (std::size_t i = 0; i < dy.size(); ++i) g[i] = dbl(y[i]) <= 0.0 ? bn::from_double<T>(0.0) : dy[i];
  return g;
}

// ---- one layer on both backends --------------------------------------------------------------

template <class T>
struct Both {
  std::vector<T> gpu, cpu;
};

/// The same layer on the CPU (the oracle) and on the GPU, driven by the same calls.
template <class T, int D>
struct Pair {
  using P = bn::param_t<T>;
  bn::BatchNorm<T, D, bn::cpu> cpu;
  bn::BatchNorm<T, D, bn::cuda> gpu;
  Stream stream;
  std::int64_t F;
  double spread = 0.0;  ///< largest per-feature std seen (CPU 1 / save_invstd)

  Pair(std::int64_t features, const bn::Options& o = {}) : cpu(features, o), gpu(features, o), F(features) {
    settle();  // the constructor fills the buffers with cudaMemcpy (see settle())
  }

  void train(bool t) {
    cpu.train(t);
    gpu.train(t);
  }
  void load_state(const bn::State<P>& s) {
    cpu.load_state(s);
    gpu.load_state(s);
    settle();  // load_state's cudaMemcpy may return before its DMA lands (see settle())
  }

  /// forward (relu: forward_relu with @p z, which may be empty for relu(bn(x))).
  Both<T> forward(const std::vector<T>& x, const bn::Shape& s, bool relu = false, const std::vector<T>& z = {}) {
    Both<T> r;
    r.cpu.resize(x.size());
    const bool has_z = !z.empty();
    if (relu)
      cpu.forward_relu(x.data(), has_z ? z.data() : nullptr, r.cpu.data(), s);
    else
      cpu.forward(x.data(), r.cpu.data(), s);
    device_array<T> xd(x), zd(z), yd(x.size());
    settle();
    if (relu)
      gpu.forward_relu(xd.data(), has_z ? zd.data() : nullptr, yd.data(), s, stream.get());
    else
      gpu.forward(xd.data(), yd.data(), s, stream.get());
    stream.sync();
    r.gpu = yd.download();
    for (std::int64_t f = 0; f < F; ++f) {
      const double sd = 1.0 / static_cast<double>(cpu.save_invstd_data()[f]);
      if (std::isfinite(sd)) spread = std::max(spread, sd);
    }
    return r;
  }

  struct Grads {
    Both<T> dx, dz;
  };
  /// backward (relu: backward_relu with the mask of @p y, the same y on both backends, and dz).
  Grads backward(const std::vector<T>& x, const std::vector<T>& dy, const bn::Shape& s, bool relu = false,
                 const std::vector<T>& y = {}) {
    Grads g;
    g.dx.cpu.resize(x.size());
    if (relu) {
      g.dz.cpu.resize(x.size());
      cpu.backward_relu(x.data(), y.data(), dy.data(), g.dx.cpu.data(), g.dz.cpu.data(), s);
    } else {
      cpu.backward(x.data(), dy.data(), g.dx.cpu.data(), s);
    }
    device_array<T> xd(x), dyd(dy), yd(relu ? y : std::vector<T>{}), dxd(x.size()), dzd(relu ? x.size() : 0);
    settle();
    if (relu)
      gpu.backward_relu(xd.data(), yd.data(), dyd.data(), dxd.data(), dzd.data(), s, stream.get());
    else
      gpu.backward(xd.data(), dyd.data(), dxd.data(), s, stream.get());
    stream.sync();
    g.dx.gpu = dxd.download();
    if (relu) g.dz.gpu = dzd.download();
    return g;
  }

  void expect_state(const std::string& what) {
    const auto g = gpu.state(), c = cpu.state();
    EXPECT_EQ(g.num_batches_tracked, c.num_batches_tracked) << what;
    EXPECT_TRUE(same_bits(g.weight, c.weight, what + "weight (never written by forward)"));
    EXPECT_TRUE(same_bits(g.bias, c.bias, what + "bias (never written by forward)"));
    EXPECT_TRUE(mean_close(g.running_mean, c.running_mean, spread, what + "running_mean"));
    EXPECT_TRUE(positive_close(g.running_var, c.running_var, what + "running_var"));
    const std::vector<P> cm(cpu.save_mean_data(), cpu.save_mean_data() + F);
    const std::vector<P> ci(cpu.save_invstd_data(), cpu.save_invstd_data() + F);
    EXPECT_TRUE(mean_close(fetch(gpu.save_mean_data(), F), cm, spread, what + "save_mean"));
    EXPECT_TRUE(positive_close(fetch(gpu.save_invstd_data(), F), ci, what + "save_invstd"));
  }

  /// @p g: the gradient that reached the normalization (dy, relu-masked for the fused backward).
  void expect_gradients(const std::vector<T>& x, const std::vector<T>& g, const bn::Shape& s,
                        const std::string& what) {
    const auto gg = gpu.gradients(), gc = cpu.gradients();
    ASSERT_EQ(gg.grad_weight.size(), gc.grad_weight.size()) << what;
    if (gc.grad_weight.empty()) return;
    std::vector<double> l1w(static_cast<std::size_t>(F), 0.0), l1b(static_cast<std::size_t>(F), 0.0);
    const P* m = cpu.save_mean_data();
    const P* inv = cpu.save_invstd_data();
    bnref::for_each(s, cpu.options().mode, [&](std::int64_t i, std::int64_t f) {
      const double d = dbl(g[static_cast<std::size_t>(i)]);
      l1b[static_cast<std::size_t>(f)] += std::fabs(d);
      l1w[static_cast<std::size_t>(f)] +=
          std::fabs(d * (dbl(x[static_cast<std::size_t>(i)]) - double(m[f])) * double(inv[f]));
    });
    const auto gm = fetch(gpu.save_mean_data(), F);
    std::vector<double> shift(static_cast<std::size_t>(F));
    for (std::int64_t f = 0; f < F; ++f) {
      const auto k = static_cast<std::size_t>(f);
      shift[k] = std::fabs(double(gm[k]) - double(m[f])) * std::fabs(double(inv[f])) * l1b[k];
    }
    EXPECT_TRUE(sum_close(gg.grad_weight, gc.grad_weight, l1w, what + "grad_weight", shift));
    EXPECT_TRUE(sum_close(gg.grad_bias, gc.grad_bias, l1b, what + "grad_bias"));
  }

  /// Term scale of dx (see dx_terms) from the CPU's saved invstd and weights.
  double dx_scale(const std::vector<T>& dy) { return dx_terms(dy, cpu.save_invstd_data(), cpu.state().weight, F); }
};

// ---- train steps then eval, forward and backward, GPU vs CPU ---------------------------------

struct Spec {
  bn::Shape shape;
  bn::Mode mode = bn::Mode::per_channel;
  bool fused = false;     ///< forward_relu / backward_relu
  bool residual = true;   ///< with fused: y = relu(bn(x) + z); else y = relu(bn(x))
  std::vector<bool> steps = {true, true, true, false};  ///< training flag per step
  std::optional<double> momentum = 0.1;
  double offset = 3.0;  ///< channel means ~ offset·N(0, 1)
  double spread = 1.0;  ///< channel stds ~ spread·U(0.5, 1.5)
  std::uint64_t seed = 1;
};

std::string describe(const Spec& k) {
  std::ostringstream os;
  os << describe(k.shape, k.mode) << (k.fused ? (k.residual ? " relu(bn(x) + z)" : " relu(bn(x))") : "")
     << (k.momentum ? "" : " cumulative") << " offset " << k.offset << " spread " << k.spread;
  return os.str();
}

template <class T, int D>
void gpu_vs_cpu(const Spec& k) {
  SCOPED_TRACE(describe(k) + " " + storage<T>::name());
  const std::int64_t F = bn::feature_count(k.shape, k.mode);
  const std::int64_t C = k.shape.channels();
  const auto numel = static_cast<std::size_t>(k.shape.numel());
  bn::Options o;
  o.mode = k.mode;
  o.momentum = k.momentum;
  Pair<T, D> p(F, o);
  p.load_state(random_state(F, k.seed));
  std::mt19937_64 rng(k.seed * 7919 + 1);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.5, 1.5);
  for (std::size_t step = 0; step < k.steps.size(); ++step) {
    const bool training = k.steps[step];
    const std::string w = "step " + std::to_string(step) + (training ? " (train) " : " (eval) ");
    std::vector<double> offset(static_cast<std::size_t>(C)), scale(static_cast<std::size_t>(C));
    for (std::int64_t c = 0; c < C; ++c) {
      offset[static_cast<std::size_t>(c)] = k.offset * normal(rng);
      scale[static_cast<std::size_t>(c)] = k.spread * uniform(rng);
    }
    const auto x = channel_data<T>(k.shape, rng, offset, scale);
    const auto z = k.fused && k.residual ? noise<T>(numel, rng) : std::vector<T>{};
    const auto dy = noise<T>(numel, rng);
    p.train(training);
    const auto y = p.forward(x, k.shape, k.fused, z);
    EXPECT_TRUE(all_close(y.gpu, y.cpu, output_tol<T>(), w + "y"));
    p.expect_state(w);
    // The fused backward gets the CPU's y on both backends, so that both take the same mask.
    const auto g = p.backward(x, dy, k.shape, k.fused, y.cpu);
    EXPECT_TRUE(all_close(g.dx.gpu, g.dx.cpu, output_tol<T>(), w + "dx", p.dx_scale(dy)));
    if (k.fused) EXPECT_TRUE(same_bits(g.dz.gpu, g.dz.cpu, w + "dz"));
    p.expect_gradients(x, k.fused ? relu_masked(dy, y.cpu) : dy, k.shape, w);
  }
}

template <class T>
void gpu_vs_cpu_dims(const Spec& k) {
  switch (k.shape.rank()) {
    case 2:
    case 3: gpu_vs_cpu<T, 1>(k); break;
    case 4: gpu_vs_cpu<T, 2>(k); break;
    default: gpu_vs_cpu<T, 3>(k); break;
  }
}

/// Every mode, and with and without the fused epilogues, for one shape.
template <class T>
void all_variants(const bn::Shape& s, std::uint64_t seed) {
  for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
    for (const int epilogue : {0, 1, 2}) {
      Spec k{s};
      k.mode = mode;
      k.fused = epilogue > 0;
      k.residual = epilogue == 2;
      k.seed = seed++;
      gpu_vs_cpu_dims<T>(k);
    }
}

// =============================================================================================
// 1. Half and bfloat16 storage
// =============================================================================================

template <class T>
class GpuMixedPrecision : public ::testing::Test {};
using HalfTypes = ::testing::Types<__half, __nv_bfloat16>;
TYPED_TEST_SUITE(GpuMixedPrecision, HalfTypes, StorageNames);

TYPED_TEST(GpuMixedPrecision, BatchNorm1dTrainThenEval) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  all_variants<T>(bn::Shape{32, 5}, 10);
  all_variants<T>(bn::Shape{6, 4, 9}, 20);
  all_variants<T>(bn::Shape({6, 4, 9}, bn::Layout::channels_last), 30);
}

TYPED_TEST(GpuMixedPrecision, BatchNorm2dTrainThenEval) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  all_variants<T>(bn::Shape{4, 3, 5, 6}, 40);
  all_variants<T>(bn::Shape({4, 3, 5, 6}, bn::Layout::channels_last), 50);
  // Reductions split over blocks (16384 values per channel; 40 channels: two column tiles).
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    Spec k{bn::Shape({64, 3, 16, 16}, layout)};
    k.seed = 60;
    gpu_vs_cpu<T, 2>(k);
    Spec m{bn::Shape({16, 40, 8, 8}, layout)};
    m.fused = true;
    m.seed = 61;
    gpu_vs_cpu<T, 2>(m);
  }
}

TYPED_TEST(GpuMixedPrecision, BatchNorm3dTrainThenEval) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  all_variants<T>(bn::Shape{2, 3, 2, 3, 4}, 70);
  all_variants<T>(bn::Shape({2, 3, 2, 3, 4}, bn::Layout::channels_last), 80);
}

TYPED_TEST(GpuMixedPrecision, CumulativeAverageAndOffsetData) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  // Offset much larger than the spread (inputs quantized by the storage type, both backends
  // see the same values), and a wide spread; momentum None (factor 1 / num_batches_tracked).
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    for (const double offset : {100.0, 0.0}) {
      Spec k{bn::Shape({8, 4, 5, 3}, layout)};
      k.momentum = std::nullopt;
      k.offset = offset;
      k.spread = offset > 0 ? 0.5 : 20.0;
      k.steps = {true, true, true, true, false};
      k.seed = 90 + static_cast<std::uint64_t>(offset);
      gpu_vs_cpu<T, 2>(k);
    }
  }
}

// ---- half overflow ---------------------------------------------------------------------------

/// One training step (forward + backward) and then one eval step of a BatchNorm2d<T> on both
/// backends; everything the GPU returns must be finite and equal the CPU's.
template <class T>
struct OverflowRun {
  std::vector<T> y_train, y_eval;  ///< GPU outputs
  std::vector<float> save_mean, save_invstd;
  bn::State<float> state;
};

template <class T>
OverflowRun<T> overflow_run(const std::vector<T>& x, const bn::Shape& s, const std::vector<T>& x_eval,
                            int train_steps = 1, const std::vector<float>& bias = {}) {
  const std::int64_t C = s.channels();
  Pair<T, 2> p(C);
  if (!bias.empty()) {
    auto st = p.gpu.state();
    st.bias = bias;
    p.load_state(st);
  }
  std::mt19937_64 rng(5);
  const auto dy = noise<T>(x.size(), rng);
  OverflowRun<T> r;
  for (int k = 0; k < train_steps; ++k) {
    const auto y = p.forward(x, s);
    EXPECT_TRUE(all_close(y.gpu, y.cpu, output_tol<T>(), "train y"));
    r.y_train = y.gpu;
  }
  p.expect_state("train ");
  r.save_mean = fetch(p.gpu.save_mean_data(), C);
  r.save_invstd = fetch(p.gpu.save_invstd_data(), C);
  r.state = p.gpu.state();
  const auto g = p.backward(x, dy, s);
  EXPECT_TRUE(all_close(g.dx.gpu, g.dx.cpu, output_tol<T>(), "train dx", p.dx_scale(dy)));
  p.expect_gradients(x, dy, s, "train ");
  p.train(false);
  const auto ye = p.forward(x_eval, s);
  EXPECT_TRUE(all_close(ye.gpu, ye.cpu, output_tol<T>(), "eval y"));
  r.y_eval = ye.gpu;
  for (const T v : g.dx.gpu) EXPECT_TRUE(std::isfinite(dbl(v)));
  return r;
}

template <class T>
void expect_finite(const OverflowRun<T>& r) {
  for (const T v : r.y_train) ASSERT_TRUE(std::isfinite(dbl(v))) << "train y";
  for (const T v : r.y_eval) ASSERT_TRUE(std::isfinite(dbl(v))) << "eval y";
  for (const auto* v : {&r.save_mean, &r.save_invstd, &r.state.running_mean, &r.state.running_var})
    for (const float e : *v) ASSERT_TRUE(std::isfinite(e)) << e;
}

TEST(GpuHalfOverflow, ValuesNear65504GiveFiniteStatistics) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // All inputs in [60000, 65504]: Σx, x² and Σ(x − mean)² overflow half, not float.
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({8, 2, 16, 16}, layout);
    std::mt19937 rng(1);
    std::uniform_real_distribution<double> u(60000.0, 65504.0);
    std::vector<__half> x(static_cast<std::size_t>(s.numel()));
    for (auto& v : x) v = bn::from_double<__half>(u(rng));
    const auto r = overflow_run(x, s, x);
    expect_finite(r);
    for (const float m : r.save_mean) EXPECT_NEAR(m, 62752.0, 200.0);
    for (const float v : r.state.running_var) EXPECT_GT(v, 1e5f);  // 0.9 + 0.1 · ~2.5e6
    for (const __half v : r.y_train) EXPECT_LE(std::fabs(dbl(v)), 1.8);  // uniform: |x̂| <= sqrt(3)
  }
}

TEST(GpuHalfOverflow, AlternatingPlusMinus65504) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // mean 0, biased variance 65504² ≈ 4.29e9 (inf in half): y = ±1, running_var = 0.9 + 0.1·65504²·n/(n − 1).
  const bn::Shape s{4, 3, 4, 4};
  std::vector<__half> x(static_cast<std::size_t>(s.numel()));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = bn::from_double<__half>(i % 2 ? 65504.0 : -65504.0);
  const auto r = overflow_run(x, s, x);
  expect_finite(r);
  const double n = 4 * 16;
  for (std::size_t c = 0; c < 3; ++c) {
    EXPECT_NEAR(r.save_mean[c], 0.0, kNoise * 65504.0);
    EXPECT_NEAR(r.state.running_var[c], 0.9 + 0.1 * 65504.0 * 65504.0 * n / (n - 1), kNoise * 4.3e8);
  }
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(dbl(r.y_train[i]), i % 2 ? 1.0 : -1.0, 2e-3) << i;
}

TEST(GpuHalfOverflow, ConstantMaxValueGivesBiasExactly) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // Zero variance at the top of the range: x − mean = 0, so y = bias exactly, no NaN.
  const bn::Shape s{4, 2, 3, 3};
  const std::vector<__half> x(static_cast<std::size_t>(s.numel()), bn::from_double<__half>(65504.0));
  const auto r = overflow_run(x, s, x, 1, {0.5f, -0.25f});
  expect_finite(r);
  for (std::size_t i = 0; i < r.y_train.size(); ++i) EXPECT_EQ(dbl(r.y_train[i]), (i / 9) % 2 ? -0.25 : 0.5) << i;
  EXPECT_FLOAT_EQ(r.state.running_mean[0], 0.1f * 65504.0f);
  EXPECT_FLOAT_EQ(r.state.running_var[0], 0.9f);
  EXPECT_EQ(r.save_mean[0], 65504.0f);
}

TEST(GpuHalfOverflow, EvalWithHugeRunningVarianceIsFinite) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // Running stats accumulated from ten near-max batches, then eval on ordinary data.
  const bn::Shape s{4, 3, 4, 4};
  std::vector<__half> big(static_cast<std::size_t>(s.numel())), small(big.size());
  for (std::size_t i = 0; i < big.size(); ++i) {
    big[i] = bn::from_double<__half>(i % 2 ? 65504.0 : -65504.0);
    small[i] = bn::from_double<__half>(static_cast<double>(i % 7) - 3.0);
  }
  expect_finite(overflow_run(big, s, small, 10));
}

TEST(GpuHalfOverflow, Bfloat16LargeMagnitudes) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // Alternating ±m in bfloat16: mean 0, y = ±1. At m = 1e17 everything is within float
  // (variance 1e34, M2 = n·1e34), forward and backward. At m = 3e38, near bfloat16's maximum,
  // x − pivot and the variance exceed float, the GPU's accumulation type: the prescaled pivot
  // (a power of two, see make_pivot) keeps y, the mean and invstd finite, and running_var is
  // +inf on both backends (9e76 is beyond float, PyTorch's float running_var too). Forward only
  // there: the backward sums Σ dy·(x − mean) ~ 1e39 are beyond float on the GPU.
  const bn::Shape s{4, 2, 4, 4};
  for (const double m : {1e17, 3e38}) {
    SCOPED_TRACE(m);
    std::vector<__nv_bfloat16> x(static_cast<std::size_t>(s.numel()));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = bn::from_double<__nv_bfloat16>(i % 2 ? m : -m);
    if (m < 1e30) {
      const auto r = overflow_run(x, s, x);
      expect_finite(r);
      for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(dbl(r.y_train[i]), i % 2 ? 1.0 : -1.0, 1e-2) << i;
      continue;
    }
    Pair<__nv_bfloat16, 2> p(2);
    const auto y = p.forward(x, s);
    EXPECT_TRUE(all_close(y.gpu, y.cpu, output_tol<__nv_bfloat16>(), "y"));
    for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(dbl(y.gpu[i]), i % 2 ? 1.0 : -1.0, 1e-2) << i;
    p.expect_state("3e38 ");
    const auto st = p.gpu.state();
    for (const float v : st.running_mean) EXPECT_TRUE(std::isfinite(v));
    for (const float v : st.running_var) EXPECT_TRUE(std::isinf(v) && v > 0);
    for (const float v : fetch(p.gpu.save_mean_data(), 2)) EXPECT_TRUE(std::isfinite(v));
    for (const float v : fetch(p.gpu.save_invstd_data(), 2)) EXPECT_TRUE(std::isfinite(v) && v > 0);
  }
}

// =============================================================================================
// 2. Channels-last on the GPU
// =============================================================================================

/// NCHW and NHWC layers (GPU and CPU each) with the same state and the same logical data:
/// eval bitwise equal on the GPU, training within tolerance, and each equal to its CPU layer.
template <class T, int D>
void layouts_agree(const std::vector<std::int64_t>& extents, bn::Mode mode, bool fused, std::uint64_t seed) {
  const bn::Shape nchw = make_shape(extents, bn::Layout::contiguous);
  const bn::Shape nhwc = make_shape(extents, bn::Layout::channels_last);
  SCOPED_TRACE(describe(nhwc, mode) + (fused ? " relu(bn(x) + z)" : "") + " " + storage<T>::name());
  const std::int64_t F = bn::feature_count(nchw, mode), C = nchw.channels();
  const auto numel = static_cast<std::size_t>(nchw.numel());
  bn::Options o;
  o.mode = mode;
  Pair<T, D> a(F, o), b(F, o);  // a: contiguous, b: channels_last
  const auto st = random_state(F, seed);
  a.load_state(st);
  b.load_state(st);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  bool synced = false;
  for (const bool training : {true, true, false, false}) {
    const std::string w = training ? "train " : "eval ";
    if (!training && !synced) {
      // Training left running stats that differ in the last bits between the layouts (other
      // reduction order); eval is compared bit for bit from identical running stats.
      const auto common = a.gpu.state();
      a.load_state(common);
      b.load_state(common);
      synced = true;
    }
    std::vector<double> offset(static_cast<std::size_t>(C)), scale(static_cast<std::size_t>(C));
    for (std::int64_t c = 0; c < C; ++c) {
      offset[static_cast<std::size_t>(c)] = 2.0 * normal(rng);
      scale[static_cast<std::size_t>(c)] = 1.0 + 0.25 * normal(rng) * normal(rng);
    }
    const auto x = channel_data<T>(nchw, rng, offset, scale);
    const auto z = fused ? noise<T>(numel, rng) : std::vector<T>{};
    const auto dy = noise<T>(numel, rng);
    const auto xl = to_channels_last(x, nchw), zl = to_channels_last(z, nchw), dyl = to_channels_last(dy, nchw);
    a.train(training);
    b.train(training);
    const auto ya = a.forward(x, nchw, fused, z);
    const auto yb = b.forward(xl, nhwc, fused, zl);
    const auto yb_gpu = from_channels_last(yb.gpu, nchw);
    EXPECT_TRUE(all_close(ya.gpu, ya.cpu, output_tol<T>(), w + "NCHW y vs cpu"));
    EXPECT_TRUE(all_close(yb.gpu, yb.cpu, output_tol<T>(), w + "NHWC y vs cpu"));
    a.expect_state(w + "NCHW ");
    b.expect_state(w + "NHWC ");
    const std::vector<float> a_mean = fetch(a.gpu.save_mean_data(), F), b_mean = fetch(b.gpu.save_mean_data(), F);
    const std::vector<float> a_inv = fetch(a.gpu.save_invstd_data(), F), b_inv = fetch(b.gpu.save_invstd_data(), F);
    // Same mask on every layer: the contiguous CPU output.
    const auto& mask = ya.cpu;
    const auto ga = a.backward(x, dy, nchw, fused, mask);
    const auto gb = b.backward(xl, dyl, nhwc, fused, to_channels_last(mask, nchw));
    const auto dxb_gpu = from_channels_last(gb.dx.gpu, nchw);
    const double dx_scale = a.dx_scale(dy);
    EXPECT_TRUE(all_close(gb.dx.gpu, gb.dx.cpu, output_tol<T>(), w + "NHWC dx vs cpu", dx_scale));
    EXPECT_TRUE(all_close(ga.dx.gpu, ga.dx.cpu, output_tol<T>(), w + "NCHW dx vs cpu", dx_scale));
    const auto g = fused ? relu_masked(dy, mask) : dy;
    a.expect_gradients(x, g, nchw, w + "NCHW ");
    b.expect_gradients(xl, to_channels_last(g, nchw), nhwc, w + "NHWC ");
    if (fused) EXPECT_TRUE(same_bits(from_channels_last(gb.dz.gpu, nchw), ga.dz.gpu, w + "dz NHWC vs NCHW"));
    if (!training) {
      // Eval: every element is the same ((x − mean)·scale + bias [+ z]) from the same
      // per-feature constants, whatever the order of the walk.
      EXPECT_TRUE(same_bits(yb_gpu, ya.gpu, w + "y NHWC vs NCHW"));
      EXPECT_TRUE(same_bits(dxb_gpu, ga.dx.gpu, w + "dx NHWC vs NCHW"));
      EXPECT_TRUE(same_bits(b_mean, a_mean, w + "save_mean NHWC vs NCHW"));
      EXPECT_TRUE(same_bits(b_inv, a_inv, w + "save_invstd NHWC vs NCHW"));
    } else {
      EXPECT_TRUE(all_close(yb_gpu, ya.gpu, output_tol<T>(), w + "y NHWC vs NCHW"));
      EXPECT_TRUE(all_close(dxb_gpu, ga.dx.gpu, output_tol<T>(), w + "dx NHWC vs NCHW", dx_scale));
      EXPECT_TRUE(mean_close(b_mean, a_mean, a.spread, w + "save_mean NHWC vs NCHW"));
      EXPECT_TRUE(positive_close(b_inv, a_inv, w + "save_invstd NHWC vs NCHW"));
    }
    const auto sa = a.gpu.state(), sb = b.gpu.state();
    EXPECT_TRUE(mean_close(sb.running_mean, sa.running_mean, a.spread, w + "running_mean NHWC vs NCHW"));
    EXPECT_TRUE(positive_close(sb.running_var, sa.running_var, w + "running_var NHWC vs NCHW"));
  }
}

template <class T>
class GpuChannelsLast : public ::testing::Test {};
using LayoutTypes = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(GpuChannelsLast, LayoutTypes, StorageNames);

TYPED_TEST(GpuChannelsLast, EvalBitwiseTrainingCloseBothModes) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  std::uint64_t seed = 200;
  for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
    for (const bool fused : {false, true}) {
      layouts_agree<T, 1>({5, 6, 7}, mode, fused, seed++);         // NLC, C·L = 42
      layouts_agree<T, 2>({4, 5, 3, 4}, mode, fused, seed++);      // NHWC, C·S = 60
      layouts_agree<T, 2>({3, 40, 2, 3}, mode, fused, seed++);     // 40 channels: two column tiles
      layouts_agree<T, 2>({6, 7, 1, 1}, mode, fused, seed++);      // 1x1: both orders coincide
      layouts_agree<T, 3>({3, 4, 2, 3, 2}, mode, fused, seed++);   // NDHWC, C·S = 48
    }
  // Enough rows that the channels-last reductions are split.
  layouts_agree<T, 2>({64, 12, 9, 9}, bn::Mode::per_channel, false, seed++);
  layouts_agree<T, 2>({300, 3, 4, 3}, bn::Mode::per_activation, true, seed++);
}

// per_activation on channels-last data: the kernels see column s·C + c, whose parameters are
// feature c·S + s. Eval with running_mean[f] = f, running_var = 1 − eps, weight 1, bias 0 and
// x = 0 puts −f at every element of feature f, so the output names the feature each element used.
TEST(GpuChannelsLastPerActivation, ParametersFollowTheLogicalFeature) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  const std::int64_t N = 3, C = 5, H = 4, W = 3, S = H * W, F = C * S;
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({N, C, H, W}, layout);
    bn::Options o;
    o.mode = bn::Mode::per_activation;
    o.eps = 0.25;
    bn::BatchNorm2d<float, bn::cuda> layer(F, o);
    bn::State<float> st = layer.state();
    for (std::int64_t f = 0; f < F; ++f) {
      st.running_mean[static_cast<std::size_t>(f)] = static_cast<float>(f);
      st.running_var[static_cast<std::size_t>(f)] = 0.75f;  // var + eps = 1
    }
    layer.load_state(st);
    layer.eval();
    device_array<float> x(std::vector<float>(static_cast<std::size_t>(s.numel()), 0.0f)), y(x.size());
    layer.forward(x.data(), y.data(), s);
    const auto got = fetch(y);
    std::int64_t wrong = 0;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t sp = 0; sp < S; ++sp) {
          const float v = got[static_cast<std::size_t>(bnref::offset(s, n, c, sp))];
          if (v != -static_cast<float>(c * S + sp) && wrong++ < 5)
            ADD_FAILURE() << s << " (n, c, s) = (" << n << ", " << c << ", " << sp << "): got " << v
                          << ", expected " << -(c * S + sp);
        }
    EXPECT_EQ(wrong, 0) << s;
  }
}

TEST(GpuChannelsLastPerActivation, TrainingEqualsCpuOnWideFeatureMaps) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // C·S > 32 in several column tiles, C > 1 (the permuted map), rank 3, 4 and 5.
  std::uint64_t seed = 300;
  for (const auto& e : std::vector<std::vector<std::int64_t>>{{64, 5, 7}, {48, 6, 3, 5}, {33, 3, 2, 2, 3}}) {
    Spec k{make_shape(e, bn::Layout::channels_last)};
    k.mode = bn::Mode::per_activation;
    k.seed = seed++;
    gpu_vs_cpu_dims<float>(k);
    k.fused = true;
    k.seed = seed++;
    gpu_vs_cpu_dims<float>(k);
  }
}

// =============================================================================================
// 3. Fused epilogues on the GPU
// =============================================================================================

TEST(GpuFusion, ForwardReluAndBackwardReluEqualCpu) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  std::uint64_t seed = 400;
  for (const auto& s : {bn::Shape{64, 7}, bn::Shape{6, 4, 11}, bn::Shape({6, 4, 11}, bn::Layout::channels_last),
                        bn::Shape{5, 3, 6, 7}, bn::Shape({5, 3, 6, 7}, bn::Layout::channels_last),
                        bn::Shape{3, 2, 3, 4, 5}, bn::Shape({3, 2, 3, 4, 5}, bn::Layout::channels_last),
                        bn::Shape{32, 3, 32, 32}})
    for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation})
      for (const bool residual : {false, true}) {
        Spec k{s};
        k.mode = mode;
        k.fused = true;
        k.residual = residual;
        k.seed = seed++;
        gpu_vs_cpu_dims<float>(k);
      }
}

/// forward_relu with @p x and @p z on both backends, training or eval, BatchNorm2d<float>.
struct FusedRun {
  std::vector<float> y_gpu, y_cpu, dx_gpu, dx_cpu, dz_gpu, dz_cpu;
  bn::Gradients<float> g_gpu, g_cpu;
  bn::State<float> s_gpu, s_cpu;
  std::vector<float> invstd, weight;
  double dx_scale = 0.0;
};

FusedRun fused_run(const bn::Shape& s, bool training, const std::vector<float>& x, const std::vector<float>& z,
                   const std::vector<float>& dy, bool relu = true) {
  Pair<float, 2> p(s.channels());
  p.load_state(random_state(s.channels(), 17));
  p.train(training);
  FusedRun r;
  const auto y = p.forward(x, s, relu, z);
  r.y_gpu = y.gpu;
  r.y_cpu = y.cpu;
  // The GPU's own output is its mask here (the NaN elements are what is tested).
  const auto g = p.backward(x, dy, s, relu, y.gpu);
  r.dx_gpu = g.dx.gpu;
  r.dx_cpu = g.dx.cpu;
  r.dz_gpu = g.dz.gpu;
  r.dz_cpu = g.dz.cpu;
  r.dx_scale = p.dx_scale(dy);
  r.g_gpu = p.gpu.gradients();
  r.g_cpu = p.cpu.gradients();
  r.s_gpu = p.gpu.state();
  r.s_cpu = p.cpu.state();
  r.invstd = fetch(p.gpu.save_invstd_data(), s.channels());
  r.weight = r.s_gpu.weight;
  return r;
}

TEST(GpuFusionNaN, NaNInResidualGivesNaNOnlyThere) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({6, 3, 5, 4}, layout);
    const std::size_t at = static_cast<std::size_t>(bnref::offset(s, 2, 1, 7));
    std::mt19937_64 rng(31);
    const auto x = noise<float>(static_cast<std::size_t>(s.numel()), rng, 2.0);
    auto z = noise<float>(x.size(), rng);
    const auto dy = noise<float>(x.size(), rng);
    z[at] = nan;
    for (const bool training : {true, false}) {
      SCOPED_TRACE(::testing::PrintToString(s) + (training ? " training" : " eval"));
      const auto r = fused_run(s, training, x, z, dy);
      for (std::size_t i = 0; i < x.size(); ++i) EXPECT_EQ(std::isnan(r.y_gpu[i]), i == at) << i;
      EXPECT_TRUE(all_close(r.y_gpu, r.y_cpu, output_tol<float>(), "y"));
      for (const float v : r.s_gpu.running_mean) EXPECT_TRUE(std::isfinite(v));
      EXPECT_TRUE(mean_close(r.s_gpu.running_mean, r.s_cpu.running_mean, 2.0, "running_mean"));
      // Backward with y NaN at `at`: PyTorch's mask passes dy there.
      EXPECT_EQ(r.dz_gpu[at], dy[at]) << "dz where y is NaN";
      EXPECT_TRUE(same_bits(r.dz_gpu, r.dz_cpu, "dz"));
      EXPECT_TRUE(all_close(r.dx_gpu, r.dx_cpu, output_tol<float>(), "dx", r.dx_scale));
      for (const float v : r.dx_gpu) EXPECT_TRUE(std::isfinite(v));
      if (!training) {
        const double want = double(dy[at]) * double(r.invstd[1]) * double(r.weight[1]);
        EXPECT_NEAR(r.dx_gpu[at], want, 1e-6 * std::fabs(want)) << "eval dx where y is NaN: dy·invstd·w";
      }
      EXPECT_TRUE(all_close(r.g_gpu.grad_bias, r.g_cpu.grad_bias, {kNoise, kNoise, 1e-6},
                            "grad_bias (includes dy where y is NaN)"));
      EXPECT_TRUE(all_close(r.g_gpu.grad_weight, r.g_cpu.grad_weight, {kNoise, kNoise, 1e-6}, "grad_weight"));
    }
  }
}

TEST(GpuFusionNaN, NaNInInputPoisonsItsChannelInTrainingOnlyItsElementInEval) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last}) {
    const bn::Shape s({6, 3, 5, 4}, layout);
    const std::size_t at = static_cast<std::size_t>(bnref::offset(s, 4, 2, 3));
    std::mt19937_64 rng(32);
    auto x = noise<float>(static_cast<std::size_t>(s.numel()), rng, 2.0);
    const auto z = noise<float>(x.size(), rng);
    const auto dy = noise<float>(x.size(), rng);
    x[at] = nan;
    std::vector<std::int64_t> channel(x.size());
    bnref::for_each(s, bn::Mode::per_channel,
                    [&](std::int64_t i, std::int64_t c) { channel[static_cast<std::size_t>(i)] = c; });
    for (const bool relu : {false, true}) {
      SCOPED_TRACE(::testing::PrintToString(s) + (relu ? " relu(bn(x) + z)" : " bn(x)"));
      // Training: channel 2's statistics are NaN, so all of its outputs are NaN (relu keeps NaN).
      const auto t = fused_run(s, true, x, relu ? z : std::vector<float>{}, dy, relu);
      for (std::size_t i = 0; i < x.size(); ++i) EXPECT_EQ(std::isnan(t.y_gpu[i]), channel[i] == 2) << i;
      EXPECT_TRUE(all_close(t.y_gpu, t.y_cpu, output_tol<float>(), "train y"));
      EXPECT_TRUE(std::isnan(t.s_gpu.running_mean[2]) && std::isnan(t.s_gpu.running_var[2]));
      EXPECT_TRUE(std::isfinite(t.s_gpu.running_mean[0]) && std::isfinite(t.s_gpu.running_var[1]));
      // Eval: only the NaN element; its dx is dy·invstd·w (x is not read), grad_weight[2] is NaN.
      const auto e = fused_run(s, false, x, relu ? z : std::vector<float>{}, dy, relu);
      for (std::size_t i = 0; i < x.size(); ++i) EXPECT_EQ(std::isnan(e.y_gpu[i]), i == at) << i;
      EXPECT_TRUE(all_close(e.y_gpu, e.y_cpu, output_tol<float>(), "eval y"));
      for (const float v : e.dx_gpu) EXPECT_TRUE(std::isfinite(v));
      const double want = double(dy[at]) * double(e.invstd[2]) * double(e.weight[2]);
      EXPECT_NEAR(e.dx_gpu[at], want, 1e-6 * std::fabs(want)) << "eval dx of the NaN input";
      EXPECT_TRUE(all_close(e.dx_gpu, e.dx_cpu, output_tol<float>(), "eval dx", e.dx_scale));
      EXPECT_TRUE(std::isnan(e.g_gpu.grad_weight[2]) && std::isnan(e.g_cpu.grad_weight[2]));
      EXPECT_TRUE(std::isfinite(e.g_gpu.grad_bias[2]));
      EXPECT_TRUE(all_close(e.g_gpu.grad_bias, e.g_cpu.grad_bias, {kNoise, kNoise, 1e-6}, "eval grad_bias"));
    }
  }
}

TEST(GpuFusionNaN, InfiniteResidualThroughRelu) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // Eval (finite statistics): −inf through relu is 0, +inf stays +inf; relu backward passes dy
  // at +inf and masks it at 0.
  const bn::Shape s{4, 3, 2, 2};
  std::mt19937_64 rng(33);
  const auto x = noise<float>(static_cast<std::size_t>(s.numel()), rng);
  auto z = noise<float>(x.size(), rng);
  const auto dy = noise<float>(x.size(), rng);
  z[0] = -std::numeric_limits<float>::infinity();
  z[1] = std::numeric_limits<float>::infinity();
  const auto r = fused_run(s, false, x, z, dy);
  EXPECT_EQ(r.y_gpu[0], 0.0f);
  EXPECT_EQ(r.y_gpu[1], std::numeric_limits<float>::infinity());
  EXPECT_EQ(r.dz_gpu[0], 0.0f);
  EXPECT_EQ(r.dz_gpu[1], dy[1]);
  EXPECT_TRUE(all_close(r.y_gpu, r.y_cpu, output_tol<float>(), "y"));
  EXPECT_TRUE(same_bits(r.dz_gpu, r.dz_cpu, "dz"));
}

// =============================================================================================
// 4. The functional CUDA API
// =============================================================================================

/// Device memory with @p guard bytes after the usable part, all set to a pattern, to see that
/// a call stays inside the workspace it was given.
class Workspace {
 public:
  static constexpr std::size_t guard = 256;
  static constexpr unsigned char pattern = 0xA5;
  explicit Workspace(std::size_t bytes)
      : bytes_(bytes), mem_(to_device(std::vector<unsigned char>(bytes + guard, pattern))) {}
  void* data() { return mem_.data(); }
  std::size_t bytes() const { return bytes_; }
  std::vector<unsigned char> contents() const { return fetch(mem_); }
  ::testing::AssertionResult guard_intact() const {
    const auto all = contents();
    for (std::size_t i = bytes_; i < all.size(); ++i)
      if (all[i] != pattern)
        return ::testing::AssertionFailure() << "byte " << i - bytes_ << " past a workspace of " << bytes_
                                             << " bytes was written";
    return ::testing::AssertionSuccess();
  }

 private:
  std::size_t bytes_;
  device_array<unsigned char> mem_;
};

template <class E>
using HostArray = std::vector<E>;

/// Every buffer of a forward and a backward call, in host (the CPU oracle's) or device memory.
template <class T, template <class> class Array>
struct Buffers {
  using P = bn::param_t<T>;
  Array<T> x, z, y, dy, dx, dz, mask;
  Array<P> weight, bias, running_mean, running_var, save_mean, save_invstd, grad_weight, grad_bias;
  Array<std::int64_t> skipped;

  bn::ForwardArgs<T> forward_args(std::int64_t F, bool residual, bool tracking = true) {
    bn::ForwardArgs<T> a;
    a.x = x.data();
    a.y = y.data();
    a.weight = bn::span<const P>(weight.data(), F);
    a.bias = bn::span<const P>(bias.data(), F);
    if (tracking) {
      a.running_mean = bn::span<P>(running_mean.data(), F);
      a.running_var = bn::span<P>(running_var.data(), F);
    }
    a.save_mean = bn::span<P>(save_mean.data(), F);
    a.save_invstd = bn::span<P>(save_invstd.data(), F);
    a.residual = residual ? z.data() : nullptr;
    a.skipped_updates = skipped.data();
    return a;
  }
  /// Backward of the forward whose statistics are in save_mean / save_invstd.
  bn::BackwardArgs<T> backward_args(std::int64_t F, bool relu) {
    bn::BackwardArgs<T> a;
    a.x = x.data();
    a.dy = dy.data();
    a.dx = dx.data();
    a.y = relu ? mask.data() : nullptr;
    a.dresidual = relu ? dz.data() : nullptr;
    a.weight = bn::span<const P>(weight.data(), F);
    a.mean = bn::span<const P>(save_mean.data(), F);
    a.invstd = bn::span<const P>(save_invstd.data(), F);
    a.grad_weight = bn::span<P>(grad_weight.data(), F);
    a.grad_bias = bn::span<P>(grad_bias.data(), F);
    return a;
  }
};

template <class T>
using HostBuffers = Buffers<T, HostArray>;
template <class T>
using DeviceBuffers = Buffers<T, device_array>;

template <class T>
HostBuffers<T> host_buffers(const bn::Shape& s, bn::Mode mode, std::uint64_t seed) {
  const std::int64_t F = bn::feature_count(s, mode), C = s.channels();
  const auto n = static_cast<std::size_t>(s.numel());
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> offset(static_cast<std::size_t>(C)), scale(static_cast<std::size_t>(C));
  for (std::int64_t c = 0; c < C; ++c) {
    offset[static_cast<std::size_t>(c)] = 2.0 * normal(rng);
    scale[static_cast<std::size_t>(c)] = 1.0 + 0.3 * std::fabs(normal(rng));
  }
  HostBuffers<T> h;
  h.x = channel_data<T>(s, rng, offset, scale);
  h.z = noise<T>(n, rng);
  h.dy = noise<T>(n, rng);
  h.y.assign(n, bn::from_double<T>(-7.0));
  h.dx.assign(n, bn::from_double<T>(-7.0));
  h.dz.assign(n, bn::from_double<T>(-7.0));
  h.mask.assign(n, bn::from_double<T>(1.0));
  const auto st = random_state(F, seed + 1);
  h.weight = st.weight;
  h.bias = st.bias;
  h.running_mean = st.running_mean;
  h.running_var = st.running_var;
  h.save_mean.assign(static_cast<std::size_t>(F), -3.0f);
  h.save_invstd.assign(static_cast<std::size_t>(F), -3.0f);
  h.grad_weight.assign(static_cast<std::size_t>(F), 0.25f);
  h.grad_bias.assign(static_cast<std::size_t>(F), -0.25f);
  h.skipped = {5};
  return h;
}

template <class T>
DeviceBuffers<T> upload(const HostBuffers<T>& h) {
  DeviceBuffers<T> d;
  d.x = device_array<T>(h.x);
  d.z = device_array<T>(h.z);
  d.y = device_array<T>(h.y);
  d.dy = device_array<T>(h.dy);
  d.dx = device_array<T>(h.dx);
  d.dz = device_array<T>(h.dz);
  d.mask = device_array<T>(h.mask);
  d.weight = device_array<float>(h.weight);
  d.bias = device_array<float>(h.bias);
  d.running_mean = device_array<float>(h.running_mean);
  d.running_var = device_array<float>(h.running_var);
  d.save_mean = device_array<float>(h.save_mean);
  d.save_invstd = device_array<float>(h.save_invstd);
  d.grad_weight = device_array<float>(h.grad_weight);
  d.grad_bias = device_array<float>(h.grad_bias);
  d.skipped = device_array<std::int64_t>(h.skipped);
  settle();
  return d;
}

template <class T>
HostBuffers<T> download(const DeviceBuffers<T>& d) {
  HostBuffers<T> h;
  h.x = fetch(d.x);
  h.z = fetch(d.z);
  h.y = fetch(d.y);
  h.dy = fetch(d.dy);
  h.dx = fetch(d.dx);
  h.dz = fetch(d.dz);
  h.mask = fetch(d.mask);
  h.weight = fetch(d.weight);
  h.bias = fetch(d.bias);
  h.running_mean = fetch(d.running_mean);
  h.running_var = fetch(d.running_var);
  h.save_mean = fetch(d.save_mean);
  h.save_invstd = fetch(d.save_invstd);
  h.grad_weight = fetch(d.grad_weight);
  h.grad_bias = fetch(d.grad_bias);
  h.skipped = fetch(d.skipped);
  return h;
}

/// Every buffer bit for bit (what a call that throws must leave).
template <class T>
void expect_unchanged(const HostBuffers<T>& now, const HostBuffers<T>& before, const std::string& what) {
  EXPECT_TRUE(same_bits(now.x, before.x, what + " x"));
  EXPECT_TRUE(same_bits(now.z, before.z, what + " z"));
  EXPECT_TRUE(same_bits(now.y, before.y, what + " y"));
  EXPECT_TRUE(same_bits(now.dy, before.dy, what + " dy"));
  EXPECT_TRUE(same_bits(now.dx, before.dx, what + " dx"));
  EXPECT_TRUE(same_bits(now.dz, before.dz, what + " dz"));
  EXPECT_TRUE(same_bits(now.running_mean, before.running_mean, what + " running_mean"));
  EXPECT_TRUE(same_bits(now.running_var, before.running_var, what + " running_var"));
  EXPECT_TRUE(same_bits(now.save_mean, before.save_mean, what + " save_mean"));
  EXPECT_TRUE(same_bits(now.save_invstd, before.save_invstd, what + " save_invstd"));
  EXPECT_TRUE(same_bits(now.grad_weight, before.grad_weight, what + " grad_weight"));
  EXPECT_TRUE(same_bits(now.grad_bias, before.grad_bias, what + " grad_bias"));
  EXPECT_EQ(now.skipped, before.skipped) << what << " skipped_updates";
}

/// What a call threw: the argument() of a batchnorm::invalid_argument, or "<type>" otherwise.
template <class Fn>
std::string thrown_argument(Fn&& fn) {
  try {
    fn();
  } catch (const bn::invalid_argument& e) {
    return e.argument();
  } catch (const std::exception& e) {
    return std::string("<other exception: ") + e.what() + ">";
  }
  return "<nothing thrown>";
}

/// Forward on both backends: the CPU functional API on @p h, the CUDA one on @p d with a
/// workspace of exactly the size it asks for (guarded).
template <class T>
void forward_both(const bn::Shape& s, HostBuffers<T>& h, DeviceBuffers<T>& d, const bn::ForwardConfig& c,
                  bool residual, bool tracking, Stream& stream, const std::string& what) {
  const std::int64_t F = bn::feature_count(s, c.mode);
  bn::forward(bn::cpu{}, s, h.forward_args(F, residual, tracking), c);
  Workspace ws(bn::forward_workspace_size<T>(bn::cuda{}, s, c, tracking));
  bn::forward(bn::cuda{}, s, d.forward_args(F, residual, tracking), c, ws.data(), ws.bytes(), stream.get());
  stream.sync();
  EXPECT_TRUE(ws.guard_intact()) << what;
}

template <class T, class Edit>
void backward_both(const bn::Shape& s, HostBuffers<T>& h, DeviceBuffers<T>& d, const bn::BackwardConfig& c,
                   Edit&& edit, Stream& stream, const std::string& what) {
  const std::int64_t F = bn::feature_count(s, c.mode);
  const bool relu = c.activation == bn::Activation::relu;
  auto ha = h.backward_args(F, relu);
  auto da = d.backward_args(F, relu);
  edit(ha);
  edit(da);
  bn::backward(bn::cpu{}, s, ha, c);
  Workspace ws(bn::backward_workspace_size<T>(bn::cuda{}, s, c));
  bn::backward(bn::cuda{}, s, da, c, ws.data(), ws.bytes(), stream.get());
  stream.sync();
  EXPECT_TRUE(ws.guard_intact()) << what;
}

template <class T>
void expect_forward_equal(const HostBuffers<T>& g, const HostBuffers<T>& c, double spread, const std::string& w) {
  EXPECT_TRUE(all_close(g.y, c.y, output_tol<T>(), w + " y"));
  EXPECT_TRUE(mean_close(g.save_mean, c.save_mean, spread, w + " save_mean"));
  EXPECT_TRUE(positive_close(g.save_invstd, c.save_invstd, w + " save_invstd"));
  EXPECT_TRUE(mean_close(g.running_mean, c.running_mean, spread, w + " running_mean"));
  EXPECT_TRUE(positive_close(g.running_var, c.running_var, w + " running_var"));
  EXPECT_EQ(g.skipped, c.skipped) << w << " skipped_updates";
}

/// grad_weight / grad_bias against the CPU with the L1 bound; @p g: the gradient reaching bn.
template <class T>
void expect_gradients_equal(const bn::Shape& s, bn::Mode mode, const HostBuffers<T>& gpu, const HostBuffers<T>& cpu,
                            const std::vector<T>& g, bool accumulated, const std::string& w) {
  const std::int64_t F = bn::feature_count(s, mode);
  std::vector<double> l1w(static_cast<std::size_t>(F), 0.0), l1b(l1w);
  bnref::for_each(s, mode, [&](std::int64_t i, std::int64_t f) {
    const auto k = static_cast<std::size_t>(f);
    const double d = dbl(g[static_cast<std::size_t>(i)]);
    l1b[k] += std::fabs(d);
    l1w[k] += std::fabs(d * (dbl(cpu.x[static_cast<std::size_t>(i)]) - double(cpu.save_mean[k])) *
                        double(cpu.save_invstd[k]));
  });
  std::vector<double> shift(static_cast<std::size_t>(F));
  for (std::size_t k = 0; k < shift.size(); ++k)
    shift[k] = std::fabs(double(gpu.save_mean[k]) - double(cpu.save_mean[k])) * std::fabs(double(cpu.save_invstd[k])) *
               l1b[k];
  if (accumulated) {  // the sum of two backwards of the same data: twice the error of one
    for (auto* v : {&l1w, &l1b, &shift})
      for (double& e : *v) e *= 2.0;
  }
  EXPECT_TRUE(sum_close(gpu.grad_weight, cpu.grad_weight, l1w, w + " grad_weight", shift));
  EXPECT_TRUE(sum_close(gpu.grad_bias, cpu.grad_bias, l1b, w + " grad_bias"));
}

template <class T>
double spread_of(const HostBuffers<T>& cpu) {
  double m = 0.0;
  for (const float v : cpu.save_invstd)
    if (std::isfinite(1.0 / double(v))) m = std::max(m, 1.0 / double(v));
  return m;
}

template <class T>
void functional_equals_cpu(const bn::Shape& s, bn::Mode mode, std::uint64_t seed) {
  SCOPED_TRACE(describe(s, mode) + " " + storage<T>::name());
  const std::int64_t F = bn::feature_count(s, mode);
  HostBuffers<T> h = host_buffers<T>(s, mode, seed);
  DeviceBuffers<T> d = upload(h);
  Stream stream;
  auto no_edit = [](bn::BackwardArgs<T>&) {};

  // 1. Training forward with every pointer, momentum 0.25 and the deferred (all-or-nothing)
  //    running-stat update.
  bn::ForwardConfig fc;
  fc.mode = mode;
  fc.exponential_average_factor = 0.25;
  fc.skip_nonfinite_updates = true;
  forward_both(s, h, d, fc, false, true, stream, "train forward");
  double spread = spread_of(h);
  expect_forward_equal(download(d), h, spread, "train forward");

  // 2. Backward: overwrite, then accumulate, then parameter gradients only (dx untouched),
  //    then dx only, in place (dx == dy).
  bn::BackwardConfig bc;
  bc.mode = mode;
  backward_both(s, h, d, bc, no_edit, stream, "backward");
  auto g = download(d);
  const double dx_scale = dx_terms(h.dy, h.save_invstd.data(), h.weight, F);
  EXPECT_TRUE(all_close(g.dx, h.dx, output_tol<T>(), "backward dx", dx_scale));
  expect_gradients_equal(s, mode, g, h, h.dy, false, "backward");
  bc.accumulate = true;
  backward_both(s, h, d, bc, no_edit, stream, "accumulate");
  g = download(d);
  expect_gradients_equal(s, mode, g, h, h.dy, true, "accumulate");
  bc.accumulate = false;
  const auto dx_before = g.dx;
  backward_both(s, h, d, bc, [](bn::BackwardArgs<T>& a) { a.dx = nullptr; }, stream, "grads only");
  g = download(d);
  EXPECT_TRUE(same_bits(g.dx, dx_before, "grads only: dx untouched"));
  expect_gradients_equal(s, mode, g, h, h.dy, false, "grads only");
  {
    HostBuffers<T> hc = h;
    DeviceBuffers<T> dc = upload(hc);
    bn::BackwardArgs<T> ha = hc.backward_args(F, false), da = dc.backward_args(F, false);
    for (auto* a : {&ha, &da}) {
      a->grad_weight = {};
      a->grad_bias = {};
    }
    ha.dx = hc.dy.data();
    da.dx = dc.dy.data();
    bn::backward(bn::cpu{}, s, ha, bc);
    Workspace ws(bn::backward_workspace_size<T>(bn::cuda{}, s, bc));
    bn::backward(bn::cuda{}, s, da, bc, ws.data(), ws.bytes(), stream.get());
    stream.sync();
    EXPECT_TRUE(ws.guard_intact());
    const auto gc = download(dc);
    EXPECT_TRUE(all_close(gc.dy, hc.dy, output_tol<T>(), "in-place dx (dx == dy)", dx_scale));
    EXPECT_TRUE(same_bits(gc.grad_weight, hc.grad_weight, "in-place: grad_weight not asked for, untouched"));
  }

  // 3. Eval forward with y = relu(bn(x) + z) from the running stats, and its backward with dz
  //    (the mask: the CPU's y on both).
  fc.batch_statistics = false;
  fc.activation = bn::Activation::relu;
  const auto pre = download(d);
  const auto cpu_running_mean = h.running_mean, cpu_running_var = h.running_var;
  forward_both(s, h, d, fc, true, true, stream, "eval relu forward");
  g = download(d);
  EXPECT_TRUE(all_close(g.y, h.y, output_tol<T>(), "eval relu y"));
  EXPECT_TRUE(same_bits(g.running_mean, pre.running_mean, "eval: gpu running_mean unchanged"));
  EXPECT_TRUE(same_bits(g.running_var, pre.running_var, "eval: gpu running_var unchanged"));
  EXPECT_TRUE(same_bits(h.running_mean, cpu_running_mean, "eval: cpu running_mean unchanged"));
  EXPECT_TRUE(same_bits(h.running_var, cpu_running_var, "eval: cpu running_var unchanged"));
  EXPECT_TRUE(same_bits(g.save_mean, g.running_mean, "eval: gpu save_mean = running_mean"));
  EXPECT_TRUE(mean_close(g.save_mean, h.save_mean, spread, "eval save_mean"));
  EXPECT_TRUE(positive_close(g.save_invstd, h.save_invstd, "eval save_invstd"));
  h.mask = h.y;
  d.mask = to_device(h.y);
  bc.batch_statistics = false;
  bc.activation = bn::Activation::relu;
  backward_both(s, h, d, bc, no_edit, stream, "eval relu backward");
  g = download(d);
  EXPECT_TRUE(
      all_close(g.dx, h.dx, output_tol<T>(), "eval relu dx", dx_terms(h.dy, h.save_invstd.data(), h.weight, F)));
  EXPECT_TRUE(same_bits(g.dz, h.dz, "eval relu dz"));
  expect_gradients_equal(s, mode, g, h, relu_masked(h.dy, h.y), false, "eval relu");

  // 4. Training forward in place (y == x) with relu(bn(x)), without running stats.
  {
    HostBuffers<T> hc = h;
    DeviceBuffers<T> dc = upload(hc);
    bn::ForwardConfig ic;
    ic.mode = mode;
    ic.activation = bn::Activation::relu;
    bn::ForwardArgs<T> ha = hc.forward_args(F, false, false), da = dc.forward_args(F, false, false);
    ha.y = hc.x.data();
    da.y = dc.x.data();
    bn::forward(bn::cpu{}, s, ha, ic);
    Workspace ws(bn::forward_workspace_size<T>(bn::cuda{}, s, ic, false));
    bn::forward(bn::cuda{}, s, da, ic, ws.data(), ws.bytes(), stream.get());
    stream.sync();
    EXPECT_TRUE(ws.guard_intact());
    const auto gc = download(dc);
    EXPECT_TRUE(all_close(gc.x, hc.x, output_tol<T>(), "in-place relu y"));
    EXPECT_TRUE(mean_close(gc.save_mean, hc.save_mean, spread, "in-place save_mean"));
    EXPECT_TRUE(same_bits(gc.running_mean, hc.running_mean, "untracked: running_mean untouched"));
  }
}

template <class T>
class GpuFunctional : public ::testing::Test {};
using FunctionalTypes = ::testing::Types<float, __half, __nv_bfloat16>;
TYPED_TEST_SUITE(GpuFunctional, FunctionalTypes, StorageNames);

TYPED_TEST(GpuFunctional, ResultsEqualCpuFunctional) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  using T = TypeParam;
  functional_equals_cpu<T>(bn::Shape{16, 6, 5, 7}, bn::Mode::per_channel, 500);
  functional_equals_cpu<T>(bn::Shape({16, 6, 5, 7}, bn::Layout::channels_last), bn::Mode::per_channel, 501);
  functional_equals_cpu<T>(bn::Shape({16, 6, 5, 7}, bn::Layout::channels_last), bn::Mode::per_activation, 502);
  functional_equals_cpu<T>(bn::Shape{300, 40}, bn::Mode::per_channel, 503);
  functional_equals_cpu<T>(bn::Shape{9, 3, 4, 2, 5}, bn::Mode::per_activation, 504);
  functional_equals_cpu<T>(bn::Shape{64, 2, 40, 40}, bn::Mode::per_channel, 505);  // split planes
}

TEST(GpuFunctionalWorkspace, SizeQueries) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  // Every query is positive; the deferred running-stat update (skip_nonfinite_updates with
  // running stats) needs at least as much as the plain training forward, eval (no partial
  // results) at most as much; and max_workspace_size covers every shape of its feature count.
  const std::vector<std::vector<std::int64_t>> extents = {
      {2, 6},          {100000, 6},      {4, 6, 10},         {4096, 6, 10},
      {2, 6, 3, 3},    {512, 6, 32, 32}, {2, 6, 1, 1 << 20}, {3, 6, 2, 2, 2}};
  for (const auto& e : extents)
    for (const auto layout : {bn::Layout::contiguous, bn::Layout::channels_last})
      for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
        const bn::Shape s = make_shape(e, layout);
        SCOPED_TRACE(describe(s, mode));
        const std::int64_t F = bn::feature_count(s, mode);
        bn::ForwardConfig train;
        train.mode = mode;
        bn::ForwardConfig skip = train;
        skip.skip_nonfinite_updates = true;
        bn::ForwardConfig eval = train;
        eval.batch_statistics = false;
        bn::BackwardConfig back;
        back.mode = mode;
        const std::size_t f_train = bn::forward_workspace_size<float>(bn::cuda{}, s, train);
        const std::size_t f_skip = bn::forward_workspace_size<float>(bn::cuda{}, s, skip);
        const std::size_t f_skip_untracked = bn::forward_workspace_size<float>(bn::cuda{}, s, skip, false);
        const std::size_t f_eval = bn::forward_workspace_size<float>(bn::cuda{}, s, eval);
        const std::size_t b = bn::backward_workspace_size<float>(bn::cuda{}, s, back);
        const std::size_t most = bn::max_workspace_size<float>(bn::cuda{}, F);
        EXPECT_GT(f_train, 0u);
        EXPECT_GT(b, 0u);
        EXPECT_GE(f_skip, f_train);
        EXPECT_EQ(f_skip_untracked, f_train);
        EXPECT_LE(f_eval, f_train);
        EXPECT_GE(most, f_skip);
        EXPECT_GE(most, b);
        // Half storage keeps float statistics: the same workspace as float.
        EXPECT_EQ(bn::forward_workspace_size<__half>(bn::cuda{}, s, skip), f_skip);
        EXPECT_EQ(bn::backward_workspace_size<__nv_bfloat16>(bn::cuda{}, s, back), b);
        EXPECT_EQ(bn::max_workspace_size<__half>(bn::cuda{}, F), most);
      }
}

TEST(GpuFunctionalWorkspace, TooSmallThrowsAndWritesNothing) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  for (const auto mode : {bn::Mode::per_channel, bn::Mode::per_activation}) {
    const bn::Shape s({32, 6, 9, 9}, bn::Layout::channels_last);
    SCOPED_TRACE(describe(s, mode));
    const std::int64_t F = bn::feature_count(s, mode);
    HostBuffers<float> h = host_buffers<float>(s, mode, 600);
    DeviceBuffers<float> d = upload(h);
    const HostBuffers<float> before = download(d);
    Stream stream;
    bn::ForwardConfig fc;
    fc.mode = mode;
    fc.skip_nonfinite_updates = true;  // the largest forward workspace
    fc.activation = bn::Activation::relu;
    const std::size_t need = bn::forward_workspace_size<float>(bn::cuda{}, s, fc);
    ASSERT_GT(need, 0u);
    {
      Workspace ws(need - 1);
      const auto ws_before = ws.contents();
      EXPECT_EQ(thrown_argument([&] {
                  bn::forward(bn::cuda{}, s, d.forward_args(F, true), fc, ws.data(), ws.bytes(), stream.get());
                }),
                "workspace_bytes");
      EXPECT_EQ(thrown_argument([&] {
                  bn::forward(bn::cuda{}, s, d.forward_args(F, true), fc, ws.data(), 0, stream.get());
                }),
                "workspace_bytes");
      EXPECT_EQ(thrown_argument([&] {
                  bn::forward(bn::cuda{}, s, d.forward_args(F, true), fc, nullptr, 0, stream.get());
                }),
                "workspace");
      stream.sync();
      EXPECT_TRUE(same_bits(ws.contents(), ws_before, "forward: workspace"));
      expect_unchanged(download(d), before, "forward with too small a workspace");
    }
    bn::BackwardConfig bc;
    bc.mode = mode;
    bc.activation = bn::Activation::relu;
    const std::size_t need_b = bn::backward_workspace_size<float>(bn::cuda{}, s, bc);
    ASSERT_GT(need_b, 0u);
    {
      Workspace ws(need_b - 1);
      const auto ws_before = ws.contents();
      EXPECT_EQ(thrown_argument([&] {
                  bn::backward(bn::cuda{}, s, d.backward_args(F, true), bc, ws.data(), ws.bytes(), stream.get());
                }),
                "workspace_bytes");
      EXPECT_EQ(thrown_argument([&] {
                  bn::backward(bn::cuda{}, s, d.backward_args(F, true), bc, nullptr, 0, stream.get());
                }),
                "workspace");
      stream.sync();
      EXPECT_TRUE(same_bits(ws.contents(), ws_before, "backward: workspace"));
      expect_unchanged(download(d), before, "backward with too small a workspace");
    }
    // Exactly the size asked for works.
    Workspace ws(need);
    EXPECT_NO_THROW(bn::forward(bn::cuda{}, s, d.forward_args(F, true), fc, ws.data(), ws.bytes(), stream.get()));
    stream.sync();
    EXPECT_TRUE(ws.guard_intact());
  }
}

TEST(GpuFunctionalPointers, HostPointersAreRejectedByName) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  {  // HMM / ATS: the device reads plain host memory, and the library accepts it there
    int device = 0, pageable = 0;
    BN_TEST_CUDA_CHECK(cudaGetDevice(&device));
    BN_TEST_CUDA_CHECK(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device));
    if (pageable) GTEST_SKIP() << "device reads pageable memory: see GpuLaunchChecks.MallocMemoryIsAcceptedOnlyWhereTheDeviceReadsIt";
  }
  const bn::Shape s{8, 4, 3, 5};
  const std::int64_t F = 4;
  HostBuffers<float> h = host_buffers<float>(s, bn::Mode::per_channel, 700);
  DeviceBuffers<float> d = upload(h);
  const HostBuffers<float> before = download(d);
  Stream stream;
  bn::ForwardConfig fc;
  fc.activation = bn::Activation::relu;
  fc.skip_nonfinite_updates = true;
  Workspace fws(bn::forward_workspace_size<float>(bn::cuda{}, s, fc));
  using FEdit = std::function<void(bn::ForwardArgs<float>&)>;
  const std::vector<std::pair<std::string, FEdit>> forward_cases = {
      {"x", [&](bn::ForwardArgs<float>& a) { a.x = h.x.data(); }},
      {"y", [&](bn::ForwardArgs<float>& a) { a.y = h.y.data(); }},
      {"residual", [&](bn::ForwardArgs<float>& a) { a.residual = h.z.data(); }},
      {"weight", [&](bn::ForwardArgs<float>& a) { a.weight.data = h.weight.data(); }},
      {"bias", [&](bn::ForwardArgs<float>& a) { a.bias.data = h.bias.data(); }},
      {"running_mean", [&](bn::ForwardArgs<float>& a) { a.running_mean.data = h.running_mean.data(); }},
      {"running_var", [&](bn::ForwardArgs<float>& a) { a.running_var.data = h.running_var.data(); }},
      {"save_mean", [&](bn::ForwardArgs<float>& a) { a.save_mean.data = h.save_mean.data(); }},
      {"save_invstd", [&](bn::ForwardArgs<float>& a) { a.save_invstd.data = h.save_invstd.data(); }},
      {"skipped_updates", [&](bn::ForwardArgs<float>& a) { a.skipped_updates = h.skipped.data(); }},
  };
  const HostBuffers<float> host_before = h;
  for (const auto& [name, edit] : forward_cases) {
    auto a = d.forward_args(F, true);
    edit(a);
    EXPECT_EQ(thrown_argument([&] { bn::forward(bn::cuda{}, s, a, fc, fws.data(), fws.bytes(), stream.get()); }),
              name)
        << "forward with a host " << name;
  }
  bn::BackwardConfig bc;
  bc.activation = bn::Activation::relu;
  Workspace bws(bn::backward_workspace_size<float>(bn::cuda{}, s, bc));
  using BEdit = std::function<void(bn::BackwardArgs<float>&)>;
  const std::vector<std::pair<std::string, BEdit>> backward_cases = {
      {"x", [&](bn::BackwardArgs<float>& a) { a.x = h.x.data(); }},
      {"dy", [&](bn::BackwardArgs<float>& a) { a.dy = h.dy.data(); }},
      {"dx", [&](bn::BackwardArgs<float>& a) { a.dx = h.dx.data(); }},
      {"y", [&](bn::BackwardArgs<float>& a) { a.y = h.mask.data(); }},
      {"dresidual", [&](bn::BackwardArgs<float>& a) { a.dresidual = h.dz.data(); }},
      {"weight", [&](bn::BackwardArgs<float>& a) { a.weight.data = h.weight.data(); }},
      {"mean", [&](bn::BackwardArgs<float>& a) { a.mean.data = h.save_mean.data(); }},
      {"invstd", [&](bn::BackwardArgs<float>& a) { a.invstd.data = h.save_invstd.data(); }},
      {"grad_weight", [&](bn::BackwardArgs<float>& a) { a.grad_weight.data = h.grad_weight.data(); }},
      {"grad_bias", [&](bn::BackwardArgs<float>& a) { a.grad_bias.data = h.grad_bias.data(); }},
  };
  for (const auto& [name, edit] : backward_cases) {
    auto a = d.backward_args(F, true);
    edit(a);
    EXPECT_EQ(thrown_argument([&] { bn::backward(bn::cuda{}, s, a, bc, bws.data(), bws.bytes(), stream.get()); }),
              name)
        << "backward with a host " << name;
  }
  stream.sync();
  expect_unchanged(download(d), before, "device buffers after the rejected calls");
  expect_unchanged(h, host_before, "host buffers after the rejected calls");
  EXPECT_TRUE(fws.guard_intact());
  EXPECT_TRUE(bws.guard_intact());
}

TEST(GpuFunctionalSkip, SkipNonfiniteUpdatesCountsOnTheDevice) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  const std::vector<std::pair<bn::Shape, bn::Mode>> cases = {
      {bn::Shape{8, 3, 4, 5}, bn::Mode::per_channel},
      {bn::Shape({8, 3, 4, 5}, bn::Layout::channels_last), bn::Mode::per_activation},
      {bn::Shape{64, 3, 40, 40}, bn::Mode::per_channel}};
  for (const auto& [s, mode] : cases) {
    SCOPED_TRACE(describe(s, mode));
    const std::int64_t F = bn::feature_count(s, mode);
    HostBuffers<float> h = host_buffers<float>(s, mode, 800);
    DeviceBuffers<float> d = upload(h);
    Stream stream;
    bn::ForwardConfig fc;
    fc.mode = mode;
    fc.skip_nonfinite_updates = true;
    // One element of logical feature 1 (n = 3, c = 1, s = 2) is bad.
    const auto at = static_cast<std::size_t>(bnref::offset(s, 3, 1, 2));
    const std::vector<float> clean = h.x;
    const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 0.0f};
    std::int64_t expected_count = 5;
    for (const float v : bad) {
      const bool finite = std::isfinite(v);
      std::vector<float> x = clean;
      if (!finite) x[at] = v;
      h.x = x;
      d.x = to_device(x);
      const auto running_before = fetch(d.running_mean), var_before = fetch(d.running_var);
      forward_both(s, h, d, fc, false, true, stream, "skip forward");
      if (!finite) ++expected_count;
      const auto g = download(d);
      EXPECT_EQ(g.skipped[0], expected_count) << "value " << v;
      EXPECT_EQ(h.skipped[0], expected_count) << "cpu, value " << v;
      if (!finite) {
        EXPECT_TRUE(same_bits(g.running_mean, running_before, "skipped: running_mean untouched"));
        EXPECT_TRUE(same_bits(g.running_var, var_before, "skipped: running_var untouched"));
      }
      // y and running stats equal the CPU. The bad feature's saved statistics are not finite
      // on either backend, but inf or NaN depends on the order the values were merged in.
      auto gs = g, hs = h;
      for (auto* v : {&gs.save_mean, &gs.save_invstd, &hs.save_mean, &hs.save_invstd})
        for (float& e : *v)
          if (!std::isfinite(e)) e = std::numeric_limits<float>::quiet_NaN();
      expect_forward_equal(gs, hs, spread_of(h), "skip");
    }
    // Without the option the bad batch poisons its feature's running stats, on both, and the
    // counter is not touched.
    fc.skip_nonfinite_updates = false;
    std::vector<float> x = clean;
    x[at] = std::numeric_limits<float>::quiet_NaN();
    h.x = x;
    d.x = to_device(x);
    forward_both(s, h, d, fc, false, true, stream, "no skip");
    const auto g = download(d);
    EXPECT_EQ(g.skipped[0], expected_count);
    const std::int64_t poisoned = mode == bn::Mode::per_channel ? 1 : 1 * s.spatial() + 2;
    EXPECT_TRUE(std::isnan(g.running_mean[static_cast<std::size_t>(poisoned)]));
    EXPECT_TRUE(std::isnan(h.running_mean[static_cast<std::size_t>(poisoned)]));
    EXPECT_TRUE(all_close(g.y, h.y, output_tol<float>(), "no skip y"));
    EXPECT_TRUE(mean_close(g.running_mean, h.running_mean, spread_of(h), "no skip running_mean"));
    EXPECT_TRUE(positive_close(g.running_var, h.running_var, "no skip running_var"));
    // The option without a counter: running stats are still kept.
    fc.skip_nonfinite_updates = true;
    const auto running_before = fetch(d.running_mean);
    auto a = d.forward_args(F, false);
    a.skipped_updates = nullptr;
    Workspace ws(bn::forward_workspace_size<float>(bn::cuda{}, s, fc));
    bn::forward(bn::cuda{}, s, a, fc, ws.data(), ws.bytes(), stream.get());
    stream.sync();
    EXPECT_TRUE(same_bits(fetch(d.running_mean), running_before, "no counter: running_mean untouched"));
  }
}

// =============================================================================================
// 5. Large shapes: the split reductions
// =============================================================================================

Spec large(bn::Shape s, bn::Mode mode = bn::Mode::per_channel, std::uint64_t seed = 1) {
  Spec k{s};
  k.mode = mode;
  k.steps = {true, true, false};
  k.seed = seed;
  return k;
}

TEST(GpuLargeShapes, ManySplitsPerChannelNCHW) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  gpu_vs_cpu<float, 2>(large(bn::Shape{128, 4, 64, 64}, bn::Mode::per_channel, 900));
}

TEST(GpuLargeShapes, BatchNorm1dTallRowMajor) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  gpu_vs_cpu<float, 1>(large(bn::Shape{125000, 50}, bn::Mode::per_channel, 901));
  // One feature: one contiguous column, reduced as a plane.
  gpu_vs_cpu<float, 1>(large(bn::Shape{200000, 1}, bn::Mode::per_channel, 902));
}

TEST(GpuLargeShapes, LongPlanes) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  gpu_vs_cpu<float, 2>(large(bn::Shape{2, 3, 1, 1 << 20}, bn::Mode::per_channel, 903));
  Spec k = large(bn::Shape{3, 2, 1 << 19}, bn::Mode::per_channel, 904);
  k.fused = true;
  gpu_vs_cpu<float, 1>(k);
}

TEST(GpuLargeShapes, ChannelsLastPerChannelAndPerActivation) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  gpu_vs_cpu<float, 2>(large(bn::Shape({32, 96, 28, 28}, bn::Layout::channels_last), bn::Mode::per_channel, 905));
  gpu_vs_cpu<float, 2>(
      large(bn::Shape({256, 6, 4, 5}, bn::Layout::channels_last), bn::Mode::per_activation, 906));  // C·S = 120
  gpu_vs_cpu<float, 2>(
      large(bn::Shape({8192, 3, 5, 3}, bn::Layout::channels_last), bn::Mode::per_activation, 907));  // tall, split
  gpu_vs_cpu<float, 1>(large(bn::Shape{1024, 8, 16}, bn::Mode::per_activation, 908));  // contiguous rows
  gpu_vs_cpu<float, 3>(large(bn::Shape({8, 5, 16, 16, 16}, bn::Layout::channels_last), bn::Mode::per_channel, 909));
}

TEST(GpuLargeShapes, HalfOnASplitPlane) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  gpu_vs_cpu<__half, 2>(large(bn::Shape{64, 3, 64, 64}, bn::Mode::per_channel, 910));
  gpu_vs_cpu<__nv_bfloat16, 2>(
      large(bn::Shape({64, 3, 64, 64}, bn::Layout::channels_last), bn::Mode::per_channel, 911));
}

}  // namespace
