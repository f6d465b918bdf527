/**
 * @file detail/io/safetensors_format.hpp
 * @brief The safetensors parser and writer behind <batchnorm/io/safetensors.hpp>: header
 *        parsing and validation with nlohmann-json, dtype conversion, and the assembly of a
 *        State from a file's tensors. Include the public header, not this one.
 */
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "../../batch_norm.hpp"
#include "../../errors.hpp"
#include "../../state.hpp"
#include "../../types.hpp"
#include "../../io/file_error.hpp"

namespace batchnorm::io {

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

/// Longest piece of an untrusted string (a key, a dtype, a value) quoted in a message.
inline constexpr std::size_t max_quoted_bytes = 64;

/// @p text for a message: itself when short, else its first bytes and its length, so that a
/// message stays small whatever the file holds.
inline std::string excerpt(std::string_view text) {
  if (text.size() <= max_quoted_bytes) return std::string(text);
  return concat(text.substr(0, max_quoted_bytes), "... (", text.size(), " bytes)");
}

/// A JSON value for a message, bounded: scalars as JSON (strings shortened), containers by
/// their kind and size. Never serializes a container (whose size and depth the file chooses).
inline std::string describe(const nlohmann::json& v) {
  if (v.is_string()) return concat("the string \"", excerpt(v.get_ref<const std::string&>()), "\"");
  if (v.is_array()) return concat("an array of ", v.size(), " elements");
  if (v.is_object()) return concat("an object of ", v.size(), " members");
  return v.dump();  // a number, a boolean or null: a few characters
}

/// Deepest nesting of arrays and objects accepted in a header. A valid header nests 3 deep
/// (header, tensor entry, shape); the bound keeps every walk over the parsed value short.
inline constexpr std::size_t max_header_depth = 16;

/**
 * First, linear pass over a header (nlohmann's SAX parser, which does not recurse): rejects
 * nesting deeper than max_header_depth and duplicate keys in any object (which of two equal
 * keys wins differs between parsers). Each key costs one set insertion, so the pass is
 * O(n log n) in the header's size whatever its shape.
 */
class HeaderScan : public nlohmann::json_sax<nlohmann::json> {
 public:
  using json = nlohmann::json;
  std::string error;  ///< why the scan stopped; empty when the header passed

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(json::number_integer_t) override { return true; }
  bool number_unsigned(json::number_unsigned_t) override { return true; }
  bool number_float(json::number_float_t, const json::string_t&) override { return true; }
  bool string(json::string_t&) override { return true; }
  bool binary(json::binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return enter();
  }
  bool key(json::string_t& k) override {
    if (keys_.back().insert(k).second) return true;
    error = concat("header: duplicate key '", excerpt(k), "'");
    return false;
  }
  bool end_object() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) override {
    keys_.emplace_back();  // kept level with depth_, so end_object always pops its own set
    return enter();
  }
  bool end_array() override {
    keys_.pop_back();
    --depth_;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception&) override {
    // The parser's own message quotes the last token, which the file can make any size.
    error = concat("header: not valid JSON (syntax error at byte ", position, ")");
    return false;
  }

 private:
  bool enter() {
    if (++depth_ <= max_header_depth) return true;
    error = concat("header: arrays and objects nested deeper than ", max_header_depth,
                   " levels (a safetensors header nests 3)");
    return false;
  }
  std::size_t depth_ = 0;
  std::vector<std::set<std::string>> keys_;
};

/// A shape for a message: at most 8 extents, then their count (a file can give millions).
inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size() && i < 8; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() > 8) s += concat(", ... (", shape.size(), " extents)");
  return s + "]";
}

/// A non-negative JSON integer (what the format allows for offsets and extents).
inline std::uint64_t unsigned_field(const nlohmann::json& v, const std::string& key, const char* field) {
  if (!v.is_number_unsigned())
    fail("tensor '", excerpt(key), "': ", field, ": expected non-negative integers, got ", describe(v));
  return v.get<std::uint64_t>();
}

/**
 * Parses and validates the JSON header of @p n bytes at @p text, for a data buffer of
 * @p data_length bytes. Throws format_error naming the key and field at fault.
 */
inline Header parse_header_checked(const char* text, std::size_t n, std::uint64_t data_length);

inline Header parse_header(const char* text, std::size_t n, std::uint64_t data_length) {
  try {
    return parse_header_checked(text, n, data_length);
  } catch (const nlohmann::json::exception& e) {  // none expected: every access is type-checked
    fail("header: ", e.what());
  }
}

