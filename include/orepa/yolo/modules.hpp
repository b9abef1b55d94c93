#pragma once
/// @file modules.hpp (yolo)
/// The YOLOv5 modules a model yaml names besides the convolutions and C3 (nn/yolo.hpp),
/// each in training form (a layer of blocks/block.hpp, or a multi-input module of the
/// graph) and deployed form:
///   - `SPPF<S>`: cv1 (1x1, c1 -> c1 / 2), three chained k x k stride-1 max pools,
///     concatenation of the four maps, cv2 (1x1, 2 c1 -> c2); tensors `cv1.*`, `cv2.*`;
///   - `Upsample<S>`: nearest-neighbour upsampling by an integer factor (YOLOv5's
///     `nn.Upsample(None, 2, 'nearest')`), no tensors;
///   - `Concat<S>`: torch.cat of several inputs along the channels;
///   - `Detect<S>`: nl levels of na anchors, a 1x1 convolution with bias per level
///     (`m.i.weight`, `m.i.bias`) and the buffer `anchors` [nl, na, 2] in grid units
///     (pixels / stride). Training gives the raw maps [N, na, H, W, 5 + nc]; eval and
///     deploy give YOLOv5's decoded output [N, sum na H W, 5 + nc] (decode_detections).
/// The deployed forms pass 8-bit codes through max pooling, upsampling and
/// concatenation unchanged (both commute with a monotone quantization); only Detect's
/// convolutions return to float.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "orepa/nn/yolo.hpp"

