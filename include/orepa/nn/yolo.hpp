#pragma once
/// @file yolo.hpp
/// The few YOLOv5 modules a small YOLO-style network needs, built from any block family
/// through a BlockMaker (blocks/yolo.hpp), so the SAME network trains with OREPA, DBB,
/// ConvBN, RepVGG or any block type:
///   - `Bottleneck<S>`: cv1 1x1 -> cv2 3x3, plus the input when shortcut and c1 == c2;
///   - `C3<S>`: cv3(cat(m(cv1(x)), cv2(x))) with m = n Bottlenecks (YOLOv5's CSP block);
///   - concat_channels / split_channels: torch.cat(dim = 1) and its adjoint.
///
///   C3<float> c3(64, 64, /*n=*/2, true, 0.5, /*seed=*/0, orepa_maker<float>());  // or dbb_maker, ...
///   Tensor<float> y = c3.forward_train(x);  c3.backward(dy);
///   DeployedC3<float> d = c3.deploy();             // every inner block one fused conv
///
/// Both are layers (blocks/block.hpp), so they go straight into a Sequential and its
/// InferenceChain. forward_train and backward return aliases of buffers the module (or
/// one of its blocks) reuses only when nobody holds them (see Tensor).
/// Deployed objects are snapshots of the weights and, like DeployedConv, safe to call
/// from several threads; training-form modules are not.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/module_tree.hpp"
#include "orepa/blocks/yolo.hpp"
#include "orepa/core/error_path.hpp"
#include "orepa/core/parallel.hpp"

namespace orepa {

namespace detail::yolo {

/// A distinct, reproducible seed for the `index`-th block of a module seeded `seed`
/// (splitmix64 finaliser: neighbouring module seeds give unrelated block seeds).
inline std::uint64_t child_seed(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// out = a + b element-wise in one pass, in a's memory format (same shape; `what` names the
/// sum in the error); b a tensor or view, converted to a's format when it has another.
/// `out` may be a's tensor (then written in place) but must not hold b.
template <class S>
void add_into(Tensor<S>& out, identity_t<ConstTensorView<S>> a, identity_t<ConstTensorView<S>> b_, const char* what) {
  a.expect_shape(b_.sizes(), what);
  Tensor<S> scratch;
  const ConstTensorView<S> b = in_format(b_, a.memory_format(), scratch);
  if (out.data() != a.data()) out.resize(a.sizes(), a.memory_format());  // every element written below
  S* o = out.data();
  const S* pa = a.data();
  const S* pb = b.data();
  parallel_ranges(a.numel(), [&](std::int64_t begin, std::int64_t end, int) {
    OREPA_SIMD
    for (std::int64_t j = begin; j < end; ++j) o[j] = pa[j] + pb[j];
  });
}

/// x += y element-wise (add_into with x as both the output and the first term).
template <class S>
void add_inplace(Tensor<S>& x, identity_t<ConstTensorView<S>> y, const char* what) {
  add_into(x, x, y, what);
}

/// Throws config_error unless v >= 1.
inline void require_positive(const char* who, const char* what, std::int64_t v) {
  if (v < 1) throw config_error(detail::cat(who, ": ", what, " must be >= 1, got ", v));
}

// YOLOv5's hidden channels int(c2 * e), checked before the cast: a product below 1, not
// finite or beyond any channel count is a config_error (the cast would be undefined).
inline std::int64_t hidden_channels(const char* who, std::int64_t c2, double e) {
  const double c = double(c2) * e;
  if (!(c >= 1) || !(c < 2147483648.0))
    throw config_error(detail::cat(who, ": hidden channels int(c2 * e) = int(", c2, " * ", e, ") must be in [1, 2^31)"));
  return std::int64_t(c);
}

}  // namespace detail::yolo

/// Channel concatenation (torch.cat(dim = 1)) of xs [N, C_i, H, W] into `out`
/// [N, sum C_i, H, W] (resized, buffer reused): channels-last when every input is, else
/// NCHW (inputs read in either). shape_error naming `who` unless N, H, W agree.
template <class S>
void concat_channels(const std::vector<ConstTensorView<S>>& xs, Tensor<S>& out,
                     const std::string& who = "concat_channels") {
  if (xs.empty()) throw config_error(who + ": nothing to concatenate");
  std::int64_t C = 0;
  bool nhwc = true;
  for (const auto& x : xs) {
    if (x.dim() != 4 || x.size(0) != xs[0].size(0) || x.size(2) != xs[0].size(2) || x.size(3) != xs[0].size(3))
      throw shape_error(detail::cat(who, ": inputs must be [N, C, H, W] agreeing in N, H, W; got ",
                                    shape_str(xs[0].sizes()), " and ", shape_str(x.sizes())));
    C += x.size(1);
    nhwc = nhwc && x.memory_format() == MemoryFormat::channels_last;
  }
  const std::int64_t N = xs[0].size(0), P = xs[0].size(2) * xs[0].size(3);
  out.resize({N, C, xs[0].size(2), xs[0].size(3)}, nhwc ? MemoryFormat::channels_last : MemoryFormat::contiguous);
  // The runs that stay together: a pixel's NHWC channels, or a sample's NCHW planes.
  const std::int64_t runs = nhwc ? N * P : N, stride = nhwc ? C : C * P;
  std::int64_t c0 = 0;
  for (const auto& x0 : xs) {
    Tensor<S> tmp;
    const ConstTensorView<S> x = nhwc ? x0 : contiguous(x0, tmp);
    const std::int64_t len = nhwc ? x.size(1) : x.size(1) * P, at = nhwc ? c0 : c0 * P;
    parallel_ranges(runs, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t r = b; r < e; ++r)
        orepa::detail::copy_run(x.data() + r * len, len, out.data() + r * stride + at);
    });
    c0 += x.size(1);
  }
}

