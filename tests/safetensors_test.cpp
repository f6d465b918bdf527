// Safetensors state files (include/batchnorm/io/safetensors.hpp): C++ round trips, files
// written by PyTorch (tools/gen_safetensors.py → tests/fixtures/safetensors/, with JSON
// sidecars of the expected values), and a corrupt-file suite in which every bad input is a
// batchnorm::format_error naming the key or field and leaves the layer exactly as it was.
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/io/safetensors.hpp>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

namespace bn = batchnorm;
namespace io = batchnorm::io;
using json = nlohmann::json;
using Bytes = std::vector<std::uint8_t>;

namespace {

const std::string fixtures = std::string(BATCHNORM_FIXTURE_DIR) + "/safetensors/";

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

json sidecar(const std::string& name) {
  std::ifstream in(fixtures + name + ".json");
  EXPECT_TRUE(in.good()) << name;
  return json::parse(in);
}

template <class P>
std::vector<P> values(const json& v) {
  std::vector<P> out;
  for (const auto& e : v) out.push_back(static_cast<P>(e.get<double>()));
  return out;
}

/// Bitwise equality of two vectors (so that -0.0, NaN payloads and the like count).
template <class P>
bool same_bits(const std::vector<P>& a, const std::vector<P>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(P)) == 0);
}

template <class P>
void expect_same_state(const bn::State<P>& a, const bn::State<P>& b) {
  EXPECT_TRUE(same_bits(a.weight, b.weight));
  EXPECT_TRUE(same_bits(a.bias, b.bias));
  EXPECT_TRUE(same_bits(a.running_mean, b.running_mean));
  EXPECT_TRUE(same_bits(a.running_var, b.running_var));
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked);
}

/// A state with distinct, awkward values: negative zero, a subnormal, large and tiny numbers.
template <class P>
bn::State<P> awkward_state(std::int64_t c) {
  bn::State<P> s;
  for (std::int64_t i = 0; i < c; ++i) {
    const P k = static_cast<P>(i);
    s.weight.push_back(P(0.75) + k / P(3));
    s.bias.push_back(i == 0 ? P(-0.0) : P(-1.5) + k);
    s.running_mean.push_back(i == 1 ? std::numeric_limits<P>::denorm_min() : P(1e3) * k - P(0.1));
    s.running_var.push_back(i == 2 ? std::numeric_limits<P>::max() : P(1) / (k + P(7)));
  }
  s.num_batches_tracked = 123456789012LL;
  return s;
}

/// Splits a file into (header JSON, data buffer), and joins them again with a correct length.
std::pair<json, Bytes> split(const Bytes& file) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[static_cast<std::size_t>(i)];
  const std::string text(file.begin() + 8, file.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  return {json::parse(text), Bytes(file.begin() + 8 + static_cast<std::ptrdiff_t>(n), file.end())};
}

Bytes join_text(const std::string& text, const Bytes& data) {
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(text.size()) >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Bytes join(const json& header, const Bytes& data) { return join_text(header.dump(), data); }

using Layer = bn::BatchNorm2d<float, bn::cpu>;

/// A layer with a non-default state and a forward saved for backward.
Layer prepared_layer(std::int64_t c = 4, bn::Options o = {}) {
  Layer layer(c, o);
  bn::State<float> s = awkward_state<float>(c);
  s.running_var[2] = 2.0f;
  if (!o.affine) s.weight.clear(), s.bias.clear();
  if (!o.track_running_stats) s.running_mean.clear(), s.running_var.clear(), s.num_batches_tracked = 0;
  layer.load_state(s);
  std::vector<float> x(static_cast<std::size_t>(2 * c * 3)), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i));
  layer.forward(x.data(), y.data(), {2, c, 3, 1});
  return layer;
}

