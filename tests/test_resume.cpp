// Saving and resuming: StateDict iteration and erase, io::save / io::load, the state of
// optimizers, schedules and the random generator, TrainingCheckpoint's all-or-nothing
// loading, Calibrator::calibration()'s lifetime, and a run stopped after some steps and
// resumed in a new process ending bit-identical to an uninterrupted one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace orepa;
using orepa::test::contains;
using orepa::test::message_of;
using orepa::test::TempDir;

namespace {

// Bit patterns equal (so -0 != +0 and NaNs compare by payload).
template <class S>
bool same_bits(const Tensor<S>& a, const Tensor<S>& b) {
  return a.sizes() == b.sizes() && std::memcmp(a.data(), b.data(), sizeof(S) * std::size_t(a.numel())) == 0;
}

// Every entry of `a` and `b` (names, order, kinds, values) identical bit for bit; the
// first difference as a failure message.
template <class S>
::testing::AssertionResult identical(const StateDict<S>& a, const StateDict<S>& b) {
  if (a.names() != b.names()) return ::testing::AssertionFailure() << "the names differ";
  for (const auto& [n, e] : a) {
    const auto& f = b.entry(n);
    if (e.is_tensor() != f.is_tensor() || e.is_count() != f.is_count()) return ::testing::AssertionFailure() << n << ": kinds differ";
    if (e.is_tensor() && !same_bits(e.tensor(), f.tensor()))
      return ::testing::AssertionFailure() << n << ": tensors differ by " << max_abs_diff(e.tensor(), f.tensor());
    if (e.is_count() && e.count() != f.count()) return ::testing::AssertionFailure() << n << ": " << e.count() << " vs " << f.count();
    if (e.is_real()) {
      const double x = e.real(), y = f.real();
      if (std::memcmp(&x, &y, sizeof x) != 0) return ::testing::AssertionFailure() << n << ": " << x << " vs " << y;
    }
  }
  return ::testing::AssertionSuccess();
}

// A small network of the kinds of tensors a model has: kernels, OREPA's vector, BN
// parameters and statistics, fixed buffers, a linear bias.
Sequential<float> small_net(std::uint64_t seed) {
  Sequential<float> net;
  net.add(OREPA<float, ReLU>(OrepaOptions(1, 4, 3).seed(seed)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(4, 3, seed + 1));
  return net;
}

// One training step's gradients on a fixed batch (no optimizer step).
void backward_once(Sequential<float>& net, std::uint64_t seed) {
  Rng rng(seed);
  const auto x = test::random_tensor<float>({4, 1, 6, 6}, rng);
  SoftmaxCrossEntropy<float> ce;
  (void)ce.forward_train(net.forward_train(x), {0, 1, 2, 1});
  net.backward(ce.backward());
}

}  // namespace

TEST(StateDict, IteratesInOrderAndErases) {
  StateDict<float> sd;
  sd.insert("w", Tensor<float>({2}, 1.5f));
  sd.insert_count("n", 7);
  sd.insert_real("lr", 0.1);
  sd.insert("b", Tensor<float>({3}));
  std::vector<std::string> seen;
  for (const auto& [name, e] : sd) seen.push_back(name + ":" + (e.is_tensor() ? "t" : e.is_count() ? "c" : "r"));
  EXPECT_EQ(seen, (std::vector<std::string>{"w:t", "n:c", "lr:r", "b:t"}));
  EXPECT_EQ(sd.count("n"), 7);
  EXPECT_EQ(sd.real("lr"), 0.1);

  EXPECT_TRUE(sd.erase("n"));
  EXPECT_FALSE(sd.erase("n"));
  EXPECT_EQ(sd.names(), (std::vector<std::string>{"w", "lr", "b"}));
  EXPECT_EQ(sd.tensor("b").sizes(), (Shape{3}));  // lookups after an erase still find the right entry
  EXPECT_EQ(sd.tensor("w")[1], 1.5f);
  EXPECT_FALSE(sd.contains("n"));
  sd.insert_count("n", 8);  // the name is free again, now last
  EXPECT_EQ(sd.names().back(), "n");

  EXPECT_TRUE(contains(message_of<config_error>([&] { sd.insert_real("w", 1.0); }), "'w' is already present"));
  EXPECT_TRUE(contains(message_of<config_error>([&] { (void)sd.tensor("lr"); }), "it is a real"));
  EXPECT_TRUE(contains(message_of<config_error>([&] { (void)sd.count("zz"); }), "no counter named 'zz'"));
}

TEST(SaveLoad, OneCallFormsRoundTripExactly) {
  TempDir dir;
  Sequential<float> a = small_net(1);
  backward_once(a, 3);  // running statistics away from their initial values
  a.param("0.bn.running_mean").value[0] = 0.123456789f;
  io::save(a, dir / "a.safetensors");
  Sequential<float> b = small_net(9);
  io::load(b, dir / "a.safetensors");
  EXPECT_TRUE(identical(a.state_dict(), b.state_dict()));

  // double is stored as F64: exact too (F32 would round 0.1).
  Sequential<double> d;
  d.add(Linear<double>(3, 2, 5));
  d.param("0.weight").value[0] = 0.1;
  io::save(d, dir / "d.safetensors");
  EXPECT_EQ(io::SafetensorsFile::open(dir / "d.safetensors").entry("0.weight").dtype, io::DType::F64);
  Sequential<double> e;
  e.add(Linear<double>(3, 2, 6));
  io::load(e, dir / "d.safetensors");
  EXPECT_EQ(e.param("0.weight").value[0], 0.1);

  // Strict: a file of another network names the file and the tensor, and changes nothing.
  Sequential<float> other;
  other.add(Linear<float>(5, 3, 1));
  const auto before = other.state_dict();
  const auto m = message_of<format_error>([&] { io::load(other, dir / "a.safetensors"); });
  EXPECT_TRUE(contains(m, "a.safetensors") && contains(m, "0.weight") && contains(m, "unexpected")) << m;
  EXPECT_TRUE(identical(before, other.state_dict()));
}

TEST(SaveLoad, WritersTakeTheObjectFirst) {
  Sequential<float> a = small_net(1);
  io::SafetensorsWriter w;
  io::save_state_dict(a, w, "net.");
  StateDict<float> extra;
  extra.insert_count("epoch", 4);
  extra.insert_real("lr", 0.0125);
  io::save_state_dict(extra, w, "meta.");
  const auto f = io::SafetensorsFile::from_bytes(w.to_bytes());
  EXPECT_EQ(f.entry("meta.epoch").dtype, io::DType::I64);
  EXPECT_EQ(f.entry("meta.lr").dtype, io::DType::F64);
  const auto back = io::read_state_dict<float>(f, "meta.", /*strip_prefix=*/true);
  EXPECT_EQ(back.count("epoch"), 4);
  EXPECT_EQ(back.real("lr"), 0.0125);
  Sequential<float> b = small_net(2);
  io::load_state_dict(b, f, "net.", io::Unexpected::ignore);
  EXPECT_TRUE(identical(a.state_dict(), b.state_dict()));
}

// After one step, SGD's buffer is the first update d = g + wd * p (torch's rule), AdamW's
// moments (1 - b1) g and (1 - b2) g^2.
TEST(OptimizerState, HoldsTheFirstStepsStateByName) {
  Sequential<float> net = small_net(1);
  backward_once(net, 2);
  const Tensor<float> w0 = net.param("2.weight").value, g = net.param("2.weight").grad;
  SGD<float> sgd(split_decay(net.parameters(), 0.01), SGDOptions(0.1).momentum(0.9).nesterov(true));
  EXPECT_FALSE(sgd.state_dict().contains("state.0.momentum_buffer"));  // no buffer before the first step
  sgd.step();
  const auto sd = sgd.state_dict();
  // group 0 = kernels: the OREPA kernels (8 tensors) and 2.weight, the 9th.
  ASSERT_EQ(sd.count("param_groups.0.params"), 9);
  const Tensor<float>& buf = sd.tensor("state.8.momentum_buffer");
  for (std::int64_t j = 0; j < g.numel(); ++j) EXPECT_FLOAT_EQ(buf[j], g[j] + 0.01f * w0[j]) << j;
  EXPECT_EQ(sd.count("steps"), 1);
  EXPECT_EQ(sd.real("momentum"), 0.9);
  EXPECT_EQ(sd.count("nesterov"), 1);
  EXPECT_EQ(sd.real("param_groups.1.weight_decay"), 0.0);
  EXPECT_EQ(sd.real("param_groups.0.lr"), double(0.1f));

  Sequential<float> net2 = small_net(1);
  backward_once(net2, 2);
  AdamW<float> adam(net2.parameters(), AdamWOptions(0.01).betas({0.8, 0.99}));
  adam.step();
  const auto ad = adam.state_dict();
  const auto names = net2.named_parameters();
  std::size_t k = 0;
  while (names[k].first != "2.weight") ++k;
  const std::string key = "state." + std::to_string(k) + ".";
  for (std::int64_t j = 0; j < g.numel(); ++j) {  // 1 - b in float: about 1e-6 relative
    const double gj = g[j];
    EXPECT_NEAR(ad.tensor(key + "exp_avg")[j], 0.2 * gj, 2e-6 * std::abs(0.2 * gj)) << j;
    EXPECT_NEAR(ad.tensor(key + "exp_avg_sq")[j], 0.01 * gj * gj, 2e-6 * 0.01 * gj * gj) << j;
  }
  EXPECT_EQ(ad.real("beta1"), 0.8);
}

// Optimizer + model saved after 3 steps and loaded into fresh objects (another
// initialisation) continue exactly as the original: 3 more steps, every bit equal.
template <class Opt, class Make>
void check_continues_bit_identically(Make make) {
  TempDir dir;
  Sequential<float> a = small_net(1);
  Opt oa = make(a);
  for (int s = 0; s < 3; ++s) {
    oa.zero_grad();
    backward_once(a, 10 + s);
    oa.set_lr(0.05f / float(s + 1));
    oa.step();
  }
  io::save(a, dir / "model.safetensors");
  io::save(oa, dir / "opt.safetensors");

  Sequential<float> b = small_net(5);
  Opt ob = make(b);
  io::load(b, dir / "model.safetensors");
  io::load(ob, dir / "opt.safetensors");
  EXPECT_EQ(ob.steps(), 3);
  EXPECT_EQ(*ob.groups()[0].lr, 0.05f / 3.f);
  for (int s = 3; s < 6; ++s) {
    for (auto [net, opt] : {std::pair{&a, &oa}, std::pair{&b, &ob}}) {
      opt->zero_grad();
      backward_once(*net, 10 + s);
      opt->step();
    }
  }
  EXPECT_TRUE(identical(a.state_dict(), b.state_dict()));
  EXPECT_TRUE(identical(oa.state_dict(), ob.state_dict()));
}

TEST(OptimizerState, LoadedOptimizersContinueBitIdentically) {
  check_continues_bit_identically<SGD<float>>([](Sequential<float>& net) {
    return SGD<float>(split_decay(net.parameters(), 5e-4), SGDOptions(0.05).momentum(0.9).nesterov(true));
  });
  check_continues_bit_identically<AdamW<float>>(
      [](Sequential<float>& net) { return AdamW<float>(split_decay(net.parameters(), 0.01), AdamWOptions(0.01)); });
}

TEST(OptimizerState, MismatchesAreNamedAndChangeNothing) {
  Sequential<float> net = small_net(1);
  backward_once(net, 2);
  SGD<float> opt(split_decay(net.parameters(), 5e-4), SGDOptions(0.1).momentum(0.9));
  opt.step();
  const auto good = opt.state_dict();

  // Another network: group sizes and buffer shapes differ.
  Sequential<float> wide;
  wide.add(OREPA<float, ReLU>(OrepaOptions(1, 6, 3).seed(1)));
  wide.add(GlobalAvgPool<float>());
  wide.add(Linear<float>(6, 3, 2));
  backward_once(wide, 2);
  SGD<float> other(split_decay(wide.parameters(), 5e-4), SGDOptions(0.2).momentum(0.5));
  const auto before = other.state_dict();
  auto m = message_of<format_error>([&] { other.load_state_dict(good); });
  EXPECT_TRUE(contains(m, "state.0.momentum_buffer (expected tensor [6, 1, 3, 3], got tensor [4, 1, 3, 3])")) << m;
  EXPECT_TRUE(identical(before, other.state_dict()));
  EXPECT_EQ(other.options().momentum(), 0.5);

  // One group instead of two.
  SGD<float> single(net.parameters(), SGDOptions(0.1).momentum(0.9));
  m = message_of<format_error>([&] { single.load_state_dict(good); });
  EXPECT_TRUE(contains(m, "2 parameter groups, the optimizer 1") && contains(m, "param_groups.0.params 9")) << m;

  // Missing, unexpected and invalid entries; an AdamW state into SGD.
  StateDict<float> bad;
  for (const auto& [n, e] : good)
    if (n != "momentum") bad.insert(n, n == "param_groups.1.lr" ? StateEntry<float>(-1.0) : e);
  bad.insert_real("betas", 0.9);
  SGD<float> same(split_decay(net.parameters(), 5e-4), SGDOptions(0.1).momentum(0.9));
  m = message_of<format_error>([&] { same.load_state_dict(bad); });
  EXPECT_TRUE(contains(m, "missing: momentum (a real)") && contains(m, "unexpected: betas") &&
              contains(m, "param_groups.1.lr -1 (must be >= 0)"))
      << m;
  AdamW<float> adam(split_decay(net.parameters(), 5e-4));
  m = message_of<format_error>([&] { adam.load_state_dict(good); });
  EXPECT_TRUE(contains(m, "AdamW::load_state_dict") && contains(m, "missing: beta1")) << m;
}

TEST(ScheduleState, SettingsRoundTripAndAreChecked) {
  CosineSchedule a(0.1, 100, 10, 0.001), b(0.5, 7);
  b.load_state_dict(a.state_dict());
  for (std::int64_t s : {0, 5, 10, 55, 99, 100, 130}) EXPECT_EQ(b.lr(s), a.lr(s)) << s;
  StepSchedule c(0.1, 30, 0.5), d(1.0, 1);
  d.load_state_dict(c.state_dict<double>());
  for (std::int64_t s : {0, 29, 30, 61}) EXPECT_EQ(d.lr(s), c.lr(s)) << s;

  auto sd = a.state_dict();
  sd.erase("warmup_steps");
  sd.insert_count("warmup_steps", 100);  // not below total_steps
  const auto m = message_of<format_error>([&] { b.load_state_dict(sd); });
  EXPECT_TRUE(contains(m, "CosineSchedule::load_state_dict") && contains(m, "warmup_steps must be in [0, total_steps = 100)")) << m;
  EXPECT_EQ(b.lr(55), a.lr(55));  // unchanged
  EXPECT_THROW(d.load_state_dict(a.state_dict()), format_error);
}

TEST(RngState, RestoresTheStreamExactly) {
  Rng a(42);
  for (int i = 0; i < 1000; ++i) (void)a.uniform();
  (void)a.normal();
  EXPECT_EQ(a.draws(), 1002u);
  Rng b(1);
  b.load_state_dict(a.state_dict());
  // The same as a generator that skipped the same draws by itself.
  std::mt19937_64 ref(42);
  ref.discard(1002);
  for (int i = 0; i < 100; ++i) {
    const std::uint64_t r = ref();
    EXPECT_EQ(b.below(1000003), r % 1000003) << i;
    EXPECT_EQ(a.below(1000003), r % 1000003) << i;
  }
  EXPECT_THROW(b.load_state_dict(StateDict<float>()), format_error);
}

// Rng's generator is written out (core/random.hpp); its stream must stay std::mt19937_64's.
TEST(RngState, IsTheStandardMersenneTwister) {
  for (std::uint64_t seed : {std::uint64_t(0), std::uint64_t(42), std::uint64_t(5489), ~std::uint64_t(0)}) {
    Rng a(seed);
    std::mt19937_64 ref(seed);
    for (int i = 0; i < 2000; ++i) ASSERT_EQ(a.below(~std::uint64_t(0)), ref() % ~std::uint64_t(0)) << seed << " " << i;
  }
  Rng b;
  b.restore(std::mt19937_64::default_seed, 9999);
  EXPECT_EQ(b.below(~std::uint64_t(0)), 9981545732273789042ULL);  // the standard's check value
}

TEST(TrainingCheckpoint, SavesEveryPartAndLoadsAllOrNothing) {
  TempDir dir;
  Sequential<float> net = small_net(1);
  backward_once(net, 2);
  SGD<float> opt(split_decay(net.parameters(), 5e-4), SGDOptions(0.1).momentum(0.9));
  opt.step();
  CosineSchedule sched(0.1, 50, 5);
  Rng rng(3);
  (void)rng.uniform();
  std::int64_t epoch = 4;
  double best = 0.75;
  io::TrainingCheckpoint<float> ck;
  ck.add("model", net).add("optimizer", opt).add("schedule", sched).add("rng", rng).add("epoch", epoch).add("best", best);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"model", "optimizer", "schedule", "rng", "epoch", "best"}));
  io::save(ck, dir / "ck.safetensors");
  const auto file = io::SafetensorsFile::open(dir / "ck.safetensors");
  EXPECT_TRUE(file.contains("model.0.bn.running_var") && file.contains("optimizer.state.0.momentum_buffer") &&
              file.contains("schedule.total_steps") && file.contains("rng.draws") && file.contains("epoch"));

  // Fresh objects (other seeds, no step) take every part.
  Sequential<float> net2 = small_net(7);
  SGD<float> opt2(split_decay(net2.parameters(), 5e-4), SGDOptions(0.3));
  CosineSchedule sched2(1.0, 2);
  Rng rng2(9);
  std::int64_t epoch2 = 0;
  double best2 = 0;
  io::TrainingCheckpoint<float> ck2;
  ck2.add("model", net2).add("optimizer", opt2).add("schedule", sched2).add("rng", rng2).add("epoch", epoch2).add("best", best2);
  io::load(ck2, dir / "ck.safetensors");
  EXPECT_TRUE(identical(net.state_dict(), net2.state_dict()));
  EXPECT_TRUE(identical(opt.state_dict(), opt2.state_dict()));
  EXPECT_EQ(sched2.lr(17), sched.lr(17));
  EXPECT_EQ(rng2.draws(), 1u);
  EXPECT_EQ(epoch2, 4);
  EXPECT_EQ(best2, 0.75);

  // A part that does not fit (an optimizer of a wider network) fails after the model has
  // loaded: the model is put back, and the error names the part.
  Sequential<float> net3 = small_net(8);
  Sequential<float> wide;
  wide.add(Linear<float>(4, 9, 1));
  SGD<float> opt3(split_decay(wide.parameters(), 5e-4), SGDOptions(0.1).momentum(0.9));
  CosineSchedule sched3(1.0, 2);
  Rng rng3(9);
  std::int64_t epoch3 = 0;
  double best3 = 0;
  io::TrainingCheckpoint<float> ck3;
  ck3.add("model", net3).add("optimizer", opt3).add("schedule", sched3).add("rng", rng3).add("epoch", epoch3).add("best", best3);
  const auto before = net3.state_dict();
  auto m = message_of<format_error>([&] { io::load(ck3, dir / "ck.safetensors"); });
  EXPECT_TRUE(contains(m, "ck.safetensors") && contains(m, "part 'optimizer'")) << m;
  EXPECT_TRUE(identical(before, net3.state_dict()));
  EXPECT_EQ(epoch3, 0);

  // A part missing from the file and an entry of no part.
  std::int64_t extra = 0;
  io::TrainingCheckpoint<float> ck4;
  ck4.add("model", net3).add("extra", extra);
  m = message_of<format_error>([&] { io::load(ck4, dir / "ck.safetensors"); });
  EXPECT_TRUE(contains(m, "'extra' is missing") && contains(m, "unexpected entry optimizer.steps")) << m;
  EXPECT_TRUE(identical(before, net3.state_dict()));

  EXPECT_THROW(ck4.add("model", net), config_error);     // taken
  EXPECT_THROW(ck4.add("a.b", epoch), config_error);     // a '.' would make names ambiguous
}

