#pragma once
/// @file any_deployed.hpp
/// `AnyDeployed<S>`: any deployed object (a DeployedConv, a deployed YOLO module, an
/// InferenceChain, ...) behind one type: `Tensor<S> forward(ConstTensorView<S>) const`.
/// Copies share the same immutable object, so an AnyDeployed is cheap to copy and, like
/// the objects it holds, safe to call from several threads.
///
/// The deployed convolutions inside a held object are reachable by name (visit_convs)
/// and replaceable (map_convs) when the object offers those members, as DeployedConv,
/// InferenceChain and the deployed YOLO modules do: the names are the tensor-name
/// prefixes of the training-time network ("3.", "2.cv1.", "2.m.0.cv2."), which is how a
/// Calibration addresses layers.
///
/// int8 activations between stages: an object whose `int8_input()` names a quantization
/// takes 8-bit codes in it (`forward_int8`), and gives codes in the quantization the next
/// stage asks for, so an InferenceChain quantizes once, at its first int8 stage, and
/// returns to float where a stage cannot take codes. DeployedConv and the deployed YOLO
/// modules take part; any other object is given float (its codes dequantized first).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <variant>
#include <vector>

#include "orepa/core/error_path.hpp"
#include "orepa/core/parallel.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/deploy/precision.hpp"

namespace orepa {

template <class S>
class DeployedConv;
template <class S>
class AnyDeployed;
/// Called with each deployed convolution's name and the convolution.
template <class S>
using ConvVisitor = std::function<void(const std::string&, const DeployedConv<S>&)>;
/// Gives the replacement of a deployed convolution, from its name and itself.
template <class S>
using ConvMapper = std::function<AnyDeployed<S>(const std::string&, const DeployedConv<S>&)>;

/// 8-bit codes of an activation [N, C, H, W], stored channels-last (NHWC order, one byte
/// per value: u8, or s8 when q.qmin < 0); value = q.scale * (code - q.zero_point). When
/// q.bf16, the values themselves as bfloat16 (two bytes each, the upper half of the float):
/// how bf16 convolutions pass activations, since they read and write bf16.
struct Int8Codes {
  Shape shape;                          ///< N, C, H, W
  QuantParams q;                        ///< the quantization of every code
  std::shared_ptr<std::uint8_t[]> bytes;  ///< numel() codes, element_size() bytes each

  /// Uninitialised codes of `shape` in `q`.
  Int8Codes(Shape s, const QuantParams& quant)
      : shape(std::move(s)),
        q(quant),
        bytes(new std::uint8_t[std::size_t(shape_numel(shape)) * (quant.bf16 ? 2 : 1)]) {}
  /// Number of codes.
  std::int64_t numel() const { return shape_numel(shape); }
  /// Bytes per code: 1, or 2 for bf16.
  std::int64_t element_size() const { return q.bf16 ? 2 : 1; }
  /// Code `i` (NHWC order; for bf16 its 16 bits).
  std::int32_t code(std::int64_t i) const {
    if (q.bf16) {
      std::uint16_t h;
      std::memcpy(&h, bytes.get() + 2 * i, 2);
      return std::int32_t(h);
    }
    const std::uint8_t b = bytes[std::size_t(i)];
    return q.qmin < 0 ? std::int32_t(std::int8_t(b)) : std::int32_t(b);
  }
  /// The real value of code `i`.
  float value(std::int64_t i) const {
    return q.bf16 ? detail::bf16_value(std::uint16_t(code(i))) : q.dequantize(code(i));
  }

