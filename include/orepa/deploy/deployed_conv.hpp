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
///
/// Precision (deploy/precision.hpp): fp32 by default; bf16 or int8 (with the input range
/// from a calibration) through precision(). The caller's tensors stay float either way:
/// the input is converted (quantized) on its way into the primitive, whose output is float.
/// Where oneDNN has no kernel for the precision on this CPU, creating the primitive throws
/// engine_error naming the ISA; nothing falls back to fp32 silently. Inside chains an int8
/// convolution also reads and writes 8-bit codes (forward_int8 here, and the memory API of
/// deploy/onednn_interop.hpp): the activation stays fused, the output is quantized in the
/// next convolution's input quantization by the primitive itself. A bf16 convolution
/// likewise reads and writes bf16 values in forward_int8 (codes in QuantParams::bfloat16()),
/// so a graph of bf16 convolutions converts no activation between them.

#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "orepa/core/activation.hpp"
#include "orepa/deploy/any_deployed.hpp"
#include "orepa/deploy/precision.hpp"
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

/// Sees every float tensor-API forward of a DeployedConv on the thread that installed it
/// (ScopedConvObserver): how a Calibrator records each layer's input and the error report
/// compares each layer with its reduced-precision twin, through any module.
class ConvObserver {
 public:
  virtual ~ConvObserver() = default;
  /// Called after `conv` computed `y` from `x`.
  virtual void seen(const DeployedConv<float>& conv, ConstTensorView<float> x, ConstTensorView<float> y) = 0;
};
/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
inline ConvObserver*& thread_conv_observer() {
  thread_local ConvObserver* o = nullptr;
  return o;
}
// The oneDNN layout of Int8Codes of `shape` in `q`: u8 / s8 / bf16, NHWC.
inline dnnl::memory::desc codes_desc(const Shape& shape, const QuantParams& q) {
  using dt = dnnl::memory::data_type;
  return dnnl::memory::desc(dnnl::memory::dims(shape.begin(), shape.end()),
                            q.bf16 ? dt::bf16 : q.qmin < 0 ? dt::s8 : dt::u8, dnnl::memory::format_tag::nhwc);
}
}  // namespace detail
/// \endcond
/// Installs an observer on this thread for its lifetime (nests: the previous one returns).
class ScopedConvObserver {
 public:
  /// Installs `o` (nullptr: none, e.g. while an observer runs convolutions itself).
  explicit ScopedConvObserver(ConvObserver* o) : previous_(detail::thread_conv_observer()) {
    detail::thread_conv_observer() = o;
  }
  ~ScopedConvObserver() { detail::thread_conv_observer() = previous_; }
  ScopedConvObserver(const ScopedConvObserver&) = delete;
  ScopedConvObserver& operator=(const ScopedConvObserver&) = delete;

