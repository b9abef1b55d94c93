// Reliability (docs/reliability.md): hostile and degenerate input gives the documented
// exception and leaves the block exactly as it was; NaN/Inf propagate like in PyTorch;
// absurd sizes are rejected before anything is allocated; the deployed conv is safe to
// call from several threads; a writer killed midway never replaces the previous file.
// The suite is also run under ASan + UBSan + LSan (scripts/test.sh), which is what makes
// "nothing crashes" and "nothing is allocated" checks meaningful.
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "test_util.hpp"

using namespace orepa;
using test::random_tensor;
namespace fs = std::filesystem;

namespace {

using Block = AnyBlock<float>;
using Bytes = std::vector<unsigned char>;

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

/// Every tensor of a block (values and gradients, as raw bytes so NaN compares too) and
/// every BN's num_batches_tracked.
struct Snapshot {
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  std::vector<std::string> values, grads;
  std::vector<std::int64_t> batches;
};

std::string bytes_of(const Tensor<float>& t) {
  return std::string(reinterpret_cast<const char*>(t.data()), std::size_t(t.numel()) * sizeof(float));
}

template <class B>
Snapshot snapshot(B& b) {
  Snapshot s;
  const auto params = b.named_parameters(), buffers = b.named_buffers();
  for (const auto* list : {&params, &buffers})
    for (auto& [n, p] : *list) {
      s.names.push_back(n);
      s.shapes.push_back(p->value.sizes());
      s.values.push_back(bytes_of(p->value));
      s.grads.push_back(bytes_of(p->grad));
    }
  for (auto* bn : b.batch_norms()) s.batches.push_back(bn->num_batches_tracked);
  return s;
}

/// Expects two snapshots to be identical bit for bit, naming the first tensor that differs.
void expect_unchanged(const Snapshot& before, const Snapshot& after, const std::string& what) {
  ASSERT_EQ(before.names, after.names) << what;
  for (std::size_t j = 0; j < before.names.size(); ++j) {
    EXPECT_EQ(before.shapes[j], after.shapes[j]) << what << ": shape of " << before.names[j];
    EXPECT_TRUE(before.values[j] == after.values[j]) << what << ": value of " << before.names[j] << " changed";
    EXPECT_TRUE(before.grads[j] == after.grads[j]) << what << ": gradient of " << before.names[j] << " changed";
  }
  EXPECT_EQ(before.batches, after.batches) << what << ": num_batches_tracked changed";
}

/// Expects `f` to throw exactly error type E whose message contains `needle`.
template <class E, class F>
void expect_error(F&& f, const std::string& needle, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no exception";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << what << ": '" << needle << "' not in: " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong exception type: " << e.what();
  }
}

/// One block of each family type, all 4 -> 8 channels with their default (same-size) padding.
struct BlockCase {
  const char* name;
  std::function<Block()> make;
};
std::vector<BlockCase> block_cases() {
  return {
      {"OREPA", [] { return Block(OREPA<float, SiLU>(OrepaOptions(4, 8, 3).groups(2).seed(1))); }},
      {"OREPA_1x1", [] { return Block(OREPA_1x1<float, SiLU>(ConvOptions(4, 8, 1).seed(2))); }},
      {"OREPA_LargeConv", [] { return Block(OREPA_LargeConv<float, SiLU>(ConvOptions(4, 8, 5).seed(3))); }},
      {"yolo_conv", [] { return yolo_conv<float, SiLU>(ConvOptions(4, 8, 3).stride(2).seed(4)); }},
      {"RepVGGBlock_OREPA", [] { return Block(RepVGGBlock_OREPA<float, SiLU>(RepVGGOptions(4, 8, 3).seed(5))); }},
      {"DBB", [] { return Block(DBB<float, SiLU>(DbbOptions(4, 8, 3).groups(2).seed(6))); }},
      {"ConvBN", [] { return Block(ConvBN<float, SiLU>(ConvOptions(4, 8, 3).seed(7))); }},
  };
}

