#pragma once
/// @file safetensors.hpp
/// Reading and writing the safetensors checkpoint format: an 8-byte little-endian header
/// length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
/// optional "__metadata__": {str: str}}, then the densely packed little-endian data.
/// Every malformed input is reported as orepa::format_error naming the file and the
/// tensor or field at fault; nothing is read outside the file and nothing huge is
/// allocated because of a hostile header.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "orepa/core/error.hpp"
#include "orepa/core/linkage.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/io/json.hpp"
#include "orepa/io/output_path.hpp"

#if OREPA_DEFINITIONS
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace orepa::io {

/// Element types of the format. F32/F64/F16/BF16 and the integer types can be read as
/// floating point; F8_* are recognised but reading them throws format_error.
enum class DType { F32, F64, F16, BF16, I64, I32, I16, I8, U8, U16, U32, U64, BOOL, F8_E5M2, F8_E4M3 };

namespace detail {
struct DTypeInfo { DType dtype; const char* name; std::size_t size; };
inline constexpr DTypeInfo dtype_table[] = {
    {DType::F32, "F32", 4}, {DType::F64, "F64", 8}, {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2},   {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::U16, "U16", 2}, {DType::U32, "U32", 4},   {DType::U64, "U64", 8},
    {DType::BOOL, "BOOL", 1}, {DType::F8_E5M2, "F8_E5M2", 1}, {DType::F8_E4M3, "F8_E4M3", 1}};
inline const DTypeInfo& info(DType d) {
  for (const auto& i : dtype_table) if (i.dtype == d) return i;
  throw config_error("safetensors: invalid DType value");
}

/// Reads a little-endian T (integer or IEEE float) from possibly unaligned memory;
/// assembling bytes by shifts keeps it correct on any host byte order.
template <class T>
T load_le(const unsigned char* p) {
  using U = std::conditional_t<sizeof(T) == 1, std::uint8_t, std::conditional_t<sizeof(T) == 2, std::uint16_t,
            std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>>>;
  U u = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) u = U(u | (U(p[i]) << (8 * i)));
  T t;
  std::memcpy(&t, &u, sizeof t);
  return t;
}
/// Appends `v` to `out` as little-endian bytes (any host byte order).
template <class T>
void store_le(std::vector<unsigned char>& out, T v) {
  std::uint64_t u = 0;
  if constexpr (sizeof(T) == 8) std::memcpy(&u, &v, 8);
  else if constexpr (sizeof(T) == 4) { std::uint32_t w; std::memcpy(&w, &v, 4); u = w; }
  else { static_assert(sizeof(T) == 2); std::uint16_t w; std::memcpy(&w, &v, 2); u = w; }
  for (std::size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<unsigned char>(u >> (8 * i)));
}

/// IEEE half (1-5-10) to double, including subnormals, infinities and NaN.
inline double half_to_double(std::uint16_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  double v = e == 0 ? std::ldexp(m, -24)
             : e == 31 ? (m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity())
                       : std::ldexp(m + 1024, e - 25);
  return (h & 0x8000) ? -v : v;
}
/// bfloat16 is the top half of an IEEE float, so widening is exact.
inline double bf16_to_double(std::uint16_t b) {
  std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
/// Rounds `x` to a 16-bit float with `mant` mantissa and `exp` exponent bits (F16: 10/5,
/// BF16: 7/8), round-to-nearest-even straight from double (no double rounding via float).
inline std::uint16_t encode16(double x, int mant, int exp) {
  const int bias = (1 << (exp - 1)) - 1, emin = 1 - bias;
  const std::uint32_t sign = std::signbit(x) ? 1u << 15 : 0u, inf = std::uint32_t((1 << exp) - 1) << mant;
  if (std::isnan(x)) return std::uint16_t(sign | inf | (1u << (mant - 1)));
  const double a = std::fabs(x);
  if (std::isinf(a)) return std::uint16_t(sign | inf);
  auto rne = [](double q) {  // ties to even regardless of the current FP rounding mode
    double f = std::floor(q), d = q - f;
    return std::uint32_t(d > 0.5 || (d == 0.5 && std::fmod(f, 2.0) != 0) ? f + 1 : f);
  };
  if (a < std::ldexp(1.0, emin))  // subnormal range; m == 2^mant becomes the smallest normal
    return std::uint16_t(sign | rne(std::ldexp(a, mant - emin)));
  int e;
  std::frexp(a, &e);
  --e;  // a in [2^e, 2^(e+1))
  std::uint32_t m = rne(std::ldexp(a, mant - e));
  if (m == (2u << mant)) m >>= 1, ++e;
  if (e > bias) return std::uint16_t(sign | inf);
  return std::uint16_t(sign | (std::uint32_t(e + bias) << mant) | (m - (1u << mant)));
}

/// Element `i` of raw data of dtype `d` as double (false for unsupported F8 types).
inline bool decode(DType d, const unsigned char* p, std::size_t i, double& v) {
  switch (d) {
    case DType::F32: v = load_le<float>(p + 4 * i); return true;
    case DType::F64: v = load_le<double>(p + 8 * i); return true;
    case DType::F16: v = half_to_double(load_le<std::uint16_t>(p + 2 * i)); return true;
    case DType::BF16: v = bf16_to_double(load_le<std::uint16_t>(p + 2 * i)); return true;
    case DType::I64: v = double(load_le<std::int64_t>(p + 8 * i)); return true;
    case DType::I32: v = load_le<std::int32_t>(p + 4 * i); return true;
    case DType::I16: v = load_le<std::int16_t>(p + 2 * i); return true;
    case DType::I8: v = load_le<std::int8_t>(p + i); return true;
    case DType::U8: v = p[i]; return true;
    case DType::U16: v = load_le<std::uint16_t>(p + 2 * i); return true;
    case DType::U32: v = load_le<std::uint32_t>(p + 4 * i); return true;
    case DType::U64: v = double(load_le<std::uint64_t>(p + 8 * i)); return true;
    case DType::BOOL: v = p[i] != 0; return true;
    default: return false;
  }
}

}  // namespace detail

/// "F32", "BF16", ... (the name used in the file header).
inline std::string to_string(DType d) { return detail::info(d).name; }
/// Parses a header dtype name; throws format_error naming `tensor_name` and the dtype if unknown.
inline DType parse_dtype(const std::string& s, const std::string& tensor_name) {
  for (const auto& i : detail::dtype_table) if (s == i.name) return i.dtype;
  throw format_error(orepa::detail::cat("tensor '", tensor_name, "': unknown dtype '", s, "'"));
}
/// Bytes per element of `d`.
inline std::size_t dtype_size(DType d) { return detail::info(d).size; }

/// A view of one stored tensor; `data` points into the file's mapping or owned buffer and
/// stays valid as long as the SafetensorsFile (moves included) is alive.
struct TensorEntry {
  /// Tensor name in the file.
  std::string name;
  /// Element type.
  DType dtype = DType::F32;
  /// Extents.
  Shape shape;
  /// First byte of the data.
  const unsigned char* data = nullptr;
  /// Size of the data in bytes.
  std::size_t nbytes = 0;
};

/// A validated, read-only safetensors file. open() memory-maps the file (nothing is
/// copied); tensors are decoded on get(). Move-only; the mapping is released on destruction.
/// As with any mapping, the file must not be truncated by someone else while it is open.
class SafetensorsFile {
 public:
  /// Largest accepted JSON header (bytes), as in the reference implementation.
  static constexpr std::uint64_t max_header_bytes = 100000000;

  /// Maps and validates `path`; throws format_error (naming the file and the tensor or
  /// field) on any malformation or I/O failure.
  static SafetensorsFile open(const std::string& path);
  /// Validates an in-memory file (tests, fuzzing); `label` names it in error messages.
  static SafetensorsFile from_bytes(std::vector<unsigned char> bytes, std::string label = "<memory>");

  /// Move constructor (entry pointers stay valid).
  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  /// Move assignment (entry pointers stay valid).
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  /// Tensor names in header (JSON text) order.
  std::vector<std::string> names() const;
  /// Whether a tensor called `name` is stored.
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// The stored tensor `name`; throws format_error listing a few available names if absent.
  const TensorEntry& entry(const std::string& name) const;
  /// Tensor `name` converted to floating-point `S` (from F32/F64/F16/BF16 or an integer dtype).
  template <class S>
  Tensor<S> get(const std::string& name) const {
    static_assert(std::is_floating_point_v<S>, "SafetensorsFile::get<S>: S must be float or double");
    const TensorEntry& e = entry(name);
    const auto n = static_cast<std::size_t>(e.nbytes / dtype_size(e.dtype));  // validated == numel
    if (n > std::size_t(max_tensor_bytes) / sizeof(S))  // cap the allocation, like Tensor does
      throw format_error(orepa::detail::cat(label_, ": tensor '", name, "' of shape ", shape_str(e.shape),
                                            " exceeds the ", max_tensor_bytes, "-byte limit"));
    std::vector<S> out(n);
    double v = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!detail::decode(e.dtype, e.data, i, v))
        throw format_error(orepa::detail::cat(label_, ": tensor '", name, "': reading dtype ",
                                              to_string(e.dtype), " as floating point is not supported"));
      out[i] = static_cast<S>(v);
    }
    return Tensor<S>(e.shape, std::move(out));
  }
  /// The single element of tensor `name` (e.g. bn.num_batches_tracked) as an integer; float
  /// dtypes must hold an exact integer.
  std::int64_t get_int(const std::string& name) const;
  /// The "__metadata__" string map (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The name used in error messages (the path, or the from_bytes label).
  const std::string& label() const { return label_; }

 private:
  struct Unmap {
    std::size_t len = 0;
    void operator()(unsigned char* p) const;
  };
  using Mapping = std::unique_ptr<unsigned char, Unmap>;
  SafetensorsFile() = default;

  [[noreturn]] void fail(const std::string& what) const { throw format_error(label_ + ": " + what); }

  /// Validates the whole file and fills entries_, index_ and metadata_.
  void parse(const unsigned char* p, std::size_t size);

  std::string label_;
  Mapping map_{nullptr, Unmap{}};
  std::vector<unsigned char> owned_;
  std::vector<TensorEntry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and writes a safetensors file; tensors are laid out in add order.
