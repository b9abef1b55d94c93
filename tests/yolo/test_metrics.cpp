// NMS and val.py's metrics (yolo/nms.hpp, yolo/metrics.hpp): the reference cases made by
// YOLOv5's own code (tests/data/yolov5_map, see its README), cases worked out by hand,
// and the bad inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "orepa/io/safetensors.hpp"
#include "orepa/yolo/metrics.hpp"
#include "orepa/yolo/nms.hpp"

using namespace orepa;
using yolo::NmsOptions;

namespace {

std::string map_data(const std::string& name) { return std::string(OREPA_TEST_DATA_DIR) + "/yolov5_map/" + name; }

// A [1, n, 5 + nc] prediction from rows (cx, cy, w, h, obj, class scores...).
Tensor<float> prediction(const std::vector<std::vector<float>>& rows) {
  const std::int64_t no = std::int64_t(rows[0].size());
  std::vector<float> v;
  for (const auto& r : rows) v.insert(v.end(), r.begin(), r.end());
  return Tensor<float>({1, std::int64_t(rows.size()), no}, v);
}

std::vector<std::int64_t> sources(const yolo::Detections<float>& d) { return d.source; }

}  // namespace

// ---------------------------------------------------------------------------------------
// NMS

TEST(YoloNms, Fixture) {
  auto in = io::SafetensorsFile::open(map_data("nms.safetensors"));
  auto want = io::SafetensorsFile::open(map_data("nms.expected.safetensors"));
  const Tensor<float> pred = in.get<float>("prediction");
  struct Run {
    const char* name;
    NmsOptions options;
  };
  const Run runs[] = {{"nms_val", NmsOptions().conf_thres(0.001).iou_thres(0.6).max_det(300)},
                      {"nms_val_multilabel", NmsOptions::validation()},
                      {"nms_detect", NmsOptions().max_det(1000)}};
  for (const auto& run : runs) {
    const auto dets = yolo::non_max_suppression<float>(pred, run.options);
    ASSERT_EQ(dets.size(), 1u);
    const auto out = want.get<double>(std::string(run.name) + ".out");
    const auto src = want.get<double>(std::string(run.name) + ".src");
    ASSERT_EQ(dets[0].size(), src.numel()) << run.name;
    double box_err = 0, conf_err = 0;
    for (std::int64_t k = 0; k < src.numel(); ++k) {
      EXPECT_EQ(dets[0].source[std::size_t(k)], std::int64_t(src[k])) << run.name << " row " << k;
      for (int c = 0; c < 4; ++c) {
        const double e = out(k, c), err = std::abs(double(dets[0].rows(k, c)) - e);
        box_err = std::max(box_err, err / std::max(1.0, std::abs(e)));
        EXPECT_LE(err, 1e-6 * std::max(1.0, std::abs(e))) << run.name << " row " << k << " column " << c;
      }
      const double cerr = std::abs(double(dets[0].rows(k, 4)) - out(k, 4));
      conf_err = std::max(conf_err, cerr);
      EXPECT_LE(cerr, 1e-7) << run.name << " row " << k << " conf";
      EXPECT_EQ(dets[0].rows(k, 5), float(out(k, 5))) << run.name << " row " << k << " class";
    }
    std::printf("  %s: %lld detections, box rel err %.2e (tol 1e-6), conf err %.2e (tol 1e-7)\n", run.name,
                (long long)src.numel(), box_err, conf_err);
  }
}

// Hand cases: A and B of one class overlap with IoU 18 * 20 / (400 + 400 - 360) = 0.818,
// C is apart; A (0.9) beats B (0.8), C stays.
TEST(YoloNms, OverlapOneClass) {
  const auto p = prediction({{50, 50, 20, 20, 0.9f, 1.0f}, {52, 50, 20, 20, 0.8f, 1.0f}, {100, 100, 20, 20, 0.7f, 1.0f}});
  const auto d = yolo::non_max_suppression<float>(p);
  ASSERT_EQ(d[0].size(), 2);
  EXPECT_EQ(sources(d[0]), (std::vector<std::int64_t>{0, 2}));
  const std::vector<float> first = {40, 40, 60, 60, 0.9f, 0};
  for (int c = 0; c < 6; ++c) EXPECT_FLOAT_EQ(d[0].rows(0, c), first[std::size_t(c)]);
  EXPECT_FLOAT_EQ(d[0].rows(1, 4), 0.7f);
}