std::string tmp_dir() {
  std::string tmpl = (fs::temp_directory_path() / "orepa_rel_XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

Bytes read_all(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

}  // namespace

// ---- hostile and degenerate input --------------------------------------------------------

// Each bad call throws its documented error before touching any state: parameters, BN
// running statistics, gradients and the saved activations of the last good forward (the
// following backward gives exactly what it would have given without the bad calls).
TEST(ReliabilityHostile, BadTrainingInputThrowsAndLeavesEveryBlockUnchanged) {
  for (const auto& c : block_cases()) {
    SCOPED_TRACE(c.name);
    auto block = c.make();
    Rng rng(10);
    test::randomise(block, rng);
    const auto x = random_tensor<float>({2, 4, 9, 9}, rng);
    const Tensor<float> y = block.forward_train(x);
    const auto dy = random_tensor<float>(y.sizes(), rng);
    block.zero_grad();
    const Snapshot before = snapshot(block);

    expect_error<shape_error>([&] { block.forward_train(Tensor<float>({2, 3, 9, 9})); }, "input must be [N, 4, H, W]",
                              "wrong input channels (train)");
    expect_error<shape_error>([&] { (void)block.forward_eval(Tensor<float>({2, 5, 9, 9})); },
                              "input must be [N, 4, H, W]", "wrong input channels (eval)");
    expect_error<shape_error>([&] { block.forward_train(Tensor<float>({4, 9, 9})); }, "got [4, 9, 9]", "rank 3 input");
    expect_error<shape_error>([&] { block.forward_train(Tensor<float>()); }, "got [0]", "empty tensor");
    expect_error<shape_error>([&] { block.forward_train(Tensor<float>({0, 4, 9, 9})); }, "batch must be >= 1",
                              "empty batch");
    // One value per channel: BN has no batch variance. Eval is fine with it.
    expect_error<state_error>([&] { block.forward_train(Tensor<float>({1, 4, 1, 1}, 1.0f)); },
                              "more than one value per channel", "one value per channel");
    expect_error<shape_error>([&] { block.backward(Tensor<float>({2, 8, 1, 1})); }, "grad_output",
                              "wrong gradient shape");
    expect_unchanged(before, snapshot(block), "after the rejected calls");

    // The last good forward is still the one backward differentiates.
    const Tensor<float> dx = block.backward(dy);
    auto fresh = c.make();
    Rng rng2(10);
    test::randomise(fresh, rng2);
    fresh.forward_train(x);
    fresh.zero_grad();
    EXPECT_EQ(max_abs_diff(dx, fresh.backward(dy)), 0.0);
    EXPECT_EQ(block.forward_eval(Tensor<float>({1, 4, 1, 1}, 1.0f)).size(1), 8);  // eval accepts N*H*W = 1
  }
}

TEST(ReliabilityHostile, InputSmallerThanTheKernelIsAShapeErrorEverywhere) {
  std::vector<Block> blocks;
  blocks.emplace_back(OREPA<float, SiLU>(OrepaOptions(4, 4, 5).padding(0)));
  blocks.emplace_back(OREPA<float, SiLU>(OrepaOptions(4, 4, 3).padding(0).dilation(3)));  // spans 7 pixels
  blocks.emplace_back(OREPA_LargeConv<float, SiLU>(ConvOptions(4, 4, 7).padding(0)));
  Rng rng(2);
  for (auto& b : blocks) {
    SCOPED_TRACE(b.type_name());
    test::randomise(b, rng);
    const Snapshot before = snapshot(b);
    const auto deployed = b.deploy();
    const auto x = random_tensor<float>({2, 4, 6, 4}, rng);  // 6x4 < span in width at least
    expect_error<shape_error>([&] { b.forward_train(x); }, "is smaller than the", "train");
    expect_error<shape_error>([&] { (void)b.forward_eval(x); }, "is smaller than the", "eval");
    expect_error<shape_error>([&] { (void)deployed.forward(x); }, "is smaller than the", "deployed");
    expect_unchanged(before, snapshot(b), "after input smaller than the kernel");
    EXPECT_EQ(deployed.target<DeployedConv<float>>()->primitive_creations(), 0);
  }
}

TEST(ReliabilityHostile, DeployedConvRejectsWrongShapesAndKeepsWorking) {
  OREPA<float, SiLU> block(OrepaOptions(4, 8, 3).padding(0).seed(5));
  Rng rng(6);
  test::randomise(block, rng);
  const auto deployed = block.deploy();
  const auto x = random_tensor<float>({2, 4, 8, 8}, rng);
  const Tensor<float> y = deployed.forward(x);
  const Tensor<float> w = deployed.weight(), b = deployed.bias();
  const auto creations = deployed.primitive_creations();
  Tensor<float> out({1}, 42.0f);

  expect_error<shape_error>([&] { (void)deployed.forward(Tensor<float>({2, 3, 8, 8})); }, "input must be [N, 4, H, W]",
                            "wrong channels");
  expect_error<shape_error>([&] { (void)deployed.forward(Tensor<float>({4, 8, 8})); }, "input must be", "rank 3");
  expect_error<shape_error>([&] { (void)deployed.forward(Tensor<float>({0, 4, 8, 8})); }, "batch must be >= 1",
                            "empty batch");
  expect_error<shape_error>([&] { (void)deployed.forward(Tensor<float>({1, 4, 2, 8})); }, "smaller than the 3x3",
                            "smaller than the kernel");
  expect_error<shape_error>([&] { deployed.forward(Tensor<float>({2, 5, 8, 8}), out); }, "input must be",
                            "wrong channels into a buffer");
  EXPECT_EQ(out.sizes(), (Shape{1}));  // the output buffer is untouched
  EXPECT_EQ(out[0], 42.0f);
  // A view of a caller's buffer is checked before anything is written into it.
  Tensor<float> small_out({2, 8, 5, 5}, 7.0f);
  expect_error<shape_error>([&] { deployed.forward(x, TensorView<float>(small_out)); }, "output",
                            "wrong output view");
  for (float v : small_out) EXPECT_EQ(v, 7.0f);
  expect_error<shape_error>([&] { (void)view(static_cast<const float*>(nullptr), Shape{1, 4, 1 << 20, -5}); },
                            "negative extent", "negative width");

  EXPECT_EQ(deployed.primitive_creations(), creations);  // no primitive for a rejected shape
  EXPECT_EQ(max_abs_diff(deployed.weight(), w), 0.0);
  EXPECT_EQ(max_abs_diff(deployed.bias(), b), 0.0);
  EXPECT_EQ(max_abs_diff(deployed.forward(x), y), 0.0);
}

// NaN and Inf are not checked for (that would cost a pass over every tensor); they
// propagate as in PyTorch. In eval and deploy a non-finite input pixel makes exactly the
// outputs whose receptive field contains it non-finite, in every output channel, and the
// other images of the batch are untouched.
TEST(ReliabilityNonFinite, NaNAndInfPropagateThroughEvalAndDeployLikePyTorch) {
  OREPA<float, SiLU> block(OrepaOptions(4, 6, 3).seed(3));  // k3, padding 1, stride 1
  Rng rng(3);
  test::randomise(block, rng);
  const auto deployed = block.deploy();
  const auto x = random_tensor<float>({3, 4, 7, 7}, rng);
  const Tensor<float> clean_eval = block.forward_eval(x), clean_deployed = deployed.forward(x);
  const std::int64_t ph = 2, pw = 5;  // poisoned pixel of image 1, channel 2
  for (float poison : {kNaN, kInf, -kInf}) {
    SCOPED_TRACE(poison);
    Tensor<float> xp = x;
    xp(1, 2, ph, pw) = poison;
    const Tensor<float> e = block.forward_eval(xp), d = deployed.forward(xp);
    for (const Tensor<float>* which : {&e, &d}) {
      const Tensor<float>& out = *which;
      const Tensor<float>& clean = which == &e ? clean_eval : clean_deployed;
      for (std::int64_t n = 0; n < 3; ++n)
        for (std::int64_t o = 0; o < 6; ++o)
          for (std::int64_t h = 0; h < 7; ++h)
            for (std::int64_t w = 0; w < 7; ++w) {
              const bool hit = n == 1 && std::abs(h - ph) <= 1 && std::abs(w - pw) <= 1;
              const float v = out(n, o, h, w);
              if (hit) EXPECT_FALSE(std::isfinite(v)) << "(" << n << ", " << o << ", " << h << ", " << w << ")";
              else EXPECT_EQ(v, clean(n, o, h, w)) << "(" << n << ", " << o << ", " << h << ", " << w << ")";
            }
    }
  }
}

// In training, one NaN poisons the batch statistics: every output, every gradient and the
// running statistics become NaN, as in PyTorch. Nothing throws or crashes; reloading a
// saved state dict restores the block.
TEST(ReliabilityNonFinite, NaNInATrainingBatchPoisonsStatisticsLikePyTorchWithoutCrashing) {
  OREPA<float, SiLU> block(OrepaOptions(4, 6, 3).seed(4));
  Rng rng(4);
  test::randomise(block, rng);
  io::SafetensorsWriter saved;
  io::save_state_dict(block, saved);
  const Snapshot before = snapshot(block);

  auto x = random_tensor<float>({2, 4, 6, 6}, rng);
  x(0, 1, 3, 3) = kNaN;
  const Tensor<float>& y = block.forward_train(x);
  for (float v : y) EXPECT_TRUE(std::isnan(v));
  const Tensor<float>& dx = block.backward(random_tensor<float>(y.sizes(), rng));
  EXPECT_EQ(dx.sizes(), x.sizes());
  for (float v : block.param("weight_orepa_origin").grad) EXPECT_TRUE(std::isnan(v));
  for (float v : block.bn().running_mean.value) EXPECT_TRUE(std::isnan(v));
  for (float v : block.bn().running_var.value) EXPECT_TRUE(std::isnan(v));
  EXPECT_EQ(block.bn().num_batches_tracked, before.batches[0] + 1);

  x(0, 1, 3, 3) = kInf;  // +Inf: the conv gives +Inf and -Inf in one channel, so the mean is NaN
  EXPECT_NO_THROW(block.forward_train(x));

  io::load_state_dict(block, io::SafetensorsFile::from_bytes(saved.to_bytes()));
  block.zero_grad();
  expect_unchanged(before, snapshot(block), "after reloading the state dict");
}

// ---- numerically broken blocks are not deployed -----------------------------------------

namespace {

// "[i0, i1, ...]": the index of flat element j of `shape`, computed here.
std::string index_of(const Shape& shape, std::int64_t j) {
  std::vector<std::int64_t> idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) idx[d] = j % shape[d], j /= shape[d];
  std::string r = "[";
  for (std::size_t d = 0; d < idx.size(); ++d) r += (d ? ", " : "") + std::to_string(idx[d]);
  return r + "]";
}

}  // namespace

// Every block type refuses to deploy a NaN or Inf in any of its tensors (parameters and
// buffers, running mean included), naming the tensor and the first bad index; and a BN
// whose running_var is negative or leaves running_var + eps <= 0. The block is unchanged
// and deploys again once the value is repaired.
TEST(ReliabilityNumerics, DeployRefusesNonFiniteTensorsNamingTheTensorAndFirstIndex) {
  for (const auto& c : block_cases()) {
    SCOPED_TRACE(c.name);
    auto block = c.make();
    Rng rng(20);
    test::randomise(block, rng);
    const Tensor<float> x = random_tensor<float>({1, 4, 6, 6}, rng);
    const Tensor<float> good = block.deploy().forward(x);
    const auto params = block.named_parameters(), buffers = block.named_buffers();
    int planted = 0;
    for (const auto* list : {&params, &buffers})
      for (const auto& [name, p] : *list) {
        Tensor<float>& v = p->value;
        if (v.numel() == 0) continue;
        const std::int64_t first = v.numel() / 2, later = v.numel() - 1;
        const float keep_first = v[first], keep_later = v[later];
        v[later] = kInf;
        v[first] = planted % 2 ? kNaN : -kInf;
        const Snapshot before = snapshot(block);
        expect_error<value_error>([&] { (void)block.deploy(); },
                                  "tensor '" + name + "' holds " + (planted % 2 ? "nan" : "-inf") + " at index " +
                                      index_of(v.sizes(), first),
                                  name);
        expect_unchanged(before, snapshot(block), "after the refused deploy");
        v[first] = keep_first, v[later] = keep_later;
        ++planted;
      }
    EXPECT_GE(planted, 4);
    for (const auto& prefix : test::bn_prefixes(block)) {
      auto& bn = test::batch_norm(block, prefix);
      const float keep = bn.running_var.value[2];
      bn.running_var.value[2] = -0.5f;
      expect_error<value_error>([&] { (void)block.deploy(); }, "tensor '" + prefix + "running_var' holds -0.5 at index [2]",
                                prefix + " negative");
      bn.running_var.value[2] = -1e-5f;  // eps almost cancels it: the fold would scale by ~2e6
      expect_error<value_error>([&] { (void)block.deploy(); }, "a variance is never negative", prefix + " -eps");
      bn.running_var.value[2] = 0.f;  // a constant channel: fine with eps > 0 ...
      EXPECT_NO_THROW((void)block.deploy());
      const double eps = bn.eps;
      bn.eps = 0;  // ... but not without eps
      expect_error<value_error>([&] { (void)block.deploy(); }, "1 / sqrt(running_var + eps) = 1 / sqrt(0)",
                                prefix + " zero");
      bn.eps = eps;
      bn.running_var.value[2] = keep;
    }
    EXPECT_EQ(max_abs_diff(block.deploy().forward(x), good), 0.0);
  }
}

// A Sequential names the tensor under the layer's prefix; finite tensors whose fold
// overflows (a huge gamma over a zero variance) are refused too.
TEST(ReliabilityNumerics, SequentialNamesTheLayerAndOverflowingFoldsAreRefused) {
  Sequential<float> net;
  net.add(OREPA<float, SiLU>(OrepaOptions(3, 4, 3)));
  net.add(ConvBN<float, SiLU>(ConvOptions(4, 4, 1)));
  auto& cb = net.get<ConvBN<float, SiLU>>(1);
  cb.bn().running_mean.value[3] = kNaN;
  expect_error<value_error>([&] { (void)net.deploy(); }, "tensor '1.bn.running_mean' holds nan at index [3]",
                            "Sequential");
  cb.bn().running_mean.value[3] = 0.f;
  EXPECT_NO_THROW((void)net.deploy());
  cb.bn().weight.value[1] = 3e38f;  // 3e38 / sqrt(0 + 1e-5) is no float
  cb.bn().running_var.value[1] = 0.f;
  expect_error<value_error>([&] { (void)cb.deploy(); }, "the folded kernel holds", "fold overflow");
  expect_error<value_error>([&] { (void)deployable_fold(cb, "model.1."); }, "ConvBN 'model.1.': the folded kernel",
                            "fold overflow, prefixed");
}

TEST(ReliabilityHostile, StateDictThatDoesNotFitIsRejectedAndTheBlockIsUnchanged) {
  OREPA<float, SiLU> src(OrepaOptions(4, 8, 3).seed(7));
  Rng rng(7);
  test::randomise(src, rng);
  src.bn().num_batches_tracked = 12;
  OREPA<float, SiLU> dst(OrepaOptions(4, 8, 3).seed(8));
  test::randomise(dst, rng);
  dst.bn().num_batches_tracked = 3;
  const Snapshot before = snapshot(dst);

  // Writes src's state dict with `edit` applied to each tensor (return false to drop it).
  const auto sd = src.state_dict();
  using Edit = std::function<bool(io::SafetensorsWriter&, const std::string&, const Tensor<float>&)>;
  auto file_with = [&](const Edit& edit) {
    io::SafetensorsWriter w;
    for (const auto& n : sd.names())
      if (!sd.is_count(n) && edit(w, n, sd.tensor(n))) w.add(n, sd.tensor(n));
    w.add_int64("bn.num_batches_tracked", {}, {12});
    return w.to_bytes();
  };
  const Bytes missing = file_with([](auto&, const std::string& n, auto&) { return n != "weight_orepa_prior"; });
  const Bytes extra = file_with([](io::SafetensorsWriter& w, const std::string& n, const Tensor<float>& t) {
    if (n == "vector") w.add("vector_extra", t);
    return true;
  });
  const Bytes misshaped = file_with([](io::SafetensorsWriter& w, const std::string& n, const Tensor<float>&) {
    if (n != "bn.running_var") return true;
    w.add(n, Tensor<float>({8, 1}));
    return false;
  });
  // Right names and shapes, but a dtype that cannot be converted: found only while
  // converting, which happens before anything is assigned.
  const Bytes f8_dtype = file_with([](io::SafetensorsWriter& w, const std::string& n, const Tensor<float>& t) {
    if (n != "weight_orepa_1x1_kxk_conv2") return true;
    const std::vector<unsigned char> raw(std::size_t(t.numel()), 0x38);  // F8: one byte per element
    w.add_raw(io::TensorEntry{n, io::DType::F8_E4M3, t.sizes(), raw.data(), raw.size()});
    return false;
  });
  io::SafetensorsWriter half_count;  // num_batches_tracked of 1.5
  for (const auto& n : sd.names())
    if (!sd.is_count(n)) half_count.add(n, sd.tensor(n));
  half_count.add("bn.num_batches_tracked", Tensor<float>(Shape{}, 1.5f));
  Bytes truncated = file_with([](auto&, auto&, auto&) { return true; });
  truncated.resize(truncated.size() - 3);

  struct Case {
    const char* what;
    Bytes bytes;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"missing", missing, "1 missing: weight_orepa_prior [8, 3, 3]"},
      {"extra", extra, "1 unexpected: vector_extra"},
      {"mis-shaped", misshaped, "bn.running_var (expected [8], got [8, 1])"},
      {"F8 dtype", f8_dtype, "reading dtype F8_E4M3 as floating point is not supported"},
      {"fractional num_batches_tracked", half_count.to_bytes(), "value is not an integer"},
  };
  for (const auto& c : cases) {
    expect_error<format_error>(
        [&] { io::load_state_dict(dst, io::SafetensorsFile::from_bytes(c.bytes, "ckpt.safetensors")); }, c.needle,
        c.what);
    expect_unchanged(before, snapshot(dst), c.what);
  }
  expect_error<format_error>([&] { (void)io::SafetensorsFile::from_bytes(truncated, "ckpt.safetensors"); },
                             "ckpt.safetensors", "truncated file");
  // Tolerated on request: the extra tensor is ignored and the rest loads.
  io::load_state_dict(dst, io::SafetensorsFile::from_bytes(extra), "", io::Unexpected::ignore);
  EXPECT_EQ(dst.bn().num_batches_tracked, 12);
  for (const auto& n : sd.names())
    if (!sd.is_count(n)) {
      EXPECT_EQ(max_abs_diff(dst.param(n).value, sd.tensor(n)), 0.0) << n;
    }
}