class SafetensorsWriter {
 public:
  /// Adds `t` stored as `as` (F32, F64, F16 or BF16, rounded to nearest even), in the
  /// row-major order of its logical shape (NCHW) whatever its memory format: a
  /// channels-last tensor reads back with the same value at every (n, c, h, w). Throws
  /// config_error for a duplicate or reserved name or another dtype.
  template <class S>
  void add(const std::string& name, const Tensor<S>& t, DType as = DType::F32) {
    add(name, ConstTensorView<S>(t), as);
  }
  /// Adds the elements of view `v` (of a raw buffer, an Eigen matrix or a tensor; any
  /// memory format), as add() of a Tensor does.
  template <class T>
  void add(const std::string& name, const TensorView<T>& v, DType as = DType::F32) {
    using S = std::remove_const_t<T>;
    static_assert(std::is_arithmetic_v<S>, "SafetensorsWriter::add: the scalar must be arithmetic");
    if (as != DType::F32 && as != DType::F64 && as != DType::F16 && as != DType::BF16)
      throw config_error(orepa::detail::cat("SafetensorsWriter: tensor '", name, "': writing dtype ",
                                            to_string(as), " from a Tensor is not supported"));
    Item it = start(name, as, v.sizes());
    auto put = [&](S s) {
      const double x = static_cast<double>(s);
      if (as == DType::F32) detail::store_le(it.bytes, static_cast<float>(x));
      else if (as == DType::F64) detail::store_le(it.bytes, x);
      else detail::store_le(it.bytes, as == DType::F16 ? detail::encode16(x, 10, 5) : detail::encode16(x, 7, 8));
    };
    if (v.is_contiguous()) {
      for (const S& s : v) put(s);
    } else {  // channels-last storage (NHWC): visit the elements in NCHW order
      const Shape& d = v.sizes();
      for (std::int64_t n = 0; n < d[0]; ++n)
        for (std::int64_t c = 0; c < d[1]; ++c)
          for (std::int64_t h = 0; h < d[2]; ++h)
            for (std::int64_t w = 0; w < d[3]; ++w) put(v(n, c, h, w));
    }
    items_.push_back(std::move(it));
  }
  /// Adds an I64 tensor (e.g. bn.num_batches_tracked with shape {}); values.size() must equal numel.
  void add_int64(const std::string& name, const Shape& shape, const std::vector<std::int64_t>& values);
  /// Copies a stored entry byte for byte (any dtype), e.g. to pass tensors through a converter.
  void add_raw(const TensorEntry& e);
  /// Sets the "__metadata__" string map (written only when non-empty).
  void set_metadata(std::map<std::string, std::string> m) { metadata_ = std::move(m); }

