#pragma once
/// @file synthetic_data.hpp
/// A synthetic detection data set in YOLO format, needing nothing from outside: coloured
/// circles, squares and triangles (classes 0, 1, 2) of several sizes on textured, noisy
/// backgrounds, with their exact boxes. For the detector demo, the tests and the benchmarks.
///
///   auto info = orepa::yolo::write_shapes_dataset("shapes", orepa::yolo::ShapesOptions()
///                                                   .train_images(1000).val_images(200).seed(1));
///   auto cfg = orepa::yolo::read_data_config(info.yaml);   // then YoloDataset::from_config(cfg, "train")
///
/// Each image: a background of a random low-saturation colour, shaded by a random linear
/// gradient and two sinusoidal gratings of random period and direction; 1..4 objects
/// (options) that do not overlap (2 px apart at least), each a solid saturated colour —
/// by default in a hue band of its class (red-ish circles, green-ish squares, blue-ish
/// triangles, hue jittered by ±0.06, saturation and value varied), or any hue with
/// class_colors(false); sides log-uniform in [min_size, max_size] pixels; triangles point
/// up, down, left or right; then uniform pixel noise of ±noise on every channel. A box is the
/// bounding box of the pixels actually painted (pixel centres inside the shape), so it is
/// exact. Everything follows from the seed: image i of a split has its own Rng, so the
/// output does not depend on the number of threads.
///
/// Written layout (YOLOv5's): `images/train/000000.png`, `labels/train/000000.txt`, the same
/// for `val`, and `data.yaml` (absolute `path:`, `train: images/train`, `val: images/val`,
/// `nc: 3`, `names: [circle, square, triangle]`), written last, so an interrupted run leaves
/// no yaml. Format png (lossless, stb's slow encoder), jpg (4-5x faster to write, lossy at
/// the edges) or bmp (fastest, uncompressed).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/random.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/yolo/augment.hpp"
#include "orepa/yolo/dataset.hpp"
#include "orepa/yolo/image.hpp"

namespace orepa::yolo {

/// Class names of the shapes data set, in class order: circle, square, triangle.
inline const std::vector<std::string>& shape_class_names() {
  static const std::vector<std::string> names = {"circle", "square", "triangle"};
  return names;
}

/// Settings of the shapes generator.
struct ShapesOptions {
  /// @fn image_size(const int&)
  /// @brief Sets image_size(); returns `*this` for chaining.
  /// @fn train_images(const int&)
  /// @brief Sets train_images(); returns `*this` for chaining.
  /// @fn val_images(const int&)
  /// @brief Sets val_images(); returns `*this` for chaining.
  /// @fn min_objects(const int&)
  /// @brief Sets min_objects(); returns `*this` for chaining.
  /// @fn max_objects(const int&)
  /// @brief Sets max_objects(); returns `*this` for chaining.
  /// @fn min_size(const int&)
  /// @brief Sets min_size(); returns `*this` for chaining.
  /// @fn max_size(const int&)
  /// @brief Sets max_size(); returns `*this` for chaining.
  /// @fn noise(const double&)
  /// @brief Sets noise(); returns `*this` for chaining.
  /// @fn class_colors(const bool&)
  /// @brief Sets class_colors(); returns `*this` for chaining.
  /// @fn format(const std::string&)
  /// @brief Sets format(); returns `*this` for chaining.
  /// @fn jpeg_quality(const int&)
  /// @brief Sets jpeg_quality(); returns `*this` for chaining.
  /// @fn seed(const std::uint64_t&)
  /// @brief Sets seed(); returns `*this` for chaining.
  /// @fn threads(const int&)
  /// @brief Sets threads(); returns `*this` for chaining.
  /// @fn overwrite(const bool&)
  /// @brief Sets overwrite(); returns `*this` for chaining.

