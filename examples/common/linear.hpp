// examples/common/linear.hpp: the fully connected layer of the examples that train networks
// (03_convergence, 04_cnn_experiments in float, 05_data_parallel in double). The examples
// write their own layers around the library's BatchNorm; this is the one they share.
#pragma once

#include "rng.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace examples {

/// y = x W^T + b on a batch of rows; W is out x in. Initialized as PyTorch's nn.Linear:
/// uniform in +-1/sqrt(in) for weight and bias (weights first, from @p rng).
template <class T>
struct Linear {
  int in, out;
  std::vector<T> w, b, gw, gb;

  Linear(int in_features, int out_features, Rng& rng)
      : in(in_features), out(out_features), w(static_cast<std::size_t>(in * out)), b(static_cast<std::size_t>(out)),
        gw(w.size()), gb(b.size()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    for (T& v : w) v = static_cast<T>((2.0 * rng.uniform() - 1.0) * bound);
    for (T& v : b) v = static_cast<T>((2.0 * rng.uniform() - 1.0) * bound);
  }

  void forward(const T* x, int rows, T* y) const {
    for (int n = 0; n < rows; ++n)
      for (int o = 0; o < out; ++o) {
        T acc = b[static_cast<std::size_t>(o)];
        const T* wo = &w[static_cast<std::size_t>(o * in)];
        const T* xn = x + static_cast<std::ptrdiff_t>(n) * in;
        for (int i = 0; i < in; ++i) acc += wo[i] * xn[i];
        y[static_cast<std::ptrdiff_t>(n) * out + o] = acc;
      }
  }

  /// Writes (does not accumulate) gw and gb, and dx when not null.
  void backward(const T* x, const T* dy, int rows, T* dx) {
    std::fill(gw.begin(), gw.end(), T(0));
    std::fill(gb.begin(), gb.end(), T(0));
    if (dx) std::fill(dx, dx + static_cast<std::ptrdiff_t>(rows) * in, T(0));
    for (int n = 0; n < rows; ++n) {
      const T* xn = x + static_cast<std::ptrdiff_t>(n) * in;
      for (int o = 0; o < out; ++o) {
        const T g = dy[static_cast<std::ptrdiff_t>(n) * out + o];
        gb[static_cast<std::size_t>(o)] += g;
        T* gwo = &gw[static_cast<std::size_t>(o * in)];
        const T* wo = &w[static_cast<std::size_t>(o * in)];
        for (int i = 0; i < in; ++i) gwo[i] += g * xn[i];
        if (dx)
          for (int i = 0; i < in; ++i) dx[static_cast<std::ptrdiff_t>(n) * in + i] += g * wo[i];
      }
    }
  }

  /// One plain SGD step (no momentum, no weight decay) from gw and gb.
  void sgd(T lr) {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] -= lr * gw[i];
    for (std::size_t i = 0; i < b.size(); ++i) b[i] -= lr * gb[i];
  }
};

}  // namespace examples
