#pragma once
/// @file deployed_conv.hpp
/// DeployedConv<S, Act>: what a block becomes after deploy(): one folded kernel and bias
/// and nothing else. For float it is a oneDNN inference convolution with the bias and the
/// activation fused (ReLU as eltwise_relu, SiLU as eltwise_swish with alpha 1), whose
/// weights are reordered once into the layout the primitive prefers; primitives are
/// cached per input shape. Other scalars (and user activations) run the reference conv
/// with the activation applied after it.
///
/// Thread safety: forward() may be called from several threads at once. Each call takes
/// an execution context (reorder buffers + scratchpad) from a per-shape pool, so no
/// mutable buffer is shared between concurrent calls; after warm-up no call allocates
/// oneDNN memory or creates a primitive.

#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "orepa/core/activation.hpp"
#include "orepa/engine/onednn.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa {

/// A deployed (re-parameterised) convolution: y = act(conv(x, weight) + bias).
template <class S, class Act = Identity>
class DeployedConv {
 public:
  /// `weight` [O, I/g, k, k], `bias` [O].
  DeployedConv(const ConvGeometry& g, Tensor<S> weight, Tensor<S> bias, Act act = {})
      : g_(g), weight_(std::move(weight)), bias_(std::move(bias)), act_(act), state_(std::make_unique<State>()) {
    g_.validate("DeployedConv", false);
    weight_.expect_shape(g_.weight_shape(), "DeployedConv weight");
    bias_.expect_shape({g_.out_channels}, "DeployedConv bias");
  }
  DeployedConv(const DeployedConv& o) : DeployedConv(o.g_, o.weight_, o.bias_, o.act_) {}
  DeployedConv(DeployedConv&&) noexcept = default;
  DeployedConv& operator=(DeployedConv o) noexcept {
    std::swap(g_, o.g_); std::swap(weight_, o.weight_); std::swap(bias_, o.bias_);
    std::swap(act_, o.act_); std::swap(state_, o.state_);
    return *this;
  }

  const ConvGeometry& geometry() const { return g_; }
  const Tensor<S>& weight() const { return weight_; }
  const Tensor<S>& bias() const { return bias_; }
  const Act& activation() const { return act_; }

  /// y = act(conv(x) + bias) for x [N, I, H, W].
  Tensor<S> forward(const Tensor<S>& x) const {
    Tensor<S> y;
    forward(x, y);
    return y;
  }
  /// Same, writing into `y` (resized; its buffer is reused when large enough).
  void forward(const Tensor<S>& x, Tensor<S>& y) const {
    y.resize(g_.output_shape(x.shape(), "DeployedConv::forward"));
    forward(x.data(), x.shape(), y.data());
  }
  /// Raw-pointer form: x is NCHW of shape `x_shape`, y must hold the output shape.
  void forward(const S* x, const Shape& x_shape, S* y) const {
    const Shape ys = g_.output_shape(x_shape, "DeployedConv::forward");
    if constexpr (std::is_same_v<S, float>) {
      run_onednn(x, x_shape, y);
      if constexpr (Act::kind == ActivationKind::custom) apply_act(y, checked_numel(ys));
    } else {
      Tensor<S> xt(x_shape, std::vector<S>(x, x + checked_numel(x_shape)));
      auto out = reference::conv2d(xt, weight_, g_, bias_);
      std::copy(out.begin(), out.end(), y);
      apply_act(y, out.size());
    }
  }