namespace orepa::yolo {

using orepa::operator<<;  // printing of modules (blocks/module_tree.hpp), found for yolo types too

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {

// Element strides (n, c, h, w) of a 4-D tensor of `s` laid out in `f`.
inline std::array<std::int64_t, 4> strides4(const Shape& s, MemoryFormat f) {
  if (f == MemoryFormat::contiguous) return {s[1] * s[2] * s[3], s[2] * s[3], s[3], 1};
  return {s[1] * s[2] * s[3], 1, s[3] * s[1], s[1]};
}

// k x k max pooling, stride 1, padding k / 2 (padding never wins, as PyTorch's -inf) of
// x [N, C, H, W] with strides `sx` into y with strides `sy`. `less` orders the elements
// (bytes of s8 codes compare signed). With `arg`, the flat index (n, c, h, w in x's
// logical NCHW order) of each output's maximum; the first maximum in scan order wins, as
// in PyTorch.
template <class T, class Less>
void max_pool_same(const T* x, T* y, const Shape& s, const std::array<std::int64_t, 4>& sx,
                   const std::array<std::int64_t, 4>& sy, std::int64_t k, Less less, std::int64_t* arg = nullptr) {
  const std::int64_t N = s[0], C = s[1], H = s[2], W = s[3], p = k / 2;
  parallel_ranges(N * H, [&](std::int64_t b, std::int64_t e, int) {
    for (std::int64_t nh = b; nh < e; ++nh) {
      const std::int64_t n = nh / H, h = nh % H;
      const std::int64_t h0 = std::max<std::int64_t>(h - p, 0), h1 = std::min(h + p + 1, H);
      for (std::int64_t w = 0; w < W; ++w) {
        const std::int64_t w0 = std::max<std::int64_t>(w - p, 0), w1 = std::min(w + p + 1, W);
        for (std::int64_t c = 0; c < C; ++c) {
          const T* base = x + n * sx[0] + c * sx[1];
          std::int64_t bh = h0, bw = w0;
          T best = base[h0 * sx[2] + w0 * sx[3]];
          for (std::int64_t i = h0; i < h1; ++i)
            for (std::int64_t j = w0; j < w1; ++j) {
              const T v = base[i * sx[2] + j * sx[3]];
              if (less(best, v)) best = v, bh = i, bw = j;
            }
          y[n * sy[0] + c * sy[1] + h * sy[2] + w * sy[3]] = best;
          if (arg) arg[((n * C + c) * H + h) * W + w] = ((n * C + c) * H + bh) * W + bw;
        }
      }
    }
  });
}

// max_pool_same without the argmax, for storage whose channels are innermost (NHWC): a
// k x k maximum is the maximum over the window's rows of their row maxima (padding never
// wins), so two passes, each taking element-wise maxima of runs of C channels.
template <class T>
void max_pool_same_nhwc(const T* x, T* y, const Shape& s, std::int64_t k) {
  const std::int64_t N = s[0], C = s[1], H = s[2], W = s[3], p = k / 2;
  std::unique_ptr<T[]> rows(new T[std::size_t(N * H * W * C)]);
  auto max_into = [C](T* out, const T* in) {
    OREPA_SIMD
    for (std::int64_t c = 0; c < C; ++c) out[c] = out[c] < in[c] ? in[c] : out[c];
  };
  parallel_ranges(N * H, [&](std::int64_t b, std::int64_t e, int) {  // along w
    for (std::int64_t nh = b; nh < e; ++nh)
      for (std::int64_t w = 0; w < W; ++w) {
        const T* in = x + nh * W * C;
        T* out = rows.get() + (nh * W + w) * C;
        const std::int64_t w0 = std::max<std::int64_t>(w - p, 0), w1 = std::min(w + p + 1, W);
        std::copy_n(in + w0 * C, C, out);
        for (std::int64_t j = w0 + 1; j < w1; ++j) max_into(out, in + j * C);
      }
  });
  parallel_ranges(N * H, [&](std::int64_t b, std::int64_t e, int) {  // along h
    for (std::int64_t nh = b; nh < e; ++nh) {
      const std::int64_t n = nh / H, h = nh % H;
      const std::int64_t h0 = std::max<std::int64_t>(h - p, 0), h1 = std::min(h + p + 1, H);
      const T* in = rows.get() + n * H * W * C;
      T* out = y + nh * W * C;
      std::copy_n(in + h0 * W * C, W * C, out);
      for (std::int64_t i = h0 + 1; i < h1; ++i)
        for (std::int64_t w = 0; w < W; ++w) max_into(out + w * C, in + (i * W + w) * C);
    }
  });
}

// Nearest-neighbour upsampling by `f` of x [N, C, H, W] (strides sx) into y (strides sy).
template <class T>
void upsample_nearest(const T* x, T* y, const Shape& s, const std::array<std::int64_t, 4>& sx,
                      const std::array<std::int64_t, 4>& sy, std::int64_t f) {
  const std::int64_t N = s[0], C = s[1], H = s[2], W = s[3];
  parallel_ranges(N * H * f, [&](std::int64_t b, std::int64_t e, int) {
    for (std::int64_t nh = b; nh < e; ++nh) {
      const std::int64_t n = nh / (H * f), oh = nh % (H * f), h = oh / f;
      for (std::int64_t ow = 0; ow < W * f; ++ow) {
        const T* in = x + n * sx[0] + h * sx[2] + (ow / f) * sx[3];
        T* out = y + n * sy[0] + oh * sy[2] + ow * sy[3];
        if (sx[1] == 1 && sy[1] == 1) orepa::detail::copy_run(in, C, out);
        else
          for (std::int64_t c = 0; c < C; ++c) out[c * sy[1]] = in[c * sx[1]];
      }
    }
  });
}

// Checks a 4-D input with `channels` channels (0: any); shape_error naming `who` otherwise.
inline void require_nchw(const Shape& s, std::int64_t channels, const std::string& who) {
  if (s.size() != 4 || s[0] < 1 || (channels > 0 && s[1] != channels))
    throw shape_error(orepa::detail::cat(who, ": input must be [N, ", channels > 0 ? std::to_string(channels) : "C",
                                         ", H, W], got ", shape_str(s)));
}

}  // namespace detail
/// \endcond

/// k x k max pooling with stride 1 and padding k / 2 (SPPF's nn.MaxPool2d): y has x's
/// shape and memory format.
template <class S>
Tensor<S> max_pool_same(orepa::detail::identity_t<ConstTensorView<S>> x, std::int64_t k) {
  detail::require_nchw(x.sizes(), 0, "max_pool_same");
  Tensor<S> y;
  y.resize(x.sizes(), x.memory_format());
  if (x.memory_format() == MemoryFormat::channels_last)
    detail::max_pool_same_nhwc(x.data(), y.data(), x.sizes(), k);
  else
    detail::max_pool_same(x.data(), y.data(), x.sizes(), detail::strides4(x.sizes(), x.memory_format()),
                          detail::strides4(x.sizes(), x.memory_format()), k, std::less<S>());
  return y;
}

/// max_pool_same on 8-bit codes (one quantization: the max of codes is the code of the max)
/// or bf16 values (pooled as floats: the max of bf16 values is one of them, so exactly).
inline Int8Codes max_pool_same_codes(const Int8Codes& x, std::int64_t k) {
  if (x.q.bf16) {
    const Tensor<float> real = dequantize_codes(x);
    return quantize_codes(max_pool_same<float>(real, k), x.q);
  }
  Int8Codes y(x.shape, x.q);
  if (x.q.qmin < 0)
    detail::max_pool_same_nhwc(reinterpret_cast<const std::int8_t*>(x.bytes.get()),
                               reinterpret_cast<std::int8_t*>(y.bytes.get()), x.shape, k);
  else
    detail::max_pool_same_nhwc(x.bytes.get(), y.bytes.get(), x.shape, k);
  return y;
}

/// Nearest-neighbour upsampling of x [N, C, H, W] by `factor`: [N, C, f H, f W] in x's format.
template <class S>
Tensor<S> upsample_nearest(orepa::detail::identity_t<ConstTensorView<S>> x, std::int64_t factor) {
  detail::require_nchw(x.sizes(), 0, "upsample_nearest");
  const Shape& s = x.sizes();
  Tensor<S> y;
  y.resize({s[0], s[1], s[2] * factor, s[3] * factor}, x.memory_format());
  detail::upsample_nearest(x.data(), y.data(), s, detail::strides4(s, x.memory_format()),
                           detail::strides4(y.sizes(), y.memory_format()), factor);
  return y;
}

/// upsample_nearest on codes (they keep their quantization).
inline Int8Codes upsample_nearest_codes(const Int8Codes& x, std::int64_t factor) {
  const Shape& s = x.shape;
  Int8Codes y({s[0], s[1], s[2] * factor, s[3] * factor}, x.q);
  // A code's bytes are one run: copy C * element_size bytes a pixel.
  const Shape bytes{s[0], s[1] * x.element_size(), s[2], s[3]}, out{s[0], bytes[1], y.shape[2], y.shape[3]};
  detail::upsample_nearest(x.bytes.get(), y.bytes.get(), bytes, detail::strides4(bytes, MemoryFormat::channels_last),
                           detail::strides4(out, MemoryFormat::channels_last), factor);
  return y;
}

/// Concatenation of several [N, C_i, H, W] tensors along the channels: channels-last
/// when every input is, else NCHW. shape_error naming `who` unless N, H, W agree.
template <class S>
Tensor<S> concat(const std::vector<ConstTensorView<S>>& xs, const std::string& who = "Concat") {
  Tensor<S> y;
  concat_channels(xs, y, who);
  return y;
}

using orepa::concat_codes;  // of any number of codes: nn/yolo.hpp

/// The deployed SPPF: both convolutions deployed, the pools and the concatenation.
template <class S>
class DeployedSPPF {
 public:
  /// cv1 and cv2 deployed, pools of `k` x `k`.
  DeployedSPPF(AnyDeployed<S> cv1, AnyDeployed<S> cv2, std::int64_t k) : cv1_(std::move(cv1)), cv2_(std::move(cv2)), k_(k) {}
  /// cv2(cat(t, m(t), m(m(t)), m(m(m(t))))) with t = cv1(x).
  Tensor<S> forward(ConstTensorView<S> x) const {
    const Tensor<S> t = cv1_.forward(x);
    const Tensor<S> y1 = max_pool_same<S>(t, k_), y2 = max_pool_same<S>(y1, k_), y3 = max_pool_same<S>(y2, k_);
    return cv2_.forward(concat<S>({t, y1, y2, y3}, "SPPF"));
  }
  /// Weights plus biases of both convolutions.
  std::int64_t num_parameters() const { return cv1_.num_parameters() + cv2_.num_parameters(); }
  /// The layout cv1 prefers.
  MemoryFormat preferred_format(const Shape& x_shape) const { return cv1_.preferred_format(x_shape); }
  /// cv1's int8_input() when cv2 takes codes too, else nullopt (see AnyDeployed).
  std::optional<QuantParams> int8_input() const { return cv2_.int8_input() ? cv1_.int8_input() : std::nullopt; }
  /// forward() inside an int8 graph: cv1 writes codes in cv2's input quantization, the
  /// pools and the concatenation run on the codes.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const {
    const auto q = cv2_.int8_input();
    if (!int8_input()) return forward_int8_through_float<S>(x, out, [&](ConstTensorView<S> v) { return forward(v); });
    const StageOutput<S> t = cv1_.forward_int8(x, &*q);
    const Int8Codes& c0 = std::get<Int8Codes>(t);
    const Int8Codes c1 = max_pool_same_codes(c0, k_), c2 = max_pool_same_codes(c1, k_), c3 = max_pool_same_codes(c2, k_);
    const Int8Codes cat = concat_codes({&c0, &c1, &c2, &c3}, "SPPF");
    return cv2_.forward_int8(&cat, out);
  }
  /// Visits cv1 and cv2 under `prefix`.
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    cv1_.visit_convs(prefix + "cv1.", f);
    cv2_.visit_convs(prefix + "cv2.", f);
  }
  /// The SPPF with both convolutions mapped by `f`.
  DeployedSPPF map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    return DeployedSPPF(cv1_.map_convs(prefix + "cv1.", f), cv2_.map_convs(prefix + "cv2.", f), k_);
  }

 private:
  AnyDeployed<S> cv1_, cv2_;
  std::int64_t k_;
};

