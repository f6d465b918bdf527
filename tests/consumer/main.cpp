// Normalizes a small batch with batchnorm's headers and checks the result.
#include <batchnorm/batchnorm.hpp>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <vector>

int main() {
  batchnorm::BatchNorm1d<float, batchnorm::cpu> bn(2);
  std::vector<float> x = {1.f, 10.f, 3.f, 30.f};  // (N=2, C=2)
  std::vector<float> y(x.size());
  // Extents as a framework holds them (unsigned, known at run time): no narrowing warning.
  const std::size_t c = 2, n = x.size() / c;
  bn.forward(x.data(), y.data(), batchnorm::Shape{n, c});
  // Each channel holds two values a < b: normalized they are -1 and +1 (up to eps).
  const bool ok = std::fabs(y[0] + 1.f) < 1e-3f && std::fabs(y[2] - 1.f) < 1e-3f && std::fabs(y[1] + 1.f) < 1e-3f;
  std::printf("consumer: y = [%g %g %g %g] %s\n", static_cast<double>(y[0]), static_cast<double>(y[1]),
              static_cast<double>(y[2]), static_cast<double>(y[3]), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
