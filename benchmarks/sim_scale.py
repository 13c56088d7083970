"""How fast `microserve sim` runs: 10 000 simulated requests on 64 engines, wall time.

Target: under a minute of wall time, through the real router path (`run_request`). Two layouts:
  dp    round_robin on 64 engines
  pd    xPyD pd on prefill=32,decode=32
Llama-3.1-8B on H100s (TP1), the `chat` workload. Each layout runs with the engines' stream
interval at 1 (every token is one chunk through the router) and at `--stream-interval` (the
same results: TTFT, TPOT and JCT are equal, only the chunks are fewer).

    python benchmarks/sim_scale.py [--num-requests 10000] [--rate 100] [--workload chat] [--stream-interval 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import tempfile
import time
from pathlib import Path

from microserve.cli import build_parser

LAYOUTS = {"dp": ("round_robin", "engine=64"), "pd": ("pd", "prefill=32,decode=32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--stream-interval", type=int, default=16)
    opts = ap.parse_args()
    rows = []
    for (name, (strategy, roles)), interval in itertools.product(LAYOUTS.items(), sorted({1, opts.stream_interval})):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            args = build_parser().parse_args([
                "sim", "--strategy", strategy, "--roles", roles, "--model", "llama-3.1-8b", "--gpu", "h100",
                "--workload", opts.workload, "--rate", str(opts.rate), "--num-requests", str(opts.num_requests),
                "--stream-interval", str(interval), "--out", str(out), "--no-progress"])
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = args.func(args)
            wall = time.perf_counter() - t0  # workload generation, tokenization and the simulation
            data = json.loads(out.read_text())
        s = data["summary"]
        rows.append((name, roles, interval, s["ok"], data["duration_s"], wall, s["e2e_s"]["mean"],
                     s["ttft_s"]["mean"], s["tpot_s"]["mean"], rc))
    print(f"{opts.num_requests} requests, {opts.workload}, rate {opts.rate} req/s, llama-3.1-8b on h100")
    print(f"{'layout':<8}{'engines':<22}{'interval':>9}{'ok':>7}{'simulated s':>13}{'wall s':>9}{'sim/wall':>10}"
          f"{'JCT ms':>9}{'TTFT ms':>9}{'TPOT ms':>9}")
    for name, roles, interval, ok, sim_s, wall, jct, ttft, tpot, _ in rows:
        print(f"{name:<8}{roles:<22}{interval:>9}{ok:>7}{sim_s:>13.1f}{wall:>9.1f}{sim_s / wall:>9.1f}x"
              f"{jct * 1e3:>9.1f}{ttft * 1e3:>9.2f}{tpot * 1e3:>9.3f}")
    if any(r[-1] != 0 for r in rows):
        raise SystemExit("some simulated requests failed")


if __name__ == "__main__":
    main()
