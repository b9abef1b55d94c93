#pragma once
/// @file config.hpp (yolo)
/// A YOLOv5 model yaml as data: `nc`, `depth_multiple`, `width_multiple`, `anchors`, and
/// the `backbone` and `head` rows `[from, number, module, args]`, read with yaml-cpp.
/// Arguments are kept as Arg values (numbers, booleans, strings, None, lists) with the
/// names YOLOv5 evaluates (`nc`, `anchors`) substituted, so a module maker reads them
/// without yaml-cpp.
///
///   yolo::ModelConfig cfg = yolo::read_model_config("models/yolov5n-orepa.yaml");
///   for (const auto& row : cfg.layers) std::printf("%s\n", row.module.c_str());
///
/// Every fault is a config_error naming the file (and the row): a missing or
/// non-positive multiple, a row that is not [from, number, module, args], a `from` that
/// points forward or out of range, anchors that are not pairs.

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"

namespace orepa::yolo {

/// One argument of a model-yaml row: a number, a boolean, a string, None or a list.
struct Arg {
  /// What the argument holds.
  enum class Kind { none, boolean, number, string, list };
  Kind kind = Kind::none;   ///< the kind
  double number = 0;        ///< for Kind::number (and booleans as 0 / 1)
  std::string text;         ///< for Kind::string (and the source spelling of any scalar)
  std::vector<Arg> items;   ///< for Kind::list