 private:
  ConvObserver* previous_;
};

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
  DeployedConv(const DeployedConv& o) : DeployedConv(o.g_, o.weight_, o.bias_, o.act_) {
    layout_ = o.layout_;
    precision_ = o.precision_;
    range_ = o.range_;
  }
  /// Move constructor.
  DeployedConv(DeployedConv&&) noexcept = default;
  /// Copy-and-swap assignment.
  DeployedConv& operator=(DeployedConv o) noexcept {
    std::swap(g_, o.g_);
    std::swap(weight_, o.weight_);
    std::swap(bias_, o.bias_);
    std::swap(act_, o.act_);
    std::swap(layout_, o.layout_);
    std::swap(precision_, o.precision_);
    std::swap(range_, o.range_);
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

  /// Runs in precision `p`; int8 quantizes the input over `input` (a calibrated range,
  /// see Calibrator). Only float convolutions run bf16 / int8 (config_error otherwise).
  /// For int8, value_error when the range is unusable (QuantParams::for_range) or when,
  /// with these weights and bias, oneDNN's output scales or the bias in accumulator units
  /// are no normal / finite float. Drops the cached primitives; the next forward creates
  /// them (engine_error when oneDNN has no kernel for `p` on this CPU).
  DeployedConv& precision(Precision p, ActivationRange input = {}) {
    if (p != Precision::fp32 && !std::is_same_v<S, float>)
      throw config_error(detail::cat("DeployedConv: ", precision_name(p), " deployment needs float, not this scalar"));
    if constexpr (std::is_same_v<S, float>)
      if (p == Precision::int8) requantization(QuantParams::for_range(input, !engine::cpu_has_vnni()), nullptr);
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->entries.clear();
    precision_ = p;
    range_ = input;
    return *this;
  }
  /// Applies `o`: its precision, and for int8 the calibrated range of layer `layer`
  /// (config_error naming the layer when the calibration lacks it; value_error naming the
  /// layer and its range when the range is unusable, see precision()).
  DeployedConv& apply(const DeployOptions& o, const std::string& layer) {
    const ActivationRange r = o.precision() == Precision::int8 ? o.calibration().at(layer) : ActivationRange{};
    try {
      return precision(o.precision(), r);
    } catch (const value_error& e) {
      throw value_error(detail::cat("int8 deployment of ", detail::layer_label(layer), " (calibrated input range [",
                                    r.lo, ", ", r.hi, "]): ", e.what()));
    }
  }
  /// The precision the convolution runs in.
  Precision precision() const { return precision_; }
  /// The input range int8 quantizes over (meaningless for other precisions).
  ActivationRange input_range() const { return range_; }
  /// The activation quantization int8 uses on this CPU (u8 with VNNI, s8 without).
  QuantParams input_quantization() const { return QuantParams::for_range(range_, !engine::cpu_has_vnni()); }
  /// The quantization forward_int8 takes codes in: input_quantization() for an int8
  /// convolution with a fusable activation, bf16 values (QuantParams::bfloat16()) for a
  /// bf16 one, nullopt otherwise (it then takes float).
  std::optional<QuantParams> int8_input() const {
    if (act_.kind() == ActivationKind::custom) return std::nullopt;
    if (precision_ == Precision::bf16) return QuantParams::bfloat16();
    if (precision_ != Precision::int8) return std::nullopt;
    return input_quantization();
  }
  /// A step of an int8 (or bf16) chain: y = act(conv(x) + bias) from float (any memory
  /// format) or from codes in int8_input(), to codes in `*out` (written by the primitive;
  /// bf16 values for a bf16 convolution) or, when `out` is null, to float channels-last.
  /// A convolution without int8_input() runs its float forward on the dequantized input.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const;
  /// forward_int8 plus a residual: codes in `out` of act(conv(x) + bias) + r, for codes r
  /// of the output's shape in any quantization (a Bottleneck's shortcut). The primitive
  /// adds r itself (a sum post-op on its destination, filled with r first) when it writes
  /// `out` in the codes' NHWC layout, r is of `out`'s kind (8-bit or bf16) and oneDNN has a
  /// JIT kernel for it (without native bf16, AVX-512 has none for a bf16 sum: its reference
  /// kernel ran 100x slower); otherwise the sum is taken in float. Either way the output is
  /// rounded once.
  StageOutput<S> forward_int8_adding(StageInput<S> x, const Int8Codes& r, const QuantParams& out) const;

  /// The kernel as the primitive holds it, in real units: rounded to bf16, or per output
  /// channel to s8 codes (7-bit ones without VNNI, where oneDNN halves s8 weights), or
  /// the kernel itself for fp32. Its error against weight() is the weights' share of the
  /// quantization error.
  Tensor<S> effective_weight() const;

  /// y = act(conv(x) + bias) for x [N, I, H, W]; y has x's memory format. NaN and Inf
  /// propagate: in fp32 and bf16 to the outputs whose receptive field holds one (as in
  /// PyTorch); in int8, whose codes cannot hold them, to every output of the image.
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
  void forward(ConstTensorView<S> x, TensorView<S> y) const;

  /// The plain memory format the primitive for input shape `x_shape` prefers for its
  /// input (channels_last where it runs on NHWC, as oneDNN does on AVX-512; contiguous
  /// otherwise, blocked layouts included): what a caller should pass to avoid reorders.
  MemoryFormat preferred_format(const Shape& x_shape) const;

  /// Calls f(prefix, *this): a deployed convolution is one layer named `prefix`.
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const { f(prefix, *this); }
  /// f(prefix, *this).
  AnyDeployed<S> map_convs(const std::string& prefix, const ConvMapper<S>& f) const { return f(prefix, *this); }

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
    Tensor<float> scaled_bias;          // int8: the bias in accumulator units
    dnnl::primitive_attr quantize_src;  // int8: the input's scale and zero point
    bool codes_out = false;             // writes codes (8-bit, or bf16 values), not float
    bool reference = false;             // oneDNN runs its reference kernel (no JIT one fits)
    Shape xs, ys;
    std::map<Formats, std::vector<std::unique_ptr<Context>>> idle;  // per pair of caller layouts
  };
  // N, H, W, and 0 when the primitive picks its layouts, 1 + format when it runs on the
  // caller's plain layout; then, for an output of 8-bit codes, their scale's bits and a
  // positive number made of their zero point and signedness (0 and 0 for float, 0 and -1
  // for bf16 values); then the same two for the codes a sum post-op adds (0 and 0: none).
  using Key = std::array<std::int64_t, 8>;
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
           float* y) const;

  // `m` in layout `d` (itself when it already is; a reorder into `to`, or a new buffer).
  static dnnl::memory relayout(const dnnl::memory& m, const dnnl::memory::desc& d, dnnl::memory to = {}) {
    if (m.get_desc() == d) return m;
    if (!to) to = engine::allocate(d);
    dnnl::memory from = m;
    dnnl::reorder(from, to).execute(engine::thread_stream(), from, to);
    engine::thread_stream().wait();
    return to;
  }

  std::unique_ptr<Context> make_context(const Entry& e, Formats f) const;

  // Codes `c` as the primitive of `e` reads them: wrapped, or relaid out where its layout
  // differs; `what` names them in an error.
  static dnnl::memory codes_input(const Entry& e, const Int8Codes& c, const char* what) {
    return engine::guarded(what, [&] {
      return relayout(dnnl::memory(detail::codes_desc(c.shape, c.q), engine::cpu_engine(), c.bytes.get()),
                      e.pd.src_desc());
    });
  }

  // The entry for input shape xs: the memory API always runs the primitive's preferred
  // layouts; the tensor API shares that entry unless the policy picks the caller's plain
  // layout `xf` (the key then holds it).
  // Automatic = blocked: measured on every YOLOv5s-like layer of the benchmarks (AVX2 and
  // AVX-512, batch 1 and 8), a primitive forced onto NCHW src/dst (oneDNN then falls back
  // to im2col + GEMM) is 1.1x-6x slower than the blocked one, more than the two activation
  // reorders cost; the small-channel stem's input is read as NCHW by the blocked
  // primitive itself (no reorder).
  // A non-null `codes_out` (memory API) asks for the primitive writing codes in it, and a
  // non-null `sum_in` (with codes_out) for it adding the destination's codes, in `sum_in`.
  Entry& entry(const Shape& xs, MemoryFormat xf, bool memory_api, const QuantParams* codes_out = nullptr,
               const QuantParams* sum_in = nullptr) const;

  // oneDNN 2.6 int8: y = oscale[o] * (sum (q_x - zp) q_w + bias) before the post-ops, so
  // oscale = sx * sw[o] and the bias is given in accumulator units. With an 8-bit output,
  // code = zp_y + act(real) / sy: oneDNN scales the post-op's result and adds the
  // destination zero point after the post-ops; without an activation the 1 / sy goes
  // into the output scales.
  struct Requantization {
    std::vector<float> output_scales, inverse_weight_scales;
    Tensor<float> scaled_bias;
  };
  // The requantization for input quantization `q` (and output codes in `*codes_out`);
  // value_error when a scale is not a normal float or a scaled bias not finite, which
  // only absurd ranges or weights give (min_scale keeps ordinary ones far from both).
  Requantization requantization(const QuantParams& q, const QuantParams* codes_out) const;

  std::unique_ptr<Entry> build(const Shape& xs, bool plain, MemoryFormat xf, const QuantParams* codes_out,
                               const QuantParams* sum_in) const;

  ConvGeometry g_;
  Tensor<S> weight_, bias_;
  AnyActivation<S> act_;
  DeployLayout layout_ = DeployLayout::automatic;
  Precision precision_ = Precision::fp32;
  ActivationRange range_;
  std::unique_ptr<State> state_;
};

