#pragma once
/// @file dataset.hpp
/// YOLO-format detection data sets, and a loader that prepares batches on threads.
///
/// The format is YOLOv5's: images under an `images/` folder, one label file per image at
/// the same place under `labels/` (the last `/images/` of the path replaced by `/labels/`,
/// the extension by `.txt`), one `class cx cy w h` line per box, coordinates normalised
/// to [0, 1] by the image's width and height. An image without a label file, or with an
/// empty one, is a background image (no boxes). A data yaml names the splits:
///
///     path: ../datasets/shapes   # root of the relative paths below; default: the yaml's folder
///     train: images/train        # a folder (searched recursively), a .txt list of images, or a list of those
///     val: images/val
///     nc: 3                      # optional when names are given; must agree with them
///     names: [circle, square, triangle]   # or a map {0: circle, 1: square, 2: triangle}
///
/// A relative `path:` is taken relative to the yaml's folder (YOLOv5 takes it relative to its
/// own source folder), and a relative line of a .txt list relative to the list's folder.
///
/// Labels are checked when the data set is built, and every image's header is read then:
/// a malformed line (not 5 fields, a non-number), a class that is not an integer in
/// [0, nc), a coordinate outside [0, 1] (after rounding to float, as YOLOv5 checks it) and
/// an image whose size cannot be read are format_errors naming `file:line` (or the file).
/// Exact duplicate lines are dropped, as in YOLOv5. Boxes are clipped to their image; a box
/// left with no width or height is dropped. An empty data set is an error naming its source.
///
///   auto cfg = orepa::yolo::read_data_config("shapes/data.yaml");
///   auto train = orepa::yolo::YoloDataset::from_config(cfg, "train");
///   orepa::yolo::DataLoader loader(train, orepa::yolo::LoaderOptions().image_size(256).batch_size(16)
///                                             .augment(true).seed(1));
///   for (int epoch = 0; epoch < epochs; ++epoch)
///     for (std::int64_t i = 0; i < loader.batches_per_epoch(); ++i) {
///       orepa::yolo::Batch b = loader.next();  // the loader thread is already preparing the next one
///       // b.images [B, 3, S, S] in [0, 1]; b.targets [n, 6] = (image in batch, class, cx, cy, w, h), normalised
///     }
///
/// Batches are a pure function of (data set, options, epoch, batch index): the order of an
/// epoch is a seeded shuffle, each sample's augmentation draws from its own seeded Rng, so
/// the threaded loader gives exactly what make_batch gives called in sequence. Decoding
/// dominates an augmented sample (a mosaic reads four images): `train.cache_images()` keeps
/// them in memory after the first epoch.
///
/// Unlike YOLOv5: batches are always square (no rectangular validation batches), JPEG EXIF
/// orientation is ignored, and segment labels (polygons, more than 5 fields) are an error.

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/random.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/yolo/augment.hpp"
#include "orepa/yolo/image.hpp"

namespace orepa::yolo {

/// One line of a label file: a class and a box normalised to [0, 1] by the image size.
struct LabelBox {
  int cls = 0;   ///< class index in [0, nc)
  float cx = 0;  ///< centre x / image width
  float cy = 0;  ///< centre y / image height
  float w = 0;   ///< width / image width
  float h = 0;   ///< height / image height
  /// Field-wise equality (used to drop duplicate lines).
  bool operator==(const LabelBox& o) const { return cls == o.cls && cx == o.cx && cy == o.cy && w == o.w && h == o.h; }
};

namespace detail {

/// `s` without leading and trailing blanks (spaces, tabs, CR).
inline std::string_view trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\r\f\v");
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(" \t\r\f\v") - first + 1);
}

/// Parses all of `tok` as a number (an optional leading '+' allowed, as Python's float()
/// does); false if anything is left over or it is not a number.
template <class T>
bool parse_number(std::string_view tok, T& out) {
  if (!tok.empty() && tok.front() == '+') {
    tok.remove_prefix(1);
    if (!tok.empty() && (tok.front() == '+' || tok.front() == '-')) return false;
  }
  const auto r = std::from_chars(tok.data(), tok.data() + tok.size(), out);
  return r.ec == std::errc() && r.ptr == tok.data() + tok.size();
}

/// Lower-case extension of `p` without the dot ("PNG" -> "png").
inline std::string lower_extension(const std::filesystem::path& p) {
  std::string e = p.extension().string();
  if (!e.empty()) e.erase(0, 1);
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return e;
}

/// `p` made absolute and lexically normal (so label_path_for can find "/images/").
inline std::string normal_path(const std::filesystem::path& p) {
  return std::filesystem::absolute(p).lexically_normal().string();
}

/// SplitMix64's finaliser: a well mixed 64-bit function of x (seeds for per-sample Rngs).
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace detail

