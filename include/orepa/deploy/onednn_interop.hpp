#pragma once
/// @file onednn_interop.hpp
/// DeployedConv on oneDNN memory, for code that keeps activations in oneDNN's own layouts
/// (the main headers have no dnnl:: type in a public signature; this one is for those who
/// want them): the layouts a deployed convolution's primitive prefers, a forward on
/// dnnl::memory in those layouts (no reorder at all), and DeployedChain, which keeps
/// activations blocked between consecutive convolutions.

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "orepa/deploy/deployed_conv.hpp"

namespace orepa {

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
struct DeployedConvInterop {
  static dnnl::memory::desc src_desc(const DeployedConv<float>& c, const Shape& xs) {
    c.g_.output_shape(xs, "src_desc(DeployedConv)");
    return c.entry(xs, MemoryFormat::contiguous, true).pd.src_desc();
  }
  static dnnl::memory::desc dst_desc(const DeployedConv<float>& c, const Shape& xs, const QuantParams* codes) {
    c.g_.output_shape(xs, "dst_desc(DeployedConv)");
    return c.entry(xs, MemoryFormat::contiguous, true, codes).pd.dst_desc();
  }
  // The plain layout `d` describes, if it is one.
  static std::optional<MemoryFormat> plain_format(const dnnl::memory::desc& d, const Shape& s) {
    for (auto f : {MemoryFormat::contiguous, MemoryFormat::channels_last})
      if (d == engine::plain_desc(s, f)) return f;
    return std::nullopt;
  }
  static void forward(const DeployedConv<float>& c, const dnnl::memory& src, const dnnl::memory& dst,
                      const QuantParams* codes_q) {
    const auto sd = src.get_desc(), dd = dst.get_desc();
    const Shape xs = engine::shape_of(sd);
    const Shape ys = c.g_.output_shape(xs, "forward(DeployedConv, memory)");
    if (engine::shape_of(dd) != ys)
      throw shape_error(orepa::detail::cat("forward(DeployedConv, memory): dst must have shape ", shape_str(ys),
                                           ", got ", shape_str(engine::shape_of(dd))));
    const bool codes = codes_q != nullptr;
    if (codes != (dd.data_type() != dnnl::memory::data_type::f32))
      throw shape_error(orepa::detail::cat("forward(DeployedConv, memory): dst must hold ",
                                           codes ? "8-bit codes (a quantization is given)" : "float",
                                           ", for ", engine::describe(c.g_, xs)));
    auto& e = c.entry(xs, MemoryFormat::contiguous, true, codes_q);
    const bool src_direct = sd == e.pd.src_desc(), dst_direct = dd == e.pd.dst_desc();
    const auto sf = plain_format(sd, xs), df = codes ? std::nullopt : plain_format(dd, ys);
    if ((!src_direct && !sf) || (!dst_direct && !df))
      throw shape_error(orepa::detail::cat("forward(DeployedConv, memory): src and dst must be in the primitive's "
                                           "layout (src_desc()/dst_desc()) or plain float NCHW / NHWC, for ",
                                           engine::describe(c.g_, xs)));
    auto* sp = static_cast<float*>(src.get_data_handle());
    auto* dp = static_cast<float*>(dst.get_data_handle());
    const DeployedConv<float>::Formats f{sf.value_or(MemoryFormat::contiguous), df.value_or(MemoryFormat::contiguous)};
    c.run(e, f, src_direct ? &src : nullptr, sp, dst_direct ? &dst : nullptr, dp);
    if (c.act_.kind() == ActivationKind::custom)  // element-wise: any layout works (never on codes)
      c.act_.apply(dp, std::int64_t(dd.get_size() / sizeof(float)));
  }
};
}  // namespace detail
/// \endcond

