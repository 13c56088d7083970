"""`microserve launch` and `microserve router`: engines, router and gateway in one command.

    launch:  spawn `microserve engine` subprocesses (one per role slot) ─┐
    router:  engines started elsewhere (--engine ROLE=tcp://...) ────────┴─> Cluster ─> Router ─> Gateway

The engine subprocesses are control/local_engines.py (`LocalEngines`): they die with the launcher
even when it is SIGKILLed; on SIGTERM/SIGINT the launcher stops the gateway, then terminates the
engines and waits for them (SIGKILL after a grace period). An engine that exits on its own is logged
and marked down; the gateway keeps serving with the others. One line `READY url=... engines=...` on
stdout says the gateway is serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microserve.control.local_engines import LocalEngines, spawn_engines, stop_engines
from microserve.control.provision import Names, Provisioner
from microserve.model_config import ModelPlan, check_names, id_prefix
from microserve.options import ServeOptions
from microserve.router.cluster import Cluster
from microserve.router.handle import EngineHandle
from microserve.router.strategy import Strategy, StrategyError
from microserve.text import NoTokenizer

log = logging.getLogger("microserve.launch")


def check_layout(strategy: Strategy, layout: Mapping[str, int]) -> None:
    missing = [r for r in type(strategy).roles if r not in layout]
    if missing:
        raise StrategyError(f"{type(strategy).__name__} routes to roles {', '.join(type(strategy).roles)}; "
                            f"the engines have roles {', '.join(layout) or 'none'} (missing: {', '.join(missing)})")


def load_tokenizer(model_path: str | Path, opts: ServeOptions | None = None):
    """The router's tokenizer (`--tokenizer`, else the checkpoint's), with `--chat-template` applied; also
    loads the gateway's default sampling (`--generation-config`) into `opts`. Raises ValueError."""
    from microserve.engine.model.tokenizer import Tokenizer
    from microserve.gateway.generation import load_defaults

    tokenizer = Tokenizer(opts.tokenizer if opts is not None and opts.tokenizer else model_path)
    if opts is not None:
        if opts.chat_template:
            template = Path(opts.chat_template)
            if template.is_file():
                tokenizer.chat_template = template.read_text()
            elif "{{" in opts.chat_template or "{%" in opts.chat_template:
                tokenizer.chat_template = opts.chat_template
            else:
                raise ValueError(f"--chat-template {opts.chat_template}: no such file (nor a Jinja template)")
        opts.sampling_defaults = load_defaults(opts.generation_config, model_path)
    return tokenizer


@dataclass
class Deployed:
    """One model of a deployment: its engines' cluster, its strategy and tokenizer, and its options (served
    names, the checkpoint path as given, default sampling, planner); `engines`: the engines the deployment
    started for it (stopped at exit; `ctl scale` starts and stops more)."""

    cluster: Cluster
    strategy: Strategy
    tokenizer: Any
    opts: ServeOptions
    engines: Provisioner | None = None


async def serve(cluster: Cluster, strategy: Strategy, tokenizer, opts: ServeOptions,
                engines: Provisioner | None = None, ready_extra: str = "") -> int:
    """Run router + gateway over a cluster until SIGTERM/SIGINT; returns the exit code."""
    return await serve_models([Deployed(cluster, strategy, tokenizer, opts, engines)], opts, ready_extra)


