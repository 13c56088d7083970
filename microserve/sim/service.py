"""`SimBackend`: one simulated engine under the call layer, in virtual time.

Its service is the real engine's call layer (`EngineService`: tickets, leases, streams, aborts)
and its backend the real one's books (`CoreBackend`: prefill-only sends, adoption of received
KV) over a `SimEngine`, with two things replaced:

* a step takes the cost model's time (`asyncio.sleep` on the virtual clock) instead of
  running a model in a thread;
* KV bytes do not move: a send waits until its prefill is done, then occupies the
  sender's link for `CostModel.transfer_seconds` (sends from one engine queue behind
  each other, FIFO), then completes the receiver's ticket through the same
  `on_transfer` path a real transfer takes.

Routers reach its service in-process: `InProcessChannel` (sim/cluster.py) hands each call
to `serving.api.dispatch`, as the ZeroMQ server does for a real engine (`sim_service`).

NOTE: the real engine streams KV layer by layer while the last prefill step runs, so
part of the transfer hides behind compute; here the whole transfer comes after the
prefill (conservative by at most one transfer time, small on NVLink/IB next to prefill).
"""

from __future__ import annotations

import asyncio

from kvapi.transfer import KVAddr, TransferError, TransferOutcome
from microserve.engine.core.engine_core import StepOutput
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.base import EngineService
from microserve.serving.core import CoreBackend
from microserve.serving.tickets import SendJob, Ticket, TicketState
from microserve.sim.costs import Link
from microserve.sim.engine import SimEngine

TRANSPORT = "sim"


class SimSendJob(SendJob):
    """A send whose prefill completion is awaited on the loop (no sending thread)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settled = asyncio.Event()

    def prefilled(self) -> None:
        super().prefilled()
        self.settled.set()

    def cancel(self, reason: str) -> None:
        super().cancel(reason)
        self.settled.set()


def sim_service(engine: SimEngine, peers: dict[str, SimBackend], link: Link, lease_s: float = 60.0,
                transfer_timeout: float = 30.0, links: dict[str, Link] | None = None) -> EngineService:
    """The call layer of one simulated engine (`SimBackend`'s arguments; lease and transfer
    timeout in virtual seconds)."""
    return EngineService(SimBackend(engine, peers, link, links), lease_s, transfer_timeout)


class SimBackend(CoreBackend):
    """One simulated engine.

    Args:
        engine: the simulated engine.
        peers: engine id -> `SimBackend` of every engine on the fabric (shared dict).
        link: the link KV crosses between engines; `links` overrides it per receiving engine id.
    """

    def __init__(self, engine: SimEngine, peers: dict[str, SimBackend], link: Link,
                 links: dict[str, Link] | None = None) -> None:
        super().__init__(engine, engine.engine_id, [TRANSPORT])
        self.engine: SimEngine = engine
        self.model_name = engine.cost.model.name
        self.peers, self.link, self.links = peers, link, links or {}
        peers[engine.engine_id] = self
        self.link_free_at = 0.0  # the sender's link is busy until then (virtual time)
        self.bytes_sent = self.bytes_received = 0
        self._incoming: set[str] = set()  # tickets a transfer is writing into
        self._task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self.service.run())

    async def stop(self) -> None:
        self.service.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- what CoreBackend leaves open ----------------------------------------------------
    def new_job(self, job_id: str, request_id: str, prompt: list[int], lora: str | None = None) -> SendJob:
        return SimSendJob(job_id, request_id, prompt, self.kv_spec.num_layers, lora)

    async def step(self) -> list[StepOutput]:
        outputs = self.engine.step()
        # NOTE: a step that schedules nothing (every waiting request short of blocks) still
        # lets virtual time pass, so leases can expire and free blocks
        await asyncio.sleep(self.engine.last_step_seconds or self.engine.cost.gpu.step_overhead_ms * 1e-3 or 1e-3)
        return outputs

    def recv_addr(self, ticket: Ticket) -> KVAddr:
        return KVAddr(self.engine_id, f"sim:{self.engine_id}", ticket.id, ticket.secret, ticket.matched, ticket.end,
                      ticket.blocks, self.engine.kv_spec, [TRANSPORT])

    def open_receive(self, ticket: Ticket, addr: KVAddr) -> None:
        pass  # NOTE: the sender completes the ticket through our service's `on_transfer` (`push`)

    def receiving(self, ticket_id: str) -> bool:
        return ticket_id in self._incoming

    def revoke(self, ticket_id: str) -> bool:
        return True  # NOTE: a push checks the ticket is still open before it completes it

    async def lend_blocks(self, req, begin: int, end: int) -> Ticket:
        raise EngineError(ErrorCode.BAD_REQUEST, "lend: the simulator does not model DistAttention yet "
                          "(remote attention's cost is not in its cost model)")

    def borrow(self, req, lenders: list) -> list:
        raise EngineError(ErrorCode.BAD_REQUEST, "start_generate(lenders=...): the simulator does not model "
                          "DistAttention yet (remote attention's cost is not in its cost model)")

    def attend_range(self, groups, layer: int, positions: list[int], q: bytes, scale: float) -> tuple[bytes, bytes]:
        raise EngineError(ErrorCode.BAD_REQUEST, "attend: the simulator does not model DistAttention yet")

    async def load_lora(self, name: str, path: str) -> list[str]:
        raise EngineError(ErrorCode.BAD_REQUEST, "lora: the simulator loads no adapters (a request that names one "
                          "is timed as the base model, its KV kept apart under the adapter's name)")

    async def unload_lora(self, name: str) -> list[str]:
        raise EngineError(ErrorCode.BAD_REQUEST, "lora: the simulator loads no adapters")

    def use_kv_key(self, key: bytes) -> None:
        pass  # NOTE: simulated sends read their peer's ticket directly: nothing to sign

    def transport_for(self, kv: KVAddr, forced: str | None) -> str:
        if kv.engine_id not in self.peers:
            raise TransferError(f"no simulated engine {kv.engine_id!r}", "bad_request")
        if forced not in (None, TRANSPORT):
            raise TransferError(f"transport {forced!r} is not simulated (only {TRANSPORT!r})", "bad_request")
        return TRANSPORT

    async def push(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> tuple[int, str]:
        assert isinstance(job, SimSendJob)
        await job.settled.wait()
        if job.cancel_reason is not None:
            raise TransferError(f"send abandoned: {job.cancel_reason}", "aborted")
        peer = self.peers[kv.engine_id]
        peer._incoming.add(kv.ticket_id)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            link = self.links.get(kv.engine_id, self.link)
            self.link_free_at = max(t0, self.link_free_at) + self.engine.cost.transfer_seconds(
                end - begin, link, peer.engine.cost.tp)
            await asyncio.sleep(self.link_free_at - t0)
        finally:
            peer._incoming.discard(kv.ticket_id)
        if job.cancel_reason is not None:
            raise TransferError(f"send abandoned: {job.cancel_reason}", "aborted")
        ticket = peer.service.tickets.get(kv.ticket_id)
        if ticket is None or ticket.secret != kv.secret or ticket.state is not TicketState.OPEN:
            raise TransferError("the receiver's ticket is gone (expired, aborted or already filled)", "transfer_failed")
        nbytes = (end - begin) * self.engine.kv_spec.bytes_per_token
        self.bytes_sent += nbytes
        peer.bytes_received += nbytes
        await peer.service.leases.on_transfer(TransferOutcome(kv.ticket_id, True, begin, end, nbytes, loop.time() - t0))
        return nbytes, TRANSPORT

    def kv_bytes(self) -> tuple[int, int]:
        return self.bytes_sent, self.bytes_received
