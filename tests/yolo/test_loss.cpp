// YOLOv5's training loss (yolo/loss.hpp): the two reference cases made by YOLOv5's own
// ComputeLoss (tests/data/yolov5_loss, see its README), cases computed by hand from the
// formulas, finite differences of the gradient against an independent loss written here,
// and the bad inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "orepa/core/random.hpp"
#include "orepa/io/safetensors.hpp"
#include "orepa/yolo/loss.hpp"

using namespace orepa;
using yolo::LossOptions;

namespace {

const double kPi = 3.14159265358979323846;

std::string loss_data(const std::string& name) { return std::string(OREPA_TEST_DATA_DIR) + "/yolov5_loss/" + name; }

// max |a - e| and the fixture's scale max(1, max |e|) or max |e|.
template <class A>
double max_err(const Tensor<A>& a, const Tensor<double>& e) {
  EXPECT_EQ(a.sizes(), e.sizes());
  if (a.sizes() != e.sizes()) return INFINITY;
  return max_abs_diff(a, e);
}
double max_mag(const Tensor<double>& e) {
  double m = 0;
  for (double v : e) m = std::max(m, std::abs(v));
  return m;
}

struct Worst {
  double loss = 0, grad = 0;
};

// One fixture case in precision S against the reference run `prefix` ("f64." or "f32.").
template <class S>
Worst check_case(const std::string& name, const std::string& prefix, double tol) {
  auto in = io::SafetensorsFile::open(loss_data(name + ".safetensors"));
  auto want = io::SafetensorsFile::open(loss_data(name + ".expected.safetensors"));
  std::vector<Tensor<S>> maps;
  for (int i = 0; i < 3; ++i) maps.push_back(in.get<S>("p." + std::to_string(i)));
  const Tensor<S> stride = in.get<S>("stride");
  yolo::DetectionLoss<S> loss(in.get<S>("anchors"), {double(stride[0]), double(stride[1]), double(stride[2])});
  const auto r = loss({maps[0], maps[1], maps[2]}, in.get<S>("targets"));
  EXPECT_TRUE(r.finite());

  Worst w;
  const double e_loss = want.get<double>(prefix + "loss")[0];
  w.loss = std::abs(double(r.loss) - e_loss) / std::max(1.0, std::abs(e_loss));
  EXPECT_LE(std::abs(double(r.loss) - e_loss), tol * std::max(1.0, std::abs(e_loss))) << name << " " << prefix << "loss";
  const auto items = want.get<double>(prefix + "loss_items");
  for (int k = 0; k < 3; ++k) {
    const double err = std::abs(double(r.items[std::size_t(k)]) - items[k]);
    w.loss = std::max(w.loss, err / std::max(1.0, std::abs(items[k])));
    EXPECT_LE(err, tol * std::max(1.0, std::abs(items[k]))) << name << " " << prefix << "loss_items[" << k << "]";
  }
  for (int i = 0; i < 3; ++i) {
    const auto e = want.get<double>(prefix + "grad.p." + std::to_string(i));
    const double err = max_err(r.grad[std::size_t(i)], e), scale = max_mag(e);
    w.grad = std::max(w.grad, err / scale);
    EXPECT_LE(err, tol * scale) << name << " " << prefix << "grad.p." << i;
  }
  return w;
}

}  // namespace

TEST(YoloLoss, FixturesFloat64) {
  for (const char* name : {"case_a", "case_b"}) {
    const Worst w = check_case<double>(name, "f64.", 1e-10);
    std::printf("  %s float64: loss rel err %.2e, grad err / max|grad| %.2e (tolerance 1e-10)\n", name, w.loss, w.grad);
  }
}

TEST(YoloLoss, FixturesFloat32) {
  for (const char* name : {"case_a", "case_b"}) {
    const Worst w = check_case<float>(name, "f32.", 1e-5);
    const Worst w64 = check_case<float>(name, "f64.", 1e-5);
    std::printf("  %s float32 vs f32: loss %.2e grad %.2e; vs f64: loss %.2e grad %.2e (tolerance 1e-5)\n", name,
                w.loss, w.grad, w64.loss, w64.grad);
  }
}

