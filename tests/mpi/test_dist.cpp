// Data-parallel training on MPI (orepa/dist), run by ctest as `mpiexec -np 2`.
// Every rank also computes the single-process reference itself (the data and the
// initialisation are deterministic), so each rank checks the job against an independent
// computation on the whole batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "orepa/dist/dist.hpp"
#include "orepa/orepa.hpp"
#include "mpi_util.hpp"

namespace {

using namespace orepa;

// OREPA, DBB and ConvBN blocks, pooling and a linear head (the same weights on every call).
template <class S>
Sequential<S> block_net() {
  Sequential<S> net;
  net.add(OREPA<S, ReLU>(OrepaOptions(1, 6, 3).seed(11)));
  net.add(DBB<S, ReLU>(DbbOptions(6, 8, 3).stride(2).seed(12)));
  net.add(ConvBN<S, ReLU>(ConvOptions(8, 8, 3).seed(13)));
  net.add(GlobalAvgPool<S>());
  net.add(Linear<S>(8, 4, 14));
  return net;
}

// No BatchNorm: two linear layers on flattened 16x16 images.
template <class S>
Sequential<S> linear_net(std::int64_t hidden = 16, bool extra = false) {
  Sequential<S> net;
  net.add(Linear<S>(256, hidden, 21));
  net.add(Linear<S>(hidden, 4, 22));
  if (extra) net.add(Linear<S>(4, 4, 23));
  return net;
}

// max |a - b| relative to the largest |b| (or `scale` when larger; floored so
// all-but-zero tensors do not blow up).
template <class S>
double rel_diff(const Tensor<S>& a, const Tensor<S>& b, double scale = 1e-3) {
  for (S v : b) scale = std::max(scale, double(std::abs(v)));
  return max_abs_diff(a, b) / scale;
}

// The largest rel_diff over every parameter and buffer; counters must be equal. A
// running mean is measured against the channels' running standard deviation too: the
// rounding error of a mean scales with the spread of the values, not with the mean
// (a BN after an average pool has means near 0.01 of its values).
template <class S>
double state_diff(Sequential<S>& a, Sequential<S>& b) {
  const auto sa = a.state_dict(), sb = b.state_dict();
  const std::string mean_suffix = "running_mean";
  double worst = 0;
  for (const auto& n : sb.names()) {
    if (sb.is_count(n)) {
      EXPECT_EQ(sa.count(n), sb.count(n)) << n;
      continue;
    }
    double scale = 1e-3;
    if (n.size() > mean_suffix.size() && n.compare(n.size() - mean_suffix.size(), mean_suffix.size(), mean_suffix) == 0)
      for (S v : sb.tensor(n.substr(0, n.size() - mean_suffix.size()) + "running_var"))
        scale = std::max(scale, std::sqrt(double(v)));
    worst = std::max(worst, rel_diff(sa.tensor(n), sb.tensor(n), scale));
  }
  return worst;
}

// Samples [begin, begin + count) of a fixed data set: images and labels.
template <class S>
std::pair<Tensor<S>, std::vector<int>> data(std::int64_t begin, std::int64_t count) {
  static const auto d = make_bars_dataset<S>(16, /*seed=*/5);
  return d.slice(begin, count);
}

// `steps` SGD steps on the whole batch (ddp == nullptr) or on this rank's share of it
// (ddp given); returns the loss of every step (the mean over ranks for a DDP job).
template <class S, class Net>
std::vector<double> train(Net& net, DistributedDataParallel<Net>* ddp, int steps) {
  const std::int64_t batch = 16, ranks = ddp ? ddp->size() : 1, share = batch / ranks;
  auto [x, y] = data<S>(ddp ? ddp->rank() * share : 0, share);
  SGD<S> opt(net.parameters(), SGDOptions(0.05).momentum(0.9));
  SoftmaxCrossEntropy<S> ce;
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    double loss = ce.forward_train(ddp ? ddp->forward_train(x) : net.forward_train(x), y);
    if (ddp) {
      ddp->backward(ce.backward());
      ddp->communicator().sum(&loss, 1);
      loss /= double(ranks);
    } else {
      net.backward(ce.backward());
    }
    opt.step();
    losses.push_back(loss);
  }
  return losses;
}