/// Loading @p bytes into a prepared layer throws format_error whose message contains
/// every one of @p needles, and changes nothing: state, and the forward saved for backward.
void expect_rejected(const Bytes& bytes, const std::vector<std::string>& needles, std::int64_t c = 4,
                     const std::string& prefix = "", bn::Options o = {}, bool layerless_too = true) {
  Layer layer = prepared_layer(c, o);
  const bn::State<float> before = layer.state();
  try {
    io::load_safetensors_bytes(bytes, layer, prefix);
    ADD_FAILURE() << "expected format_error for a file of " << bytes.size() << " bytes";
  } catch (const bn::format_error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << "\n  missing: " << n;
  }
  expect_same_state(layer.state(), before);
  // The statistics saved by the forward are still there: backward works.
  std::vector<float> x(static_cast<std::size_t>(2 * c * 3), 0.5f), dy(x.size(), 1.0f), dx(x.size());
  EXPECT_NO_THROW(layer.backward(x.data(), dy.data(), dx.data(), {2, c, 3, 1}));
  // The layer-less parser rejects it too (it may name a different first problem), unless
  // the file is only wrong for this layer.
  if (layerless_too) {
    EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(bytes, prefix), bn::format_error);
  }
}

Bytes valid_file() { return io::to_safetensors_bytes(prepared_layer().state()); }

}  // namespace

// ---- C++ → C++ --------------------------------------------------------------------------

TEST(SafetensorsRoundTrip, FloatStateIsBitwiseEqualAfterBytesAndFile) {
  const auto s = awkward_state<float>(5);
  const Bytes bytes = io::to_safetensors_bytes(s, "", {{"format", "pt"}});
  bn::BatchNorm2d<float, bn::cpu> layer(5);
  io::load_safetensors_bytes(bytes, layer);
  expect_same_state(layer.state(), s);
  expect_same_state(io::state_from_safetensors_bytes<float>(bytes), s);

  const std::string path = ::testing::TempDir() + "bn_roundtrip.safetensors";
  io::save_safetensors(path, layer, "layer1.0.bn1.");
  bn::BatchNorm2d<float, bn::cpu> back(5);
  io::load_safetensors(path, back, "layer1.0.bn1.");
  expect_same_state(back.state(), s);
  // Writing is deterministic: the state read back writes the same bytes.
  EXPECT_EQ(io::to_safetensors_bytes(io::state_from_safetensors<float>(path, "layer1.0.bn1."), "layer1.0.bn1."),
            read_file(path));
}

TEST(SafetensorsRoundTrip, DoubleStateIsWrittenAsF64) {
  const auto s = awkward_state<double>(3);
  const Bytes bytes = io::to_safetensors_bytes(s, "bn.");
  const auto [header, data] = split(bytes);
  EXPECT_EQ(header["bn.weight"]["dtype"], "F64");
  EXPECT_EQ(header["bn.num_batches_tracked"]["dtype"], "I64");
  EXPECT_EQ(header["bn.num_batches_tracked"]["shape"], json::array());
  EXPECT_EQ(data.size(), 4 * 3 * 8 + 8u);
  bn::BatchNorm1d<double, bn::cpu> layer(3);
  io::load_safetensors_bytes(bytes, layer, "bn.");
  expect_same_state(layer.state(), s);
  // Loading F64 into a float layer rounds each value once, as torch's copy_ does.
  const auto f = io::state_from_safetensors_bytes<float>(bytes, "bn.");
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(f.running_mean[i], static_cast<float>(s.running_mean[i]));
}

TEST(SafetensorsRoundTrip, LayoutFollowsTheReferenceWriter) {
  const Bytes bytes = io::to_safetensors_bytes(awkward_state<float>(3));
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  EXPECT_EQ((8 + n) % 8, 0u) << "data must start 8-byte aligned";
  const auto [header, data] = split(bytes);
  EXPECT_EQ(header["num_batches_tracked"]["data_offsets"], json::array({0, 8}));  // I64 first, aligned
  EXPECT_EQ(header.size(), 5u);
  EXPECT_FALSE(header.contains("__metadata__"));
}

TEST(SafetensorsRoundTrip, OptionalTensorsFollowTheOptions) {
  bn::Options no_affine;
  no_affine.affine = false;
  bn::BatchNorm2d<float, bn::cpu> a(3, no_affine);
  a.train();
  std::vector<float> x(2 * 3 * 4), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 5);
  a.forward(x.data(), y.data(), {2, 3, 2, 2});
  const Bytes bytes = io::to_safetensors_bytes(a);
  EXPECT_FALSE(split(bytes).first.contains("weight"));
  bn::BatchNorm2d<float, bn::cpu> b(3, no_affine);
  io::load_safetensors_bytes(bytes, b);
  expect_same_state(b.state(), a.state());
  EXPECT_EQ(b.num_batches_tracked(), 1);

  bn::Options nothing;
  nothing.affine = false;
  nothing.track_running_stats = false;
  bn::BatchNorm2d<float, bn::cpu> c(3, nothing), d(3, nothing);
  const Bytes empty = io::to_safetensors_bytes(c);
  EXPECT_EQ(split(empty).first, json::object());  // PyTorch's state_dict() is empty too
  EXPECT_NO_THROW(io::load_safetensors_bytes(empty, d));
}

