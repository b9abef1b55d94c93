// detector_demo: the main demo (scripts/demo.sh runs it). Trains a YOLOv5n-OREPA detector
// from scratch on the synthetic shapes set (circles, squares and triangles on textured,
// noisy backgrounds, written in YOLO format by yolo::write_shapes_dataset) with
// yolo::Trainer (YOLOv5's loop: SGD with Nesterov momentum in three groups, warm-up, EMA,
// affine / HSV / flip augmentation), then:
//   - mAP@0.5 and mAP@0.5:0.95 on the held-out images (val.py's NMS and metrics) of the
//     EMA model (--raw: the raw model) in training form and deployed (every block one
//     fused convolution) in fp32, bf16 (where oneDNN has bf16 kernels on this CPU) and
//     int8 (calibrated on training images);
//   - the training step time (forward, loss, backward, SGD) of the same network built from
//     OREPA, ConvBN and DBB blocks;
//   - with --compare, the ConvBN and DBB networks trained for the same steps, their mAP;
//   - the loss / mAP curves as SVG and one validation image with its detections as PNG;
//   - last, the summary line scripts read:
//       detector: mAP@0.5 0.957 mAP@0.5:0.95 0.613 int8 0.956 bf16 0.957 seconds 502
//     (`convbn X dbb Y`, their mAP@0.5, before `seconds` after --compare; `bf16 n/a` where
//     this CPU has no bf16 convolution).
//
// (that line: the default run at OMP_NUM_THREADS=1 on a 2-core machine whose other core
// was busy; 400 s of CPU.) On 2 cores keep the machine otherwise idle or set
// OMP_NUM_THREADS=1: with another process running, 2 threads made each step ~3.5x slower
// than 1 thread (the threads wait for each other).
//
// The defaults are tuned for a short run (320 optimizer steps) and differ from YOLOv5's
// hyp.scratch-low.yaml where that learns faster here (measured on this data set; the
// library's defaults stay YOLOv5's):
//   - width_multiple 0.25 (YOLOv5n's): 0.125 costs half the time per step but reached
//     only mAP@0.5 0.39 in the same 320 steps, 0.25 reached 0.96;
//   - one optimizer step per batch (nominal batch 16 = batch, YOLOv5: accumulation to
//     64 images): 4x the steps for the same images;
//   - lr0 0.08 (YOLOv5: 0.01): in 320 steps 0.01 reached 0.21, 0.03 0.28, 0.08 0.39 at
//     width 0.125 (0.15 was no better by epoch 10), and 0.03 0.89, 0.08 0.96 at width 0.25;
//   - no mosaic and scale +-25% (YOLOv5: mosaic always, +-50%): mosaic cuts objects and
//     shows each image in a quarter; at width 0.125, lr0 0.01: 0.16 -> 0.21;
//   - the EMA keeps YOLOv5's ramp (decay 0.9999 (1 - exp(-updates / 2000))): after 320
//     updates it weighs the last weights by 0.85, so it is nearly the raw model (their
//     mAP differed by <= 0.002 in a 320-step run); --raw evaluates the raw model instead;
//   - the OREPA blocks start from yolo::norm_matched_init (--init matched): each kernel
//     scaled to the norm of PyTorch's default conv init. The reference initialisation
//     (--init reference) squeezes to ~11x that squared norm, and behind a BatchNorm an
//     SGD step turns a kernel by ~lr / |kernel|^2, so it learns that much slower at one
//     lr: 2 threads, seed 1, mAP@0.5 / 0.5:0.95 0.976 / 0.666 -> 0.985 / 0.710.
//
// Exit status 0 on success, 1 with a message on any error, 2 for a bad argument.
#include <orepa/yolo/yolo.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

using namespace orepa;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// YOLOv5n (v6.0 layout) with OREPA rows where YOLOv5's Conv has a 3x3 or 1x1 kernel; the
// 6x6 stem stays Conv. width_multiple and nc are set from the command line.
const char* const kModelYaml = R"(nc: 3
depth_multiple: 0.33
width_multiple: 0.25
anchors:
  - [10, 13, 16, 30, 33, 23]
  - [30, 61, 62, 45, 59, 119]
  - [116, 90, 156, 198, 373, 326]
