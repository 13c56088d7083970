"""`EngineHandle`: the microserving calls of one engine, as async Python methods.

Calls travel over the handle's `Channel` (`router/channel.py`: a ZeroMQ DEALER socket,
or an in-process service for simulated engines). Every call has a deadline (`timeout`): a
dead or wedged engine turns into `EngineTimeout`, never a hang. An `RPCError` reply turns into `EngineCallError` with
the engine's error code. Whoever learns that the engine is gone (the cluster's health
polls, `launch` seeing the process exit) calls `mark_down`: every call waiting on the
engine then fails with code "unavailable" instead of waiting for its deadline.

The handle also keeps the router's own view of the engine's load (calls in flight, prompt
tokens sent to it and not yet prefilled), its liveness and moves (its base class, `EngineBooks`,
router/engine_books.py), and records each call in the attempt it belongs to (`attempts`,
router/attempt_scope.py: which engines a request touched), so the router can abort it everywhere
when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from microserve import protocol, tracing
from microserve.router.attempt_scope import Attempt, AttemptRegistry
from microserve.router.channel import CallTimeout, CallUnavailable, Channel, ZMQChannel
from microserve.router.engine_books import EngineBooks
from microserve.router.errors import EngineCallError, EngineTimeout, Evacuated
from microserve.router.journal import CallRecord
from microserve.sampling_params import SamplingParams
from microserve.security import ClusterKey
from microserve.security import resolve as resolve_key
from microserve.serving.api import ErrorCode

log = logging.getLogger(__name__)

_CALL_NAMES = {protocol.PrepRecv: "prep_recv", protocol.RemoteSend: "remote_send",
               protocol.StartGenerate: "start_generate", protocol.Lend: "lend", protocol.Abort: "abort"}
_REPLY: dict[type, type] = {  # the reply each call expects
    protocol.PrepRecv: protocol.RecvTicket, protocol.RemoteSend: protocol.SendResult,
    protocol.StartGenerate: protocol.GenerateChunk, protocol.Lend: protocol.LendTicket,
    protocol.Attend: protocol.AttendReply, protocol.Abort: protocol.AbortReply, protocol.Stats: protocol.StatsReply,
    protocol.Health: protocol.HealthReply, protocol.KVSnapshot: protocol.KVSnapshotReply,
    protocol.Lora: protocol.LoraReply,
}

class EngineHandle(EngineBooks):
    """Client of one engine: the calls over its RPC channel (its books: `EngineBooks`).

    Args:
        address: the engine's `--rpc` address, e.g. "tcp://127.0.0.1:5555".
        name: label used in errors and by the router (default: the address).
        role: router label ("prefill", "decode", ...); engines serve every call whatever it is.
        timeout: default deadline of a call, in seconds (for `start_generate`: of each chunk).
        cluster_key: the deployment's key (a `ClusterKey` or its file); default `$MICROSERVE_CLUSTER_KEY`
            when set. Engines with a key answer only handles that hold it.
    """

    def __init__(self, address: str, *, name: str | None = None, role: str | None = None,
                 timeout: float = 60.0, context: zmq.asyncio.Context | None = None,
                 channel: Channel | None = None, cluster_key: ClusterKey | str | Path | None = None) -> None:
        self.address, self.name, self.role, self.timeout = address, name or address, role, timeout
        self.cluster_key = resolve_key(cluster_key) if channel is None else None
        self.channel: Channel = channel or ZMQChannel(address, context, self.cluster_key)
        super().__init__()
        self.profile: dict | None = None  # the engine's hardware, when known (simulated engines: sim/cluster.py)
        self.on_send: Callable[[protocol.SendResult], None] | None = None  # observer of finished remote_sends
        self.on_generate: Callable[[EngineHandle], None] | None = None  # observer of start_generate calls
        self.on_call: Callable[[CallRecord], None] | None = None  # observer of every call (router/journal.py)
        self.attempts: AttemptRegistry | None = None  # the cluster's running attempts (router/attempt_scope.py)

    # -- plumbing ---------------------------------------------------------------------
    def _check_alive(self, msg: protocol.Call) -> None:
        if not self.alive and not isinstance(msg, protocol.Health | protocol.Stats):  # probes find out when it is back
            raise EngineCallError(ErrorCode.UNAVAILABLE, "the engine is down", self.name)

    def _touch(self, request_id: str) -> Attempt | None:
        """Record this engine in the attempt the call belongs to (None: a call outside any attempt)."""
        attempt = self.attempts.of(request_id) if self.attempts is not None else None
        if attempt is not None:
            attempt.touched.add(self)
        return attempt

    def _checked(self, reply: protocol.Reply, msg: protocol.Call) -> protocol.Reply:
        """`reply` when it is the answer `msg` expects; an RPCError becomes `EngineCallError` (remote),
        any other reply an "internal" error (never an assert: it comes from another process)."""
        if isinstance(reply, protocol.RPCError):
            raise EngineCallError(reply.code, reply.message, self.name, peer=reply.peer, remote=True)
        want = _REPLY[type(msg)]
        if not isinstance(reply, want):
            raise EngineCallError(ErrorCode.INTERNAL, f"the engine answered {type(msg).__name__} with "
                                  f"{type(reply).__name__}, not {want.__name__}", self.name, remote=True)
        return reply

    async def call(self, msg: protocol.Call, timeout: float | None = None) -> protocol.Reply:
        """Send one call and wait for its single reply."""
        self._check_alive(msg)
        limit = self.timeout if timeout is None else timeout
        t0, reply, failed = time.time(), None, []
        name = _CALL_NAMES.get(type(msg))
        span = tracing.start(name, engine=self.name, role=self.role, request=_request_id(msg)) if name else None
        try:
            with self._errors(msg, limit, failed):
                reply = self._checked(await self.channel.roundtrip(msg, limit, tracing.traceparent(span)), msg)
        finally:
            error = str(failed[0]) if failed else ""
            if self.on_call is not None and name:
                self._report(msg, t0, getattr(reply, "bytes", 0), error)
            if span is not None:
                tracing.end(span, error, bytes=getattr(reply, "bytes", None),
                            transport=getattr(reply, "transport", None), matched=getattr(reply, "matched", None))
        if not self.alive and isinstance(msg, protocol.Health | protocol.Stats):
            self.set_alive(True)  # it answers again (restarted)
        return reply

    @contextlib.contextmanager
    def _errors(self, msg: protocol.Call, limit: float, failed: list) -> Iterator[None]:
        """The one conversion of a channel failure into this engine's error (an `RPCError` reply is
        `_checked`'s): no reply in time is `EngineTimeout`, a call failed locally "unavailable". The
        failure's code goes to `failed` (for the journal and the span)."""
        try:
            yield
        except CallTimeout:
            what = _CALL_NAMES.get(type(msg), type(msg).__name__)
            failed.append(ErrorCode.TIMEOUT)
            raise EngineTimeout(f"no answer to {what} within {limit:g}s", self.name) from None
        except CallUnavailable as exc:
            failed.append(ErrorCode.UNAVAILABLE)
            raise EngineCallError(ErrorCode.UNAVAILABLE, str(exc), self.name) from None
        except EngineCallError as exc:
            failed.append(exc.code)
            raise

    def _report(self, msg: protocol.Call, t0: float, nbytes: int, error: str) -> None:
        self.on_call(CallRecord(self.name, _CALL_NAMES[type(msg)], t0, time.time() - t0,  # type: ignore[misc]
                                nbytes, error, _request_id(msg)))

    async def close(self) -> None:
        await self.channel.close()

    def __repr__(self) -> str:
        return f"EngineHandle({self.name!r}, role={self.role!r}, alive={self.alive})"

    async def __aenter__(self) -> EngineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the calls --------------------------------------------------------------------
    async def prep_recv(self, req: protocol.Request, end: int | None = None, *, lease_s: float | None = None,
                        timeout: float | None = None) -> protocol.RecvTicket:
        """Reserve blocks for `prompt[matched:end]` (default end: the whole prompt)."""
        end = len(req.prompt_ids) if end is None else end
        self._touch(req.request_id)
        self.reserved[req.request_id] = time.monotonic()  # NOTE: counted before the await: a burst sees it
        try:
            return await self.call(protocol.PrepRecv(req, end, lease_s), timeout)  # type: ignore[return-value]
        except BaseException:
            self.release(req.request_id)
            raise

    async def lend(self, req: protocol.Request, begin: int, end: int, *, lease_s: float | None = None,
                   timeout: float | None = None) -> protocol.LendTicket:
        """Hold blocks here for `prompt[begin:end]` of a request another engine runs (DistAttention)."""
        self._touch(req.request_id)
        ticket = await self.call(protocol.Lend(req, begin, end, lease_s), timeout)
        self.lending.add(req.request_id)
        attend = ticket.attend  # type: ignore[attr-defined]
        if attend.startswith("tcp://") and self.address.startswith("tcp://"):  # NOTE: reached as the RPC is
            attend = self.address.rsplit(":", 1)[0] + ":" + attend.rsplit(":", 1)[1]
        return msgspec.structs.replace(ticket, rpc=self.address, attend=attend)  # type: ignore[type-var]

    async def attend(self, ticket: protocol.LendTicket, layer: int, positions: list[int], q: bytes, scale: float, *,
                     more: list[protocol.LendTicket] = (), timeout: float | None = None) -> protocol.AttendReply:
        """The part of a layer's attention over a range this engine lent (`lend`), for these query rows
        (with `more`: over those ranges of the same request too, merged into one part)."""
        refs = [protocol.LentRef(t.kv.ticket_id, t.kv.secret) for t in more]
        return await self.call(protocol.Attend(ticket.kv.ticket_id, ticket.kv.secret, layer, positions, q, scale, refs),
                               timeout)  # type: ignore[return-value]

    async def remote_send(self, req: protocol.Request, kv: protocol.KVAddr, begin: int | None = None,
                          end: int | None = None, *, transport: str | None = None,
                          timeout: float | None = None) -> protocol.SendResult:
        """Compute KV of `prompt[:end]` here and write `[begin, end)` into the ticket `kv`
        (defaults: the ticket's own range)."""
        begin = kv.begin if begin is None else begin
        end = kv.end if end is None else end
        self._touch(req.request_id)
        work = max(0, (end if end >= 0 else len(req.prompt_ids) + end) - begin)
        self.inflight += 1
        self.pending_tokens += work
        try:
            result = await self.call(protocol.RemoteSend(req, kv, begin, end, transport), timeout)
        finally:
            self.inflight -= 1
            self.pending_tokens -= work
            self.changed_at = time.monotonic()
        if self.on_send is not None:
            self.on_send(result)  # type: ignore[arg-type]
        return result  # type: ignore[return-value]

    async def start_generate(self, req: protocol.Request, begin: int = 0, sampling: SamplingParams | None = None,
                             *, lenders: list[protocol.LendTicket] | None = None,
                             timeout: float | None = None) -> AsyncIterator[protocol.GenerateChunk]:
        """Stream `GenerateChunk`s; leaving the loop early aborts the request on the engine. `lenders`:
        ranges of the prompt other engines lent for it (`lend`; DistAttention)."""
        msg = protocol.StartGenerate(req, begin, sampling, list(lenders or ()))
        self._check_alive(msg)
        attempt = self._touch(req.request_id)
        finished = False
        work = max(0, len(req.prompt_ids) - (begin if begin >= 0 else len(req.prompt_ids) + begin))
        self.inflight += 1
        self.reserved.pop(req.request_id, None)  # NOTE: the reservation becomes this call
        self.pending_tokens += work
        if self.on_generate is not None:
            self.on_generate(self)
        if attempt is not None and attempt.generating is not None:  # NOTE: where its KV is (router/choices.py)
            attempt.generating.append(self)
        limit = self.timeout if timeout is None else timeout
        span = tracing.start("start_generate", engine=self.name, role=self.role, request=req.request_id, begin=begin)
        replies = self.channel.stream(msg, limit, tracing.traceparent(span))
        t0, failed, tokens, cached = time.time(), [], 0, 0
        try:
            # NOTE: one generator frame per token between the router and the wire (the simulator
            # pushes millions of tokens through here)
            with self._errors(msg, limit, failed):
                async for reply in replies:
                    chunk = self._checked(reply, msg)
                    finished = chunk.finish_reason is not None
                    tokens, cached = tokens + len(chunk.token_ids), cached or chunk.num_cached_tokens
                    if finished and self.on_call is not None:  # NOTE: now: the consumer may not close us at once
                        self._report(msg, t0, 0, "")
                    self.pending_tokens -= work  # the prompt is prefilled once the first chunk is out
                    work = 0
                    yield chunk
                    if self.evacuating and not finished:
                        self.moving += 1  # NOTE: before the abort below yields: the drain must not end in between
                        raise Evacuated(self)
        finally:
            error = str(failed[0]) if failed else ""
            if self.on_call is not None and not finished:
                self._report(msg, t0, 0, error)
            tracing.end(span, error, tokens=tokens, cached_tokens=cached, finished=finished)
            await replies.aclose()
            self.inflight -= 1
            self.pending_tokens -= work
            self.changed_at = time.monotonic()
            if not finished and not self.alive:
                self.abort_when_back(req.request_id)
            elif not finished:
                with contextlib.suppress(EngineCallError, zmq.ZMQError, asyncio.CancelledError):
                    await self.abort(req.request_id, timeout=5.0)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        self._touch(request_id)
        self.release(request_id)
        reply = await self.call(protocol.Abort(request_id), timeout)
        return reply.found  # type: ignore[union-attr]

    async def stats(self, *, timeout: float | None = None) -> protocol.StatsReply:
        return await self.call(protocol.Stats(), timeout)  # type: ignore[return-value]

    async def health(self, *, timeout: float | None = None) -> protocol.HealthReply:
        return await self.call(protocol.Health(), timeout)  # type: ignore[return-value]

    async def lora(self, action: str, name: str, path: str = "", *, timeout: float | None = None) -> protocol.LoraReply:
        """Load (`path` on the engine's host) or unload a LoRA adapter here."""
        return await self.call(protocol.Lora(action, name, path), timeout)  # type: ignore[return-value]

    async def wait_ready(self, timeout: float = 120.0) -> protocol.HealthReply:
        """Poll `health` until the engine answers (it may still be loading)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.health(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            except EngineTimeout:
                if time.monotonic() >= deadline:
                    hint = "" if self.cluster_key else " (an engine with a cluster key ignores handles without it: " \
                        "pass cluster_key= / --cluster-key, or set $MICROSERVE_CLUSTER_KEY)"
                    raise EngineTimeout(f"not ready within {timeout:g}s{hint}", self.name) from None


def _request_id(msg: protocol.Call) -> str:
    return getattr(msg, "request_id", None) or msg.req.request_id  # type: ignore[union-attr]  (abort: an id)