/// concat_channels of two tensors: a [N, Ca, H, W] and b [N, Cb, H, W].
template <class S>
void concat_channels(detail::identity_t<ConstTensorView<S>> a, detail::identity_t<ConstTensorView<S>> b,
                     Tensor<S>& out) {
  concat_channels<S>({a, b}, out);
}

/// concat on codes, all in one quantization (shape_error otherwise).
inline Int8Codes concat_codes(const std::vector<const Int8Codes*>& xs, const std::string& who = "Concat") {
  std::int64_t C = 0;
  for (const auto* x : xs) {
    if (x->shape.size() != 4 || x->shape[0] != xs[0]->shape[0] || x->shape[2] != xs[0]->shape[2] ||
        x->shape[3] != xs[0]->shape[3] || !(x->q == xs[0]->q))
      throw shape_error(detail::cat(who, ": codes must agree in N, H, W and quantization; got ",
                                    shape_str(xs[0]->shape), " and ", shape_str(x->shape)));
    C += x->shape[1];
  }
  const Shape& s = xs[0]->shape;
  Int8Codes y({s[0], C, s[2], s[3]}, xs[0]->q);
  const std::int64_t pixels = s[0] * s[2] * s[3], size = y.element_size();
  C *= size;  // in bytes from here on
  std::int64_t c0 = 0;
  for (const auto* x : xs) {
    const std::int64_t Ci = x->shape[1] * size;
    parallel_ranges(pixels, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t p = b; p < e; ++p)
        detail::copy_run(x->bytes.get() + p * Ci, Ci, y.bytes.get() + p * C + c0);
    });
    c0 += Ci;
  }
  return y;
}