  /// Side of the square images in pixels (default 256).
  OREPA_OPTION(int, image_size) = 256;
  /// Images of the train split (default 512).
  OREPA_OPTION(int, train_images) = 512;
  /// Images of the val split (default 128).
  OREPA_OPTION(int, val_images) = 128;
  /// Fewest objects per image (default 1; 0 allows background images).
  OREPA_OPTION(int, min_objects) = 1;
  /// Most objects per image (default 4; fewer when they do not fit without overlap).
  OREPA_OPTION(int, max_objects) = 4;
  /// Smallest object side in pixels (default 16).
  OREPA_OPTION(int, min_size) = 16;
  /// Largest object side in pixels (default 120; at most image_size).
  OREPA_OPTION(int, max_size) = 120;
  /// Amplitude of the uniform pixel noise, in [0, 0.5] (default 0.04).
  OREPA_OPTION(double, noise) = 0.04;
  /// Hue bands by class (default on); off: any hue for any class.
  OREPA_OPTION(bool, class_colors) = true;
  /// Image format of the files: "png", "jpg" or "bmp" (default "png").
  OREPA_OPTION(std::string, format) = "png";
  /// JPEG quality 1..100 (default 95).
  OREPA_OPTION(int, jpeg_quality) = 95;
  /// Seed of everything (default 0).
  OREPA_OPTION(std::uint64_t, seed) = 0;
  /// Threads writing images; 0: one per hardware thread (default 0).
  OREPA_OPTION(int, threads) = 0;
  /// Replace the images/, labels/ and data.yaml of a previous set in the folder (default off:
  /// that is an error, so that two sets never mix).
  OREPA_OPTION(bool, overwrite) = false;

 public:
  /// This object (what the setters return).
  ShapesOptions& self() { return *this; }

  /// Throws config_error naming the first value out of range.
  void validate() const {
    auto range = [](const char* name, long long v, long long lo, long long hi) {
      if (v < lo || v > hi)
        throw config_error(orepa::detail::cat("ShapesOptions: ", name, " must be in [", lo, ", ", hi, "], got ", v));
    };
    range("image_size", image_size_, 16, 8192);
    range("train_images", train_images_, 0, 10000000);
    range("val_images", val_images_, 0, 10000000);
    range("min_objects", min_objects_, 0, 1000);
    range("max_objects", max_objects_, min_objects_, 1000);
    range("min_size", min_size_, 4, image_size_);
    range("max_size", max_size_, min_size_, image_size_);
    range("jpeg_quality", jpeg_quality_, 1, 100);
    range("threads", threads_, 0, 1024);
    if (!(noise_ >= 0 && noise_ <= 0.5))
      throw config_error(orepa::detail::cat("ShapesOptions: noise must be in [0, 0.5], got ", noise_));
    if (format_ != "png" && format_ != "jpg" && format_ != "bmp")
      throw config_error(orepa::detail::cat("ShapesOptions: format must be png, jpg or bmp, got '", format_, "'"));
  }
};

/// One object drawn by the generator.
struct ShapeObject {
  int cls = 0;      ///< 0 circle, 1 square, 2 triangle
  PixelBox box;     ///< bounding box of its painted pixels (pixel units, exact)
  Rgb color;        ///< its colour before noise
  int center_x = 0; ///< a pixel well inside it (centre / centroid), x
  int center_y = 0; ///< ... and y
};

/// An image of the generator with what it drew.
struct ShapesImage {
  Tensor<float> image;              ///< [3, S, S] in [0, 1]
  std::vector<ShapeObject> objects; ///< what was drawn, in drawing order

