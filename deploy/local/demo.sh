#!/usr/bin/env bash
# README command (1): installs dependencies, builds `tandem`, starts `tandem serve` (router +
# prefill worker + decode worker in one process, CPU backend, the embedded demo model) and
# streams one completion through the bundled client, then stops the server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash deploy/local/install-deps.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/release -j "${JOBS:-2}" --target tandem
BIN=build/release/server/tandem
PROMPT=${1:-"The President said that"}

LOG=$(mktemp -t tandem-serve.XXXXXX.log)
OUT=$(mktemp -t tandem-serve.XXXXXX.out)
"$BIN" serve --model configs/demo-model --grpc-port 0 --http-port 0 --kv-cache-mb 64 \
  >"$OUT" 2>"$LOG" &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null || true; wait $SERVE_PID 2>/dev/null || true' EXIT
# The server prints one line with its bound addresses once every role is up.
for _ in $(seq 600); do
  READY=$(grep -m1 ' ready ' "$OUT" || true)
  [[ -n "$READY" ]] && break
  kill -0 $SERVE_PID 2>/dev/null || { echo "tandem serve exited; log: $LOG" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$READY" ]] || { echo "tandem serve did not start in 60 s; log: $LOG" >&2; exit 1; }
echo "$READY"
ADDR=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$READY")
"$BIN" client --router "$ADDR" --prompt "$PROMPT" --max-tokens 48 --seed 7 --temperature 0.8
# The same server through its OpenAI-compatible HTTP endpoint.
HTTP=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$READY")
JSON_PROMPT=${PROMPT//\\/\\\\}
JSON_PROMPT=${JSON_PROMPT//\"/\\\"}
echo "POST http://$HTTP/v1/completions"
curl -sS "http://$HTTP/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"$JSON_PROMPT\", \"max_tokens\": 32, \"temperature\": 0}"
echo