 private:
  static std::int64_t shape_numel(const Shape& s) {
    std::int64_t n = 1;
    for (auto d : s) n *= d;
    return n;
  }
};
/// A stage's input inside an InferenceChain: float, or codes in the stage's int8_input().
template <class S>
using StageInput = std::variant<ConstTensorView<S>, const Int8Codes*>;
/// A stage's output: float, or codes in the quantization it was asked for.
template <class S>
using StageOutput = std::variant<Tensor<S>, Int8Codes>;

/// A stage's output as the next stage's input (a view of it: keep `o` alive).
template <class S>
StageInput<S> as_input(const StageOutput<S>& o) {
  if (auto* c = std::get_if<Int8Codes>(&o)) return c;
  return ConstTensorView<S>(std::get<Tensor<S>>(o));
}

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// int8 codes cannot hold NaN or Inf (a NaN quantizes to the lowest code), so where float
// values are quantized, the images (first index) holding one are noted, and the whole
// output of those images is set to NaN at the end: by the deployed convolution itself, or
// by the InferenceChain that installed a NonFiniteImages on this thread for its forward.
struct NonFiniteImages {
  std::int64_t batch = 0;            // the chain input's first extent
  std::vector<std::int64_t> images;  // images seen holding a NaN / Inf (may repeat)
  bool all = false;                  // one was seen in a tensor of another first extent
};
inline NonFiniteImages*& thread_non_finite_images() {
  thread_local NonFiniteImages* seen = nullptr;
  return seen;
}
// Installs `seen` on this thread for its lifetime (nests: the previous one returns).
class ScopedNonFiniteImages {
 public:
  explicit ScopedNonFiniteImages(NonFiniteImages* seen) : previous_(thread_non_finite_images()) {
    thread_non_finite_images() = seen;
  }
  ~ScopedNonFiniteImages() { thread_non_finite_images() = previous_; }
  ScopedNonFiniteImages(const ScopedNonFiniteImages&) = delete;
  ScopedNonFiniteImages& operator=(const ScopedNonFiniteImages&) = delete;

 private:
  NonFiniteImages* previous_;
};
// The images of `x` (any memory format: an image's values are contiguous in both)
// holding a NaN or Inf, noted with the installed NonFiniteImages, if any.
inline std::vector<std::int64_t> non_finite_images(ConstTensorView<float> x) {
  std::vector<std::int64_t> bad;
  if (x.numel() == 0) return bad;
  const std::int64_t n_images = x.dim() > 0 ? x.size(0) : 1, per = x.numel() / n_images;
  const float* p = x.data();
  for (std::int64_t n = 0; n < n_images; ++n)
    if (!all_finite(p + n * per, per)) bad.push_back(n);
  if (auto* seen = thread_non_finite_images(); seen && !bad.empty()) {
    if (n_images != seen->batch) seen->all = true;
    seen->images.insert(seen->images.end(), bad.begin(), bad.end());
  }
  return bad;
}
// Sets every value of images `bad` of `y` to NaN, or all of `y` when `all` or when its
// first extent is not `batch`.
inline void poison_images(TensorView<float> y, const std::vector<std::int64_t>& bad, std::int64_t batch,
                          bool all = false) {
  if (y.numel() == 0 || (bad.empty() && !all)) return;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (all || y.dim() == 0 || y.size(0) != batch) return std::fill(y.begin(), y.end(), nan);
  const std::int64_t per = y.numel() / batch;
  for (auto n : bad) std::fill(y.data() + n * per, y.data() + (n + 1) * per, nan);
}
}  // namespace detail
/// \endcond

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// Codes in q of the n floats at `in`, written from code `first` of `out`; returns 1 when
// one of them is NaN or Inf (bf16 keeps those: it returns 0 then).
inline std::uint32_t encode_codes(const float* in, std::uint8_t* out, std::int64_t first, std::int64_t n,
                                  const QuantParams& q) {
  if (q.bf16) {  // bf16_bits: a NaN stays a (quiet) NaN
    std::uint8_t* halves = out + 2 * first;
    OREPA_SIMD
    for (std::int64_t i = 0; i < n; ++i) {
      const std::uint16_t h = bf16_bits(in[i]);
      std::memcpy(halves + 2 * i, &h, sizeof h);
    }
    return 0;
  }
  // Locals: byte stores may alias anything read through a reference.
  const QuantParams local = q;
  std::uint8_t* codes = out + first;
  std::uint32_t any = 0;
  OREPA_SIMD_OR(any)
  for (std::int64_t i = 0; i < n; ++i) {
    any |= non_finite_bit(in + i);
    codes[i] = std::uint8_t(local.quantize(in[i]));
  }
  return any;
}

