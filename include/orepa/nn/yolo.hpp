#pragma once
/// @file yolo.hpp
/// The few YOLOv5 modules a small YOLO-style network needs, built from any conv block
/// family so the SAME network can be trained with OREPA, DBB or plain ConvBN blocks:
///   - `ConvUnit<S>`: one conv block (OREPA_1x1 / OREPA / OREPA_LargeConv, DBB, ConvBN, ...)
///     behind one type, the `Conv(c1, c2, k, s)` of YOLOv5; deploys to a `DeployedUnit<S>`;
///   - conv block makers: callables (c1, c2, k, s, seed) -> `ConvUnit<S>`:
///     OrepaConvMaker (yolo_conv's choice), DbbConvMaker (DBB for k > 1, ConvBN for 1x1),
///     ConvBNMaker (ConvBN everywhere);
///   - `Bottleneck<S, Maker>`: cv1 1x1 -> cv2 3x3, plus the input when shortcut and c1 == c2;
///   - `C3<S, Maker>`: cv3(cat(m(cv1(x)), cv2(x))) with m = n Bottlenecks (YOLOv5's CSP block);
///   - concat_channels / split_channels: torch.cat(dim = 1) and its adjoint.
///
///   C3<float, OrepaConvMaker<float>> c3(64, 64, /*n=*/2);   // or DbbConvMaker, ConvBNMaker
///   const Tensor<float>& y = c3.forward_train(x);  c3.backward(dy);
///   DeployedC3<float> d = c3.deploy();             // every inner block one fused conv
///
/// Every module has the layer member set of nn/sequential.hpp (forward_train /
/// forward_eval / backward / parameters / zero_grad) and deploy(), so it goes straight
/// into a Sequential and its InferenceChain. forward_train and backward return
/// references to buffers the module (or one of its blocks) reuses, valid until its next
/// call of the same function. Deployed objects are snapshots of the weights and, like
/// DeployedConv, safe to call from several threads; training-form modules are not.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "orepa/blocks/conv_bn.hpp"
#include "orepa/blocks/dbb.hpp"
#include "orepa/blocks/yolo.hpp"
#include "orepa/core/error.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/tensor.hpp"

namespace orepa {

namespace detail::yolo {

/// The block behind a value or a unique_ptr (yolo_conv returns the latter).
template <class T>
T& deref(T& x) { return x; }
template <class T>
T& deref(std::unique_ptr<T>& p) { return *p; }
template <class T>
const T& deref(const T& x) { return x; }
template <class T>
const T& deref(const std::unique_ptr<T>& p) { return *p; }

/// A distinct, reproducible seed for the `index`-th block of a module seeded `seed`
/// (splitmix64 finaliser: neighbouring module seeds give unrelated block seeds).
inline std::uint64_t child_seed(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// x += y element-wise (same shape; `what` names the sum in the error).
template <class S>
void add_inplace(Tensor<S>& x, const Tensor<S>& y, const char* what) {
  x.expect_shape(y.sizes(), what);
  S* a = x.data();
  const S* b = y.data();
  for (std::int64_t j = 0, n = x.numel(); j < n; ++j) a[j] += b[j];
}

/// Throws config_error unless v >= 1.
inline void require_positive(const char* who, const char* what, std::int64_t v) {
  if (v < 1) throw config_error(detail::cat(who, ": ", what, " must be >= 1, got ", v));
}

}  // namespace detail::yolo

/// Channel concatenation (torch.cat(dim = 1)): a [N, Ca, H, W] and b [N, Cb, H, W] into
/// `out` [N, Ca + Cb, H, W] (resized, buffer reused). Throws shape_error unless N, H, W agree.
template <class S>
void concat_channels(const Tensor<S>& a, const Tensor<S>& b, Tensor<S>& out) {
  if (a.dim() != 4 || b.dim() != 4 || a.size(0) != b.size(0) || a.size(2) != b.size(2) || a.size(3) != b.size(3))
    throw shape_error(detail::cat("concat_channels: expected [N, Ca, H, W] and [N, Cb, H, W] with equal N, H, W, got ",
                                  shape_str(a.sizes()), " and ", shape_str(b.sizes())));
  const std::int64_t N = a.size(0), per_a = a.numel() / std::max<std::int64_t>(N, 1),
                     per_b = b.numel() / std::max<std::int64_t>(N, 1);
  out.resize({N, a.size(1) + b.size(1), a.size(2), a.size(3)});
  // Per sample, the channels of a then those of b are contiguous NCHW runs.
  for (std::int64_t n = 0; n < N; ++n) {
    S* dst = out.data() + n * (per_a + per_b);
    std::copy_n(a.data() + n * per_a, per_a, dst);
    std::copy_n(b.data() + n * per_b, per_b, dst + per_a);
  }
}

/// The adjoint of concat_channels: splits g [N, C, H, W] into its first `ca` channels
/// (`a`) and the other C - ca (`b`). Throws shape_error unless 0 < ca < C.
template <class S>
void split_channels(const Tensor<S>& g, std::int64_t ca, Tensor<S>& a, Tensor<S>& b) {
  if (g.dim() != 4 || ca < 1 || ca >= g.size(1))
    throw shape_error(detail::cat("split_channels: expected [N, C, H, W] with 0 < ", ca, " < C, got ",
                                  shape_str(g.sizes())));
  const std::int64_t N = g.size(0), P = g.size(2) * g.size(3), per_a = ca * P, per_b = (g.size(1) - ca) * P;
  a.resize({N, ca, g.size(2), g.size(3)});
  b.resize({N, g.size(1) - ca, g.size(2), g.size(3)});
  for (std::int64_t n = 0; n < N; ++n) {
    const S* src = g.data() + n * (per_a + per_b);
    std::copy_n(src, per_a, a.data() + n * per_a);
    std::copy_n(src + per_a, per_b, b.data() + n * per_b);
  }
}

/// The deployed form of a ConvUnit: one DeployedConv (folded kernel + bias, activation
/// fused) with its type erased. Copies share the same immutable convolution.
template <class S>
class DeployedUnit {
 public:
  /// Takes `deployed` over; D needs `Tensor<S> forward(const Tensor<S>&) const`,
  /// weight() and bias() (DeployedConv<S, Act>).
  template <class D>
  explicit DeployedUnit(D deployed) : impl_(std::make_shared<const Model<D>>(std::move(deployed))) {}