// The same boxes with B of another class: class-aware NMS keeps both; agnostic drops B.
TEST(YoloNms, OverlapTwoClasses) {
  const auto p = prediction({{50, 50, 20, 20, 0.9f, 1.0f, 0.0f}, {52, 50, 20, 20, 0.8f, 0.0f, 1.0f},
                             {100, 100, 20, 20, 0.7f, 1.0f, 0.0f}});
  const auto aware = yolo::non_max_suppression<float>(p);
  EXPECT_EQ(sources(aware[0]), (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_EQ(aware[0].rows(1, 5), 1.0f);
  const auto agnostic = yolo::non_max_suppression<float>(p, NmsOptions().agnostic(true));
  EXPECT_EQ(sources(agnostic[0]), (std::vector<std::int64_t>{0, 2}));
  const auto only1 = yolo::non_max_suppression<float>(p, NmsOptions().classes({1}));
  EXPECT_EQ(sources(only1[0]), (std::vector<std::int64_t>{1}));
}

// Confidence is objectness * class score: obj 0.9 with class 0.2 (0.18) and obj 0.2 (not >
// 0.25) with class 1 both fall under 0.25; a batch image with no row left is empty.
TEST(YoloNms, EmptyResult) {
  const auto p = prediction({{50, 50, 20, 20, 0.9f, 0.2f}, {80, 50, 20, 20, 0.2f, 1.0f}});
  const auto d = yolo::non_max_suppression<float>(p);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].size(), 0);
  EXPECT_EQ(d[0].rows.sizes(), (Shape{0, 6}));
  EXPECT_EQ(yolo::non_max_suppression<float>(Tensor<float>({2, 0, 6})).size(), 2u);
}

// Ties: identical boxes with equal confidence keep the lower row; equal confidences keep
// row order in the output; IoU exactly at the threshold (8 / 16 = 0.5) is not suppressed.
TEST(YoloNms, Ties) {
  const auto p = prediction({{10, 10, 4, 4, 0.5f, 1.0f}, {50, 50, 4, 4, 0.5f, 1.0f}, {10, 10, 4, 4, 0.5f, 1.0f},
                             {30, 30, 4, 4, 0.9f, 1.0f}, {30, 29, 4, 2, 0.6f, 1.0f}});
  const auto d = yolo::non_max_suppression<float>(p, NmsOptions().iou_thres(0.5));
  EXPECT_EQ(sources(d[0]), (std::vector<std::int64_t>{3, 4, 0, 1}));
  const auto strict = yolo::non_max_suppression<float>(p, NmsOptions().iou_thres(0.49));
  EXPECT_EQ(sources(strict[0]), (std::vector<std::int64_t>{3, 0, 1}));
  // The plain nms on the same boxes and scores.
  const Tensor<float> boxes({3, 4}, std::vector<float>{0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 2});
  const Tensor<float> scores({3}, std::vector<float>{0.5f, 0.5f, 0.7f});
  EXPECT_EQ(yolo::nms<float>(boxes, scores, 0.5), (std::vector<std::int64_t>{2, 0}));
  // max_keep stops early with the first of the full result (max_det's early exit).
  EXPECT_EQ(yolo::nms<float>(boxes, scores, 0.5, 1), (std::vector<std::int64_t>{2}));
  EXPECT_EQ(yolo::nms<float>(boxes, scores, 0.5, 0), (std::vector<std::int64_t>{}));
  EXPECT_EQ(yolo::nms<float>(boxes, scores, 0.5, 5), (std::vector<std::int64_t>{2, 0}));
  EXPECT_EQ(sources(yolo::non_max_suppression<float>(p, NmsOptions().iou_thres(0.5).max_det(2))[0]),
            (std::vector<std::int64_t>{3, 4}));
}