struct Errors {
  double loss = 0, state = 0;
};

// 5 steps with this job's ranks on equal shares vs one process on the whole batch.
template <class S>
Errors job_vs_single_process(bool sync_bn) {
  Sequential<S> single = block_net<S>(), replica = block_net<S>();
  const auto want = train<S>(single, static_cast<DistributedDataParallel<Sequential<S>>*>(nullptr), 5);
  DistributedDataParallel ddp(replica, DdpOptions().sync_batch_norm(sync_bn));
  const auto got = train<S>(replica, &ddp, 5);
  Errors e;
  for (std::size_t i = 0; i < want.size(); ++i) e.loss = std::max(e.loss, std::abs(got[i] - want[i]) / std::abs(want[i]));
  e.state = state_diff(replica, single);
  return e;
}

std::int64_t ranks_dividing_batch() { return 16 % test::world_size() == 0 ? test::world_size() : 0; }

TEST(Ddp, SyncBatchNormMatchesOneProcessOnTheWholeBatchFloat) {
  if (!ranks_dividing_batch()) GTEST_SKIP() << "the batch of 16 needs a rank count dividing it";
  const Errors e = job_vs_single_process<float>(true);
  EXPECT_LT(e.loss, 1e-5);
  EXPECT_LT(e.state, 1e-5);
  if (test::world_rank() == 0)
    std::printf("[sync BN, float, %d ranks] max relative error: loss %.2e, parameters and buffers %.2e\n",
                test::world_size(), e.loss, e.state);
}

TEST(Ddp, SyncBatchNormMatchesOneProcessOnTheWholeBatchDouble) {
  if (!ranks_dividing_batch()) GTEST_SKIP() << "the batch of 16 needs a rank count dividing it";
  const Errors e = job_vs_single_process<double>(true);
  EXPECT_LT(e.loss, 1e-10);
  EXPECT_LT(e.state, 1e-10);
  if (test::world_rank() == 0)
    std::printf("[sync BN, double, %d ranks] max relative error: loss %.2e, parameters and buffers %.2e\n",
                test::world_size(), e.loss, e.state);
}

TEST(Ddp, WithoutSyncBatchNormTheShareStatisticsShow) {
  if (test::world_size() < 2 || !ranks_dividing_batch()) GTEST_SKIP() << "needs 2+ ranks";
  const Errors sync = job_vs_single_process<float>(true), local = job_vs_single_process<float>(false);
  // Per-share BN statistics differ from the whole batch's: the loss moves in the 3rd-4th
  // digit, parameters and running statistics in the 2nd-3rd, far above float round-off.
  EXPECT_GT(local.loss, 1e-4);
  EXPECT_GT(local.state, 1e-3);
  EXPECT_GT(local.state, 100 * sync.state);
  if (test::world_rank() == 0)
    std::printf("[local BN, float, %d ranks] max relative error: loss %.2e, parameters and buffers %.2e\n",
                test::world_size(), local.loss, local.state);
}

