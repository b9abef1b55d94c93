#!/usr/bin/env bash
# Installs what is missing (Debian packages), builds the examples and runs the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DOREPA_BUILD_TESTS=OFF -DOREPA_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target block_basics
./build/examples/block_basics "$@"