// multi_label gives one row per class over the threshold (same source row); max_det keeps
// the most confident.
TEST(YoloNms, MultiLabelAndMaxDet) {
  const auto p = prediction({{50, 50, 20, 20, 0.9f, 0.8f, 0.5f}, {100, 50, 20, 20, 0.9f, 0.1f, 0.2f},
                             {150, 50, 20, 20, 0.5f, 0.0f, 0.9f}});
  const auto multi = yolo::non_max_suppression<float>(p, NmsOptions().multi_label(true));
  EXPECT_EQ(sources(multi[0]), (std::vector<std::int64_t>{0, 0, 2}));  // 0.72, 0.45, 0.45: stable order
  EXPECT_EQ(multi[0].rows(0, 5), 0.0f);
  EXPECT_EQ(multi[0].rows(1, 5), 1.0f);
  const auto single = yolo::non_max_suppression<float>(p, NmsOptions().max_det(1));
  EXPECT_EQ(sources(single[0]), (std::vector<std::int64_t>{0}));
}

TEST(YoloNms, BadInputs) {
  const auto p = prediction({{50, 50, 20, 20, 0.9f, 1.0f}});
  EXPECT_THROW(yolo::non_max_suppression<float>(Tensor<float>({1, 4, 5})), shape_error);  // no class
  EXPECT_THROW(yolo::non_max_suppression<float>(Tensor<float>({4, 6})), shape_error);
  EXPECT_THROW(yolo::non_max_suppression<float>(p, NmsOptions().conf_thres(1.5)), config_error);
  EXPECT_THROW(yolo::non_max_suppression<float>(p, NmsOptions().iou_thres(-0.1)), config_error);
  EXPECT_THROW(yolo::non_max_suppression<float>(p, NmsOptions().max_det(0)), config_error);
  Tensor<float> nan = p;
  nan[2] = NAN;
  EXPECT_THROW(yolo::non_max_suppression<float>(nan), state_error);
  EXPECT_THROW(yolo::nms<float>(Tensor<float>({2, 4}), Tensor<float>({3}), 0.5), shape_error);
  EXPECT_THROW(yolo::box_iou<float>(Tensor<float>({2, 3}), Tensor<float>({2, 4})), shape_error);
}

TEST(YoloBoxes, ConversionsAndIou) {
  const Tensor<double> xywh({2, 5}, std::vector<double>{10, 20, 4, 6, 7, 0, 0, 2, 2, 8});
  const auto xyxy = yolo::xywh2xyxy<double>(xywh);
  EXPECT_EQ(std::vector<double>(xyxy.begin(), xyxy.end()), (std::vector<double>{8, 17, 12, 23, 7, -1, -1, 1, 1, 8}));
  const auto back = yolo::xyxy2xywh<double>(xyxy);
  EXPECT_EQ(max_abs_diff(back, xywh), 0.0);
  // [0, 0, 4, 4] and [2, 0, 6, 4]: inter 8, union 24; disjoint: 0; itself: 16 / (16 + 1e-7).
  const Tensor<double> a({1, 4}, std::vector<double>{0, 0, 4, 4});
  const Tensor<double> b({3, 4}, std::vector<double>{2, 0, 6, 4, 5, 5, 6, 6, 0, 0, 4, 4});
  const auto iou = yolo::box_iou<double>(a, b);
  EXPECT_NEAR(iou(0, 0), 8.0 / 24, 1e-8);
  EXPECT_EQ(iou(0, 1), 0.0);
  EXPECT_NEAR(iou(0, 2), 16.0 / (16 + 1e-7), 1e-15);
  Tensor<double> clip({1, 4}, std::vector<double>{-3, 5, 700, 500});
  yolo::clip_boxes<double>(clip, 480, 640);
  EXPECT_EQ(std::vector<double>(clip.begin(), clip.end()), (std::vector<double>{0, 5, 640, 480}));
}

