"""What the router + gateway add on top of the engine: latency per request and requests/s.

Same engine process, same short requests, one run:
  direct   EngineHandle.start_generate on the engine (ZeroMQ, no router, no HTTP)
  gateway  POST /v1/completions through `microserve router --strategy round_robin` (HTTP + router)
  logged   the same through a second router that logs an access line per request (--log-level info)
  traced   ... and a third that exports traces (--otlp-traces-endpoint) to a receiver in this process

Sequential requests give the added latency (p50 / p99 of each path minus direct, interleaved
in rounds because this machine is noisy); the three routers take turns request by request, so
each logged or traced request has a gateway request next to it: the median of those paired
differences, and each router process's CPU time per request (from /proc, all its threads, the
trace exporter's included), are the overhead of logging and tracing with the noise mostly
cancelled. `--concurrency` clients give requests/s of the direct and gateway paths.

    python benchmarks/router_overhead.py [--requests 200] [--concurrency 64] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy import start_router
from engines import spawn_engine

from microserve.protocol import Request
from microserve.router import EngineHandle
from microserve.sampling_params import SamplingParams


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def direct_one(h: EngineHandle, i: int, prompt: list[int], sp: SamplingParams) -> float:
    t = time.perf_counter()
    async for _ in h.start_generate(Request(f"direct-{i}-{time.monotonic_ns()}", prompt, sp)):
        pass
    return time.perf_counter() - t


async def gateway_one(s: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> float:
    t = time.perf_counter()
    async with s.post(url, json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": True}) as r:
        assert r.status == 200, await r.text()
        await r.read()
    return time.perf_counter() - t


async def receiver() -> tuple[web.AppRunner, str]:
    """An OTLP/HTTP endpoint that takes span batches and drops them."""
    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"")

    app = web.Application()
    app.router.add_post("/v1/traces", take)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def main(args: argparse.Namespace) -> None:
    engine = spawn_engine(args.model, "--log-level", "error", engine_id="E")
    collector, otlp = await receiver()
    base = ["--strategy", "round_robin", "--engine", engine.rpc]
    dep = start_router(*base, "--log-level", "error")
    logged = start_router(*base, "--log-level", "info", "--log-stats-interval", "0", quiet=True)
    traced = start_router(*base, "--log-level", "error", "--otlp-traces-endpoint", otlp)
    url = dep.url + "/v1/completions"
    extra = {"logged": logged.url + "/v1/completions", "traced": traced.url + "/v1/completions"}
    prompt = list(range(10, 10 + args.prompt_tokens))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    try:
        async with EngineHandle(engine.rpc) as h, aiohttp.ClientSession() as s:
            for i in range(10):  # warm up every path
                await direct_one(h, i, prompt, sp)
                for u in (url, *extra.values()):
                    await gateway_one(s, u, prompt, args.max_tokens)
            direct, gateway = [], []
            more: dict[str, list[float]] = {name: [] for name in extra}
            rounds = 4
            per = args.requests // rounds
            paths = [("gateway", url), *extra.items()]
            cpu0 = {name: cpu_seconds(d.proc.pid) for name, d in (("gateway", dep), ("logged", logged),
                                                                   ("traced", traced))}
            for r in range(rounds):
                for i in range(per):
                    direct.append(await direct_one(h, r * per + i, prompt, sp))
                for i in range(per):  # NOTE: the routers take turns, the first of each turn rotating
                    for k in range(len(paths)):
                        name, u = paths[(i + k) % len(paths)]
                        took = await gateway_one(s, u, prompt, args.max_tokens)
                        (gateway if name == "gateway" else more[name]).append(took)
            cpu = {name: (cpu_seconds(d.proc.pid) - cpu0[name]) / (rounds * per)
                   for name, d in (("gateway", dep), ("logged", logged), ("traced", traced))}

            async def rate(fn) -> float:
                n = args.requests
                todo = iter(range(n))

                async def client() -> None:
                    for i in todo:
                        await fn(i)

                t = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(args.concurrency)))
                return n / (time.perf_counter() - t)

            conn = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=conn) as cs:
                rps_direct = await rate(lambda i: direct_one(h, 10**6 + i, prompt, sp))
                rps_gateway = await rate(lambda i: gateway_one(cs, url, prompt, args.max_tokens))
    finally:
        for d in (dep, logged, traced):
            d.stop()
        engine.stop()
        await collector.cleanup()

    ms = 1000.0
    print(f"\n{args.requests} requests, prompt {args.prompt_tokens} tokens, {args.max_tokens} output tokens, "
          f"model {args.model}\n")
    print(f"{'path':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{f'req/s @{args.concurrency}':>14}"
          f"{'router CPU ms/req':>19}")
    print(f"{'direct':<10}{pct(direct, .5) * ms:>10.2f}{pct(direct, .99) * ms:>10.2f}"
          f"{statistics.mean(direct) * ms:>10.2f}{rps_direct:>14.1f}")
    print(f"{'gateway':<10}{pct(gateway, .5) * ms:>10.2f}{pct(gateway, .99) * ms:>10.2f}"
          f"{statistics.mean(gateway) * ms:>10.2f}{rps_gateway:>14.1f}{cpu['gateway'] * ms:>19.3f}")
    print(f"{'added':<10}{(pct(gateway, .5) - pct(direct, .5)) * ms:>10.2f}"
          f"{(pct(gateway, .99) - pct(direct, .99)) * ms:>10.2f}"
          f"{(statistics.mean(gateway) - statistics.mean(direct)) * ms:>10.2f}"
          f"{rps_gateway / rps_direct:>13.2f}x")
    for name, xs in more.items():
        paired = statistics.median(x - g for x, g in zip(xs, gateway))
        print(f"{name:<10}{pct(xs, .5) * ms:>10.2f}{pct(xs, .99) * ms:>10.2f}{statistics.mean(xs) * ms:>10.2f}"
              f"{'':>14}{cpu[name] * ms:>19.3f}   over gateway: {(pct(xs, .5) - pct(gateway, .5)) * ms:+.2f} ms p50, "
              f"{paired * ms:+.3f} ms paired median, {(cpu[name] - cpu['gateway']) * ms:+.3f} ms CPU")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    asyncio.run(main(ap.parse_args()))
