// The reference cases computed by the PyTorch reference implementation (tests/data, see
// the README there): squeezed kernel, deployed weights, eval / deploy / train outputs,
// running statistics and every gradient, within 1e-4 * max(1, max |expected|).
#include <nlohmann/json.hpp>

#include <fstream>

#include "orepa/io/state_dict.hpp"
#include "test_util.hpp"

using namespace orepa;

namespace {

nlohmann::json case_config(const std::string& name) {
  std::ifstream f(test::data_path(name + ".json"));
  return nlohmann::json::parse(f);
}

template <class Options = ConvOptions>
Options case_options(const nlohmann::json& c) {
  return Options(c["in_channels"], c["out_channels"], c["kernel_size"])
      .stride(c["stride"])
      .padding(c["padding"].get<std::int64_t>())
      .dilation(c["dilation"])
      .groups(c["groups"]);
}

// Runs every check of one case on a block already built with the case's configuration.
template <class Block>
void check_case(Block& block, const std::string& name) {
  const double tol = 1e-4;
  auto in = io::SafetensorsFile::open(test::data_path(name + ".safetensors"));
  auto want = io::SafetensorsFile::open(test::data_path(name + ".expected.safetensors"));
  io::load_state_dict(block, in, "", io::Unexpected::ignore);  // the file also holds input / grad_output
  const auto x = in.get<float>("input");

  test::expect_close(block.squeeze(), want.get<float>("squeezed_weight"), tol, name + " squeezed_weight");
  auto [w, b] = block.folded();
  test::expect_close(w, want.get<float>("deploy.weight"), tol, name + " deploy.weight");
  test::expect_close(b, want.get<float>("deploy.bias"), tol, name + " deploy.bias");
  test::expect_close(block.forward_eval(x), want.get<float>("output_eval"), tol, name + " output_eval");
  test::expect_close(block.deploy().forward(x), want.get<float>("output_deploy"), tol, name + " output_deploy");

  block.zero_grad();
  test::expect_close(block.forward_train(x), want.get<float>("output_train"), tol, name + " output_train");
  for (auto& [n, stat] : block.named_buffers())
    if (n.find("running_") != std::string::npos)
      test::expect_close(stat->value, want.get<float>("after." + n), tol, name + " after." + n);
  test::expect_close(block.backward(in.get<float>("grad_output")), want.get<float>("grad.input"), tol, name + " grad.input");
  int grads = 0;
  for (auto& [n, p] : block.named_parameters()) {
    ASSERT_TRUE(want.contains("grad." + n)) << "no expected gradient for " << n;
    test::expect_close(p->grad, want.get<float>("grad." + n), tol, name + " grad." + n);
    ++grads;
  }
  int expected_grads = 0;
  for (const auto& n : want.names()) expected_grads += n.rfind("grad.", 0) == 0 && n != "grad.input";
  EXPECT_EQ(grads, expected_grads) << "every expected parameter gradient is checked";
}

}  // namespace

TEST(Fixtures, OrepaK3Basic) {
  const auto c = case_config("orepa_k3_basic");
  ASSERT_EQ(c["activation"], "relu");
  OREPA<float, ReLU> block(case_options<OrepaOptions>(c));
  check_case(block, "orepa_k3_basic");
}

TEST(Fixtures, OrepaK3Groups2) {
  const auto c = case_config("orepa_k3_g2");
  ASSERT_EQ(c["activation"], "identity");
  OREPA<float> block(case_options<OrepaOptions>(c));
  check_case(block, "orepa_k3_g2");
}

TEST(Fixtures, Orepa1x1Up) {
  const auto c = case_config("orepa1x1_up");
  ASSERT_EQ(c["activation"], "relu");
  OREPA_1x1<float, ReLU> block(case_options(c));
  check_case(block, "orepa1x1_up");
}

TEST(Fixtures, LargeConvK5) {
  const auto c = case_config("large_k5");
  ASSERT_EQ(c["activation"], "identity");
  OREPA_LargeConv<float> block(case_options(c));
  check_case(block, "large_k5");
}

TEST(Fixtures, RepVGGWithIdentity) {
  const auto c = case_config("repvgg_id");
  ASSERT_EQ(c["activation"], "relu");
  RepVGGBlock_OREPA<float, ReLU> block(case_options<RepVGGOptions>(c));
  ASSERT_TRUE(block.has_identity());
  check_case(block, "repvgg_id");
}

