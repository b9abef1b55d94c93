// Tests of the module tree (blocks/module_tree.hpp, deploy/printing.hpp): the printed form
// of small networks line by line against their known channels, kernels and parameter
// counts (worked out by hand, and cross-checked against the state dict's sizes);
// named_modules() against the state-dict prefixes; module paths in errors
// (core/error_path.hpp) from a Sequential of C3s, an InferenceChain and a DeployedChain.
#include <gtest/gtest.h>

#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "orepa/deploy/onednn_interop.hpp"
#include "orepa/orepa.hpp"

using namespace orepa;

namespace {

std::vector<std::string> printed_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

template <class M>
std::string printed(const M& m) {
  std::ostringstream os;
  os << m;
  return os.str();
}

// Trainable values under `prefix` counted from the state dict: every tensor entry except
// the module's buffers (running statistics, priors, identity tensors).
template <class M>
std::int64_t state_dict_parameters(M& m, const std::string& prefix) {
  std::set<std::string> buffers;
  for (const auto& [name, p] : m.named_buffers()) buffers.insert(name);
  std::int64_t n = 0;
  for (const auto& [name, e] : m.state_dict())
    if (name.compare(0, prefix.size(), prefix) == 0 && e.is_tensor() && !buffers.count(name)) n += e.tensor().numel();
  return n;
}

// ConvBN stem, a C3 of ConvBN blocks, pooling and a linear head: every count by hand.
Sequential<float> convbn_net() {
  Sequential<float> net;
  net.add(ConvBN<float, SiLU>(ConvOptions(3, 16, 3).stride(2)));
  net.add(C3<float>(16, 16, 1, true, 0.5, 0, maker_of<ConvBN, float, SiLU>()));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(16, 10));
  return net;
}

// Four layers of the OREPA family, the last two C3s.
Sequential<float> orepa_c3_net() {
  Sequential<float> net;
  net.add(yolo_conv<float>(ConvOptions(3, 16, 3)));
  net.add(yolo_conv<float>(ConvOptions(16, 16, 1)));
  net.add(C3<float>(16, 16, 1, true, 0.5, 1));
  net.add(C3<float>(16, 16, 1, true, 0.5, 2));
  return net;
}

}  // namespace

TEST(Printing, SequentialOfConvBNAndC3LineByLine) {
  auto net = convbn_net();
  // By hand: ConvBN(I, O, k) holds O I k k kernel values and 2 O of BN; Linear 16 * 10 + 10.
  const std::int64_t stem = 16 * 3 * 9 + 32, cv12 = 8 * 16 + 16, cv3 = 16 * 16 + 32, m_cv1 = 8 * 8 + 16,
                     m_cv2 = 8 * 8 * 9 + 16, head = 170;
  const std::int64_t c3 = 2 * cv12 + cv3 + m_cv1 + m_cv2, total = stem + c3 + head;
  ASSERT_EQ(total, 1882);
  EXPECT_EQ(state_dict_parameters(net, ""), total);
  EXPECT_EQ(state_dict_parameters(net, "1."), c3);
  EXPECT_EQ(state_dict_parameters(net, "1.m.0."), m_cv1 + m_cv2);
  const std::vector<std::string> expected = {
      "Sequential(  # 1882 parameters",
      "  (0): ConvBN(3, 16, kernel_size=3, stride=2, padding=1, act=SiLU)  # 464 parameters",
      "  (1): C3(  # 1248 parameters",
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
      "  (2): GlobalAvgPool()",
      "  (3): Linear(in_features=16, out_features=10)  # 170 parameters",
      ")"};
  EXPECT_EQ(printed_lines(printed(net)), expected);
  // A child prints alone the same way; an AnyBlock prints the block it holds.
  EXPECT_EQ(printed(net.layer(0)), "ConvBN(3, 16, kernel_size=3, stride=2, padding=1, act=SiLU)  # 464 parameters");
  EXPECT_EQ(printed(net.get<Linear<float>>(3)), "Linear(in_features=16, out_features=10)  # 170 parameters");
}