// ---------------------------------------------------------------------------------------
// Metrics

namespace {

// The fixture's rows of image `k`: detections as [n, 6] (x1, y1, x2, y2, conf, class) and
// labels as [m, 5] (class, x1, y1, x2, y2), plus the detections' fixture rows.
struct Image {
  Tensor<float> dets, labels;
  std::vector<std::int64_t> rows;
};
Image image_rows(const Tensor<float>& detections, const Tensor<float>& labels, int k) {
  Image im;
  std::vector<float> d, l;
  for (std::int64_t r = 0; r < detections.size(0); ++r)
    if (detections(r, 0) == float(k)) {
      for (int c = 1; c < 7; ++c) d.push_back(detections(r, c));
      im.rows.push_back(r);
    }
  for (std::int64_t r = 0; r < labels.size(0); ++r)
    if (labels(r, 0) == float(k))
      for (int c = 1; c < 6; ++c) l.push_back(labels(r, c));
  im.dets = Tensor<float>({std::int64_t(d.size() / 6), 6}, d);
  im.labels = Tensor<float>({std::int64_t(l.size() / 5), 5}, l);
  return im;
}

}  // namespace

TEST(YoloMetrics, Fixture) {
  auto in = io::SafetensorsFile::open(map_data("map.safetensors"));
  auto want = io::SafetensorsFile::open(map_data("map.expected.safetensors"));
  const auto detections = in.get<float>("detections"), labels = in.get<float>("labels");
  const auto correct = want.get<double>("correct");
  yolo::DetectionMetrics metrics(3);
  for (int k = 0; k < 6; ++k) {
    const Image im = image_rows(detections, labels, k);
    // box_iou and process_batch of the image.
    const auto iou_want = want.get<double>("iou.img" + std::to_string(k));
    if (im.labels.size(0) && im.dets.size(0)) {
      Tensor<float> lb({im.labels.size(0), 4}), db({im.dets.size(0), 4});
      for (std::int64_t i = 0; i < lb.size(0); ++i)
        for (int c = 0; c < 4; ++c) lb(i, c) = im.labels(i, c + 1);
      for (std::int64_t j = 0; j < db.size(0); ++j)
        for (int c = 0; c < 4; ++c) db(j, c) = im.dets(j, c);
      EXPECT_LE(max_abs_diff(yolo::box_iou<float>(lb, db), iou_want), 1e-6) << "image " << k;
    }
    const auto table = yolo::process_batch<float>(im.dets, im.labels);
    for (std::size_t j = 0; j < im.rows.size(); ++j)
      for (int t = 0; t < 10; ++t)
        EXPECT_EQ(table(std::int64_t(j), t), correct(im.rows[j], t) != 0)
            << "image " << k << " detection " << j << " threshold " << t;
    metrics.add<float>(im.dets, im.labels);
  }
  const auto r = metrics.compute();
  const auto& pc = r.per_class;
  const double tol = 1e-9;
  double worst = 0;
  auto near = [&](double a, double e, const std::string& what) {
    worst = std::max(worst, std::abs(a - e));
    EXPECT_LE(std::abs(a - e), tol) << what << ": " << a << " vs " << e;
  };
  const auto ap_class = want.get<double>("ap_class");
  ASSERT_EQ(std::int64_t(pc.classes.size()), ap_class.numel());
  const auto nt = want.get<double>("nt");
  for (std::int64_t c = 0; c < nt.numel(); ++c) EXPECT_EQ(r.labels_per_class[std::size_t(c)], std::int64_t(nt[c]));
  const auto tp = want.get<double>("tp"), fp = want.get<double>("fp"), p = want.get<double>("p"), rr = want.get<double>("r");
  const auto f1 = want.get<double>("f1"), ap = want.get<double>("ap"), ap50 = want.get<double>("ap50");
  const auto ap50_95 = want.get<double>("ap50_95");
  for (std::size_t k = 0; k < pc.classes.size(); ++k) {
    const std::int64_t i = std::int64_t(k);
    EXPECT_EQ(pc.classes[k], std::int64_t(ap_class[i]));
    EXPECT_EQ(pc.tp[k], tp[i]) << "tp of class entry " << k;
    EXPECT_EQ(pc.fp[k], fp[i]) << "fp of class entry " << k;
    near(pc.p[k], p[i], "p");
    near(pc.r[k], rr[i], "r");
    near(pc.f1[k], f1[i], "f1");
    for (int t = 0; t < 10; ++t) near(pc.ap[k][std::size_t(t)], ap(i, t), "ap[" + std::to_string(t) + "]");
    near(pc.ap50(k), ap50[i], "ap50");
    near(pc.ap50_95(k), ap50_95[i], "ap50_95");
  }
  const auto f1_mean = want.get<double>("debug.f1_mean");
  for (std::int64_t i = 0; i < f1_mean.numel(); ++i) near(pc.f1_mean[std::size_t(i)], f1_mean[i], "f1_mean");
  EXPECT_EQ(pc.best_index, std::int64_t(want.get<double>("debug.max_f1_index")[0]));
  const auto summary = want.get<double>("summary");
  near(r.mp, summary[0], "mp");
  near(r.mr, summary[1], "mr");
  near(r.map50, summary[2], "map50");
  near(r.map, summary[3], "map");
  EXPECT_EQ(r.images, 6);
  EXPECT_EQ(r.labels, 17);
  EXPECT_EQ(r.detections, 22);
  std::printf("  mp %.6f mr %.6f map50 %.6f map %.6f; worst abs error %.2e (tolerance 1e-9)\n", r.mp, r.mr, r.map50,
              r.map, worst);
}

