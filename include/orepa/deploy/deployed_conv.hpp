#pragma once
/// @file deployed_conv.hpp
/// `DeployedConv<S>`: what a block becomes after deploy(): one folded kernel and bias, an
/// activation, and nothing else. For float it is a oneDNN inference convolution with the
/// bias and the activation fused (ReLU as eltwise_relu, SiLU as eltwise_swish with alpha
/// 1), whose weights are reordered once into the layout the primitive prefers; primitives
/// are cached per input shape. Other scalars (and user activations) run the reference
/// conv with the activation applied after it.
///
/// It takes tensors or views of the caller's buffers, NCHW or channels-last (NHWC): the
/// activations are reordered into the layout the primitive prefers and back only where
/// it prefers another one (on AVX-512 it prefers NHWC, so channels-last tensors run the
/// bare primitive), or the primitive runs on the caller's layout directly, whichever the
/// layout policy picks for the shape (see DeployLayout).
/// deploy/onednn_interop.hpp adds calls on dnnl::memory already in the primitive's layout
/// (no reorder at all); DeployedChain uses them to keep activations blocked between
/// consecutive convolutions and reorders only at the chain's ends.
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

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
struct DeployedConvInterop;  // deploy/onednn_interop.hpp
}
/// \endcond

/// A deployed (re-parameterised) convolution: y = act(conv(x, weight) + bias).
template <class S>
class DeployedConv {
 public:
  /// `weight` [O, I/g, k, k], `bias` [O], activation `act` (e.g. `SiLU{}`).
  DeployedConv(const ConvGeometry& g, Tensor<S> weight, Tensor<S> bias, AnyActivation<S> act = {})
      : g_(g), weight_(std::move(weight)), bias_(std::move(bias)), act_(std::move(act)),
        state_(std::make_unique<State>()) {
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
    std::swap(g_, o.g_);
    std::swap(weight_, o.weight_);
    std::swap(bias_, o.bias_);
    std::swap(act_, o.act_);
    std::swap(layout_, o.layout_);
    std::swap(state_, o.state_);
    return *this;
  }

  /// The convolution geometry.
  const ConvGeometry& geometry() const { return g_; }
  /// The fused kernel [O, I/g, k, k].
  const Tensor<S>& weight() const { return weight_; }
  /// The fused bias [O].
  const Tensor<S>& bias() const { return bias_; }
  /// The activation applied after the bias.
  const AnyActivation<S>& activation() const { return act_; }
  /// Weights plus biases.
  std::int64_t num_parameters() const { return weight_.numel() + bias_.numel(); }