// build_targets' entries (exact) and the per-level debugging terms of the float64 run.
TEST(YoloLoss, FixtureTargetsAndLevelTerms) {
  for (const std::string name : {"case_a", "case_b"}) {
    auto in = io::SafetensorsFile::open(loss_data(name + ".safetensors"));
    auto want = io::SafetensorsFile::open(loss_data(name + ".expected.safetensors"));
    std::vector<Tensor<double>> maps;
    for (int i = 0; i < 3; ++i) maps.push_back(in.get<double>("p." + std::to_string(i)));
    const auto r = yolo::compute_loss<double>({maps[0], maps[1], maps[2]}, in.get<double>("targets"),
                                              in.get<double>("anchors"), {8, 16, 32});
    for (int i = 0; i < 3; ++i) {
      const std::string lv = std::to_string(i);
      const auto& entries = r.targets[std::size_t(i)];
      const auto tcls = want.get<double>("targets." + lv + ".tcls"), idx = want.get<double>("targets." + lv + ".indices");
      const auto tbox = want.get<double>("targets." + lv + ".tbox"), anch = want.get<double>("targets." + lv + ".anch");
      const std::int64_t n = tcls.numel();
      ASSERT_EQ(std::int64_t(entries.size()), n) << name << " level " << i;
      for (std::int64_t k = 0; k < n; ++k) {
        const auto& e = entries[std::size_t(k)];
        EXPECT_EQ(e.cls, std::int64_t(tcls[k])) << name << " level " << i << " entry " << k;
        EXPECT_EQ(e.image, std::int64_t(idx[0 * n + k])) << name << " level " << i << " entry " << k;
        EXPECT_EQ(e.anchor, std::int64_t(idx[1 * n + k])) << name << " level " << i << " entry " << k;
        EXPECT_EQ(e.gj, std::int64_t(idx[2 * n + k])) << name << " level " << i << " entry " << k;
        EXPECT_EQ(e.gi, std::int64_t(idx[3 * n + k])) << name << " level " << i << " entry " << k;
        for (int c = 0; c < 4; ++c) EXPECT_NEAR(e.box[std::size_t(c)], tbox[k * 4 + c], 1e-6) << name << " tbox " << k;
        for (int c = 0; c < 2; ++c) EXPECT_NEAR(e.anchor_wh[std::size_t(c)], anch[k * 2 + c], 1e-6) << name << " anch " << k;
      }
      const auto pbox = want.get<double>("debug." + lv + ".pbox"), iou = want.get<double>("debug." + lv + ".iou");
      const auto& level = r.levels[std::size_t(i)];
      for (std::int64_t k = 0; k < n; ++k) {
        for (int c = 0; c < 4; ++c) EXPECT_NEAR(level.pbox[std::size_t(k)][std::size_t(c)], pbox[k * 4 + c], 1e-12);
        EXPECT_NEAR(level.ciou[std::size_t(k)], iou[k], 1e-12) << name << " level " << i << " CIoU " << k;
      }
      EXPECT_NEAR(level.box, want.get<double>("debug." + lv + ".lbox")[0], 1e-12) << name << " lbox " << i;
      EXPECT_NEAR(level.obj, want.get<double>("debug." + lv + ".lobj")[0], 1e-12) << name << " lobj " << i;
      EXPECT_NEAR(level.cls, want.get<double>("debug." + lv + ".lcls")[0], 1e-12) << name << " lcls " << i;
    }
    // The gains the loss applied are train.py's at imgsz 256, nc 3, nl 3 (CASE.json hyp_used).
    EXPECT_NEAR(r.gains.box, 0.05, 1e-15);
    EXPECT_NEAR(r.gains.obj, 0.16, 1e-15);
    EXPECT_NEAR(r.gains.cls, 0.01875, 1e-15);
  }
}

