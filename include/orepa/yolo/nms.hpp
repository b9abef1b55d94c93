#pragma once
/// @file nms.hpp (yolo)
/// Box utilities and YOLOv5's `non_max_suppression` (v7.0):
///   - `xywh2xyxy` / `xyxy2xywh` on [n, >= 4] tensors, `box_iou` (pairwise IoU, eps 1e-7 in
///     the union as YOLOv5's), `clip_boxes`;
///   - `nms`: greedy suppression by score (torchvision.ops.nms's rule: a box is dropped when
///     its IoU with a kept, higher-scoring box is > the threshold);
///   - `non_max_suppression`: candidates with objectness > conf_thres and
///     objectness * class score > conf_thres (the best class, or every class over the
///     threshold with multi_label), sorted by confidence, class-aware NMS as YOLOv5 does it
///     (boxes offset by class * max_wh, 7680), then the first max_det.
///
/// Ties are stable: candidates of equal confidence keep their input order (by prediction
/// row, then class index), so with equal scores the lower row is kept. YOLOv5 sorts with
/// an unstable argsort there; where no two confidences tie the results are the same.
///
/// Usage:
/// @code
///   using namespace orepa;
///   // decoded Detect output [N, anchors * cells, 5 + nc]: cx, cy, w, h (pixels), obj, classes
///   auto dets = yolo::non_max_suppression<float>(pred, yolo::NmsOptions());           // detect.py
///   auto val = yolo::non_max_suppression<float>(pred, yolo::NmsOptions::validation()); // val.py
///   for (std::int64_t k = 0; k < dets[0].size(); ++k) {
///     const float* row = dets[0].rows.data() + 6 * k;   // x1, y1, x2, y2, conf, class
///     std::printf("%g %g %g %g %.3f class %g (row %lld)\n", row[0], row[1], row[2], row[3], row[4], row[5],
///                 (long long)dets[0].source[std::size_t(k)]);
///   }
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa::yolo {

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
template <class S>
void check_boxes(ConstTensorView<S> boxes, std::int64_t min_cols, const char* what) {
  if (boxes.numel() == 0 && boxes.dim() <= 1) return;  // an empty tensor stands for no boxes
  if (boxes.dim() != 2 || boxes.size(1) < min_cols)
    throw shape_error(orepa::detail::cat(what, ": expected shape [n, ", min_cols, "], got ", shape_str(boxes.sizes())));
}
template <class S>
std::int64_t box_count(ConstTensorView<S> boxes) {
  return boxes.dim() == 2 ? boxes.size(0) : 0;
}
}  // namespace detail
/// \endcond

/// Boxes (cx, cy, w, h, ...) as (x1, y1, x2, y2, ...): a copy of `boxes` [n, >= 4] with
/// the first four columns converted (x1 = cx - w / 2, ...).
template <class S>
Tensor<S> xywh2xyxy(ConstTensorView<S> boxes) {
  detail::check_boxes(boxes, 4, "xywh2xyxy: boxes");
  Tensor<S> out = boxes.clone();
  const std::int64_t n = detail::box_count(boxes), c = n ? boxes.size(1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    S* b = out.data() + i * c;
    const S hw = b[2] / S(2), hh = b[3] / S(2), x = b[0], y = b[1];
    b[0] = x - hw, b[1] = y - hh, b[2] = x + hw, b[3] = y + hh;
  }
  return out;
}

/// Boxes (x1, y1, x2, y2, ...) as (cx, cy, w, h, ...): the inverse of xywh2xyxy.
template <class S>
Tensor<S> xyxy2xywh(ConstTensorView<S> boxes) {
  detail::check_boxes(boxes, 4, "xyxy2xywh: boxes");
  Tensor<S> out = boxes.clone();
  const std::int64_t n = detail::box_count(boxes), c = n ? boxes.size(1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    S* b = out.data() + i * c;
    const S x1 = b[0], y1 = b[1], x2 = b[2], y2 = b[3];
    b[0] = (x1 + x2) / S(2), b[1] = (y1 + y2) / S(2), b[2] = x2 - x1, b[3] = y2 - y1;
  }
  return out;
}

