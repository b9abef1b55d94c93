#pragma once
/// @file batch_norm.hpp
/// BatchNorm2d with PyTorch semantics (SPEC section 6): eps 1e-5, momentum 0.1, biased
/// batch variance for normalising, unbiased (n/(n-1)) for the running variance, and the
/// deploy fold s = gamma / sqrt(var + eps), b = beta - mean * s. Plain loops over NCHW
/// planes, statistics accumulated in double.

#include <cmath>
#include <cstdint>
#include <string>

#include "orepa/core/param.hpp"

namespace orepa::engine {

/// Per-channel batch normalisation of NCHW tensors with running statistics.
template <class S>
class BatchNorm {
 public:
  BatchNorm() = default;
  /// `prefix` is the state-dict prefix of its tensors, e.g. "bn." or "rbr_identity.".
  BatchNorm(std::int64_t channels, std::string prefix)
      : weight(prefix + "weight", Tensor<S>({channels}, S(1)), ParamKind::norm),
        bias(prefix + "bias", Tensor<S>({channels}), ParamKind::norm),
        running_mean(prefix + "running_mean", Tensor<S>({channels}), ParamKind::buffer),
        running_var(prefix + "running_var", Tensor<S>({channels}, S(1)), ParamKind::buffer),
        prefix_(std::move(prefix)) {}

  std::int64_t channels() const { return weight.value.size(); }
  const std::string& prefix() const { return prefix_; }
  ParamList<S> params() { return {&weight, &bias, &running_mean, &running_var}; }

  /// Training forward: normalises `y` with its batch statistics into `z`, remembers them
  /// for backward and updates the running statistics. Needs more than one value per channel.
  void forward_train(const Tensor<S>& y, Tensor<S>& z) {
    check(y, "BatchNorm::forward_train");
    const std::int64_t N = y.dim(0), C = y.dim(1), P = y.dim(2) * y.dim(3), n = N * P;
    if (n < 2)
      throw state_error(detail::cat("BatchNorm (", prefix_, "): training needs more than one value per channel, got input ",
                                    shape_str(y.shape())));
    mean_.resize({C});
    invstd_.resize({C});
    z.resize(y.shape());
    for (std::int64_t c = 0; c < C; ++c) {
      double sum = 0, sq = 0;
      for (std::int64_t b = 0; b < N; ++b) {
        const S* p = y.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j) sum += double(p[j]);
      }
      const double m = sum / double(n);
      for (std::int64_t b = 0; b < N; ++b) {
        const S* p = y.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j) { double d = double(p[j]) - m; sq += d * d; }
      }
      const double var = sq / double(n);
      mean_[c] = S(m);
      invstd_[c] = S(1.0 / std::sqrt(var + eps));
      running_mean.value[c] = S((1 - momentum) * double(running_mean.value[c]) + momentum * m);
      running_var.value[c] =
          S((1 - momentum) * double(running_var.value[c]) + momentum * var * double(n) / double(n - 1));
      apply(y, z, c, mean_[c], invstd_[c]);
    }
    ++num_batches_tracked;
    has_batch_stats_ = true;
  }

  /// Eval forward with the running statistics.
  void forward_eval(const Tensor<S>& y, Tensor<S>& z) const {
    check(y, "BatchNorm::forward_eval");
    z.resize(y.shape());
    for (std::int64_t c = 0; c < y.dim(1); ++c)
      apply(y, z, c, running_mean.value[c], S(1.0 / std::sqrt(double(running_var.value[c]) + eps)));
  }

  /// The normalised-and-affine value at element `j` of channel `c` (recomputed for the
  /// activation's backward instead of storing the pre-activation).
  S affine(S y, std::int64_t c) const { return (y - mean_[c]) * invstd_[c] * weight.value[c] + bias.value[c]; }

  /// Backward of the last forward_train: from dL/dz and the saved input `y` gives dL/dy,
  /// accumulating dL/dgamma and dL/dbeta. `dz` may alias `dy`.
  void backward(const Tensor<S>& y, const Tensor<S>& dz, Tensor<S>& dy) {
    if (!has_batch_stats_) throw state_error("BatchNorm (" + prefix_ + "): backward before forward_train");
    dz.expect_shape(y.shape(), "BatchNorm::backward grad_output");
    const std::int64_t N = y.dim(0), C = y.dim(1), P = y.dim(2) * y.dim(3);
    const double n = double(N * P);
    dy.resize(y.shape());
    for (std::int64_t c = 0; c < C; ++c) {
      double sdz = 0, sdzx = 0;
      const double m = mean_[c], is = invstd_[c];
      for (std::int64_t b = 0; b < N; ++b) {
        const S* pz = dz.data() + (b * C + c) * P;
        const S* py = y.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j) { sdz += double(pz[j]); sdzx += double(pz[j]) * (double(py[j]) - m) * is; }
      }
      weight.grad[c] += S(sdzx);
      bias.grad[c] += S(sdz);
      const double k = double(weight.value[c]) * is / n;
      for (std::int64_t b = 0; b < N; ++b) {
        const S* pz = dz.data() + (b * C + c) * P;
        const S* py = y.data() + (b * C + c) * P;
        S* pd = dy.data() + (b * C + c) * P;
        for (std::int64_t j = 0; j < P; ++j)
          pd[j] = S(k * (n * double(pz[j]) - sdz - (double(py[j]) - m) * is * sdzx));
      }
    }
  }

  /// Deploy fold: per-channel scale gamma/sqrt(var+eps) and shift beta - mean*scale.
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

  Param<S> weight, bias, running_mean, running_var;
  std::int64_t num_batches_tracked = 0;
  double eps = 1e-5;
  double momentum = 0.1;

 private:
  void check(const Tensor<S>& y, const char* who) const {
    if (y.rank() != 4 || y.dim(1) != channels())
      throw shape_error(detail::cat(who, " (", prefix_, "): expected [N, ", channels(), ", H, W], got ",
                                    shape_str(y.shape())));
  }
  void apply(const Tensor<S>& y, Tensor<S>& z, std::int64_t c, S mean, S invstd) const {
    const std::int64_t N = y.dim(0), C = y.dim(1), P = y.dim(2) * y.dim(3);
    const S a = invstd * weight.value[c], b = bias.value[c] - mean * a;
    for (std::int64_t bn = 0; bn < N; ++bn) {
      const S* p = y.data() + (bn * C + c) * P;
      S* q = z.data() + (bn * C + c) * P;
      for (std::int64_t j = 0; j < P; ++j) q[j] = p[j] * a + b;
    }
  }

  std::string prefix_;
  Tensor<S> mean_, invstd_;
  bool has_batch_stats_ = false;
};

}  // namespace orepa::engine