// Perfect detections: every AP is YOLOv5's 0.995, not 1: the last of the 101 points sits
// at recall 1 where the sentinel puts precision 0, so the last trapezoid is 0.01 * 1 / 2
// short. Precision and recall are 1.
TEST(YoloMetrics, PerfectDetections) {
  yolo::DetectionMetrics m(2);
  const Tensor<float> labels({2, 5}, std::vector<float>{0, 10, 10, 50, 50, 1, 100, 100, 200, 150});
  const Tensor<float> dets({2, 6}, std::vector<float>{10, 10, 50, 50, 0.9f, 0, 100, 100, 200, 150, 0.8f, 1});
  m.add<float>(dets, labels);
  m.add<float>(dets, labels);
  const auto r = m.compute();
  EXPECT_NEAR(r.map50, 0.995, 1e-12);
  EXPECT_NEAR(r.map, 0.995, 1e-12);
  EXPECT_NEAR(r.mp, 1.0, 1e-12);
  EXPECT_NEAR(r.mr, 1.0, 1e-12);
  EXPECT_EQ(r.per_class.tp, (std::vector<double>{2, 2}));
  EXPECT_EQ(r.per_class.fp, (std::vector<double>{0, 0}));
}

// No detections (or none correct): everything is 0, as val.py reports it.
TEST(YoloMetrics, NoDetections) {
  yolo::DetectionMetrics m(2);
  const Tensor<float> labels({1, 5}, std::vector<float>{0, 10, 10, 50, 50});
  m.add<float>(Tensor<float>({0, 6}), labels);
  auto r = m.compute();
  EXPECT_EQ(r.map50, 0.0);
  EXPECT_EQ(r.map, 0.0);
  EXPECT_EQ(r.mp, 0.0);
  EXPECT_EQ(r.labels_per_class, (std::vector<std::int64_t>{1, 0}));
  // A wrong-class detection on the label: still nothing correct.
  m.add<float>(Tensor<float>({1, 6}, std::vector<float>{10, 10, 50, 50, 0.9f, 1}), labels);
  r = m.compute();
  EXPECT_EQ(r.map50, 0.0);
  EXPECT_EQ(r.detections, 1);
  m.reset();
  EXPECT_EQ(m.compute().images, 0);
}