// Sizes that cannot be allocated are config_error from the size arithmetic itself, never
// std::bad_alloc or an allocator abort (under ASan an attempt at terabytes would abort).
TEST(ReliabilityHostile, AbsurdSizesAreRejectedBeforeAllocating) {
  const std::int64_t c31 = std::int64_t(1) << 31, e40 = std::int64_t(1) << 40;
  expect_error<config_error>([&] { Tensor<float> t(Shape{e40}); }, "byte limit", "2^40-element tensor");
  expect_error<config_error>([&] { Tensor<double> t(Shape{e40, e40}); }, "overflows", "2^80 elements");
  Tensor<float> t({2, 3}, 1.5f);
  expect_error<config_error>([&] { t.reset({e40}); }, "byte limit", "reset to 2^40");
  expect_error<config_error>([&] { t.resize({e40, e40}); }, "overflows", "resize to 2^80");
  EXPECT_EQ(t.sizes(), (Shape{2, 3}));  // unchanged
  for (float v : t) EXPECT_EQ(v, 1.5f);

  // Blocks with 2^31 channels: the kernel shape overflows int64 or exceeds the byte limit.
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(c31, c31, 3)); }, "overflows",
                             "OREPA 2^31 -> 2^31");
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(c31, 16, 3)); }, "byte limit",
                             "OREPA 2^31 -> 16");
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(16, c31, 3)); }, "byte limit",
                             "OREPA 16 -> 2^31");
  expect_error<config_error>([&] { OREPA_1x1<float, SiLU> b(ConvOptions(c31, c31, 1)); }, "byte limit",
                             "OREPA_1x1 2^31 -> 2^31");
  expect_error<config_error>([&] { OREPA_LargeConv<float, SiLU> b(ConvOptions(c31, 8, 7)); }, "byte limit",
                             "OREPA_LargeConv 2^31 -> 8");
  expect_error<config_error>([&] { (void)yolo_conv<float, SiLU>(ConvOptions(c31, c31, 3)); }, "overflows", "yolo_conv 2^31");

  // Geometry values beyond max_conv_param (2^16) or whose arithmetic would overflow.
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(4, 4, 3).padding(std::int64_t(1) << 35)); },
                             "padding must be <= 65536", "padding 2^35");
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(4, 4, 3).dilation(std::int64_t(1) << 62)); },
                             "dilation must be <= 65536", "dilation 2^62");
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(4, 4, 3).stride(std::int64_t(1) << 40)); },
                             "stride must be <= 65536", "stride 2^40");
  expect_error<config_error>([&] { OREPA<float, SiLU> b(OrepaOptions(4, 4, 262145).padding(0).dilation(65536)); },
                             "kernel span", "dilated span above 2^34");
  ConvGeometry g;
  g.in_channels = g.out_channels = 4, g.kernel = 3, g.padding = 1;
  expect_error<shape_error>([&] { (void)g.output_shape({1, 4, std::numeric_limits<std::int64_t>::max(), 8}, "x"); },
                            "height and width", "INT64_MAX input height");
  expect_error<config_error>([&] { (void)g.output_shape({e40, 4, 1 << 20, 1 << 20}, "x"); }, "overflows",
                             "output element count overflows");

  // A safetensors header may claim anything; the claim is checked against the bytes.
  const std::string text = R"({"t":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4]}})";
  Bytes file;
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(text.size() >> (8 * i)));
  file.insert(file.end(), text.begin(), text.end());
  file.insert(file.end(), 4, 0);
  expect_error<format_error>([&] { (void)io::SafetensorsFile::from_bytes(file, "huge.safetensors"); },
                             "needs 4398046511104 bytes", "header claiming 2^40 floats");
}

