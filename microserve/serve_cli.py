"""`microserve launch` (engines + router + OpenAI gateway for a strategy, or several models with
`--config`) and `microserve router` (router + gateway over engines started elsewhere): their
arguments and what they run. The rest of the command line: cli.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from microserve.engine_knobs import check_knobs, forwarded_knobs
from microserve.options import serve_parser


def add_launch(sub, knobs: argparse.ArgumentParser) -> None:
    lau = sub.add_parser("launch", parents=[knobs, serve_parser()],
                         help="start engines, the router and the OpenAI gateway for a strategy")
    lau.add_argument("--model", default=None, help="checkpoint folder, or 'demo'")
    lau.add_argument("--config", default=None, metavar="FILE",
                     help="serve several models, each with its engines and strategy (YAML: docs/models.md); "
                          "replaces --model, --strategy, --roles and --served-model-name")
    lau.add_argument("--roles", default=None, help="engine layout, e.g. prefill=1,decode=2 (default: the strategy's)")
    lau.add_argument("--engines", type=int, default=None,
                     help="number of engines, for strategies with one role (data parallel, cache aware...)")
    lau.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    pla = lau.add_argument_group("planner: the cluster sizes itself (docs/planner.md)")
    pla.add_argument("--planner", default=None, metavar="FILE",
                     help="planner file (one microserve.Planner subclass), or a shipped name: queue, slo")
    pla.add_argument("--planner-arg", action="append", default=[], metavar="NAME=VALUE",
                     help="override a planner parameter, e.g. interval=5 (repeatable)")
    pla.add_argument("--scale-bounds", default="", metavar="ROLE=MIN:MAX,...",
                     help="engines a planner may ask for per role, e.g. prefill=1:4,decode=1:8 (default 1:8 for "
                          "each role of the strategy)")
    ray = lau.add_argument_group("on Ray (docs/multi-host.md)")
    ray.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                     help="engines as Ray actors on a Ray cluster: its ADDRESS, or auto/none (this host's cluster, "
                          "else a new local one); needs pip install 'microserve[ray]'")
    ray.add_argument("--placement", default="spread", choices=["spread", "pack"], help="engines across nodes")
    ray.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs per engine actor (its threads too)")
    ray.add_argument("--engine-restarts", type=int, default=3,
                     help="Ray restarts of a failed engine actor (-1: no limit); a restarted engine re-joins")
    lau.set_defaults(func=launch)


def add_router(sub) -> None:
    rou = sub.add_parser("router", parents=[serve_parser()],
                         help="run the router and the OpenAI gateway over engines started elsewhere")
    rou.add_argument("--skip-tokenizer-init", action="store_true",
                     help="no tokenizer in the router: token-id prompts only (start the engines with it too)")
    rou.add_argument("--engine", action="append", required=True, metavar="[ROLE=]ADDRESS",
                     help="an engine's --rpc address, e.g. prefill=tcp://10.0.0.1:5601 (repeatable; "
                          "no role: 'engine')")
    rou.add_argument("--model", default=None,
                     help="checkpoint folder with the tokenizer (default: the path the engines report)")
    rou.add_argument("--tokenizer", default=None, metavar="PATH", help="a tokenizer folder other than the model's")
    rou.set_defaults(func=router)


def launch(args: argparse.Namespace) -> int:
    import asyncio

    from microserve.launch import launch

    if args.config:
        return _launch_config(args)
    if args.model is None:
        raise ValueError("launch needs --model PATH (or --config FILE with several models)")
    strategy, opts, layout, engine_args, ray = _plan(args)
    return asyncio.run(launch(strategy, args.model, layout, engine_args, opts, ray))


def _launch_config(args: argparse.Namespace) -> int:
    """`launch --config FILE`: every model's arguments are the command line's plus its entry's."""
    import asyncio

    from microserve import cli
    from microserve.launch import ModelPlan, launch_models
    from microserve.model_config import load_config, without_config

    given = [f for f, v in (("--model", args.model), ("--strategy", args.strategy), ("--roles", args.roles),
                            ("--engines", args.engines), ("--served-model-name", args.served_model_name),
                            ("--planner", args.planner)) if v]
    if given:
        raise ValueError(f"--config FILE names the models: give {', '.join(given)} in its entries, not on the command "
                         "line")
    if args.ray is not None:
        raise ValueError("--config with --ray is not supported: launch one deployment per model on Ray")
    base = without_config(args.argv)[1:]  # NOTE: [0] is "launch"
    plans = []
    for i, argv in enumerate(load_config(args.config)):
        try:
            margs = cli.build_parser().parse_args(["launch", *base, *argv])
        except SystemExit:  # NOTE: argparse printed what is wrong
            raise ValueError(f"--config {args.config}: models[{i}]: bad options (above)") from None
        strategy, opts, layout, engine_args, _ = _plan(margs)
        plans.append(ModelPlan(strategy, margs.model, layout, engine_args, opts))
    return asyncio.run(launch_models(plans, plans[0].opts))


