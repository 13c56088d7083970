"""What Ray adds: the same PD workload through `microserve launch` and `microserve launch --ray`, on a
one-node and a three-node local Ray cluster, in one run. Runs inside a private network namespace
(re-executes itself under `unshare -n` as root, or `unshare -rn`), so Ray stays on loopback.

    python benchmarks/ray_overhead.py [--requests 60] [--rounds 3]

Rows: startup (launch to READY), p50 / p99 latency of a request (completion of 8 tokens, one request
at a time, alternating deployments round by round), and the p50 added over plain `launch`. On three
nodes the prefill and decode engines sit on different Ray nodes, so their KV crosses the network
path (ucx or tcp) instead of shared memory: part of what that row adds is the transport, not Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def start(args: list[str]):
    from deploy import start_launch

    t = time.perf_counter()
    dep = start_launch("--strategy", str(ROOT / "strategies/pd.py"), "--model", "demo", "--api-key", "k",
                       "--served-model-name", "demo", "--log-level", "error", *args, timeout=300)
    threading.Thread(target=lambda: [None for _ in dep.proc.stdout], daemon=True).start()
    return dep, time.perf_counter() - t


def measure(client, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        client.completions.create(model="demo", prompt=f"request {i}: " + "lorem ipsum dolor " * 12, max_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True})
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    import openai
    from ray.cluster_utils import Cluster

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=60, help="requests per deployment per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    one = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    three = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        three.add_node(num_cpus=2)
    deps = {}
    try:
        deps["launch"] = start([])
        deps["launch --ray, 1 node"] = start(["--ray", one.address])
        deps["launch --ray, 3 nodes"] = start(["--ray", three.address])
        clients = {k: openai.OpenAI(base_url=d.base_url, api_key="k", max_retries=0) for k, (d, _) in deps.items()}
        for c in clients.values():
            measure(c, 5)  # warm-up
        lat: dict[str, list[float]] = {k: [] for k in deps}
        for _ in range(a.rounds):
            for k, c in clients.items():
                lat[k] += measure(c, a.requests)
        base = pct(lat["launch"], 0.5)
        print(f"{'deployment':<24} {'startup s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p50 added ms':>13}")
        for k, (_, up) in deps.items():
            p50 = pct(lat[k], 0.5)
            print(f"{k:<24} {up:>10.1f} {p50:>8.2f} {pct(lat[k], 0.99):>8.2f} {p50 - base:>13.2f}")
        print(f"({a.rounds} rounds x {a.requests} sequential requests per deployment, PD, 8 tokens, demo model)")
    finally:
        for d, _ in deps.values():
            d.stop(signal.SIGINT)
        one.shutdown()
        three.shutdown()


if __name__ == "__main__":
    if os.environ.get("_MICROSERVE_NETNS") != "1":
        flags = "-n" if os.geteuid() == 0 else "-rn"
        cmd = " ".join([sys.executable, *map(str, [Path(__file__).resolve(), *sys.argv[1:]])])
        sys.exit(subprocess.call([shutil.which("unshare") or "unshare", flags, "sh", "-c",
                                  f"ip link set lo up && _MICROSERVE_NETNS=1 exec {cmd}"]))
    main()