// Regression inputs from fuzz/fuzz_block_config.

// Padding 2^31 was accepted; the output shape of the next forward, [3, 4, 2^32 + 5, 2^32 + 5],
// then overflowed int64 in the block's forward_train (N * OH * OW): UBSan signed overflow.
// Now such a padding is rejected up front, and output_shape checks the output's size.
TEST(ReliabilityFuzzRegression, Padding2p31IsRejectedAndHugeOutputsAreConfigErrors) {
  expect_error<config_error>(
      [] { OREPA_1x1<float, SiLU> b(ConvOptions(4, 4, 1).padding(std::int64_t(1) << 31)); }, "padding must be <=",
      "padding 2^31");
  // The largest padding accepted still cannot produce an output no tensor can hold: the
  // size is checked before oneDNN builds anything and the block is unchanged.
  OREPA_1x1<float, SiLU> wide(ConvOptions(4, 4, 1).padding(std::int64_t(1) << 16));
  const Snapshot before = snapshot(wide);
  const Tensor<float> x({3, 4, 5, 5}, 0.5f);
  expect_error<config_error>([&] { wide.forward_train(x); }, "byte tensor limit", "forward_train");
  expect_error<config_error>([&] { (void)wide.forward_eval(x); }, "byte tensor limit", "forward_eval");
  expect_error<config_error>([&] { (void)wide.deploy().forward(x); }, "byte tensor limit", "deployed forward");
  EXPECT_EQ(wide.primitive_creations(), 0);
  expect_unchanged(before, snapshot(wide), "after the rejected forwards");
  ConvGeometry g;  // the same check catches int64 overflow of the element count
  g.in_channels = g.out_channels = 4, g.padding = std::int64_t(1) << 16;
  expect_error<config_error>([&] { (void)g.output_shape({std::int64_t(1) << 40, 4, 5, 5}, "x"); }, "overflows",
                             "element count overflow");
}

