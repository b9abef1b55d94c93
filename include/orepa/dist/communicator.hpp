#pragma once
/// @file communicator.hpp
/// The MPI layer of orepa/dist: `dist_error`, the job-ending helpers `abort_job` and
/// `abort_on_exception`, and `Communicator`, a private duplicate of an MPI communicator
/// with the few collectives data-parallel training needs (in-place sums, broadcast,
/// all-gather), each under a deadline, plus `agree()` and `check_same()`, the steps every
/// rank takes where a local failure or a local setting could otherwise split the ranks.
///
/// Why a duplicate: collectives on it can never be matched with the user's own
/// collectives on the original communicator.
///
/// **No rank is left waiting forever.** Every collective is non-blocking underneath
/// (MPI_Iallreduce, MPI_Ibcast, MPI_Iallgather) and waited for by polling MPI_Testsome:
/// spinning for 100 us, then yielding the core after each test up to 5 ms, then sleeping
/// 50 us doubling to 1 ms, so a long wait does not take a core from a rank that still
/// computes (see wait_all). It runs in two
/// phases, both under one deadline (timeout(), 300 s by default, from the moment this
/// rank enters):
///
///  1. **Arrival.** Each rank sends every other rank a 128-byte header of the collective
///     (its sequence number on this communicator, the operation, data type, element
///     count, root, a label such as "gradient bucket 1 of 2", and the training step) on
///     a second private duplicate, the side channel, and receives theirs. Headers from
///     one rank arrive in order, so the k-th header received from rank r is r's k-th
///     collective: a rank that has not sent it has not arrived. A rank cannot leave
///     collective k before every rank's header for k has arrived, so no rank is ever
///     more than one collective ahead, and at the deadline the ranks whose header is
///     missing are exactly the ranks that did not arrive (stopped, dead, still
///     computing, or finished). A header that differs from this rank's means the ranks
///     run different collectives (a different step count, a flag on one rank only): the
///     job ends at once, naming both collectives, before any data has moved.
///  2. **Data.** Only then is the collective itself posted. If it does not complete by
///     the deadline, every rank arrived and one stopped or died inside it. To name it,
///     this rank pings every other rank on the side channel and waits 0.5 s: a rank
///     waiting in any collective answers from its polling loop; the silent ones are
///     named.
///
/// A deadline passed or an MPI error in a collective ends the whole job (abort_job:
/// the message on stderr, then MPI_Abort on MPI_COMM_WORLD, which mpiexec turns into
/// the end of every rank): the collective is half done on some ranks, and no exception
/// could bring the ranks back to a common point. Cost per collective and rank: P - 1
/// small messages sent and received on P ranks, one message latency (about 1-2 us on
/// shared memory), which suits the few ranks of one or a few nodes.
///
/// The time spent inside collectives is accumulated (communication_seconds()) so a
/// training loop or a benchmark can report the share of a step spent communicating.

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "orepa/core/error.hpp"

namespace orepa {

/// A data-parallel job failed: the ranks disagree (network, options, input shapes,
/// settings) or a rank reported an error through Communicator::agree(). Thrown on every
/// rank with the same message, which names the ranks at fault and the reason, so the
/// job can go on or end cleanly (the one exception: constructing a Communicator before
/// MPI_Init).
struct dist_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace dist {

/// Default deadline of a collective in seconds (PyTorch's process groups wait 30 minutes).
inline constexpr double default_timeout = 300;

/// Ends the whole MPI job: prints `message` (one line) to stderr, then calls
/// MPI_Abort(MPI_COMM_WORLD, code), after which mpiexec ends every rank and exits with
/// `code`. Without a running MPI (before MPI_Init, after MPI_Finalize) the process exits
/// with `code`. Never returns.
///
/// `every_rank`: every rank calls abort_job with the same failure at about the same time
/// (a dist_error, collectives that differ between ranks). Then world rank 0 alone prints
/// and aborts at once, and the other ranks give its MPI_Abort a second to end them
/// before they print and abort themselves (Open MPI garbles its report when several
/// ranks abort at once).
[[noreturn]] inline void abort_job(const std::string& message, int code = 1, bool every_rank = false) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  const bool running = initialised && !finalised;
  int rank = 0;
  if (running) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fflush(stdout);
  if (running && every_rank && rank != 0) std::this_thread::sleep_for(std::chrono::seconds(1));
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (running) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

/// "[rank r of n]" in MPI_COMM_WORLD, or "[no MPI]" when MPI is not running.
inline std::string world_rank_tag() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) return "[no MPI]";
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return detail::cat("[rank ", rank, " of ", size, "]");
}

