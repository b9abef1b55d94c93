#!/usr/bin/env bash
# Installs what is missing (Debian packages), builds the main demo (examples/detector_demo.cpp:
# a YOLOv5n-OREPA detector trained on synthetic shapes) and runs it; arguments
# are passed on (e.g. bash scripts/demo.sh --epochs 40 --compare; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash cmake/install_deps.sh
bash scripts/configure.sh demo build
cmake --build build -j"$(nproc)" --target detector_demo
./build/examples/detector_demo "$@"