TEST(SafetensorsRoundTrip, RejectsInconsistentStatesOnSave) {
  bn::State<float> s = awkward_state<float>(3);
  s.bias.pop_back();
  EXPECT_THROW((void)io::to_safetensors_bytes(s), bn::invalid_argument);
  s = awkward_state<float>(3);
  s.num_batches_tracked = -1;
  EXPECT_THROW((void)io::to_safetensors_bytes(s), bn::invalid_argument);
  EXPECT_THROW(io::save_safetensors("/nonexistent-dir/x.safetensors", awkward_state<float>(2)), io::file_error);
}

// Writes a file for `tools/gen_safetensors.py --check` (the "our file loads into PyTorch"
// direction; see tools/README-safetensors.md). Directory: $BATCHNORM_SAFETENSORS_OUT or the
// test temp dir.
TEST(SafetensorsRoundTrip, WritesFileAndSidecarForTorchCheck) {
  const char* env = std::getenv("BATCHNORM_SAFETENSORS_OUT");
  const std::string dir = env ? std::string(env) + "/" : ::testing::TempDir();
  bn::BatchNorm2d<float, bn::cpu> layer(3);
  std::vector<float> x(4 * 3 * 2 * 2), y(x.size());
  for (int step = 0; step < 3; ++step) {
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.7f * static_cast<float>(i) + static_cast<float>(step)) * 3 + 1;
    layer.forward(x.data(), y.data(), {4, 3, 2, 2});
  }
  bn::State<float> s = layer.state();
  s.weight = {0.5f, -1.25f, 2.0f};
  s.bias = {0.125f, 0.0f, -3.5f};
  layer.load_state(s);
  layer.eval();
  layer.forward(x.data(), y.data(), {4, 3, 2, 2});
  io::save_safetensors(dir + "cpp_bn2d.safetensors", layer, "bn1.");
  json side{{"prefix", "bn1."}, {"tensors", json::object()}};
  auto put = [&](const char* name, const std::vector<float>& v) {
    side["tensors"][std::string("bn1.") + name] = {{"dtype", "F32"}, {"shape", {v.size()}}, {"values", v}};
  };
  put("weight", s.weight);
  put("bias", s.bias);
  put("running_mean", s.running_mean);
  put("running_var", s.running_var);
  side["tensors"]["bn1.num_batches_tracked"] = {{"dtype", "I64"}, {"shape", json::array()}, {"values", 3}};
  side["eval"] = {{"shape", {4, 3, 2, 2}}, {"x", x}, {"y", y}};
  std::ofstream(dir + "cpp_bn2d.json") << side.dump(1) << "\n";
  std::printf("wrote %scpp_bn2d.safetensors and %scpp_bn2d.json\n", dir.c_str(), dir.c_str());
  EXPECT_EQ(s.num_batches_tracked, 3);
}

// ---- files written by PyTorch (tools/gen_safetensors.py) --------------------------------

template <class P>
void expect_sidecar_state(const bn::State<P>& s, const json& side) {
  const std::string prefix = side["prefix"];
  const json& t = side["tensors"];
  auto member = [&](const char* name, const std::vector<P>& got) {
    const std::string key = prefix + name;
    if (!t.contains(key)) {
      EXPECT_TRUE(got.empty()) << key;
      return;
    }
    EXPECT_EQ(got, values<P>(t[key]["values"])) << key;
  };
  member("weight", s.weight);
  member("bias", s.bias);
  member("running_mean", s.running_mean);
  member("running_var", s.running_var);
  if (t.contains(prefix + "num_batches_tracked")) {
    EXPECT_EQ(s.num_batches_tracked, t[prefix + "num_batches_tracked"]["values"].get<std::int64_t>());
  }
}

