"""The options of `microserve launch` and `microserve router` (the router and its gateway): the argparse
group both share, and `ServeOptions` built from it. Light on purpose: `microserve --help` and
`microserve engine` import this module without the router's dependencies.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microserve.router.strategy import Strategy


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str = "model"
    request_timeout: float = 600.0
    max_retries: int = 2
    max_pending: int = 1024
    cluster_key: str | None = None  # key file; launch makes a fresh one per run when None
    admin_key: str | None = None  # the admin API's key (never the API key; none: the admin API is off)
    evict_after: float = 30.0  # seconds a joined engine may stay down before it leaves the cluster
    allow_code_upload: bool = False  # PUT /admin/strategy may carry Python source
    metrics_key: str | None = None  # bearer key of /metrics (None: open)
    log_requests: bool = True  # one access-log line per request (microserve/logs.py)
    log_stats_interval: float = 10.0  # seconds between stats lines (0: none)
    metrics_names: str = "microserve"  # "vllm": /metrics also carries vLLM's series names
    aliases: list[str] = field(default_factory=list)  # more names clients may pass as `model` (--served-model-name A B)
    model_path: str | None = None  # --model as given: accepted as `model` too (not listed)
    planner: str | None = None  # launch --planner FILE (control/planner.py)
    planner_args: dict = field(default_factory=dict)  # --planner-arg NAME=VALUE
    scale_bounds: dict = field(default_factory=dict)  # --scale-bounds ROLE=MIN:MAX: {role: (min, max)}
    tokenizer: str | None = None  # --tokenizer: the router's (and launch's engines') tokenizer folder
    chat_template: str | None = None  # --chat-template: a Jinja file or the template itself
    generation_config: str = "auto"  # --generation-config auto|vllm|FOLDER (gateway/generation.py)
    sampling_defaults: dict = field(default_factory=dict)  # what generation_config gives, once loaded


def serve_parser() -> argparse.ArgumentParser:
    """Router + gateway options shared by `launch` and `router` (`ServeOptions`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("router and gateway options")
    g.add_argument("--strategy", default=None,
                   help="strategy file (one microserve.Strategy subclass), or a shipped name: round_robin, pd, "
                        "balanced_pd, adaptive_pd, context_migration, cache_aware")
    g.add_argument("--strategy-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a strategy parameter, e.g. fraction=0.2 (repeatable)")
    g.add_argument("--host", default="127.0.0.1", help="gateway address to bind")
    g.add_argument("--port", type=int, default=8000, help="gateway port (0: any free port)")
    g.add_argument("--api-key", default=os.environ.get("MICROSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MICROSERVE_API_KEY)")
    g.add_argument("--admin-key", default=os.environ.get("MICROSERVE_ADMIN_KEY"),
                   help="bearer key of the admin API, /admin/* (default $MICROSERVE_ADMIN_KEY; never the API key: "
                        "without one the admin API is off)")
    g.add_argument("--allow-code-upload", action="store_true", help="let PUT /admin/strategy take Python source")
    g.add_argument("--metrics-key", default=os.environ.get("MICROSERVE_METRICS_KEY"),
                   help="require a bearer key on /metrics (default $MICROSERVE_METRICS_KEY; unset: /metrics is open)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients pass as `model` (default: the folder name); the first is the one responses "
                        "carry unless a request names another; the --model path as given is accepted too")
    g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="the chat template (a Jinja file, or the template itself) instead of the tokenizer's")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="default temperature, top_p, top_k, min_p, repetition_penalty for requests that leave them "
                        "out: the model's generation_config.json (auto, as vLLM), a folder's, or none (vllm)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline in seconds")
    g.add_argument("--max-retries", type=int, default=2,
                   help="restarts on another engine when one fails before the first token (a request refused for "
                        "want of KV blocks then waits for them until --request-timeout)")
    g.add_argument("--max-pending", type=int, default=1024, help="requests in flight before 429s")
    g.add_argument("--evict-after", type=float, default=30.0, metavar="SECONDS",
                   help="an engine that joined (engine --join) and stops answering leaves the cluster after this; "
                        "it re-joins when it is back")
    g.add_argument("--cluster-key", default=None, metavar="FILE",
                   help="the deployment's key (microserve keygen); default $MICROSERVE_CLUSTER_KEY; launch makes "
                        "a fresh one per run when neither is given")
    g.add_argument("--metrics-names", choices=["microserve", "vllm"], default="microserve",
                   help="vllm: /metrics also exports the engine series and latencies under vLLM's names (vllm:*)")
    g.add_argument("--log-level", default="info", help="debug, info (default: startup, one line per request, "
                   "a stats line, shutdown), warning, error")
    g.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    g.add_argument("--disable-log-requests", action="store_true", help="no access-log line per request")
    g.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="a stats line this often (0: none)")
    g.add_argument("--otlp-traces-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                   metavar="URL", help="send traces to an OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (pip "
                   "install 'microserve[otel]'; launch passes it to its engines; default "
                   "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)")
    return p


def serve_setup(args: argparse.Namespace, model: str | None) -> tuple[Strategy, ServeOptions]:
    """The strategy and `ServeOptions` of `launch` / `router` from their command line (logging set up)."""
    from microserve.logs import setup_logging
    from microserve.router.strategy import load_strategy

    if not args.strategy:
        raise ValueError("the --strategy FILE option is required (launch: or --config FILE)")
    setup_logging(args.log_level, args.log_format)
    from microserve import tracing

    tracing.setup(args.otlp_traces_endpoint, "microserve-router")
    strategy_args = {}
    for item in args.strategy_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--strategy-arg {item!r}: expected NAME=VALUE")
        strategy_args[key.strip()] = value.strip()
    strategy = load_strategy(args.strategy, strategy_args)
    names = args.served_model_name or [(model if model in (None, "demo") else Path(model).name) or "model"]
    name, aliases = names[0], names[1:]
    opts = ServeOptions(
        host=args.host, port=args.port, api_key=args.api_key, served_model_name=name, aliases=aliases,
        model_path=model, request_timeout=args.request_timeout, max_retries=args.max_retries,
        max_pending=args.max_pending, cluster_key=args.cluster_key, admin_key=args.admin_key,
        evict_after=args.evict_after, allow_code_upload=args.allow_code_upload, metrics_key=args.metrics_key,
        log_requests=not args.disable_log_requests, log_stats_interval=args.log_stats_interval,
        metrics_names=args.metrics_names, tokenizer=getattr(args, "tokenizer", None),
        chat_template=args.chat_template, generation_config=args.generation_config)
    return strategy, opts
