// libFuzzer target for the safetensors parser (include/batchnorm/io/safetensors.hpp).
//
// Properties checked on every input, besides the sanitizers' (no crash, leak, UB, out-of-
// bounds read, or exception other than batchnorm::format_error escaping):
//  - an accepted input round-trips: the parsed State, written again and re-parsed, is
//    bitwise the same State, and it loads into a layer built to match it;
//  - loading into a fixed layer either succeeds with exactly what the layer-less parser
//    returns, or throws format_error and leaves the layer bitwise unchanged.
//  - the file API agrees with the bytes API: the same State, or a format_error with the same
//    message (the path appended); never an io::file_error for bad contents.
// Inputs that start with "#G" are not a file but a recipe for one (grammar-aware mode): the
// fuzzer then builds headers with many entries, deep nesting in any field, duplicate keys and
// long strings, which byte-level mutation of a small file rarely reaches. libFuzzer's
// -timeout (set by tests/fuzz/CMakeLists.txt) turns a super-linear parse into a finding.
// Seed corpus: tests/fuzz/corpus/safetensors/ (PyTorch-written files, broken variants, recipes).
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/io/safetensors.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

namespace bn = batchnorm;
namespace io = batchnorm::io;

namespace {

template <class P>
bool same_bits(const std::vector<P>& a, const std::vector<P>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(P)) == 0);
}

template <class P>
bool same_state(const bn::State<P>& a, const bn::State<P>& b) {
  return same_bits(a.weight, b.weight) && same_bits(a.bias, b.bias) && same_bits(a.running_mean, b.running_mean) &&
         same_bits(a.running_var, b.running_var) && a.num_batches_tracked == b.num_batches_tracked;
}

void check(bool ok) {
  if (!ok) std::abort();
}

template <class P>
void parse_and_round_trip(const std::uint8_t* data, std::size_t size, const std::string& prefix) {
  bn::State<P> s;
  try {
    s = io::state_from_safetensors_bytes<P>(data, size, prefix);
  } catch (const bn::format_error&) {
    return;
  }
  const std::vector<std::uint8_t> again = io::to_safetensors_bytes(s, prefix);
  check(same_state(io::state_from_safetensors_bytes<P>(again, prefix), s));

  bn::Options o;
  o.affine = !s.weight.empty();
  o.track_running_stats = !s.running_mean.empty();
  // An empty State (a file with no tensors) fits a layer of any size that has no tensors.
  const auto features = std::max<std::int64_t>(
      1, static_cast<std::int64_t>(o.affine ? s.weight.size() : s.running_mean.size()));
  bn::BatchNorm1d<P, bn::cpu> layer(features, o);
  io::load_safetensors_bytes(data, size, layer, prefix);  // must not throw
  check(same_state(layer.state(), s));
}

void load_into_fixed_layer(const std::uint8_t* data, std::size_t size) {
  bn::BatchNorm2d<float, bn::cpu> layer(4);
  bn::State<float> init = layer.state();
  init.weight = {1.5f, -2.0f, 0.25f, 3.0f};
  init.num_batches_tracked = 5;
  layer.load_state(init);
  try {
    io::load_safetensors_bytes(data, size, layer);
    check(same_state(layer.state(), io::state_from_safetensors_bytes<float>(data, size)));
  } catch (const bn::format_error&) {
    check(same_state(layer.state(), init));
  }
}

/// Reads the recipe's bytes; zeros once it is used up.
struct Recipe {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t at = 0;
  unsigned byte() { return at < size ? data[at++] : 0u; }
  unsigned word() { return byte() | (byte() << 8); }
};