backbone:
  [
    [-1, 1, Conv, [64, 6, 2, 2]],
    [-1, 1, OREPA, [128, 3, 2]],
    [-1, 3, C3, [128]],
    [-1, 1, OREPA, [256, 3, 2]],
    [-1, 6, C3, [256]],
    [-1, 1, OREPA, [512, 3, 2]],
    [-1, 9, C3, [512]],
    [-1, 1, OREPA, [1024, 3, 2]],
    [-1, 3, C3, [1024]],
    [-1, 1, SPPF, [1024, 5]],
  ]
head:
  [
    [-1, 1, OREPA_1x1, [512, 1, 1]],
    [-1, 1, nn.Upsample, [None, 2, "nearest"]],
    [[-1, 6], 1, Concat, [1]],
    [-1, 3, C3, [512, False]],
    [-1, 1, OREPA_1x1, [256, 1, 1]],
    [-1, 1, nn.Upsample, [None, 2, "nearest"]],
    [[-1, 4], 1, Concat, [1]],
    [-1, 3, C3, [256, False]],
    [-1, 1, OREPA, [256, 3, 2]],
    [[-1, 14], 1, Concat, [1]],
    [-1, 3, C3, [512, False]],
    [-1, 1, OREPA, [512, 3, 2]],
    [[-1, 10], 1, Concat, [1]],
    [-1, 3, C3, [1024, False]],
    [[17, 20, 23], 1, Detect, [nc, anchors]],
  ]
)";

struct Args {
  int images = 256, val = 64, epochs = 20, size = 256, batch = 16, nominal_batch = 16, time_steps = 3;
  int max_objects = 4, min_size = 16, max_size = 120;
  double width = 0.25, lr0 = 0.08, warmup_epochs = 3, mosaic = 0, scale = 0.25, ema_tau = 2000;
  bool cos_lr = false, raw = false, val_both = false;
  std::uint64_t seed = 1;
  std::string out = "orepa_detector_demo";
  bool compare = false;
  std::string init = "matched";
};

