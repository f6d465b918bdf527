// The CUDA backend on a machine without a usable GPU (as CI is): CUDA failures surface as
// batchnorm::cuda_error with file:line and the CUDA error name, and argument errors are still
// reported as batchnorm::invalid_argument, because validation runs before any CUDA call.
// Where a GPU is present these tests skip (the other gpu tests cover that machine).
#include <batchnorm/cuda.cuh>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "support/device_memory.cuh"

namespace bn = batchnorm;

#define BN_TEST_REQUIRE_NO_GPU()                                                          \
  do {                                                                                    \
    if (bn_test::gpu_available()) GTEST_SKIP() << "a CUDA device is present";             \
  } while (0)

TEST(NoDevice, ConstructingADeviceLayerThrowsCudaErrorWithLocationAndName) {
  BN_TEST_REQUIRE_NO_GPU();
  try {
    bn::BatchNorm2d<float, bn::cuda> layer(3);
    FAIL() << "expected batchnorm::cuda_error";
  } catch (const bn::cuda_error& e) {
    const std::string what = e.what();
    EXPECT_NE(e.code(), 0);
    EXPECT_NE(e.line(), 0);
    EXPECT_NE(e.file().find("batchnorm/detail/cuda"), std::string::npos) << e.file();
    EXPECT_NE(what.find(e.file() + ":" + std::to_string(e.line())), std::string::npos) << what;
    EXPECT_NE(what.find("cudaError"), std::string::npos) << what;  // the CUDA error name
  }
}

TEST(NoDevice, ArgumentErrorsComeBeforeAnyCudaCall) {
  BN_TEST_REQUIRE_NO_GPU();
  std::vector<float> x(24), y(24);
  bn::ForwardArgs<float> args;
  args.x = x.data();
  args.y = y.data();
  bn::ForwardConfig config;
  config.eps = -1.0;
  try {
    bn::forward(bn::cuda{}, bn::Shape{2, 3, 4}, args, config, nullptr, 0, nullptr);
    FAIL() << "expected batchnorm::invalid_argument";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "eps");
  }
  // A valid call then needs the device: cuda_error, not an argument error.
  config.eps = 1e-5;
  EXPECT_THROW(bn::forward(bn::cuda{}, bn::Shape{2, 3, 4}, args, config, nullptr, 0, nullptr), bn::cuda_error);
  // ... reported as the failure of a CUDA call of ours, not as an error the caller left
  // pending (an unusable runtime answers cudaPeekAtLastError with its initialization error).
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      bn::forward(bn::cuda{}, bn::Shape{2, 3, 4}, args, config, nullptr, 0, nullptr);
    } catch (const bn::cuda_error& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.find("pending"), std::string::npos) << what;
      EXPECT_NE(what.find(") failed: cudaError"), std::string::npos) << what;
    }
  }
  // An empty batch needs no device at all.
  EXPECT_NO_THROW(bn::forward(bn::cuda{}, bn::Shape{0, 3, 4}, args, config, nullptr, 0, nullptr));
  EXPECT_THROW((void)bn::max_workspace_size<float>(bn::cuda{}, 3), bn::cuda_error);
}
