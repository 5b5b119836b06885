#!/usr/bin/env bash
# Builds, on this (Debian) machine, what the GPU machine runs, and packs it into
# .gpu/bundle.tar.xz at the repository root (ignored by git): the GPU machine has CUDA, CMake and PyTorch but none of our Debian -dev
# packages (Abseil, xxHash, GoogleTest, nlohmann-json), so we ship binaries rather than sources.
#
#   bench/gpu/make_bundle.sh         # then, with the device tool:
#   run(command="bash bench/gpu/run_all.sh tests", carry=[".gpu"])
#
# The build is engine-only (no gRPC, Boost, prometheus-cpp), Release, CUDA for sm_90 (H100/H200),
# host code for x86-64-v3 (AVX2: any current datacentre x86 CPU) rather than this machine's CPU.
# The bundle holds the stripped binaries, the shared libraries they need beyond glibc, libstdc++
# and CUDA (which the GPU machine has; ICU's 30 MB data file among them, hence xz: the device
# tool carries at most 64 MiB with the working tree), and the source path compiled into the
# tests (run_all.sh links the carried checkout there so the tests find tests/data).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${TANDEM_GPU_BUILD_DIR:-$root/build/gpu-bundle}
stage=$build/bundle

configure_log=$(cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DTANDEM_ENGINE_ONLY=ON \
  -DTANDEM_CUDA=ON \
  -DTANDEM_NATIVE=OFF \
  -DCMAKE_CXX_FLAGS="-march=x86-64-v3" \
  -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DTANDEM_BUILD_TESTS=ON \
  -DTANDEM_BUILD_BENCH=ON)
if ! grep -q "CUDA backend ON" <<<"$configure_log"; then
  echo "make_bundle: CUDA is not enabled in $build (is nvcc at /usr/local/cuda/bin?)" >&2
  exit 1
fi
bins=(tests/engine/cuda/cuda_backend_tests bench/engine/engine_bench)
ninja -C "$build" cuda_backend_tests engine_bench

rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/lib"
for b in "${bins[@]}"; do
  cp "$build/$b" "$stage/bin/"
  strip --strip-unneeded "$stage/bin/$(basename "$b")"
done
# Shared libraries to carry: everything resolved by the loader except the C/C++ runtime and
# CUDA's own libraries.
for b in "$stage"/bin/*; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | ld-linux* | \
      libstdc++.so* | libgcc_s.so* | libcuda.so* | libcudart.so* | libcublas*.so*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
echo "$root" >"$stage/source_dir"
git -C "$root" rev-parse HEAD >"$stage/commit" 2>/dev/null || true
mkdir -p "$root/.gpu"
tar -C "$stage" -cJf "$root/.gpu/bundle.tar.xz" .
echo "packed $(ls "$stage/bin" | tr '\n' ' ')into .gpu/bundle.tar.xz" \
  "($(du -h "$root/.gpu/bundle.tar.xz" | cut -f1), from $(du -sh "$stage" | cut -f1))"
