#pragma once
/// @file letterbox.hpp (yolo)
/// YOLOv5's `letterbox` (utils/augmentations.py, v7.0) on float images, and the box
/// mappings between the original and the letterboxed image:
///   - the image is resized by r = min(new_h / h, new_w / w) (at most 1 without scale_up)
///     to round(w r) x round(h r) (half to even, as Python rounds), bilinearly with
///     half-pixel centres (OpenCV's INTER_LINEAR);
///   - padding: to the next multiple of `stride` (YOLOv5's auto, `minimal_pad`, default) or
///     to exactly new_shape; each side gets half, top / left round(pad / 2 - 0.1) and
///     bottom / right round(pad / 2 + 0.1), i.e. the odd pixel goes to the bottom / right;
///     grey 114 / 255 by default;
///   - `scale_boxes` maps boxes of the letterboxed image back to the original (minus the
///     padding, divided by the ratio, clipped to the image), `letterbox_boxes` the other way.
///
/// Usage:
/// @code
///   using namespace orepa;
///   Tensor<float> image({3, 480, 640});                    // [C, H, W] in [0, 1]
///   auto lb = yolo::letterbox<float>(image, yolo::LetterboxOptions(640));
///   // lb.image: [3, 480, 640] (auto: 480 is a multiple of 32); lb.geometry: ratio and padding
///   Tensor<float> boxes = ...;                             // [n, 6] NMS output in lb.image's pixels
///   yolo::scale_boxes<float>(boxes, lb.geometry);          // now in the original image's pixels
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa::yolo {

/// The settings of letterbox: the target shape (required) and YOLOv5's flags.
struct LetterboxOptions {
  /// A square target of `size` x `size`.
  explicit LetterboxOptions(std::int64_t size) : height_(size), width_(size) {}
  /// A target of `height` x `width`.
  LetterboxOptions(std::int64_t height, std::int64_t width) : height_(height), width_(width) {}

  /// @fn height(const std::int64_t&)
  /// @brief Sets height(); returns the options for chaining.
  /// @fn width(const std::int64_t&)
  /// @brief Sets width(); returns the options for chaining.
  /// @fn minimal_pad(const bool&)
  /// @brief Sets minimal_pad(); returns the options for chaining.
  /// @fn scale_fill(const bool&)
  /// @brief Sets scale_fill(); returns the options for chaining.
  /// @fn scale_up(const bool&)
  /// @brief Sets scale_up(); returns the options for chaining.
  /// @fn stride(const std::int64_t&)
  /// @brief Sets stride(); returns the options for chaining.
  /// @fn fill(const double&)
  /// @brief Sets fill(); returns the options for chaining.

  /// Target height.
  OREPA_OPTION(std::int64_t, height);
  /// Target width.
  OREPA_OPTION(std::int64_t, width);
  /// Pad only up to the next multiple of stride() (YOLOv5's `auto`, default true, as
  /// detect.py uses it); false: pad to exactly height() x width().
  OREPA_OPTION(bool, minimal_pad) = true;
  /// Stretch to exactly height() x width() without padding (YOLOv5's `scaleFill`; default
  /// false). Applies only with minimal_pad() false, as in YOLOv5.
  OREPA_OPTION(bool, scale_fill) = false;
  /// Allow enlarging (default true; false: the ratio is at most 1, as val.py does).
  OREPA_OPTION(bool, scale_up) = true;
  /// Stride the minimal padding rounds to (default 32).
  OREPA_OPTION(std::int64_t, stride) = 32;
  /// Value of the padding (default 114 / 255: YOLOv5's grey on images scaled to [0, 1]).
  OREPA_OPTION(double, fill) = 114.0 / 255.0;

 public:
  /// This object (what the setters return).
  LetterboxOptions& self() { return *this; }
};

/// Where the original image sits in a letterboxed one.
struct LetterboxGeometry {
  std::int64_t src_height = 0;  ///< original height
  std::int64_t src_width = 0;   ///< original width
  std::int64_t height = 0;      ///< letterboxed height
  std::int64_t width = 0;       ///< letterboxed width
  std::int64_t resized_height = 0;  ///< height of the resized image inside the padding
  std::int64_t resized_width = 0;   ///< width of the resized image inside the padding
  double ratio_w = 1;  ///< resize factor in x (YOLOv5's ratio[0])
  double ratio_h = 1;  ///< resize factor in y (ratio[1]; equal to ratio_w unless scale_fill)
  double pad_w = 0;    ///< half the horizontal padding (YOLOv5's dw, possibly x.5)
  double pad_h = 0;    ///< half the vertical padding (dh)
  std::int64_t top = 0;     ///< rows of padding above
  std::int64_t bottom = 0;  ///< rows of padding below
  std::int64_t left = 0;    ///< columns of padding on the left
  std::int64_t right = 0;   ///< columns of padding on the right
};

/// The geometry letterbox gives an image of `height` x `width` (YOLOv5's arithmetic).
/// Throws config_error for non-positive sizes or stride.
inline LetterboxGeometry letterbox_geometry(std::int64_t height, std::int64_t width, const LetterboxOptions& o) {
  if (height < 1 || width < 1)
    throw config_error(orepa::detail::cat("letterbox: image size ", height, " x ", width, " must be positive"));
  if (o.height() < 1 || o.width() < 1)
    throw config_error(orepa::detail::cat("letterbox: target size ", o.height(), " x ", o.width(), " must be positive"));
  if (o.stride() < 1) throw config_error(orepa::detail::cat("letterbox: stride ", o.stride(), " must be positive"));
  LetterboxGeometry g;
  g.src_height = height, g.src_width = width;
  double r = std::min(double(o.height()) / double(height), double(o.width()) / double(width));
  if (!o.scale_up()) r = std::min(r, 1.0);
  g.ratio_w = g.ratio_h = r;
  // Python's round: half to even (std::nearbyint in the default rounding mode).
  g.resized_width = std::int64_t(std::nearbyint(double(width) * r));
  g.resized_height = std::int64_t(std::nearbyint(double(height) * r));
  g.resized_width = std::max<std::int64_t>(g.resized_width, 1);
  g.resized_height = std::max<std::int64_t>(g.resized_height, 1);
  std::int64_t dw = o.width() - g.resized_width, dh = o.height() - g.resized_height;
  if (o.minimal_pad()) {
    dw = ((dw % o.stride()) + o.stride()) % o.stride();  // numpy mod: non-negative
    dh = ((dh % o.stride()) + o.stride()) % o.stride();
  } else if (o.scale_fill()) {
    dw = dh = 0;
    g.resized_width = o.width(), g.resized_height = o.height();
    g.ratio_w = double(o.width()) / double(width);
    g.ratio_h = double(o.height()) / double(height);
  }
  g.pad_w = double(dw) / 2, g.pad_h = double(dh) / 2;
  g.top = std::int64_t(std::nearbyint(g.pad_h - 0.1)), g.bottom = std::int64_t(std::nearbyint(g.pad_h + 0.1));
  g.left = std::int64_t(std::nearbyint(g.pad_w - 0.1)), g.right = std::int64_t(std::nearbyint(g.pad_w + 0.1));
  g.height = g.resized_height + g.top + g.bottom;
  g.width = g.resized_width + g.left + g.right;
  return g;
}

/// Bilinear resize of `image` ([C, H, W] or [N, C, H, W]) to `height` x `width` with
/// half-pixel centres, as OpenCV's INTER_LINEAR (and torch's bilinear with
/// align_corners=False): source coordinate (d + 0.5) * in / out - 0.5, clamped to the
/// image; no antialiasing when shrinking. Throws shape_error / config_error on bad input.
template <class S>
Tensor<S> resize_bilinear(ConstTensorView<S> image, std::int64_t height, std::int64_t width) {
  if ((image.dim() != 3 && image.dim() != 4) || image.numel() == 0)
    throw shape_error(orepa::detail::cat("resize_bilinear: image: expected [C, H, W] or [N, C, H, W] with no zero extent, got ",
                                         shape_str(image.sizes())));
  if (height < 1 || width < 1)
    throw config_error(orepa::detail::cat("resize_bilinear: target size ", height, " x ", width, " must be positive"));
  Tensor<S> scratch;
  const ConstTensorView<S> x = image.dim() == 4 ? contiguous<S>(image, scratch) : image;
  const int d = x.dim();
  const std::int64_t H = x.size(d - 2), W = x.size(d - 1), planes = x.numel() / (H * W);
  Shape shape = x.sizes();
  shape[std::size_t(d - 2)] = height, shape[std::size_t(d - 1)] = width;
  Tensor<S> out(shape);
  // Per output coordinate: the first source index and the weight of the second.
  auto taps = [](std::int64_t in, std::int64_t n_out) {
    std::vector<std::pair<std::int64_t, double>> t(static_cast<std::size_t>(n_out));
    const double scale = double(in) / double(n_out);
    for (std::int64_t o = 0; o < n_out; ++o) {
      double f = (double(o) + 0.5) * scale - 0.5;
      if (f < 0) f = 0;
      std::int64_t i0 = std::int64_t(std::floor(f));
      double frac = f - double(i0);
      if (i0 >= in - 1) i0 = in - 1, frac = 0;
      t[std::size_t(o)] = {i0, frac};
    }
    return t;
  };
  const auto ty = taps(H, height), tx = taps(W, width);
  for (std::int64_t p = 0; p < planes; ++p) {
    const S* src = x.data() + p * H * W;
    S* dst = out.data() + p * height * width;
    for (std::int64_t oy = 0; oy < height; ++oy) {
      const auto [y0, fy] = ty[std::size_t(oy)];
      const std::int64_t y1 = std::min(y0 + 1, H - 1);
      for (std::int64_t ox = 0; ox < width; ++ox) {
        const auto [x0, fx] = tx[std::size_t(ox)];
        const std::int64_t x1 = std::min(x0 + 1, W - 1);
        const double top = double(src[y0 * W + x0]) * (1 - fx) + double(src[y0 * W + x1]) * fx;
        const double bot = double(src[y1 * W + x0]) * (1 - fx) + double(src[y1 * W + x1]) * fx;
        dst[oy * width + ox] = S(top * (1 - fy) + bot * fy);
      }
    }
  }
  return out;
}

/// A letterboxed image and where the original sits in it.
template <class S>
struct Letterboxed {
  Tensor<S> image;             ///< the letterboxed image, the rank of the input
  LetterboxGeometry geometry;  ///< ratio, padding and sizes (for scale_boxes)
};

/// YOLOv5's letterbox of `image` ([C, H, W] or [N, C, H, W], float values; any range,
/// the padding value is `options.fill()`).
template <class S>
Letterboxed<S> letterbox(ConstTensorView<S> image, const LetterboxOptions& options) {
  if ((image.dim() != 3 && image.dim() != 4) || image.numel() == 0)
    throw shape_error(orepa::detail::cat("letterbox: image: expected [C, H, W] or [N, C, H, W] with no zero extent, got ",
                                         shape_str(image.sizes())));
  const int d = image.dim();
  Letterboxed<S> r;
  r.geometry = letterbox_geometry(image.size(d - 2), image.size(d - 1), options);
  const auto& g = r.geometry;
  Tensor<S> scratch;
  const ConstTensorView<S> x = d == 4 ? contiguous<S>(image, scratch) : image;
  Tensor<S> resized;
  const bool same = g.resized_height == x.size(d - 2) && g.resized_width == x.size(d - 1);
  if (!same) resized = resize_bilinear<S>(x, g.resized_height, g.resized_width);
  const ConstTensorView<S> body = same ? x : ConstTensorView<S>(resized);
  Shape shape = x.sizes();
  shape[std::size_t(d - 2)] = g.height, shape[std::size_t(d - 1)] = g.width;
  r.image = Tensor<S>(shape, S(options.fill()));
  const std::int64_t planes = x.numel() / (x.size(d - 2) * x.size(d - 1));
  for (std::int64_t p = 0; p < planes; ++p)
    for (std::int64_t y = 0; y < g.resized_height; ++y)
      std::copy_n(body.data() + (p * g.resized_height + y) * g.resized_width, g.resized_width,
                  r.image.data() + (p * g.height + g.top + y) * g.width + g.left);
  return r;
}

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
template <class S>
std::int64_t box_rows(TensorView<S> boxes, const char* what) {
  if (boxes.numel() == 0 && boxes.dim() <= 1) return 0;
  if (boxes.dim() != 2 || boxes.size(1) < 4)
    throw shape_error(orepa::detail::cat(what, ": boxes: expected shape [n, >= 4] (x1, y1, x2, y2, ...), got ",
                                         shape_str(boxes.sizes())));
  return boxes.size(0);
}
}  // namespace detail
/// \endcond

