#pragma once
// The entry points of orepa-convert, orepa-run and orepa-detect. Each binary is
// tool_main.cpp compiled with OREPA_TOOL_MAIN set to its function (examples/CMakeLists.txt);
// the tools' code is one library compiled as one translation unit, so the blocks and the
// network it instantiates are compiled once, not once per tool.
namespace orepa::tools {
int convert_main(int argc, char** argv);  // orepa_convert.cpp
int run_main(int argc, char** argv);      // orepa_run.cpp
int detect_main(int argc, char** argv);   // orepa_detect.cpp (with orepa::yolo)
}  // namespace orepa::tools
