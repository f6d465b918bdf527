// Regression tests for issue 13 ("a hostile-input campaign found 10 defects"), one or more
// per item, each from the issue's reproducer scaled to run fast. Overlapping buffers (item 4)
// are in overlap_test.cpp.
#include <gtest/gtest.h>

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/io/safetensors.hpp>
#include <batchnorm/phases.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace bn = batchnorm;
namespace io = batchnorm::io;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::uint8_t>;

Bytes file_bytes(const std::string& header, std::size_t data_bytes = 0) {
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(header.size()) >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

/// A fresh directory for one test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           (std::string("bn_reliability_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// The format_error message of parsing @p bytes, through the bytes API and the file API (the
/// two must agree on the kind of error and its text, the file API appending the path).
std::string rejection(const Bytes& bytes, const TempDir& dir) {
  std::string from_bytes;
  try {
    (void)io::state_from_safetensors_bytes<float>(bytes);
    ADD_FAILURE() << "bytes API accepted the file";
  } catch (const bn::format_error& e) {
    from_bytes = e.what();
  }
  const std::string path = dir.file("input.safetensors");
  write_file(path, bytes);
  try {
    (void)io::state_from_safetensors<float>(path);
    ADD_FAILURE() << "file API accepted the file";
  } catch (const bn::format_error& e) {
    EXPECT_EQ(std::string(e.what()), from_bytes + " (in '" + path + "')");
  }
  return from_bytes;
}

// Item 1: unbounded recursion over the header (a 400 KB file crashed the loader).
TEST(Reliability, DeeplyNestedHeaderValuesAreRejectedWithoutRecursion) {
  TempDir dir;
  const std::size_t depth = 200000;
  const std::string deep = std::string(depth, '[') + std::string(depth, ']');
  for (const std::string& header :
       {R"({"weight":{"dtype":"F32","shape":[)" + deep + R"(],"data_offsets":[0,16]}})",
        R"({"weight":{"dtype":"F32","shape":[4],"data_offsets":[)" + deep + R"(,16]}})",
        R"({"__metadata__":{"k":)" + deep + "}}", R"({"a":)" + std::string(depth, '[')}) {
    const std::string what = rejection(file_bytes(header, 16), dir);
    EXPECT_NE(what.find("nested deeper than 16 levels"), std::string::npos) << what;
  }
  // Within the bound, a wrong nested value is described by kind and size, never serialized.
  const std::string what = rejection(
      file_bytes(R"({"weight":{"dtype":"F32","shape":[[[[[[[[[[1]]]]]]]]]],"data_offsets":[0,4]}})", 4), dir);
  EXPECT_NE(what.find("shape: expected non-negative integers, got an array of 1 elements"), std::string::npos) << what;
}

// Item 10: a huge offending value or key is quoted as a bounded excerpt.
TEST(Reliability, MessagesQuoteBoundedExcerpts) {
  TempDir dir;
  const std::string big(1 << 20, 'k');
  for (const std::string& header : {R"({"weight":{"dtype":"F32","shape":[")" + big + R"("],"data_offsets":[0,4]}})",
                                    "{\"" + big + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}",
                                    R"({"weight":{"dtype":")" + big + R"(","shape":[1],"data_offsets":[0,4]}})"}) {
    const std::string what = rejection(file_bytes(header, 4), dir);
    EXPECT_LT(what.size(), 400u) << what.substr(0, 400);
    EXPECT_NE(what.find("(1048576 bytes)"), std::string::npos) << what.substr(0, 400);
  }
  std::string shape = "[1";
  for (int i = 0; i < 100000; ++i) shape += ",1";
  const std::string what =
      rejection(file_bytes(R"({"weight":{"dtype":"F32","shape":)" + shape + R"(],"data_offsets":[0,8]}})", 8), dir);
  EXPECT_LT(what.size(), 400u) << what.substr(0, 400);
  EXPECT_NE(what.find("(100001 extents)"), std::string::npos) << what.substr(0, 400);
}

