#pragma once
/// @file communicator.hpp
/// The MPI layer of orepa/dist: `dist_error`, and `Communicator`, a private duplicate of
/// an MPI communicator with the few collectives data-parallel training needs (in-place
/// sums, broadcast, all-gather) and `agree()`, the step every rank takes before a
/// collective that a local failure could otherwise leave half-entered.
///
/// Why a duplicate: collectives on it can never be matched with the user's own
/// collectives on the original communicator. Errors are returned (MPI_ERRORS_RETURN),
/// not fatal, and re-thrown as dist_error naming the operation, its size and the rank.
///
/// The time spent inside MPI calls is accumulated (communication_seconds()) so a
/// training loop or a benchmark can report the share of a step spent communicating.

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "orepa/core/error.hpp"

namespace orepa {

/// A data-parallel job failed: the ranks disagree (network, input shapes) or a rank
/// reported an error through Communicator::agree(), or an MPI call failed. Thrown on
/// every rank with the same message, which names the ranks at fault and the reason.
struct dist_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace dist {

/// The MPI datatype of `T` (float, double, std::int64_t, char).
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, char>) return MPI_CHAR;
  else static_assert(!sizeof(T), "orepa::dist::mpi_type: float, double, std::int64_t or char");
}

/// A private duplicate of an MPI communicator (freed on destruction) with errors
/// returned as dist_error and the time spent in MPI calls accumulated.
/// MPI must be initialised before construction and finalised after destruction.
/// Not copyable; share it through std::shared_ptr (the BN reducers do).
class Communicator {
 public:
  /// Duplicates `comm` (collective over `comm`: every rank constructs at the same point).
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) throw dist_error("orepa::dist::Communicator: MPI is not initialised (call MPI_Init first)");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  /// Frees the duplicate (unless MPI was finalised already).
  ~Communicator() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (!finalised) MPI_Comm_free(&comm_);
  }

  /// This process's rank.
  int rank() const { return rank_; }
  /// Number of ranks.
  int size() const { return size_; }
  /// The duplicated communicator.
  MPI_Comm comm() const { return comm_; }

  /// Sums `count` values at `data` in place across all ranks (MPI_Allreduce, MPI_SUM).
  template <class T>
  void sum(T* data, std::int64_t count) {
    timed([&] {
      check(MPI_Allreduce(MPI_IN_PLACE, data, to_int(count, "MPI_Allreduce"), mpi_type<T>(), MPI_SUM, comm_),
            "MPI_Allreduce of " + std::to_string(count) + " values");
    });
  }
  /// Copies `count` values at `data` from rank `root` to every rank (MPI_Bcast).
  template <class T>
  void broadcast(T* data, std::int64_t count, int root = 0) {
    timed([&] {
      check(MPI_Bcast(data, to_int(count, "MPI_Bcast"), mpi_type<T>(), root, comm_),
            "MPI_Bcast of " + std::to_string(count) + " values");
    });
  }
  /// Every rank's `mine` (the same length on every rank), rank after rank.
  template <class T>
  std::vector<T> all_gather(const std::vector<T>& mine) {
    std::vector<T> all(mine.size() * std::size_t(size_));
    timed([&] {
      check(MPI_Allgather(mine.data(), to_int(std::int64_t(mine.size()), "MPI_Allgather"), mpi_type<T>(), all.data(),
                          int(mine.size()), mpi_type<T>(), comm_),
            "MPI_Allgather of " + std::to_string(mine.size()) + " values");
    });
    return all;
  }

  /// Every rank calls this at the same point, with an empty `local_error` when its part
  /// went well. When any rank passes a message, every rank throws the same dist_error
  /// "`who`: [rank r] message ..." listing each failing rank; otherwise it returns after
  /// one 4-byte all-reduce.
  void agree(const std::string& local_error, const std::string& who) {
    int bad = local_error.empty() ? 0 : 1;
    timed([&] { check(MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, comm_), "MPI_Allreduce (agree)"); });
    if (!bad) return;
    constexpr std::size_t kLen = 512;  // per rank; longer messages are cut
    std::vector<char> mine(kLen, '\0');
    std::memcpy(mine.data(), local_error.data(), std::min(local_error.size(), kLen - 1));
    const auto all = all_gather(mine);
    std::string msg = who + ":";
    for (int r = 0; r < size_; ++r) {
      const char* m = all.data() + std::size_t(r) * kLen;
      if (*m) msg += detail::cat(" [rank ", r, "] ", std::string(m, strnlen(m, kLen)), ";");
    }
    msg.pop_back();
    throw dist_error(msg);
  }

  /// Seconds spent inside MPI calls of this communicator so far.
  double communication_seconds() const { return seconds_; }

 private:
  template <class F>
  void timed(F&& f) {
    const double t0 = MPI_Wtime();
    f();
    seconds_ += MPI_Wtime() - t0;
  }
  void check(int rc, const std::string& what) const {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw dist_error(detail::cat("orepa::dist: ", what, " failed on rank ", rank_, " of ", size_, ": ",
                                 std::string(text, std::size_t(len))));
  }
  int to_int(std::int64_t count, const char* what) const {
    if (count < 0 || count > std::int64_t(INT32_MAX))
      throw dist_error(detail::cat("orepa::dist: ", what, " of ", count, " values does not fit an MPI count"));
    return int(count);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double seconds_ = 0;
};

}  // namespace dist
}  // namespace orepa
