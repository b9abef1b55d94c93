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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/parallel.hpp"

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

/// How the elements of a 4-D tensor [N, C, H, W] are laid out in memory, as in PyTorch:
/// `contiguous` is NCHW (row-major in the logical order; every tensor of another rank is
/// contiguous), `channels_last` is NHWC (the channels of a pixel next to each other).
/// The logical shape (sizes()) is [N, C, H, W] either way.
enum class MemoryFormat { contiguous, channels_last };

/// Storage offset of element (n, c, h, w) of a 4-D tensor of `sizes` in format `f`.
inline std::int64_t offset4(const Shape& sizes, MemoryFormat f, std::int64_t n, std::int64_t c, std::int64_t h,
                            std::int64_t w) {
  return f == MemoryFormat::contiguous ? ((n * sizes[1] + c) * sizes[2] + h) * sizes[3] + w
                                       : ((n * sizes[2] + h) * sizes[3] + w) * sizes[1] + c;
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

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// std::copy_n(src, n, dst) for a run of trivially copyable values that may be short (a
// pixel's channels in NHWC concatenation and upsampling, 16-256 bytes): such a run is
// copied by inline 16-byte moves, since a memmove call per pixel costs more than its copy.
template <class T>
inline void copy_run(const T* src, std::int64_t n, T* dst) {
  const std::int64_t bytes = n * std::int64_t(sizeof(T));
  if (bytes > 256) {
    std::memcpy(dst, src, std::size_t(bytes));
    return;
  }
  const auto* s = reinterpret_cast<const unsigned char*>(src);
  auto* d = reinterpret_cast<unsigned char*>(dst);
  std::int64_t k = 0;
  for (; k + 16 <= bytes; k += 16) std::memcpy(d + k, s + k, 16);
  for (; k < bytes; ++k) d[k] = s[k];
}
// std::allocator whose value-initialisation of scalars is a no-op, so a tensor's
// storage can grow without being zeroed first (resize(): outputs about to be written).
template <class T>
struct NoZeroAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoZeroAllocator<U>;
  };
  NoZeroAllocator() = default;
  template <class U>
  NoZeroAllocator(const NoZeroAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
}  // namespace detail
/// \endcond

/// Dense row-major tensor of scalars `S` (float for the oneDNN path, double for checks).
///
/// Storage and ownership: a Tensor is a value. Copying it copies the elements, as
/// `std::vector` does. The one exception is alias(): a second Tensor over the same
/// storage, which is what modules return from forward_train and backward. A module writes
/// its next result into that storage only when nobody else holds it: the whole-tensor
/// writes (resize, reset, assign, fill, zero, copy assignment) give a tensor storage of
/// its own first when it shares it. So a result stays valid and unchanged while the user
/// keeps it, and a loop that drops its results allocates nothing after warm-up. Element
/// writes (data(), operator[], iterators) go to the shared storage: all aliases see them
/// (as with PyTorch, changing a module's output in place changes what its backward reads).
template <class S>
class Tensor {
 public:
  /// The element type `S`.
  using Scalar = S;

