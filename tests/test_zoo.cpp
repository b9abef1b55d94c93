// Whole-model conversion of the reference model zoo's arrangements: small-width networks
// of the library's blocks under the reference's module names (ResNet basic and bottleneck
// stages with an OREPA_LargeConv stem and OREPA_1x1 shortcuts, a ResNeXt stage with groups
// 32, a RepVGG stage, and the same arrangements with DBB and ConvBN), trained a few steps
// so the BN statistics are not trivial, saved with the library's writer, converted by
// orepa-convert, then checked block by block: every deployed conv against its block's
// eval forward, and the converted file holds exactly the deployed names (SPEC section 6)
// plus the tensors that belong to no block.
#include <functional>
#include <memory>
#include <set>

#include "orepa/io/checkpoint.hpp"
#include "test_util.hpp"

using namespace orepa;

#ifdef OREPA_TOOLS_DIR
namespace {

// One block of a network: its name prefix, reference class and what the test does with it.
struct ZooBlock {
  std::string prefix;
  io::BlockType type;
  ConvGeometry geometry;
  std::function<void(Rng&)> train;                                  // a few SGD steps
  std::function<void(io::SafetensorsWriter&)> save;                 // its state dict under prefix
  std::function<double(const io::SafetensorsFile&, Rng&)> check;    // deployed-from-file vs eval, max rel diff
};

template <class Block>
ZooBlock zoo_block(std::string prefix, io::BlockType type, Block block) {
  auto b = std::make_shared<Block>(std::move(block));
  ZooBlock z{prefix, type, b->geometry(), {}, {}, {}};
  const ConvGeometry g = b->geometry();
  auto input = [g](Rng& rng) {
    const std::int64_t h = 5 * g.stride + 3;  // small, and at least one output pixel per stride
    return test::random_tensor<float>({2, g.in_channels, h, h}, rng);
  };
  z.train = [b, input](Rng& rng) {
    for (int step = 0; step < 3; ++step) {
      const auto x = input(rng);
      const auto& y = b->forward_train(x);
      b->zero_grad();
      b->backward(test::random_tensor<float>(y.sizes(), rng));
      for (auto* p : b->parameters())
        for (std::int64_t j = 0; j < p->value.numel(); ++j) p->value[j] -= 0.05f * p->grad[j];
    }
  };
  z.save = [b, prefix](io::SafetensorsWriter& w) { io::save_state_dict(*b, w, prefix); };
  z.check = [b, prefix, type, g, input](const io::SafetensorsFile& f, Rng& rng) {
    const std::string stem = prefix + io::deployed_stem(type);
    const auto deployed = b->deploy();  // the activation the block deploys with
    using Deployed = std::decay_t<decltype(deployed)>;
    const Deployed from_file(g, f.get<float>(stem + ".weight"), f.get<float>(stem + ".bias"), deployed.activation());
    const auto x = input(rng);
    const auto want = b->forward_eval(x);
    double scale = 1;
    for (float v : want) scale = std::max(scale, double(std::abs(v)));
    return max_abs_diff(from_file.forward(x), want) / scale;
  };
  return z;
}

// Which block family builds a network (the reference's OREPA, DBB or ConvBN mode).
enum class Mode { orepa, dbb, convbn };
const char* mode_name(Mode m) { return m == Mode::orepa ? "OREPA" : m == Mode::dbb ? "DBB" : "ConvBN"; }

// The zoo's conv_bn(c1, c2, k, s, g): OREPA_1x1 / OREPA_LargeConv / OREPA by kernel size in
// OREPA mode, DBB for k > 1 in DBB mode (a 1x1 stays a ConvBN, as in the DBB paper), ConvBN.
template <class Act>
ZooBlock conv_bn(Mode mode, const std::string& prefix, std::int64_t c1, std::int64_t c2, std::int64_t k,
                 std::int64_t s = 1, std::int64_t g = 1) {
  const std::uint64_t seed = std::hash<std::string>{}(prefix) % 1000;
  const auto opts = ConvOptions(c1, c2, k).stride(s).groups(g).seed(seed);
  using T = io::BlockType;
  if (mode == Mode::orepa) {
    if (k == 1) return zoo_block(prefix, T::OREPA_1x1, OREPA_1x1<float, Act>(opts));
    if (k >= 7) return zoo_block(prefix, T::OREPA_LargeConv, OREPA_LargeConv<float, Act>(opts));
    return zoo_block(prefix, T::OREPA, OREPA<float, Act>(OrepaOptions(opts)));
  }
  if (mode == Mode::dbb && k > 1) return zoo_block(prefix, T::DBB, DBB<float, Act>(DbbOptions(opts)));
  return zoo_block(prefix, T::ConvBN, ConvBN<float, Act>(opts));
}

// ResNet-18/34 style: 7x7 stride-2 stem, a basic block at stride 1, a widening basic block
// at stride 2 with a 1x1 shortcut.
std::vector<ZooBlock> resnet_basic(Mode m) {
  return {conv_bn<ReLU>(m, "stage0.conv1.", 3, 8, 7, 2),       conv_bn<ReLU>(m, "stage1.0.conv1.", 8, 8, 3),
          conv_bn<Identity>(m, "stage1.0.conv2.", 8, 8, 3),    conv_bn<ReLU>(m, "stage2.0.conv1.", 8, 16, 3, 2),
          conv_bn<Identity>(m, "stage2.0.conv2.", 16, 16, 3), conv_bn<Identity>(m, "stage2.0.shortcut.", 8, 16, 1, 2)};
}
// ResNet-50/101 style bottleneck at stride 2: 1x1 reduce, 3x3 stride 2, 1x1 expand, shortcut.
std::vector<ZooBlock> resnet_bottleneck(Mode m) {
  return {conv_bn<ReLU>(m, "stage1.0.conv1.", 16, 8, 1), conv_bn<ReLU>(m, "stage1.0.conv2.", 8, 8, 3, 2),
          conv_bn<Identity>(m, "stage1.0.conv3.", 8, 32, 1), conv_bn<Identity>(m, "stage1.0.shortcut.", 16, 32, 1, 2)};
}
// ResNeXt-50 32x4d style: the 3x3 has 32 groups (2 channels each here), which gives OREPA
// internal channels 2I by the reference rule (groups > 4).
std::vector<ZooBlock> resnext(Mode m) {
  return {conv_bn<ReLU>(m, "stage1.0.conv1.", 32, 64, 1), conv_bn<ReLU>(m, "stage1.0.conv2.", 64, 64, 3, 1, 32),
          conv_bn<Identity>(m, "stage1.0.conv3.", 64, 32, 1)};
}
// RepVGG-A style: a stage opening at stride 2 with the same width (no identity path, 5-row
// vector), then identity blocks; the next stage widens at stride 2.
std::vector<ZooBlock> repvgg() {
  auto block = [](const std::string& prefix, std::int64_t c1, std::int64_t c2, std::int64_t s) {
    return zoo_block(prefix, io::BlockType::RepVGGBlock_OREPA,
                     RepVGGBlock_OREPA<float, ReLU>(RepVGGOptions(c1, c2, 3).stride(s).seed(std::uint64_t(c1 + c2 + s))));
  };
  return {block("stage0.0.", 3, 8, 2),  block("stage1.0.", 8, 8, 2),   block("stage1.1.", 8, 8, 1),
          block("stage2.0.", 8, 16, 2), block("stage2.1.", 16, 16, 1)};
}

// Trains, saves, converts and checks one arrangement; returns the worst relative
// deployed-vs-eval difference.
double convert_and_check(const std::string& what, std::vector<ZooBlock> blocks) {
  Rng rng(11);
  io::SafetensorsWriter w;
  for (auto& b : blocks) {
    b.train(rng);
    b.save(w);
  }
  w.add("linear.weight", test::random_tensor<float>({4, 16}, rng));  // a head that is no block
  w.add("linear.bias", Tensor<float>({4}, 0.5f));
  test::TempDir dir;
  w.write(dir / "train.safetensors");
  const auto r = test::run("orepa-convert", (dir / "train.safetensors") + " " + (dir / "deploy.safetensors"));
  EXPECT_EQ(r.status, 0) << what << ": " << r.output;
  if (r.status != 0) return 1;
  const auto f = io::SafetensorsFile::open(dir / "deploy.safetensors");
  std::set<std::string> want{"linear.weight", "linear.bias"};
  double worst = 0;
  for (auto& b : blocks) {
    const std::string stem = b.prefix + io::deployed_stem(b.type);
    want.insert(stem + ".weight");
    want.insert(stem + ".bias");
    const double diff = b.check(f, rng);
    EXPECT_LE(diff, 1e-5) << what << " " << b.prefix << " deployed vs eval";
    worst = std::max(worst, diff);
  }
  const auto names = f.names();
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), want) << what << ": exactly the deployed names";
  std::printf("  %-28s %zu blocks, worst deployed-vs-eval relative difference %.2e\n", what.c_str(), blocks.size(),
              worst);
  ::testing::Test::RecordProperty("worst_deployed_vs_eval", std::to_string(worst));
  return worst;
}

}  // namespace