// One class, 2 labels, 3 detections by confidence: TP, FP, TP. recall 0.5, 0.5, 1;
// precision 1, 0.5, 2/3; envelope 1 up to recall 0.5, 2/3 after, 0 at recall 1.
// 101-point trapezoid: 49 steps of 1, one (1 + 2/3) / 2, 49 of 2/3, one (2/3 + 0) / 2,
// each times 0.01: 0.49 + 1/120 + 0.98/3 + 1/300 = 497/600. Same at every IoU threshold
// (the TPs are exact boxes).
TEST(YoloMetrics, HandComputedAp) {
  yolo::DetectionMetrics m(1);
  const Tensor<float> labels({2, 5}, std::vector<float>{0, 0, 0, 10, 10, 0, 100, 100, 120, 130});
  const Tensor<float> dets({3, 6}, std::vector<float>{0, 0, 10, 10, 0.9f, 0,  //
                                                      300, 300, 310, 310, 0.8f, 0,  //
                                                      100, 100, 120, 130, 0.7f, 0});
  m.add<float>(dets, labels);
  const auto r = m.compute();
  EXPECT_NEAR(r.map50, 497.0 / 600, 1e-12);
  EXPECT_NEAR(r.map, 497.0 / 600, 1e-12);
  // compute_ap directly on the same curve.
  EXPECT_NEAR(yolo::compute_ap({0.5, 0.5, 1.0}, {1.0, 0.5, 2.0 / 3}), 497.0 / 600, 1e-12);
}

// process_batch's assignment: label [0, 0, 10, 10]; detection 0 (IoU 0.62) and detection
// 1 (IoU 0.91) both claim it; detection 0 wins where it qualifies (thresholds 0.5, 0.55,
// 0.6), detection 1 from 0.65 to 0.9, nobody at 0.95. Detection 2 (the same box, another
// class) never matches.
TEST(YoloMetrics, ProcessBatchLowestIndexWins) {
  const Tensor<float> labels({1, 5}, std::vector<float>{0, 0, 0, 10, 10});
  const Tensor<float> dets({3, 6}, std::vector<float>{0, 0, 10, 6.2f, 0.9f, 0,  //
                                                      0, 0, 10, 9.1f, 0.8f, 0,  //
                                                      0, 0, 10, 10, 0.7f, 1});
  const auto t = yolo::process_batch<float>(dets, labels);
  for (int k = 0; k < 10; ++k) {
    EXPECT_EQ(t(0, k), k <= 2) << "threshold " << k;
    EXPECT_EQ(t(1, k), k >= 3 && k <= 8) << "threshold " << k;
    EXPECT_FALSE(t(2, k));
  }
}

TEST(YoloMetrics, BadInputs) {
  EXPECT_THROW(yolo::DetectionMetrics(0), config_error);
  EXPECT_THROW(yolo::DetectionMetrics(2, {}), config_error);
  yolo::DetectionMetrics m(2);
  const Tensor<float> labels({1, 5}, std::vector<float>{0, 0, 0, 10, 10});
  EXPECT_THROW(m.add<float>(Tensor<float>({1, 6}, std::vector<float>{0, 0, 1, 1, 0.5f, 2}), labels), config_error);
  EXPECT_THROW(m.add<float>(Tensor<float>({0, 6}), Tensor<float>({1, 5}, std::vector<float>{3, 0, 0, 1, 1})), config_error);
  EXPECT_THROW(m.add<float>(Tensor<float>({1, 7}), labels), shape_error);
  EXPECT_THROW(m.add<float>(Tensor<float>({0, 6}), Tensor<float>({1, 6})), shape_error);
  EXPECT_THROW(m.add<float>(Tensor<float>({1, 6}, std::vector<float>{0, 0, NAN, 1, 0.5f, 0}), labels), config_error);
  EXPECT_EQ(m.compute().images, 0);  // nothing recorded by the failed calls
  EXPECT_THROW(yolo::compute_ap({0.5}, {1.0, 0.5}), shape_error);
}