TEST(SafetensorsPyTorch, LoadsALoneBatchNorm2dExactly) {
  const json side = sidecar("bn2d_f32");
  bn::BatchNorm2d<float, bn::cpu> layer(4);
  io::load_safetensors(fixtures + "bn2d_f32.safetensors", layer);
  expect_sidecar_state(layer.state(), side);
  EXPECT_GT(layer.num_batches_tracked(), 0);
}

TEST(SafetensorsPyTorch, LoadedLayerReproducesTorchForwardResults) {
  const json side = sidecar("bn2d_f32");
  for (const char* mode : {"eval", "train"}) {
    SCOPED_TRACE(mode);
    const json& m = side[mode];
    bn::BatchNorm2d<float, bn::cpu> layer(4);
    io::load_safetensors(fixtures + "bn2d_f32.safetensors", layer);
    layer.train(std::string(mode) == "train");
    const auto x = values<float>(m["x"]);
    const auto want = values<float>(m["y"]);
    std::vector<float> y(x.size());
    const auto& sh = m["shape"];
    layer.forward(x.data(), y.data(), {sh[0].get<std::int64_t>(), sh[1].get<std::int64_t>(), sh[2].get<std::int64_t>(), sh[3].get<std::int64_t>()});
    // torch computes in float, we in double rounded once: a few float ulps apart at most.
    for (std::size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], want[i], 2e-6 * std::max(1.0f, std::fabs(want[i]))) << i;
    if (std::string(mode) == "train") {
      const auto s = layer.state();
      const auto rm = values<float>(m["running_mean"]), rv = values<float>(m["running_var"]);
      for (std::size_t c = 0; c < 4; ++c) {
        EXPECT_NEAR(s.running_mean[c], rm[c], 1e-6 * std::max(1.0f, std::fabs(rm[c])));
        EXPECT_NEAR(s.running_var[c], rv[c], 1e-6 * std::max(1.0f, std::fabs(rv[c])));
      }
      EXPECT_EQ(s.num_batches_tracked, m["num_batches_tracked"].get<std::int64_t>());
    }
  }
}

TEST(SafetensorsPyTorch, LoadsF64F16AndBf16Files) {
  for (const char* name : {"bn2d_f64", "bn2d_f16", "bn2d_bf16"}) {
    SCOPED_TRACE(name);
    const json side = sidecar(name);
    bn::BatchNorm2d<float, bn::cpu> f(4);
    io::load_safetensors(fixtures + name + ".safetensors", f);
    expect_sidecar_state(f.state(), side);  // every value is a float: exact
    bn::BatchNorm2d<double, bn::cpu> d(4);
    io::load_safetensors(fixtures + name + ".safetensors", d);
    expect_sidecar_state(d.state(), side);
  }
}

TEST(SafetensorsPyTorch, LoadsLayersOfAModelByPrefix) {
  const json side = sidecar("model_f32");
  const std::string path = fixtures + "model_f32.safetensors";
  bn::BatchNorm2d<float, bn::cpu> bn1(5);
  io::load_safetensors(path, bn1, "bn1.");
  expect_sidecar_state(bn1.state(), side);

  bn::Options o;  // bn2 = BatchNorm2d(3, affine=False, momentum=None)
  o.affine = false;
  o.momentum = std::nullopt;
  bn::BatchNorm2d<float, bn::cpu> bn2(3, o);
  io::load_safetensors(path, bn2, "bn2.");
  expect_sidecar_state(bn2.state(), side["bn2"]);
  expect_sidecar_state(io::state_from_safetensors<float>(path, "bn2."), side["bn2"]);

  // Wrong prefix, wrong options, wrong size: typed errors naming the key.
  bn::BatchNorm2d<float, bn::cpu> other(5);
  const auto before = other.state();
  try {
    io::load_safetensors(path, other, "bn3.");
    ADD_FAILURE();
  } catch (const bn::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("missing key 'bn3.weight'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bn1.bias"), std::string::npos) << "lists the file's keys: " << e.what();
    EXPECT_NE(std::string(e.what()).find("model_f32.safetensors"), std::string::npos) << e.what();
  }
  EXPECT_THROW(io::load_safetensors(path, other, "bn2."), bn::format_error);  // affine layer, no bn2.weight
  EXPECT_THROW(io::load_safetensors(path, other, ""), bn::format_error);
  bn::BatchNorm2d<float, bn::cpu> three(3);
  EXPECT_THROW(io::load_safetensors(path, three, "bn1."), bn::format_error);  // shape [5], layer has 3
  expect_same_state(other.state(), before);
  EXPECT_THROW((void)io::state_from_safetensors<float>(path, "conv1."), bn::format_error);
  EXPECT_THROW((void)io::state_from_safetensors<float>(fixtures + "does-not-exist.safetensors"), io::file_error);
}