  /// y = act(conv(x, W) + b).
  Tensor<S> forward(const Tensor<S>& x) const { return impl_->forward(x); }
  /// Weights plus biases of the deployed convolution.
  std::int64_t num_parameters() const { return impl_->num_parameters(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual Tensor<S> forward(const Tensor<S>& x) const = 0;
    virtual std::int64_t num_parameters() const = 0;
  };
  template <class D>
  struct Model final : Concept {
    explicit Model(D x) : d(std::move(x)) {}
    Tensor<S> forward(const Tensor<S>& x) const override { return d.forward(x); }
    std::int64_t num_parameters() const override { return d.weight().numel() + d.bias().numel(); }
    D d;
  };
  std::shared_ptr<const Concept> impl_;
};

/// One conv block of any family behind one type: YOLOv5's `Conv(c1, c2, k, s)`. Holds
/// the block by value (or the unique_ptr yolo_conv returns) and forwards the layer
/// member set and deploy() to it. Move-only.
template <class S>
class ConvUnit {
 public:
  /// Takes `block` over: an OREPA-family block, DBB, ConvBN, RepVGGBlock_OREPA, ... (by
  /// value or as std::unique_ptr), anything with the block member set, geometry(),
  /// type_name() and deploy() returning a DeployedConv.
  template <class Block, class = std::enable_if_t<!std::is_same_v<std::decay_t<Block>, ConvUnit>>>
  explicit ConvUnit(Block block) : impl_(std::make_unique<Model<Block>>(std::move(block))) {}
  /// Move constructor (the block moves with it; ConvUnit is not copyable).
  ConvUnit(ConvUnit&&) noexcept = default;
  /// Move assignment; the previously held block is destroyed.
  ConvUnit& operator=(ConvUnit&&) noexcept = default;

  /// The block's convolution geometry.
  const ConvGeometry& geometry() const { return impl_->geometry(); }
  /// The block's class name ("OREPA", "OREPA_1x1", "DBB", "ConvBN", ...).
  const std::string& type_name() const { return impl_->type_name(); }

