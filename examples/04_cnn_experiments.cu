// 04_cnn_experiments.cu: BatchNorm2d in a small convolutional network, and the experiments
// people quote about batch normalization, measured on it.
//
// The network classifies the 8x8 handwritten digits of examples/data (1797 images, see
// examples/data/NOTICE; the loader and the fixed 1437/360 train/test split are shared with
// 03_convergence through examples/common/digits.hpp):
//
//   input 1x8x8
//   -> conv3x3(1->8)   [BatchNorm2d(8)]  -> ReLU                        8x8x8
//   -> conv3x3(8->16)  [BatchNorm2d(16)] -> ReLU -> 2x2 average pool   16x4x4
//   -> conv3x3(16->32) [BatchNorm2d(32)] -> ReLU -> 2x2 average pool   32x2x2
//   -> linear(128->10) -> softmax cross-entropy
//
// once with the three BatchNorm2d layers (batchnorm::BatchNorm2d<float, Backend>, the
// library's) and once without ("plain"). The convolutions (zero padding 1), pooling, ReLU,
// the linear layer and plain SGD (no momentum, no weight decay) are this file's own short
// code. Both networks start from the same weights (He-uniform convolutions, PyTorch's
// default for the linear layer, zero biases), see the same mini-batches in the same order
// and use the same learning rate; the only difference is BN. It is repeated for several
// learning rates, the largest chosen so that the plain network fails (at 3 its loss stays at
// ln 10, chance level, while the BN network trains).
//
// What it measures (all in --out, default cnn/ next to the executable):
//   1. training loss per step and test accuracy per epoch      -> cnn_training.svg
//      (BN evaluated in eval mode, with its running statistics);
//   2. the histogram of each convolution's weights at the end  -> cnn_weights.svg;
//   3. the loss landscape along the gradient, as in Figure 4 of Santurkar et al., "How Does
//      Batch Normalization Help Optimization?" (NeurIPS 2018)    -> cnn_landscape.svg:
//      every --probe-every steps, on that step's mini-batch, with g = grad L(w), the loss
//      L(w - eta g) and the gradient change ||grad L(w) - grad L(w - eta g)|| for eta in
//      lr x {0.25, 0.5, 1, 1.5, 2}. The "loss range" of a step is max - min of those losses.
//      The probes run on a snapshot that is restored afterwards (weights and BN running
//      statistics), so training follows the same path with and without them.
//   CSV files with the numbers behind the plots: cnn_epochs.csv, cnn_probes.csv.
//
// It checks itself, and exits with 1 when a check fails:
//   - self-test first: the convolution's forward against a naive double-precision sum, its
//     backward (weights, bias, input) and the average pool's against finite differences,
//     and each whole network's gradient against a central difference along a random
//     direction (which covers BatchNorm2d's backward in training mode too);
//   - at the largest learning rate, BN reaches --target test accuracy in fewer epochs than
//     the plain network (which may not reach it at all);
//   - at every learning rate where the plain network reaches the target too (so both train),
//     BN's median loss range along the gradient is below half the plain network's (a
//     non-finite loss counts as an infinite range); there must be at least one such rate.
//     Where the plain network fails it predicts at chance, and its landscape is flat for that
//     bad reason (the fraction of ReLU outputs above zero, printed per run, tells whether its
//     ReLUs died): the numbers are printed and plotted but not compared.
// ctest runs `--quick` (rates 0.3 and 3, 6 epochs) so that these hold on every build.
//
// The same source builds with a plain C++ compiler (04_cnn_experiments.cpp includes it; CPU
// backend, batchnorm::cpu) and with nvcc (this file; CUDA backend, batchnorm::cuda). The CUDA
// build needs a GPU at run time: without one it says so and exits 0 without results. With one
// it first trains the BN network on both backends for 20 steps from the same start and checks
// that their losses agree within 1e-3 (relative to the largest), then runs the experiments with BN on the GPU (the
// convolutions stay on the host: they are this example's, not the library's).
//
// Usage: example_cnn_experiments [--out DIR] [--epochs N] [--lr R1,R2,...] [--batch B]
//                                [--seed S] [--target PCT] [--probe-every K]
//                                [--data digits.csv] [--quick]

#include <batchnorm/batchnorm.hpp>

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include <batchnorm/cuda.cuh>
#endif

#include "common/cli.hpp"     // Options: the command-line table
#include "common/digits.hpp"  // Rng, Dataset, load_digits, the split, softmax_cross_entropy
#include "common/linear.hpp"  // Linear
#include "common/svg.hpp"     // SvgDocument, kBnColor, kPlainColor

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef BATCHNORM_DIGITS_CSV
#define BATCHNORM_DIGITS_CSV "examples/data/digits.csv"
#endif
#ifndef BATCHNORM_CNN_OUT
#define BATCHNORM_CNN_OUT "cnn"  // CMake sets it to <build>/examples/cnn
#endif

namespace {

using digits::Dataset;
using digits::format;
using digits::kClasses;
using digits::kPixels;
using digits::kSide;
using digits::LossResult;
using digits::Rng;
using digits::softmax_cross_entropy;

const std::vector<double> kEtaFactors{0.25, 0.5, 1.0, 1.5, 2.0};  // probe steps, times lr

// ---- configuration -------------------------------------------------------------------

struct Config {
  std::string out_dir = BATCHNORM_CNN_OUT;
  std::string data = BATCHNORM_DIGITS_CSV;
  int epochs = 20;
  std::vector<double> learning_rates{0.03, 0.3, 3.0};
  int batch = 32;
  std::uint64_t seed = 1;
  double target = 90.0;  // test accuracy (%) for "epochs to reach"
  int probe_every = 15;  // steps between landscape probes
  bool quick = false;
};

Config parse_args(int argc, char** argv) {
  Config config;
  examples::Options options(
      "usage: example_cnn_experiments [--out DIR] [--epochs N] [--lr R1,R2,...] [--batch B] [--seed S]\n"
      "                               [--target PCT] [--probe-every K] [--data digits.csv] [--quick]\n");
  options.value("--out", "DIR", config.out_dir, "where the SVG and CSV files go (default: " BATCHNORM_CNN_OUT ")")
      .value("--epochs", "N", config.epochs, "epochs per run (default 20; --quick: 6)")
      .value("--lr", "LIST", config.learning_rates, "learning rates, comma-separated (default 0.03,0.3,3; --quick: 0.3,3)")
      .value("--batch", "B", config.batch, "mini-batch size (default 32)")
      .value("--seed", "S", config.seed, "seed of the initial weights and of the batch order (default 1)")
      .value("--target", "PCT", config.target, "test accuracy for the 'epochs to reach' check (default 90)")
      .value("--probe-every", "K", config.probe_every, "steps between loss-landscape probes (default 15)")
      .value("--data", "PATH", config.data, "the digits CSV (default: the copy in the source tree)")
      .flag("--quick", config.quick, "the short configuration ctest runs (--epochs and --lr override it)");
  options.parse(argc, argv);
  if (config.quick) {
    if (!options.given("--epochs")) config.epochs = 6;
    if (!options.given("--lr")) config.learning_rates = {0.3, 3.0};
  }
  if (config.epochs < 1) throw std::invalid_argument("--epochs must be >= 1");
  if (config.batch < 2) throw std::invalid_argument("--batch must be >= 2 (BatchNorm needs 2 samples)");
  if (config.probe_every < 1) throw std::invalid_argument("--probe-every must be >= 1");
  if (config.learning_rates.empty()) throw std::invalid_argument("--lr needs at least one rate");
  for (double lr : config.learning_rates)
    if (!(lr > 0.0)) throw std::invalid_argument("learning rates must be > 0");
  return config;
}

// ---- the layers this example writes itself ---------------------------------------------
// Activations are NCHW arrays in host memory. Every backward writes (does not accumulate)
// its parameter gradients.

/// 3x3 convolution, stride 1, zero padding 1 (the output has the input's size).
struct Conv3x3 {
  int cin, cout;
  std::vector<float> w, b, gw, gb;  // w: cout x cin x 3 x 3