// Gradient averaging alone: every rank computes each rank's share gradient and the whole
// batch's locally; the job's averaged gradient equals the mean of the share gradients
// (bit for bit with 2 ranks: one addition and a halving) and the whole batch's gradient.
template <class S>
void gradient_averaging(double tol) {
  const std::int64_t ranks = test::world_size(), share = 16 / ranks;
  SoftmaxCrossEntropy<S> ce;
  auto grads_on = [&](Sequential<S>& net, std::int64_t begin, std::int64_t count) {
    auto [x, y] = data<S>(begin, count);
    net.zero_grad();
    ce.forward_train(net.forward_train(x.reshaped({count, 256})), y);
    net.backward(ce.backward());
    std::vector<Tensor<S>> g;
    for (auto* p : net.parameters()) g.push_back(p->grad);
    return g;
  };
  Sequential<S> whole = linear_net<S>();
  const auto want = grads_on(whole, 0, 16);
  std::vector<Tensor<S>> mean;
  for (std::int64_t r = 0; r < ranks; ++r) {
    Sequential<S> one = linear_net<S>();
    const auto g = grads_on(one, r * share, share);
    if (mean.empty()) mean = g;
    else
      for (std::size_t i = 0; i < g.size(); ++i)
        for (std::int64_t j = 0; j < g[i].numel(); ++j) mean[i][j] += g[i][j];
  }
  for (auto& m : mean)
    for (auto& v : m) v /= S(ranks);

  Sequential<S> net = linear_net<S>();
  DistributedDataParallel ddp(net, DdpOptions().bucket_bytes(4096));  // several buckets
  EXPECT_GT(ddp.bucket_sizes().size(), 1u);
  auto [x, y] = data<S>(ddp.rank() * share, share);
  net.zero_grad();
  ce.forward_train(ddp.forward_train(x.reshaped({share, 256})), y);
  ddp.backward(ce.backward());
  const auto params = net.parameters();
  ASSERT_EQ(params.size(), want.size());
  double vs_mean = 0, vs_whole = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (ranks == 2) EXPECT_EQ(max_abs_diff(params[i]->grad, mean[i]), 0.0) << "parameter " << i;
    else EXPECT_LT(rel_diff(params[i]->grad, mean[i]), tol) << "parameter " << i;
    EXPECT_LT(rel_diff(params[i]->grad, want[i]), tol) << "parameter " << i;
    vs_mean = std::max(vs_mean, max_abs_diff(params[i]->grad, mean[i]));
    vs_whole = std::max(vs_whole, rel_diff(params[i]->grad, want[i]));
  }
  if (ddp.rank() == 0)
    std::printf("[gradient averaging, %s, %lld ranks] max |difference| from the mean of the shares' gradients %.2e, "
                "max relative difference from the whole batch's %.2e\n",
                sizeof(S) == 4 ? "float" : "double", static_cast<long long>(ranks), vs_mean, vs_whole);
}

TEST(Ddp, GradientAveragingMatchesOneProcessFloat) {
  if (!ranks_dividing_batch()) GTEST_SKIP() << "the batch of 16 needs a rank count dividing it";
  gradient_averaging<float>(1e-5);
}

TEST(Ddp, GradientAveragingMatchesOneProcessDouble) {
  if (!ranks_dividing_batch()) GTEST_SKIP() << "the batch of 16 needs a rank count dividing it";
  gradient_averaging<double>(1e-12);
}

TEST(Ddp, ConstructionBroadcastsRankZerosState) {
  Sequential<float> net = linear_net<float>();
  // Different values on every rank; afterwards everyone holds rank 0's.
  Rng rng(100 + std::uint64_t(test::world_rank()));
  for (auto* p : net.parameters()) fill_uniform(p->value, 1.0, rng);
  Rng rng0(100);
  Sequential<float> rank0 = linear_net<float>();
  for (auto* p : rank0.parameters()) fill_uniform(p->value, 1.0, rng0);
  DistributedDataParallel ddp(net);
  EXPECT_EQ(state_diff(net, rank0), 0.0);
}

// ---- faults: every rank throws the same dist_error naming the rank, never a hang ------

template <class F>
std::string dist_error_of(F&& f) {
  try {
    f();
  } catch (const dist_error& e) {
    return e.what();
  }
  return "(no dist_error)";
}

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

