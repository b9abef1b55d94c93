#pragma once
/// @file conv.hpp
/// `ConvEngine<S>`: the one convolution of a block, forward and both backward passes.
/// For float it runs oneDNN primitives (layouts chosen by oneDNN, reorders only where the
/// chosen layout differs from NCHW/OIHW), created once per input shape and then reused;
/// for any other scalar (double, used by gradient checks) it runs the reference loops.
///
/// FusedConvBnAct: the whole training pipeline of a squeezed block for float with a
/// built-in activation, conv -> BN -> activation and back, with the activations kept in
/// the layout oneDNN prefers between the block's input and output (reorders only there).
///
/// Thread safety: an engine object is not safe to use from two threads at once (it owns
/// the reorder buffers and scratchpad of its cached primitives).

#include <array>
#include <map>
#include <memory>
#include <tuple>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "orepa/core/activation.hpp"
#include "orepa/core/linkage.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/engine/onednn.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa::engine {

/// The three primitive descriptors of a training convolution (forward_training,
/// backward-data and backward-weights with the forward as hint), user-managed scratchpad.
/// Activations in layout `act` (`any`: oneDNN's choice, blocked on AVX-512 / AVX2), the
/// kernel in oneDNN's. Shared by ConvEngine<float> and FusedConvBnAct.
OREPA_INLINE std::tuple<dnnl::convolution_forward::primitive_desc, dnnl::convolution_backward_data::primitive_desc,
                        dnnl::convolution_backward_weights::primitive_desc>
training_conv_pds(const ConvGeometry& g, const Shape& xs, const Shape& ys, tag act = tag::any);
#if OREPA_DEFINITIONS
OREPA_INLINE std::tuple<dnnl::convolution_forward::primitive_desc, dnnl::convolution_backward_data::primitive_desc,
                        dnnl::convolution_backward_weights::primitive_desc>
training_conv_pds(const ConvGeometry& g, const Shape& xs, const Shape& ys, tag act) {
  using namespace dnnl;
  auto any = [act](const Shape& s) {
    return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, act);
  };
  primitive_attr attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  convolution_forward::primitive_desc fpd(
      convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct, any(xs), weights_desc(g),
                                any(ys), strides_of(g), dilates_of(g), padding_of(g), padding_of(g)),
      attr, cpu_engine());
  convolution_backward_data::primitive_desc dpd(
      convolution_backward_data::desc(algorithm::convolution_direct, any(xs), weights_desc(g), any(ys),
                                      strides_of(g), dilates_of(g), padding_of(g), padding_of(g)),
      attr, cpu_engine(), fpd);
  convolution_backward_weights::primitive_desc wpd(
      convolution_backward_weights::desc(algorithm::convolution_direct, any(xs), weights_desc(g), any(ys),
                                         strides_of(g), dilates_of(g), padding_of(g), padding_of(g)),
      attr, cpu_engine(), fpd);
  return {fpd, dpd, wpd};
}
#endif  // OREPA_DEFINITIONS

/// Reference (naive) convolution engine for any scalar type.
template <class S>
class ConvEngine {
 public:
  /// Engine for geometry `g`; throws config_error if it is invalid.
  explicit ConvEngine(ConvGeometry g) : g_(g) { g_.validate("ConvEngine", false); }
  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// y = conv(x, w); y is resized to the output shape.
  void forward(ConstTensorView<S> x, ConstTensorView<S> w, Tensor<S>& y) { y = reference::conv2d(x, w, g_); }
  /// dx = dL/dx for an input shaped like `x_shape`.
  void backward_data(ConstTensorView<S> dy, ConstTensorView<S> w, const Shape& x_shape, Tensor<S>& dx) {
    dx = reference::conv2d_backward_data(dy, w, g_, x_shape);
  }
  /// dw = dL/dw (overwritten, not accumulated).
  void backward_weights(ConstTensorView<S> x, ConstTensorView<S> dy, Tensor<S>& dw) {
    dw = reference::conv2d_backward_weights(x, dy, g_);
  }
  /// Primitives created so far (always 0: no primitives here).
  std::int64_t primitive_creations() const { return 0; }

 private:
  ConvGeometry g_;
};