// One level, one anchor, a 1 x 1 grid (32-pixel image): the target has no neighbour cell
// and one entry; every number below is worked out by hand.
//   prediction logits 0 -> sigmoid 0.5: xy = 2 * 0.5 - 0.5 = 0.5, wh = (2 * 0.5)^2 * anchor
//   = (1, 0.5); target (0.5, 0.5, 0.5, 0.25): same centre (rho = 0), same aspect (v = 0),
//   inside the prediction: IoU = 0.125 / 0.5 = 0.25 = CIoU.
//   gains: box 0.05 * 3 = 0.15, obj 1 * (32 / 640)^2 * 3 = 0.0075, balance 4 -> 0.03.
//   loss = 0.15 * (1 - 0.25) + 0.03 * BCE(0, 0.25) = 0.1125 + 0.03 log 2.
//   d/d obj logit = 0.03 * (0.5 - 0.25) = 0.0075; d/d x, y = 0 (a shift keeps the target
//   inside, rho' = 0); d IoU / d w = -inter h / union^2 = -0.25, d w / d logit = 8 s^2 (1 - s)
//   anchor_w = 1, so d/d w logit = -0.15 * -0.25 = 0.0375; d IoU / d h = -0.5, d h / d logit
//   = 0.5: also 0.0375.
TEST(YoloLoss, HandComputedOneCell) {
  const Tensor<double> anchors({1, 1, 2}, std::vector<double>{1.0, 0.5});
  Tensor<double> map({1, 1, 1, 1, 6});
  const Tensor<double> targets({1, 6}, std::vector<double>{0, 0, 0.5, 0.5, 0.5, 0.25});
  const auto r = yolo::compute_loss<double>({map}, targets, anchors, {32});
  ASSERT_EQ(r.targets[0].size(), 1u);
  EXPECT_EQ(r.targets[0][0].gi, 0);
  EXPECT_NEAR(r.levels[0].ciou[0], 0.25, 1e-6);
  EXPECT_NEAR(r.items[0], 0.1125, 1e-7);
  EXPECT_NEAR(r.items[1], 0.03 * std::log(2.0), 1e-12);
  EXPECT_EQ(r.items[2], 0.0);  // nc == 1: no class loss
  EXPECT_NEAR(r.loss, 0.1125 + 0.03 * std::log(2.0), 1e-7);
  const auto& g = r.grad[0];
  EXPECT_NEAR(g[0], 0.0, 1e-9);
  EXPECT_NEAR(g[1], 0.0, 1e-9);
  EXPECT_NEAR(g[2], 0.0375, 1e-7);
  EXPECT_NEAR(g[3], 0.0375, 1e-7);
  EXPECT_NEAR(g[4], 0.0075, 1e-7);
  EXPECT_EQ(g[5], 0.0);  // nc == 1: the class logit gets nothing
}

// The same cell with 3 classes, target class 1, class logits 0: class BCE = log 2 each;
// cls gain 0.5 * 3 / 80 * 3 = 0.05625, d/d class logit = 0.05625 / 3 * (0.5 - t); the
// batch of 2 doubles the loss and the gradient, the empty second image adds only
// objectness BCE(0, 0) = log 2 (obj mean over both cells: (log 2 + log 2) / 2).
TEST(YoloLoss, HandComputedClassesAndBatch) {
  const Tensor<double> anchors({1, 1, 2}, std::vector<double>{1.0, 0.5});
  Tensor<double> map({2, 1, 1, 1, 8});
  const Tensor<double> targets({1, 6}, std::vector<double>{0, 1, 0.5, 0.5, 0.5, 0.25});
  const auto r = yolo::compute_loss<double>({map}, targets, anchors, {32});
  const double obj = 0.03 * std::log(2.0), cls = 0.05625 * std::log(2.0);
  EXPECT_NEAR(r.items[0], 0.1125, 1e-7);
  EXPECT_NEAR(r.items[1], obj, 1e-12);
  EXPECT_NEAR(r.items[2], cls, 1e-12);
  EXPECT_NEAR(r.loss, 2 * (0.1125 + obj + cls), 2e-7);
  const auto& g = r.grad[0];
  EXPECT_NEAR(g[5], 2 * 0.01875 * 0.5, 1e-12);
  EXPECT_NEAR(g[6], 2 * 0.01875 * -0.5, 1e-12);
  EXPECT_NEAR(g[7], 2 * 0.01875 * 0.5, 1e-12);
  EXPECT_NEAR(g[4], 2 * 0.03 * 0.25 / 2, 1e-8);      // image 0: target CIoU 0.25, mean over 2 cells
  EXPECT_NEAR(g[8 + 4], 2 * 0.03 * 0.5 / 2, 1e-12);  // image 1: no target
  for (int c = 0; c < 8; ++c) {
    if (c != 4) {
      EXPECT_EQ(g[8 + c], 0.0) << "image 1 channel " << c;
    }
  }
}

