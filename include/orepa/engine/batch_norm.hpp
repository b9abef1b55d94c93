#pragma once
/// @file batch_norm.hpp
/// BatchNorm2d with PyTorch semantics (SPEC section 6): eps 1e-5, momentum 0.1, biased
/// batch variance for normalising, unbiased (n/(n-1)) for the running variance, and the
/// deploy fold s = gamma / sqrt(var + eps), b = beta - mean * s.
///
/// For float the training forward and backward run oneDNN batch-normalisation primitives
/// (JIT, multi-threaded), created once per input shape; BnKernels exposes the same
/// primitives for any memory layout, so the fused training pipeline (conv.hpp) runs BN on
/// the convolution's blocked output directly. Other scalars (double, for gradient checks)
/// run plain loops over NCHW planes with statistics accumulated in double.

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>

#include "orepa/core/param.hpp"
#include "orepa/engine/onednn.hpp"

namespace orepa::engine {

/// oneDNN batch-normalisation primitives (scale and shift, no fused ReLU) for one data
/// descriptor and epsilon: training forward (batch statistics out), forward with given
/// statistics (to recompute a training forward's output), and backward. Every argument
/// is a raw float pointer: the data pointers must hold memory in `data`'s layout, the
/// per-channel ones C floats. Created once, executed with no allocation.
class BnKernels {
 public:
  /// Creates the primitives for `data` (N, C, H, W in any layout) and epsilon `eps`.
  BnKernels(const memory::desc& data, double eps) {
    using namespace dnnl;
    const auto C = data.dims()[1];
    const memory::desc c_md({C}, memory::data_type::f32, tag::x);
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    const auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
    const float e = float(eps);
    batch_normalization_forward::primitive_desc train_pd(
        batch_normalization_forward::desc(prop_kind::forward_training, data, e, flags), attr, cpu_engine());
    batch_normalization_forward::primitive_desc stats_pd(
        batch_normalization_forward::desc(prop_kind::forward_inference, data, e,
                                          flags | normalization_flags::use_global_stats),
        attr, cpu_engine());
    batch_normalization_backward::primitive_desc bwd_pd(
        batch_normalization_backward::desc(prop_kind::backward, data, data, e, flags), attr, cpu_engine(), train_pd);
    train_ = batch_normalization_forward(train_pd);
    stats_ = batch_normalization_forward(stats_pd);
    bwd_ = batch_normalization_backward(bwd_pd);
    auto wrap = [&](const memory::desc& d) { return memory(d, cpu_engine(), DNNL_MEMORY_NONE); };
    src_ = wrap(data), dst_ = wrap(data), diff_dst_ = wrap(data), diff_src_ = wrap(data);
    mean_ = wrap(c_md), var_ = wrap(c_md), scale_ = wrap(c_md), shift_ = wrap(c_md);
    diff_scale_ = wrap(c_md), diff_shift_ = wrap(c_md);
    auto biggest = train_pd.scratchpad_desc();
    for (const auto& d : {stats_pd.scratchpad_desc(), bwd_pd.scratchpad_desc()})
      if (d.get_size() > biggest.get_size()) biggest = d;
    scratch_ = allocate(biggest);
    fwd_args_ = {{DNNL_ARG_SRC, src_},   {DNNL_ARG_DST, dst_},     {DNNL_ARG_MEAN, mean_},
                 {DNNL_ARG_VARIANCE, var_}, {DNNL_ARG_SCALE, scale_}, {DNNL_ARG_SHIFT, shift_},
                 {DNNL_ARG_SCRATCHPAD, scratch_}};
    // The backward lists SHIFT as a required argument although it does not use it (STYLE 2.4).
    bwd_args_ = {{DNNL_ARG_SRC, src_},           {DNNL_ARG_DIFF_DST, diff_dst_}, {DNNL_ARG_MEAN, mean_},
                 {DNNL_ARG_VARIANCE, var_},      {DNNL_ARG_SCALE, scale_},       {DNNL_ARG_SHIFT, shift_},
                 {DNNL_ARG_DIFF_SRC, diff_src_}, {DNNL_ARG_DIFF_SCALE, diff_scale_},
                 {DNNL_ARG_DIFF_SHIFT, diff_shift_}, {DNNL_ARG_SCRATCHPAD, scratch_}};
  }
  BnKernels(const BnKernels&) = delete;
  BnKernels& operator=(const BnKernels&) = delete;