/// oneDNN convolution engine for float (training forward, backward-data, backward-weights).
template <>
class ConvEngine<float> {
 public:
  /// Engine for geometry `g`; throws config_error if it is invalid.
  explicit ConvEngine(ConvGeometry g);
  /// Copies the geometry; the primitives are per object and rebuilt lazily.
  ConvEngine(const ConvEngine& o);
  /// Copies the geometry and drops the cached primitives.
  ConvEngine& operator=(const ConvEngine& o);
  /// Move constructor.
  ConvEngine(ConvEngine&&) noexcept;
  /// Move assignment.
  ConvEngine& operator=(ConvEngine&&) noexcept;
  /// Destroys the cached primitives.
  ~ConvEngine();

  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }

  /// y = conv(x, w) for x [N, I, H, W] and w [O, I/g, k, k]; y is resized to [N, O, OH, OW]. Throws shape_error / engine_error.
  void forward(ConstTensorView<float> x, ConstTensorView<float> w, Tensor<float>& y);

  /// dx = dL/dx for an input shaped like `x_shape` from dy [N, O, OH, OW]. Throws shape_error / engine_error.
  void backward_data(ConstTensorView<float> dy, ConstTensorView<float> w, const Shape& x_shape, Tensor<float>& dx);

  /// dw = dL/dw [O, I/g, k, k] (overwritten, not accumulated). Throws shape_error / engine_error.
  void backward_weights(ConstTensorView<float> x, ConstTensorView<float> dy, Tensor<float>& dw);

  /// Number of input shapes for which primitives were built (each builds three).
  std::int64_t primitive_creations() const { return creations_; }

 private:
  struct Entry {
    Shape y_shape;
    dnnl::convolution_forward fwd;
    dnnl::convolution_backward_data bwd_data;
    dnnl::convolution_backward_weights bwd_weights;
    Port fwd_x, fwd_w, fwd_y, bd_dy, bd_w, bd_dx, bw_x, bw_dy, bw_dw;
    memory scratch;  // one scratchpad shared by the three (they never run at once)
  };

  Entry& entry(const Shape& xs);

  void build(Entry& e, const Shape& xs, const Shape& ys);

  ConvGeometry g_;
  std::map<std::array<std::int64_t, 3>, std::unique_ptr<Entry>> cache_;
  std::int64_t creations_ = 0;
};

#if OREPA_DEFINITIONS
// Out of the class, as every constructor: a constructor instantiates the destructors of
// the members (the primitive cache and everything in it), which a program linking
// orepa::precompiled then no longer does.
OREPA_INLINE ConvEngine<float>::ConvEngine(ConvGeometry g) : g_(g) { g_.validate("ConvEngine", false); }
OREPA_INLINE ConvEngine<float>::ConvEngine(const ConvEngine& o) : g_(o.g_) {}
OREPA_INLINE ConvEngine<float>& ConvEngine<float>::operator=(const ConvEngine& o) {
  if (this != &o) {
    g_ = o.g_;
    cache_.clear();
  }
  return *this;
}
OREPA_INLINE ConvEngine<float>::ConvEngine(ConvEngine&&) noexcept = default;
OREPA_INLINE ConvEngine<float>& ConvEngine<float>::operator=(ConvEngine&&) noexcept = default;
OREPA_INLINE ConvEngine<float>::~ConvEngine() = default;

OREPA_INLINE void ConvEngine<float>::forward(ConstTensorView<float> x, ConstTensorView<float> w, Tensor<float>& y) {
  auto& e = entry(x.sizes());
  w.expect_shape(g_.weight_shape(), "ConvEngine::forward weight");
  y.resize(e.y_shape);
  guarded([&] { return describe(g_, x.sizes()); }, [&] {
    e.fwd.execute(thread_stream(), {{DNNL_ARG_SRC, e.fwd_x.in(x.data())},
                                    {DNNL_ARG_WEIGHTS, e.fwd_w.in(w.data())},
                                    {DNNL_ARG_DST, e.fwd_y.out(y.data())},
                                    {DNNL_ARG_SCRATCHPAD, e.scratch}});
    e.fwd_y.finish();
    thread_stream().wait();
  });
}