/// Seconds to reject a header of @p entries empty entries (the best of 3 runs).
double reject_seconds(int entries) {
  std::string h = "{";
  for (int k = 0; k < entries; ++k) h += (k ? ",\"" : "\"") + std::to_string(k) + "\":{}";
  h += "}";
  const Bytes bytes = file_bytes(h);
  double best = 1e9;
  for (int run = 0; run < 3; ++run) {
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(bytes), bn::format_error);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Item 2: parsing was quadratic in the number of entries (80k entries: 111 s).
TEST(Reliability, HeaderParsingScalesLinearlyWithTheEntryCount) {
  const double small = reject_seconds(8000);
  const double large = reject_seconds(80000);
  // 10x the entries: linear costs ~10x (log factor and noise allowed), quadratic ~100x.
  EXPECT_LT(large, 30 * small + 0.05) << "8k entries: " << small << " s, 80k entries: " << large << " s";
  EXPECT_LT(large, 5.0) << "80k entries took " << large << " s";
  // Duplicates are still found, however many entries precede them.
  std::string h = "{";
  for (int k = 0; k < 80000; ++k) h += "\"" + std::to_string(k) + "\":{},";
  h += "\"17\":{}}";
  try {
    (void)io::state_from_safetensors_bytes<float>(file_bytes(h));
    ADD_FAILURE() << "duplicate accepted";
  } catch (const bn::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("duplicate key '17'"), std::string::npos) << e.what();
  }
}

bn::State<float> some_state(float seed) {
  bn::State<float> s;
  s.weight = {seed, 2.0f, 3.0f};
  s.bias = {0.5f, seed, -1.0f};
  s.running_mean = {0.0f, 1.0f, seed};
  s.running_var = {1.0f, seed, 2.0f};
  s.num_batches_tracked = 7;
  return s;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Item 3: saves went through a fixed <path>.tmp, following what was planted there.
TEST(Reliability, SaveNeverTouchesWhatIsAtThePredictableTemporaryName) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  const std::string victim = dir.file("victim.txt");
  write_file(victim, Bytes{'k', 'e', 'e', 'p'});
  // A symlink planted at the old temporary name.
  fs::create_symlink(victim, path + ".tmp");
  io::save_safetensors(path, some_state(1.0f));
  EXPECT_EQ(read_text(victim), "keep");
  EXPECT_TRUE(fs::is_symlink(path + ".tmp"));
  EXPECT_FALSE(fs::is_symlink(path));
  EXPECT_TRUE(fs::is_regular_file(path));
  EXPECT_EQ(io::state_from_safetensors<float>(path).running_var, some_state(1.0f).running_var);
  // A user's file and an empty directory of that name survive too.
  fs::remove(path + ".tmp");
  write_file(path + ".tmp", Bytes{'u'});
  io::save_safetensors(path, some_state(2.0f));
  EXPECT_EQ(read_text(path + ".tmp"), "u");
  fs::remove(path + ".tmp");
  fs::create_directory(path + ".tmp");
  io::save_safetensors(path, some_state(3.0f));
  EXPECT_TRUE(fs::is_directory(path + ".tmp"));
  EXPECT_EQ(names_in(dir.path), (std::vector<std::string>{"m.safetensors", "m.safetensors.tmp", "victim.txt"}));
}

TEST(Reliability, FailedSaveKeepsTheTargetAndRemovesOnlyItsOwnTemporary) {
  TempDir dir;
  const std::string target = dir.file("a_directory");
  fs::create_directory(target);
  write_file(dir.file("a_directory/inside"), Bytes{'x'});
  try {
    io::save_safetensors(target, some_state(1.0f));
    ADD_FAILURE() << "saving over a directory succeeded";
  } catch (const io::file_error& e) {
    EXPECT_EQ(e.path(), target);
    EXPECT_NE(std::string(e.what()).find("cannot rename"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_directory(target));
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"a_directory"});
  EXPECT_THROW(io::save_safetensors(dir.file("missing_dir/x.safetensors"), some_state(1.0f)), io::file_error);
}

TEST(Reliability, ConcurrentSavesToOnePathAllSucceed) {
  TempDir dir;
  const std::string path = dir.file("shared.safetensors");
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 25; ++k) {
        try {
          io::save_safetensors(path, some_state(static_cast<float>(t)));
        } catch (const std::exception&) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  const bn::State<float> s = io::state_from_safetensors<float>(path);  // one whole save, intact
  EXPECT_EQ(s.weight, some_state(s.weight[0]).weight);
  EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"shared.safetensors"});
}