/// Runs `fn()` and returns its result. When it throws, the other ranks would wait for
/// this one in their next collective, so instead the whole job ends: prints
/// "`who` [rank r of n]: <exception message>; ending the job" and calls
/// abort_job(..., 1) (a dist_error, thrown on every rank alike, is printed once, by
/// rank 0). Wrap the body of main() between MPI_Init and MPI_Finalize:
///
///     MPI_Init(&argc, &argv);
///     const int status = dist::abort_on_exception([&] { return run(argc, argv); }, "train_ddp");
///     MPI_Finalize();
///     return status;
template <class F>
auto abort_on_exception(F&& fn, const std::string& who = "orepa") -> decltype(fn()) {
  std::string what;
  bool every_rank = false;
  try {
    return std::forward<F>(fn)();
  } catch (const dist_error& e) {
    what = e.what();
    every_rank = true;
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
    what = "an exception not derived from std::exception";
  }
  abort_job(detail::cat(who, " ", world_rank_tag(), ": ", what, "; ending the job"), 1, every_rank);
}

/// A whole MPI program's main(): MPI_Init, `run(argc, argv)` under abort_on_exception (as
/// `who`), MPI_Finalize; returns run's status.
///
///     int main(int argc, char** argv) { return dist::mpi_main(argc, argv, run, "train_ddp"); }
template <class F>
int mpi_main(int argc, char** argv, F&& run, const std::string& who) {
  MPI_Init(&argc, &argv);
  const int status = abort_on_exception([&] { return int(run(argc, argv)); }, who);
  MPI_Finalize();
  return status;
}

/// The MPI datatype of `T` (float, double, std::int64_t, int, char).
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, int>) return MPI_INT;
  else if constexpr (std::is_same_v<T, char>) return MPI_CHAR;
  else static_assert(!sizeof(T), "orepa::dist::mpi_type: float, double, std::int64_t, int or char");
}

