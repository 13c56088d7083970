"""`BuiltinService`: the calls of our own PyTorch engine (`LLMEngine`), KV through `kvapi.transfer`.

The engine's step runs in a worker thread while the loop serves calls; `self._lock` makes
every touch of engine state (scheduler, KV books) exclusive with the step. KV bytes move in
other threads (`kvapi.transfer`) and only ever touch blocks that are held for them: a
receive ticket's reserved blocks, or a finished prefill-only sequence's blocks on the sender.

    D.prep_recv(req, end)          ─> Ticket: pinned prefix [0, matched) + reserved [matched, end)
    P.remote_send(req, kv, b, e)   ─> prefill-only Sequence prompt[:e]; its final step's layer hooks
                                       release the sender thread layer by layer ─> D's KVPlane
    D.start_generate(req, begin)   ─> adopts the ticket's blocks, prefills the rest, decodes
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from kvapi.transfer import KVAddr
from microserve.engine.core.engine_core import StepOutput
from microserve.engine.engine import LLMEngine
from microserve.serving.base import MAX_LEASE_S
from microserve.serving.core import CoreService
from microserve.serving.kv_plane import KVPlane, PlaneHooks
from microserve.serving.tickets import SendJob


class BuiltinService(PlaneHooks, CoreService):
    """The microserving calls of a real engine: the step runs in a worker thread and KV
    bytes move through `kvapi.transfer` (`plane` accepts and sends them for this engine's pool).

    Args:
        engine: the model engine (its KV pool must be `plane`'s pool).
        plane: this engine's side of the KV data plane.
        others: as `CoreService`.
    """

    def __init__(self, engine: LLMEngine, engine_id: str, plane: KVPlane, lease_s: float = 60.0,
                 transfer_timeout: float = 30.0, max_lease_s: float = MAX_LEASE_S) -> None:
        super().__init__(engine, engine_id, plane.transports, lease_s, transfer_timeout, max_lease_s)
        self.engine: LLMEngine = engine
        self.model_name = str(engine.model_path)
        self.plane = plane
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._send_pool = ThreadPoolExecutor(8, thread_name_prefix="kv-send")

    async def _step(self) -> list[StepOutput]:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._step_pool, self.engine.step)

    async def _push(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> tuple[int, str]:
        seq = job.seq
        fut = asyncio.get_running_loop().run_in_executor(self._send_pool, lambda: self.plane.sender.send(
            kv, begin, end, lambda: seq.block_table, mode, job.wait_layer))
        try:
            stats = await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel("remote_send cancelled")
            await asyncio.wait([fut])
            raise
        return stats.nbytes, stats.transport

    def close(self) -> None:
        super().close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)
