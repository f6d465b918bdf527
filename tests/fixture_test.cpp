// PyTorch golden fixtures (tests/fixtures/NAME.json, written by tools/gen_fixtures.py) replayed
// through the class API on the CPU backend: forward, backward, parameter gradients and
// running statistics over every train/eval step. Tolerances: support/fixture_runner.hpp.
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "support/fixture.hpp"
#include "support/fixture_runner.hpp"

namespace {

using bn_test::FixtureParam;

class CpuFixture : public ::testing::TestWithParam<FixtureParam> {};

TEST_P(CpuFixture, MatchesPyTorch) {
  bn_test::run_fixture_param<batchnorm::cpu>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(PyTorch, CpuFixture, ::testing::ValuesIn(bn_test::fixture_params()),
                         bn_test::fixture_param_name);

// The fixture set is there and covers what the generator promises; a missing or truncated
// fixture directory must fail, not silently test nothing.
TEST(CpuFixtureSet, CoversTheRequiredCases) {
  const auto files = bn_test::list_fixture_files();
  ASSERT_GE(files.size(), 30u) << "fixtures missing in " << BATCHNORM_FIXTURE_DIR
                               << " (regenerate: /usr/bin/python3 tools/gen_fixtures.py)";
  std::set<int> ranks, dims;
  std::set<std::string> momenta, dtypes;
  bool affine_off = false, untracked = false, per_activation = false, n1_spatial = false, eps_other = false,
       eval_step = false, three_train = false;
  for (const auto& f : files) {
    const bn_test::FixtureCase c = bn_test::load_fixture(f);
    EXPECT_EQ(bn_test::stem(f), c.name) << f;
    dims.insert(c.class_dims);
    dtypes.insert(c.dtype);
    momenta.insert(c.momentum ? std::to_string(*c.momentum) : "none");
    affine_off |= !c.affine;
    untracked |= !c.track_running_stats;
    per_activation |= c.mode == batchnorm::Mode::per_activation;
    eps_other |= c.eps != 1e-5;
    int trains = 0;
    for (const auto& s : c.steps) {
      ranks.insert(static_cast<int>(s.shape.size()));
      n1_spatial |= s.shape[0] == 1 && s.shape.size() > 2 && s.training;
      eval_step |= !s.training;
      trains += s.training ? 1 : 0;
    }
    three_train |= trains >= 3;
  }
  EXPECT_EQ(dims, (std::set<int>{1, 2, 3}));
  EXPECT_EQ(ranks, (std::set<int>{2, 3, 4, 5}));
  EXPECT_EQ(dtypes, (std::set<std::string>{"float32", "float64"}));
  for (const char* m : {"0.100000", "0.300000", "0.000000", "1.000000", "none"})
    EXPECT_EQ(momenta.count(m), 1u) << "no fixture with momentum " << m;
  EXPECT_TRUE(affine_off && untracked && per_activation && n1_spatial && eps_other && eval_step && three_train);
}

}  // namespace
