"""`AsyncEngine`: the microserving calls on top of `LLMEngine`, for one asyncio loop.

The engine's step runs in a worker thread while the loop serves calls; `self._lock`
makes every touch of engine state (scheduler, KV books) exclusive with the step.
KV bytes move in other threads (`kvapi.transfer`) and only ever touch blocks that
are held for them: a receive ticket's reserved blocks, or a finished prefill-only
sequence's blocks on the sending side.

    D.prep_recv(req, end)          ─> Ticket: pinned prefix [0, matched) + reserved [matched, end)
    P.remote_send(req, kv, b, e)   ─> prefill-only Sequence prompt[:e]; its final step's layer hooks
                                       release the sender thread layer by layer ─> D's KVReceiver
    D.start_generate(req, begin)   ─> adopts the ticket's blocks, prefills the rest, decodes
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from kvapi.transfer import KVAddr, KVReceiver, KVSender, TransferError, TransferOutcome, choose_transport
from kvapi.transfer.sender import SendStats
from microserve.engine.core.engine_core import EngineCore, InvalidRequestError, StepOutput
from microserve.engine.core.sequence import Sequence
from microserve.engine.engine import LLMEngine
from microserve.protocol import GenerateChunk, RecvTicket, Request, SendResult, StatsReply
from microserve.sampling_params import SamplingParams
from microserve.serving.tickets import EngineError, SendJob, Ticket, TicketBook, adopt_ticket, check_send, norm_pos

log = logging.getLogger(__name__)


class MicroservingEngine:
    """Serve `prep_recv` / `remote_send` / `start_generate` / `abort` / `stats` for one engine,
    whatever moves the KV bytes and runs the step: `AsyncEngine` below (a model stepped in a
    thread, `kvapi.transfer`) or `microserve.sim.service.SimServer` (virtual time, a link model).

    Args:
        engine: the engine's books and step (`EngineCore`).
        engine_id: name used in tickets and errors.
        transports: what this engine offers/uses, fastest first.
        lease_s: default lease of a receive ticket.
        transfer_timeout: how long `start_generate` waits for an in-flight transfer.
    """

    send_job_class: type[SendJob] = SendJob

    def __init__(self, engine: EngineCore, engine_id: str, transports: list[str], lease_s: float = 60.0,
                 transfer_timeout: float = 30.0) -> None:
        self.engine, self.engine_id, self.transports = engine, engine_id, transports
        self.lease_s, self.transfer_timeout = lease_s, transfer_timeout
        self.tickets = TicketBook()
        self._sends: dict[str, SendJob] = {}
        self._streams: dict[str, asyncio.Queue[StepOutput]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._tasks: set[asyncio.Future] = set()

    # -- what a transport layer provides ------------------------------------------------
    async def _step(self) -> list[StepOutput]:
        """Run one engine step (under the lock)."""
        raise NotImplementedError

    def _recv_addr(self, ticket: Ticket) -> KVAddr:
        """Where senders write into `ticket`."""
        raise NotImplementedError

    def _open_receive(self, ticket: Ticket) -> None:
        """Accept KV into `ticket`; the outcome comes back through `_on_transfer`."""

    def _receiving(self, ticket_id: str) -> bool:
        """Whether a transfer is writing into the ticket right now."""
        return False

    def _revoke(self, ticket_id: str) -> bool:
        """Refuse further writes into the ticket; False while a transfer is still writing
        (it stops and reports through `_on_transfer`)."""
        return True

    def _transport_for(self, kv: KVAddr, forced: str | None) -> str:
        raise NotImplementedError

    async def _transfer(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> SendStats:
        """Send `[begin, end)` of `job`'s KV into `kv` as its layers are computed.
        Raises `TransferError`."""
        raise NotImplementedError

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes received) so far."""
        return 0, 0

    # -- the step loop ------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not self._closed:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                try:
                    outputs = await self._step()
                except Exception:  # NOTE: a bug in one step must not take the engine down silently
                    log.exception("engine step failed; aborting the running requests")
                    outputs = self._fail_all_running()
            for out in outputs:
                self._dispatch(out)
            await asyncio.sleep(0)

    def _fail_all_running(self) -> list[StepOutput]:
        outs = []
        for seq in list(self.engine.scheduler.running):
            self.engine.scheduler.finish(seq, "abort")
            outs.append(StepOutput(seq.request_id, [], "error"))
        return outs

    def _dispatch(self, out: StepOutput) -> None:
        job = self._sends.get(out.request_id)
        if job is not None:
            if out.finish_reason == "prefilled":
                job.prefilled()
            else:
                job.cancel(f"the sender's prefill ended with {out.finish_reason!r}")
            return
        queue = self._streams.get(out.request_id)
        if queue is not None:
            queue.put_nowait(out)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        for job in self._sends.values():
            job.cancel("engine shutting down")

    # -- prep_recv ----------------------------------------------------------------------
    async def prep_recv(self, req: Request, end: int, lease_s: float | None = None) -> RecvTicket:
        prompt = self._validated(req)
        end = norm_pos(end, len(prompt), "end")
        lease = self.lease_s if lease_s is None else lease_s
        if not 0 < lease <= 3600:
            raise EngineError("bad_request", f"lease_s must be in (0, 3600], got {lease}")
        seq = Sequence(req.request_id, prompt[:end], SamplingParams(max_tokens=1))
        async with self._lock:
            kv = self.engine.kv
            if end and kv.enable_prefix_caching:
                kv.match_prefix(seq, limit=end)
            if not kv.allocate(seq, end):
                kv.free(seq)
                raise EngineError("overloaded", f"not enough free KV blocks to receive {end} tokens")
        ticket = self.tickets.open(req.request_id, seq, self.engine.block_size)
        addr = self._recv_addr(ticket)
        if ticket.matched < end:
            self._open_receive(ticket)
        else:
            ticket.state = "complete"
            ticket.done.set()
        ticket.expiry = asyncio.get_running_loop().call_later(lease, self._expire, ticket.id)
        return RecvTicket(addr, ticket.matched)

    def _on_transfer_threadsafe(self, outcome: TransferOutcome) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._on_transfer(outcome)))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_transfer(self, outcome: TransferOutcome) -> None:
        ticket = self.tickets.get(outcome.ticket_id)
        if ticket is None:
            return
        async with self._lock:
            if outcome.ok and ticket.state == "open":
                ticket.seq.num_computed_tokens = outcome.end
                self.engine.kv.cache_computed(ticket.seq)  # received KV enters our prefix cache
                ticket.state, ticket.bytes = "complete", outcome.nbytes
            else:
                ticket.error = ticket.error or outcome.error or "transfer failed"
                self._drop_locked(ticket)
        ticket.done.set()

    def _expire(self, ticket_id: str) -> None:
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            return
        if ticket.state == "open" and self._receiving(ticket_id):  # in use: the lease holds
            ticket.expiry = asyncio.get_running_loop().call_later(1.0, self._expire, ticket_id)
            return
        self._spawn(self._close_ticket(ticket, "lease expired"))

    async def _close_ticket(self, ticket: Ticket, why: str) -> None:
        """Give back a ticket's blocks; a transfer writing into it is stopped first."""
        if ticket.state == "open" and not self._revoke(ticket.id):
            ticket.error = why  # the receiver thread stops and reports through _on_transfer
            return
        async with self._lock:
            ticket.error = ticket.error or why
            self._drop_locked(ticket)
        ticket.done.set()

    def _drop_locked(self, ticket: Ticket) -> None:
        if ticket.state in ("open", "complete"):
            if ticket.state == "open":
                ticket.seq.num_computed_tokens = ticket.matched  # partial pages are garbage
            self.engine.release(ticket.seq)
            ticket.state = "failed" if ticket.state == "open" else "closed"
        self.tickets.remove(ticket)

    # -- remote_send --------------------------------------------------------------------
    async def remote_send(self, req: Request, kv: KVAddr, begin: int, end: int,
                          transport: str | None = None) -> SendResult:
        prompt = self._validated(req)
        begin, end, mode = check_send(self.engine.kv_spec, kv, begin, end, len(prompt),
                                      lambda: self._transport_for(kv, transport))
        if begin >= end:
            return SendResult(0, 0.0, mode)
        job = self.send_job_class(f"{req.request_id}\x00send\x00{kv.ticket_id}", req.request_id, prompt[:end],
                                  self.engine.kv_spec.num_layers)
        if job.id in self._sends:
            raise EngineError("bad_request", f"ticket {kv.ticket_id} is already being sent")
        self._sends[job.id] = job
        try:
            return await self._run_send(job, kv, begin, end, mode)
        finally:
            self._sends.pop(job.id, None)

    async def _run_send(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> SendResult:
        seq = job.seq
        async with self._lock:
            if self.engine.kv.enable_prefix_caching:
                self.engine.kv.match_prefix(seq, limit=end)
            matched = seq.num_computed_tokens
            if seq.num_computed_tokens < end:
                self.engine.add_sequence(seq)
                job.scheduled = True
            else:
                job.prefilled()
        self._wake.set()
        t0 = asyncio.get_running_loop().time()
        try:
            stats = await self._transfer(job, kv, begin, end, mode)
        except TransferError as exc:
            job.cancel(str(exc))
            raise EngineError(exc.code, str(exc)) from exc
        finally:
            await self._finish_send(job)
        if job.cancel_reason:
            raise EngineError("aborted", job.cancel_reason)
        # NOTE: this send's own prefill, not the engine-wide counter (other requests run meanwhile)
        return SendResult(stats.nbytes, asyncio.get_running_loop().time() - t0, stats.transport, end - matched)

    async def _finish_send(self, job: SendJob) -> None:
        seq = job.seq
        async with self._lock:
            if not job.scheduled or seq.finish_reason == "prefilled":  # blocks held outside the scheduler
                self.engine.release(seq)
            elif not seq.is_finished:
                self.engine.abort(seq.request_id)

    # -- start_generate -----------------------------------------------------------------
    async def start_generate(self, req: Request, begin: int = 0,
                             sampling: SamplingParams | None = None) -> AsyncIterator[GenerateChunk]:
        prompt = self._validated(req)
        begin = norm_pos(begin, len(prompt), "begin")
        sampling = sampling or req.sampling
        try:
            sampling.validate()
        except ValueError as exc:
            raise EngineError("bad_request", str(exc)) from exc
        rid = req.request_id
        if rid in self._streams:
            raise EngineError("bad_request", f"request id {rid!r} is already generating on this engine")
        ticket = self.tickets.latest(rid)
        if ticket is not None and ticket.state == "open":
            try:
                await asyncio.wait_for(ticket.done.wait(), self.transfer_timeout)
            except TimeoutError:
                await self._close_ticket(ticket, "timed out waiting for the KV transfer")
                raise EngineError("timeout", f"KV for {rid!r} did not arrive within {self.transfer_timeout}s") \
                    from None
            if ticket.error == "aborted":  # aborted while we waited: do not start it anyway
                raise EngineError("aborted", f"request {rid!r} was aborted")
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._streams[rid] = queue
        try:
            async with self._lock:
                seq = None
                if ticket is not None and ticket.state == "complete":
                    seq = adopt_ticket(ticket, prompt, begin, sampling, self.engine.kv)
                    self.tickets.remove(ticket)
                    if ticket.expiry:
                        ticket.expiry.cancel()
                elif ticket is not None:
                    log.warning("request %s: KV transfer failed (%s); computing the prompt here", rid, ticket.error)
                try:
                    if seq is not None:
                        self.engine.add_sequence(seq)
                    else:
                        self.engine.add_request(rid, prompt, sampling)
                except InvalidRequestError as exc:
                    if seq is not None:
                        self.engine.release(seq)
                    raise EngineError("bad_request", str(exc)) from exc
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._wake.set()
        return self._stream(rid, queue)

    async def _stream(self, rid: str, queue: asyncio.Queue[StepOutput]) -> AsyncIterator[GenerateChunk]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                tokens, reason, cached = list(out.new_token_ids), out.finish_reason, out.num_cached_tokens
                while reason is None and not queue.empty():  # coalesce what piled up
                    more = queue.get_nowait()
                    tokens += more.new_token_ids
                    reason, cached = more.finish_reason, more.num_cached_tokens
                finished = reason is not None
                if reason == "error":
                    raise EngineError("internal", "the engine failed while running this request")
                yield GenerateChunk(tokens, reason, cached)
        finally:
            self._streams.pop(rid, None)
            if not finished:
                await self.abort(rid)

    # -- abort / stats ------------------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        found = False
        for job in [j for j in self._sends.values() if j.request_id == request_id]:
            job.cancel("aborted")
            found = True
        for ticket in self.tickets.of_request(request_id):
            await self._close_ticket(ticket, "aborted")
            found = True
        async with self._lock:
            if self.engine.abort(request_id):
                found = True
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(StepOutput(request_id, [], "abort"))
            found = True
        return found

    async def cached_prefix_hashes(self, before=None) -> list[int]:
        """Every prefix hash in the prefix cache, read between steps; `before()` runs first under
        the same lock (the server publishes pending KV events there, so the snapshot and the
        event sequence number agree)."""
        async with self._lock:
            if before is not None:
                before()
            return self.engine.kv.radix.prefix_hashes()

    def stats(self) -> StatsReply:
        s = self.engine.stats()
        return StatsReply(self.engine_id, s.running, s.waiting, s.queued_tokens, s.kv_blocks_total, s.kv_blocks_used,
                          s.kv_blocks_cached, s.prefix_cache_hit_tokens, s.computed_tokens_total, s.num_preemptions,
                          len(self.tickets), len(self._sends), *self.kv_bytes())

    def _validated(self, req: Request) -> list[int]:
        try:
            self.engine.validate_prompt(req.prompt_ids)
        except InvalidRequestError as exc:
            raise EngineError("bad_request", str(exc)) from exc
        return req.prompt_ids


class AsyncEngine(MicroservingEngine):
    """The microserving calls of a real engine: the step runs in a worker thread and KV
    bytes move through `kvapi.transfer` (`receiver` accepts them into this engine's pool).

    Args:
        engine: the model engine (its KV pool must be `receiver.pool`).
        receiver: accepts KV into this engine's pool.
        host_id: this machine's identity (shm only between engines with the same one).
        others: as `MicroservingEngine`.
    """

    def __init__(self, engine: LLMEngine, engine_id: str, receiver: KVReceiver, transports: list[str],
                 host_id: str = "", lease_s: float = 60.0, transfer_timeout: float = 30.0) -> None:
        super().__init__(engine, engine_id, transports, lease_s, transfer_timeout)
        self.engine: LLMEngine = engine
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

    def _open_receive(self, ticket: Ticket) -> None:
        self.receiver.open_ticket(ticket.id, ticket.secret, ticket.blocks, self._on_transfer_threadsafe)

    def _receiving(self, ticket_id: str) -> bool:
        return self.receiver.is_active(ticket_id)

    def _revoke(self, ticket_id: str) -> bool:
        return self.receiver.revoke(ticket_id)

    def _transport_for(self, kv: KVAddr, forced: str | None) -> str:
        return choose_transport(self.transports, kv, forced)

    async def _transfer(self, job: SendJob, kv: KVAddr, begin: int, end: int, mode: str) -> SendStats:
        seq = job.seq
        fut = asyncio.get_running_loop().run_in_executor(self._send_pool, lambda: self.sender.send(
            kv, begin, end, lambda: seq.block_table, mode, job.wait_layer))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel("remote_send cancelled")
            await asyncio.wait([fut])
            raise

    def kv_bytes(self) -> tuple[int, int]:
        return self.sender.bytes_sent, self.receiver.bytes_received

    def close(self) -> None:
        super().close()
        self.receiver.close()
        self._send_pool.shutdown(wait=False, cancel_futures=True)
