/**
 * @file io/safetensors.hpp
 * @brief Save and load a layer's state as safetensors, with PyTorch's key names, so that
 *        state moves between PyTorch and C++ without `torch.save` (pickle).
 *
 * Keys are those of a BatchNorm's `state_dict()`: `<prefix>weight`, `<prefix>bias`
 * (affine layers), `<prefix>running_mean`, `<prefix>running_var` and
 * `<prefix>num_batches_tracked` (int64, shape `[]`; layers with track_running_stats). The
 * prefix is prepended as it is: PyTorch's module prefixes end with a dot, e.g. `"bn1."` or
 * `"layer1.0.bn2."`. Other tensors in the file (the rest of a model) are checked for
 * structure and otherwise ignored, so one layer can be loaded from a whole model's file.
 *
 * The format (https://github.com/huggingface/safetensors): an 8-byte little-endian
 * unsigned header length N, N bytes of JSON header `{"<name>": {"dtype": "F32", "shape":
 * [4], "data_offsets": [begin, end]}, ..., "__metadata__": {"k": "v"}}`, then the data
 * buffer, each tensor little-endian and row-major at [begin, end) of it. A file is
 * accepted only when (as the reference implementation requires) the header is at most
 * 100,000,000 bytes and starts with `{`, the JSON is valid with no duplicate keys, every
 * entry has exactly `dtype` (a known one), `shape` (non-negative integers) and
 * `data_offsets` (two integers, begin <= end), `end - begin` equals the dtype size times the
 * element count, and the tensors, sorted by offset, tile the data buffer exactly: no gap,
 * no overlap, nothing out of range, no trailing bytes.
 *
 * Written files hold F32 (float layers, and half/bfloat16 layers, whose parameters are
 * float) or F64 (double layers) tensors and an I64 num_batches_tracked, with the header
 * padded by spaces to a multiple of 8 bytes and the data ordered by alignment, as the
 * reference writer does. Loading accepts F32, F64, F16 and BF16 per-feature tensors and
 * converts them to the layer's parameter type (as PyTorch's `load_state_dict` copies).
 *
 * Loading is all-or-nothing: the whole file is parsed and checked against the layer into a
 * State first, and only then handed to BatchNorm::load_state; on any error the layer is
 * unchanged. Saving writes a temporary file next to the target and renames it over the
 * target, so an existing file is either kept or wholly replaced.
 *
 * Needs nlohmann-json (`#include <nlohmann/json.hpp>`, Debian nlohmann-json3-dev; CMake
 * `nlohmann_json::nlohmann_json`). The core headers do not include this one.
 *
 * @code
 * batchnorm::BatchNorm2d<float, batchnorm::cpu> bn(64);
 * batchnorm::io::load_safetensors("resnet.safetensors", bn, "layer1.0.bn1.");  // from PyTorch
 * batchnorm::io::save_safetensors("bn.safetensors", bn);  // torch: bn.load_state_dict(load_file(...))
 * @endcode
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../batch_norm.hpp"
#include "../errors.hpp"
#include "../state.hpp"
#include "../types.hpp"

namespace batchnorm::io {

/**
 * @brief A file that cannot be opened, read or written (the path is in path()). Contents
 *        that are not a valid state file are batchnorm::format_error instead.
 */
class file_error : public std::runtime_error {
 public:
  /**
   * @param path the file concerned
   * @param message the full message
   */
  file_error(std::string path, const std::string& message) : std::runtime_error(message), path_(std::move(path)) {}
  /// @brief The file concerned.
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

/// @brief Largest JSON header accepted, in bytes (the reference implementation's limit).
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

namespace detail {

using batchnorm::detail::concat;

/// Throws batchnorm::format_error with "safetensors: " and the parts.
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw format_error(concat("safetensors: ", parts...));
}

/// Bytes per element of a safetensors dtype; 0 for a name the format does not define.
inline std::uint64_t dtype_size(const std::string& d) {
  static const std::map<std::string, std::uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4},     {"F32", 4},     {"I64", 8}, {"U64", 8},
      {"F64", 8}};
  const auto it = sizes.find(d);
  return it == sizes.end() ? 0 : it->second;
}

