#!/usr/bin/env bash
# One command from a fresh clone: set up, export (random weights), serve with the embedded
# tritonserver, classify the sample post over HTTP and gRPC, stop the server.
#   bash scripts/quickstart.sh            # tiny architecture (about a minute)
#   SIZE=base bash scripts/quickstart.sh  # the real ViT-B/32 dims (a few minutes)
# For real predictions, export your research checkpoints instead (README, "Export").
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-tiny}
REPO=${REPO:-out/model_repository_${SIZE}}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
bash scripts/setup.sh
PY=.venv/bin/python
$PY export/export.py --random-weights --size "$SIZE" --backend python --out "$REPO"
LOG=$(mktemp)
$PY deploy/serve.py --model-repository "$REPO" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 600); do
  grep -q " ready on " "$LOG" && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
cat "$LOG"
TEXT="RT @cityofhouston: Flood waters rising on Main St, shelters open at the stadium #HurricaneHarvey https://t.co/x"
$PY client/classify.py examples/flooded_house.jpg "$TEXT" --url "localhost:$HTTP_PORT"
$PY client/classify.py examples/flooded_house.jpg "$TEXT" --protocol grpc --url "localhost:$GRPC_PORT" --json
