// orepa-convert and orepa-run end to end: on every reference case, on a checkpoint with
// several blocks under prefixes plus unrelated tensors, and on bad input.
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <fstream>

#include "orepa/io/checkpoint.hpp"
#include "test_util.hpp"

using namespace orepa;
namespace fs = std::filesystem;

#ifdef OREPA_TOOLS_DIR
using test::run;
using test::TempDir;

class ToolsOnFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ToolsOnFixture, ConvertAndRunMatchTheReference) {
  const std::string name = GetParam();
  std::ifstream jf(test::data_path(name + ".json"));
  const auto c = nlohmann::json::parse(jf);
  const auto type = io::parse_block_type(c["block"]);
  const std::string in = test::data_path(name + ".safetensors");
  const auto want = io::SafetensorsFile::open(test::data_path(name + ".expected.safetensors"));
  TempDir dir;

  auto conv = run("orepa-convert", in + " " + (dir / "deployed.safetensors"));
  ASSERT_EQ(conv.status, 0) << conv.output;
  const auto dep = io::SafetensorsFile::open(dir / "deployed.safetensors");
  const std::string stem = io::deployed_stem(type);
  test::expect_close(dep.get<float>(stem + ".weight"), want.get<float>("deploy.weight"), 1e-4, name + " weight");
  test::expect_close(dep.get<float>(stem + ".bias"), want.get<float>("deploy.bias"), 1e-4, name + " bias");
  const auto source = io::SafetensorsFile::open(in);
  for (const auto& n : dep.names())  // only the deployed pair and the unrelated tensors remain
    EXPECT_TRUE(n == stem + ".weight" || n == stem + ".bias" || n == "input" || n == "grad_output") << n;
  EXPECT_EQ(dep.metadata(), source.metadata());
  EXPECT_NE(conv.output.find(io::to_string(type)), std::string::npos) << conv.output;

  const std::string common = "--block " + c["block"].get<std::string>() + " --weights " + in + " --input " + in +
                             " --stride " + std::to_string(int(c["stride"])) + " --padding " +
                             std::to_string(int(c["padding"])) + " --dilation " + std::to_string(int(c["dilation"])) +
                             " --groups " + std::to_string(int(c["groups"])) + " --activation " +
                             c["activation"].get<std::string>();
  for (std::string mode : {"eval", "deploy", "train"}) {
    const std::string out = dir / (mode + ".safetensors");
    auto r = run("orepa-run", common + " --mode " + mode + " --output " + out +
                                  (mode == "train" ? " --grad-output " + in : ""));
    ASSERT_EQ(r.status, 0) << r.output;
    const auto got = io::SafetensorsFile::open(out);
    test::expect_close(got.get<float>("output"), want.get<float>("output_" + mode), 1e-4, name + " " + mode);
    if (mode != "train") continue;
    int checked = 0;
    for (const auto& n : want.names()) {
      std::string mine = n.rfind("after.", 0) == 0 ? n.substr(6) : n.rfind("grad.", 0) == 0 ? n : "";
      if (mine.empty()) continue;
      ASSERT_TRUE(got.contains(mine)) << mine;
      test::expect_close(got.get<float>(mine), want.get<float>(n), 1e-4, name + " " + mine);
      ++checked;
    }
    EXPECT_GT(checked, 3);
  }
  // Without --block the type is detected from the tensor names.
  auto detected = run("orepa-run", "--weights " + in + " --input " + in + " --mode eval --output " +
                                       (dir / "d.safetensors") + " --activation " + c["activation"].get<std::string>() +
                                       " --groups " + std::to_string(int(c["groups"])));
  EXPECT_EQ(detected.status, 0) << detected.output;
}

INSTANTIATE_TEST_SUITE_P(Cases, ToolsOnFixture,
                         ::testing::Values("orepa_k3_basic", "orepa_k3_g2", "orepa1x1_up", "large_k5", "repvgg_id"));

