// Compiled by nvcc: the CUDA backend is the default one (BatchNorm2d<float> is
// BatchNorm2d<float, batchnorm::cuda>). Built, not run: the test machines may have no GPU.
#include <batchnorm/cuda.cuh>

#include <cstdio>

int main() {
  static_assert(std::is_same_v<batchnorm::BatchNorm2d<float>::backend_type, batchnorm::cuda>);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("consumer_cuda: no GPU\n");
    return 0;
  }
  batchnorm::BatchNorm2d<float> bn(4);
  float* x = nullptr;
  cudaMalloc(&x, 2 * 4 * 3 * 3 * sizeof(float));
  bn.forward(x, x, batchnorm::Shape{2, 4, 3, 3});
  cudaFree(x);
  std::printf("consumer_cuda: ok\n");
  return 0;
}