/// concat_channels for codes in one quantization: a [N, Ca, H, W] and b [N, Cb, H, W]
/// into [N, Ca + Cb, H, W]. Throws shape_error unless N, H, W and the quantizations agree.
inline Int8Codes concat_codes(const Int8Codes& a, const Int8Codes& b) {
  if (a.shape.size() != 4 || b.shape.size() != 4 || a.shape[0] != b.shape[0] || a.shape[2] != b.shape[2] ||
      a.shape[3] != b.shape[3] || a.q != b.q)
    throw shape_error(detail::cat("concat_codes: expected [N, Ca, H, W] and [N, Cb, H, W] codes with equal N, H, W "
                                  "and quantization, got ", shape_str(a.shape), " and ", shape_str(b.shape)));
  return concat_codes({&a, &b}, "concat_codes");
}

/// The adjoint of concat_channels: splits g [N, sum C_i, H, W] into parts[i] [N, C_i, H, W]
/// of channels[i] channels each (resized, buffers reused), in g's memory format. Throws
/// shape_error unless every C_i >= 1 and they sum to g's channels.
template <class S>
void split_channels(detail::identity_t<ConstTensorView<S>> g, const std::vector<std::int64_t>& channels,
                    std::vector<Tensor<S>>& parts) {
  std::int64_t C = 0;
  bool positive = true;
  for (auto c : channels) C += c, positive = positive && c >= 1;
  if (g.dim() != 4 || !positive || C != g.size(1))
    throw shape_error(detail::cat("split_channels: expected [N, C, H, W] with C the sum of ", channels.size(),
                                  " positive channel counts, got ", shape_str(g.sizes())));
  const bool nhwc = g.memory_format() == MemoryFormat::channels_last;
  const std::int64_t N = g.size(0), P = g.size(2) * g.size(3);
  const std::int64_t runs = nhwc ? N * P : N, stride = nhwc ? C : C * P;
  parts.resize(channels.size());
  std::int64_t c0 = 0;
  for (std::size_t i = 0; i < channels.size(); ++i) {
    parts[i].resize({N, channels[i], g.size(2), g.size(3)}, g.memory_format());
    const std::int64_t len = nhwc ? channels[i] : channels[i] * P, at = nhwc ? c0 : c0 * P;
    S* dst = parts[i].data();
    parallel_ranges(runs, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t r = b; r < e; ++r) orepa::detail::copy_run(g.data() + r * stride + at, len, dst + r * len);
    });
    c0 += channels[i];
  }
}

/// The deployed Bottleneck: two deployed convolutions and the optional residual add.
template <class S>
class DeployedBottleneck {
 public:
  /// cv1 and cv2 deployed; `add`: whether the input is added to cv2's output.
  DeployedBottleneck(AnyDeployed<S> cv1, AnyDeployed<S> cv2, bool add)
      : cv1_(std::move(cv1)), cv2_(std::move(cv2)), add_(add) {}
  /// cv2(cv1(x)) (+ x).
  Tensor<S> forward(ConstTensorView<S> x) const {
    Tensor<S> y = cv2_.forward(cv1_.forward(x));
    if (add_) detail::yolo::add_inplace(y, x, "DeployedBottleneck residual");
    return y;
  }
  /// Weights plus biases of both convolutions.
  std::int64_t num_parameters() const { return cv1_.num_parameters() + cv2_.num_parameters(); }
  /// The layout cv1 prefers for input shape `x_shape`.
  MemoryFormat preferred_format(const Shape& x_shape) const { return cv1_.preferred_format(x_shape); }
  /// cv1's int8_input() when cv2 takes codes too, else nullopt (see AnyDeployed).
  std::optional<QuantParams> int8_input() const { return cv2_.int8_input() ? cv1_.int8_input() : std::nullopt; }
  /// forward() inside an int8 (or bf16) chain: codes from cv1 to cv2; the shortcut is added
  /// by cv2's primitive when it writes codes (DeployedConv::forward_int8_adding), else in
  /// float to cv2's output, quantized once into `*out` if given.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const {
    const auto mid = cv2_.int8_input();
    const StageOutput<S> t = cv1_.forward_int8(x, mid ? &*mid : nullptr);
    if (!add_) return cv2_.forward_int8(as_input(t), out);
    const auto* codes = std::get_if<const Int8Codes*>(&x);
    if (const auto* conv = cv2_.template target<DeployedConv<S>>(); conv && codes && out)
      return conv->forward_int8_adding(as_input(t), **codes, *out);  // the primitive adds the shortcut
    Tensor<S> y = std::get<Tensor<S>>(cv2_.forward_int8(as_input(t), nullptr));
    if (!codes) detail::yolo::add_inplace(y, std::get<ConstTensorView<S>>(x), "DeployedBottleneck residual");
    if constexpr (std::is_same_v<S, float>) {
      if (codes) {
        if (y.memory_format() != MemoryFormat::channels_last) y = y.to(MemoryFormat::channels_last);
        y.expect_shape((*codes)->shape, "DeployedBottleneck residual");
        parallel_ranges(y.numel(), [&](std::int64_t b, std::int64_t e, int) {
          orepa::detail::dequantize_range<true>(**codes, b, e, y.data());
        });
      }
      if (out) return quantize_codes(y, *out);
    }
    return y;
  }
  /// Visits cv1 and cv2 as `prefix` + "cv1." / "cv2." (the Bottleneck's tensor names).
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    cv1_.visit_convs(prefix + "cv1.", f);
    cv2_.visit_convs(prefix + "cv2.", f);
  }
  /// The Bottleneck with cv1 and cv2 mapped by `f`.
  DeployedBottleneck map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    return DeployedBottleneck(cv1_.map_convs(prefix + "cv1.", f), cv2_.map_convs(prefix + "cv2.", f), add_);
  }

 private:
  AnyDeployed<S> cv1_, cv2_;
  bool add_;
};

