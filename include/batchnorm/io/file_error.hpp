/**
 * @file io/file_error.hpp
 * @brief batchnorm::io::file_error, and the safetensors header limit.
 */
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

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

}  // namespace batchnorm::io