async def serve_models(models: list[Deployed], opts: ServeOptions, ready_extra: str = "") -> int:
    """One router per model behind one gateway (`opts`: its address, keys and limits), until SIGTERM/SIGINT;
    returns the exit code."""
    from microserve.gateway.app import Gateway
    from microserve.gateway.app import serve as serve_http
    from microserve.gateway.served import Served
    from microserve.router.runtime import Router

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, tasks, plannings, started = None, [], [], []
    try:
        served = []
        for d in models:
            d.cluster.evict_after = opts.evict_after
            started.append(d.cluster)
            await d.cluster.start()
            router = Router(d.cluster, d.strategy, d.tokenizer, request_timeout=opts.request_timeout,
                            max_retries=opts.max_retries, max_pending=opts.max_pending)
            router.engines = d.engines
            router.log_requests = opts.log_requests
            router.metrics.vllm_names = opts.metrics_names == "vllm"
            served.append(Served(router, [d.opts.served_model_name, *d.opts.aliases],
                                 [d.opts.model_path] if d.opts.model_path else [], d.opts.sampling_defaults))
        gateway = Gateway(served, opts.api_key, opts.admin_key, allow_code_upload=opts.allow_code_upload,
                          metrics_key=opts.metrics_key)
        if opts.log_stats_interval > 0:
            from microserve.logs import StatsLine

            tasks = [asyncio.ensure_future(StatsLine(m.router, opts.log_stats_interval,
                                                     m.name if len(served) > 1 else "").run()) for m in served]
        runner, port = await serve_http(gateway, opts.host, opts.port)
        url = f"http://{_url_host(opts.host)}:{port}"
        for d, m in zip(models, served):
            if d.engines is not None:
                d.engines.attach(d.cluster, url)
            if d.opts.planner:  # NOTE: launch only: the planner scales the engines this deployment starts
                from microserve.control.planner import load_planner
                from microserve.control.planning import Planning

                m.router.planning = Planning(m.router, d.engines, load_planner(d.opts.planner, d.opts.planner_args),
                                             d.opts.scale_bounds, d.opts.planner, d.opts.planner_args)
                plannings.append(m.router.planning)
                m.router.planning.start()
        listed = ",".join(f"{h.name}@{h.address}" for d in models for h in d.cluster.handles)
        print(f"READY url={url} model={','.join(m.name for m in served)} "
              f"strategy={','.join(type(d.strategy).__name__ for d in models)} engines={listed}{ready_extra}",
              flush=True)
        for d, m in zip(models, served):
            log.info("serving %s with %s on %s: %s", m.name, type(d.strategy).__name__, url,
                     ", ".join(f"{h.name} ({h.role})" for h in d.cluster.handles))
        await stop.wait()
        log.info("shutting down (a signal): the gateway stops taking requests, then the engines stop")
        return 0
    finally:
        for task in tasks:
            task.cancel()
        for planning in plannings:
            await planning.stop()
        if runner is not None:
            await runner.cleanup()
        for cluster in started:
            await cluster.close()
        for d in models:
            if d.engines is not None:
                await d.engines.close()
        for sig in (signal.SIGTERM, signal.SIGINT):  # NOTE: a repeated Ctrl-C must not break the teardown
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def launch(strategy: Strategy, model: str, layout: Mapping[str, int], engine_args: list[str],
                 opts: ServeOptions, ray=None) -> int:
    """Engines as subprocesses (or Ray actors: `ray`), then the router and gateway over them, until SIGINT/SIGTERM."""
    return await launch_models([ModelPlan(strategy, model, layout, engine_args, opts)], opts, ray)