  /// The complete file; the JSON header is padded with spaces so the data starts 8-aligned.
  std::vector<unsigned char> to_bytes() const;
  /// Atomically writes the file: PATH.tmp.XXXXXX in the same folder, fsync, rename().
  /// On an I/O failure the temporary file is removed, `path` is untouched and format_error
  /// is thrown; config_error, before any file is created, if to_bytes() fails or `path` is
  /// no place for a file (output_target(): a directory, FIFO, socket or device, or a
  /// symbolic link to anything but a regular file). A symbolic link to a regular file is
  /// followed: its target is replaced and the link stays. A new file gets mode 0644; an
  /// existing file keeps its mode.
  void write(const std::string& path) const;

 private:
  struct Item { std::string name; DType dtype; Shape shape; std::vector<unsigned char> bytes; };
  /// Validates the name (unique, not reserved) and reserves the byte buffer.
  Item start(const std::string& name, DType dtype, const Shape& shape) const;

  std::vector<Item> items_;
  std::map<std::string, std::string> metadata_;
};

#if OREPA_DEFINITIONS
OREPA_INLINE SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.label_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw format_error(orepa::detail::cat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw format_error(orepa::detail::cat(path, ": not a readable regular file"));
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size >= 8) {  // mmap of 0 bytes fails; short files are reported by parse()
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw format_error(orepa::detail::cat(path, ": mmap failed: ", std::strerror(err)));
    }
    f.map_ = Mapping(static_cast<unsigned char*>(p), Unmap{size});
  }
  ::close(fd);  // the mapping stays valid after close
  f.parse(f.map_.get(), size);
  return f;
}

