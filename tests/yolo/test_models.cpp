// Tests of the model yamls shipped in models/ (YOLOv5n / YOLOv5s in the v6.0 / v7.0
// layout and their OREPA variants): each builds, has YOLOv5's strides and parameter
// counts, and the OREPA variant is the network of the PyTorch recipe's fixture.
#include <gtest/gtest.h>

#include <string>

#include "orepa/yolo/yolo.hpp"

using namespace orepa;

namespace {

std::string model_file(const std::string& name) { return std::string(OREPA_SOURCE_DIR) + "/models/" + name; }

std::int64_t parameter_count(yolo::Model<float>& m) {
  std::int64_t n = 0;
  for (auto* p : m.parameters()) n += p->value.numel();
  return n;
}

struct Expected {
  const char* file;
  std::int64_t train_params;   // YOLOv5's model summary of the yaml (BN weight and bias counted)
  std::int64_t folded_params;  // after fuse(): every BN folded into its conv's weight and bias
};

// YOLOv5 v7.0 prints "1872157 parameters" for yolov5n.yaml and "7235389" for yolov5s.yaml
// (nc 80), and 1867405 / 7225885 for the fused models (the published summaries). The
// same numbers follow from the layout: each Conv has c1 c2 k^2 weights plus 2 c2 for its
// BN (c2 bias when fused), Detect 3 (85) (c + 1) per level; summed over the yolov5n
// layers with width 0.25 that is 1,872,157, and fusing removes one per output channel
// of every Conv (4,752 in yolov5n, 9,504 in yolov5s).
const Expected plain_models[] = {{"yolov5n.yaml", 1872157, 1867405}, {"yolov5s.yaml", 7235389, 7225885}};

}  // namespace

TEST(ShippedModels, PlainYolov5HasThePublishedParameterCountsAndStrides) {
  for (const auto& e : plain_models) {
    SCOPED_TRACE(e.file);
    yolo::Model<float> model(yolo::read_model_config(model_file(e.file)));
    EXPECT_EQ(model.size(), 25u);
    EXPECT_EQ(model.classes(), 80);
    EXPECT_EQ(model.strides(), (std::vector<double>{8, 16, 32}));
    EXPECT_EQ(model.saved_layers(), (std::vector<std::size_t>{4, 6, 10, 14, 17, 20, 23}));
    EXPECT_EQ(parameter_count(model), e.train_params);
    EXPECT_EQ(model.batch_norms().size(), 57u);  // 57 Conv layers (the fixture's 57 blocks)
    EXPECT_EQ(model.deploy().num_parameters(), e.folded_params);
    // Anchors in grid units: P3's first (10, 13) pixels at stride 8.
    EXPECT_FLOAT_EQ(model.detect().anchors()[0], 10.f / 8.f);
    EXPECT_FLOAT_EQ(model.detect().anchors()[1], 13.f / 8.f);
    EXPECT_FLOAT_EQ(model.detect().anchors()[2 * 3 * 2 + 5], 326.f / 32.f);
  }
}

TEST(ShippedModels, OrepaVariantsReplaceTheTopLevelConvsButNotTheStem) {
  for (const auto& e : plain_models) {
    const std::string file = std::string(e.file).replace(7, 5, "-orepa.yaml");
    SCOPED_TRACE(file);
    const auto cfg = yolo::read_model_config(model_file(file));
    yolo::Model<float> model(cfg);
    EXPECT_EQ(model.strides(), (std::vector<double>{8, 16, 32}));
    EXPECT_EQ(model.layer(0).type_name(), "ConvBN");
    for (std::size_t i : {1, 3, 5, 7, 18, 21}) EXPECT_EQ(model.layer(i).type_name(), "OREPA") << i;
    for (std::size_t i : {10, 14}) EXPECT_EQ(model.layer(i).type_name(), "OREPA_1x1") << i;
    // Training form: more parameters than plain YOLOv5 (the branches); deployed: the
    // same network as the fused plain one.
    EXPECT_GT(parameter_count(model), e.train_params);
    EXPECT_EQ(model.deploy().num_parameters(), e.folded_params);
    // The recipe that replaces every conv but the stem (inside C3 and SPPF too) deploys
    // to the same count.
    yolo::Model<float> all(cfg, yolo::ModelOptions<float>().blocks("orepa"));
    EXPECT_EQ(all.layer(0).type_name(), "ConvBN");
    EXPECT_EQ(all.deploy().num_parameters(), e.folded_params);
  }
}