// ---- corrupt files: each is a format_error naming the problem, and nothing changes -------

TEST(SafetensorsCorrupt, TruncatedAtEveryLength) {
  const Bytes good = valid_file();
  Layer layer = prepared_layer();
  const auto before = layer.state();
  for (std::size_t n = 0; n < good.size(); ++n) {
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(io::load_safetensors_bytes(cut, layer), bn::format_error) << "truncated to " << n << " bytes";
    EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(cut), bn::format_error) << n;
  }
  expect_same_state(layer.state(), before);
  expect_rejected(Bytes(good.begin(), good.begin() + 5), {"truncated", "8-byte"});
  expect_rejected(Bytes(good.begin(), good.end() - 1), {"out of range"});
  EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(nullptr, 0), bn::format_error);
}

TEST(SafetensorsCorrupt, TruncatedFileOnDisk) {
  const Bytes good = valid_file();
  const std::string path = ::testing::TempDir() + "bn_truncated.safetensors";
  write_file(path, Bytes(good.begin(), good.end() - 3));
  Layer layer = prepared_layer();
  const auto before = layer.state();
  try {
    io::load_safetensors(path, layer);
    ADD_FAILURE();
  } catch (const bn::format_error& e) {
    EXPECT_NE(std::string(e.what()).find("bn_truncated.safetensors"), std::string::npos) << e.what();
  }
  expect_same_state(layer.state(), before);
}

TEST(SafetensorsCorrupt, BadHeaderLength) {
  const Bytes good = valid_file();
  auto with_length = [&](std::uint64_t n) {
    Bytes b = good;
    for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
    return b;
  };
  expect_rejected(with_length(~0ull), {"header length", "exceeds the limit"});
  expect_rejected(with_length(1ull << 40), {"exceeds the limit"});
  expect_rejected(with_length(io::safetensors_max_header_bytes + 1), {"exceeds the limit"});
  expect_rejected(with_length(good.size() - 7), {"truncated", "header length"});
  expect_rejected(with_length(0), {"header", "'{'"});
  expect_rejected(with_length(20), {"not valid JSON"});  // cuts the JSON
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | good[static_cast<std::size_t>(i)];
  expect_rejected(with_length(n + 8), {"not valid JSON"});  // JSON followed by data bytes
}

TEST(SafetensorsCorrupt, BadJson) {
  const auto [header, data] = split(valid_file());
  const std::string text = header.dump();
  expect_rejected(join_text(text.substr(0, text.size() - 1), data), {"not valid JSON"});
  expect_rejected(join_text(text + "}", data), {"not valid JSON"});
  expect_rejected(join_text(" " + text, data), {"'{'"});
  expect_rejected(join_text("[1, 2]", data), {"'{'"});
  expect_rejected(join_text("{\"weight\": 1}", data), {"tensor 'weight'", "expected an object"});
  std::string bad_utf8 = text;
  bad_utf8.insert(bad_utf8.find("weight"), "\xff");
  expect_rejected(join_text(bad_utf8, data), {"not valid JSON"});
  // Duplicate keys: the second "weight" would silently win in many parsers.
  std::string dup = text;
  const auto w = dup.find("\"weight\"");
  dup.insert(dup.size() - 1, "," + dup.substr(w, dup.size() - 1 - w));
  expect_rejected(join_text(dup, data), {"duplicate key 'weight'"});
  json h = header;
  h["__metadata__"] = {{"format", 1}};
  expect_rejected(join(h, data), {"__metadata__", "'format'"});
  h = header;
  h["__metadata__"] = json::array();
  expect_rejected(join(h, data), {"__metadata__"});
  h = header;
  h["weight"]["extra"] = 1;
  expect_rejected(join(h, data), {"tensor 'weight'", "unknown field 'extra'"});
  h = header;
  h["weight"].erase("dtype");
  expect_rejected(join(h, data), {"tensor 'weight'", "dtype"});
  h = header;
  h["weight"]["shape"] = "4";
  expect_rejected(join(h, data), {"tensor 'weight'", "shape"});
  h = header;
  h["weight"]["shape"] = {-4};
  expect_rejected(join(h, data), {"tensor 'weight'", "shape", "non-negative"});
  h = header;
  h["weight"]["shape"] = {4.0};
  expect_rejected(join(h, data), {"tensor 'weight'", "shape"});
  h = header;
  h["weight"]["data_offsets"] = {8};
  expect_rejected(join(h, data), {"tensor 'weight'", "data_offsets"});
  // Deep nesting (a stack-exhaustion attempt): rejected by the depth bound, before any walk.
  const std::string deep = "{\"weight\": " + std::string(200000, '[') + std::string(200000, ']') + "}";
  expect_rejected(join_text(deep, data), {"nested deeper than 16 levels"});
  expect_rejected(join_text("{\"weight\": " + std::string(200000, '['), data), {"nested deeper than 16 levels"});
  // Metadata alone is fine (a valid file may carry it).
  h = header;
  h["__metadata__"] = {{"format", "pt"}};
  Layer ok(4);
  EXPECT_NO_THROW(io::load_safetensors_bytes(join(h, data), ok));
}