/// YOLOv5's Bottleneck: y = cv2(cv1(x)) (+ x when `shortcut` and c1 == c2), cv1 a
/// c1 -> c_ 1x1 block and cv2 a c_ -> c2 3x3 block, c_ = int(c2 * e), both from `maker`.
template <class S>
class Bottleneck : public ModuleTensors<Bottleneck<S>, S> {
 public:
  /// Throws config_error unless c1, c2 >= 1 and c_ = int(c2 * e) >= 1. Block seeds are
  /// derived from `seed`.
  Bottleneck(std::int64_t c1, std::int64_t c2, bool shortcut = true, double e = 0.5, std::uint64_t seed = 0,
             const BlockMaker<S>& maker = orepa_maker<S>())
      : Bottleneck(c1, c2, hidden(c1, c2, e), shortcut, seed, maker) {}

  Bottleneck(const Bottleneck&) = delete;  // never copied silently: std::move it, or clone() for a copy
  Bottleneck& operator=(const Bottleneck&) = delete;
  /// Move constructor.
  Bottleneck(Bottleneck&&) noexcept = default;
  /// Move assignment.
  Bottleneck& operator=(Bottleneck&&) noexcept = default;
  /// A deep copy (both blocks cloned), nothing saved for backward.
  Bottleneck clone() const { return Bottleneck(cv1_.clone(), cv2_.clone(), add_); }

  /// "Bottleneck".
  std::string type_name() const { return "Bottleneck"; }
  /// True when the input is added to cv2's output (shortcut and c1 == c2).
  bool has_residual() const { return add_; }
  /// The 1x1 block.
  AnyBlock<S>& cv1() { return cv1_; }
  /// The 3x3 block.
  AnyBlock<S>& cv2() { return cv2_; }

  /// "c1, c2, residual=true|false" (printing, blocks/module_tree.hpp).
  std::string extra_repr() const {
    return detail::cat(cv1_.geometry().in_channels, ", ", cv2_.geometry().out_channels,
                       ", residual=", add_ ? "true" : "false");
  }
  /// Calls `v` on cv1 and cv2.
  void visit_children(ModuleVisitor<S>& v) {
    v("cv1", cv1_);
    v("cv2", cv2_);
  }

