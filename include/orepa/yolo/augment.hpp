#pragma once
/// @file augment.hpp
/// Training-time geometry and colour augmentation of an image with its boxes, in the way
/// YOLOv5 (v7.0) trains, with its `hyp.scratch-low.yaml` gains as defaults:
/// - resize so the long side is the training size (aspect kept), and letterbox: the same
///   then centred grey padding (114/255) to a square;
/// - mosaic: four images around a random centre of a 2S x 2S canvas;
/// - a random affine warp: scale in [1 - scale, 1 + scale] about the input's centre, then a
///   translation of the centre to [0.5 - translate, 0.5 + translate] x output size;
///   boxes are transformed, clipped to the output and dropped when too small, too thin or
///   mostly cut away (YOLOv5's box_candidates: sides > 2 px, area kept > 10 %, aspect < 100);
/// - HSV jitter: hue, saturation and value multiplied by 1 + U(-1, 1) x gain (0.015, 0.7, 0.4);
/// - left-right flips (p 0.5) and up-down flips (p 0).
/// Every random choice comes from the orepa::Rng passed in: the same seed gives the same
/// result. Images are [C, H, W] float tensors in [0, 1] (image.hpp); boxes are in pixels.
///
///   orepa::Rng rng(seed);
///   LabeledImage s = letterbox_square(LabeledImage{read_image(path), boxes}, 256);
///   s = random_affine(s, 256, AugmentOptions(), rng);
///   random_hsv(s.image, AugmentOptions(), rng);
///   random_flips(s, AugmentOptions(), rng);
///
/// The warp samples bilinearly with continuous pixel coordinates (pixel x covers [x, x+1)),
/// so a box transformed by the same matrix as the pixels stays on its object exactly; OpenCV's
/// warpAffine, which YOLOv5 uses, maps pixel indices instead (a half-pixel difference).
///
/// letterbox_square is the training-time letterbox (always resizes, always square). It has
/// the same semantics as the inference letterbox of letterbox.hpp and should share its code.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/random.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/yolo/image.hpp"

namespace orepa::yolo {

/// The grey of letterbox padding and of the area a warp uncovers: 114 / 255, as YOLOv5.
inline constexpr float pad_value = 114.0f / 255.0f;

/// A labelled box in pixel coordinates of its image: class and corners, x1 <= x2, y1 <= y2.
struct PixelBox {
  int cls = 0;    ///< class index
  float x1 = 0;   ///< left edge
  float y1 = 0;   ///< top edge
  float x2 = 0;   ///< right edge
  float y2 = 0;   ///< bottom edge
};

/// An image [C, H, W] with its boxes.
struct LabeledImage {
  Tensor<float> image;          ///< [C, H, W] in [0, 1]
  std::vector<PixelBox> boxes;  ///< in pixels of `image`
};

/// Augmentation settings (YOLOv5 hyperparameter names; defaults from hyp.scratch-low.yaml).
struct AugmentOptions {
  /// @fn hsv_h(const double&)
  /// @brief Sets hsv_h(); returns `*this` for chaining.
  /// @fn hsv_s(const double&)
  /// @brief Sets hsv_s(); returns `*this` for chaining.
  /// @fn hsv_v(const double&)
  /// @brief Sets hsv_v(); returns `*this` for chaining.
  /// @fn translate(const double&)
  /// @brief Sets translate(); returns `*this` for chaining.
  /// @fn scale(const double&)
  /// @brief Sets scale(); returns `*this` for chaining.
  /// @fn fliplr(const double&)
  /// @brief Sets fliplr(); returns `*this` for chaining.
  /// @fn flipud(const double&)
  /// @brief Sets flipud(); returns `*this` for chaining.
  /// @fn mosaic(const double&)
  /// @brief Sets mosaic(); returns `*this` for chaining.
  /// @fn min_box_side(const double&)
  /// @brief Sets min_box_side(); returns `*this` for chaining.
  /// @fn min_area_kept(const double&)
  /// @brief Sets min_area_kept(); returns `*this` for chaining.
  /// @fn max_aspect(const double&)
  /// @brief Sets max_aspect(); returns `*this` for chaining.