/// One entry of the header; offsets are relative to the start of the data buffer.
struct TensorInfo {
  std::string dtype;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

/// A validated header: the tensors tile [0, data_length) of the data buffer.
struct Header {
  std::map<std::string, TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;  ///< 8 + header length: where the data buffer starts in the file
  std::uint64_t data_length = 0;
};

inline std::uint64_t load_u64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline void store_u64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// A non-negative JSON integer (what the format allows for offsets and extents).
inline std::uint64_t unsigned_field(const nlohmann::json& v, const std::string& key, const char* field) {
  if (!v.is_number_unsigned())
    fail("tensor '", key, "': ", field, ": expected non-negative integers, got ", v.dump());
  return v.get<std::uint64_t>();
}

/**
 * Parses and validates the JSON header of @p n bytes at @p text, for a data buffer of
 * @p data_length bytes. Throws format_error naming the key and field at fault.
 */
inline Header parse_header(const char* text, std::size_t n, std::uint64_t data_length) {
  if (n == 0 || text[0] != '{') fail("header: expected a JSON object starting with '{' right after the 8-byte length");
  // Duplicate keys are ambiguous (which one wins differs between parsers): reject them.
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  const nlohmann::json::parser_callback_t cb = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) {
      open_objects.emplace_back();
    } else if (event == E::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == E::key && !open_objects.empty() && parsed.is_string()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  const nlohmann::json j = nlohmann::json::parse(text, text + n, cb, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("header: not valid JSON (", n, " bytes)");
  if (!duplicate.empty()) fail("header: duplicate key '", duplicate, "'");
  if (!j.is_object()) fail("header: expected a JSON object, got ", j.type_name());

  Header h;
  h.data_length = data_length;
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") {
      if (value.is_null()) continue;
      if (!value.is_object()) fail("__metadata__: expected an object of strings, got ", value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) fail("__metadata__: '", mk, "': expected a string, got ", mv.type_name());
        h.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) fail("tensor '", key, "': expected an object, got ", value.type_name());
    for (const auto& [field, unused] : value.items()) {
      (void)unused;
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        fail("tensor '", key, "': unknown field '", field, "' (expected dtype, shape, data_offsets)");
    }
    TensorInfo t;
    const auto dtype = value.find("dtype");
    if (dtype == value.end() || !dtype->is_string()) fail("tensor '", key, "': dtype: expected a string");
    t.dtype = dtype->get<std::string>();
    const std::uint64_t size = dtype_size(t.dtype);
    if (size == 0) fail("tensor '", key, "': dtype: unknown dtype '", t.dtype, "'");
    const auto shape = value.find("shape");
    if (shape == value.end() || !shape->is_array()) fail("tensor '", key, "': shape: expected an array");
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const auto& e : *shape) {
      const std::uint64_t extent = unsigned_field(e, key, "shape");
      t.shape.push_back(extent);
      if (extent != 0 && numel > std::numeric_limits<std::uint64_t>::max() / extent) overflow = true;
      numel *= extent;
    }
    const auto offsets = value.find("data_offsets");
    if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2)
      fail("tensor '", key, "': data_offsets: expected an array [begin, end]");
    t.begin = unsigned_field((*offsets)[0], key, "data_offsets");
    t.end = unsigned_field((*offsets)[1], key, "data_offsets");
    if (t.begin > t.end) fail("tensor '", key, "': data_offsets: begin ", t.begin, " > end ", t.end);
    if (t.end > data_length)
      fail("tensor '", key, "': data_offsets: [", t.begin, ", ", t.end, "] out of range: the data buffer has ",
           data_length, " bytes (truncated file?)");
    for (const auto e : t.shape)
      if (e == 0) overflow = false;  // an empty tensor has 0 elements whatever its other extents
    if (overflow || numel > std::numeric_limits<std::uint64_t>::max() / size)
      fail("tensor '", key, "': shape ", shape_string(t.shape), ": element count overflows 64 bits");
    if (t.end - t.begin != numel * size)
      fail("tensor '", key, "': data_offsets: [", t.begin, ", ", t.end, "] span ", t.end - t.begin,
           " bytes, but dtype ", t.dtype, " and shape ", shape_string(t.shape), " need ", numel * size);
    h.tensors.emplace(key, std::move(t));
  }

  // The tensors, in offset order, must tile the data buffer exactly.
  std::vector<const std::pair<const std::string, TensorInfo>*> order;
  for (const auto& e : h.tensors) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::make_pair(a->second.begin, a->second.end) < std::make_pair(b->second.begin, b->second.end);
  });
  std::uint64_t at = 0;
  std::string previous;
  for (const auto* e : order) {
    const TensorInfo& t = e->second;
    if (t.begin < at)
      fail("tensor '", e->first, "': data_offsets: [", t.begin, ", ", t.end, "] overlap tensor '", previous,
           "', which ends at ", at);
    if (t.begin > at)
      fail("tensor '", e->first, "': data_offsets: [", t.begin, ", ", t.end, "] leave a gap: bytes [", at, ", ",
           t.begin, ") belong to no tensor");
    at = t.end;
    previous = e->first;
  }
  if (at != data_length)
    fail("data buffer: ", data_length, " bytes, but the tensors cover ", at, " (", data_length - at,
         " trailing bytes after the last tensor)");
  return h;
}