  /// He-uniform weights (uniform in +-sqrt(6 / fan_in), the init for ReLU networks), zero bias.
  Conv3x3(int in_channels, int out_channels, Rng& rng)
      : cin(in_channels), cout(out_channels), w(static_cast<std::size_t>(cout * cin * 9)),
        b(static_cast<std::size_t>(cout), 0.0f), gw(w.size()), gb(b.size()) {
    const double bound = std::sqrt(6.0 / (cin * 9));
    for (float& v : w) v = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
  }

  void forward(const float* x, int rows, int side, float* y) const {
    const int area = side * side;
    for (int n = 0; n < rows; ++n)
      for (int co = 0; co < cout; ++co) {
        float* yo = y + static_cast<std::ptrdiff_t>(n * cout + co) * area;
        std::fill(yo, yo + area, b[static_cast<std::size_t>(co)]);
        for (int ci = 0; ci < cin; ++ci) {
          const float* xi = x + static_cast<std::ptrdiff_t>(n * cin + ci) * area;
          const float* k = &w[static_cast<std::size_t>((co * cin + ci) * 9)];
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const float wv = k[ky * 3 + kx];
              const int dy = ky - 1, dx = kx - 1;
              const int x_lo = std::max(0, -dx), x_hi = std::min(side, side - dx);  // in-bounds columns
              for (int oy = std::max(0, -dy); oy < std::min(side, side - dy); ++oy) {
                float* yrow = yo + oy * side;
                const float* xrow = xi + (oy + dy) * side + dx;
                for (int ox = x_lo; ox < x_hi; ++ox) yrow[ox] += wv * xrow[ox];
              }
            }
        }
      }
  }

  /// gw, gb from the layer input @p x and output gradient @p dy; dx too when not null.
  void backward(const float* x, const float* dy, int rows, int side, float* dx) {
    const int area = side * side;
    std::fill(gw.begin(), gw.end(), 0.0f);
    std::fill(gb.begin(), gb.end(), 0.0f);
    if (dx) std::fill(dx, dx + static_cast<std::ptrdiff_t>(rows) * cin * area, 0.0f);
    for (int n = 0; n < rows; ++n)
      for (int co = 0; co < cout; ++co) {
        const float* go = dy + static_cast<std::ptrdiff_t>(n * cout + co) * area;
        for (int i = 0; i < area; ++i) gb[static_cast<std::size_t>(co)] += go[i];
        for (int ci = 0; ci < cin; ++ci) {
          const float* xi = x + static_cast<std::ptrdiff_t>(n * cin + ci) * area;
          float* dxi = dx ? dx + static_cast<std::ptrdiff_t>(n * cin + ci) * area : nullptr;
          const std::size_t k = static_cast<std::size_t>((co * cin + ci) * 9);
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const float wv = w[k + static_cast<std::size_t>(ky * 3 + kx)];
              const int ddy = ky - 1, ddx = kx - 1;
              const int x_lo = std::max(0, -ddx), x_hi = std::min(side, side - ddx);
              float acc = 0.0f;
              for (int oy = std::max(0, -ddy); oy < std::min(side, side - ddy); ++oy) {
                const float* grow = go + oy * side;
                const std::ptrdiff_t in_row = (oy + ddy) * side + ddx;
                for (int ox = x_lo; ox < x_hi; ++ox) acc += grow[ox] * xi[in_row + ox];
                if (dxi)
                  for (int ox = x_lo; ox < x_hi; ++ox) dxi[in_row + ox] += wv * grow[ox];
              }
              gw[k + static_cast<std::size_t>(ky * 3 + kx)] += acc;
            }
        }
      }
  }
};

/// 2x2 average pooling, stride 2, over rows x channels planes of side x side.
void avg_pool2(const float* x, int planes, int side, float* y) {
  const int half = side / 2;
  for (int p = 0; p < planes; ++p)
    for (int oy = 0; oy < half; ++oy)
      for (int ox = 0; ox < half; ++ox) {
        const float* in = x + static_cast<std::ptrdiff_t>(p) * side * side + 2 * oy * side + 2 * ox;
        y[static_cast<std::ptrdiff_t>(p) * half * half + oy * half + ox] = 0.25f * (in[0] + in[1] + in[side] + in[side + 1]);
      }
}

void avg_pool2_backward(const float* dy, int planes, int side, float* dx) {
  const int half = side / 2;
  for (int p = 0; p < planes; ++p)
    for (int iy = 0; iy < side; ++iy)
      for (int ix = 0; ix < side; ++ix)
        dx[static_cast<std::ptrdiff_t>(p) * side * side + iy * side + ix] =
            0.25f * dy[static_cast<std::ptrdiff_t>(p) * half * half + (iy / 2) * half + ix / 2];
}

using Linear = examples::Linear<float>;  // common/linear.hpp: y = x W^T + b, PyTorch's default init

// ---- the library's BatchNorm2d, called with host arrays ----------------------------------

/// BatchNorm2d on host arrays. batchnorm::cpu takes them as they are.
template <class Backend>
class HostBatchNorm2d {
 public:
  explicit HostBatchNorm2d(int channels) : bn_(channels) {}
  void forward(const float* x, float* y, const batchnorm::Shape& shape, bool training) {
    bn_.train(training);
    bn_.forward(x, y, shape);
  }
  void backward(const float* x, const float* dy, float* dx, const batchnorm::Shape& shape) {
    bn_.backward(x, dy, dx, shape);
  }
  batchnorm::BatchNorm2d<float, Backend>& layer() { return bn_; }
  const batchnorm::BatchNorm2d<float, Backend>& layer() const { return bn_; }

 private:
  batchnorm::BatchNorm2d<float, Backend> bn_;
};

#ifdef __CUDACC__
void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