// The heavy members are defined out of the class body: not implicitly inline, so a
// program linking orepa::precompiled (precompiled.hpp) does not instantiate them again.

template <class S>
StageOutput<S> DeployedConv<S>::forward_int8(StageInput<S> x, const QuantParams* out) const {
  const auto wanted = int8_input();
  if (!wanted) return forward_int8_through_float<S>(x, out, [&](ConstTensorView<S> v) { return forward(v); });
  if constexpr (!std::is_same_v<S, float>) {
    return forward(std::get<ConstTensorView<S>>(x));  // unreachable: only float convolutions run int8
  } else {
    if (out && out->bf16 != (precision_ == Precision::bf16))  // codes of another precision: through float
      return quantize_codes(std::get<Tensor<S>>(forward_int8(x, nullptr)), *out);
    const bool coded = std::holds_alternative<const Int8Codes*>(x);
    if (coded && std::get<const Int8Codes*>(x)->q != *wanted)  // another quantization's codes
      return forward_int8(dequantize_codes(*std::get<const Int8Codes*>(x)), out);
    if (!coded) {  // quantized in one pass that also finds the images holding a NaN / Inf
      std::vector<std::int64_t> bad;
      const ConstTensorView<float> v = std::get<ConstTensorView<float>>(x);
      const Int8Codes codes = detail::quantize_codes_finding_non_finite(v, *wanted, bad);
      StageOutput<S> y = forward_int8(&codes, out);
      if (auto* t = std::get_if<Tensor<float>>(&y)) detail::poison_images(*t, bad, v.size(0));
      return y;
    }
    const Int8Codes& c = *std::get<const Int8Codes*>(x);
    const Shape ys = g_.output_shape(c.shape, "DeployedConv::forward_int8");
    Entry& e = entry(c.shape, MemoryFormat::contiguous, true, out);
    const dnnl::memory src = codes_input(e, c, "DeployedConv::forward_int8 input");
    const Formats f{MemoryFormat::contiguous, MemoryFormat::channels_last};  // src comes as memory: f.first unused
    if (!out) {
      Tensor<float> y;
      y.resize(ys, MemoryFormat::channels_last);
      run(e, f, &src, nullptr, nullptr, y.data());
      return y;
    }
    Int8Codes y(ys, *out);
    engine::guarded("DeployedConv::forward_int8 output", [&] {
      const dnnl::memory codes(detail::codes_desc(ys, *out), engine::cpu_engine(), y.bytes.get());
      if (codes.get_desc() == e.pd.dst_desc()) return run(e, f, &src, nullptr, &codes, nullptr);
      const dnnl::memory own = engine::allocate(e.pd.dst_desc());
      run(e, f, &src, nullptr, &own, nullptr);
      relayout(own, codes.get_desc(), codes);
    });
    return y;
  }
}