/// YOLOv5's SPPF (spatial pyramid pooling, fast): y = cv2(cat(t, m(t), m(m(t)),
/// m(m(m(t))))), t = cv1(x), m a k x k stride-1 max pool; cv1 c1 -> c1 / 2 and cv2
/// 2 c1 -> c2 are 1x1 blocks from `maker` (slot names "cv1.", "cv2.").
template <class S>
class SPPF : public ModuleTensors<SPPF<S>, S> {
 public:
  /// Throws config_error unless c1 >= 2, c2 >= 1 and k is odd and >= 1.
  SPPF(std::int64_t c1, std::int64_t c2, std::int64_t k = 5, std::uint64_t seed = 0,
       const BlockMaker<S>& maker = orepa_maker<S>())
      : c_(checked(c1, c2, k)),
        k_(k),
        cv1_(maker(ConvOptions(c1, c_, 1).seed(orepa::detail::yolo::child_seed(seed, 0)).name("cv1."))),
        cv2_(maker(ConvOptions(4 * c_, c2, 1).seed(orepa::detail::yolo::child_seed(seed, 1)).name("cv2."))) {}
  SPPF(const SPPF&) = delete;  // never copied silently: std::move it, or clone() for a copy
  SPPF& operator=(const SPPF&) = delete;
  /// Move constructor.
  SPPF(SPPF&&) noexcept = default;
  /// Move assignment.
  SPPF& operator=(SPPF&&) noexcept = default;
  /// A deep copy (both blocks cloned), nothing saved for backward.
  SPPF clone() const { return SPPF(c_, k_, cv1_.clone(), cv2_.clone()); }

  /// "SPPF".
  std::string type_name() const { return "SPPF"; }
  /// The pool size k.
  std::int64_t pool_size() const { return k_; }
  /// The input-side 1x1 block.
  AnyBlock<S>& cv1() { return cv1_; }
  /// The output-side 1x1 block.
  AnyBlock<S>& cv2() { return cv2_; }

  /// Training forward; an alias of cv2's output buffer.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    Tensor<S> t = in_cv1([&] { return cv1_.forward_train(x); });
    t_.assign(t, MemoryFormat::contiguous);  // the pools with their argmax run on NCHW
    for (int j = 0; j < 3; ++j) pool_train(j == 0 ? t_ : pooled_[std::size_t(j - 1)], j);
    concat_channels<S>({t_, pooled_[0], pooled_[1], pooled_[2]}, cat_, "SPPF");
    has_forward_ = true;
    // cv2 gets cv1's layout back: a channels-last network stays channels-last.
    Tensor<S> converted;
    const ConstTensorView<S> cat = in_format<S>(cat_, t.memory_format(), converted);
    return in_cv2([&] { return cv2_.forward_train(cat); });
  }
  /// Eval forward (running statistics), no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    const Tensor<S> t = in_cv1([&] { return cv1_.forward_eval(x); });
    const Tensor<S> y1 = max_pool_same<S>(t, k_), y2 = max_pool_same<S>(y1, k_), y3 = max_pool_same<S>(y2, k_);
    const Tensor<S> cat = concat<S>({t, y1, y2, y3}, "SPPF");
    return in_cv2([&] { return cv2_.forward_eval(cat); });
  }
  /// Backward of the last forward_train: each pool's gradient goes to the position of its
  /// maximum, and the four branches' gradients are summed into cv1's output gradient.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    if (!has_forward_) throw state_error("SPPF::backward: call forward_train first");
    Tensor<S> g = in_cv2([&] { return cv2_.backward(grad_out); });
    Tensor<S> gc;
    const ConstTensorView<S> gv = contiguous<S>(g, gc);
    const Shape& s = t_.sizes();
    const std::int64_t N = s[0], C = s[1], P = s[2] * s[3];
    // d of each of the four concatenated maps; chained pools: dy3 -> dy2 -> dy1 -> dt.
    dt_.resize(s);
    std::vector<S> acc(std::size_t(N * C * P));
    auto part = [&](int j, std::int64_t n, std::int64_t c, std::int64_t p) { return gv[(n * 4 * C + j * C + c) * P + p]; };
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t p = 0; p < P; ++p) acc[std::size_t((n * C + c) * P + p)] = part(3, n, c, p);
    for (int j = 2; j >= 0; --j) {  // acc holds d(pool j output); route it to pool j's input
      std::vector<S> d(acc.size(), S(0));
      const auto& arg = arg_[std::size_t(j)];
      for (std::size_t i = 0; i < acc.size(); ++i) d[std::size_t(arg[i])] += acc[i];
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t p = 0; p < P; ++p) d[std::size_t((n * C + c) * P + p)] += part(j, n, c, p);
      acc.swap(d);
    }
    std::copy(acc.begin(), acc.end(), dt_.data());
    return in_cv1([&] { return cv1_.backward(dt_); });
  }
  /// "c1, c2, k=<pool size>" (printing, blocks/module_tree.hpp).
  std::string extra_repr() const {
    return orepa::detail::cat(cv1_.geometry().in_channels, ", ", cv2_.geometry().out_channels, ", k=", k_);
  }
  /// Calls `v` on cv1 and cv2.
  void visit_children(ModuleVisitor<S>& v) {
    v("cv1", cv1_);
    v("cv2", cv2_);
  }
  /// cv1's tensors, then cv2's (YOLOv5's module paths).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    cv1_.collect_tensors(out, prefix + "cv1.");
    cv2_.collect_tensors(out, prefix + "cv2.");
  }
  /// Both blocks deployed (a snapshot of the current weights).
  DeployedSPPF<S> deploy() const { return DeployedSPPF<S>(cv1_.deploy(), cv2_.deploy(), k_); }

 private:
  // f(), a call of cv1 or cv2: its errors name the block (core/error_path.hpp).
  template <class F>
  auto in_cv1(F&& f) const {
    return orepa::detail::in_child("SPPF", "cv1", cv1_, std::forward<F>(f));
  }
  template <class F>
  auto in_cv2(F&& f) const {
    return orepa::detail::in_child("SPPF", "cv2", cv2_, std::forward<F>(f));
  }
  static std::int64_t checked(std::int64_t c1, std::int64_t c2, std::int64_t k) {
    orepa::detail::yolo::require_positive("SPPF", "c2", c2);
    if (c1 < 2) throw config_error(orepa::detail::cat("SPPF: c1 must be >= 2 (cv1 has c1 / 2 channels), got ", c1));
    if (k < 1 || k % 2 == 0) throw config_error(orepa::detail::cat("SPPF: the pool size k must be odd and >= 1, got ", k));
    return c1 / 2;
  }
  SPPF(std::int64_t c, std::int64_t k, AnyBlock<S> cv1, AnyBlock<S> cv2)
      : c_(c), k_(k), cv1_(std::move(cv1)), cv2_(std::move(cv2)) {}
  void pool_train(const Tensor<S>& in, int j) {
    const auto s = detail::strides4(in.sizes(), MemoryFormat::contiguous);
    pooled_[std::size_t(j)].resize(in.sizes());
    arg_[std::size_t(j)].resize(std::size_t(in.numel()));
    detail::max_pool_same(in.data(), pooled_[std::size_t(j)].data(), in.sizes(), s, s, k_, std::less<S>(),
                          arg_[std::size_t(j)].data());
  }

  std::int64_t c_, k_;
  AnyBlock<S> cv1_, cv2_;
  Tensor<S> t_, cat_, dt_;
  std::array<Tensor<S>, 3> pooled_;
  std::array<std::vector<std::int64_t>, 3> arg_;  // each pool's argmax (flat NCHW index into its input)
  bool has_forward_ = false;
};

