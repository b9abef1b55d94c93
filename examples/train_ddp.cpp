// train_ddp: the demo's classifier (a small YOLOv5-style network of OREPA blocks, see
// demo.cpp) trained data-parallel on MPI with orepa/dist: every rank trains on its share
// of each global batch, BatchNorm statistics and gradients are combined across ranks
// (DistributedDataParallel + synchronised BN), so the job trains what one process would
// train on the whole batch. Rank 0 prints a progress line; at the end every rank's
// images/s, the total, and the share of the step time spent communicating. Then each
// rank deploys its replica and checks it against eval mode, and the replicas are checked
// to be identical.
//
//   mpirun -np 2 train_ddp [--steps N] [--batch B] [--width W] [--local-bn] [--timeout S] [--help]
//   (as root in a container: see README.md for the flags)
//
// No rank is left waiting: the ranks first check that they were given the same
// arguments (DistributedDataParallel checks its own options: --local-bn, --timeout), an
// error on one rank ends the whole job (dist::abort_on_exception), and every collective
// waits at most --timeout seconds for the other ranks.
//
// Exit status 0 on success (on every rank); 1 when deploy and eval disagree, the replicas
// differ, or on any error, which ends every rank with a message naming the rank.
#include <orepa/dist/dist.hpp>
#include <orepa/nn/yolo.hpp>
#include <orepa/orepa.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "demo_network.hpp"
#include "tool_args.hpp"  // tools::parse_int, tools::read_real

using namespace orepa;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Args {
  std::int64_t steps = 200;  // training steps
  std::int64_t batch = 64;   // images per step over all ranks
  std::int64_t width = 16;   // channels after the stem (the demo's default)
  bool local_bn = false;     // BN statistics per rank instead of synchronised
  double timeout = dist::default_timeout;  // seconds a collective waits for the other ranks
};

const char* usage() {
  return R"(usage: mpirun -np R train_ddp [--steps N] [--batch B] [--width W] [--local-bn] [--timeout S] [--help]
Trains the demo's classifier on 32x32 bar images data-parallel over R ranks.
  --steps N    training steps (default 200)
  --batch B    images per step over all ranks, a multiple of R (default 64)
  --width W    channels after the stem, the network goes W, 2W, 4W (default 16)
  --local-bn   BatchNorm statistics of each rank's share only (default: synchronised)
  --timeout S  seconds a rank waits in a collective for the others before the job is
               ended with a message naming the ranks that did not arrive (default 300)
Every rank must be given the same arguments. An error on any rank ends every rank.
)";
}

// A positive number of seconds ("2", "0.5", "inf").
double parse_seconds(const std::string& flag, const std::string& v) {
  double x = 0;
  if (!tools::read_real(v, x) || !(x > 0))
    throw config_error(detail::cat(flag, ": expected seconds > 0 (or inf), got '", v, "'"));
  return x;
}

bool parse_args(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return false;
    if (flag == "--local-bn") {
      a.local_bn = true;
      continue;
    }
    if (i + 1 >= argc) throw config_error(detail::cat(flag, ": unknown flag or missing value (see --help)"));
    const std::string v = argv[++i];
    if (flag == "--steps") a.steps = tools::parse_int(flag, v, 1, 10'000'000);
    else if (flag == "--batch") a.batch = tools::parse_int(flag, v, 2, 4096);
    else if (flag == "--width") a.width = tools::parse_int(flag, v, 2, 1024);
    else if (flag == "--timeout") a.timeout = parse_seconds(flag, v);
    else throw config_error(detail::cat("unknown flag '", flag, "' (see --help)"));
  }
  return true;
}

