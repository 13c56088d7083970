"""Simulated engines behind the real router interface: `SimHandle` and `SimCluster`.

A `SimHandle` is an `EngineHandle` whose transport is a direct call into a `SimServer`
instead of a ZeroMQ socket, so everything above it is the real code: the handle's
load bookkeeping, `Cluster` (least-loaded choice, stats polling, the prefix index fed by
KV events) and the strategy files, unchanged.

    strategy.generate ─> SimCluster / SimHandle ─> SimServer (MicroservingEngine) ─> SimEngine
                                                        │ link model                   │ cost model
                                                        └─> peer SimServer._on_transfer └─> virtual time

Calls never time out in a simulation (an engine cannot hang), so call deadlines are not
enforced; everything else, errors included, behaves as against real engines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence

from microserve import protocol as P
from microserve.engine.config import EngineConfig
from microserve.router.cluster import Cluster
from microserve.router.handle import EngineCallError, EngineHandle
from microserve.serving.tickets import EngineError
from microserve.sim.costs import CostModel, Link
from microserve.sim.engine import SimEngine
from microserve.sim.service import SimServer


class SimHandle(EngineHandle):
    """The handle of one simulated engine."""

    def __init__(self, server: SimServer, role: str | None = None) -> None:
        super().__init__(f"sim://{server.engine_id}", name=server.engine_id, role=role)
        self.server = server

    async def _roundtrip(self, msg: P.Call, timeout: float | None) -> P.Reply:
        try:
            return await self.server.handle(msg)
        except EngineError as exc:
            raise EngineCallError(exc.code, str(exc), self.name) from None

    async def _stream(self, msg: P.StartGenerate, timeout: float | None) -> AsyncIterator[P.GenerateChunk]:
        try:
            chunks = await self.server.start_generate(msg.req, msg.begin, msg.sampling)
        except EngineError as exc:
            raise EngineCallError(exc.code, str(exc), self.name) from None
        try:
            async for chunk in chunks:
                yield chunk
        except EngineError as exc:
            raise EngineCallError(exc.code, str(exc), self.name) from None
        finally:
            await chunks.aclose()


class SimCluster(Cluster):
    """A `Cluster` of simulated engines: `{role: [SimServer, ...]}`."""

    def __init__(self, servers: Mapping[str, Sequence[SimServer]], *, poll_interval: float = 0.25) -> None:
        super().__init__({role: [SimHandle(s, role) for s in group] for role, group in servers.items()},
                         poll_interval=poll_interval)
        self.servers = [h.server for h in self.handles]  # type: ignore[attr-defined]

    def _subscribe(self, h: EngineHandle, health: P.HealthReply) -> None:
        assert isinstance(h, SimHandle)
        h.server.publish_events(self._on_event)
        h.server.start()

    def _on_event(self, event: P.KVEvent) -> None:
        self.prefix_index.apply(event)

    async def close(self) -> None:
        await super().close()
        for server in self.servers:
            await server.stop()


def build_cluster(layout: Mapping[str, int], cost: CostModel, link: Link, config: EngineConfig | None = None,
                  poll_interval: float = 0.25, lease_s: float = 60.0) -> SimCluster:
    """`{role: count}` engines, all with the same cost model, KV moving over `link`."""
    peers: dict[str, SimServer] = {}
    servers = {role: [SimServer(SimEngine(cost, config, f"{role}-{i}"), peers, link, lease_s) for i in range(n)]
               for role, n in layout.items()}
    return SimCluster(servers, poll_interval=poll_interval)