  /// Empty tensor of shape [0] (owns no storage).
  Tensor() = default;
  /// Tensor of `shape` filled with `fill`. Throws shape_error / config_error on a bad shape.
  explicit Tensor(Shape shape, S fill = S(0)) {
    const auto n = checked_elements(shape);
    impl_ = std::make_shared<Impl>(std::move(shape), Storage(static_cast<std::size_t>(n), fill));
  }
  /// Tensor of `shape` holding `values` (row-major); the sizes must agree.
  Tensor(Shape shape, std::vector<S> values) {
    if (checked_elements(shape) != static_cast<std::int64_t>(values.size()))
      throw shape_error(detail::cat("Tensor: shape ", shape_str(shape), " needs ", checked_numel(shape),
                                    " values, got ", values.size()));
    impl_ = std::make_shared<Impl>(std::move(shape), Storage(values.begin(), values.end()));
  }
  /// Tensor of `shape` (brace list, e.g. {N, C, H, W}) filled with `fill`; throws like the Shape constructor.
  Tensor(std::initializer_list<std::int64_t> shape, S fill = S(0)) : Tensor(Shape(shape), fill) {}
  /// Zero tensor of the 4-D `shape` laid out in `format` (channels_last: NHWC storage).
  Tensor(Shape shape, MemoryFormat format) : Tensor(std::move(shape)) { set_format(format); }
  /// A copy of `o`'s elements (deep: the copy has storage of its own).
  Tensor(const Tensor& o) : impl_(o.impl_ ? std::make_shared<Impl>(*o.impl_) : nullptr) {}
  /// Takes `o`'s storage over; `o` becomes empty.
  Tensor(Tensor&& o) noexcept = default;
  /// Becomes a copy of `o`'s elements, reusing this tensor's buffer when it owns it alone.
  Tensor& operator=(const Tensor& o) {
    if (this == &o) return *this;
    if (!o.impl_) impl_.reset();
    else if (impl_ && impl_.use_count() == 1) *impl_ = *o.impl_;
    else impl_ = std::make_shared<Impl>(*o.impl_);
    return *this;
  }
  /// Takes `o`'s storage over (this tensor's own storage is released).
  Tensor& operator=(Tensor&& o) noexcept = default;

  /// A Tensor over this one's storage (no copy): writes to elements through either are
  /// seen by both, and a whole-tensor write to either first gives it storage of its own.
  Tensor alias() const {
    Tensor t;
    t.impl_ = impl_;
    return t;
  }
  /// True when another Tensor shares this one's storage (an alias() of it is alive).
  bool is_shared() const { return impl_.use_count() > 1; }

  /// The memory layout of the elements (channels_last only for 4-D tensors).
  MemoryFormat memory_format() const { return impl_ ? impl_->format : MemoryFormat::contiguous; }
  /// True when the storage is row-major in the logical order (NCHW).
  bool is_contiguous() const { return memory_format() == MemoryFormat::contiguous; }

  /// The extents, one per dimension.
  const Shape& sizes() const { return impl_ ? impl_->shape : empty_shape(); }
  /// Extent of dimension `i`; throws std::out_of_range for a bad `i`.
  std::int64_t size(int i) const { return sizes().at(static_cast<std::size_t>(i)); }
  /// Number of dimensions.
  int dim() const { return static_cast<int>(sizes().size()); }
  /// Number of elements.
  std::int64_t numel() const { return impl_ ? static_cast<std::int64_t>(impl_->data.size()) : 0; }
  /// True when the tensor holds no elements.
  bool empty() const { return numel() == 0; }
  /// Pointer to the first element (row-major storage).
  S* data() { return impl_ ? impl_->data.data() : nullptr; }
  /// Read-only pointer to the first element (row-major storage).
  const S* data() const { return impl_ ? impl_->data.data() : nullptr; }
  /// Element `i` of the flat row-major storage; unchecked.
  S& operator[](std::int64_t i) {
    OREPA_ASSERT(i >= 0 && i < numel());
    return impl_->data[static_cast<std::size_t>(i)];
  }
  /// Read-only element `i` of the flat row-major storage; unchecked.
  const S& operator[](std::int64_t i) const {
    OREPA_ASSERT(i >= 0 && i < numel());
    return impl_->data[static_cast<std::size_t>(i)];
  }
  /// Pointer to the first element.
  S* begin() { return data(); }
  /// Pointer past the last element.
  S* end() { return data() + numel(); }
  /// Read-only pointer to the first element.
  const S* begin() const { return data(); }
  /// Read-only pointer past the last element.
  const S* end() const { return data() + numel(); }