// Item 5: a moved-from layer read and wrote through null.
TEST(Reliability, MovedFromLayerThrowsStateErrorFromEveryCallThatNeedsBuffers) {
  bn::BatchNorm2d<float, bn::cpu> a(3);
  const bn::Shape s({2, 3, 2, 2});
  std::vector<float> x(24), y(24), dy(24, 1.0f), dx(24);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7);
  a.forward(x.data(), y.data(), s);
  auto b = std::move(a);
  auto expect_state_error = [](auto&& fn, const char* function) {
    try {
      fn();
      ADD_FAILURE() << function << ": no exception";
    } catch (const bn::state_error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("BatchNorm2d::") + function + ": this layer was moved from"),
                std::string::npos)
          << e.what();
    }
  };
  const bn::State<float> state = b.state();
  expect_state_error([&] { a.load_state(state); }, "load_state");
  expect_state_error([&] { (void)a.state(); }, "state");
  expect_state_error([&] { (void)a.gradients(); }, "gradients");
  expect_state_error([&] { (void)a.nonfinite_batches_skipped(); }, "nonfinite_batches_skipped");
  expect_state_error([&] { a.forward(x.data(), y.data(), s); }, "forward");
  expect_state_error([&] { a.forward_relu(x.data(), nullptr, y.data(), s); }, "forward_relu");
  expect_state_error([&] { a.backward(x.data(), dy.data(), dx.data(), s); }, "backward");
  expect_state_error([&] { a.backward_relu(x.data(), y.data(), dy.data(), dx.data(), nullptr, s); }, "backward_relu");
  expect_state_error([&] { a.zero_grad(); }, "zero_grad");
  expect_state_error([&] { (void)io::to_safetensors_bytes(a); }, "state");
  EXPECT_EQ(a.weight_data(), nullptr);
  EXPECT_EQ(a.running_var_data(), nullptr);
  EXPECT_EQ(a.save_mean_data(), nullptr);
  EXPECT_EQ(a.grad_bias_data(), nullptr);
  EXPECT_EQ(a.num_features(), 3);  // configuration queries keep answering
  // The layer moved into works on, and moving back revives the source.
  EXPECT_NO_THROW(b.backward(x.data(), dy.data(), dx.data(), s));
  a = std::move(b);
  EXPECT_NO_THROW(a.forward(x.data(), y.data(), s));
  EXPECT_EQ(a.state().num_batches_tracked, 2);
  EXPECT_THROW((void)b.state(), bn::state_error);
}

// Item 6: foreign exception types escaped.
TEST(Reliability, OnlyOurExceptionTypesLeaveTheApi) {
  TempDir dir;
  bn::BatchNorm1d<float, bn::cpu> layer(3);
  try {
    io::save_safetensors(dir.file("p.safetensors"), layer, "\xff.");
    ADD_FAILURE() << "non-UTF-8 prefix accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "prefix") << e.what();
  }
  try {
    (void)io::to_safetensors_bytes(layer.state(), "", {{"k", std::string("\xc3\x28")}});
    ADD_FAILURE() << "non-UTF-8 metadata accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_EQ(e.argument(), "metadata") << e.what();
  }
  EXPECT_THROW((void)io::to_safetensors_bytes(layer.state(), "", {{"\xed\xa0\x80", "surrogate"}}), bn::invalid_argument);
  EXPECT_NO_THROW((void)io::to_safetensors_bytes(layer.state(), "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80."));  // é€😀
  EXPECT_TRUE(fs::is_empty(dir.path));
  for (const std::int64_t n : {std::int64_t{1} << 62, std::numeric_limits<std::int64_t>::max()}) {
    try {
      bn::BatchNorm2d<float, bn::cpu> huge(n);
      ADD_FAILURE() << n << " accepted";
    } catch (const bn::invalid_argument& e) {
      EXPECT_EQ(e.argument(), "num_features") << e.what();
      EXPECT_NE(std::string(e.what()).find("expected a value <= 2305843009213693951"), std::string::npos) << e.what();
    }
  }
}

// Item 7: +inf entered a float running_var although skip_nonfinite_updates was on.
TEST(Reliability, SkipNonfiniteUpdatesJudgesTheValuesAsStored) {
  bn::Options o;
  o.skip_nonfinite_updates = true;
  bn::BatchNorm1d<float, bn::cpu> layer(1, o);
  const std::vector<float> x = {1e30f, -1e30f, 1e30f, -1e30f};  // finite, variance > FLT_MAX
  std::vector<float> y(4);
  layer.forward(x.data(), y.data(), {4, 1});
  const bn::State<float> s = layer.state();
  EXPECT_EQ(s.running_var, std::vector<float>{1.0f});
  EXPECT_EQ(s.running_mean, std::vector<float>{0.0f});
  EXPECT_EQ(layer.nonfinite_batches_skipped(), 1);
  // The same batch in a double layer is finite as stored: it is used.
  bn::BatchNorm1d<double, bn::cpu> wide(1, o);
  const std::vector<double> xd(x.begin(), x.end());
  std::vector<double> yd(4);
  wide.forward(xd.data(), yd.data(), {4, 1});
  EXPECT_TRUE(std::isfinite(wide.state().running_var[0]));
  EXPECT_GT(wide.state().running_var[0], 1e58);
  EXPECT_EQ(wide.nonfinite_batches_skipped(), 0);
}