TEST(SafetensorsCorrupt, WrongDtype) {
  const auto [header, data] = split(valid_file());
  json h = header;
  h["weight"]["dtype"] = "I32";  // same size, so only the dtype is wrong
  expect_rejected(join(h, data), {"key 'weight'", "dtype I32", "expected F32"});
  h = header;
  h["running_var"]["dtype"] = "F33";
  expect_rejected(join(h, data), {"tensor 'running_var'", "unknown dtype 'F33'"});
  h = header;
  h["running_mean"]["dtype"] = "F64";  // size no longer matches the offsets
  expect_rejected(join(h, data), {"tensor 'running_mean'", "need 32"});
  h = header;
  h["num_batches_tracked"]["dtype"] = "F64";
  expect_rejected(join(h, data), {"key 'num_batches_tracked'", "expected I64"});
  h = header;
  h["num_batches_tracked"]["dtype"] = "U64";
  expect_rejected(join(h, data), {"key 'num_batches_tracked'", "expected I64"});
}

TEST(SafetensorsCorrupt, WrongShape) {
  const auto [header, data] = split(valid_file());
  json h = header;
  h["bias"]["shape"] = {2, 2};  // same byte count
  expect_rejected(join(h, data), {"key 'bias'", "shape [2, 2]", "expected [4]"});
  h = header;
  h["num_batches_tracked"]["shape"] = {1};
  expect_rejected(join(h, data), {"key 'num_batches_tracked'", "expected [] (a scalar)"});
  h = header;
  h["bias"]["shape"] = {5};
  expect_rejected(join(h, data), {"tensor 'bias'", "need 20"});
  h = header;
  h["bias"]["shape"] = {1ull << 62, 1ull << 62};
  expect_rejected(join(h, data), {"tensor 'bias'", "overflows"});
  // A valid file for a different num_features.
  expect_rejected(valid_file(), {"key 'weight'", "shape [4]", "expected [5]", "num_features"}, 5, "", {}, false);
  // Layer-less parse: per-feature tensors must agree.
  auto [h4, d4] = split(io::to_safetensors_bytes(awkward_state<float>(4)));
  h4["weight"]["shape"] = {3};
  EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(join(h4, d4)), bn::format_error);
}