/// Maps boxes (x1, y1, x2, y2, ...) [n, >= 4] of the letterboxed image back to the
/// original in place, as YOLOv5's scale_boxes with the letterbox's ratio_pad: minus
/// (pad_w, pad_h), divided by the ratio, then clipped to the original image. Columns after
/// the fourth are left alone. As in YOLOv5 the padding subtracted is the exact half (e.g.
/// 13.5) while the image was placed at the rounded one (13): boxes can be off by half a
/// pixel. (YOLOv5 divides both axes by one gain; they differ only with scale_fill, where
/// this divides each axis by its own.)
template <class S>
void scale_boxes(TensorView<S> boxes, const LetterboxGeometry& g) {
  const std::int64_t n = detail::box_rows(boxes, "scale_boxes"), c = n ? boxes.size(1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    S* b = boxes.data() + i * c;
    b[0] = S((double(b[0]) - g.pad_w) / g.ratio_w), b[2] = S((double(b[2]) - g.pad_w) / g.ratio_w);
    b[1] = S((double(b[1]) - g.pad_h) / g.ratio_h), b[3] = S((double(b[3]) - g.pad_h) / g.ratio_h);
    for (int k = 0; k < 4; ++k) b[k] = std::clamp(b[k], S(0), S(k % 2 ? g.src_height : g.src_width));
  }
}

