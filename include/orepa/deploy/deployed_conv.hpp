#pragma once
/// @file deployed_conv.hpp
/// DeployedConv<S, Act>: what a block becomes after deploy(): one folded kernel and bias
/// and nothing else. For float it is a oneDNN inference convolution with the bias and the
/// activation fused (ReLU as eltwise_relu, SiLU as eltwise_swish with alpha 1), whose
/// weights are reordered once into the layout the primitive prefers; primitives are
/// cached per input shape. Other scalars (and user activations) run the reference conv
/// with the activation applied after it.
///
/// Two ways to call it (float):
///  - on NCHW tensors (forward(x, y)): the activations are reordered into the layout the
///    primitive prefers and back, or the primitive runs on NCHW directly, whichever the
///    layout policy picks for the shape (see DeployLayout);
///  - on dnnl::memory already in the primitive's layout (src_desc() / dst_desc(), e.g.
///    nChw8c on AVX2): no reorder at all. DeployedChain uses this to keep activations
///    blocked between consecutive convolutions and reorders only at the chain's ends.
///
/// Thread safety: forward() may be called from several threads at once. Each call takes
/// an execution context (reorder buffers + scratchpad) from a per-shape pool, so no
/// mutable buffer is shared between concurrent calls; after warm-up no call allocates
/// oneDNN memory or creates a primitive (engine::memory_allocations() and
/// primitive_creations() stay constant).

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "orepa/core/activation.hpp"
#include "orepa/engine/onednn.hpp"
#include "orepa/engine/reference_conv.hpp"

namespace orepa {

/// How a DeployedConv lays out the activations of its NCHW-tensor forward().
enum class DeployLayout {
  automatic,  ///< what measured fastest on the benchmark layers: currently always `blocked` (default)
  blocked,    ///< the primitive's preferred (blocked) layout, reorders at both ends
  plain,      ///< the primitive runs on NCHW src/dst directly (no activation reorder)
};

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
  /// Copies weights, bias, activation and layout; primitives are rebuilt lazily.
  DeployedConv(const DeployedConv& o) : DeployedConv(o.g_, o.weight_, o.bias_, o.act_) { layout_ = o.layout_; }
  /// Move constructor.
  DeployedConv(DeployedConv&&) noexcept = default;
  /// Copy-and-swap assignment.
  DeployedConv& operator=(DeployedConv o) noexcept {
    std::swap(g_, o.g_); std::swap(weight_, o.weight_); std::swap(bias_, o.bias_);
    std::swap(act_, o.act_); std::swap(layout_, o.layout_); std::swap(state_, o.state_);
    return *this;
  }

  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The fused kernel [O, I/g, k, k].
  const Tensor<S>& weight() const { return weight_; }
  /// The fused bias [O].
  const Tensor<S>& bias() const { return bias_; }
  /// The activation applied after the bias.
  const Act& activation() const { return act_; }