// A 1x1 OREPA<float, ReLU> (10 -> 9, stride 2, padding 4) with dilation 2^31 was accepted
// (dilation does not matter for a 1x1 kernel) and oneDNN's JIT kernel then read out of
// bounds (SEGV in JIT code under ASan; a dilation of 2^31 - 1 crashes the deployed conv
// even without sanitizers). Stride, padding and dilation are now capped at 2^16.
TEST(ReliabilityFuzzRegression, Dilation2p31On1x1IsAConfigError) {
  for (std::int64_t d : {std::int64_t(1) << 31, (std::int64_t(1) << 31) - 1, (std::int64_t(1) << 16) + 1}) {
    SCOPED_TRACE(d);
    expect_error<config_error>(
        [&] { OREPA<float, ReLU> b(OrepaOptions(10, 9, 1).stride(2).dilation(d).padding(4).internal_channels(6)); },
        "dilation must be <= 65536", "OREPA");
    ConvGeometry g;
    g.in_channels = 10, g.out_channels = 9, g.stride = 2, g.dilation = d, g.padding = 4;
    expect_error<config_error>(
        [&] { DeployedConv<float> c(g, Tensor<float>({9, 10, 1, 1}), Tensor<float>({9}), ReLU{}); },
        "dilation must be <= 65536", "DeployedConv");
  }
  // The cap itself is fine and gives the dense result (dilation is irrelevant for 1x1).
  OREPA<float, ReLU> capped(OrepaOptions(10, 9, 1).stride(2).dilation(65536).padding(4).seed(1));
  OREPA<float, ReLU> dense(OrepaOptions(10, 9, 1).stride(2).padding(4).seed(1));
  Rng rng(9);
  const auto x = random_tensor<float>({2, 10, 20, 20}, rng);
  EXPECT_LE(max_abs_diff(capped.deploy().forward(x), dense.deploy().forward(x)), 1e-6);
  EXPECT_LE(max_abs_diff(capped.forward_train(x), dense.forward_train(x)), 1e-5);
}

