#pragma once
/// @file tensor.hpp
/// `Tensor<S>`: an owning, dense, row-major (C order) array with a run-time shape, used
/// for NCHW activations and OIHW kernels; `TensorView<S>` / `ConstTensorView<S>`: the same
/// over memory someone else owns (a raw buffer, an Eigen matrix, a Tensor). Names follow
/// PyTorch: `sizes()` and `size(i)` are extents, `numel()` the element count, `dim()` the
/// rank. Sizes are computed with overflow checks and a cap on the byte count so a hostile
/// shape is rejected before anything is allocated.

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"

/// Define OREPA_ENABLE_ASSERT to check ranks and bounds of unchecked element access
/// (the sanitizer build does); it is off by default because it sits in inner loops.
#ifdef OREPA_ENABLE_ASSERT
#include <cstdio>
#include <cstdlib>
#define OREPA_ASSERT(cond)                                                              \
  ((cond) ? (void)0                                                                     \
          : (std::fprintf(stderr, "%s:%d: OREPA_ASSERT(%s) failed\n", __FILE__, __LINE__, #cond), \
             std::abort()))
#else
#define OREPA_ASSERT(cond) ((void)0)
#endif

namespace orepa {

/// A tensor shape: one non-negative extent per dimension.
using Shape = std::vector<std::int64_t>;

/// Largest tensor orepa will allocate, in bytes (16 GiB). Larger requests throw.
inline constexpr std::int64_t max_tensor_bytes = std::int64_t(1) << 34;

/// "[2, 8, 10, 10]".
inline std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

/// Product of `a` and `b`, throwing config_error (naming `what`) on overflow or negatives.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what = "size") {
  if (a < 0 || b < 0) throw config_error(detail::cat(what, ": negative extent ", a < 0 ? a : b));
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a)
    throw config_error(detail::cat(what, ": ", a, " * ", b, " overflows 64 bits"));
  return a * b;
}

/// Number of elements of `shape`, checked for negative extents and overflow.
inline std::int64_t checked_numel(const Shape& shape, const char* what = "tensor shape") {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) throw shape_error(detail::cat(what, " ", shape_str(shape), " has a negative extent"));
    n = checked_mul(n, d, what);
  }
  return n;
}

/// Row-major dynamic Eigen matrix and maps over raw memory (for products on tensor slices).
template <class S>
using RowMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Mutable Eigen map of a row-major matrix over `S` data (no copy).
template <class S>
using MatMap = Eigen::Map<RowMatrix<S>>;
/// Read-only Eigen map of a row-major matrix over const `S` data (no copy).
template <class S>
using ConstMatMap = Eigen::Map<const RowMatrix<S>>;

template <class T>
class TensorView;

/// Dense row-major tensor of scalars `S` (float for the oneDNN path, double for checks).
template <class S>
class Tensor {
 public:
  /// The element type `S`.
  using Scalar = S;

  /// Empty tensor of shape [0].
  Tensor() : shape_{0} {}
  /// Tensor of `shape` filled with `fill`. Throws shape_error / config_error on a bad shape.
  explicit Tensor(Shape shape, S fill = S(0)) : shape_(std::move(shape)) {
    data_.assign(static_cast<std::size_t>(checked_elements(shape_)), fill);
  }
  /// Tensor of `shape` holding `values` (row-major); the sizes must agree.
  Tensor(Shape shape, std::vector<S> values) : shape_(std::move(shape)), data_(std::move(values)) {
    if (checked_elements(shape_) != static_cast<std::int64_t>(data_.size()))
      throw shape_error(detail::cat("Tensor: shape ", shape_str(shape_), " needs ",
                                    checked_numel(shape_), " values, got ", data_.size()));
  }
  /// Tensor of `shape` (brace list, e.g. {N, C, H, W}) filled with `fill`; throws like the Shape constructor.
  Tensor(std::initializer_list<std::int64_t> shape, S fill = S(0)) : Tensor(Shape(shape), fill) {}

