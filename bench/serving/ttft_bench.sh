#!/usr/bin/env bash
# Disaggregated vs colocated time to first token, measured in the same run (DESIGN §8:
# disaggregated TTFT <= 1.1 x colocated). Starts `tandem serve` twice on one model — once with a
# prefill worker streaming KV to the decode worker over the TCP data plane, once --colocated
# (the decode worker prefills itself) — and sends the same sequential requests to each.
#
#   bench/serving/ttft_bench.sh [BIN] [MODEL] [PROMPT_TOKENS] [REQUESTS]
set -euo pipefail
BIN=${1:-build/release/server/tandem}
MODEL=${2:-configs/demo-model}
PROMPT_TOKENS=${3:-400}
REQUESTS=${4:-20}
THREADS=${THREADS:-2}

IDS=$(python3 -c "print(','.join(str(10 + (i * 37) % 1900) for i in range($PROMPT_TOKENS)))")

run_mode() {
  local mode=$1; shift
  local out; out=$(mktemp); local log; log=$(mktemp)
  "$BIN" serve --model "$MODEL" --grpc-port 0 --metrics-port -1 --threads "$THREADS" \
    --kv-cache-mb 256 --no-prefix-cache "$@" >"$out" 2>"$log" &
  local pid=$!
  local ready=""
  for _ in $(seq 600); do
    ready=$(grep -m1 ' ready ' "$out" || true); [[ -n "$ready" ]] && break; sleep 0.1
  done
  [[ -n "$ready" ]] || { echo "serve did not start: $log" >&2; kill $pid; exit 1; }
  local addr; addr=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$ready")
  local ttfts=()
  for i in $(seq "$REQUESTS"); do
    local j; j=$("$BIN" client --router "$addr" --token-ids "$IDS" --max-tokens 2 \
                 --temperature 0 --ignore-eos --json | tail -1)
    ttfts+=("$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['ttft_ms'])" "$j")")
  done
  kill -TERM $pid; wait $pid || true
  python3 - "$mode" "${ttfts[@]}" <<'PY'
import statistics, sys, json
mode, vals = sys.argv[1], sorted(float(v) for v in sys.argv[2:])
print(json.dumps({"mode": mode, "requests": len(vals), "ttft_ms_p50": round(statistics.median(vals), 2),
                  "ttft_ms_min": round(vals[0], 2), "ttft_ms_max": round(vals[-1], 2)}))
PY
}

echo "# model=$MODEL prompt_tokens=$PROMPT_TOKENS requests=$REQUESTS threads=$THREADS"
D=$(run_mode disaggregated)
C=$(run_mode colocated --colocated)
echo "$D"; echo "$C"
python3 - "$D" "$C" <<'PY'
import json, sys
d, c = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"ttft_ratio_p50": round(d["ttft_ms_p50"] / c["ttft_ms_p50"], 3)}))
PY