TEST(Printing, EveryBlockTypeShowsItsGeometryActivationAndCount) {
  OREPA<float, ReLU> orepa(OrepaOptions(8, 16, 3).stride(2).groups(2));
  OREPA_1x1<float, SiLU> or1x1(ConvOptions(8, 16, 1));
  OREPA_LargeConv<float, SiLU> large(ConvOptions(8, 8, 7));
  RepVGGBlock_OREPA<float> repvgg(RepVGGOptions(8, 8, 3));
  ConvBN<float> convbn(ConvOptions(8, 4, 5).padding(1).dilation(2));
  DBB<float, SiLU> dbb(DbbOptions(8, 16, 3).groups(4));
  auto line = [](auto& block, const std::string& settings) {
    return block.type_name() + "(" + settings + ")  # " + std::to_string(state_dict_parameters(block, "")) +
           " parameters";
  };
  EXPECT_EQ(printed(orepa), line(orepa, "8, 16, kernel_size=3, stride=2, padding=1, groups=2, act=ReLU"));
  EXPECT_EQ(printed(or1x1), line(or1x1, "8, 16, kernel_size=1, stride=1, padding=0, act=SiLU"));
  EXPECT_EQ(printed(large), line(large, "8, 8, kernel_size=7, stride=1, padding=3, act=SiLU"));
  EXPECT_EQ(printed(repvgg), line(repvgg, "8, 8, kernel_size=3, stride=1, padding=1, act=ReLU"));
  EXPECT_EQ(printed(convbn), line(convbn, "8, 4, kernel_size=5, stride=1, padding=1, dilation=2, act=Identity"));
  EXPECT_EQ(printed(dbb), line(dbb, "8, 16, kernel_size=3, stride=1, padding=1, groups=4, act=SiLU"));
  EXPECT_EQ(printed(convbn), "ConvBN(8, 4, kernel_size=5, stride=1, padding=1, dilation=2, act=Identity)  # " +
                                 std::to_string(4 * 8 * 25 + 8) + " parameters");
  EXPECT_EQ(printed(orepa).rfind("OREPA(", 0), 0u);
  EXPECT_EQ(printed(repvgg).rfind("RepVGGBlock_OREPA(", 0), 0u);
}

TEST(Printing, InferenceChainListsEachStagesConvolutions) {
  const auto chain = convbn_net().deploy();
  // Deployed: a kernel and a bias per convolution (BN folded), the linear head as it was.
  const std::vector<std::string> expected = {
      "InferenceChain(  # 1818 parameters",
      "  (0): DeployedConv(3, 16, kernel_size=3, stride=2, padding=1, act=SiLU, fp32)  # 448 parameters",
      "  (1): DeployedC3(  # 1200 parameters",
      "    (cv1): DeployedConv(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 136 parameters",
      "    (m.0.cv1): DeployedConv(8, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 72 parameters",
      "    (m.0.cv2): DeployedConv(8, 8, kernel_size=3, stride=1, padding=1, act=SiLU, fp32)  # 584 parameters",
      "    (cv2): DeployedConv(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 136 parameters",
      "    (cv3): DeployedConv(16, 16, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 272 parameters",
      "  )",
      "  (2): GlobalAvgPool()",
      "  (3): Linear()  # 170 parameters",
      ")"};
  EXPECT_EQ(printed_lines(printed(chain)), expected);
  EXPECT_EQ(448 + 136 + 72 + 584 + 136 + 272 + 170, chain.num_parameters());
  const auto bf16 = convbn_net().deploy(DeployOptions().precision(Precision::bf16));
  EXPECT_EQ(printed(bf16.stage(0)), "DeployedConv(3, 16, kernel_size=3, stride=2, padding=1, act=SiLU, bf16)  # 448 parameters");
}

TEST(Printing, NamedModulesFollowTheStateDictPrefixes) {
  auto net = orepa_c3_net();
  const auto named = named_modules(net);
  std::vector<std::string> names;
  for (const auto& [name, m] : named) names.push_back(name);
  const std::vector<std::string> expected = {
      "",        "0",          "1",       "2",       "2.cv1",   "2.cv2",      "2.cv3",
      "2.m.0",   "2.m.0.cv1",  "2.m.0.cv2", "3",     "3.cv1",   "3.cv2",      "3.cv3",
      "3.m.0",   "3.m.0.cv1",  "3.m.0.cv2"};
  EXPECT_EQ(names, expected);
  // The modules without children (the blocks) own the state dict's tensors: in order, each
  // under its own name as prefix, and together all of them.
  std::vector<std::string> leaves, first_seen;
  for (const auto& [name, m] : named) {
    bool has_children = false;
    ModuleVisitor<float> v([&](const std::string&, const ModuleRef<float>&) { has_children = true; });
    m.visit_children(v);
    if (!has_children) leaves.push_back(name + ".");
  }
  auto owner = [&](const std::string& tensor) {
    std::string o;
    for (const auto& l : leaves)
      if (tensor.compare(0, l.size(), l) == 0) o = l;
    return o;
  };
  for (const auto& sd_name : net.state_dict().names()) EXPECT_NE(owner(sd_name), "") << sd_name << " lies under no leaf";
  for (const auto& [name, p] : net.named_parameters()) {  // the state dict's order of the parameters
    const std::string o = owner(name);
    if (first_seen.empty() || first_seen.back() != o) first_seen.push_back(o);
  }
  EXPECT_EQ(first_seen, leaves);
  // Each entry refers to the module itself, as its exact type.
  EXPECT_EQ(named[0].second.target<Sequential<float>>(), &net);
  EXPECT_EQ(named[1].second.type_name(), "OREPA");
  EXPECT_EQ((named[1].second.target<OREPA<float, SiLU>>()), (&net.get<OREPA<float, SiLU>>(0)));
  EXPECT_EQ((named[1].second.target<OREPA<float, ReLU>>()), nullptr);
  C3<float>& c3 = net.get<C3<float>>(3);
  EXPECT_EQ((named[14].second.target<Bottleneck<float>>()), &c3.m()[0]);
  EXPECT_EQ((named[15].second.target<OREPA_1x1<float, SiLU>>()), (c3.m()[0].cv1().target<OREPA_1x1<float, SiLU>>()));
  EXPECT_EQ(named[3].second.num_parameters(), state_dict_parameters(net, "2."));
}