// yolo_conv(4, 5, 9, 3, 1, 2^62) computed autopad(k, d) = d * (k - 1) / 2 before any check:
// signed overflow (UBSan at yolo.hpp:16). Autopad (ConvOptionsBase::autopad) now leaves an
// out-of-range dilation to the validation.
TEST(ReliabilityFuzzRegression, YoloConvHugeDilationIsAConfigError) {
  expect_error<config_error>([] { (void)yolo_conv<float, SiLU>(ConvOptions(4, 5, 9).stride(3).dilation(std::int64_t(1) << 62)); }, "dilation",
                             "yolo_conv dilation 2^62");
  expect_error<config_error>([] { (void)yolo_conv<float, SiLU>(ConvOptions(4, 5, 9).stride(3).dilation(std::int64_t(1) << 20)); },
                             "must be <= 65536", "yolo_conv dilation 2^20");
}

// ---- concurrency -------------------------------------------------------------------------

// 4 threads x 200 calls on a shared deployed block, inputs of four shapes interleaved, both
// forward forms; every output must match the single-threaded one. The threads start
// together on a copy without primitives, so they also race to create them.
TEST(ReliabilityConcurrency, DeployedForwardFromFourThreadsMatchesSingleThreaded) {
  OREPA<float, SiLU> block(OrepaOptions(8, 16, 3).groups(2).seed(11));
  Rng rng(12);
  test::randomise(block, rng);
  const Shape shapes[] = {{1, 8, 12, 12}, {2, 8, 9, 7}, {3, 8, 16, 16}, {1, 8, 5, 21}};
  std::vector<Tensor<float>> inputs, expected;
  const auto reference = block.deploy();
  for (int rep = 0; rep < 2; ++rep)
    for (const auto& s : shapes) {
      inputs.push_back(random_tensor<float>(s, rng));
      expected.push_back(reference.forward(inputs.back()));
    }
  std::vector<double> scale;  // max(1, max |expected|) per input: the comparison is relative
  for (const auto& e : expected) scale.push_back(std::max(1.0, max_abs_diff(e, Tensor<float>(e.sizes()))));
  const auto shared = block.deploy();  // cold: no primitive yet

  constexpr int kThreads = 4, kCalls = 200;
  std::vector<double> worst(kThreads, 0.0);
  std::vector<int> bit_mismatches(kThreads, 0), errors(kThreads, 0);
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();  // start together
      Tensor<float> buffer;
      for (int i = 0; i < kCalls; ++i) {
        const std::size_t k = std::size_t(t * 5 + i * 3) % inputs.size();
        try {
          Tensor<float> y;
          if (i % 2) y = shared.forward(inputs[k]);
          else shared.forward(inputs[k], buffer), y = buffer;
          worst[std::size_t(t)] = std::max(worst[std::size_t(t)], max_abs_diff(y, expected[k]) / scale[k]);
          const std::size_t bytes = sizeof(float) * std::size_t(y.numel());
          bit_mismatches[std::size_t(t)] += std::memcmp(y.data(), expected[k].data(), bytes) != 0;
        } catch (const std::exception&) {
          ++errors[std::size_t(t)];
        }
      }
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(errors[std::size_t(t)], 0) << "thread " << t;
    EXPECT_LE(worst[std::size_t(t)], 1e-6) << "thread " << t;
    // Same primitive, same data: oneDNN is deterministic here, so expect exact equality.
    EXPECT_EQ(bit_mismatches[std::size_t(t)], 0) << "thread " << t;
  }
  EXPECT_EQ(shared.primitive_creations(), 4);  // one per shape, even when created concurrently
}

// Distinct training blocks may be trained from distinct threads (the engine, the
// per-thread streams and oneDNN's primitive cache are shared safely); the results equal a
// single-threaded run.
TEST(ReliabilityConcurrency, SeparateTrainingBlocksInSeparateThreadsAreIndependent) {
  auto train = [](std::uint64_t seed) {
    OREPA<float, SiLU> b(OrepaOptions(4, 8, 3).seed(seed));
    Rng rng(seed);
    for (int step = 0; step < 4; ++step) {
      const auto x = random_tensor<float>({2, 4, 10, 10}, rng);
      const auto& y = b.forward_train(x);
      b.backward(random_tensor<float>(y.sizes(), rng));
    }
    return snapshot(b);
  };
  std::vector<Snapshot> alone, together(4);
  for (int t = 0; t < 4; ++t) alone.push_back(train(std::uint64_t(t)));
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t) pool.emplace_back([&, t] { together[std::size_t(t)] = train(std::uint64_t(t)); });
  for (auto& th : pool) th.join();
  for (std::size_t t = 0; t < 4; ++t) expect_unchanged(alone[t], together[t], "thread " + std::to_string(t));
}