/// Builds a safetensors file from a recipe: a header of E entries (up to 16383), one of which
/// carries a value nested D levels deep (up to 65535) in a field the recipe picks, optional
/// duplicate key, long key, metadata, and a data buffer of the size the entries declare (or not).
std::vector<std::uint8_t> file_from_recipe(Recipe r) {
  const unsigned entries = r.word() & 0x3fffu;  // up to 16383: enough for a quadratic parse to time out
  const unsigned depth = r.word();
  const unsigned where = r.byte() % 6;  // 0 shape, 1 data_offsets, 2 metadata value, 3 entry, 4 key, 5 none
  const unsigned flags = r.byte();
  const unsigned long_key = (flags & 1u) ? r.word() * 16u : 0u;
  const bool duplicate = (flags & 2u) != 0;
  const bool close_nesting = (flags & 4u) == 0;
  const bool real_names = (flags & 8u) != 0;  // weight/bias/running_* instead of numbers
  const char* dtypes[] = {"F32", "F64", "F16", "BF16", "I64", "U8", "F32x"};
  std::string nested = std::string(depth, '[') + "1" + (close_nesting ? std::string(depth, ']') : "");
  std::string h = "{";
  std::uint64_t offset = 0;
  const char* names[] = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"};
  for (unsigned k = 0; k < entries; ++k) {
    const unsigned dtype = r.byte() % 7;
    const unsigned extent = r.byte() % 5;
    std::string key = real_names && k < 5 ? names[k] : std::to_string(k);
    if (k == 0 && long_key) key = std::string(long_key, 'k');
    if (duplicate && k + 1 == entries && k > 0) key = real_names ? "weight" : "0";
    const std::uint64_t bytes = extent * (dtype == 1 || dtype == 4 ? 8u : dtype == 2 || dtype == 3 ? 2u : dtype == 5 ? 1u : 4u);
    h += (k ? ",\"" : "\"") + key + "\":";
    if (where == 3 && k == 0) {
      h += nested;
      continue;
    }
    h += std::string("{\"dtype\":\"") + dtypes[dtype] + "\",\"shape\":" +
         (where == 0 && k == 0 ? "[" + nested + "]" : "[" + std::to_string(extent) + "]") + ",\"data_offsets\":" +
         (where == 1 && k == 0 ? "[" + nested + "," + std::to_string(offset + bytes) + "]"
                               : "[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]") +
         "}";
    offset += bytes;
  }
  if (where == 2) h += std::string(entries ? "," : "") + "\"__metadata__\":{\"k\":" + nested + "}";
  if (where == 4) h += std::string(entries ? "," : "") + nested;  // not a key at all
  h += "}";
  const unsigned tail = r.byte() % 3;  // 0: the declared size, 1: one byte short, 2: one extra
  const std::uint64_t data_bytes = tail == 1 && offset ? offset - 1 : offset + (tail == 2 ? 1 : 0);
  std::vector<std::uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(h.size()) >> (8 * i)));
  out.insert(out.end(), h.begin(), h.end());
  for (std::uint64_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::uint8_t>(r.byte()));
  return out;
}

/// The file API on the same bytes: the same State, or a format_error with the same message.
void file_api_agrees(const std::uint8_t* data, std::size_t size) {
  static const std::string path = "/tmp/batchnorm_fuzz_" + std::to_string(::getpid()) + ".safetensors";
  FILE* f = std::fopen(path.c_str(), "wb");
  check(f != nullptr);
  check(size == 0 || std::fwrite(data, 1, size, f) == size);
  check(std::fclose(f) == 0);
  std::string from_bytes, from_file;
  bn::State<float> a, b;
  try {
    a = io::state_from_safetensors_bytes<float>(data, size);
  } catch (const bn::format_error& e) {
    from_bytes = e.what();
  }
  try {
    b = io::state_from_safetensors<float>(path);
  } catch (const bn::format_error& e) {
    from_file = e.what();
  }  // an io::file_error escapes: a finding
  std::remove(path.c_str());
  if (from_bytes.empty()) {
    check(from_file.empty() && same_state(a, b));
  } else {
    check(from_file == from_bytes + " (in '" + path + "')");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size >= 2 && data[0] == '#' && data[1] == 'G') {
    const std::vector<std::uint8_t> file = file_from_recipe(Recipe{data + 2, size - 2});
    parse_and_round_trip<float>(file.data(), file.size(), "");
    load_into_fixed_layer(file.data(), file.size());
    file_api_agrees(file.data(), file.size());
    return 0;
  }
  file_api_agrees(data, size);
  parse_and_round_trip<float>(data, size, "");
  parse_and_round_trip<double>(data, size, "");
  parse_and_round_trip<float>(data, size, "bn1.");
  load_into_fixed_layer(data, size);
  return 0;
}
