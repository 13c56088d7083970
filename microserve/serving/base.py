"""`EngineService`: every call of an engine, once, over the `Backend` it holds (serving/backend.py).

    prep_recv      checks ─> backend.reserve ─> Ticket ─> leases.issue (recv_addr, open_receive, lease timer)
    remote_send    checks ─> backend.send (prefill [0, end) there, push [begin, end) to the ticket) ─> SendResult
    start_generate checks ─> wait for the ticket's KV ─> backend.submit ─> stream (abort on early exit)
    abort          sends (abort_send), tickets (release_ticket), the request (abort_request), its stream
    stats / health / kv_snapshot   assembled from the backend's books (serving/replies.py)
    lora           backend.load_lora / unload_lora

The one class with the calls; a backend (`BuiltinBackend`, `SimBackend`, `VLLMBackend`) implements
the abstract `Backend`, never a call. All on the service's loop; `self.lock` keeps a backend's touches
of engine state apart from its step. Step outputs reach streams by `deliver` (serving/streams.py).
One cohesive unit a little over 300 lines: every call of an engine and its checks, read in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from kvapi.spec import KVSpec
from kvapi.transfer import KVAddr, TransferError
from microserve import protocol, tracing
from microserve.engine.core.engine_core import StepOutput
from microserve.engine.core.sequence import Finish
from microserve.sampling_params import SamplingParams
from microserve.serving import replies, streams
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.attend_server import answer_attend
from microserve.serving.backend import Backend
from microserve.serving.events import KVEventLog
from microserve.serving.leases import TicketLeases
from microserve.serving.streams import StreamHold, StreamQueue
from microserve.serving.tickets import (
    Aborted,
    TicketBook,
    TicketState,
    attend_ids,
    check_send,
    lent_arrivals,
    model_identity,
    norm_pos,
    wait_for_kv,
)
from microserve.text import InvalidRequestError

log = logging.getLogger(__name__)

MAX_LEASE_S = 120.0  # default cap of a ticket's lease (`--max-lease-seconds`)
CLOSED = "the engine is shutting down"


class EngineService:
    """The calls of one engine (`serving.api.EngineAPI`) over its `backend`.

    Args:
        backend: the engine (its `engine_id` names tickets, events and errors).
        lease_s: default lease of a receive ticket.
        transfer_timeout: how long `start_generate` waits for KV in flight into its ticket.
        max_lease_s: the longest lease `prep_recv` grants (longer asks are refused).
    """

    def __init__(self, backend: Backend, lease_s: float = 60.0, transfer_timeout: float = 30.0,
                 max_lease_s: float = MAX_LEASE_S) -> None:
        if not 0 < lease_s <= max_lease_s:
            raise ValueError(f"the default lease ({lease_s:g}s) must be in (0, max lease {max_lease_s:g}s]")
        self.backend = backend
        self.engine_id, self.model_name = backend.engine_id, backend.model_name
        self.model_id = model_identity(backend.model_name)  # named in every KVAddr; sends check it
        self.lease_s, self.transfer_timeout, self.max_lease_s = lease_s, transfer_timeout, max_lease_s
        self.kv_sign_key: bytes | None = None  # the cluster's KV key: every KVAddr handed out is signed
        self.peer_key: Any = None  # the ClusterKey this engine calls other engines with (a borrower its lenders)
        self.tickets = TicketBook()
        self.leases = TicketLeases(self)  # tickets' addresses, leases and transfers (serving/leases.py)
        self.events_addr = ""  # where KV events are published (the transport sets it)
        self.attends_served = 0  # DistAttention: attend messages answered as a lender
        self.busy_seconds = 0.0  # time spent in steps, on the loop's clock (stats().busy_seconds)
        self.kv_refusals = 0  # prep_recv calls refused for want of free blocks (stats().kv_refusals)
        self.attend_addr = ""  # the attend socket, if the transport runs one (serving/attend_server.py)
        self.events = KVEventLog(self.engine_id)  # its `sink` is set by the transport
        self._sends: dict[str, str] = {}  # send job id -> request id
        self._streams: dict[str, StreamQueue] = {}
        self.hold = StreamHold()  # the engine's stream interval (EngineConfig.stream_interval)
        self.lock, self._wake = asyncio.Lock(), asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._tasks: set[asyncio.Future] = set()
        self.aborted = Aborted()  # request ids aborted lately: their calls still in flight end
        backend.bind(self)

    @property
    def kv_spec(self) -> KVSpec:
        return self.backend.kv_spec

    @property
    def max_model_len(self) -> int:
        return self.backend.max_model_len

    @property
    def transports(self) -> list[str]:
        return self.backend.transports

    # -- what a backend uses ---------------------------------------------------------------
    def wake(self) -> None:
        """Step again (work arrived)."""
        self._wake.set()

    def streaming(self, request_id: str) -> bool:
        """Whether `start_generate` streams this request now."""
        return request_id in self._streams

    def use_kv_key(self, key: bytes) -> None:
        """Sign every KVAddr with the cluster's KV key, and (backends that send) refuse unsigned ones."""
        self.kv_sign_key = key
        self.backend.use_kv_key(key)

    def on_kv_event(self, kind: str, hashes: list[int]) -> None:  # any thread: the engine's hook
        self.events.record(kind, hashes)

    # -- the step loop -------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.events.bind(self._loop)
        while not self._closed:
            if not self.backend.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self.lock:  # NOTE: calls change engine state only between steps
                started = self._loop.time()
                try:
                    outputs = await self.backend.step()
                except Exception:  # NOTE: a bug in one step must not take the engine down silently
                    log.exception("engine step failed; aborting the running requests")
                    outputs = self.backend.fail_running()
                self.busy_seconds += self._loop.time() - started  # NOTE: the loop's clock: virtual in the sim
            for out in outputs:
                self.deliver(out)
            if not outputs and self.backend.idle_poll_s is not None:  # waiting on KV pages or pushes
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.backend.idle_poll_s):
                        await self._wake.wait()
            else:
                await asyncio.sleep(0)

    def deliver(self, out: StepOutput) -> None:
        """An output of a step: to the backend's own books or the request's stream."""
        if self.backend.take_output(out):
            return
        queue = self._streams.get(out.request_id)
        if queue is not None and (out := self.hold.take(out)) is not None:
            queue.put_nowait(out)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop. Later calls and every open stream end with UNAVAILABLE (the router goes elsewhere)."""
        self._closed = True
        self._wake.set()
        self.backend.close()
        for rid, queue in self._streams.items():
            queue.put_nowait(StepOutput(rid, [], Finish.ERROR, error=CLOSED))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(ErrorCode.UNAVAILABLE, CLOSED)

    # -- prep_recv ---------------------------------------------------------------------------------
    async def prep_recv(self, req: protocol.Request, end: int, lease_s: float | None = None) -> protocol.RecvTicket:
        prompt = self._validated(req)
        end = norm_pos(end, len(prompt), "end")
        lease = self.leases.check(lease_s)
        try:
            ticket = await self.backend.reserve(req, prompt, end)
        except EngineError as exc:
            self.kv_refusals += exc.code is ErrorCode.OVERLOADED  # NOTE: out of blocks: a planner's cue to grow
            raise
        ticket.trace = tracing.traceparent() if tracing.enabled() else ""
        addr = await self.leases.issue(ticket, lease)
        return protocol.RecvTicket(addr, ticket.matched)

    async def lend(self, req: protocol.Request, begin: int, end: int,
                   lease_s: float | None = None) -> protocol.LendTicket:
        prompt = self._validated(req, whole=False)  # NOTE: only the range is held here
        begin, end = norm_pos(begin, len(prompt), "begin"), norm_pos(end, len(prompt), "end")
        bs = self.kv_spec.block_size
        if begin >= end or begin % bs:
            raise EngineError(ErrorCode.BAD_REQUEST, f"lend [{begin}, {end}): a lent range is not empty and starts "
                              f"on a block boundary (block size {bs})")
        lease = self.leases.check(lease_s)
        self.aborted.check(req.request_id)
        ticket = await self.backend.lend_blocks(req, begin, end)
        return protocol.LendTicket(await self.leases.issue(ticket, lease), attend=self.attend_addr)

    async def attend(self, ticket_id: str, secret: str, layer: int, positions: list[int], q: bytes,
                     scale: float, more: list[protocol.LentRef] = (),
                     others: list[protocol.AttendRows] = ()) -> protocol.AttendReply:
        call = protocol.Attend(ticket_id, secret, layer, positions, q, scale, list(more), list(others))
        await lent_arrivals(self.tickets, attend_ids(call))
        return await asyncio.to_thread(answer_attend, self, call, False)  # type: ignore[return-value]

    # -- remote_send -------------------------------------------------------------------------------
    async def remote_send(self, req: protocol.Request, kv: KVAddr, begin: int, end: int,
                          transport: str | None = None) -> protocol.SendResult:
        prompt = self._validated(req)
        begin, end, mode = check_send(self.kv_spec, kv, begin, end, len(prompt),
                                      lambda: self.backend.transport_for(kv, transport), self.model_id)
        if begin >= end:
            return protocol.SendResult(0, 0.0, mode)
        self.aborted.check(req.request_id)
        job_id = f"{req.request_id}\x00send\x00{kv.ticket_id}"
        if job_id in self._sends:
            raise EngineError(ErrorCode.BAD_REQUEST, f"ticket {kv.ticket_id} is already being sent")
        self._sends[job_id] = req.request_id
        t0 = asyncio.get_running_loop().time()
        try:
            nbytes, used, computed = await self.backend.send(job_id, req.request_id, prompt[:end], kv, begin, end,
                                                             mode, req.sampling.lora)
        except TransferError as exc:
            raise EngineError(exc.code, str(exc), exc.peer) from exc
        finally:
            self._sends.pop(job_id, None)
        # NOTE: this send's own prefill, not the engine-wide counter (other requests run meanwhile)
        return protocol.SendResult(nbytes, asyncio.get_running_loop().time() - t0, used, computed)

    # -- start_generate ----------------------------------------------------------------------------
    async def start_generate(self, req: protocol.Request, begin: int = 0, sampling: SamplingParams | None = None,
                             lenders: list[protocol.LendTicket] | None = None) -> AsyncIterator[protocol.GenerateChunk]:
        prompt = self._validated(req, whole=not lenders)  # NOTE: with lenders the engine checks what stays here
        begin = norm_pos(begin, len(prompt), "begin")
        if lenders and begin:
            raise EngineError(ErrorCode.BAD_REQUEST, "start_generate with lenders computes the whole prompt here: "
                              f"begin must be 0 (got {begin})")
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
        lent = self.backend.borrow(req, lenders) if lenders else None  # NOTE: refused before any ticket is taken
        ticket = self.tickets.latest(rid)
        if ticket is not None:
            self.backend.check_adoption(req, sampling)
            await wait_for_kv(ticket, self.transfer_timeout, self.leases.close)
        self.aborted.check(rid)  # NOTE: also when it was aborted while we waited for its KV
        self._check_open()  # NOTE: closed while it waited for its KV: no step would ever feed the stream
        if ticket is not None and ticket.state is TicketState.COMPLETE:
            self.tickets.remove(ticket)  # the backend adopts its blocks in submit
        queue = self._streams[rid] = StreamQueue()
        try:
            await self.backend.submit(req, prompt, begin, sampling, ticket, lent)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._wake.set()
        return streams.chunks(self, rid, queue)

    # -- abort / stats / health / kv_snapshot ---------------------------------------------------------
    async def abort(self, request_id: str) -> bool:
        self.aborted.add(request_id)
        found = False
        for job_id in [j for j, r in self._sends.items() if r == request_id]:
            await self.backend.abort_send(job_id)
            found = True
        for ticket in self.tickets.of_request(request_id):
            await self.leases.close(ticket, "aborted")
            found = True
        found = await self.backend.abort_request(request_id) or found
        if (queue := self._streams.get(request_id)) is not None:
            queue.put_nowait(StepOutput(request_id, [], Finish.ABORT))
        return found or queue is not None

    def stats(self) -> protocol.StatsReply:
        return replies.stats(self)

    def health(self) -> protocol.HealthReply:
        return replies.health(self)

    async def lora(self, action: str, name: str, path: str = "") -> protocol.LoraReply:
        if action not in ("load", "unload") or not name or (action == "load" and not path):
            raise EngineError(ErrorCode.BAD_REQUEST, "lora: action 'load' (a name and a path) or 'unload' (a name)")
        done = self.backend.load_lora(name, path) if action == "load" else self.backend.unload_lora(name)
        return protocol.LoraReply(await done)

    async def kv_snapshot(self) -> protocol.KVSnapshotReply:
        async with self.lock:  # between steps: the snapshot and the event number agree
            self.events.flush()
            hashes = self.backend.cached_hashes()
        return protocol.KVSnapshotReply(self.engine_id, hashes, self.events.seq)

    def _validated(self, req: protocol.Request, whole: bool = True) -> list[int]:
        self._check_open()
        try:
            self.backend.check_prompt(req.prompt_ids, whole)
        except InvalidRequestError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        return req.prompt_ids
