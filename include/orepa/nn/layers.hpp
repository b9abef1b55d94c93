#pragma once
/// @file layers.hpp
/// The small non-convolutional pieces of a classifier; the first two are layers (the
/// members of blocks/block.hpp but folded() and geometry()):
///   - `GlobalAvgPool<S>`: NCHW -> [N, C] (mean over each plane);
///   - `Linear<S>`: y = x W^T + b, PyTorch nn.Linear's layout and initialisation;
///   - `SoftmaxCrossEntropy<S>`: mean cross-entropy of logits against integer labels.
/// forward_train and backward return references to buffers the layer reuses (valid
/// until its next call of the same function); forward_eval never changes the layer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "orepa/blocks/module.hpp"
#include "orepa/core/error.hpp"
#include "orepa/core/random.hpp"

namespace orepa {

/// The deployed form of a layer without convolutions: a copy of it (a snapshot of its
/// weights) running forward_eval.
template <class Layer>
struct EvalSnapshot {
  Layer layer;  ///< the copied layer
  /// The layer's type_name() ("GlobalAvgPool", "Linear").
  std::string type_name() const { return layer.type_name(); }
  /// layer.forward_eval(x).
  template <class X>
  auto forward(const X& x) const {
    return layer.forward_eval(x);
  }
  /// The layer's preferred_format(x_shape): a layer that has one reads every memory format.
  template <class L = Layer>
  auto preferred_format(const Shape& x_shape) const -> decltype(std::declval<const L&>().preferred_format(x_shape)) {
    return layer.preferred_format(x_shape);
  }
  /// Elements of the layer's parameters (its own copy, so reading it changes nothing).
  std::int64_t num_parameters() const {
    std::int64_t n = 0;
    for (auto* p : const_cast<Layer&>(layer).parameters()) n += p->value.numel();
    return n;
  }
};

/// Global average pooling: [N, C, H, W] -> [N, C], y[n, c] = mean of plane (n, c).
/// No parameters.
template <class S>
class GlobalAvgPool : public ModuleTensors<GlobalAvgPool<S>, S> {
 public:
  /// "GlobalAvgPool".
  std::string type_name() const { return "GlobalAvgPool"; }
  /// Another pooling layer (it has no parameters).
  GlobalAvgPool clone() const { return GlobalAvgPool(); }
  /// Pools `x` (the result is an alias of the layer's buffer); remembers the input shape for backward.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    check_input(x, "GlobalAvgPool::forward_train input");
    pool(x, y_);  // any memory format
    in_shape_ = x.sizes();
    has_forward_ = true;
    return y_.alias();
  }
  /// Same computation, no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    check_input(x, "GlobalAvgPool::forward_eval input");
    Tensor<S> y;
    pool(x, y);
    return y;
  }
  /// Contiguous, though every memory format is read as it is (the pooling has no
  /// preference worth a conversion).
  MemoryFormat preferred_format(const Shape&) const { return MemoryFormat::contiguous; }
  /// dL/dx (NCHW): every element of plane (n, c) receives grad_out[n, c] / (H * W).
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    if (!has_forward_) throw state_error("GlobalAvgPool::backward: call forward_train first");
    const std::int64_t N = in_shape_[0], C = in_shape_[1], P = in_shape_[2] * in_shape_[3];
    grad_out.expect_shape({N, C}, "GlobalAvgPool::backward grad_output");
    dx_.resize(in_shape_);
    const S inv = S(1) / S(P);
    for (std::int64_t nc = 0; nc < N * C; ++nc) std::fill_n(dx_.data() + nc * P, P, grad_out[nc] * inv);
    return dx_.alias();
  }
  /// No tensors.
  void collect_tensors(Tensors<S>&, const std::string&) {}
  /// The deployed form: the same pooling.
  EvalSnapshot<GlobalAvgPool> deploy() const { return {GlobalAvgPool()}; }

 private:
  static void check_input(ConstTensorView<S> x, const char* what) {
    if (x.dim() != 4 || x.size(0) < 1 || x.size(2) * x.size(3) < 1)
      throw shape_error(detail::cat(what, ": expected shape [N, C, H, W] with N >= 1 and H * W >= 1, got ",
                                    shape_str(x.sizes())));
  }
  static void pool(ConstTensorView<S> x, Tensor<S>& y) {
    const std::int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
    y.resize({N, C});
    // Sum in double: planes can be large and float sums drift with their length.
    if (x.is_contiguous()) {
      for (std::int64_t nc = 0; nc < N * C; ++nc) {
        const S* p = x.data() + nc * P;
        double s = 0;
        for (std::int64_t j = 0; j < P; ++j) s += double(p[j]);
        y[nc] = S(s / double(P));
      }
      return;
    }
    std::vector<double> sums(static_cast<std::size_t>(C));
    for (std::int64_t n = 0; n < N; ++n) {  // channels-last: the C channels of a pixel are adjacent
      std::fill(sums.begin(), sums.end(), 0.0);
      for (std::int64_t j = 0; j < P; ++j) {
        const S* px = x.data() + (n * P + j) * C;
        for (std::int64_t c = 0; c < C; ++c) sums[std::size_t(c)] += double(px[c]);
      }
      for (std::int64_t c = 0; c < C; ++c) y[n * C + c] = S(sums[std::size_t(c)] / double(P));
    }
  }

  Shape in_shape_;
  Tensor<S> y_, dx_;
  bool has_forward_ = false;
};