  /// dst = BN(src) with the batch statistics, which are written to mean / var (biased).
  void forward_train(const float* src, float* dst, float* mean, float* var, const float* gamma, const float* beta) {
    bind_fwd(src, dst, mean, var, gamma, beta);
    train_.execute(thread_stream(), fwd_args_);
    thread_stream().wait();
  }
  /// dst = BN(src) with the given statistics (e.g. those of the last training forward).
  void forward_with_stats(const float* src, float* dst, const float* mean, const float* var, const float* gamma,
                          const float* beta) {
    bind_fwd(src, dst, mean, var, gamma, beta);
    stats_.execute(thread_stream(), fwd_args_);
    thread_stream().wait();
  }
  /// diff_src = dL/dsrc and dgamma, dbeta (overwritten) from diff_dst, for the training
  /// forward of `src` whose statistics were mean / var. diff_src may alias diff_dst.
  void backward(const float* src, const float* diff_dst, float* diff_src, const float* mean, const float* var,
                const float* gamma, const float* beta, float* dgamma, float* dbeta) {
    set(src_, src), set(diff_dst_, diff_dst), set(diff_src_, diff_src);
    set(mean_, mean), set(var_, var), set(scale_, gamma), set(shift_, beta);
    set(diff_scale_, dgamma), set(diff_shift_, dbeta);
    bwd_.execute(thread_stream(), bwd_args_);
    thread_stream().wait();
  }

 private:
  static void set(memory& m, const float* p) { m.set_data_handle(const_cast<float*>(p)); }
  void bind_fwd(const float* src, float* dst, const float* mean, const float* var, const float* gamma,
                const float* beta) {
    set(src_, src), set(dst_, dst), set(mean_, mean), set(var_, var), set(scale_, gamma), set(shift_, beta);
  }

  dnnl::batch_normalization_forward train_, stats_;
  dnnl::batch_normalization_backward bwd_;
  memory src_, dst_, diff_dst_, diff_src_, mean_, var_, scale_, shift_, diff_scale_, diff_shift_, scratch_;
  std::unordered_map<int, memory> fwd_args_, bwd_args_;
};

/// A unique_ptr that is dropped, not shared, when its owner is copied: for per-object
/// caches of primitives and buffers (a copy rebuilds its own lazily).
template <class T>
class CacheSlot {
 public:
  CacheSlot() = default;
  /// A copy starts empty.
  CacheSlot(const CacheSlot&) {}
  /// Assigning drops the held object.
  CacheSlot& operator=(const CacheSlot&) {
    p_.reset();
    return *this;
  }
  /// Move constructor (takes the held object).
  CacheSlot(CacheSlot&&) noexcept = default;
  /// Move assignment (takes the held object).
  CacheSlot& operator=(CacheSlot&&) noexcept = default;
  /// The held object, or nullptr.
  T* get() const { return p_.get(); }
  /// Holds `p` and returns a reference to it.
  T& emplace(std::unique_ptr<T> p) {
    p_ = std::move(p);
    return *p_;
  }
  /// Drops the held object.
  void reset() { p_.reset(); }

 private:
  std::unique_ptr<T> p_;
};

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

  /// Number of channels C.
  std::int64_t channels() const { return weight.value.numel(); }
  /// State-dict prefix of the tensors.
  const std::string& prefix() const { return prefix_; }
  /// The trainable and buffer tensors: weight, bias, running_mean, running_var.
  ParamList<S> params() { return {&weight, &bias, &running_mean, &running_var}; }

