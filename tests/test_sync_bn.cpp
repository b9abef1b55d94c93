// The cross-replica statistics hook of BatchNorm2d (synchronised BN) in one process,
// without MPI: a CrossReplicaSum that doubles every sum stands for a second replica with
// the same data, so a synchronised BN (or block) on x must compute what the plain one
// computes on the batch [x; x]: the same outputs and input gradients for x, the running
// statistics of twice the count, and half the parameter gradients (each replica keeps
// its own share; gradient averaging combines them).
#include "test_util.hpp"

namespace orepa::test {
namespace {

// [x; x] along the batch.
template <class S>
Tensor<S> twice(const Tensor<S>& x) {
  Shape s = x.sizes();
  s[0] *= 2;
  Tensor<S> t(s);
  std::copy(x.begin(), x.end(), t.begin());
  std::copy(x.begin(), x.end(), t.begin() + std::ptrdiff_t(x.numel()));
  return t;
}
// The first half of `t` along the batch.
template <class S>
Tensor<S> first_half(const Tensor<S>& t) {
  Shape s = t.sizes();
  s[0] /= 2;
  Tensor<S> h(s);
  std::copy(t.begin(), t.begin() + std::ptrdiff_t(h.numel()), h.begin());
  return h;
}

struct Doubling {
  std::vector<std::int64_t>* calls;  // the count of every call
  void operator()(double* data, std::int64_t n) const {
    calls->push_back(n);
    for (std::int64_t i = 0; i < n; ++i) data[i] *= 2;
  }
};

template <class S>
void bn_matches_doubled_batch(double tol) {
  const std::int64_t C = 5;
  BatchNorm2d<S> sync(C), plain(C);
  Rng rng(3);
  sync.weight.value = plain.weight.value = random_tensor<S>({C}, rng);
  sync.bias.value = plain.bias.value = random_tensor<S>({C}, rng);
  std::vector<std::int64_t> calls;
  sync.set_cross_replica_sum(Doubling{&calls});
  EXPECT_TRUE(sync.synchronised());
  EXPECT_FALSE(plain.synchronised());
  // A mean far from 0: the sums are shifted by the running mean, which the second step
  // moves away from 0.
  Tensor<S> x = random_tensor<S>({3, C, 4, 4}, rng, 2.0);
  for (auto& v : x) v += S(5);
  Tensor<S> zs, zp, dxs, dxp;
  for (int step = 0; step < 2; ++step) {
    sync.forward_train(x, zs);
    plain.forward_train(twice(x), zp);
    expect_close(zs, first_half(zp), tol, "output");
    expect_close(sync.running_mean.value, plain.running_mean.value, tol, "running_mean");
    expect_close(sync.running_var.value, plain.running_var.value, tol, "running_var (unbiased over both replicas)");
  }
  const Tensor<S> dz = random_tensor<S>(x.sizes(), rng);
  sync.backward(x, dz, dxs);
  plain.backward(twice(x), twice(dz), dxp);
  expect_close(dxs, first_half(dxp), tol, "dL/dx");
  for (auto* p : {&sync.weight, &sync.bias})
    for (auto& g : p->grad) g *= S(2);  // the other replica's equal share
  expect_close(sync.weight.grad, plain.weight.grad, tol, "dL/dgamma");
  expect_close(sync.bias.grad, plain.bias.grad, tol, "dL/dbeta");
  // One packed call per forward (count, sums, sums of squares), one per backward.
  EXPECT_EQ(calls, (std::vector<std::int64_t>{1 + 2 * C, 1 + 2 * C, 2 * C}));
}

TEST(SyncBatchNorm, MatchesTheDoubledBatchFloat) { bn_matches_doubled_batch<float>(1e-5); }
TEST(SyncBatchNorm, MatchesTheDoubledBatchDouble) { bn_matches_doubled_batch<double>(1e-12); }

// A whole block. Float with a built-in activation trains on the fused pipeline (its
// statistics and dy correction callbacks), double and custom activations on the plain
// path; DBB has BNs on several paths and a BN-and-pad stage.
template <class Block>
void block_matches_doubled_batch(Block sync, Block plain, double tol) {
  using S = typename decltype(sync.state_dict())::Scalar;
  std::vector<std::int64_t> calls;
  for (auto* bn : sync.batch_norms()) bn->set_cross_replica_sum(Doubling{&calls});
  Rng rng(8);
  const Tensor<S> x = random_tensor<S>({2, 4, 7, 7}, rng);
  const Tensor<S> ys = sync.forward_train(x);
  const Tensor<S> yp = plain.forward_train(twice(x));
  expect_close(ys, first_half(yp), tol, sync.type_name() + " output");
  const Tensor<S> g = random_tensor<S>(ys.sizes(), rng);
  sync.zero_grad();
  plain.zero_grad();
  const Tensor<S> dxs = sync.backward(g);
  const Tensor<S> dxp = plain.backward(twice(g));
  expect_close(dxs, first_half(dxp), tol, sync.type_name() + " dL/dx");
  const auto ps = sync.named_parameters(), pp = plain.named_parameters();
  for (std::size_t i = 0; i < ps.size(); ++i) {
    Tensor<S> both = ps[i].second->grad;
    for (auto& v : both) v *= S(2);
    expect_close(both, pp[i].second->grad, tol, ps[i].first + " gradient");
  }
  const auto bs = sync.named_buffers(), bp = plain.named_buffers();
  for (std::size_t i = 0; i < bs.size(); ++i) expect_close(bs[i].second->value, bp[i].second->value, tol, bs[i].first);
  EXPECT_EQ(calls.size(), 2 * sync.batch_norms().size());
}

TEST(SyncBatchNorm, OrepaBlockMatchesTheDoubledBatch) {
  const auto o = OrepaOptions(4, 6, 3).seed(2);
  block_matches_doubled_batch(OREPA<float, ReLU>(o), OREPA<float, ReLU>(o), 1e-5);
  block_matches_doubled_batch(OREPA<float, SiLU>(o), OREPA<float, SiLU>(o), 1e-5);
  block_matches_doubled_batch(OREPA<double, SiLU>(o), OREPA<double, SiLU>(o), 1e-12);
  const auto c = ConvOptions(4, 6, 3).stride(2).seed(4);  // identity: dz is dout itself
  block_matches_doubled_batch(ConvBN<float>(c), ConvBN<float>(c), 1e-5);
}

TEST(SyncBatchNorm, DbbBlockMatchesTheDoubledBatch) {
  const auto o = DbbOptions(4, 6, 3).stride(2).seed(3);
  block_matches_doubled_batch(DBB<float, ReLU>(o), DBB<float, ReLU>(o), 1e-5);
  block_matches_doubled_batch(DBB<double, ReLU>(o), DBB<double, ReLU>(o), 1e-12);
}

TEST(SyncBatchNorm, RemovingTheSumRestoresTheFusedLocalPath) {
  OREPA<float, ReLU> a(OrepaOptions(4, 6, 3).seed(2)), b(OrepaOptions(4, 6, 3).seed(2));
  std::vector<std::int64_t> calls;
  for (auto* bn : a.batch_norms()) bn->set_cross_replica_sum(Doubling{&calls});
  for (auto* bn : a.batch_norms()) bn->set_cross_replica_sum({});
  Rng rng(9);
  const Tensor<float> x = random_tensor<float>({2, 4, 7, 7}, rng);
  EXPECT_EQ(max_abs_diff(a.forward_train(x), b.forward_train(x)), 0.0);  // bit for bit: the same path
  EXPECT_TRUE(calls.empty());
}

}  // namespace
}  // namespace orepa::test