/// Fully connected layer y = x W^T + b for x [N, in]: weight [out, in] ("weight",
/// ParamKind::kernel) and bias [out] ("bias", ParamKind::bias), as torch.nn.Linear.
template <class S>
class Linear : public ModuleTensors<Linear<S>, S> {
 public:
  /// Initialised like torch.nn.Linear from `seed`: weight by kaiming_uniform with
  /// a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), then bias U(-1/sqrt(in), 1/sqrt(in)).
  /// Throws config_error unless both sizes are >= 1.
  Linear(std::int64_t in_features, std::int64_t out_features, std::uint64_t seed = 0) {
    if (in_features < 1 || out_features < 1)
      throw config_error(detail::cat("Linear: in_features and out_features must be >= 1, got ", in_features, " and ",
                                     out_features));
    weight_ = Param<S>(Tensor<S>({out_features, in_features}), ParamKind::kernel);
    bias_ = Param<S>(Tensor<S>({out_features}), ParamKind::bias);
    Rng rng(seed);
    kaiming_uniform(weight_.value, std::sqrt(5.0), rng);
    fill_uniform(bias_.value, 1.0 / std::sqrt(double(in_features)), rng);
  }
  Linear(const Linear&) = delete;  // never copied silently: std::move it, or clone() for a copy
  Linear& operator=(const Linear&) = delete;
  /// Move constructor.
  Linear(Linear&&) noexcept = default;
  /// Move assignment.
  Linear& operator=(Linear&&) noexcept = default;
  /// A deep copy of the weight and bias, nothing saved for backward.
  Linear clone() const { return Linear(*this, detail::CloneTag{}); }

  /// Input features (columns of the weight).
  std::int64_t in_features() const { return weight_.value.size(1); }
  /// Output features (rows of the weight).
  std::int64_t out_features() const { return weight_.value.size(0); }
  /// "in_features=I, out_features=O" (printing, blocks/module_tree.hpp).
  std::string extra_repr() const { return detail::cat("in_features=", in_features(), ", out_features=", out_features()); }
  /// The weight [out, in] with its gradient.
  Param<S>& weight() { return weight_; }
  /// Read-only weight [out, in].
  const Param<S>& weight() const { return weight_; }
  /// The bias [out] with its gradient.
  Param<S>& bias() { return bias_; }
  /// Read-only bias [out].
  const Param<S>& bias() const { return bias_; }

  /// "Linear".
  std::string type_name() const { return "Linear"; }

