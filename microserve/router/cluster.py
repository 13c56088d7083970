"""`Cluster`: the engines a strategy routes over, their load, and the global prefix index.

    cluster.engines("decode")        live handles with that role (all live ones without a role)
    cluster.least_loaded("prefill")  the live engine with the least work, ties taken in turn
    cluster.load(engine)             Load(requests, running, waiting, queued_tokens, kv_usage)
    cluster.prefix_index             PrefixIndex fed by every engine's KV events

Load merges two views: what this router itself has in flight on an engine (exact, no
delay) and the engine's own `stats` polled every `poll_interval` seconds (which also
counts other routers' work). A failed poll or a lost connection marks the engine
down; strategies then never see it until it answers again. The polls, the KV-event
subscriptions and evictions are the cluster's `watch` (router/watch.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass

from microserve import protocol
from microserve.router.attempt_scope import AttemptRegistry
from microserve.router.handle import EngineCallError, EngineHandle
from microserve.router.kv_wait import KVWaiters
from microserve.router.prefix_index import PrefixIndex
from microserve.router.watch import Watch

log = logging.getLogger(__name__)

class NoEngineAvailable(EngineCallError):
    """No live engine has the role asked for."""

    def __init__(self, role: str | None) -> None:
        super().__init__("unavailable", f"no live engine{f' with role {role!r}' if role else ''}")


@dataclass
class Load:
    """Work on one engine, as the router sees it."""

    requests: int = 0  # max(this router's calls in flight, the engine's running + waiting)
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0  # prompt tokens waiting for prefill (router's view or engine's, the larger)
    kv_usage: float = 0.0  # fraction of KV blocks requests hold (blocks only the prefix cache holds are free)
    stats: protocol.StatsReply | None = None  # the last polled stats
    asked: float = 0.0  # monotonic time that poll was sent
    missed: int = 0  # polls in a row that got no answer in time


class Cluster:
    """Engine handles grouped by role: membership and the queries strategies make. What keeps its books
    current (stats polls, KV events, liveness, evictions) is its `watch` (router/watch.py).

    Args:
        engines: `{role: [handle or address, ...]}`, or a flat list of handles/addresses (role "engine").
        poll_interval: seconds between `stats` polls of each engine.
        timeout: deadline of each call made through handles created from addresses.
        cluster_key: the key of handles created from addresses (default: `$MICROSERVE_CLUSTER_KEY`).
    """

    watch_class: type[Watch] = Watch

    def __init__(self, engines: Mapping[str, Sequence[EngineHandle | str]] | Sequence[EngineHandle | str],
                 *, poll_interval: float = 0.25, timeout: float = 60.0, cluster_key=None) -> None:
        if not isinstance(engines, Mapping):
            engines = {"engine": list(engines)}
        self.roles: dict[str, list[EngineHandle]] = {}
        for role, items in engines.items():
            if isinstance(items, str | EngineHandle):
                items = [items]
            handles = [h if isinstance(h, EngineHandle) else EngineHandle(h, role=role, timeout=timeout,
                                                                          cluster_key=cluster_key) for h in items]
            for h in handles:
                h.role = h.role or role
            self.roles[role] = handles
        self.handles, self.poll_interval = [h for hs in self.roles.values() for h in hs], poll_interval
        if not self.handles:
            raise ValueError("a cluster needs at least one engine")
        self._by_id: dict[str, EngineHandle] = {}
        self._loads: dict[EngineHandle, Load] = {h: Load() for h in self.handles}
        self.watch = self.watch_class(self)  # polls, KV events, liveness (router/watch.py)
        self.prefix_index: PrefixIndex[EngineHandle] = PrefixIndex(self._by_id.get, self.watch.on_gap)
        self.health: dict[EngineHandle, protocol.HealthReply] = {}
        self._turns: dict[str | None, EngineHandle] = {}  # per role, the engine picked last: ties go on from it
        self.draining: set[EngineHandle] = set()  # leaving: strategies no longer see them
        self.on_join: list = []  # callbacks told of every engine added while serving (metrics)
        self.on_evict: list = []  # callbacks told of every joined engine evicted for not answering
        self.evict_after = 30.0  # seconds a joined engine may stay down before it is evicted
        self.cluster_key, self._timeout = cluster_key, timeout
        self.attempts = AttemptRegistry()  # requests' strategy runs: what each touched (router/attempt_scope.py)
        self.kv_waiters = KVWaiters()  # requests parked for want of KV blocks (router/kv_wait.py)
        for h in self.handles:
            h.on_state, h.attempts = self.watch.on_state, self.attempts

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, ready_timeout: float = 120.0) -> Cluster:
        """Wait until every engine answers, subscribe to KV events, start polling."""
        replies = await asyncio.gather(*(h.wait_ready(ready_timeout) for h in self.handles))
        for h, health in zip(self.handles, replies):
            self.health[h] = health
            if health.engine_id in self._by_id:
                raise ValueError(f"two engines report the same engine id {health.engine_id!r}: "
                                 f"{self._by_id[health.engine_id].address} and {h.address}")
            self._by_id[health.engine_id] = h
            if h.name == h.address:
                h.name = health.engine_id
            self.prefix_index.add_engine(health.engine_id, health.kv_spec.block_size)
            self.watch.subscribe(h, health)
        await self.poll()
        await asyncio.gather(*(self.watch.snapshot(h) for h in self.handles))  # what the engines cached before us
        self.watch.start()
        return self

    async def close(self) -> None:
        await self.watch.close()
        await asyncio.gather(*(h.close() for h in self.handles))

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def poll(self) -> None:
        """Refresh every engine's load now (also revives engines that answer again)."""
        await self.watch.poll()

    async def check(self, h: EngineHandle) -> bool:
        """Ask `h` for its stats now, over its RPC channel: down if it does not answer in time (a
        peer reported it unreachable; that alone marks nobody down). Whether it is alive."""
        return await self.watch.check(h)

    # -- what strategies use ------------------------------------------------------------
    def engines(self, role: str | None = None) -> list[EngineHandle]:
        """Live engines with `role` (every live engine when `role` is None)."""
        if role is not None and role not in self.roles:
            raise KeyError(f"no role {role!r} in this cluster; roles: {sorted(self.roles)}")
        pool = self.handles if role is None else self.roles[role]
        return [h for h in pool if h.alive and h not in self.draining]

    def load(self, engine: EngineHandle) -> Load:
        load = self._loads[engine]
        polled = load.stats
        load.requests = max(engine.requests_here(), load.running + load.waiting)
        load.queued_tokens = max(engine.pending_tokens, polled.queued_tokens if polled else 0)
        return load

    def least_loaded(self, role: str | None = None, exclude: Collection[EngineHandle] = (), *,
                     avoid: Collection[EngineHandle] = ()) -> EngineHandle:
        """The live engine with the fewest requests by this router's own exact count (calls in flight
        and reservations, from `prep_recv` on); then by what its polled stats add to that (other
        routers' work; a poll older than this router's last change there is not used); then by queued
        prompt tokens; then KV pressure (use past 90%); equal engines are taken in turn (after the one
        this role picked last). Raises `NoEngineAvailable`."""
        pool = [h for h in self.engines(role) if h not in exclude]
        if not pool:
            raise NoEngineAvailable(role)
        if avoid:  # engines that failed this request's earlier attempts (AvoidingCluster): others first
            pool = [h for h in pool if h not in avoid] or pool
        last = self._turns.get(role)
        start = pool.index(last) + 1 if last in pool else 0
        n = len(pool)

        def key(item: tuple[int, EngineHandle]) -> tuple:
            i, h = item
            load, mine = self._loads[h], h.requests_here()
            fresh = load.stats is not None and load.asked >= h.changed_at
            others = max(0, load.running + load.waiting - mine) if fresh else 0
            queued = max(h.pending_tokens, load.stats.queued_tokens if fresh else 0)  # type: ignore[union-attr]
            pressure = round(load.kv_usage, 1) if load.kv_usage >= 0.9 else 0.0
            return mine, others, queued, pressure, (i - start) % n

        picked = min(enumerate(pool), key=key)[1]
        self._turns[role] = picked
        return picked

    def profile(self, engine: EngineHandle) -> dict:
        """What is known of the engine's hardware: in `microserve sim`, {gpu, tp, dtype, kv_dtype,
        peak_tflops, hbm_tb_s (both for all its GPUs), kv_capacity_tokens}; {} for a real engine."""
        return dict(engine.profile or {})

    def engine(self, engine_id: str) -> EngineHandle:
        """The handle of the engine with this engine id (or handle name)."""
        for h in self.handles:
            if engine_id in (h.name, self.health[h].engine_id if h in self.health else None):
                return h
        raise KeyError(f"no engine {engine_id!r} in this cluster")

    def migrate(self, req: protocol.Request, generated: list[int], source: EngineHandle,
                to: EngineHandle) -> AsyncIterator[protocol.GenerateChunk]:
        """Continue a running request on `to` with its KV moved from `source` (router/migration.py):
        close the source's stream first, then yield these chunks after the source's. With no token
        generated yet (during its prefill), what the source computed so far moves."""
        from microserve.router.migration import migrate

        cached = None if generated else self.prefix_index.matches(req).get(source, 0)
        return migrate(req, generated, source, to, cached)

    # -- membership while serving (microserve/control/admin.py) ------------------------------
    async def add_engine(self, address: str, role: str, ready_timeout: float = 60.0,
                         joined: bool = False) -> EngineHandle:
        """Add a running engine under `role`: it takes traffic once it answers (ValueError if it is
        already here; EngineCallError if it does not answer). An engine that reports the id of one
        here that does not answer (a restart on a new address) replaces it. `joined`: it registered
        itself (`engine --join`), so it is evicted when it stays down (`evict_after`) and re-joins."""
        h = self._new_handle(address, role)
        try:
            health = await h.wait_ready(ready_timeout)
            old = self._by_id.get(health.engine_id)
            if old is not None and old.address != address and not await self._answers(old):
                log.warning("engine %s is back at %s (was %s): it replaces the old one", health.engine_id,
                            address, old.address)
                await self.remove_engine(old, timeout=0.0)
            elif old is not None or any(x.address == address for x in self.handles):
                raise ValueError(f"engine {health.engine_id} ({address}) is already in the cluster")
        except BaseException:
            await h.close()
            raise
        h.name, h.on_state, h.joined, h.attempts = health.engine_id, self.watch.on_state, joined, self.attempts
        self.health[h], self._by_id[health.engine_id], self._loads[h] = health, h, Load()
        self.prefix_index.add_engine(health.engine_id, health.kv_spec.block_size)
        self.watch.subscribe(h, health)
        await self.watch.snapshot(h)
        self.roles.setdefault(role, []).append(h)
        self.handles.append(h)
        for hook in self.on_join:
            hook(h)
        self.kv_waiters.joined()
        return h

    def _new_handle(self, address: str, role: str) -> EngineHandle:
        return EngineHandle(address, role=role, timeout=self._timeout, cluster_key=self.cluster_key)

    @staticmethod
    async def _answers(h: EngineHandle) -> bool:
        try:
            await h.health(timeout=2.0)
            return True
        except EngineCallError:
            return False

    def set_role(self, h: EngineHandle, role: str) -> None:
        """Move an engine to another role (the next request sees it there)."""
        if h.role == role:
            return
        self.roles[h.role].remove(h)
        self.roles.setdefault(role, []).append(h)
        h.role = role

    async def remove_engine(self, h: EngineHandle, timeout: float = 300.0, migrate: bool = True) -> None:
        """Drain an engine, then forget it. No new request goes there; with `migrate`, each request
        streaming from it moves with its KV to another engine of its role after its next token
        (router/migration.py), else they finish there. Waits at most `timeout` seconds."""
        if h not in self._loads:  # already gone (evicted, replaced)
            return
        self.draining.add(h)
        h.evacuating = migrate  # NOTE: even if marked down: a stream that still yields is alive
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        moves_until = None  # NOTE: a stopped stream whose move never starts (a strategy that swallowed it)
        while loop.time() < deadline and (h.inflight or h.moving):
            if not h.inflight:
                moves_until = moves_until or loop.time() + 10.0
                if loop.time() > moves_until:
                    break
            await asyncio.sleep(0.02)
        if h not in self._loads:
            return
        self.roles[h.role].remove(h)
        self.handles.remove(h)
        self.draining.discard(h)
        self._loads.pop(h, None)
        health = self.health.pop(h, None)
        if health is not None:
            self._by_id.pop(health.engine_id, None)
            self.prefix_index.drop_engine(health.engine_id)
        self.watch.forget(h)
        await h.close()

    @property
    def max_model_len(self) -> int:
        return min((h.max_model_len for h in self.health.values()), default=0)