// The W pixels of C channels at `plane` (channel planes `plane_stride` apart) as NHWC
// values at `row`; an image's three channels get a loop the compiler vectorizes.
inline void interleave_row(const float* plane, std::int64_t plane_stride, std::int64_t C, std::int64_t W, float* row) {
  if (C == 3) {
    const float* __restrict r = plane;
    const float* __restrict g = plane + plane_stride;
    const float* __restrict b = plane + 2 * plane_stride;
    float* __restrict o = row;
    for (std::int64_t w = 0; w < W; ++w) o[3 * w] = r[w], o[3 * w + 1] = g[w], o[3 * w + 2] = b[w];
    return;
  }
  for (std::int64_t ch = 0; ch < C; ++ch)
    for (std::int64_t w = 0; w < W; ++w) row[w * C + ch] = plane[ch * plane_stride + w];
}

// quantize_codes(x, q), also giving the images of x that hold a NaN or Inf. The NaN / Inf
// test rides along the quantization (one pass over x); only when it finds one are the
// images holding it looked for. NCHW input is read once too: each image row is interleaved
// into NHWC through a small buffer, then encoded.
inline Int8Codes quantize_codes_finding_non_finite(ConstTensorView<float> x, const QuantParams& q,
                                                   std::vector<std::int64_t>& bad) {
  if (x.dim() != 4)
    throw shape_error(detail::cat("quantize_codes: codes are NHWC, a 4-D shape is needed, got ", shape_str(x.sizes())));
  Int8Codes c(x.sizes(), q);
  std::uint8_t* out = c.bytes.get();
  std::vector<std::uint32_t> non_finite(std::size_t(max_range_threads()), 0);
  const float* v = x.data();
  if (x.memory_format() == MemoryFormat::channels_last) {
    parallel_ranges(c.numel(), [&](std::int64_t b, std::int64_t e, int t) {
      non_finite[std::size_t(t)] |= encode_codes(v + b, out, b, e - b, q);
    });
  } else {
    const std::int64_t C = x.size(1), H = x.size(2), W = x.size(3);
    parallel_ranges(x.size(0) * H, [&](std::int64_t b, std::int64_t e, int t) {
      std::vector<float> row(std::size_t(W * C));
      for (std::int64_t r = b; r < e; ++r) {
        interleave_row(v + (r / H) * C * H * W + (r % H) * W, H * W, C, W, row.data());
        non_finite[std::size_t(t)] |= encode_codes(row.data(), out, r * W * C, W * C, q);
      }
    });
  }
  if (std::any_of(non_finite.begin(), non_finite.end(), [](std::uint32_t a) { return a != 0; }))
    bad = non_finite_images(x);
  return c;
}
}  // namespace detail
/// \endcond

