// network_tour: the module layer as a consumer project uses it (the program of issue 23's
// trial, rewritten). A network mixing ConvBN, OREPA, a C3 of DBB blocks, DBB, RepVGG and a
// block of its own is built and printed, trained on the synthetic bars task, checkpointed
// with its optimizer and resumed, saved and reloaded, and deployed in fp32 and in int8
// (calibrated). Each claim is checked and printed; any that fails ends with status 1:
//   - results stay valid while held: two forwards give two tensors, not one reused buffer;
//   - add() moves a block in and returns the stored one; a copy is a compile error that
//     says why at the caller's line (`net.add(block)` of an lvalue), clone() copies on purpose;
//   - `std::cout << net` prints the tree, named_modules() lists it under state-dict names;
//   - an error inside the network names the layer's path;
//   - model + optimizer saved after k steps and loaded into fresh objects continue exactly
//     as the uninterrupted run; io::save / io::load round-trip the weights;
//   - the deployed network equals eval; int8 (calibrated) keeps the predictions.
//
//   network_tour [--steps N] [--out DIR]
#include <orepa/orepa.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace orepa;

namespace {

// A block of one's own: OREPA's branches without the frequency prior, in the generic
// branch-sum block (the same trunk, state dict and deploy as every block).
OnlineBlock<float, SiLU> orepa_without_prior(std::int64_t channels, std::uint64_t seed) {
  const ConvGeometry g = OrepaOptions(channels, channels, 3).geometry();
  Rng rng(seed);
  BranchList<float> branches = make_orepa_branches<float>(g, 0, rng);
  branches.erase(branches.begin() + 2);  // make_orepa_branches' row 2 is the prior
  return OnlineBlock<float, SiLU>(g, std::move(branches), "OREPA-without-prior");
}

Sequential<float> build_net(int classes) {
  Sequential<float> net;
  net.add(ConvBN<float, SiLU>(ConvOptions(1, 16, 3).seed(1)));
  net.add(OREPA<float, SiLU>(OrepaOptions(16, 32, 3).stride(2).seed(2)));
  net.add(C3<float>(32, 32, /*n=*/1, /*shortcut=*/true, /*e=*/0.5, /*seed=*/3, dbb_maker<float>()));
  net.add(DBB<float, SiLU>(DbbOptions(32, 32, 3).seed(4)));
  net.add(RepVGGBlock_OREPA<float>(RepVGGOptions(32, 32, 3).seed(5)));
  net.add(orepa_without_prior(32, 6));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(32, classes, /*seed=*/7));
  return net;
}

SGD<float> make_optimizer(Sequential<float>& net) {
  return SGD<float>(split_decay(net.parameters(), 5e-4), SGDOptions(0.05).momentum(0.9).nesterov(true));
}

// One SGD step on the batch that step `step` always gets, so two runs see the same data.
double train_step(Sequential<float>& net, SGD<float>& opt, const ImageDataset<float>& data, std::int64_t step) {
  const std::int64_t batch = 32, first = (step * batch) % (data.size() - batch);
  const auto [x, y] = data.slice(first, batch);
  SoftmaxCrossEntropy<float> ce;
  opt.zero_grad();
  const double loss = ce.forward_train(net.forward_train(x), y);
  net.backward(ce.backward());
  opt.step();
  return loss;
}

void check(bool ok, const std::string& claim) {
  std::printf("  %-72s %s\n", claim.c_str(), ok ? "ok" : "FAILED");
  if (!ok) throw std::runtime_error("claim failed: " + claim);
}

}  // namespace