/// The layout the primitive of `conv` prefers for its input when called with input shape
/// `x_shape`. Memory in this layout is used by forward(conv, src, dst) as is.
inline dnnl::memory::desc src_desc(const DeployedConv<float>& conv, const Shape& x_shape) {
  return detail::DeployedConvInterop::src_desc(conv, x_shape);
}
/// The layout the primitive of `conv` writes its output in for input shape `x_shape`.
inline dnnl::memory::desc dst_desc(const DeployedConv<float>& conv, const Shape& x_shape) {
  return detail::DeployedConvInterop::dst_desc(conv, x_shape, nullptr);
}
/// The layout an int8 `conv` writes 8-bit codes in `codes` in, for input shape `x_shape`.
inline dnnl::memory::desc dst_desc(const DeployedConv<float>& conv, const Shape& x_shape, const QuantParams& codes) {
  return detail::DeployedConvInterop::dst_desc(conv, x_shape, &codes);
}
/// y = act(conv(x) + bias) on oneDNN memory. `src` must be in src_desc(conv, shape) or
/// plain float NCHW / NHWC, `dst` in dst_desc(conv, shape) or plain float NCHW / NHWC, of
/// the output shape. Layouts that match the primitive's are used without any copy, plain
/// ones through cached reorders. Throws shape_error for any other descriptor.
/// Thread-safe like conv.forward.
inline void forward(const DeployedConv<float>& conv, const dnnl::memory& src, const dnnl::memory& dst) {
  detail::DeployedConvInterop::forward(conv, src, dst, nullptr);
}
/// The same for an int8 `conv` writing its output as 8-bit codes in `codes` (the fused
/// activation's result quantized by the primitive) into `dst`, in dst_desc(conv, shape,
/// codes). config_error for a convolution of another precision or a user activation.
inline void forward(const DeployedConv<float>& conv, const dnnl::memory& src, const dnnl::memory& dst,
                    const QuantParams& codes) {
  detail::DeployedConvInterop::forward(conv, src, dst, &codes);
}

/// Consecutive deployed float convolutions that keep their activations in the layout the
/// primitives prefer (blocked nChw8c on AVX2, NHWC on AVX-512) from one to the next: the
/// input (NCHW or NHWC) is reordered once on the way in (or read directly, when the first
/// primitive takes its layout), the output once on the way out. Intermediate buffers are
/// created per input shape and layout on first use and reused.
///
/// Between two int8 convolutions the activation stays 8-bit: the first writes codes in
/// the second's int8_input() (activation_codes()), so a chain of int8 convolutions
/// quantizes once at its input and returns float only from its last convolution.
///
/// Thread safety: forward() may be called from several threads at once (each call takes
/// its own set of intermediate buffers from a per-shape pool).
class DeployedChain {
 public:
  /// The convolutions in order; each one's output channels must be the next one's input.
  explicit DeployedChain(std::vector<DeployedConv<float>> convs)
      : convs_(std::move(convs)), state_(std::make_unique<State>()) {
    if (convs_.empty()) throw config_error("DeployedChain: needs at least one convolution");
    for (std::size_t i = 1; i < convs_.size(); ++i)
      if (convs_[i].geometry().in_channels != convs_[i - 1].geometry().out_channels)
        throw config_error(detail::cat("DeployedChain: conv ", i, " takes ", convs_[i].geometry().in_channels,
                                       " channels but conv ", i - 1, " gives ", convs_[i - 1].geometry().out_channels));
    codes_.resize(convs_.size() - 1);
    for (std::size_t i = 0; i + 1 < convs_.size(); ++i)  // bf16 convolutions pass float here
      if (convs_[i].precision() == Precision::int8 && convs_[i + 1].precision() == Precision::int8 &&
          convs_[i].int8_input())
        codes_[i] = convs_[i + 1].int8_input();
  }

  /// The quantization of the 8-bit codes conv i writes for conv i + 1, nullopt where
  /// they pass float (throws std::out_of_range for i >= convs().size() - 1).
  const std::optional<QuantParams>& activation_codes(std::size_t i) const { return codes_.at(i); }

  /// The convolutions.
  const std::vector<DeployedConv<float>>& convs() const { return convs_; }

  /// Output shape for input shape `x_shape`.
  Shape output_shape(const Shape& x_shape) const {
    Shape s = x_shape;
    std::size_t i = 0;
    try {
      for (; i < convs_.size(); ++i) s = convs_[i].geometry().output_shape(s, "DeployedConv");
    } catch (...) {
      detail::rethrow_in_child("DeployedChain", std::to_string(i), "DeployedConv");  // names the conv at fault
    }
    return s;
  }

