// Round-trips a layer's state through safetensors bytes (needs batchnorm::safetensors).
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/io/safetensors.hpp>

#include <cstdio>

int main() {
  batchnorm::BatchNorm2d<float, batchnorm::cpu> a(3), b(3);
  a.weight_data()[1] = 2.5f;
  batchnorm::io::load_safetensors_bytes(batchnorm::io::to_safetensors_bytes(a.state()), b);
  const bool ok = b.state().weight[1] == 2.5f;
  std::printf("consumer_safetensors: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
