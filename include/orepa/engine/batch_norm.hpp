#pragma once
/// @file batch_norm.hpp (engine)
/// oneDNN batch-normalisation primitives for one memory layout (BnKernels), used by the
/// BatchNorm2d layer (blocks/batch_norm.hpp) on NCHW tensors and by the fused training
/// pipeline (conv.hpp) on the convolution's blocked output; and CacheSlot, the
/// per-object cache holder that copies drop.

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>

#include "orepa/core/linkage.hpp"
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
  BnKernels(const memory::desc& data, double eps);
  BnKernels(const BnKernels&) = delete;
  BnKernels& operator=(const BnKernels&) = delete;
  /// Destroys the primitives.
  ~BnKernels();

  /// dst = BN(src) with the batch statistics, which are written to mean / var (biased).
  void forward_train(const float* src, float* dst, float* mean, float* var, const float* gamma, const float* beta);
  /// dst = BN(src) with the given statistics (e.g. those of the last training forward).
  void forward_with_stats(const float* src, float* dst, const float* mean, const float* var, const float* gamma,
                          const float* beta);
  /// diff_src = dL/dsrc and dgamma, dbeta (overwritten) from diff_dst, for the training
  /// forward of `src` whose statistics were mean / var. diff_src may alias diff_dst.
  void backward(const float* src, const float* diff_dst, float* diff_src, const float* mean, const float* var,
                const float* gamma, const float* beta, float* dgamma, float* dbeta);

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

#if OREPA_DEFINITIONS
OREPA_INLINE BnKernels::~BnKernels() = default;

OREPA_INLINE BnKernels::BnKernels(const memory::desc& data, double eps) {
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

OREPA_INLINE void BnKernels::forward_train(const float* src, float* dst, float* mean, float* var, const float* gamma,
                                           const float* beta) {
  bind_fwd(src, dst, mean, var, gamma, beta);
  train_.execute(thread_stream(), fwd_args_);
  thread_stream().wait();
}

OREPA_INLINE void BnKernels::forward_with_stats(const float* src, float* dst, const float* mean, const float* var,
                                                const float* gamma,
                        const float* beta) {
  bind_fwd(src, dst, mean, var, gamma, beta);
  stats_.execute(thread_stream(), fwd_args_);
  thread_stream().wait();
}

OREPA_INLINE void BnKernels::backward(const float* src, const float* diff_dst, float* diff_src, const float* mean,
                                      const float* var,
              const float* gamma, const float* beta, float* dgamma, float* dbeta) {
  set(src_, src), set(diff_dst_, diff_dst), set(diff_src_, diff_src);
  set(mean_, mean), set(var_, var), set(scale_, gamma), set(shift_, beta);
  set(diff_scale_, dgamma), set(diff_shift_, dbeta);
  bwd_.execute(thread_stream(), bwd_args_);
  thread_stream().wait();
}
#endif  // OREPA_DEFINITIONS

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

}  // namespace orepa::engine
