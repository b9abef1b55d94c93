// The tools on a whole YOLOv5 network (examples/yolo_tool.hpp, examples/orepa_detect.cpp):
// orepa-convert --model and orepa-run --model against the PyTorch recipe's fixture
// (tests/data/yolov5n_orepa), orepa-detect on a generated picture with the fixture's
// random weights (the mechanics: boxes, JSON, the drawn picture, the benchmark), and the
// bad inputs, each a message naming the file and the fault with nothing written.
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>

#include "orepa/io/calibration.hpp"
#include "orepa/yolo/yolo.hpp"
#include "test_util.hpp"

using namespace orepa;
namespace fs = std::filesystem;

#ifdef OREPA_TOOLS_DIR
using test::run;
using test::TempDir;

namespace {

// The fixture's two inputs in one file, as orepa-run --input takes them.
std::string write_inputs(const TempDir& dir) {
  const auto io_file = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  io::SafetensorsWriter w;
  w.add("a", io_file.get<float>("input.a"));
  w.add("b", io_file.get<float>("input.b"));
  w.write(dir / "x.safetensors");
  return dir / "x.safetensors";
}

// Files in `dir` other than `keep`.
std::vector<std::string> new_files(const TempDir& dir, const std::vector<std::string>& keep) {
  std::vector<std::string> extra;
  for (const auto& e : fs::directory_iterator(dir.path))
    if (std::find(keep.begin(), keep.end(), e.path().string()) == keep.end()) extra.push_back(e.path().string());
  return extra;
}

}  // namespace

TEST(YoloTools, ConvertFoldsTheFixtureCheckpointAsPyTorchDeploysIt) {
  TempDir dir;
  const std::string out = dir / "deployed.safetensors";
  auto r = run("orepa-convert", test::yolo_fixture("train_state.safetensors") + " " + out + " --model " + test::yolo_fixture("model.yaml"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("57 block(s) folded with BatchNorm eps 0.001"), std::string::npos) << r.output;
  const auto got = io::SafetensorsFile::open(out);
  const auto want = io::SafetensorsFile::open(test::yolo_fixture("deploy_state.safetensors"));
  auto sorted = [](std::vector<std::string> v) { return std::sort(v.begin(), v.end()), v; };
  EXPECT_EQ(sorted(got.names()), sorted(want.names())) << "exactly the deployed PyTorch model's tensors";
  double worst = 0;
  std::string worst_name;
  for (const auto& n : want.names()) {
    if (!got.contains(n)) continue;
    const double e = test::max_relative_error(got.get<float>(n), want.get<float>(n));
    if (e > worst) worst = e, worst_name = n;
  }
  EXPECT_LT(worst, 1e-4) << worst_name;
  RecordProperty("worst_relative_error", std::to_string(worst));
  std::printf("  converted vs PyTorch deployed: worst max|diff| / max|expected| %.2e (%s)\n", worst, worst_name.c_str());
  EXPECT_EQ(got.entry("model.24.anchors").dtype, want.entry("model.24.anchors").dtype);
  EXPECT_EQ(got.metadata(), io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")).metadata());
}

TEST(YoloTools, ConvertRejectsACheckpointOfAnotherYamlAndADeployedOne) {
  TempDir dir;
  const std::string out = dir / "o.safetensors";
  auto other = run("orepa-convert", test::yolo_fixture("train_state.safetensors") + " " + out + " --model " +
                                        std::string(OREPA_SOURCE_DIR) + "/models/yolov5n-orepa.yaml");
  EXPECT_EQ(other.status, 1);
  EXPECT_NE(other.output.find("train_state.safetensors"), std::string::npos) << other.output;
  EXPECT_NE(other.output.find("another model yaml"), std::string::npos) << other.output;
  auto deployed = run("orepa-convert", test::yolo_fixture("deploy_state.safetensors") + " " + out + " --model " + test::yolo_fixture("model.yaml"));
  EXPECT_EQ(deployed.status, 1);
  EXPECT_NE(deployed.output.find("no training-time block"), std::string::npos) << deployed.output;
  auto missing = run("orepa-convert", test::yolo_fixture("train_state.safetensors") + " " + out + " --model " + (dir / "none.yaml"));
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.output.find("none.yaml: cannot read the model yaml"), std::string::npos) << missing.output;
  EXPECT_TRUE(new_files(dir, {}).empty());
}

TEST(YoloTools, RunMatchesPyTorchsFloat64OutputsInEvalAndDeploy) {
  TempDir dir;
  const std::string x = write_inputs(dir);
  const auto ref = io::SafetensorsFile::open(test::yolo_fixture("io.safetensors"));
  // The training checkpoint in eval and deploy, and orepa-convert's output (loaded as
  // identity-BN ConvBN slots) in deploy.
  ASSERT_EQ(run("orepa-convert", test::yolo_fixture("train_state.safetensors") + " " + (dir / "dep.safetensors") + " --model " +
                                     test::yolo_fixture("model.yaml"))
                .status,
            0);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"eval", test::yolo_fixture("train_state.safetensors")},
      {"deploy", test::yolo_fixture("train_state.safetensors")},
      {"deploy", dir / "dep.safetensors"},
      {"eval", test::yolo_fixture("deploy_state.safetensors")}};
  // The library's own deployed network on the same checkpoint: the tool must write exactly
  // its outputs under the names it documents.
  const auto lib = yolo::load_model(yolo::read_model_config(test::yolo_fixture("model.yaml")),
                                    io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")))
                       .deploy();
  for (const auto& [mode, weights] : cases) {
    SCOPED_TRACE(mode + " " + weights);
    const std::string out = dir / "y.safetensors";
    auto r = run("orepa-run", "--model " + test::yolo_fixture("model.yaml") + " --weights " + weights + " --input " + x + " --output " +
                                  out + " --mode " + mode);
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("a [1, 3, 128, 128] -> a.pred [1, 1008, 8], 3 raw maps"), std::string::npos) << r.output;
    const auto y = io::SafetensorsFile::open(out);
    EXPECT_EQ(y.names().size(), 8u);  // pred + 3 raw maps for a and b
    for (const std::string n : {"a", "b"}) {
      EXPECT_LT(test::max_relative_error(y.get<float>(n + ".pred"), ref.get<float>("ref64." + n + ".pred")), 2e-3) << n;
      for (int i = 0; i < 3; ++i)
        EXPECT_LT(test::max_relative_error(y.get<float>(n + ".raw." + std::to_string(i)),
                                 ref.get<float>("ref64." + n + ".raw" + std::to_string(i))),
                  2e-3)
            << n << " raw " << i;
    }
    if (mode == "deploy") {
      const auto want = lib.forward(ref.get<float>("input.b"));
      EXPECT_LT(test::max_relative_error(y.get<float>("b.pred"), want.pred), 1e-6);
      for (int i = 0; i < 3; ++i) EXPECT_LT(test::max_relative_error(y.get<float>("b.raw." + std::to_string(i)), want.raw[std::size_t(i)]), 1e-6);
    }
  }
}

