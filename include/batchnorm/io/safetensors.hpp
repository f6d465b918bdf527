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
 * Headers are also refused when arrays or objects nest deeper than 16 levels (a valid header
 * nests 3). Parsing takes time linear in the header's size (up to a logarithmic factor for
 * the duplicate-key check), whatever its shape; messages quote at most 64 bytes of any key or
 * value from the file.
 *
 * Loading is all-or-nothing: the whole file is parsed and checked against the layer into a
 * State first, and only then handed to BatchNorm::load_state; on any error the layer is
 * unchanged. Only regular files are read (a FIFO, device or directory is a file_error, at
 * once). Saving writes a new temporary file of a unique name next to the target (created
 * with O_EXCL | O_NOFOLLOW: nothing already there is opened or removed), flushes it and
 * renames it over the target, so an existing file is either kept or wholly replaced, and
 * concurrent saves to one path all succeed (the last rename wins). A symlink at the target is
 * replaced by the file, not followed. POSIX only.
 *
 * Exceptions: batchnorm::invalid_argument, batchnorm::format_error, batchnorm::state_error
 * (a moved-from layer), batchnorm::io::file_error and std::bad_alloc; nothing else (errors of
 * the JSON library are translated).
 *
 * Needs nlohmann-json (`#include <nlohmann/json.hpp>`, Debian nlohmann-json3-dev; CMake
 * target `batchnorm::safetensors`, from `find_package(batchnorm COMPONENTS safetensors)`).
 * The core headers do not include this one.
 *
 * @code
 * batchnorm::BatchNorm2d<float, batchnorm::cpu> bn(64);
 * batchnorm::io::load_safetensors("resnet.safetensors", bn, "layer1.0.bn1.");  // from PyTorch
 * batchnorm::io::save_safetensors("bn.safetensors", bn);  // torch: bn.load_state_dict(load_file(...))
 * @endcode
 */
#pragma once

// One clear error instead of errors deep inside the parser. The include of a file that does
// not exist after the #error is fatal: compilation stops there.
#if defined(__has_include)
#if !__has_include(<nlohmann/json.hpp>)
#error "batchnorm/io/safetensors.hpp needs nlohmann-json 3 (Debian: nlohmann-json3-dev); CMake: find_package(batchnorm CONFIG REQUIRED COMPONENTS safetensors) and link batchnorm::safetensors"
#include "batchnorm/io/safetensors.hpp needs nlohmann-json"
#endif
#endif

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
#include "../detail/io/safetensors_format.hpp"
#include "file_error.hpp"

namespace batchnorm::io {

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
 *         negative num_batches_tracked; (argument "prefix" or "metadata") for a prefix,
 *         metadata key or value that is not valid UTF-8 (JSON holds only UTF-8)
 * @note An empty State (no tensors) writes a file with no tensors, which reads back as an
 *       empty State; num_batches_tracked is stored only with the running statistics, as in
 *       PyTorch's state_dict.
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
  require(detail::is_utf8(prefix), "prefix", "to_safetensors: prefix: expected UTF-8 text (JSON keys are UTF-8), got '",
          detail::excerpt(prefix), "'");
  for (const auto& [key, value] : metadata) {
    require(detail::is_utf8(key), "metadata", "to_safetensors: metadata: key '", detail::excerpt(key),
            "': expected UTF-8 text (JSON strings are UTF-8)");
    require(detail::is_utf8(value), "metadata", "to_safetensors: metadata: the value of '", detail::excerpt(key),
            "': expected UTF-8 text (JSON strings are UTF-8)");
  }

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

  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // not expected: the strings were checked above
    throw batchnorm::invalid_argument("state", batchnorm::detail::concat("to_safetensors: ", e.what()));
  }
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
 * @throws batchnorm::invalid_argument for a prefix that is not UTF-8
 * @throws batchnorm::state_error for a moved-from layer
 * @note Synchronizes the device (cuda backend).
 */
template <class T, int Dims, class Backend>
std::vector<std::uint8_t> to_safetensors_bytes(const BatchNorm<T, Dims, Backend>& layer, const std::string& prefix = "") {
  return to_safetensors_bytes(layer.state(), prefix);
}

/**
 * @brief Writes a state as a safetensors file (see to_safetensors_bytes()). The file is
 *        written under a new, unique temporary name next to @p path (O_EXCL, never
 *        following links), flushed and renamed over it, so an existing file is either kept
 *        (on error) or wholly replaced; on error only that temporary is removed.
 * @tparam P float or double
 * @param path the file to write
 * @param state the state
 * @param prefix prepended to each key as is (e.g. "bn1.")
 * @param metadata written as the header's `__metadata__` when not empty
 * @throws batchnorm::invalid_argument as to_safetensors_bytes()
 * @throws batchnorm::io::file_error when the file cannot be written (message with the
 *         system's reason), e.g. @p path is a directory
 */
template <class P>
void save_safetensors(const std::string& path, const State<P>& state, const std::string& prefix = "",
                      const std::map<std::string, std::string>& metadata = {}) {
  const std::vector<std::uint8_t> bytes = to_safetensors_bytes(state, prefix, metadata);
  detail::write_file_atomically(path, bytes.data(), bytes.size());
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
 * @throws batchnorm::invalid_argument for a prefix that is not UTF-8
 * @throws batchnorm::state_error for a moved-from layer
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
 * @throws batchnorm::io::file_error when the file cannot be opened or read, or is not a
 *         regular file
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
 * @throws batchnorm::state_error for a moved-from layer
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
 * @throws batchnorm::io::file_error when the file cannot be opened or read, or is not a
 *         regular file
 * @throws batchnorm::state_error for a moved-from layer
 * @note Synchronizes the device (cuda backend). Forgets the statistics saved for backward.
 */
template <class T, int Dims, class Backend>
void load_safetensors(const std::string& path, BatchNorm<T, Dims, Backend>& layer, const std::string& prefix = "") {
  const detail::Expect expect = detail::expect_of(layer);
  layer.load_state(detail::state_from_file<param_t<T>>(path, prefix, &expect));
}

}  // namespace batchnorm::io