  /// y = convs[L-1](... convs[0](x)) for x NCHW or channels-last; y (resized) has x's
  /// memory format. In a chain with an int8 convolution an image of x holding a NaN or
  /// Inf gets an all-NaN output (8-bit codes cannot carry them, see DeployedConv::forward).
  void forward(ConstTensorView<float> x, Tensor<float>& y) const {
    y.resize(output_shape(x.sizes()), x.memory_format());
    const bool int8 = std::any_of(convs_.begin(), convs_.end(),
                                  [](const DeployedConv<float>& c) { return c.precision() == Precision::int8; });
    const auto bad = int8 ? detail::non_finite_images(x) : std::vector<std::int64_t>();
    const Key key{x.sizes(), x.memory_format()};
    auto ws = take(key);
    ws->in.set_data_handle(const_cast<float*>(x.data()));
    ws->out.set_data_handle(y.data());
    const std::size_t L = convs_.size();
    for (std::size_t i = 0; i < L; ++i) {
      const dnnl::memory& src = i == 0 ? ws->in : ws->ins[i - 1];
      const dnnl::memory& dst = i + 1 == L ? ws->out : ws->outs[i];
      if (i + 1 < L && codes_[i]) orepa::forward(convs_[i], src, dst, *codes_[i]);
      else orepa::forward(convs_[i], src, dst);
      if (i + 1 < L && ws->moves[i]) {
        engine::guarded([i] { return "DeployedChain: reordering conv " + std::to_string(i) + "'s output"; }, [&] {
          ws->moves[i]->execute(engine::thread_stream(), ws->outs[i], ws->ins[i]);
          engine::thread_stream().wait();
        });
      }
    }
    give(key, std::move(ws));
    detail::poison_images(y, bad, x.size(0));
  }
  /// y = convs[L-1](... convs[0](x)) for x [N, I, H, W]; returns y (in x's memory format).
  Tensor<float> forward(ConstTensorView<float> x) const {
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
    dnnl::memory in, out;                         // wrappers of the caller's buffers (NCHW or NHWC)
    std::vector<dnnl::memory> outs, ins;          // conv i's output as it writes it, as conv i+1 reads it
    std::vector<std::optional<dnnl::reorder>> moves;  // outs[i] -> ins[i] where the layouts differ
  };
  using Key = std::pair<Shape, MemoryFormat>;  // input shape and the caller's layout
  struct State {
    std::mutex mutex;
    std::map<Key, std::vector<std::unique_ptr<Workspace>>> idle;
  };

  std::unique_ptr<Workspace> take(const Key& key) const {
    const Shape& xs = key.first;  // not a structured binding: clang 14 cannot capture one
    const MemoryFormat format = key.second;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      auto& pool = state_->idle[key];
      if (!pool.empty()) {
        auto ws = std::move(pool.back());
        pool.pop_back();
        return ws;
      }
    }
    return engine::guarded("DeployedChain on input " + shape_str(xs), [&] {
      auto ws = std::make_unique<Workspace>();
      ws->in = dnnl::memory(engine::plain_desc(xs, format), engine::cpu_engine(), DNNL_MEMORY_NONE);
      ws->out = dnnl::memory(engine::plain_desc(output_shape(xs), format), engine::cpu_engine(), DNNL_MEMORY_NONE);
      Shape s = xs;
      for (std::size_t i = 0; i + 1 < convs_.size(); ++i) {
        // Conv i writes in its own preferred layout. Where conv i+1 prefers another layout
        // of the same type, the chain reorders between them; a float output feeding a
        // reduced-precision conv goes through NCHW (conv i+1 converts it on its way in).
        const auto d = codes_[i] ? dst_desc(convs_[i], s, *codes_[i]) : dst_desc(convs_[i], s);
        s = convs_[i].geometry().output_shape(s, "DeployedChain");
        const auto next = src_desc(convs_[i + 1], s);
        if (d == next) {
          ws->outs.push_back(engine::allocate(d));
          ws->ins.push_back(ws->outs.back());
          ws->moves.emplace_back();
        } else if (d.data_type() == next.data_type()) {
          ws->outs.push_back(engine::allocate(d));
          ws->ins.push_back(engine::allocate(next));
          ws->moves.emplace_back(dnnl::reorder(ws->outs.back(), ws->ins.back()));
        } else {
          ws->outs.push_back(engine::allocate(engine::nchw_desc(s)));
          ws->ins.push_back(ws->outs.back());
          ws->moves.emplace_back();
        }
      }
      return ws;
    });
  }
  void give(const Key& key, std::unique_ptr<Workspace> ws) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->idle[key].push_back(std::move(ws));
  }

  std::vector<DeployedConv<float>> convs_;
  std::vector<std::optional<QuantParams>> codes_;  // between conv i and i + 1
  std::unique_ptr<State> state_;
};

}  // namespace orepa