  /// Training forward of the block (batch statistics); the block's output buffer.
  const Tensor<S>& forward_train(const Tensor<S>& x) { return impl_->forward_train(x); }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(const Tensor<S>& x) const { return impl_->forward_eval(x); }
  /// Backward of the last forward_train; accumulates gradients, returns dL/dx (the block's buffer).
  const Tensor<S>& backward(const Tensor<S>& grad_out) { return impl_->backward(grad_out); }
  /// The block's tensors (state-dict names of the block).
  ParamList<S> parameters() { return impl_->parameters(); }
  /// Zeroes every gradient of the block.
  void zero_grad() { impl_->zero_grad(); }
  /// The block's deployed single convolution.
  DeployedUnit<S> deploy() const { return impl_->deploy(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual const ConvGeometry& geometry() const = 0;
    virtual const std::string& type_name() const = 0;
    virtual const Tensor<S>& forward_train(const Tensor<S>& x) = 0;
    virtual Tensor<S> forward_eval(const Tensor<S>& x) const = 0;
    virtual const Tensor<S>& backward(const Tensor<S>& g) = 0;
    virtual ParamList<S> parameters() = 0;
    virtual void zero_grad() = 0;
    virtual DeployedUnit<S> deploy() const = 0;
  };
  template <class B>
  struct Model final : Concept {
    explicit Model(B x) : b(std::move(x)) {}
    const ConvGeometry& geometry() const override { return detail::yolo::deref(b).geometry(); }
    const std::string& type_name() const override { return detail::yolo::deref(b).type_name(); }
    const Tensor<S>& forward_train(const Tensor<S>& x) override { return detail::yolo::deref(b).forward_train(x); }
    Tensor<S> forward_eval(const Tensor<S>& x) const override { return detail::yolo::deref(b).forward_eval(x); }
    const Tensor<S>& backward(const Tensor<S>& g) override { return detail::yolo::deref(b).backward(g); }
    ParamList<S> parameters() override { return detail::yolo::deref(b).parameters(); }
    void zero_grad() override { detail::yolo::deref(b).zero_grad(); }
    DeployedUnit<S> deploy() const override { return DeployedUnit<S>(detail::yolo::deref(b).deploy()); }
    B b;
  };
  std::unique_ptr<Concept> impl_;
};

/// Conv block maker of the OREPA family: yolo_conv's choice (OREPA_1x1 for k = 1, OREPA
/// for 3 and 5, OREPA_LargeConv for k >= 7), activation `Act` (SiLU, as YOLOv5).
template <class S = float, class Act = SiLU>
struct OrepaConvMaker {
  /// Family name for reports.
  static constexpr const char* name = "OREPA";
  /// The c1 -> c2 k x k stride-s block, autopadded, initialised from `seed`.
  ConvUnit<S> operator()(std::int64_t c1, std::int64_t c2, std::int64_t k, std::int64_t s, std::uint64_t seed) const {
    return ConvUnit<S>(yolo_conv<S, Act>(ConvOptions(c1, c2, k).stride(s).seed(seed), act));
  }
  Act act{};  ///< the blocks' activation
};

/// Conv block maker of the DBB baseline: DBB for k > 1; for k = 1 a plain ConvBN (DBB
/// re-parameterises k x k convolutions; a 1x1 conv stays a conv, as in the DBB paper).
template <class S = float, class Act = SiLU>
struct DbbConvMaker {
  /// Family name for reports.
  static constexpr const char* name = "DBB";
  /// The c1 -> c2 k x k stride-s block (autopad), initialised from `seed`.
  ConvUnit<S> operator()(std::int64_t c1, std::int64_t c2, std::int64_t k, std::int64_t s, std::uint64_t seed) const {
    const auto opts = ConvOptions(c1, c2, k).stride(s).seed(seed);
    if (k == 1) return ConvUnit<S>(ConvBN<S, Act>(opts, act));
    return ConvUnit<S>(DBB<S, Act>(DbbOptions(opts), act));
  }
  Act act{};  ///< the blocks' activation
};

/// Conv block maker of the plain baseline: ConvBN (conv + BN + act) for every k.
template <class S = float, class Act = SiLU>
struct ConvBNMaker {
  /// Family name for reports.
  static constexpr const char* name = "ConvBN";
  /// The c1 -> c2 k x k stride-s block (padding k/2), initialised from `seed`.
  ConvUnit<S> operator()(std::int64_t c1, std::int64_t c2, std::int64_t k, std::int64_t s, std::uint64_t seed) const {
    return ConvUnit<S>(ConvBN<S, Act>(ConvOptions(c1, c2, k).stride(s).seed(seed), act));
  }
  Act act{};  ///< the blocks' activation
};

/// The deployed Bottleneck: two deployed convolutions and the optional residual add.
template <class S>
class DeployedBottleneck {
 public:
  /// cv1 and cv2 deployed; `add`: whether the input is added to cv2's output.
  DeployedBottleneck(DeployedUnit<S> cv1, DeployedUnit<S> cv2, bool add)
      : cv1_(std::move(cv1)), cv2_(std::move(cv2)), add_(add) {}
  /// cv2(cv1(x)) (+ x).
  Tensor<S> forward(const Tensor<S>& x) const {
    Tensor<S> y = cv2_.forward(cv1_.forward(x));
    if (add_) detail::yolo::add_inplace(y, x, "DeployedBottleneck residual");
    return y;
  }
  /// Weights plus biases of both convolutions.
  std::int64_t num_parameters() const { return cv1_.num_parameters() + cv2_.num_parameters(); }

