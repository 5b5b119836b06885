#!/usr/bin/env bash
# Issue #6's GPU-machine work, one phase per device call (each call is limited to 10 minutes and
# may land on a fresh machine, so every phase stands alone). Run from the repository root there,
# with the bundle made by bench/gpu/make_bundle.sh carried along:
#
#   run(command="bash bench/gpu/run_all.sh tests",    carry=[".gpu"])  # correctness + memcheck
#   run(command="bash bench/gpu/run_all.sh bench-1b", carry=[".gpu"])  # Llama-3.2-1B shape
#   run(command="bash bench/gpu/run_all.sh bench-8b", carry=[".gpu"])  # Llama-3-8B shape
#   run(command="bash bench/gpu/run_all.sh peer-8b-compile", carry=[".gpu"])  # if time is left
#
# Results go to $OUT (the device tool brings back at most 8 files): summary.txt plus one file per
# step. Every step has its own time limit, so one that hangs cannot eat the call.
set -uo pipefail

phase=${1:?usage: run_all.sh tests|bench-1b|bench-8b|peer-8b-compile}
root=$(pwd)
out=${OUT:-/tmp/tandem-gpu-out}
mkdir -p "$out"
summary=$out/summary.txt
note() { echo "== $*" | tee -a "$summary"; }

if [ ! -f .gpu/bundle.tar.xz ]; then
  echo "no .gpu/bundle.tar.xz: run bench/gpu/make_bundle.sh here and carry .gpu" | tee -a "$summary"
  exit 2
fi
bundle=/tmp/tandem-gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle" && tar -C "$bundle" -xJf .gpu/bundle.tar.xz
# Our own libraries, then CUDA's (toolkit first, PyTorch's wheels as a fallback).
cuda_libs=/usr/local/cuda/lib64
if ! ls $cuda_libs/libcublasLt.so* >/dev/null 2>&1; then
  cuda_libs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, nvidia
base = os.path.dirname(nvidia.__path__[0] + "/")
print(":".join(sorted({os.path.dirname(p) for p in glob.glob(base + "/**/lib/libcu*.so*", recursive=True)})))
EOF
)
fi
export LD_LIBRARY_PATH="$bundle/lib:$cuda_libs:${LD_LIBRARY_PATH:-}"
# The tests look for tests/data under the source path compiled into them.
src=$(cat "$bundle/source_dir")
if [ "$src" != "$root" ] && [ ! -e "$src/tests/data" ]; then
  mkdir -p "$(dirname "$src")" && ln -sfn "$root" "$src"
fi

note "phase $phase, bundle of commit $(cat "$bundle/commit" 2>/dev/null), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
  2>&1 | tee -a "$summary"

case "$phase" in
  tests)
    note "cuda_backend_tests"
    timeout 300 "$bundle"/bin/cuda_backend_tests --gtest_color=no >"$out/cuda_tests.log" 2>&1
    echo "exit $?" | tee -a "$summary"
    grep -E '^\[  (PASSED|FAILED) |^\[==========\]' "$out/cuda_tests.log" | tail -30 |
      tee -a "$summary"
    echo "skipped: $(grep -c '^\[  SKIPPED \]' "$out/cuda_tests.log")" | tee -a "$summary"
    note "compute-sanitizer memcheck on cuda_backend_tests"
    if command -v compute-sanitizer >/dev/null; then
      timeout 280 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
        "$bundle"/bin/cuda_backend_tests --gtest_color=no >"$out/memcheck.log" 2>&1
      echo "exit $? (0 clean, 3 errors found, 124 timed out)" | tee -a "$summary"
      grep -E 'ERROR SUMMARY|^\[  (PASSED|FAILED) |^\[==========\]' "$out/memcheck.log" | tail -5 |
        tee -a "$summary"
    else
      echo "compute-sanitizer not found" | tee -a "$summary"
    fi
    ;;
  bench-1b | bench-8b | peer-8b-compile)
    # 1b: our engine and both peer modes; 8b: our engine and the eager peer (compile mode for
    # an 8B model does not fit in the same 10-minute call: peer-8b-compile).
    case "$phase" in
      bench-1b) preset=llama-3.2-1b modes=(eager compile) ours=1 extra=(--export-kv) ;;
      bench-8b) preset=llama-3-8b modes=(eager) ours=1 extra=() ;;
      *) preset=llama-3-8b modes=(compile) ours=0 extra=() ;;
    esac
    model=/tmp/tandem-$preset
    note "random-weight $preset model in $model"
    start=$(date +%s)
    timeout 240 "$bundle"/bin/engine_bench --preset "$preset" --dir "$model" --make-model-only \
      2>&1 | tail -3 | tee -a "$summary"
    echo "written in $(($(date +%s) - start)) s" | tee -a "$summary"
    if [ "$ours" = 1 ]; then
      note "tandem engine_bench --backend cuda (bf16 weights, bf16 KV, bf16 compute)"
      timeout 240 "$bundle"/bin/engine_bench --backend cuda --preset "$preset" --dir "$model" --json \
        "${extra[@]}" >"$out/tandem_$preset.json" 2>"$out/tandem_$preset.log"
      echo "exit $?" | tee -a "$summary"
      cat "$out/tandem_$preset.json" >>"$summary"
      tail -15 "$out/tandem_$preset.log" >>"$summary"
    fi
    for mode in "${modes[@]}"; do
      note "PyTorch + transformers peer, $mode"
      PYTHONUNBUFFERED=1 timeout 280 python3 bench/gpu/torch_peer.py --model-dir "$model" \
        --modes "$mode" --json "$out/torch_${preset}_$mode.json" >/dev/null \
        2>"$out/torch_${preset}_$mode.log"
      echo "exit $?" | tee -a "$summary"
      tail -8 "$out/torch_${preset}_$mode.log" >>"$summary"
    done
    ;;
  *)
    echo "unknown phase $phase (tests, bench-1b, bench-8b, peer-8b-compile)" >&2
    exit 2
    ;;
esac
note "done $(date -u +%FT%TZ)"