/// `x` (any memory format) as codes in `q`. Images of `x` holding a NaN or Inf are noted
/// for the enclosing InferenceChain, which sets their output to NaN (8-bit codes cannot
/// hold one; bf16 values can, and carry them).
inline Int8Codes quantize_codes(ConstTensorView<float> x, const QuantParams& q) {
  std::vector<std::int64_t> bad;
  return detail::quantize_codes_finding_non_finite(x, q, bad);
}
/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// The real values of codes [b, e) of `c` written to out[b, e), or added to them with
// `Add`: one loop per code type, so that each vectorizes.
template <bool Add>
void dequantize_range(const Int8Codes& c, std::int64_t b, std::int64_t e, float* out) {
  const QuantParams q = c.q;  // locals: the float stores could alias c.q and the caller's captures
  const std::uint8_t* bytes = c.bytes.get();
  auto put = [out](std::int64_t i, float v) {
    if constexpr (Add) out[i] += v;
    else out[i] = v;
  };
  if (q.bf16) {
    OREPA_SIMD
    for (std::int64_t i = b; i < e; ++i) {
      std::uint16_t h;
      std::memcpy(&h, bytes + 2 * i, sizeof h);
      put(i, bf16_value(h));
    }
  } else if (q.qmin < 0) {
    OREPA_SIMD
    for (std::int64_t i = b; i < e; ++i) put(i, q.dequantize(std::int8_t(bytes[i])));
  } else {
    OREPA_SIMD
    for (std::int64_t i = b; i < e; ++i) put(i, q.dequantize(bytes[i]));
  }
}
}  // namespace detail
/// \endcond

/// The real values of `c`, a channels-last tensor.
inline Tensor<float> dequantize_codes(const Int8Codes& c) {
  Tensor<float> y;
  y.resize(c.shape, MemoryFormat::channels_last);
  parallel_ranges(c.numel(), [&](std::int64_t b, std::int64_t e, int) { detail::dequantize_range<false>(c, b, e, y.data()); });
  return y;
}

/// What a stage without an 8-bit path does inside an int8 chain: `forward` (a callable
/// taking a float view) on `x`, dequantized first when it is codes, and its output
/// quantized in `*out` when given.
template <class S, class F>
StageOutput<S> forward_int8_through_float(StageInput<S> x, const QuantParams* out, F&& forward) {
  if constexpr (std::is_same_v<S, float>) {
    const auto* codes = std::get_if<const Int8Codes*>(&x);
    const Tensor<float> real = codes ? dequantize_codes(**codes) : Tensor<float>();
    Tensor<float> y(forward(codes ? ConstTensorView<float>(real) : std::get<ConstTensorView<float>>(x)));
    if (out) return quantize_codes(y, *out);
    return y;
  } else {
    return Tensor<S>(forward(std::get<ConstTensorView<S>>(x)));  // codes are float-only
  }
}

/// A type-erased deployed module.
template <class S>
class AnyDeployed {
 public:
  /// Holds `d` (moved in); D needs `Tensor<S> forward(ConstTensorView<S>) const`.
  template <class D, class = std::enable_if_t<!std::is_same_v<std::decay_t<D>, AnyDeployed>>>
  AnyDeployed(D d) : impl_(std::make_shared<const Model<D>>(std::move(d))) {}  // NOLINT: implicit on purpose