OREPA_INLINE void ConvEngine<float>::backward_data(ConstTensorView<float> dy, ConstTensorView<float> w,
                                                   const Shape& x_shape, Tensor<float>& dx) {
  auto& e = entry(x_shape);
  dy.expect_shape(e.y_shape, "ConvEngine::backward_data grad_output");
  dx.resize(x_shape);
  guarded([&] { return describe(g_, x_shape) + " (backward data)"; }, [&] {
    e.bwd_data.execute(thread_stream(), {{DNNL_ARG_DIFF_DST, e.bd_dy.in(dy.data())},
                                         {DNNL_ARG_WEIGHTS, e.bd_w.in(w.data())},
                                         {DNNL_ARG_DIFF_SRC, e.bd_dx.out(dx.data())},
                                         {DNNL_ARG_SCRATCHPAD, e.scratch}});
    e.bd_dx.finish();
    thread_stream().wait();
  });
}

OREPA_INLINE void ConvEngine<float>::backward_weights(ConstTensorView<float> x, ConstTensorView<float> dy,
                                                      Tensor<float>& dw) {
  auto& e = entry(x.sizes());
  dy.expect_shape(e.y_shape, "ConvEngine::backward_weights grad_output");
  dw.resize(g_.weight_shape());
  guarded([&] { return describe(g_, x.sizes()) + " (backward weights)"; }, [&] {
    e.bwd_weights.execute(thread_stream(), {{DNNL_ARG_SRC, e.bw_x.in(x.data())},
                                            {DNNL_ARG_DIFF_DST, e.bw_dy.in(dy.data())},
                                            {DNNL_ARG_DIFF_WEIGHTS, e.bw_dw.out(dw.data())},
                                            {DNNL_ARG_SCRATCHPAD, e.scratch}});
    e.bw_dw.finish();
    thread_stream().wait();
  });
}

OREPA_INLINE auto ConvEngine<float>::entry(const Shape& xs) -> Entry& {
  const Shape ys = g_.output_shape(xs, "ConvEngine");
  const std::array<std::int64_t, 3> key{xs[0], xs[2], xs[3]};
  auto it = cache_.find(key);
  if (it != cache_.end()) return *it->second;
  auto e = std::make_unique<Entry>();
  guarded(describe(g_, xs) + " (creating primitives)", [&] { build(*e, xs, ys); });
  ++creations_;
  return *cache_.emplace(key, std::move(e)).first->second;
}

OREPA_INLINE void ConvEngine<float>::build(Entry& e, const Shape& xs, const Shape& ys) {
  using namespace dnnl;
  e.y_shape = ys;
  const auto x_md = nchw_desc(xs), y_md = nchw_desc(ys), w_md = weights_desc(g_, tag::oihw);
  const auto [fpd, dpd, wpd] = training_conv_pds(g_, xs, ys);
  e.fwd = convolution_forward(fpd);
  e.bwd_data = convolution_backward_data(dpd);
  e.bwd_weights = convolution_backward_weights(wpd);
  e.fwd_x = Port(x_md, fpd.src_desc());
  e.fwd_w = Port(w_md, fpd.weights_desc());
  e.fwd_y = Port(y_md, fpd.dst_desc());
  e.bd_dy = Port(y_md, dpd.diff_dst_desc());
  e.bd_w = Port(w_md, dpd.weights_desc());
  e.bd_dx = Port(x_md, dpd.diff_src_desc());
  e.bw_x = Port(x_md, wpd.src_desc());
  e.bw_dy = Port(y_md, wpd.diff_dst_desc());
  e.bw_dw = Port(w_md, wpd.diff_weights_desc());
  auto biggest = fpd.scratchpad_desc();
  for (auto d : {dpd.scratchpad_desc(), wpd.scratchpad_desc()})
    if (d.get_size() > biggest.get_size()) biggest = d;
  e.scratch = memory(biggest, cpu_engine());
}
#endif  // OREPA_DEFINITIONS

