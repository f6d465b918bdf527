// examples/common/cli.hpp: the command-line parser of the examples that take options
// (03_convergence, 04_cnn_experiments, 05_data_parallel). Each example declares its options
// in a table (name, value placeholder, the variable it sets, help line); the variable's
// initial value is the default. Header-only, standard library only.
//
//   examples::Options options("usage: example_x [--epochs N]\n");
//   options.value("--epochs", "N", config.epochs, "epochs per run (default 30)")
//       .flag("--quick", config.quick, "the short configuration ctest runs");
//   options.parse(argc, argv);                 // --help / -h: prints the usage, exits 0
//   if (!options.given("--epochs")) ...        // was it on the command line?
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace examples {

class Options {
 public:
  /// @p synopsis: the usage line(s) printed above the option table, ending in a newline.
  /// @p help_column: where the help texts start (0: two spaces after the longest
  /// "--name VALUE").
  explicit Options(std::string synopsis, std::size_t help_column = 0)
      : synopsis_(std::move(synopsis)), help_column_(help_column) {}

  /// An option with a value, read into @p target (std::stoi / std::stoull / std::stod).
  Options& value(const char* name, const char* placeholder, std::string& target, const char* help) {
    return add(name, placeholder, help, [&target](const std::string& v) { target = v; });
  }
  Options& value(const char* name, const char* placeholder, int& target, const char* help) {
    return add(name, placeholder, help, [&target](const std::string& v) { target = std::stoi(v); });
  }
  Options& value(const char* name, const char* placeholder, std::uint64_t& target, const char* help) {
    return add(name, placeholder, help, [&target](const std::string& v) { target = std::stoull(v); });
  }
  Options& value(const char* name, const char* placeholder, double& target, const char* help) {
    return add(name, placeholder, help, [&target](const std::string& v) { target = std::stod(v); });
  }
  /// A comma-separated list of numbers; replaces the default list.
  Options& value(const char* name, const char* placeholder, std::vector<double>& target, const char* help) {
    return add(name, placeholder, help, [&target](const std::string& v) {
      target.clear();
      std::stringstream list(v);
      for (std::string item; std::getline(list, item, ',');) target.push_back(std::stod(item));
    });
  }
  /// An option without a value: sets @p target to true.
  Options& flag(const char* name, bool& target, const char* help) {
    options_.push_back({name, "", help, nullptr, &target});
    return *this;
  }

  /// The synopsis and one line per option, in the order they were declared.
  [[nodiscard]] std::string usage() const {
    std::size_t column = help_column_;
    if (column == 0)
      for (const Option& o : options_) column = std::max(column, label(o).size() + 2);
    std::string text = synopsis_;
    for (const Option& o : options_) {
      std::string line = label(o);
      line.resize(std::max(column, line.size() + 1), ' ');
      text += "  " + line + o.help + "\n";
    }
    return text;
  }

  /// Reads argv left to right. Throws std::invalid_argument for an unknown argument (the
  /// message ends with the usage) or an option given without its value.
  void parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        std::fputs(usage().c_str(), stdout);
        std::exit(0);
      }
      const auto option = std::find_if(options_.begin(), options_.end(), [&](const Option& o) { return arg == o.name; });
      if (option == options_.end()) throw std::invalid_argument("unknown argument " + arg + "\n" + usage());
      if (option->flag) {
        *option->flag = true;
      } else {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        option->set(argv[++i]);
      }
      given_.insert(arg);
    }
  }

  /// Whether @p name was on the command line (to let an explicit value override a preset).
  [[nodiscard]] bool given(const std::string& name) const { return given_.count(name) != 0; }

 private:
  struct Option {
    std::string name, placeholder, help;
    std::function<void(const std::string&)> set;  // null for a flag
    bool* flag;
  };

  Options& add(const char* name, const char* placeholder, const char* help, std::function<void(const std::string&)> set) {
    options_.push_back({name, placeholder, help, std::move(set), nullptr});
    return *this;
  }
  static std::string label(const Option& o) { return o.placeholder.empty() ? o.name : o.name + " " + o.placeholder; }

  std::string synopsis_;
  std::size_t help_column_;
  std::vector<Option> options_;
  std::set<std::string> given_;
};

}  // namespace examples
