// Issue 11, item 2: the headers must compile as a PyTorch extension. torch.utils.cpp_extension
// builds CUDA sources with -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
// -D__CUDA_NO_HALF_OPERATORS__ (tests/CMakeLists.txt sets them for this target only), which
// remove the implicit conversions and operators of __half / __nv_bfloat16. This translation
// unit includes every public header and instantiates the CUDA kernels and layer classes for
// both half types, so CI (nvcc, no GPU) fails when a header relies on those conversions. With a
// device, it also runs a forward and backward in each type against a double reference.
#if !defined(__CUDA_NO_HALF_CONVERSIONS__) || !defined(__CUDA_NO_BFLOAT16_CONVERSIONS__) || \
    !defined(__CUDA_NO_HALF_OPERATORS__)
#error "build this test with PyTorch's extension flags (see tests/CMakeLists.txt)"
#endif

#include <batchnorm/args.hpp>
#include <batchnorm/batch_norm.hpp>
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/cuda.cuh>
#include <batchnorm/errors.hpp>
#include <batchnorm/fold.hpp>
#include <batchnorm/functional.hpp>
#include <batchnorm/half.hpp>
#include <batchnorm/io/file_error.hpp>
#include <batchnorm/io/safetensors.hpp>
#include <batchnorm/options.hpp>
#include <batchnorm/shape.hpp>
#include <batchnorm/state.hpp>
#include <batchnorm/types.hpp>
#include <batchnorm/version.hpp>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "support/device_memory.cuh"

namespace bn = batchnorm;

// Every kernel, for both half types: the functional API and the three layer classes.
#define BN_INSTANTIATE_CUDA(T)                                                                                      \
  template std::size_t bn::forward_workspace_size<T>(bn::cuda, const bn::Shape&, const bn::ForwardConfig&, bool);  \
  template std::size_t bn::backward_workspace_size<T>(bn::cuda, const bn::Shape&, const bn::BackwardConfig&);      \
  template std::size_t bn::max_workspace_size<T>(bn::cuda, std::int64_t);                                          \
  template void bn::forward<T>(bn::cuda, const bn::Shape&, const bn::ForwardArgs<T>&, const bn::ForwardConfig&,    \
                               void*, std::size_t, cudaStream_t);                                                  \
  template void bn::backward<T>(bn::cuda, const bn::Shape&, const bn::BackwardArgs<T>&, const bn::BackwardConfig&, \
                                void*, std::size_t, cudaStream_t);                                                 \
  template class bn::BatchNorm<T, 1, bn::cuda>;                                                                    \
  template class bn::BatchNorm<T, 2, bn::cuda>;                                                                    \
  template class bn::BatchNorm<T, 3, bn::cuda>;
BN_INSTANTIATE_CUDA(__half)
BN_INSTANTIATE_CUDA(__nv_bfloat16)
#undef BN_INSTANTIATE_CUDA

namespace {

// Explicit conversions only (the implicit ones are gone in this translation unit).
template <class T>
T from_float(float v);
template <>
__half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
class TorchExtensionFlags : public ::testing::Test {};
using HalfTypes = ::testing::Types<__half, __nv_bfloat16>;
TYPED_TEST_SUITE(TorchExtensionFlags, HalfTypes);

// Training forward + backward of a BatchNorm2d through the layer class, against double
// arithmetic on the same (rounded) inputs.
TYPED_TEST(TorchExtensionFlags, LayerForwardBackwardMatchDoubleReference) {
  BN_TEST_REQUIRE_GPU();
  using T = TypeParam;
  const std::int64_t N = 4, C = 3, S = 25;
  const bn::Shape shape({N, C, 5, 5});
  std::vector<T> x(static_cast<std::size_t>(shape.numel())), dy(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = from_float<T>(static_cast<float>((i * 37) % 101) / 25.0f - 2.0f + static_cast<float>(i % C));
    dy[i] = from_float<T>(static_cast<float>((i * 53) % 89) / 40.0f - 1.0f);
  }
  bn_test::device_array<T> dx_in(x), ddy(dy), dout(x.size()), dgrad(x.size());
  bn::BatchNorm2d<T, bn::cuda> layer(C);
  layer.forward(dx_in.data(), dout.data(), shape);
  layer.backward(dx_in.data(), ddy.data(), dgrad.data(), shape);
  BN_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<T> y = dout.download(), dx = dgrad.download();
  const double eps = 1e-5;
  for (std::int64_t c = 0; c < C; ++c) {
    double sum = 0, sum_dy = 0;
    const auto at = [&](std::int64_t n, std::int64_t s) { return static_cast<std::size_t>((n * C + c) * S + s); };
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t s = 0; s < S; ++s) {
        sum += to_float(x[at(n, s)]);
        sum_dy += to_float(dy[at(n, s)]);
      }
    const double count = static_cast<double>(N * S), mean = sum / count;
    double m2 = 0, dot = 0;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t s = 0; s < S; ++s) {
        const double d = to_float(x[at(n, s)]) - mean;
        m2 += d * d;
        dot += to_float(dy[at(n, s)]) * d;
      }
    const double invstd = 1.0 / std::sqrt(m2 / count + eps);
    // Tolerance: two roundings of the storage type (8 bits bf16, 11 bits half) on O(1) values.
    const double tol = std::is_same_v<T, __half> ? 4e-3 : 3e-2;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t s = 0; s < S; ++s) {
        const double xmu = to_float(x[at(n, s)]) - mean;
        const double want_y = xmu * invstd;
        const double want_dx =
            (to_float(dy[at(n, s)]) - sum_dy / count - xmu * invstd * invstd * dot / count) * invstd;
        EXPECT_NEAR(to_float(y[at(n, s)]), want_y, tol * (1 + std::fabs(want_y))) << c << " " << n << " " << s;
        EXPECT_NEAR(to_float(dx[at(n, s)]), want_dx, tol * (1 + std::fabs(want_dx))) << c << " " << n << " " << s;
      }
  }
}

}  // namespace
