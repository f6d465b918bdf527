/**
 * @file errors.hpp
 * @brief Typed exceptions thrown by every batchnorm entry point.
 *
 * Every error names what went wrong in words a user can act on: the argument, the
 * value expected and the value given. A call that throws leaves every buffer and
 * counter it owns as it was before the call (strong exception guarantee).
 */
#pragma once

#include <charconv>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace batchnorm {

/**
 * @brief A bad argument: wrong rank, channel count, null pointer, eps, momentum, ...
 *
 * `argument()` is the name of the offending parameter as it appears in the API
 * (e.g. "shape", "momentum", "x"), so programs can react without parsing `what()`.
 */
class invalid_argument : public std::invalid_argument {
 public:
  invalid_argument(std::string argument, const std::string& message)
      : std::invalid_argument(message), argument_(std::move(argument)) {}
  /// @brief The API name of the argument that was rejected.
  [[nodiscard]] const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

/**
 * @brief A call that is valid on its own but not in the object's current state,
 *        e.g. `backward` with no training forward before it.
 */
class state_error : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

/**
 * @brief A failed CUDA runtime call or kernel launch.
 *
 * Carries the CUDA error code as an int (so this header needs no CUDA headers), the
 * file and line of the failing call, and a message with the CUDA error name and text.
 */
class cuda_error : public std::runtime_error {
 public:
  cuda_error(int code, std::string file, int line, const std::string& message)
      : std::runtime_error(message), code_(code), file_(std::move(file)), line_(line) {}
  [[nodiscard]] int code() const noexcept { return code_; }
  [[nodiscard]] const std::string& file() const noexcept { return file_; }
  [[nodiscard]] int line() const noexcept { return line_; }

 private:
  int code_;
  std::string file_;
  int line_;
};

/**
 * @brief A state file (e.g. safetensors) that is truncated, corrupt, or does not
 *        match the layer it is loaded into.
 */
class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Streams one part of a message. Floating-point values are written in the shortest form
/// that reads back as the same value (std::to_chars), so that a rejected value is never shown
/// as an accepted one (`nextafter(1, 2)` is "1.0000000000000002", not the stream's "1").
template <class Part>
void put_part(std::ostream& os, const Part& part) {
  if constexpr (std::is_floating_point_v<Part>) {
    char text[64];
    const auto end = std::to_chars(text, text + sizeof text, part).ptr;
    os.write(text, end - text);
  } else {
    os << part;
  }
}

/// Builds a message from stream-able parts: `concat("expected ", 4, ", got ", 3)`.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (put_part(os, parts), ...);
  return os.str();
}

/// Throws batchnorm::invalid_argument naming @p argument when @p condition is false.
template <class... Parts>
void require(bool condition, const char* argument, const Parts&... parts) {
  if (!condition) throw invalid_argument(argument, concat(parts...));
}

}  // namespace detail
}  // namespace batchnorm