/// A copy between two internal layouts of the same tensor, created once: when the
/// layouts are equal it passes the memory through, otherwise it owns a buffer in the
/// target layout and the reorder into it.
class Relayout {
 public:
  Relayout() = default;
  /// Reorder from layout `from` to layout `to` (a pass-through when equal).
  Relayout(const memory::desc& from, const memory::desc& to);
  /// `m` in the target layout (a reorder runs only if the layouts differ).
  const memory& operator()(const memory& m);
  /// Bytes of the owned buffer (0 when passing through).
  std::int64_t bytes() const { return buf_ ? std::int64_t(buf_.get_desc().get_size()) : 0; }

 private:
  memory buf_;
  dnnl::reorder to_;
};

#if OREPA_DEFINITIONS
OREPA_INLINE Relayout::Relayout(const memory::desc& from, const memory::desc& to) {
  if (from != to) {
    buf_ = allocate(to);
    to_ = dnnl::reorder(memory(from, cpu_engine(), DNNL_MEMORY_NONE), buf_);
  }
}
OREPA_INLINE const memory& Relayout::operator()(const memory& m) {
  if (!buf_) return m;
  to_.execute(thread_stream(), const_cast<memory&>(m), buf_);
  return buf_;
}
#endif  // OREPA_DEFINITIONS

/// The training pipeline of a squeezed block, float with a built-in activation:
///
///     forward:  x -> [reorder] -> conv(W) -> y -> BN(batch stats) -> z -> act -> [reorder] -> out
///     backward: dout -> [reorder] -> act' (z recomputed from y) -> BN' -> dy -> conv' -> [reorder] -> dx, dW
///
/// For an NCHW x every activation between the brackets stays in the layout the forward
/// convolution chose (nChw8c on AVX2), so a step reorders activations four times (x, out,
/// dout, dx), not at every primitive. For a channels-last (NHWC) x every primitive runs on
/// NHWC and out, dout and dx are NHWC: nothing is reordered and the activation writes
/// straight into out (only the input is copied: x may change before backward). A network
/// that keeps its activations channels-last so saves those reorders and their buffers
/// (yolo::Model: a fifth of oneDNN's time and of the peak memory of a YOLOv5n training
/// step). The saved input is the input of backward-weights
/// (no second reorder, no plain copy), y as the input of BN's backward; the
/// pre-activation z is recomputed from y and the batch statistics instead of being kept.
/// BN and the activation run as oneDNN primitives (JIT, multi-threaded) on that layout.
///
/// Per input shape, created once and reused: the primitives, the saved buffers, one work
/// buffer, the reorders and the scratchpad. No allocation in the steady state.
///
/// Synchronised BN (statistics over the replicas of a data-parallel job) plugs in through
/// two optional callbacks: forward hands the local statistics to `sync_stats`, which
/// replaces them by all replicas', and normalises again with those; backward hands the
/// local sums dgamma / dbeta to `correct`, which gives per channel the scale and shift of
/// the correction dy += scale * xhat + shift (a BN primitive with given statistics
/// computes it on the blocked layout). Without them nothing extra runs.
class FusedConvBnAct {
 public:
  /// Replaces the local batch `mean` and `var` (C floats each) by all replicas'.
  using StatsSync = std::function<void(float* mean, float* var)>;
  /// From the local sums `dgamma`, `dbeta` (C floats each) fills `scale`, `shift` (C each).
  using GradCorrection = std::function<void(const float* dgamma, const float* dbeta, float* scale, float* shift)>;

