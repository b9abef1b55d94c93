#pragma once
/// @file batch_norm.hpp
/// `BatchNorm2d<S>`: per-channel batch normalisation with PyTorch semantics (SPEC section
/// 6): eps 1e-5, momentum 0.1, biased batch variance for normalising, unbiased
/// (n/(n-1)) for the running variance, and the deploy fold s = gamma / sqrt(var + eps),
/// b = beta - mean * s. Tensor names (relative to its prefix): weight, bias (trainable),
/// running_mean, running_var (buffers), num_batches_tracked (a counter).
///
/// For float the training forward and backward on NCHW tensors run oneDNN primitives
/// (engine::BnKernels, JIT, multi-threaded), created once per input shape. The fused
/// training pipeline computes the statistics itself and hands them over through
/// set_batch_statistics(). Other scalars (double, for gradient checks) run plain loops
/// with statistics accumulated in double.
///
/// Synchronised BN: with a CrossReplicaSum installed (dist/ installs one per BN), training
/// statistics come from all replicas of a data-parallel job: forward sums the count and
/// the per-channel sum and sum of squares (one call per forward), backward the two
/// per-channel sums of dL/dz (one call); the fused pipeline does the same through
/// synchronise_statistics() and synchronise_gradient_sums(). Without one (the default)
/// nothing changes.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "orepa/blocks/module.hpp"
#include "orepa/engine/batch_norm.hpp"

namespace orepa {

/// Sums `count` doubles at `data` in place across the replicas of a data-parallel job.
/// Every replica calls it at the same point with the same count; it throws if the
/// replicas cannot agree. The core library never calls MPI: dist/ provides the MPI one.
using CrossReplicaSum = std::function<void(double* data, std::int64_t count)>;

/// Per-channel batch normalisation of NCHW tensors with running statistics.
template <class S>
class BatchNorm2d {
 public:
  /// An empty BN (no channels).
  BatchNorm2d() = default;
  /// A BN over `channels` channels: weight 1, bias 0, running mean 0, running var 1.
  explicit BatchNorm2d(std::int64_t channels)
      : weight(Tensor<S>({channels}, S(1)), ParamKind::norm),
        bias(Tensor<S>({channels}), ParamKind::norm),
        running_mean(Tensor<S>({channels}), ParamKind::buffer),
        running_var(Tensor<S>({channels}, S(1)), ParamKind::buffer) {}

  /// Number of channels C.
  std::int64_t channels() const { return weight.value.numel(); }
  /// Appends weight, bias, running_mean, running_var under `prefix` and itself.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    out.add(prefix + "weight", weight);
    out.add(prefix + "bias", bias);
    out.add(prefix + "running_mean", running_mean);
    out.add(prefix + "running_var", running_var);
    out.batch_norms.emplace_back(prefix, this);
  }

  /// Synchronises the training statistics with `sum` (see CrossReplicaSum); an empty
  /// function restores local statistics. Kept by copies of the BN.
  void set_cross_replica_sum(CrossReplicaSum sum) { replica_sum_ = std::move(sum); }
  /// True when a CrossReplicaSum is installed (training statistics span all replicas).
  bool synchronised() const { return bool(replica_sum_); }