/// Clamps the corners of boxes (x1, y1, x2, y2, ...) [n, >= 4] in place to an image of
/// `height` x `width`: x into [0, width], y into [0, height].
template <class S>
void clip_boxes(TensorView<S> boxes, double height, double width) {
  detail::check_boxes<S>(boxes, 4, "clip_boxes: boxes");
  const std::int64_t n = detail::box_count<S>(boxes), c = n ? boxes.size(1) : 0;
  for (std::int64_t i = 0; i < n; ++i) {
    S* b = boxes.data() + i * c;
    for (int k = 0; k < 4; ++k) b[k] = std::clamp(b[k], S(0), S(k % 2 ? height : width));
  }
}

/// Pairwise IoU of boxes `a` [n, >= 4] and `b` [m, >= 4], both (x1, y1, x2, y2, ...):
/// [n, m], inter / (area_a + area_b - inter + 1e-7) as YOLOv5's `box_iou` (computed in S).
template <class S>
Tensor<S> box_iou(ConstTensorView<S> a, orepa::detail::identity_t<ConstTensorView<S>> b) {
  detail::check_boxes(a, 4, "box_iou: boxes a");
  detail::check_boxes(b, 4, "box_iou: boxes b");
  const std::int64_t n = detail::box_count(a), m = detail::box_count(b);
  const std::int64_t ca = n ? a.size(1) : 0, cb = m ? b.size(1) : 0;
  Tensor<S> iou({n, m});
  for (std::int64_t i = 0; i < n; ++i) {
    const S* p = a.data() + i * ca;
    for (std::int64_t j = 0; j < m; ++j) {
      const S* q = b.data() + j * cb;
      const S iw = std::max(std::min(p[2], q[2]) - std::max(p[0], q[0]), S(0));
      const S ih = std::max(std::min(p[3], q[3]) - std::max(p[1], q[1]), S(0));
      const S inter = iw * ih;
      iou(i, j) = inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter + S(1e-7));
    }
  }
  return iou;
}

/// Greedy NMS (torchvision.ops.nms's rule): visits `boxes` [n, >= 4] (x1, y1, x2, y2) by
/// descending `scores` [n] (ties: lower index first), keeps a box unless an already kept
/// box overlaps it with IoU > `iou_thres` (inter / (area_a + area_b - inter), no eps), and
/// returns the kept indices in visiting order. With `max_keep` >= 0 it stops once that
/// many are kept: the first `max_keep` of the full result, without the quadratic work
/// for the rest.
template <class S>
std::vector<std::int64_t> nms(ConstTensorView<S> boxes, orepa::detail::identity_t<ConstTensorView<S>> scores,
                              double iou_thres, std::int64_t max_keep = -1) {
  detail::check_boxes(boxes, 4, "nms: boxes");
  const std::int64_t n = detail::box_count(boxes), c = n ? boxes.size(1) : 0;
  if (scores.numel() != n)
    throw shape_error(orepa::detail::cat("nms: ", scores.numel(), " scores for ", n, " boxes"));
  if (!(iou_thres >= 0 && iou_thres <= 1))
    throw config_error(orepa::detail::cat("nms: iou_thres must be in [0, 1], got ", iou_thres));
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) { return scores[i] > scores[j]; });
  std::vector<char> removed(static_cast<std::size_t>(n), 0);
  std::vector<std::int64_t> keep;
  auto box = [&](std::int64_t i) { return boxes.data() + i * c; };
  for (std::size_t oi = 0; oi < order.size(); ++oi) {
    if (max_keep >= 0 && std::int64_t(keep.size()) >= max_keep) break;
    const std::int64_t i = order[oi];
    if (removed[std::size_t(i)]) continue;
    keep.push_back(i);
    const S* p = box(i);
    const S area_i = (p[2] - p[0]) * (p[3] - p[1]);
    for (std::size_t oj = oi + 1; oj < order.size(); ++oj) {
      const std::int64_t j = order[oj];
      if (removed[std::size_t(j)]) continue;
      const S* q = box(j);
      const S w = std::max(S(0), std::min(p[2], q[2]) - std::max(p[0], q[0]));
      const S h = std::max(S(0), std::min(p[3], q[3]) - std::max(p[1], q[1]));
      const S inter = w * h;
      const S iou = inter / (area_i + (q[2] - q[0]) * (q[3] - q[1]) - inter);
      if (double(iou) > iou_thres) removed[std::size_t(j)] = 1;
    }
  }
  return keep;
}