// Item 7 and 9, same class: SyncBatchNorm's merge (phases::merge_statistics) judges and counts alike.
TEST(Reliability, PhasesMergeJudgesAsStoredAndSaturates) {
  // One shard of 4 values with mean 0 and M2 = 4e60: finite in double, +inf as a float.
  const std::vector<double> record = {4.0, 0.0, 4e60};
  std::vector<double> normalization(3);
  std::vector<float> rm(1, 0.0f), rv(1, 1.0f);
  std::int64_t skipped = std::numeric_limits<std::int64_t>::max() - 1;
  bn::phases::MergeArgs<float> a;
  a.shard_statistics = {record.data(), 3};
  a.normalization = normalization;
  a.running_mean = rm;
  a.running_var = rv;
  a.skipped_updates = &skipped;
  bn::phases::MergeConfig c;
  c.skip_nonfinite_updates = true;
  bn::phases::merge_statistics(bn::cpu{}, 1, a, c);
  EXPECT_EQ(rv[0], 1.0f);
  EXPECT_EQ(skipped, std::numeric_limits<std::int64_t>::max());
  bn::phases::merge_statistics(bn::cpu{}, 1, a, c);
  EXPECT_EQ(skipped, std::numeric_limits<std::int64_t>::max());
}

// Item 8: a corrupt file was reported as an I/O error by the file API.
TEST(Reliability, FileApiReportsCorruptContentsAsFormatErrors) {
  TempDir dir;
  const std::string what = rejection(Bytes(24, 0), dir);  // header length 0
  EXPECT_NE(what.find("expected a JSON object starting with '{'"), std::string::npos) << what;
}

// Item 9: the caller's skipped-updates counter overflowed at INT64_MAX (undefined).
TEST(Reliability, SkippedUpdatesCounterSaturates) {
  std::vector<float> x = {1.0f, std::numeric_limits<float>::infinity(), 2.0f, 3.0f}, y(4);
  std::vector<float> rm(1, 0.0f), rv(1, 1.0f);
  std::int64_t skipped = std::numeric_limits<std::int64_t>::max();
  bn::ForwardArgs<float> a;
  a.x = x.data();
  a.y = y.data();
  a.running_mean = rm;
  a.running_var = rv;
  a.skipped_updates = &skipped;
  bn::ForwardConfig c;
  c.skip_nonfinite_updates = true;
  bn::forward(bn::cpu{}, {4, 1}, a, c);
  EXPECT_EQ(skipped, std::numeric_limits<std::int64_t>::max());
  EXPECT_EQ(rv[0], 1.0f);
}

