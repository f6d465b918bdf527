/**
 * @file support/fixture.hpp
 * @brief Loads the PyTorch golden fixtures written by tools/gen_fixtures.py
 *        (tests/fixtures/NAME.json, one case per file) into plain structs.
 *
 * Every number is kept as double: float32 fixtures hold values that are exact float32
 * numbers, so `static_cast<float>` of them gives back exactly what PyTorch held. A tensor
 * PyTorch does not have (JSON `null`: weight/bias without affine, running statistics and
 * num_batches_tracked without track_running_stats) is an empty std::optional.
 */
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <batchnorm/batchnorm.hpp>
#include <nlohmann/json.hpp>

#include "support/common.hpp"

namespace bn_test {

using Values = std::vector<double>;

/// State of the module before the first step (as loaded with load_state).
struct FixtureState {
  std::optional<Values> weight, bias, running_mean, running_var;
  std::optional<std::int64_t> num_batches_tracked;
};

/// One forward + backward of the module, and its state afterwards.
struct FixtureStep {
  bool training = true;
  std::vector<std::int64_t> shape;  ///< (N, C, spatial...)
  Values x, dy;                     ///< inputs, contiguous NC[D]HW order
  Values y, dx;                     ///< outputs
  std::optional<Values> grad_weight, grad_bias;  ///< written by this step's backward (not accumulated)
  std::optional<Values> running_mean, running_var;
  std::optional<std::int64_t> num_batches_tracked;
};

/// One fixture file.
struct FixtureCase {
  std::string file;  ///< path it was loaded from
  std::string name;
  std::string torch_version;
  std::string dtype;  ///< "float32" or "float64"
  int class_dims = 0;  ///< 1, 2 or 3: BatchNorm1d / 2d / 3d
  std::int64_t num_features = 0;
  double eps = 1e-5;
  std::optional<double> momentum;
  bool affine = true;
  bool track_running_stats = true;
  batchnorm::Mode mode = batchnorm::Mode::per_channel;
  FixtureState initial;
  std::vector<FixtureStep> steps;

  /// The library's options equal to the module's constructor arguments.
  [[nodiscard]] batchnorm::Options options() const {
    batchnorm::Options o;
    o.eps = eps;
    o.momentum = momentum;
    o.affine = affine;
    o.track_running_stats = track_running_stats;
    o.mode = mode;
    return o;
  }
};

namespace detail {

[[noreturn]] inline void fixture_error(const std::string& file, const std::string& what) {
  throw std::runtime_error("fixture " + file + ": " + what);
}

inline std::optional<Values> optional_values(const nlohmann::json& j, const char* key, const std::string& file) {
  if (!j.contains(key)) fixture_error(file, std::string("missing key \"") + key + "\"");
  const auto& v = j.at(key);
  if (v.is_null()) return std::nullopt;
  if (!v.is_array()) fixture_error(file, std::string("\"") + key + "\" is neither an array nor null");
  return v.get<Values>();
}

inline Values values(const nlohmann::json& j, const char* key, const std::string& file) {
  auto v = optional_values(j, key, file);
  if (!v) fixture_error(file, std::string("\"") + key + "\" is null");
  return *v;
}

inline std::optional<std::int64_t> optional_int(const nlohmann::json& j, const char* key) {
  const auto& v = j.at(key);
  if (v.is_null()) return std::nullopt;
  return v.get<std::int64_t>();
}

inline void check_size(const std::optional<Values>& v, std::size_t expected, bool present, const char* what,
                       const std::string& file, std::size_t step) {
  if (v.has_value() != present)
    fixture_error(file, "step " + std::to_string(step) + ": " + what + (present ? " is null" : " is not null"));
  if (v && v->size() != expected)
    fixture_error(file, "step " + std::to_string(step) + ": " + what + " has " + std::to_string(v->size()) +
                            " values, expected " + std::to_string(expected));
}

}  // namespace detail

/// Parses one fixture file; throws std::runtime_error naming the file on any inconsistency.
inline FixtureCase load_fixture(const std::string& path) {
  std::ifstream in(path);
  if (!in) detail::fixture_error(path, "cannot open");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    detail::fixture_error(path, e.what());
  }