  /// Training forward; an alias of the module's (or cv2's) output buffer.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    Tensor<S> y;
    int at = 0;
    try {
      Tensor<S> t = cv1_.forward_train(x);
      at = 1;
      y = cv2_.forward_train(t);
    } catch (...) {
      rethrow_in(at);
    }
    if (!add_) return y;
    detail::yolo::add_into(out_, y, x, "Bottleneck residual");
    return out_.alias();
  }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    Tensor<S> y;
    int at = 0;
    try {
      Tensor<S> t = cv1_.forward_eval(x);
      at = 1;
      y = cv2_.forward_eval(t);
    } catch (...) {
      rethrow_in(at);
    }
    if (add_) detail::yolo::add_inplace(y, x, "Bottleneck residual");
    return y;
  }
  /// Backward of the last forward_train: dL/dx through both blocks, plus grad_out itself
  /// through the residual.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    Tensor<S> g;
    int at = 1;
    try {
      Tensor<S> t = cv2_.backward(grad_out);
      at = 0;
      g = cv1_.backward(t);
    } catch (...) {
      rethrow_in(at);
    }
    if (!add_) return g;
    detail::yolo::add_into(dx_, g, grad_out, "Bottleneck::backward residual");
    return dx_.alias();
  }
  /// cv1's tensors under `prefix` + "cv1.", then cv2's (YOLOv5's module path).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    cv1_.collect_tensors(out, prefix + "cv1.");
    cv2_.collect_tensors(out, prefix + "cv2.");
  }
  /// Both blocks deployed (a snapshot of the current weights).
  DeployedBottleneck<S> deploy() const { return DeployedBottleneck<S>(cv1_.deploy(), cv2_.deploy(), add_); }

 private:
  // Rethrows the exception from cv1 (at 0) or cv2 (at 1) with its path.
  [[noreturn]] void rethrow_in(int at) const {
    detail::rethrow_in_child("Bottleneck", at == 0 ? "cv1" : "cv2", (at == 0 ? cv1_ : cv2_).type_name());
  }
  static std::int64_t hidden(std::int64_t c1, std::int64_t c2, double e) {
    detail::yolo::require_positive("Bottleneck", "c1", c1);
    detail::yolo::require_positive("Bottleneck", "c2", c2);
    return detail::yolo::hidden_channels("Bottleneck", c2, e);
  }
  Bottleneck(std::int64_t c1, std::int64_t c2, std::int64_t c, bool shortcut, std::uint64_t seed,
             const BlockMaker<S>& maker)
      : cv1_(maker(ConvOptions(c1, c, 1).seed(detail::yolo::child_seed(seed, 0)).name("cv1."))),
        cv2_(maker(ConvOptions(c, c2, 3).seed(detail::yolo::child_seed(seed, 1)).name("cv2."))),
        add_(shortcut && c1 == c2) {}
  Bottleneck(AnyBlock<S> cv1, AnyBlock<S> cv2, bool add) : cv1_(std::move(cv1)), cv2_(std::move(cv2)), add_(add) {}

  AnyBlock<S> cv1_, cv2_;
  bool add_;
  Tensor<S> out_, dx_;  // residual sum and its input gradient (reused)
};