/// The settings of non_max_suppression; the defaults are detect.py's (conf 0.25, IoU
/// 0.45, max_det 300 is YOLOv5's function default), validation() gives val.py's.
struct NmsOptions {
  /// @fn conf_thres(const double&)
  /// @brief Sets conf_thres(); returns the options for chaining.
  /// @fn iou_thres(const double&)
  /// @brief Sets iou_thres(); returns the options for chaining.
  /// @fn max_det(const std::int64_t&)
  /// @brief Sets max_det(); returns the options for chaining.
  /// @fn multi_label(const bool&)
  /// @brief Sets multi_label(); returns the options for chaining.
  /// @fn agnostic(const bool&)
  /// @brief Sets agnostic(); returns the options for chaining.
  /// @fn classes(const std::vector<std::int64_t>&)
  /// @brief Sets classes(); returns the options for chaining.
  /// @fn max_nms(const std::int64_t&)
  /// @brief Sets max_nms(); returns the options for chaining.
  /// @fn max_wh(const double&)
  /// @brief Sets max_wh(); returns the options for chaining.

  /// Candidates need objectness > conf_thres and confidence (obj * class) > conf_thres (0.25).
  OREPA_OPTION(double, conf_thres) = 0.25;
  /// Boxes overlapping a kept box of their class with IoU > iou_thres are dropped (0.45).
  OREPA_OPTION(double, iou_thres) = 0.45;
  /// At most this many detections per image (300).
  OREPA_OPTION(std::int64_t, max_det) = 300;
  /// One candidate per class over the threshold instead of the best class only (false;
  /// YOLOv5 ignores it for nc == 1).
  OREPA_OPTION(bool, multi_label) = false;
  /// Suppress across classes (false: class-aware).
  OREPA_OPTION(bool, agnostic) = false;
  /// Keep only these classes (empty, default: all).
  OREPA_OPTION(std::vector<std::int64_t>, classes);
  /// At most this many candidates, the most confident, enter NMS (30000).
  OREPA_OPTION(std::int64_t, max_nms) = 30000;
  /// Class offset of the boxes in class-aware NMS, larger than any box (7680 pixels).
  OREPA_OPTION(double, max_wh) = 7680.0;

 public:
  /// This object (what the setters return).
  NmsOptions& self() { return *this; }
  /// val.py's call: conf 0.001, IoU 0.6, multi_label, max_det 300.
  static NmsOptions validation() { return NmsOptions().conf_thres(0.001).iou_thres(0.6).multi_label(true); }
};

/// The detections of one image.
template <class S>
struct Detections {
  Tensor<S> rows;                    ///< [k, 6]: x1, y1, x2, y2, confidence, class
  std::vector<std::int64_t> source;  ///< the prediction row (anchor-cell) each detection came from
  /// Number of detections.
  std::int64_t size() const { return std::int64_t(source.size()); }
};

