"""`VLLMTransfers`: the receiving and sending half of `VLLMBackend` (serving/vllm/engine.py).

    reserve      a vLLM request that waits for remote KV (`recv` key in its kv_transfer_params); the
                 connector reports the blocks vLLM allocated for it (`on_alloc`) ─> the ticket's blocks
    received     all pages in: the connector lets vLLM schedule the request (`recv_done`)
    send         a vLLM request of `prompt[:end]`, `max_tokens=1`; when its prefill finished, the
                 connector hands its blocks to a sending thread, which pushes `[begin, end)`
    lend / attend    refused: vLLM binds a request's KV to the engine that runs it

A mixin: it uses the backend's vLLM plumbing (`_add`, `_abort_vllm`, `step`, `bridge`, `plane`,
`_pending`, `_prompt_lens`, `_keys`, `_send_outs`, `_send_pool`, `transfer_timeout`, `_computed`).
"""

from __future__ import annotations

import asyncio
import time

from kvapi.spec import KVSpecMismatch
from kvapi.transfer import KVAddr, TransferError
from microserve import protocol
from microserve.engine.core.engine_core import StepOutput
from microserve.engine.core.sequence import Finish
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.tickets import Ticket


class VLLMTransfers:
    """`Receiving` and `Sending` of the backend contract on a vLLM engine."""

    # -- receiving -----------------------------------------------------------------------------
    async def reserve(self, req: protocol.Request, prompt: list[int], end: int) -> Ticket:
        from microserve.serving.vllm.connector import Recv

        end = min(end, len(prompt) - 1)  # vLLM computes at least the last prompt token itself
        rid = req.request_id
        if rid in self._pending or self.service.streaming(rid):
            raise EngineError(ErrorCode.BAD_REQUEST, f"request id {rid!r} is already on this engine")
        loop = asyncio.get_running_loop()
        alloc: asyncio.Future[tuple[int, list[int]]] = loop.create_future()

        def on_alloc(vllm_id: str, matched: int, blocks: list[int]) -> None:  # vLLM's step thread
            loop.call_soon_threadsafe(lambda: alloc.done() or alloc.set_result((matched, blocks)))

        key = f"{rid}\x00{time.monotonic_ns()}"
        ticket = self.service.tickets.open(rid, 0, end, [], key)
        self.bridge.recvs[key] = Recv(end, on_alloc, revoke=lambda: self.plane.receiver.revoke(ticket.id))
        self._pending[rid] = asyncio.Queue()
        self._prompt_lens[rid] = len(prompt)
        try:
            await self._add(rid, prompt, req.sampling, {"recv": key})
            self.service.wake()
            async with asyncio.timeout(self.transfer_timeout):  # NOTE: not wait_for (router/attempts.py)
                ticket.matched, blocks = await alloc
        except BaseException as exc:
            await self.service.leases.close(ticket, "could not reserve KV blocks")
            if isinstance(exc, TimeoutError):
                raise EngineError(ErrorCode.OVERLOADED, f"vLLM did not reserve KV blocks for {end} tokens within "
                                  f"{self.transfer_timeout}s") from None
            raise
        bs = self.kv_spec.block_size
        ticket.blocks = blocks[ticket.matched // bs: -(-end // bs)]
        return ticket

    def open_receive(self, ticket: Ticket, addr: KVAddr) -> None:
        self.bridge.recvs[ticket.hold].writing = True
        self._keys[ticket.id] = ticket.hold
        super().open_receive(ticket, addr)

    def revoke(self, ticket_id: str) -> bool:
        # NOTE: a writer still in flight keeps its blocks in vLLM (the connector marks the
        # receive aborted) until it stopped and reported: `_orphan_transfer` frees them then
        self.plane.receiver.revoke(ticket_id)
        return True

    async def received(self, ticket: Ticket, outcome, complete: bool) -> None:
        self._keys.pop(ticket.id, None)  # its writer reported
        if complete:
            self.bridge.recv_done(ticket.hold)  # vLLM schedules the request with the received pages
            self.service.wake()

    def orphan_transfer(self, outcome) -> None:
        key = self._keys.pop(outcome.ticket_id, None)
        recv = self.bridge.recvs.get(key) if key else None
        if recv is not None and recv.aborted:
            self.bridge.recv_done(key)  # vLLM kept the blocks for the writer, which stopped: free them
            self.service.wake()

    async def release_ticket(self, ticket: Ticket) -> None:
        """Give a ticket's blocks back to vLLM: its request is aborted there.

        NOTE: never report a failed receive as done: vLLM would cache the garbage pages as
        this prompt's prefix. Aborting the request frees them; start_generate recomputes."""
        recv = self.bridge.recvs.get(ticket.hold)
        if recv is not None and ticket.id not in self._keys:  # its writer reported: nothing writes
            with self.bridge.lock:
                recv.writing = False
        self.plane.receiver.revoke(ticket.id)
        await self._abort_vllm(ticket.request_id)
        for out in await self.step():  # vLLM frees them in its next step: take it now
            self.service.deliver(out)
        self._pending.pop(ticket.request_id, None)
        self._prompt_lens.pop(ticket.request_id, None)

    async def lend_blocks(self, req: protocol.Request, begin: int, end: int) -> Ticket:
        raise EngineError(ErrorCode.BAD_REQUEST, "lend: the vLLM backend does not lend KV blocks (vLLM binds a "
                          "request's KV to the engine that runs it); lend from built-in engines")

    def attend_range(self, groups: list[tuple[list[Ticket] | None, int]], layer: int, positions: list[int],
                     q: bytes, scale: float) -> tuple[bytes, bytes]:
        raise EngineError(ErrorCode.BAD_REQUEST, "attend: the vLLM backend does not lend KV blocks")

    # -- sending ---------------------------------------------------------------------------------
    async def send(self, job_id: str, request_id: str, prompt: list[int], kv: KVAddr, begin: int, end: int,
                   mode: str, lora: str | None = None) -> tuple[int, str, int]:
        from microserve.serving.vllm.connector import Send

        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        bridge = self.bridge

        def start(blocks: list[int]) -> None:  # vLLM's step thread, when the prefill finished
            vllm_id = send.request_id

            def push() -> None:
                try:
                    result: object = self.plane.sender.send(kv, begin, end, lambda: blocks, mode)
                except (TransferError, KVSpecMismatch) as exc:
                    result = exc
                finally:
                    bridge.send_done(vllm_id)
                    loop.call_soon_threadsafe(self.service.wake)
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

            self._send_pool.submit(push)

        send = Send(start)
        key = f"{job_id}\x00{time.monotonic_ns()}"
        bridge.sends[key] = send
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._send_outs[job_id] = queue
        try:
            await self._add(job_id, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True,
                                                           lora=lora), {"send": key})
            self.service.wake()
            cached = 0
            while True:
                out = await queue.get()
                cached = out.num_cached_tokens or cached
                if out.finish_reason is not None:
                    break
            if key in bridge.sends:  # finished without a prefill to send (aborted)
                bridge.sends.pop(key, None)
                raise EngineError(ErrorCode.ABORTED, f"the send {job_id.split(chr(0))[0]!r} was aborted")
            result = await done
        except asyncio.CancelledError:
            bridge.sends.pop(key, None)
            await self._abort_vllm(job_id)
            raise
        finally:
            self._send_outs.pop(job_id, None)
        if isinstance(result, TransferError):
            raise result
        if isinstance(result, KVSpecMismatch):
            raise EngineError(ErrorCode.KV_SPEC_MISMATCH, str(result))
        if isinstance(result, Exception):
            raise result
        self._computed += end - cached
        return result.nbytes, result.transport, end - cached

    async def abort_send(self, job_id: str) -> None:
        queue = self._send_outs.get(job_id)
        if queue is not None:
            await self._abort_vllm(job_id)
            queue.put_nowait(StepOutput(job_id, [], Finish.ABORT))  # vLLM sends no output for an abort