TEST(Printing, ErrorsDeepInASequentialNameThePathAndKeepTheType) {
  auto net = orepa_c3_net();
  // Layer 3's first Bottleneck now takes 16 channels where the C3 gives it 8.
  net.get<C3<float>>(3).m()[0].cv1() = OREPA_1x1<float, SiLU>(ConvOptions(16, 8, 1));
  const Tensor<float> x({2, 3, 8, 8});
  const std::string expected = "Sequential[3] (C3) .m.0.cv1 (OREPA_1x1): input must be [N, 16, H, W], got [2, 8, 8, 8]";
  try {
    net.forward_train(x);
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  try {
    net.forward_eval(x);
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), expected);
  }
  // A direct child, a Sequential inside a Sequential, and another exception type.
  try {
    net.forward_eval(Tensor<float>({2, 5, 8, 8}));
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), "Sequential[0] (OREPA): input must be [N, 3, H, W], got [2, 5, 8, 8]");
  }
  Sequential<float> outer;
  outer.add(ConvBN<float>(ConvOptions(3, 3, 1)));
  outer.add(std::move(net));
  try {
    outer.forward_eval(x);
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()),
              "Sequential[1] (Sequential) .3.m.0.cv1 (OREPA_1x1): input must be [N, 16, H, W], got [2, 8, 8, 8]");
  }
  auto fresh = orepa_c3_net();
  try {
    fresh.backward(Tensor<float>({2, 16, 8, 8}));
    ADD_FAILURE() << "no exception";
  } catch (const state_error& e) {
    EXPECT_EQ(std::string(e.what()), "Sequential[3] (C3) .cv3 (OREPA_1x1): call forward_train first");
  }
}

TEST(Printing, ChildErrorMessagesJoinPaths) {
  using detail::child_error_message;
  EXPECT_EQ(child_error_message("Bottleneck", "cv1", "OREPA", "OREPA::forward_eval: input must be x"),
            "Bottleneck[cv1] (OREPA): input must be x");
  EXPECT_EQ(child_error_message("C3", "m.0", "Bottleneck", "Bottleneck[cv1] (OREPA): input must be x"),
            "C3[m.0] (Bottleneck) .cv1 (OREPA): input must be x");
  EXPECT_EQ(child_error_message("Sequential", "2", "C3", "C3[m.0] (Bottleneck) .cv1 (OREPA): input must be x"),
            "Sequential[2] (C3) .m.0.cv1 (OREPA): input must be x");
  // A leaf's own prefix is dropped only as "Type::function: " or "Type: "; other text stays.
  EXPECT_EQ(child_error_message("Sequential", "0", "Linear", "Linear: in_features must be >= 1"),
            "Sequential[0] (Linear): in_features must be >= 1");
  EXPECT_EQ(child_error_message("Sequential", "0", "OREPA", "OREPA::backward grad_output: expected [1]"),
            "Sequential[0] (OREPA): backward grad_output: expected [1]");
  EXPECT_EQ(child_error_message("Sequential", "0", "OREPA", "concat_channels: bad"), "Sequential[0] (OREPA): concat_channels: bad");
  EXPECT_EQ(child_error_message("Sequential", "1", "C3", "C3[oops"), "Sequential[1] (C3): C3[oops");
}

TEST(Printing, DeployedChainsNameTheLayerAtFault) {
  auto net = orepa_c3_net();
  const auto chain = net.deploy();
  try {
    chain.forward(Tensor<float>({2, 5, 8, 8}));
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), "InferenceChain[0] (DeployedConv): input must be [N, 3, H, W], got [2, 5, 8, 8]");
  }
  net.get<C3<float>>(3).cv3() = ConvBN<float>(ConvOptions(8, 16, 1));  // takes 8 where the C3 gives 16
  try {
    net.deploy().forward(Tensor<float>({2, 3, 8, 8}));
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("InferenceChain[3] (DeployedC3): ", 0), 0u) << e.what();
    EXPECT_NE(std::string(e.what()).find("input must be [N, 8, H, W], got [2, 16, 8, 8]"), std::string::npos) << e.what();
  }
  std::vector<DeployedConv<float>> convs;
  convs.push_back(OREPA<float, SiLU>(OrepaOptions(3, 8, 3)).deploy());
  convs.push_back(ConvBN<float>(ConvOptions(8, 4, 1)).deploy());
  const DeployedChain dc(std::move(convs));
  try {
    dc.forward(Tensor<float>({1, 4, 6, 6}));
    ADD_FAILURE() << "no exception";
  } catch (const shape_error& e) {
    EXPECT_EQ(std::string(e.what()), "DeployedChain[0] (DeployedConv): input must be [N, 3, H, W], got [1, 4, 6, 6]");
  }
}