  /// y = x W^T + b into the layer's buffer; keeps a copy of x for backward.
  Tensor<S> forward_train(ConstTensorView<S> x) {
    check_input(x, "Linear::forward_train input");
    x_.assign(x);  // the caller's tensor (often another layer's buffer) may change before backward
    affine(x_, y_);
    has_forward_ = true;
    return y_.alias();
  }
  /// Same computation, no state change.
  Tensor<S> forward_eval(ConstTensorView<S> x) const {
    check_input(x, "Linear::forward_eval input");
    Tensor<S> y;
    affine(x, y);
    return y;
  }
  /// Accumulates dL/dW += dy^T x and dL/db += sum_n dy, returns dL/dx = dy W.
  Tensor<S> backward(ConstTensorView<S> grad_out) {
    if (!has_forward_) throw state_error("Linear::backward: call forward_train first");
    const std::int64_t N = x_.size(0), I = in_features(), O = out_features();
    grad_out.expect_shape({N, O}, "Linear::backward grad_output");
    const auto dy = grad_out.matrix(N, O);
    weight_.grad.matrix(O, I).noalias() += dy.transpose() * x_.matrix(N, I);
    bias_.grad.matrix(1, O) += dy.colwise().sum();
    dx_.resize({N, I});
    dx_.matrix(N, I).noalias() = dy * weight_.value.matrix(O, I);
    return dx_.alias();
  }
  /// `weight` and `bias` under `prefix`.
  void collect_tensors(Tensors<S>& out, const std::string& prefix) {
    out.add(prefix + "weight", weight_);
    out.add(prefix + "bias", bias_);
  }
  /// The deployed form: a snapshot copy running forward_eval.
  EvalSnapshot<Linear> deploy() const { return {clone()}; }

 private:
  Linear(const Linear& o, detail::CloneTag) : weight_(o.weight_), bias_(o.bias_) {}
  void check_input(ConstTensorView<S> x, const char* what) const {
    if (x.dim() != 2 || x.size(0) < 1 || x.size(1) != in_features())
      throw shape_error(detail::cat(what, ": expected shape [N, ", in_features(), "] with N >= 1, got ",
                                    shape_str(x.sizes())));
  }
  void affine(ConstTensorView<S> x, Tensor<S>& y) const {
    const std::int64_t N = x.size(0), I = in_features(), O = out_features();
    y.resize({N, O});
    auto Y = y.matrix(N, O);
    Y.noalias() = x.matrix(N, I) * weight_.value.matrix(O, I).transpose();
    Y.rowwise() += bias_.value.matrix(1, O).row(0);
  }

  Param<S> weight_, bias_;
  Tensor<S> x_, y_, dx_;
  bool has_forward_ = false;
};