  FixtureCase c;
  c.file = path;
  try {
    c.name = j.at("name").get<std::string>();
    c.torch_version = j.at("torch_version").get<std::string>();
    c.dtype = j.at("dtype").get<std::string>();
    c.class_dims = j.at("class_dims").get<int>();
    const auto& o = j.at("options");
    c.num_features = o.at("num_features").get<std::int64_t>();
    c.eps = o.at("eps").get<double>();
    if (!o.at("momentum").is_null()) c.momentum = o.at("momentum").get<double>();
    c.affine = o.at("affine").get<bool>();
    c.track_running_stats = o.at("track_running_stats").get<bool>();
    const std::string mode = o.at("mode").get<std::string>();
    if (mode == "per_channel") {
      c.mode = batchnorm::Mode::per_channel;
    } else if (mode == "per_activation") {
      c.mode = batchnorm::Mode::per_activation;
    } else {
      detail::fixture_error(path, "unknown mode \"" + mode + "\"");
    }

    const auto& init = j.at("initial_state");
    c.initial.weight = detail::optional_values(init, "weight", path);
    c.initial.bias = detail::optional_values(init, "bias", path);
    c.initial.running_mean = detail::optional_values(init, "running_mean", path);
    c.initial.running_var = detail::optional_values(init, "running_var", path);
    c.initial.num_batches_tracked = detail::optional_int(init, "num_batches_tracked");

    for (const auto& s : j.at("steps")) {
      FixtureStep st;
      st.training = s.at("training").get<bool>();
      st.shape = s.at("shape").get<std::vector<std::int64_t>>();
      st.x = detail::values(s, "x", path);
      st.dy = detail::values(s, "dy", path);
      st.y = detail::values(s, "y", path);
      st.dx = detail::values(s, "dx", path);
      st.grad_weight = detail::optional_values(s, "grad_weight", path);
      st.grad_bias = detail::optional_values(s, "grad_bias", path);
      st.running_mean = detail::optional_values(s, "running_mean", path);
      st.running_var = detail::optional_values(s, "running_var", path);
      st.num_batches_tracked = detail::optional_int(s, "num_batches_tracked");
      c.steps.push_back(std::move(st));
    }
  } catch (const nlohmann::json::exception& e) {
    detail::fixture_error(path, e.what());
  }

  // Consistency, so that a damaged fixture fails loudly instead of testing nothing.
  if (c.dtype != "float32" && c.dtype != "float64") detail::fixture_error(path, "unknown dtype " + c.dtype);
  if (c.class_dims < 1 || c.class_dims > 3) detail::fixture_error(path, "class_dims out of range");
  if (c.steps.empty()) detail::fixture_error(path, "no steps");
  const auto nf = static_cast<std::size_t>(c.num_features);
  auto check_init = [&](const std::optional<Values>& v, bool present, const char* what) {
    detail::check_size(v, nf, present, what, path, 0);
  };
  check_init(c.initial.weight, c.affine, "initial weight");
  check_init(c.initial.bias, c.affine, "initial bias");
  check_init(c.initial.running_mean, c.track_running_stats, "initial running_mean");
  check_init(c.initial.running_var, c.track_running_stats, "initial running_var");
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const FixtureStep& s = c.steps[i];
    if (s.shape.size() < 2 || s.shape.size() > 5) detail::fixture_error(path, "bad rank");
    std::size_t numel = 1;
    for (auto e : s.shape) numel *= static_cast<std::size_t>(e);
    for (const Values* v : {&s.x, &s.dy, &s.y, &s.dx})
      if (v->size() != numel) detail::fixture_error(path, "step " + std::to_string(i) + ": tensor size mismatch");
    detail::check_size(s.grad_weight, nf, c.affine, "grad_weight", path, i);
    detail::check_size(s.grad_bias, nf, c.affine, "grad_bias", path, i);
    detail::check_size(s.running_mean, nf, c.track_running_stats, "running_mean", path, i);
    detail::check_size(s.running_var, nf, c.track_running_stats, "running_var", path, i);
    if (s.num_batches_tracked.has_value() != c.track_running_stats)
      detail::fixture_error(path, "num_batches_tracked presence does not match track_running_stats");
  }
  return c;
}

/// The *.json files of @p dir, sorted by name (empty when the directory does not exist).
inline std::vector<std::string> list_fixture_files(const std::string& dir
#ifdef BATCHNORM_FIXTURE_DIR
                                                   = BATCHNORM_FIXTURE_DIR
#endif
) {
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
    if (entry.is_regular_file() && entry.path().extension() == ".json") files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

/// GoogleTest-friendly identifier: every character other than [A-Za-z0-9] becomes '_'.
inline std::string identifier(const std::string& s) {
  std::string r = s;
  for (char& ch : r)
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))) ch = '_';
  return r;
}

/// File name without directory and extension.
inline std::string stem(const std::string& path) { return std::filesystem::path(path).stem().string(); }

}  // namespace bn_test