// build_targets on a 4 x 4 grid with two anchors, worked out by hand:
//   target 0 (class 2): centre (1.25, 2.75) cells, size (1, 2): ratios to anchor 0 (1, 1)
//     are 1 and 2, to anchor 1 (4, 1) 4 (not < 4): only anchor 0. x fraction 0.25 and x >
//     1: x - 1 neighbour; x from the right 2.75 (fraction 0.75): no x + 1; y fraction 0.75:
//     no y - 1; y from the bottom 1.25 (fraction 0.25): y + 1 neighbour.
//   target 1 (class 0): centre (3, 0.5), size (3, 1.5): anchor 0 ratio 3 (kept), anchor 1
//     ratios 4/3 and 1.5 (kept). x is an integer (fraction 0): x - 1; from the right 1
//     (not > 1): no x + 1; y 0.5 (not > 1): no y - 1; from the bottom 3.5 (fraction 0.5,
//     not < 0.5): no y + 1.
//   target 2 (class 1): size (0.1, 4): ratio 10 to anchor 0 and 40 to anchor 1: dropped.
//   target 3 (class 1): centre (4, 4) exactly at the corner (cx = cy = 1): cell 4 is
//     clamped to 3 and the box offset is taken from the clamped cell (1, 1); size (1, 1)
//     matches anchor 0 only (anchor 1: 4). x, y > 1 with fraction 0: x - 1 and y - 1.
//   Order: own cells anchor-major (a0: t0, t1, t3; a1: t1), then the x - 1 group (a0: t0,
//   t1, t3; a1: t1), then y - 1 (a0: t3), then y + 1 (a0: t0).
TEST(YoloLoss, BuildTargetsByHand) {
  const Tensor<double> anchors({1, 2, 2}, std::vector<double>{1, 1, 4, 1});
  const Tensor<double> targets({4, 6}, std::vector<double>{0, 2, 1.25 / 4, 2.75 / 4, 0.25, 0.5,   //
                                                           1, 0, 0.75, 0.125, 0.75, 0.375,        //
                                                           1, 1, 0.5, 0.5, 0.025, 1.0,            //
                                                           0, 1, 1.0, 1.0, 0.25, 0.25});
  const auto levels = yolo::build_targets<double>(targets, anchors, {{4, 4}}, 4.0);
  struct Want {
    std::int64_t image, anchor, gj, gi, cls;
    double bx, by;
  };
  const std::vector<Want> want = {
      {0, 0, 2, 1, 2, 0.25, 0.75}, {1, 0, 0, 3, 0, 0.0, 0.5}, {0, 0, 3, 3, 1, 1.0, 1.0},  // own, a0
      {1, 1, 0, 3, 0, 0.0, 0.5},                                                          // own, a1
      {0, 0, 2, 0, 2, 1.25, 0.75}, {1, 0, 0, 2, 0, 1.0, 0.5}, {0, 0, 3, 3, 1, 1.0, 1.0},  // x - 1, a0
      {1, 1, 0, 2, 0, 1.0, 0.5},                                                          // x - 1, a1
      {0, 0, 3, 3, 1, 1.0, 1.0},                                                          // y - 1, a0
      {0, 0, 3, 1, 2, 0.25, -0.25},                                                       // y + 1, a0
  };
  ASSERT_EQ(levels.size(), 1u);
  ASSERT_EQ(levels[0].size(), want.size());
  for (std::size_t k = 0; k < want.size(); ++k) {
    const auto& e = levels[0][k];
    const auto& w = want[k];
    EXPECT_EQ(e.image, w.image) << "entry " << k;
    EXPECT_EQ(e.anchor, w.anchor) << "entry " << k;
    EXPECT_EQ(e.gj, w.gj) << "entry " << k;
    EXPECT_EQ(e.gi, w.gi) << "entry " << k;
    EXPECT_EQ(e.cls, w.cls) << "entry " << k;
    EXPECT_EQ(e.box[0], w.bx) << "entry " << k;
    EXPECT_EQ(e.box[1], w.by) << "entry " << k;
  }
}