inline Header parse_header_checked(const char* text, std::size_t n, std::uint64_t data_length) {
  if (n == 0 || text[0] != '{') fail("header: expected a JSON object starting with '{' right after the 8-byte length");
  // Bounds and duplicates first, in one pass that cannot recurse; then the plain (linear,
  // callback-free) parser builds the value, whose depth is now known to be small.
  HeaderScan scan;
  if (!nlohmann::json::sax_parse(text, text + n, &scan) || !scan.error.empty())
    fail(scan.error.empty() ? concat("header: not valid JSON (", n, " bytes)") : scan.error);
  const nlohmann::json j = nlohmann::json::parse(text, text + n, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("header: not valid JSON (", n, " bytes)");
  if (!j.is_object()) fail("header: expected a JSON object, got ", j.type_name());

  Header h;
  h.data_length = data_length;
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") {
      if (value.is_null()) continue;
      if (!value.is_object()) fail("__metadata__: expected an object of strings, got ", value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) fail("__metadata__: '", excerpt(mk), "': expected a string, got ", mv.type_name());
        h.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) fail("tensor '", excerpt(key), "': expected an object, got ", value.type_name());
    for (const auto& [field, unused] : value.items()) {
      (void)unused;
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        fail("tensor '", excerpt(key), "': unknown field '", excerpt(field), "' (expected dtype, shape, data_offsets)");
    }
    TensorInfo t;
    const auto dtype = value.find("dtype");
    if (dtype == value.end() || !dtype->is_string()) fail("tensor '", excerpt(key), "': dtype: expected a string");
    t.dtype = dtype->get<std::string>();
    const std::uint64_t size = dtype_size(t.dtype);
    if (size == 0) fail("tensor '", excerpt(key), "': dtype: unknown dtype '", excerpt(t.dtype), "'");
    const auto shape = value.find("shape");
    if (shape == value.end() || !shape->is_array()) fail("tensor '", excerpt(key), "': shape: expected an array");
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
      fail("tensor '", excerpt(key), "': data_offsets: expected an array [begin, end]");
    t.begin = unsigned_field((*offsets)[0], key, "data_offsets");
    t.end = unsigned_field((*offsets)[1], key, "data_offsets");
    if (t.begin > t.end) fail("tensor '", excerpt(key), "': data_offsets: begin ", t.begin, " > end ", t.end);
    if (t.end > data_length)
      fail("tensor '", excerpt(key), "': data_offsets: [", t.begin, ", ", t.end, "] out of range: the data buffer has ",
           data_length, " bytes (truncated file?)");
    for (const auto e : t.shape)
      if (e == 0) overflow = false;  // an empty tensor has 0 elements whatever its other extents
    if (overflow || numel > std::numeric_limits<std::uint64_t>::max() / size)
      fail("tensor '", excerpt(key), "': shape ", shape_string(t.shape), ": element count overflows 64 bits");
    if (t.end - t.begin != numel * size)
      fail("tensor '", excerpt(key), "': data_offsets: [", t.begin, ", ", t.end, "] span ", t.end - t.begin,
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
      fail("tensor '", excerpt(e->first), "': data_offsets: [", t.begin, ", ", t.end, "] overlap tensor '", excerpt(previous),
           "', which ends at ", at);
    if (t.begin > at)
      fail("tensor '", excerpt(e->first), "': data_offsets: [", t.begin, ", ", t.end, "] leave a gap: bytes [", at, ", ",
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
      s += (shown++ ? ", '" : "'") + excerpt(e.first) + "'";
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
    // A file with no tensors at all is what an empty State (a layer with neither affine nor
    // track_running_stats) writes: it reads back as that State. A file with other tensors
    // but none under the prefix is more likely a wrong prefix.
    if (!affine && !tracking && h.tensors.empty()) return State<P>{};
    if (!affine && !tracking)
      fail("no BatchNorm tensors with prefix '", excerpt(prefix), "' (the file has ", listing(), ")");
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

/// An open file descriptor, closed on scope exit.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  [[nodiscard]] int get() const noexcept { return fd_; }
  /// Closes now and reports close's result (a write error can surface only here).
  bool close() noexcept {
    const int fd = std::exchange(fd_, -1);
    return fd < 0 || ::close(fd) == 0;
  }

 private:
  int fd_;
};

inline std::string system_message(int error) { return std::strerror(error); }

template <class P>
State<P> state_from_file(const std::string& path, const std::string& prefix, const Expect* expect) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. Only
  // regular files are read (fstat below); for them the flag changes nothing.
  FileDescriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (file.get() < 0)
    throw file_error(path, concat("safetensors: cannot open '", path, "' for reading: ", system_message(errno)));
  struct stat info {};
  if (::fstat(file.get(), &info) != 0)
    throw file_error(path, concat("safetensors: cannot stat '", path, "': ", system_message(errno)));
  if (!S_ISREG(info.st_mode))
    throw file_error(path, concat("safetensors: '", path, "' is not a regular file (a directory, FIFO, device or socket)"));
  const auto total = static_cast<std::uint64_t>(info.st_size);
  // Reads exactly count bytes at offset; sizes come from the header checks, which keep every
  // range inside the file's size as fstat saw it. A file that shrinks meanwhile is an I/O error.
  auto read = [&](std::uint64_t offset, std::size_t count) {
    std::vector<std::uint8_t> bytes(count);
    std::size_t done = 0;
    while (done < count) {
      const ssize_t got = ::pread(file.get(), bytes.data() + done, count - done, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0)
        throw file_error(path, concat("safetensors: cannot read ", count, " bytes at offset ", offset, " of '", path,
                                      "': ", got < 0 ? system_message(errno) : std::string("the file ended early")));
      done += static_cast<std::size_t>(got);
    }
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

/**
 * Writes @p size bytes to @p path atomically: into a new file of a unique name in the same
 * directory, created with O_CREAT | O_EXCL | O_NOFOLLOW (so nothing already there, a planted
 * symlink included, is ever opened, truncated or removed), flushed with fsync, then renamed
 * over @p path. Concurrent writers to one path each use their own temporary; the last rename
 * wins. On error only the temporary this call created is removed, and @p path is untouched.
 */
inline void write_file_atomically(const std::string& path, const std::uint8_t* data, std::size_t size) {
  auto error = [&](const std::string& what, int code) {
    return file_error(path, concat("safetensors: ", what, ": ", system_message(code)));
  };
  static std::atomic<std::uint64_t> calls{0};
  std::string temporary;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    // A name no other writer picks: process id, a per-process count, the clock, mixed (splitmix64).
    std::uint64_t z = (static_cast<std::uint64_t>(::getpid()) << 32) ^ calls.fetch_add(1) ^
                      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    char suffix[17];
    for (int i = 0; i < 16; ++i) suffix[i] = "0123456789abcdef"[(z >> (4 * i)) & 15];
    suffix[16] = '\0';
    temporary = path + ".tmp-" + suffix;
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) throw error(concat("cannot create '", temporary, "'"), errno);
  }
  if (fd < 0) throw error(concat("cannot create a temporary file next to '", path, "'"), EEXIST);
  FileDescriptor file(fd);
  auto fail_and_remove = [&](const std::string& what) {
    const int code = errno;
    file.close();
    ::unlink(temporary.c_str());  // the file this call created (O_EXCL), nothing else
    throw error(what, code);
  };
  for (std::size_t done = 0; done < size;) {
    const ssize_t put = ::write(file.get(), data + done, size - done);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) fail_and_remove(concat("cannot write '", temporary, "'"));
    done += static_cast<std::size_t>(put);
  }
  if (::fsync(file.get()) != 0) fail_and_remove(concat("cannot flush '", temporary, "'"));
  if (!file.close()) {
    const int code = errno;
    ::unlink(temporary.c_str());
    throw error(concat("cannot write '", temporary, "'"), code);
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int code = errno;
    ::unlink(temporary.c_str());
    throw error(concat("cannot rename '", temporary, "' to '", path, "'"), code);
  }
}

/// True when @p text is well-formed UTF-8 (what a JSON string must hold).
inline bool is_utf8(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    std::size_t extra;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      extra = 1;
      cp = c & 0x1fu;
    } else if (c >= 0xe0 && c <= 0xef) {
      extra = 2;
      cp = c & 0x0fu;
    } else if (c >= 0xf0 && c <= 0xf4) {
      extra = 3;
      cp = c & 0x07u;
    } else {
      return false;
    }
    if (text.size() - i <= extra) return false;
    for (std::size_t k = 1; k <= extra; ++k) {
      const auto d = static_cast<unsigned char>(text[i + k]);
      if ((d & 0xc0u) != 0x80u) return false;
      cp = (cp << 6) | (d & 0x3fu);
    }
    if ((extra == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (extra == 3 && (cp < 0x10000 || cp > 0x10ffff)))
      return false;
    i += extra + 1;
  }
  return true;
}

}  // namespace detail

}  // namespace batchnorm::io