// A network checkpoint: blocks under prefixes (DBB and RepVGG contain nested ConvBNs, the
// large conv contains weight-only OREPAs) plus tensors that belong to no block.
TEST(Tools, ConvertsEveryOutermostBlockAndCopiesTheRest) {
  Rng rng(3);
  OREPA<float> a(OrepaOptions(4, 8, 3));
  RepVGGBlock_OREPA<float> b(RepVGGOptions(8, 8, 3));
  DBB<float> d(DbbOptions(8, 8, 3).groups(2));
  OREPA_LargeConv<float> l(ConvOptions(3, 4, 5));
  ConvBN<float> cb(ConvOptions(8, 16, 1));
  test::randomise(a, rng), test::randomise(b, rng), test::randomise(d, rng), test::randomise(l, rng),
      test::randomise(cb, rng);
  io::SafetensorsWriter w;
  io::save_state_dict(l, w, "model.0.");
  io::save_state_dict(a, w, "model.1.conv.");
  io::save_state_dict(b, w, "model.2.");
  io::save_state_dict(d, w, "model.3.");
  io::save_state_dict(cb, w, "model.4.");
  w.add("head.weight", Tensor<float>({10, 16}, 0.5f));
  w.add_int64("step", {}, {1234});
  w.set_metadata({{"format", "pt"}});
  TempDir dir;
  w.write(dir / "net.safetensors");
  auto r = run("orepa-convert", (dir / "net.safetensors") + " " + (dir / "net_deployed.safetensors"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto out = io::SafetensorsFile::open(dir / "net_deployed.safetensors");
  auto check = [&](const std::string& stem, const auto& block) {
    auto [wt, bias] = block.folded();
    test::expect_close(out.get<float>(stem + ".weight"), wt, 1e-6, stem);
    test::expect_close(out.get<float>(stem + ".bias"), bias, 1e-6, stem);
  };
  check("model.0.or_large_reparam", l);
  check("model.1.conv.orepa_reparam", a);
  check("model.2.rbr_reparam", b);
  check("model.3.dbb_reparam", d);
  check("model.4.conv", cb);
  EXPECT_EQ(out.names().size(), 2u * 5 + 2) << "5 deployed pairs + head.weight + step";
  EXPECT_EQ(out.get_int("step"), 1234);
  EXPECT_EQ(out.metadata().at("format"), "pt");
  EXPECT_NE(r.output.find("model.3.  "), std::string::npos) << r.output;
}

// The reference's own converted network (tests/data/repvgg_stage, computed by PyTorch):
// RepVGG blocks at stride 2 with equal widths (no identity path, 5-row vector), at
// stride 1 (identity path) and at stride 2 widening, plus a linear head.
TEST(Tools, ConvertsTheReferenceRepVGGStageIncludingStride2SameWidthBlocks) {
  TempDir dir;
  const std::string in = test::data_path("repvgg_stage.safetensors");
  auto r = run("orepa-convert", in + " " + (dir / "out.safetensors"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto out = io::SafetensorsFile::open(dir / "out.safetensors");
  const auto want = io::SafetensorsFile::open(test::data_path("repvgg_stage.expected.safetensors"));
  EXPECT_EQ(out.names().size(), want.names().size()) << "exactly the reference's deployed tensors";
  for (const auto& n : want.names()) {
    ASSERT_TRUE(out.contains(n)) << n;
    test::expect_close(out.get<float>(n), want.get<float>(n), 1e-4, n);
  }
  EXPECT_NE(r.output.find("stage1.0."), std::string::npos) << r.output;
}

// Settings a checkpoint cannot hold are only needed to run; given ones must agree with
// the tensors, and the error names them.
TEST(Tools, RunRejectsAStrideTheRepVGGTensorsContradict) {
  TempDir dir;
  const std::string in = test::data_path("repvgg_stage.safetensors");
  io::SafetensorsWriter x;
  x.add("input", Tensor<float>({1, 8, 6, 6}, 0.25f));
  x.write(dir / "x.safetensors");
  auto run_block = [&](const std::string& prefix, const std::string& flags) {
    return run("orepa-run", "--weights " + in + " --input " + (dir / "x.safetensors") + " --output " +
                                (dir / "y.safetensors") + " --mode eval --prefix " + prefix + " " + flags);
  };
  // stage1.0: 8 -> 8 without rbr_identity: trained at stride 2.
  auto stride1 = run_block("stage1.0.", "--stride 1");
  EXPECT_EQ(stride1.status, 1);
  for (const char* part : {"stage1.0.rbr_identity.*", "5-row", "stage1.0.rbr_dense.vector", "got 1"})
    EXPECT_NE(stride1.output.find(part), std::string::npos) << part << " in: " << stride1.output;
  auto unknown = run_block("stage1.0.", "");
  EXPECT_EQ(unknown.status, 1);
  EXPECT_NE(unknown.output.find("give the stride it was trained with"), std::string::npos) << unknown.output;
  auto ok = run_block("stage1.0.", "--stride 2 --activation relu");
  EXPECT_EQ(ok.status, 0) << ok.output;
  EXPECT_EQ(io::SafetensorsFile::open(dir / "y.safetensors").entry("output").shape, (Shape{1, 8, 3, 3}));
  // stage1.1: with rbr_identity: stride 1 only.
  auto stride2 = run_block("stage1.1.", "--stride 2");
  EXPECT_EQ(stride2.status, 1);
  EXPECT_NE(stride2.output.find("stage1.1.rbr_identity.*"), std::string::npos) << stride2.output;
  EXPECT_EQ(run_block("stage1.1.", "").status, 0);
  // Groups the shapes imply cannot be overridden.
  auto groups = run_block("stage1.1.", "--groups 2");
  EXPECT_EQ(groups.status, 1);
  EXPECT_NE(groups.output.find("imply groups 1"), std::string::npos) << groups.output;
}

// --precision int8 calibrates on every tensor of --calibration, prints the report, and its
// output approximates fp32 deploy; wrong uses name the flag or tensor at fault.
TEST(Tools, RunDeploysInReducedPrecisionWithAReport) {
  TempDir dir;
  const std::string in = test::data_path("orepa_k3_basic.safetensors");
  const Tensor<float> x = io::SafetensorsFile::open(in).get<float>("input");
  Tensor<float> half = x;
  for (auto& v : half) v *= 0.5f;
  io::SafetensorsWriter cal;  // representative data: the input and a scaled copy
  cal.add("any_name", x);
  cal.add("batch2", half);
  cal.write(dir / "cal.safetensors");
  const std::string common = "--weights " + in + " --input " + in + " --mode deploy --output ";
  ASSERT_EQ(run("orepa-run", common + (dir / "fp32.safetensors")).status, 0);
  auto int8 = run("orepa-run", common + (dir / "int8.safetensors") + " --precision int8 --calibration " +
                                   (dir / "cal.safetensors"));
  ASSERT_EQ(int8.status, 0) << int8.output;
  for (const char* part : {"int8 deployment of OREPA", "on 2 batch(es)", "weight SQNR dB", "end to end output SQNR"})
    EXPECT_NE(int8.output.find(part), std::string::npos) << part << " in: " << int8.output;
  const auto fp32 = io::SafetensorsFile::open(dir / "fp32.safetensors").get<float>("output");
  const auto got = io::SafetensorsFile::open(dir / "int8.safetensors");
  const auto q = got.get<float>("output");
  EXPECT_GT(sqnr_db(fp32.data(), q.data(), q.numel()), 20.0) << int8.output;
  EXPECT_EQ(io::load_calibration(got).size(), 1u);  // the calibrated range, reusable

  auto no_cal = run("orepa-run", common + (dir / "x.safetensors") + " --precision int8");
  EXPECT_EQ(no_cal.status, 1);
  EXPECT_NE(no_cal.output.find("needs --calibration"), std::string::npos) << no_cal.output;
  io::SafetensorsWriter bad;
  bad.add("flat", Tensor<float>({3, 4}, 1.f));
  bad.write(dir / "bad.safetensors");
  auto wrong = run("orepa-run", common + (dir / "x.safetensors") + " --precision int8 --calibration " +
                                    (dir / "bad.safetensors"));
  EXPECT_EQ(wrong.status, 1);
  EXPECT_NE(wrong.output.find("tensor 'flat' has shape [3, 4]"), std::string::npos) << wrong.output;
  auto eval = run("orepa-run", "--weights " + in + " --input " + in + " --mode eval --precision bf16 --output y");
  EXPECT_EQ(eval.status, 1);
  EXPECT_NE(eval.output.find("only meaningful with --mode deploy"), std::string::npos) << eval.output;
  auto bf16 = run("orepa-run", common + (dir / "bf16.safetensors") + " --precision bf16");
  if (bf16.status == 0) EXPECT_NE(bf16.output.find("bf16 deployment"), std::string::npos) << bf16.output;
  else EXPECT_NE(bf16.output.find(engine::cpu_isa_name()), std::string::npos) << bf16.output;  // no bf16 kernel here
}

TEST(Tools, BadInputFailsWithAMessageAndTouchesNothing) {
  TempDir dir;
  auto missing = run("orepa-convert", (dir / "nope.safetensors") + " " + (dir / "o.safetensors"));
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.output.find("nope.safetensors"), std::string::npos) << missing.output;
  EXPECT_FALSE(fs::exists(dir / "o.safetensors"));
  fs::copy_file(test::data_path("orepa_k3_basic.safetensors"), dir / "in.safetensors");
  const auto before = fs::file_size(dir / "in.safetensors");
  auto same = run("orepa-convert", (dir / "in.safetensors") + " " + (dir / "in.safetensors"));
  EXPECT_EQ(same.status, 1) << same.output;
  EXPECT_EQ(fs::file_size(dir / "in.safetensors"), before);
  EXPECT_NE(same.output.find("orepa-convert: error: OUT '"), std::string::npos) << same.output;
  EXPECT_NE(same.output.find("is the same file as IN"), std::string::npos) << same.output;
  EXPECT_EQ(same.output.find("orepa-convert:", 1), std::string::npos) << "one prefix only: " << same.output;
  EXPECT_EQ(run("orepa-convert", "one-argument").status, 1);
  EXPECT_EQ(run("orepa-convert", "'' ''").status, 1);  // found by fuzz_tool_args
  EXPECT_EQ(run("orepa-convert", "--help").status, 0);
  auto help = run("orepa-run", "--help");
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.output.find("--grad-output"), std::string::npos);
  auto bad = run("orepa-run", "--weights " + (dir / "in.safetensors") + " --input x --output y --mode fly");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find("--mode: expected eval, deploy or train, got 'fly'"), std::string::npos) << bad.output;
  auto stride = run("orepa-run", "--stride -3 --weights a --input b --output c --mode eval");
  EXPECT_NE(stride.output.find("--stride: expected an integer"), std::string::npos) << stride.output;
  auto wrong = run("orepa-run", "--weights " + (dir / "in.safetensors") + " --input " + (dir / "in.safetensors") +
                                    " --output " + (dir / "o.safetensors") + " --mode eval --block OREPA_1x1");
  EXPECT_EQ(wrong.status, 1);
  EXPECT_NE(wrong.output.find("weight_or1x1_origin"), std::string::npos) << wrong.output;
}
namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

}  // namespace

