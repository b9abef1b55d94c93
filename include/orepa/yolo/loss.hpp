#pragma once
/// @file loss.hpp (yolo)
/// YOLOv5's training loss (`ComputeLoss` of YOLOv5 v7.0 with `hyp.scratch-low.yaml`) and
/// its gradient with respect to the Detect head's raw maps, written by hand (no autograd):
///   - `build_targets`: every target is matched to the anchors whose w / h ratio to it is
///     below `anchor_t` (both ways), and each match is also given to the two neighbouring
///     cells nearer the target's centre (offset 0.5), in YOLOv5's entry order;
///   - box loss: mean over the entries of 1 - CIoU of the decoded prediction
///     (xy = 2 sigmoid - 0.5, wh = (2 sigmoid)^2 anchor) and the target (`bbox_ciou`);
///   - objectness: BCE-with-logits mean over every cell against the detached CIoU clamped at
///     0 (`gr` 1), weighted per level by `balance` (4.0 / 1.0 / 0.4 for P3 / P4 / P5);
///   - class loss: BCE-with-logits mean over the entries and classes (none when nc == 1);
///   - gains box 0.05, obj 1.0, cls 0.5, scaled as train.py does by 3 / nl, (image / 640)^2
///     for obj and nc / 80 for cls; the total is multiplied by the batch size.
///
/// The gradient follows PyTorch's autograd of that code exactly: CIoU's `alpha` is a
/// constant (YOLOv5 computes it under no_grad), the objectness target is detached, an
/// entry repeated at one cell adds its gradient once per repetition (the objectness
/// target of a cell written several times keeps the last entry's value), and ties of
/// min / max inside CIoU split the gradient in halves as torch.minimum / maximum do.
///
/// Usage:
/// @code
///   using namespace orepa;
///   // Detect.anchors [nl, na, 2] in grid units (pixels / stride), Detect.stride.
///   yolo::DetectionLoss<float> loss(anchors, {8, 16, 32}, yolo::LossOptions());
///   // raw maps [N, na, H_i, W_i, 5 + nc] of a training forward, targets [n, 6] =
///   // (image, class, cx, cy, w, h) normalised to [0, 1].
///   yolo::LossResult<float> r = loss({p0, p1, p2}, targets);
///   if (!r.finite()) throw state_error("the loss is not finite");
///   std::printf("loss %g  box %g obj %g cls %g\n", r.loss, r.items[0], r.items[1], r.items[2]);
///   detect_backward(r.grad);   // d loss / d raw map i, the shape of map i
/// @endcode

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/options.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa::yolo {

/// The hyperparameters of the loss, YOLOv5's `hyp.scratch-low.yaml` values by default.
/// The gains are the yaml's; the loss scales them as train.py does (scale_gains()).
struct LossOptions {
  /// @fn box(const double&)
  /// @brief Sets box(); returns the options for chaining.
  /// @fn obj(const double&)
  /// @brief Sets obj(); returns the options for chaining.
  /// @fn cls(const double&)
  /// @brief Sets cls(); returns the options for chaining.
  /// @fn anchor_t(const double&)
  /// @brief Sets anchor_t(); returns the options for chaining.
  /// @fn gr(const double&)
  /// @brief Sets gr(); returns the options for chaining.
  /// @fn label_smoothing(const double&)
  /// @brief Sets label_smoothing(); returns the options for chaining.
  /// @fn balance(const std::vector<double>&)
  /// @brief Sets balance(); returns the options for chaining.
  /// @fn image_size(const double&)
  /// @brief Sets image_size(); returns the options for chaining.
  /// @fn scale_gains(const bool&)
  /// @brief Sets scale_gains(); returns the options for chaining.

  /// Box (1 - CIoU) gain, before scaling (yaml `box`, default 0.05).
  OREPA_OPTION(double, box) = 0.05;
  /// Objectness gain, before scaling (yaml `obj`, default 1.0).
  OREPA_OPTION(double, obj) = 1.0;
  /// Class gain, before scaling (yaml `cls`, default 0.5).
  OREPA_OPTION(double, cls) = 0.5;
  /// Largest accepted ratio between a target's w (or h) and an anchor's, either way (default 4).
  OREPA_OPTION(double, anchor_t) = 4.0;
  /// Objectness target = (1 - gr) + gr * max(CIoU, 0) (default 1: the CIoU itself).
  OREPA_OPTION(double, gr) = 1.0;
  /// Class targets 1 - eps / 2 and eps / 2 (default 0: one-hot).
  OREPA_OPTION(double, label_smoothing) = 0.0;
  /// Objectness weight per level; empty (default): YOLOv5's, [4, 1, 0.4] for 3 levels,
  /// else the first nl of [4, 1, 0.25, 0.06, 0.02].
  OREPA_OPTION(std::vector<double>, balance);
  /// Training image size for the obj gain's (size / 640)^2 (train.py's `imgsz`); 0
  /// (default): the larger side of the input, H_0 * stride_0 and W_0 * stride_0.
  OREPA_OPTION(double, image_size) = 0.0;
  /// Scale the gains as train.py does: box by 3 / nl, obj by (image_size / 640)^2 * 3 / nl,
  /// cls by nc / 80 * 3 / nl (default true; false: the gains are used as given).
  OREPA_OPTION(bool, scale_gains) = true;

 public:
  /// This object (what the setters return).
  LossOptions& self() { return *this; }
};

/// The gains a loss applies after train.py's scaling.
struct LossGains {
  double box;  ///< multiplies the summed level box losses
  double obj;  ///< multiplies the balanced sum of the level objectness losses
  double cls;  ///< multiplies the summed level class losses
};

/// The gains `options` gives a head of `nl` levels and `nc` classes trained at `image_size`.
inline LossGains effective_gains(const LossOptions& options, std::int64_t nl, std::int64_t nc, double image_size) {
  if (!options.scale_gains()) return {options.box(), options.obj(), options.cls()};
  const double levels = 3.0 / double(nl), size = image_size / 640.0;
  return {options.box() * levels, options.obj() * size * size * levels, options.cls() * double(nc) / 80.0 * levels};
}

/// The objectness balance `options` gives a head of `nl` levels (YOLOv5's default when unset).
inline std::vector<double> level_balance(const LossOptions& options, std::int64_t nl) {
  if (!options.balance().empty()) {
    if (std::int64_t(options.balance().size()) != nl)
      throw config_error(orepa::detail::cat("LossOptions::balance: ", options.balance().size(), " values for ", nl,
                                     " detection levels"));
    return options.balance();
  }
  if (nl == 3) return {4.0, 1.0, 0.4};
  const std::vector<double> wide = {4.0, 1.0, 0.25, 0.06, 0.02};
  if (nl > std::int64_t(wide.size()))
    throw config_error(orepa::detail::cat("LossOptions::balance: YOLOv5 has no default for ", nl,
                                   " levels (at most 5); set balance()"));
  return {wide.begin(), wide.begin() + nl};
}

/// One entry of build_targets: a target matched to an anchor at one cell of one level.
template <class S>
struct TargetEntry {
  std::int64_t image;   ///< image in the batch (YOLOv5's b)
  std::int64_t anchor;  ///< anchor of the level (a)
  std::int64_t gj;      ///< cell row (y)
  std::int64_t gi;      ///< cell column (x)
  std::int64_t cls;     ///< class of the target
  /// The target box (tbox): centre offset from the cell's corner (-0.5 .. 1.5) and w, h,
  /// in grid units.
  std::array<S, 4> box;
  /// The matched anchor's w, h in grid units (anch).
  std::array<S, 2> anchor_wh;
};

/// The entries of one level, in YOLOv5's order.
template <class S>
using LevelTargets = std::vector<TargetEntry<S>>;

/// Height and width of one level's grid.
struct GridSize {
  std::int64_t height;  ///< H_i
  std::int64_t width;   ///< W_i
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {

// A target row: (image, class, cx, cy, w, h), normalised, finite, boxes inside [0, 1].
template <class S>
void check_target_rows(ConstTensorView<S> targets) {
  if (targets.numel() == 0) return;
  if (targets.dim() != 2 || targets.size(1) != 6)
    throw shape_error(orepa::detail::cat("targets: expected shape [n, 6] (image, class, cx, cy, w, h), got ",
                                  shape_str(targets.sizes())));
  static const char* names[6] = {"image", "class", "cx", "cy", "w", "h"};
  for (std::int64_t t = 0; t < targets.size(0); ++t)
    for (int c = 0; c < 6; ++c) {
      const double v = double(targets[t * 6 + c]);
      if (!std::isfinite(v)) throw state_error(orepa::detail::cat("targets row ", t, ": ", names[c], " is ", v));
      if (c < 2 && (v < 0 || v != std::floor(v)))
        throw config_error(orepa::detail::cat("targets row ", t, ": ", names[c], " must be a non-negative integer, got ", v));
      if (c >= 2 && (v < 0 || v > 1))
        throw config_error(orepa::detail::cat("targets row ", t, ": ", names[c], " = ", v,
                                       " is outside [0, 1] (coordinates are normalised by the image size)"));
    }
}

template <class S>
void check_anchors(ConstTensorView<S> anchors) {
  if (anchors.dim() != 3 || anchors.size(2) != 2 || anchors.size(0) < 1 || anchors.size(1) < 1)
    throw shape_error(orepa::detail::cat("anchors: expected shape [nl, na, 2] (w, h in grid units), got ",
                                  shape_str(anchors.sizes())));
  for (std::int64_t i = 0; i < anchors.numel(); ++i)
    if (!(double(anchors[i]) > 0) || !std::isfinite(double(anchors[i])))
      throw config_error(orepa::detail::cat("anchors: value ", i, " is ", double(anchors[i]), "; anchors must be positive"));
}

// BCE with logits of logit x against target t: (1 - t) x + log(1 + e^-|x|) + max(-x, 0).
template <class S>
S bce_with_logits(S x, S t) {
  return (S(1) - t) * x + std::log1p(std::exp(-std::abs(x))) + std::max(-x, S(0));
}

// d min(a, b) / d a as torch.minimum gives it (ties: half).
template <class S>
S dmin_da(S a, S b) {
  return a < b ? S(1) : (a == b ? S(0.5) : S(0));
}
template <class S>
S dmax_da(S a, S b) {
  return a > b ? S(1) : (a == b ? S(0.5) : S(0));
}

}  // namespace detail
/// \endcond

/// YOLOv5's `build_targets`: assigns the `targets` ([n, 6] rows (image, class, cx, cy, w,
/// h), normalised) to the anchors ([nl, na, 2], grid units) of every level whose grid is
/// `grids[i]`. A target matches an anchor when max(w / a_w, a_w / w, h / a_h, a_h / h) <
/// `anchor_t` (w, h in grid units). Each match is entered at its own cell, and at the x - 1
/// (y - 1) neighbour when the centre's fraction in that axis is < 0.5 and the centre is
/// more than 1 cell from the left (top) edge, and at the x + 1 (y + 1) neighbour when the
/// distance to the right (bottom) edge is > 1 and its fraction < 0.5. Entries come in five
/// groups (own cell, x - 1, y - 1, x + 1, y + 1), in each anchor-major then target order;
/// cells are clamped to the grid (a centre at exactly 1.0 lands in the last cell) and the
/// box offset is taken from the clamped cell, as in YOLOv5. Computed in S as YOLOv5 does.
template <class S>
std::vector<LevelTargets<S>> build_targets(ConstTensorView<S> targets, ConstTensorView<S> anchors,
                                           const std::vector<GridSize>& grids, double anchor_t) {
  detail::check_target_rows(targets);
  detail::check_anchors(anchors);
  const std::int64_t nl = anchors.size(0), na = anchors.size(1);
  if (std::int64_t(grids.size()) != nl)
    throw shape_error(orepa::detail::cat("build_targets: ", grids.size(), " grids for ", nl, " anchor levels"));
  if (!(anchor_t > 0)) throw config_error(orepa::detail::cat("anchor_t must be positive, got ", anchor_t));
  const std::int64_t nt = targets.numel() == 0 ? 0 : targets.size(0);
  const S half(0.5), one(1), limit = S(anchor_t);

  std::vector<LevelTargets<S>> out(static_cast<std::size_t>(nl));
  for (std::int64_t i = 0; i < nl; ++i) {
    const auto [H, W] = grids[std::size_t(i)];
    if (H < 1 || W < 1) throw shape_error(orepa::detail::cat("build_targets: grid ", i, " is ", H, " x ", W));
    struct Match {
      std::int64_t a, t;
      S gx, gy, gw, gh;
      bool neighbour[4];  // x - 1, y - 1, x + 1, y + 1
    };
    std::vector<Match> matches;
    for (std::int64_t a = 0; a < na; ++a) {
      const S aw = anchors[(i * na + a) * 2], ah = anchors[(i * na + a) * 2 + 1];
      for (std::int64_t t = 0; t < nt; ++t) {
        const S* row = targets.data() + t * 6;
        Match m{a, t, row[2] * S(W), row[3] * S(H), row[4] * S(W), row[5] * S(H), {}};
        const S rw = m.gw / aw, rh = m.gh / ah;
        if (!(std::max(std::max(rw, one / rw), std::max(rh, one / rh)) < limit)) continue;
        const S gxi = S(W) - m.gx, gyi = S(H) - m.gy;
        m.neighbour[0] = std::fmod(m.gx, one) < half && m.gx > one;
        m.neighbour[1] = std::fmod(m.gy, one) < half && m.gy > one;
        m.neighbour[2] = std::fmod(gxi, one) < half && gxi > one;
        m.neighbour[3] = std::fmod(gyi, one) < half && gyi > one;
        matches.push_back(m);
      }
    }
    // Offsets subtracted from the centre per group: none, (0.5, 0), (0, 0.5), (-0.5, 0), (0, -0.5).
    static const int off[5][2] = {{0, 0}, {1, 0}, {0, 1}, {-1, 0}, {0, -1}};
    auto& level = out[std::size_t(i)];
    for (int g = 0; g < 5; ++g)
      for (const Match& m : matches) {
        if (g > 0 && !m.neighbour[g - 1]) continue;
        const S* row = targets.data() + m.t * 6;
        TargetEntry<S> e{};
        e.image = std::int64_t(row[0]);
        e.cls = std::int64_t(row[1]);
        e.anchor = m.a;
        e.gi = std::clamp(std::int64_t(m.gx - half * S(off[g][0])), std::int64_t(0), W - 1);
        e.gj = std::clamp(std::int64_t(m.gy - half * S(off[g][1])), std::int64_t(0), H - 1);
        e.box = {m.gx - S(e.gi), m.gy - S(e.gj), m.gw, m.gh};
        e.anchor_wh = {anchors[(i * na + m.a) * 2], anchors[(i * na + m.a) * 2 + 1]};
        level.push_back(e);
      }
  }
  return out;
}

/// CIoU of two boxes and its gradient with respect to the first.
template <class S>
struct Ciou {
  S ciou;                 ///< IoU - (rho^2 / c^2 + alpha v)
  S iou;                  ///< the plain IoU (with YOLOv5's eps 1e-7 in the union)
  S alpha;                ///< v / (v - IoU + 1 + eps), a constant for the gradient
  std::array<S, 4> grad;  ///< d ciou / d (x, y, w, h) of the first box, alpha held constant
};

/// YOLOv5's `bbox_iou(box1, box2, xywh=True, CIoU=True)` for boxes (cx, cy, w, h) and its
/// gradient with respect to `box1` (the prediction), with alpha treated as a constant as
/// YOLOv5 does (it computes alpha under no_grad). eps = 1e-7 in the union and c^2.
template <class S>
Ciou<S> bbox_ciou(const std::array<S, 4>& box1, const std::array<S, 4>& box2) {
  using detail::dmax_da;
  using detail::dmin_da;
  const S eps = S(1e-7), two(2), zero(0);
  const S w1 = box1[2], h1 = box1[3], w2 = box2[2], h2 = box2[3];
  const S l1 = box1[0] - w1 / two, r1 = box1[0] + w1 / two, t1 = box1[1] - h1 / two, b1 = box1[1] + h1 / two;
  const S l2 = box2[0] - w2 / two, r2 = box2[0] + w2 / two, t2 = box2[1] - h2 / two, b2 = box2[1] + h2 / two;

  const S iw_raw = std::min(r1, r2) - std::max(l1, l2), ih_raw = std::min(b1, b2) - std::max(t1, t2);
  const S iw = std::max(iw_raw, zero), ih = std::max(ih_raw, zero);
  const S inter = iw * ih;
  const S uni = w1 * h1 + w2 * h2 - inter + eps;
  const S iou = inter / uni;
  const S cw = std::max(r1, r2) - std::min(l1, l2), ch = std::max(b1, b2) - std::min(t1, t2);
  const S c2 = cw * cw + ch * ch + eps;
  const S dx = l2 + r2 - l1 - r1, dy = t2 + b2 - t1 - b1;
  const S rho2 = (dx * dx + dy * dy) / S(4);
  const double pi = 3.14159265358979323846;
  const S k = S(4.0 / (pi * pi));
  const S q1 = w1 / h1, da = std::atan(w2 / h2) - std::atan(q1);
  const S v = k * da * da;
  const S alpha = v / (v - iou + (S(1) + eps));
  Ciou<S> r{iou - (rho2 / c2 + v * alpha), iou, alpha, {}};

  // Backward of ciou = iou - rho2 / c2 - alpha v through the edges l, r, t, b of box 1
  // and its w, h (which also enter the union and v directly).
  const S g_inter = (S(1) + iou) / uni;  // d iou / d inter (inter is also in the union)
  const S g_rho2 = -S(1) / c2, g_c2 = rho2 / (c2 * c2), g_v = -alpha;
  S gl = 0, gr = 0, gt = 0, gb = 0;
  // Intersection: clamp(min(r1, r2) - max(l1, l2), 0) passes the gradient at >= 0.
  const S g_iw = iw_raw >= zero ? g_inter * ih : zero, g_ih = ih_raw >= zero ? g_inter * iw : zero;
  gr += g_iw * dmin_da(r1, r2);
  gl -= g_iw * dmax_da(l1, l2);
  gb += g_ih * dmin_da(b1, b2);
  gt -= g_ih * dmax_da(t1, t2);
  // Enclosing box diagonal.
  const S g_cw = g_c2 * two * cw, g_ch = g_c2 * two * ch;
  gr += g_cw * dmax_da(r1, r2);
  gl -= g_cw * dmin_da(l1, l2);
  gb += g_ch * dmax_da(b1, b2);
  gt -= g_ch * dmin_da(t1, t2);
  // Centre distance: d rho2 / d l1 = d rho2 / d r1 = -dx / 2.
  gl -= g_rho2 * dx / two;
  gr -= g_rho2 * dx / two;
  gt -= g_rho2 * dy / two;
  gb -= g_rho2 * dy / two;
  // w1, h1 directly: the union's w1 h1 and the aspect term v.
  const S g_q = g_v * k * two * da * (-S(1)) / (S(1) + q1 * q1);
  const S gw = -iou / uni * h1 + g_q / h1, gh = -iou / uni * w1 - g_q * q1 / h1;
  r.grad = {gl + gr, gt + gb, (gr - gl) / two + gw, (gb - gt) / two + gh};
  return r;
}

/// The per-level terms of a loss, before the gains and the balance (YOLOv5's debugging
/// values), and the decoded prediction and CIoU of each build_targets entry.
template <class S>
struct LevelLoss {
  S box = 0;                          ///< mean(1 - CIoU) over the entries (0 without entries)
  S obj = 0;                          ///< BCE mean over every cell's objectness logit
  S cls = 0;                          ///< BCE mean over entries x classes (0 if nc == 1 or no entries)
  std::vector<std::array<S, 4>> pbox;  ///< decoded prediction of each entry (xy offset, wh; grid units)
  std::vector<S> ciou;                 ///< CIoU of each entry
};

/// What the loss returns: the value, its three items, d loss / d raw maps, and the target
/// assignment and per-level terms for tests and debugging.
template <class S>
struct LossResult {
  S loss = 0;                       ///< (box + obj + cls) * batch size: what training minimises
  std::array<S, 3> items{};         ///< box, obj, cls after the gains (not times the batch size)
  std::vector<Tensor<S>> grad;      ///< d loss / d map i, the shape of map i [N, na, H, W, 5 + nc]
  std::vector<LevelTargets<S>> targets;  ///< build_targets' entries per level
  std::vector<LevelLoss<S>> levels;      ///< per-level terms before gains and balance
  LossGains gains{};                ///< the gains applied (after train.py's scaling)

  /// True when the loss, its items and every gradient are finite. Extreme (finite) logits
  /// can make them NaN or infinite (a predicted height that underflows to 0, say):
  /// a training loop checks this before it steps.
  bool finite() const {
    if (!std::isfinite(double(loss))) return false;
    for (S v : items)
      if (!std::isfinite(double(v))) return false;
    for (const auto& g : grad)
      for (S v : g)
        if (!std::isfinite(double(v))) return false;
    return true;
  }
};

/// YOLOv5's `ComputeLoss` for a Detect head: holds the anchors and strides, computes the
/// loss of raw maps against targets with its analytic gradient. Thread-safe (const).
template <class S>
class DetectionLoss {
 public:
  /// The head's `anchors` ([nl, na, 2], w and h in grid units = pixels / stride, as in
  /// Detect.anchors), `strides` (one per level, e.g. 8, 16, 32) and the hyperparameters.
  /// Throws shape_error / config_error on inconsistent or invalid values.
  DetectionLoss(orepa::detail::identity_t<ConstTensorView<S>> anchors, std::vector<double> strides,
                LossOptions options = LossOptions())
      : anchors_(anchors.clone()), strides_(std::move(strides)), options_(std::move(options)) {
    detail::check_anchors<S>(anchors_);
    if (std::int64_t(strides_.size()) != nl())
      throw shape_error(orepa::detail::cat("DetectionLoss: ", strides_.size(), " strides for ", nl(), " anchor levels"));
    for (double s : strides_)
      if (!(s > 0) || !std::isfinite(s)) throw config_error(orepa::detail::cat("DetectionLoss: stride ", s, " must be positive"));
    const auto& o = options_;
    for (double g : {o.box(), o.obj(), o.cls()})
      if (!(g >= 0) || !std::isfinite(g))
        throw config_error(orepa::detail::cat("LossOptions: gains must be finite and >= 0, got box ", o.box(), " obj ",
                                       o.obj(), " cls ", o.cls()));
    if (!(o.anchor_t() > 1) || !std::isfinite(o.anchor_t()))
      throw config_error(orepa::detail::cat("LossOptions::anchor_t must be > 1, got ", o.anchor_t()));
    if (!(o.gr() >= 0 && o.gr() <= 1)) throw config_error(orepa::detail::cat("LossOptions::gr must be in [0, 1], got ", o.gr()));
    if (!(o.label_smoothing() >= 0 && o.label_smoothing() < 1))
      throw config_error(orepa::detail::cat("LossOptions::label_smoothing must be in [0, 1), got ", o.label_smoothing()));
    if (!(o.image_size() >= 0) || !std::isfinite(o.image_size()))
      throw config_error(orepa::detail::cat("LossOptions::image_size must be >= 0 (0: from the maps), got ", o.image_size()));
    balance_ = level_balance(o, nl());
    for (double b : balance_)
      if (!(b >= 0) || !std::isfinite(b)) throw config_error(orepa::detail::cat("LossOptions::balance: value ", b, " must be >= 0"));
  }

  /// Number of levels.
  std::int64_t nl() const { return anchors_.size(0); }
  /// Anchors per level.
  std::int64_t na() const { return anchors_.size(1); }
  /// The anchors [nl, na, 2] (grid units).
  const Tensor<S>& anchors() const { return anchors_; }
  /// The strides, one per level.
  const std::vector<double>& strides() const { return strides_; }
  /// The hyperparameters.
  const LossOptions& options() const { return options_; }

  /// The loss of raw maps `maps` (one [N, na, H_i, W_i, 5 + nc] per level, before the
  /// sigmoid, in level order) against `targets` ([n, 6] rows (image, class, cx, cy, w, h),
  /// normalised; n may be 0) and its gradient. Throws shape_error for maps that do not fit
  /// the head (count, rank, anchors, channels, batch, H_i * stride_i differing between
  /// levels), config_error for a target outside the batch, a class >= nc or a box outside
  /// [0, 1], and state_error for a non-finite value in the maps or targets.
  LossResult<S> operator()(const std::vector<ConstTensorView<S>>& maps,
                           orepa::detail::identity_t<ConstTensorView<S>> targets) const {
    const std::int64_t nl = this->nl(), na = this->na();
    if (std::int64_t(maps.size()) != nl)
      throw shape_error(orepa::detail::cat("DetectionLoss: ", maps.size(), " raw maps for a head of ", nl, " levels"));
    const auto& m0 = maps[0];
    if (m0.dim() != 5 || m0.size(4) < 6)
      throw shape_error(orepa::detail::cat("raw map 0: expected shape [N, ", na, ", H, W, 5 + nc] with nc >= 1, got ",
                                    shape_str(m0.sizes())));
    const std::int64_t bs = m0.size(0), no = m0.size(4), nc = no - 5;
    if (bs < 1) throw shape_error(orepa::detail::cat("raw map 0: the batch is empty, shape ", shape_str(m0.sizes())));
    std::vector<GridSize> grids;
    for (std::int64_t i = 0; i < nl; ++i) {
      const auto& m = maps[std::size_t(i)];
      const std::string name = orepa::detail::cat("raw map ", i);
      if (m.dim() != 5 || m.size(0) != bs || m.size(1) != na || m.size(4) != no || m.size(2) < 1 || m.size(3) < 1)
        throw shape_error(orepa::detail::cat(name, ": expected shape [", bs, ", ", na, ", H, W, ", no, "], got ",
                                      shape_str(m.sizes())));
      const double s = strides_[std::size_t(i)], s0 = strides_[0];
      if (double(m.size(2)) * s != double(m0.size(2)) * s0 || double(m.size(3)) * s != double(m0.size(3)) * s0)
        throw shape_error(orepa::detail::cat(name, ": grid ", m.size(2), " x ", m.size(3), " at stride ", s,
                                      " does not cover the image of map 0 (", m0.size(2), " x ", m0.size(3),
                                      " at stride ", s0, "); are the maps in level order?"));
      if (!orepa::detail::all_finite(m.data(), m.numel()))
        for (std::int64_t j = 0; j < m.numel(); ++j)
          if (!std::isfinite(double(m[j])))
            throw state_error(orepa::detail::cat(
                name, ": value ", double(m[j]), " at flat index ", j, " (cell [", j / no / m.size(3) / m.size(2) / na,
                ", ", j / no / m.size(3) / m.size(2) % na, ", ", j / no / m.size(3) % m.size(2), ", ", j / no % m.size(3),
                "], channel ", j % no, ")"));
      grids.push_back({m.size(2), m.size(3)});
    }
    detail::check_target_rows(targets);
    for (std::int64_t t = 0; targets.numel() != 0 && t < targets.size(0); ++t) {
      const double b = double(targets[t * 6]), c = double(targets[t * 6 + 1]);
      if (b >= double(bs)) throw config_error(orepa::detail::cat("targets row ", t, ": image ", b, " is outside the batch of ", bs));
      if (c >= double(nc)) throw config_error(orepa::detail::cat("targets row ", t, ": class ", c, " >= nc = ", nc));
    }

    const double image_size = options_.image_size() > 0
                                  ? options_.image_size()
                                  : std::max(double(m0.size(2)), double(m0.size(3))) * strides_[0];
    LossResult<S> r;
    r.gains = effective_gains(options_, nl, nc, image_size);
    r.targets = build_targets<S>(targets, anchors_, grids, options_.anchor_t());
    const S cp = S(1.0 - 0.5 * options_.label_smoothing()), cn = S(0.5 * options_.label_smoothing());
    const S gr = S(options_.gr());
    double lbox = 0, lobj = 0, lcls = 0;
    for (std::int64_t i = 0; i < nl; ++i) {
      const auto& map = maps[std::size_t(i)];
      const auto& entries = r.targets[std::size_t(i)];
      const std::int64_t H = map.size(2), W = map.size(3), cells = bs * na * H * W;
      const std::int64_t n = std::int64_t(entries.size());
      Tensor<S> grad(map.sizes());
      std::vector<S> tobj(static_cast<std::size_t>(cells), S(0));
      LevelLoss<S> level;
      double box_sum = 0, cls_sum = 0;
      // d loss / d (1 - CIoU) and d loss / d class BCE of one entry.
      const S box_coef = n ? S(double(bs) * r.gains.box / double(n)) : S(0);
      const S cls_coef = n ? S(double(bs) * r.gains.cls / (double(n) * double(nc))) : S(0);
      for (const auto& e : entries) {
        const std::int64_t cell = ((e.image * na + e.anchor) * H + e.gj) * W + e.gi;
        const S* p = map.data() + cell * no;
        S* g = grad.data() + cell * no;
        S sig[4];
        for (int c = 0; c < 4; ++c) sig[c] = S(1) / (S(1) + std::exp(-p[c]));
        const std::array<S, 4> pbox = {sig[0] * S(2) - S(0.5), sig[1] * S(2) - S(0.5),
                                       (sig[2] * S(2)) * (sig[2] * S(2)) * e.anchor_wh[0],
                                       (sig[3] * S(2)) * (sig[3] * S(2)) * e.anchor_wh[1]};
        const Ciou<S> ciou = bbox_ciou(pbox, e.box);
        box_sum += double(S(1) - ciou.ciou);
        level.pbox.push_back(pbox);
        level.ciou.push_back(ciou.ciou);
        tobj[std::size_t(cell)] = (S(1) - gr) + gr * std::max(ciou.ciou, S(0));
        // d pbox / d logit: 2 s (1 - s) for xy, 8 s^2 (1 - s) anchor for wh.
        for (int c = 0; c < 2; ++c) g[c] -= box_coef * ciou.grad[c] * S(2) * sig[c] * (S(1) - sig[c]);
        for (int c = 2; c < 4; ++c)
          g[c] -= box_coef * ciou.grad[c] * S(8) * sig[c] * sig[c] * (S(1) - sig[c]) * e.anchor_wh[c - 2];
        if (nc > 1)
          for (std::int64_t c = 0; c < nc; ++c) {
            const S x = p[5 + c], t = c == e.cls ? cp : cn;
            cls_sum += double(detail::bce_with_logits(x, t));
            g[5 + c] += cls_coef * (S(1) / (S(1) + std::exp(-x)) - t);
          }
      }
      if (n) {
        level.box = S(box_sum / double(n));
        if (nc > 1) level.cls = S(cls_sum / (double(n) * double(nc)));
      }
      double obj_sum = 0;
      const S obj_coef = S(double(bs) * r.gains.obj * balance_[std::size_t(i)] / double(cells));
      for (std::int64_t cell = 0; cell < cells; ++cell) {
        const S x = map[cell * no + 4], t = tobj[std::size_t(cell)];
        obj_sum += double(detail::bce_with_logits(x, t));
        grad[cell * no + 4] = obj_coef * (S(1) / (S(1) + std::exp(-x)) - t);
      }
      level.obj = S(obj_sum / double(cells));
      lbox += double(level.box);
      lobj += double(level.obj) * balance_[std::size_t(i)];
      lcls += double(level.cls);
      r.grad.push_back(std::move(grad));
      r.levels.push_back(std::move(level));
    }
    r.items = {S(lbox * r.gains.box), S(lobj * r.gains.obj), S(lcls * r.gains.cls)};
    r.loss = S((double(r.items[0]) + double(r.items[1]) + double(r.items[2])) * double(bs));
    return r;
  }

 private:
  Tensor<S> anchors_;
  std::vector<double> strides_;
  LossOptions options_;
  std::vector<double> balance_;
};

/// One-call form of DetectionLoss: the loss of `maps` against `targets` for a head with
/// `anchors` ([nl, na, 2], grid units) and `strides`. S is deduced from `maps`
/// (`compute_loss<float>({p0, p1, p2}, ...)` when passing a brace list).
template <class S>
LossResult<S> compute_loss(const std::vector<ConstTensorView<S>>& maps, orepa::detail::identity_t<ConstTensorView<S>> targets,
                           orepa::detail::identity_t<ConstTensorView<S>> anchors, std::vector<double> strides,
                           const LossOptions& options = LossOptions()) {
  return DetectionLoss<S>(anchors, std::move(strides), options)(maps, targets);
}

}  // namespace orepa::yolo
