#!/usr/bin/env bash
# README command (2): installs dependencies, builds, and runs every test twice: an optimised build
# (with CUDA sources compiled when nvcc is present, and the HIP kernels when hipcc is) and an
# AddressSanitizer + UndefinedBehaviorSanitizer build. Bounded for a 2-core CI machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/install-deps.sh

JOBS=${JOBS:-2}
HIP_FLAG=OFF
if command -v hipcc >/dev/null 2>&1; then HIP_FLAG=ON; fi

echo "== release build"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTANDEM_HIP=${HIP_FLAG}
cmake --build build/release -j "${JOBS}"
echo "== release tests"
ctest --test-dir build/release -j "${JOBS}" --output-on-failure --timeout 900

echo "== sanitizer build (ASan + UBSan)"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTANDEM_SANITIZE=ON \
  -DTANDEM_CUDA=OFF -DTANDEM_BUILD_BENCH=OFF
cmake --build build/asan -j "${JOBS}"
echo "== sanitizer tests"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan -j "${JOBS}" --output-on-failure --timeout 1800
