"""`BuiltinBackend`: our own PyTorch engine (`LLMEngine`) under the call layer, KV through `kvapi.transfer`.

The engine's step runs in a worker thread while the loop serves calls; `service.lock` makes
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
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from kvapi.transfer import KVAddr, TransferError
from kvapi.transfer.base import check_addr
from microserve import protocol
from microserve.engine.core.engine_core import EngineStats, StepOutput
from microserve.engine.core.sequence import LentRange
from microserve.engine.engine import LLMEngine
from microserve.engine.model.dist_attention import merge_parts, range_attention, seen_whole
from microserve.engine.model.lora import LoraError
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.core import CoreBackend
from microserve.serving.kv_plane import KVPlane, PlaneTransfers
from microserve.serving.lenders import LenderChannel, RemoteLender, raw
from microserve.serving.tickets import SendJob, Ticket


class BuiltinBackend(PlaneTransfers, CoreBackend):
    """A real engine: the step runs in a worker thread and KV bytes move through
    `kvapi.transfer` (`plane` accepts and sends them for this engine's pool).

    Args:
        engine: the model engine (its KV pool must be `plane`'s pool).
        engine_id: names its tickets, events and errors.
        plane: this engine's side of the KV data plane.
    """

    def __init__(self, engine: LLMEngine, engine_id: str, plane: KVPlane) -> None:
        super().__init__(engine, engine_id, plane.transports)
        self.engine: LLMEngine = engine
        self.model_name = str(engine.model_path)
        self.plane = plane
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._send_pool = ThreadPoolExecutor(8, thread_name_prefix="kv-send")
        self._lenders: dict[str, LenderChannel] = {}  # DistAttention: the step thread's socket to each lender

    async def step(self) -> list[StepOutput]:
        return await asyncio.get_running_loop().run_in_executor(self._step_pool, self.engine.step)

    async def load_lora(self, name: str, path: str) -> list[str]:
        engine = self.engine
        try:
            # NOTE: the file reads run off the loop
            adapter = await asyncio.get_running_loop().run_in_executor(None, engine.read_lora, name, path)
            async with self.service.lock:
                engine.lora_slots().add(adapter)  # NOTE: a slot is filled when a request needs it, if none is free now
        except LoraError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return sorted(engine.lora.adapters)

    async def unload_lora(self, name: str) -> list[str]:
        try:
            async with self.service.lock:
                self.engine.unload_lora(name)
        except LoraError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return sorted(self.engine.lora.adapters)

    async def push(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> tuple[int, str]:
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

    def attend_range(self, groups: list[tuple[list[Ticket] | None, int]], layer: int, positions: list[int],
                     q: bytes, scale: float) -> tuple[bytes, bytes]:
        cache = self.engine.runner.kv_cache[layer]
        d, hkv = cache.shape[-1], cache.shape[-2]
        row = hkv * d * cache.element_size()
        if not positions or len(q) % (len(positions) * row) or any(p < 0 for p in positions):
            raise EngineError(ErrorCode.BAD_REQUEST, f"attend: q is not [{len(positions)} rows, a multiple of {hkv} "
                              f"heads, {d}] in {cache.dtype} (got {len(q)} bytes)")
        with torch.inference_mode():
            qt = torch.frombuffer(bytearray(q), dtype=cache.dtype).view(len(positions), -1, d).to(cache.device)
            parts, first = [], 0
            for tickets, n in groups:
                qg, pg = qt[first:first + n], positions[first:first + n]
                first += n
                if tickets is None:  # a request that failed its checks: a part that merges as nothing
                    parts.append((qg.new_zeros(qg.shape), qg.new_full(qg.shape[:2], -math.inf, dtype=torch.float32)))
                    continue
                runs = [(t.matched, t.end, torch.tensor(t.blocks, device=cache.device))
                        for t in sorted(tickets, key=lambda t: t.matched)]
                part = seen_whole(self.engine.runner.native_decode, qg, min(pg), cache, runs, scale)
                if part is None:  # NOTE: rows inside a range (a prefill chunk): causal, per range
                    pos = torch.tensor(pg, device=cache.device)
                    part = merge_parts([range_attention(qg, pos, cache, blocks, begin, end, scale)
                                        for begin, end, blocks in runs])
                parts.append(part)
            if len(parts) == 1:
                return raw(parts[0][0]), raw(parts[0][1])
            return raw(torch.cat([p[0] for p in parts])), raw(torch.cat([p[1] for p in parts]))

    def engine_stats(self) -> EngineStats:
        stats = self.engine.stats()
        stats.remote_attends = sum(c.calls for c in self._lenders.values())
        stats.remote_attend_seconds = sum(c.seconds for c in self._lenders.values())
        return stats

    def borrow(self, req: protocol.Request, lenders: list[protocol.LendTicket]) -> list[LentRange]:
        ranges = []
        for ticket in sorted(lenders, key=lambda t: t.kv.begin):
            if not ticket.rpc:
                raise EngineError(ErrorCode.BAD_REQUEST, f"lender {ticket.kv.engine_id}: its LendTicket names no rpc "
                                  "address (pass the ticket EngineHandle.lend returned)")
            try:
                check_addr(ticket.kv, self.service.kv_sign_key)
            except TransferError as exc:
                raise EngineError(ErrorCode.of(exc.code), f"lender {ticket.kv.engine_id}: {exc}") from exc
            address = ticket.attend or ticket.rpc  # NOTE: its attend socket (serving/attend_server.py), else its RPC
            channel = self._lenders.get(address)
            if channel is None:
                channel = self._lenders[address] = LenderChannel(address, self.service.peer_key)
            peer = RemoteLender(ticket, self.plane, channel, self.service.transfer_timeout)
            ranges.append(LentRange(ticket.kv.begin, ticket.kv.end, peer))
        return ranges

    def close(self) -> None:
        super().close()
        for channel in self._lenders.values():  # NOTE: on the step thread, their one user, after its step
            self._step_pool.submit(channel.close)
        self.plane.close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)


