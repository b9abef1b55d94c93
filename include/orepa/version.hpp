#pragma once
/// @file version.hpp
/// The library version: the one place it is written (CMake parses these lines).

/// Major part of the version (first field of version_string).
#define OREPA_VERSION_MAJOR 0
/// Minor part of the version (second field of version_string).
#define OREPA_VERSION_MINOR 1
/// Patch part of the version (third field of version_string).
#define OREPA_VERSION_PATCH 0

namespace orepa {
/// Version string "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";
}  // namespace orepa