/// The deployed Upsample: the same nearest-neighbour copy, on float or on codes.
template <class S>
class DeployedUpsample {
 public:
  /// Upsampling by `factor`.
  explicit DeployedUpsample(std::int64_t factor) : factor_(factor) {}
  /// x upsampled (x's memory format).
  Tensor<S> forward(ConstTensorView<S> x) const { return upsample_nearest<S>(x, factor_); }
  /// Channels-last, though every format is read as it is.
  MemoryFormat preferred_format(const Shape&) const { return MemoryFormat::channels_last; }
  /// Codes stay codes in their quantization; float stays float unless `out` asks for codes.
  StageOutput<S> forward_int8(StageInput<S> x, const QuantParams* out) const {
    if (const auto* c = std::get_if<const Int8Codes*>(&x); c && (!out || **c == *out))
      return upsample_nearest_codes(**c, factor_);
    return forward_int8_through_float<S>(x, out, [&](ConstTensorView<S> v) { return forward(v); });
  }

 private:
  std::int64_t factor_;
};

/// Nearest-neighbour upsampling by an integer factor (YOLOv5's nn.Upsample(None, 2,
/// 'nearest')); backward sums each f x f block of the output gradient.
template <class S>
class Upsample : public ModuleTensors<Upsample<S>, S> {
 public:
  /// Throws config_error unless factor >= 1.
  explicit Upsample(std::int64_t factor = 2) : factor_(factor) {
    if (factor < 1) throw config_error(orepa::detail::cat("Upsample: scale_factor must be an integer >= 1, got ", factor));
  }
  /// Another Upsample of the same factor.
  Upsample clone() const { return Upsample(factor_); }
  /// "Upsample".
  std::string type_name() const { return "Upsample"; }
  /// The scale factor.
  std::int64_t factor() const { return factor_; }
  /// Training forward: an alias of the layer's buffer.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    y_ = upsample_nearest<S>(x, factor_);
    in_ = x.sizes();
    return y_.alias();
  }
  /// Eval forward.
  Tensor<S> forward_eval(ConstTensorView<S> x) const { return upsample_nearest<S>(x, factor_); }
  /// dL/dx (in grad_out's memory format): the sum of each factor x factor block of the
  /// output gradient.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    if (in_.empty()) throw state_error("Upsample::backward: call forward_train first");
    const std::int64_t N = in_[0], C = in_[1], H = in_[2], W = in_[3], f = factor_;
    grad_out.expect_shape({N, C, H * f, W * f}, "Upsample::backward grad_output");
    dx_.resize(in_, grad_out.memory_format());
    const auto sx = detail::strides4(in_, dx_.memory_format());
    const auto sg = detail::strides4(grad_out.sizes(), grad_out.memory_format());
    const S* g = grad_out.data();
    S* dx = dx_.data();
    parallel_ranges(N * H, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t nh = b; nh < e; ++nh) {
        const std::int64_t n = nh / H, h = nh % H;
        for (std::int64_t w = 0; w < W; ++w)
          for (std::int64_t c = 0; c < C; ++c) {
            S sum = 0;
            const S* block = g + n * sg[0] + c * sg[1] + h * f * sg[2] + w * f * sg[3];
            for (std::int64_t i = 0; i < f; ++i)
              for (std::int64_t j = 0; j < f; ++j) sum += block[i * sg[2] + j * sg[3]];
            dx[n * sx[0] + c * sx[1] + h * sx[2] + w * sx[3]] = sum;
          }
      }
    });
    return dx_.alias();
  }
  /// No tensors.
  void collect_tensors(Tensors<S>&, const std::string&) {}
  /// "scale_factor=f, mode=nearest" (printing, blocks/module_tree.hpp).
  std::string extra_repr() const { return orepa::detail::cat("scale_factor=", factor_, ", mode=nearest"); }
  /// The deployed form.
  DeployedUpsample<S> deploy() const { return DeployedUpsample<S>(factor_); }

 private:
  std::int64_t factor_;
  Shape in_;
  Tensor<S> y_, dx_;
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// The sigmoid of n values (y may be x): oneDNN's vector kernel for float.
template <class S>
void sigmoid(const S* x, S* y, std::int64_t n) {
  if constexpr (std::is_same_v<S, float>) engine::logistic(x, y, n);
  else
    for (std::int64_t i = 0; i < n; ++i) y[i] = S(1) / (S(1) + std::exp(-x[i]));
}