  /// Training forward: normalises `y` with its batch statistics into `z`, remembers them
  /// for backward and updates the running statistics. Needs more than one value per
  /// channel (over all replicas when synchronised).
  void forward_train(ConstTensorView<S> y, Tensor<S>& z) {
    check(y, "BatchNorm2d::forward_train");
    const std::int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
    std::int64_t n = N * P;
    if (n < 2 && !replica_sum_)  // synchronised: checked on the count of all replicas
      throw state_error(detail::cat("BatchNorm2d: training needs more than one value per channel, got input ",
                                    shape_str(y.sizes())));
    z.resize(y.sizes());
    stat_mean_.resize({C});
    stat_var_.resize({C});
    if constexpr (std::is_same_v<S, float>) {
      engine::guarded([&] { return "BatchNorm2d training forward on " + shape_str(y.sizes()); }, [&] {
        kernels(y.sizes()).forward_train(y.data(), z.data(), stat_mean_.data(), stat_var_.data(),
                                         weight.value.data(), bias.value.data());
      });
    } else {
      for (std::int64_t c = 0; c < C; ++c) {
        double sum = 0, sq = 0;
        for (std::int64_t b = 0; b < N; ++b) {
          const S* p = y.data() + (b * C + c) * P;
          for (std::int64_t j = 0; j < P; ++j) sum += double(p[j]);
        }
        const double m = sum / double(n);
        for (std::int64_t b = 0; b < N; ++b) {
          const S* p = y.data() + (b * C + c) * P;
          for (std::int64_t j = 0; j < P; ++j) {
            double d = double(p[j]) - m;
            sq += d * d;
          }
        }
        stat_mean_[c] = S(m);
        stat_var_[c] = S(sq / double(n));
      }
    }
    if (replica_sum_) {
      n = synchronise_statistics(stat_mean_.data(), stat_var_.data(), n);
      if constexpr (std::is_same_v<S, float>)  // normalise again, with all replicas' statistics
        engine::guarded([&] { return "BatchNorm2d synchronised forward on " + shape_str(y.sizes()); }, [&] {
          kernels(y.sizes()).forward_with_stats(y.data(), z.data(), stat_mean_.data(), stat_var_.data(),
                                                weight.value.data(), bias.value.data());
        });
    }
    set_batch_statistics(stat_mean_.data(), stat_var_.data(), n);
    if constexpr (!std::is_same_v<S, float>)
      for (std::int64_t c = 0; c < C; ++c) apply(y, z, c, mean_[c], invstd_[c]);
  }

  /// Records the batch statistics of a training forward computed elsewhere (the fused
  /// pipeline): `mean` and biased `var` of `n` values per channel. Remembers them for
  /// backward and affine(), updates the running statistics and num_batches_tracked.
  void set_batch_statistics(const S* mean, const S* var, std::int64_t n) {
    const std::int64_t C = channels();
    mean_.resize({C});
    var_.resize({C});
    invstd_.resize({C});
    for (std::int64_t c = 0; c < C; ++c) {
      const double m = double(mean[c]), v = double(var[c]);
      mean_[c] = mean[c];
      var_[c] = var[c];
      invstd_[c] = S(1.0 / std::sqrt(v + eps));
      running_mean.value[c] = S((1 - momentum) * double(running_mean.value[c]) + momentum * m);
      running_var.value[c] =
          S((1 - momentum) * double(running_var.value[c]) + momentum * v * double(n) / double(n - 1));
    }
    count_ = n;
    ++num_batches_tracked;
    has_batch_stats_ = true;
  }
  /// Synchronised BN (needs a CrossReplicaSum): turns this replica's batch `mean` and
  /// biased `var` of `n` values per channel into those of all replicas, in place, with one
  /// packed sum [count, sum, sum of squares] shifted by the running mean (equal on every
  /// replica, so the variance does not cancel when the mean is large). Returns the count
  /// over all replicas; throws state_error, on every replica alike, when it is below 2.
  /// forward_train calls it; so does the fused pipeline, which computes statistics itself.
  std::int64_t synchronise_statistics(S* mean, S* var, std::int64_t n) {
    if (!replica_sum_) throw state_error("BatchNorm2d::synchronise_statistics: no CrossReplicaSum installed");
    const std::int64_t C = channels();
    sums_.assign(std::size_t(1 + 2 * C), 0.0);
    sums_[0] = double(n);
    for (std::int64_t c = 0; c < C; ++c) {
      const double d = double(mean[c]) - double(running_mean.value[c]);
      sums_[std::size_t(1 + c)] = double(n) * d;
      sums_[std::size_t(1 + C + c)] = double(n) * (double(var[c]) + d * d);
    }
    replica_sum_(sums_.data(), 1 + 2 * C);
    const auto total = std::int64_t(sums_[0]);
    if (total < 2)
      throw state_error(detail::cat("BatchNorm2d: synchronised training needs more than one value per channel over "
                                    "all replicas, got ", total));
    for (std::int64_t c = 0; c < C; ++c) {
      const double d = sums_[std::size_t(1 + c)] / double(total);
      mean[c] = S(double(running_mean.value[c]) + d);
      var[c] = S(std::max(0.0, sums_[std::size_t(1 + C + c)] / double(total) - d * d));
    }
    local_count_ = n;
    return total;
  }
  /// Synchronised BN on a pipeline whose BN backward ran locally (the fused pipeline): from
  /// this replica's sums `dgamma` = sum dz * xhat and `dbeta` = sum dz (with the statistics
  /// of all replicas) gives per channel `scale` and `shift` such that dL/dy = (the local
  /// backward's dL/dy) + scale * xhat + shift, the local backward having used this
  /// replica's sums and count where all replicas' belong. One packed sum.
  void synchronise_gradient_sums(const S* dgamma, const S* dbeta, S* scale, S* shift) {
    if (!replica_sum_) throw state_error("BatchNorm2d::synchronise_gradient_sums: no CrossReplicaSum installed");
    const std::int64_t C = channels();
    sums_.resize(std::size_t(2 * C));
    for (std::int64_t c = 0; c < C; ++c) {
      sums_[std::size_t(c)] = double(dbeta[c]);
      sums_[std::size_t(C + c)] = double(dgamma[c]);
    }
    replica_sum_(sums_.data(), 2 * C);
    const double n = double(local_count_), total = double(count_);
    for (std::int64_t c = 0; c < C; ++c) {
      const double k = double(weight.value[c]) * double(invstd_[c]);
      shift[c] = S(k * (double(dbeta[c]) / n - sums_[std::size_t(c)] / total));
      scale[c] = S(k * (double(dgamma[c]) / n - sums_[std::size_t(C + c)] / total));
    }
  }

