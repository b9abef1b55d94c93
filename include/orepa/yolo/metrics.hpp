#pragma once
/// @file metrics.hpp (yolo)
/// YOLOv5's validation metrics (val.py and utils/metrics.py of v7.0): precision, recall,
/// mAP@0.5 and mAP@0.5:0.95 with 101-point interpolated AP.
///   - `process_batch`: which detections of an image are true positives at each IoU
///     threshold (0.5, 0.55, ..., 0.95). Per threshold a detection takes its best-IoU label
///     of its class; a label claimed by several detections goes to the one with the lowest
///     index (YOLOv5's np.unique order), i.e. the most confident when the detections come
///     from NMS, not the one with the highest IoU;
///   - `compute_ap`: precision envelope and 101-point interpolation (trapezoid rule);
///   - `ap_per_class`: per labelled class, AP at each threshold, and precision, recall and
///     F1 at the confidence maximising the class-mean F1 (smoothed over 1000 points);
///   - `DetectionMetrics`: the accumulator val.py's loop is: add each image's detections
///     and labels, then compute() the summary (mp, mr, map50, map) and per-class numbers.
/// Detections whose confidences tie are ranked in input order (stable sorts); YOLOv5 uses
/// unstable sorts there, so only ties can differ.
///
/// Usage:
/// @code
///   using namespace orepa;
///   yolo::DetectionMetrics metrics(nc);
///   for (each validation image) {
///     auto dets = yolo::non_max_suppression<float>(pred, yolo::NmsOptions::validation());
///     // labels [m, 5]: class, x1, y1, x2, y2 in the same pixel space as the detections
///     metrics.add<float>(dets[0].rows, labels);
///   }
///   yolo::MetricsResult r = metrics.compute();
///   std::printf("P %.3f R %.3f mAP@0.5 %.3f mAP@0.5:0.95 %.3f\n", r.mp, r.mr, r.map50, r.map);
/// @endcode

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/yolo/nms.hpp"