// Targets matching no anchor and no targets at all: only objectness, against 0 everywhere.
TEST(YoloLoss, NoMatchesAndNoTargets) {
  Rng rng(3);
  const Tensor<double> anchors({1, 1, 2}, std::vector<double>{1.0, 1.0});
  Tensor<double> map({2, 1, 2, 2, 7});
  for (auto& v : map) v = rng.normal();
  const Tensor<double> unmatched({1, 6}, std::vector<double>{1, 1, 0.5, 0.5, 0.9, 0.05});  // h ratio 10
  const auto none = yolo::compute_loss<double>({map}, Tensor<double>({0, 6}), anchors, {16});
  const auto empty = yolo::compute_loss<double>({map}, Tensor<double>(), anchors, {16});
  const auto dropped = yolo::compute_loss<double>({map}, unmatched, anchors, {16});
  double bce = 0;
  for (std::int64_t c = 0; c < 8; ++c) bce += std::log1p(std::exp(map[c * 7 + 4]));  // BCE(x, 0)
  const double obj_gain = (32.0 / 640) * (32.0 / 640) * 3 * 4;
  for (const auto* r : {&none, &empty, &dropped}) {
    EXPECT_TRUE(r->targets[0].empty());
    EXPECT_EQ(r->items[0], 0.0);
    EXPECT_EQ(r->items[2], 0.0);
    EXPECT_NEAR(r->items[1], obj_gain * bce / 8, 1e-14);
    EXPECT_NEAR(r->loss, 2 * obj_gain * bce / 8, 1e-14);
    for (std::int64_t j = 0; j < map.numel(); ++j) {
      if (j % 7 != 4)
        EXPECT_EQ(r->grad[0][j], 0.0);
      else
        EXPECT_NEAR(r->grad[0][j], 2 * obj_gain / 8 / (1 + std::exp(-map[j])), 1e-15);
    }
  }
}

