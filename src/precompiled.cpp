// The compiled half of orepa::precompiled: the explicit instantiations that
// include/orepa/precompiled.hpp declares extern for the programs linking the library.
#define OREPA_PRECOMPILING
#include "orepa/precompiled.hpp"

#define OREPA_DEFINE_INSTANCE(...) template __VA_ARGS__;
namespace orepa {
OREPA_PRECOMPILED_INSTANCES(OREPA_DEFINE_INSTANCE)
}  // namespace orepa
