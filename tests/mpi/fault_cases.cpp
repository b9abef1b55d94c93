// orepa_mpi_faults CASE: a data-parallel job on 2 ranks into which one fault is injected
// after a good first training step. Each case must end every rank, with a non-zero exit
// and a message naming the rank and the cause, within a few seconds; ctest runs them
// through tests/mpi/expect_fault.sh, which checks the exit status, the message and the
// time (cmake/mpi_test.cmake, orepa_add_mpi_fault_test). The injecting rank prints
// "injects <fault> at unix time T" first, so the driver can report the time from the
// fault to the end of the job.
//
// Cases (the collectives wait at most 2 s: DdpOptions().timeout(2)):
//   exception  rank 1 throws in its second step; dist::abort_on_exception ends the job
//   stop       rank 1 stops itself (SIGSTOP); rank 0 times out waiting for it
//   stop_inside  rank 1 stops (a timer's SIGSTOP) 2 ms into a 32 MB sum that both ranks
//              entered together (the sum takes several times that): rank 0's sum does
//              not complete, and rank 1 does not answer its ping
//   kill       rank 1 kills itself (SIGKILL); mpiexec or rank 0's timeout ends the job
//   steps      rank 1 trains one step more than rank 0, which goes on to its report:
//              the ranks run different collectives, detected before any data moves
//   finish     rank 1 trains one step more while rank 0 finishes: rank 1 times out
//   options    rank 1 leaves sync BN off: DistributedDataParallel throws dist_error on
//              every rank at construction, and abort_on_exception ends the job
#include <signal.h>
#include <sys/time.h>

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "orepa/dist/dist.hpp"
#include "orepa/orepa.hpp"

namespace {

using namespace orepa;

void announce(int rank, const char* fault) {
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::printf("orepa_mpi_faults: rank %d injects %s at unix time %.3f\n", rank, fault, now);
  std::fflush(stdout);
}

int run(const std::string& fault) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const bool known = fault == "exception" || fault == "stop" || fault == "stop_inside" || fault == "kill" ||
                     fault == "steps" || fault == "finish" || fault == "options";
  if (!known) throw config_error("orepa_mpi_faults: unknown case '" + fault + "'");

  Sequential<float> net;
  net.add(ConvBN<float, ReLU>(ConvOptions(1, 4, 3).seed(1)));
  net.add(GlobalAvgPool<float>());
  net.add(Linear<float>(4, 4, 2));
  const bool sync_bn = !(fault == "options" && rank == 1);
  if (!sync_bn) announce(rank, "sync_batch_norm(false)");
  DistributedDataParallel ddp(net, DdpOptions().sync_batch_norm(sync_bn).timeout(2));

  const auto data = make_bars_dataset<float>(8, /*seed=*/3);
  auto [x, y] = data.slice(rank * 4, 4);
  SGD<float> opt(net.parameters(), SGDOptions(0.05));
  SoftmaxCrossEntropy<float> ce;
  const int steps = (fault == "steps" || fault == "finish") && rank == 1 ? 3 : 2;
  for (int step = 1; step <= steps; ++step) {
    if (step == 2 && rank == 1) {
      if (fault == "exception") {
        announce(rank, "an exception");
        throw std::runtime_error("injected failure: rank 1 could not load its batch");
      }
      if (fault == "stop") announce(rank, "SIGSTOP"), raise(SIGSTOP);
      if (fault == "kill") announce(rank, "SIGKILL"), raise(SIGKILL);
    }
    if (step == 3) announce(rank, "an extra step");
    opt.zero_grad();
    ce.forward_train(ddp.forward_train(x), y);
    ddp.backward(ce.backward());
    opt.step();
  }
  if (fault == "stop_inside") {
    double sync = 0;
    ddp.communicator().sum(&sync, 1, "line up");  // both ranks leave this within microseconds
    std::vector<float> big(std::size_t(8) << 20, 1.0f);
    if (rank == 1) {
      announce(rank, "SIGSTOP 2 ms into a 32 MB sum");
      signal(SIGALRM, [](int) { raise(SIGSTOP); });
      itimerval in2ms{};
      in2ms.it_value.tv_usec = 2000;
      setitimer(ITIMER_REAL, &in2ms, nullptr);
    }
    ddp.communicator().sum(big.data(), std::int64_t(big.size()), "large sum");
  }
  if (fault == "steps" || fault == "finish") {
    if (fault == "steps") {
      double loss = 0;
      ddp.communicator().sum(&loss, 1, "loss report");
    }
    return 0;
  }
  std::printf("orepa_mpi_faults: rank %d finished without the fault taking effect\n", rank);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const std::string fault = argc > 1 ? argv[1] : "";
  const int status = dist::abort_on_exception([&] { return run(fault); }, "orepa_mpi_faults");
  MPI_Finalize();
  return status;
}
