"""`BuiltinService`: the calls of our own PyTorch engine (`LLMEngine`), KV through `kvapi.transfer`.

The engine's step runs in a worker thread while the loop serves calls; `self._lock` makes
every touch of engine state (scheduler, KV books) exclusive with the step. KV bytes move in
other threads (`kvapi.transfer`) and only ever touch blocks that are held for them: a
receive ticket's reserved blocks, or a finished prefill-only sequence's blocks on the sender.

    D.prep_recv(req, end)          ─> Ticket: pinned prefix [0, matched) + reserved [matched, end)
    P.remote_send(req, kv, b, e)   ─> prefill-only Sequence prompt[:e]; its final step's layer hooks
                                       release the sender thread layer by layer ─> D's KVReceiver
    D.start_generate(req, begin)   ─> adopts the ticket's blocks, prefills the rest, decodes
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from kvapi.transfer import KVAddr, KVReceiver, KVSender, choose_transport
from microserve.engine.core.engine_core import StepOutput
from microserve.engine.engine import LLMEngine
from microserve.serving.base import MAX_LEASE_S
from microserve.serving.core import CoreService
from microserve.serving.tickets import SendJob, Ticket


class BuiltinService(CoreService):
    """The microserving calls of a real engine: the step runs in a worker thread and KV
    bytes move through `kvapi.transfer` (`receiver` accepts them into this engine's pool).

    Args:
        engine: the model engine (its KV pool must be `receiver.pool`).
        receiver: accepts KV into this engine's pool.
        host_id: this machine's identity (shm only between engines with the same one).
        others: as `CoreService`.
    """

    def __init__(self, engine: LLMEngine, engine_id: str, receiver: KVReceiver, transports: list[str],
                 host_id: str = "", lease_s: float = 60.0, transfer_timeout: float = 30.0,
                 max_lease_s: float = MAX_LEASE_S) -> None:
        super().__init__(engine, engine_id, transports, lease_s, transfer_timeout, max_lease_s)
        self.engine: LLMEngine = engine
        self.model_name = str(engine.model_path)
        self.receiver, self.host_id = receiver, host_id
        self.sender = KVSender(engine.runner.kv_cache, engine.kv_spec)
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._send_pool = ThreadPoolExecutor(8, thread_name_prefix="kv-send")

    async def _step(self) -> list[StepOutput]:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._step_pool, self.engine.step)

    def _recv_addr(self, ticket: Ticket) -> KVAddr:
        return KVAddr(self.engine_id, self.receiver.endpoint, ticket.id, ticket.secret, ticket.matched, ticket.end,
                      ticket.blocks, self.engine.kv_spec, self.transports, self.host_id, self.receiver.shm_path,
                      self.receiver.ucx_address)

    def _open_receive(self, ticket: Ticket, addr: KVAddr) -> None:
        self.receiver.open_ticket(ticket.id, ticket.secret, ticket.blocks, self._on_transfer_threadsafe)

    def _receiving(self, ticket_id: str) -> bool:
        return self.receiver.is_active(ticket_id)

    def _revoke(self, ticket_id: str) -> bool:
        return self.receiver.revoke(ticket_id)

    def _transport_for(self, kv: KVAddr, forced: str | None) -> str:
        return choose_transport(self.transports, kv, forced)

    async def _push(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> tuple[int, str]:
        seq = job.seq
        fut = asyncio.get_running_loop().run_in_executor(self._send_pool, lambda: self.sender.send(
            kv, begin, end, lambda: seq.block_table, mode, job.wait_layer))
        try:
            stats = await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel("remote_send cancelled")
            await asyncio.wait([fut])
            raise
        return stats.nbytes, stats.transport

    def use_kv_key(self, key: bytes) -> None:
        super().use_kv_key(key)
        self.sender.sign_key = key

    def kv_bytes(self) -> tuple[int, int]:
        return self.sender.bytes_sent, self.receiver.bytes_received

    def close(self) -> None:
        super().close()
        self.receiver.close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)
