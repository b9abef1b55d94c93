// The compiled half of orepa::precompiled: the explicit instantiations that
// include/orepa/precompiled.hpp declares extern for the programs linking the library.
#define OREPA_PRECOMPILING
#include "orepa/precompiled.hpp"

#define OREPA_DEFINE_INSTANCE(...) template __VA_ARGS__;
namespace orepa {
OREPA_PRECOMPILED_INSTANCES(OREPA_DEFINE_INSTANCE)
}  // namespace orepa

// A function template only so that a header-only program that never loads a checkpoint
// does not instantiate every block (io/checkpoint.hpp).
template orepa::AnyBlock<float> orepa::io::load_block<void>(const orepa::io::SafetensorsFile&, const std::string&,
                                                            orepa::io::BlockType, const orepa::io::BlockSettings&,
                                                            orepa::io::LoadPurpose);