 private:
  DeployedUnit<S> cv1_, cv2_;
  bool add_;
};

/// YOLOv5's Bottleneck: y = cv2(cv1(x)) (+ x when `shortcut` and c1 == c2), cv1 a
/// c1 -> c_ 1x1 block and cv2 a c_ -> c2 3x3 block, c_ = int(c2 * e). The blocks come
/// from `Maker` (see OrepaConvMaker), so the same module trains as OREPA, DBB or ConvBN.
template <class S, class Maker = OrepaConvMaker<S>>
class Bottleneck {
  static_assert(std::is_invocable_r_v<ConvUnit<S>, const Maker&, std::int64_t, std::int64_t, std::int64_t,
                                      std::int64_t, std::uint64_t>,
                "Bottleneck<S, Maker>: Maker must be callable as maker(c1, c2, k, s, seed) -> ConvUnit<S>");

 public:
  /// Throws config_error unless c1, c2 >= 1 and c_ = int(c2 * e) >= 1. Block seeds are
  /// derived from `seed`.
  Bottleneck(std::int64_t c1, std::int64_t c2, bool shortcut = true, double e = 0.5, std::uint64_t seed = 0,
             const Maker& maker = Maker())
      : Bottleneck(c1, c2, hidden(c1, c2, e), shortcut, seed, maker) {}
  /// Move constructor (Bottleneck is move-only, like its ConvUnit blocks).
  Bottleneck(Bottleneck&&) noexcept = default;
  /// Move assignment; the previous blocks are destroyed.
  Bottleneck& operator=(Bottleneck&&) noexcept = default;

  /// True when the input is added to cv2's output (shortcut and c1 == c2).
  bool has_residual() const { return add_; }
  /// The 1x1 block.
  ConvUnit<S>& cv1() { return cv1_; }
  /// The 1x1 block, read-only.
  const ConvUnit<S>& cv1() const { return cv1_; }
  /// The 3x3 block.
  ConvUnit<S>& cv2() { return cv2_; }
  /// The 3x3 block, read-only.
  const ConvUnit<S>& cv2() const { return cv2_; }

  /// Training forward; the module's (or cv2's) output buffer.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    const Tensor<S>& y = cv2_.forward_train(cv1_.forward_train(x));
    if (!add_) return y;
    out_.resize(y.sizes());
    std::copy(y.begin(), y.end(), out_.begin());
    detail::yolo::add_inplace(out_, x, "Bottleneck residual");
    return out_;
  }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    Tensor<S> y = cv2_.forward_eval(cv1_.forward_eval(x));
    if (add_) detail::yolo::add_inplace(y, x, "Bottleneck residual");
    return y;
  }
  /// Backward of the last forward_train: dL/dx through both blocks, plus grad_out itself
  /// through the residual.
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    const Tensor<S>& g = cv1_.backward(cv2_.backward(grad_out));
    if (!add_) return g;
    dx_.resize(g.sizes());
    std::copy(g.begin(), g.end(), dx_.begin());
    detail::yolo::add_inplace(dx_, grad_out, "Bottleneck::backward residual");
    return dx_;
  }
  /// cv1's tensors, then cv2's (the blocks' own names; see named_parameters()).
  ParamList<S> parameters() {
    ParamList<S> all = cv1_.parameters();
    for (auto* p : cv2_.parameters()) all.push_back(p);
    return all;
  }
  /// Every tensor with YOLOv5's module path: prefix + "cv1." / "cv2." + the block's name.
  std::vector<std::pair<std::string, Param<S>*>> named_parameters(const std::string& prefix = "") {
    std::vector<std::pair<std::string, Param<S>*>> all;
    for (auto* p : cv1_.parameters()) all.emplace_back(prefix + "cv1." + p->name, p);
    for (auto* p : cv2_.parameters()) all.emplace_back(prefix + "cv2." + p->name, p);
    return all;
  }
  /// Zeroes every gradient.
  void zero_grad() {
    cv1_.zero_grad();
    cv2_.zero_grad();
  }
  /// Both blocks deployed (a snapshot of the current weights).
  DeployedBottleneck<S> deploy() const { return DeployedBottleneck<S>(cv1_.deploy(), cv2_.deploy(), add_); }