  /// Hue gain: hue multiplied by 1 + U(-1, 1) x hsv_h (default 0.015).
  OREPA_OPTION(double, hsv_h) = 0.015;
  /// Saturation gain (default 0.7).
  OREPA_OPTION(double, hsv_s) = 0.7;
  /// Value gain (default 0.4).
  OREPA_OPTION(double, hsv_v) = 0.4;
  /// Translation of the centre, as a fraction of the output size (default 0.1).
  OREPA_OPTION(double, translate) = 0.1;
  /// Scale range: the warp scales by U(1 - scale, 1 + scale) (default 0.5).
  OREPA_OPTION(double, scale) = 0.5;
  /// Probability of a left-right flip (default 0.5).
  OREPA_OPTION(double, fliplr) = 0.5;
  /// Probability of an up-down flip (default 0).
  OREPA_OPTION(double, flipud) = 0.0;
  /// Probability that a training sample is a mosaic of four images (default 1).
  OREPA_OPTION(double, mosaic) = 1.0;
  /// A warped box is kept only if both its sides exceed this, in pixels (default 2).
  OREPA_OPTION(double, min_box_side) = 2.0;
  /// ... and it keeps more than this fraction of its warped area after clipping (default 0.1).
  OREPA_OPTION(double, min_area_kept) = 0.1;
  /// ... and its aspect ratio (long side / short side) stays below this (default 100).
  OREPA_OPTION(double, max_aspect) = 100.0;

 public:
  /// This object (what the setters return).
  AugmentOptions& self() { return *this; }

  /// Throws config_error naming the first value out of its range (gains and fractions
  /// in [0, 1], scale in [0, 1), thresholds non-negative, max_aspect >= 1).
  void validate() const {
    auto in01 = [](const char* name, double v) {
      if (!(v >= 0 && v <= 1)) throw config_error(orepa::detail::cat("AugmentOptions: ", name, " must be in [0, 1], got ", v));
    };
    in01("hsv_h", hsv_h_), in01("hsv_s", hsv_s_), in01("hsv_v", hsv_v_), in01("translate", translate_);
    in01("fliplr", fliplr_), in01("flipud", flipud_), in01("mosaic", mosaic_), in01("min_area_kept", min_area_kept_);
    if (!(scale_ >= 0 && scale_ < 1))
      throw config_error(orepa::detail::cat("AugmentOptions: scale must be in [0, 1), got ", scale_));
    if (!(min_box_side_ >= 0))
      throw config_error(orepa::detail::cat("AugmentOptions: min_box_side must be >= 0, got ", min_box_side_));
    if (!(max_aspect_ >= 1))
      throw config_error(orepa::detail::cat("AugmentOptions: max_aspect must be >= 1, got ", max_aspect_));
  }
};

/// An affine map of pixel coordinates: x' = a x + b y + c, y' = d x + e y + f.
struct Affine {
  double a = 1;  ///< x' coefficient of x
  double b = 0;  ///< x' coefficient of y
  double c = 0;  ///< x' offset
  double d = 0;  ///< y' coefficient of x
  double e = 1;  ///< y' coefficient of y
  double f = 0;  ///< y' offset