  /// Batch mean of the last training forward (empty before one).
  const Tensor<S>& batch_mean() const { return mean_; }
  /// Batch biased variance of the last training forward (empty before one).
  const Tensor<S>& batch_var() const { return var_; }
  /// Adds dL/dgamma and dL/dbeta computed elsewhere (the fused pipeline) to the gradients.
  void accumulate_grads(const S* dgamma, const S* dbeta) {
    for (std::int64_t c = 0; c < channels(); ++c) {
      weight.grad[c] += dgamma[c];
      bias.grad[c] += dbeta[c];
    }
  }

  /// Eval forward with the running statistics.
  void forward_eval(ConstTensorView<S> y, Tensor<S>& z) const {
    check(y, "BatchNorm2d::forward_eval");
    z.resize(y.sizes());
    for (std::int64_t c = 0; c < y.size(1); ++c)
      apply(y, z, c, running_mean.value[c], S(1.0 / std::sqrt(double(running_var.value[c]) + eps)));
  }

  /// The normalised-and-affine value of `y` in channel `c` with the last batch statistics
  /// (recomputed for the activation's backward instead of storing the pre-activation).
  S affine(S y, std::int64_t c) const { return (y - mean_[c]) * invstd_[c] * weight.value[c] + bias.value[c]; }