namespace orepa::yolo {

/// val.py's IoU thresholds: 0.5, 0.55, ..., 0.95.
inline std::vector<double> coco_iou_thresholds() {
  std::vector<double> t(10);
  for (int i = 0; i < 10; ++i) t[std::size_t(i)] = 0.5 + 0.05 * i;
  return t;
}

/// True-positive flags of detections at several IoU thresholds: flag(d, t) for detection
/// d and threshold t.
struct MatchTable {
  std::int64_t detections = 0;       ///< rows
  std::int64_t thresholds = 0;       ///< columns
  std::vector<std::uint8_t> flags;   ///< row-major detections x thresholds, 0 or 1
  /// Whether detection `d` is a true positive at threshold `t`.
  bool operator()(std::int64_t d, std::int64_t t) const { return flags[std::size_t(d * thresholds + t)] != 0; }
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// numpy.interp(x, xp, fp) for increasing xp (repeats allowed): outside the range the end
// values (or `left` below), at an xp value the fp of its last occurrence, in between the
// line through the neighbours, computed as numpy does: slope * (x - xp[j]) + fp[j].
inline double np_interp(double x, const std::vector<double>& xp, const std::vector<double>& fp, double left) {
  const std::size_t n = xp.size();
  if (x < xp[0]) return left;
  if (x > xp[n - 1]) return fp[n - 1];
  const std::size_t j = std::size_t(std::upper_bound(xp.begin(), xp.end(), x) - xp.begin()) - 1;  // last xp[j] <= x
  if (j == n - 1 || xp[j] == x) return fp[j];
  const double slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
  return slope * (x - xp[j]) + fp[j];
}
// numpy.linspace(0, 1, n).
inline std::vector<double> linspace01(std::size_t n) {
  std::vector<double> v(n);
  const double step = 1.0 / double(n - 1);
  for (std::size_t i = 0; i < n; ++i) v[i] = double(i) * step;
  v[n - 1] = 1.0;
  return v;
}
}  // namespace detail
/// \endcond

/// YOLOv5's `process_batch` for one image: `detections` [n, >= 6] (x1, y1, x2, y2, conf,
/// class) and `labels` [m, 5] (class, x1, y1, x2, y2) in the same coordinates; returns
/// the true-positive table at `iou_thresholds`. At each threshold the (label, detection)
/// pairs of equal class with IoU >= the threshold are ranked by IoU; each detection keeps
/// its best pair (ties: lower label), then each label keeps, among the detections left
/// pointing at it, the one with the lowest index. IoU from box_iou in S.
template <class S>
MatchTable process_batch(ConstTensorView<S> detections, orepa::detail::identity_t<ConstTensorView<S>> labels,
                         const std::vector<double>& iou_thresholds = coco_iou_thresholds()) {
  detail::check_boxes(detections, 6, "process_batch: detections");
  detail::check_boxes(labels, 5, "process_batch: labels");
  if (labels.dim() == 2 && labels.size(1) != 5)
    throw shape_error(orepa::detail::cat("process_batch: labels: expected shape [m, 5] (class, x1, y1, x2, y2), got ",
                                         shape_str(labels.sizes())));
  const std::int64_t n = detail::box_count(detections), m = detail::box_count(labels), T = std::int64_t(iou_thresholds.size());
  const std::int64_t cd = n ? detections.size(1) : 0;
  MatchTable table{n, T, std::vector<std::uint8_t>(std::size_t(n * T), 0)};
  if (n == 0 || m == 0) return table;
  Tensor<S> label_boxes({m, 4}), det_boxes({n, 4});
  for (std::int64_t i = 0; i < m; ++i)
    for (int k = 0; k < 4; ++k) label_boxes(i, k) = labels[i * 5 + 1 + k];
  for (std::int64_t j = 0; j < n; ++j)
    for (int k = 0; k < 4; ++k) det_boxes(j, k) = detections[j * cd + k];
  const Tensor<S> iou = box_iou<S>(label_boxes, det_boxes);
  for (std::int64_t t = 0; t < T; ++t) {
    const S thr = S(iou_thresholds[std::size_t(t)]);
    std::vector<std::int64_t> best(static_cast<std::size_t>(n), -1);  // each detection's best label
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t i = 0; i < m; ++i)
        if (labels[i * 5] == detections[j * cd + 5] && iou(i, j) >= thr &&
            (best[std::size_t(j)] < 0 || iou(i, j) > iou(best[std::size_t(j)], j)))
          best[std::size_t(j)] = i;
    std::vector<char> taken(static_cast<std::size_t>(m), 0);
    for (std::int64_t j = 0; j < n; ++j) {  // lowest detection index first
      const std::int64_t i = best[std::size_t(j)];
      if (i >= 0 && !taken[std::size_t(i)]) {
        taken[std::size_t(i)] = 1;
        table.flags[std::size_t(j * T + t)] = 1;
      }
    }
  }
  return table;
}

/// YOLOv5's `compute_ap`: AP of one recall / precision curve (detections by descending
/// confidence): sentinels (recall 0, precision 1) and (recall 1, precision 0), the
/// precision envelope (running maximum from the right), then the trapezoid integral of
/// its linear interpolation at 101 recall points 0, 0.01, ..., 1.
inline double compute_ap(const std::vector<double>& recall, const std::vector<double>& precision) {
  if (recall.size() != precision.size())
    throw shape_error(orepa::detail::cat("compute_ap: ", recall.size(), " recall and ", precision.size(), " precision values"));
  std::vector<double> mrec = {0.0}, mpre = {1.0};
  mrec.insert(mrec.end(), recall.begin(), recall.end());
  mpre.insert(mpre.end(), precision.begin(), precision.end());
  mrec.push_back(1.0);
  mpre.push_back(0.0);
  for (std::size_t i = mpre.size() - 1; i-- > 0;) mpre[i] = std::max(mpre[i], mpre[i + 1]);
  const std::vector<double> x = detail::linspace01(101);
  double ap = 0, prev = detail::np_interp(x[0], mrec, mpre, mpre[0]);
  for (std::size_t i = 1; i < x.size(); ++i) {
    const double y = detail::np_interp(x[i], mrec, mpre, mpre[0]);
    ap += (x[i] - x[i - 1]) * (y + prev) / 2.0;
    prev = y;
  }
  return ap;
}