  /// The extents, one per dimension.
  const Shape& sizes() const { return shape_; }
  /// Extent of dimension `i`; throws std::out_of_range for a bad `i`.
  std::int64_t size(int i) const { return shape_.at(static_cast<std::size_t>(i)); }
  /// Number of dimensions.
  int dim() const { return static_cast<int>(shape_.size()); }
  /// Number of elements.
  std::int64_t numel() const { return static_cast<std::int64_t>(data_.size()); }
  /// True when the tensor holds no elements.
  bool empty() const { return data_.empty(); }
  /// Pointer to the first element (row-major storage).
  S* data() { return data_.data(); }
  /// Read-only pointer to the first element (row-major storage).
  const S* data() const { return data_.data(); }
  /// Element `i` of the flat row-major storage; unchecked.
  S& operator[](std::int64_t i) {
    OREPA_ASSERT(i >= 0 && i < numel());
    return data_[static_cast<std::size_t>(i)];
  }
  /// Read-only element `i` of the flat row-major storage; unchecked.
  const S& operator[](std::int64_t i) const {
    OREPA_ASSERT(i >= 0 && i < numel());
    return data_[static_cast<std::size_t>(i)];
  }
  /// Iterator to the first element.
  auto begin() { return data_.begin(); }
  /// Iterator past the last element.
  auto end() { return data_.end(); }
  /// Read-only iterator to the first element.
  auto begin() const { return data_.begin(); }
  /// Read-only iterator past the last element.
  auto end() const { return data_.end(); }

  /// Element of a rank-4 tensor (NCHW / OIHW); unchecked.
  S& operator()(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
    OREPA_ASSERT(dim() == 4);
    return data_[static_cast<std::size_t>(((a * shape_[1] + b) * shape_[2] + c) * shape_[3] + d)];
  }
  /// Read-only element of a rank-4 tensor (NCHW / OIHW); unchecked.
  const S& operator()(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) const {
    OREPA_ASSERT(dim() == 4);
    return data_[static_cast<std::size_t>(((a * shape_[1] + b) * shape_[2] + c) * shape_[3] + d)];
  }
  /// Element of a rank-2 tensor; unchecked.
  S& operator()(std::int64_t a, std::int64_t b) {
    OREPA_ASSERT(dim() == 2);
    return data_[static_cast<std::size_t>(a * shape_[1] + b)];
  }
  /// Read-only element of a rank-2 tensor; unchecked.
  const S& operator()(std::int64_t a, std::int64_t b) const {
    OREPA_ASSERT(dim() == 2);
    return data_[static_cast<std::size_t>(a * shape_[1] + b)];
  }

  /// Sets every element to `v`.
  void fill(S v) { std::fill(data_.begin(), data_.end(), v); }
  /// Sets every element to zero.
  void zero() { fill(S(0)); }
  /// Re-shapes to `shape` (reallocating only when the element count grows) and zeroes it.
  void reset(const Shape& shape) {
    auto n = checked_elements(shape);
    shape_ = shape;
    data_.assign(static_cast<std::size_t>(n), S(0));
  }
  /// Re-shapes to `shape` keeping the buffer when it is large enough; contents are
  /// unspecified afterwards (for outputs that are about to be overwritten).
  void resize(const Shape& shape) {
    auto n = checked_elements(shape);
    shape_ = shape;
    data_.resize(static_cast<std::size_t>(n));
  }
  /// Becomes a copy of `v` (same shape and values), reusing the buffer when large enough.
  /// `v` must not view this tensor's own storage.
  void assign(const TensorView<const S>& v);
  /// Same data, new shape with the same element count.
  Tensor reshaped(Shape shape) const {
    if (checked_numel(shape) != numel())
      throw shape_error(detail::cat("reshape: ", shape_str(shape_), " cannot become ", shape_str(shape)));
    return Tensor(std::move(shape), data_);
  }
  /// Element-wise conversion to another scalar type.
  template <class U>
  Tensor<U> cast() const {
    return Tensor<U>(shape_, std::vector<U>(data_.begin(), data_.end()));
  }
  /// The data as a rows x cols row-major matrix (rows * cols must equal numel()).
  MatMap<S> matrix(std::int64_t rows, std::int64_t cols) {
    check_matrix(rows, cols);
    return MatMap<S>(data(), rows, cols);
  }
  /// The data as a read-only rows x cols row-major matrix (rows * cols must equal numel()).
  ConstMatMap<S> matrix(std::int64_t rows, std::int64_t cols) const {
    check_matrix(rows, cols);
    return ConstMatMap<S>(data(), rows, cols);
  }
  /// Checks the shape equals `expected`; throws shape_error naming `what` otherwise.
  void expect_shape(const Shape& expected, const std::string& what) const {
    if (shape_ != expected)
      throw shape_error(detail::cat(what, ": expected shape ", shape_str(expected), ", got ",
                                    shape_str(shape_)));
  }

