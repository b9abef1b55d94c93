#pragma once
/// @file linkage.hpp
/// Where the library's non-template code is compiled. By default in every program that
/// includes it (inline: the library is header-only). A program linking orepa::precompiled
/// (OREPA_PRECOMPILED, see precompiled.hpp) sees only the declarations of the heavy
/// functions, which that library compiles once (with OREPA_PRECOMPILING); their bodies
/// sit in `#if OREPA_DEFINITIONS` sections that such a program does not even parse.

/// \cond DO_NOT_DOCUMENT_THIS
#if defined(OREPA_PRECOMPILED) || defined(OREPA_PRECOMPILING)
#define OREPA_INLINE
#else
#define OREPA_INLINE inline
#endif
#if defined(OREPA_PRECOMPILED) && !defined(OREPA_PRECOMPILING)
#define OREPA_DEFINITIONS 0
#else
#define OREPA_DEFINITIONS 1
#endif
/// \endcond