// SafetensorsFile's const methods (names, entry, get, get_int) may run concurrently.
TEST(ReliabilityConcurrency, SafetensorsFileConstMethodsFromFourThreads) {
  const auto file = io::SafetensorsFile::open(test::data_path("orepa_k3_g2.safetensors"));
  std::vector<std::string> names = file.names();
  std::vector<Tensor<float>> expected;
  for (const auto& n : names) expected.push_back(file.get<float>(n));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep)
        for (std::size_t j = 0; j < names.size(); ++j) {
          const auto v = file.get<float>(names[(j + std::size_t(t)) % names.size()]);
          mismatches[std::size_t(t)] += max_abs_diff(v, expected[(j + std::size_t(t)) % names.size()]) != 0.0;
          mismatches[std::size_t(t)] += file.names() != names;
        }
    });
  for (auto& th : pool) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(mismatches[std::size_t(t)], 0) << "thread " << t;
}

// ---- nothing lost: interrupted writes ----------------------------------------------------

namespace {

/// A private folder with an existing checkpoint `model.safetensors`.
class ReliabilityFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_dir();
    path_ = (dir_ / "model.safetensors").string();
    io::SafetensorsWriter w;
    w.add("w", Tensor<float>({4}, std::vector<float>{1, 2, 3, 4}));
    w.add_int64("n", {}, {9});
    w.write(path_);
    old_ = read_all(path_);
    // 16 MiB of data, written with one write() per call: large enough to stop midway.
    big_.add("big", Tensor<float>({std::int64_t(1) << 22}, 0.5f));
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<fs::path> temporaries() const {
    std::vector<fs::path> r;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().find(".tmp.") != std::string::npos) r.push_back(e.path());
    return r;
  }
  void expect_old_file_intact() const {
    EXPECT_EQ(read_all(path_), old_);
    const auto f = io::SafetensorsFile::open(path_);
    EXPECT_EQ(f.names(), (std::vector<std::string>{"w", "n"}));
    EXPECT_EQ(f.get<float>("w")[3], 4.0f);
    EXPECT_EQ(f.get_int("n"), 9);
  }

  /// Forks a child that caps its file size at `limit` bytes, sets the SIGXFSZ action with
  /// `configure` and runs big_.write(path_); returns its pid. Output is flushed first so
  /// nothing buffered is written twice.
  pid_t spawn_writer(rlim_t limit, void (*configure)()) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid != 0) return pid;
    const struct rlimit rl{limit, limit};
    ::setrlimit(RLIMIT_FSIZE, &rl);
    configure();
    try {
      big_.write(path_);
    } catch (const format_error& e) {
      ::_exit(std::strstr(e.what(), "write failed") ? 10 : 11);
    } catch (...) {
      ::_exit(12);
    }
    ::_exit(0);
  }

  fs::path dir_;
  std::string path_;
  Bytes old_;
  io::SafetensorsWriter big_;
};

}  // namespace

// The writer stops itself at 1 MiB of its temporary file (its SIGXFSZ handler raises
// SIGSTOP, so it is stopped mid-write, deterministically) and is then killed with SIGKILL.
// The old file must be intact and readable; the partial temporary file is left behind
// (a killed process cannot clean up) but never took the checkpoint's name.
TEST_F(ReliabilityFiles, WriterKilledMidwayLeavesThePreviousFileIntact) {
  constexpr rlim_t limit = 1 << 20;
  const pid_t pid = spawn_writer(limit, [] {
    struct sigaction sa {};
    sa.sa_handler = [](int) { ::raise(SIGSTOP); };
    ::sigaction(SIGXFSZ, &sa, nullptr);
  });
  ASSERT_GT(pid, 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, WUNTRACED), pid);
  ASSERT_TRUE(WIFSTOPPED(status)) << "the writer was not stopped midway; wait status " << status;
  const auto partial = temporaries();
  ASSERT_EQ(partial.size(), 1u);
  EXPECT_EQ(fs::file_size(partial[0]), limit);  // midway: 1 MiB of 16 MiB written
  expect_old_file_intact();                      // while the writer is stopped mid-write

  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "wait status " << status;
  expect_old_file_intact();
  EXPECT_EQ(temporaries(), partial);

  // A later write replaces the file completely.
  fs::remove(partial[0]);
  big_.write(path_);
  const auto f = io::SafetensorsFile::open(path_);
  EXPECT_EQ(f.names(), std::vector<std::string>{"big"});
  EXPECT_EQ(f.entry("big").nbytes, std::size_t(4) << 22);
  EXPECT_TRUE(temporaries().empty());
}