TEST(Calibrator, CalibrationIsAReferenceThatStaysValid) {
  ConvGeometry g;
  g.in_channels = 1, g.out_channels = 1, g.kernel = 1;
  DeployedConv<float> c(g, Tensor<float>(g.weight_shape(), 1.f), Tensor<float>({1}));
  Calibrator cal;
  Tensor<float> x({1, 1, 2, 2}, 0.5f);
  x[1] = 2.f;
  cal.observe(c, x);
  const Calibration& held = cal.calibration();
  int n = 0;
  for (auto& [layer, r] : cal.calibration().ranges()) {  // the loop GCC flagged as dangling before
    EXPECT_EQ(layer, "");
    EXPECT_EQ(r.hi, 2.f);
    ++n;
  }
  EXPECT_EQ(n, 1);
  x[2] = 5.f;
  cal.observe(c, x);
  EXPECT_EQ(&cal.calibration(), &held);  // the same object, brought up to date by the call
  EXPECT_EQ(held.at("").hi, 5.f);
}

#ifdef OREPA_TOOLS_DIR
// The acceptance test of resuming: examples/resume_training trains N = 44 batches in one
// process; another process stops after 30, as if killed: its last checkpoint is from the
// optimizer step at batch 28 (the warm-up's accumulation is round(1 + 3 ni / 100) batches,
// 2 from ni = 17, so steps come at 16, 18, ..., 28 and batch 29's gradient is lost with
// the process), mid-epoch; a third resumes from that checkpoint to 44. Every
// tensor, counter and real of the two final states (model, EMA, optimizer with its
// momentum buffers, schedule, sampler, iteration) must be equal bit for bit.
TEST(Resume, StoppedAndResumedInANewProcessEqualsAnUninterruptedRun) {
  TempDir dir;
  const std::string full = dir / "full.safetensors", ck = dir / "ck.safetensors", resumed = dir / "resumed.safetensors";
  auto r = test::run("resume_training", "--iterations 44 --final " + full);
  ASSERT_EQ(r.status, 0) << r.output;
  r = test::run("resume_training", "--iterations 44 --checkpoint " + ck + " --stop-after 30");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto mid = io::read_state_dict<float>(io::SafetensorsFile::open(ck));
  const std::int64_t at = mid.count("iteration");
  EXPECT_EQ(at, 29);
  EXPECT_GT(mid.count("optimizer.steps"), 0);
  EXPECT_GT(mid.count("ema.updates"), 0);
  r = test::run("resume_training", "--iterations 44 --resume " + ck + " --final " + resumed);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "resumed from " + ck + " at iteration " + std::to_string(at))) << r.output;

  const auto a = io::read_state_dict<float>(io::SafetensorsFile::open(full));
  const auto b = io::read_state_dict<float>(io::SafetensorsFile::open(resumed));
  EXPECT_EQ(a.count("iteration"), 44);
  EXPECT_TRUE(identical(a, b));
  // The check has teeth: the run moved the weights after the checkpoint.
  EXPECT_FALSE(same_bits(a.tensor("model.4.weight"), mid.tensor("model.4.weight")));
  EXPECT_FALSE(same_bits(a.tensor("ema.module.4.weight"), mid.tensor("ema.module.4.weight")));

  // A checkpoint that does not fit the program is refused, naming the file.
  io::SafetensorsWriter w;
  io::save_state_dict(small_net(1), w, "model.");
  w.write(dir / "wrong.safetensors");
  r = test::run("resume_training", "--resume " + dir / "wrong.safetensors");
  EXPECT_EQ(r.status, 1);
  EXPECT_TRUE(contains(r.output, "wrong.safetensors") && contains(r.output, "does not fit")) << r.output;
}
#endif