/// YOLOv5's scale_boxes without ratio_pad: boxes of an image of `from_height` x
/// `from_width` that letterboxes (centred, ratio min(from / to)) an image of `to_height`
/// x `to_width` are mapped back to it in place and clipped.
template <class S>
void scale_boxes(TensorView<S> boxes, std::int64_t from_height, std::int64_t from_width, std::int64_t to_height,
                 std::int64_t to_width) {
  if (from_height < 1 || from_width < 1 || to_height < 1 || to_width < 1)
    throw config_error(orepa::detail::cat("scale_boxes: sizes ", from_height, " x ", from_width, " and ", to_height,
                                          " x ", to_width, " must be positive"));
  LetterboxGeometry g;
  g.src_height = to_height, g.src_width = to_width;
  g.ratio_w = g.ratio_h = std::min(double(from_height) / double(to_height), double(from_width) / double(to_width));
  g.pad_w = (double(from_width) - double(to_width) * g.ratio_w) / 2;
  g.pad_h = (double(from_height) - double(to_height) * g.ratio_h) / 2;
  scale_boxes<S>(boxes, g);
}

/// The forward mapping: boxes (x1, y1, x2, y2, ...) of the original image into the
/// letterboxed one, in place (times the ratios, plus the padding), e.g. for labels.
template <class S>
void letterbox_boxes(TensorView<S> boxes, const LetterboxGeometry& g) {
  const std::int64_t n = detail::box_rows(boxes, "letterbox_boxes"), c = n ? boxes.size(1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    S* b = boxes.data() + i * c;
    b[0] = S(double(b[0]) * g.ratio_w + g.pad_w), b[2] = S(double(b[2]) * g.ratio_w + g.pad_w);
    b[1] = S(double(b[1]) * g.ratio_h + g.pad_h), b[3] = S(double(b[3]) * g.ratio_h + g.pad_h);
  }
}

}  // namespace orepa::yolo