  /// Number of oneDNN primitives created so far (one per distinct input shape).
  std::int64_t primitive_creations() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->creations;
  }

 private:
  void apply_act(S* y, std::int64_t n) const {
    if constexpr (Act::kind != ActivationKind::identity)
      for (std::int64_t j = 0; j < n; ++j) y[j] = act_(y[j]);
  }

  struct Context {  // per-call mutable state, never shared by two running calls
    engine::Port src, dst;
    dnnl::memory scratch;
  };
  struct Entry {
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::convolution_forward prim;
    dnnl::memory weights, bias;
    dnnl::memory::desc x_md, y_md;
    std::vector<std::unique_ptr<Context>> idle;
  };
  struct State {
    std::mutex mutex;
    std::map<std::array<std::int64_t, 3>, std::unique_ptr<Entry>> entries;
    std::int64_t creations = 0;
  };

  void run_onednn(const float* x, const Shape& xs, float* y) const {
    Entry* e;
    std::unique_ptr<Context> ctx;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      e = &entry(xs);
      if (!e->idle.empty()) {
        ctx = std::move(e->idle.back());
        e->idle.pop_back();
      }
    }
    if (!ctx) ctx = engine::guarded(engine::describe(g_, xs), [&] { return make_context(*e); });
    engine::guarded(engine::describe(g_, xs) + " (deployed forward)", [&] {
      auto& s = engine::thread_stream();
      e->prim.execute(s, {{DNNL_ARG_SRC, ctx->src.in(x)},
                          {DNNL_ARG_WEIGHTS, e->weights},
                          {DNNL_ARG_BIAS, e->bias},
                          {DNNL_ARG_DST, ctx->dst.out(y)},
                          {DNNL_ARG_SCRATCHPAD, ctx->scratch}});
      ctx->dst.finish();
      s.wait();
    });
    std::lock_guard<std::mutex> lock(state_->mutex);
    e->idle.push_back(std::move(ctx));
  }

  std::unique_ptr<Context> make_context(const Entry& e) const {
    auto c = std::make_unique<Context>();
    c->src = engine::Port(e.x_md, e.pd.src_desc());
    c->dst = engine::Port(e.y_md, e.pd.dst_desc());
    c->scratch = dnnl::memory(e.pd.scratchpad_desc(), engine::cpu_engine());
    return c;
  }

  Entry& entry(const Shape& xs) const {  // caller holds the mutex
    const std::array<std::int64_t, 3> key{xs[0], xs[2], xs[3]};
    auto it = state_->entries.find(key);
    if (it != state_->entries.end()) return *it->second;
    auto e = engine::guarded(engine::describe(g_, xs) + " (creating the deployed primitive)", [&] { return build(xs); });
    ++state_->creations;
    return *state_->entries.emplace(key, std::move(e)).first->second;
  }

  std::unique_ptr<Entry> build(const Shape& xs) const {
    using namespace dnnl;
    using engine::tag;
    const Shape ys = g_.output_shape(xs, "DeployedConv");
    auto any = [](const Shape& s) { return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, tag::any); };
    auto e = std::make_unique<Entry>();
    e->x_md = engine::nchw_desc(xs);
    e->y_md = engine::nchw_desc(ys);
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    post_ops ops;
    if constexpr (Act::kind == ActivationKind::relu) ops.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f);
    if constexpr (Act::kind == ActivationKind::silu) ops.append_eltwise(1.f, algorithm::eltwise_swish, 1.f, 0.f);
    attr.set_post_ops(ops);
    const memory::desc b_md({g_.out_channels}, memory::data_type::f32, tag::x);
    e->pd = convolution_forward::primitive_desc(
        convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, any(xs),
                                  engine::weights_desc(g_), b_md, any(ys), engine::strides_of(g_),
                                  engine::dilates_of(g_), engine::padding_of(g_), engine::padding_of(g_)),
        attr, engine::cpu_engine());
    e->prim = convolution_forward(e->pd);
    // Weights: reorder once from OIHW into the primitive's layout; bias is used in place.
    memory plain(engine::weights_desc(g_, tag::oihw), engine::cpu_engine(), const_cast<float*>(weight_.data()));
    e->weights = memory(e->pd.weights_desc(), engine::cpu_engine());
    reorder(plain, e->weights).execute(engine::thread_stream(), plain, e->weights);
    engine::thread_stream().wait();
    e->bias = memory(b_md, engine::cpu_engine(), const_cast<float*>(bias_.data()));
    return e;
  }

  ConvGeometry g_;
  Tensor<S> weight_, bias_;
  Act act_;
  std::unique_ptr<State> state_;
};

}  // namespace orepa
