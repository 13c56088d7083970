"""What the cluster key costs a call: the same demo engine twice, one with the key (CURVE + ZAP
on its sockets, signed KV addresses) and one `--insecure`, called side by side in rounds.

    python benchmarks/rpc_security.py [--calls 400]

Rows: `health` round trip (the smallest call), `start_generate` of 4 tokens, and a PD request
(`prep_recv` + `remote_send` + `start_generate`) between two engines of each kind; p50 / p99 in
ms and the secure / insecure ratio of the p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engines import ensure_cluster_key, wait_engine

from microserve import demo_model
from microserve.protocol import Request
from microserve.router import EngineHandle
from microserve.sampling_params import SamplingParams
from microserve.security import ENV

SP = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def engine(model: str, name: str, secure: bool):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "microserve", "engine", "--model", model, "--engine-id", name, "--log-level",
            "error", "--num-kv-blocks", "256"]
    if not secure:
        env.pop(ENV, None)
        args.append("--insecure")
    return wait_engine(subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def timed(fn) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


async def main(args: argparse.Namespace) -> None:
    ensure_cluster_key()
    model = str(demo_model(Path("/tmp/microserve-bench-demo")))
    engines = {(kind, role): engine(model, f"{kind}-{role}", kind == "secure")
               for kind in ("secure", "insecure") for role in ("p", "d")}
    key = os.environ.pop(ENV)
    plain = {role: EngineHandle(engines["insecure", role].rpc) for role in ("p", "d")}
    os.environ[ENV] = key
    secure = {role: EngineHandle(engines["secure", role].rpc) for role in ("p", "d")}
    ids = iter(range(10**9))
    prompt = list(range(10, 74))

    async def pd(h: dict[str, EngineHandle]) -> None:
        r = Request(f"r{next(ids)}", prompt, SP)
        ticket = await h["d"].prep_recv(r, end=len(prompt) - 1)
        await h["p"].remote_send(r, ticket.kv)
        async for _ in h["d"].start_generate(r, begin=len(prompt) - 1):
            pass

    async def gen(h: dict[str, EngineHandle]) -> None:
        async for _ in h["d"].start_generate(Request(f"g{next(ids)}", prompt, SP)):
            pass

    rows = []
    try:
        for name, fn, n in (("health", lambda h: h["d"].health(), args.calls),
                            ("start_generate, 4 tokens", gen, args.calls // 4),
                            ("PD request (3 calls + KV)", pd, args.calls // 8)):
            times: dict[str, list[float]] = {"secure": [], "insecure": []}
            for _ in range(3):  # warm-up
                await fn(secure), await fn(plain)
            for _ in range(4):  # interleaved rounds: this machine is noisy
                for kind, h in (("secure", secure), ("insecure", plain)):
                    for _ in range(n // 4):
                        times[kind].append(await timed(lambda h=h, fn=fn: fn(h)))
            s, i = times["secure"], times["insecure"]
            rows.append((name, pct(i, 0.5), pct(i, 0.99), pct(s, 0.5), pct(s, 0.99), pct(s, 0.5) / pct(i, 0.5)))
    finally:
        for h in (*plain.values(), *secure.values()):
            await h.close()
        for e in engines.values():
            e.proc.terminate()
    print(f"{'call':28s} {'insecure p50':>12s} {'p99':>8s} {'secure p50':>11s} {'p99':>8s} {'ratio':>6s}")
    for name, ip50, ip99, sp50, sp99, ratio in rows:
        print(f"{name:28s} {ip50:10.3f}ms {ip99:6.3f}ms {sp50:9.3f}ms {sp99:6.3f}ms {ratio:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    asyncio.run(main(parser.parse_args()))