int run(int argc, char** argv) {
  Args args;
  const bool go = parse_args(argc, argv, args);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (!go) {
    if (rank == 0) std::fputs(usage(), stdout);
    return 0;
  }
  // Arguments that change how long the ranks train or what they compute must agree
  // before any training; a difference ends the job here with every rank's value.
  dist::Communicator world(MPI_COMM_WORLD, args.timeout);
  world.check_same({{"--steps", std::to_string(args.steps)},
                    {"--batch", std::to_string(args.batch)},
                    {"--width", std::to_string(args.width)}},
                   "train_ddp: the ranks were given different arguments");
  if (args.batch % ranks != 0)
    throw config_error(detail::cat("--batch ", args.batch, " must be a multiple of the ", ranks, " ranks"));
  const std::int64_t share = args.batch / ranks;

  constexpr std::int64_t kImageSize = 32, kEpochImages = 4096;
  constexpr double kNoise = 0.5;  // the demo's noisier bars
  const auto test = make_bars_dataset<float>(512, 1'000'003, kImageSize, kNoise);
  auto train = make_bars_dataset<float>(kEpochImages, 1'000'004, kImageSize, kNoise);

  Sequential<float> net = examples::build_classifier(args.width, train.num_classes, /*seed=*/1, orepa_maker<float>());
  DistributedDataParallel ddp(net, DdpOptions().sync_batch_norm(!args.local_bn).timeout(args.timeout));
  std::int64_t params = 0;
  for (auto* p : net.parameters()) params += p->value.numel();
  if (rank == 0)
    std::printf("train_ddp: %d ranks, %lld images per step (%lld per rank), %s BN, %lld parameters in %zu bucket(s)\n",
                ranks, static_cast<long long>(args.batch), static_cast<long long>(share),
                args.local_bn ? "local" : "synchronised", static_cast<long long>(params), ddp.bucket_sizes().size());

  const double base_lr = 0.1;
  SGD<float> opt(split_decay(net.parameters(), 5e-4, 0.0), SGDOptions(base_lr).momentum(0.9).nesterov(true));
  const CosineSchedule schedule(base_lr, args.steps, std::min<std::int64_t>(20, args.steps / 10));
  SoftmaxCrossEntropy<float> ce;
  // The same shuffle on every rank (same seed); rank r takes part r of each global batch.
  Rng rng(101);
  std::vector<std::int64_t> order(static_cast<std::size_t>(kEpochImages));
  std::iota(order.begin(), order.end(), 0);
  std::size_t cursor = order.size();
  std::uint64_t epoch = 0;

  const std::int64_t report_every = std::max<std::int64_t>(1, args.steps / 10);
  double train_seconds = 0, window_loss = 0, window_acc = 0;
  std::int64_t window_steps = 0;
  const double comm_before = ddp.communication_seconds();
  for (std::int64_t step = 0; step < args.steps; ++step) {
    if (cursor + std::size_t(args.batch) > order.size()) {  // new epoch: fresh images, reshuffled
      if (epoch > 0) train = make_bars_dataset<float>(kEpochImages, 1'000'004 + epoch, kImageSize, kNoise);
      ++epoch;
      for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
      cursor = 0;
    }
    const auto first = order.begin() + std::ptrdiff_t(cursor + std::size_t(rank * share));
    auto [x, y] = train.batch(std::vector<std::int64_t>(first, first + std::ptrdiff_t(share)));
    cursor += std::size_t(args.batch);

    const auto t0 = Clock::now();
    opt.zero_grad();
    const Tensor<float>& logits = ddp.forward_train(x);
    window_acc += accuracy(logits, y);
    window_loss += double(ce.forward_train(logits, y));
    ddp.backward(ce.backward());
    opt.set_lr(float(schedule.lr(step)));
    opt.step();
    train_seconds += since(t0);
    ++window_steps;

    if ((step + 1) % report_every == 0 || step + 1 == args.steps) {
      // Losses and accuracies of every rank's share: the whole batch's.
      double sums[2] = {window_loss, window_acc};
      ddp.communicator().sum(sums, 2, "train_ddp progress report");
      const double n = double(ranks) * double(window_steps);
      if (rank == 0)
        std::printf("step %5lld/%lld  loss %.4f  train acc %5.1f%%  %6.0f img/s (all ranks)\n",
                    static_cast<long long>(step + 1), static_cast<long long>(args.steps), sums[0] / n,
                    100 * sums[1] / n, double(args.batch) * double(step + 1) / train_seconds);
      std::fflush(stdout);
      window_loss = window_acc = 0;
      window_steps = 0;
    }
  }

  // Throughput and communication share of every rank.
  const double comm = ddp.communication_seconds() - comm_before;
  const std::vector<double> mine{double(share * args.steps) / train_seconds, comm / train_seconds};
  const std::vector<double> all = ddp.communicator().all_gather(mine, "train_ddp throughput report");
  if (rank == 0) {
    double total = 0;
    for (int r = 0; r < ranks; ++r) {
      std::printf("rank %d: %7.0f img/s, %4.1f%% of the step time in communication\n", r, all[std::size_t(2 * r)],
                  100 * all[std::size_t(2 * r + 1)]);
      total += all[std::size_t(2 * r)];
    }
    std::printf("total:  %7.0f img/s over %d ranks\n", total, ranks);
  }

  // Every replica must hold the same weights: compare a checksum with rank 0's.
  double checksum = 0;
  for (auto* p : net.parameters())
    for (float v : p->value) checksum += double(v);
  double root = checksum;
  ddp.communicator().broadcast(&root, 1, 0, "train_ddp replica checksum");
  std::string error;
  if (checksum != root) error = detail::cat("replica checksum ", checksum, " differs from rank 0's ", root);

  // Deploy (every block one fused convolution) and compare with eval mode.
  const InferenceChain<float> deployed = net.deploy();
  const auto [tx, ty] = test.slice(0, test.size());
  const Tensor<float> eval = net.forward_eval(tx), dep = deployed.forward(tx);
  const auto pe = argmax_rows(eval), pd = argmax_rows(dep);
  std::int64_t agree = 0;
  for (std::size_t n = 0; n < pe.size(); ++n) agree += pe[n] == pd[n];
  double scale = 1;
  for (float v : eval) scale = std::max(scale, double(std::abs(v)));
  const double diff = max_abs_diff(eval, dep);
  if (rank == 0)
    std::printf("held-out accuracy %.1f%%; deployed vs eval on %lld images: max |logit difference| %.3g, same class on %lld\n",
                100 * accuracy(eval, ty), static_cast<long long>(test.size()), diff, static_cast<long long>(agree));
  if (agree != test.size() || diff > 1e-4 * scale)
    error += detail::cat(error.empty() ? "" : "; ", "deployed network disagrees with eval mode (", diff, ")");
  ddp.agree(error);  // throws on every rank when any rank failed a check
  if (rank == 0) std::printf("replicas identical, deploy == eval on every rank\n");
  return 0;
}

}  // namespace

// An exception on one rank would leave the others waiting in their next collective:
// mpi_main prints it with the rank and ends every rank (MPI_Abort).
int main(int argc, char** argv) { return dist::mpi_main(argc, argv, run, "train_ddp"); }
