#!/usr/bin/env bash
# README command (1): installs dependencies, builds the `tandem` binary and runs the main job on
# the embedded demo model (all roles in one box, CPU backend).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/install-deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/release -j "${JOBS:-2}" --target tandem
PROMPT=${1:-"The President said that"}
build/release/server/tandem generate --model configs/demo-model --prompt "${PROMPT}" \
  --max-tokens 48 --seed 7