  /// `act` must be identity, relu or silu (custom activations cannot run in oneDNN).
  FusedConvBnAct(ConvGeometry g, ActivationKind act);
  /// A copy has the geometry and activation but no primitives or saved state (rebuilt lazily).
  FusedConvBnAct(const FusedConvBnAct& o);
  /// Copies geometry and activation, dropping primitives and saved state.
  FusedConvBnAct& operator=(const FusedConvBnAct& o);
  /// Move constructor (takes the primitives and saved state).
  FusedConvBnAct(FusedConvBnAct&& o) noexcept;
  /// Move assignment (takes the primitives and saved state).
  FusedConvBnAct& operator=(FusedConvBnAct&& o) noexcept;
  /// Destroys the primitives and saved state.
  ~FusedConvBnAct();

  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }

  /// out = act(BN(conv(x, w))) with the batch statistics, written to mean / var (biased,
  /// C floats each); gamma / beta are BN's C scales and shifts. out is resized in x's
  /// memory format. Saves what backward needs.
  void forward(ConstTensorView<float> x, ConstTensorView<float> w, const float* gamma, const float* beta, double eps,
               Tensor<float>& out, float* mean, float* var, const StatsSync& sync_stats = {});

  /// From dL/dout (in out's memory format) of the last forward: dx (in x's format,
  /// resized; skipped when `dx` is null, as for a network's first layer), dw (OIHW,
  /// resized, overwritten) and dgamma / dbeta (C floats, overwritten). mean / var are the
  /// statistics that forward wrote; gamma / beta BN's current scales and shifts.
  void backward(ConstTensorView<float> dout, const float* gamma, const float* beta, const float* mean, const float* var,
                Tensor<float>* dx, Tensor<float>& dw, float* dgamma, float* dbeta, const GradCorrection& correct = {});

  /// Input shapes for which the pipeline was built (each builds three convolution
  /// primitives, the BN and activation primitives and the reorders).
  std::int64_t primitive_creations() const { return creations_; }
  /// Bytes of the buffers kept from forward to backward for the last forward's shape:
  /// the reordered input, the conv output and the reordered kernel.
  std::int64_t bytes_saved_for_backward() const;

 private:
  static float* ptr(const memory& m) { return static_cast<float*>(m.get_data_handle()); }

  struct Entry;
  // dy (in the z buffer) += scale * xhat + shift, the BN primitive with the forward's
  // statistics computing the term into a buffer of the same layout (its padding stays 0).
  static void add_correction(Entry& e, const float* mean, const float* var, const float* dgamma, const float* dbeta,
                             const GradCorrection& correct);

  struct Entry {
    Shape x_shape, y_shape;
    MemoryFormat format = MemoryFormat::contiguous;  // of x, out, dout and dx
    bool direct_out = false;                         // the primitives' dst layout is out's: no copy
    dnnl::convolution_forward fwd;
    dnnl::convolution_backward_data bwd_data;
    dnnl::convolution_backward_weights bwd_weights;
    dnnl::eltwise_forward act_fwd;
    dnnl::eltwise_backward act_bwd;
    bool has_act = false;
    std::unique_ptr<BnKernels> bn;
    memory x_user, x_saved, w_user, w_saved, y, z, dz, out_user, scratch;
    memory corr;                                   // synchronised BN's dy correction (allocated on first use)
    std::vector<float> corr_scale, corr_shift;
    dnnl::reorder x_in, w_in, out_copy;
    Port dout_port, dx_port, dw_port;
    Relayout dy_for_data, dy_for_weights, x_for_weights, w_for_data;
    std::unordered_map<int, memory> fwd_args, act_fwd_args, act_bwd_args, bwd_data_args, bwd_w_args;
  };

  Entry& entry(const Shape& xs, MemoryFormat f, double eps);

  void build(Entry& e, const Shape& xs, const Shape& ys, MemoryFormat f, double eps);

  using Map = std::map<std::array<std::int64_t, 5>, std::unique_ptr<Entry>>;
  ConvGeometry g_;
  ActivationKind act_;
  CacheSlot<Map> cache_;
  Entry* last_ = nullptr;
  std::int64_t creations_ = 0;
};

#if OREPA_DEFINITIONS
OREPA_INLINE FusedConvBnAct::FusedConvBnAct(ConvGeometry g, ActivationKind act) : g_(g), act_(act) {
  g_.validate("FusedConvBnAct", false);
  if (act_ == ActivationKind::custom) throw config_error("FusedConvBnAct: needs a built-in activation");
}
OREPA_INLINE FusedConvBnAct::FusedConvBnAct(const FusedConvBnAct& o) : g_(o.g_), act_(o.act_) {}
OREPA_INLINE FusedConvBnAct& FusedConvBnAct::operator=(const FusedConvBnAct& o) {
  if (this != &o) g_ = o.g_, act_ = o.act_, cache_.reset(), last_ = nullptr;
  return *this;
}
OREPA_INLINE FusedConvBnAct::FusedConvBnAct(FusedConvBnAct&& o) noexcept
    : g_(o.g_),
      act_(o.act_),
      cache_(std::move(o.cache_)),
      last_(std::exchange(o.last_, nullptr)),
      creations_(o.creations_) {}
