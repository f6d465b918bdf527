// A channel-count mismatch whose last extent is num_features names the layout: the extents
// were most likely given in the memory order of a channels-last tensor, (N, H, W, C).
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace bn = batchnorm;

namespace {

std::string forward_error(int num_features, const bn::Shape& shape) {
  bn::BatchNorm2d<float, bn::cpu> layer(num_features);
  std::vector<float> x(static_cast<std::size_t>(shape.numel()), 1.0f), y(x.size(), 7.0f);
  const bn::State<float> before = layer.state();
  try {
    layer.forward(x.data(), y.data(), shape);
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "shape");
    EXPECT_EQ(layer.state().running_mean, before.running_mean);  // a failed call changes nothing
    EXPECT_EQ(y.front(), 7.0f);
    return e.what();
  }
  ADD_FAILURE() << "expected batchnorm::invalid_argument for " << shape;
  return {};
}

}  // namespace

TEST(ChannelsLastHint, NhwcExtentsPassedAsContiguousSuggestChannelsLast) {
  const std::string what = forward_error(64, bn::Shape{8, 4, 4, 64});
  EXPECT_EQ(what,
            "BatchNorm2d: expected C = 64 channels (num_features), got 4 in input of shape (8, 4, 4, 64); "
            "did you mean Layout::channels_last? For an (N, H, W, C) tensor write "
            "Shape({8, 64, 4, 4}, Layout::channels_last)");
}

TEST(ChannelsLastHint, NhwcExtentsWithChannelsLastSayExtentsStayNCHW) {
  const std::string what = forward_error(64, bn::Shape({8, 4, 4, 64}, bn::Layout::channels_last));
  EXPECT_NE(what.find("; extents are (N, C, spatial...) in every layout: did you mean "
                      "Shape({8, 64, 4, 4}, Layout::channels_last)?"),
            std::string::npos)
      << what;
}

TEST(ChannelsLastHint, OtherMismatchesHaveNoHint) {
  const std::string what = forward_error(64, bn::Shape{8, 4, 4, 63});
  EXPECT_EQ(what, "BatchNorm2d: expected C = 64 channels (num_features), got 4 in input of shape (8, 4, 4, 63)");
  // The right shape passes.
  bn::BatchNorm2d<float, bn::cpu> layer(64);
  std::vector<float> x(8 * 64 * 4 * 4, 1.0f);
  EXPECT_NO_THROW(layer.forward(x.data(), x.data(), bn::Shape({8, 64, 4, 4}, bn::Layout::channels_last)));
}
