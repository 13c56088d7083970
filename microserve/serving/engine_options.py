"""`EngineOptions`: what `microserve engine` is started with (its flags, `cli.py`), and the checks run on
them before any model loads: addresses an engine can bind, the cluster key (or `--insecure` on
loopback), `--kv-store` tiers the backend can serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from microserve.engine.config import EngineConfig
from microserve.security import ClusterKey, is_loopback
from microserve.serving.base import MAX_LEASE_S

log = logging.getLogger("microserve.engine")


@dataclass
class EngineOptions:
    model: str
    rpc: str = "tcp://127.0.0.1:*"
    events: str = "tcp://127.0.0.1:*"
    device: str = "cpu"
    dtype: str | None = None
    transport: str = "auto"
    kv_host: str = "127.0.0.1"
    kv_port: int = 0
    engine_id: str = ""
    lease_s: float = 60.0
    transfer_timeout: float = 30.0
    config: EngineConfig | None = None
    backend: str = "builtin"  # or "vllm" (microserve.serving.vllm.engine)
    cluster_key: ClusterKey | None = None  # CURVE on the RPC and event sockets; None: --insecure
    insecure: bool = False  # serve without a key (loopback only)
    max_lease_s: float = MAX_LEASE_S
    kv_store: list[str] = field(default_factory=list)  # --kv-store tiers, fastest first (kvapi.store)
    join: str = ""  # a gateway URL to join (and leave on SIGTERM): microserve/control/join.py
    role: str = "engine"
    otlp_traces_endpoint: str = ""  # OTLP/HTTP collector for this engine's spans (microserve/tracing.py)


def check_addresses(opts: EngineOptions) -> None:
    """Addresses an engine can bind, or a ValueError naming the flag (not a port picked by chance)."""
    for flag, addr in (("--rpc", opts.rpc), ("--events", opts.events)):
        scheme, sep, rest = addr.partition("://")
        if scheme != "tcp" or not sep or ":" not in rest:
            raise ValueError(f"{flag} {addr!r}: expected tcp://HOST:PORT (PORT may be *)")
        port = rest.rsplit(":", 1)[1]
        if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{flag} {addr!r}: the port must be in 1-65535 or *")
    if not 0 <= opts.kv_port < 65536:
        raise ValueError(f"--kv-port {opts.kv_port}: must be in 0-65535 (0: any free port)")


def check_security(opts: EngineOptions) -> None:
    """An engine serves only with the cluster key, or with --insecure on loopback (ValueError)."""
    if opts.cluster_key is not None:
        return
    if not opts.insecure:
        raise ValueError("microserve engine needs the cluster key: --cluster-key FILE (or $MICROSERVE_CLUSTER_KEY; "
                         "make one with `microserve keygen FILE`), or --insecure for a loopback-only test engine")
    public = [a for a in (opts.rpc, opts.events, opts.kv_host) if not is_loopback(a)]
    if public:
        raise ValueError(f"--insecure binds loopback only; {', '.join(public)} is not a loopback address")
    log.warning("engine runs WITHOUT the cluster key (--insecure): any local process can drive it")


def check_store(opts: EngineOptions) -> None:
    """`--kv-store` flags an engine can serve, checked before the model loads (ValueError)."""
    if not opts.kv_store:
        return
    from kvapi.store import check_specs

    check_specs(opts.kv_store)
    if opts.backend == "vllm":
        raise ValueError("--kv-store is served by the built-in engine; a vLLM engine offloads KV with its own "
                         "connectors (LMCache, its CPU offloading): docs/kv-store.md")
    if opts.config is not None and not opts.config.enable_prefix_caching:
        raise ValueError("--kv-store needs the prefix cache (drop --no-prefix-caching)")