TEST(ShippedModels, Yolov5nOrepaIsTheFixtureNetworkAtItsWidthAndClasses) {
  // The fixture (tests/data/yolov5n_orepa) is YOLOv5n-OREPA with nc 3 and width 0.125,
  // made by YOLOv5's own builder: the shipped yaml with those two values builds exactly
  // its tensors, and computes its outputs.
  auto cfg = yolo::read_model_config(model_file("yolov5n-orepa.yaml"));
  cfg.width_multiple = 0.125;
  yolo::Model<float> model(cfg, yolo::ModelOptions<float>().blocks("orepa").classes(3));
  const std::string dir = std::string(OREPA_TEST_DATA_DIR) + "/yolov5n_orepa/";
  ASSERT_NO_THROW(io::load_state_dict(model, io::SafetensorsFile::open(dir + "train_state.safetensors")));
  const auto io_file = io::SafetensorsFile::open(dir + "io.safetensors");
  const auto pred = model.forward_eval(io_file.get<float>("input.b")).pred;
  const auto ref = io_file.get<float>("ref64.b.pred");
  double scale = 0;
  for (float v : ref) scale = std::max(scale, double(std::abs(v)));
  EXPECT_LT(max_abs_diff(pred, ref), 2e-3 * scale);
}

TEST(ShippedModels, ADeployedYolov5nRunsAt64x64) {
  yolo::Model<float> model(yolo::read_model_config(model_file("yolov5n.yaml")));
  Tensor<float> x({1, 3, 64, 96});
  Rng rng(1);
  fill_uniform(x, 1.0, rng);
  const auto out = model.deploy().forward(x);
  // 3 anchors on 8x12, 4x6 and 2x3 cells, 85 values each.
  EXPECT_EQ(out.pred.sizes(), (Shape{1, 3 * (96 + 24 + 6), 85}));
  const auto eval = model.forward_eval(x).pred;
  double scale = 0;
  for (float v : eval) scale = std::max(scale, double(std::abs(v)));
  EXPECT_LT(max_abs_diff(out.pred, eval), 1e-4 * scale);
}

TEST(ShippedModels, MultiplesBeyondAnyNetworkAreRejectedBeforeBuilding) {
  // Found by reading the builder for fuzz_model_yaml: the scaled sizes were cast to
  // integers unchecked (undefined for 64 x 1e300).
  auto text = [](const std::string& depth, const std::string& width) {
    return "nc: 2\ndepth_multiple: " + depth + "\nwidth_multiple: " + width +
           "\nanchors: [[4, 5]]\nbackbone: [[-1, 1, Conv, [64, 3, 2]], [-1, 3, C3, [64]]]\nhead: [[-1, 1, Detect, [nc, anchors]]]\n";
  };
  auto error = [](const std::string& yaml) -> std::string {
    try {
      yolo::Model<float> m(yolo::parse_model_config(yaml, "huge.yaml"));
    } catch (const config_error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string wide = error(text("1", "1e300"));
  EXPECT_NE(wide.find("huge.yaml: layer 0 (Conv): output channels 64 x width_multiple 1e+300"), std::string::npos) << wide;
  EXPECT_NE(wide.find("is too large"), std::string::npos) << wide;
  const std::string deep = error(text("1e300", "1"));
  EXPECT_NE(deep.find("huge.yaml: layer 1 (C3): repeats 3 x depth_multiple 1e+300"), std::string::npos) << deep;
  EXPECT_NE(deep.find("exceed 1000"), std::string::npos) << deep;
  EXPECT_EQ(yolo::scaled_repeats(3, 0.33), 1);
  EXPECT_EQ(yolo::scaled_repeats(9, 0.33), 3);
  EXPECT_EQ(yolo::scaled_repeats(1000, 1.0), 1000);
  EXPECT_THROW(yolo::scaled_repeats(1000, 1.001), config_error);
}