/// YOLOv5's `ap_per_class` results: one entry per class that has labels, ascending.
struct ClassMetrics {
  std::vector<std::int64_t> classes;     ///< the classes with labels (ap_class)
  std::vector<std::int64_t> labels;      ///< labels per class (nt)
  std::vector<double> tp;                ///< true positives at the chosen confidence, round(r * nt)
  std::vector<double> fp;                ///< false positives there, round(tp / p - tp)
  std::vector<double> p;                 ///< precision at the chosen confidence
  std::vector<double> r;                 ///< recall at the chosen confidence
  std::vector<double> f1;                ///< F1 at the chosen confidence
  std::vector<std::vector<double>> ap;   ///< AP per class and IoU threshold
  std::vector<double> f1_mean;           ///< class-mean F1 on 1000 confidences 0..1, before smoothing
  std::int64_t best_index = 0;           ///< argmax of the smoothed f1_mean (the chosen confidence = best_index / 999)

  /// AP at the first threshold (IoU 0.5) of class entry `k`.
  double ap50(std::size_t k) const { return ap[k].empty() ? 0.0 : ap[k][0]; }
  /// Mean AP over the thresholds (0.5:0.95) of class entry `k`.
  double ap50_95(std::size_t k) const {
    return ap[k].empty() ? 0.0 : std::accumulate(ap[k].begin(), ap[k].end(), 0.0) / double(ap[k].size());
  }
};

/// YOLOv5's `ap_per_class`: `tp` the true-positive table of all detections (rows as in
/// `conf` and `pred_cls`), `target_cls` the class of every label. Detections are ranked
/// by descending confidence (stable); per labelled class: recall = cumTP / (nt + 1e-16),
/// precision = cumTP / (cumTP + cumFP), AP per threshold by compute_ap, and recall /
/// precision interpolated at 1000 confidences 0..1 (recall 0 and precision 1 above the
/// most confident detection) for the F1 curve; the confidence is the argmax of the
/// class-mean F1 smoothed by a 101-point box filter; tp = round(r * nt), fp = round(tp /
/// (p + 1e-16) - tp) (half to even, as numpy rounds).
inline ClassMetrics ap_per_class(const MatchTable& tp, const std::vector<double>& conf,
                                 const std::vector<std::int64_t>& pred_cls, const std::vector<std::int64_t>& target_cls) {
  const std::int64_t n = tp.detections, T = tp.thresholds;
  if (std::int64_t(conf.size()) != n || std::int64_t(pred_cls.size()) != n ||
      std::int64_t(tp.flags.size()) != n * T)
    throw shape_error(orepa::detail::cat("ap_per_class: ", n, " detections in the table, ", conf.size(),
                                         " confidences, ", pred_cls.size(), " classes"));
  if (T < 1) throw shape_error("ap_per_class: the table has no IoU threshold");
  const double eps = 1e-16;
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return conf[std::size_t(a)] > conf[std::size_t(b)]; });
  std::map<std::int64_t, std::int64_t> counts;
  for (auto c : target_cls) ++counts[c];

  ClassMetrics m;
  const std::size_t K = counts.size(), P = 1000;
  const std::vector<double> px = detail::linspace01(P);
  std::vector<std::vector<double>> pc(K, std::vector<double>(P, 0.0)), rc(K, std::vector<double>(P, 0.0));
  std::size_t k = 0;
  for (const auto& [cls, nl] : counts) {
    m.classes.push_back(cls);
    m.labels.push_back(nl);
    m.ap.emplace_back(std::size_t(T), 0.0);
    std::vector<std::int64_t> rows;
    for (auto d : order)
      if (pred_cls[std::size_t(d)] == cls) rows.push_back(d);
    if (!rows.empty()) {
      // -conf ascending for numpy.interp; recall / precision at threshold 0 on that axis.
      std::vector<double> neg_conf, rec0, pre0;
      std::vector<std::vector<double>> rec(static_cast<std::size_t>(T)), pre(static_cast<std::size_t>(T));
      std::vector<double> tpc(static_cast<std::size_t>(T), 0.0), fpc(static_cast<std::size_t>(T), 0.0);
      for (auto d : rows) {
        neg_conf.push_back(-conf[std::size_t(d)]);
        for (std::int64_t t = 0; t < T; ++t) {
          (tp(d, t) ? tpc : fpc)[std::size_t(t)] += 1.0;
          rec[std::size_t(t)].push_back(tpc[std::size_t(t)] / (double(nl) + eps));
          pre[std::size_t(t)].push_back(tpc[std::size_t(t)] / (tpc[std::size_t(t)] + fpc[std::size_t(t)]));
        }
      }
      for (std::size_t i = 0; i < P; ++i) {
        rc[k][i] = detail::np_interp(-px[i], neg_conf, rec[0], 0.0);
        pc[k][i] = detail::np_interp(-px[i], neg_conf, pre[0], 1.0);
      }
      for (std::int64_t t = 0; t < T; ++t) m.ap[k][std::size_t(t)] = compute_ap(rec[std::size_t(t)], pre[std::size_t(t)]);
    }
    ++k;
  }
  // Class-mean F1, smoothed (YOLOv5's smooth(y, 0.1): 101-point box filter, ends padded
  // with the end values), argmax (first).
  m.f1_mean.assign(P, 0.0);
  for (std::size_t c = 0; c < K; ++c)
    for (std::size_t i = 0; i < P; ++i) m.f1_mean[i] += 2 * pc[c][i] * rc[c][i] / (pc[c][i] + rc[c][i] + eps);
  if (K > 0)
    for (auto& v : m.f1_mean) v /= double(K);
  const std::size_t nf = 101, half = nf / 2;
  double best = -1;
  for (std::size_t i = 0; i < P; ++i) {
    double s = 0;
    for (std::size_t q = 0; q < nf; ++q) {
      const std::size_t src = i + q < half ? 0 : std::min(i + q - half, P - 1);
      s += m.f1_mean[src] * (1.0 / double(nf));
    }
    if (s > best) best = s, m.best_index = std::int64_t(i);
  }
  for (std::size_t c = 0; c < K; ++c) {
    const double p = pc[c][std::size_t(m.best_index)], r = rc[c][std::size_t(m.best_index)];
    m.p.push_back(p);
    m.r.push_back(r);
    m.f1.push_back(2 * p * r / (p + r + eps));
    const double tpv = std::nearbyint(r * double(m.labels[c]));
    m.tp.push_back(tpv);
    m.fp.push_back(std::nearbyint(tpv / (p + eps) - tpv));
  }
  return m;
}