/// Image file extensions the reader lists (those stb decodes; lower case, no dot).
inline const std::vector<std::string>& image_extensions() {
  static const std::vector<std::string> e = {"bmp", "gif", "jpeg", "jpg", "pgm", "png", "pnm", "ppm", "tga"};
  return e;
}

/// Whether `path` has one of image_extensions() (case-insensitive).
inline bool is_image_file(const std::string& path) {
  const auto e = detail::lower_extension(path);
  const auto& all = image_extensions();
  return std::find(all.begin(), all.end(), e) != all.end();
}

/// YOLOv5's label path of an image: the last "/images/" of `image_path` replaced by
/// "/labels/" (left as is when absent: the label sits next to the image) and the file's
/// extension by ".txt".
inline std::string label_path_for(const std::string& image_path) {
  std::string p = image_path;
  const auto k = p.rfind("/images/");
  if (k != std::string::npos) p.replace(k, 8, "/labels/");
  return std::filesystem::path(p).replace_extension(".txt").string();
}

/// Parses the text of a label file (`file` names it in errors) for a data set of `nc`
/// classes. Blank lines are skipped; every other line must be `class cx cy w h`. Throws
/// format_error "file:line: ..." for a wrong field count, a non-number, a class that is not
/// an integer in [0, nc), a coordinate outside [0, 1] (or NaN); config_error for nc < 1.
/// Exact duplicate lines are dropped (the first is kept).
inline std::vector<LabelBox> parse_labels(std::string_view text, const std::string& file, int nc) {
  if (nc < 1) throw config_error(orepa::detail::cat("parse_labels(", file, "): nc must be >= 1, got ", nc));
  std::vector<LabelBox> out;
  int line_no = 0;
  while (!text.empty()) {
    const auto nl = text.find('\n');
    const std::string_view line = detail::trim(text.substr(0, nl));
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    ++line_no;
    if (line.empty()) continue;
    auto fail = [&](const std::string& why) {
      return format_error(orepa::detail::cat(file, ":", line_no, ": ", why, " in label line '", line, "'"));
    };
    std::array<std::string_view, 5> tok;
    std::size_t n = 0, pos = 0;
    while (pos < line.size()) {
      const auto start = line.find_first_not_of(" \t\r\f\v", pos);
      if (start == std::string_view::npos) break;
      const auto end = std::min(line.find_first_of(" \t\r\f\v", start), line.size());
      if (n < tok.size()) tok[n] = line.substr(start, end - start);
      ++n, pos = end;
    }
    if (n != 5) throw fail(orepa::detail::cat("expected 5 fields (class cx cy w h), got ", n));
    double cls = 0;
    if (!detail::parse_number(tok[0], cls)) throw fail(orepa::detail::cat("class '", tok[0], "' is not a number"));
    if (!(cls >= 0 && cls == std::floor(cls)))
      throw fail(orepa::detail::cat("class '", tok[0], "' is not a non-negative integer"));
    if (cls >= nc) throw fail(orepa::detail::cat("class ", tok[0], " >= nc ", nc));
    static const char* const names[5] = {"class", "cx", "cy", "w", "h"};
    float v[5] = {};
    for (std::size_t i = 1; i < 5; ++i) {
      if (!detail::parse_number(tok[i], v[i])) throw fail(orepa::detail::cat(names[i], " '", tok[i], "' is not a number"));
      if (!(v[i] >= 0.0f && v[i] <= 1.0f))
        throw fail(orepa::detail::cat(names[i], " ", tok[i], " outside [0, 1] (coordinates are normalised by the image size)"));
    }
    const LabelBox b{int(cls), v[1], v[2], v[3], v[4]};
    if (std::find(out.begin(), out.end(), b) == out.end()) out.push_back(b);
  }
  return out;
}

/// The labels of the label file `path`, parsed by parse_labels; an absent file gives no
/// boxes (a background image). format_error if it exists but is no regular file or cannot
/// be read.
inline std::vector<LabelBox> read_labels(const std::string& path, int nc) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::not_found) return {};
  if (ec) throw format_error(orepa::detail::cat(path, ": cannot read label file: ", ec.message()));
  if (st.type() != std::filesystem::file_type::regular)
    throw format_error(orepa::detail::cat(path, ": label path exists but is not a regular file"));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw format_error(orepa::detail::cat(path, ": cannot open label file: ", std::strerror(errno)));
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) throw format_error(orepa::detail::cat(path, ": cannot read label file"));
  return parse_labels(s.str(), path, nc);
}