/// The deployed C3: the deployed blocks and the concatenation.
template <class S>
class DeployedC3 {
 public:
  /// The three deployed 1x1 blocks and the deployed Bottlenecks, in order.
  DeployedC3(AnyDeployed<S> cv1, AnyDeployed<S> cv2, AnyDeployed<S> cv3, std::vector<DeployedBottleneck<S>> m)
      : cv1_(std::move(cv1)), cv2_(std::move(cv2)), cv3_(std::move(cv3)), m_(std::move(m)) {}
  /// cv3(cat(m(cv1(x)), cv2(x))).
  Tensor<S> forward(ConstTensorView<S> x) const {
    Tensor<S> a = cv1_.forward(x);
    for (const auto& b : m_) a = b.forward(a);
    Tensor<S> cat;
    concat_channels(a, cv2_.forward(x), cat);
    return cv3_.forward(cat);
  }
  /// Weights plus biases of every convolution.
  std::int64_t num_parameters() const {
    std::int64_t n = cv1_.num_parameters() + cv2_.num_parameters() + cv3_.num_parameters();
    for (const auto& b : m_) n += b.num_parameters();
    return n;
  }
  /// The layout cv1 prefers for input shape `x_shape`.
  MemoryFormat preferred_format(const Shape& x_shape) const { return cv1_.preferred_format(x_shape); }
  /// The quantization cv1 and cv2 both take codes in, when cv3 takes codes too (an int8
  /// C3), else nullopt (see AnyDeployed).
  std::optional<QuantParams> int8_input() const {
    const auto a = cv1_.int8_input(), b = cv2_.int8_input();
    if (!a || !b || !cv3_.int8_input() || *a != *b) return std::nullopt;
    return a;
  }
  /// forward() inside an int8 chain: codes through the bottleneck path, both halves of the
  /// concatenation written in cv3's input quantization and joined as codes.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const {
    const auto cat_q = cv3_.int8_input();
    if (!int8_input()) return forward_int8_through_float<S>(x, out, [&](ConstTensorView<S> v) { return forward(v); });
    if constexpr (std::is_same_v<S, float>) {
      auto wanted = [&](std::size_t j) { return j < m_.size() ? m_[j].int8_input() : cat_q; };
      auto q = wanted(0);
      StageOutput<S> a = cv1_.forward_int8(x, q ? &*q : nullptr);
      for (std::size_t j = 0; j < m_.size(); ++j) {
        q = wanted(j + 1);
        a = m_[j].forward_int8(as_input(a), q ? &*q : nullptr);
      }
      const StageOutput<S> b = cv2_.forward_int8(x, &*cat_q);
      const Int8Codes cat = concat_codes(std::get<Int8Codes>(a), std::get<Int8Codes>(b));
      return cv3_.forward_int8(&cat, out);
    } else {
      return forward(std::get<ConstTensorView<S>>(x));  // unreachable: codes are float-only
    }
  }
  /// Visits cv1, m.i.cv1, m.i.cv2, cv2, cv3 under `prefix` (the C3's tensor names).
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    cv1_.visit_convs(prefix + "cv1.", f);
    for (std::size_t i = 0; i < m_.size(); ++i) m_[i].visit_convs(prefix + "m." + std::to_string(i) + ".", f);
    cv2_.visit_convs(prefix + "cv2.", f);
    cv3_.visit_convs(prefix + "cv3.", f);
  }
  /// The C3 with every convolution mapped by `f`.
  DeployedC3 map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    std::vector<DeployedBottleneck<S>> m;
    for (std::size_t i = 0; i < m_.size(); ++i) m.push_back(m_[i].map_convs(prefix + "m." + std::to_string(i) + ".", f));
    return DeployedC3(cv1_.map_convs(prefix + "cv1.", f), cv2_.map_convs(prefix + "cv2.", f),
                      cv3_.map_convs(prefix + "cv3.", f), std::move(m));
  }

 private:
  AnyDeployed<S> cv1_, cv2_, cv3_;
  std::vector<DeployedBottleneck<S>> m_;
};

/// YOLOv5's C3 (CSP bottleneck with 3 convolutions):
///   y = cv3(cat(m(cv1(x)), cv2(x))),  c_ = int(c2 * e),
/// cv1, cv2: c1 -> c_ 1x1; m: n Bottleneck(c_, c_, shortcut, e = 1); cv3: 2 c_ -> c2 1x1.
/// Every block comes from `maker` (with orepa_maker the Bottlenecks' 3x3 convs are OREPA
/// blocks and the 1x1 convs OREPA_1x1 blocks).
template <class S>
class C3 : public ModuleTensors<C3<S>, S> {
 public:
  /// Throws config_error unless c1, c2, n >= 1 and int(c2 * e) >= 1. Block seeds are
  /// derived from `seed`.
  C3(std::int64_t c1, std::int64_t c2, std::int64_t n = 1, bool shortcut = true, double e = 0.5,
     std::uint64_t seed = 0, const BlockMaker<S>& maker = orepa_maker<S>())
      : C3(c1, c2, hidden(c1, c2, n, e), n, shortcut, seed, maker) {}