  /// Element (n, c, h, w) of a rank-4 tensor (NCHW / OIHW indices, any memory format); unchecked.
  S& operator()(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
    OREPA_ASSERT(dim() == 4);
    return impl_->data[static_cast<std::size_t>(offset4(impl_->shape, impl_->format, a, b, c, d))];
  }
  /// Read-only element (n, c, h, w) of a rank-4 tensor; unchecked.
  const S& operator()(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) const {
    OREPA_ASSERT(dim() == 4);
    return impl_->data[static_cast<std::size_t>(offset4(impl_->shape, impl_->format, a, b, c, d))];
  }
  /// Element of a rank-2 tensor; unchecked.
  S& operator()(std::int64_t a, std::int64_t b) {
    OREPA_ASSERT(dim() == 2);
    return impl_->data[static_cast<std::size_t>(a * impl_->shape[1] + b)];
  }
  /// Read-only element of a rank-2 tensor; unchecked.
  const S& operator()(std::int64_t a, std::int64_t b) const {
    OREPA_ASSERT(dim() == 2);
    return impl_->data[static_cast<std::size_t>(a * impl_->shape[1] + b)];
  }

  /// Sets every element to `v` (in storage of its own when the tensor shares it).
  void fill(S v) {
    if (!impl_) return;
    if (is_shared()) impl_ = std::make_shared<Impl>(impl_->shape, Storage(impl_->data.size()), impl_->format);
    std::fill(impl_->data.begin(), impl_->data.end(), v);
  }
  /// Sets every element to zero.
  void zero() { fill(S(0)); }
  /// Re-shapes to `shape` (reallocating only when the element count grows or the storage
  /// is shared) and zeroes it; the layout becomes contiguous.
  void reset(const Shape& shape) {
    auto n = checked_elements(shape);
    Impl& m = own();
    m.shape = shape;
    m.format = MemoryFormat::contiguous;
    m.data.assign(static_cast<std::size_t>(n), S(0));
  }
  /// Re-shapes to `shape` in layout `format`, keeping the buffer when it is large enough
  /// and not shared; contents are unspecified afterwards, new elements not even zeroed
  /// (for outputs that are about to be overwritten).
  void resize(const Shape& shape, MemoryFormat format = MemoryFormat::contiguous) {
    auto n = checked_elements(shape);
    if (format == MemoryFormat::channels_last && shape.size() != 4)
      throw shape_error(detail::cat("channels_last needs a 4-D shape, got ", shape_str(shape)));
    Impl& m = own();
    m.shape = shape;
    m.format = format;
    m.data.resize(static_cast<std::size_t>(n));
  }
  /// Becomes a copy of `v` (same shape, layout and values), reusing the buffer when large
  /// enough and not shared. `v` must not view this tensor's own storage.
  void assign(const TensorView<const S>& v);
  /// Becomes a copy of `v` in layout `format` (converting NCHW <-> NHWC as needed).
  void assign(const TensorView<const S>& v, MemoryFormat format);
  /// A copy in layout `format` (PyTorch's `x.contiguous(memory_format=...)`).
  Tensor to(MemoryFormat format) const {
    Tensor t;
    t.assign(*this, format);
    return t;
  }
  /// A copy with another shape of the same element count (contiguous tensors only).
  Tensor reshaped(Shape shape) const {
    if (!is_contiguous()) throw shape_error("reshape: the tensor is channels_last; convert it with to() first");
    if (checked_numel(shape) != numel())
      throw shape_error(detail::cat("reshape: ", shape_str(sizes()), " cannot become ", shape_str(shape)));
    Tensor t;
    t.impl_ = std::make_shared<Impl>(std::move(shape), Storage(begin(), end()));
    return t;
  }
  /// Element-wise conversion to another scalar type.
  template <class U>
  Tensor<U> cast() const {
    Tensor<U> t(sizes(), std::vector<U>(begin(), end()));
    if (!is_contiguous()) t.resize(sizes(), memory_format());  // same storage order, same size: values kept
    return t;
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
    if (sizes() != expected)
      throw shape_error(detail::cat(what, ": expected shape ", shape_str(expected), ", got ",
                                    shape_str(sizes())));
  }