def _plan(args: argparse.Namespace):
    """One model's strategy, options, engine layout and engine arguments (and Ray's options) from `launch`'s
    command line; ValueError before anything starts."""
    from microserve.options import serve_setup
    from microserve.router.strategy import parse_roles

    strategy, opts = serve_setup(args, args.model)
    if args.planner:
        from microserve.control.planner import load_planner, parse_bounds

        opts.planner_args = dict(_pairs(args.planner_arg, "--planner-arg"))
        opts.planner, opts.scale_bounds = args.planner, parse_bounds(args.scale_bounds)
        load_planner(args.planner, opts.planner_args)  # NOTE: a bad file or argument exits 2 before engines start
    elif args.planner_arg or args.scale_bounds:
        raise ValueError("--planner-arg and --scale-bounds need --planner")
    if (problem := check_knobs(args)) is not None:
        raise ValueError(problem)
    roles = type(strategy).roles
    if args.roles and args.engines:
        raise ValueError("give --roles or --engines, not both")
    if args.roles:
        layout = parse_roles(args.roles)
    elif args.engines is not None:
        if len(roles) != 1 or args.engines < 1:
            raise ValueError(f"--engines N needs a strategy with one role and N >= 1; {type(strategy).__name__} "
                             f"has roles {', '.join(roles)}: use --roles")
        layout = {next(iter(roles)): args.engines}
    else:
        layout = dict(roles)
    backend = ["--backend", args.backend] if args.backend != "builtin" else []
    if args.transport != "auto" and args.ray is None:  # NOTE: a missing extra exits 2 here, before engines start
        from microserve.serving.kv_plane import pick_transports

        pick_transports(args.transport, args.device)
    ray = None
    if args.ray is not None:
        from microserve.control.on_ray import RayOptions, import_ray

        import_ray()  # NOTE: without Ray: exit 2 with the install command, before anything starts
        if args.engine_cpus <= 0:
            raise ValueError("--engine-cpus must be > 0")
        ray = RayOptions(args.ray, args.placement, args.engine_cpus, args.engine_restarts)
    logs = ["--log-level", args.log_level, "--log-format", args.log_format]  # the deployment's, for its engines
    if args.otlp_traces_endpoint:
        logs += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return strategy, opts, layout, [*forwarded_knobs(args), *backend, *logs], ray


def _pairs(items: list[str], flag: str):
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        yield key.strip(), value.strip()


def router(args: argparse.Namespace) -> int:
    import asyncio

    from microserve.launch import check_layout, load_tokenizer, serve
    from microserve.options import serve_setup
    from microserve.router.cluster import Cluster
    from microserve.text import NoTokenizer

    strategy, opts = serve_setup(args, args.model)
    engines: dict[str, list[str]] = {}
    for item in args.engine:
        role, sep, address = item.partition("=")
        role, address = (role, address) if sep and "://" not in role else ("engine", item)
        engines.setdefault(role.strip(), []).append(address.strip())
    check_layout(strategy, {r: len(a) for r, a in engines.items()})

    async def main() -> int:
        cluster = Cluster(engines, cluster_key=opts.cluster_key)
        model = args.model
        if model is None:
            health = await cluster.handles[0].wait_ready()
            model = health.model
            if opts.served_model_name == "model":
                opts.served_model_name = Path(model).name if model else "model"
        from microserve.demo import resolve_model

        tokenizer = NoTokenizer() if args.skip_tokenizer_init else load_tokenizer(resolve_model(model), opts)
        return await serve(cluster, strategy, tokenizer, opts)

    return asyncio.run(main())
