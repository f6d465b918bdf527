// 03_convergence.cpp: does BatchNorm make a network train faster? Measure it.
//
// A small multilayer perceptron classifies the 8x8 handwritten digits of examples/data
// (1797 images, see examples/data/NOTICE), once without and once with BatchNorm:
//
//   plain:      64 -> Linear(64) -> ReLU -> Linear(64) -> ReLU -> Linear(10) -> softmax
//   batchnorm:  64 -> Linear(64) -> BN -> ReLU -> Linear(64) -> BN -> ReLU -> Linear(10) -> softmax
//
// The linear layers, ReLU, the softmax cross-entropy loss and plain SGD (no momentum, no
// weight decay) are this file's own short code; the BN layers are the library's
// batchnorm::BatchNorm1d<float, batchnorm::cpu>, trained through forward / backward and
// updated through weight_data() / grad_weight_data(). Both networks start from the same
// weights (the same random stream), see the same mini-batches in the same order and use
// the same learning rate; the only difference is the two BN layers. This is repeated for
// several learning rates, the largest chosen so that the plain network does not cope.
//
// The split is fixed: 360 images for testing, 1437 for training, by a seeded shuffle.
// Pixels are scaled from 0..16 to 0..1 and not otherwise standardized.
//
// Output, in the directory given by --out (default: convergence/ next to the executable, in
// the build tree, so that a run from the source tree leaves nothing there):
//   convergence.csv  one row per (learning rate, network, epoch): the mean training loss of
//                    the epoch's mini-batches, and loss and accuracy on the whole training
//                    and test sets after the epoch (BN in eval mode, running statistics);
//   convergence.svg  training loss and test accuracy against epoch, one column per rate.
// A summary table goes to stdout: epochs to reach 90 % test accuracy, final numbers.
//
// It exits with 1 unless, at the largest learning rate, the BN network's final training
// loss (mean over the last epoch's mini-batches) is finite and below half the plain
// network's (a non-finite loss counts as infinite).
// ctest runs `--quick` (fewer epochs and rates) so that this claim is checked on every build.
//
// Usage: example_convergence [--out DIR] [--epochs N] [--lr R1,R2,...] [--batch B]
//                            [--seed S] [--data digits.csv] [--quick]

#include <batchnorm/batchnorm.hpp>

#include "common/cli.hpp"     // Options: the command-line table
#include "common/digits.hpp"  // Rng, Dataset, load_digits, the split, softmax_cross_entropy
#include "common/linear.hpp"  // Linear
#include "common/svg.hpp"     // SvgDocument, kBnColor, kPlainColor

#ifndef BATCHNORM_CONVERGENCE_OUT
#define BATCHNORM_CONVERGENCE_OUT "convergence"  // CMake sets it to <build>/examples/convergence
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
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