// The box columns of decoded row p at cell (x, y), its first four values holding the
// sigmoid: xy = (2 sigmoid - 0.5 + cell) stride, wh = (2 sigmoid)^2 anchor (pixels).
template <class S>
inline void decode_box(S* p, S x, S y, S stride, S anchor_w, S anchor_h) {
  const S sx = p[0], sy = p[1], sw = p[2], sh = p[3];
  p[0] = (sx * 2 - S(0.5) + x) * stride;
  p[1] = (sy * 2 - S(0.5) + y) * stride;
  p[2] = (sw * 2) * (sw * 2) * anchor_w;
  p[3] = (sh * 2) * (sh * 2) * anchor_h;
}

// Decodes a level of `raw` [N, na, H, W, no] into `pred` [N, rows, no] from row `row0`:
// the level's rows run (a, y, x), so image n's part is raw[n]'s values in order and its
// sigmoid is one call; then the box columns of every cell.
template <class S>
void decode_level(const Tensor<S>& raw, Tensor<S>& pred, std::int64_t row0, S stride, const S* anchors) {
  const std::int64_t N = raw.size(0), na = raw.size(1), H = raw.size(2), W = raw.size(3), no = raw.size(4);
  const std::int64_t per_image = na * H * W * no, rows = pred.size(1);
  for (std::int64_t n = 0; n < N; ++n) sigmoid(raw.data() + n * per_image, pred.data() + (n * rows + row0) * no, per_image);
  parallel_ranges(N * na * H, [&](std::int64_t b, std::int64_t e, int) {
    for (std::int64_t r = b; r < e; ++r) {
      const std::int64_t n = r / (na * H), a = (r / H) % na, y = r % H;
      S* p = pred.data() + (n * rows + row0 + (a * H + y) * W) * no;
      const S aw = anchors[2 * a] * stride, ah = anchors[2 * a + 1] * stride;
      for (std::int64_t x = 0; x < W; ++x, p += no) decode_box(p, S(x), S(y), stride, aw, ah);
    }
  });
}

// Row (n, a, h) of a Detect level's convolution output y [N, na * no, H, W] (any format,
// strides s): its W cells' no values of anchor a, to dst [W, no].
template <class S>
void gather_row(ConstTensorView<S> y, const std::array<std::int64_t, 4>& s, std::int64_t n, std::int64_t a,
                std::int64_t h, std::int64_t no, S* dst) {
  const S* src = y.data() + n * s[0] + a * no * s[1] + h * s[2];
  for (std::int64_t w = 0; w < y.size(3); ++w, dst += no)
    if (s[1] == 1) orepa::detail::copy_run(src + w * s[3], no, dst);  // channels-last: a pixel's anchor is one run
    else
      for (std::int64_t j = 0; j < no; ++j) dst[j] = src[w * s[3] + j * s[1]];
}

// Rows (n, a, y) in [first, first + rows) of a level's decoded rows, written into `pred`
// [N, rows, no] from row `row0`, from its convolution's output `sig` [N, na * no, H, W]
// (any format) with the sigmoid already applied: moved into place, box columns decoded.
template <class S>
void decode_sigmoid_rows(ConstTensorView<S> sig, Tensor<S>& pred, std::int64_t row0, std::int64_t first,
                         std::int64_t rows, std::int64_t na, std::int64_t no, S stride, const S* anchors) {
  const std::int64_t H = sig.size(2), W = sig.size(3);
  const auto s = strides4(sig.sizes(), sig.memory_format());
  for (std::int64_t r = first; r < first + rows; ++r) {
    const std::int64_t n = r / (na * H), a = (r / H) % na, h = r % H;
    S* p = pred.data() + (n * pred.size(1) + row0 + (a * H + h) * W) * no;
    gather_row(sig, s, n, a, h, no, p);
    const S aw = anchors[2 * a] * stride, ah = anchors[2 * a + 1] * stride;
    for (std::int64_t w = 0; w < W; ++w, p += no) decode_box(p, S(w), S(h), stride, aw, ah);
  }
}

// Rows (n, a, y) in [first, first + rows) of the raw map [N, na, H, W, no] gathered from
// a Detect level's convolution output y [N, na * no, H, W] (any format).
template <class S>
void gather_raw_rows(ConstTensorView<S> y, S* raw, std::int64_t first, std::int64_t rows, std::int64_t na,
                     std::int64_t no) {
  const std::int64_t H = y.size(2), W = y.size(3);
  const auto s = strides4(y.sizes(), y.memory_format());
  for (std::int64_t r = first; r < first + rows; ++r)
    gather_row(y, s, r / (na * H), (r / H) % na, r % H, no, raw + r * W * no);
}

// The shape of the decoded output [N, sum na H W, no] for maps of these [N, na, H, W, no]
// shapes, and each level's first row in it.
inline std::pair<Shape, std::vector<std::int64_t>> decoded_shape(const std::vector<Shape>& maps) {
  std::vector<std::int64_t> row0;
  std::int64_t rows = 0;
  for (const auto& m : maps) row0.push_back(rows), rows += m[1] * m[2] * m[3];
  return {Shape{maps.at(0)[0], rows, maps[0][4]}, row0};
}
}  // namespace detail
/// \endcond

/// YOLOv5's decode of raw Detect maps (the sigmoid applied): for map i
/// [N, na, H, W, no] of stride s_i and anchors a_i (pixels), every cell gives
/// xy = (2 sigmoid - 0.5 + (x, y)) s_i, wh = (2 sigmoid)^2 a_i, and the sigmoid of the
/// objectness and class logits; the rows of all maps in order (level, anchor, y, x)
/// make [N, sum na H W, no]. `anchors_grid` [nl * na, 2] is in grid units.
template <class S>
Tensor<S> decode_detections(const std::vector<Tensor<S>>& raw, const std::vector<double>& strides,
                            const Tensor<S>& anchors_grid) {
  std::vector<Shape> shapes;
  for (const auto& r : raw) shapes.push_back(r.sizes());
  const auto [shape, row0] = detail::decoded_shape(shapes);
  Tensor<S> pred;
  pred.resize(shape);
  for (std::size_t i = 0; i < raw.size(); ++i)
    detail::decode_level(raw[i], pred, row0[i], S(strides[i]), anchors_grid.data() + std::int64_t(i) * raw[i].size(1) * 2);
  return pred;
}