  /// Runs the held object.
  Tensor<S> forward(ConstTensorView<S> x) const { return impl_->forward(x); }
  /// The held object's type_name() if it has one, else its class name ("DeployedC3").
  std::string type_name() const { return impl_->type_name(); }
  /// The held object's num_parameters() (weights and biases it holds), 0 if it has none.
  std::int64_t num_parameters() const { return impl_->num_parameters(); }
  /// The memory format the held object prefers for input shape `x_shape`: its
  /// preferred_format() if it has one (DeployedConv and the modules built of them), else
  /// contiguous.
  MemoryFormat preferred_format(const Shape& x_shape) const { return impl_->preferred_format(x_shape); }
  /// True when the held object takes 4-D inputs in every memory format: objects that
  /// declare a preferred_format() do; any other is given contiguous (NCHW) tensors only.
  bool takes_any_format() const { return impl_->takes_any_format(); }
  /// Calls `f` on every deployed convolution inside, named `prefix` + its path.
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const { impl_->visit_convs(prefix, f); }
  /// A copy in which every deployed convolution inside is replaced by f(name, conv);
  /// an object without convolutions (or without map_convs) is returned as is.
  AnyDeployed map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    if (auto m = impl_->map_convs(prefix, f)) return *m;
    return *this;
  }
  /// The quantization the held object takes 8-bit input in, if it takes codes (its
  /// int8_input(); nullopt for objects without one).
  std::optional<QuantParams> int8_input() const { return impl_->int8_input(); }
  /// Runs the held object on float or codes (codes only in int8_input()); returns codes in
  /// `*out` when `out` is given, else float. Objects without forward_int8 run forward() on
  /// the dequantized input and quantize their output.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const { return impl_->forward_int8(x, out); }
  /// The held object as a `D`, or nullptr when it is of another type.
  template <class D>
  const D* target() const {
    auto* m = dynamic_cast<const Model<D>*>(impl_.get());
    return m ? &m->d : nullptr;
  }

 private:
  template <class D, class = void>
  struct has_name : std::false_type {};
  template <class D>
  struct has_name<D, std::void_t<decltype(std::string(std::declval<const D&>().type_name()))>> : std::true_type {};
  template <class D, class = void>
  struct has_count : std::false_type {};
  template <class D>
  struct has_count<D, std::void_t<decltype(std::declval<const D&>().num_parameters())>> : std::true_type {};
  template <class D, class = void>
  struct has_format : std::false_type {};
  template <class D>
  struct has_format<D, std::void_t<decltype(std::declval<const D&>().preferred_format(Shape()))>> : std::true_type {};
  template <class D, class = void>
  struct has_int8 : std::false_type {};
  template <class D>
  struct has_int8<D, std::void_t<decltype(std::declval<const D&>().int8_input())>> : std::true_type {};
  template <class D, class = void>
  struct has_convs : std::false_type {};
  template <class D>
  struct has_convs<D, std::void_t<decltype(std::declval<const D&>().map_convs(std::string(), ConvMapper<S>()))>>
      : std::true_type {};
  struct Concept {
    virtual ~Concept() = default;
    virtual Tensor<S> forward(ConstTensorView<S> x) const = 0;
    virtual std::int64_t num_parameters() const = 0;
    virtual std::string type_name() const = 0;
    virtual MemoryFormat preferred_format(const Shape& x_shape) const = 0;
    virtual bool takes_any_format() const = 0;
    virtual void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const = 0;
    virtual std::unique_ptr<AnyDeployed> map_convs(const std::string& prefix, const ConvMapper<S>& f) const = 0;
    virtual std::optional<QuantParams> int8_input() const = 0;
    virtual StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const = 0;
  };
  template <class D>
  struct Model final : Concept {
    explicit Model(D x) : d(std::move(x)) {}
    Tensor<S> forward(ConstTensorView<S> x) const override { return Tensor<S>(d.forward(x)); }
    std::int64_t num_parameters() const override {
      if constexpr (has_count<D>::value) return d.num_parameters();
      else return 0;
    }
    std::string type_name() const override {
      if constexpr (has_name<D>::value) return d.type_name();
      else return detail::short_type_name(typeid(D));
    }
    MemoryFormat preferred_format(const Shape& x_shape) const override {
      if constexpr (has_format<D>::value) return d.preferred_format(x_shape);
      else return MemoryFormat::contiguous;
    }
    bool takes_any_format() const override { return has_format<D>::value; }
    void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const override {
      if constexpr (has_convs<D>::value) d.visit_convs(prefix, f);
    }
    std::unique_ptr<AnyDeployed> map_convs(const std::string& prefix, const ConvMapper<S>& f) const override {
      if constexpr (has_convs<D>::value) return std::make_unique<AnyDeployed>(d.map_convs(prefix, f));
      else return nullptr;
    }
    std::optional<QuantParams> int8_input() const override {
      if constexpr (has_int8<D>::value) return d.int8_input();
      else return std::nullopt;
    }
    StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const override {
      if constexpr (has_int8<D>::value) return d.forward_int8(x, out);
      else return forward_int8_through_float<S>(x, out, [&](ConstTensorView<S> v) { return d.forward(v); });
    }
    D d;
  };
  std::shared_ptr<const Concept> impl_;
};

}  // namespace orepa