const char* usage() {
  return R"(usage: detector_demo [--images N] [--val N] [--epochs E] [--size S] [--batch B] [--nominal-batch NB]
                     [--width W] [--lr0 LR] [--warmup-epochs E] [--cos-lr] [--mosaic P] [--scale S]
                     [--ema-tau T] [--raw] [--val-both] [--max-objects N] [--min-size PX]
                     [--max-size PX] [--init reference|matched] [--time-steps N] [--seed S]
                     [--out DIR] [--compare] [--help]

Trains a YOLOv5n-OREPA detector on a synthetic shapes set and reports its mAP in training
form and deployed in fp32, bf16 and int8, and the training step time of OREPA, ConvBN and DBB.
  --images N      training images (default 256)
  --val N         held-out images (default 64)
  --epochs E      epochs (default 20)
  --size S        image side in pixels, a multiple of 32 (default 256)
  --batch B       images per batch (default 16)
  --nominal-batch NB  gradients accumulate to NB images per step (default 16: one step
                  per batch; YOLOv5's 64 makes 4x fewer steps)
  --width W       the yaml's width_multiple (default 0.25, YOLOv5n's)
  --lr0 LR        initial learning rate (default 0.08; YOLOv5's 0.01 learns too slowly
                  for a run this short)
  --warmup-epochs E  warm-up epochs, at least 100 iterations (default 3, YOLOv5's)
  --cos-lr        cosine learning-rate decay (default linear, YOLOv5's)
  --mosaic P      probability of a mosaic sample (default 0; YOLOv5's 1)
  --scale S       affine scale range +-S (default 0.25; YOLOv5's 0.5)
  --ema-tau T     the EMA's ramp, decay 0.9999 (1 - exp(-updates / T)) (default 2000,
                  YOLOv5's: after the default 320 updates the EMA is nearly the raw model)
  --raw           evaluate, deploy and report the raw model instead of the EMA
  --val-both      after each epoch also print the mAP of the other one (EMA or raw)
  --max-objects N most objects per image (default 4)
  --min-size PX   smallest object side at 256x256, scaled with --size (default 16)
  --max-size PX   largest object side at 256x256, scaled with --size (default 120)
  --init I        how the OREPA blocks start: matched (yolo::norm_matched_init: each
                  kernel scaled to the norm of PyTorch's default conv init, so it turns at
                  ConvBN's pace at the same learning rate) or reference (the reference
                  implementation's initialisation, ~11x that squared norm) (default matched)
  --time-steps N  timed training steps per block type (default 3, after one untimed)
  --seed S        seed of the data, the initialisation and the augmentation (default 1)
  --out DIR       folder for the data set, checkpoint, curves.svg and detections.png
                  (default ./orepa_detector_demo; its data set and checkpoint are replaced)
  --compare       also train the ConvBN and DBB networks for the same steps (about 3.5x
                  the OREPA network's training time on top: a DBB step costs ~2.6x a ConvBN one)
)";
}

[[noreturn]] void bad_arg(const std::string& msg) {
  std::fprintf(stderr, "detector_demo: %s\n%s", msg.c_str(), usage());
  std::exit(2);
}

double number(int argc, char** argv, int& i, double lo, double hi) {
  const std::string flag = argv[i];
  if (i + 1 >= argc) bad_arg(flag + " needs a value");
  const std::string v = argv[++i];
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= lo && x <= hi))
    bad_arg(detail::cat(flag, ": expected a number in [", lo, ", ", hi, "], got '", v, "'"));
  return x;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::fputs(usage(), stdout);
      std::exit(0);
    }
    if (f == "--images") a.images = int(number(argc, argv, i, 1, 1e6));
    else if (f == "--val") a.val = int(number(argc, argv, i, 1, 1e6));
    else if (f == "--epochs") a.epochs = int(number(argc, argv, i, 1, 1e5));
    else if (f == "--size") a.size = int(number(argc, argv, i, 32, 2048));
    else if (f == "--batch") a.batch = int(number(argc, argv, i, 1, 1024));
    else if (f == "--nominal-batch") a.nominal_batch = int(number(argc, argv, i, 1, 4096));
    else if (f == "--width") a.width = number(argc, argv, i, 0.01, 2);
    else if (f == "--time-steps") a.time_steps = int(number(argc, argv, i, 1, 1000));
    else if (f == "--seed") a.seed = std::uint64_t(number(argc, argv, i, 0, 1e15));
    else if (f == "--out" && i + 1 < argc) a.out = argv[++i];
    else if (f == "--compare") a.compare = true;
    else if (f == "--init" && i + 1 < argc) a.init = argv[++i];
    else if (f == "--lr0") a.lr0 = number(argc, argv, i, 1e-6, 1);
    else if (f == "--warmup-epochs") a.warmup_epochs = number(argc, argv, i, 0, 1000);
    else if (f == "--cos-lr") a.cos_lr = true;
    else if (f == "--mosaic") a.mosaic = number(argc, argv, i, 0, 1);
    else if (f == "--scale") a.scale = number(argc, argv, i, 0, 0.99);
    else if (f == "--ema-tau") a.ema_tau = number(argc, argv, i, 1e-3, 1e9);
    else if (f == "--raw") a.raw = true;
    else if (f == "--val-both") a.val_both = true;
    else if (f == "--max-objects") a.max_objects = int(number(argc, argv, i, 1, 100));
    else if (f == "--min-size") a.min_size = int(number(argc, argv, i, 4, 2048));
    else if (f == "--max-size") a.max_size = int(number(argc, argv, i, 4, 2048));
    else bad_arg("unknown or incomplete argument '" + f + "'");
  }
  if (a.init != "reference" && a.init != "matched")
    bad_arg("--init: expected reference or matched, got '" + a.init + "'");
  if (a.size % 32) bad_arg(detail::cat("--size: expected a multiple of 32, got ", a.size));
  return a;
}

yolo::Model<float> build(const Args& a, const std::string& family) {
  yolo::ModelConfig cfg = yolo::parse_model_config(kModelYaml, "yolov5n-orepa.yaml (detector_demo)");
  cfg.width_multiple = a.width;
  BlockMaker<float> maker = yolo::block_maker<float>(family);
  if (a.init == "matched") maker = yolo::norm_matched_init<float>(maker);
  return yolo::Model<float>(cfg, yolo::ModelOptions<float>()
                                     .maker(maker)
                                     .orepa_maker(maker)
                                     .classes(3)
                                     .seed(a.seed));
}

yolo::TrainOptions train_options(const Args& a, const std::string& out) {
  return yolo::TrainOptions()
      .epochs(a.epochs)
      .image_size(a.size)
      .batch_size(a.batch)
      .nominal_batch(a.nominal_batch)
      .lr0(a.lr0)
      .warmup_epochs(a.warmup_epochs)
      .decay(a.cos_lr ? LrDecay::cosine : LrDecay::linear)
      .augmentation(yolo::AugmentOptions().mosaic(a.mosaic).scale(a.scale))
      .ema(ModelEMAOptions().tau(a.ema_tau))
      .seed(a.seed)
      .workers(1)
      .output(out)
      .overwrite(true);
}

// One trained network's history and results.
struct Run {
  std::string family;
  std::vector<yolo::EpochStats> epochs;
  std::vector<yolo::MetricsResult> val;  // the EMA (--raw: raw) model after each epoch
  double seconds = 0;
};

Run train(const Args& a, const std::string& family, const yolo::YoloDataset& train_set, const yolo::YoloDataset& val_set,
          std::optional<yolo::Model<float>>* ema_out) {
  Run r;
  r.family = family;
  const auto t0 = Clock::now();
  yolo::Trainer trainer(build(a, family), train_set,
                        train_options(a, (std::filesystem::path(a.out) / ("run_" + family)).string()).log(&std::cout));
  const auto eo = yolo::EvalOptions().image_size(a.size).batch_size(a.batch);
  // The model reported (the EMA, or with --raw the raw one) and the other one.
  auto& reported = a.raw ? trainer.model() : trainer.ema().module();
  auto& other = a.raw ? trainer.ema().module() : trainer.model();
  while (!trainer.done()) {
    r.epochs.push_back(trainer.train_epoch());
    const auto tv = Clock::now();
    r.val.push_back(yolo::evaluate(reported, val_set, eo));
    std::printf("           %s val (%s): P %.3f R %.3f mAP@0.5 %.3f mAP@0.5:0.95 %.3f  %.1f s", family.c_str(),
                a.raw ? "raw" : "EMA", r.val.back().mp, r.val.back().mr, r.val.back().map50, r.val.back().map,
                seconds_since(tv));
    if (a.val_both) {
      const auto m = yolo::evaluate(other, val_set, eo);
      std::printf("  (%s: mAP@0.5 %.3f mAP@0.5:0.95 %.3f)", a.raw ? "EMA" : "raw", m.map50, m.map);
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  r.seconds = seconds_since(t0);
  if (ema_out) ema_out->emplace(reported.clone());
  return r;
}

// Milliseconds of one training step (forward, loss, backward, SGD step, EMA) of the
// network built from `family` on a fixed batch: the median of `steps` after one untimed.
double step_ms(const Args& a, const std::string& family, const yolo::YoloDataset& train_set) {
  yolo::Trainer t(build(a, family), train_set,
                  train_options(a, "").epochs(1000000).nominal_batch(a.batch).output(""));
  const yolo::Batch b = yolo::make_batch(train_set, t.loader_options(), 0, 0);
  (void)t.train_batch(b);
  std::vector<double> ms;
  for (int i = 0; i < a.time_steps; ++i) {
    const auto t0 = Clock::now();
    (void)t.train_batch(b);
    ms.push_back(1000 * seconds_since(t0));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// ---------------------------------------------------------------------------------------
// Curves as a hand-written SVG: losses (left), validation mAP (right), per epoch.

struct Series {
  std::vector<double> y;  // one per epoch
  std::string color, label;
  bool dashed = false;
};

void panel(std::ostream& o, double x0, double w, double h, const std::string& title, const std::vector<Series>& ss) {
  const double left = x0 + 55, right = x0 + w - 15, top = 50, bottom = h - 40;
  double ymax = 1e-9;
  std::size_t n = 1;
  for (const auto& s : ss) {
    for (double v : s.y) ymax = std::max(ymax, v);
    n = std::max(n, s.y.size());
  }
  ymax *= 1.05;
  auto X = [&](std::size_t i) { return n == 1 ? left : left + (right - left) * double(i) / double(n - 1); };
  auto Y = [&](double v) { return bottom - (bottom - top) * v / ymax; };
  o << "<text x=\"" << (left + right) / 2 << "\" y=\"" << top - 15 << "\" text-anchor=\"middle\" font-size=\"14\">"
    << title << "</text>\n";
  o << "<line x1=\"" << left << "\" y1=\"" << bottom << "\" x2=\"" << right << "\" y2=\"" << bottom
    << "\" stroke=\"black\"/><line x1=\"" << left << "\" y1=\"" << top << "\" x2=\"" << left << "\" y2=\"" << bottom
    << "\" stroke=\"black\"/>\n";
  for (int k = 0; k <= 4; ++k) {
    const double v = ymax * k / 4;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g", v);
    o << "<text x=\"" << left - 5 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\" font-size=\"10\">" << buf
      << "</text><line x1=\"" << left << "\" y1=\"" << Y(v) << "\" x2=\"" << right << "\" y2=\"" << Y(v)
      << "\" stroke=\"#ddd\"/>\n";
  }
  o << "<text x=\"" << (left + right) / 2 << "\" y=\"" << h - 10 << "\" text-anchor=\"middle\" font-size=\"11\">epoch (1.."
    << n << ")</text>\n";
  double ly = top + 5;
  for (const auto& s : ss) {
    o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.8\""
      << (s.dashed ? " stroke-dasharray=\"5,3\"" : "") << " points=\"";
    for (std::size_t i = 0; i < s.y.size(); ++i) o << X(i) << "," << Y(s.y[i]) << " ";
    o << "\"/>\n<text x=\"" << right - 5 << "\" y=\"" << ly << "\" text-anchor=\"end\" font-size=\"11\" fill=\""
      << s.color << "\">" << s.label << "</text>\n";
    ly += 14;
  }
}

void write_svg(const std::string& path, const std::vector<Run>& runs, bool raw) {
  const std::map<std::string, std::string> color = {{"orepa", "#d62728"}, {"convbn", "#1f77b4"}, {"dbb", "#2ca02c"}};
  std::vector<Series> loss, map;
  for (const auto& r : runs) {
    Series total{{}, color.at(r.family), r.family + " total"}, m50{{}, color.at(r.family), r.family + " mAP@0.5"},
        m95{{}, color.at(r.family), r.family + " mAP@0.5:0.95", true};
    for (const auto& e : r.epochs) total.y.push_back(e.mean.total());
    for (const auto& v : r.val) m50.y.push_back(v.map50), m95.y.push_back(v.map);
    loss.push_back(total);
    map.push_back(m50);
    map.push_back(m95);
    if (r.family == "orepa") {
      Series box{{}, "#ff7f0e", "orepa box", true}, obj{{}, "#9467bd", "orepa obj", true}, cls{{}, "#8c564b", "orepa cls", true};
      for (const auto& e : r.epochs) box.y.push_back(e.mean.box), obj.y.push_back(e.mean.obj), cls.y.push_back(e.mean.cls);
      loss.push_back(box), loss.push_back(obj), loss.push_back(cls);
    }
  }
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"960\" height=\"400\" viewBox=\"0 0 960 400\" "
       "font-family=\"sans-serif\">\n<rect width=\"960\" height=\"400\" fill=\"white\"/>\n";
  panel(o, 0, 480, 400, "training loss per epoch (YOLOv5 loss items)", loss);
  panel(o, 480, 480, 400, raw ? "validation mAP of the raw model" : "validation mAP of the EMA model", map);
  o << "</svg>\n";
  std::ofstream f(path);
  f << o.str();
  if (!f) throw format_error("cannot write the SVG file '" + path + "'");
}

// The first validation image with the deployed model's detections (detect.py's NMS:
// conf 0.25, IoU 0.45) drawn, labelled "class conf"; returns how many were drawn.
std::int64_t write_detections(const std::string& path, const yolo::DeployedModel<float>& net, const yolo::YoloDataset& val,
                              int size) {
  const auto lo = yolo::LoaderOptions().image_size(size).batch_size(1).shuffle(false);
  const yolo::Batch b = yolo::make_batch(val, lo, 0, 0);
  const auto dets = yolo::non_max_suppression<float>(net.predict(b.images), yolo::NmsOptions())[0];
  Tensor<float> img({3, size, size});
  std::copy(b.images.data(), b.images.data() + img.numel(), img.data());
  const auto& names = yolo::shape_class_names();
  for (std::int64_t k = 0; k < dets.size(); ++k) {
    const float* r = dets.rows.data() + 6 * k;
    char label[64];
    std::snprintf(label, sizeof label, "%s %.2f", names.at(std::size_t(r[5])).c_str(), double(r[4]));
    yolo::draw_labeled_box(img, r[0], r[1], r[2], r[3], label, yolo::palette_color(int(r[5])));
  }
  yolo::write_image(path, img);
  return dets.size();
}

}  // namespace

int main(int argc, char** argv) try {
  const Args a = parse(argc, argv);
  const auto t_start = Clock::now();
  namespace fs = std::filesystem;
  yolo::check_output_folder(a.out, {}, true);

  // The data: objects scaled with the image (--min-size to --max-size px at 256).
  const double k = a.size / 256.0;
  yolo::ShapesOptions so;
  so.image_size(a.size).train_images(a.images).val_images(a.val).seed(a.seed).overwrite(true);
  so.max_objects(a.max_objects);
  so.min_size(std::max(6, int(a.min_size * k))).max_size(std::min(a.size, std::max(12, int(a.max_size * k))));
  const auto info = yolo::write_shapes_dataset((fs::path(a.out) / "shapes").string(), so);
  std::printf("data: %lld training and %lld held-out %dx%d images, %lld boxes, in %s\n",
              static_cast<long long>(info.train_images), static_cast<long long>(info.val_images), a.size, a.size,
              static_cast<long long>(info.boxes), info.root.c_str());
  const auto data = yolo::read_data_config(info.yaml);
  auto train_set = yolo::YoloDataset::from_config(data, "train");
  train_set.cache_images();
  const auto val_set = yolo::YoloDataset::from_config(data, "val");
  {
    auto m = build(a, "orepa");
    std::int64_t params = 0;
    for (auto* p : m.parameters()) params += p->value.numel();
    std::printf("network: YOLOv5n-OREPA (width_multiple %.3g, depth 0.33, %s init), %zu layers, %lld parameters in "
                "training form, %lld deployed; %d epochs of %lld batches of %d at %dx%d on oneDNN %s\n",
                a.width, a.init.c_str(), m.size(), static_cast<long long>(params),
                static_cast<long long>(m.deploy().num_parameters()),
                a.epochs, static_cast<long long>((a.images + a.batch - 1) / a.batch), a.batch, a.size, a.size,
                engine::cpu_isa_name().c_str());
  }

  // Train OREPA (and, with --compare, ConvBN and DBB for the same steps).
  std::vector<Run> runs;
  std::optional<yolo::Model<float>> ema;
  std::printf("\ntraining yolov5n-orepa:\n");
  runs.push_back(train(a, "orepa", train_set, val_set, &ema));
  if (a.compare)
    for (const char* f : {"convbn", "dbb"}) {
      std::printf("\ntraining yolov5n-%s (same data, steps and seed):\n", f);
      runs.push_back(train(a, f, train_set, val_set, nullptr));
    }

  // The EMA (--raw: raw) model in training form and deployed.
  const auto eo = yolo::EvalOptions().image_size(a.size).batch_size(a.batch);
  const yolo::MetricsResult train_form = yolo::evaluate(*ema, val_set, eo);
  const yolo::DeployedModel<float> fp32 = ema->deploy();
  const yolo::MetricsResult m_fp32 = yolo::evaluate(fp32, val_set, eo);
  Calibrator cal;
  {
    const auto lo = yolo::LoaderOptions().image_size(a.size).batch_size(a.batch).shuffle(false);
    for (std::int64_t b = 0; b < std::min<std::int64_t>(4, yolo::batches_per_epoch(train_set.size(), lo)); ++b)
      cal.observe(fp32, yolo::make_batch(train_set, lo, 0, b).images);
  }
  const auto int8 = fp32.with_options(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  const yolo::MetricsResult m_int8 = yolo::evaluate(int8, val_set, eo);
  std::optional<yolo::MetricsResult> m_bf16;
  std::string bf16_missing;
  try {
    m_bf16 = yolo::evaluate(fp32.with_options(DeployOptions().precision(Precision::bf16)), val_set, eo);
  } catch (const engine_error& e) {
    bf16_missing = e.what();
  }

  std::printf("\n%-34s %8s %8s %8s %14s\n", a.raw ? "held-out images (raw model)" : "held-out images (EMA model)",
              "P", "R", "mAP@0.5", "mAP@0.5:0.95");
  auto row = [](const std::string& name, const yolo::MetricsResult& m) {
    std::printf("%-34s %8.3f %8.3f %8.3f %14.3f\n", name.c_str(), m.mp, m.mr, m.map50, m.map);
  };
  row("OREPA, training form (eval)", train_form);
  row("OREPA, deployed fp32", m_fp32);
  if (m_bf16) row("OREPA, deployed bf16", *m_bf16);
  else std::printf("%-34s no bf16 convolution on this CPU (%s)\n", "OREPA, deployed bf16", engine::cpu_isa_name().c_str());
  row("OREPA, deployed int8 (calibrated)", m_int8);
  for (const auto& r : runs)
    if (r.family != "orepa") row(r.family + ", training form (eval)", r.val.back());

  // Training step time of the same network from each block type.
  std::printf("\ntraining step (forward, loss, backward, SGD, EMA), batch %d at %dx%d, median of %d:\n", a.batch, a.size,
              a.size, a.time_steps);
  std::map<std::string, double> ms;
  for (const char* f : {"convbn", "orepa", "dbb"}) ms[f] = step_ms(a, f, train_set);
  for (const char* f : {"orepa", "convbn", "dbb"})
    std::printf("  %-7s %8.1f ms  (%.2fx ConvBN)\n", f, ms[f], ms[f] / ms["convbn"]);

  const std::string svg = (fs::path(a.out) / "curves.svg").string(), png = (fs::path(a.out) / "detections.png").string();
  write_svg(svg, runs, a.raw);
  const std::int64_t drawn = write_detections(png, fp32, val_set, a.size);
  std::printf("\nloss / mAP curves: %s\nvalidation image with %lld detections (deployed fp32, conf > 0.25): %s\n",
              fs::absolute(svg).string().c_str(), static_cast<long long>(drawn), fs::absolute(png).string().c_str());

  std::string compare;
  for (const auto& r : runs)
    if (r.family != "orepa") {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s %.3f ", r.family.c_str(), r.val.back().map50);
      compare += buf;
    }
  char bf16[16] = "n/a";
  if (m_bf16) std::snprintf(bf16, sizeof bf16, "%.3f", m_bf16->map50);
  std::printf("detector: mAP@0.5 %.3f mAP@0.5:0.95 %.3f int8 %.3f bf16 %s %sseconds %.0f\n", m_fp32.map50, m_fp32.map,
              m_int8.map50, bf16, compare.c_str(), seconds_since(t_start));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "detector_demo: %s\n", e.what());
  return 1;
}