 private:
  static std::int64_t checked_elements(const Shape& shape) {
    auto n = checked_numel(shape);
    if (n > max_tensor_bytes / static_cast<std::int64_t>(sizeof(S)))
      throw config_error(detail::cat("tensor of shape ", shape_str(shape), " would need ",
                                     n, " elements (over the ", max_tensor_bytes,
                                     "-byte limit)"));
    return n;
  }
  void check_matrix(std::int64_t rows, std::int64_t cols) const {
    if (rows < 0 || cols < 0 || rows * cols != numel())
      throw shape_error(detail::cat("matrix view ", rows, "x", cols, " of tensor ", shape_str(shape_)));
  }

  Shape shape_;
  std::vector<S> data_;
};

/// A dense row-major tensor over memory it does not own: a pointer and the extents.
/// `T` is the element type, const for a read-only view (`ConstTensorView<S>`). Views are
/// cheap to copy; the memory must outlive them. Every forward, backward and deploy entry
/// point takes views, so a caller's buffer (raw, an Eigen matrix, a Tensor) is used in
/// place; a Tensor converts to a view implicitly.
template <class T>
class TensorView {
 public:
  /// The scalar type without const.
  using Scalar = std::remove_const_t<T>;

  /// An empty view (no data, shape [0]).
  TensorView() : sizes_{0} {}
  /// A view of `sizes` elements at `data` (row-major). Throws shape_error for a negative
  /// extent and config_error for an element count over the tensor limit; a null `data`
  /// is only accepted for zero elements.
  TensorView(T* data, Shape sizes) : data_(data), sizes_(std::move(sizes)), numel_(checked_numel(sizes_, "tensor view")) {
    if (numel_ > max_tensor_bytes / static_cast<std::int64_t>(sizeof(Scalar)))
      throw config_error(detail::cat("tensor view of shape ", shape_str(sizes_), " exceeds the ", max_tensor_bytes,
                                     "-byte tensor limit"));
    if (!data_ && numel_ != 0) throw shape_error(detail::cat("tensor view of shape ", shape_str(sizes_), ": null data"));
  }
  /// A view of a whole tensor.
  TensorView(Tensor<Scalar>& t) : data_(t.data()), sizes_(t.sizes()), numel_(t.numel()) {}  // NOLINT: implicit on purpose
  /// A read-only view of a whole tensor.
  template <class U = T, std::enable_if_t<std::is_const_v<U>, int> = 0>
  TensorView(const Tensor<Scalar>& t) : data_(t.data()), sizes_(t.sizes()), numel_(t.numel()) {}  // NOLINT: implicit on purpose
  /// A mutable view as a read-only one.
  template <class U = T, std::enable_if_t<std::is_const_v<U>, int> = 0>
  TensorView(const TensorView<Scalar>& v) : data_(v.data()), sizes_(v.sizes()), numel_(v.numel()) {}  // NOLINT: implicit on purpose