async def launch_models(plans: list[ModelPlan], opts: ServeOptions, ray=None) -> int:
    """Every model's engines, then one router per model behind one gateway (`opts`: its address, keys and
    limits), until SIGINT/SIGTERM. Every process shares one cluster key: `opts.cluster_key`,
    `$MICROSERVE_CLUSTER_KEY`, or a fresh key for this run in a private directory (removed at exit)."""
    import shutil
    import tempfile

    from microserve.demo import resolve_model
    from microserve.security import ClusterKey, resolve

    check_names(plans)
    tokenizers = []
    for plan in plans:
        check_layout(plan.strategy, plan.layout)
        path = str(resolve_model(plan.model))
        tokenizers.append(NoTokenizer() if "--skip-tokenizer-init" in plan.engine_args else
                          load_tokenizer(path, plan.opts))
    key = resolve(opts.cluster_key)
    private = None
    if key is None:
        private = tempfile.mkdtemp(prefix="microserve-key-")  # mode 0700
        key = ClusterKey.generate()
        key.write(Path(private) / "cluster.key")
    with contextlib.ExitStack() as stack:
        if private is not None:
            stack.callback(shutil.rmtree, private, ignore_errors=True)
        for plan in plans:
            plan.engine_args = _kv_store_args(plan.engine_args, opts.host, key, stack)
        if ray is not None:  # `--ray`: a `RayOptions` (microserve/control/on_ray.py); one model
            from microserve.control.on_ray import launch_on_ray

            (plan,) = plans
            return await launch_on_ray(plan.strategy, plan.model, plan.layout, plan.engine_args, opts, tokenizers[0],
                                       key, ray)
        for plan in plans:
            plan.model, plan.engine_args = str(resolve_model(plan.model)), [*plan.engine_args, "--cluster-key",
                                                                             key.source]
        return await _launch(plans, opts, tokenizers, key)


def _kv_store_args(engine_args: list[str], host: str, key, stack: contextlib.ExitStack) -> list[str]:
    """`--kv-store valkey`: a local Valkey server for this run (stopped at exit), requiring the cluster's
    store password. `host:SIZE`: the tier's shared-memory file lives in a directory of this run."""
    import shutil
    import tempfile

    out = list(engine_args)
    specs = [out[i + 1] for i, a in enumerate(out[:-1]) if a == "--kv-store"]
    if "valkey" in specs:
        from kvapi.store.server import ValkeyProcess

        server = stack.enter_context(ValkeyProcess(host, key.store_password))
        out = [server.url if a == "valkey" and i and out[i - 1] == "--kv-store" else a for i, a in enumerate(out)]
        log.warning("KV store: a local Valkey server at %s", server.url)
    if any(s.startswith("host:") for s in specs) and not os.environ.get("MICROSERVE_KV_HOST_DIR"):
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        run_dir = tempfile.mkdtemp(prefix="microserve-kv-", dir=shm)
        stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        os.environ["MICROSERVE_KV_HOST_DIR"] = run_dir  # NOTE: the engines inherit it
        stack.callback(os.environ.pop, "MICROSERVE_KV_HOST_DIR", None)
    return out


async def _launch(plans: list[ModelPlan], opts: ServeOptions, tokenizers: list, key) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a Ctrl-C while engines load stops them too
        loop.add_signal_handler(sig, stop.set)
    # engine ids name their model when there are several (`llama-prefill-0`), so they are unique in the deployment
    prefixes: list[str] = []
    for i, p in enumerate(plans):
        pre = id_prefix(p.opts.served_model_name, i) if len(plans) > 1 else ""
        prefixes.append(f"{pre[:-1]}{i}-" if pre and pre in prefixes else pre)
    names = [Names(pre) for pre in prefixes]
    spawn = asyncio.ensure_future(asyncio.gather(*(spawn_engines(p.model, p.layout, p.engine_args, names=n)
                                                   for p, n in zip(plans, names)), return_exceptions=True))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([spawn, stopper], return_when=asyncio.FIRST_COMPLETED)
    if not spawn.done():
        spawn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spawn
        return 130
    stopper.cancel()
    spawned = spawn.result()
    if failed := [r for r in spawned if isinstance(r, BaseException)]:
        for procs in spawned:
            if not isinstance(procs, BaseException):
                await stop_engines(procs)
        raise failed[0]
    models = [Deployed(Cluster({role: [EngineHandle(p.rpc, name=p.engine_id, role=role, cluster_key=key)
                                       for p in procs if p.role == role] for role in plan.layout}, cluster_key=key),
                       plan.strategy, tok, plan.opts, LocalEngines(plan.model, plan.engine_args, procs, n))
              for plan, tok, procs, n in zip(plans, tokenizers, spawned, names)]
    return await serve_models(models, opts)
