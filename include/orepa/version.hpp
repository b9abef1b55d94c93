#pragma once
/// @file version.hpp
/// The library version: the one place it is written (CMake parses these lines).

#define OREPA_VERSION_MAJOR 0
#define OREPA_VERSION_MINOR 1
#define OREPA_VERSION_PATCH 0

namespace orepa {
/// Version string "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";
}  // namespace orepa