OREPA_INLINE SafetensorsFile SafetensorsFile::from_bytes(std::vector<unsigned char> bytes, std::string label) {
  SafetensorsFile f;
  f.label_ = std::move(label);
  f.owned_ = std::move(bytes);  // a vector move keeps the buffer, so entry pointers stay valid
  f.parse(f.owned_.data(), f.owned_.size());
  return f;
}

OREPA_INLINE std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> r;
  for (const auto& e : entries_) r.push_back(e.name);
  return r;
}

OREPA_INLINE const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it != index_.end()) return entries_[it->second];
  std::string some;
  for (std::size_t i = 0; i < entries_.size() && i < 8; ++i) some += (i ? ", " : "") + entries_[i].name;
  if (entries_.size() > 8) some += ", ...";
  throw format_error(orepa::detail::cat(label_, ": no tensor '", name, "' (", entries_.size(),
                                        " stored: ", some, ")"));
}

OREPA_INLINE std::int64_t SafetensorsFile::get_int(const std::string& name) const {
  const TensorEntry& e = entry(name);
  auto fail = [&](const char* why) {
    return format_error(orepa::detail::cat(label_, ": tensor '", name, "' (", to_string(e.dtype), " ",
                                           shape_str(e.shape), "): ", why));
  };
  if (e.nbytes != dtype_size(e.dtype)) throw fail("expected exactly one element");
  if (e.dtype == DType::I64) return detail::load_le<std::int64_t>(e.data);
  if (e.dtype == DType::U64) {
    auto u = detail::load_le<std::uint64_t>(e.data);
    if (u > std::uint64_t(std::numeric_limits<std::int64_t>::max())) throw fail("value exceeds int64");
    return std::int64_t(u);
  }
  double v = 0;
  if (!detail::decode(e.dtype, e.data, 0, v)) throw fail("unsupported dtype");
  if (!(std::floor(v) == v && std::fabs(v) < 9.2e18)) throw fail("value is not an integer");
  return static_cast<std::int64_t>(v);
}