  /// The activation layout policy of the NCHW-tensor forward (default automatic).
  /// Changing it drops the cached primitives (they are rebuilt on the next call).
  DeployedConv& layout(DeployLayout l) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (l != layout_) state_->entries.clear();
    layout_ = l;
    return *this;
  }
  /// The activation layout policy.
  DeployLayout layout() const { return layout_; }

  /// y = act(conv(x) + bias) for x [N, I, H, W].
  Tensor<S> forward(const Tensor<S>& x) const {
    Tensor<S> y;
    forward(x, y);
    return y;
  }
  /// Same, writing into `y` (resized; its buffer is reused when large enough).
  void forward(const Tensor<S>& x, Tensor<S>& y) const {
    y.resize(g_.output_shape(x.sizes(), "DeployedConv::forward"));
    forward(x.data(), x.sizes(), y.data());
  }
  /// Raw-pointer form: x is NCHW of shape `x_shape`, y must hold the output shape.
  void forward(const S* x, const Shape& x_shape, S* y) const {
    const Shape ys = g_.output_shape(x_shape, "DeployedConv::forward");
    if constexpr (std::is_same_v<S, float>) {
      Entry& e = entry(x_shape, false);
      run(e, nullptr, x, nullptr, y);
      if constexpr (Act::kind == ActivationKind::custom) apply_act(y, checked_numel(ys));
    } else {
      Tensor<S> xt(x_shape, std::vector<S>(x, x + checked_numel(x_shape)));
      auto out = reference::conv2d(xt, weight_, g_, bias_);
      std::copy(out.begin(), out.end(), y);
      apply_act(y, out.numel());
    }
  }

  /// The layout the primitive prefers for its input when called with input shape
  /// `x_shape` (float only). Memory in this layout is used by forward(src, dst) as is.
  dnnl::memory::desc src_desc(const Shape& x_shape) const {
    static_assert(std::is_same_v<S, float>, "the dnnl::memory API of DeployedConv is float only");
    g_.output_shape(x_shape, "DeployedConv::src_desc");
    return entry(x_shape, true).pd.src_desc();
  }
  /// The layout the primitive writes its output in for input shape `x_shape` (float only).
  dnnl::memory::desc dst_desc(const Shape& x_shape) const {
    static_assert(std::is_same_v<S, float>, "the dnnl::memory API of DeployedConv is float only");
    g_.output_shape(x_shape, "DeployedConv::dst_desc");
    return entry(x_shape, true).pd.dst_desc();
  }

  /// y = act(conv(x) + bias) on oneDNN memory (float only). `src` must be in
  /// src_desc(shape) or plain NCHW; `dst` in dst_desc(shape) or plain NCHW, of the
  /// output shape. Layouts that match the primitive's are used without any copy, NCHW
  /// ones through cached reorders. Throws shape_error for any other descriptor.
  void forward(const dnnl::memory& src, const dnnl::memory& dst) const {
    static_assert(std::is_same_v<S, float>, "the dnnl::memory API of DeployedConv is float only");
    const auto sd = src.get_desc(), dd = dst.get_desc();
    const Shape xs = engine::shape_of(sd);
    const Shape ys = g_.output_shape(xs, "DeployedConv::forward(memory)");
    if (engine::shape_of(dd) != ys)
      throw shape_error(detail::cat("DeployedConv::forward(memory): dst must have shape ", shape_str(ys), ", got ",
                                    shape_str(engine::shape_of(dd))));
    Entry& e = entry(xs, true);
    const bool src_direct = sd == e.pd.src_desc(), dst_direct = dd == e.pd.dst_desc();
    if ((!src_direct && sd != e.x_md) || (!dst_direct && dd != e.y_md))
      throw shape_error(detail::cat("DeployedConv::forward(memory): src and dst must be in the primitive's layout "
                                    "(src_desc()/dst_desc()) or plain NCHW, for ", engine::describe(g_, xs)));
    auto* sp = static_cast<float*>(src.get_data_handle());
    auto* dp = static_cast<float*>(dst.get_data_handle());
    run(e, src_direct ? &src : nullptr, sp, dst_direct ? &dst : nullptr, dp);
    if constexpr (Act::kind == ActivationKind::custom)
      apply_act(dp, std::int64_t(dd.get_size() / sizeof(float)));  // element-wise: any layout works
  }

  /// Number of oneDNN primitives created so far (one per distinct input shape and API).
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
    std::unordered_map<int, dnnl::memory> args;
  };
  struct Entry {
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::convolution_forward prim;
    dnnl::memory weights, bias;
    dnnl::memory::desc x_md, y_md;  // plain NCHW descriptors of the shape
    std::vector<std::unique_ptr<Context>> idle;
  };
  using Key = std::array<std::int64_t, 4>;  // N, H, W, 1 if the primitive runs on plain NCHW
  struct State {
    std::mutex mutex;
    std::map<Key, std::unique_ptr<Entry>> entries;
    std::int64_t creations = 0;
  };

  // Runs the primitive of `e`. A non-null `src_mem`/`dst_mem` is used directly; otherwise
  // the raw pointer goes through the context's NCHW port. The argument map is built once
  // per context; a call only swaps the src/dst entries (no allocation, no string work
  // unless oneDNN throws).
  void run(Entry& e, const dnnl::memory* src_mem, const float* x, const dnnl::memory* dst_mem, float* y) const {
    std::unique_ptr<Context> ctx;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      if (!e.idle.empty()) {
        ctx = std::move(e.idle.back());
        e.idle.pop_back();
      }
    }
    try {
      if (!ctx) ctx = make_context(e);
      auto& s = engine::thread_stream();
      ctx->args[DNNL_ARG_SRC] = src_mem ? *src_mem : ctx->src.in(x);
      ctx->args[DNNL_ARG_DST] = dst_mem ? *dst_mem : ctx->dst.out(y);
      e.prim.execute(s, ctx->args);
      if (!dst_mem) ctx->dst.finish();
      s.wait();
    } catch (const dnnl::error& err) {
      throw engine_error(detail::cat("oneDNN failed (status ", int(err.status), ": ", err.what(), ") in ",
                                     engine::describe(g_, engine::shape_of(e.x_md)), " (deployed forward)"));
    }
    std::lock_guard<std::mutex> lock(state_->mutex);
    e.idle.push_back(std::move(ctx));
  }

  std::unique_ptr<Context> make_context(const Entry& e) const {
    auto c = std::make_unique<Context>();
    c->src = engine::Port(e.x_md, e.pd.src_desc());
    c->dst = engine::Port(e.y_md, e.pd.dst_desc());
    c->scratch = engine::allocate(e.pd.scratchpad_desc());
    c->args = {{DNNL_ARG_SRC, dnnl::memory()},   {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, e.bias},
               {DNNL_ARG_DST, dnnl::memory()},   {DNNL_ARG_SCRATCHPAD, c->scratch}};
    return c;
  }

  // The entry for input shape xs: the memory API always runs the primitive's preferred
  // layouts; the NCHW API shares that entry unless the policy picks plain NCHW.
  Entry& entry(const Shape& xs, bool memory_api) const {
    const DeployLayout l = memory_api ? DeployLayout::blocked : layout_;
    const bool plain = plain_io(xs, l);
    std::lock_guard<std::mutex> lock(state_->mutex);
    const Key key{xs[0], xs[2], xs[3], plain ? 1 : 0};
    auto it = state_->entries.find(key);
    if (it != state_->entries.end()) return *it->second;
    auto e = engine::guarded(engine::describe(g_, xs) + " (creating the deployed primitive)",
                             [&] { return build(xs, plain); });
    ++state_->creations;
    return *state_->entries.emplace(key, std::move(e)).first->second;
  }

  // Automatic policy = blocked. Measured on every YOLOv5s-like layer of the benchmarks
  // (AVX2 and AVX-512, batch 1 and 8), a primitive forced onto NCHW src/dst (oneDNN then
  // falls back to im2col + GEMM) is 1.1x-6x slower than the blocked one, which is more
  // than the two activation reorders cost; the small-channel stem's input is read as
  // NCHW by the blocked primitive itself (no reorder). So reorders happen only where the
  // primitive's layout differs from NCHW, and the plain policy stays available.
  static bool plain_io(const Shape&, DeployLayout l) { return l == DeployLayout::plain; }

  std::unique_ptr<Entry> build(const Shape& xs, bool plain) const {
    using namespace dnnl;
    using engine::tag;
    const Shape ys = g_.output_shape(xs, "DeployedConv");
    auto act_md = [&](const Shape& s) {
      return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, plain ? tag::nchw : tag::any);
    };
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
        convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, act_md(xs),
                                  engine::weights_desc(g_), b_md, act_md(ys), engine::strides_of(g_),
                                  engine::dilates_of(g_), engine::padding_of(g_), engine::padding_of(g_)),
        attr, engine::cpu_engine());
    e->prim = convolution_forward(e->pd);
    // Weights: reorder once from OIHW into the primitive's layout; bias is used in place.
    memory plain_w(engine::weights_desc(g_, tag::oihw), engine::cpu_engine(), const_cast<float*>(weight_.data()));
    e->weights = engine::allocate(e->pd.weights_desc());
    reorder(plain_w, e->weights).execute(engine::thread_stream(), plain_w, e->weights);
    engine::thread_stream().wait();
    e->bias = memory(b_md, engine::cpu_engine(), const_cast<float*>(bias_.data()));
    return e;
  }

  ConvGeometry g_;
  Tensor<S> weight_, bias_;
  Act act_;
  DeployLayout layout_ = DeployLayout::automatic;
  std::unique_ptr<State> state_;
};