/// The text of a label file holding `boxes`: one `class cx cy w h` line each, every number
/// written in its shortest form that reads back to the same float.
inline std::string format_labels(const std::vector<LabelBox>& boxes) {
  std::string out;
  char buf[32];
  for (const auto& b : boxes) {
    out += std::to_string(b.cls);
    for (float v : {b.cx, b.cy, b.w, b.h}) {
      const auto r = std::to_chars(buf, buf + sizeof buf, v);
      out += ' ';
      out.append(buf, r.ptr);
    }
    out += '\n';
  }
  return out;
}

/// The images of `source`: every file with an image extension under a folder (recursively),
/// or the lines of a list file (blank lines skipped; relative paths relative to the list's
/// folder), made absolute, in sorted order for a folder and in list order for a list.
/// Throws format_error when the source does not exist, when a folder holds an image format
/// stb cannot read (tif, tiff, webp, dng, mpo, pfm: rather than skipping them silently), or
/// when a list names a file without an image extension (file:line).
inline std::vector<std::string> list_images(const std::string& source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> out;
  if (fs::is_directory(source, ec)) {
    static const std::vector<std::string> unreadable = {"dng", "mpo", "pfm", "tif", "tiff", "webp"};
    for (fs::recursive_directory_iterator it(source, fs::directory_options::follow_directory_symlink, ec), end;
         !ec && it != end; it.increment(ec)) {
      if (!it->is_regular_file(ec)) continue;
      const std::string path = it->path().string();
      if (is_image_file(path)) out.push_back(detail::normal_path(path));
      else if (std::find(unreadable.begin(), unreadable.end(), detail::lower_extension(path)) != unreadable.end())
        throw format_error(orepa::detail::cat(path, ": image format '", detail::lower_extension(path),
                                              "' is not supported (readable: png, jpg, bmp, tga, gif, ppm, pgm)"));
    }
    if (ec) throw format_error(orepa::detail::cat(source, ": cannot list folder: ", ec.message()));
    std::sort(out.begin(), out.end());
    return out;
  }
  if (!fs::is_regular_file(source, ec))
    throw format_error(orepa::detail::cat(source, ": no such folder or image list file"));
  std::ifstream f(source);
  if (!f) throw format_error(orepa::detail::cat(source, ": cannot open image list: ", std::strerror(errno)));
  const fs::path base = fs::path(source).parent_path();
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    const std::string entry(detail::trim(line));
    if (entry.empty()) continue;
    if (!is_image_file(entry))
      throw format_error(orepa::detail::cat(source, ":", n, ": '", entry, "' is not an image file (extensions: ",
                                            "png, jpg, jpeg, bmp, tga, gif, ppm, pgm, pnm)"));
    const fs::path p(entry);
    out.push_back(detail::normal_path(p.is_absolute() ? p : base / p));
  }
  return out;
}

/// A data yaml, resolved: absolute sources for each split, classes.
struct DataConfig {
  std::string yaml;                ///< the yaml file read
  std::string root;                ///< the folder relative sources are resolved against
  std::vector<std::string> train;  ///< training sources (folders or list files)
  std::vector<std::string> val;    ///< validation sources
  std::vector<std::string> test;   ///< test sources (may be empty)
  int nc = 0;                      ///< number of classes
  std::vector<std::string> names;  ///< class names, nc of them
};