int main(int argc, char** argv) try {
  std::int64_t steps = 40;
  std::filesystem::path out = std::filesystem::temp_directory_path() / "orepa_network_tour";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--steps" && i + 1 < argc) steps = std::max<std::int64_t>(2, std::atoll(argv[++i]));
    else if (a == "--out" && i + 1 < argc) out = argv[++i];
    else throw config_error("usage: network_tour [--steps N] [--out DIR], got '" + a + "'");
  }
  std::filesystem::create_directories(out);
  const auto train = make_bars_dataset<float>(1024, /*seed=*/1), test = make_bars_dataset<float>(256, /*seed=*/2);
  const auto [tx, ty] = test.slice(0, test.size());

  // Build and look at it.
  Sequential<float> net = build_net(train.num_classes);
  std::cout << net << "\n";
  std::printf("named_modules (the state-dict prefixes):");
  for (const auto& [name, m] : named_modules(net)) std::printf(" %s=%s", name.empty() ? "''" : name.c_str(), m.type_name().c_str());
  std::printf("\n\nclaims:\n");

  // Results are tensors of their own.
  const Tensor<float> a = net.forward_train(train.slice(0, 8).first);
  const Tensor<float> b = net.forward_train(train.slice(8, 8).first);
  check(max_abs_diff(a, b) > 0, "two forward_train results held at once differ");

  // add() moves the block in and hands back the stored one; clone() is the explicit copy.
  Sequential<float> tail;
  OREPA<float, SiLU>& stored = tail.add(OREPA<float, SiLU>(OrepaOptions(1, 4, 3).seed(9)));
  OREPA<float, SiLU> copy = stored.clone();
  const Tensor<float> before = copy.forward_eval(tx);
  SGD<float> tail_opt(tail.parameters(), SGDOptions(0.5));
  tail.forward_train(tx);
  tail.backward(Tensor<float>(before.sizes(), 1.0f));
  tail_opt.step();
  check(max_abs_diff(stored.forward_eval(tx), tail.forward_eval(tx)) == 0, "add() returned the block the Sequential trains");
  check(max_abs_diff(copy.forward_eval(tx), before) == 0 && max_abs_diff(stored.forward_eval(tx), before) > 0,
        "clone() is a deep copy: training the original leaves it unchanged");

  // Errors name the layer.
  try {
    net.forward_eval(Tensor<float>({2, 3, 16, 16}));
    check(false, "a wrong input is an error");
  } catch (const shape_error& e) {
    std::printf("    error: %s\n", e.what());
    check(std::string(e.what()).rfind("Sequential[0] (ConvBN)", 0) == 0, "the error names the layer: Sequential[0] (ConvBN)");
  }

  // Train k steps, checkpoint model + optimizer, train on: the run to compare against.
  SGD<float> opt = make_optimizer(net);
  const std::int64_t k = steps / 2;
  double loss = 0;
  for (std::int64_t s = 0; s < k; ++s) loss = train_step(net, opt, train, s);
  const std::string ckpt_path = (out / "checkpoint.safetensors").string();
  {
    io::TrainingCheckpoint<float> ckpt;
    std::int64_t step = k;
    ckpt.add("model", net).add("optimizer", opt).add("step", step);
    io::save(ckpt, ckpt_path);
  }
  for (std::int64_t s = k; s < steps; ++s) loss = train_step(net, opt, train, s);
  const Tensor<float> eval = net.forward_eval(tx);
  std::printf("    trained %lld steps: last loss %.3f, held-out accuracy %.1f %%\n", static_cast<long long>(steps),
              loss, 100 * accuracy(eval, ty));

  // Resume in fresh objects: the same weights, bit for bit.
  {
    Sequential<float> resumed = build_net(train.num_classes);
    SGD<float> resumed_opt = make_optimizer(resumed);
    std::int64_t step = 0;
    io::TrainingCheckpoint<float> ckpt;
    ckpt.add("model", resumed).add("optimizer", resumed_opt).add("step", step);
    io::load(ckpt, ckpt_path);
    for (std::int64_t s = step; s < steps; ++s) train_step(resumed, resumed_opt, train, s);
    check(max_abs_diff(resumed.forward_eval(tx), eval) == 0, "k steps, save, load into new objects, N - k steps == N steps");
  }

  // One call each way for the weights alone.
  const std::string weights = (out / "net.safetensors").string();
  io::save(net, weights);
  Sequential<float> reloaded = build_net(train.num_classes);
  io::load(reloaded, weights);
  check(max_abs_diff(reloaded.forward_eval(tx), eval) == 0, "io::save then io::load gives the same network");

  // Deploy: every block one fused convolution; int8 calibrated on training batches.
  const InferenceChain<float> fp32 = net.deploy();
  const Tensor<float> deployed = fp32.forward(tx);
  const double largest = max_abs_diff(eval, Tensor<float>(eval.sizes(), 0.0f));
  check(max_abs_diff(deployed, eval) <= 1e-3 * std::max(1.0, largest), "deployed fp32 == eval (1e-3 of the largest logit)");
  Calibrator cal;
  std::vector<Tensor<float>> batches;
  for (std::int64_t i = 0; i < 4; ++i) batches.push_back(train.slice(64 * i, 64).first);
  for (const auto& x : batches) cal.observe(fp32, x);
  const InferenceChain<float> int8 = net.deploy(DeployOptions().precision(Precision::int8).calibration(cal.calibration()));
  std::cout << "\n" << int8 << "\n";
  quantization_report(fp32, int8, batches).print(std::cout, 4);
  check(accuracy(int8.forward(tx), argmax_rows(deployed)) >= 0.9, "int8 predicts the fp32 class on >= 90 % of held-out images");
  std::filesystem::remove_all(out);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "network_tour: %s\n", e.what());
  return 1;
}