 private:
  using Storage = std::vector<S, detail::NoZeroAllocator<S>>;
  struct Impl {
    Impl() = default;
    Impl(Shape s, Storage d, MemoryFormat f = MemoryFormat::contiguous)
        : shape(std::move(s)), data(std::move(d)), format(f) {}
    Shape shape{0};
    Storage data;
    MemoryFormat format = MemoryFormat::contiguous;
  };
  static const Shape& empty_shape() {
    static const Shape s{0};
    return s;
  }
  // The storage, made this tensor's own (fresh and empty when absent or shared).
  Impl& own() {
    if (!impl_ || is_shared()) impl_ = std::make_shared<Impl>();
    return *impl_;
  }
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
      throw shape_error(detail::cat("matrix view ", rows, "x", cols, " of tensor ", shape_str(sizes())));
  }
  void set_format(MemoryFormat f) {
    if (f == MemoryFormat::channels_last && dim() != 4)
      throw shape_error(detail::cat("channels_last needs a 4-D shape, got ", shape_str(sizes())));
    if (impl_) impl_->format = f;
  }

  std::shared_ptr<Impl> impl_;
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
  /// `format` channels_last needs a 4-D shape (NHWC storage of [N, C, H, W]).
  TensorView(T* data, Shape sizes, MemoryFormat format = MemoryFormat::contiguous)
      : data_(data), sizes_(std::move(sizes)), numel_(checked_numel(sizes_, "tensor view")), format_(format) {
    if (numel_ > max_tensor_bytes / static_cast<std::int64_t>(sizeof(Scalar)))
      throw config_error(detail::cat("tensor view of shape ", shape_str(sizes_), " exceeds the ", max_tensor_bytes,
                                     "-byte tensor limit"));
    if (!data_ && numel_ != 0) throw shape_error(detail::cat("tensor view of shape ", shape_str(sizes_), ": null data"));
    if (format_ == MemoryFormat::channels_last && sizes_.size() != 4)
      throw shape_error(detail::cat("channels_last needs a 4-D shape, got ", shape_str(sizes_)));
  }
  /// A view of a whole tensor.
  TensorView(Tensor<Scalar>& t)  // NOLINT: implicit on purpose
      : data_(t.data()), sizes_(t.sizes()), numel_(t.numel()), format_(t.memory_format()) {}
  /// A read-only view of a whole tensor.
  template <class U = T, std::enable_if_t<std::is_const_v<U>, int> = 0>
  TensorView(const Tensor<Scalar>& t)  // NOLINT: implicit on purpose
      : data_(t.data()), sizes_(t.sizes()), numel_(t.numel()), format_(t.memory_format()) {}
  /// A mutable view as a read-only one.
  template <class U = T, std::enable_if_t<std::is_const_v<U>, int> = 0>
  TensorView(const TensorView<Scalar>& v)  // NOLINT: implicit on purpose
      : data_(v.data()), sizes_(v.sizes()), numel_(v.numel()), format_(v.memory_format()) {}

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
  /// The memory layout of the elements.
  MemoryFormat memory_format() const { return format_; }
  /// True when the storage is row-major in the logical order (NCHW).
  bool is_contiguous() const { return format_ == MemoryFormat::contiguous; }
  /// Element (n, c, h, w) of a rank-4 view (NCHW indices, any memory format); unchecked.
  T& operator()(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w) const {
    OREPA_ASSERT(dim() == 4);
    return data_[offset4(sizes_, format_, n, c, h, w)];
  }
  /// Element `i` of the flat row-major storage; unchecked.
  T& operator[](std::int64_t i) const {
    OREPA_ASSERT(i >= 0 && i < numel());
    return data_[i];
  }
  /// Pointer to the first element (for range-for).
  T* begin() const { return data_; }
  /// Pointer past the last element.
  T* end() const { return data_ + numel(); }
  /// The same memory with another shape of the same element count (contiguous views only).
  TensorView reshaped(Shape sizes) const {
    if (!is_contiguous()) throw shape_error("reshape: the view is channels_last");
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
  MemoryFormat format_ = MemoryFormat::contiguous;
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
  resize(v.sizes(), v.memory_format());
  std::copy(v.begin(), v.end(), data());
}