template <class S>
StageOutput<S> DeployedConv<S>::forward_int8_adding(StageInput<S> x, const Int8Codes& r, const QuantParams& out) const {
  if constexpr (!std::is_same_v<S, float>) {
    return forward(std::get<ConstTensorView<S>>(x));  // unreachable: only float convolutions run int8
  } else {
    const auto wanted = int8_input();
    if (wanted && out.bf16 == (precision_ == Precision::bf16) && r.q.bf16 == out.bf16) {
      const auto* given = std::get_if<const Int8Codes*>(&x);
      const Int8Codes* c = given ? *given : nullptr;
      std::optional<Int8Codes> held;  // x as codes in wanted, where it is not
      if (!c) c = &held.emplace(quantize_codes(std::get<ConstTensorView<float>>(x), *wanted));
      else if (c->q != *wanted) c = &held.emplace(quantize_codes(dequantize_codes(*c), *wanted));
      const Shape ys = g_.output_shape(c->shape, "DeployedConv::forward_int8_adding");
      if (r.shape != ys)
        throw shape_error(detail::cat("DeployedConv::forward_int8_adding: the residual is ", shape_str(r.shape),
                                      " but the output ", shape_str(ys)));
      Entry& e = entry(c->shape, MemoryFormat::contiguous, true, &out, &r.q);
      const dnnl::memory::desc dst_desc = detail::codes_desc(ys, out);
      if (dst_desc == e.pd.dst_desc() && !e.reference) {
        const dnnl::memory src = codes_input(e, *c, "DeployedConv::forward_int8_adding input");
        Int8Codes y(ys, out);
        const dnnl::memory dst(dst_desc, engine::cpu_engine(), y.bytes.get());
        std::memcpy(y.bytes.get(), r.bytes.get(), std::size_t(r.numel() * r.element_size()));
        run(e, {MemoryFormat::contiguous, MemoryFormat::channels_last}, &src, nullptr, &dst, nullptr);
        return y;
      }
    }
    Tensor<float> y = std::get<Tensor<float>>(forward_int8(x, nullptr));
    if (y.memory_format() != MemoryFormat::channels_last) y = y.to(MemoryFormat::channels_last);
    y.expect_shape(r.shape, "DeployedConv::forward_int8_adding residual");
    parallel_ranges(y.numel(),
                    [&](std::int64_t b, std::int64_t e, int) { detail::dequantize_range<true>(r, b, e, y.data()); });
    return quantize_codes(y, out);
  }
}