OREPA_INLINE FusedConvBnAct& FusedConvBnAct::operator=(FusedConvBnAct&& o) noexcept {
  g_ = o.g_, act_ = o.act_, cache_ = std::move(o.cache_), last_ = std::exchange(o.last_, nullptr);
  creations_ = o.creations_;
  return *this;
}
OREPA_INLINE FusedConvBnAct::~FusedConvBnAct() = default;

OREPA_INLINE void FusedConvBnAct::forward(ConstTensorView<float> x, ConstTensorView<float> w, const float* gamma,
                                          const float* beta, double eps,
             Tensor<float>& out, float* mean, float* var, const StatsSync& sync_stats) {
  w.expect_shape(g_.weight_shape(), "FusedConvBnAct::forward weight");
  Entry& e = entry(x.sizes(), x.memory_format(), eps);
  out.resize(e.y_shape, e.format);
  guarded([&] { return describe(g_, x.sizes()) + " (fused training forward)"; }, [&] {
    auto& s = thread_stream();
    e.x_user.set_data_handle(const_cast<float*>(x.data()));
    e.x_in.execute(s, e.x_user, e.x_saved);  // always a copy: the caller may change x before backward
    e.w_user.set_data_handle(const_cast<float*>(w.data()));
    e.w_in.execute(s, e.w_user, e.w_saved);  // kernel-sized; kept for backward-data
    e.fwd.execute(s, e.fwd_args);
    s.wait();
    e.out_user.set_data_handle(out.data());
    // BN's output: z, or out itself when nothing follows and out has z's layout.
    float* bn_out = e.direct_out && !e.has_act ? out.data() : ptr(e.z);
    e.bn->forward_train(ptr(e.y), bn_out, mean, var, gamma, beta);
    if (sync_stats) {
      sync_stats(mean, var);
      e.bn->forward_with_stats(ptr(e.y), bn_out, mean, var, gamma, beta);
    }
    if (e.has_act) {
      e.act_fwd_args[DNNL_ARG_DST] = e.direct_out ? e.out_user : e.z;  // z is recomputed in backward
      e.act_fwd.execute(s, e.act_fwd_args);
    }
    if (!e.direct_out) e.out_copy.execute(s, e.z, e.out_user);
    s.wait();
  });
  last_ = &e;
}

OREPA_INLINE void FusedConvBnAct::backward(ConstTensorView<float> dout, const float* gamma, const float* beta,
                                           const float* mean, const float* var,
              Tensor<float>* dx, Tensor<float>& dw, float* dgamma, float* dbeta, const GradCorrection& correct) {
  if (!last_) throw state_error("FusedConvBnAct::backward: call forward first");
  Entry& e = *last_;
  dout.expect_shape(e.y_shape, "FusedConvBnAct::backward grad_output");
  if (dout.memory_format() != e.format)
    throw shape_error(std::string("FusedConvBnAct::backward: grad_output must be ") +
                      (e.format == MemoryFormat::channels_last ? "channels_last" : "contiguous") +
                      ", as the forward's output");
  if (dx) dx->resize(e.x_shape, e.format);
  dw.resize(g_.weight_shape());
  guarded([&] { return describe(g_, e.x_shape) + " (fused training backward)"; }, [&] {
    auto& s = thread_stream();
    const memory& dout_b = e.dout_port.in(dout.data());
    // dz = dL/d(pre-activation), in the `dz` buffer; the identity passes dout through.
    const float* dz = ptr(dout_b);
    if (e.has_act) {
      e.bn->forward_with_stats(ptr(e.y), ptr(e.z), mean, var, gamma, beta);  // z again
      e.act_bwd_args[DNNL_ARG_DIFF_DST] = dout_b;
      e.act_bwd.execute(s, e.act_bwd_args);
      s.wait();
      dz = ptr(e.dz);
    }
    // dy into the z buffer (z is not needed any more).
    e.bn->backward(ptr(e.y), dz, ptr(e.z), mean, var, gamma, beta, dgamma, dbeta);
    if (correct) add_correction(e, mean, var, dgamma, dbeta, correct);
    if (dx) {
      e.bwd_data_args[DNNL_ARG_DIFF_DST] = e.dy_for_data(e.z);
      e.bwd_data_args[DNNL_ARG_WEIGHTS] = e.w_for_data(e.w_saved);
      e.bwd_data_args[DNNL_ARG_DIFF_SRC] = e.dx_port.out(dx->data());
      e.bwd_data.execute(s, e.bwd_data_args);
      e.dx_port.finish();
    }
    e.bwd_w_args[DNNL_ARG_SRC] = e.x_for_weights(e.x_saved);
    e.bwd_w_args[DNNL_ARG_DIFF_DST] = e.dy_for_weights(e.z);
    e.bwd_w_args[DNNL_ARG_DIFF_WEIGHTS] = e.dw_port.out(dw.data());
    e.bwd_weights.execute(s, e.bwd_w_args);
    e.dw_port.finish();
    s.wait();
  });
}