/// Reads a data yaml (format in the file comment). Throws format_error naming the file (and
/// the line, for yaml syntax and wrong value types) when it cannot be read or parsed, when
/// `train` or `val` is missing, when neither `names` nor `nc` is given, when they disagree,
/// or when a names map does not have the keys 0..n-1.
inline DataConfig read_data_config(const std::string& yaml_path) {
  namespace fs = std::filesystem;
  YAML::Node doc;
  try {
    doc = YAML::LoadFile(yaml_path);
  } catch (const YAML::BadFile&) {
    throw format_error(orepa::detail::cat(yaml_path, ": cannot open data yaml"));
  } catch (const YAML::Exception& e) {
    throw format_error(orepa::detail::cat(yaml_path, ":", e.mark.line + 1, ": invalid yaml: ", e.msg));
  }
  auto fail = [&](const YAML::Node& n, const std::string& why) {
    const auto m = n.Mark();
    return format_error(m.is_null() ? orepa::detail::cat(yaml_path, ": ", why)
                                    : orepa::detail::cat(yaml_path, ":", m.line + 1, ": ", why));
  };
  if (!doc.IsMap()) throw fail(doc, "expected a map with train, val, nc and names");
  DataConfig cfg;
  cfg.yaml = yaml_path;
  const fs::path yaml_dir = fs::absolute(yaml_path).parent_path();
  fs::path root = yaml_dir;
  try {
    if (const auto p = doc["path"]; p && !p.IsNull()) {
      if (!p.IsScalar()) throw fail(p, "'path' must be a folder name");
      const fs::path given(p.as<std::string>());
      root = given.is_absolute() ? given : yaml_dir / given;
    }
    cfg.root = root.lexically_normal().string();
    auto sources = [&](const char* key, bool required) {
      std::vector<std::string> out;
      const auto n = doc[key];
      if (!n || n.IsNull()) {
        if (required) throw fail(doc, orepa::detail::cat("'", key, "' is missing (a folder or .txt list of images)"));
        return out;
      }
      auto add = [&](const YAML::Node& s) {
        if (!s.IsScalar()) throw fail(s, orepa::detail::cat("'", key, "' must be a path or a list of paths"));
        const fs::path given(s.as<std::string>());
        out.push_back((given.is_absolute() ? given : root / given).lexically_normal().string());
      };
      if (n.IsSequence())
        for (const auto& s : n) add(s);
      else add(n);
      if (out.empty() && required) throw fail(n, orepa::detail::cat("'", key, "' is an empty list"));
      return out;
    };
    cfg.train = sources("train", true);
    cfg.val = sources("val", true);
    cfg.test = sources("test", false);
    if (const auto names = doc["names"]; names && !names.IsNull()) {
      if (names.IsSequence()) {
        for (const auto& s : names) cfg.names.push_back(s.as<std::string>());
      } else if (names.IsMap()) {
        std::map<long long, std::string> by_id;
        for (const auto& kv : names) by_id[kv.first.as<long long>()] = kv.second.as<std::string>();
        long long expect = 0;
        for (const auto& [id, name] : by_id) {
          if (id != expect) throw fail(names, orepa::detail::cat("'names' map must have the keys 0..", by_id.size() - 1,
                                                                 ", key ", expect, " is missing"));
          cfg.names.push_back(name), ++expect;
        }
      } else {
        throw fail(names, "'names' must be a list or a map of class index to name");
      }
      if (cfg.names.empty()) throw fail(names, "'names' is empty");
    }
    if (const auto nc = doc["nc"]; nc && !nc.IsNull()) {
      cfg.nc = nc.as<int>();
      if (cfg.nc < 1) throw fail(nc, orepa::detail::cat("'nc' must be >= 1, got ", cfg.nc));
      if (!cfg.names.empty() && int(cfg.names.size()) != cfg.nc)
        throw fail(nc, orepa::detail::cat("'nc' is ", cfg.nc, " but 'names' has ", cfg.names.size(), " entries"));
      for (int i = int(cfg.names.size()); i < cfg.nc; ++i) cfg.names.push_back("class" + std::to_string(i));
    } else if (cfg.names.empty()) {
      throw fail(doc, "neither 'names' nor 'nc' is given");
    } else {
      cfg.nc = int(cfg.names.size());
    }
  } catch (const YAML::Exception& e) {  // a value of the wrong type (as<int> of "three")
    throw format_error(orepa::detail::cat(yaml_path, ":", e.mark.line + 1, ": ", e.msg));
  }
  return cfg;
}

/// A detection data set: image paths with their labels, checked when built (see the file
/// comment). Copyable; load() is const and safe to call from several threads.
class YoloDataset {
 public:
  /// The data set of `image_paths` (made absolute; label files found by label_path_for) for
  /// `nc` classes; `names` (empty, or nc of them) and `source` (what the paths came from, for
  /// messages). Reads every label file and every image header; throws format_error on the
  /// first bad one (file:line for labels), on an empty list (naming `source`), config_error
  /// for nc < 1 or a wrong number of names.
  YoloDataset(std::vector<std::string> image_paths, int nc, std::vector<std::string> names = {},
              std::string source = "")
      : paths_(std::move(image_paths)), nc_(nc), names_(std::move(names)), source_(std::move(source)) {
    if (nc_ < 1) throw config_error(orepa::detail::cat("YoloDataset: nc must be >= 1, got ", nc_));
    if (!names_.empty() && int(names_.size()) != nc_)
      throw config_error(orepa::detail::cat("YoloDataset: ", names_.size(), " names for nc ", nc_));
    if (paths_.empty())
      throw format_error(orepa::detail::cat("YoloDataset: no images found in ", source_.empty() ? "(empty list)" : source_));
    labels_.reserve(paths_.size());
    sizes_.reserve(paths_.size());
    for (auto& p : paths_) {
      p = detail::normal_path(p);
      sizes_.push_back(read_image_size(p));
      labels_.push_back(read_labels(label_path_for(p), nc_));
      num_boxes_ += std::int64_t(labels_.back().size());
      num_backgrounds_ += labels_.back().empty();
    }
  }