TEST(DdpFaults, DifferentParameterCountsAreReportedAtConstruction) {
  if (test::world_size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Sequential<float> net = linear_net<float>(16, /*extra=*/test::world_rank() == 1);
  const auto msg = dist_error_of([&] { DistributedDataParallel ddp(net); });
  EXPECT_HAS(msg, "the network differs between ranks");
  EXPECT_HAS(msg, "[rank 1] 6 parameters and 0 buffers");
  EXPECT_HAS(msg, "rank 0 has 4 and 0");
  EXPECT_HAS(msg, "parameter '2.weight' [4, 4] where rank 0 has nothing");
}

TEST(DdpFaults, ShapeMismatchBetweenRanksIsReportedAtConstruction) {
  if (test::world_size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Sequential<float> net = linear_net<float>(test::world_rank() == 1 ? 17 : 16);
  const auto msg = dist_error_of([&] { DistributedDataParallel ddp(net); });
  EXPECT_HAS(msg, "[rank 1]");
  EXPECT_HAS(msg, "parameter '0.weight' [17, 256] where rank 0 has parameter '0.weight' [16, 256]");
  EXPECT_EQ(msg.find("[rank 0]"), std::string::npos) << msg;
}

TEST(DdpFaults, DifferentOptionsAreReportedAtConstructionOnEveryRank) {
  if (test::world_size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Sequential<float> net = block_net<float>();
  DdpOptions opts;
  if (test::world_rank() == 1) opts.sync_batch_norm(false).bucket_bytes(1024);
  const auto msg = dist_error_of([&] { DistributedDataParallel ddp(net, opts); });
  EXPECT_HAS(msg, "DistributedDataParallel: the options differ between ranks:");
  EXPECT_HAS(msg, "[rank 1] bucket_bytes 1024 where rank 0 has 4194304;");
  EXPECT_HAS(msg, "[rank 1] sync_batch_norm false where rank 0 has true");
  EXPECT_EQ(msg.find("timeout"), std::string::npos) << msg;  // equal everywhere
  EXPECT_EQ(msg.find("[rank 0]"), std::string::npos) << msg;
  // No reducer was installed: the BNs still train locally, and a good wrapper follows.
  for (auto* bn : net.batch_norms()) EXPECT_FALSE(bn->synchronised());
  DistributedDataParallel ddp(net, DdpOptions().timeout(60));
  EXPECT_EQ(ddp.communicator().timeout(), 60.0);
}

TEST(DdpFaults, InvalidOptionsAreConfigErrorsOnEveryRank) {
  Sequential<float> net = linear_net<float>();
  EXPECT_THROW(DistributedDataParallel(net, DdpOptions().bucket_bytes(0)), config_error);
  EXPECT_THROW(DistributedDataParallel(net, DdpOptions().timeout(0)), config_error);
  EXPECT_THROW(DistributedDataParallel(net, DdpOptions().timeout(-1)), config_error);
  EXPECT_THROW(DistributedDataParallel(net, DdpOptions().timeout(std::nan(""))), config_error);
  DistributedDataParallel ddp(net, DdpOptions().timeout(std::numeric_limits<double>::infinity()));
  EXPECT_EQ(ddp.communicator().timeout(), std::numeric_limits<double>::infinity());
}

// A rank that arrives late, but within the deadline, is waited for (the wait polls, then
// sleeps), and every collective still delivers the right values.
TEST(Communicator, LateRankWithinTheTimeoutIsWaitedFor) {
  dist::Communicator comm(MPI_COMM_WORLD, 30);
  const int n = comm.size(), r = comm.rank();
  if (r == n - 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::vector<double> v{double(r + 1), 1.0};
  comm.sum(v.data(), 2);
  EXPECT_EQ(v[0], double(n * (n + 1) / 2));
  EXPECT_EQ(v[1], double(n));
  if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  std::int64_t root_value = r == n - 1 ? 1234 : -1;
  comm.broadcast(&root_value, 1, n - 1);
  EXPECT_EQ(root_value, 1234);
  const auto all = comm.all_gather(std::vector<std::int64_t>{r, 10 * r});
  ASSERT_EQ(all.size(), std::size_t(2 * n));
  for (int k = 0; k < n; ++k) {
    EXPECT_EQ(all[std::size_t(2 * k)], k);
    EXPECT_EQ(all[std::size_t(2 * k + 1)], 10 * k);
  }
  EXPECT_EQ(comm.collectives(), 3);
  EXPECT_THROW(comm.broadcast(&root_value, 1, n), config_error);  // no such root: nothing sent
  EXPECT_THROW(comm.set_timeout(0), config_error);
  EXPECT_EQ(comm.timeout(), 30.0);
}

TEST(Communicator, CheckSameNamesEveryDifferingSetting) {
  dist::Communicator comm;
  const bool odd = comm.rank() == 1;
  std::vector<std::pair<std::string, std::string>> mine{{"--steps", odd ? "20" : "10"}, {"--width", "8"}};
  if (odd) mine.emplace_back("--extra", "1");
  const auto msg = dist_error_of([&] { comm.check_same(mine, "tool: different arguments"); });
  if (comm.size() < 2) {
    EXPECT_EQ(msg, "(no dist_error)");
    return;
  }
  EXPECT_EQ(msg, "tool: different arguments: [rank 1] --steps 20 where rank 0 has 10; "
                 "[rank 1] --extra 1 where rank 0 has nothing");
  comm.check_same({{"--width", "8"}}, "tool");  // equal everywhere: no throw
}

TEST(Communicator, AbortOnExceptionReturnsTheResultWhenNothingThrows) {
  EXPECT_EQ(dist::abort_on_exception([] { return 42; }, "test"), 42);
  int calls = 0;
  dist::abort_on_exception([&] { ++calls; });
  EXPECT_EQ(calls, 1);
}

TEST(DdpFaults, BadInputOnOneRankThrowsOnEveryRankAndTheJobGoesOn) {
  if (test::world_size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Sequential<float> net = block_net<float>();
  DistributedDataParallel ddp(net);
  auto batch = data<float>(0, 4);  // not a structured binding: lambdas use it (clang 14)
  auto& x = batch.first;
  auto& y = batch.second;
  Tensor<float> bad({4, 1, 12, 12});
  const auto msg = dist_error_of([&] { ddp.forward_train(ddp.rank() == 1 ? bad : x); });
  EXPECT_HAS(msg, "forward_train input");
  EXPECT_HAS(msg, "[rank 1] forward_train input [4, 1, 12, 12] where rank 0 has [4, 1, 16, 16]");

  // A wrong gradient shape on one rank, after a good forward.
  SoftmaxCrossEntropy<float> ce;
  ce.forward_train(ddp.forward_train(x), y);
  Tensor<float> bad_grad({4, 5});
  const auto msg2 = dist_error_of([&] { ddp.backward(ddp.rank() == 1 ? ConstTensorView<float>(bad_grad) : ce.backward()); });
  EXPECT_HAS(msg2, "[rank 1] backward grad_output [4, 5] where rank 0 has [4, 4]");

  // The same wrong shape everywhere fails identically in the network, before its first
  // collective, on every rank.
  Tensor<float> two_channels({4, 2, 16, 16});
  EXPECT_THROW(ddp.forward_train(two_channels), shape_error);

  // Nothing was left half-done: a full step still runs and keeps the replicas equal.
  ce.forward_train(ddp.forward_train(x), y);
  ddp.backward(ce.backward());
  double checksum = 0;
  for (auto* p : net.parameters())
    for (float g : p->grad) checksum += double(g);
  double all = checksum;
  ddp.communicator().sum(&all, 1);
  EXPECT_DOUBLE_EQ(all, checksum * ddp.size());
}

TEST(DdpFaults, UserCodeFailingOnOneRankIsAgreedOn) {
  if (test::world_size() < 2) GTEST_SKIP() << "needs 2+ ranks";
  Sequential<float> net = block_net<float>();
  DistributedDataParallel ddp(net);
  auto batch = data<float>(0, 4);  // not a structured binding: lambdas use it (clang 14)
  auto& x = batch.first;
  auto& y = batch.second;
  if (ddp.rank() == 1) y[0] = 7;  // a label outside [0, 4)
  SoftmaxCrossEntropy<float> ce;
  const auto& logits = ddp.forward_train(x);
  const auto msg = dist_error_of([&] {
    std::string error;
    try {
      ce.forward_train(logits, y);
    } catch (const std::exception& e) {
      error = e.what();
    }
    ddp.agree(error);
  });
  EXPECT_HAS(msg, "[rank 1]");
  EXPECT_HAS(msg, "label");
  EXPECT_EQ(msg.find("[rank 0]"), std::string::npos) << msg;
}

}  // namespace