class ZooConversion : public ::testing::TestWithParam<Mode> {};

TEST_P(ZooConversion, ResNetBasicStage) { convert_and_check(std::string("ResNet basic, ") + mode_name(GetParam()), resnet_basic(GetParam())); }
TEST_P(ZooConversion, ResNetBottleneckStage) {
  convert_and_check(std::string("ResNet bottleneck, ") + mode_name(GetParam()), resnet_bottleneck(GetParam()));
}
TEST_P(ZooConversion, ResNeXtStage) { convert_and_check(std::string("ResNeXt g32, ") + mode_name(GetParam()), resnext(GetParam())); }

INSTANTIATE_TEST_SUITE_P(Modes, ZooConversion, ::testing::Values(Mode::orepa, Mode::dbb, Mode::convbn),
                         [](const auto& info) { return std::string(mode_name(info.param)); });

TEST(ZooConversion, RepVGGStageWithStride2SameWidthBlocks) { convert_and_check("RepVGG stage", repvgg()); }

// The converter reads the structure from the tensors alone: the same trained tensors
// convert to the same deployed ones whatever stride, padding or dilation the block ran at.
TEST(ZooConversion, DeployedTensorsDoNotDependOnTheTrainingStride) {
  auto deployed_of = [](auto block, const std::string& stem) {
    Rng rng(5);
    test::randomise(block, rng);
    io::SafetensorsWriter w;
    io::save_state_dict(block, w, "m.");
    test::TempDir dir;
    w.write(dir / "t.safetensors");
    EXPECT_EQ(test::run("orepa-convert", (dir / "t.safetensors") + " " + (dir / "d.safetensors")).status, 0);
    const auto f = io::SafetensorsFile::open(dir / "d.safetensors");
    auto [w_ref, b_ref] = block.folded();
    test::expect_close(f.get<float>("m." + stem + ".weight"), w_ref, 1e-6, stem);
    return std::pair{f.get<float>("m." + stem + ".weight"), f.get<float>("m." + stem + ".bias")};
  };
  const auto a = deployed_of(OREPA<float>(OrepaOptions(6, 6, 3).seed(1)), "orepa_reparam");
  const auto b = deployed_of(OREPA<float>(OrepaOptions(6, 6, 3).stride(2).dilation(2).padding(0).seed(1)), "orepa_reparam");
  EXPECT_EQ(max_abs_diff(a.first, b.first), 0.0);
  EXPECT_EQ(max_abs_diff(a.second, b.second), 0.0);
  // RepVGG at stride 2 with equal widths has no identity path: its tensors say so.
  const auto s2 = deployed_of(RepVGGBlock_OREPA<float>(RepVGGOptions(6, 6, 3).stride(2).seed(2)), "rbr_reparam");
  const auto forced = deployed_of(RepVGGBlock_OREPA<float>(RepVGGOptions(6, 6, 3).identity(false).seed(2)), "rbr_reparam");
  EXPECT_EQ(max_abs_diff(s2.first, forced.first), 0.0);
  EXPECT_EQ(max_abs_diff(s2.second, forced.second), 0.0);
}