namespace {

// An independent loss for the finite-difference check, written from the formulas with
// corner boxes, on the library's assignment (fixed under small perturbations), with
// CIoU's alpha and the objectness targets frozen at `alpha` / `tobj` (as the gradient
// treats them). When `alpha` is empty it computes them and stores them.
double reference_loss(const std::vector<Tensor<double>>& maps, const std::vector<yolo::LevelTargets<double>>& levels,
                      const yolo::LossGains& gains, const std::vector<double>& balance, std::vector<double>& alpha,
                      std::vector<std::vector<double>>& tobj) {
  const bool freeze = !alpha.empty();
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto bce = [&](double x, double t) { return -(t * std::log(sig(x)) + (1 - t) * std::log(1 - sig(x))); };
  double lbox = 0, lobj = 0, lcls = 0;
  std::size_t k_alpha = 0;
  const std::int64_t bs = maps[0].size(0);
  tobj.resize(maps.size());
  for (std::size_t i = 0; i < maps.size(); ++i) {
    const auto& m = maps[i];
    const std::int64_t na = m.size(1), H = m.size(2), W = m.size(3), no = m.size(4), nc = no - 5;
    if (!freeze) tobj[i].assign(std::size_t(bs * na * H * W), 0.0);
    double box = 0, cls = 0;
    for (const auto& e : levels[i]) {
      const std::int64_t cell = ((e.image * na + e.anchor) * H + e.gj) * W + e.gi;
      const double* p = m.data() + cell * no;
      const double px = 2 * sig(p[0]) - 0.5, py = 2 * sig(p[1]) - 0.5;
      const double pw = 4 * sig(p[2]) * sig(p[2]) * e.anchor_wh[0], ph = 4 * sig(p[3]) * sig(p[3]) * e.anchor_wh[1];
      const double tx = e.box[0], ty = e.box[1], tw = e.box[2], th = e.box[3];
      const double ax0 = px - pw / 2, ax1 = px + pw / 2, ay0 = py - ph / 2, ay1 = py + ph / 2;
      const double bx0 = tx - tw / 2, bx1 = tx + tw / 2, by0 = ty - th / 2, by1 = ty + th / 2;
      const double inter = std::max(0.0, std::min(ax1, bx1) - std::max(ax0, bx0)) *
                           std::max(0.0, std::min(ay1, by1) - std::max(ay0, by0));
      const double iou = inter / (pw * ph + tw * th - inter + 1e-7);
      const double cw = std::max(ax1, bx1) - std::min(ax0, bx0), ch = std::max(ay1, by1) - std::min(ay0, by0);
      const double rho2 = (px - tx) * (px - tx) + (py - ty) * (py - ty);
      const double v = 4 / (kPi * kPi) * std::pow(std::atan(tw / th) - std::atan(pw / ph), 2);
      if (!freeze) alpha.push_back(v / (v - iou + 1 + 1e-7));
      const double ciou = iou - rho2 / (cw * cw + ch * ch + 1e-7) - alpha[k_alpha++] * v;
      box += 1 - ciou;
      if (!freeze) tobj[i][std::size_t(cell)] = std::max(ciou, 0.0);
      if (nc > 1)
        for (std::int64_t c = 0; c < nc; ++c) cls += bce(p[5 + c], c == e.cls ? 1.0 : 0.0);
    }
    const double n = double(levels[i].size());
    if (n > 0) lbox += box / n, lcls += nc > 1 ? cls / (n * double(nc)) : 0.0;
    double obj = 0;
    for (std::int64_t c = 0; c < bs * na * H * W; ++c) obj += bce(m[c * no + 4], tobj[i][std::size_t(c)]);
    lobj += balance[i] * obj / double(bs * na * H * W);
  }
  return double(bs) * (gains.box * lbox + gains.obj * lobj + gains.cls * lcls);
}

}  // namespace

// Central differences, in double, of an independent implementation of the loss against
// the analytic gradient: every channel of every matched cell and a sample of the others.
TEST(YoloLoss, GradientFiniteDifferences) {
  Rng rng(11);
  const Tensor<double> anchors({2, 2, 2}, std::vector<double>{1.25, 1.625, 2.0, 3.75, 1.875, 3.8125, 3.875, 2.8125});
  std::vector<Tensor<double>> maps = {Tensor<double>({2, 2, 8, 6, 9}), Tensor<double>({2, 2, 4, 3, 9})};
  for (auto& m : maps)
    for (auto& v : m) v = rng.normal();
  const Tensor<double> targets({5, 6}, std::vector<double>{0, 1, 0.40, 0.30, 0.20, 0.25,   //
                                                           0, 3, 0.71, 0.62, 0.35, 0.18,   //
                                                           1, 0, 0.12, 0.85, 0.09, 0.11,   //
                                                           1, 2, 0.55, 0.47, 0.60, 0.70,   //
                                                           1, 3, 0.93, 0.08, 0.13, 0.31});
  yolo::DetectionLoss<double> loss(anchors, {8, 16}, LossOptions().balance({4.0, 1.0}));
  const auto p = loss({maps[0], maps[1]}, targets);
  ASSERT_TRUE(p.finite());
  std::vector<double> alpha;  // filled by the first call, frozen afterwards
  std::vector<std::vector<double>> tobj;
  const std::vector<double> balance = {4.0, 1.0};
  const double ref = reference_loss(maps, p.targets, p.gains, balance, alpha, tobj);
  EXPECT_NEAR(ref, double(p.loss), 1e-12 * std::max(1.0, ref)) << "independent loss value";

  double worst = 0;
  int checked = 0;
  for (std::size_t i = 0; i < maps.size(); ++i) {
    auto& m = maps[i];
    const std::int64_t no = m.size(4);
    std::vector<char> matched(std::size_t(m.numel() / no), 0);
    const std::int64_t na = m.size(1), H = m.size(2), W = m.size(3);
    for (const auto& e : p.targets[i]) matched[std::size_t(((e.image * na + e.anchor) * H + e.gj) * W + e.gi)] = 1;
    for (std::int64_t j = 0; j < m.numel(); ++j) {
      if (!matched[std::size_t(j / no)] && j % 17 != 0) continue;
      const double keep = m[j], h = 1e-6;
      m[j] = keep + h;
      const double up = reference_loss(maps, p.targets, p.gains, balance, alpha, tobj);
      m[j] = keep - h;
      const double down = reference_loss(maps, p.targets, p.gains, balance, alpha, tobj);
      m[j] = keep;
      const double num = (up - down) / (2 * h), ana = p.grad[i][j];
      const double err = std::abs(num - ana) / std::max(1e-3, std::abs(num));
      worst = std::max(worst, err);
      ++checked;
      EXPECT_LE(err, 1e-5) << "level " << i << " index " << j << ": analytic " << ana << " numeric " << num;
    }
  }
  std::printf("  %d gradient entries, worst finite-difference relative error %.2e\n", checked, worst);
}