/// What Detect gives in eval and deploy: the decoded rows and the raw maps.
template <class S>
struct DetectOutput {
  Tensor<S> pred;             ///< [N, sum na H W, 5 + nc], decode_detections
  std::vector<Tensor<S>> raw;  ///< per level [N, na, H, W, 5 + nc], before the sigmoid
};

/// The decoded rows: what quantization_report compares end to end.
inline const Tensor<float>& network_output(const DetectOutput<float>& o) { return o.pred; }

/// The deployed Detect: one deployed 1x1 convolution (with bias, no activation) per level.
template <class S>
class DeployedDetect {
 public:
  /// The levels' convolutions, anchors [nl, na, 2] in grid units, strides, outputs per anchor.
  DeployedDetect(std::vector<AnyDeployed<S>> convs, Tensor<S> anchors, std::vector<double> strides, std::int64_t no)
      : convs_(std::move(convs)), anchors_(std::move(anchors)), strides_(std::move(strides)), no_(no),
        sigmoid_convs_(with_sigmoid(convs_)) {}
  /// Raw maps and decoded rows for the levels' inputs (each float or codes in its conv's
  /// int8_input()).
  DetectOutput<S> forward(const std::vector<StageInput<S>>& xs) const {
    std::vector<Tensor<S>> ys = run_convs(convs_, xs);
    const auto [shape, row0] = detail::decoded_shape(map_shapes(ys));
    DetectOutput<S> out;
    out.pred.resize(shape);
    const std::int64_t na = anchors_.size(1);
    for (std::size_t i = 0; i < ys.size(); ++i) {
      Tensor<S> raw;
      raw.resize({shape[0], na, ys[i].size(2), ys[i].size(3), no_});
      const ConstTensorView<S> y = ys[i];
      parallel_ranges(shape[0] * na * raw.size(2),
                      [&](std::int64_t b, std::int64_t e, int) { detail::gather_raw_rows<S>(y, raw.data(), b, e - b, na, no_); });
      ys[i] = Tensor<S>();
      detail::decode_level(raw, out.pred, row0[i], S(strides_[i]), anchors_.data() + std::int64_t(i) * na * 2);
      out.raw.push_back(std::move(raw));
    }
    return out;
  }
  /// forward(xs).pred alone, without the raw maps, in less time: each level's convolution
  /// applies the sigmoid in its primitive, and one pass moves its rows into place and
  /// decodes their boxes (no separate sigmoid pass). Heads whose levels are not plain
  /// deployed convolutions without activation take forward()'s way.
  Tensor<S> predict(const std::vector<StageInput<S>>& xs) const {
    if (sigmoid_convs_.empty()) return forward(xs).pred;
    const std::vector<Tensor<S>> ys = run_convs(sigmoid_convs_, xs);
    const auto [shape, row0] = detail::decoded_shape(map_shapes(ys));
    Tensor<S> pred;
    pred.resize(shape);
    const std::int64_t na = anchors_.size(1);
    for (std::size_t i = 0; i < ys.size(); ++i) {
      const ConstTensorView<S> y = ys[i];
      const S* anchors = anchors_.data() + std::int64_t(i) * na * 2;
      const std::int64_t first_row = row0[i];  // a structured binding cannot be captured (C++17)
      parallel_ranges(shape[0] * na * y.size(2), [&](std::int64_t b, std::int64_t e, int) {
        detail::decode_sigmoid_rows<S>(y, pred, first_row, b, e - b, na, no_, S(strides_[i]), anchors);
      });
    }
    return pred;
  }
  /// Level i's convolution.
  const AnyDeployed<S>& conv(std::size_t i) const { return convs_.at(i); }
  /// Number of levels.
  std::size_t levels() const { return convs_.size(); }
  /// Weights plus biases.
  std::int64_t num_parameters() const {
    std::int64_t n = 0;
    for (const auto& c : convs_) n += c.num_parameters();
    return n;
  }
  /// Visits level i's convolution as `prefix` + "m.i.".
  void visit_convs(const std::string& prefix, const ConvVisitor<S>& f) const {
    for (std::size_t i = 0; i < convs_.size(); ++i) convs_[i].visit_convs(prefix + "m." + std::to_string(i) + ".", f);
  }
  /// The head with every convolution mapped by `f`.
  DeployedDetect map_convs(const std::string& prefix, const ConvMapper<S>& f) const {
    std::vector<AnyDeployed<S>> c;
    for (std::size_t i = 0; i < convs_.size(); ++i) c.push_back(convs_[i].map_convs(prefix + "m." + std::to_string(i) + ".", f));
    return DeployedDetect(std::move(c), anchors_, strides_, no_);
  }

 private:
  // Each level's convolution output [N, na * no, H, W] (float, any format).
  static std::vector<Tensor<S>> run_convs(const std::vector<AnyDeployed<S>>& convs, const std::vector<StageInput<S>>& xs) {
    std::vector<Tensor<S>> ys;
    for (std::size_t i = 0; i < convs.size(); ++i) {
      StageOutput<S> y = std::holds_alternative<const Int8Codes*>(xs.at(i)) || convs[i].int8_input()
                             ? convs[i].forward_int8(xs[i], nullptr)
                             : StageOutput<S>(convs[i].forward(std::get<ConstTensorView<S>>(xs[i])));
      ys.push_back(std::move(std::get<Tensor<S>>(y)));
    }
    return ys;
  }
  // The raw map shapes [N, na, H, W, no] of the levels' convolution outputs.
  std::vector<Shape> map_shapes(const std::vector<Tensor<S>>& ys) const {
    std::vector<Shape> maps;
    for (const auto& y : ys) maps.push_back({y.size(0), anchors_.size(1), y.size(2), y.size(3), no_});
    return maps;
  }
  // The levels' convolutions with the sigmoid as their activation, in their precision and
  // input range; none when a level is not a plain DeployedConv without activation.
  static std::vector<AnyDeployed<S>> with_sigmoid(const std::vector<AnyDeployed<S>>& convs) {
    std::vector<AnyDeployed<S>> out;
    for (const auto& c : convs) {
      const DeployedConv<S>* d = c.template target<DeployedConv<S>>();
      if (!d || d->activation().kind() != ActivationKind::identity) return {};
      DeployedConv<S> s(d->geometry(), d->weight(), d->bias(), Sigmoid{});
      s.layout(d->layout());
      if (d->precision() != Precision::fp32) s.precision(d->precision(), d->input_range());
      out.emplace_back(std::move(s));
    }
    return out;
  }