template <class S>
void Tensor<S>::assign(const TensorView<const S>& v, MemoryFormat format) {
  if (v.memory_format() == format) return assign(v);
  resize(v.sizes(), format);
  const std::int64_t N = v.size(0), C = v.size(1), P = v.size(2) * v.size(3);
  // Per image a C x P <-> P x C transpose, the threads splitting the pixels, in tiles of
  // pixels: per channel a run of the tile is read (NCHW side) or written in order, the
  // other side's tile staying in cache; writing NHWC with many channels, a pixel's run of
  // channels is written in order instead (measured faster from 16 channels).
  const S* from = v.data();
  S* to = data();
  const bool nhwc = format == MemoryFormat::channels_last;
  constexpr std::int64_t tile = 256;
  parallel_ranges(N * P, [&](std::int64_t b, std::int64_t e, int) {
    std::int64_t n = b / P, p = b % P;
    for (std::int64_t np = b; np < e; ++n, p = 0) {
      const std::int64_t end = std::min(P, p + (e - np));  // this range's pixels of image n
      np += end - p;
      const S* src = from + n * C * P;
      S* dst = to + n * C * P;
      if (nhwc && C >= 16) {
        for (std::int64_t q = p; q < end; ++q)
          for (std::int64_t c = 0; c < C; ++c) dst[q * C + c] = src[c * P + q];
        continue;
      }
      for (std::int64_t q0 = p; q0 < end; q0 += tile) {
        const std::int64_t q1 = std::min(end, q0 + tile);
        for (std::int64_t c = 0; c < C; ++c)
          if (nhwc)
            for (std::int64_t q = q0; q < q1; ++q) dst[q * C + c] = src[c * P + q];
          else
            for (std::int64_t q = q0; q < q1; ++q) dst[c * P + q] = src[q * C + c];
      }
    }
  });
}

/// `x` as a view in memory format `f`: `x` itself when it is, else a copy kept in `scratch`.
template <class S>
ConstTensorView<S> in_format(ConstTensorView<S> x, MemoryFormat f, Tensor<S>& scratch) {
  if (x.memory_format() == f) return x;
  scratch.assign(x, f);
  return scratch;
}

/// `x` as a contiguous (NCHW) view: `x` itself when it is, else a copy kept in `scratch`.
template <class S>
ConstTensorView<S> contiguous(ConstTensorView<S> x, Tensor<S>& scratch) {
  return in_format(x, MemoryFormat::contiguous, scratch);
}