TEST(SafetensorsCorrupt, MissingAndUnexpectedKeys) {
  const auto [header, data] = split(valid_file());
  // Drop running_var and its bytes (re-tiling the buffer so only the key is missing).
  json h = header;
  const auto rv = header["running_var"]["data_offsets"];
  const std::uint64_t b = rv[0], e = rv[1];
  Bytes d(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(b));
  d.insert(d.end(), data.begin() + static_cast<std::ptrdiff_t>(e), data.end());
  h.erase("running_var");
  for (auto& [k, v] : h.items())
    if (v["data_offsets"][0].get<std::uint64_t>() >= e)
      v["data_offsets"] = {v["data_offsets"][0].get<std::uint64_t>() - (e - b), v["data_offsets"][1].get<std::uint64_t>() - (e - b)};
  EXPECT_THROW((void)io::state_from_safetensors_bytes<float>(join(h, d)), bn::format_error);
  expect_rejected(join(h, d), {"missing key 'running_var'", "track_running_stats"});
  // With a prefix, keys without it do not count.
  expect_rejected(valid_file(), {"missing key 'bn1.weight'"}, 4, "bn1.");
  // The file has weight/bias, the layer is not affine: PyTorch's strict load refuses too.
  bn::Options no_affine;
  no_affine.affine = false;
  expect_rejected(valid_file(), {"unexpected key 'weight'", "affine = false"}, 4, "", no_affine, false);
  // An empty file (no tensors) for a layer that has some. (Without a layer it is the empty
  // State, which is what an empty State writes: see reliability_test.cpp.)
  expect_rejected(join(json::object(), {}), {"missing key 'weight'", "no tensors"}, 4, "", {}, false);
}

TEST(SafetensorsCorrupt, BadOffsets) {
  const auto [header, data] = split(valid_file());
  const auto off = [&](const char* k, int i) { return header[k]["data_offsets"][i].get<std::uint64_t>(); };
  json h = header;
  h["weight"]["data_offsets"] = header["bias"]["data_offsets"];  // two tensors share bytes
  expect_rejected(join(h, data), {"overlap"});
  h = header;
  h["bias"]["data_offsets"] = {off("bias", 0) + 4, off("bias", 1) + 4};
  expect_rejected(join(h, data), {"tensor 'bias'"});
  h = header;
  h["weight"]["data_offsets"] = {data.size(), data.size() + 16};
  expect_rejected(join(h, data), {"tensor 'weight'", "out of range"});
  h = header;
  h["weight"]["data_offsets"] = {off("weight", 1), off("weight", 0)};
  expect_rejected(join(h, data), {"tensor 'weight'", "begin", "> end"});
  h = header;
  h["weight"]["data_offsets"] = {-8, 8};
  expect_rejected(join(h, data), {"tensor 'weight'", "data_offsets", "non-negative"});
  h = header;
  h["weight"]["data_offsets"] = {1e30, 2e30};
  expect_rejected(join(h, data), {"tensor 'weight'", "data_offsets"});
  // A gap: move the last tensor one element further and pad the buffer.
  std::string last;
  std::uint64_t last_end = 0;
  for (auto& [k, v] : header.items())
    if (v["data_offsets"][1].get<std::uint64_t>() > last_end) last = k, last_end = v["data_offsets"][1];
  h = header;
  h[last]["data_offsets"] = {off(last.c_str(), 0) + 4, off(last.c_str(), 1) + 4};
  Bytes padded = data;
  padded.insert(padded.end(), 4, 0);
  expect_rejected(join(h, padded), {"gap"});
  // Trailing garbage after the last tensor.
  Bytes trailing = data;
  trailing.push_back(0x42);
  expect_rejected(join(header, trailing), {"1 trailing bytes"});
}

TEST(SafetensorsCorrupt, BadNumBatchesTracked) {
  const auto [header, data] = split(valid_file());
  Bytes d = data;
  const std::uint64_t at = header["num_batches_tracked"]["data_offsets"][0];
  for (int i = 0; i < 8; ++i) d[at + static_cast<std::uint64_t>(i)] = 0xff;  // -1
  expect_rejected(join(header, d), {"key 'num_batches_tracked'", "expected a value >= 0, got -1"});
}

TEST(SafetensorsCorrupt, OtherTensorsAreCheckedButIgnored) {
  // Another tensor of any dtype may live in the file; it must still be well-formed.
  const auto [header, data] = split(valid_file());
  json h = header;
  Bytes d = data;
  h["conv.weight"] = {{"dtype", "BOOL"}, {"shape", {3}}, {"data_offsets", {d.size(), d.size() + 3}}};
  d.insert(d.end(), {1, 0, 1});
  Layer layer(4);
  EXPECT_NO_THROW(io::load_safetensors_bytes(join(h, d), layer));
  h["conv.weight"]["shape"] = {4};
  expect_rejected(join(h, d), {"tensor 'conv.weight'"});
}
