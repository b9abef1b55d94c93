// Tests of the module tree of the YOLOv5 network (yolo/model.hpp's ModuleTraits and
// DeployedModel printing, blocks/module_tree.hpp): a small ConvBN network printed line by
// line against counts worked out by hand, the fixture network's total against its README,
// named_modules against the state-dict prefixes, and the deployed graph naming the layer
// at fault.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "orepa/yolo/yolo.hpp"
#include "test_util.hpp"

using namespace orepa;

namespace {

const char* printing_yaml = R"(
nc: 2
depth_multiple: 1.0
width_multiple: 1.0
anchors:
  - [4, 5, 8, 10]
  - [12, 14, 20, 16]
backbone:
  [[-1, 1, Conv, [8, 3, 2]],
   [-1, 1, Conv, [16, 3, 2]],
   [-1, 1, C3, [16]],
   [-1, 1, SPPF, [16, 3]],
  ]
head:
  [[-1, 1, nn.Upsample, [None, 2, 'nearest']],
   [[-1, 0], 1, Concat, [1]],
   [-1, 1, C3, [16, False]],
   [[6, 3], 1, Detect, [nc, anchors]],
  ]
)";

yolo::Model<float> printing_model() {
  return yolo::Model<float>(yolo::parse_model_config(printing_yaml, "printing.yaml"),
                            yolo::ModelOptions<float>().blocks("convbn"));
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

template <class M>
std::string print_of(const M& m) {
  std::ostringstream os;
  os << m;
  return os.str();
}

}  // namespace

TEST(YoloPrinting, SmallModelLineByLine) {
  auto model = printing_model();
  // By hand, ConvBN(I, O, k) = O I k k + 2 O; Detect per level 14 * 16 + 14 (na (5 + nc) = 14).
  const std::int64_t total = 232 + 1184 + 1248 + 688 + 1376 + 2 * (14 * 16 + 14);
  std::int64_t counted = 0;
  for (auto* p : model.parameters()) counted += p->value.numel();
  ASSERT_EQ(counted, total);
  const std::vector<std::string> expected = {
      "DetectionModel(  # 5204 parameters",
      "  nc=2, ch=3",
      "  (model.0): ConvBN(3, 8, kernel_size=3, stride=2, padding=1, act=SiLU)  # 232 parameters",
      "  (model.1): ConvBN(8, 16, kernel_size=3, stride=2, padding=1, act=SiLU)  # 1184 parameters",
      "  (model.2): C3(  # 1248 parameters",
      "    16, 16, n=1, hidden=8",
      "    (cv1): ConvBN(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 144 parameters",
      "    (cv2): ConvBN(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 144 parameters",
      "    (cv3): ConvBN(16, 16, kernel_size=1, stride=1, padding=0, act=SiLU)  # 288 parameters",
      "    (m.0): Bottleneck(  # 672 parameters",
      "      8, 8, residual=true",
      "      (cv1): ConvBN(8, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 80 parameters",
      "      (cv2): ConvBN(8, 8, kernel_size=3, stride=1, padding=1, act=SiLU)  # 592 parameters",
      "    )",
      "  )",
      "  (model.3): SPPF(  # 688 parameters",
      "    16, 16, k=3",
      "    (cv1): ConvBN(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 144 parameters",
      "    (cv2): ConvBN(32, 16, kernel_size=1, stride=1, padding=0, act=SiLU)  # 544 parameters",
      "  )",
      "  (model.4): Upsample(scale_factor=2, mode=nearest)",
      "  (model.5): Concat(dimension=1, from=[-1, 0])",
      "  (model.6): C3(  # 1376 parameters",
      "    24, 16, n=1, hidden=8",
      "    (cv1): ConvBN(24, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 208 parameters",
      "    (cv2): ConvBN(24, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 208 parameters",
      "    (cv3): ConvBN(16, 16, kernel_size=1, stride=1, padding=0, act=SiLU)  # 288 parameters",
      "    (m.0): Bottleneck(  # 672 parameters",
      "      8, 8, residual=false",
      "      (cv1): ConvBN(8, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 80 parameters",
      "      (cv2): ConvBN(8, 8, kernel_size=3, stride=1, padding=1, act=SiLU)  # 592 parameters",
      "    )",
      "  )",
      "  (model.7): Detect(nc=2, anchors=2, ch=[16, 16], strides=[2, 4])  # 476 parameters",
      ")"};
  EXPECT_EQ(lines_of(print_of(model)), expected);
}

