// Fuzz target: the safetensors reader on arbitrary bytes.
//
// Every input is parsed with SafetensorsFile::from_bytes; when it is accepted, every
// tensor is decoded with get<float> and get<double>, get_int is tried on each, and the
// file is passed through SafetensorsWriter::add_raw and parsed again, which must give the
// same tensors (a file the reader accepts is one the writer can reproduce).
// format_error (and the other orepa errors) are the expected outcome for malformed
// input; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "orepa/io/safetensors.hpp"

using namespace orepa;
using namespace orepa::io;

namespace {

// Decodes the tensor of entry `e` as floating point S and checks the result against the entry.
template <class S>
void decode_as(const SafetensorsFile& f, const TensorEntry& e) {
  fuzz::run_accepting_orepa_errors([&] {
    const Tensor<S> t = f.get<S>(e.name);
    fuzz::require(t.sizes() == e.shape, "get<S> returned another shape than the entry's");
    fuzz::require(std::uint64_t(t.numel()) * dtype_size(e.dtype) == e.nbytes, "get<S> element count != nbytes / size");
  });
}

// Writes every entry of `f` again and checks the re-parsed file holds the same tensors.
void check_round_trip(const SafetensorsFile& f) {
  std::vector<unsigned char> bytes;
  try {  // even an orepa error here means the writer cannot reproduce a file the reader accepted
    SafetensorsWriter w;
    w.set_metadata(f.metadata());
    for (const auto& name : f.names()) w.add_raw(f.entry(name));
    bytes = w.to_bytes();
  } catch (const std::exception& e) {
    fuzz::finding("writing an accepted file again threw:", e.what());
  }
  const SafetensorsFile g = [&] {
    try {
      return SafetensorsFile::from_bytes(std::move(bytes), "<round trip>");
    } catch (const std::exception& e) {
      fuzz::finding("the re-written file was rejected:", e.what());
    }
  }();
  fuzz::require(g.names() == f.names(), "round trip changed the tensor names or their order");
  fuzz::require(g.metadata() == f.metadata(), "round trip changed the metadata");
  for (const auto& name : f.names()) {
    const TensorEntry &a = f.entry(name), &b = g.entry(name);
    fuzz::require(a.dtype == b.dtype && a.shape == b.shape && a.nbytes == b.nbytes, "round trip changed an entry");
    fuzz::require(a.nbytes == 0 || std::memcmp(a.data, b.data, a.nbytes) == 0, "round trip changed tensor bytes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::run_accepting_orepa_errors([&] {
    const SafetensorsFile f = SafetensorsFile::from_bytes(std::vector<unsigned char>(data, data + size), "<fuzz>");
    for (const auto& name : f.names()) {
      const TensorEntry& e = f.entry(name);
      fuzz::require(e.data != nullptr || e.nbytes == 0, "entry without data");
      decode_as<float>(f, e);
      decode_as<double>(f, e);
      fuzz::run_accepting_orepa_errors([&] { (void)f.get_int(name); });
    }
    // Lookups of absent names must throw format_error, not crash.
    fuzz::run_accepting_orepa_errors([&] { (void)f.entry("\x01 not a tensor name"); });
    check_round_trip(f);
  });
  return 0;
}
