// main() of the MPI test program, run as `mpiexec -np N orepa_mpi_tests` (or alone: a
// one-rank job). MPI is initialised before GoogleTest and finalised after it.
//  - Rank 0 prints gtest's usual output; the other ranks print only their own failures,
//    at once and prefixed "[rank r]" (the only trace if a later collective hangs).
//  - After every test the ranks agree on its outcome (on a private communicator, so these
//    collectives never meet the code under test's): a failure on any rank fails the
//    test on every rank, and rank 0 lists the other ranks' failure messages.
//  - Every rank exits with the same status: 0 only when every test passed on every rank.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

MPI_Comm g_comm = MPI_COMM_NULL;
int g_rank = 0, g_size = 1;
std::string g_failures;  // this rank's failure messages in the current test

class Agreement : public ::testing::EmptyTestEventListener {
 public:
  void OnTestStart(const ::testing::TestInfo&) override { g_failures.clear(); }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    const std::string m = std::string(r.file_name() ? r.file_name() : "?") + ":" + std::to_string(r.line_number()) +
                          ": " + r.message() + "\n";
    g_failures += m;
    if (g_rank != 0) std::fprintf(stderr, "[rank %d] %s", g_rank, m.c_str()), std::fflush(stderr);
  }
  // gtest runs *End listeners in reverse order of registration: this one (appended last)
  // runs before rank 0's printer reports OK / FAILED.
  void OnTestEnd(const ::testing::TestInfo& info) override {
    const int failed = info.result()->Failed() ? 1 : 0;
    int failed_ranks = 0;
    MPI_Allreduce(&failed, &failed_ranks, 1, MPI_INT, MPI_SUM, g_comm);
    if (failed_ranks == 0) return;
    const int len = int(g_failures.size());
    const auto n = static_cast<std::size_t>(g_size);
    std::vector<int> lens(n), offsets(n);
    MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, g_comm);
    int total = 0;
    for (int r = 0; r < g_size; ++r) offsets[std::size_t(r)] = total, total += lens[std::size_t(r)];
    std::vector<char> all(std::size_t(total) + 1);
    MPI_Gatherv(g_failures.data(), len, MPI_CHAR, all.data(), lens.data(), offsets.data(), MPI_CHAR, 0, g_comm);
    if (g_rank == 0) {
      std::string report = "failed on " + std::to_string(failed_ranks) + " of " + std::to_string(g_size) + " ranks";
      for (int r = 1; r < g_size; ++r)
        if (lens[std::size_t(r)] > 0)
          report += "\n--- rank " + std::to_string(r) + ":\n" +
                    std::string(all.data() + offsets[std::size_t(r)], std::size_t(lens[std::size_t(r)]));
      ADD_FAILURE() << report;
    } else if (!failed) {
      ADD_FAILURE() << "failed on another rank";  // keeps the exit status equal on every rank
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_dup(MPI_COMM_WORLD, &g_comm);
  MPI_Comm_rank(g_comm, &g_rank);
  MPI_Comm_size(g_comm, &g_size);
  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (g_rank != 0) {
    GTEST_FLAG_SET(output, "");  // only rank 0 writes --gtest_output files
    delete listeners.Release(listeners.default_result_printer());
  }
  listeners.Append(new Agreement);
  const int mine = RUN_ALL_TESTS();
  int status = 0;
  MPI_Allreduce(&mine, &status, 1, MPI_INT, MPI_MAX, g_comm);
  MPI_Comm_free(&g_comm);
  MPI_Finalize();
  return status;
}