/// A private duplicate of an MPI communicator (freed on destruction) whose collectives
/// each end within timeout() seconds or end the job (see the file comment).
/// MPI must be initialised before construction and finalised after destruction.
/// Every rank calls the collectives in the same order with the same counts; one that
/// does not ends the job with a message naming both ranks' collectives.
/// Not copyable; share it through std::shared_ptr (the BN reducers do).
class Communicator {
 public:
  /// Duplicates `comm` twice (data and side channel; collective over `comm`: every rank
  /// constructs at the same point, within `timeout_seconds`, or the job ends).
  /// Throws dist_error when MPI is not initialised, config_error for a timeout that is
  /// not > 0 (infinity means no deadline).
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD, double timeout_seconds = default_timeout) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) throw dist_error("orepa::dist::Communicator: MPI is not initialised (call MPI_Init first)");
    set_timeout(timeout_seconds);
    MPI_Comm_rank(comm, &rank_);
    MPI_Comm_size(comm, &size_);
    std::vector<MPI_Request> dups(2, MPI_REQUEST_NULL);
    MPI_Comm_idup(comm, &comm_, &dups[0]);
    MPI_Comm_idup(comm, &side_, &dups[1]);
    if (!wait_all(dups, MPI_Wtime() + timeout_, std::string("creating the communicator (MPI_Comm_idup)")))
      abort_job(detail::cat("orepa::dist [rank ", rank_, " of ", size_, "]: timeout: not every rank created the ",
                            "communicator (MPI_Comm_idup) within ", timeout_,
                            " s: a rank failed or finished before it, or the ranks create communicators in a "
                            "different order; ending the job"));
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(side_, MPI_ERRORS_RETURN);
    side_ready_ = true;
    theirs_.resize(std::size_t(size_));
    requests_.reserve(std::size_t(2 * size_));
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  /// Frees the duplicates (unless MPI was finalised already).
  ~Communicator() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (finalised) return;
    MPI_Comm_free(&side_);
    MPI_Comm_free(&comm_);
  }

  /// This process's rank.
  int rank() const { return rank_; }
  /// Number of ranks.
  int size() const { return size_; }
  /// The duplicated communicator. Collectives you run on it yourself bypass the
  /// deadline and the arrival check.
  MPI_Comm comm() const { return comm_; }

  /// Seconds a rank waits in one collective before the job is ended.
  double timeout() const { return timeout_; }
  /// Sets timeout(): > 0; infinity disables the deadline. Throws config_error otherwise.
  void set_timeout(double seconds) {
    if (!(seconds > 0))
      throw config_error(detail::cat("orepa::dist: timeout: expected seconds > 0 (or infinity), got ", seconds));
    timeout_ = seconds;
  }
  /// The training step the messages name (DistributedDataParallel sets it: the number
  /// of forward_train calls); negative (the default) names none.
  void set_step(std::int64_t step) { step_ = step; }
  /// The training step set last (negative when none was set).
  std::int64_t step() const { return step_; }
  /// Number of collectives run on this communicator so far.
  std::int64_t collectives() const { return seq_; }

  /// Sums `count` values at `data` in place across all ranks (MPI_Iallreduce, MPI_SUM).
  /// `label` names the collective in messages.
  template <class T>
  void sum(T* data, std::int64_t count, const std::string& label = "Communicator::sum") {
    collective<T>(Op::sum, count, 0, label, [&](int n, MPI_Request* r) {
      return MPI_Iallreduce(MPI_IN_PLACE, data, n, mpi_type<T>(), MPI_SUM, comm_, r);
    });
  }
  /// Copies `count` values at `data` from rank `root` to every rank (MPI_Ibcast).
  template <class T>
  void broadcast(T* data, std::int64_t count, int root = 0, const std::string& label = "Communicator::broadcast") {
    if (root < 0 || root >= size_)
      throw config_error(detail::cat("orepa::dist::Communicator::broadcast: root ", root, " is not a rank of ", size_));
    collective<T>(Op::broadcast, count, root, label, [&](int n, MPI_Request* r) {
      return MPI_Ibcast(data, n, mpi_type<T>(), root, comm_, r);
    });
  }
  /// Every rank's `mine` (the same length on every rank), rank after rank (MPI_Iallgather).
  template <class T>
  std::vector<T> all_gather(const std::vector<T>& mine, const std::string& label = "Communicator::all_gather") {
    std::vector<T> all(mine.size() * std::size_t(size_));
    collective<T>(Op::all_gather, std::int64_t(mine.size()), 0, label, [&](int n, MPI_Request* r) {
      return MPI_Iallgather(mine.data(), n, mpi_type<T>(), all.data(), n, mpi_type<T>(), comm_, r);
    });
    return all;
  }

  /// Every rank calls this at the same point, with an empty `local_error` when its part
  /// went well. When any rank passes a message, every rank throws the same dist_error
  /// "`who`: [rank r] message ..." listing each failing rank; otherwise it returns after
  /// one 4-byte all-reduce.
  void agree(const std::string& local_error, const std::string& who) {
    int bad = local_error.empty() ? 0 : 1;
    sum(&bad, 1, who + ": agree");
    if (!bad) return;
    constexpr std::size_t kLen = 512;  // per rank; longer messages are cut
    std::vector<char> mine(kLen, '\0');
    std::memcpy(mine.data(), local_error.data(), std::min(local_error.size(), kLen - 1));
    const auto all = all_gather(mine, who + ": agree (messages)");
    std::string msg = who + ":";
    for (int r = 0; r < size_; ++r) {
      const char* m = all.data() + std::size_t(r) * kLen;
      if (*m) msg += detail::cat(" [rank ", r, "] ", std::string(m, strnlen(m, kLen)), ";");
    }
    msg.pop_back();
    throw dist_error(msg);
  }

  /// Every rank calls this at the same point with its settings (name, value as text,
  /// neither with a line break; the same names everywhere). When any rank's value differs from rank 0's, every
  /// rank throws the same dist_error "`who`: [rank r] name value where rank 0 has
  /// value; ..." naming each differing rank and setting. Two small all-gathers.
  void check_same(const std::vector<std::pair<std::string, std::string>>& settings, const std::string& who) {
    std::string text;
    for (const auto& [name, value] : settings) text += name + '\n' + value + '\n';
    const auto lengths = all_gather(std::vector<std::int64_t>{std::int64_t(text.size())}, who + ": lengths");
    const std::size_t width = std::size_t(*std::max_element(lengths.begin(), lengths.end()));
    std::vector<char> mine(width, '\0');
    std::copy(text.begin(), text.end(), mine.begin());
    const auto all = all_gather(mine, who + ": settings");
    auto settings_of = [&](int r) {
      std::vector<std::pair<std::string, std::string>> out;
      const std::string t(all.data() + std::size_t(r) * width, std::size_t(lengths[std::size_t(r)]));
      for (std::size_t b = 0; b < t.size();) {
        const std::size_t e1 = t.find('\n', b), e2 = t.find('\n', e1 + 1);
        out.emplace_back(t.substr(b, e1 - b), t.substr(e1 + 1, e2 - e1 - 1));
        b = e2 + 1;
      }
      return out;
    };
    const auto root = settings_of(0);
    std::string msg;
    for (int r = 1; r < size_; ++r) {
      const auto theirs = settings_of(r);
      for (std::size_t i = 0; i < std::max(root.size(), theirs.size()); ++i) {
        const bool has_root = i < root.size(), has_theirs = i < theirs.size();
        if (has_root && has_theirs && root[i] == theirs[i]) continue;
        const bool same_name = has_root && has_theirs && root[i].first == theirs[i].first;
        msg += detail::cat(" [rank ", r, "] ", has_theirs ? theirs[i].first + " " + theirs[i].second : "nothing",
                           " where rank 0 has ",
                           same_name ? root[i].second : has_root ? root[i].first + " " + root[i].second : "nothing",
                           ";");
      }
    }
    if (msg.empty()) return;
    msg.pop_back();
    throw dist_error(who + ":" + msg);
  }

  /// Seconds spent inside collectives of this communicator so far (arrival and data).
  double communication_seconds() const { return seconds_; }

 private:
  enum class Op : std::int64_t { sum = 1, broadcast = 2, all_gather = 3 };

  // What every rank tells every other rank on entering a collective (see the file
  // comment); the step only informs messages, everything else must be equal.
  struct Header {
    std::int64_t seq = 0, op = 0, type = 0, count = 0, root = 0, step = -1;
    char label[80] = {};
    bool same_collective(const Header& o) const {
      return seq == o.seq && op == o.op && type == o.type && count == o.count && root == o.root &&
             std::strncmp(label, o.label, sizeof label) == 0;
    }
    std::string describe() const {
      const char* ops[] = {"?", "sum", "broadcast", "all-gather"};
      std::string s = detail::cat("collective #", seq, " \"", std::string(label, strnlen(label, sizeof label)),
                                  "\" (", ops[op >= 1 && op <= 3 ? op : 0], " of ", count, " ", type_name(type),
                                  " values");
      if (op == std::int64_t(Op::broadcast)) s += detail::cat(" from rank ", root);
      s += ")";
      if (step == 0) s += " before the first training step";
      else if (step > 0) s += detail::cat(" at training step ", step);
      return s;
    }
  };
  static constexpr int kHeaderTag = 7, kPingTag = 8, kPongTag = 9;

  template <class T>
  static constexpr std::int64_t type_code() {
    if constexpr (std::is_same_v<T, float>) return 1;
    else if constexpr (std::is_same_v<T, double>) return 2;
    else if constexpr (std::is_same_v<T, std::int64_t>) return 3;
    else if constexpr (std::is_same_v<T, int>) return 4;
    else return 5;  // char (mpi_type rejects the rest)
  }
  static const char* type_name(std::int64_t code) {
    static const char* const names[] = {"?", "float", "double", "int64", "int", "char"};
    return code >= 1 && code <= 5 ? names[code] : names[0];
  }

  // The two phases of every collective (file comment), timed.
  template <class T, class Post>
  void collective(Op op, std::int64_t count, int root, const std::string& label, Post&& post) {
    const double t0 = MPI_Wtime(), deadline = t0 + timeout_;
    Header mine;
    mine.seq = ++seq_;
    mine.op = std::int64_t(op);
    mine.type = type_code<T>();
    mine.count = count;
    mine.root = root;
    mine.step = step_;
    std::memcpy(mine.label, label.data(), std::min(label.size(), sizeof mine.label - 1));
    if (size_ > 1) exchange_headers(mine, deadline);
    // The counts are equal on every rank now, so this throws everywhere or nowhere.
    if (count < 0 || count > std::int64_t(INT32_MAX))
      throw dist_error(detail::cat("orepa::dist: ", mine.describe(), " does not fit an MPI count"));
    requests_.assign(1, MPI_REQUEST_NULL);
    const int rc = post(int(count), &requests_[0]);
    if (rc != MPI_SUCCESS) fail(mine, "posting it failed: " + error_string(rc));
    if (!wait_all(requests_, deadline, mine)) {
      const std::string silent = silent_ranks();
      fail(mine, detail::cat("every rank arrived, but it did not complete within the timeout of ", timeout_, " s; ",
                             silent.empty() ? std::string("every rank answers (the MPI library did not complete it)")
                                            : detail::cat("rank(s) ", silent, " did not answer within ", kAnswerSeconds,
                                                          " s: stopped or dead inside it")));
    }
    previous_ = mine;
    seconds_ += MPI_Wtime() - t0;
  }

  // Phase 1: send `mine` to every other rank, receive theirs, compare.
  void exchange_headers(const Header& mine, double deadline) {
    requests_.assign(std::size_t(2 * (size_ - 1)), MPI_REQUEST_NULL);
    std::size_t i = 0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      Header& theirs = theirs_[std::size_t(r)];
      int rc = MPI_Irecv(&theirs, int(sizeof(Header)), MPI_BYTE, r, kHeaderTag, side_, &requests_[i++]);
      if (rc == MPI_SUCCESS)
        rc = MPI_Isend(&mine, int(sizeof(Header)), MPI_BYTE, r, kHeaderTag, side_, &requests_[i++]);
      if (rc != MPI_SUCCESS) fail(mine, "sending its arrival failed: " + error_string(rc));
    }
    const bool all_arrived = wait_all(requests_, deadline, mine);
    // A receive still pending is a rank that did not arrive; the rest sent their header.
    std::string missing, differing;
    i = 0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      const bool arrived = requests_[i] == MPI_REQUEST_NULL;
      i += 2;
      if (!arrived) missing += detail::cat(missing.empty() ? "" : ", ", r);
      else if (!theirs_[std::size_t(r)].same_collective(mine))
        differing += detail::cat("; rank ", r, " is in ", theirs_[std::size_t(r)].describe());
    }
    const std::string me = detail::cat("orepa::dist [rank ", rank_, " of ", size_, "]: ");
    if (!differing.empty())
      abort_job(me + "the ranks run different collectives: rank " + std::to_string(rank_) + " is in " +
                mine.describe() + differing +
                "; every rank must run the same collectives in the same order; ending the job",
                1, true);
    if (!all_arrived)
      abort_job(me + detail::cat("timeout: waited ", timeout_, " s in ", mine.describe(), " for rank(s) ", missing,
                                 ", which did not arrive (",
                                 previous_.seq > 0 ? "last seen in " + previous_.describe()
                                                   : std::string("never seen in a collective"),
                                 "): stopped, dead, finished, or still computing; ending the job"));
  }

  // Polls until every request completed (true) or the deadline passed (false);
  // completed requests become MPI_REQUEST_NULL; an MPI error ends the job, naming `what`
  // (a Header or a text). Three phases, by the time waited so far: up to 100 us only
  // MPI_Testsome (a collective whose ranks are all there completes in a few us; a yield
  // on a busy machine would cost tens of us each); up to 5 ms a yield after each test
  // (the ranks of a step arrive within this, and a rank still computing on this core
  // gets it); then sleeps, doubling from 50 us to 1 ms (a rank far behind, stopped or
  // gone: at most 1 ms late, a few tests per millisecond).
  template <class What>
  bool wait_all(std::vector<MPI_Request>& requests, double deadline, const What& what) {
    constexpr double kSpinSeconds = 100e-6, kYieldSeconds = 5e-3;
    constexpr auto kFirstPause = std::chrono::microseconds(50), kLongestPause = std::chrono::microseconds(1000);
    indices_.resize(requests.size());
    const double start = MPI_Wtime();
    auto pause = kFirstPause;
    for (;;) {
      int done = 0;
      const int rc = MPI_Testsome(int(requests.size()), requests.data(), &done, indices_.data(), MPI_STATUSES_IGNORE);
      if (rc != MPI_SUCCESS) fail(what, "waiting for it failed: " + error_string(rc));
      if (done == MPI_UNDEFINED ||
          std::all_of(requests.begin(), requests.end(), [](MPI_Request r) { return r == MPI_REQUEST_NULL; }))
        return true;
      const double now = MPI_Wtime(), waited = now - start;
      if (now >= deadline) return false;
      if (waited < kSpinSeconds) continue;
      answer_pings();
      if (waited < kYieldSeconds) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, kLongestPause);
      }
    }
  }

  // A rank waiting in any collective answers the pings of a rank whose collective did
  // not complete by its deadline (silent_ranks), so that rank can tell the ranks that
  // still run from one stopped or dead inside the collective.
  static constexpr double kAnswerSeconds = 0.5;
  // Pings and answers are empty messages: only their arrival counts.
  void answer_pings() {
    if (!side_ready_) return;
    for (;;) {
      int pinged = 0;
      MPI_Status st;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kPingTag, side_, &pinged, &st) != MPI_SUCCESS || !pinged) return;
      MPI_Recv(nullptr, 0, MPI_BYTE, st.MPI_SOURCE, kPingTag, side_, MPI_STATUS_IGNORE);
      MPI_Send(nullptr, 0, MPI_BYTE, st.MPI_SOURCE, kPongTag, side_);  // empty: never waits
    }
  }
  // Pings every other rank and waits kAnswerSeconds for the answers (answering pings
  // meanwhile); returns the ranks that did not answer, "1, 3", or "".
  std::string silent_ranks() {
    std::vector<MPI_Request> answers(std::size_t(size_), MPI_REQUEST_NULL);
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      MPI_Irecv(nullptr, 0, MPI_BYTE, r, kPongTag, side_, &answers[std::size_t(r)]);
      MPI_Request ping = MPI_REQUEST_NULL;
      MPI_Isend(nullptr, 0, MPI_BYTE, r, kPingTag, side_, &ping);
      MPI_Request_free(&ping);  // a stopped rank never receives it; the job ends anyway
    }
    wait_all(answers, MPI_Wtime() + kAnswerSeconds, std::string("asking the other ranks"));
    std::string silent;
    for (int r = 0; r < size_; ++r)
      if (answers[std::size_t(r)] != MPI_REQUEST_NULL) silent += detail::cat(silent.empty() ? "" : ", ", r);
    return silent;
  }

  [[noreturn]] void fail(const Header& h, const std::string& why) const { fail(h.describe(), why); }
  [[noreturn]] void fail(const std::string& what, const std::string& why) const {
    abort_job(detail::cat("orepa::dist [rank ", rank_, " of ", size_, "]: ", what, ": ", why, "; ending the job"));
  }
  static std::string error_string(int rc) {
    char text[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return std::string(text, std::size_t(len));
  }

  MPI_Comm comm_ = MPI_COMM_NULL, side_ = MPI_COMM_NULL;
  bool side_ready_ = false;          // side_ exists (pings are answered from then on)
  int rank_ = 0, size_ = 1;
  double timeout_ = default_timeout;
  std::int64_t seq_ = 0, step_ = -1;
  Header previous_;                  // the last collective completed (equal on every rank)
  std::vector<Header> theirs_;       // the other ranks' headers of the current collective
  std::vector<MPI_Request> requests_;
  std::vector<int> indices_;         // MPI_Testsome's output
  double seconds_ = 0;
};

}  // namespace dist
}  // namespace orepa