OREPA_INLINE std::int64_t FusedConvBnAct::bytes_saved_for_backward() const {
  if (!last_) return 0;
  return std::int64_t(last_->x_saved.get_desc().get_size() + last_->y.get_desc().get_size() +
                      last_->w_saved.get_desc().get_size());
}

OREPA_INLINE void FusedConvBnAct::add_correction(Entry& e, const float* mean, const float* var, const float* dgamma,
                                                 const float* dbeta,
                           const GradCorrection& correct) {
  const auto C = std::size_t(e.y_shape[1]);
  e.corr_scale.resize(C);
  e.corr_shift.resize(C);
  correct(dgamma, dbeta, e.corr_scale.data(), e.corr_shift.data());
  if (!e.corr) e.corr = allocate(e.z.get_desc());  // first synchronised backward only
  e.bn->forward_with_stats(ptr(e.y), ptr(e.corr), mean, var, e.corr_scale.data(), e.corr_shift.data());
  float* dy = ptr(e.z);
  const float* add = ptr(e.corr);
  const auto n = std::int64_t(e.z.get_desc().get_size() / sizeof(float));
  for (std::int64_t i = 0; i < n; ++i) dy[i] += add[i];
}

OREPA_INLINE auto FusedConvBnAct::entry(const Shape& xs, MemoryFormat f, double eps) -> Entry& {
  const Shape ys = g_.output_shape(xs, "FusedConvBnAct");
  std::int64_t eps_bits = 0;
  std::memcpy(&eps_bits, &eps, sizeof eps);
  const std::array<std::int64_t, 5> key{xs[0], xs[2], xs[3], eps_bits, std::int64_t(f)};
  Map* map = cache_.get();
  if (!map) map = &cache_.emplace(std::make_unique<Map>());
  auto it = map->find(key);
  if (it != map->end()) return *it->second;
  auto e = std::make_unique<Entry>();
  guarded(describe(g_, xs) + " (creating the fused training primitives)", [&] { build(*e, xs, ys, f, eps); });
  ++creations_;
  return *map->emplace(key, std::move(e)).first->second;
}