  std::vector<AnyDeployed<S>> convs_;
  Tensor<S> anchors_;
  std::vector<double> strides_;
  std::int64_t no_;
  std::vector<AnyDeployed<S>> sigmoid_convs_;  // convs_ with the sigmoid fused: predict()
};

/// YOLOv5's Detect head: per level i a 1x1 convolution with bias from ch[i] to na (5 + nc)
/// channels (`m.i.weight` [na no, ch_i, 1, 1], `m.i.bias`), and the buffer `anchors`
/// [nl, na, 2] in grid units. Initialised as YOLOv5 does (PyTorch's default conv init,
/// then _initialize_biases: objectness bias + log(8 / (640 / s)^2), class biases
/// + log(0.6 / (nc - 0.99))); strides are the model's (not in the state dict).
template <class S>
class Detect : public ModuleTensors<Detect<S>, S> {
 public:
  /// `nc` classes, `anchors_px` per level the anchor (w, h) pairs in pixels, `ch` per
  /// level the input channels, `strides` per level. Throws config_error on mismatched or
  /// non-positive sizes.
  Detect(std::int64_t nc, const std::vector<std::vector<double>>& anchors_px, const std::vector<std::int64_t>& ch,
         const std::vector<double>& strides, std::uint64_t seed = 0)
      : nc_(nc), no_(nc + 5), strides_(strides) {
    const std::size_t nl = anchors_px.size();
    if (nc < 1) throw config_error(orepa::detail::cat("Detect: nc must be >= 1, got ", nc));
    if (nl == 0 || ch.size() != nl || strides.size() != nl)
      throw config_error(orepa::detail::cat("Detect: ", nl, " anchor levels, ", ch.size(), " inputs and ", strides.size(),
                                            " strides must agree (and be > 0)"));
    na_ = std::int64_t(anchors_px[0].size() / 2);
    anchors_ = Param<S>(Tensor<S>({std::int64_t(nl), na_, 2}), ParamKind::buffer);
    Rng rng(seed);
    for (std::size_t i = 0; i < nl; ++i) {
      if (anchors_px[i].size() != std::size_t(2 * na_) || na_ < 1)
        throw config_error(orepa::detail::cat("Detect: every level needs the same number of (w, h) anchor pairs; level ",
                                              i, " has ", anchors_px[i].size(), " numbers"));
      if (!(strides[i] > 0)) throw config_error(orepa::detail::cat("Detect: stride ", i, " must be > 0"));
      for (std::int64_t a = 0; a < 2 * na_; ++a) {
        const double v = anchors_px[i][std::size_t(a)];
        if (!(v > 0)) throw config_error(orepa::detail::cat("Detect: anchor sizes must be > 0, level ", i, " has ", v));
        anchors_.value[std::int64_t(i) * na_ * 2 + a] = S(v / strides[i]);
      }
      orepa::detail::yolo::require_positive("Detect", "input channels", ch[i]);
      Level l{Param<S>(Tensor<S>({na_ * no_, ch[i], 1, 1}), ParamKind::kernel),
              Param<S>(Tensor<S>({na_ * no_}), ParamKind::bias), Tensor<S>(), Tensor<S>(), Tensor<S>()};
      // PyTorch's Conv2d default: kaiming_uniform(a = sqrt(5)) and bias U(+-1/sqrt(fan_in)).
      kaiming_uniform(l.weight.value, std::sqrt(5.0), rng);
      fill_uniform(l.bias.value, 1.0 / std::sqrt(double(ch[i])), rng);
      for (std::int64_t a = 0; a < na_; ++a) {
        l.bias.value[a * no_ + 4] += S(std::log(8.0 / std::pow(640.0 / strides[i], 2)));
        for (std::int64_t c = 0; c < nc; ++c) l.bias.value[a * no_ + 5 + c] += S(std::log(0.6 / (double(nc) - 0.99)));
      }
      levels_.push_back(std::move(l));
    }
  }
  /// Move constructor.
  Detect(Detect&&) noexcept = default;
  /// Move assignment.
  Detect& operator=(Detect&&) noexcept = default;
  Detect& operator=(const Detect&) = delete;
  /// Another Detect with the same tensors and settings, nothing saved for backward.
  Detect clone() const { return Detect(*this); }

  /// "Detect".
  std::string type_name() const { return "Detect"; }
  /// Number of levels.
  std::int64_t levels() const { return std::int64_t(levels_.size()); }
  /// Anchors per level.
  std::int64_t anchors_per_level() const { return na_; }
  /// Classes.
  std::int64_t classes() const { return nc_; }
  /// Outputs per anchor, 5 + nc.
  std::int64_t outputs() const { return no_; }
  /// The strides of the levels.
  const std::vector<double>& strides() const { return strides_; }
  /// The anchors [nl, na, 2] in grid units (a buffer: loading a checkpoint sets them).
  const Tensor<S>& anchors() const { return anchors_.value; }

