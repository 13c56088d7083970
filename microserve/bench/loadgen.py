"""The load generator: Poisson or fixed-concurrency arrivals against an OpenAI-compatible
`/v1/completions` endpoint, streaming, one timing record per request.

Arrivals: with `rate` (req/s), request i starts at the i-th point of a seeded Poisson
process, whatever happens to the others (an open loop, as in vLLM's and the microserving
paper's benchmarks); with `concurrency`, C workers each send their next request when the
previous one ends (a closed loop). Requests of one multi-turn session go in order.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from microserve.bench.workloads import BenchRequest
from microserve.client import sse_events


@dataclass
class RequestResult:
    index: int
    start: float  # seconds since the run started
    ok: bool = False
    error: str = ""
    ttft: float | None = None  # first streamed text
    e2e: float | None = None  # end to end (JCT)
    prompt_tokens: int = 0  # from the server's usage
    output_tokens: int = 0
    chunks: int = 0  # streamed events that carried text
    itl: list[float] = field(default_factory=list)  # gaps between text events
    last_at: float = field(default=0.0, repr=False)  # clock time of the last text event

    def text_event(self, now: float, sent: float) -> None:
        """Record a streamed event that carried output at clock time `now` (sent at `sent`)."""
        if self.ttft is None:
            self.ttft = now - sent
        else:
            self.itl.append(now - self.last_at)
        self.last_at = now
        self.chunks += 1

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LoadConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str
    api_key: str | None = None
    rate: float | None = None  # req/s (Poisson); None = closed loop of `concurrency`
    concurrency: int = 1
    seed: int = 0
    ignore_eos: bool = True  # a vLLM/microserve extension: outputs as long as the workload says
    timeout: float = 600.0


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal or forced)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.failed, self.enabled = total, 0, 0, enabled
        self.t0 = time.perf_counter()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.enabled:
            width = 30
            fill = width * self.done // self.total
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"({self.failed} failed, {rate:.1f} req/s)")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def _one(session: aiohttp.ClientSession, cfg: LoadConfig, req: BenchRequest, res: RequestResult,
               t0: float) -> None:
    body = {"model": cfg.model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    sent = time.perf_counter()
    res.start = sent - t0
    try:
        async with session.post(cfg.url.rstrip("/") + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for event in sse_events(resp):
                if "error" in event:
                    res.error = str(event["error"].get("message", event["error"]))[:300]
                    return
                if any(c.get("text") for c in event.get("choices", [])):
                    res.text_event(time.perf_counter(), sent)
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
        res.e2e = time.perf_counter() - sent
        res.ok = res.ttft is not None or res.output_tokens == 0
        if not res.ok:
            res.error = "the stream ended without text"
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]


async def drive(reqs: list[BenchRequest], rate: float | None, concurrency: int, seed: int,
                go: Callable[[int], Awaitable[None]]) -> None:
    """Run `go(i)` for every request: at the points of a seeded Poisson process of `rate`
    (open loop) or by `concurrency` workers (closed loop); a session's turns in order.
    Times come from the event loop's clock, so a virtual-time loop (`microserve sim`) works."""
    loop = asyncio.get_running_loop()
    done_events = [asyncio.Event() for _ in reqs]
    previous: dict[int, int] = {}
    after: list[int | None] = [None] * len(reqs)
    for i, r in enumerate(reqs):
        if r.session is not None:
            after[i] = previous.get(r.session)
            previous[r.session] = i

    async def one(i: int) -> None:
        if after[i] is not None:
            await done_events[after[i]].wait()
        try:
            await go(i)
        finally:
            done_events[i].set()

    if rate is not None:
        rng, at, tasks, t0 = random.Random(seed), 0.0, [], loop.time()
        for i in range(len(reqs)):
            delay = at - (loop.time() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    else:
        queue = iter(range(len(reqs)))

        async def worker() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))


async def run_load(cfg: LoadConfig, reqs: list[BenchRequest], progress: bool = False) -> tuple[list[RequestResult],
                                                                                                 float]:
    """Send every request; returns (results in workload order, wall seconds)."""
    results = [RequestResult(i, 0.0) for i in range(len(reqs))]
    bar = Progress(len(reqs), progress)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def go(i: int) -> None:
            await _one(session, cfg, reqs[i], results[i], t0)
            bar.update(results[i].ok)

        await drive(reqs, cfg.rate, cfg.concurrency, cfg.seed, go)
        return results, time.perf_counter() - t0


async def first_model(url: str, api_key: str | None) -> str:
    """The first model id the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, \
            s.get(url.rstrip("/") + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise ValueError(f"GET /v1/models answered HTTP {resp.status}: {(await resp.text())[:200]}")
        models = (await resp.json()).get("data") or []
        if not models:
            raise ValueError("the server lists no model at /v1/models; pass --model")
        return models[0]["id"]