namespace {

using digits::Dataset;
using digits::format;
using digits::kClasses;
using digits::kPixels;
using digits::LossResult;
using digits::Rng;
using digits::softmax_cross_entropy;
using examples::kBnColor;
using examples::kPlainColor;

constexpr int kHidden = 64;

// ---- configuration -------------------------------------------------------------------

struct Config {
  std::string out_dir = BATCHNORM_CONVERGENCE_OUT;
  std::string data = BATCHNORM_DIGITS_CSV;
  int epochs = 30;
  std::vector<double> learning_rates{0.01, 0.1, 0.5, 2.0};
  int batch = 32;
  std::uint64_t seed = 1;
  bool quick = false;
};

Config parse_args(int argc, char** argv) {
  Config config;
  examples::Options options(
      "usage: example_convergence [--out DIR] [--epochs N] [--lr R1,R2,...] [--batch B]\n"
      "                           [--seed S] [--data digits.csv] [--quick]\n",
      14);
  options.value("--out", "DIR", config.out_dir, "where convergence.csv and convergence.svg go (default: " BATCHNORM_CONVERGENCE_OUT ")")
      .value("--epochs", "N", config.epochs, "epochs per run (default 30; --quick: 5)")
      .value("--lr", "LIST", config.learning_rates, "learning rates, comma-separated (default 0.01,0.1,0.5,2; --quick: 0.1,2)")
      .value("--batch", "B", config.batch, "mini-batch size (default 32)")
      .value("--seed", "S", config.seed, "seed of the initial weights and of the batch order (default 1)")
      .value("--data", "PATH", config.data, "the digits CSV (default: the copy in the source tree)")
      .flag("--quick", config.quick, "the short configuration ctest runs (--epochs and --lr override it)");
  options.parse(argc, argv);
  if (config.quick) {
    if (!options.given("--epochs")) config.epochs = 5;
    if (!options.given("--lr")) config.learning_rates = {0.1, 2.0};
  }
  if (config.epochs < 1) throw std::invalid_argument("--epochs must be >= 1");
  if (config.batch < 2) throw std::invalid_argument("--batch must be >= 2 (BatchNorm needs 2 samples)");
  if (config.learning_rates.empty()) throw std::invalid_argument("--lr needs at least one rate");
  for (double lr : config.learning_rates)
    if (!(lr > 0.0)) throw std::invalid_argument("learning rates must be > 0");
  return config;
}

// ---- the network -----------------------------------------------------------------------

using Linear = examples::Linear<float>;  // common/linear.hpp: y = x W^T + b, PyTorch init, SGD step
using BN = batchnorm::BatchNorm1d<float, batchnorm::cpu>;

class Network {
 public:
  Network(bool batchnorm, std::uint64_t seed) : rng_(seed), l1_(kPixels, kHidden, rng_), l2_(kHidden, kHidden, rng_),
                                                l3_(kHidden, kClasses, rng_) {
    if (batchnorm) {
      bn1_ = std::make_unique<BN>(kHidden);
      bn2_ = std::make_unique<BN>(kHidden);
    }
  }

  /// Logits of a batch of @p rows inputs. In training mode BN uses batch statistics and
  /// updates its running statistics; in eval mode it uses the running statistics.
  const std::vector<float>& forward(const float* x, int rows, bool training) {
    resize(rows);
    if (bn1_) {
      bn1_->train(training);
      bn2_->train(training);
    }
    const batchnorm::Shape shape{rows, kHidden};
    x_ = x;
    l1_.forward(x, rows, z1_.data());
    if (bn1_) bn1_->forward(z1_.data(), n1_.data(), shape);
    relu(bn1_ ? n1_ : z1_, a1_);
    l2_.forward(a1_.data(), rows, z2_.data());
    if (bn2_) bn2_->forward(z2_.data(), n2_.data(), shape);
    relu(bn2_ ? n2_ : z2_, a2_);
    l3_.forward(a2_.data(), rows, logits_.data());
    return logits_;
  }

  /// Backpropagates dlogits through the last training forward and takes one SGD step.
  void backward_and_step(const std::vector<float>& dlogits, int rows, float lr) {
    const batchnorm::Shape shape{rows, kHidden};
    l3_.backward(a2_.data(), dlogits.data(), rows, da2_.data());
    relu_backward(bn2_ ? n2_ : z2_, da2_, dn2_);  // gradient w.r.t. the ReLU's input
    if (bn2_) bn2_->backward(z2_.data(), dn2_.data(), dz2_.data(), shape);
    l2_.backward(a1_.data(), bn2_ ? dz2_.data() : dn2_.data(), rows, da1_.data());
    relu_backward(bn1_ ? n1_ : z1_, da1_, dn1_);
    if (bn1_) bn1_->backward(z1_.data(), dn1_.data(), dz1_.data(), shape);
    l1_.backward(x_, bn1_ ? dz1_.data() : dn1_.data(), rows, nullptr);

    l1_.sgd(lr);
    l2_.sgd(lr);
    l3_.sgd(lr);
    for (BN* bn : {bn1_.get(), bn2_.get()}) {
      if (!bn) continue;
      float* w = bn->weight_data();
      float* b = bn->bias_data();
      const float* gw = bn->grad_weight_data();
      const float* gb = bn->grad_bias_data();
      for (std::int64_t f = 0; f < bn->num_features(); ++f) {
        w[f] -= lr * gw[f];
        b[f] -= lr * gb[f];
      }
    }
  }

