#!/usr/bin/env bash
# Serve the demo model with prefill/decode disaggregation, then query it with curl.
#   bash examples/launch.sh
set -euo pipefail
microserve launch --strategy strategies/pd.py --model demo --port 8000 > /tmp/microserve-launch.out &
PID=$!
trap 'kill $PID; wait $PID' EXIT
until grep -q READY /tmp/microserve-launch.out 2>/dev/null; do sleep 0.5; done
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0}'
echo
curl -s http://127.0.0.1:8000/metrics | grep '^microserve_kv_transfer_bytes_total'
