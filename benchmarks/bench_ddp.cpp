// Data-parallel training throughput of the demo's classifier (examples/demo.cpp: Conv
// stem, Conv, C3, Conv, C3 of OREPA blocks at width 16, pooling, linear head) on 32x32
// images, global batch 64, one SGD step per iteration. Run it under MPI with 2 ranks and
// one OpenMP thread per rank; all cases run in the same job, so their ratios compare
// like with like:
//
//   OMP_NUM_THREADS=1 mpirun -np 2 build/benchmarks/orepa_bench_ddp
//
// Names: ddp_step/ranks:1 (rank 0 alone on a communicator of its own, 64 images per step;
// the other rank waits), ddp_step/ranks:2/sync_bn (32 images per rank, BN statistics and
// gradients across ranks), ddp_step/ranks:2/local_bn (gradients only; each rank's BN
// sees its 32 images; the fused training pipeline stays on).
// Counters: images_per_s (the whole job's); comm_share_min and comm_share_max, the least
// and the most any rank spent inside MPI calls over its step time. A rank's MPI time is
// the transfer plus waiting for the slower rank, so the minimum (the slowest rank's) is
// closest to the cost of the communication itself, and max - min is load imbalance
// (on a shared 2-core machine, mostly other processes taking a core).
//
// Iteration counts are fixed (every rank must run the same number of collective steps),
// and only rank 0 reports. Every rank must run the cases in the same order: a case
// whose name differs between ranks (--benchmark_enable_random_interleaving shuffles
// each rank differently) is skipped with an error instead of deadlocking.
#include <benchmark/benchmark.h>

#include <orepa/dist/dist.hpp>
#include <orepa/nn/yolo.hpp>
#include <orepa/orepa.hpp>

#include "../examples/demo_network.hpp"

#include <chrono>

namespace {

using namespace orepa;

constexpr std::int64_t kBatch = 64, kWidth = 16, kImage = 32;
constexpr int kWarmup = 3, kIterations = 50;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// True when every rank is in the case numbered `id`.
bool same_case_everywhere(int id) {
  int lo = 0, hi = 0;
  MPI_Allreduce(&id, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&id, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return lo == hi;
}

void ddp_step(benchmark::State& state, int ranks, bool sync_bn) {
  if (!same_case_everywhere(2 * ranks + int(sync_bn))) {
    state.SkipWithError("the ranks run different cases (random interleaving?); every rank needs the same order");
    return;
  }
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world < ranks) {
    state.SkipWithError("needs more MPI ranks (run under mpirun -np 2)");
    for (auto _ : state) {
    }
    return;
  }
  // The first `ranks` ranks train; the others only keep the iteration count.
  MPI_Comm comm = MPI_COMM_NULL;
  const bool member = world_rank() < ranks;
  MPI_Comm_split(MPI_COMM_WORLD, member ? 0 : MPI_UNDEFINED, world_rank(), &comm);
  if (!member) {
    for (auto _ : state) {
    }
    MPI_Barrier(MPI_COMM_WORLD);
    return;
  }
  {
    Sequential<float> net = examples::build_classifier(kWidth, 4, /*seed=*/1, orepa_maker<float>());
    DistributedDataParallel ddp(net, DdpOptions().sync_batch_norm(sync_bn), comm);
    const std::int64_t share = kBatch / ranks;
    const auto data = make_bars_dataset<float>(kBatch, 3, kImage, 0.5);
    const auto batch = data.slice(ddp.rank() * share, share);  // no structured binding: the lambda uses it (clang 14)
    const auto& x = batch.first;
    const auto& y = batch.second;
    SGD<float> opt(net.parameters(), SGDOptions(0.05).momentum(0.9));
    SoftmaxCrossEntropy<float> ce;
    auto step = [&] {
      opt.zero_grad();
      ce.forward_train(ddp.forward_train(x), y);
      ddp.backward(ce.backward());
      opt.step();
    };
    for (int i = 0; i < kWarmup; ++i) step();  // primitives are created here
    const double comm0 = ddp.communication_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) step();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.counters["images_per_s"] =
        benchmark::Counter(double(kBatch), benchmark::Counter::kIsIterationInvariantRate);
    const double in_mpi = (ddp.communication_seconds() - comm0) / seconds;
    double lo = in_mpi, hi = in_mpi;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MIN, comm);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, comm);
    state.counters["comm_share_min"] = lo;
    state.counters["comm_share_max"] = hi;
  }
  MPI_Comm_free(&comm);
  MPI_Barrier(MPI_COMM_WORLD);
}

BENCHMARK_CAPTURE(ddp_step, ranks:1, 1, false)->Iterations(kIterations)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(ddp_step, ranks:2/sync_bn, 2, true)->Iterations(kIterations)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(ddp_step, ranks:2/local_bn, 2, false)->Iterations(kIterations)->UseRealTime()->Unit(benchmark::kMillisecond);

// Reports nothing: the ranks other than 0.
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  benchmark::Initialize(&argc, argv);
  if (world_rank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    Silent silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