  C3(const C3&) = delete;  // never copied silently: std::move it, or clone() for a copy
  C3& operator=(const C3&) = delete;
  /// Move constructor.
  C3(C3&&) noexcept = default;
  /// Move assignment.
  C3& operator=(C3&&) noexcept = default;
  /// A deep copy (every block cloned), nothing saved for backward.
  C3 clone() const {
    std::vector<Bottleneck<S>> m;
    for (const auto& b : m_) m.push_back(b.clone());
    return C3(c_, cv1_.clone(), cv2_.clone(), cv3_.clone(), std::move(m));
  }

  /// "C3".
  std::string type_name() const { return "C3"; }
  /// The input-side 1x1 block of the bottleneck path.
  AnyBlock<S>& cv1() { return cv1_; }
  /// The input-side 1x1 block of the plain path.
  AnyBlock<S>& cv2() { return cv2_; }
  /// The output 1x1 block over the concatenation.
  AnyBlock<S>& cv3() { return cv3_; }
  /// The Bottlenecks of the cv1 path, in order.
  std::vector<Bottleneck<S>>& m() { return m_; }

  /// "c1, c2, n=<Bottlenecks>, hidden=c_" (printing, blocks/module_tree.hpp).
  std::string extra_repr() const {
    return detail::cat(cv1_.geometry().in_channels, ", ", cv3_.geometry().out_channels, ", n=", m_.size(), ", hidden=", c_);
  }
  /// Calls `v` on cv1, cv2, cv3 and the Bottlenecks "m.0", "m.1", ... (state-dict order).
  void visit_children(ModuleVisitor<S>& v) {
    v("cv1", cv1_);
    v("cv2", cv2_);
    v("cv3", cv3_);
    for (std::size_t i = 0; i < m_.size(); ++i) v("m." + std::to_string(i), m_[i]);
  }