 private:
  static std::int64_t hidden(std::int64_t c1, std::int64_t c2, double e) {
    detail::yolo::require_positive("Bottleneck", "c1", c1);
    detail::yolo::require_positive("Bottleneck", "c2", c2);
    const auto c = std::int64_t(double(c2) * e);
    if (c < 1) throw config_error(detail::cat("Bottleneck: hidden channels int(c2 * e) = int(", c2, " * ", e,
                                              ") must be >= 1"));
    return c;
  }
  Bottleneck(std::int64_t c1, std::int64_t c2, std::int64_t c, bool shortcut, std::uint64_t seed, const Maker& maker)
      : cv1_(maker(c1, c, 1, 1, detail::yolo::child_seed(seed, 0))),
        cv2_(maker(c, c2, 3, 1, detail::yolo::child_seed(seed, 1))),
        add_(shortcut && c1 == c2) {}

  ConvUnit<S> cv1_, cv2_;
  bool add_;
  Tensor<S> out_, dx_;  // residual sum and its input gradient (reused)
};

/// The deployed C3: the deployed blocks and the concatenation.
template <class S>
class DeployedC3 {
 public:
  /// The three deployed 1x1 blocks and the deployed Bottlenecks, in order.
  DeployedC3(DeployedUnit<S> cv1, DeployedUnit<S> cv2, DeployedUnit<S> cv3, std::vector<DeployedBottleneck<S>> m)
      : cv1_(std::move(cv1)), cv2_(std::move(cv2)), cv3_(std::move(cv3)), m_(std::move(m)) {}
  /// cv3(cat(m(cv1(x)), cv2(x))).
  Tensor<S> forward(const Tensor<S>& x) const {
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

 private:
  DeployedUnit<S> cv1_, cv2_, cv3_;
  std::vector<DeployedBottleneck<S>> m_;
};

/// YOLOv5's C3 (CSP bottleneck with 3 convolutions):
///   y = cv3(cat(m(cv1(x)), cv2(x))),  c_ = int(c2 * e),
/// cv1, cv2: c1 -> c_ 1x1; m: n Bottleneck(c_, c_, shortcut, e = 1); cv3: 2 c_ -> c2 1x1.
/// Blocks come from `Maker` (see OrepaConvMaker); with OREPA the Bottlenecks' 3x3 convs
/// are OREPA blocks and the 1x1 convs OREPA_1x1 blocks.
template <class S, class Maker = OrepaConvMaker<S>>
class C3 {
 public:
  /// Throws config_error unless c1, c2, n >= 1 and int(c2 * e) >= 1. Block seeds are
  /// derived from `seed`.
  C3(std::int64_t c1, std::int64_t c2, std::int64_t n = 1, bool shortcut = true, double e = 0.5,
     std::uint64_t seed = 0, const Maker& maker = Maker())
      : C3(c1, c2, hidden(c1, c2, n, e), n, shortcut, seed, maker) {}
  /// Move constructor (C3 is move-only, like its ConvUnit blocks).
  C3(C3&&) noexcept = default;
  /// Move assignment; the previous blocks are destroyed.
  C3& operator=(C3&&) noexcept = default;

  /// The input-side 1x1 block of the bottleneck path.
  ConvUnit<S>& cv1() { return cv1_; }
  /// The input-side 1x1 block of the bottleneck path, read-only.
  const ConvUnit<S>& cv1() const { return cv1_; }
  /// The input-side 1x1 block of the plain path.
  ConvUnit<S>& cv2() { return cv2_; }
  /// The input-side 1x1 block of the plain path, read-only.
  const ConvUnit<S>& cv2() const { return cv2_; }
  /// The output 1x1 block over the concatenation.
  ConvUnit<S>& cv3() { return cv3_; }
  /// The output 1x1 block over the concatenation, read-only.
  const ConvUnit<S>& cv3() const { return cv3_; }
  /// The Bottlenecks of the cv1 path, in order.
  std::vector<Bottleneck<S, Maker>>& m() { return m_; }
  /// The Bottlenecks of the cv1 path, in order, read-only.
  const std::vector<Bottleneck<S, Maker>>& m() const { return m_; }