  /// Backward of the last forward_train: from dL/dz and the saved input `y` gives dL/dy,
  /// accumulating dL/dgamma and dL/dbeta. `dz` may alias `dy`.
  void backward(ConstTensorView<S> y, ConstTensorView<S> dz, Tensor<S>& dy) {
    if (!has_batch_stats_) throw state_error("BatchNorm2d: backward before forward_train");
    dz.expect_shape(y.sizes(), "BatchNorm2d::backward grad_output");
    const std::int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
    dy.resize(y.sizes());
    if constexpr (std::is_same_v<S, float>) {
      if (!replica_sum_) {
        dgamma_.resize({C});
        dbeta_.resize({C});
        engine::guarded([&] { return "BatchNorm2d backward on " + shape_str(y.sizes()); }, [&] {
          kernels(y.sizes()).backward(y.data(), dz.data(), dy.data(), mean_.data(), var_.data(), weight.value.data(),
                                      bias.value.data(), dgamma_.data(), dbeta_.data());
        });
        accumulate_grads(dgamma_.data(), dbeta_.data());
        return;
      }
    }
    // Per channel: sum dz and sum dz * xhat, then dy. When synchronised the sums span all
    // replicas (dy of this replica's values needs them) while the gamma / beta gradients
    // stay local: gradient averaging (dist/) combines those like every other gradient.
    sums_.assign(std::size_t(2 * C), 0.0);
    for (std::int64_t c = 0; c < C; ++c) {
      double sdz = 0, sdzx = 0;
      const double m = mean_[c], is = invstd_[c];
      for (std::int64_t b = 0; b < N; ++b) {
        const S* pz = dz.data() + (b * C + c) * P;
        const S* py = y.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j) {
          sdz += double(pz[j]);
          sdzx += double(pz[j]) * (double(py[j]) - m) * is;
        }
      }
      weight.grad[c] += S(sdzx);
      bias.grad[c] += S(sdz);
      sums_[std::size_t(c)] = sdz;
      sums_[std::size_t(C + c)] = sdzx;
    }
    if (replica_sum_) replica_sum_(sums_.data(), 2 * C);
    const double n = replica_sum_ ? double(count_) : double(N * P);  // all replicas' count when synchronised
    for (std::int64_t c = 0; c < C; ++c) {
      const double m = mean_[c], is = invstd_[c], sdz = sums_[std::size_t(c)], sdzx = sums_[std::size_t(C + c)];
      const double k = double(weight.value[c]) * is / n;
      for (std::int64_t b = 0; b < N; ++b) {
        const S* pz = dz.data() + (b * C + c) * P;
        const S* py = y.data() + (b * C + c) * P;
        S* pd = dy.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j) pd[j] = S(k * (n * double(pz[j]) - sdz - (double(py[j]) - m) * is * sdzx));
      }
    }
  }

  /// Deploy fold: per-channel scale gamma / sqrt(var + eps) and shift beta - mean * scale.
  void fold(Tensor<S>& scale, Tensor<S>& shift) const {
    const auto C = channels();
    scale = Tensor<S>({C});
    shift = Tensor<S>({C});
    for (std::int64_t c = 0; c < C; ++c) {
      double s = double(weight.value[c]) / std::sqrt(double(running_var.value[c]) + eps);
      scale[c] = S(s);
      shift[c] = S(double(bias.value[c]) - double(running_mean.value[c]) * s);
    }
  }

  /// oneDNN primitive sets created by this BN (float only; one per input shape and eps).
  std::int64_t primitive_creations() const { return creations_; }

  /// gamma, the per-channel scale [C].
  Param<S> weight;
  /// beta, the per-channel shift [C].
  Param<S> bias;
  /// Running mean [C] (a buffer).
  Param<S> running_mean;
  /// Running unbiased variance [C] (a buffer).
  Param<S> running_var;
  /// Number of training forwards done.
  std::int64_t num_batches_tracked = 0;
  /// Epsilon added to the variance.
  double eps = 1e-5;
  /// Running-statistics update factor.
  double momentum = 0.1;

 private:
  void check(ConstTensorView<S> y, const char* who) const {
    if (y.dim() != 4 || y.size(1) != channels())
      throw shape_error(detail::cat(who, ": expected [N, ", channels(), ", H, W], got ", shape_str(y.sizes())));
    if (!y.is_contiguous()) throw shape_error(detail::cat(who, ": expected an NCHW (contiguous) tensor"));
  }
  void apply(ConstTensorView<S> y, Tensor<S>& z, std::int64_t c, S mean, S invstd) const {
    const std::int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
    const S a = invstd * weight.value[c], b = bias.value[c] - mean * a;
    for (std::int64_t bn = 0; bn < N; ++bn) {
      const S* p = y.data() + (bn * C + c) * P;
      S* q = z.data() + (bn * C + c) * P;
      for (std::int64_t j = 0; j < P; ++j) q[j] = p[j] * a + b;
    }
  }

  // NCHW primitives per (N, H, W, eps bits); rebuilt lazily by a copy.
  using Key = std::array<std::int64_t, 4>;
  using KernelMap = std::map<Key, std::unique_ptr<engine::BnKernels>>;
  engine::BnKernels& kernels(const Shape& ys) {
    KernelMap* map = cache_.get();
    if (!map) map = &cache_.emplace(std::make_unique<KernelMap>());
    std::int64_t eps_bits = 0;
    const double e = eps;
    std::memcpy(&eps_bits, &e, sizeof e);
    const Key key{ys[0], ys[2], ys[3], eps_bits};
    auto it = map->find(key);
    if (it != map->end()) return *it->second;
    auto k = std::make_unique<engine::BnKernels>(engine::nchw_desc(ys), eps);
    ++creations_;
    return *map->emplace(key, std::move(k)).first->second;
  }

  Tensor<S> mean_, var_, invstd_;                    // statistics of the last training forward
  Tensor<S> stat_mean_, stat_var_, dgamma_, dbeta_;  // scratch (reused)
  std::vector<double> sums_;                         // per-channel sums (reduced across replicas when synchronised)
  std::int64_t count_ = 0;                           // values per channel of the last training forward (all replicas)
  std::int64_t local_count_ = 0;                     // ... of this replica (synchronised)
  CrossReplicaSum replica_sum_;
  bool has_batch_stats_ = false;
  engine::CacheSlot<KernelMap> cache_;
  std::int64_t creations_ = 0;
};

}  // namespace orepa
