// Must not compile: Sequential::add takes the layer by move (the error names std::move and clone()).
#include <orepa/orepa.hpp>

int main() {
  orepa::ConvBN<float, orepa::SiLU> block(orepa::ConvOptions(4, 8, 3));
  orepa::Sequential<float> net;
  net.add(block);  // the user's line: an error here, saying to std::move or clone()
  return int(net.size());
}