/// A view of `sizes` elements at `data`, e.g. `view(buffer.data(), {N, C, H, W})`, or
/// `view(buffer.data(), {N, C, H, W}, MemoryFormat::channels_last)` for NHWC storage.
template <class T>
TensorView<T> view(T* data, Shape sizes, MemoryFormat format = MemoryFormat::contiguous) {
  return TensorView<T>(data, std::move(sizes), format);
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

/// "[1, 0, 2, 3]": the index, one entry per dimension, of element `i` in the row-major
/// (logical, NCHW) order of a tensor of `shape`.
inline std::string index_str(const Shape& shape, std::int64_t i) {
  Shape idx(shape.size(), 0);
  for (std::size_t d = shape.size(); d-- > 0;)
    if (shape[d] > 0) idx[d] = i % shape[d], i /= shape[d];
  return shape_str(idx);
}

/// Element `i` of `t` in row-major logical (NCHW) order, whatever its memory format; unchecked.
template <class T>
std::remove_const_t<T> logical_element(const TensorView<T>& t, std::int64_t i) {
  if (t.is_contiguous()) return t[i];
  const auto& s = t.sizes();
  const std::int64_t w = i % s[3], h = i / s[3] % s[2], c = i / (s[3] * s[2]) % s[1], n = i / (s[3] * s[2] * s[1]);
  return t(n, c, h, w);
}

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// 1 when the float at p is NaN or Inf, else 0: an integer test on the exponent field (all
// ones), which vectorizes in an OR reduction where a float compare does not.
inline std::uint32_t non_finite_bit(const float* p) {
  std::uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return std::uint32_t((u & 0x7F800000u) == 0x7F800000u);
}

// True when none of the n values at p is NaN or Inf: for float on the threads, an OR of
// non_finite_bit.
template <class S>
bool all_finite(const S* p, std::int64_t n) {
  if constexpr (std::is_same_v<std::remove_const_t<S>, float>) {
    std::vector<std::uint32_t> any(std::size_t(max_range_threads()), 0);
    parallel_ranges(n, [&](std::int64_t b, std::int64_t e, int t) {
      std::uint32_t a = 0;
      OREPA_SIMD_OR(a)
      for (std::int64_t j = b; j < e; ++j) a |= non_finite_bit(p + j);
      any[std::size_t(t)] = a;
    });
    return std::all_of(any.begin(), any.end(), [](std::uint32_t a) { return a == 0; });
  } else {
    for (std::int64_t j = 0; j < n; ++j)
      if (!std::isfinite(double(p[j]))) return false;
    return true;
  }
}
}  // namespace detail
/// \endcond

/// The row-major (logical, NCHW) index of the first NaN or Inf of `t`, whatever its memory
/// format, or -1 when every value is finite.
template <class T>
std::int64_t first_non_finite(const TensorView<T>& t) {
  if (detail::all_finite(t.data(), t.numel())) return -1;
  std::int64_t j = 0;
  while (j < t.numel() && std::isfinite(double(t[j]))) ++j;
  if (j == t.numel()) return -1;
  if (t.is_contiguous()) return j;
  const auto& s = t.sizes();  // channels-last storage: the first in logical order may come later
  for (std::int64_t i = 0, n = 0; n < s[0]; ++n)
    for (std::int64_t c = 0; c < s[1]; ++c)
      for (std::int64_t h = 0; h < s[2]; ++h)
        for (std::int64_t w = 0; w < s[3]; ++w, ++i)
          if (!std::isfinite(double(t(n, c, h, w)))) return i;
  return -1;  // unreachable: storage and logical order hold the same values
}
/// The same for a tensor.
template <class S>
std::int64_t first_non_finite(const Tensor<S>& t) {
  return first_non_finite(ConstTensorView<S>(t));
}

/// Largest absolute difference between two tensors or views of the same shape (any
/// scalars, any memory formats: elements are compared by their logical index).
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  if (a.sizes() != b.sizes())
    throw shape_error(detail::cat("max_abs_diff: shapes ", shape_str(a.sizes()), " and ",
                                  shape_str(b.sizes()), " differ"));
  double m = 0;
  auto take = [&m](double d) {
    if (!(d <= m)) m = d;  // NaN propagates as the maximum
  };
  if (a.memory_format() == b.memory_format()) {
    for (std::int64_t i = 0; i < a.numel(); ++i) take(std::abs(double(a[i]) - double(b[i])));
    return m;
  }
  const auto& s = a.sizes();
  for (std::int64_t n = 0; n < s[0]; ++n)
    for (std::int64_t c = 0; c < s[1]; ++c)
      for (std::int64_t h = 0; h < s[2]; ++h)
        for (std::int64_t w = 0; w < s[3]; ++w) take(std::abs(double(a(n, c, h, w)) - double(b(n, c, h, w))));
  return m;
}

}  // namespace orepa