  /// The objects as normalised labels (what the label file holds).
  std::vector<LabelBox> labels() const {
    std::vector<LabelBox> out;
    const float w = float(image.size(2)), h = float(image.size(1));
    for (const auto& o : objects)
      out.push_back({o.cls, (o.box.x1 + o.box.x2) / 2 / w, (o.box.y1 + o.box.y2) / 2 / h, (o.box.x2 - o.box.x1) / w,
                     (o.box.y2 - o.box.y1) / h});
    return out;
  }
};

/// The seed of image `index` of split `split` (0 train, 1 val) of a set seeded `seed`.
inline std::uint64_t shapes_image_seed(std::uint64_t seed, int split, std::int64_t index) {
  return detail::mix64(detail::mix64(seed ^ 0xA0761D6478BD642Full) ^
                       detail::mix64((std::uint64_t(split) << 40) ^ std::uint64_t(index)));
}

/// Renders one image of the shapes set from `image_seed` (see the file comment).
/// Throws config_error for bad options.
inline ShapesImage render_shapes_image(const ShapesOptions& o, std::uint64_t image_seed) {
  o.validate();
  Rng rng(image_seed);
  const int s = o.image_size();
  ShapesImage out{Tensor<float>({3, s, s}), {}};
  const std::int64_t hw = std::int64_t(s) * s;
  float* px = out.image.data();

  // Background: base colour, gradient and two gratings (separable: sin(ax + by + p)).
  const Rgb base = hsv_to_rgb(float(rng.uniform()), float(rng.uniform(0.0, 0.3)), float(rng.uniform(0.3, 0.7)));
  const double gx = rng.uniform(-0.15, 0.15) / s, gy = rng.uniform(-0.15, 0.15) / s;
  std::vector<float> shade(static_cast<std::size_t>(hw), 0.0f);
  for (int g = 0; g < 2; ++g) {
    const double amp = rng.uniform(0.03, 0.12), period = rng.uniform(6.0, 48.0), angle = rng.uniform(0.0, 3.14159265);
    const double phase = rng.uniform(0.0, 6.2831853), k = 6.2831853 / period;
    const double a = k * std::cos(angle), b = k * std::sin(angle);
    std::vector<double> sx(static_cast<std::size_t>(s)), cx(static_cast<std::size_t>(s));
    for (int x = 0; x < s; ++x) sx[std::size_t(x)] = amp * std::sin(a * x), cx[std::size_t(x)] = amp * std::cos(a * x);
    for (int y = 0; y < s; ++y) {
      const double sy = std::sin(b * y + phase), cy = std::cos(b * y + phase);
      float* row = shade.data() + std::int64_t(y) * s;
      for (int x = 0; x < s; ++x) row[x] += float(sx[std::size_t(x)] * cy + cx[std::size_t(x)] * sy);
    }
  }
  for (int y = 0; y < s; ++y) {
    float* row = shade.data() + std::int64_t(y) * s;
    for (int x = 0; x < s; ++x) row[x] += float(gx * (x - s / 2) + gy * (y - s / 2));
  }
  const float basec[3] = {base.r, base.g, base.b};
  for (int c = 0; c < 3; ++c)
    for (std::int64_t i = 0; i < hw; ++i) px[c * hw + i] = basec[c] + shade[std::size_t(i)];

  // Objects, never overlapping (2 px apart at least).
  const int wanted = o.min_objects() + int(rng.below(std::uint64_t(o.max_objects() - o.min_objects() + 1)));
  std::vector<unsigned char> mask;
  for (int n = 0, attempts = 0; n < wanted && attempts < 40 * wanted; ++attempts) {
    const int cls = int(rng.below(3));
    const int d = int(std::lround(std::exp(rng.uniform(std::log(double(o.min_size())), std::log(double(o.max_size()))))));
    const int dir = cls == 2 ? int(rng.below(4)) : 0;  // triangle apex: up, down, left, right
    const int along = cls == 2 ? std::max(4, int(std::lround(d * rng.uniform(0.8, 1.0)))) : d;  // triangle height
    const int bw = dir >= 2 ? along : d, bh = dir >= 2 ? d : along;
    const int x0 = int(rng.below(std::uint64_t(s - bw + 1))), y0 = int(rng.below(std::uint64_t(s - bh + 1)));
    const float hue = o.class_colors() ? float(cls) / 3.0f + float(rng.uniform(-0.06, 0.06)) : float(rng.uniform());
    const Rgb color = hsv_to_rgb(hue, float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.55, 1.0)));
    bool clear = true;
    for (const auto& ob : out.objects)
      if (x0 < ob.box.x2 + 2 && ob.box.x1 < x0 + bw + 2 && y0 < ob.box.y2 + 2 && ob.box.y1 < y0 + bh + 2) clear = false;
    if (!clear) continue;
    // Coverage of the pixel centres inside the shape, in its bounding rectangle.
    mask.assign(std::size_t(bw) * std::size_t(bh), 0);
    const double r = d / 2.0;
    // Triangle vertices in local coordinates: base on one side, apex on the opposite one.
    double vx[3], vy[3];
    switch (dir) {
      case 0: vx[0] = 0, vy[0] = bh, vx[1] = bw, vy[1] = bh, vx[2] = bw / 2.0, vy[2] = 0; break;
      case 1: vx[0] = 0, vy[0] = 0, vx[1] = bw / 2.0, vy[1] = bh, vx[2] = bw, vy[2] = 0; break;
      case 2: vx[0] = bw, vy[0] = 0, vx[1] = bw, vy[1] = bh, vx[2] = 0, vy[2] = bh / 2.0; break;
      default: vx[0] = 0, vy[0] = 0, vx[1] = bw, vy[1] = bh / 2.0, vx[2] = 0, vy[2] = bh; break;
    }
    auto edge = [&](int i, double x, double y) {
      const int j = (i + 1) % 3;
      return (vx[j] - vx[i]) * (y - vy[i]) - (vy[j] - vy[i]) * (x - vx[i]);
    };
    int lx = bw, ly = bh, hx = -1, hy = -1;
    for (int y = 0; y < bh; ++y)
      for (int x = 0; x < bw; ++x) {
        const double pxc = x + 0.5, pyc = y + 0.5;
        bool in = true;
        if (cls == 0) in = (pxc - r) * (pxc - r) + (pyc - r) * (pyc - r) <= r * r;
        else if (cls == 2) {
          const double e0 = edge(0, pxc, pyc), e1 = edge(1, pxc, pyc), e2 = edge(2, pxc, pyc);
          in = (e0 >= 0 && e1 >= 0 && e2 >= 0) || (e0 <= 0 && e1 <= 0 && e2 <= 0);
        }
        if (!in) continue;
        mask[std::size_t(y) * std::size_t(bw) + std::size_t(x)] = 1;
        lx = std::min(lx, x), hx = std::max(hx, x), ly = std::min(ly, y), hy = std::max(hy, y);
      }
    if (hx < 0) continue;
    const float col[3] = {color.r, color.g, color.b};
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < bh; ++y)
        for (int x = 0; x < bw; ++x)
          if (mask[std::size_t(y) * std::size_t(bw) + std::size_t(x)])
            px[c * hw + std::int64_t(y0 + y) * s + (x0 + x)] = col[c];
    ShapeObject ob;
    ob.cls = cls;
    ob.box = {cls, float(x0 + lx), float(y0 + ly), float(x0 + hx + 1), float(y0 + hy + 1)};
    ob.color = color;
    const double ccx = cls == 2 ? (vx[0] + vx[1] + vx[2]) / 3 : bw / 2.0, ccy = cls == 2 ? (vy[0] + vy[1] + vy[2]) / 3 : bh / 2.0;
    ob.center_x = x0 + int(ccx), ob.center_y = y0 + int(ccy);
    out.objects.push_back(ob);
    ++n;
  }

  // Pixel noise (a SplitMix64 stream: 4 values of 16 bits per draw), clamped to [0, 1].
  std::uint64_t state = image_seed ^ 0x9FB21C651E98DF25ull;
  const float amp = float(o.noise()), scale = 2.0f * amp / 65535.0f;
  for (std::int64_t i = 0; i < 3 * hw; i += 4) {
    const std::uint64_t bits = detail::mix64(state++);
    for (std::int64_t k = 0; k < 4 && i + k < 3 * hw; ++k) {
      const float v = px[i + k] + (float((bits >> (16 * k)) & 0xFFFF) * scale - amp);
      px[i + k] = std::clamp(v, 0.0f, 1.0f);
    }
  }
  return out;
}