  /// Training forward: the raw maps [N, na, H_i, W_i, no] of the levels' inputs.
  std::vector<Tensor<S>> forward_train(const std::vector<ConstTensorView<S>>& xs) {
    check_inputs(xs, "Detect::forward_train");
    std::vector<Tensor<S>> raw;
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      levels_[i].x.assign(xs[i], MemoryFormat::channels_last);
      raw.push_back(raw_map(i, levels_[i].x, levels_[i].rows));
    }
    has_forward_ = true;
    return raw;
  }
  /// Eval forward: raw maps and decoded rows.
  DetectOutput<S> forward_eval(const std::vector<ConstTensorView<S>>& xs) const {
    check_inputs(xs, "Detect::forward_eval");
    DetectOutput<S> out;
    Tensor<S> x, rows;
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      x.assign(xs[i], MemoryFormat::channels_last);
      out.raw.push_back(raw_map(i, x, rows));
    }
    out.pred = decode_detections(out.raw, strides_, anchors_.value.reshaped({levels() * na_, 2}));
    return out;
  }
  /// Backward of the last forward_train for d loss / d raw map i: accumulates the weight
  /// and bias gradients and returns d loss / d input i (channels-last) per level.
  std::vector<Tensor<S>> backward(const std::vector<ConstTensorView<S>>& grad_maps) {
    if (!has_forward_) throw state_error("Detect::backward: call forward_train first");
    if (grad_maps.size() != levels_.size())
      throw shape_error(orepa::detail::cat("Detect::backward: ", levels_.size(), " gradient maps expected, got ",
                                           grad_maps.size()));
    std::vector<Tensor<S>> dx;
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      Level& l = levels_[i];
      const std::int64_t N = l.x.size(0), C = l.x.size(1), H = l.x.size(2), W = l.x.size(3), R = N * H * W;
      const std::int64_t O = na_ * no_;
      grad_maps[i].expect_shape({N, na_, H, W, no_}, orepa::detail::cat("Detect::backward gradient map ", i));
      // dy: the gradient of the convolution's rows [N H W, na no] (the raw map's anchor
      // axis moved back in), so each product below is one plain matrix product.
      Tensor<S>& dy = l.dy;
      dy.resize({R, O});  // every element written below
      const std::int64_t P = H * W;
      parallel_ranges(N * na_, [&](std::int64_t b, std::int64_t e, int) {
        for (std::int64_t r = b; r < e; ++r) {
          const std::int64_t n = r / na_, a = r % na_;
          const S* g = grad_maps[i].data() + r * P * no_;
          for (std::int64_t p = 0; p < P; ++p)
            std::copy(g + p * no_, g + (p + 1) * no_, dy.data() + (n * P + p) * O + a * no_);
        }
      });
      const auto gemm = engine::fast_gemm<S>();
      // dW [O, C] += dy^T [O, R] x [R, C]
      gemm(branches::gemm_dims(O, C, R, {0, 1, O}, {0, C, 1}, {0, C, 1}, true), dy.data(), l.x.data(),
           l.weight.grad.data());
      // d bias [O] += the column sums of dy: per thread over its rows, then added up.
      std::vector<S> sums(std::size_t(max_range_threads() * O), S(0));
      parallel_ranges(R, [&](std::int64_t b, std::int64_t e, int t) {
        S* acc = sums.data() + t * O;
        const S* g = dy.data();
        for (std::int64_t r = b; r < e; ++r) {
          OREPA_SIMD
          for (std::int64_t o = 0; o < O; ++o) acc[o] += g[r * O + o];
        }
      });
      for (int t = 0; t < max_range_threads(); ++t)
        for (std::int64_t o = 0; o < O; ++o) l.bias.grad[o] += sums[std::size_t(t * O + o)];
      // dx [R, C] = dy [R, O] W [O, C]: channels-last.
      Tensor<S> d;
      d.resize({N, C, H, W}, MemoryFormat::channels_last);
      gemm(branches::gemm_dims(R, C, O, {0, O, 1}, {0, C, 1}, {0, C, 1}), dy.data(), l.weight.value.data(), d.data());
      dx.push_back(std::move(d));
    }
    return dx;
  }
  /// "nc=<classes>, anchors=<per level>, ch=[...], strides=[...]" (printing,
  /// blocks/module_tree.hpp).
  std::string extra_repr() const {
    std::string ch, st;
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      ch += orepa::detail::cat(i ? ", " : "", levels_[i].weight.value.size(1));
      st += orepa::detail::cat(i ? ", " : "", strides_[i]);
    }
    return orepa::detail::cat("nc=", nc_, ", anchors=", na_, ", ch=[", ch, "], strides=[", st, "]");
  }
  /// `m.i.weight`, `m.i.bias` per level, then the buffer `anchors` (YOLOv5's order).
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    for (std::size_t i = 0; i < levels_.size(); ++i) {
      out.add(prefix + "m." + std::to_string(i) + ".weight", levels_[i].weight);
      out.add(prefix + "m." + std::to_string(i) + ".bias", levels_[i].bias);
    }
    out.add(prefix + "anchors", anchors_);
  }
  /// The deployed head (a snapshot): one deployed 1x1 convolution per level.
  DeployedDetect<S> deploy() const {
    std::vector<AnyDeployed<S>> convs;
    for (const auto& l : levels_) {
      ConvGeometry g;
      g.in_channels = l.weight.value.size(1);
      g.out_channels = na_ * no_;
      g.kernel = 1;
      convs.push_back(DeployedConv<S>(g, l.weight.value, l.bias.value));
    }
    return DeployedDetect<S>(std::move(convs), anchors_.value, strides_, no_);
  }

 private:
  struct Level {
    Param<S> weight, bias;
    Tensor<S> x;        // the input of the last forward_train (channels-last)
    Tensor<S> rows, dy;  // training scratch: the convolution's output rows, their gradient
  };
  Detect(const Detect& o)  // clone(): never copied silently
      : nc_(o.nc_), no_(o.no_), na_(o.na_), strides_(o.strides_), anchors_(o.anchors_) {
    for (const auto& l : o.levels_) levels_.push_back(Level{l.weight, l.bias, Tensor<S>(), Tensor<S>(), Tensor<S>()});
  }
  void check_inputs(const std::vector<ConstTensorView<S>>& xs, const char* who) const {
    if (xs.size() != levels_.size())
      throw shape_error(orepa::detail::cat(who, ": ", levels_.size(), " inputs expected, got ", xs.size()));
    for (std::size_t i = 0; i < xs.size(); ++i)
      detail::require_nchw(xs[i].sizes(), levels_[i].weight.value.size(1), orepa::detail::cat(who, " input ", i));
  }
  // Level i's raw map [N, na, H, W, no] of x (channels-last): the rows x [N H W, C] times
  // the kernel [na no, C] transposed, one matrix product (into `rows`, scratch), then the
  // anchor axis moved out with the bias added.
  Tensor<S> raw_map(std::size_t i, const Tensor<S>& x, Tensor<S>& rows) const {
    const Level& l = levels_[i];
    const std::int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = H * W, O = na_ * no_;
    Tensor<S> raw;  // every element written below
    rows.resize({N * P, O});
    raw.resize({N, na_, H, W, no_});
    engine::fast_gemm<S>()(branches::gemm_dims(N * P, O, C, {0, C, 1}, {0, 1, C}, {0, O, 1}), x.data(),
                   l.weight.value.data(), rows.data());
    parallel_ranges(N * na_, [&](std::int64_t b, std::int64_t e, int) {
      for (std::int64_t r = b; r < e; ++r) {
        const std::int64_t n = r / na_, a = r % na_;
        const S* bias = l.bias.value.data() + a * no_;
        S* out = raw.data() + r * P * no_;
        for (std::int64_t p = 0; p < P; ++p) {
          const S* in = rows.data() + (n * P + p) * O + a * no_;
          for (std::int64_t j = 0; j < no_; ++j) out[p * no_ + j] = in[j] + bias[j];
        }
      }
    });
    return raw;
  }

  std::int64_t nc_, no_, na_ = 0;
  std::vector<double> strides_;
  Param<S> anchors_;
  std::vector<Level> levels_;
  bool has_forward_ = false;
};

}  // namespace orepa::yolo
