// Fuzz target: block detection and loading (io::detect_blocks, io::load_block) on
// well-formed safetensors files whose tensor names and shapes the fuzzer chooses.
//
// The input is text, one tensor per line: a name, then up to 6 extents ("rbr_dense.vector 5 8").
// The file is built with SafetensorsWriter (F32 values from a fixed pattern, positive
// for running variances; a name ending in num_batches_tracked becomes an I64 scalar), so
// every input reaches the checkpoint reader instead of the safetensors parser. Names can
// collide on prefixes, nest blocks, drop or add branch tensors; extents can be zero or
// huge (as long as the tensor holds at most 2^16 elements). Every detected block and every
// block type at every name prefix is loaded with load_block (convert and forward
// purposes) and, when that succeeds, folded: each either works or throws one of orepa's
// error types. A folded kernel must have the shape of the loaded block's geometry.
#include <cstddef>
#include <cstdint>
#include <set>
#include <sstream>
#include <string>

#include "fuzz_common.hpp"
#include "orepa/io/checkpoint.hpp"

using namespace orepa;

namespace {

constexpr std::int64_t kMaxElements = 1 << 16;  // per tensor: keeps a run fast
constexpr std::size_t kMaxTensors = 96;

// The safetensors file the lines describe (lines that describe no tensor are skipped).
std::vector<unsigned char> build_file(const std::string& text) {
  io::SafetensorsWriter w;
  std::set<std::string> seen;
  std::istringstream lines(text);
  std::string line;
  std::size_t count = 0;
  while (std::getline(lines, line) && count < kMaxTensors) {
    std::istringstream words(line);
    std::string name;
    if (!(words >> name) || name.size() > 200 || !seen.insert(name).second) continue;
    Shape shape;
    std::string word;
    bool ok = true;
    while (words >> word && shape.size() < 6) {
      try {
        std::size_t used = 0;
        const long long v = std::stoll(word, &used);
        if (used != word.size() || v < 0) ok = false;
        shape.push_back(v);
      } catch (const std::exception&) {
        ok = false;
      }
    }
    if (!ok) continue;
    std::int64_t n = 0;
    try {
      n = checked_numel(shape);
    } catch (const std::exception&) {
      continue;  // overflowing extents: not a well-formed file
    }
    if (n > kMaxElements) continue;
    const bool counter = name.size() >= 19 && name.compare(name.size() - 19, 19, "num_batches_tracked") == 0;
    if (counter && n == 1) {
      w.add_int64(name, shape, {std::int64_t(count)});
    } else {
      const bool variance = name.find("running_var") != std::string::npos;
      Tensor<float> t(shape);
      for (std::int64_t j = 0; j < t.numel(); ++j)
        t[j] = variance ? 0.5f + float(j % 7) * 0.1f : float((j * 37 + std::int64_t(count) * 11) % 19 - 9) / 9.0f;
      w.add(name, t);
    }
    ++count;
  }
  return w.to_bytes();
}

void load_and_fold(const io::SafetensorsFile& f, const std::string& prefix, io::BlockType type) {
  for (auto purpose : {io::LoadPurpose::convert, io::LoadPurpose::forward})
    fuzz::run_accepting_orepa_errors([&] {
      auto block = io::load_block(f, prefix, type, {}, purpose);
      auto [w, b] = block.folded();
      fuzz::require(w.sizes() == block.geometry().weight_shape(), "folded kernel shape != geometry");
      fuzz::require(b.sizes() == Shape{block.geometry().out_channels}, "folded bias shape != out_channels");
    });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 8192) return 0;
  std::vector<unsigned char> bytes;
  try {
    bytes = build_file(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const std::exception& e) {
    if (!fuzz::is_orepa_error(e)) fuzz::finding("building the file threw:", e.what());
    return 0;  // e.g. a name the writer rejects
  }
  const auto f = io::SafetensorsFile::from_bytes(std::move(bytes), "<fuzz>");
  std::vector<io::DetectedBlock> found;
  fuzz::run_accepting_orepa_errors([&] { found = io::detect_blocks(f); });
  for (const auto& d : found) load_and_fold(f, d.prefix, d.type);
  // Every block type at every prefix a name has (hostile prefixes included).
  std::set<std::string> prefixes{""};
  for (const auto& name : f.names())
    for (std::size_t dot = name.find('.'); dot != std::string::npos && prefixes.size() < 16; dot = name.find('.', dot + 1))
      prefixes.insert(name.substr(0, dot + 1));
  for (const auto& p : prefixes)
    for (auto t : {io::BlockType::OREPA, io::BlockType::OREPA_1x1, io::BlockType::OREPA_LargeConv,
                   io::BlockType::RepVGGBlock_OREPA, io::BlockType::ConvBN, io::BlockType::DBB})
      load_and_fold(f, p, t);
  return 0;
}