/// YOLOv5's `non_max_suppression` on decoded predictions `prediction` [N, A, 5 + nc]
/// (cx, cy, w, h in pixels, objectness and class scores after the sigmoid): per image, the
/// detections in descending confidence. Throws shape_error for a bad shape, config_error
/// for thresholds outside [0, 1] or max_det / max_nms < 1, state_error for a non-finite
/// prediction value.
template <class S>
std::vector<Detections<S>> non_max_suppression(ConstTensorView<S> prediction, const NmsOptions& options = NmsOptions()) {
  if (prediction.dim() != 3 || prediction.size(2) < 6)
    throw shape_error(orepa::detail::cat("non_max_suppression: prediction: expected shape [N, A, 5 + nc] with nc >= 1, got ",
                                         shape_str(prediction.sizes())));
  const double conf_thres = options.conf_thres(), iou_thres = options.iou_thres();
  if (!(conf_thres >= 0 && conf_thres <= 1))
    throw config_error(orepa::detail::cat("non_max_suppression: conf_thres must be in [0, 1], got ", conf_thres));
  if (!(iou_thres >= 0 && iou_thres <= 1))
    throw config_error(orepa::detail::cat("non_max_suppression: iou_thres must be in [0, 1], got ", iou_thres));
  if (options.max_det() < 1 || options.max_nms() < 1)
    throw config_error(orepa::detail::cat("non_max_suppression: max_det (", options.max_det(), ") and max_nms (",
                                          options.max_nms(), ") must be >= 1"));
  if (!(options.max_wh() > 0)) throw config_error("non_max_suppression: max_wh must be positive");
  const std::int64_t N = prediction.size(0), A = prediction.size(1), no = prediction.size(2), nc = no - 5;
  for (std::int64_t j = 0; j < prediction.numel(); ++j)
    if (!std::isfinite(double(prediction[j])))
      throw state_error(orepa::detail::cat("non_max_suppression: prediction [", j / no / A, ", ", j / no % A, ", ",
                                           j % no, "] is ", double(prediction[j])));
  const bool multi_label = options.multi_label() && nc > 1;
  const S thres = S(conf_thres);
  const auto& wanted = options.classes();

  std::vector<Detections<S>> out(static_cast<std::size_t>(N));
  for (std::int64_t img = 0; img < N; ++img) {
    struct Candidate {
      std::int64_t row, cls;
      S conf;
    };
    std::vector<Candidate> cand;
    for (std::int64_t a = 0; a < A; ++a) {
      const S* p = prediction.data() + (img * A + a) * no;
      if (!(p[4] > thres)) continue;
      if (multi_label) {
        for (std::int64_t c = 0; c < nc; ++c)
          if (p[5 + c] * p[4] > thres) cand.push_back({a, c, p[5 + c] * p[4]});
      } else {
        std::int64_t best = 0;  // the first maximum, as torch.max
        for (std::int64_t c = 1; c < nc; ++c)
          if (p[5 + c] * p[4] > p[5 + best] * p[4]) best = c;
        const S conf = p[5 + best] * p[4];
        if (conf > thres) cand.push_back({a, best, conf});
      }
    }
    if (!wanted.empty())
      cand.erase(std::remove_if(cand.begin(), cand.end(),
                                [&](const Candidate& k) {
                                  return std::find(wanted.begin(), wanted.end(), k.cls) == wanted.end();
                                }),
                 cand.end());
    std::stable_sort(cand.begin(), cand.end(), [](const Candidate& x, const Candidate& y) { return x.conf > y.conf; });
    if (std::int64_t(cand.size()) > options.max_nms()) cand.resize(std::size_t(options.max_nms()));

    const std::int64_t n = std::int64_t(cand.size());
    Tensor<S> xyxy({n, 6});  // candidate boxes (x1, y1, x2, y2, conf, class)
    Tensor<S> shifted({n, 4}), scores({n});
    const S offset = options.agnostic() ? S(0) : S(options.max_wh());
    for (std::int64_t k = 0; k < n; ++k) {
      const auto& cd = cand[std::size_t(k)];
      const S* p = prediction.data() + (img * A + cd.row) * no;
      const S hw = p[2] / S(2), hh = p[3] / S(2);
      const S box[4] = {p[0] - hw, p[1] - hh, p[0] + hw, p[1] + hh};
      for (int q = 0; q < 4; ++q) {
        xyxy(k, q) = box[q];
        shifted(k, q) = box[q] + S(cd.cls) * offset;
      }
      xyxy(k, 4) = cd.conf;
      xyxy(k, 5) = S(cd.cls);
      scores[k] = cd.conf;
    }
    const std::vector<std::int64_t> keep = nms<S>(shifted, scores, iou_thres, options.max_det());
    auto& d = out[std::size_t(img)];
    d.rows = Tensor<S>({std::int64_t(keep.size()), 6});
    for (std::size_t k = 0; k < keep.size(); ++k) {
      std::copy_n(xyxy.data() + keep[k] * 6, 6, d.rows.data() + std::int64_t(k) * 6);
      d.source.push_back(cand[std::size_t(keep[k])].row);
    }
  }
  return out;
}

}  // namespace orepa::yolo