TEST(StateDict, SaveLoadRoundTripUnderPrefix) {
  OREPA_LargeConv<float, SiLU> a(ConvOptions(3, 4, 5).seed(1));
  Rng rng(3);
  test::randomise(a, rng);
  a.bn().num_batches_tracked = 17;
  io::SafetensorsWriter w;
  io::save_state_dict(a, w, "model.0.");
  auto file = io::SafetensorsFile::from_bytes(w.to_bytes());
  EXPECT_TRUE(file.contains("model.0.weight1.weight_orepa_prior"));
  EXPECT_EQ(file.entry("model.0.bn.num_batches_tracked").dtype, io::DType::I64);
  OREPA_LargeConv<float, SiLU> b(ConvOptions(3, 4, 5).seed(2));
  io::load_state_dict(b, file, "model.0.");
  EXPECT_EQ(b.bn().num_batches_tracked, 17);
  for (auto& [n, p] : b.named_parameters()) EXPECT_EQ(max_abs_diff(p->value, a.param(n).value), 0.0) << n;
  for (auto& [n, p] : b.named_buffers()) EXPECT_EQ(max_abs_diff(p->value, a.param(n).value), 0.0) << n;
}

TEST(StateDict, BlockStateDictRoundTripIsStrictAndAllOrNothing) {
  DBB<double, SiLU> a(DbbOptions(4, 6, 3).groups(2).seed(1));
  Rng rng(4);
  test::randomise(a, rng);
  a.forward_train(test::random_tensor<double>({2, 4, 6, 6}, rng));  // counters and running statistics move
  const StateDict<double> sd = a.state_dict();
  EXPECT_EQ(sd.count("dbb_origin.bn.num_batches_tracked"), 1);
  EXPECT_TRUE(sd.contains("dbb_1x1_kxk.bn1.bn.running_var"));
  DBB<double, SiLU> b(DbbOptions(4, 6, 3).groups(2).seed(2));
  b.load_state_dict(sd);
  for (const auto& n : sd.names())
    if (!sd.is_count(n)) {
      EXPECT_EQ(max_abs_diff(b.param(n).value, sd.tensor(n)), 0.0) << n;
    }
  const auto x = test::random_tensor<double>({2, 4, 6, 6}, rng);
  EXPECT_EQ(max_abs_diff(a.forward_eval(x), b.forward_eval(x)), 0.0);
  // One wrong shape anywhere: nothing is loaded.
  StateDict<double> bad;
  for (const auto& n : sd.names()) {
    if (sd.is_count(n)) bad.insert_count(n, sd.count(n));
    else bad.insert(n, n == "dbb_avg.avgbn.bias" ? Tensor<double>({5}) : Tensor<double>(sd.tensor(n).sizes(), 0.25));
  }
  DBB<double, SiLU> c(DbbOptions(4, 6, 3).groups(2).seed(3));
  const auto before = c.state_dict();
  EXPECT_THROW(c.load_state_dict(bad), format_error);
  for (const auto& n : before.names())
    if (!before.is_count(n)) {
      EXPECT_EQ(max_abs_diff(c.param(n).value, before.tensor(n)), 0.0) << n;
    }
}

TEST(StateDict, ReportsEveryMissingUnexpectedAndMisshapedTensorAndLeavesTheBlockUnchanged) {
  OREPA<float> src(OrepaOptions(4, 8, 3));
  io::SafetensorsWriter w;
  const auto params = src.named_parameters(), buffers = src.named_buffers();
  for (const auto* list : {&params, &buffers})
    for (auto& [n, p] : *list) {
      if (n == "vector") continue;                                    // missing
      if (n == "bn.bias") w.add(n, Tensor<float>({7}));               // mis-shaped
      else w.add(n, p->value);
    }
  w.add("surprise", Tensor<float>({1}));                                       // unexpected
  auto file = io::SafetensorsFile::from_bytes(w.to_bytes(), "ckpt.safetensors");
  OREPA<float> dst(OrepaOptions(4, 8, 3).seed(5));
  const auto before = dst.squeeze();
  try {
    io::load_state_dict(dst, file);
    FAIL() << "expected format_error";
  } catch (const format_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("ckpt.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("1 missing: vector [6, 8]"), std::string::npos) << m;
    EXPECT_NE(m.find("1 mis-shaped: bn.bias (expected [8], got [7])"), std::string::npos) << m;
    EXPECT_NE(m.find("1 unexpected: surprise"), std::string::npos) << m;
  }
  EXPECT_EQ(max_abs_diff(dst.squeeze(), before), 0.0);
}