 private:
  static void relu(const std::vector<float>& in, std::vector<float>& out) {
    for (std::size_t i = 0; i < in.size(); ++i) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
  }
  static void relu_backward(const std::vector<float>& in, const std::vector<float>& dout, std::vector<float>& din) {
    for (std::size_t i = 0; i < in.size(); ++i) din[i] = in[i] > 0.0f ? dout[i] : 0.0f;
  }
  void resize(int rows) {
    const auto hidden = static_cast<std::size_t>(rows) * kHidden;
    for (auto* v : {&z1_, &n1_, &a1_, &z2_, &n2_, &a2_, &da1_, &dn1_, &dz1_, &da2_, &dn2_, &dz2_}) v->resize(hidden);
    logits_.resize(static_cast<std::size_t>(rows) * kClasses);
  }

  Rng rng_;
  Linear l1_, l2_, l3_;
  std::unique_ptr<BN> bn1_, bn2_;
  const float* x_ = nullptr;
  // Activations of the last forward: z = linear output, n = BN output, a = ReLU output.
  std::vector<float> z1_, n1_, a1_, z2_, n2_, a2_, logits_;
  std::vector<float> da1_, dn1_, dz1_, da2_, dn2_, dz2_;
};

// ---- training ------------------------------------------------------------------------

struct EpochRecord {
  int epoch;
  double train_loss;  // mean mini-batch loss during the epoch (what SGD saw)
  double train_eval_loss, train_accuracy, test_loss, test_accuracy;  // after the epoch, eval mode
};

struct RunResult {
  double lr;
  bool batchnorm;
  std::vector<EpochRecord> epochs;
  bool diverged = false;  // a mini-batch loss was not finite; training stopped there
  double seconds = 0.0;
  [[nodiscard]] double final_train_loss() const {
    const double l = epochs.empty() ? INFINITY : epochs.back().train_loss;
    return std::isfinite(l) ? l : INFINITY;
  }
  [[nodiscard]] int epochs_to(double test_accuracy) const {
    for (const EpochRecord& e : epochs)
      if (e.test_accuracy >= test_accuracy) return e.epoch;
    return -1;
  }
};

LossResult evaluate(Network& net, const Dataset& d) {
  const std::vector<float>& logits = net.forward(d.x.data(), d.count(), false);
  return softmax_cross_entropy(logits, d.label.data(), d.count(), nullptr);
}

RunResult train(const Config& config, double lr, bool batchnorm, const Dataset& train_set, const Dataset& test_set) {
  const auto start = std::chrono::steady_clock::now();
  Network net(batchnorm, config.seed);  // same seed: same initial weights with and without BN
  Rng order(config.seed + 1000);        // same batch order too
  RunResult result{lr, batchnorm, {}};
  std::vector<int> rows(static_cast<std::size_t>(train_set.count()));
  std::iota(rows.begin(), rows.end(), 0);
  Dataset batch;  // this step's rows
  std::vector<float> dlogits;
  for (int epoch = 1; epoch <= config.epochs && !result.diverged; ++epoch) {
    order.shuffle(rows);
    double loss_sum = 0.0;
    int batches = 0;
    // Full batches, plus the remainder when it has at least 2 rows (BN needs 2).
    for (std::size_t begin = 0; begin + 2 <= rows.size(); begin += static_cast<std::size_t>(config.batch)) {
      const int count = static_cast<int>(std::min(rows.size() - begin, static_cast<std::size_t>(config.batch)));
      digits::gather(train_set, &rows[begin], count, batch);
      const LossResult loss = softmax_cross_entropy(net.forward(batch.x.data(), count, true), batch.label.data(), count, &dlogits);
      loss_sum += loss.loss;
      ++batches;
      if (!std::isfinite(loss.loss)) {
        result.diverged = true;
        break;
      }
      net.backward_and_step(dlogits, count, static_cast<float>(lr));
    }
    const LossResult on_train = evaluate(net, train_set);
    const LossResult on_test = evaluate(net, test_set);
    result.epochs.push_back({epoch, result.diverged ? NAN : loss_sum / batches, on_train.loss,
                             100.0 * on_train.correct / train_set.count(), on_test.loss,
                             100.0 * on_test.correct / test_set.count()});
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// ---- output ----------------------------------------------------------------------------

void write_csv(const std::string& path, const std::vector<RunResult>& runs) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << "lr,batchnorm,epoch,train_loss,train_eval_loss,train_accuracy,test_loss,test_accuracy\n";
  for (const RunResult& r : runs)
    for (const EpochRecord& e : r.epochs)
      out << format(r.lr) << ',' << (r.batchnorm ? 1 : 0) << ',' << e.epoch << ',' << format(e.train_loss) << ','
          << format(e.train_eval_loss) << ',' << format(e.train_accuracy, "%.4f") << ',' << format(e.test_loss)
          << ',' << format(e.test_accuracy, "%.4f") << '\n';
  if (!out) throw std::runtime_error("error writing " + path);
}

/// A minimal SVG writer for line charts: one row of panels per quantity, one column per
/// learning rate, BN in blue (solid) and plain in orange (dashed).
class SvgPlot {
 public:
  SvgPlot(const std::vector<RunResult>& runs, const std::vector<double>& rates, int epochs)
      : runs_(runs), rates_(rates), epochs_(epochs) {}

  void write(const std::string& path) const {
    const int columns = static_cast<int>(rates_.size());
    const double width = kLeft + columns * kPanelW + (columns - 1) * kGapX + kRight;
    const double height = kTop + 2 * kPanelH + kGapY + kBottom;
    examples::SvgDocument svg(width, height);
    svg.text(width / 2, 24, "MLP on 8x8 handwritten digits, plain SGD: with and without batchnorm::BatchNorm1d",
             "middle", 16, "bold");
    legend(svg, width / 2, 48);

    // Loss axis: decades spanning every finite training loss.
    double lo = INFINITY, hi = 0.0;
    for (const RunResult& r : runs_)
      for (const EpochRecord& e : r.epochs)
        if (std::isfinite(e.train_loss) && e.train_loss > 0) {
          lo = std::min(lo, e.train_loss);
          hi = std::max(hi, e.train_loss);
        }
    if (!(lo <= hi)) lo = hi = 1.0;
    const double lo_exp = std::floor(std::log10(lo)), hi_exp = std::max(std::ceil(std::log10(hi)), lo_exp + 1);

    for (int col = 0; col < columns; ++col) {
      const double x0 = kLeft + col * (kPanelW + kGapX);
      const double lr = rates_[static_cast<std::size_t>(col)];
      svg.text(x0 + kPanelW / 2, kTop - 10, "learning rate " + format(lr, "%g"), "middle", 14, "bold");
      for (int row = 0; row < 2; ++row) {
        const double y0 = kTop + row * (kPanelH + kGapY);
        const bool loss = row == 0;
        Axis ya = loss ? Axis{lo_exp, hi_exp, true} : Axis{0.0, 100.0, false};
        panel(svg, x0, y0, ya, col == 0 ? (loss ? "training loss (log scale)" : "test accuracy (%)") : "");
        for (const RunResult& r : runs_) {
          if (r.lr != lr) continue;
          std::vector<std::pair<double, double>> pts;
          for (const EpochRecord& e : r.epochs) {
            const double v = loss ? e.train_loss : e.test_accuracy;
            if (std::isfinite(v) && (!loss || v > 0)) pts.emplace_back(e.epoch, v);
          }
          series(svg, x0, y0, ya, pts, r.batchnorm);
          if (r.diverged && !pts.empty()) {  // mark where training stopped
            const double px = x0 + sx(pts.back().first), py = y0 + ya.map(pts.back().second);
            svg.text(px + 6, py + 5, "diverged", "start", 12, "bold", r.batchnorm ? kBnColor : kPlainColor);
          }
        }
      }
    }
    svg.save(path);
  }

 private:
  static constexpr double kLeft = 80, kRight = 20, kTop = 90, kBottom = 50;
  static constexpr double kPanelW = 260, kPanelH = 190, kGapX = 55, kGapY = 60;

  /// A vertical axis: linear in [lo, hi], or decades 10^lo .. 10^hi.
  struct Axis {
    double lo, hi;
    bool log;
    [[nodiscard]] double map(double v) const {  // value -> offset from the panel's top
      const double t = log ? (std::log10(v) - lo) / (hi - lo) : (v - lo) / (hi - lo);
      return kPanelH * (1.0 - std::clamp(t, 0.0, 1.0));
    }
  };

  [[nodiscard]] double sx(double epoch) const {
    return epochs_ <= 1 ? kPanelW / 2 : kPanelW * (epoch - 1.0) / (epochs_ - 1.0);
  }

  static void legend(examples::SvgDocument& svg, double cx, double y) {
    svg.line(cx - 230, y, cx - 190, y, kBnColor, 2.5);
    svg.text(cx - 184, y + 5, "with BatchNorm", "start", 13);
    svg.line(cx - 40, y, cx, y, kPlainColor, 2.5, "7,4");
    svg.text(cx + 6, y + 5, "without (plain)", "start", 13);
    svg.text(cx + 130, y + 5, "same initial weights, batches and rate", "start", 12, "normal", "#555");
  }

  void panel(examples::SvgDocument& svg, double x0, double y0, const Axis& ya, const std::string& ylabel) const {
    svg.raw() << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << kPanelW << "\" height=\"" << kPanelH
              << "\" fill=\"#fafafa\" stroke=\"#999\"/>\n";
    // Horizontal grid and labels.
    if (ya.log) {
      for (double e = ya.lo; e <= ya.hi + 1e-9; e += 1.0) {
        const double v = std::pow(10.0, e), py = y0 + ya.map(v);
        svg.line(x0, py, x0 + kPanelW, py, "#ddd", 1);
        svg.text(x0 - 6, py + 4, format(v, "%g"), "end", 11);
      }
    } else {
      for (double v = ya.lo; v <= ya.hi + 1e-9; v += 20.0) {
        const double py = y0 + ya.map(v);
        svg.line(x0, py, x0 + kPanelW, py, "#ddd", 1);
        svg.text(x0 - 6, py + 4, format(v, "%g"), "end", 11);
      }
      const double p90 = y0 + ya.map(90.0);  // the 90 % mark used in the summary
      svg.line(x0, p90, x0 + kPanelW, p90, "#999", 1, "2,3");
      svg.text(x0 + kPanelW - 4, p90 - 4, "90 %", "end", 10, "normal", "#777");
    }
    // Epoch ticks at a round step.
    int step = 1;
    for (int candidate : {1, 2, 5, 10, 20, 50, 100, 200, 500})
      if (epochs_ / candidate <= 6) {
        step = candidate;
        break;
      }
    for (int e = 1; e <= epochs_; e += (e == 1 && step > 1 ? step - 1 : step)) {
      const double px = x0 + sx(e);
      svg.line(px, y0 + kPanelH, px, y0 + kPanelH + 4, "#666", 1);
      svg.text(px, y0 + kPanelH + 17, std::to_string(e), "middle", 11);
    }
    svg.text(x0 + kPanelW / 2, y0 + kPanelH + 35, "epoch", "middle", 12);
    if (!ylabel.empty()) {
      const double cx = x0 - 52, cy = y0 + kPanelH / 2;
      svg.raw() << "<text x=\"" << cx << "\" y=\"" << cy << "\" text-anchor=\"middle\" font-size=\"12\" fill=\"#222\""
                << " transform=\"rotate(-90 " << cx << ' ' << cy << ")\">" << ylabel << "</text>\n";
    }
  }

  void series(examples::SvgDocument& svg, double x0, double y0, const Axis& ya,
              const std::vector<std::pair<double, double>>& pts, bool batchnorm) const {
    if (pts.empty()) return;
    svg.raw() << "<polyline fill=\"none\" stroke=\"" << (batchnorm ? kBnColor : kPlainColor) << "\" stroke-width=\"2.2\""
              << (batchnorm ? "" : " stroke-dasharray=\"7,4\"") << " points=\"";
    for (const auto& [e, v] : pts) svg.raw() << x0 + sx(e) << ',' << y0 + ya.map(v) << ' ';
    svg.raw() << "\"/>\n";
    if (pts.size() == 1)
      svg.raw() << "<circle cx=\"" << x0 + sx(pts[0].first) << "\" cy=\"" << y0 + ya.map(pts[0].second)
                << "\" r=\"3\" fill=\"" << (batchnorm ? kBnColor : kPlainColor) << "\"/>\n";
  }

  const std::vector<RunResult>& runs_;
  const std::vector<double>& rates_;
  int epochs_;
};

// ---- main ------------------------------------------------------------------------------

int run(const Config& config) {
  const Dataset all = digits::load_digits(config.data);
  const auto [train_set, test_set] = digits::train_test_split(all);

  std::printf("digits: %d images from %s; %d for training, %d for testing\n", all.count(), config.data.c_str(),
              train_set.count(), test_set.count());
  std::printf("network: 64-64-64-10 MLP, ReLU, softmax cross-entropy; plain SGD, batch %d, %d epochs%s\n\n",
              config.batch, config.epochs, config.quick ? " (--quick)" : "");

  std::vector<RunResult> runs;
  for (double lr : config.learning_rates)
    for (bool bn : {false, true}) {
      runs.push_back(train(config, lr, bn, train_set, test_set));
      const RunResult& r = runs.back();
      const EpochRecord& last = r.epochs.back();
      std::printf("lr %-6g %-10s epoch %3d: train loss %-10s test accuracy %6.2f %%%s  (%.1f s)\n", lr,
                  bn ? "batchnorm" : "plain", last.epoch, format(last.train_loss, "%.4f").c_str(),
                  last.test_accuracy, r.diverged ? "  DIVERGED (loss not finite)" : "", r.seconds);
    }

  std::filesystem::create_directories(config.out_dir);
  const std::string csv = (std::filesystem::path(config.out_dir) / "convergence.csv").string();
  const std::string svg = (std::filesystem::path(config.out_dir) / "convergence.svg").string();
  write_csv(csv, runs);
  SvgPlot(runs, config.learning_rates, config.epochs).write(svg);

  std::printf("\nsummary (test accuracy after each epoch, BN in eval mode):\n");
  std::printf("  %-8s %-10s %-22s %-18s %-18s %s\n", "lr", "network", "epochs to 90 % test", "final train loss",
              "final test acc", "best test acc");
  for (const RunResult& r : runs) {
    double best = 0.0;
    for (const EpochRecord& e : r.epochs) best = std::max(best, e.test_accuracy);
    const int reach = r.epochs_to(90.0);
    std::printf("  %-8g %-10s %-22s %-18s %-18s %.2f %%\n", r.lr, r.batchnorm ? "batchnorm" : "plain",
                reach > 0 ? std::to_string(reach).c_str() : "not reached",
                (r.diverged ? std::string("diverged") : format(r.final_train_loss(), "%.4f")).c_str(),
                (format(r.epochs.back().test_accuracy, "%.2f") + " %").c_str(), best);
  }
  std::printf("\nwrote %s\nwrote %s\n", csv.c_str(), svg.c_str());

  // The claim ctest checks: at the largest rate, BN ends with the lower training loss, by
  // a clear margin (below half of the plain network's), so that two networks stuck at the
  // same loss do not pass on rounding.
  const double high = *std::max_element(config.learning_rates.begin(), config.learning_rates.end());
  double bn_loss = INFINITY, plain_loss = INFINITY;
  for (const RunResult& r : runs)
    if (r.lr == high) (r.batchnorm ? bn_loss : plain_loss) = r.final_train_loss();
  const bool holds = std::isfinite(bn_loss) && bn_loss < 0.5 * plain_loss;
  std::printf("\ncheck: at the largest learning rate (%g) the final training loss with BatchNorm (%s) is %s "
              "half the plain network's (%s)\n",
              high, format(bn_loss, "%.4f").c_str(), holds ? "below" : "NOT below", format(plain_loss, "%.4f").c_str());
  std::printf("%s\n", holds ? "OK" : "FAILED");
  return holds ? 0 : 1;
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