// Label smoothing and gr < 1 change the targets as YOLOv5 does: class targets 1 - eps/2 and
// eps/2, objectness (1 - gr) + gr * max(CIoU, 0). Checked on the hand-computed cell.
TEST(YoloLoss, LabelSmoothingAndGr) {
  const Tensor<double> anchors({1, 1, 2}, std::vector<double>{1.0, 0.5});
  Tensor<double> map({1, 1, 1, 1, 7});
  const Tensor<double> targets({1, 6}, std::vector<double>{0, 1, 0.5, 0.5, 0.5, 0.25});
  const auto r = yolo::compute_loss<double>({map}, targets, anchors, {32}, LossOptions().label_smoothing(0.2).gr(0.5));
  const double tobj = 0.5 + 0.5 * 0.25;  // CIoU 0.25
  EXPECT_NEAR(r.grad[0][4], 0.03 * (0.5 - tobj), 1e-7);
  const double cls_coef = 0.5 * 2.0 / 80 * 3 / 2;  // gain / (n * nc)
  EXPECT_NEAR(r.grad[0][5], cls_coef * (0.5 - 0.1), 1e-12);
  EXPECT_NEAR(r.grad[0][6], cls_coef * (0.5 - 0.9), 1e-12);
}

// CIoU's own gradient against central differences with alpha frozen, on boxes that
// overlap partly, contain each other, and do not touch.
TEST(YoloLoss, CiouGradient) {
  const std::vector<std::array<double, 4>> pairs[] = {
      {{0.3, 0.62, 1.2, 0.7}, {0.5, 0.4, 0.9, 1.1}},
      {{0.5, 0.5, 2.0, 1.5}, {0.6, 0.45, 0.4, 0.3}},
      {{-0.2, 0.1, 0.5, 0.6}, {1.3, 1.2, 0.4, 0.9}},
  };
  for (const auto& pr : pairs) {
    const auto c = yolo::bbox_ciou(pr[0], pr[1]);
    for (int k = 0; k < 4; ++k) {
      auto f = [&](double d) {
        auto b = pr[0];
        b[std::size_t(k)] += d;
        const auto x = yolo::bbox_ciou(b, pr[1]);
        // CIoU = IoU - rho2 / c2 - alpha v, with alpha frozen at c.alpha.
        const double w1 = b[2], h1 = b[3], w2 = pr[1][2], h2 = pr[1][3];
        const double vv = 4 / (kPi * kPi) * std::pow(std::atan(w2 / h2) - std::atan(w1 / h1), 2);
        return x.ciou + x.alpha * vv - c.alpha * vv;
      };
      const double h = 1e-6, num = (f(h) - f(-h)) / (2 * h);
      EXPECT_NEAR(c.grad[std::size_t(k)], num, 1e-7) << "component " << k;
    }
  }
}

TEST(YoloLoss, NotFiniteIsDetectable) {
  const Tensor<double> anchors({1, 1, 2}, std::vector<double>{1.0, 0.5});
  Tensor<double> map({1, 1, 1, 1, 6});
  map[2] = map[3] = -1000;  // w = h = 0: CIoU's w / h is 0 / 0
  const Tensor<double> targets({1, 6}, std::vector<double>{0, 0, 0.5, 0.5, 0.5, 0.25});
  const auto r = yolo::compute_loss<double>({map}, targets, anchors, {32});
  EXPECT_FALSE(r.finite());
}

