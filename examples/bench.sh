#!/usr/bin/env bash
# Serve the demo model with data parallel and with prefill/decode disaggregation, and
# measure both with the same seeded workload (table, JSON and PNG per strategy).
#   bash examples/bench.sh
set -euo pipefail
for strategy in round_robin pd; do
  microserve launch --strategy "$strategy" --model demo --port 8000 > "/tmp/microserve-$strategy.out" &
  PID=$!
  until grep -q READY "/tmp/microserve-$strategy.out" 2>/dev/null; do sleep 0.5; done
  microserve bench --url http://127.0.0.1:8000 --workload multi-turn --rate 6 --num-requests 60 \
    --tokens-per-word 6 --max-output-tokens 32 --seed 1 --out "bench-$strategy.json" --plot "bench-$strategy.png"
  kill $PID; wait $PID || true
done