/// The metrics of a validation run.
struct MetricsResult {
  double mp = 0;                     ///< mean precision over the labelled classes
  double mr = 0;                     ///< mean recall
  double map50 = 0;                  ///< mean AP at IoU 0.5
  double map = 0;                    ///< mean over classes of the mean AP over IoU 0.5:0.95
  ClassMetrics per_class;            ///< ap_per_class's results (empty when nothing was detected correctly)
  std::vector<std::int64_t> labels_per_class;  ///< labels of each class 0..nc-1 (val.py's nt)
  std::int64_t images = 0;           ///< images added
  std::int64_t labels = 0;           ///< labels added
  std::int64_t detections = 0;       ///< detections added
};

/// val.py's statistics: add every image's detections and labels, then compute().
class DetectionMetrics {
 public:
  /// A metric over `nc` classes at `iou_thresholds` (val.py's 0.5:0.05:0.95 by default).
  explicit DetectionMetrics(std::int64_t nc, std::vector<double> iou_thresholds = coco_iou_thresholds())
      : nc_(nc), thresholds_(std::move(iou_thresholds)) {
    if (nc < 1) throw config_error(orepa::detail::cat("DetectionMetrics: nc must be >= 1, got ", nc));
    if (thresholds_.empty()) throw config_error("DetectionMetrics: no IoU threshold");
    for (double t : thresholds_)
      if (!(t >= 0 && t <= 1)) throw config_error(orepa::detail::cat("DetectionMetrics: IoU threshold ", t, " is outside [0, 1]"));
  }