namespace {

// Records the input range of the convolution it wraps (the test's own calibration: the
// min / max of every deployed convolution's input over a batch).
struct RangeRecorder {
  DeployedConv<float> conv;
  std::string name;
  std::shared_ptr<std::map<std::string, std::pair<float, float>>> ranges;
  std::shared_ptr<std::mutex> mutex;  // the images of a batch may run on several threads
  Tensor<float> forward(ConstTensorView<float> x) const {
    const std::lock_guard<std::mutex> lock(*mutex);
    auto& r = (*ranges)[name];
    for (std::int64_t i = 0; i < x.numel(); ++i) r.first = std::min(r.first, x.data()[i]), r.second = std::max(r.second, x.data()[i]);
    return conv.forward(x);
  }
};

}  // namespace

TEST(YoloTools, RunDeploysInInt8WithACalibrationFile) {
  TempDir dir;
  const std::string x = write_inputs(dir);
  const auto model = yolo::load_model(yolo::read_model_config(test::yolo_fixture("model.yaml")),
                                      io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")));
  auto ranges = std::make_shared<std::map<std::string, std::pair<float, float>>>();
  auto mutex = std::make_shared<std::mutex>();
  const auto recording = model.deploy().map_convs("", [&](const std::string& name, const DeployedConv<float>& c) {
    (*ranges)[name] = {1e30f, -1e30f};
    return AnyDeployed<float>(RangeRecorder{c, name, ranges, mutex});
  });
  recording.forward(io::SafetensorsFile::open(test::yolo_fixture("io.safetensors")).get<float>("input.b"));
  Calibration cal;
  for (const auto& [name, r] : *ranges) cal.set(name, {r.first, r.second});
  EXPECT_EQ(cal.size(), 60u);  // 57 blocks and Detect's 3 convolutions
  io::SafetensorsWriter w;
  io::save_calibration(cal, w);
  w.write(dir / "cal.safetensors");

  const std::string common = "--model " + test::yolo_fixture("model.yaml") + " --weights " + test::yolo_fixture("train_state.safetensors") +
                             " --input " + x + " --mode deploy --output ";
  ASSERT_EQ(run("orepa-run", common + (dir / "fp32.safetensors")).status, 0);
  auto r = run("orepa-run", common + (dir / "int8.safetensors") + " --precision int8 --calibration " + (dir / "cal.safetensors"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("int8, output SQNR"), std::string::npos) << r.output;
  const auto fp32 = io::SafetensorsFile::open(dir / "fp32.safetensors").get<float>("a.pred");
  const auto int8 = io::SafetensorsFile::open(dir / "int8.safetensors").get<float>("a.pred");
  const double sqnr = sqnr_db(fp32.data(), int8.data(), fp32.numel());
  std::printf("  int8 vs fp32 on input a (calibrated on b): SQNR %.1f dB\n", sqnr);
  // The tool's int8 network is the library's, deployed with the calibration the tool read
  // back from the file: the same output. The network is quantized (not fp32 under another
  // name); how close int8 comes to fp32 is the library's matter (tests of deploy/).
  const auto want = model.deploy(DeployOptions().precision(Precision::int8).calibration(cal))
                        .forward(io::SafetensorsFile::open(test::yolo_fixture("io.safetensors")).get<float>("input.a"));
  EXPECT_LT(test::max_relative_error(int8, want.pred), 1e-6);
  EXPECT_GT(max_abs_diff(int8, fp32), 1e-3) << "int8 ran";

  // A calibration without a layer's range names the layer; none at all names the file.
  Calibration partial;
  for (const auto& [name, range] : cal.ranges())
    if (name != "model.2.m.0.cv2.") partial.set(name, range);
  io::SafetensorsWriter pw;
  io::save_calibration(partial, pw);
  pw.write(dir / "partial.safetensors");
  auto gap = run("orepa-run", common + (dir / "p.safetensors") + " --precision int8 --calibration " + (dir / "partial.safetensors"));
  EXPECT_EQ(gap.status, 1);
  EXPECT_NE(gap.output.find("no calibrated input range for layer 'model.2.m.0.cv2.'"), std::string::npos) << gap.output;
  auto none = run("orepa-run", common + (dir / "p.safetensors") + " --precision int8 --calibration " + x);
  EXPECT_EQ(none.status, 1);
  EXPECT_NE(none.output.find("x.safetensors: holds no '<layer>input_range' tensor"), std::string::npos) << none.output;
  EXPECT_FALSE(fs::exists(dir / "p.safetensors"));
}

TEST(YoloTools, RunRejectsBadInputsNamingThem) {
  TempDir dir;
  io::SafetensorsWriter w;
  w.add("odd", Tensor<float>({1, 3, 100, 96}, 0.5f));
  w.write(dir / "odd.safetensors");
  const std::string base = "--model " + test::yolo_fixture("model.yaml") + " --weights " + test::yolo_fixture("train_state.safetensors") +
                           " --mode eval --output " + (dir / "y.safetensors");
  auto odd = run("orepa-run", base + " --input " + (dir / "odd.safetensors"));
  EXPECT_EQ(odd.status, 1);
  EXPECT_NE(odd.output.find("odd.safetensors: tensor 'odd' has shape [1, 3, 100, 96]"), std::string::npos) << odd.output;
  EXPECT_NE(odd.output.find("multiples of 32"), std::string::npos) << odd.output;
  auto block = run("orepa-run", base + " --input " + (dir / "odd.safetensors") + " --prefix model.1.");
  EXPECT_EQ(block.status, 1);
  EXPECT_NE(block.output.find("--prefix is for one block"), std::string::npos) << block.output;
  auto train = run("orepa-run", "--model m.yaml --weights w --input x --output y --mode train");
  EXPECT_EQ(train.status, 1);
  EXPECT_NE(train.output.find("only eval and deploy"), std::string::npos) << train.output;
  auto same = run("orepa-run", "--model " + test::yolo_fixture("model.yaml") + " --weights " + (dir / "odd.safetensors") +
                                   " --input " + (dir / "odd.safetensors") + " --mode eval --output " + (dir / "odd.safetensors"));
  EXPECT_EQ(same.status, 1);
  EXPECT_NE(same.output.find("is the same file as --weights"), std::string::npos) << same.output;
  EXPECT_EQ(new_files(dir, {dir / "odd.safetensors"}), std::vector<std::string>{});
}

namespace {

// A generated 240 x 180 picture of shapes on a textured background, written as PNG.
std::string write_picture(const TempDir& dir, const std::string& name = "scene.png") {
  const auto shapes = yolo::render_shapes_image(yolo::ShapesOptions().image_size(240).min_size(30).max_size(90), 7);
  Tensor<float> img({3, 180, 240});
  for (std::int64_t c = 0; c < 3; ++c)
    std::copy_n(shapes.image.data() + c * 240 * 240, 180 * 240, img.data() + c * 180 * 240);
  yolo::write_image(dir / name, img);
  return dir / name;
}

const char* names_arg = "'[circle, square, triangle]'";

}  // namespace

namespace {

// The fixture's network with a Detect head whose convolutions have zero weights, so every
// cell gives the head's biases: only anchor 0 of the stride-32 level is an object (logit
// +10), of class 2 (+10, the others -10), centred in its cell (x, y logits 0) and `bw` x
// `bh` letterboxed pixels large; the detections follow in closed form.
std::string write_crafted_weights(const TempDir& dir, double bw, double bh) {
  const auto src = io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors"));
  io::SafetensorsWriter w;
  for (const auto& name : src.names())
    if (name.rfind("model.24.m.", 0) != 0) w.add_raw(src.entry(name));
  const auto anchors = src.get<float>("model.24.anchors");  // [3, 3, 2] in grid units
  const auto logit = [](double p) { return std::log(p / (1 - p)); };
  for (int i = 0; i < 3; ++i) {
    const std::string m = "model.24.m." + std::to_string(i) + ".";
    w.add(m + "weight", Tensor<float>(src.entry(m + "weight").shape, 0.0f));
    Tensor<float> bias({24}, -20.0f);  // 3 anchors x (x, y, w, h, obj, 3 classes)
    if (i == 2) {
      bias[0] = bias[1] = 0;
      // (2 sigmoid(t))^2 * anchor = size
      bias[2] = float(logit(std::sqrt(bw / (anchors[2 * 3 * 2 + 0] * 32)) / 2));
      bias[3] = float(logit(std::sqrt(bh / (anchors[2 * 3 * 2 + 1] * 32)) / 2));
      bias[4] = 10, bias[5] = -10, bias[6] = -10, bias[7] = 10;
    }
    w.add(m + "bias", bias);
  }
  w.write(dir / "crafted.safetensors");
  return dir / "crafted.safetensors";
}

}  // namespace

TEST(YoloTools, DetectFindsTheCraftedHeadsBoxesInTheImagesPixels) {
  TempDir dir;
  const std::string picture = write_picture(dir);  // 240 x 180
  const std::string weights = write_crafted_weights(dir, 20, 16);
  const std::string json = dir / "dets.json", png = dir / "dets.png";
  auto r = run("orepa-detect", "--model " + test::yolo_fixture("model.yaml") + " --weights " + weights + " --image " + picture +
                                   " --names " + names_arg + " --img-size 160 --output-json " + json +
                                   " --output-image " + png);
  ASSERT_EQ(r.status, 0) << r.output;
  std::printf("  %s", r.output.c_str());
  EXPECT_NE(r.output.find("20 detection(s): 20 triangle"), std::string::npos) << r.output;
  std::ifstream jf(json);
  const auto j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["width"], 240);
  EXPECT_EQ(j["height"], 180);
  // Letterbox by hand: r = min(160 / 180, 160 / 240) = 2 / 3 gives 160 x 120, padded to
  // 128 rows (a multiple of 32), 4 above and 4 below.
  EXPECT_EQ(j["input_size"], (nlohmann::json{128, 160}));
  const double ratio = 2.0 / 3.0, pad_top = 4;
  // 5 x 4 cells of 32 pixels; cell (x, y) gives a box centred at ((x + 0.5) 32, (y + 0.5) 32)
  // in the letterboxed image, 20 x 16 large; all of equal confidence sigmoid(10)^2, kept in
  // row order (y, then x) as no two overlap.
  const double conf = 1 / (1 + std::exp(-10.0)) / (1 + std::exp(-10.0));
  const auto& dets = j["detections"];
  ASSERT_EQ(dets.size(), 20u);
  for (int k = 0; k < 20; ++k) {
    const auto& d = dets[std::size_t(k)];
    const double cx = (k % 5 + 0.5) * 32, cy = (k / 5 + 0.5) * 32;
    EXPECT_EQ(d["class"], 2);
    EXPECT_EQ(d["name"], "triangle");
    EXPECT_NEAR(double(d["confidence"]), conf, 1e-6);
    const double want[4] = {(cx - 10) / ratio, (cy - 8 - pad_top) / ratio, (cx + 10) / ratio, (cy + 8 - pad_top) / ratio};
    for (int q = 0; q < 4; ++q) EXPECT_NEAR(double(d["box"][std::size_t(q)]), want[q], 1e-3) << k << " " << q;
  }

  // The picture: the original wherever no box or label bar is; the first detection (the
  // last drawn, on top) in its class colour on its left edge.
  const Tensor<float> img = yolo::read_image(picture), drawn = yolo::read_image(png);
  ASSERT_EQ(drawn.sizes(), img.sizes());
  const auto px = [](const Tensor<float>& t, std::int64_t c, std::int64_t y, std::int64_t x) {
    return t.data()[(c * t.size(1) + y) * t.size(2) + x];
  };
  const int scale = 1;  // YOLOv5's line width for 240 x 180 is 2; the font scale is half of it
  const double bar_w = yolo::text_width("triangle 1.00", scale) + 2 * scale, bar_h = yolo::text_height("t", scale) + 2 * scale;
  std::int64_t changed = 0, untouched = 0, outside = 0;
  for (std::int64_t y = 0; y < 180; ++y)
    for (std::int64_t x = 0; x < 240; ++x) {
      bool covered = false;
      for (const auto& d : dets) {
        const double x1 = d["box"][0], y1 = d["box"][1], x2 = d["box"][2], y2 = d["box"][3];
        covered = covered || (x >= x1 - 1 && x <= std::max(x2, x1 + bar_w) + 1 && y >= y1 - bar_h - 1 &&
                              y <= std::max(y2, y1 + bar_h) + 1);
      }
      bool differs = false;
      for (std::int64_t c = 0; c < 3; ++c) differs = differs || std::abs(px(drawn, c, y, x) - px(img, c, y, x)) > 0.5f / 255;
      if (covered) changed += differs;
      else ++untouched, outside += differs;
    }
  EXPECT_EQ(outside, 0) << "of " << untouched << " pixels away from every box";
  EXPECT_GT(changed, 20 * 4 * 20) << "the boxes are drawn";
  const auto col = yolo::palette_color(2);
  const std::int64_t x0 = std::lround(double(dets[0]["box"][0])),
                     ym = std::lround((double(dets[0]["box"][1]) + double(dets[0]["box"][3])) / 2);
  EXPECT_NEAR(px(drawn, 0, ym, x0), col.r, 1.0 / 255);
  EXPECT_NEAR(px(drawn, 1, ym, x0), col.g, 1.0 / 255);
  EXPECT_NEAR(px(drawn, 2, ym, x0), col.b, 1.0 / 255);
  EXPECT_EQ(new_files(dir, {picture, weights, json, png}), std::vector<std::string>{}) << "no temporary file left";
}

TEST(YoloTools, DetectRunsTheFixturesRandomNetwork) {
  // The mechanics with random weights: whatever the boxes, they are inside the image,
  // over the threshold, most confident first, at most --max-det.
  TempDir dir;
  const std::string picture = write_picture(dir, "scene.jpg");
  const std::string json = dir / "dets.json";
  auto r = run("orepa-detect", "--model " + test::yolo_fixture("model.yaml") + " --weights " + test::yolo_fixture("train_state.safetensors") +
                                   " --image " + picture + " --conf 0.5 --max-det 7 --output-json " + json);
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream jf(json);
  const auto j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["input_size"], (nlohmann::json{480, 640}));
  const auto& dets = j["detections"];
  EXPECT_LE(dets.size(), 7u);
  double last = 1;
  for (const auto& d : dets) {
    EXPECT_FALSE(d.contains("name"));  // no --names
    EXPECT_TRUE(d["class"] >= 0 && d["class"] < 3);
    EXPECT_GT(double(d["confidence"]), 0.5);
    EXPECT_LE(double(d["confidence"]), last);
    last = d["confidence"];
    EXPECT_TRUE(d["box"][0] >= 0.0 && d["box"][0] <= d["box"][2] && d["box"][2] <= 240.0) << d;
    EXPECT_TRUE(d["box"][1] >= 0.0 && d["box"][1] <= d["box"][3] && d["box"][3] <= 180.0) << d;
  }
}

