// Must not compile: a block is never copied silently (the error names clone()).
#include <orepa/orepa.hpp>

int main() {
  orepa::OREPA<float, orepa::SiLU> block(orepa::OrepaOptions(4, 8, 3));
  auto copy = block;  // the user's line: an error here, saying to std::move or clone()
  return int(copy.geometry().out_channels);
}