/// Splits a file's first bytes: returns the header length after checking it against the total size.
inline std::uint64_t header_length(const unsigned char* first8, std::uint64_t total) {
  const std::uint64_t n = load_u64(first8);
  if (n > safetensors_max_header_bytes)
    fail("header length ", n, " exceeds the limit of ", safetensors_max_header_bytes, " bytes (corrupt file?)");
  if (n > total - 8)
    fail("truncated: the header length is ", n, " bytes, but only ", total - 8, " bytes follow it");
  return n;
}

inline double half_to_double(std::uint16_t h) {
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double v;
  if (exponent == 0)
    v = std::ldexp(static_cast<double>(mantissa), -24);
  else if (exponent == 31)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(static_cast<double>(mantissa + 1024), exponent - 25);
  return (h & 0x8000) ? -v : v;
}

/// Element @p i of a little-endian tensor of a floating dtype, as double.
inline double float_element(const std::string& dtype, const std::uint8_t* p, std::size_t i) {
  if (dtype == "F64") {
    std::uint64_t bits = load_u64(p + 8 * i);
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  if (dtype == "F32") {
    const std::uint8_t* q = p + 4 * i;
    const std::uint32_t bits = static_cast<std::uint32_t>(q[0]) | (static_cast<std::uint32_t>(q[1]) << 8) |
                               (static_cast<std::uint32_t>(q[2]) << 16) | (static_cast<std::uint32_t>(q[3]) << 24);
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return static_cast<double>(v);
  }
  const std::uint16_t bits = static_cast<std::uint16_t>(p[2 * i] | (p[2 * i + 1] << 8));
  if (dtype == "F16") return half_to_double(bits);
  // BF16: the upper half of a float.
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return static_cast<double>(v);
}

/// What a layer expects to find in a file (absent: take what the file has).
struct Expect {
  std::int64_t features;
  bool affine;
  bool tracking;
  std::string layer;
};

/**
 * Builds a State from a validated header. @p read(offset, n) returns the n bytes at
 * file offset @p offset (within the data buffer, which the header check guarantees).
 */
template <class P, class Read>
State<P> build_state(const Header& h, const std::string& prefix, const Expect* expect, Read&& read) {
  static_assert(std::is_same_v<P, float> || std::is_same_v<P, double>, "batchnorm: P must be float or double");
  const char* names[] = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"};
  const TensorInfo* found[5] = {};
  for (int i = 0; i < 5; ++i) {
    const auto it = h.tensors.find(prefix + names[i]);
    found[i] = it == h.tensors.end() ? nullptr : &it->second;
  }
  auto key = [&](int i) { return prefix + names[i]; };
  auto listing = [&]() {
    std::string s;
    int shown = 0;
    for (const auto& e : h.tensors) {
      if (shown == 8) {
        s += ", ...";
        break;
      }
      s += (shown++ ? ", '" : "'") + e.first + "'";
    }
    return s.empty() ? std::string("no tensors") : concat(h.tensors.size(), " tensors: ", s);
  };

  bool affine, tracking;
  if (expect) {
    affine = expect->affine;
    tracking = expect->tracking;
    for (int i = 0; i < 5; ++i) {
      const bool wanted = i < 2 ? affine : tracking;
      if (wanted && !found[i])
        fail("missing key '", key(i), "': ", expect->layer, " has ",
             i < 2 ? "affine = true" : "track_running_stats = true", " (the file has ", listing(), ")");
      if (!wanted && found[i])
        fail("unexpected key '", key(i), "': ", expect->layer, " has ",
             i < 2 ? "affine = false" : "track_running_stats = false", ", so it has no ", names[i]);
    }
  } else {
    affine = found[0] || found[1];
    tracking = found[2] || found[3] || found[4];
    if (!affine && !tracking) fail("no BatchNorm tensors with prefix '", prefix, "' (the file has ", listing(), ")");
    for (int i = 0; i < 5; ++i) {
      const bool wanted = i < 2 ? affine : tracking;
      if (wanted && !found[i])
        fail("missing key '", key(i), "': expected it with '", key(i < 2 ? (i == 0 ? 1 : 0) : (i == 2 ? 3 : 2)), "'");
    }
  }

  // Shapes and dtypes of everything before any data is read.
  std::int64_t features = expect ? expect->features : -1;
  std::string features_from = expect ? concat("num_features of ", expect->layer) : std::string();
  for (int i = 0; i < 4; ++i) {
    const TensorInfo* t = found[i];
    if (!t) continue;
    if (t->dtype != "F32" && t->dtype != "F64" && t->dtype != "F16" && t->dtype != "BF16")
      fail("key '", key(i), "': dtype ", t->dtype, ", expected F32, F64, F16 or BF16");
    if (features < 0) {
      if (t->shape.size() != 1 || t->shape[0] == 0 ||
          t->shape[0] > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail("key '", key(i), "': shape ", shape_string(t->shape), ", expected [num_features] with num_features >= 1");
      features = static_cast<std::int64_t>(t->shape[0]);
      features_from = concat("as '", key(i), "'");
    } else if (t->shape.size() != 1 || t->shape[0] != static_cast<std::uint64_t>(features)) {
      fail("key '", key(i), "': shape ", shape_string(t->shape), ", expected [", features, "] (", features_from, ")");
    }
  }
  if (const TensorInfo* t = found[4]) {
    if (t->dtype != "I64") fail("key '", key(4), "': dtype ", t->dtype, ", expected I64");
    if (!t->shape.empty()) fail("key '", key(4), "': shape ", shape_string(t->shape), ", expected [] (a scalar)");
  }

  State<P> s;
  std::vector<P>* members[] = {&s.weight, &s.bias, &s.running_mean, &s.running_var};
  for (int i = 0; i < 4; ++i) {
    const TensorInfo* t = found[i];
    if (!t) continue;
    const std::vector<std::uint8_t> bytes = read(h.data_start + t->begin, static_cast<std::size_t>(t->end - t->begin));
    std::vector<P>& m = *members[i];
    m.resize(static_cast<std::size_t>(features));
    for (std::size_t k = 0; k < m.size(); ++k) m[k] = static_cast<P>(float_element(t->dtype, bytes.data(), k));
  }
  if (const TensorInfo* t = found[4]) {
    const std::vector<std::uint8_t> bytes = read(h.data_start + t->begin, 8);
    const auto count = static_cast<std::int64_t>(load_u64(bytes.data()));
    if (count < 0) fail("key '", key(4), "': expected a value >= 0, got ", count);
    s.num_batches_tracked = count;
  }
  return s;
}

template <class T, int Dims, class Backend>
Expect expect_of(const BatchNorm<T, Dims, Backend>& layer) {
  return {layer.num_features(), layer.options().affine, layer.options().track_running_stats,
          concat(BatchNorm<T, Dims, Backend>::name(), "(", layer.num_features(), ")")};
}

template <class P>
State<P> state_from_bytes(const std::uint8_t* data, std::size_t size, const std::string& prefix,
                          const Expect* expect) {
  if (data == nullptr && size != 0) throw batchnorm::invalid_argument("data", "safetensors: data: nullptr");
  if (size < 8) fail("truncated: ", size, " bytes, shorter than the 8-byte header length");
  const std::uint64_t n = header_length(data, size);
  Header h = parse_header(reinterpret_cast<const char*>(data + 8), static_cast<std::size_t>(n), size - 8 - n);
  h.data_start = 8 + n;
  return build_state<P>(h, prefix, expect, [&](std::uint64_t offset, std::size_t count) {
    return std::vector<std::uint8_t>(data + offset, data + offset + count);
  });
}

template <class P>
State<P> state_from_file(const std::string& path, const std::string& prefix, const Expect* expect) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw file_error(path, concat("safetensors: cannot open '", path, "' for reading"));
  in.seekg(0, std::ios::end);
  const std::streamoff end = in.tellg();
  if (end < 0) throw file_error(path, concat("safetensors: cannot determine the size of '", path, "'"));
  const auto total = static_cast<std::uint64_t>(end);
  auto read = [&](std::uint64_t offset, std::size_t count) {
    std::vector<std::uint8_t> bytes(count);
    in.clear();
    in.seekg(static_cast<std::streamoff>(offset));
    if (count) in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(count));
    if (!in || static_cast<std::size_t>(in.gcount()) != count)
      throw file_error(path, concat("safetensors: cannot read ", count, " bytes at offset ", offset, " of '", path, "'"));
    return bytes;
  };
  try {
    if (total < 8) fail("truncated: ", total, " bytes, shorter than the 8-byte header length");
    const std::vector<std::uint8_t> first = read(0, 8);
    const std::uint64_t n = header_length(first.data(), total);
    const std::vector<std::uint8_t> text = read(8, static_cast<std::size_t>(n));
    Header h = parse_header(reinterpret_cast<const char*>(text.data()), text.size(), total - 8 - n);
    h.data_start = 8 + n;
    return build_state<P>(h, prefix, expect, read);
  } catch (const format_error& e) {
    throw format_error(concat(e.what(), " (in '", path, "')"));
  }
}

}  // namespace detail