  /// The activation layout policy of forward() (default automatic). Changing it drops the
  /// cached primitives (they are rebuilt on the next call).
  DeployedConv& layout(DeployLayout l) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (l != layout_) state_->entries.clear();
    layout_ = l;
    return *this;
  }
  /// The activation layout policy.
  DeployLayout layout() const { return layout_; }

  /// y = act(conv(x) + bias) for x [N, I, H, W]; y has x's memory format.
  Tensor<S> forward(ConstTensorView<S> x) const {
    Tensor<S> y;
    forward(x, y);
    return y;
  }
  /// Same, writing into `y` (resized, in x's memory format; its buffer is reused when
  /// large enough).
  void forward(ConstTensorView<S> x, Tensor<S>& y) const {
    y.resize(g_.output_shape(x.sizes(), "DeployedConv::forward"), x.memory_format());
    forward(x, TensorView<S>(y));
  }
  /// Same, writing into the caller's buffer `y` (any memory format), which must have the
  /// output shape.
  void forward(ConstTensorView<S> x, TensorView<S> y) const {
    const Shape ys = g_.output_shape(x.sizes(), "DeployedConv::forward");
    y.expect_shape(ys, "DeployedConv::forward output");
    if constexpr (std::is_same_v<S, float>) {
      Entry& e = entry(x.sizes(), x.memory_format(), false);
      run(e, {x.memory_format(), y.memory_format()}, nullptr, x.data(), nullptr, y.data());
      if (act_.kind() == ActivationKind::custom) act_.apply(y.data(), y.numel());
    } else {
      Tensor<S> xc, out;
      out.assign(reference::conv2d(contiguous(x, xc), weight_, g_, bias_), y.memory_format());
      std::copy(out.begin(), out.end(), y.begin());
      act_.apply(y.data(), y.numel());
    }
  }

  /// The plain memory format the primitive for input shape `x_shape` prefers for its
  /// input (channels_last where it runs on NHWC, as oneDNN does on AVX-512; contiguous
  /// otherwise, blocked layouts included): what a caller should pass to avoid reorders.
  MemoryFormat preferred_format(const Shape& x_shape) const {
    if constexpr (!std::is_same_v<S, float>) {
      return MemoryFormat::contiguous;
    } else {
      g_.output_shape(x_shape, "DeployedConv::preferred_format");
      const auto& e = entry(x_shape, MemoryFormat::contiguous, true);
      return e.pd.src_desc() == engine::plain_desc(x_shape, MemoryFormat::channels_last) ? MemoryFormat::channels_last
                                                                                        : MemoryFormat::contiguous;
    }
  }

  /// Number of oneDNN primitives created so far (one per distinct input shape and API).
  std::int64_t primitive_creations() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->creations;
  }

 private:
  friend struct detail::DeployedConvInterop;

  struct Context {  // per-call mutable state, never shared by two running calls
    engine::Port src, dst;
    dnnl::memory scratch;
    std::unordered_map<int, dnnl::memory> args;
  };
  using Formats = std::pair<MemoryFormat, MemoryFormat>;  // the caller's src and dst layouts
  struct Entry {
    dnnl::convolution_forward::primitive_desc pd;
    dnnl::convolution_forward prim;
    dnnl::memory weights, bias;
    Shape xs, ys;
    std::map<Formats, std::vector<std::unique_ptr<Context>>> idle;  // per pair of caller layouts
  };
  // N, H, W, and 0 when the primitive picks its layouts, 1 + format when it runs on the
  // caller's plain layout.
  using Key = std::array<std::int64_t, 4>;
  struct State {
    std::mutex mutex;
    std::map<Key, std::unique_ptr<Entry>> entries;
    std::int64_t creations = 0;
  };

  // Runs the primitive of `e`. A non-null `src_mem`/`dst_mem` is used directly; otherwise
  // the raw pointer goes through the context's NCHW port. The argument map is built once
  // per context; a call only swaps the src/dst entries (no allocation, no string work
  // unless oneDNN throws).
  void run(Entry& e, Formats f, const dnnl::memory* src_mem, const float* x, const dnnl::memory* dst_mem,
           float* y) const {
    std::unique_ptr<Context> ctx;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      auto& pool = e.idle[f];
      if (!pool.empty()) {
        ctx = std::move(pool.back());
        pool.pop_back();
      }
    }
    try {
      if (!ctx) ctx = make_context(e, f);
      auto& s = engine::thread_stream();
      ctx->args[DNNL_ARG_SRC] = src_mem ? *src_mem : ctx->src.in(x);
      ctx->args[DNNL_ARG_DST] = dst_mem ? *dst_mem : ctx->dst.out(y);
      e.prim.execute(s, ctx->args);
      if (!dst_mem) ctx->dst.finish();
      s.wait();
    } catch (const dnnl::error& err) {
      throw engine_error(detail::cat("oneDNN failed (status ", int(err.status), ": ", err.what(), ") in ",
                                     engine::describe(g_, e.xs), " (deployed forward)"));
    }
    std::lock_guard<std::mutex> lock(state_->mutex);
    e.idle[f].push_back(std::move(ctx));
  }

  std::unique_ptr<Context> make_context(const Entry& e, Formats f) const {
    auto c = std::make_unique<Context>();
    c->src = engine::Port(engine::plain_desc(e.xs, f.first), e.pd.src_desc());
    c->dst = engine::Port(engine::plain_desc(e.ys, f.second), e.pd.dst_desc());
    c->scratch = engine::allocate(e.pd.scratchpad_desc());
    c->args = {{DNNL_ARG_SRC, dnnl::memory()}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, e.bias},
               {DNNL_ARG_DST, dnnl::memory()}, {DNNL_ARG_SCRATCHPAD, c->scratch}};
    return c;
  }

  // The entry for input shape xs: the memory API always runs the primitive's preferred
  // layouts; the tensor API shares that entry unless the policy picks the caller's plain
  // layout `xf` (the key then holds it).
  // Automatic = blocked: measured on every YOLOv5s-like layer of the benchmarks (AVX2 and
  // AVX-512, batch 1 and 8), a primitive forced onto NCHW src/dst (oneDNN then falls back
  // to im2col + GEMM) is 1.1x-6x slower than the blocked one, more than the two activation
  // reorders cost; the small-channel stem's input is read as NCHW by the blocked
  // primitive itself (no reorder).
  Entry& entry(const Shape& xs, MemoryFormat xf, bool memory_api) const {
    const DeployLayout l = memory_api ? DeployLayout::blocked : layout_;
    const bool plain = l == DeployLayout::plain;
    std::lock_guard<std::mutex> lock(state_->mutex);
    const Key key{xs[0], xs[2], xs[3], plain ? 1 + std::int64_t(xf) : 0};
    auto it = state_->entries.find(key);
    if (it != state_->entries.end()) return *it->second;
    auto e = engine::guarded(engine::describe(g_, xs) + " (creating the deployed primitive)",
                             [&] { return build(xs, plain, xf); });
    ++state_->creations;
    return *state_->entries.emplace(key, std::move(e)).first->second;
  }

  std::unique_ptr<Entry> build(const Shape& xs, bool plain, MemoryFormat xf) const {
    using namespace dnnl;
    using engine::tag;
    const Shape ys = g_.output_shape(xs, "DeployedConv");
    auto act_md = [&](const Shape& s) {
      if (plain) return engine::plain_desc(s, xf);
      return memory::desc(memory::dims(s.begin(), s.end()), memory::data_type::f32, tag::any);
    };
    auto e = std::make_unique<Entry>();
    e->xs = xs;
    e->ys = ys;
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    post_ops ops;
    if (act_.kind() == ActivationKind::relu) ops.append_eltwise(1.f, algorithm::eltwise_relu, 0.f, 0.f);
    if (act_.kind() == ActivationKind::silu) ops.append_eltwise(1.f, algorithm::eltwise_swish, 1.f, 0.f);
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
  AnyActivation<S> act_;
  DeployLayout layout_ = DeployLayout::automatic;
  std::unique_ptr<State> state_;
};

}  // namespace orepa