TEST(YoloLoss, BadInputs) {
  const Tensor<double> anchors({2, 1, 2}, std::vector<double>{1, 1, 2, 2});
  const Tensor<double> m0({1, 1, 4, 4, 7}), m1({1, 1, 2, 2, 7});
  const Tensor<double> ok({1, 6}, std::vector<double>{0, 1, 0.5, 0.5, 0.2, 0.2});
  yolo::DetectionLoss<double> loss(anchors, {8, 16});
  EXPECT_NO_THROW(loss({m0, m1}, ok));
  auto message = [&](auto&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  auto row = [](std::vector<double> v) { return Tensor<double>({1, 6}, std::move(v)); };
  EXPECT_THROW(loss({m0, m1}, row({0, 2, 0.5, 0.5, 0.2, 0.2})), config_error);  // class 2 >= nc 2
  EXPECT_NE(message([&] { loss({m0, m1}, row({0, 2, 0.5, 0.5, 0.2, 0.2})); }).find("class 2 >= nc = 2"), std::string::npos);
  EXPECT_THROW(loss({m0, m1}, row({1, 0, 0.5, 0.5, 0.2, 0.2})), config_error);   // image 1, batch 1
  EXPECT_THROW(loss({m0, m1}, row({0, 0.5, 0.5, 0.5, 0.2, 0.2})), config_error);  // fractional class
  EXPECT_THROW(loss({m0, m1}, row({0, 0, 1.5, 0.5, 0.2, 0.2})), config_error);    // cx outside [0, 1]
  EXPECT_THROW(loss({m0, m1}, row({0, 0, 0.5, 0.5, -0.2, 0.2})), config_error);   // negative w
  EXPECT_THROW(loss({m0, m1}, row({0, 0, NAN, 0.5, 0.2, 0.2})), state_error);
  EXPECT_THROW(loss({m0, m1}, Tensor<double>({1, 5})), shape_error);
  EXPECT_THROW(loss({m0}, ok), shape_error);                                      // one map for two levels
  EXPECT_THROW(loss({m1, m0}, ok), shape_error);                                  // levels swapped
  EXPECT_NE(message([&] { loss({m1, m0}, ok); }).find("level order"), std::string::npos);
  EXPECT_THROW(loss({m0, Tensor<double>({1, 1, 2, 2, 8})}, ok), shape_error);     // channels differ
  EXPECT_THROW(loss({m0, Tensor<double>({2, 1, 2, 2, 7})}, ok), shape_error);     // batch differs
  EXPECT_THROW(loss({m0, Tensor<double>({1, 2, 2, 2, 7})}, ok), shape_error);     // anchors differ
  EXPECT_THROW(loss({Tensor<double>({1, 1, 4, 4, 5}), m1}, ok), shape_error);     // no class channel
  EXPECT_THROW(loss({Tensor<double>({1, 1, 4, 4}), m1}, ok), shape_error);
  Tensor<double> nan = m1;
  nan[2 * 7 + 4] = NAN;
  EXPECT_THROW(loss({m0, nan}, ok), state_error);
  EXPECT_NE(message([&] { loss({m0, nan}, ok); }).find("raw map 1"), std::string::npos);
  // Construction: anchors, strides and options.
  EXPECT_THROW(yolo::DetectionLoss<double>(Tensor<double>({2, 1, 3}), {8, 16}), shape_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(Tensor<double>({2, 1, 2}), {8, 16}), config_error);  // zero anchors
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8}), shape_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 0}), config_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 16}, LossOptions().balance({4, 1, 0.4})), config_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 16}, LossOptions().gr(1.5)), config_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 16}, LossOptions().anchor_t(0.5)), config_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 16}, LossOptions().box(-1)), config_error);
  EXPECT_THROW(yolo::DetectionLoss<double>(anchors, {8, 16}, LossOptions().label_smoothing(1)), config_error);
}
