#!/usr/bin/env bash
# Configures a build folder for one of the project's commands. Every option a command
# relies on is set explicitly, so a folder configured before by another command (whose
# options CMake keeps in its cache) is reconfigured to what this one needs.
#
# Usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR
#   demo  Release, examples only (scripts/demo.sh); no MPI
#   test  Release, tests + examples + benchmarks (scripts/test.sh), with MPI (orepa::dist)
#   asan  RelWithDebInfo with ASan + UBSan, tests + examples (scripts/test.sh), with MPI
#   fuzz  RelWithDebInfo, clang-14 with libFuzzer, fuzz targets only (scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 2 ]] || { echo "usage: bash scripts/configure.sh demo|test|asan|fuzz BUILD_DIR" >&2; exit 2; }
profile=$1 dir=$2
case "$profile" in
  demo) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON) ;;
  test) flags=(-DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=ON -DOREPA_INSTALL=ON -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON) ;;
  asan) flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=ON -DOREPA_BUILD_EXAMPLES=ON
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=ON -DOREPA_SANITIZE=ON -DOREPA_FUZZ=OFF -DOREPA_OPENMP=ON -DOREPA_WITH_MPI=ON -DOREPA_WITH_YOLO=ON) ;;
  fuzz) export CC=clang-14 CXX=clang++-14
        flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_EXAMPLES=OFF
               -DOREPA_BUILD_BENCHMARKS=OFF -DOREPA_INSTALL=OFF -DOREPA_SANITIZE=OFF -DOREPA_FUZZ=ON -DOREPA_OPENMP=OFF -DOREPA_WITH_MPI=OFF -DOREPA_WITH_YOLO=ON) ;;
  *) echo "scripts/configure.sh: unknown profile '$profile' (demo, test, asan or fuzz)" >&2; exit 2 ;;
esac
cmake -S . -B "$dir" "${flags[@]}" >/dev/null
