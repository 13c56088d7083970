"""`microserve sim`: run a strategy file on simulated engines, in virtual time.

    microserve sim --strategy pd --model llama-3.1-70b --gpu h100 --tp 4 --roles prefill=1,decode=1 \\
        --link nvlink --workload sonnet --rate 3.6 --num-requests 500 --out pd.json --plot pd.png

The workload, arrivals (`microserve.bench.loadgen.drive`), metrics, table, JSON and plot
are `microserve bench`'s, so a simulated run and a real one compare field by field.
Each request runs `strategy.generate(req, cluster)` as the router does (every engine it
touched gets an abort if it ends early); timestamps are virtual seconds. See docs/sim.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microserve.bench import loadgen, report, workloads
from microserve.bench.loadgen import RequestResult
from microserve.control.planner import Planner
from microserve.engine.config import EngineConfig
from microserve.protocol import Request
from microserve.router.handle import EngineCallError
from microserve.router.journal import Recorder
from microserve.router.runtime import REQUEST_TIMEOUT_S, RouterError, run_request
from microserve.router.strategy import Strategy, load_strategy
from microserve.sampling_params import SamplingParams
from microserve.sim import clock
from microserve.sim.cluster import SimCluster, build_cluster
from microserve.sim.costs import CostModel, Link
from microserve.sim.setup import SimSetup, setup_from_args


# -- prompts as token ids -------------------------------------------------------------------
def prompt_encoder(model: str, vocab: int, tokens_per_word: float) -> Callable[[str], list[int]]:
    """The checkpoint's own tokenizer when `model` is a folder that has one (`demo` too), so
    prompt lengths match a real run; otherwise a synthetic one: word i of a prompt becomes
    floor((i+1)t) - floor(it) tokens (t = tokens_per_word), ids hashed from the word, so equal
    text gives equal ids and shared prefixes stay shared."""
    from microserve.demo import resolve_model

    path = resolve_model(model) if model == "demo" else Path(model)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from microserve.engine.model.tokenizer import Tokenizer

        return Tokenizer(path).encode
    counts: list[int] = []  # tokens of word i
    cache: dict[tuple[str, int], tuple[int, ...]] = {}  # (word, its token count) -> its ids

    def encode(text: str) -> list[int]:
        words = text.split()
        for i in range(len(counts), len(words)):
            counts.append(math.floor((i + 1) * tokens_per_word) - math.floor(i * tokens_per_word))
        ids: list[int] = []
        for word, n in zip(words, counts):
            part = cache.get((word, n))
            if part is None:
                part = cache[(word, n)] = tuple(zlib.crc32(f"{word}#{k}".encode()) % vocab for k in range(n))
            ids += part
        return ids or [0]

    return encode


# -- one simulated run ------------------------------------------------------------------------
@dataclass
class SimRequest:
    prompt_ids: list[int]
    max_tokens: int
    session: int | None = None


async def _serve(i: int, sreq: SimRequest, strategy: Strategy, cluster: SimCluster, res: RequestResult,
                 t0: float, frontend_s: float, max_retries: int = 2, recorder: Recorder | None = None) -> None:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    if recorder is not None:
        recorder.arrive(len(sreq.prompt_ids))
    res.start, res.prompt_tokens = sent - t0, len(sreq.prompt_ids)
    if frontend_s > 0:  # the client -> gateway -> router -> engine path and back, as one delay
        await asyncio.sleep(frontend_s)
    req = Request(f"sim-{i}", sreq.prompt_ids, SamplingParams(max_tokens=sreq.max_tokens, ignore_eos=True))
    finished = False
    # the router's own request loop: retries before the first token, aborts on every touched engine
    touched: set = set()
    # NOTE: the router's default deadline: a request refused for want of KV waits for it until then
    chunks = run_request(strategy, cluster, req, max_retries=max_retries, record=touched,
                         deadline=sent + REQUEST_TIMEOUT_S)
    try:
        async for chunk in chunks:
            if chunk.token_ids:
                res.text_event(loop.time(), sent)
                res.output_tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                finished = True
                if chunk.finish_reason == "abort":
                    res.error = "aborted on the engine"
    except (EngineCallError, RouterError) as exc:
        res.error = str(exc)
    except Exception as exc:  # NOTE: a strategy bug fails its request, not the whole simulation
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        await chunks.aclose()
    res.e2e = loop.time() - sent
    res.ok = finished and not res.error
    if recorder is not None:
        recorder.end(frozenset(h.role for h in touched), res.ok, res.prompt_tokens, res.output_tokens, res.ttft,
                     res.e2e)


@dataclass
class SimPlan:
    """A planner for one simulation (`--planner`: control/planner.py, sim/planning.py), and what it did."""

    planner: Planner
    costs: dict[str, CostModel]  # per role: a new engine's cost model and start latency
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)
    source: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)  # oldest first, after the run
    gpu_hours: float = 0.0
    started: list[tuple[float, str, str]] = field(default_factory=list)  # (virtual time serving, role, id)


async def _at_times(times: list[float], go: Callable[[int], Any]) -> None:
    """Run `go(i)` at virtual time `times[i]` from now (a trace's arrivals)."""
    loop = asyncio.get_running_loop()
    t0, tasks = loop.time(), []
    for i, at in enumerate(times):
        delay = at - (loop.time() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(go(i)))
    await asyncio.gather(*tasks)


async def simulate(strategy: Strategy, cluster: SimCluster, reqs: list[SimRequest], rate: float | None = None,
                   concurrency: int = 1, seed: int = 0, progress: bool = False, frontend_s: float = 0.0,
                   arrivals: list[float] | None = None,
                   plan: SimPlan | None = None) -> tuple[list[RequestResult], float]:
    """Run every request through `strategy` on the (not yet started) `cluster`; call inside
    `clock.run`. Each request first waits `frontend_s` (the serving path outside the engines).
    `arrivals`: each request's virtual arrival time (a trace) instead of `rate`/`concurrency`;
    `plan`: a planner that sizes the cluster meanwhile (filled with its decisions and GPU-hours).
    Returns (results in workload order, virtual seconds from first arrival to last finish)."""
    from microserve.control.planning import Planning
    from microserve.sim.planning import SimEngines, SimRouter

    results = [RequestResult(i, 0.0) for i in range(len(reqs))]
    bar = loadgen.Progress(len(reqs), progress)
    await cluster.start()
    planning = engines = recorder = None
    quiet = logging.getLogger("microserve.provision")
    level = quiet.level
    if plan is not None:
        quiet.setLevel(logging.ERROR)  # NOTE: each start and stop is in the plan's record, not on the console
        router = SimRouter(cluster, strategy)
        engines, recorder = SimEngines(cluster, plan.costs), router.recorder
        planning = Planning(router, engines, plan.planner, plan.bounds, plan.source, plan.args)
        planning.start()
    try:
        t0 = asyncio.get_running_loop().time()

        async def go(i: int) -> None:
            await _serve(i, reqs[i], strategy, cluster, results[i], t0, frontend_s, recorder=recorder)
            bar.update(results[i].ok)

        if arrivals is not None:
            await _at_times(arrivals, go)
        else:
            await loadgen.drive(reqs, rate, concurrency, seed, go)  # type: ignore[arg-type]
        return results, asyncio.get_running_loop().time() - t0
    finally:
        if planning is not None and plan is not None and engines is not None:
            await planning.stop()
            plan.decisions, plan.gpu_hours = list(planning.decisions), engines.gpu_hours()
            plan.started = list(engines.started)
        quiet.setLevel(level)
        await cluster.close()


def simulate_workload(strategy: Strategy, layout: dict[str, int], cost: CostModel | dict[str, CostModel], link: Link,
                      config: EngineConfig, reqs: list[SimRequest], rate: float | None, concurrency: int, seed: int,
                      progress: bool = False, links: dict[tuple[str, str], Link] | None = None,
                      kv_store: list[str] | None = None, arrivals: list[float] | None = None,
                      plan: SimPlan | None = None) -> tuple[list[RequestResult], float, SimCluster]:
    """One whole simulation on fresh engines: (results, virtual seconds, the cluster after it).
    `cost`: one cost model, or one per role (mixed hardware); `links`: per (sender, receiver) role pair."""
    cluster = build_cluster(layout, cost, link, config, links=links, kv_store=kv_store or ())
    first = next(iter(cost.values())) if isinstance(cost, dict) else cost
    results, duration = clock.run(simulate(strategy, cluster, reqs, rate, concurrency, seed, progress,
                                           first.gpu.frontend_ms * 1e-3, arrivals, plan))
    return results, duration, cluster


def engine_report(cluster: SimCluster) -> list[dict[str, Any]]:
    """Per-engine totals after a run (what a conservation check reads), from each engine's `stats`."""
    out = []
    for h, s in zip(cluster.handles, cluster.servers):
        st = s.stats()
        out.append({"engine_id": s.engine_id, "role": h.role, "computed_tokens": st.computed_tokens_total,
                    "prefix_hit_tokens": st.prefix_cache_hit_tokens, "preemptions": st.num_preemptions,
                    "kv_bytes_sent": st.kv_bytes_sent, "kv_bytes_received": st.kv_bytes_received,
                    "kv_blocks_total": st.kv_blocks_total, "kv_blocks_used": st.kv_blocks_used,
                    "kv_blocks_cached": st.kv_blocks_cached, "open_tickets": st.open_tickets,
                    "unfinished": s.backend.has_work(),
                    "kv_store": {t.tier: {"hit_tokens": t.hit_tokens, "bytes_read": t.bytes_read}
                                 for t in st.kv_store}})
    return out


def _requests(args: argparse.Namespace, setup: SimSetup) -> tuple[list[SimRequest], list[float] | None]:
    """The run's requests: a `--trace` (with its arrival times) or a `--workload`."""
    if args.trace is not None:
        from microserve.sim import traces

        trace = traces.load(args.trace, args.rate, args.rate_scale, args.seed, args.trace_duration)
        if args.num_requests is not None:
            trace = trace[:args.num_requests]
        cap = args.max_output_tokens
        vocab = setup.cost.model.vocab
        return ([SimRequest(traces.prompt_ids(r, vocab, i), min(r.output_tokens, cap or r.output_tokens))
                 for i, r in enumerate(trace)], [r.time for r in trace])
    missing = [f"--{n.replace('_', '-')}" for n in ("workload", "num_requests") if getattr(args, n) is None]
    if missing or (args.rate is None and args.concurrency is None):
        raise ValueError(f"microserve sim needs {', '.join(missing or ['--rate or --concurrency'])} (or --trace)")
    if args.num_requests < 1 or (args.rate is not None and args.rate <= 0) or \
            (args.concurrency is not None and args.concurrency < 1):
        raise ValueError("--num-requests, --rate and --concurrency must be positive")
    encode = prompt_encoder(args.model, setup.cost.model.vocab, args.tokens_per_word)
    bench_reqs = workloads.load(args.workload, args.num_requests, args.seed, args.tokens_per_word,
                                args.max_output_tokens)
    return [SimRequest(encode(r.prompt), r.max_tokens, r.session) for r in bench_reqs], None


def _plan(args: argparse.Namespace, setup: SimSetup) -> SimPlan | None:
    if args.planner is None:
        if args.planner_arg or args.scale_bounds:
            raise ValueError("--planner-arg and --scale-bounds need --planner")
        return None
    from microserve.control.planner import load_planner, parse_bounds

    planner_args = dict(a.split("=", 1) for a in args.planner_arg if "=" in a)
    return SimPlan(load_planner(args.planner, planner_args), setup.costs, parse_bounds(args.scale_bounds),
                   args.planner, planner_args)


def run(args: argparse.Namespace) -> int:
    if args.strategy is None:
        raise ValueError("microserve sim needs --strategy")
    strategy_args = dict(a.split("=", 1) for a in args.strategy_arg if "=" in a)
    strategy = load_strategy(args.strategy, strategy_args)
    setup = setup_from_args(args, type(strategy).roles)
    link = setup.link
    reqs, arrivals = _requests(args, setup)
    plan = _plan(args, setup)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    wall = time.perf_counter()
    results, duration, cluster = simulate_workload(strategy, setup.layout, setup.costs, link, setup.config, reqs,
                                                   args.rate, args.concurrency or 1, args.seed, progress, setup.links,
                                                   args.kv_store, arrivals, plan)
    wall = time.perf_counter() - wall
    slo = {k: v / 1e3 for k, v in (("ttft_s", args.slo_ttft_ms), ("tpot_s", args.slo_tpot_ms),
                                   ("e2e_s", args.slo_e2e_ms)) if v is not None}
    summary = report.summarize(results, duration, slo)
    summary["gpu_hours"] = plan.gpu_hours if plan is not None else \
        sum(setup.costs[r].tp * n for r, n in setup.layout.items()) * duration / 3600
    summary["slo_attainment"] = sum(report.meets_slo(r, slo) for r in results) / len(results) if slo else None
    config = {"mode": "sim", "strategy": args.strategy, "strategy_args": strategy_args, "model": setup.cost.model.name,
              "gpu": {r: c.gpu.name for r, c in setup.costs.items()}, "tp": {r: c.tp for r, c in setup.costs.items()},
              "kv_store": args.kv_store, "dtype": setup.cost.model.dtype, "kv_dtype": setup.cost.model.kv_dtype,
              "roles": setup.layout,
              "link": args.link,
              "workload": args.workload, "rate": args.rate, "concurrency": args.concurrency,
              "trace": args.trace, "rate_scale": args.rate_scale, "planner": args.planner,
              "scale_bounds": args.scale_bounds,
              "num_requests": len(reqs), "seed": args.seed, "tokens_per_word": args.tokens_per_word,
              "max_output_tokens": args.max_output_tokens,
              "max_num_batched_tokens": setup.config.max_num_batched_tokens,
              "max_num_seqs": setup.config.max_num_seqs, "block_size": args.block_size}
    data = report.to_json(config, results, duration, summary)
    data["sim"] = {"wall_s": wall, "engines": engine_report(cluster)}
    if plan is not None:
        data["sim"]["planner"] = {"decisions": plan.decisions, "started": plan.started}
    arrivals = f"trace {args.trace}" if args.trace else f"rate {args.rate} req/s" if args.rate is not None \
        else f"concurrency {args.concurrency}"
    layout = ",".join(f"{r}={n}" for r, n in setup.layout.items())
    hardware = ", ".join(f"{r}: {c.tp} x {c.gpu.name}" for r, c in setup.costs.items())
    print(f"sim: {args.strategy} on {layout} x {setup.cost.model.name} {setup.cost.model.dtype} ({hardware}, "
          f"link {args.link}), {args.workload or 'trace'}, {arrivals}, {len(reqs)} requests "
          f"({duration:.1f} s simulated in {wall:.1f} s); {summary['gpu_hours']:.2f} GPU-hours"
          + (f", planner {args.planner}: {len(plan.started)} engines started" if plan is not None else ""))
    return report.emit(data, results, args.out, args.plot, f"sim: {args.strategy}, {args.workload}, {arrivals}")