  /// True for None.
  bool is_none() const { return kind == Kind::none; }
  /// The number (a boolean as 0 / 1); config_error naming `what` for another kind.
  double as_number(const std::string& what) const {
    if (kind == Kind::number || kind == Kind::boolean) return number;
    throw config_error(what + ": expected a number, got " + describe());
  }
  /// The number as an integer; config_error naming `what` unless it is a whole number.
  std::int64_t as_int(const std::string& what) const {
    const double v = as_number(what);
    if (std::floor(v) != v || std::abs(v) > 1e15) throw config_error(what + ": expected an integer, got " + describe());
    return std::int64_t(v);
  }
  /// The boolean (True / False); config_error naming `what` for another kind.
  bool as_bool(const std::string& what) const {
    if (kind == Kind::boolean) return number != 0;
    throw config_error(what + ": expected True or False, got " + describe());
  }
  /// The string; config_error naming `what` for another kind.
  const std::string& as_string(const std::string& what) const {
    if (kind == Kind::string) return text;
    throw config_error(what + ": expected a string, got " + describe());
  }
  /// How the argument reads in a message.
  std::string describe() const {
    switch (kind) {
      case Kind::none: return "None";
      case Kind::boolean: return number != 0 ? "True" : "False";
      case Kind::number: return text.empty() ? orepa::detail::cat(number) : text;
      case Kind::string: return "'" + text + "'";
      case Kind::list: {
        std::string s = "[";
        for (std::size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + items[i].describe();
        return s + "]";
      }
    }
    return "?";
  }
};

/// One row of the backbone or head: `[from, number, module, args]`.
struct LayerRow {
  std::vector<std::int64_t> from;  ///< as written (-1: the previous layer, negative: relative)
  std::int64_t number = 1;         ///< repeats before depth scaling
  std::string module;              ///< the module name ("Conv", "C3", "nn.Upsample", ...)
  std::vector<Arg> args;           ///< with `nc` and `anchors` substituted
};

/// A parsed model yaml.
struct ModelConfig {
  std::string source;                         ///< the file (or "<string>") it came from, for messages
  std::int64_t nc = 80;                       ///< classes
  double depth_multiple = 1.0;                ///< repeat scaling
  double width_multiple = 1.0;                ///< channel scaling
  std::int64_t input_channels = 3;            ///< `ch` (image channels), default 3
  std::vector<std::vector<double>> anchors;   ///< per level the (w, h) pairs in pixels
  std::vector<LayerRow> layers;               ///< backbone rows then head rows
  std::size_t backbone_rows = 0;              ///< how many of `layers` are the backbone's
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {

inline Arg scalar_arg(const YAML::Node& n) {
  Arg a;
  const std::string s = n.Scalar();
  a.text = s;
  if (n.Tag() == "!" || s == "None" || s == "null" || s == "~" || s.empty()) {  // quoted strings have tag "!"
    if (n.Tag() == "!") a.kind = Arg::Kind::string;
    return a;
  }
  if (s == "True" || s == "true") return a.kind = Arg::Kind::boolean, a.number = 1, a;
  if (s == "False" || s == "false") return a.kind = Arg::Kind::boolean, a.number = 0, a;
  try {
    std::size_t used = 0;
    const double v = std::stod(s, &used);
    if (used == s.size() && std::isfinite(v)) return a.kind = Arg::Kind::number, a.number = v, a;
  } catch (const std::exception&) {
  }
  a.kind = Arg::Kind::string;
  return a;
}

inline Arg to_arg(const YAML::Node& n, const std::string& where) {
  if (n.IsScalar()) return scalar_arg(n);
  if (n.IsNull()) return Arg{};
  if (n.IsSequence()) {
    Arg a;
    a.kind = Arg::Kind::list;
    for (const auto& item : n) a.items.push_back(to_arg(item, where));
    return a;
  }
  throw config_error(where + ": an argument must be a number, a name, True/False, None or a list");
}

inline double positive_number(const YAML::Node& root, const char* key, double fallback, const std::string& src) {
  if (!root[key]) return fallback;
  const Arg a = to_arg(root[key], src + ": " + key);
  const double v = a.as_number(src + ": " + key);
  if (!(v > 0)) throw config_error(orepa::detail::cat(src, ": ", key, " must be > 0, got ", a.describe()));
  return v;
}

}  // namespace detail
/// \endcond

/// Parses a model yaml given as `text`; `source` names it in messages.
inline ModelConfig parse_model_config(const std::string& text, const std::string& source = "<string>") {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw config_error(orepa::detail::cat(source, ": not valid YAML (", e.what(), ")"));
  }
  if (!root.IsMap()) throw config_error(source + ": a model yaml is a mapping with nc, anchors, backbone and head");
  ModelConfig c;
  c.source = source;
  c.depth_multiple = detail::positive_number(root, "depth_multiple", 1.0, source);
  c.width_multiple = detail::positive_number(root, "width_multiple", 1.0, source);
  if (root["nc"]) {
    c.nc = detail::to_arg(root["nc"], source + ": nc").as_int(source + ": nc");
    if (c.nc < 1 || c.nc > 100000) throw config_error(orepa::detail::cat(source, ": nc must be in [1, 100000], got ", c.nc));
  }
  if (root["ch"]) {
    c.input_channels = detail::to_arg(root["ch"], source + ": ch").as_int(source + ": ch");
    if (c.input_channels < 1 || c.input_channels > 4096)
      throw config_error(orepa::detail::cat(source, ": ch must be in [1, 4096], got ", c.input_channels));
  }
  Arg anchors;
  if (root["anchors"]) {
    anchors = detail::to_arg(root["anchors"], source + ": anchors");
    if (anchors.kind != Arg::Kind::list)
      throw config_error(source + ": anchors must be a list of levels of (w, h) pixel pairs (a number of anchors, "
                                  "for AutoAnchor, is not supported)");
    for (std::size_t l = 0; l < anchors.items.size(); ++l) {
      const Arg& level = anchors.items[l];
      const std::string what = orepa::detail::cat(source, ": anchors level ", l);
      if (level.kind != Arg::Kind::list || level.items.empty() || level.items.size() % 2)
        throw config_error(what + ": expected a list of (w, h) pairs, got " + level.describe());
      std::vector<double> v;
      for (const auto& x : level.items) {
        const double a = x.as_number(what);
        if (!(a > 0)) throw config_error(what + ": anchor sizes must be > 0, got " + x.describe());
        v.push_back(a);
      }
      if (!c.anchors.empty() && v.size() != c.anchors[0].size())
        throw config_error(what + ": every level needs the same number of anchors");
      c.anchors.push_back(std::move(v));
    }
  }
  for (const char* part : {"backbone", "head"}) {
    const YAML::Node rows = root[part];
    if (!rows || !rows.IsSequence())
      throw config_error(orepa::detail::cat(source, ": '", part, "' must be a list of [from, number, module, args] rows"));
    if (std::string(part) == "head") c.backbone_rows = c.layers.size();
    for (const auto& row : rows) {
      const std::size_t i = c.layers.size();
      const std::string where = orepa::detail::cat(source, ": layer ", i);
      if (i >= 10000) throw config_error(source + ": more than 10000 layers");
      if (!row.IsSequence() || row.size() != 4)
        throw config_error(where + ": a row must be [from, number, module, args]");
      LayerRow r;
      const Arg from = detail::to_arg(row[0], where);
      const auto resolve = [&](const Arg& f) {
        const std::int64_t v = f.as_int(where + " from");
        const std::int64_t abs = v < 0 ? std::int64_t(i) + v : v;
        if (i == 0 && v != -1) throw config_error(where + ": the first layer reads the image: from must be -1");
        if (i > 0 && (abs < 0 || abs >= std::int64_t(i)))
          throw config_error(orepa::detail::cat(where, ": from ", v, abs >= std::int64_t(i) ? " points forward" : " points before layer 0",
                                                " (layer ", i, " may read layers 0 .. ", i - 1, "; -1 is the previous one)"));
        return v;
      };
      if (from.kind == Arg::Kind::list) {
        if (from.items.empty()) throw config_error(where + ": from is an empty list");
        for (const auto& f : from.items) r.from.push_back(resolve(f));
      } else {
        r.from.push_back(resolve(from));
      }
      r.number = detail::to_arg(row[1], where).as_int(where + " number");
      if (r.number < 1 || r.number > 1000)
        throw config_error(orepa::detail::cat(where, ": number must be in [1, 1000], got ", r.number));
      const Arg module = detail::to_arg(row[2], where);
      r.module = module.kind == Arg::Kind::string ? module.text : module.describe();
      const Arg args = detail::to_arg(row[3], where);
      if (args.kind != Arg::Kind::list) throw config_error(where + ": args must be a list, got " + args.describe());
      for (Arg a : args.items) {
        // YOLOv5 evaluates names: nc and anchors are the yaml's values.
        if (a.kind == Arg::Kind::string && a.text == "nc") a.kind = Arg::Kind::number, a.number = double(c.nc), a.text.clear();
        else if (a.kind == Arg::Kind::string && a.text == "anchors") a = anchors;
        r.args.push_back(std::move(a));
      }
      c.layers.push_back(std::move(r));
    }
  }
  if (c.layers.empty()) throw config_error(source + ": the model has no layers");
  return c;
}

/// Reads and parses the model yaml at `path` (config_error naming it when unreadable).
inline ModelConfig read_model_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw config_error(path + ": cannot read the model yaml");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_model_config(text.str(), path);
}

}  // namespace orepa::yolo
