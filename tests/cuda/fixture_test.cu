// PyTorch golden fixtures (tests/fixtures/NAME.json, written by tools/gen_fixtures.py)
// replayed through the class API on the CUDA backend: the same cases, runner and tolerances
// as tests/fixture_test.cpp (support/fixture_runner.hpp), with device memory.
#include <gtest/gtest.h>

#include <batchnorm/cuda.cuh>

#include "support/device_memory.cuh"
#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"

namespace {

using bn_test::FixtureParam;
using bn_test::gpu_available;

class CudaFixture : public ::testing::TestWithParam<FixtureParam> {};

TEST_P(CudaFixture, MatchesPyTorch) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  bn_test::run_fixture_param<batchnorm::cuda>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(PyTorch, CudaFixture, ::testing::ValuesIn(bn_test::fixture_params()),
                         bn_test::fixture_param_name);

TEST(CudaFixtureSet, FixturesArePresent) {
  if (!gpu_available()) GTEST_SKIP() << "no CUDA device";
  EXPECT_GE(bn_test::list_fixture_files().size(), 30u) << "fixtures missing in " << BATCHNORM_FIXTURE_DIR;
}

}  // namespace
