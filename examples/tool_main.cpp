// main() of one tool (tool_main.hpp).
#include "tool_main.hpp"

int main(int argc, char** argv) { return orepa::tools::OREPA_TOOL_MAIN(argc, argv); }