/// Device memory that grows on demand; freed by the destructor.
class DeviceFloats {
 public:
  DeviceFloats() = default;
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
  ~DeviceFloats() { cudaFree(data_); }
  float* get(std::size_t n) {
    if (n > size_) {
      cudaFree(data_);
      data_ = nullptr;
      cuda_check(cudaMalloc(&data_, n * sizeof(float)), "cudaMalloc");
      size_ = n;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  std::size_t size_ = 0;
};

/// batchnorm::cuda wants device pointers: copy in, run on the legacy default stream (which
/// cudaMemcpy orders against), copy out.
template <>
class HostBatchNorm2d<batchnorm::cuda> {
 public:
  explicit HostBatchNorm2d(int channels) : bn_(channels) {}
  void forward(const float* x, float* y, const batchnorm::Shape& shape, bool training) {
    const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * sizeof(float);
    float* dx = x_.get(bytes / sizeof(float));
    float* dy = y_.get(bytes / sizeof(float));
    cuda_check(cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    bn_.train(training);
    bn_.forward(dx, dy, shape);
    cuda_check(cudaMemcpy(y, dy, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  void backward(const float* x, const float* dy, float* dx, const batchnorm::Shape& shape) {
    const std::size_t n = static_cast<std::size_t>(shape.numel()), bytes = n * sizeof(float);
    float* d_x = x_.get(n);
    float* d_dy = y_.get(n);
    float* d_dx = dx_.get(n);
    cuda_check(cudaMemcpy(d_x, x, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    cuda_check(cudaMemcpy(d_dy, dy, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    bn_.backward(d_x, d_dy, d_dx, shape);
    cuda_check(cudaMemcpy(dx, d_dx, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  batchnorm::BatchNorm2d<float, batchnorm::cuda>& layer() { return bn_; }
  const batchnorm::BatchNorm2d<float, batchnorm::cuda>& layer() const { return bn_; }

 private:
  batchnorm::BatchNorm2d<float, batchnorm::cuda> bn_;
  DeviceFloats x_, y_, dx_;
};
#endif

// ---- the network -----------------------------------------------------------------------

/// conv3x3 -> [BatchNorm2d] -> ReLU, keeping what backward needs.
template <class Backend>
struct ConvBlock {
  Conv3x3 conv;
  std::unique_ptr<HostBatchNorm2d<Backend>> bn;  // null in the plain network
  int side;
  std::vector<float> z, n, a;  // conv output, BN output, ReLU output
  std::vector<float> da, dn, dz;

  ConvBlock(int cin, int cout, int side_, bool batchnorm, Rng& rng)
      : conv(cin, cout, rng), bn(batchnorm ? std::make_unique<HostBatchNorm2d<Backend>>(cout) : nullptr), side(side_) {}

  [[nodiscard]] batchnorm::Shape shape(int rows) const { return {rows, conv.cout, side, side}; }

  const std::vector<float>& forward(const float* x, int rows, bool training) {
    const auto size = static_cast<std::size_t>(rows) * static_cast<std::size_t>(conv.cout * side * side);
    for (auto* v : {&z, &n, &a, &da, &dn, &dz}) v->resize(size);
    conv.forward(x, rows, side, z.data());
    if (bn) bn->forward(z.data(), n.data(), shape(rows), training);
    const std::vector<float>& pre = bn ? n : z;
    for (std::size_t i = 0; i < size; ++i) a[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
    return a;
  }

  /// From the gradient w.r.t. the ReLU output (in da) to the conv's parameter gradients
  /// and, when @p dx is not null, the gradient w.r.t. the block input @p x.
  void backward(const float* x, int rows, float* dx) {
    const std::vector<float>& pre = bn ? n : z;
    for (std::size_t i = 0; i < da.size(); ++i) dn[i] = pre[i] > 0.0f ? da[i] : 0.0f;
    if (bn) bn->backward(z.data(), dn.data(), dz.data(), shape(rows));
    conv.backward(x, bn ? dz.data() : dn.data(), rows, side, dx);
  }
};

template <class Backend>
class Network {
 public:
  static constexpr int kFlat = 32 * 2 * 2;  // features into the linear layer

  /// The same @p seed gives the same convolution and linear weights with and without BN
  /// (BN's own parameters start at weight 1, bias 0, as in PyTorch).
  Network(bool batchnorm, std::uint64_t seed)
      : rng_(seed), b1_(1, 8, 8, batchnorm, rng_), b2_(8, 16, 8, batchnorm, rng_), b3_(16, 32, 4, batchnorm, rng_),
        fc_(kFlat, kClasses, rng_) {}

  [[nodiscard]] bool has_batchnorm() const { return b1_.bn != nullptr; }

  /// Logits of @p rows images (rows x 64 pixels). In training mode BN uses the batch's
  /// statistics and updates its running statistics; in eval mode it uses the running ones.
  const std::vector<float>& forward(const float* x, int rows, bool training) {
    x_ = x;
    const std::vector<float>& a1 = b1_.forward(x, rows, training);
    const std::vector<float>& a2 = b2_.forward(a1.data(), rows, training);
    p2_.resize(static_cast<std::size_t>(rows) * 16 * 16);
    avg_pool2(a2.data(), rows * 16, 8, p2_.data());
    const std::vector<float>& a3 = b3_.forward(p2_.data(), rows, training);
    p3_.resize(static_cast<std::size_t>(rows) * kFlat);
    avg_pool2(a3.data(), rows * 32, 4, p3_.data());
    logits_.resize(static_cast<std::size_t>(rows) * kClasses);
    fc_.forward(p3_.data(), rows, logits_.data());
    return logits_;
  }

  /// Gradients of every parameter from dloss/dlogits of the last (training) forward.
  void backward(const std::vector<float>& dlogits, int rows) {
    dp3_.resize(p3_.size());
    fc_.backward(p3_.data(), dlogits.data(), rows, dp3_.data());
    avg_pool2_backward(dp3_.data(), rows * 32, 4, b3_.da.data());
    dp2_.resize(p2_.size());
    b3_.backward(p2_.data(), rows, dp2_.data());
    avg_pool2_backward(dp2_.data(), rows * 16, 8, b2_.da.data());
    b2_.backward(b1_.a.data(), rows, b1_.da.data());
    b1_.backward(x_, rows, nullptr);
  }

  /// Every trainable parameter as one vector (conv weights and biases, BN weights and
  /// biases, linear weights and biases), and their gradients in the same order.
  [[nodiscard]] std::vector<float> parameters() const { return gather(false); }
  [[nodiscard]] std::vector<float> gradients() const { return gather(true); }

  /// Writes @p p (in parameters() order) into the layers; BN's running statistics stay.
  void set_parameters(const std::vector<float>& p) {
    std::size_t at = 0;
    auto take = [&](std::vector<float>& dst) {
      std::copy(p.begin() + static_cast<std::ptrdiff_t>(at), p.begin() + static_cast<std::ptrdiff_t>(at + dst.size()),
                dst.begin());
      at += dst.size();
    };
    for (ConvBlock<Backend>* b : blocks()) {
      take(b->conv.w);
      take(b->conv.b);
      if (b->bn) {
        batchnorm::State<float> s = b->bn->layer().state();
        take(s.weight);
        take(s.bias);
        b->bn->layer().load_state(s);
      }
    }
    take(fc_.w);
    take(fc_.b);
  }

  /// One step of plain SGD with the gradients of the last backward.
  void sgd_step(double lr) {
    std::vector<float> p = parameters();
    const std::vector<float> g = gradients();
    for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(p[i] - lr * g[i]);
    set_parameters(p);
  }

  /// Everything that training changes, to undo the landscape probes.
  struct Snapshot {
    std::vector<float> parameters;
    std::vector<batchnorm::State<float>> batchnorm;
  };
  [[nodiscard]] Snapshot snapshot() const {
    Snapshot s{parameters(), {}};
    for (const ConvBlock<Backend>* b : blocks())
      if (b->bn) s.batchnorm.push_back(b->bn->layer().state());
    return s;
  }
  void restore(const Snapshot& s) {
    set_parameters(s.parameters);
    std::size_t k = 0;
    for (ConvBlock<Backend>* b : blocks())
      if (b->bn) b->bn->layer().load_state(s.batchnorm[k++]);
  }

  /// Per block, the fraction of ReLU outputs above zero in the last forward: a block at 0
  /// passes nothing on, and the network computes a constant (its ReLUs "died").
  [[nodiscard]] std::vector<double> active_fractions() const {
    std::vector<double> out;
    for (const ConvBlock<Backend>* b : blocks()) {
      const auto active = std::count_if(b->a.begin(), b->a.end(), [](float v) { return v > 0.0f; });
      out.push_back(b->a.empty() ? NAN : static_cast<double>(active) / static_cast<double>(b->a.size()));
    }
    return out;
  }

  /// The weights of convolution @p layer (0, 1, 2).
  [[nodiscard]] const std::vector<float>& conv_weights(int layer) const { return blocks()[static_cast<std::size_t>(layer)]->conv.w; }

 private:
  [[nodiscard]] std::vector<ConvBlock<Backend>*> blocks() { return {&b1_, &b2_, &b3_}; }
  [[nodiscard]] std::vector<const ConvBlock<Backend>*> blocks() const { return {&b1_, &b2_, &b3_}; }

  [[nodiscard]] std::vector<float> gather(bool grad) const {
    std::vector<float> out;
    auto put = [&](const std::vector<float>& v) { out.insert(out.end(), v.begin(), v.end()); };
    for (const ConvBlock<Backend>* b : blocks()) {
      put(grad ? b->conv.gw : b->conv.w);
      put(grad ? b->conv.gb : b->conv.b);
      if (b->bn) {
        if (grad) {
          const batchnorm::Gradients<float> g = b->bn->layer().gradients();
          put(g.grad_weight);
          put(g.grad_bias);
        } else {
          const batchnorm::State<float> s = b->bn->layer().state();
          put(s.weight);
          put(s.bias);
        }
      }
    }
    put(grad ? fc_.gw : fc_.w);
    put(grad ? fc_.gb : fc_.b);
    return out;
  }

  Rng rng_;
  ConvBlock<Backend> b1_, b2_, b3_;
  Linear fc_;
  const float* x_ = nullptr;
  std::vector<float> p2_, p3_, dp2_, dp3_, logits_;
};

/// Loss (and, with @p backward, the gradients) of @p rows images in training mode.
template <class Backend>
LossResult loss_and_gradient(Network<Backend>& net, const float* x, const int* labels, int rows, bool backward) {
  std::vector<float> dlogits;
  const LossResult r = softmax_cross_entropy(net.forward(x, rows, true), labels, rows, backward ? &dlogits : nullptr);
  if (backward && std::isfinite(r.loss)) net.backward(dlogits, rows);
  return r;
}

double distance(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) sum += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
  return std::isfinite(sum) ? std::sqrt(sum) : INFINITY;
}

// ---- training and measuring ------------------------------------------------------------

/// Santurkar et al.'s Figure-4 measures at one step.
struct Probe {
  int step;
  double loss;                        // L(w) on the step's batch
  std::vector<double> moved_loss;     // L(w - eta g), one per eta (inf when not finite)
  std::vector<double> gradient_change;  // ||g - grad L(w - eta g)||, one per eta
  [[nodiscard]] double loss_range() const {
    const auto [lo, hi] = std::minmax_element(moved_loss.begin(), moved_loss.end());
    return std::isfinite(*hi) ? *hi - *lo : INFINITY;
  }
};

struct EpochRecord {
  int epoch;          // 0: before training
  double train_loss;  // mean mini-batch loss of the epoch (nan for epoch 0)
  double test_loss, test_accuracy;  // after the epoch, eval mode
};

struct RunResult {
  double lr;
  bool batchnorm;
  std::vector<double> step_loss;  // every mini-batch's loss, in order
  std::vector<EpochRecord> epochs;
  std::vector<Probe> probes;
  std::vector<std::vector<float>> conv_weights;  // at the end, per layer
  std::vector<double> active_relus;              // at the end, per block, on the test set
  bool diverged = false;
  double seconds = 0.0;
  [[nodiscard]] int epochs_to(double accuracy) const {
    for (const EpochRecord& e : epochs)
      if (e.test_accuracy >= accuracy) return e.epoch;
    return -1;
  }
  [[nodiscard]] double median_loss_range() const {
    std::vector<double> r;
    for (const Probe& p : probes) r.push_back(p.loss_range());
    if (r.empty()) return NAN;
    std::sort(r.begin(), r.end());
    return r.size() % 2 ? r[r.size() / 2] : 0.5 * (r[r.size() / 2 - 1] + r[r.size() / 2]);
  }
  [[nodiscard]] double mean_loss_range() const {
    double sum = 0.0;
    for (const Probe& p : probes) sum += p.loss_range();
    return probes.empty() ? NAN : sum / static_cast<double>(probes.size());
  }
};

template <class Backend>
Probe probe(Network<Backend>& net, const float* x, const int* labels, int rows, double lr, int step) {
  const typename Network<Backend>::Snapshot start = net.snapshot();
  Probe p{step, loss_and_gradient(net, x, labels, rows, true).loss, {}, {}};
  const std::vector<float> g = net.gradients();
  for (double factor : kEtaFactors) {
    std::vector<float> w = start.parameters;
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(w[i] - factor * lr * g[i]);
    net.set_parameters(w);
    const double loss = loss_and_gradient(net, x, labels, rows, true).loss;
    p.moved_loss.push_back(std::isfinite(loss) ? loss : INFINITY);
    p.gradient_change.push_back(std::isfinite(loss) ? distance(g, net.gradients()) : INFINITY);
  }
  net.restore(start);  // weights and running statistics as before: training is unaffected
  return p;
}

template <class Backend>
RunResult train(const Config& config, double lr, bool batchnorm, const Dataset& train_set, const Dataset& test_set,
                int max_steps = -1) {
  const auto start = std::chrono::steady_clock::now();
  Network<Backend> net(batchnorm, config.seed);  // same seed: same initial weights with and without BN
  Rng order(config.seed + 1000);                 // same batch order too
  RunResult result{lr, batchnorm, {}, {}, {}, {}, {}};
  std::vector<int> rows(static_cast<std::size_t>(train_set.count()));
  std::iota(rows.begin(), rows.end(), 0);
  Dataset batch;  // this step's rows
  auto test = [&](int epoch, double train_loss) {
    const LossResult on_test = softmax_cross_entropy(net.forward(test_set.x.data(), test_set.count(), false),
                                                     test_set.label.data(), test_set.count(), nullptr);
    result.epochs.push_back({epoch, train_loss, on_test.loss, 100.0 * on_test.correct / test_set.count()});
  };
  if (max_steps < 0) test(0, NAN);  // before training: the common starting point
  int step = 0;
  for (int epoch = 1; epoch <= config.epochs && !result.diverged; ++epoch) {
    order.shuffle(rows);
    double loss_sum = 0.0;
    int batches = 0;
    for (std::size_t begin = 0; begin + 2 <= rows.size(); begin += static_cast<std::size_t>(config.batch)) {
      if (max_steps >= 0 && step >= max_steps) return result;
      const int count = static_cast<int>(std::min(rows.size() - begin, static_cast<std::size_t>(config.batch)));
      digits::gather(train_set, &rows[begin], count, batch);
      if (max_steps < 0 && step % config.probe_every == 0)
        result.probes.push_back(probe(net, batch.x.data(), batch.label.data(), count, lr, step));
      const LossResult loss = loss_and_gradient(net, batch.x.data(), batch.label.data(), count, true);
      result.step_loss.push_back(loss.loss);
      ++step;
      loss_sum += loss.loss;
      ++batches;
      if (!std::isfinite(loss.loss)) {
        result.diverged = true;
        break;
      }
      net.sgd_step(lr);
    }
    test(epoch, result.diverged ? NAN : loss_sum / batches);
  }
  for (int layer = 0; layer < 3; ++layer) result.conv_weights.push_back(net.conv_weights(layer));
  result.active_relus = net.active_fractions();  // of the last forward: the test set, eval mode
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// ---- self-test ---------------------------------------------------------------------------

/// Largest |a - b| over the largest |b|.
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0.0, scale = 1e-30;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    worst = std::isfinite(d) ? std::max(worst, d) : INFINITY;
    scale = std::max(scale, std::fabs(b[i]));
  }
  return worst / scale;
}

bool report(const char* what, double error, double tolerance) {
  const bool ok = error <= tolerance;
  std::printf("  %-58s relative error %.1e (tolerance %.0e): %s\n", what, error, tolerance, ok ? "OK" : "FAILED");
  return ok;
}

/// Central differences of a function of @p v, one element at a time, written into a vector.
std::vector<double> finite_differences(std::vector<float>& v, const std::function<double()>& loss, float h) {
  std::vector<double> out;
  for (float& e : v) {
    const float keep = e;
    e = keep + h;
    const double up = loss();
    e = keep - h;
    const double down = loss();
    e = keep;
    out.push_back((up - down) / (2.0 * static_cast<double>(h)));
  }
  return out;
}

/// The layers this file writes against their definitions, then whole-network gradients.
template <class Backend>
bool self_test(const Dataset& train_set) {
  std::printf("self-test:\n");
  bool ok = true;
  Rng rng(7);
  auto uniform = [&rng](std::size_t n) {
    std::vector<float> v(n);
    for (float& e : v) e = static_cast<float>(2.0 * rng.uniform() - 1.0);
    return v;
  };
  const int rows = 2, cin = 2, cout = 3, side = 5, area = side * side;
  Conv3x3 conv(cin, cout, rng);
  conv.b = uniform(static_cast<std::size_t>(cout));
  std::vector<float> x = uniform(static_cast<std::size_t>(rows * cin * area));
  std::vector<float> y(static_cast<std::size_t>(rows * cout * area));
  conv.forward(x.data(), rows, side, y.data());

  // Forward against the definition, summed in double.
  std::vector<double> got(y.begin(), y.end()), want;
  for (int n = 0; n < rows; ++n)
    for (int co = 0; co < cout; ++co)
      for (int oy = 0; oy < side; ++oy)
        for (int ox = 0; ox < side; ++ox) {
          double sum = conv.b[static_cast<std::size_t>(co)];
          for (int ci = 0; ci < cin; ++ci)
            for (int ky = 0; ky < 3; ++ky)
              for (int kx = 0; kx < 3; ++kx) {
                const int iy = oy + ky - 1, ix = ox + kx - 1;
                if (iy < 0 || iy >= side || ix < 0 || ix >= side) continue;  // zero padding
                sum += static_cast<double>(conv.w[static_cast<std::size_t>(((co * cin + ci) * 3 + ky) * 3 + kx)]) *
                       x[static_cast<std::size_t>((n * cin + ci) * area + iy * side + ix)];
              }
          want.push_back(sum);
        }
  ok = report("conv3x3 forward vs the definition (double)", relative_error(got, want), 1e-5) && ok;

  // Backward against central differences of L = sum(r * conv(x)), r random.
  const std::vector<float> r = uniform(y.size());
  auto conv_loss = [&]() {
    conv.forward(x.data(), rows, side, y.data());
    double sum = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) sum += static_cast<double>(r[i]) * y[i];
    return sum;
  };
  std::vector<float> dx(x.size());
  conv.backward(x.data(), r.data(), rows, side, dx.data());
  const std::vector<float> gw = conv.gw, gb = conv.gb;
  const float h = 1e-2f;
  ok = report("conv3x3 backward: weight gradient vs finite differences",
              relative_error(std::vector<double>(gw.begin(), gw.end()), finite_differences(conv.w, conv_loss, h)), 1e-3) && ok;
  ok = report("conv3x3 backward: bias gradient vs finite differences",
              relative_error(std::vector<double>(gb.begin(), gb.end()), finite_differences(conv.b, conv_loss, h)), 1e-3) && ok;
  ok = report("conv3x3 backward: input gradient vs finite differences",
              relative_error(std::vector<double>(dx.begin(), dx.end()), finite_differences(x, conv_loss, h)), 1e-3) && ok;

  // Average pool: the same with L = sum(r * pool(x)), on 4x4 planes (the pool halves the side).
  const int even = 4;
  std::vector<float> x4 = uniform(static_cast<std::size_t>(rows * cin * even * even)), dpool(x4.size());
  std::vector<float> pooled(static_cast<std::size_t>(rows * cin * 4));
  const std::vector<float> r4 = uniform(pooled.size());
  avg_pool2_backward(r4.data(), rows * cin, even, dpool.data());
  auto pool_loss = [&]() {
    avg_pool2(x4.data(), rows * cin, even, pooled.data());
    double sum = 0.0;
    for (std::size_t i = 0; i < pooled.size(); ++i) sum += static_cast<double>(r4[i]) * pooled[i];
    return sum;
  };
  ok = report("2x2 average pool backward vs finite differences",
              relative_error(std::vector<double>(dpool.begin(), dpool.end()), finite_differences(x4, pool_loss, h)), 1e-3) && ok;

  // Whole networks: the directional derivative g . d against a central difference of the
  // training-mode loss on 16 training images, along d = (g + a random vector of g's length).
  const int batch = 16;
  for (bool bn : {false, true}) {
    Network<Backend> net(bn, 3);
    const float* images = train_set.x.data();
    const int* labels = train_set.label.data();
    loss_and_gradient(net, images, labels, batch, true);
    const std::vector<float> w = net.parameters(), g = net.gradients();
    std::vector<float> d = uniform(g.size());
    const double g_norm = distance(g, std::vector<float>(g.size(), 0.0f));
    const double d_norm = distance(d, std::vector<float>(d.size(), 0.0f));
    double slope = 0.0, d_len = 0.0;
    for (std::size_t i = 0; i < d.size(); ++i) {
      d[i] = static_cast<float>(g[i] / g_norm + d[i] / d_norm);
      d_len += static_cast<double>(d[i]) * d[i];
    }
    d_len = std::sqrt(d_len);
    for (std::size_t i = 0; i < d.size(); ++i) {
      d[i] = static_cast<float>(d[i] / d_len);
      slope += static_cast<double>(g[i]) * d[i];
    }
    const double step = 1e-3;
    auto moved = [&](double t) {
      std::vector<float> p = w;
      for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(p[i] + t * d[i]);
      net.set_parameters(p);
      return loss_and_gradient(net, images, labels, batch, false).loss;
    };
    const double numeric = (moved(step) - moved(-step)) / (2.0 * step);
    ok = report(bn ? "network with BatchNorm2d: gradient . d vs central difference"
                   : "plain network: gradient . d vs central difference",
                std::fabs(numeric - slope) / std::fabs(slope), 2e-2) && ok;
  }
  return ok;
}

// ---- plots: plain SVG ----------------------------------------------------------------------

using examples::kBnColor;     // common/svg.hpp: with BatchNorm blue, solid;
using examples::kPlainColor;  // plain orange, dashed

/// A value axis, linear in [lo, hi] or logarithmic over the decades 10^lo .. 10^hi.
struct Axis {
  double lo, hi;
  bool log = false;
  /// Position of @p v in [0, 1] (clamped).
  [[nodiscard]] double at(double v) const {
    const double t = log ? (std::log10(std::max(v, 1e-300)) - lo) / (hi - lo) : (v - lo) / (hi - lo);
    return std::clamp(t, 0.0, 1.0);
  }
  /// Tick values: every decade, or a round step giving at most 6 ticks.
  [[nodiscard]] std::vector<double> ticks() const {
    std::vector<double> t;
    if (log) {
      for (double e = lo; e <= hi + 1e-9; e += 1.0) t.push_back(std::pow(10.0, e));
      return t;
    }
    const double raw = (hi - lo) / 5.0, decade = std::pow(10.0, std::floor(std::log10(raw)));
    double step = decade;
    for (double m : {1.0, 2.0, 5.0, 10.0})
      if (m * decade >= raw) {
        step = m * decade;
        break;
      }
    for (double v = std::ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) t.push_back(std::fabs(v) < 1e-12 ? 0.0 : v);
    return t;
  }
  /// Decades that span [lo_value, hi_value] (positive values).
  static Axis decades(double lo_value, double hi_value) {
    if (!(lo_value > 0.0) || !(lo_value <= hi_value)) return {-1.0, 1.0, true};
    const double a = std::floor(std::log10(lo_value)), b = std::ceil(std::log10(hi_value));
    return {a, std::max(b, a + 1.0), true};
  }
};

/// An SVG document (common/svg.hpp) made of panels (plot areas with two axes).
class Svg : public examples::SvgDocument {
 public:
  using SvgDocument::SvgDocument;

  void title(const std::string& title, const std::string& subtitle) {
    text(width() / 2, 24, title, "middle", 16, "bold");
    text(width() / 2, 44, subtitle, "middle", 12, "normal", "#555");
  }
  void legend(double y) {
    const double cx = width() / 2;
    line(cx - 170, y, cx - 130, y, kBnColor, 2.5);
    text(cx - 124, y + 5, "with BatchNorm2d", "start", 13);
    line(cx + 20, y, cx + 60, y, kPlainColor, 2.5, "7,4");
    text(cx + 66, y + 5, "without (plain)", "start", 13);
  }
  /// A plot area at (x0, y0) of w x h pixels; frame() draws the box, grid and labels.
  struct Panel {
    Svg& svg;
    double x0, y0, w, h;
    Axis xa, ya;
    [[nodiscard]] double px(double v) const { return x0 + w * xa.at(v); }
    [[nodiscard]] double py(double v) const { return y0 + h * (1.0 - ya.at(v)); }
    void frame(const std::string& xlabel, const std::string& ylabel, const std::string& heading = "") const {
      svg.raw() << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << w << "\" height=\"" << h
                << "\" fill=\"#fafafa\" stroke=\"#999\"/>\n";
      for (double v : ya.ticks()) {
        svg.line(x0, py(v), x0 + w, py(v), "#ddd", 1);
        svg.text(x0 - 5, py(v) + 4, format(v, "%g"), "end", 10);
      }
      for (double v : xa.ticks()) {
        svg.line(px(v), y0 + h, px(v), y0 + h + 4, "#666", 1);
        svg.text(px(v), y0 + h + 16, format(v, "%g"), "middle", 10);
      }
      svg.text(x0 + w / 2, y0 + h + 32, xlabel, "middle", 11);
      if (!ylabel.empty()) svg.text(x0 - 45, y0 + h / 2, ylabel, "middle", 11, "normal", "#222", -90);
      if (!heading.empty()) svg.text(x0 + w / 2, y0 - 8, heading, "middle", 12, "bold");
    }
    /// A line through the finite points (data coordinates).
    void curve(const std::vector<std::pair<double, double>>& pts, bool batchnorm, double width = 1.8) const {
      std::vector<std::pair<double, double>> p;
      for (const auto& [x, y] : pts)
        if (std::isfinite(x) && std::isfinite(y)) p.emplace_back(px(x), py(y));
      svg.path(p, batchnorm ? kBnColor : kPlainColor, width, batchnorm ? nullptr : "6,3");
    }
    /// The region between lo(x) and hi(x), shaded, outlined.
    void band(const std::vector<double>& xs, const std::vector<double>& lo, const std::vector<double>& hi,
              bool batchnorm) const {
      std::vector<std::pair<double, double>> p;
      for (std::size_t i = 0; i < xs.size(); ++i) p.emplace_back(px(xs[i]), py(hi[i]));
      for (std::size_t i = xs.size(); i-- > 0;) p.emplace_back(px(xs[i]), py(lo[i]));
      svg.path(p, batchnorm ? kBnColor : kPlainColor, 1.0, batchnorm ? nullptr : "4,2", 0.25);
    }
    void note(int line_no, const std::string& content, bool batchnorm) const {
      svg.text(x0 + w - 6, y0 + 16 + 15 * line_no, content, "end", 11, "normal", batchnorm ? kBnColor : kPlainColor);
    }
  };
  Panel panel(double x0, double y0, double w, double h, Axis xa, Axis ya) { return {*this, x0, y0, w, h, xa, ya}; }
};

constexpr double kLeft = 75, kTop = 95, kPanelW = 280, kPanelH = 180, kGapX = 60, kGapY = 75;

const RunResult* find(const std::vector<RunResult>& runs, double lr, bool batchnorm) {
  for (const RunResult& r : runs)
    if (r.lr == lr && r.batchnorm == batchnorm) return &r;
  return nullptr;
}

/// 1: training loss per step and test accuracy per epoch, one column per learning rate.
void plot_training(const std::vector<RunResult>& runs, const Config& config, const std::string& path) {
  const auto columns = static_cast<double>(config.learning_rates.size());
  Svg svg(kLeft + columns * (kPanelW + kGapX), kTop + 2 * (kPanelH + kGapY));
  svg.title("Small CNN on 8x8 digits, plain SGD: with and without batchnorm::BatchNorm2d",
            "same initial weights, mini-batches (" + std::to_string(config.batch) +
                ") and learning rate; test accuracy with BN in eval mode (running statistics)");
  svg.legend(66);
  double lo = INFINITY, hi = 0.0, steps = 1.0;
  for (const RunResult& r : runs) {
    steps = std::max(steps, static_cast<double>(r.step_loss.size()));
    for (double l : r.step_loss)
      if (std::isfinite(l) && l > 0) lo = std::min(lo, l), hi = std::max(hi, std::min(l, 100.0));
  }
  for (std::size_t c = 0; c < config.learning_rates.size(); ++c) {
    const double lr = config.learning_rates[c], x0 = kLeft + static_cast<double>(c) * (kPanelW + kGapX);
    const auto loss = svg.panel(x0, kTop, kPanelW, kPanelH, {0.0, steps}, Axis::decades(lo, hi));
    loss.frame("step", c == 0 ? "training loss per step (log)" : "", "learning rate " + format(lr, "%g"));
    const auto acc = svg.panel(x0, kTop + kPanelH + kGapY, kPanelW, kPanelH, {0.0, static_cast<double>(config.epochs)},
                               {0.0, 100.0});
    acc.frame("epoch", c == 0 ? "test accuracy (%)" : "");
    svg.line(acc.x0, acc.py(config.target), acc.x0 + kPanelW, acc.py(config.target), "#999", 1, "2,3");
    int line_no = 0;
    for (bool bn : {false, true}) {
      const RunResult* r = find(runs, lr, bn);
      if (!r) continue;
      std::vector<std::pair<double, double>> pts, epochs;
      for (std::size_t i = 0; i < r->step_loss.size(); ++i) pts.emplace_back(static_cast<double>(i), r->step_loss[i]);
      loss.curve(pts, bn, 1.0);
      for (const EpochRecord& e : r->epochs) epochs.emplace_back(e.epoch, e.test_accuracy);
      acc.curve(epochs, bn, 2.0);
      const int reach = r->epochs_to(config.target);
      acc.note(5 + line_no++, (bn ? "BN: " : "plain: ") + (reach > 0 ? format(config.target, "%g") + " % at epoch " +
                                   std::to_string(reach) : "never " + format(config.target, "%g") + " %") +
                                  (r->diverged ? " (diverged)" : ""), bn);
    }
  }
  svg.save(path);
}

/// 2: histograms of each convolution's final weights, one row per learning rate.
void plot_weights(const std::vector<RunResult>& runs, const Config& config, const std::string& path) {
  const auto rows = static_cast<double>(config.learning_rates.size());
  Svg svg(kLeft + 3 * (kPanelW + kGapX), kTop + rows * (kPanelH + kGapY));
  svg.title("Final weights of each convolution, with and without BatchNorm2d",
            "histograms of the conv3x3 weights after " + std::to_string(config.epochs) +
                " epochs (same initial weights: He-uniform); one row per learning rate");
  svg.legend(66);
  const char* names[] = {"conv1 (1->8)", "conv2 (8->16)", "conv3 (16->32)"};
  const int bins = 40;
  for (std::size_t row = 0; row < config.learning_rates.size(); ++row) {
    const double lr = config.learning_rates[row], y0 = kTop + static_cast<double>(row) * (kPanelH + kGapY);
    for (int layer = 0; layer < 3; ++layer) {
      const double x0 = kLeft + layer * (kPanelW + kGapX);
      // A symmetric range covering both networks' finite weights.
      double extent = 0.0;
      for (bool bn : {false, true})
        if (const RunResult* r = find(runs, lr, bn); r && !r->conv_weights.empty())
          for (float v : r->conv_weights[static_cast<std::size_t>(layer)])
            if (std::isfinite(v)) extent = std::max(extent, static_cast<double>(std::fabs(v)));
      extent = extent > 0 ? extent * 1.02 : 1.0;
      std::vector<std::vector<double>> counts;
      double top = 1.0;
      for (bool bn : {false, true}) {
        std::vector<double> h(bins, 0.0);
        if (const RunResult* r = find(runs, lr, bn); r && !r->conv_weights.empty()) {
          const auto& w = r->conv_weights[static_cast<std::size_t>(layer)];
          for (float v : w)
            if (std::isfinite(v))
              h[static_cast<std::size_t>(std::clamp(static_cast<int>((v + extent) / (2 * extent) * bins), 0, bins - 1))] +=
                  100.0 / static_cast<double>(w.size());
        }
        for (double v : h) top = std::max(top, v);
        counts.push_back(h);
      }
      const auto p = svg.panel(x0, y0, kPanelW, kPanelH, {-extent, extent}, {0.0, top * 1.1});
      p.frame("weight", layer == 0 ? "% of weights (lr " + format(lr, "%g") + ")" : "",
              std::string(names[layer]) + ", learning rate " + format(lr, "%g"));
      for (bool bn : {false, true}) {
        const std::vector<double>& h = counts[bn ? 1 : 0];
        std::vector<std::pair<double, double>> outline{{p.px(-extent), p.py(0)}};
        for (int b = 0; b < bins; ++b) {
          const double a = -extent + 2 * extent * b / bins, z = -extent + 2 * extent * (b + 1) / bins;
          outline.emplace_back(p.px(a), p.py(h[static_cast<std::size_t>(b)]));
          outline.emplace_back(p.px(z), p.py(h[static_cast<std::size_t>(b)]));
        }
        outline.emplace_back(p.px(extent), p.py(0));
        svg.path(outline, bn ? kBnColor : kPlainColor, 1.2, bn ? nullptr : "4,2", 0.2);
        const RunResult* r = find(runs, lr, bn);
        if (!r || r->conv_weights.empty()) continue;
        double sum = 0.0, sq = 0.0, n = 0.0;
        for (float v : r->conv_weights[static_cast<std::size_t>(layer)])
          if (std::isfinite(v)) sum += v, sq += static_cast<double>(v) * v, n += 1.0;
        const double mean = n > 0 ? sum / n : NAN;
        p.note(bn ? 1 : 0, std::string(bn ? "BN" : "plain") + ": std " +
                               format(n > 0 ? std::sqrt(std::max(0.0, sq / n - mean * mean)) : NAN, "%.3f") +
                               (r->diverged ? " (diverged)" : ""), bn);
      }
    }
  }
  svg.save(path);
}

/// 3: Santurkar et al.'s Figure 4: the loss and the gradient change along the gradient.
void plot_landscape(const std::vector<RunResult>& runs, const Config& config, const std::string& path) {
  const auto columns = static_cast<double>(config.learning_rates.size());
  Svg svg(kLeft + columns * (kPanelW + kGapX), kTop + 2 * (kPanelH + kGapY));
  svg.title("Loss landscape along the gradient (Santurkar et al. 2018, Figure 4 measures)",
            "every " + std::to_string(config.probe_every) +
                " steps, on the step's batch, w - eta g for eta = lr x {0.25, 0.5, 1, 1.5, 2}: shaded from min to max");
  svg.legend(66);
  double loss_lo = INFINITY, loss_hi = 0.0, grad_lo = INFINITY, grad_hi = 0.0, steps = 1.0;
  for (const RunResult& r : runs) {
    steps = std::max(steps, static_cast<double>(r.step_loss.size()));
    for (const Probe& p : r.probes) {
      for (double l : p.moved_loss)
        if (std::isfinite(l) && l > 0) loss_lo = std::min(loss_lo, l), loss_hi = std::max(loss_hi, std::min(l, 1e3));
      for (double g : p.gradient_change)
        if (std::isfinite(g) && g > 0) grad_lo = std::min(grad_lo, g), grad_hi = std::max(grad_hi, std::min(g, 1e3));
    }
  }
  for (std::size_t c = 0; c < config.learning_rates.size(); ++c) {
    const double lr = config.learning_rates[c], x0 = kLeft + static_cast<double>(c) * (kPanelW + kGapX);
    const auto loss = svg.panel(x0, kTop, kPanelW, kPanelH, {0.0, steps}, Axis::decades(loss_lo, loss_hi));
    loss.frame("step", c == 0 ? "loss L(w - eta g) (log)" : "", "learning rate " + format(lr, "%g"));
    const auto grad = svg.panel(x0, kTop + kPanelH + kGapY, kPanelW, kPanelH, {0.0, steps},
                                Axis::decades(grad_lo, grad_hi));
    grad.frame("step", c == 0 ? "||grad L(w) - grad L(w - eta g)|| (log)" : "");
    for (bool bn : {false, true}) {
      const RunResult* r = find(runs, lr, bn);
      if (!r || r->probes.empty()) continue;
      std::vector<double> xs, llo, lhi, glo, ghi;
      for (const Probe& p : r->probes) {
        xs.push_back(p.step);
        // Non-finite values are drawn at the top of the axis: "off the chart".
        auto lo_hi = [](const std::vector<double>& v, std::vector<double>& lo, std::vector<double>& hi) {
          double a = INFINITY, b = 0.0;
          for (double e : v) a = std::min(a, std::isfinite(e) ? e : 1e300), b = std::max(b, std::isfinite(e) ? e : 1e300);
          lo.push_back(a);
          hi.push_back(b);
        };
        lo_hi(p.moved_loss, llo, lhi);
        lo_hi(p.gradient_change, glo, ghi);
      }
      loss.band(xs, llo, lhi, bn);
      grad.band(xs, glo, ghi, bn);
      loss.note(bn ? 1 : 0, std::string(bn ? "BN" : "plain") + ": median loss range " +
                                format(r->median_loss_range(), "%.3g"), bn);
    }
  }
  svg.save(path);
}

// ---- output --------------------------------------------------------------------------------

void write_csv(const std::string& dir, const std::vector<RunResult>& runs) {
  const std::string epochs_path = (std::filesystem::path(dir) / "cnn_epochs.csv").string();
  std::ofstream epochs(epochs_path);
  epochs << "lr,batchnorm,epoch,train_loss,test_loss,test_accuracy\n";
  for (const RunResult& r : runs)
    for (const EpochRecord& e : r.epochs)
      epochs << format(r.lr) << ',' << (r.batchnorm ? 1 : 0) << ',' << e.epoch << ',' << format(e.train_loss) << ','
             << format(e.test_loss) << ',' << format(e.test_accuracy, "%.4f") << '\n';
  const std::string probes_path = (std::filesystem::path(dir) / "cnn_probes.csv").string();
  std::ofstream probes(probes_path);
  probes << "lr,batchnorm,step,loss,eta,moved_loss,gradient_change\n";
  for (const RunResult& r : runs)
    for (const Probe& p : r.probes)
      for (std::size_t k = 0; k < kEtaFactors.size(); ++k)
        probes << format(r.lr) << ',' << (r.batchnorm ? 1 : 0) << ',' << p.step << ',' << format(p.loss) << ','
               << format(kEtaFactors[k] * r.lr) << ',' << format(p.moved_loss[k]) << ','
               << format(p.gradient_change[k]) << '\n';
  if (!epochs || !probes) throw std::runtime_error("error writing the CSV files in " + dir);
}

// ---- main ----------------------------------------------------------------------------------

#ifdef __CUDACC__
using Backend = batchnorm::cuda;
constexpr const char* kBackendName = "batchnorm::cuda (BatchNorm2d on the GPU; convolutions on the host)";

/// The GPU, or an empty string with the reason in @p why.
std::string find_gpu(std::string& why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    why = status == cudaSuccess ? "no CUDA device found" : std::string("no usable CUDA device: ") + cudaGetErrorName(status);
    (void)cudaGetLastError();
    return "";
  }
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  return prop.name;
}
#else
using Backend = batchnorm::cpu;
constexpr const char* kBackendName = "batchnorm::cpu";
#endif

int run(const Config& config) {
#ifdef __CUDACC__
  std::string why;
  const std::string gpu = find_gpu(why);
  if (gpu.empty()) {
    std::printf("CUDA build of example_cnn_experiments: %s.\nSKIPPED: nothing ran, no GPU results "
                "(the CPU build, example_cnn_experiments, runs the experiments).\n", why.c_str());
    return 0;
  }
  std::printf("GPU 0: %s\n", gpu.c_str());
#endif
  const Dataset all = digits::load_digits(config.data);
  const auto [train_set, test_set] = digits::train_test_split(all);
  std::printf("digits: %d images from %s; %d for training, %d for testing\n", all.count(), config.data.c_str(),
              train_set.count(), test_set.count());
  std::printf("BatchNorm2d backend: %s\n", kBackendName);
  std::printf("network: conv3x3(1->8) [BN] ReLU, conv3x3(8->16) [BN] ReLU, avgpool, conv3x3(16->32) [BN] ReLU, "
              "avgpool, linear(128->10); plain SGD, batch %d, %d epochs%s\n\n",
              config.batch, config.epochs, config.quick ? " (--quick)" : "");

  bool ok = self_test<Backend>(train_set);
#ifdef __CUDACC__
  {  // Both backends from the same start: the losses of the first steps must agree.
    const double lr = config.learning_rates.front(), tolerance = 1e-3;
    const int steps = 20;
    const RunResult on_cpu = train<batchnorm::cpu>(config, lr, true, train_set, test_set, steps);
    const RunResult on_gpu = train<batchnorm::cuda>(config, lr, true, train_set, test_set, steps);
    const double error = relative_error(on_gpu.step_loss, on_cpu.step_loss);
    ok = report("first 20 training losses (BN, lr from --lr): GPU vs CPU backend", error, tolerance) && ok;
  }
#endif
  std::printf("\n");
  if (!ok) {
    std::printf("FAILED (self-test)\n");
    return 1;
  }

  std::vector<RunResult> runs;
  for (double lr : config.learning_rates)
    for (bool bn : {false, true}) {
      runs.push_back(train<Backend>(config, lr, bn, train_set, test_set));
      const RunResult& r = runs.back();
      const EpochRecord& last = r.epochs.back();
      std::printf("lr %-5g %-10s epoch %3d: train loss %-9s test accuracy %6.2f %%%s; ReLU outputs > 0 on the "
                  "test set: %.0f / %.0f / %.0f %%  (%.1f s)\n", lr, bn ? "batchnorm" : "plain", last.epoch,
                  format(last.train_loss, "%.4f").c_str(), last.test_accuracy,
                  r.diverged ? "  DIVERGED (loss not finite)" : "", 100 * r.active_relus[0], 100 * r.active_relus[1],
                  100 * r.active_relus[2], r.seconds);
    }

  std::filesystem::create_directories(config.out_dir);
  write_csv(config.out_dir, runs);
  const std::filesystem::path out(config.out_dir);
  plot_training(runs, config, (out / "cnn_training.svg").string());
  plot_weights(runs, config, (out / "cnn_weights.svg").string());
  plot_landscape(runs, config, (out / "cnn_landscape.svg").string());

  std::printf("\nsummary (loss range: max - min of L(w - eta g) over eta = lr x {0.25 .. 2}, per probe):\n");
  std::printf("  %-6s %-10s %-14s %-13s %-12s %-19s %-17s %s\n", "lr", "network", "epochs to " ,
              "final test acc", "best acc", "median loss range", "mean loss range", "median max grad change");
  for (const RunResult& r : runs) {
    double best = 0.0;
    for (const EpochRecord& e : r.epochs) best = std::max(best, e.test_accuracy);
    std::vector<double> change;
    for (const Probe& p : r.probes) change.push_back(*std::max_element(p.gradient_change.begin(), p.gradient_change.end()));
    std::sort(change.begin(), change.end());
    const int reach = r.epochs_to(config.target);
    std::printf("  %-6g %-10s %-14s %-13s %-12s %-19s %-17s %s\n", r.lr, r.batchnorm ? "batchnorm" : "plain",
                (reach > 0 ? std::to_string(reach) : std::string("never")).c_str(),
                (format(r.epochs.back().test_accuracy, "%.2f") + " %").c_str(), (format(best, "%.2f") + " %").c_str(),
                format(r.median_loss_range(), "%.4g").c_str(), format(r.mean_loss_range(), "%.4g").c_str(),
                change.empty() ? "-" : format(change[change.size() / 2], "%.4g").c_str());
  }
  std::printf("  (epochs to reach %g %% test accuracy)\n", config.target);
  std::printf("\nwrote %s/{cnn_training,cnn_weights,cnn_landscape}.svg and {cnn_epochs,cnn_probes}.csv\n",
              config.out_dir.c_str());

  // The claims ctest checks, at the largest learning rate.
  const double high = *std::max_element(config.learning_rates.begin(), config.learning_rates.end());
  const RunResult* bn = find(runs, high, true);
  const RunResult* plain = find(runs, high, false);
  const int bn_epochs = bn->epochs_to(config.target), plain_epochs = plain->epochs_to(config.target);
  const bool faster = bn_epochs > 0 && (plain_epochs < 0 || bn_epochs < plain_epochs);
  std::printf("\ncheck: at lr %g BN reaches %g %% test accuracy in %s epochs, the plain network in %s: %s\n", high,
              config.target, bn_epochs > 0 ? std::to_string(bn_epochs).c_str() : "no",
              plain_epochs > 0 ? std::to_string(plain_epochs).c_str() : "no", faster ? "OK" : "FAILED");
  // The landscape is compared where both networks train: a network whose ReLUs all died (the
  // plain one at a rate too large for it) computes a constant, and its landscape is flat in
  // a useless way. So: at every rate where the plain network reaches the target, BN's median
  // loss range is below half the plain network's; and there must be at least one such rate.
  bool smoother = true;
  int compared = 0;
  for (double lr : config.learning_rates) {
    const RunResult* with_bn = find(runs, lr, true);
    const RunResult* without = find(runs, lr, false);
    if (without->epochs_to(config.target) < 0) {
      std::printf("check: at lr %g the plain network does not reach %g %%: loss ranges not compared "
                  "(BN %s, plain %s)\n", lr, config.target, format(with_bn->median_loss_range(), "%.4g").c_str(),
                  format(without->median_loss_range(), "%.4g").c_str());
      continue;
    }
    ++compared;
    const double bn_range = with_bn->median_loss_range(), plain_range = without->median_loss_range();
    const bool narrower = std::isfinite(bn_range) && bn_range < 0.5 * plain_range;
    std::printf("check: at lr %g BN's median loss range along the gradient (%s) is %s half the plain network's "
                "(%s): %s\n", lr, format(bn_range, "%.4g").c_str(), narrower ? "below" : "NOT below",
                format(plain_range, "%.4g").c_str(), narrower ? "OK" : "FAILED");
    smoother = smoother && narrower;
  }
  if (compared == 0) {
    std::printf("check: no learning rate at which the plain network reaches %g %%, so the loss ranges were not "
                "compared: FAILED (add a smaller --lr)\n", config.target);
    smoother = false;
  }
  ok = faster && smoother;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
