// Fuzz target: the command-line parsing of orepa-run and orepa-convert
// (examples/tool_args.hpp). The input is split at NUL bytes into argv words; both parsers
// must either accept them or throw one of orepa's errors, and an accepted command must
// satisfy the parser's own guarantees (orepa-convert's --allow-nonfinite only when given,
// and never taken for a path).
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../examples/tool_args.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  std::vector<std::string> args(1);
  for (std::size_t i = 0; i < size && args.size() <= 64; ++i) {
    if (data[i] == 0) args.emplace_back();
    else args.back() += char(data[i]);
  }
  orepa::fuzz::run_accepting_orepa_errors([&] {
    const auto r = orepa::tools::parse_run_args(args);
    if (r.help) return;
    if (r.weights.empty() || r.input.empty() || r.output.empty())
      orepa::fuzz::finding("orepa-run accepted a command without --weights/--input/--output");
    if (r.mode != "eval" && r.mode != "deploy" && r.mode != "train")
      orepa::fuzz::finding("orepa-run accepted --mode", r.mode.c_str());
    auto below = [](const std::optional<std::int64_t>& v, std::int64_t lo) { return v && *v < lo; };
    const auto& s = r.settings;
    if (below(s.stride, 1) || below(s.dilation, 1) || below(s.padding, 0) || below(s.groups, 1))
      orepa::fuzz::finding("orepa-run accepted an out-of-range integer flag");
    if (r.precision == orepa::Precision::int8 && (r.mode != "deploy" || r.calibration.empty()))
      orepa::fuzz::finding("orepa-run accepted int8 without --mode deploy and --calibration");
    if (!r.model.empty() && (r.mode == "train" || r.block || !r.prefix.empty() || !r.grad_output.empty()))
      orepa::fuzz::finding("orepa-run accepted single-block flags or train mode with --model");
  });
  orepa::fuzz::run_accepting_orepa_errors([&] {
    const auto c = orepa::tools::parse_convert_args(args);
    if (!c.help && (c.in.empty() || c.out.empty())) orepa::fuzz::finding("orepa-convert accepted an empty path");
    const bool flag = std::find(args.begin(), args.end(), "--allow-nonfinite") != args.end();
    if (c.allow_nonfinite && !flag) orepa::fuzz::finding("orepa-convert allowed non-finite values without the flag");
    if (!c.help && (c.in == "--allow-nonfinite" || c.out == "--allow-nonfinite"))
      orepa::fuzz::finding("orepa-convert took --allow-nonfinite for a path");
  });
  return 0;
}
