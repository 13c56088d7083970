"""Live: a load step against `microserve launch --planner` on this machine, the demo model (issue 37).

A PD deployment (1 prefill, 1 decode engine of `--max-num-seqs 2`, decode may grow to 2) serves one
stream; at the step, `--streams` clients each send requests of `--tokens` tokens back to back for
`--seconds`; then the load stops. Measured: the step to the planner's decision, the decision to the
new decode engine listed by the router, the step to the first request the new engine serves, requests
and failures (target 0), and the end of the load to decode back at one engine (its process drained).

    python benchmarks/planner_live.py                          # --planner queue --streams 8 --tokens 400
    python benchmarks/planner_live.py --planner slo --planner-arg itl_ms=30
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy import start_launch

KEY = "bench-admin"


async def get(dep, path: str) -> dict | str:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s, s.get(dep.url + path) as r:
        return await (r.json() if path.startswith("/admin") else r.text())


async def decode_engines(dep) -> list[str]:
    return [e["id"] for e in (await get(dep, "/admin/engines"))["engines"] if e["role"] == "decode"]


async def routed(dep, engine: str) -> float:
    prefix = f'microserve_engine_requests_total{{engine="{engine}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in (await get(dep, "/metrics")).splitlines()
               if line.startswith(prefix))


async def step(dep, args) -> dict:
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=300)
    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def loop(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                await client.completions.create(model="demo", prompt=f"step {i} {n}: " + "words " * 8,
                                                max_tokens=args.tokens, temperature=0, extra_body={"ignore_eos": True})
                counts["ok"] += 1
            except openai.OpenAIError:
                counts["failed"] += 1
            n += 1

    base = asyncio.create_task(loop(-1))  # one stream before the step
    await asyncio.sleep(args.warm)
    t0 = time.time()
    clients = [asyncio.create_task(loop(i)) for i in range(args.streams - 1)]
    seen = listed = first = None
    while time.time() - t0 < args.seconds:
        engines = await decode_engines(dep)
        if listed is None and len(engines) > 1:
            listed, seen = time.time(), engines[-1]
        if seen is not None and first is None and await routed(dep, seen) > 0:
            first = time.time()
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(base, *clients)
    ended = time.time()
    while not (shrunk := len(await decode_engines(dep)) == 1) and time.time() - ended < 120:
        await asyncio.sleep(0.2)
    back = time.time()
    decisions = (await get(dep, "/admin/planner"))["decisions"][::-1]  # oldest first
    grew = next((d["time"] for d in decisions if d["applied"].get("decode", 0) > 1), None)
    await client.close()
    since = lambda t: None if t is None else round(t - t0, 1)
    return {"decision": since(grew), "listed": since(listed), "first": since(first), **counts,
            "shrunk": round(back - ended, 1) if shrunk else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--planner", default="queue")
    p.add_argument("--planner-arg", action="append", default=[], help="NAME=VALUE (after interval=1, calm=3)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the load step")
    p.add_argument("--warm", type=float, default=3.0, help="seconds of one stream before the step")
    args = p.parse_args()
    extra = [a for kv in ["interval=1", "cooldown=0", "calm=3", *args.planner_arg] for a in ("--planner-arg", kv)]
    dep = start_launch("--strategy", "pd", "--model", "demo", "--served-model-name", "demo", "--admin-key", KEY,
                       "--log-level", "error", "--max-num-seqs", "2", "--planner", args.planner, *extra,
                       "--scale-bounds", "prefill=1:1,decode=1:2")
    try:
        r = asyncio.run(step(dep, args))
    finally:
        code = dep.stop()
    print(f"\n{args.streams} streams of {args.tokens} tokens for {args.seconds:g} s; planner {args.planner} "
          f"({', '.join(args.planner_arg) or 'interval=1 calm=3'}); launch exit {code}\n")
    print("| step -> decision s | step -> engine listed s | step -> its first request s | requests | failed | "
          "load end -> one decode engine s |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['decision']} | {r['listed']} | {r['first']} | {r['ok'] + r['failed']} | {r['failed']} | "
          f"{r['shrunk']} |")


if __name__ == "__main__":
    main()