  /// The images of `sources` (folders or list files, list_images) as one data set.
  static YoloDataset from_sources(const std::vector<std::string>& sources, int nc, std::vector<std::string> names = {}) {
    std::vector<std::string> paths;
    std::string what;
    for (const auto& s : sources) {
      auto p = list_images(s);
      paths.insert(paths.end(), p.begin(), p.end());
      what += (what.empty() ? "" : ", ") + s;
    }
    return YoloDataset(std::move(paths), nc, std::move(names), what);
  }

  /// Split `split` ("train", "val" or "test") of a data config.
  static YoloDataset from_config(const DataConfig& cfg, const std::string& split) {
    const std::vector<std::string>* s = split == "train" ? &cfg.train : split == "val" ? &cfg.val
                                      : split == "test"  ? &cfg.test : nullptr;
    if (!s) throw config_error(orepa::detail::cat("YoloDataset::from_config: split must be train, val or test, got '",
                                                  split, "'"));
    if (s->empty()) throw format_error(orepa::detail::cat(cfg.yaml, ": no '", split, "' split"));
    return from_sources(*s, cfg.nc, cfg.names);
  }

  /// Number of images.
  std::int64_t size() const { return std::int64_t(paths_.size()); }
  /// Number of classes.
  int num_classes() const { return nc_; }
  /// Class names (empty if none were given).
  const std::vector<std::string>& names() const { return names_; }
  /// Where the images came from (for messages).
  const std::string& source() const { return source_; }
  /// Total number of boxes over all images.
  std::int64_t num_boxes() const { return num_boxes_; }
  /// Number of images without boxes.
  std::int64_t num_backgrounds() const { return num_backgrounds_; }
  /// Path of image `i`.
  const std::string& image_path(std::int64_t i) const { return paths_.at(check(i)); }
  /// Size of image `i` from its header.
  const ImageSize& image_size(std::int64_t i) const { return sizes_.at(check(i)); }
  /// Labels of image `i` as read from its label file.
  const std::vector<LabelBox>& labels(std::int64_t i) const { return labels_.at(check(i)); }

  /// Image `i` as RGB [3, H, W] in [0, 1] with its boxes in pixels, clipped to the image
  /// (boxes left without width or height dropped). format_error naming the file if it no
  /// longer decodes or its size changed since the data set was built.
  LabeledImage load(std::int64_t i) const {
    const std::size_t k = check(i);
    LabeledImage s;
    if (cache_) {
      Cache& c = *cache_;
      std::call_once(c.once[k], [&] {
        c.images[k] = read_image_u8(paths_[k], 3);
        c.bytes += std::int64_t(c.images[k].pixels.size());
      });
      s.image = to_float_image(c.images[k]);
    } else {
      s.image = read_image(paths_[k], 3);
    }
    const int h = int(s.image.size(1)), w = int(s.image.size(2));
    if (w != sizes_[k].width || h != sizes_[k].height)
      throw format_error(orepa::detail::cat(paths_[k], ": image is ", w, "x", h, " but was ", sizes_[k].width, "x",
                                            sizes_[k].height, " when the data set was built"));
    for (const auto& l : labels_[k]) {
      const PixelBox b{l.cls, std::clamp((l.cx - l.w / 2) * float(w), 0.0f, float(w)),
                       std::clamp((l.cy - l.h / 2) * float(h), 0.0f, float(h)),
                       std::clamp((l.cx + l.w / 2) * float(w), 0.0f, float(w)),
                       std::clamp((l.cy + l.h / 2) * float(h), 0.0f, float(h))};
      if (b.x2 > b.x1 && b.y2 > b.y1) s.boxes.push_back(b);
    }
    return s;
  }

  /// Keeps every image in memory, decoded to 8 bits, after its first load (YOLOv5's
  /// `--cache ram`: about width x height x 3 bytes per image), so that later epochs do not
  /// decode files again. The cache is shared with the copies of this data set made after
  /// the call (a DataLoader's copy too) and is filled safely from several threads.
  /// cache_images(false) drops this object's reference to it.
  YoloDataset& cache_images(bool on = true) {
    cache_ = on ? std::make_shared<Cache>(paths_.size()) : nullptr;
    return *this;
  }
  /// Bytes of decoded images held in the cache (0 without one).
  std::int64_t cached_bytes() const { return cache_ ? cache_->bytes.load() : 0; }

 private:
  struct Cache {
    explicit Cache(std::size_t n) : images(n), once(new std::once_flag[n]) {}
    std::vector<ImageU8> images;
    std::unique_ptr<std::once_flag[]> once;
    std::atomic<std::int64_t> bytes{0};
  };

  std::size_t check(std::int64_t i) const {
    if (i < 0 || i >= size())
      throw config_error(orepa::detail::cat("YoloDataset: index ", i, " outside [0, ", size(), ") of ", source_));
    return std::size_t(i);
  }