OREPA_INLINE void SafetensorsFile::parse(const unsigned char* p, std::size_t size) {
  if (size < 8) fail(orepa::detail::cat("file too short (", size, " bytes; the header length needs 8)"));
  const auto n = detail::load_le<std::uint64_t>(p);
  if (n > max_header_bytes) fail(orepa::detail::cat("header length ", n, " exceeds ", max_header_bytes));
  if (n > size - 8) fail(orepa::detail::cat("header length ", n, " runs past the end of the ", size, "-byte file"));
  const unsigned char* buf = p + 8 + n;
  const std::uint64_t buf_size = size - 8 - n;

  json::Value header;
  try {
    header = json::Parser::parse(reinterpret_cast<const char*>(p + 8), n);
  } catch (const json::error& e) {
    const std::string what = e.what();
    fail(what.rfind("invalid JSON: ", 0) == 0 ? "invalid JSON header: " + what.substr(14) : what);
  }
  if (!header.is_object()) fail("header is not a JSON object");

  for (std::size_t k = 0; k < header.keys.size(); ++k) {
    const std::string& name = header.keys[k];
    const json::Value& v = header.items[k];
    if (name == "__metadata__") {
      if (!v.is_object()) fail("'__metadata__' is not an object");
      for (std::size_t m = 0; m < v.keys.size(); ++m) {
        if (!v.items[m].is_string()) fail("'__metadata__' value of key '" + v.keys[m] + "' is not a string");
        metadata_[v.keys[m]] = v.items[m].text;
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) fail(where + ": entry is not an object");
    // Unknown extra fields are ignored, as other readers do.
    const json::Value* dtype = v.find("dtype");
    const json::Value* shape = v.find("shape");
    const json::Value* offsets = v.find("data_offsets");
    if (!dtype || !dtype->is_string()) fail(where + ": missing or non-string 'dtype'");
    if (!shape || !shape->is_array()) fail(where + ": missing or non-array 'shape'");
    if (!offsets || !offsets->is_array() || offsets->items.size() != 2)
      fail(where + ": 'data_offsets' must be an array [begin, end]");
    TensorEntry e;
    e.name = name;
    try {
      e.dtype = parse_dtype(dtype->text, name);
    } catch (const format_error& err) {
      fail(err.what());
    }
    for (const auto& d : shape->items) {
      auto c = d.as_count();
      if (!c || *c > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
        fail(where + ": 'shape' entry " + d.dump() + " is not a non-negative integer");
      e.shape.push_back(std::int64_t(*c));
    }
    auto b = offsets->items[0].as_count(), en = offsets->items[1].as_count();
    if (!b || !en) fail(where + ": 'data_offsets' entries must be non-negative integers");
    if (*en < *b) fail(orepa::detail::cat(where, ": data_offsets [", *b, ", ", *en, "] end before begin"));
    if (*en > buf_size)
      fail(orepa::detail::cat(where, ": data_offsets [", *b, ", ", *en, "] out of range of the ", buf_size,
                              "-byte data buffer"));
    std::int64_t bytes = 0;
    try {  // overflow-checked: a hostile shape must not wrap around to a small size
      bytes = checked_mul(checked_numel(e.shape, "shape"), std::int64_t(dtype_size(e.dtype)), "byte count");
    } catch (const std::invalid_argument& err) {
      fail(where + " " + shape_str(e.shape) + ": " + err.what());
    }
    if (std::uint64_t(bytes) != *en - *b)
      fail(orepa::detail::cat(where, ": shape ", shape_str(e.shape), " of ", to_string(e.dtype), " needs ",
                              bytes, " bytes but data_offsets [", *b, ", ", *en, "] span ", *en - *b));
    e.data = buf + *b;
    e.nbytes = std::size_t(bytes);
    index_[name] = entries_.size();
    entries_.push_back(std::move(e));
  }

  // Sorted by offset, the tensors must tile the data buffer exactly: no holes, no overlaps.
  std::vector<const TensorEntry*> order;
  for (const auto& e : entries_) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return std::make_pair(a->data, a->nbytes) < std::make_pair(b->data, b->nbytes);
  });
  std::uint64_t pos = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry* e : order) {
    const auto begin = std::uint64_t(e->data - buf);
    if (begin > pos) fail(orepa::detail::cat("tensor '", e->name, "': hole in the data buffer at bytes [", pos,
                                             ", ", begin, ")"));
    if (begin < pos)
      fail(orepa::detail::cat("tensor '", e->name, "' overlaps tensor '", prev->name, "' at byte ", begin));
    pos = begin + e->nbytes;
    prev = e;
  }
  if (pos != buf_size)
    fail(orepa::detail::cat(buf_size - pos, " unused bytes at the end of the data buffer",
                            prev ? " after tensor '" + prev->name + "'" : std::string()));
}

OREPA_INLINE void SafetensorsFile::Unmap::operator()(unsigned char* p) const {
  if (p) ::munmap(p, len);
}