// Item 10: enumerations out of range acted as some other enumerator.
TEST(Reliability, EnumValuesOutOfRangeAreRejected) {
  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8}, y(8);
  bn::ForwardArgs<float> a;
  a.x = x.data();
  a.y = y.data();
  auto expect_invalid = [](auto&& fn, const std::string& argument, const std::string& part) {
    try {
      fn();
      ADD_FAILURE() << argument << ": accepted";
    } catch (const bn::invalid_argument& e) {
      EXPECT_EQ(e.argument(), argument) << e.what();
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_invalid([&] { bn::forward(bn::cpu{}, bn::Shape({2, 2, 2}, static_cast<bn::Layout>(7)), a, {}); }, "shape",
                 "got 7");
  bn::ForwardConfig mode;
  mode.mode = static_cast<bn::Mode>(5);
  expect_invalid([&] { bn::forward(bn::cpu{}, {2, 2, 2}, a, mode); }, "mode", "got 5");
  bn::ForwardConfig act;
  act.activation = static_cast<bn::Activation>(7);
  expect_invalid([&] { bn::forward(bn::cpu{}, {2, 2, 2}, a, act); }, "activation", "got 7");
  bn::BackwardConfig back;
  back.activation = static_cast<bn::Activation>(7);
  expect_invalid([&] { bn::backward(bn::cpu{}, {2, 2, 2}, bn::BackwardArgs<float>{}, back); }, "activation",
                 "got 7");
  bn::Options o;
  o.mode = static_cast<bn::Mode>(5);
  expect_invalid([&] { bn::BatchNorm1d<float, bn::cpu> l(2, o); }, "options.mode", "got 5");
  EXPECT_EQ(y, std::vector<float>(8, 0.0f));
}

TEST(Reliability, FifoIsRefusedAtOnce) {
  TempDir dir;
  const std::string path = dir.file("fifo.safetensors");
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  const auto start = std::chrono::steady_clock::now();
  try {
    (void)io::state_from_safetensors<float>(path);
    ADD_FAILURE() << "a FIFO was read";
  } catch (const io::file_error& e) {
    EXPECT_NE(std::string(e.what()).find("is not a regular file"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)io::state_from_safetensors<float>(dir.path.string()), io::file_error);  // a directory
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

TEST(Reliability, EmptyStateRoundTrips) {
  TempDir dir;
  const bn::State<float> empty;
  const bn::State<float> back = io::state_from_safetensors_bytes<float>(io::to_safetensors_bytes(empty));
  EXPECT_TRUE(back.weight.empty() && back.bias.empty() && back.running_mean.empty() && back.running_var.empty());
  EXPECT_EQ(back.num_batches_tracked, 0);
  io::save_safetensors(dir.file("e.safetensors"), empty);
  EXPECT_TRUE(io::state_from_safetensors<float>(dir.file("e.safetensors")).weight.empty());
  // The layer that has no tensors loads it.
  bn::Options none;
  none.affine = false;
  none.track_running_stats = false;
  bn::BatchNorm1d<float, bn::cpu> layer(2, none);
  EXPECT_NO_THROW(io::load_safetensors(dir.file("e.safetensors"), layer));
  // A file with tensors, none under the prefix, is still an error (a wrong prefix).
  EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(io::to_safetensors_bytes(some_state(1.0f)), "bn1."),
               bn::format_error);
}

TEST(Reliability, BackwardAcceptsEverySpellingOfTheForwardsMemory) {
  for (const auto& [forward_shape, backward_shape] :
       {std::pair{bn::Shape({4, 3}, bn::Layout::channels_last), bn::Shape({4, 3})},
        std::pair{bn::Shape({4, 3, 1}), bn::Shape({4, 3, 1}, bn::Layout::channels_last)},
        std::pair{bn::Shape({4, 1, 3}, bn::Layout::channels_last), bn::Shape({4, 1, 3})}}) {
    const auto numel = static_cast<std::size_t>(forward_shape.numel());
    std::vector<float> x(numel), y(numel), dy(numel), dx1(numel), dx2(numel);
    for (std::size_t i = 0; i < numel; ++i) x[i] = std::cos(static_cast<float>(i)), dy[i] = std::sin(static_cast<float>(i));
    bn::BatchNorm1d<float, bn::cpu> layer(forward_shape.channels());
    layer.forward(x.data(), y.data(), forward_shape);
    layer.backward(x.data(), dy.data(), dx1.data(), forward_shape);
    ASSERT_NO_THROW(layer.backward(x.data(), dy.data(), dx2.data(), backward_shape)) << forward_shape;
    EXPECT_EQ(dx1, dx2);
  }
  // A different memory order is still refused.
  bn::BatchNorm1d<float, bn::cpu> layer(3);
  std::vector<float> x(24, 1.0f), y(24);
  x[5] = 2.0f;
  layer.forward(x.data(), y.data(), bn::Shape({2, 3, 4}));
  EXPECT_THROW(layer.backward(x.data(), x.data(), y.data(), bn::Shape({2, 3, 4}, bn::Layout::channels_last)),
               bn::invalid_argument);
}

TEST(Reliability, MessagesPrintNumbersThatReadBackExactly) {
  bn::Options o;
  o.momentum = std::nextafter(1.0, 2.0);
  try {
    bn::BatchNorm1d<float, bn::cpu> l(2, o);
    ADD_FAILURE() << "momentum above 1 accepted";
  } catch (const bn::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("got 1.0000000000000002"), std::string::npos) << e.what();
  }
  EXPECT_EQ(bn::detail::concat(0.1, " ", 1e-5, " ", 2.5f, " ", -0.0), "0.1 1e-05 2.5 -0");
}

}  // namespace