  std::vector<std::string> paths_;
  int nc_;
  std::vector<std::string> names_;
  std::string source_;
  std::vector<std::vector<LabelBox>> labels_;
  std::vector<ImageSize> sizes_;
  std::int64_t num_boxes_ = 0, num_backgrounds_ = 0;
  std::shared_ptr<Cache> cache_;
};

/// How batches are made (PyTorch DataLoader / YOLOv5 names where they exist).
struct LoaderOptions {
  /// @fn image_size(const int&)
  /// @brief Sets image_size(); returns `*this` for chaining.
  /// @fn batch_size(const int&)
  /// @brief Sets batch_size(); returns `*this` for chaining.
  /// @fn augment(const bool&)
  /// @brief Sets augment(); returns `*this` for chaining.
  /// @fn augmentation(const AugmentOptions&)
  /// @brief Sets augmentation(); returns `*this` for chaining.
  /// @fn shuffle(const bool&)
  /// @brief Sets shuffle(); returns `*this` for chaining.
  /// @fn drop_last(const bool&)
  /// @brief Sets drop_last(); returns `*this` for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns `*this` for chaining.
  /// @fn workers(const int&)
  /// @brief Sets workers(); returns `*this` for chaining.
  /// @fn prefetch(const int&)
  /// @brief Sets prefetch(); returns `*this` for chaining.
  /// @fn ranks(const int&)
  /// @brief Sets ranks(); returns `*this` for chaining.
  /// @fn rank(const int&)
  /// @brief Sets rank(); returns `*this` for chaining.

  /// Side S of the square images of a batch, in pixels (default 640).
  OREPA_OPTION(int, image_size) = 640;
  /// Images per batch (default 16).
  OREPA_OPTION(int, batch_size) = 16;
  /// Training augmentation (mosaic, affine, HSV, flips) on; off: letterbox only (default off).
  OREPA_OPTION(bool, augment) = false;
  /// The augmentation's settings (default: YOLOv5's hyp.scratch-low.yaml values).
  OREPA_OPTION(AugmentOptions, augmentation);
  /// A new seeded order every epoch (default on); off: the data set's order.
  OREPA_OPTION(bool, shuffle) = true;
  /// Drop the last, smaller batch of an epoch (default off).
  OREPA_OPTION(bool, drop_last) = false;
  /// Seed of the shuffles and of every augmentation (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;
  /// Threads of a DataLoader preparing batches (default 1). The result does not depend on it.
  OREPA_OPTION(int, workers) = 1;
  /// Batches a DataLoader prepares ahead of the one being used (default 2).
  OREPA_OPTION(int, prefetch) = 2;
  /// Processes that share every batch in data-parallel training (default 1), a divisor of
  /// batch_size(), which stays the batch over all of them: make_batch gives each its share.
  OREPA_OPTION(int, ranks) = 1;
  /// Which share of every batch this process takes, in [0, ranks) (default 0).
  OREPA_OPTION(int, rank) = 0;

 public:
  /// This object (what the setters return).
  LoaderOptions& self() { return *this; }

  /// Throws config_error naming the first value out of range.
  void validate() const {
    auto range = [](const char* name, int v, int lo, int hi) {
      if (v < lo || v > hi)
        throw config_error(orepa::detail::cat("LoaderOptions: ", name, " must be in [", lo, ", ", hi, "], got ", v));
    };
    range("image_size", image_size_, 1, 16384);
    range("batch_size", batch_size_, 1, 1 << 16);
    range("workers", workers_, 1, 256);
    range("prefetch", prefetch_, 1, 1024);
    range("ranks", ranks_, 1, 1 << 16);
    range("rank", rank_, 0, ranks_ - 1);
    if (batch_size_ % ranks_ != 0)
      throw config_error(orepa::detail::cat("LoaderOptions: batch_size ", batch_size_, " is not a multiple of ranks ",
                                            ranks_, " (every rank takes an equal share of a batch)"));
    augmentation_.validate();
  }
};

/// One batch: images and YOLOv5 targets.
struct Batch {
  Tensor<float> images;               ///< [B, 3, S, S] in [0, 1], NCHW (B: this rank's share with LoaderOptions::ranks)
  Tensor<float> targets;              ///< [n, 6]: image index in the batch, class, cx, cy, w, h (normalised by S)
  std::vector<std::int64_t> indices;  ///< data-set index of each image
  std::int64_t epoch = 0;             ///< epoch the batch belongs to
  std::int64_t batch = 0;             ///< its index within the epoch
};

/// Number of batches of an epoch of `dataset_size` images (the last one smaller, or
/// dropped with drop_last).
inline std::int64_t batches_per_epoch(std::int64_t dataset_size, const LoaderOptions& o) {
  const std::int64_t b = o.batch_size();
  return o.drop_last() ? dataset_size / b : (dataset_size + b - 1) / b;
}

