"""Planners in virtual time: `microserve sim --planner FILE` runs the same file `launch --planner` runs
(control/planner.py: the same window, checks, bounds and cooldown, the same `provision.grow` and `shrink`), over
simulated engines that a provisioner starts and stops:

    Planning ─> provision.grow   ─> SimEngines.start(role, n): GPUs paid from now; after the role's start
                                   latency (boot + weights, CostModel.start_seconds) cluster.make(...) serves
                                ─> cluster.remove_engine (drain by migration) ─> SimEngines.stop(id)

GPU-hours count every engine from the moment it was asked for (starting ones too) to its stop or the
end of the run, times its tensor-parallel degree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from microserve.control.provision import Names, Started
from microserve.router.journal import Recorder
from microserve.router.metrics import RouterMetrics
from microserve.router.strategy import Strategy
from microserve.sim.cluster import SimCluster, sim_backend
from microserve.sim.costs import CostModel


class SimEngines:
    """The simulator's provisioner (`control.provision.Provisioner`). Create it inside the run's loop."""

    def __init__(self, cluster: SimCluster, costs: Mapping[str, CostModel]) -> None:
        self.cluster, self.costs, self.names = cluster, costs, Names()
        for role, handles in cluster.roles.items():
            for _ in handles:
                self.names.new(role)  # NOTE: build_cluster named them ROLE-0.. already
        now = asyncio.get_running_loop().time()
        self.since = {h.name: (now, costs[h.role].tp) for h in cluster.handles}  # engine -> (paid from, GPUs)
        self.gpu_seconds = 0.0  # of engines already stopped
        self.started: list[tuple[float, str, str]] = []  # (virtual time serving, role, engine id)

    def attach(self, cluster, url: str = "") -> None:
        pass

    async def start(self, role: str, count: int) -> list[Started]:
        loop = asyncio.get_running_loop()
        if role not in self.costs:
            raise ValueError(f"the simulation has no cost model for role {role!r}")
        ids = [self.names.new(role) for _ in range(count)]
        for eid in ids:
            self.since[eid] = (loop.time(), self.costs[role].tp)
        await asyncio.sleep(self.costs[role].start_seconds())
        out = []
        for eid in ids:
            self.cluster.starting[f"sim://{eid}"] = self.cluster.make(role, eid)  # type: ignore[misc]
            self.started.append((loop.time(), role, eid))
            out.append(Started(eid, f"sim://{eid}"))
        return out

    async def stop(self, engine_id: str) -> None:
        for service in list(self.cluster.servers):
            if service.engine_id == engine_id:
                await sim_backend(service).stop()
                self.cluster.servers.remove(service)
        paid = self.since.pop(engine_id, None)
        if paid is not None:
            self.gpu_seconds += (asyncio.get_running_loop().time() - paid[0]) * paid[1]

    def owns(self, engine_id: str) -> bool:
        return True

    async def close(self) -> None:
        pass

    def gpu_hours(self) -> float:
        now = asyncio.get_running_loop().time()
        return (self.gpu_seconds + sum((now - t) * tp for t, tp in self.since.values())) / 3600


@dataclass
class SimRouter:
    """What `Planning` reads of a router, in a simulation."""

    cluster: SimCluster
    strategy: Strategy
    recorder: Recorder = field(default_factory=Recorder)
    metrics: RouterMetrics | None = None
    loras: dict[str, str] = field(default_factory=dict)  # adapters loaded at run time: none in a simulation

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics(self.cluster)