OREPA_INLINE void FusedConvBnAct::build(Entry& e, const Shape& xs, const Shape& ys, MemoryFormat f, double eps) {
  using namespace dnnl;
  e.x_shape = xs;
  e.y_shape = ys;
  e.format = f;
  const auto x_md = plain_desc(xs, f), y_md = plain_desc(ys, f), w_md = weights_desc(g_, tag::oihw);
  const auto [fpd, dpd, wpd] = training_conv_pds(g_, xs, ys, f == MemoryFormat::channels_last ? tag::nhwc : tag::any);
  e.fwd = convolution_forward(fpd);
  e.bwd_data = convolution_backward_data(dpd);
  e.bwd_weights = convolution_backward_weights(wpd);
  const auto src_md = fpd.src_desc(), dst_md = fpd.dst_desc();
  // Saved and work buffers, all in the forward's layouts.
  e.x_user = memory(x_md, cpu_engine(), DNNL_MEMORY_NONE);
  e.x_saved = allocate(src_md);
  e.x_in = reorder(e.x_user, e.x_saved);
  e.y = allocate(dst_md);
  e.z = allocate(dst_md);
  e.out_user = memory(y_md, cpu_engine(), DNNL_MEMORY_NONE);
  e.direct_out = dst_md == y_md;
  if (!e.direct_out) e.out_copy = reorder(e.z, e.out_user);
  e.w_user = memory(w_md, cpu_engine(), DNNL_MEMORY_NONE);
  e.w_saved = allocate(fpd.weights_desc());
  e.w_in = reorder(e.w_user, e.w_saved);
  e.bn = std::make_unique<BnKernels>(dst_md, eps);
  // Backward: the layouts the backward primitives want, reordered only if they differ.
  e.dout_port = Port(y_md, dst_md);
  e.dx_port = Port(x_md, dpd.diff_src_desc());
  e.dw_port = Port(w_md, wpd.diff_weights_desc());
  e.dy_for_data = Relayout(dst_md, dpd.diff_dst_desc());
  e.dy_for_weights = Relayout(dst_md, wpd.diff_dst_desc());
  e.x_for_weights = Relayout(src_md, wpd.src_desc());
  auto biggest = fpd.scratchpad_desc();
  for (const auto& d : {dpd.scratchpad_desc(), wpd.scratchpad_desc()})
    if (d.get_size() > biggest.get_size()) biggest = d;
  e.has_act = act_ != ActivationKind::identity;
  if (e.has_act) {
    primitive_attr attr;  // the activation primitives share the entry's scratchpad too
    attr.set_scratchpad_mode(scratchpad_mode::user);
    const auto alg = act_ == ActivationKind::relu      ? algorithm::eltwise_relu
                     : act_ == ActivationKind::sigmoid ? algorithm::eltwise_logistic
                                                       : algorithm::eltwise_swish;
    const float alpha = act_ == ActivationKind::silu ? 1.f : 0.f;
    eltwise_forward::primitive_desc afpd(eltwise_forward::desc(prop_kind::forward_training, alg, dst_md, alpha, 0.f),
                                         attr, cpu_engine());
    eltwise_backward::primitive_desc abpd(eltwise_backward::desc(alg, dst_md, dst_md, alpha, 0.f), attr,
                                          cpu_engine(), afpd);
    e.act_fwd = eltwise_forward(afpd);
    e.act_bwd = eltwise_backward(abpd);
    for (const auto& d : {afpd.scratchpad_desc(), abpd.scratchpad_desc()})
      if (d.get_size() > biggest.get_size()) biggest = d;
    e.dz = allocate(dst_md);
  }
  e.scratch = allocate(biggest);
  // Argument maps built once; a call only swaps the entries that change.
  e.fwd_args = {{DNNL_ARG_SRC, e.x_saved}, {DNNL_ARG_WEIGHTS, e.w_saved}, {DNNL_ARG_DST, e.y},
                {DNNL_ARG_SCRATCHPAD, e.scratch}};
  if (e.has_act) {
    e.act_fwd_args = {{DNNL_ARG_SRC, e.z}, {DNNL_ARG_DST, e.z}, {DNNL_ARG_SCRATCHPAD, e.scratch}};
    e.act_bwd_args = {{DNNL_ARG_SRC, e.z}, {DNNL_ARG_DIFF_DST, memory()}, {DNNL_ARG_DIFF_SRC, e.dz},
                      {DNNL_ARG_SCRATCHPAD, e.scratch}};
  }
  e.bwd_data_args = {{DNNL_ARG_DIFF_DST, memory()}, {DNNL_ARG_WEIGHTS, memory()}, {DNNL_ARG_DIFF_SRC, memory()},
                     {DNNL_ARG_SCRATCHPAD, e.scratch}};
  e.bwd_w_args = {{DNNL_ARG_SRC, memory()}, {DNNL_ARG_DIFF_DST, memory()}, {DNNL_ARG_DIFF_WEIGHTS, memory()},
                  {DNNL_ARG_SCRATCHPAD, e.scratch}};
  // Backward-data reads the forward's reordered kernel (relaid out only if it wants another layout).
  e.w_for_data = Relayout(fpd.weights_desc(), dpd.weights_desc());
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::engine