/// The data-set order of epoch `epoch`: 0..n-1, shuffled (Fisher-Yates on an Rng seeded
/// from the seed and the epoch) when o.shuffle().
inline std::vector<std::int64_t> epoch_order(std::int64_t n, const LoaderOptions& o, std::int64_t epoch) {
  std::vector<std::int64_t> order(std::size_t(std::max<std::int64_t>(n, 0)));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = std::int64_t(i);
  if (!o.shuffle()) return order;
  Rng rng(detail::mix64(o.seed() ^ detail::mix64(std::uint64_t(epoch))));
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
  return order;
}

/// The seed of the Rng of the sample at `position` of epoch `epoch`.
inline std::uint64_t sample_seed(std::uint64_t seed, std::int64_t epoch, std::int64_t position) {
  return detail::mix64(detail::mix64(seed + 0x5851F42D4C957F2Dull) ^ detail::mix64(std::uint64_t(epoch)) ^
                       detail::mix64(~std::uint64_t(position)));
}

/// Training sample `index` at size S = o.image_size(): without augmentation the letterboxed
/// image; with it, YOLOv5's pipeline: a mosaic of the image and three drawn from the data
/// set at random, the four in random corners (probability mosaic), or the letterboxed
/// image, then random_affine, random_hsv and
/// random_flips, all drawing from `rng`.
inline LabeledImage load_sample(const YoloDataset& ds, std::int64_t index, const LoaderOptions& o, Rng& rng) {
  const int s = o.image_size();
  if (!o.augment()) return letterbox_square(ds.load(index), s);
  const auto& a = o.augmentation();
  LabeledImage out;
  if (a.mosaic() > 0 && rng.uniform() < a.mosaic()) {
    std::array<std::int64_t, 4> ids = {index, 0, 0, 0};
    for (std::size_t k = 1; k < 4; ++k) ids[k] = std::int64_t(rng.below(std::uint64_t(ds.size())));
    for (std::size_t k = 4; k > 1; --k) std::swap(ids[k - 1], ids[rng.below(k)]);  // the image in any corner
    std::array<LabeledImage, 4> tiles;
    for (std::size_t k = 0; k < 4; ++k) tiles[k] = resize_long_side(ds.load(ids[k]), s);
    out = random_affine(mosaic_canvas(tiles, s, rng), s, a, rng);
  } else {
    out = random_affine(letterbox_square(ds.load(index), s), s, a, rng);
  }
  random_hsv(out.image, a, rng);
  random_flips(out, a, rng);
  return out;
}

namespace detail {

/// Thrown inside a loader thread to abandon a batch when the loader shuts down.
struct LoaderCancelled {};

/// make_batch, checking `cancel` between samples.
inline Batch make_batch(const YoloDataset& ds, const LoaderOptions& o, std::int64_t epoch, std::int64_t batch,
                        const std::atomic<bool>* cancel) {
  o.validate();
  const std::int64_t nb = batches_per_epoch(ds.size(), o);
  if (batch < 0 || batch >= nb)
    throw config_error(orepa::detail::cat("make_batch: batch ", batch, " outside [0, ", nb, ") of an epoch of ",
                                          ds.size(), " images in batches of ", o.batch_size()));
  const auto order = epoch_order(ds.size(), o, epoch);
  const std::int64_t first = batch * o.batch_size(), count = std::min<std::int64_t>(o.batch_size(), ds.size() - first);
  // Rank r takes the r-th of `ranks` equal runs of the batch's positions. A short last
  // batch is padded from the start of the epoch's order, as PyTorch's DistributedSampler
  // pads, so that every rank trains the same number of images at every step.
  const std::int64_t share = (count + o.ranks() - 1) / o.ranks(), begin = first + o.rank() * share;
  const std::int64_t s = o.image_size(), per = 3 * s * s;
  Batch b;
  b.epoch = epoch, b.batch = batch;
  b.images = Tensor<float>({share, 3, s, s});
  std::vector<float> targets;
  for (std::int64_t j = 0; j < share; ++j) {
    if (cancel && cancel->load(std::memory_order_relaxed)) throw LoaderCancelled{};
    const std::int64_t position = begin + j, index = order[std::size_t(position % ds.size())];
    Rng rng(sample_seed(o.seed(), epoch, position));
    const LabeledImage sample = load_sample(ds, index, o, rng);
    std::copy_n(sample.image.data(), per, b.images.data() + j * per);
    b.indices.push_back(index);
    for (const auto& box : sample.boxes) {
      const float fs = float(s);
      targets.insert(targets.end(), {float(j), float(box.cls), (box.x1 + box.x2) / 2 / fs, (box.y1 + box.y2) / 2 / fs,
                                     (box.x2 - box.x1) / fs, (box.y2 - box.y1) / fs});
    }
  }
  const std::int64_t n = std::int64_t(targets.size() / 6);
  b.targets = Tensor<float>({n, 6}, std::move(targets));
  return b;
}

}  // namespace detail