template <class S>
Tensor<S> DeployedConv<S>::effective_weight() const {
  Tensor<S> w = weight_;
  if constexpr (std::is_same_v<S, float>) {
    if (precision_ == Precision::bf16)
      for (auto& v : w) v = round_to_bf16(v);
    if (precision_ == Precision::int8) {
      const auto sw = weight_scales(weight_);
      const float adjust = engine::cpu_has_vnni() ? 1.f : 0.5f;
      const std::int64_t per = w.numel() / w.size(0);
      for (std::int64_t j = 0; j < w.numel(); ++j) {  // as oneDNN's reorder rounds (the row maximum is a tie without VNNI)
        const float inv = adjust / sw[std::size_t(j / per)];
        w[j] = std::nearbyint(w[j] * inv) / inv;
      }
    }
  }
  return w;
}

template <class S>
void DeployedConv<S>::forward(ConstTensorView<S> x, TensorView<S> y) const {
  const Shape ys = g_.output_shape(x.sizes(), "DeployedConv::forward");
  y.expect_shape(ys, "DeployedConv::forward output");
  if constexpr (std::is_same_v<S, float>) {
    Entry& e = entry(x.sizes(), x.memory_format(), false);
    const auto bad = precision_ == Precision::int8 ? detail::non_finite_images(x) : std::vector<std::int64_t>();
    run(e, {x.memory_format(), y.memory_format()}, nullptr, x.data(), nullptr, y.data());
    if (act_.kind() == ActivationKind::custom) act_.apply(y.data(), y.numel());
    detail::poison_images(y, bad, ys[0]);
    if (auto* o = detail::thread_conv_observer()) o->seen(*this, x, y);
  } else {
    Tensor<S> xc, out;
    out.assign(reference::conv2d(contiguous(x, xc), weight_, g_, bias_), y.memory_format());
    std::copy(out.begin(), out.end(), y.begin());
    act_.apply(y.data(), y.numel());
  }
}

template <class S>
MemoryFormat DeployedConv<S>::preferred_format(const Shape& x_shape) const {
  if constexpr (!std::is_same_v<S, float>) {
    return MemoryFormat::contiguous;
  } else {
    g_.output_shape(x_shape, "DeployedConv::preferred_format");
    const auto& e = entry(x_shape, MemoryFormat::contiguous, true);
    const auto src = e.pd.src_desc();
    return src == engine::plain_desc(x_shape, MemoryFormat::channels_last, src.data_type())
               ? MemoryFormat::channels_last
               : MemoryFormat::contiguous;
  }
}

template <class S>
void DeployedConv<S>::run(Entry& e, Formats f, const dnnl::memory* src_mem, const float* x,
                          const dnnl::memory* dst_mem, float* y) const {
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

template <class S>
auto DeployedConv<S>::make_context(const Entry& e, Formats f) const -> std::unique_ptr<Context> {
  auto c = std::make_unique<Context>();
  c->src = engine::Port(engine::plain_desc(e.xs, f.first), e.pd.src_desc(),
                        precision_ == Precision::int8 ? &e.quantize_src : nullptr);
  if (!e.codes_out) c->dst = engine::Port(engine::plain_desc(e.ys, f.second), e.pd.dst_desc());
  c->scratch = engine::allocate(e.pd.scratchpad_desc());
  c->args = {{DNNL_ARG_SRC, dnnl::memory()}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, e.bias},
             {DNNL_ARG_DST, dnnl::memory()}, {DNNL_ARG_SCRATCHPAD, c->scratch}};
  return c;
}