// The same file-size limit with SIGXFSZ ignored makes write() fail with EFBIG midway: the
// writer reports format_error ("write failed"), removes its temporary file and leaves the
// old file as it was.
TEST_F(ReliabilityFiles, WriteFailingMidwayLeavesThePreviousFileIntactAndNoTemporary) {
  const pid_t pid = spawn_writer(1 << 20, [] { ::signal(SIGXFSZ, SIG_IGN); });
  ASSERT_GT(pid, 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "wait status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 10) << "10: format_error 'write failed'; 0: the write succeeded; 11/12: other error";
  expect_old_file_intact();
  EXPECT_TRUE(temporaries().empty());
}

// ---- no output replaces an input or a special file ---------------------------------------

namespace {

/// A private folder holding an input checkpoint `in.safetensors` (tensor "w" = {1, 2}).
class ReliabilityOutputs : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_dir();
    in_ = path("in.safetensors");
    io::SafetensorsWriter w;
    w.add("w", Tensor<float>({2}, std::vector<float>{1, 2}));
    w.write(in_);
    in_bytes_ = read_all(in_);
    out_.add("y", Tensor<float>({3}, 7.f));
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  /// The error check_output_path gives for output `out` against the input, or "" if none.
  std::string refusal(const std::string& out) const {
    try {
      (void)io::check_output_path({"--output", out}, {{"--weights", in_}});
      return "";
    } catch (const config_error& e) {
      return e.what();
    }
  }
  bool has_temporaries() const {
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
    return false;
  }

  fs::path dir_;
  std::string in_;
  Bytes in_bytes_;
  io::SafetensorsWriter out_;
};

}  // namespace

// The same file under another spelling, through a symbolic link (or a chain of them) or a
// hard link is refused, naming both; a new path or another regular file is accepted.
TEST_F(ReliabilityOutputs, TheSameFileAsAnInputIsRefusedHoweverItIsReached) {
  EXPECT_EQ(refusal(path("new.safetensors")), "");
  EXPECT_EQ(io::check_output_path({"--output", path("new.safetensors")}, {{"--weights", in_}}), path("new.safetensors"));
  std::ofstream(path("other.safetensors")) << "old";
  EXPECT_EQ(refusal(path("other.safetensors")), "");

  const std::string same = refusal(in_);
  EXPECT_NE(same.find("--output '" + in_ + "' is the same file as --weights '" + in_ + "'"), std::string::npos) << same;
  EXPECT_NE(refusal((dir_ / "." / "in.safetensors").string()).find("same file as --weights"), std::string::npos);
  fs::create_symlink("in.safetensors", dir_ / "link");
  fs::create_symlink("link", dir_ / "link_to_link");
  fs::create_hard_link(in_, dir_ / "hard");
  EXPECT_NE(refusal(path("link")).find("the symbolic link's target '" + fs::canonical(in_).string() + "'"),
            std::string::npos)
      << refusal(path("link"));
  EXPECT_NE(refusal(path("link_to_link")).find("is the same file as --weights"), std::string::npos);
  EXPECT_NE(refusal(path("hard")).find("hard link"), std::string::npos) << refusal(path("hard"));
  // An input that does not exist cannot be overwritten, so it is no reason to refuse.
  EXPECT_EQ(io::check_output_path({"--output", in_}, {{"--input", path("missing")}}), in_);
  EXPECT_EQ(read_all(in_), in_bytes_);
}

// A symbolic link to a regular file is followed: the target is replaced atomically and
// the link stays a link.
TEST_F(ReliabilityOutputs, ASymbolicLinkToARegularFileReplacesTheTarget) {
  std::ofstream(path("target.safetensors")) << "old contents";
  fs::create_symlink("target.safetensors", dir_ / "link");
  fs::create_symlink("link", dir_ / "link2");
  EXPECT_EQ(io::output_target({"--output", path("link2")}), fs::canonical(path("target.safetensors")).string());
  out_.write(path("link2"));
  EXPECT_TRUE(fs::is_symlink(dir_ / "link"));
  EXPECT_TRUE(fs::is_symlink(dir_ / "link2"));
  EXPECT_EQ(fs::read_symlink(dir_ / "link"), "target.safetensors");
  EXPECT_EQ(io::SafetensorsFile::open(path("target.safetensors")).get<float>("y")[2], 7.f);
  EXPECT_FALSE(has_temporaries());
}

// FIFOs, devices and directories (directly or behind a link) and dangling links are
// refused by the check and by the writer itself, before anything is created; each is
// left as it was (a FIFO is never opened, which would block).
TEST_F(ReliabilityOutputs, SpecialFilesAndDanglingLinksAreRefusedAndLeftAlone) {
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0) << std::strerror(errno);
  fs::create_symlink("fifo", dir_ / "link_to_fifo");
  fs::create_symlink("nowhere.safetensors", dir_ / "dangling");
  fs::create_directory(dir_ / "sub");
  fs::create_symlink("sub", dir_ / "link_to_dir");
  const std::vector<std::pair<std::string, std::string>> cases{
      {"fifo", "is a FIFO (named pipe)"},
      {"link_to_fifo", "is a symbolic link to '" + (fs::canonical(dir_) / "fifo").string() + "', which is a FIFO"},
      {"dangling", "is a symbolic link whose target cannot be resolved"},
      {"sub", "is a directory"},
      {"link_to_dir", "which is a directory"}};
  for (const auto& [name, why] : cases) {
    SCOPED_TRACE(name);
    EXPECT_NE(refusal(path(name)).find(why), std::string::npos) << refusal(path(name));
    const std::string target = path(name);  // C++17 lambdas cannot capture a structured binding (clang)
    expect_error<config_error>([&] { out_.write(target); }, "output '" + target + "' is a", "writer");
  }
  struct stat st {};
  ASSERT_EQ(::lstat(path("fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_TRUE(fs::is_symlink(dir_ / "dangling"));
  EXPECT_FALSE(fs::exists(dir_ / "nowhere.safetensors"));
  EXPECT_TRUE(fs::is_empty(dir_ / "sub"));
  EXPECT_FALSE(has_temporaries());

  // A device node of our own (never the system's /dev files), where we may create one.
  if (::mknod(path("null").c_str(), S_IFCHR | 0600, makedev(1, 3)) != 0)
    GTEST_SKIP() << "mknod is not permitted here (" << std::strerror(errno) << "); device case not run";
  EXPECT_NE(refusal(path("null")).find("is a character device"), std::string::npos) << refusal(path("null"));
  expect_error<config_error>([&] { out_.write(path("null")); }, "is a character device", "writer on a device");
  ASSERT_EQ(::lstat(path("null").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
}