/// Batch `batch` of epoch `epoch` (samples at positions batch x B .. of epoch_order, each
/// made by load_sample with Rng(sample_seed(seed, epoch, position))), exactly what a
/// DataLoader with the same options returns for it. With o.ranks() > 1 only share
/// o.rank() of it: positions batch x B + rank x B' .. + B' - 1 with B' = ceil(n / ranks)
/// for a batch of n images, positions past the epoch's end taken from its start. Throws
/// config_error for a batch outside the epoch or bad options, and whatever loading a
/// sample throws.
inline Batch make_batch(const YoloDataset& ds, const LoaderOptions& o, std::int64_t epoch, std::int64_t batch) {
  return detail::make_batch(ds, o, epoch, batch, nullptr);
}

/// Prepares batches on `workers` threads while the caller trains on the current one:
/// next() returns batch 0, 1, ... of epoch `first_epoch`, then of the following epochs,
/// without end, each exactly make_batch(dataset, options, epoch, batch). An exception
/// thrown while preparing a batch is re-thrown by the next() that would have returned it,
/// and by every next() after it (the loader stops). The destructor stops and joins the
/// threads (a batch being prepared is abandoned between two images). One thread calls
/// next(); the loader works on its own copy of the data set.
class DataLoader {
 public:
  /// Starts the threads. Throws config_error for bad options or a data set with no batch
  /// (drop_last with fewer images than a batch).
  DataLoader(YoloDataset dataset, LoaderOptions options, std::int64_t first_epoch = 0)
      : ds_(std::move(dataset)), opts_(std::move(options)), first_epoch_(first_epoch) {
    opts_.validate();
    per_epoch_ = yolo::batches_per_epoch(ds_.size(), opts_);
    if (per_epoch_ < 1)
      throw config_error(orepa::detail::cat("DataLoader: ", ds_.size(), " images of ", ds_.source(),
                                            " make no full batch of ", opts_.batch_size(), " (drop_last)"));
    threads_.reserve(std::size_t(opts_.workers()));
    for (int i = 0; i < opts_.workers(); ++i) threads_.emplace_back([this] { work(); });
  }
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;
  ~DataLoader() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cancel_ = true;
    space_.notify_all();
    for (auto& t : threads_) t.join();
  }

  /// The next batch (waits until it is ready); re-throws a loading error (see the class).
  Batch next() {
    std::unique_lock<std::mutex> lk(m_);
    if (error_) std::rethrow_exception(error_);
    ready_.wait(lk, [this] { return done_.count(next_deliver_) != 0; });
    auto node = done_.extract(next_deliver_);
    ++next_deliver_;
    if (node.mapped().error) {
      error_ = node.mapped().error;
      stop_ = true;
      cancel_ = true;
      space_.notify_all();
      std::rethrow_exception(error_);
    }
    space_.notify_all();
    return std::move(node.mapped().batch);
  }

  /// Batches per epoch.
  std::int64_t batches_per_epoch() const { return per_epoch_; }
  /// The data set.
  const YoloDataset& dataset() const { return ds_; }
  /// The options.
  const LoaderOptions& options() const { return opts_; }

 private:
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };

  void work() {
    for (;;) {
      std::int64_t seq = 0;
      {
        std::unique_lock<std::mutex> lk(m_);
        space_.wait(lk, [this] { return stop_ || failed_ || next_claim_ < next_deliver_ + opts_.prefetch(); });
        if (stop_ || failed_) return;
        seq = next_claim_++;
      }
      Slot slot;
      try {
        slot.batch = detail::make_batch(ds_, opts_, first_epoch_ + seq / per_epoch_, seq % per_epoch_, &cancel_);
      } catch (const detail::LoaderCancelled&) {
        return;
      } catch (...) {
        slot.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lk(m_);
        if (slot.error) failed_ = true;  // batches after a failed one are never delivered: stop claiming
        done_.emplace(seq, std::move(slot));
      }
      ready_.notify_all();
      space_.notify_all();
    }
  }

  YoloDataset ds_;
  LoaderOptions opts_;
  std::int64_t first_epoch_ = 0, per_epoch_ = 0;
  std::mutex m_;
  std::condition_variable ready_, space_;
  std::map<std::int64_t, Slot> done_;
  std::int64_t next_claim_ = 0, next_deliver_ = 0;
  bool stop_ = false, failed_ = false;
  std::exception_ptr error_;
  std::atomic<bool> cancel_{false};
  std::vector<std::thread> threads_;
};

}  // namespace orepa::yolo