  /// Adds one image: `detections` [n, 6] (x1, y1, x2, y2, conf, class; NMS output) and
  /// `labels` [m, 5] (class, x1, y1, x2, y2), both in the same coordinates (val.py
  /// compares them in the original image's pixels). Either may be empty. Throws
  /// shape_error for bad shapes, config_error for a class outside [0, nc) or a non-finite
  /// value; nothing is recorded then.
  template <class S>
  void add(ConstTensorView<S> detections, orepa::detail::identity_t<ConstTensorView<S>> labels) {
    detail::check_boxes(detections, 6, "DetectionMetrics::add: detections");
    detail::check_boxes(labels, 5, "DetectionMetrics::add: labels");
    const std::int64_t n = detail::box_count(detections), m = detail::box_count(labels);
    const std::int64_t cd = n ? detections.size(1) : 0;
    if (n && cd != 6) throw shape_error(orepa::detail::cat("DetectionMetrics::add: detections: expected [n, 6], got ", shape_str(detections.sizes())));
    if (m && labels.size(1) != 5) throw shape_error(orepa::detail::cat("DetectionMetrics::add: labels: expected [m, 5], got ", shape_str(labels.sizes())));
    auto check_class = [&](double c, const char* what, std::int64_t row) {
      if (!(c >= 0 && c < double(nc_)) || c != std::floor(c))
        throw config_error(orepa::detail::cat("DetectionMetrics::add: ", what, " row ", row, ": class ", c,
                                              " is not an integer in [0, ", nc_, ")"));
    };
    for (std::int64_t i = 0; i < n * cd; ++i)
      if (!std::isfinite(double(detections[i])))
        throw config_error(orepa::detail::cat("DetectionMetrics::add: detections row ", i / cd, " holds ", double(detections[i])));
    for (std::int64_t i = 0; i < m * 5; ++i)
      if (!std::isfinite(double(labels[i])))
        throw config_error(orepa::detail::cat("DetectionMetrics::add: labels row ", i / 5, " holds ", double(labels[i])));
    for (std::int64_t j = 0; j < n; ++j) check_class(double(detections[j * cd + 5]), "detections", j);
    for (std::int64_t i = 0; i < m; ++i) check_class(double(labels[i * 5]), "labels", i);

    ++images_;
    if (n == 0) {  // val.py: an image without detections contributes its labels only
      for (std::int64_t i = 0; i < m; ++i) target_cls_.push_back(std::int64_t(labels[i * 5]));
      return;
    }
    const MatchTable t = process_batch<S>(detections, labels, thresholds_);
    correct_.insert(correct_.end(), t.flags.begin(), t.flags.end());
    for (std::int64_t j = 0; j < n; ++j) {
      conf_.push_back(double(detections[j * cd + 4]));
      pred_cls_.push_back(std::int64_t(detections[j * cd + 5]));
    }
    for (std::int64_t i = 0; i < m; ++i) target_cls_.push_back(std::int64_t(labels[i * 5]));
  }
  /// Adds one image's NMS output and its labels [m, 5] (class, x1, y1, x2, y2).
  template <class S>
  void add(const Detections<S>& detections, orepa::detail::identity_t<ConstTensorView<S>> labels) {
    add<S>(detections.rows, labels);
  }

  /// The metrics of everything added: when no detection is a true positive at any
  /// threshold all are 0 (val.py skips ap_per_class then); otherwise ap_per_class's
  /// numbers and their means over the labelled classes.
  MetricsResult compute() const {
    MetricsResult r;
    r.images = images_;
    r.labels = std::int64_t(target_cls_.size());
    r.detections = std::int64_t(conf_.size());
    r.labels_per_class.assign(std::size_t(nc_), 0);
    for (auto c : target_cls_) ++r.labels_per_class[std::size_t(c)];
    if (std::find(correct_.begin(), correct_.end(), std::uint8_t(1)) == correct_.end()) return r;
    const MatchTable table{r.detections, std::int64_t(thresholds_.size()), correct_};
    r.per_class = ap_per_class(table, conf_, pred_cls_, target_cls_);
    const auto& pc = r.per_class;
    const double K = double(pc.classes.size());
    for (std::size_t k = 0; k < pc.classes.size(); ++k) {
      r.mp += pc.p[k];
      r.mr += pc.r[k];
      r.map50 += pc.ap50(k);
      r.map += pc.ap50_95(k);
    }
    r.mp /= K, r.mr /= K, r.map50 /= K, r.map /= K;
    return r;
  }

  /// Forgets everything added.
  void reset() {
    correct_.clear();
    conf_.clear();
    pred_cls_.clear();
    target_cls_.clear();
    images_ = 0;
  }
  /// Number of classes.
  std::int64_t nc() const { return nc_; }
  /// The IoU thresholds.
  const std::vector<double>& iou_thresholds() const { return thresholds_; }

 private:
  std::int64_t nc_;
  std::vector<double> thresholds_;
  std::vector<std::uint8_t> correct_;
  std::vector<double> conf_;
  std::vector<std::int64_t> pred_cls_, target_cls_;
  std::int64_t images_ = 0;
};

}  // namespace orepa::yolo
