// A PyTorch user's first line in plain C++: the default backend is cuda, which needs nvcc.
// Expected: one error that says to write batchnorm::cpu.
#include <batchnorm/batchnorm.hpp>

int main() {
  batchnorm::BatchNorm1d<float> bn(64);
  return static_cast<int>(bn.num_features());
}