TEST(YoloTools, DetectBenchmarkPrintsEveryStage) {
  TempDir dir;
  const std::string picture = write_picture(dir);
  auto r = run("orepa-detect", "--model " + test::yolo_fixture("model.yaml") + " --weights " + test::yolo_fixture("train_state.safetensors") +
                                   " --image " + picture + " --img-size 320 --benchmark 3");
  ASSERT_EQ(r.status, 0) << r.output;
  std::printf("%s", r.output.c_str());
  EXPECT_NE(r.output.find("3 runs (after 1 warm-up)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("at 320x256"), std::string::npos) << r.output;  // 240 x 180 -> 320 x 240, padded to 256
  for (const char* stage : {"pre-process (decode + letterbox)", "network", "NMS (+ boxes to the image)", "total"}) {
    const auto at = r.output.find(std::string(stage) + " ");
    ASSERT_NE(at, std::string::npos) << stage;
    std::istringstream row(r.output.substr(at + std::strlen(stage)));
    double median = -1, lo = -1, hi = -1;
    row >> median >> lo >> hi;
    EXPECT_TRUE(lo >= 0 && lo <= median && median <= hi) << stage << ": " << median << " " << lo << " " << hi;
  }
  EXPECT_EQ(new_files(dir, {picture}), std::vector<std::string>{});
}

TEST(YoloTools, DetectBadInputIsAClearErrorAndWritesNothing) {
  TempDir dir;
  const std::string good = write_picture(dir);
  std::ifstream gf(good, std::ios::binary);
  const std::string png_bytes((std::istreambuf_iterator<char>(gf)), {});
  auto write = [&](const std::string& name, const std::string& bytes) {
    std::ofstream(dir / name, std::ios::binary) << bytes;
    return dir / name;
  };
  const std::string truncated = write("truncated.png", png_bytes.substr(0, png_bytes.size() / 2));
  const std::string empty = write("empty.png", "");
  const std::string text = write("notes.png", "these are not pixels\n");
  const std::string zero = write("zero.ppm", "P6\n0 0\n255\n");
  const std::vector<std::string> inputs = {good, truncated, empty, text, zero};
  const std::string json = dir / "out.json", png = dir / "out.png";
  const std::string outputs = " --output-json " + json + " --output-image " + png;
  const std::string weights = " --weights " + test::yolo_fixture("train_state.safetensors");
  auto detect = [&](const std::string& model, const std::string& image, const std::string& extra = "") {
    return run("orepa-detect", "--model " + model + weights + " --image " + image + outputs + extra);
  };
  struct Case {
    std::string what;
    test::Run r;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"truncated", detect(test::yolo_fixture("model.yaml"), truncated), {"truncated.png", "truncated image"}},
      {"empty", detect(test::yolo_fixture("model.yaml"), empty), {"empty.png", "empty file (0 bytes)"}},
      {"not an image", detect(test::yolo_fixture("model.yaml"), text), {"notes.png", "not a readable image"}},
      {"zero size", detect(test::yolo_fixture("model.yaml"), zero), {"zero.ppm", "zero size (0x0 pixels)"}},
      {"another yaml", detect(std::string(OREPA_SOURCE_DIR) + "/models/yolov5n-orepa.yaml", good),
       {"train_state.safetensors", "model.0.", "another model yaml"}},
      {"too few names", detect(test::yolo_fixture("model.yaml"), good, " --names '[a, b]'"), {"2 names, but the model has 3 classes"}},
      {"output is the input",
       run("orepa-detect", "--model " + test::yolo_fixture("model.yaml") + weights + " --image " + good + " --output-image " + good),
       {"is the same file as --image"}},
      {"bad extension", detect(test::yolo_fixture("model.yaml"), good, " --output-image " + (dir / "o.gif")), {"o.gif", ".png"}},
      {"int8 without calibration", detect(test::yolo_fixture("model.yaml"), good, " --precision int8"), {"needs --calibration"}},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(c.r.status, 1) << c.what << ": " << c.r.output;
    EXPECT_NE(c.r.output.find("orepa-detect: error: "), std::string::npos) << c.what << ": " << c.r.output;
    for (const auto& p : c.parts) EXPECT_NE(c.r.output.find(p), std::string::npos) << c.what << ": " << p << " in " << c.r.output;
  }
  EXPECT_EQ(new_files(dir, inputs), std::vector<std::string>{}) << "nothing written";
}

#else
TEST(YoloTools, SkippedWithoutExamples) { GTEST_SKIP() << "configure with OREPA_BUILD_EXAMPLES=ON to test the tools"; }
#endif