/**
 * @brief Serializes a state as safetensors bytes with PyTorch's BatchNorm key names.
 *
 * Writes weight and bias when present (affine), running_mean, running_var and
 * num_batches_tracked (I64, shape []) when the running statistics are present.
 * @tparam P float (written as F32) or double (F64)
 * @param state the state; weight/bias both present or both empty, running_mean/running_var
 *        likewise, present members of equal size
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @param metadata written as the header's `__metadata__` when not empty
 * @throws batchnorm::invalid_argument (argument "state") for inconsistent sizes or a
 *         negative num_batches_tracked
 */
template <class P>
std::vector<std::uint8_t> to_safetensors_bytes(const State<P>& state, const std::string& prefix = "",
                                               const std::map<std::string, std::string>& metadata = {}) {
  static_assert(std::is_same_v<P, float> || std::is_same_v<P, double>, "batchnorm: P must be float or double");
  using batchnorm::detail::require;
  require(state.weight.size() == state.bias.size(), "state", "to_safetensors: state: weight and bias: expected ",
          "equal sizes, got ", state.weight.size(), " and ", state.bias.size());
  require(state.running_mean.size() == state.running_var.size(), "state",
          "to_safetensors: state: running_mean and running_var: expected equal sizes, got ",
          state.running_mean.size(), " and ", state.running_var.size());
  require(state.weight.empty() || state.running_mean.empty() || state.weight.size() == state.running_mean.size(),
          "state", "to_safetensors: state: weight and running_mean: expected equal sizes, got ", state.weight.size(),
          " and ", state.running_mean.size());
  require(state.num_batches_tracked >= 0, "state", "to_safetensors: state: num_batches_tracked: expected >= 0, got ",
          state.num_batches_tracked);

  const char* dtype = std::is_same_v<P, float> ? "F32" : "F64";
  const bool tracking = !state.running_mean.empty();
  // Data in the reference writer's order: by alignment (largest first), then by name.
  std::vector<std::pair<std::string, const std::vector<P>*>> per_feature;
  if (!state.weight.empty()) {
    per_feature.emplace_back(prefix + "bias", &state.bias);
    per_feature.emplace_back(prefix + "weight", &state.weight);
  }
  if (tracking) {
    per_feature.emplace_back(prefix + "running_mean", &state.running_mean);
    per_feature.emplace_back(prefix + "running_var", &state.running_var);
  }
  std::sort(per_feature.begin(), per_feature.end());

  nlohmann::json header = nlohmann::json::object();
  std::vector<std::uint8_t> data;
  auto add = [&](const std::string& name, const char* dt, nlohmann::json shape, std::size_t bytes) {
    header[name] = {{"dtype", dt}, {"shape", std::move(shape)}, {"data_offsets", {data.size(), data.size() + bytes}}};
  };
  auto put_values = [&](const std::vector<P>& v) {
    for (const P x : v) {
      if constexpr (std::is_same_v<P, float>) {
        std::uint32_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        for (int i = 0; i < 4; ++i) data.push_back(static_cast<std::uint8_t>(bits >> (8 * i)));
      } else {
        std::uint64_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        detail::store_u64(data, bits);
      }
    }
  };
  if (tracking) {  // I64 (8-byte aligned) first
    add(prefix + "num_batches_tracked", "I64", nlohmann::json::array(), 8);
    detail::store_u64(data, static_cast<std::uint64_t>(state.num_batches_tracked));
  }
  for (const auto& [name, values] : per_feature) {
    add(name, dtype, nlohmann::json::array({values->size()}), values->size() * sizeof(P));
    put_values(*values);
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;

  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  std::vector<std::uint8_t> out;
  out.reserve(8 + text.size() + data.size());
  detail::store_u64(out, text.size());
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

/**
 * @brief Serializes a layer's state (BatchNorm::state()) as safetensors bytes.
 * @tparam T       the layer's storage type (half types write F32, their parameter type)
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param layer the layer
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @note Synchronizes the device (cuda backend).
 */
template <class T, int Dims, class Backend>
std::vector<std::uint8_t> to_safetensors_bytes(const BatchNorm<T, Dims, Backend>& layer, const std::string& prefix = "") {
  return to_safetensors_bytes(layer.state(), prefix);
}

/**
 * @brief Writes a state as a safetensors file (see to_safetensors_bytes()). The file is
 *        written under a temporary name next to @p path and renamed over it, so an
 *        existing file is either kept (on error) or wholly replaced.
 * @tparam P float or double
 * @param path the file to write
 * @param state the state
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @param metadata written as the header's `__metadata__` when not empty
 * @throws batchnorm::invalid_argument as to_safetensors_bytes()
 * @throws batchnorm::io::file_error when the file cannot be written
 */
template <class P>
void save_safetensors(const std::string& path, const State<P>& state, const std::string& prefix = "",
                      const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<std::uint8_t> bytes = to_safetensors_bytes(state, prefix, metadata);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (out) out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (out) out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
      throw file_error(path, batchnorm::detail::concat("safetensors: cannot write '", tmp, "'"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw file_error(path, batchnorm::detail::concat("safetensors: cannot rename '", tmp, "' to '", path,
                                                     "': ", ec.message()));
  }
}

/**
 * @brief Writes a layer's state as a safetensors file, loadable in PyTorch with
 *        `module.load_state_dict(safetensors.torch.load_file(path))`.
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param path the file to write
 * @param layer the layer
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @throws batchnorm::io::file_error when the file cannot be written
 * @note Synchronizes the device (cuda backend).
 */
template <class T, int Dims, class Backend>
void save_safetensors(const std::string& path, const BatchNorm<T, Dims, Backend>& layer, const std::string& prefix = "") {
  save_safetensors(path, layer.state(), prefix);
}

/**
 * @brief Parses safetensors bytes into a State, taking whichever BatchNorm tensors exist
 *        under @p prefix: weight and bias together (or neither), running_mean, running_var
 *        and num_batches_tracked together (or none), at least one group; num_features is
 *        taken from their common shape `[C]`.
 * @tparam P the parameter type to convert to (float or double)
 * @param data the bytes of a whole file
 * @param size their number
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @throws batchnorm::format_error (message naming the key and field) for any malformed,
 *         truncated or oversized input, and for missing keys, a dtype other than
 *         F32/F64/F16/BF16 (I64 for num_batches_tracked), or a wrong shape
 */
template <class P>
State<P> state_from_safetensors_bytes(const std::uint8_t* data, std::size_t size, const std::string& prefix = "") {
  return detail::state_from_bytes<P>(data, size, prefix, nullptr);
}

/**
 * @brief state_from_safetensors_bytes() over a byte vector.
 * @tparam P float or double
 * @param bytes the bytes of a whole file
 * @param prefix prepended to each key as is
 * @throws batchnorm::format_error as the pointer overload
 */
template <class P>
State<P> state_from_safetensors_bytes(const std::vector<std::uint8_t>& bytes, const std::string& prefix = "") {
  return detail::state_from_bytes<P>(bytes.data(), bytes.size(), prefix, nullptr);
}

/**
 * @brief state_from_safetensors_bytes() reading a file; only the header and the tensors
 *        under @p prefix are read, so loading one layer from a large model file is cheap.
 * @tparam P float or double
 * @param path the file
 * @param prefix prepended to each key as is
 * @throws batchnorm::format_error as state_from_safetensors_bytes() (the path appended)
 * @throws batchnorm::io::file_error when the file cannot be opened or read
 */
template <class P>
State<P> state_from_safetensors(const std::string& path, const std::string& prefix = "") {
  return detail::state_from_file<P>(path, prefix, nullptr);
}

/**
 * @brief Loads a layer's state from safetensors bytes: the tensors the layer has
 *        (by its affine and track_running_stats options) must all be there with shape
 *        `[num_features]`, and none it lacks. All-or-nothing: on error the layer is unchanged.
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param data the bytes of a whole file
 * @param size their number
 * @param layer the layer to load into
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @throws batchnorm::format_error for a malformed file, a missing or unexpected key, a
 *         wrong dtype or shape, naming the key
 * @note Synchronizes the device (cuda backend). Forgets the statistics saved for backward.
 */
template <class T, int Dims, class Backend>
void load_safetensors_bytes(const std::uint8_t* data, std::size_t size, BatchNorm<T, Dims, Backend>& layer,
                            const std::string& prefix = "") {
  const detail::Expect expect = detail::expect_of(layer);
  layer.load_state(detail::state_from_bytes<param_t<T>>(data, size, prefix, &expect));
}

/**
 * @brief load_safetensors_bytes() over a byte vector.
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param bytes the bytes of a whole file
 * @param layer the layer to load into
 * @param prefix prepended to each key as is
 * @throws batchnorm::format_error as the pointer overload; the layer is then unchanged
 */
template <class T, int Dims, class Backend>
void load_safetensors_bytes(const std::vector<std::uint8_t>& bytes, BatchNorm<T, Dims, Backend>& layer,
                            const std::string& prefix = "") {
  load_safetensors_bytes(bytes.data(), bytes.size(), layer, prefix);
}

/**
 * @brief Loads a layer's state from a safetensors file, e.g. one written by
 *        `safetensors.torch.save_file(model.state_dict(), path)` with @p prefix naming
 *        the module ("bn1."). All-or-nothing: on error the layer is unchanged.
 * @tparam T       the layer's storage type
 * @tparam Dims    1, 2 or 3
 * @tparam Backend cpu or cuda
 * @param path the file
 * @param layer the layer to load into
 * @param prefix prepended to each key as is
 * @throws batchnorm::format_error as load_safetensors_bytes() (the path appended)
 * @throws batchnorm::io::file_error when the file cannot be opened or read
 * @note Synchronizes the device (cuda backend). Forgets the statistics saved for backward.
 */
template <class T, int Dims, class Backend>
void load_safetensors(const std::string& path, BatchNorm<T, Dims, Backend>& layer, const std::string& prefix = "") {
  const detail::Expect expect = detail::expect_of(layer);
  layer.load_state(detail::state_from_file<param_t<T>>(path, prefix, &expect));
}

}  // namespace batchnorm::io