TEST(YoloPrinting, DeployedModelLinesAndCounts) {
  const auto deployed = printing_model().deploy();
  // Deployed convolutions: O I k k + O each (BN folded into a bias).
  const std::int64_t total = 224 + 1168 + 1200 + 664 + 1328 + 2 * (14 * 16 + 14);
  EXPECT_EQ(deployed.num_parameters(), total);
  const auto lines = lines_of(print_of(deployed));
  ASSERT_GE(lines.size(), 8u);
  EXPECT_EQ(lines[0], "DeployedModel(  # " + std::to_string(total) + " parameters");
  EXPECT_EQ(lines[1], "  (model.0): DeployedConv(3, 8, kernel_size=3, stride=2, padding=1, act=SiLU, fp32)  # 224 parameters");
  EXPECT_EQ(lines[3], "  (model.2): DeployedC3(  # 1200 parameters");
  EXPECT_EQ(lines[5], "    (m.0.cv1): DeployedConv(8, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 72 parameters");
  const std::vector<std::string> tail = {
      "  (model.4): DeployedUpsample()",
      "  (model.5): Concat(dimension=1, from=[4, 0])",
      "  (model.6): DeployedC3(  # 1328 parameters",
  };
  auto at = std::find(lines.begin(), lines.end(), tail[0]);
  ASSERT_NE(at, lines.end());
  EXPECT_EQ(std::vector<std::string>(at, at + 3), tail);
  const std::vector<std::string> head = {
      "  (model.7): DeployedDetect(  # 476 parameters",
      "    (m.0): DeployedConv(16, 14, kernel_size=1, stride=1, padding=0, act=Identity, fp32)  # 238 parameters",
      "    (m.1): DeployedConv(16, 14, kernel_size=1, stride=1, padding=0, act=Identity, fp32)  # 238 parameters",
      "  )",
      ")"};
  EXPECT_EQ(std::vector<std::string>(lines.end() - 5, lines.end()), head);
}

TEST(YoloPrinting, FixtureModelTotalAndNamedModulesFollowTheStateDict) {
  auto model = yolo::load_model(yolo::read_model_config(test::yolo_fixture("model.yaml")),
                                io::SafetensorsFile::open(test::yolo_fixture("train_state.safetensors")));
  const auto lines = lines_of(print_of(model));
  ASSERT_GE(lines.size(), 3u);
  EXPECT_EQ(lines[0], "DetectionModel(  # 1398872 parameters");  // the README's count of the training form
  EXPECT_EQ(lines[1], "  nc=3, ch=3");
  // The stem: Conv [64, 6, 2, 2] at width 0.125, 8 * 3 * 6 * 6 kernel values and 2 * 8 of BN.
  EXPECT_EQ(lines[2], "  (model.0): ConvBN(3, 8, kernel_size=6, stride=2, padding=2, act=SiLU)  # " +
                          std::to_string(8 * 3 * 36 + 16) + " parameters");
  // Every tensor lies under a module without children, and the parameters come module by
  // module in named_modules' order.
  const auto named = named_modules(model);
  EXPECT_EQ(named[0].first, "");
  EXPECT_EQ(named[1].first, "model.0");
  std::vector<std::string> leaves;
  for (const auto& [name, m] : named) {
    bool children = false;
    ModuleVisitor<float> v([&](const std::string&, const ModuleRef<float>&) { children = true; });
    m.visit_children(v);
    if (!children && m.num_parameters() > 0) leaves.push_back(name + ".");
  }
  std::vector<std::string> seen;
  for (const auto& [tensor, p] : model.named_parameters()) {
    std::string owner;
    for (const auto& l : leaves)
      if (tensor.compare(0, l.size(), l) == 0) owner = l;
    ASSERT_FALSE(owner.empty()) << tensor;
    if (seen.empty() || seen.back() != owner) seen.push_back(owner);
  }
  EXPECT_EQ(seen, leaves);
  EXPECT_EQ(named.back().first, "model.24");
  EXPECT_EQ(named.back().second.target<yolo::Detect<float>>(), &model.detect());
}

TEST(YoloPrinting, DeployedModelNamesTheLayerAtFault) {
  const auto deployed = printing_model().deploy();
  try {
    deployed.forward(Tensor<float>({1, 5, 32, 32}));
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), "DeployedModel[model.0] (DeployedConv): input must be [N, 3, H, W], got [1, 5, 32, 32]");
  }
}
