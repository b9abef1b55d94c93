// Fuzz target: SafetensorsWriter::add on every kind of tensor it can be given.
//
// The input describes up to three tensors: each its holder (Tensor, TensorView or
// ConstTensorView), scalar (float or double), memory format (contiguous or channels-last),
// dtype to store (F32, F64, F16, BF16), rank and extents (at most 4 x 4 x 4 x 4), a name
// (any bytes: duplicates, "__metadata__" and invalid UTF-8 included) and the raw bits of
// every value in storage order (NaN, Inf and subnormals included). The writer must accept
// them or throw an orepa error; an accepted file must parse, and every element must read
// back at its logical (row-major NCHW) index: exactly for F32 / F64, within half a unit
// in the last place (or overflowing to Inf) for F16 / BF16. The logical order is
// computed here from the extents, not with the library's offset functions.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "orepa/io/safetensors.hpp"

using namespace orepa;
using namespace orepa::io;

namespace {

constexpr DType kDTypes[] = {DType::F32, DType::F64, DType::F16, DType::BF16};

// One tensor as the writer is given it, and the values it must read back in logical order.
struct Case {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::vector<double> logical;  // the values as the writer's scalar holds them, NCHW order
};

// Storage index of logical element `i` (row-major over `s`) in `format`.
std::int64_t storage_index(const Shape& s, MemoryFormat format, std::int64_t i) {
  if (format == MemoryFormat::contiguous) return i;
  const std::int64_t W = s[3], H = s[2], C = s[1];
  const std::int64_t w = i % W, h = i / W % H, c = i / (W * H) % C, n = i / (W * H * C);
  return ((n * H + h) * W + w) * C + c;  // NHWC
}

template <class S>
S value_from(FuzzedDataProvider& in) {
  using Bits = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
  const Bits b = in.ConsumeIntegral<Bits>();
  S v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// Builds one tensor of scalar S from the input, adds it to `w` through the holder the
// input picks, and returns what must read back.
template <class S>
Case add_one(FuzzedDataProvider& in, SafetensorsWriter& w) {
  Case c;
  const int holder = in.ConsumeIntegralInRange(0, 2);
  const bool channels_last = in.ConsumeBool();
  c.dtype = kDTypes[in.ConsumeIntegralInRange(0, 3)];
  const int rank = channels_last ? 4 : in.ConsumeIntegralInRange(0, 4);
  for (int d = 0; d < rank; ++d) c.shape.push_back(in.ConsumeIntegralInRange<std::int64_t>(0, 4));
  c.name = in.ConsumeRandomLengthString(12);
  const MemoryFormat format = channels_last ? MemoryFormat::channels_last : MemoryFormat::contiguous;
  std::int64_t numel = 1;
  for (auto d : c.shape) numel *= d;
  std::vector<S> storage(static_cast<std::size_t>(numel));
  for (auto& v : storage) v = value_from<S>(in);
  c.logical.resize(storage.size());
  for (std::int64_t i = 0; i < numel; ++i)
    c.logical[std::size_t(i)] = double(storage[std::size_t(storage_index(c.shape, format, i))]);

  if (holder == 0) {
    Tensor<S> t(c.shape, format);
    std::copy(storage.begin(), storage.end(), t.data());
    w.add(c.name, t, c.dtype);
  } else if (holder == 1) {
    w.add(c.name, view(storage.data(), c.shape, format), c.dtype);
  } else {
    w.add(c.name, ConstTensorView<S>(storage.data(), c.shape, format), c.dtype);
  }
  return c;
}

// Whether `got` is what storing `want` (as the writer's scalar held it) in `dtype` gives.
bool reads_back(DType dtype, double want, double got) {
  if (std::isnan(want)) return std::isnan(got);
  if (dtype == DType::F64) return got == want;
  if (dtype == DType::F32) return got == double(float(want));
  // F16 (10 mantissa bits, exponents down to -14) or BF16 (7 bits, down to -126):
  // round to nearest, so within half a step of the value, sign kept, or Inf past the top.
  const int mant = dtype == DType::F16 ? 10 : 7, emin = dtype == DType::F16 ? -14 : -126,
            emax = dtype == DType::F16 ? 15 : 127;
  if (std::signbit(got) != std::signbit(want)) return false;
  const double a = std::fabs(want), largest = std::ldexp(2.0 - std::ldexp(1.0, -mant), emax);
  if (std::isinf(got)) return a >= largest;
  // Half the spacing of the format at `a` (subnormals: the fixed spacing below 2^emin).
  const double half_step = std::ldexp(1.0, std::max(a == 0 ? emin : std::ilogb(a), emin) - mant - 1);
  return std::fabs(got - want) <= half_step;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  std::vector<Case> cases;
  SafetensorsWriter w;
  std::vector<unsigned char> bytes;
  bool accepted = false;
  fuzz::run_accepting_orepa_errors([&] {
    const int n = in.ConsumeIntegralInRange(1, 3);
    for (int k = 0; k < n; ++k) {
      cases.push_back(in.ConsumeBool() ? add_one<float>(in, w) : add_one<double>(in, w));
    }
    bytes = w.to_bytes();
    accepted = true;
  });
  if (!accepted) return 0;
  fuzz::require(w.to_bytes() == bytes, "to_bytes is not deterministic");
  const SafetensorsFile f = [&] {
    try {
      return SafetensorsFile::from_bytes(bytes, "<written>");
    } catch (const std::exception& e) {
      fuzz::finding("the reader rejected what the writer wrote:", e.what());
    }
  }();
  fuzz::require(f.names().size() == cases.size(), "the file holds another number of tensors");
  for (std::size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    fuzz::require(f.names()[k] == c.name, "tensor names or their order changed");
    const TensorEntry& e = f.entry(c.name);
    fuzz::require(e.dtype == c.dtype && e.shape == c.shape, "dtype or shape changed");
    const Tensor<double> got = f.get<double>(c.name);
    for (std::size_t i = 0; i < c.logical.size(); ++i)
      if (!reads_back(c.dtype, c.logical[i], got[std::int64_t(i)]))
        fuzz::finding("an element did not read back at its logical index:", c.name.c_str());
  }
  return 0;
}