// Every input of orepa-run (--weights, --input, --calibration), reached by its own path,
// a symbolic or a hard link, is refused as --output and left byte for byte as it was;
// so are a FIFO, a directory and a dangling link. A link to another regular file is
// followed: its target is replaced, the link stays.
TEST(Tools, NoOutputReplacesAnInputOrASpecialFile) {
  TempDir dir;
  const std::string w = dir / "w.safetensors", x = dir / "x.safetensors", cal = dir / "cal.safetensors";
  fs::copy_file(test::data_path("orepa_k3_basic.safetensors"), w);
  const Tensor<float> input = io::SafetensorsFile::open(w).get<float>("input");
  io::SafetensorsWriter xs;
  xs.add("input", input);
  xs.write(x);
  io::SafetensorsWriter cs;
  cs.add("batch", input);
  cs.write(cal);
  const std::string before_w = slurp(w), before_x = slurp(x), before_cal = slurp(cal);
  auto run_to = [&](const std::string& out, const std::string& extra = "") {
    return run("orepa-run", "--weights " + w + " --input " + x + " --mode deploy --output " + out + " " + extra);
  };
  fs::create_symlink("w.safetensors", dir.path / "link_to_w");
  fs::create_hard_link(w, dir.path / "hard_w");
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  fs::create_symlink("missing.safetensors", dir.path / "dangling");
  const std::vector<std::pair<std::string, std::string>> refused{
      {w, "is the same file as --weights"},
      {x, "is the same file as --input"},
      {dir / "link_to_w", "the symbolic link's target"},
      {dir / "hard_w", "hard link"},
      {dir / "fifo", "is a FIFO (named pipe); outputs are written to regular files only"},
      {dir.path.string(), "is a directory"},
      {dir / "dangling", "is a symbolic link whose target cannot be resolved"}};
  for (const auto& [out, why] : refused) {
    auto r = run_to(out);
    EXPECT_EQ(r.status, 1) << out << ": " << r.output;
    EXPECT_NE(r.output.find("orepa-run: error: --output '" + out + "' "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(why), std::string::npos) << why << " in: " << r.output;
  }
  auto cal_out = run_to(cal, "--precision int8 --calibration " + cal);
  EXPECT_EQ(cal_out.status, 1);
  EXPECT_NE(cal_out.output.find("is the same file as --calibration"), std::string::npos) << cal_out.output;
  EXPECT_EQ(slurp(w), before_w);
  EXPECT_EQ(slurp(x), before_x);
  EXPECT_EQ(slurp(cal), before_cal);
  struct stat st {};
  ASSERT_EQ(::lstat((dir / "fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_FALSE(fs::exists(dir / "missing.safetensors"));

  std::ofstream(dir / "target.safetensors") << "old";
  fs::create_symlink("target.safetensors", dir.path / "link_to_target");
  auto followed = run_to(dir / "link_to_target");
  ASSERT_EQ(followed.status, 0) << followed.output;
  EXPECT_TRUE(fs::is_symlink(dir.path / "link_to_target"));
  EXPECT_EQ(io::SafetensorsFile::open(dir / "target.safetensors").entry("output").shape, (Shape{2, 16, 10, 10}));

  fs::copy_file(w, dir / "in.safetensors");
  fs::create_symlink("in.safetensors", dir.path / "link_to_in");
  auto convert = run("orepa-convert", (dir / "in.safetensors") + " " + (dir / "link_to_in"));
  EXPECT_EQ(convert.status, 1);
  EXPECT_NE(convert.output.find("OUT '" + (dir / "link_to_in") + "' is the same file as IN"), std::string::npos)
      << convert.output;
  EXPECT_EQ(slurp(dir / "in.safetensors"), before_w);
}

// A checkpoint with a NaN weight, an Inf, a NaN running mean or a negative running
// variance is refused by orepa-convert and by orepa-run --mode deploy, naming the tensor
// and its first bad index; --allow-nonfinite converts it anyway, with a warning.
TEST(Tools, NumericallyBrokenCheckpointsAreRefusedUnlessAllowed) {
  TempDir dir;
  Rng rng(22);
  OREPA<float, SiLU> good(OrepaOptions(4, 8, 3).seed(1));
  test::randomise(good, rng);
  struct Case {
    std::string tensor;
    std::int64_t index;
    float value;
    std::string index_text, why;
  };
  const std::vector<Case> cases{
      {"weight_orepa_origin", 5, std::nanf(""), "[0, 0, 1, 2]", "holds nan"},
      {"weight_orepa_gconv_pw", 33, std::numeric_limits<float>::infinity(), "[1, 1, 0, 0]", "holds inf"},
      {"bn.running_mean", 6, std::nanf(""), "[6]", "holds nan"},
      {"bn.running_var", 1, -2.f, "[1]", "a variance is never negative"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tensor);
    OREPA<float, SiLU> broken(OrepaOptions(4, 8, 3).seed(1));
    broken.load_state_dict(good.state_dict());
    broken.param(c.tensor).value[c.index] = c.value;
    io::SafetensorsWriter w;
    io::save_state_dict(good, w, "model.1.");
    io::save_state_dict(broken, w, "model.3.");
    w.add("input", test::random_tensor<float>({1, 4, 6, 6}, rng));
    const std::string in = dir / "broken.safetensors", out = dir / "deployed.safetensors";
    w.write(in);
    fs::remove(out);
    auto r = run("orepa-convert", in + " " + out);
    EXPECT_EQ(r.status, 1) << r.output;
    const std::string named = "tensor 'model.3." + c.tensor + "' holds";
    for (const std::string& part : {named, "at index " + c.index_text, c.why, std::string("--allow-nonfinite")})
      EXPECT_NE(r.output.find(part), std::string::npos) << part << " in: " << r.output;
    EXPECT_FALSE(fs::exists(out));

    auto deploy = run("orepa-run", "--weights " + in + " --prefix model.3. --input " + in + " --mode deploy --output " +
                                       (dir / "y.safetensors"));
    EXPECT_EQ(deploy.status, 1) << deploy.output;
    EXPECT_NE(deploy.output.find(named), std::string::npos) << deploy.output;

    auto allowed = run("orepa-convert", in + " " + out + " --allow-nonfinite");
    ASSERT_EQ(allowed.status, 0) << allowed.output;
    EXPECT_NE(allowed.output.find("orepa-convert: warning: "), std::string::npos) << allowed.output;
    EXPECT_NE(allowed.output.find(named), std::string::npos) << allowed.output;
    const auto written = io::SafetensorsFile::open(out);
    EXPECT_TRUE(first_non_finite(written.get<float>("model.3.orepa_reparam.weight")) >= 0 ||
                first_non_finite(written.get<float>("model.3.orepa_reparam.bias")) >= 0)
        << "written as it folds";
    EXPECT_LT(first_non_finite(written.get<float>("model.1.orepa_reparam.weight")), 0);
  }
}

// int8 calibration on data with a NaN, or on data that leaves the block's input all zero,
// is refused naming the calibration tensor or the block and saying what happened.
TEST(Tools, RunInt8CalibrationErrorsSayWhatHappened) {
  TempDir dir;
  const std::string in = test::data_path("orepa_k3_basic.safetensors");
  const Tensor<float> x = io::SafetensorsFile::open(in).get<float>("input");
  Tensor<float> poisoned = x;
  poisoned[17] = std::nanf("");
  io::SafetensorsWriter bad;
  bad.add("good", x);
  bad.add("poisoned", poisoned);
  bad.write(dir / "nan.safetensors");
  io::SafetensorsWriter zeros;
  zeros.add("zeros", Tensor<float>(x.sizes()));
  zeros.write(dir / "zeros.safetensors");
  const std::string common = "--weights " + in + " --input " + in + " --mode deploy --precision int8 --output " +
                             (dir / "y.safetensors") + " --calibration ";
  auto nan = run("orepa-run", common + (dir / "nan.safetensors"));
  EXPECT_EQ(nan.status, 1);
  for (const char* part : {"--calibration tensor 'poisoned'", "holds nan at index [0, 0, 1, 7]", "OREPA in "})
    EXPECT_NE(nan.output.find(part), std::string::npos) << part << " in: " << nan.output;
  EXPECT_EQ(nan.output.find("layer ''"), std::string::npos) << nan.output;
  auto zero = run("orepa-run", common + (dir / "zeros.safetensors"));
  EXPECT_EQ(zero.status, 1);
  for (const char* part : {"calibrated input range [0, 0]", "every calibration value of this input was 0"})
    EXPECT_NE(zero.output.find(part), std::string::npos) << part << " in: " << zero.output;
  EXPECT_EQ(zero.output.find("calibrate the layer on data first"), std::string::npos) << zero.output;
  EXPECT_FALSE(fs::exists(dir / "y.safetensors"));
}
#else
TEST(Tools, SkippedWithoutExamples) { GTEST_SKIP() << "configure with OREPA_BUILD_EXAMPLES=ON to test the tools"; }
#endif
