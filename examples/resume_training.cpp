// resume_training: a training run that can be stopped and resumed exactly. A small
// network (an OREPA conv, a C3 of DBB blocks, an OREPA_1x1 conv, pooling and a linear
// head) learns the synthetic bar-orientation task the way YOLOv5 trains: three SGD
// parameter groups with Nesterov momentum, warm-up, linear decay per epoch, gradient
// accumulation to a nominal batch of 64 and an EMA of the weights (nn/yolo_train.hpp).
// After every optimizer step the whole state (model, EMA, optimizer, schedule, the data
// sampler's random generator and the iteration) is written to one checkpoint; a run
// resumed from it ends bit-identical to one that was never stopped.
//
//   resume_training --iterations N [--checkpoint CK] [--stop-after K] [--resume CK] [--final OUT]
//     --iterations N  batches to train in all (default 60)
//     --checkpoint CK write the checkpoint to CK after every optimizer step
//     --stop-after K  stop after K batches, as if killed (with --checkpoint)
//     --resume CK     continue the run saved in CK
//     --final OUT     write the final state (the checkpoint's format) to OUT
//
// Exit status 0 on success, 1 with a message on any error.
#include <orepa/orepa.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace orepa;

namespace {

// The network; every call builds the same one (fixed seeds).
Sequential<float> build() {
  Sequential<float> net;
  net.add(yolo_conv<float>(ConvOptions(1, 8, 3).stride(2).seed(1)));  // OREPA
  net.add(C3<float>(8, 8, /*n=*/1, /*shortcut=*/true, 0.5, /*seed=*/2, dbb_maker<float>()));
  net.add(yolo_conv<float>(ConvOptions(8, 16, 1).seed(3)));  // OREPA_1x1
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(16, 4, /*seed=*/4));
  return net;
}

std::int64_t int_flag(const char* flag, const char* v) {
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (!*v || *end || x < 1 || x > 1000000)
    throw config_error(detail::cat(flag, ": expected an integer in [1, 1000000], got '", v, "'"));
  return x;
}

}  // namespace

int main(int argc, char** argv) try {
  std::int64_t iterations = 60, stop_after = 0;
  std::string checkpoint, resume, final_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: resume_training [--iterations N] [--checkpoint CK] [--stop-after K] [--resume CK] "
                  "[--final OUT]\n");
      return 0;
    }
    if (i + 1 >= argc) throw config_error(a + ": missing value (see --help)");
    const char* v = argv[++i];
    if (a == "--iterations") iterations = int_flag("--iterations", v);
    else if (a == "--stop-after") stop_after = int_flag("--stop-after", v);
    else if (a == "--checkpoint") checkpoint = v;
    else if (a == "--resume") resume = v;
    else if (a == "--final") final_path = v;
    else throw config_error("unknown argument '" + a + "' (see --help)");
  }
  if (stop_after && checkpoint.empty()) throw config_error("--stop-after needs --checkpoint");

  const auto data = make_bars_dataset<float>(512, /*seed=*/1);
  const std::int64_t batch = 16, batches_per_epoch = 8;
  const std::int64_t epochs = (iterations + batches_per_epoch - 1) / batches_per_epoch;

  // YOLOv5's recipe; the warm-up (at least 100 iterations) covers short runs entirely.
  Sequential<float> net = build();
  YoloSchedule sched(YoloScheduleOptions(epochs, batch, batches_per_epoch));
  SGD<float> opt(yolo_param_groups(net, sched.weight_decay()),
                 SGDOptions(sched.options().lr0()).momentum(sched.options().momentum()).nesterov(true));
  ModelEMA<Sequential<float>> ema(build(), net);
  Rng sampler(7);  // draws each batch's images
  std::int64_t next = 0;  // the next iteration to run

  // Everything a resumed run needs, each part under its name in one file.
  io::TrainingCheckpoint<float> state;
  state.add("model", net).add("ema", ema).add("optimizer", opt).add("schedule", sched);
  state.add("sampler", sampler).add("iteration", next);
  if (!resume.empty()) {
    io::load(state, resume);  // every part or none
    std::printf("resumed from %s at iteration %lld\n", resume.c_str(), static_cast<long long>(next));
  }

  SoftmaxCrossEntropy<float> ce;
  const std::int64_t end = stop_after ? std::min(stop_after, iterations) : iterations;
  double loss_sum = 0;
  std::int64_t seen = 0;
  for (; next < end;) {
    const std::int64_t ni = next, epoch = ni / batches_per_epoch;
    std::vector<std::int64_t> idx(static_cast<std::size_t>(batch));
    for (auto& j : idx) j = std::int64_t(sampler.below(std::uint64_t(data.size())));
    auto [x, y] = data.batch(idx);
    sched.apply(opt, ni, epoch);
    loss_sum += ce.forward_train(net.forward_train(x), y), ++seen;
    net.backward(ce.backward());  // gradients add up until the optimizer steps
    ++next;
    if (sched.should_step(ni)) {
      opt.step();
      opt.zero_grad();
      ema.update(net);
      if (!checkpoint.empty()) io::save(state, checkpoint);  // atomic: a crash keeps the previous one
    }
  }
  std::printf("iterations %lld of %lld, optimizer steps %lld, mean loss %.4f\n", static_cast<long long>(next),
              static_cast<long long>(iterations), static_cast<long long>(opt.steps()), seen ? loss_sum / double(seen) : 0.0);
  if (!final_path.empty()) io::save(state, final_path);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "resume_training: %s\n", e.what());
  return 1;
}
