#!/usr/bin/env bash
# Configures a build folder for one of the project's commands. Every option a command
# relies on is set explicitly, so a folder configured before by another command (whose
# options CMake keeps in its cache) is reconfigured to what this one needs.
#
# Usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR
#   demo  Release, examples only (scripts/demo.sh); no MPI
#   test  Release, tests + examples + benchmarks (scripts/test.sh), with MPI (orepa::dist)
#   asan  RelWithDebInfo at -O1 -g1 with ASan + UBSan, tests + examples (scripts/test.sh), with MPI
#   fuzz  RelWithDebInfo (-O2 -g), clang-14 with libFuzzer, fuzz targets only (scripts/test.sh)
# The test and asan profiles compile the test programs as a few unity translation units
# (CMAKE_UNITY_BUILD; tests/CMakeLists.txt says how many): each test source parses Eigen,
# dnnl.hpp and the library and instantiates the same templates, which a unity TU does once.
# The sanitizer build runs at -O1 with line tables only (-g1, enough for symbolized
# reports): a third less compile time than -O2 -g, the optimization ASan recommends.
# Warnings are errors in the test profile (OREPA_WERROR); the sanitizer build only prints
# them: instrumented code at -O1 makes GCC 12's flow-based warnings (maybe-uninitialized
# on std::optional members) fire where the uninstrumented build proves them false.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 2 ]] || { echo "usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR" >&2; exit 2; }
profile=$1 dir=$2
case "$profile" in
  demo) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=OFF -DOREPA_WERROR=OFF) ;;
  test) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=ON -DOREPA_INSTALL=ON -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=ON -DOREPA_WERROR=ON) ;;
  asan) flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=ON -DOREPA_SANITIZE=ON -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=ON -DOREPA_WERROR=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG") ;;
  fuzz) export CC=clang-14 CXX=clang++-14
        flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=OFF
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=ON -DOREPA_OPENMP=OFF -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON
               -DCMAKE_UNITY_BUILD=OFF -DOREPA_WERROR=OFF "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g -DNDEBUG") ;;
  *) echo "scripts/configure.sh: unknown profile '$profile' (demo, test, asan or fuzz)" >&2; exit 2 ;;
esac
# ccache (Debian ccache), where installed, makes a second build of unchanged sources quick;
# a first build pays ~1 s a translation unit for it. CCACHE_DISABLE=1 measures a cold build.
launcher=""
command -v ccache >/dev/null && launcher=ccache
flags+=(-DCMAKE_CXX_COMPILER_LAUNCHER="$launcher")
cmake -S . -B "$dir" "${flags[@]}" >/dev/null
