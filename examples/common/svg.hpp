// examples/common/svg.hpp: the SVG writing that 03_convergence and 04_cnn_experiments share
// for their plots: the document, its text and line elements, polylines and shaded shapes,
// and the two colours that tell the networks apart (with BatchNorm: blue, solid; plain:
// orange, dashed). The plots themselves (panels, axes, what goes where) stay in each example.
// Header-only, standard library only.
#pragma once

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace examples {

constexpr const char* kBnColor = "#1f77b4";     // with BatchNorm: blue, solid
constexpr const char* kPlainColor = "#e6550d";  // plain: orange, dashed

/// An SVG document of @p width x @p height pixels on a white background, built in memory
/// and written by save().
class SvgDocument {
 public:
  SvgDocument(double width, double height) : width_(width) {
    s_ << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
       << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"DejaVu Sans, Arial, sans-serif\">\n"
       << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  }

  [[nodiscard]] double width() const { return width_; }

  /// For elements this class has no writer for.
  std::ostringstream& raw() { return s_; }

  /// @p rotate: degrees about (x, y); 0 writes no transform.
  void text(double x, double y, const std::string& content, const char* anchor = "middle", int size = 12,
            const char* weight = "normal", const char* color = "#222", double rotate = 0) {
    s_ << "<text x=\"" << x << "\" y=\"" << y << "\" text-anchor=\"" << anchor << "\" font-size=\"" << size
       << "\" font-weight=\"" << weight << "\" fill=\"" << color << '"';
    if (rotate != 0) s_ << " transform=\"rotate(" << rotate << ' ' << x << ' ' << y << ")\"";
    s_ << '>' << content << "</text>\n";
  }

  void line(double x1, double y1, double x2, double y2, const char* color, double w, const char* dash = nullptr) {
    s_ << "<line x1=\"" << x1 << "\" y1=\"" << y1 << "\" x2=\"" << x2 << "\" y2=\"" << y2 << "\" stroke=\"" << color
       << "\" stroke-width=\"" << w << '"';
    if (dash) s_ << " stroke-dasharray=\"" << dash << '"';
    s_ << "/>\n";
  }

  /// An open line (@p fill_opacity 0) or a closed shaded shape through points in pixels.
  void path(const std::vector<std::pair<double, double>>& pts, const char* color, double w, const char* dash,
            double fill_opacity = 0.0) {
    if (pts.empty()) return;
    s_ << (fill_opacity > 0 ? "<polygon" : "<polyline") << " points=\"";
    for (const auto& [x, y] : pts) s_ << x << ',' << y << ' ';
    s_ << "\" stroke=\"" << color << "\" stroke-width=\"" << w << '"';
    if (fill_opacity > 0) s_ << " fill=\"" << color << "\" fill-opacity=\"" << fill_opacity << '"';
    else s_ << " fill=\"none\"";
    if (dash) s_ << " stroke-dasharray=\"" << dash << '"';
    s_ << "/>\n";
  }

  /// Closes the document and writes it to @p path.
  void save(const std::string& path) {
    s_ << "</svg>\n";
    std::ofstream out(path);
    if (!out) throw std::runtime_error("cannot write " + path);
    out << s_.str();
    if (!out) throw std::runtime_error("error writing " + path);
  }

 private:
  std::ostringstream s_;
  double width_;
};

}  // namespace examples