template <class S>
auto DeployedConv<S>::entry(const Shape& xs, MemoryFormat xf, bool memory_api, const QuantParams* codes_out,
                            const QuantParams* sum_in) const -> Entry& {
  const DeployLayout l = memory_api || precision_ != Precision::fp32 ? DeployLayout::blocked : layout_;
  const bool plain = l == DeployLayout::plain;
  auto scale_bits = [](const QuantParams* q) {
    std::uint32_t bits = 0;
    if (q) std::memcpy(&bits, &q->scale, sizeof bits);
    return std::int64_t(bits);
  };
  auto kind = [](const QuantParams* q) -> std::int64_t {
    return !q ? 0 : q->bf16 ? -1 : 1 + 512 * std::int64_t(q->qmin < 0) + q->zero_point + 128;
  };
  std::lock_guard<std::mutex> lock(state_->mutex);
  const Key key{xs[0], xs[2], xs[3], plain ? 1 + std::int64_t(xf) : 0, scale_bits(codes_out), kind(codes_out),
                scale_bits(sum_in), kind(sum_in)};
  auto it = state_->entries.find(key);
  if (it != state_->entries.end()) return *it->second;
  auto e = engine::guarded(engine::describe(g_, xs) + " (creating the deployed primitive)",
                           [&] { return build(xs, plain, xf, codes_out, sum_in); });
  ++state_->creations;
  return *state_->entries.emplace(key, std::move(e)).first->second;
}

template <class S>
auto DeployedConv<S>::requantization(const QuantParams& q, const QuantParams* codes_out) const -> Requantization {
  const auto sw = weight_scales(weight_);
  Requantization r{std::vector<float>(sw.size()), std::vector<float>(sw.size()), Tensor<float>({g_.out_channels})};
  for (std::size_t o = 0; o < sw.size(); ++o) {
    const float out_scale = q.scale * sw[o], bias = float(bias_[std::int64_t(o)]) / out_scale;
    r.output_scales[o] = out_scale;
    r.inverse_weight_scales[o] = 1.f / sw[o];
    r.scaled_bias[std::int64_t(o)] = bias;
    if (codes_out && act_.kind() == ActivationKind::identity) r.output_scales[o] *= 1.f / codes_out->scale;
    if (!std::isnormal(r.output_scales[o]) || !std::isfinite(bias))
      throw value_error(detail::cat(
          "int8 output channel ", o, ": input step ", q.scale, " x weight step ", sw[o],
          codes_out ? detail::cat(" / output step ", codes_out->scale) : std::string(), " = ", r.output_scales[o],
          " and bias ", bias_[std::int64_t(o)], " / ", out_scale, " = ", bias,
          " must be a normal float and a finite one; the range or the weights are too extreme for int8"));
  }
  return r;
}