/// Softmax + cross-entropy, torch.nn.CrossEntropyLoss with reduction "mean": for logits
/// [N, K] and labels in [0, K), loss = mean_n (logsumexp(z_n) - z_n[label_n]). Computed
/// with the row maximum subtracted, so large logits neither overflow nor lose the loss.
template <class S>
class SoftmaxCrossEntropy {
 public:
  /// Mean loss; keeps the softmax probabilities and the labels for backward.
  /// Throws shape_error on a logits / labels mismatch, config_error on a label outside [0, K).
  S forward_train(ConstTensorView<S> logits, const std::vector<int>& labels) {
    check(logits, labels, "SoftmaxCrossEntropy::forward_train");
    const S loss = compute(logits, labels, &prob_);
    labels_ = labels;
    has_forward_ = true;
    return loss;
  }
  /// Mean loss, no state change.
  S forward_eval(ConstTensorView<S> logits, const std::vector<int>& labels) const {
    check(logits, labels, "SoftmaxCrossEntropy::forward_eval");
    return compute(logits, labels, nullptr);
  }
  /// dL/dlogits of the last forward_train, (softmax - onehot) / N, times `grad_loss`
  /// (dL_total/dloss; 1 when the loss is the objective).
  Tensor<S> backward(S grad_loss = S(1)) {
    if (!has_forward_) throw state_error("SoftmaxCrossEntropy::backward: call forward_train first");
    const std::int64_t N = prob_.size(0), K = prob_.size(1);
    const S k = grad_loss / S(N);
    grad_.resize(prob_.sizes());
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t c = 0; c < K; ++c) grad_(n, c) = k * (prob_(n, c) - (c == labels_[std::size_t(n)] ? S(1) : S(0)));
    return grad_.alias();
  }
  /// The softmax probabilities [N, K] of the last forward_train.
  const Tensor<S>& probabilities() const { return prob_; }

 private:
  static void check(ConstTensorView<S> logits, const std::vector<int>& labels, const char* who) {
    if (logits.dim() != 2 || logits.size(0) < 1 || logits.size(1) < 1)
      throw shape_error(detail::cat(who, " logits: expected shape [N, K] with N, K >= 1, got ",
                                    shape_str(logits.sizes())));
    if (std::int64_t(labels.size()) != logits.size(0))
      throw shape_error(detail::cat(who, " labels: expected ", logits.size(0), " labels (one per row of logits ",
                                    shape_str(logits.sizes()), "), got ", labels.size()));
    for (std::size_t n = 0; n < labels.size(); ++n)
      if (labels[n] < 0 || labels[n] >= logits.size(1))
        throw config_error(detail::cat(who, " labels: label ", labels[n], " at index ", n, " is outside [0, ",
                                       logits.size(1), ")"));
  }
  static S compute(ConstTensorView<S> z, const std::vector<int>& labels, Tensor<S>* prob) {
    const std::int64_t N = z.size(0), K = z.size(1);
    if (prob) prob->resize(z.sizes());
    double total = 0;
    for (std::int64_t n = 0; n < N; ++n) {
      const S* row = z.data() + n * K;
      const S m = *std::max_element(row, row + K);
      S sum = 0;
      for (std::int64_t c = 0; c < K; ++c) sum += std::exp(row[c] - m);
      // loss = logsumexp(z) - z_y, written on the shifted logits z - m (every exponent
      // <= 0, and no large m added then subtracted, which would round away the loss).
      const S log_sum = std::log(sum);
      total += double(log_sum - (row[labels[std::size_t(n)]] - m));
      if (prob)
        for (std::int64_t c = 0; c < K; ++c) (*prob)(n, c) = std::exp(row[c] - m - log_sum);
    }
    return S(total / double(N));
  }

  Tensor<S> prob_, grad_;
  std::vector<int> labels_;
  bool has_forward_ = false;
};

/// Index of the largest logit of every row of `logits` [N, K] (the predicted class).
template <class S>
std::vector<int> argmax_rows(const Tensor<S>& logits) {
  if (logits.dim() != 2 || logits.size(1) < 1)
    throw shape_error(detail::cat("argmax_rows logits: expected shape [N, K] with K >= 1, got ",
                                  shape_str(logits.sizes())));
  const std::int64_t N = logits.size(0), K = logits.size(1);
  std::vector<int> out(static_cast<std::size_t>(N));
  for (std::int64_t n = 0; n < N; ++n) {
    const S* row = logits.data() + n * K;
    out[std::size_t(n)] = int(std::max_element(row, row + K) - row);
  }
  return out;
}

/// Fraction of rows of `logits` [N, K] whose largest entry is at `labels[n]` (shape_error
/// unless there are N labels). With `labels = argmax_rows(other)`, how often two networks
/// predict the same class.
template <class S>
double accuracy(const Tensor<S>& logits, const std::vector<int>& labels) {
  const std::vector<int> pred = argmax_rows(logits);
  if (pred.size() != labels.size() || pred.empty())
    throw shape_error(detail::cat("accuracy: ", labels.size(), " labels for logits of shape ", shape_str(logits.sizes())));
  std::size_t right = 0;
  for (std::size_t n = 0; n < pred.size(); ++n) right += pred[n] == labels[n];
  return double(right) / double(pred.size());
}

}  // namespace orepa