/// Consecutive deployed float convolutions that keep their activations in the layout the
/// primitives prefer (blocked, e.g. nChw8c) from one to the next: the NCHW input is
/// reordered once on the way in (or read directly, when the first primitive takes NCHW,
/// as small-channel stems do), the output once on the way out. Intermediate buffers are
/// created per input shape on first use and reused.
///
/// Thread safety: forward() may be called from several threads at once (each call takes
/// its own set of intermediate buffers from a per-shape pool).
template <class Act = Identity>
class DeployedChain {
 public:
  /// The convolutions in order; each one's output channels must be the next one's input.
  explicit DeployedChain(std::vector<DeployedConv<float, Act>> convs)
      : convs_(std::move(convs)), state_(std::make_unique<State>()) {
    if (convs_.empty()) throw config_error("DeployedChain: needs at least one convolution");
    for (std::size_t i = 1; i < convs_.size(); ++i)
      if (convs_[i].geometry().in_channels != convs_[i - 1].geometry().out_channels)
        throw config_error(detail::cat("DeployedChain: conv ", i, " takes ", convs_[i].geometry().in_channels,
                                       " channels but conv ", i - 1, " gives ", convs_[i - 1].geometry().out_channels));
  }

  /// The convolutions.
  const std::vector<DeployedConv<float, Act>>& convs() const { return convs_; }

