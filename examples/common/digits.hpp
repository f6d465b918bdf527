// examples/common/digits.hpp: what the examples that train on the 8x8 handwritten digits
// (examples/data/digits.csv, see examples/data/NOTICE) share: the loader, the fixed
// train/test split, and softmax cross-entropy (the random stream is common/rng.hpp's).
// Header-only, no dependencies beyond the standard library; used by 03_convergence and
// 04_cnn_experiments.
#pragma once

#include "rng.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace digits {

constexpr int kPixels = 64;  // 8 x 8, row-major
constexpr int kSide = 8;
constexpr int kClasses = 10;
constexpr int kTestCount = 360;  // images held out for testing; the other 1437 train

using examples::Rng;  // common/rng.hpp: splitmix64, the same numbers on every platform

struct Dataset {
  std::vector<float> x;  // count x 64, row-major, pixels / 16
  std::vector<int> label;
  [[nodiscard]] int count() const { return static_cast<int>(label.size()); }
};

/// Reads rows of 64 pixel values (0..16) and a label (0..9), comma-separated.
inline Dataset load_digits(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path + " (pass --data PATH)");
  Dataset d;
  std::string line;
  int row = 0;
  while (std::getline(in, line)) {
    ++row;
    if (line.empty() || line == "\r") continue;
    std::stringstream fields(line);
    std::vector<double> v;
    for (std::string f; std::getline(fields, f, ',');) v.push_back(std::stod(f));
    if (v.size() != kPixels + 1 || v.back() < 0 || v.back() > 9 || v.back() != std::floor(v.back()))
      throw std::runtime_error(path + ":" + std::to_string(row) + ": expected 64 pixels and a label 0..9");
    for (int p = 0; p < kPixels; ++p) d.x.push_back(static_cast<float>(v[static_cast<std::size_t>(p)] / 16.0));
    d.label.push_back(static_cast<int>(v.back()));
  }
  if (d.count() <= kTestCount) throw std::runtime_error(path + ": too few rows");
  return d;
}

/// Rows @p rows[0 .. count) of @p d, in that order, into @p batch (a mini-batch: its buffers
/// are reused from one call to the next).
inline void gather(const Dataset& d, const int* rows, int count, Dataset& batch) {
  batch.x.clear();
  batch.label.clear();
  for (int k = 0; k < count; ++k) {
    const auto begin = d.x.begin() + static_cast<std::ptrdiff_t>(rows[k]) * kPixels;
    batch.x.insert(batch.x.end(), begin, begin + kPixels);
    batch.label.push_back(d.label[static_cast<std::size_t>(rows[k])]);
  }
}

inline Dataset subset(const Dataset& d, const std::vector<int>& rows) {
  Dataset s;
  gather(d, rows.data(), static_cast<int>(rows.size()), s);
  return s;
}

/// The fixed split every example uses: kTestCount images for testing, the rest for
/// training, by a shuffle with a seed of its own (whatever seed the example is given).
inline std::pair<Dataset, Dataset> train_test_split(const Dataset& all) {
  std::vector<int> order(static_cast<std::size_t>(all.count()));
  std::iota(order.begin(), order.end(), 0);
  Rng split(12345);
  split.shuffle(order);
  return {subset(all, std::vector<int>(order.begin() + kTestCount, order.end())),
          subset(all, std::vector<int>(order.begin(), order.begin() + kTestCount))};
}

/// Mean softmax cross-entropy of a batch, number of correct argmax predictions, and (when
/// @p dlogits is given) the gradient of the mean loss w.r.t. the logits.
struct LossResult {
  double loss;
  int correct;
};

inline LossResult softmax_cross_entropy(const std::vector<float>& logits, const int* labels, int rows,
                                        std::vector<float>* dlogits) {
  double total = 0.0;
  int correct = 0;
  if (dlogits) dlogits->resize(logits.size());
  for (int n = 0; n < rows; ++n) {
    const float* z = &logits[static_cast<std::size_t>(n) * kClasses];
    const int label = labels[n];
    const int predicted = static_cast<int>(std::max_element(z, z + kClasses) - z);
    correct += predicted == label ? 1 : 0;
    const double top = z[predicted];
    double sum = 0.0;
    for (int k = 0; k < kClasses; ++k) sum += std::exp(static_cast<double>(z[k]) - top);
    total += std::log(sum) + top - static_cast<double>(z[label]);  // -log softmax(z)[label]
    if (dlogits)
      for (int k = 0; k < kClasses; ++k) {
        const double p = std::exp(static_cast<double>(z[k]) - top) / sum;
        (*dlogits)[static_cast<std::size_t>(n) * kClasses + static_cast<std::size_t>(k)] =
            static_cast<float>((p - (k == label ? 1.0 : 0.0)) / rows);
      }
  }
  return {total / rows, correct};
}

/// printf formatting that spells non-finite values as nan / inf / -inf.
inline std::string format(double v, const char* spec = "%.6g") {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, spec, v);
  return buf;
}

}  // namespace digits
