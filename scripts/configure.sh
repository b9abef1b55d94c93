#!/usr/bin/env bash
# Configures a build folder for one of the project's commands. Every option a command
# relies on is set explicitly, so a folder configured before by another command (whose
# options CMake keeps in its cache) is reconfigured to what this one needs.
#
# Usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR
#   demo  Release, examples only (scripts/demo.sh); no MPI
#   test  Release at -O2, tests + examples + benchmarks (scripts/test.sh), with MPI (orepa::dist)
#   asan  RelWithDebInfo at -O1 -g1, clang-14 with ASan + UBSan: tests + examples, with MPI, and
#         the libFuzzer targets (scripts/test.sh runs both from this one build)
#   fuzz  RelWithDebInfo (-O2 -g), clang-14 with libFuzzer, fuzz targets only (fuzz/README.md)
# The test and asan profiles compile the test programs as a few unity translation units
# (CMAKE_UNITY_BUILD; tests/CMakeLists.txt says how many): each test source parses Eigen,
# dnnl.hpp and the library and instantiates the same templates, which a unity TU does once.
# The test build runs at -O2 (CMake's Release default is -O3): 12 % less compile time for
# one tool's translation unit (70 s against 80 s), and the level Debian builds packages at.
# The sanitizer build runs at -O1 with line tables only (-g1, enough for symbolized
# reports): a third less compile time than -O2 -g, the optimization ASan recommends. It is
# built by clang-14: one of its translation units took 100 s there against 222 s with
# GCC 12 at the same flags, and the fuzz targets need clang anyway. Clang has no GNU
# OpenMP code generation (Debian's oneDNN runs on libgomp), so the library's own loops run
# serially there (OREPA_OPENMP=OFF); their OpenMP form is tested in the Release build.
# Warnings are errors in the test and asan profiles (OREPA_WERROR).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 2 ]] || { echo "usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR" >&2; exit 2; }
profile=$1 dir=$2
case "$profile" in
  demo) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=OFF -DOREPA_ONE_TU_PROGRAMS=OFF -DOREPA_WERROR=OFF -DOREPA_BUILD_PRECOMPILED=OFF) ;;
  test) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=ON -DOREPA_INSTALL=ON -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=ON -DOREPA_ONE_TU_PROGRAMS=ON -DOREPA_WERROR=ON -DOREPA_BUILD_PRECOMPILED=ON "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG") ;;
  asan) export CC=clang-14 CXX=clang++-14
        flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=ON -DOREPA_SANITIZE=ON -DOREPA_FUZZ=ON -DOREPA_OPENMP=OFF -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=ON -DOREPA_ONE_TU_PROGRAMS=ON -DOREPA_WERROR=ON -DOREPA_BUILD_PRECOMPILED=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -DNDEBUG") ;;
  fuzz) export CC=clang-14 CXX=clang++-14
        flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=OFF
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=ON -DOREPA_OPENMP=OFF -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=OFF -DOREPA_ONE_TU_PROGRAMS=OFF -DOREPA_WERROR=OFF -DOREPA_BUILD_PRECOMPILED=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g -DNDEBUG") ;;
  *) echo "scripts/configure.sh: unknown profile '$profile' (demo, test, asan or fuzz)" >&2; exit 2 ;;
esac
# A folder configured before with another compiler is configured afresh: CMake keeps the
# first compiler in its cache and would ignore CXX.
want_clang=0
[[ ${CXX:-} == clang* ]] && want_clang=1
if [[ -f $dir/CMakeCache.txt ]]; then
  has_clang=0
  grep -q '^CMAKE_CXX_COMPILER:[A-Z]*=.*clang' "$dir/CMakeCache.txt" && has_clang=1
  [[ $has_clang == "$want_clang" ]] || rm -rf "$dir/CMakeCache.txt" "$dir/CMakeFiles"
fi
# ccache (Debian ccache), where installed, makes a second build of unchanged sources quick;
# a first build pays ~1 s a translation unit for it. CCACHE_DISABLE=1 measures a cold build.
launcher=""
command -v ccache >/dev/null && launcher=ccache
flags+=(-DCMAKE_CXX_COMPILER_LAUNCHER="$launcher")
cmake -S . -B "$dir" "${flags[@]}" >/dev/null
