"""`EngineService`: everything of the calls that does not depend on the backend, once.

    prep_recv      checks ─> _reserve (hook) ─> Ticket ─> _recv_addr / _open_receive (hooks) ─> lease timer
    remote_send    checks ─> _send (hook: prefill [0, end) here, push [begin, end) to the ticket) ─> SendResult
    start_generate checks ─> wait for the ticket's KV ─> _submit (hook) ─> stream (abort on early exit)
    abort          sends (_abort_send), tickets (_release_ticket), the request (_abort_request), its stream
    stats / health / kv_snapshot   assembled here from `_engine_stats` / `_cached_hashes` (hooks)

A backend (`BuiltinService`, `SimService`, `VLLMService`) implements the hooks and its step
(`_has_work`, `_step`). Every hook runs on the service's asyncio loop; `self._lock` makes a
backend's touches of engine state exclusive with its step where the step runs elsewhere.
Outputs of a step reach their request as `StepOutput`s through `_deliver` (and the engine's
stream interval, serving/streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kvapi.spec import KVSpec
from kvapi.transfer import KVAddr, TransferError
from kvapi.transfer.base import sign_addr
from microserve import protocol as P
from microserve.engine.core.engine_core import EngineStats, StepOutput
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.events import KVEventLog
from microserve.serving.streams import StreamHold, StreamQueue
from microserve.serving.tickets import Aborted, Ticket, TicketBook, check_send, norm_pos, wait_for_kv
from microserve.text import InvalidRequestError, check_prompt

log = logging.getLogger(__name__)

MAX_LEASE_S = 120.0  # default cap of a ticket's lease (`--max-lease-seconds`)


class EngineService:
    """The calls of one engine (`serving.api.EngineAPI`) over a backend's hooks.

    Args:
        engine_id: name used in tickets, events and errors.
        transports: what this engine offers and uses for KV, fastest first.
        lease_s: default lease of a receive ticket.
        transfer_timeout: how long `start_generate` waits for KV in flight into its ticket.
        max_lease_s: the longest lease `prep_recv` grants (longer asks are refused).
    """

    model_name: str = ""
    kv_spec: KVSpec
    max_model_len: int
    vocab_size: int
    idle_poll_s: float | None = None  # step again after this long when a busy step produced nothing

    def __init__(self, engine_id: str, transports: list[str], lease_s: float = 60.0,
                 transfer_timeout: float = 30.0, max_lease_s: float = MAX_LEASE_S) -> None:
        if not 0 < lease_s <= max_lease_s:
            raise ValueError(f"the default lease ({lease_s:g}s) must be in (0, max lease {max_lease_s:g}s]")
        self.engine_id, self.transports = engine_id, list(transports)
        self.lease_s, self.transfer_timeout, self.max_lease_s = lease_s, transfer_timeout, max_lease_s
        self.kv_sign_key: bytes | None = None  # the cluster's KV key: every KVAddr handed out is signed
        self.tickets = TicketBook()
        self.events_addr = ""  # where KV events are published (the transport sets it)
        self.events = KVEventLog(engine_id)  # its `sink` is set by the transport
        self._sends: dict[str, str] = {}  # send job id -> request id
        self._streams: dict[str, StreamQueue] = {}
        self.hold = StreamHold()  # the engine's stream interval (EngineConfig.stream_interval)
        self._lock, self._wake = asyncio.Lock(), asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._tasks: set[asyncio.Future] = set()
        self.aborted = Aborted()  # request ids aborted lately: their calls still in flight end

    # -- hooks of a backend ----------------------------------------------------------------
    def _has_work(self) -> bool:
        raise NotImplementedError

    async def _step(self) -> list[StepOutput]:
        """Run one engine step."""
        raise NotImplementedError

    def _fail_running(self) -> list[StepOutput]:
        """A step raised: end what runs (default: nothing to end)."""
        return []

    async def _reserve(self, req: P.Request, prompt: list[int], end: int) -> Ticket:
        """Hold blocks for `prompt[:end]` and open a ticket in `self.tickets` (raises OVERLOADED)."""
        raise NotImplementedError

    def _recv_addr(self, ticket: Ticket) -> KVAddr:
        """Where senders write into `ticket`."""
        raise NotImplementedError

    def _open_receive(self, ticket: Ticket, addr: KVAddr) -> None:
        """Accept KV into `ticket`; the outcome comes back through `_on_transfer`."""

    def _receiving(self, ticket_id: str) -> bool:
        """Whether a transfer is writing into the ticket right now."""
        return False

    def _revoke(self, ticket_id: str) -> bool:
        """Refuse further writes into the ticket; False while a transfer still writes (it
        stops and reports through `_on_transfer`, which releases the ticket)."""
        return True

    async def _received(self, ticket: Ticket, outcome: Any) -> None:
        """All of the ticket's KV arrived."""

    async def _release_ticket(self, ticket: Ticket) -> None:
        """Give back the blocks of a ticket that is not adopted (state still "open" if its KV
        never arrived completely)."""

    def _orphan_transfer(self, outcome: Any) -> None:
        """A transfer reported into a ticket that is gone."""

    def _transport_for(self, kv: KVAddr, forced: str | None) -> str:
        raise NotImplementedError

    async def _send(self, job_id: str, prompt: list[int], kv: KVAddr, begin: int, end: int,
                    mode: str) -> tuple[int, str, int]:
        """Prefill `prompt` (= the request's `prompt[:end]`) here and write `[begin, end)` into
        `kv`. Returns (bytes, transport, tokens prefilled). Raises TransferError / EngineError."""
        raise NotImplementedError

    async def _abort_send(self, job_id: str) -> None:
        """Stop a send in flight (its `_send` then raises)."""

    async def _submit(self, req: P.Request, prompt: list[int], begin: int, sampling: SamplingParams,
                      ticket: Ticket | None) -> None:
        """Start generating `req` (using `ticket`'s KV when it is complete); outputs go to `_deliver`."""
        raise NotImplementedError

    def _check_adoption(self, req: P.Request, sampling: SamplingParams) -> None:
        """Refuse (EngineError) to start `req` with `sampling` on the KV of its ticket."""

    async def _abort_request(self, request_id: str) -> bool:
        """Cancel the request in the engine; whether it was there."""
        return False

    def _engine_stats(self) -> EngineStats:
        raise NotImplementedError

    def _cached_hashes(self) -> list[int]:
        return []

    def kv_bytes(self) -> tuple[int, int]:
        """(bytes sent, bytes received) so far."""
        return 0, 0

    def _store_stats(self) -> list[P.StoreTierStats]:
        return []

    def _check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.vocab_size, self.max_model_len)

    def use_kv_key(self, key: bytes) -> None:
        """Sign every KVAddr with the cluster's KV key, and (backends that send) refuse unsigned ones."""
        self.kv_sign_key = key

    # -- the step loop -------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.events.bind(self._loop)
        while not self._closed:
            if not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:  # NOTE: calls change engine state only between steps
                try:
                    outputs = await self._step()
                except Exception:  # NOTE: a bug in one step must not take the engine down silently
                    log.exception("engine step failed; aborting the running requests")
                    outputs = self._fail_running()
            for out in outputs:
                self._deliver(out)
            if not outputs and self.idle_poll_s is not None:  # waiting on KV pages or pushes
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
            else:
                await asyncio.sleep(0)

    def _deliver(self, out: StepOutput) -> None:
        queue = self._streams.get(out.request_id)
        if queue is not None and (out := self.hold.take(out)) is not None:
            queue.put_nowait(out)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _on_kv_event(self, kind: str, hashes: list[int]) -> None:  # any thread: the engine's hook
        self.events.record(kind, hashes)

    # -- prep_recv ---------------------------------------------------------------------------------
    async def prep_recv(self, req: P.Request, end: int, lease_s: float | None = None) -> P.RecvTicket:
        prompt = self._validated(req)
        end = norm_pos(end, len(prompt), "end")
        lease = self.lease_s if lease_s is None else lease_s
        if not 0 < lease <= self.max_lease_s:
            raise EngineError(ErrorCode.BAD_REQUEST, f"lease_s must be in (0, {self.max_lease_s:g}] "
                              f"(this engine's --max-lease-seconds), got {lease}")
        ticket = await self._reserve(req, prompt, end)
        if self.aborted.recent(req.request_id):  # aborted while we reserved: give the blocks back now
            await self._drop(ticket)
            self.aborted.check(req.request_id)
        ticket.expires_at = time.time() + lease
        addr = msgspec.structs.replace(self._recv_addr(ticket), expiry=ticket.expires_at)
        if self.kv_sign_key is not None:
            addr = sign_addr(addr, self.kv_sign_key)
        if ticket.matched < ticket.end:
            self._open_receive(ticket, addr)
        else:
            ticket.complete()
        ticket.expiry = asyncio.get_running_loop().call_later(lease, self._expire, ticket.id)
        return P.RecvTicket(addr, ticket.matched)

    def _on_transfer_threadsafe(self, outcome: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._on_transfer(outcome)))

    async def _on_transfer(self, outcome: Any) -> None:
        """A transfer into one of our tickets ended (a `kvapi.transfer.TransferOutcome`)."""
        ticket = self.tickets.get(outcome.ticket_id)
        if ticket is None:
            self._orphan_transfer(outcome)
            return
        if outcome.ok and ticket.state == "open":
            await self._received(ticket, outcome)
            ticket.complete(outcome.nbytes)
            return
        ticket.error = ticket.error or outcome.error or "transfer failed"
        await self._drop(ticket)

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
            ticket.error = why  # the writer stops and reports through _on_transfer
            return
        ticket.error = ticket.error or why
        await self._drop(ticket)

    async def _drop(self, ticket: Ticket) -> None:
        self.tickets.remove(ticket)
        if ticket.state in ("open", "complete"):
            await self._release_ticket(ticket)
            ticket.state = "failed" if ticket.state == "open" else "closed"
        ticket.done.set()

    # -- remote_send -------------------------------------------------------------------------------
    async def remote_send(self, req: P.Request, kv: KVAddr, begin: int, end: int,
                          transport: str | None = None) -> P.SendResult:
        prompt = self._validated(req)
        begin, end, mode = check_send(self.kv_spec, kv, begin, end, len(prompt),
                                      lambda: self._transport_for(kv, transport))
        if begin >= end:
            return P.SendResult(0, 0.0, mode)
        self.aborted.check(req.request_id)
        job_id = f"{req.request_id}\x00send\x00{kv.ticket_id}"
        if job_id in self._sends:
            raise EngineError(ErrorCode.BAD_REQUEST, f"ticket {kv.ticket_id} is already being sent")
        self._sends[job_id] = req.request_id
        t0 = asyncio.get_running_loop().time()
        try:
            nbytes, used, computed = await self._send(job_id, prompt[:end], kv, begin, end, mode)
        except TransferError as exc:
            raise EngineError(exc.code, str(exc), exc.peer) from exc
        finally:
            self._sends.pop(job_id, None)
        # NOTE: this send's own prefill, not the engine-wide counter (other requests run meanwhile)
        return P.SendResult(nbytes, asyncio.get_running_loop().time() - t0, used, computed)

    # -- start_generate ----------------------------------------------------------------------------
    async def start_generate(self, req: P.Request, begin: int = 0,
                             sampling: SamplingParams | None = None) -> AsyncIterator[P.GenerateChunk]:
        prompt = self._validated(req)
        begin = norm_pos(begin, len(prompt), "begin")
        sampling = sampling or req.sampling
        try:
            sampling.validate()
        except ValueError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        if sampling.n != 1 or sampling.best_of is not None:
            raise EngineError(ErrorCode.BAD_REQUEST, "an engine generates one choice per request: the router "
                              "fans n / best_of out into n requests")
        rid = req.request_id
        if rid in self._streams:
            raise EngineError(ErrorCode.BAD_REQUEST, f"request id {rid!r} is already generating on this engine")
        ticket = self.tickets.latest(rid)
        if ticket is not None:
            self._check_adoption(req, sampling)
            await wait_for_kv(ticket, self.transfer_timeout, self._close_ticket)
        self.aborted.check(rid)  # NOTE: also when it was aborted while we waited for its KV
        if ticket is not None and ticket.state == "complete":
            self.tickets.remove(ticket)  # the backend adopts its blocks in _submit
        queue = self._streams[rid] = StreamQueue()
        try:
            await self._submit(req, prompt, begin, sampling, ticket)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._wake.set()
        return self._stream(rid, queue)

    async def _stream(self, rid: str, queue: StreamQueue) -> AsyncIterator[P.GenerateChunk]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                tokens, reason, cached = list(out.new_token_ids), out.finish_reason, out.num_cached_tokens
                logprobs = [P.TokenLogprob(lp, top) for lp, top in out.logprobs or ()]
                prompt_lps = out.prompt_logprobs
                while reason is None and not queue.empty():  # coalesce what piled up
                    more = queue.get_nowait()
                    tokens += more.new_token_ids
                    logprobs += [P.TokenLogprob(lp, top) for lp, top in more.logprobs or ()]
                    prompt_lps = prompt_lps or more.prompt_logprobs
                    reason, cached = more.finish_reason, more.num_cached_tokens or cached
                finished = reason is not None
                if reason == "error":
                    raise EngineError(ErrorCode.INTERNAL, "the engine failed while running this request")
                if tokens or finished:
                    yield P.GenerateChunk(tokens, reason, cached, logprobs or None, None if prompt_lps is None
                                          else [P.TokenLogprob(lp, top) for lp, top in prompt_lps])
        finally:
            self._streams.pop(rid, None)
            self.hold.drop(rid)
            if not finished:
                await self.abort(rid)

    # -- abort / stats / health / kv_snapshot ---------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        self.aborted.add(request_id)
        found = False
        for job_id in [j for j, r in self._sends.items() if r == request_id]:
            await self._abort_send(job_id)
            found = True
        for ticket in self.tickets.of_request(request_id):
            await self._close_ticket(ticket, "aborted")
            found = True
        found = await self._abort_request(request_id) or found
        if (queue := self._streams.get(request_id)) is not None:
            queue.put_nowait(StepOutput(request_id, [], "abort"))
        return found or queue is not None

    def stats(self) -> P.StatsReply:
        s = self._engine_stats()
        sent, received = self.kv_bytes()
        return P.StatsReply(
            engine_id=self.engine_id, running=s.running, waiting=s.waiting, queued_tokens=s.queued_tokens,
            kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used, kv_blocks_cached=s.kv_blocks_cached,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, computed_tokens_total=s.computed_tokens_total,
            num_preemptions=s.num_preemptions, open_tickets=len(self.tickets), active_sends=len(self._sends),
            kv_bytes_sent=sent, kv_bytes_received=received, kernels=s.kernels, kv_store=self._store_stats())

    def health(self) -> P.HealthReply:
        return P.HealthReply(True, self.engine_id, self.model_name, self.kv_spec, list(self.transports),
                             self.events_addr, self.max_model_len)

    async def kv_snapshot(self) -> P.KVSnapshotReply:
        async with self._lock:  # between steps: the snapshot and the event number agree
            self.events.flush()
            hashes = self._cached_hashes()
        return P.KVSnapshotReply(self.engine_id, hashes, self.events.seq)

    def _validated(self, req: P.Request) -> list[int]:
        try:
            self._check_prompt(req.prompt_ids)
        except InvalidRequestError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        return req.prompt_ids
