"""`Watch`: what keeps a cluster's books current while it serves.

    KV events (each engine's PUB socket) ──> cluster.prefix_index      a gap in their numbers ─> snapshot
    stats polls (every poll_interval)    ──> cluster.load(h)           no answer twice in a row ─> mark_down
    a handle's alive changes             ──> snapshot when back, drop its index entries when down
    a joined engine down for evict_after ──> cluster.remove_engine (it re-joins when it is back)

One per `Cluster` (`cluster.watch`); the simulator's cluster feeds events in-process instead
(`sim.cluster.SimWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from microserve import protocol
from microserve.router.handle import EngineCallError, EngineHandle
from microserve.serving.api import ErrorCode

if TYPE_CHECKING:
    from microserve.router.cluster import Cluster

log = logging.getLogger(__name__)


class Watch:
    """The polls, subscriptions and liveness of one cluster's engines."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._tasks: list[asyncio.Task] = []
        self._subs: dict[EngineHandle, zmq.asyncio.Socket] = {}
        self._down_since: dict[EngineHandle, float] = {}

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sub in self._subs.values():
            sub.close(0)
        self._tasks, self._subs = [], {}

    def forget(self, h: EngineHandle) -> None:
        """`h` left the cluster: stop listening to it."""
        self._down_since.pop(h, None)
        sub = self._subs.pop(h, None)
        if sub is not None:
            sub.close(0)

    def subscribe(self, h: EngineHandle, health: protocol.HealthReply) -> None:
        """Feed the engine's KV events into the prefix index."""
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        if h.cluster_key is not None:  # the engine's PUB admits only holders of the key
            h.cluster_key.secure_client(sub)
        sub.connect(health.events)
        self._subs[h] = sub
        self._tasks.append(asyncio.create_task(self._events(sub)))

    async def _events(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            data = await sub.recv()
            try:
                self.cluster.prefix_index.apply(protocol.decode_event(data))
            except Exception:  # NOTE: a bad event must not stop the index
                log.exception("bad KV event")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.poll_interval)
            await self.poll()

    async def poll(self) -> None:
        """Refresh every engine's load now (also revives engines that answer again)."""
        await asyncio.gather(*(self._poll_one(h) for h in self.cluster.handles))

    async def _poll_one(self, h: EngineHandle, reported: bool = False) -> None:
        asked = time.monotonic()
        try:
            stats = await h.stats(timeout=max(2.0, 4 * self.cluster.poll_interval))
        except EngineCallError as exc:
            load = self.cluster._loads.get(h)
            if load is not None:
                load.missed += 1
            # NOTE: one late answer is a busy host (a long prefill), not a dead engine; unless a peer reported it
            if reported or exc.code != ErrorCode.TIMEOUT or load is None or load.missed >= 2:
                h.mark_down("the engine does not answer stats")
                self._maybe_evict(h)
            return
        self._down_since.pop(h, None)
        load = self.cluster._loads.get(h)
        if load is None:  # removed meanwhile
            return
        load.missed = 0
        load.stats, load.running, load.waiting, load.asked = stats, stats.running, stats.waiting, asked
        # NOTE: blocks only the prefix cache holds are free to take: not in use
        load.kv_usage = stats.kv_usage

    def _maybe_evict(self, h: EngineHandle) -> None:
        """A joined engine down for `evict_after` seconds leaves the cluster (it re-joins when back)."""
        now = asyncio.get_running_loop().time()
        since = self._down_since.setdefault(h, now)
        if h.joined and now - since >= self.cluster.evict_after and h in self.cluster._loads:
            log.warning("engine %s has not answered for %.0f s: evicted (it re-joins when it is back)",
                        h.name, now - since)
            self._down_since.pop(h, None)
            for hook in self.cluster.on_evict:
                hook(h)
            self._background(self.cluster.remove_engine(h, timeout=0.0))

    async def snapshot(self, h: EngineHandle) -> None:
        try:
            snap = await h.call(protocol.KVSnapshot(), timeout=10.0)
        except EngineCallError as exc:
            log.warning("no KV snapshot from %s (%s); its prefix index fills from events only", h.name, exc)
            return
        self.cluster.prefix_index.apply_snapshot(snap.engine_id, snap.hashes, snap.seq)

    async def check(self, h: EngineHandle) -> bool:
        """Ask `h` for its stats now, over its RPC channel: down if it does not answer in time (a
        peer reported it unreachable; that alone marks nobody down). Whether it is alive."""
        if h in self.cluster._loads:
            await self._poll_one(h, reported=True)
        return h.alive

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: t in self._tasks and self._tasks.remove(t))

    def on_gap(self, engine_id: str) -> None:
        h = self.cluster._by_id.get(engine_id)
        if h is not None:
            self._background(self.snapshot(h))

    def on_state(self, h: EngineHandle, alive: bool) -> None:
        health = self.cluster.health.get(h)
        if health is None:
            return
        if alive:  # back (maybe restarted): learn its cache again
            self._background(self.snapshot(h))
        else:
            self.cluster.prefix_index.drop_engine(health.engine_id)