// Tensors that cannot form the block they claim to be: the reader names them.
TEST(ZooConversion, InconsistentStructureIsAFormatErrorNamingTheTensors) {
  RepVGGBlock_OREPA<float> id(RepVGGOptions(4, 4, 3));
  io::SafetensorsWriter w;
  const auto sd = id.state_dict();
  for (const auto& n : sd.names())
    if (!sd.is_count(n) && n != "rbr_dense.vector") w.add("r." + n, sd.tensor(n));
  w.add("r.rbr_dense.vector", Tensor<float>({5, 4}));  // an identity path needs 6 rows
  OREPA_LargeConv<float> large(ConvOptions(3, 4, 5));
  io::save_state_dict(large, w, "l.");
  w.add("l.weight3.weight_orepa_origin", Tensor<float>({4, 4, 3, 3}));  // weight2 missing
  const auto f = io::SafetensorsFile::from_bytes(w.to_bytes(), "net.safetensors");
  auto expect_format_error = [&](const std::string& prefix, io::BlockType t, const std::vector<std::string>& parts) {
    try {
      (void)io::load_block(f, prefix, t, {}, io::LoadPurpose::convert);
      ADD_FAILURE() << prefix << ": expected format_error";
    } catch (const format_error& e) {
      for (const auto& part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_format_error("r.", io::BlockType::RepVGGBlock_OREPA, {"r.rbr_dense.vector", "5 rows", "r.rbr_identity.*"});
  expect_format_error("l.", io::BlockType::OREPA_LargeConv, {"l.weight3.weight_orepa_origin", "do not belong"});
}
#else
TEST(ZooConversion, SkippedWithoutExamples) { GTEST_SKIP() << "configure with OREPA_BUILD_EXAMPLES=ON to run orepa-convert"; }
#endif
