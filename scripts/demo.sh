#!/usr/bin/env bash
# Installs what is missing (Debian packages), builds the main demo and runs it; arguments
# are passed on (e.g. bash scripts/demo.sh --steps 1000 --svg /tmp/curves.svg; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
bash scripts/configure.sh demo build
cmake --build build -j"$(nproc)" --target demo
./build/examples/demo "$@"
