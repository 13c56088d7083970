"""Engines a deployment starts and stops by itself, so that `microserve ctl scale ROLE=N` can change
how many it has while it serves.

    PUT /admin/scale {"decode": 3} ─> scale(router, engines, {"decode": 3})
        more wanted: engines.start(role, k) ─> their RPC addresses ─> cluster.add_engine
        fewer:       the newest engines of that role this deployment owns ─> cluster.remove_engine
                     (drain: their requests finish) ─> engines.stop(id)

`LocalEngines`: `microserve engine` subprocesses of `launch` on this host (microserve/launch.py).
`RayEngines`: Ray actors that own one engine process each, on any node (microserve/control/on_ray.py).
Engines added by address (`ctl add`, `engine --join`) count toward a role but are never stopped here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("microserve.provision")


@dataclass
class Started:
    engine_id: str
    rpc: str
    node: str = ""  # where it runs (a Ray node id; "" for this host)


class Provisioner(Protocol):
    """What `scale` needs from a deployment that owns its engines."""

    def attach(self, cluster, url: str = "") -> None:
        """The gateway serves `cluster` at `url` (watch the engines; where a restarted engine joins)."""
        ...

    async def start(self, role: str, count: int) -> list[Started]:
        """Start `count` engines for `role`; return when each serves (or raise and stop them)."""
        ...

    async def stop(self, engine_id: str) -> None:
        """Stop an engine this deployment started (after the router drained it)."""
        ...

    def owns(self, engine_id: str) -> bool:
        ...

    async def close(self) -> None:
        """Stop every engine (the deployment is shutting down)."""
        ...


class ScaleError(ValueError):
    """A scale request that cannot be done (answered 409)."""


class Names:
    """Engine ids `ROLE-N` (`prefix` first: a model's name when a deployment serves several), never reused
    within a deployment (a restarted engine keeps its own)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self._next: dict[str, int] = {}

    def new(self, role: str) -> str:
        n = self._next.get(role, 0)
        self._next[role] = n + 1
        return f"{self.prefix}{role}-{n}"


async def scale(router, engines: Provisioner | None, want: Mapping[str, int]) -> dict[str, list[str]]:
    """Bring each role to the wanted count of engines; returns {role: [engine ids]} after the change."""
    if engines is None:
        raise ScaleError("this deployment does not start its own engines (microserve router): add engines with "
                         "`ctl add` or `engine --join`, remove them with `ctl remove`")
    cluster, used = router.cluster, type(router.strategy).roles
    for role, n in want.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"scale: {role}={n!r} is not a count (an integer >= 0)")
        if n == 0 and role in used:
            raise ScaleError(f"{type(router.strategy).__name__} routes to {role}: it needs at least one engine")
    for role, n in want.items():
        serving = [h for h in cluster.roles.get(role, []) if h not in cluster.draining]
        if n > len(serving):
            await grow(router, engines, role, n - len(serving))
        elif n < len(serving):
            await shrink(router, engines, role, n)
    return {role: [h.name for h in hs if h not in cluster.draining] for role, hs in cluster.roles.items()}


async def grow(router, engines: Provisioner, role: str, k: int) -> None:
    """Start `k` more engines for `role` and add each to the cluster once it serves (all stopped if one
    fails). Several may run at once (a planner grows a role again while its last engines start)."""
    cluster = router.cluster
    started = await engines.start(role, k)
    for s in started:
        try:
            await _load_adapters(router, s.rpc)
            await cluster.check(await cluster.add_engine(s.rpc, role))  # NOTE: its stats, polled now
        except BaseException:
            await asyncio.gather(*(engines.stop(x.engine_id) for x in started), return_exceptions=True)
            raise
        log.warning("scale: engine %s started as %s%s", s.engine_id, role, f" on node {s.node}" if s.node else "")


async def shrink(router, engines: Provisioner, role: str, n: int) -> None:
    """Bring `role` down to `n` serving engines: drain the newest this deployment owns by migration (their
    requests move or finish), then stop them."""
    cluster = router.cluster
    serving = [h for h in cluster.roles.get(role, []) if h not in cluster.draining]
    owned = [h for h in serving if engines.owns(h.name)]
    if len(serving) - len(owned) > n:
        raise ScaleError(f"{role} has {len(serving) - len(owned)} engines this deployment did not start; "
                         f"remove those with `ctl remove` to go below that")
    victims = sorted(owned, key=_order, reverse=True)[:max(0, len(serving) - n)]
    await asyncio.gather(*(cluster.remove_engine(h) for h in victims))
    await asyncio.gather(*(engines.stop(h.name) for h in victims))
    if victims:
        log.warning("scale: %s drained and stopped", ", ".join(h.name for h in victims))


async def _load_adapters(router, rpc: str) -> None:
    """A new engine loads the LoRA adapters loaded at run time (`/v1/load_lora_adapter`) before it takes
    traffic (those of `--lora-modules` it loads itself)."""
    if not router.loras:
        return
    from microserve.router.handle import EngineHandle

    async with EngineHandle(rpc, cluster_key=router.cluster.cluster_key) as h:
        await h.wait_ready(60.0)
        for name, path in router.loras.items():
            await h.lora("load", name, path)


def _order(h) -> tuple:
    _, _, n = h.name.rpartition("-")
    return (int(n) if n.isdigit() else -1, h.name)