  /// Training forward; cv3's output buffer.
  const Tensor<S>& forward_train(const Tensor<S>& x) {
    const Tensor<S>* a = &cv1_.forward_train(x);
    for (auto& b : m_) a = &b.forward_train(*a);
    concat_channels(*a, cv2_.forward_train(x), cat_);
    return cv3_.forward_train(cat_);
  }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(const Tensor<S>& x) const {
    Tensor<S> a = cv1_.forward_eval(x);
    for (const auto& b : m_) a = b.forward_eval(a);
    Tensor<S> cat;
    concat_channels(a, cv2_.forward_eval(x), cat);
    return cv3_.forward_eval(cat);
  }
  /// Backward of the last forward_train: splits cv3's input gradient between the two
  /// paths and sums the two input gradients.
  const Tensor<S>& backward(const Tensor<S>& grad_out) {
    split_channels(cv3_.backward(grad_out), c_, da_, db_);
    const Tensor<S>* g = &da_;
    for (auto it = m_.rbegin(); it != m_.rend(); ++it) g = &it->backward(*g);
    const Tensor<S>& dx1 = cv1_.backward(*g);
    dx_.resize(dx1.sizes());
    std::copy(dx1.begin(), dx1.end(), dx_.begin());
    detail::yolo::add_inplace(dx_, cv2_.backward(db_), "C3::backward");
    return dx_;
  }
  /// cv1, cv2, cv3, then every Bottleneck's tensors (YOLOv5's registration order).
  ParamList<S> parameters() {
    ParamList<S> all;
    for (auto& [name, p] : named_parameters()) all.push_back(p);
    return all;
  }
  /// Every tensor with YOLOv5's module path: prefix + "cv1.", "cv2.", "cv3.", "m.0.cv1.", ...
  std::vector<std::pair<std::string, Param<S>*>> named_parameters(const std::string& prefix = "") {
    std::vector<std::pair<std::string, Param<S>*>> all;
    for (auto* p : cv1_.parameters()) all.emplace_back(prefix + "cv1." + p->name, p);
    for (auto* p : cv2_.parameters()) all.emplace_back(prefix + "cv2." + p->name, p);
    for (auto* p : cv3_.parameters()) all.emplace_back(prefix + "cv3." + p->name, p);
    for (std::size_t i = 0; i < m_.size(); ++i)
      for (auto& np : m_[i].named_parameters(prefix + "m." + std::to_string(i) + ".")) all.push_back(np);
    return all;
  }
  /// Zeroes every gradient.
  void zero_grad() {
    cv1_.zero_grad();
    cv2_.zero_grad();
    cv3_.zero_grad();
    for (auto& b : m_) b.zero_grad();
  }
  /// Every block deployed (a snapshot of the current weights).
  DeployedC3<S> deploy() const {
    std::vector<DeployedBottleneck<S>> m;
    for (const auto& b : m_) m.push_back(b.deploy());
    return DeployedC3<S>(cv1_.deploy(), cv2_.deploy(), cv3_.deploy(), std::move(m));
  }

 private:
  static std::int64_t hidden(std::int64_t c1, std::int64_t c2, std::int64_t n, double e) {
    detail::yolo::require_positive("C3", "c1", c1);
    detail::yolo::require_positive("C3", "c2", c2);
    detail::yolo::require_positive("C3", "n", n);
    const auto c = std::int64_t(double(c2) * e);
    if (c < 1) throw config_error(detail::cat("C3: hidden channels int(c2 * e) = int(", c2, " * ", e, ") must be >= 1"));
    return c;
  }
  C3(std::int64_t c1, std::int64_t c2, std::int64_t c, std::int64_t n, bool shortcut, std::uint64_t seed,
     const Maker& maker)
      : c_(c),
        cv1_(maker(c1, c, 1, 1, detail::yolo::child_seed(seed, 0))),
        cv2_(maker(c1, c, 1, 1, detail::yolo::child_seed(seed, 1))),
        cv3_(maker(2 * c, c2, 1, 1, detail::yolo::child_seed(seed, 2))) {
    for (std::int64_t i = 0; i < n; ++i)
      m_.emplace_back(c, c, shortcut, 1.0, detail::yolo::child_seed(seed, 3 + std::uint64_t(i)), maker);
  }

  std::int64_t c_;
  ConvUnit<S> cv1_, cv2_, cv3_;
  std::vector<Bottleneck<S, Maker>> m_;
  Tensor<S> cat_, da_, db_, dx_;  // concatenation, its split gradient, the summed input gradient (reused)
};

}  // namespace orepa