  /// Translation by (tx, ty).
  static Affine translation(double tx, double ty) { return {1, 0, tx, 0, 1, ty}; }
  /// Uniform scaling by s about the origin.
  static Affine scaling(double s) { return {s, 0, 0, 0, s, 0}; }
  /// This map followed by `next` (next ∘ this).
  Affine then(const Affine& n) const {
    return {n.a * a + n.b * d, n.a * b + n.b * e, n.a * c + n.b * f + n.c,
            n.d * a + n.e * d, n.d * b + n.e * e, n.d * c + n.e * f + n.f};
  }
  /// Determinant of the linear part (the factor by which areas change).
  double det() const { return a * e - b * d; }
  /// The inverse map; config_error if the map is singular.
  Affine inverse() const {
    const double dt = det();
    if (!(std::abs(dt) > 1e-12)) throw config_error(orepa::detail::cat("Affine::inverse: singular map (determinant ", dt, ")"));
    const double ia = e / dt, ib = -b / dt, id = -d / dt, ie = a / dt;
    return {ia, ib, -(ia * c + ib * f), id, ie, -(id * c + ie * f)};
  }
  /// Applies the map to (x, y).
  void apply(double x, double y, double& ox, double& oy) const {
    ox = a * x + b * y + c;
    oy = d * x + e * y + f;
  }
};

/// `in` resized (bilinear / area, image.hpp's resize_image) so that its long side is `size`,
/// the aspect ratio kept (the short side rounded, at least 1); boxes scaled with it.
/// YOLOv5's load_image. Throws config_error for size < 1.
inline LabeledImage resize_long_side(const LabeledImage& in, int size) {
  detail::check_image(in.image, "resize_long_side");
  if (size < 1) throw config_error(orepa::detail::cat("resize_long_side: size must be >= 1, got ", size));
  const int h = int(in.image.size(1)), w = int(in.image.size(2));
  const double r = double(size) / std::max(w, h);
  const int nw = std::max(1, int(std::lround(w * r))), nh = std::max(1, int(std::lround(h * r)));
  LabeledImage out{resize_image(in.image, nw, nh), in.boxes};
  const float sx = float(nw) / float(w), sy = float(nh) / float(h);
  for (auto& b : out.boxes) b.x1 *= sx, b.x2 *= sx, b.y1 *= sy, b.y2 *= sy;
  return out;
}

/// YOLOv5's letterbox to a `size` x `size` square: resize_long_side, then padding with
/// pad_value centred (an odd remainder goes to the right / bottom); boxes follow.
inline LabeledImage letterbox_square(const LabeledImage& in, int size) {
  LabeledImage r = resize_long_side(in, size);
  const int c = int(r.image.size(0)), h = int(r.image.size(1)), w = int(r.image.size(2));
  if (h == size && w == size) return r;
  const int left = (size - w) / 2, top = (size - h) / 2;
  LabeledImage out{Tensor<float>({c, size, size}, pad_value), std::move(r.boxes)};
  for (int ch = 0; ch < c; ++ch)
    for (int y = 0; y < h; ++y)
      std::copy_n(r.image.data() + (std::int64_t(ch) * h + y) * w, w,
                  out.image.data() + (std::int64_t(ch) * size + y + top) * size + left);
  for (auto& b : out.boxes) b.x1 += float(left), b.x2 += float(left), b.y1 += float(top), b.y2 += float(top);
  return out;
}

/// Mirrors the image and its boxes left-right.
inline void flip_horizontal(LabeledImage& s) {
  detail::check_image(s.image, "flip_horizontal");
  const std::int64_t rows = s.image.size(0) * s.image.size(1), w = s.image.size(2);
  for (std::int64_t r = 0; r < rows; ++r) std::reverse(s.image.data() + r * w, s.image.data() + (r + 1) * w);
  for (auto& b : s.boxes) {
    const float x1 = float(w) - b.x2;
    b.x2 = float(w) - b.x1;
    b.x1 = x1;
  }
}

/// Mirrors the image and its boxes up-down.
inline void flip_vertical(LabeledImage& s) {
  detail::check_image(s.image, "flip_vertical");
  const std::int64_t c = s.image.size(0), h = s.image.size(1), w = s.image.size(2);
  for (std::int64_t ch = 0; ch < c; ++ch)
    for (std::int64_t y = 0; y < h / 2; ++y)
      std::swap_ranges(s.image.data() + (ch * h + y) * w, s.image.data() + (ch * h + y + 1) * w,
                       s.image.data() + (ch * h + h - 1 - y) * w);
  for (auto& b : s.boxes) {
    const float y1 = float(h) - b.y2;
    b.y2 = float(h) - b.y1;
    b.y1 = y1;
  }
}

/// Multiplies every pixel's hue (modulo 1), saturation and value (clipped to 1) of an RGB
/// image [3, H, W] by the given gains (YOLOv5's augment_hsv, in float instead of 8 bits).
/// Values stay in [0, 1] for an input in [0, 1]. Throws shape_error for a non-RGB tensor,
/// config_error for a negative gain.
inline void hsv_gain(Tensor<float>& image, float hue_gain, float sat_gain, float val_gain) {
  detail::check_image(image, "hsv_gain");
  if (image.size(0) != 3) throw shape_error(orepa::detail::cat("hsv_gain: expected an RGB image [3, H, W], got ",
                                                               shape_str(image.sizes())));
  if (!(hue_gain >= 0 && sat_gain >= 0 && val_gain >= 0))
    throw config_error(orepa::detail::cat("hsv_gain: gains must be >= 0, got ", hue_gain, ", ", sat_gain, ", ", val_gain));
  const std::int64_t hw = image.size(1) * image.size(2);
  float *r = image.data(), *g = r + hw, *b = g + hw;
  for (std::int64_t i = 0; i < hw; ++i) {
    float h, s, v;
    rgb_to_hsv(std::clamp(r[i], 0.0f, 1.0f), std::clamp(g[i], 0.0f, 1.0f), std::clamp(b[i], 0.0f, 1.0f), h, s, v);
    const Rgb o = hsv_to_rgb(h * hue_gain, std::min(1.0f, s * sat_gain), std::min(1.0f, v * val_gain));
    r[i] = o.r, g[i] = o.g, b[i] = o.b;
  }
}

/// YOLOv5's random HSV jitter: hsv_gain with gains 1 + U(-1, 1) x (hsv_h, hsv_s, hsv_v)
/// (three draws from `rng`; nothing is drawn or changed when all three are 0).
inline void random_hsv(Tensor<float>& image, const AugmentOptions& o, Rng& rng) {
  if (o.hsv_h() == 0 && o.hsv_s() == 0 && o.hsv_v() == 0) return;
  const double gh = 1 + rng.uniform(-1, 1) * o.hsv_h(), gs = 1 + rng.uniform(-1, 1) * o.hsv_s();
  const double gv = 1 + rng.uniform(-1, 1) * o.hsv_v();
  hsv_gain(image, float(gh), float(gs), float(gv));
}

/// Up-down flip with probability flipud, then left-right with probability fliplr (one
/// draw from `rng` for each probability that is not 0).
inline void random_flips(LabeledImage& s, const AugmentOptions& o, Rng& rng) {
  if (o.flipud() > 0 && rng.uniform() < o.flipud()) flip_vertical(s);
  if (o.fliplr() > 0 && rng.uniform() < o.fliplr()) flip_horizontal(s);
}

/// `in` warped by `m` (input pixel coordinates to output ones) into a `out_w` x `out_h`
/// image: each output pixel centre is mapped back through the inverse and sampled
/// bilinearly, pad_value outside the input. Every box keeps its place in the list: the
/// bounding box of its transformed corners, clipped to the output (possibly empty).
/// Throws config_error for a singular map or a size < 1.
inline LabeledImage warp_affine(const LabeledImage& in, const Affine& m, int out_w, int out_h) {
  detail::check_image(in.image, "warp_affine");
  if (out_w < 1 || out_h < 1)
    throw config_error(orepa::detail::cat("warp_affine: output size must be positive, got ", out_w, "x", out_h));
  const Affine inv = m.inverse();
  const int c = int(in.image.size(0)), h = int(in.image.size(1)), w = int(in.image.size(2));
  LabeledImage out{Tensor<float>({c, out_h, out_w}), {}};
  const std::int64_t ihw = std::int64_t(h) * w, ohw = std::int64_t(out_h) * out_w;
  const float* src = in.image.data();
  float* dst = out.image.data();
  for (int y = 0; y < out_h; ++y) {
    double sx, sy;  // sample position (index units) of pixel (0, y), advanced by (a, d) per pixel
    inv.apply(0.5, y + 0.5, sx, sy);
    sx -= 0.5, sy -= 0.5;
    for (int x = 0; x < out_w; ++x, sx += inv.a, sy += inv.d) {
      const std::int64_t o = std::int64_t(y) * out_w + x;
      const double fx0 = std::floor(sx), fy0 = std::floor(sy);
      if (fx0 < -1 || fy0 < -1 || fx0 >= w || fy0 >= h) {
        for (int ch = 0; ch < c; ++ch) dst[ch * ohw + o] = pad_value;
        continue;
      }
      const int x0 = int(fx0), y0 = int(fy0);
      const float ax = float(sx - fx0), ay = float(sy - fy0);
      const float w00 = (1 - ax) * (1 - ay), w10 = ax * (1 - ay), w01 = (1 - ax) * ay, w11 = ax * ay;
      const std::int64_t i00 = std::int64_t(y0) * w + x0;
      if (x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h) {
        for (int ch = 0; ch < c; ++ch) {
          const float* p = src + ch * ihw + i00;
          dst[ch * ohw + o] = w00 * p[0] + w10 * p[1] + w01 * p[w] + w11 * p[w + 1];
        }
        continue;
      }
      const bool in00 = x0 >= 0 && y0 >= 0, in10 = x0 + 1 < w && y0 >= 0;
      const bool in01 = x0 >= 0 && y0 + 1 < h, in11 = x0 + 1 < w && y0 + 1 < h;
      for (int ch = 0; ch < c; ++ch) {
        const float* p = src + ch * ihw;
        dst[ch * ohw + o] = w00 * (in00 ? p[i00] : pad_value) + w10 * (in10 ? p[i00 + 1] : pad_value) +
                            w01 * (in01 ? p[i00 + w] : pad_value) + w11 * (in11 ? p[i00 + w + 1] : pad_value);
      }
    }
  }
  out.boxes.reserve(in.boxes.size());
  for (const auto& b : in.boxes) {
    double xs[4], ys[4];
    m.apply(b.x1, b.y1, xs[0], ys[0]);
    m.apply(b.x2, b.y1, xs[1], ys[1]);
    m.apply(b.x1, b.y2, xs[2], ys[2]);
    m.apply(b.x2, b.y2, xs[3], ys[3]);
    auto clip = [](double v, int hi) { return float(std::clamp(v, 0.0, double(hi))); };
    out.boxes.push_back({b.cls, clip(*std::min_element(xs, xs + 4), out_w), clip(*std::min_element(ys, ys + 4), out_h),
                         clip(*std::max_element(xs, xs + 4), out_w), clip(*std::max_element(ys, ys + 4), out_h)});
  }
  return out;
}

/// Whether a box that was `before` and became `after` under a map scaling areas by
/// `area_scale` is still a usable label (YOLOv5's box_candidates): both sides of `after`
/// longer than min_box_side, more than min_area_kept of the scaled area left after
/// clipping, aspect ratio below max_aspect.
inline bool box_candidate(const PixelBox& before, const PixelBox& after, double area_scale, const AugmentOptions& o) {
  const double w1 = before.x2 - before.x1, h1 = before.y2 - before.y1;
  const double w2 = after.x2 - after.x1, h2 = after.y2 - after.y1;
  const double eps = 1e-16;
  return w2 > o.min_box_side() && h2 > o.min_box_side() && w2 * h2 / (w1 * h1 * area_scale + eps) > o.min_area_kept() &&
         std::max(w2 / (h2 + eps), h2 / (w2 + eps)) < o.max_aspect();
}

/// YOLOv5's random_perspective without rotation, shear or perspective: scale s =
/// U(1 - scale, 1 + scale) about the input's centre, whose image lands at
/// (U(0.5 - translate, 0.5 + translate) x out_size) on both axes (three draws: s, tx, ty),
/// in an `out_size` square; boxes that fail box_candidate are dropped.
inline LabeledImage random_affine(const LabeledImage& in, int out_size, const AugmentOptions& o, Rng& rng) {
  detail::check_image(in.image, "random_affine");
  const double s = rng.uniform(1 - o.scale(), 1 + o.scale());
  const double tx = rng.uniform(0.5 - o.translate(), 0.5 + o.translate()) * out_size;
  const double ty = rng.uniform(0.5 - o.translate(), 0.5 + o.translate()) * out_size;
  const Affine m = Affine::translation(-0.5 * double(in.image.size(2)), -0.5 * double(in.image.size(1)))
                       .then(Affine::scaling(s))
                       .then(Affine::translation(tx, ty));
  LabeledImage out = warp_affine(in, m, out_size, out_size);
  std::vector<PixelBox> kept;
  for (std::size_t i = 0; i < in.boxes.size(); ++i)
    if (box_candidate(in.boxes[i], out.boxes[i], m.det(), o)) kept.push_back(out.boxes[i]);
  out.boxes = std::move(kept);
  return out;
}

/// YOLOv5's mosaic canvas: a 2S x 2S image (S = `size`) of pad_value with a centre drawn
/// in [S/2, 3S/2) on each axis (two draws), `tiles[0..3]` placed so that their bottom-right,
/// bottom-left, top-right and top-left corners touch it, cut at the canvas border; boxes
/// shifted and clipped to the canvas. Tiles are normally resize_long_side(x, S) output and
/// must have the same channel count. Follow with random_affine(canvas, S, ...).
inline LabeledImage mosaic_canvas(const std::array<LabeledImage, 4>& tiles, int size, Rng& rng) {
  if (size < 1) throw config_error(orepa::detail::cat("mosaic_canvas: size must be >= 1, got ", size));
  for (const auto& t : tiles) detail::check_image(t.image, "mosaic_canvas");
  const int c = int(tiles[0].image.size(0)), cs = 2 * size;
  for (const auto& t : tiles)
    if (t.image.size(0) != c)
      throw shape_error(orepa::detail::cat("mosaic_canvas: tiles must have the same channels, got ",
                                           shape_str(tiles[0].image.sizes()), " and ", shape_str(t.image.sizes())));
  const int xc = int(rng.uniform(0.5 * size, 1.5 * size)), yc = int(rng.uniform(0.5 * size, 1.5 * size));
  LabeledImage out{Tensor<float>({c, cs, cs}, pad_value), {}};
  for (int k = 0; k < 4; ++k) {
    const auto& t = tiles[std::size_t(k)];
    const int h = int(t.image.size(1)), w = int(t.image.size(2));
    const bool right = k == 1 || k == 3, bottom = k == 2 || k == 3;
    // Canvas rectangle [x1, x2) x [y1, y2) of the tile; (ox, oy) = canvas position of its pixel (0, 0).
    const int ox = right ? xc : xc - w, oy = bottom ? yc : yc - h;
    const int x1 = std::max(ox, 0), x2 = std::min(ox + w, cs), y1 = std::max(oy, 0), y2 = std::min(oy + h, cs);
    for (int ch = 0; ch < c; ++ch)
      for (int y = y1; y < y2; ++y)
        std::copy_n(t.image.data() + (std::int64_t(ch) * h + (y - oy)) * w + (x1 - ox), x2 - x1,
                    out.image.data() + (std::int64_t(ch) * cs + y) * cs + x1);
    for (const auto& b : t.boxes) {
      auto clip = [cs](float v) { return std::clamp(v, 0.0f, float(cs)); };
      out.boxes.push_back({b.cls, clip(b.x1 + float(ox)), clip(b.y1 + float(oy)), clip(b.x2 + float(ox)),
                           clip(b.y2 + float(oy))});
    }
  }
  return out;
}

}  // namespace orepa::yolo