  /// Pointer to the first element.
  T* data() const { return data_; }
  /// The extents, one per dimension.
  const Shape& sizes() const { return sizes_; }
  /// Extent of dimension `i`; throws std::out_of_range for a bad `i`.
  std::int64_t size(int i) const { return sizes_.at(static_cast<std::size_t>(i)); }
  /// Number of dimensions.
  int dim() const { return static_cast<int>(sizes_.size()); }
  /// Number of elements.
  std::int64_t numel() const { return numel_; }
  /// True when the view holds no elements.
  bool empty() const { return numel() == 0; }
  /// Element `i` of the flat row-major storage; unchecked.
  T& operator[](std::int64_t i) const {
    OREPA_ASSERT(i >= 0 && i < numel());
    return data_[i];
  }
  /// Pointer to the first element (for range-for).
  T* begin() const { return data_; }
  /// Pointer past the last element.
  T* end() const { return data_ + numel(); }
  /// The same memory with another shape of the same element count.
  TensorView reshaped(Shape sizes) const {
    if (checked_numel(sizes) != numel())
      throw shape_error(detail::cat("reshape: ", shape_str(sizes_), " cannot become ", shape_str(sizes)));
    return TensorView(data_, std::move(sizes));
  }
  /// An owning copy.
  Tensor<Scalar> clone() const {
    Tensor<Scalar> t;
    t.assign(*this);
    return t;
  }
  /// The data as a rows x cols row-major Eigen matrix (rows * cols must equal numel()),
  /// read-only for a const view.
  Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowMatrix<Scalar>, RowMatrix<Scalar>>> matrix(
      std::int64_t rows, std::int64_t cols) const {
    if (rows < 0 || cols < 0 || rows * cols != numel())
      throw shape_error(detail::cat("matrix view ", rows, "x", cols, " of tensor ", shape_str(sizes_)));
    return {data_, rows, cols};
  }
  /// Checks the shape equals `expected`; throws shape_error naming `what` otherwise.
  void expect_shape(const Shape& expected, const std::string& what) const {
    if (sizes_ != expected)
      throw shape_error(detail::cat(what, ": expected shape ", shape_str(expected), ", got ", shape_str(sizes_)));
  }

 private:
  T* data_ = nullptr;
  Shape sizes_;
  std::int64_t numel_ = 0;
};

/// A read-only view.
template <class S>
using ConstTensorView = TensorView<const S>;

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// T in a non-deduced context: lets `ConstTensorView<S>` parameters of function templates
// take Tensors, S being deduced from another argument.
template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using identity_t = typename type_identity<T>::type;
}  // namespace detail
/// \endcond

template <class S>
void Tensor<S>::assign(const TensorView<const S>& v) {
  resize(v.sizes());
  std::copy(v.begin(), v.end(), data_.begin());
}

/// A view of `sizes` elements at `data` (row-major), e.g. `view(buffer.data(), {N, C, H, W})`.
template <class T>
TensorView<T> view(T* data, Shape sizes) {
  return TensorView<T>(data, std::move(sizes));
}
/// A view of the coefficients of an Eigen matrix or Eigen::Map (anything with data()) as
/// a tensor of `sizes`: read-only for a const object or a map of const data. The object
/// must be dense and row-major unless it is a vector (shape_error otherwise), and hold as
/// many coefficients as `sizes` has elements.
template <class E, class D = std::decay_t<E>, class = std::enable_if_t<std::is_base_of_v<Eigen::DenseBase<D>, D>>>
auto view(E&& m, Shape sizes) {
  const bool vector = m.rows() <= 1 || m.cols() <= 1;
  if (!vector && !D::IsRowMajor)
    throw shape_error("view: the Eigen matrix is column-major; tensors are row-major (use Eigen::RowMajor)");
  if (!vector && (m.innerStride() != 1 || m.outerStride() != m.innerSize()))
    throw shape_error("view: the Eigen matrix is not dense (it has strides)");
  if (vector && m.size() > 1 && m.innerStride() != 1) throw shape_error("view: the Eigen vector is strided");
  if (checked_numel(sizes) != std::int64_t(m.size()))
    throw shape_error(detail::cat("view: ", m.size(), " Eigen coefficients cannot be viewed as ", shape_str(sizes)));
  return view(m.data(), std::move(sizes));
}

/// Largest absolute difference between two tensors or views of the same shape (any scalars).
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  if (a.sizes() != b.sizes())
    throw shape_error(detail::cat("max_abs_diff: shapes ", shape_str(a.sizes()), " and ",
                                  shape_str(b.sizes()), " differ"));
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= m)) m = d;  // NaN propagates as the maximum
  }
  return m;
}

}  // namespace orepa
