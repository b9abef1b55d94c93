#pragma once
/// @file conv.hpp
/// ConvEngine<S>: the one convolution of a block, forward and both backward passes.
/// For float it runs oneDNN primitives (layouts chosen by oneDNN, reorders only where the
/// chosen layout differs from NCHW/OIHW), created once per input shape and then reused;
/// for any other scalar (double, used by gradient checks) it runs the reference loops.
///
/// Thread safety: an engine object is not safe to use from two threads at once (it owns
/// the reorder buffers and scratchpad of its cached primitives).

#include <array>
#include <map>
#include <memory>

#include "orepa/engine/onednn.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa::engine {

/// Reference (naive) convolution engine for any scalar type.
template <class S>
class ConvEngine {
 public:
  explicit ConvEngine(ConvGeometry g) : g_(g) { g_.validate("ConvEngine", false); }
  const ConvGeometry& geometry() const { return g_; }
  /// y = conv(x, w); y is resized to the output shape.
  void forward(const Tensor<S>& x, const Tensor<S>& w, Tensor<S>& y) { y = reference::conv2d(x, w, g_); }
  /// dx = dL/dx for an input shaped like `x_shape`.
  void backward_data(const Tensor<S>& dy, const Tensor<S>& w, const Shape& x_shape, Tensor<S>& dx) {
    dx = reference::conv2d_backward_data(dy, w, g_, x_shape);
  }
  /// dw = dL/dw (overwritten, not accumulated).
  void backward_weights(const Tensor<S>& x, const Tensor<S>& dy, Tensor<S>& dw) {
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
  explicit ConvEngine(ConvGeometry g) : g_(g) { g_.validate("ConvEngine", false); }
  ConvEngine(const ConvEngine& o) : g_(o.g_) {}  // primitives are per object, rebuilt lazily
  ConvEngine& operator=(const ConvEngine& o) {
    if (this != &o) { g_ = o.g_; cache_.clear(); }
    return *this;
  }
  ConvEngine(ConvEngine&&) = default;
  ConvEngine& operator=(ConvEngine&&) = default;

  const ConvGeometry& geometry() const { return g_; }

  void forward(const Tensor<float>& x, const Tensor<float>& w, Tensor<float>& y) {
    auto& e = entry(x.shape());
    w.expect_shape(g_.weight_shape(), "ConvEngine::forward weight");
    y.resize(e.y_shape);
    guarded(describe(g_, x.shape()), [&] {
      e.fwd.execute(thread_stream(), {{DNNL_ARG_SRC, e.fwd_x.in(x.data())},
                                      {DNNL_ARG_WEIGHTS, e.fwd_w.in(w.data())},
                                      {DNNL_ARG_DST, e.fwd_y.out(y.data())},
                                      {DNNL_ARG_SCRATCHPAD, e.scratch}});
      e.fwd_y.finish();
      thread_stream().wait();
    });
  }

  void backward_data(const Tensor<float>& dy, const Tensor<float>& w, const Shape& x_shape, Tensor<float>& dx) {
    auto& e = entry(x_shape);
    dy.expect_shape(e.y_shape, "ConvEngine::backward_data grad_output");
    dx.resize(x_shape);
    guarded(describe(g_, x_shape) + " (backward data)", [&] {
      e.bwd_data.execute(thread_stream(), {{DNNL_ARG_DIFF_DST, e.bd_dy.in(dy.data())},
                                           {DNNL_ARG_WEIGHTS, e.bd_w.in(w.data())},
                                           {DNNL_ARG_DIFF_SRC, e.bd_dx.out(dx.data())},
                                           {DNNL_ARG_SCRATCHPAD, e.scratch}});
      e.bd_dx.finish();
      thread_stream().wait();
    });
  }

  void backward_weights(const Tensor<float>& x, const Tensor<float>& dy, Tensor<float>& dw) {
    auto& e = entry(x.shape());
    dy.expect_shape(e.y_shape, "ConvEngine::backward_weights grad_output");
    dw.resize(g_.weight_shape());
    guarded(describe(g_, x.shape()) + " (backward weights)", [&] {
      e.bwd_weights.execute(thread_stream(), {{DNNL_ARG_SRC, e.bw_x.in(x.data())},
                                              {DNNL_ARG_DIFF_DST, e.bw_dy.in(dy.data())},
                                              {DNNL_ARG_DIFF_WEIGHTS, e.bw_dw.out(dw.data())},
                                              {DNNL_ARG_SCRATCHPAD, e.scratch}});
      e.bw_dw.finish();
      thread_stream().wait();
    });
  }

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

  Entry& entry(const Shape& xs) {
    const Shape ys = g_.output_shape(xs, "ConvEngine");
    const std::array<std::int64_t, 3> key{xs[0], xs[2], xs[3]};
    auto it = cache_.find(key);
    if (it != cache_.end()) return *it->second;
    auto e = std::make_unique<Entry>();
    guarded(describe(g_, xs) + " (creating primitives)", [&] { build(*e, xs, ys); });
    ++creations_;
    return *cache_.emplace(key, std::move(e)).first->second;
  }

  void build(Entry& e, const Shape& xs, const Shape& ys) {
    using namespace dnnl;
    e.y_shape = ys;
    auto any = [](const Shape& s) { return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, tag::any); };
    const auto x_md = nchw_desc(xs), y_md = nchw_desc(ys), w_md = weights_desc(g_, tag::oihw);
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    convolution_forward::primitive_desc fpd(
        convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct, any(xs),
                                  weights_desc(g_), any(ys), strides_of(g_), dilates_of(g_), padding_of(g_),
                                  padding_of(g_)),
        attr, cpu_engine());
    convolution_backward_data::primitive_desc dpd(
        convolution_backward_data::desc(algorithm::convolution_direct, any(xs), weights_desc(g_), any(ys),
                                        strides_of(g_), dilates_of(g_), padding_of(g_), padding_of(g_)),
        attr, cpu_engine(), fpd);
    convolution_backward_weights::primitive_desc wpd(
        convolution_backward_weights::desc(algorithm::convolution_direct, any(xs), weights_desc(g_), any(ys),
                                           strides_of(g_), dilates_of(g_), padding_of(g_), padding_of(g_)),
        attr, cpu_engine(), fpd);
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

  ConvGeometry g_;
  std::map<std::array<std::int64_t, 3>, std::unique_ptr<Entry>> cache_;
  std::int64_t creations_ = 0;
};

}  // namespace orepa::engine
