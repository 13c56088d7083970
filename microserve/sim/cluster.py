"""Simulated engines behind the real router interface: `SimCluster`.

Each simulated engine gets a plain `EngineHandle` whose channel is an `InProcessChannel`
into its engine's `EngineService` over a `SimBackend` (through `serving.api.dispatch`, as the ZeroMQ server does), so
everything above it is the real code: the handle's load bookkeeping, `Cluster`
(least-loaded choice, stats polling, the prefix index fed by KV events), the router's
`run_attempt` and the strategy files, unchanged.

    strategy.generate ─> Cluster / EngineHandle ─> InProcessChannel ─> EngineService ─> SimBackend ─> SimEngine
                                                                                          │ link model   │ cost model
                                                                                          └─> peer's leases.on_transfer

Calls never time out in a simulation (an engine cannot hang), so call deadlines are not
enforced; everything else, errors included, behaves as against real engines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from microserve import protocol
from microserve.engine.config import EngineConfig
from microserve.router.channel import InProcessChannel
from microserve.router.cluster import Cluster
from microserve.router.handle import EngineHandle
from microserve.router.watch import Watch
from microserve.serving.base import EngineService
from microserve.sim import store
from microserve.sim.costs import CostModel, Link
from microserve.sim.engine import SimEngine
from microserve.sim.service import SimBackend, sim_service
from microserve.sim.store import SimStoreLink


def sim_handle(service: EngineService, role: str | None = None) -> EngineHandle:
    """The handle of one simulated engine; `profile` tells strategies its hardware (`Cluster.profile`)."""
    h = EngineHandle(f"sim://{service.engine_id}", name=service.engine_id, role=role,
                     channel=InProcessChannel(service))
    engine = sim_backend(service).engine
    cost = engine.cost
    peak, _ = cost.gpu.peak(cost.model.dtype)
    h.profile = {"gpu": cost.gpu.name, "tp": cost.tp, "dtype": cost.model.dtype, "kv_dtype": cost.model.kv_dtype,
                 "peak_tflops": peak * cost.tp, "hbm_tb_s": cost.gpu.hbm_tb_s * cost.tp,
                 "kv_capacity_tokens": engine.kv.num_blocks * engine.kv_spec.block_size}
    return h


def sim_backend(service: EngineService) -> SimBackend:
    if not isinstance(service.backend, SimBackend):
        raise TypeError(f"engine {service.engine_id} is not simulated")
    return service.backend


def service_of(h: EngineHandle) -> EngineService:
    channel = h.channel
    if not isinstance(channel, InProcessChannel) or not isinstance(channel.api, EngineService):
        raise TypeError(f"{h} is not an in-process engine")
    return channel.api


class SimWatch(Watch):
    """A simulated engine's KV events reach the prefix index in-process, as they happen."""

    def subscribe(self, h: EngineHandle, health: protocol.HealthReply) -> None:
        service = service_of(h)
        service.events.sink = self.cluster.prefix_index.apply  # events arrive at once, numbered as on the socket
        sim_backend(service).start()


class SimCluster(Cluster):
    """A `Cluster` of simulated engines: `{role: [EngineService over a SimBackend, ...]}`."""

    def __init__(self, servers: Mapping[str, Sequence[EngineService]], *, poll_interval: float = 0.25) -> None:
        super().__init__({role: [sim_handle(s, role) for s in group] for role, group in servers.items()},
                         poll_interval=poll_interval)
        self.servers = [service_of(h) for h in self.handles]
        self.make: Callable[[str, str], EngineService] | None = None  # build_cluster's engine factory
        self.starting: dict[str, EngineService] = {}  # "sim://ID" -> an engine a planner started, until added

    def _new_handle(self, address: str, role: str) -> EngineHandle:
        service = self.starting.pop(address)
        self.servers.append(service)
        return sim_handle(service, role)

    watch_class = SimWatch

    async def close(self) -> None:
        await super().close()
        for server in self.servers:
            await sim_backend(server).stop()


class _RoleLinks:
    """The link from an engine of `role` to each receiving engine, by the receiver's role (engine ids are
    `ROLE-N`), so engines a planner starts later are reached over the right link too."""

    def __init__(self, role: str, links: Mapping[tuple[str, str], Link]) -> None:
        self.role, self.links = role, links

    def get(self, engine_id: str, default: Link | None = None) -> Link | None:
        return self.links.get((self.role, engine_id.rpartition("-")[0]), default)


def engine_factory(cost: CostModel | Mapping[str, CostModel], link: Link, config: EngineConfig | None = None,
                   lease_s: float = 60.0, links: Mapping[tuple[str, str], Link] | None = None,
                   kv_store: Sequence[str] = ()) -> Callable[[str, str], EngineService]:
    """`make(role, engine_id)`: a new simulated engine of `role` on one fabric (every engine made by one
    factory reaches the others), with the role's cost model, links and store tiers."""
    peers: dict[str, SimBackend] = {}
    shared: dict[str, store.SimTier] = {}  # the tiers every engine shares (valkey)

    def make(role: str, eid: str) -> EngineService:
        role_cost = cost[role] if isinstance(cost, Mapping) else cost
        service = sim_service(SimEngine(role_cost, config, eid), peers, link, lease_s,
                              links=_RoleLinks(role, links or {}))  # type: ignore[arg-type]
        if kv_store:
            spec = service.kv_spec
            block_bytes = spec.bytes_per_token * spec.block_size
            events = service.events  # NOTE: tier events as the real engine publishes them (zmq_server)
            tiers = store.parse(list(kv_store), block_bytes, shared)
            sim_backend(service).use_store(SimStoreLink(tiers, spec.block_size, block_bytes,
                                                        lambda kind, hashes, tier, events=events:
                                                        events.record(kind, hashes, tier, tier == "valkey")))
        return service

    return make


def build_cluster(layout: Mapping[str, int], cost: CostModel | Mapping[str, CostModel], link: Link,
                  config: EngineConfig | None = None, poll_interval: float = 0.25, lease_s: float = 60.0,
                  links: Mapping[tuple[str, str], Link] | None = None,
                  kv_store: Sequence[str] = ()) -> SimCluster:
    """`{role: count}` engines with the cost model of their role (one for all, or `{role: CostModel}`),
    KV moving over `link`, or `links[(sender role, receiver role)]` for that pair of roles; `kv_store`:
    `--kv-store` specs of every engine (sim/store.py). `cluster.make(role, id)` makes more."""
    make = engine_factory(cost, link, config, lease_s, links, kv_store)
    cluster = SimCluster({role: [make(role, f"{role}-{i}") for i in range(n)] for role, n in layout.items()},
                         poll_interval=poll_interval)
    cluster.make = make
    return cluster