  /// Training forward; an alias of cv3's output buffer.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    std::size_t at = 0;
    try {
      Tensor<S> a = cv1_.forward_train(x);
      for (std::size_t j = 0; j < m_.size(); ++j) at = 3 + j, a = m_[j].forward_train(a);
      at = 1;
      const Tensor<S> b = cv2_.forward_train(x);
      at = own;
      concat_channels(a, b, cat_);
      at = 2;
      return cv3_.forward_train(cat_);
    } catch (...) {
      rethrow_in(at);
    }
  }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    std::size_t at = 0;
    try {
      Tensor<S> a = cv1_.forward_eval(x);
      for (std::size_t j = 0; j < m_.size(); ++j) at = 3 + j, a = m_[j].forward_eval(a);
      at = 1;
      const Tensor<S> b = cv2_.forward_eval(x);
      at = own;
      Tensor<S> cat;
      concat_channels(a, b, cat);
      at = 2;
      return cv3_.forward_eval(cat);
    } catch (...) {
      rethrow_in(at);
    }
  }
  /// Backward of the last forward_train: splits cv3's input gradient between the two
  /// paths and sums the two input gradients.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    std::size_t at = 2;
    try {
      const Tensor<S> dcat = cv3_.backward(grad_out);
      at = own;
      split_channels<S>(dcat, {c_, c_}, dcat_parts_);
      Tensor<S> g = dcat_parts_[0].alias();
      for (std::size_t j = m_.size(); j-- > 0;) at = 3 + j, g = m_[j].backward(g);
      at = 0;
      const Tensor<S> da = cv1_.backward(g);
      at = 1;
      const Tensor<S> db = cv2_.backward(dcat_parts_[1]);
      at = own;
      detail::yolo::add_into(dx_, da, db, "C3::backward");
      return dx_.alias();
    } catch (...) {
      rethrow_in(at);
    }
  }
  /// cv1, cv2, cv3, then every Bottleneck's tensors (YOLOv5's registration order and
  /// module paths: prefix + "cv1.", ..., "m.0.cv1.", ...).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    cv1_.collect_tensors(out, prefix + "cv1.");
    cv2_.collect_tensors(out, prefix + "cv2.");
    cv3_.collect_tensors(out, prefix + "cv3.");
    for (std::size_t i = 0; i < m_.size(); ++i) m_[i].collect_tensors(out, prefix + "m." + std::to_string(i) + ".");
  }
  /// Every block deployed (a snapshot of the current weights).
  DeployedC3<S> deploy() const {
    std::vector<DeployedBottleneck<S>> m;
    for (const auto& b : m_) m.push_back(b.deploy());
    return DeployedC3<S>(cv1_.deploy(), cv2_.deploy(), cv3_.deploy(), std::move(m));
  }

 private:
  static constexpr std::size_t own = std::size_t(-1);  // the C3's own step, not a child's
  // Rethrows the exception from child `at` (0-2: cv1-cv3, 3 + j: m.j; `own`: as it is)
  // with the child's path.
  [[noreturn]] void rethrow_in(std::size_t at) const {
    if (at == own) throw;
    if (at >= 3) detail::rethrow_in_child("C3", "m." + std::to_string(at - 3), "Bottleneck");
    const AnyBlock<S>& b = at == 0 ? cv1_ : at == 1 ? cv2_ : cv3_;
    detail::rethrow_in_child("C3", "cv" + std::to_string(at + 1), b.type_name());
  }
  static std::int64_t hidden(std::int64_t c1, std::int64_t c2, std::int64_t n, double e) {
    detail::yolo::require_positive("C3", "c1", c1);
    detail::yolo::require_positive("C3", "c2", c2);
    detail::yolo::require_positive("C3", "n", n);
    return detail::yolo::hidden_channels("C3", c2, e);
  }
  C3(std::int64_t c1, std::int64_t c2, std::int64_t c, std::int64_t n, bool shortcut, std::uint64_t seed,
     const BlockMaker<S>& maker)
      : c_(c),
        cv1_(maker(ConvOptions(c1, c, 1).seed(detail::yolo::child_seed(seed, 0)).name("cv1."))),
        cv2_(maker(ConvOptions(c1, c, 1).seed(detail::yolo::child_seed(seed, 1)).name("cv2."))),
        cv3_(maker(ConvOptions(2 * c, c2, 1).seed(detail::yolo::child_seed(seed, 2)).name("cv3."))) {
    for (std::int64_t i = 0; i < n; ++i) {
      const std::string path = "m." + std::to_string(i) + ".";
      const BlockMaker<S> inner = [&maker, path](const ConvOptions& o) { return maker(ConvOptions(o).name(path + o.name())); };
      m_.emplace_back(c, c, shortcut, 1.0, detail::yolo::child_seed(seed, 3 + std::uint64_t(i)), inner);
    }
  }
  C3(std::int64_t c, AnyBlock<S> cv1, AnyBlock<S> cv2, AnyBlock<S> cv3, std::vector<Bottleneck<S>> m)
      : c_(c), cv1_(std::move(cv1)), cv2_(std::move(cv2)), cv3_(std::move(cv3)), m_(std::move(m)) {}

  std::int64_t c_;
  AnyBlock<S> cv1_, cv2_, cv3_;
  std::vector<Bottleneck<S>> m_;
  Tensor<S> cat_, dx_;                 // concatenation, the summed input gradient (reused)
  std::vector<Tensor<S>> dcat_parts_;  // the concatenation's gradient split between the paths
};

}  // namespace orepa