template <class S>
auto DeployedConv<S>::build(const Shape& xs, bool plain, MemoryFormat xf, const QuantParams* codes_out,
                            const QuantParams* sum_in) const -> std::unique_ptr<Entry> {
  using namespace dnnl;
  using engine::tag;
  using dt = memory::data_type;
  const Shape ys = g_.output_shape(xs, "DeployedConv");
  const dt src_type = precision_ == Precision::bf16   ? dt::bf16
                      : precision_ == Precision::int8 ? (engine::cpu_has_vnni() ? dt::u8 : dt::s8)
                                                      : dt::f32;
  const dt weight_type = precision_ == Precision::bf16 ? dt::bf16 : precision_ == Precision::int8 ? dt::s8 : dt::f32;
  auto act_md = [&](const Shape& s, dt type) {
    if (plain) return engine::plain_desc(s, xf);
    return memory::desc(memory::dims(s.begin(), s.end()), type, tag::any);
  };
  if (codes_out && (codes_out->bf16 ? precision_ != Precision::bf16 : precision_ != Precision::int8))
    throw config_error(detail::cat("DeployedConv: ", codes_out->bf16 ? "bf16" : "8-bit", " outputs need an ",
                                   codes_out->bf16 ? "bf16" : "int8", " convolution, this one runs in ",
                                   precision_name(precision_)));
  if (codes_out && act_.kind() == ActivationKind::custom)
    throw config_error("DeployedConv: a user activation cannot run on 8-bit or bf16 outputs");
  const dt dst_type = !codes_out ? dt::f32 : codes_out->bf16 ? dt::bf16 : codes_out->qmin < 0 ? dt::s8 : dt::u8;
  auto e = std::make_unique<Entry>();
  e->xs = xs;
  e->ys = ys;
  e->codes_out = codes_out != nullptr;
  float post_scale = 1.f;  // the activation's output scale: 1 / the output's step for codes
  primitive_attr attr, weight_attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  const float* bias = bias_.data();
  if (precision_ == Precision::int8) {
    const QuantParams q = input_quantization();
    Requantization r = requantization(q, codes_out);
    e->scaled_bias = std::move(r.scaled_bias);
    bias = e->scaled_bias.data();
    if (codes_out) {
      post_scale = 1.f / codes_out->scale;
      attr.set_zero_points(DNNL_ARG_DST, 0, {codes_out->zero_point});
    }
    attr.set_output_scales(1 << 1, r.output_scales);
    attr.set_zero_points(DNNL_ARG_SRC, 0, {q.zero_point});
    weight_attr.set_output_scales(g_.groups == 1 ? 1 << 0 : (1 << 0) | (1 << 1), r.inverse_weight_scales);
    e->quantize_src.set_output_scales(0, {1.f / q.scale});
    e->quantize_src.set_zero_points(DNNL_ARG_DST, 0, {q.zero_point});
  }
  post_ops ops;
  if (act_.kind() == ActivationKind::relu) ops.append_eltwise(post_scale, algorithm::eltwise_relu, 0.f, 0.f);
  if (act_.kind() == ActivationKind::silu) ops.append_eltwise(post_scale, algorithm::eltwise_swish, 1.f, 0.f);
  if (act_.kind() == ActivationKind::sigmoid) ops.append_eltwise(post_scale, algorithm::eltwise_logistic, 0.f, 0.f);
  if (sum_in && codes_out) {  // in the output's units: real r / output step, r's codes less their zero point
    if (sum_in->bf16) ops.append_sum(1.f);
    else
      ops.append_sum(sum_in->scale / codes_out->scale, sum_in->zero_point, sum_in->qmin < 0 ? dt::s8 : dt::u8);
  }
  attr.set_post_ops(ops);
  const memory::desc b_md({g_.out_channels}, dt::f32, tag::x);
  e->pd = convolution_forward::primitive_desc(
      convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, act_md(xs, src_type),
                                engine::weights_desc(g_, tag::any, weight_type), b_md, act_md(ys, dst_type),
                                engine::strides_of(g_), engine::dilates_of(g_), engine::padding_of(g_),
                                engine::padding_of(g_)),
      attr, engine::cpu_engine(), /*allow_empty=*/true);
  if (!e->pd)
    throw engine_error(detail::cat("DeployedConv: oneDNN ", DNNL_VERSION_MAJOR, ".", DNNL_VERSION_MINOR, " has no ",
                                   precision_name(precision_), " convolution for ", engine::describe(g_, xs),
                                   " on this CPU (oneDNN ISA ", engine::cpu_isa_name(), "; ",
                                   precision_ == Precision::bf16 ? "bf16 needs avx512_core, natively avx512_core_bf16"
                                                                 : "int8 needs avx2 or newer",
                                   ")"));
  e->prim = convolution_forward(e->pd);
  e->reference = std::string(e->pd.impl_info_str()).rfind("ref", 0) == 0;
  // Weights: reorder (and quantize) once from OIHW into the primitive's layout.
  memory plain_w(engine::weights_desc(g_, tag::oihw), engine::cpu_engine(), const_cast<float*>(weight_.data()));
  e->weights = engine::allocate(e->pd.weights_desc());
  reorder(reorder::primitive_desc(engine::cpu_engine(), plain_w.get_desc(), engine::cpu_engine(),
                                  e->pd.weights_desc(), weight_attr))
      .execute(engine::thread_stream(), plain_w, e->weights);
  engine::thread_stream().wait();
  e->bias = memory(b_md, engine::cpu_engine(), const_cast<float*>(bias));
  return e;
}

}  // namespace orepa