  /// Training forward: normalises `y` with its batch statistics into `z`, remembers them
  /// for backward and updates the running statistics. Needs more than one value per channel.
  void forward_train(const Tensor<S>& y, Tensor<S>& z) {
    check(y, "BatchNorm::forward_train");
    const std::int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3), n = N * P;
    if (n < 2)
      throw state_error(detail::cat("BatchNorm (", prefix_, "): training needs more than one value per channel, got input ",
                                    shape_str(y.sizes())));
    z.resize(y.sizes());
    stat_mean_.resize({C});
    stat_var_.resize({C});
    if constexpr (std::is_same_v<S, float>) {
      guarded([&] { return "BatchNorm (" + prefix_ + ") training forward on " + shape_str(y.sizes()); }, [&] {
        kernels(y.sizes()).forward_train(y.data(), z.data(), stat_mean_.data(), stat_var_.data(), weight.value.data(),
                                         bias.value.data());
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
          for (std::int64_t j = 0; j < P; ++j) { double d = double(p[j]) - m; sq += d * d; }
        }
        stat_mean_[c] = S(m);
        stat_var_[c] = S(sq / double(n));
      }
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
      running_var.value[c] = S((1 - momentum) * double(running_var.value[c]) + momentum * v * double(n) / double(n - 1));
    }
    ++num_batches_tracked;
    has_batch_stats_ = true;
  }
  /// Batch mean and biased variance of the last training forward (empty before one).
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
  void forward_eval(const Tensor<S>& y, Tensor<S>& z) const {
    check(y, "BatchNorm::forward_eval");
    z.resize(y.sizes());
    for (std::int64_t c = 0; c < y.size(1); ++c)
      apply(y, z, c, running_mean.value[c], S(1.0 / std::sqrt(double(running_var.value[c]) + eps)));
  }

  /// The normalised-and-affine value at element `j` of channel `c` (recomputed for the
  /// activation's backward instead of storing the pre-activation).
  S affine(S y, std::int64_t c) const { return (y - mean_[c]) * invstd_[c] * weight.value[c] + bias.value[c]; }

  /// Backward of the last forward_train: from dL/dz and the saved input `y` gives dL/dy,
  /// accumulating dL/dgamma and dL/dbeta. `dz` may alias `dy`.
  void backward(const Tensor<S>& y, const Tensor<S>& dz, Tensor<S>& dy) {
    if (!has_batch_stats_) throw state_error("BatchNorm (" + prefix_ + "): backward before forward_train");
    dz.expect_shape(y.sizes(), "BatchNorm::backward grad_output");
    const std::int64_t N = y.size(0), C = y.size(1), P = y.size(2) * y.size(3);
    dy.resize(y.sizes());
    if constexpr (std::is_same_v<S, float>) {
      dgamma_.resize({C});
      dbeta_.resize({C});
      guarded([&] { return "BatchNorm (" + prefix_ + ") backward on " + shape_str(y.sizes()); }, [&] {
        kernels(y.sizes()).backward(y.data(), dz.data(), dy.data(), mean_.data(), var_.data(), weight.value.data(),
                                    bias.value.data(), dgamma_.data(), dbeta_.data());
      });
      accumulate_grads(dgamma_.data(), dbeta_.data());
      return;
    }
    const double n = double(N * P);
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

  /// oneDNN primitive sets created by this BN (float only; one per input shape and eps).
  std::int64_t primitive_creations() const { return creations_; }

  /// gamma, the per-channel scale [C].
  Param<S> weight, bias, running_mean, running_var;
  /// \var orepa::engine::BatchNorm::bias
  /// beta, the per-channel shift [C].
  //
  /// \var orepa::engine::BatchNorm::running_mean
  /// Running mean [C] (a buffer).
  //
  /// \var orepa::engine::BatchNorm::running_var
  /// Running unbiased variance [C] (a buffer).
  //
  /// Number of training forwards done.
  std::int64_t num_batches_tracked = 0;
  /// Epsilon added to the variance.
  double eps = 1e-5;
  /// Running-statistics update factor.
  double momentum = 0.1;

 private:
  void check(const Tensor<S>& y, const char* who) const {
    if (y.dim() != 4 || y.size(1) != channels())
      throw shape_error(detail::cat(who, " (", prefix_, "): expected [N, ", channels(), ", H, W], got ",
                                    shape_str(y.sizes())));
  }
  void apply(const Tensor<S>& y, Tensor<S>& z, std::int64_t c, S mean, S invstd) const {
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
  using KernelMap = std::map<Key, std::unique_ptr<BnKernels>>;
  BnKernels& kernels(const Shape& ys) {
    KernelMap* map = cache_.get();
    if (!map) map = &cache_.emplace(std::make_unique<KernelMap>());
    std::int64_t eps_bits = 0;
    const double e = eps;
    std::memcpy(&eps_bits, &e, sizeof e);
    const Key key{ys[0], ys[2], ys[3], eps_bits};
    auto it = map->find(key);
    if (it != map->end()) return *it->second;
    auto k = std::make_unique<BnKernels>(nchw_desc(ys), eps);
    ++creations_;
    return *map->emplace(key, std::move(k)).first->second;
  }

  std::string prefix_;
  Tensor<S> mean_, var_, invstd_;            // statistics of the last training forward
  Tensor<S> stat_mean_, stat_var_, dgamma_, dbeta_;  // scratch (reused)
  bool has_batch_stats_ = false;
  CacheSlot<KernelMap> cache_;
  std::int64_t creations_ = 0;
};

}  // namespace orepa::engine