/// What write_shapes_dataset wrote.
struct ShapesDatasetInfo {
  std::string root;              ///< the data set folder (absolute)
  std::string yaml;              ///< its data.yaml
  std::int64_t train_images = 0; ///< images in the train split
  std::int64_t val_images = 0;   ///< images in the val split
  std::int64_t boxes = 0;        ///< boxes over both splits
};

/// Writes the shapes set into `folder` (created if needed; layout in the file comment).
/// Throws config_error for bad options or, without overwrite(true), when the folder
/// already holds images/, labels/ or data.yaml; format_error naming the file that cannot
/// be written.
inline ShapesDatasetInfo write_shapes_dataset(const std::string& folder, const ShapesOptions& o) {
  namespace fs = std::filesystem;
  o.validate();
  const fs::path root = fs::absolute(folder).lexically_normal();
  std::error_code ec;
  for (const char* part : {"images", "labels", "data.yaml"}) {
    if (!fs::exists(root / part, ec)) continue;
    if (!o.overwrite())
      throw config_error(orepa::detail::cat("write_shapes_dataset: ", (root / part).string(),
                                            " exists (another data set?); choose an empty folder or overwrite(true)"));
    fs::remove_all(root / part, ec);
    if (ec) throw format_error(orepa::detail::cat((root / part).string(), ": cannot remove: ", ec.message()));
  }
  const char* splits[2] = {"train", "val"};
  for (const char* split : splits)
    for (const char* kind : {"images", "labels"}) {
      fs::create_directories(root / kind / split, ec);
      if (ec) throw format_error(orepa::detail::cat((root / kind / split).string(), ": cannot create: ", ec.message()));
    }

  const std::int64_t counts[2] = {o.train_images(), o.val_images()}, total = counts[0] + counts[1];
  std::atomic<std::int64_t> next{0}, boxes{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_m;
  auto work = [&] {
    for (std::int64_t k; !failed && (k = next++) < total;) {
      const int split = k < counts[0] ? 0 : 1;
      const std::int64_t i = split == 0 ? k : k - counts[0];
      try {
        const ShapesImage img = render_shapes_image(o, shapes_image_seed(o.seed(), split, i));
        char name[32];
        std::snprintf(name, sizeof name, "%06lld", static_cast<long long>(i));
        write_image((root / "images" / splits[split] / (std::string(name) + "." + o.format())).string(), img.image,
                    o.jpeg_quality());
        const std::string label_file = (root / "labels" / splits[split] / (std::string(name) + ".txt")).string();
        std::ofstream f(label_file, std::ios::binary);
        f << format_labels(img.labels());
        if (!f.flush()) throw format_error(orepa::detail::cat(label_file, ": cannot write"));
        boxes += std::int64_t(img.objects.size());
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_m);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  const int n_threads = std::max(1, std::min<int>(o.threads() ? o.threads() : int(std::thread::hardware_concurrency()),
                                                   int(std::min<std::int64_t>(total, 1024))));
  std::vector<std::thread> pool;
  for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);

  ShapesDatasetInfo info{root.string(), (root / "data.yaml").string(), counts[0], counts[1], boxes};
  std::ofstream y(info.yaml, std::ios::binary);
  y << "# Synthetic shapes written by orepa::yolo::write_shapes_dataset: seed " << o.seed() << ", " << o.image_size()
    << "x" << o.image_size() << ", " << counts[0] << " train / " << counts[1] << " val images\n"
    << "path: " << YAML::Node(info.root) << "\ntrain: images/train\nval: images/val\nnc: 3\n"
    << "names: [circle, square, triangle]\n";
  if (!y.flush()) throw format_error(orepa::detail::cat(info.yaml, ": cannot write"));
  return info;
}

}  // namespace orepa::yolo