  /// Output shape for input shape `x_shape`.
  Shape output_shape(const Shape& x_shape) const {
    Shape s = x_shape;
    for (const auto& c : convs_) s = c.geometry().output_shape(s, "DeployedChain");
    return s;
  }

  /// y = convs[L-1](... convs[0](x)) for an NCHW x; y is NCHW (resized).
  void forward(const Tensor<float>& x, Tensor<float>& y) const {
    y.resize(output_shape(x.sizes()));
    auto ws = take(x.sizes());
    ws->in.set_data_handle(const_cast<float*>(x.data()));
    ws->out.set_data_handle(y.data());
    const std::size_t L = convs_.size();
    for (std::size_t i = 0; i < L; ++i) {
      const dnnl::memory& src = i == 0 ? ws->in : ws->mids[i - 1];
      const dnnl::memory& dst = i + 1 == L ? ws->out : ws->mids[i];
      convs_[i].forward(src, dst);
    }
    give(x.sizes(), std::move(ws));
  }
  /// y = convs[L-1](... convs[0](x)) for an NCHW x [N, I, H, W]; returns y.
  Tensor<float> forward(const Tensor<float>& x) const {
    Tensor<float> y;
    forward(x, y);
    return y;
  }

  /// Primitives created by all the convolutions so far.
  std::int64_t primitive_creations() const {
    std::int64_t n = 0;
    for (const auto& c : convs_) n += c.primitive_creations();
    return n;
  }

 private:
  struct Workspace {
    dnnl::memory in, out;             // NCHW wrappers of the caller's buffers
    std::vector<dnnl::memory> mids;   // conv i's output in conv i's dst layout
  };
  struct State {
    std::mutex mutex;
    std::map<Shape, std::vector<std::unique_ptr<Workspace>>> idle;
  };

  std::unique_ptr<Workspace> take(const Shape& xs) const {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      auto& pool = state_->idle[xs];
      if (!pool.empty()) {
        auto ws = std::move(pool.back());
        pool.pop_back();
        return ws;
      }
    }
    return engine::guarded("DeployedChain on input " + shape_str(xs), [&] {
      auto ws = std::make_unique<Workspace>();
      ws->in = dnnl::memory(engine::nchw_desc(xs), engine::cpu_engine(), DNNL_MEMORY_NONE);
      ws->out = dnnl::memory(engine::nchw_desc(output_shape(xs)), engine::cpu_engine(), DNNL_MEMORY_NONE);
      Shape s = xs;
      for (std::size_t i = 0; i + 1 < convs_.size(); ++i) {
        // Conv i writes in its own preferred layout; if conv i+1 prefers another one, it
        // must accept this one or NCHW: fall back to NCHW between them then.
        const auto d = convs_[i].dst_desc(s);
        s = convs_[i].geometry().output_shape(s, "DeployedChain");
        const auto next = convs_[i + 1].src_desc(s);
        ws->mids.push_back(engine::allocate(d == next ? d : engine::nchw_desc(s)));
      }
      return ws;
    });
  }
  void give(const Shape& xs, std::unique_ptr<Workspace> ws) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->idle[xs].push_back(std::move(ws));
  }

  std::vector<DeployedConv<float, Act>> convs_;
  std::unique_ptr<State> state_;
};

}  // namespace orepa