OREPA_INLINE void SafetensorsWriter::add_int64(const std::string& name, const Shape& shape, const std::vector<std::int64_t>& values) {
  if (checked_numel(shape) != std::int64_t(values.size()))
    throw shape_error(orepa::detail::cat("SafetensorsWriter: tensor '", name, "' of shape ", shape_str(shape),
                                         " needs ", checked_numel(shape), " values, got ", values.size()));
  Item it = start(name, DType::I64, shape);
  for (auto v : values) detail::store_le(it.bytes, v);
  items_.push_back(std::move(it));
}

OREPA_INLINE void SafetensorsWriter::add_raw(const TensorEntry& e) {
  Item it = start(e.name, e.dtype, e.shape);
  if (std::uint64_t(checked_mul(checked_numel(e.shape), std::int64_t(dtype_size(e.dtype)))) != e.nbytes)
    throw config_error(orepa::detail::cat("SafetensorsWriter: tensor '", e.name, "': ", e.nbytes,
                                          " bytes do not fit shape ", shape_str(e.shape)));
  it.bytes.assign(e.data, e.data + e.nbytes);
  items_.push_back(std::move(it));
}

OREPA_INLINE std::vector<unsigned char> SafetensorsWriter::to_bytes() const {
  // Compact JSON, keys in add order: the bytes the Python writer produces.
  std::string text = "{";
  std::uint64_t off = 0;
  try {
    if (!metadata_.empty()) {
      text += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata_) text += (text.back() == '{' ? "" : ",") + json::quote(k) + ":" + json::quote(v);
      text += "}";
    }
    for (const auto& it : items_) {
      text += (text.size() == 1 ? "" : ",") + json::quote(it.name) + ":{\"dtype\":\"" + to_string(it.dtype) +
              "\",\"shape\":[";
      for (std::size_t d = 0; d < it.shape.size(); ++d) text += (d ? "," : "") + std::to_string(it.shape[d]);
      text += "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + it.bytes.size()) + "]}";
      off += it.bytes.size();
    }
    text += "}";
  } catch (const json::error& e) {
    throw config_error(std::string("SafetensorsWriter: cannot encode the header: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<unsigned char> out;
  out.reserve(8 + text.size() + off);
  detail::store_le(out, std::uint64_t(text.size()));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& it : items_) out.insert(out.end(), it.bytes.begin(), it.bytes.end());
  return out;
}

OREPA_INLINE void SafetensorsWriter::write(const std::string& path) const {
  const std::vector<unsigned char> bytes = to_bytes();
  const std::string target = output_target({"output", path});
  std::vector<char> tmp(target.begin(), target.end());
  const char suffix[] = ".tmp.XXXXXX";
  tmp.insert(tmp.end(), suffix, suffix + sizeof suffix);  // includes the terminating NUL
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) throw format_error(path + ": cannot create a temporary file: " + std::strerror(errno));
  auto fail = [&](const char* what) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.data());
    throw format_error(orepa::detail::cat(path, ": ", what, ": ", std::strerror(err)));
  };
  struct stat st {};
  const mode_t mode = ::stat(target.c_str(), &st) == 0 ? (st.st_mode & 07777) : 0644;
  if (::fchmod(fd, mode) != 0) fail("chmod of the temporary file failed");
  for (std::size_t done = 0; done < bytes.size();) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("write failed");
    done += std::size_t(w);
  }
  if (::fsync(fd) != 0) fail("fsync failed");
  const int rc = ::close(fd);
  fd = -1;
  if (rc != 0) fail("close failed");
  if (::rename(tmp.data(), target.c_str()) != 0) fail("rename failed");
  // Best effort: persist the rename itself (the data is already safe).
  const auto slash = target.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : target.substr(0, slash);
  if (int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) ::fsync(dfd), ::close(dfd);
}

OREPA_INLINE auto SafetensorsWriter::start(const std::string& name, DType dtype, const Shape& shape) const -> Item {
  if (name == "__metadata__") throw config_error("SafetensorsWriter: '__metadata__' is a reserved name");
  for (const auto& it : items_)
    if (it.name == name) throw config_error("SafetensorsWriter: duplicate tensor name '" + name + "'");
  const std::int64_t bytes = checked_mul(checked_numel(shape), std::int64_t(dtype_size(dtype)), "byte count");
  if (bytes > max_tensor_bytes) throw config_error("SafetensorsWriter: tensor '" + name + "' is too large");
  Item it{name, dtype, shape, {}};
  it.bytes.reserve(std::size_t(bytes));
  return it;
}
#endif  // OREPA_DEFINITIONS

}  // namespace orepa::io
