"""`EngineHandle`: the microserving calls of one engine, as async Python methods.

One DEALER socket per handle; a reader task routes reply frames to the waiting call
by call id. Every call has a deadline (`timeout`): a dead or wedged engine turns into
`EngineTimeout`, never a hang. An `RPCError` reply turns into `EngineCallError` with
the engine's error code. Whoever learns that the engine is gone (the cluster's health
polls, `launch` seeing the process exit) calls `mark_down`: every call waiting on the
engine then fails with code "unavailable" instead of waiting for its deadline.

NOTE: no ZeroMQ socket monitor here on purpose: libzmq writes monitor events from its
I/O thread with a blocking send, so one handle whose monitor is never read (a handle
the user did not close) can stall every socket of the process.

The handle also keeps the router's own view of the engine's load (calls in flight,
prompt tokens sent to it and not yet prefilled) and records, per router request,
which engines a request touched (`touched_engines`), so the router can abort it
everywhere when the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import zmq
import zmq.asyncio

from microserve import protocol as P
from microserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_TOUCHED: contextvars.ContextVar[set[EngineHandle] | None] = contextvars.ContextVar("touched", default=None)


@contextlib.contextmanager
def touched_engines() -> Iterator[set[EngineHandle]]:
    """Collect every handle that makes a call inside this block (tasks spawned inside too)."""
    engines: set[EngineHandle] = set()
    previous = _TOUCHED.get()
    _TOUCHED.set(engines)
    try:
        yield engines
    finally:  # NOTE: not Token.reset: an async generator may be closed from another task's context
        _TOUCHED.set(previous)


class EngineCallError(RuntimeError):
    """An engine answered a call with an error; `code` as in `protocol.RPCError`."""

    def __init__(self, code: str, message: str, engine: str = "") -> None:
        super().__init__(f"[{code}] {message}" + (f" (engine {engine})" if engine else ""))
        self.code, self.message, self.engine = code, message, engine


class EngineTimeout(EngineCallError):
    """The engine did not answer within the call's deadline (dead, wedged or overloaded)."""

    def __init__(self, message: str, engine: str = "") -> None:
        super().__init__("timeout", message, engine)


class EngineHandle:
    """Client of one engine.

    Args:
        address: the engine's `--rpc` address, e.g. "tcp://127.0.0.1:5555".
        name: label used in errors and by the router (default: the address).
        role: router label ("prefill", "decode", ...); engines serve every call whatever it is.
        timeout: default deadline of a call, in seconds (for `start_generate`: of each chunk).
    """

    def __init__(self, address: str, *, name: str | None = None, role: str | None = None,
                 timeout: float = 60.0, context: zmq.asyncio.Context | None = None) -> None:
        self.address, self.name, self.role, self.timeout = address, name or address, role, timeout
        self._ctx = context
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[bytes, asyncio.Queue[P.Reply]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)
        self.alive = True  # False from a lost connection or failed health poll until a call succeeds again
        self.inflight = 0  # start_generate / remote_send calls this process has in flight on the engine
        self.pending_tokens = 0  # prompt tokens this process asked the engine to prefill, not yet done
        self.on_send: Callable[[P.SendResult], None] | None = None  # observer of finished remote_sends
        self.on_generate: Callable[[EngineHandle], None] | None = None  # observer of start_generate calls
        self.on_state: Callable[[EngineHandle, bool], None] | None = None  # observer of alive changes

    # -- plumbing ---------------------------------------------------------------------
    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            ctx = self._ctx or zmq.asyncio.Context.instance()
            self._sock = ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return self._sock

    def set_alive(self, alive: bool) -> None:
        if alive != self.alive:
            self.alive = alive
            log.warning("engine %s is %s", self.name, "up" if alive else "DOWN")
            if self.on_state is not None:
                self.on_state(self, alive)

    def mark_down(self, why: str) -> None:
        """Mark the engine down and fail every call waiting on it with code "unavailable"."""
        self.set_alive(False)
        for queue in self._pending.values():
            queue.put_nowait(P.RPCError("unavailable", why))

    def _check_alive(self, msg: P.Call) -> None:
        if not self.alive and not isinstance(msg, P.Health | P.Stats):  # probes find out when it is back
            raise EngineCallError("unavailable", "the engine is down", self.name)

    def _touch(self) -> None:
        engines = _TOUCHED.get()
        if engines is not None:
            engines.add(self)

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                continue
            queue = self._pending.get(frames[0])
            if queue is None:
                continue  # a late reply to a call that gave up
            try:
                queue.put_nowait(P.decode_reply(frames[1]))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                queue.put_nowait(P.RPCError("internal", f"undecodable reply from the engine: {exc}"))

    def _open(self) -> tuple[bytes, asyncio.Queue[P.Reply]]:
        call_id = self._prefix + next(self._ids).to_bytes(8, "little")
        queue: asyncio.Queue[P.Reply] = asyncio.Queue()
        self._pending[call_id] = queue
        return call_id, queue

    async def _next(self, queue: asyncio.Queue[P.Reply], what: str, timeout: float | None) -> P.Reply:
        timeout = self.timeout if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise EngineTimeout(f"no answer to {what} within {timeout:g}s", self.name) from None
        if isinstance(reply, P.RPCError):
            raise EngineCallError(reply.code, reply.message, self.name)
        return reply

    async def call(self, msg: P.Call, timeout: float | None = None) -> P.Reply:
        """Send one call and wait for its single reply."""
        self._check_alive(msg)
        reply = await self._roundtrip(msg, timeout)
        if not self.alive and isinstance(msg, P.Health | P.Stats):
            self.set_alive(True)  # it answers again (restarted)
        return reply

    async def _roundtrip(self, msg: P.Call, timeout: float | None) -> P.Reply:
        """The transport of `call` (a simulated handle replaces it)."""
        sock = self._socket()
        call_id, queue = self._open()
        try:
            await sock.send_multipart([call_id, P.encode(msg)])
            return await self._next(queue, type(msg).__name__, timeout)
        finally:
            self._pending.pop(call_id, None)

    async def _stream(self, msg: P.StartGenerate, timeout: float | None) -> AsyncIterator[P.GenerateChunk]:
        """The transport of `start_generate`: its chunks, up to the one with a finish reason."""
        sock = self._socket()
        call_id, queue = self._open()
        try:
            await sock.send_multipart([call_id, P.encode(msg)])
            while True:
                chunk = await self._next(queue, "start_generate", timeout)
                assert isinstance(chunk, P.GenerateChunk)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._reader = None

    def __repr__(self) -> str:
        return f"EngineHandle({self.name!r}, role={self.role!r}, alive={self.alive})"

    async def __aenter__(self) -> EngineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the calls --------------------------------------------------------------------
    async def prep_recv(self, req: P.Request, end: int | None = None, *, lease_s: float | None = None,
                        timeout: float | None = None) -> P.RecvTicket:
        """Reserve blocks for `prompt[matched:end]` (default end: the whole prompt)."""
        end = len(req.prompt_ids) if end is None else end
        self._touch()
        return await self.call(P.PrepRecv(req, end, lease_s), timeout)  # type: ignore[return-value]

    async def remote_send(self, req: P.Request, kv: P.KVAddr, begin: int | None = None, end: int | None = None,
                          *, transport: str | None = None, timeout: float | None = None) -> P.SendResult:
        """Compute KV of `prompt[:end]` here and write `[begin, end)` into the ticket `kv`
        (defaults: the ticket's own range)."""
        begin = kv.begin if begin is None else begin
        end = kv.end if end is None else end
        self._touch()
        work = max(0, (end if end >= 0 else len(req.prompt_ids) + end) - begin)
        self.inflight += 1
        self.pending_tokens += work
        try:
            result = await self.call(P.RemoteSend(req, kv, begin, end, transport), timeout)
        finally:
            self.inflight -= 1
            self.pending_tokens -= work
        if self.on_send is not None:
            self.on_send(result)  # type: ignore[arg-type]
        return result  # type: ignore[return-value]

    async def start_generate(self, req: P.Request, begin: int = 0, sampling: SamplingParams | None = None,
                             *, timeout: float | None = None) -> AsyncIterator[P.GenerateChunk]:
        """Stream `GenerateChunk`s; leaving the loop early aborts the request on the engine."""
        msg = P.StartGenerate(req, begin, sampling)
        self._check_alive(msg)
        self._touch()
        finished = False
        work = max(0, len(req.prompt_ids) - (begin if begin >= 0 else len(req.prompt_ids) + begin))
        self.inflight += 1
        self.pending_tokens += work
        if self.on_generate is not None:
            self.on_generate(self)
        stream = self._stream(msg, timeout)
        try:
            async for chunk in stream:
                finished = chunk.finish_reason is not None
                self.pending_tokens -= work  # the prompt is prefilled once the first chunk is out
                work = 0
                yield chunk
        finally:
            await stream.aclose()
            self.inflight -= 1
            self.pending_tokens -= work
            if not finished:
                with contextlib.suppress(EngineCallError, zmq.ZMQError, asyncio.CancelledError):
                    await self.abort(req.request_id, timeout=5.0)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
        self._touch()
        reply = await self.call(P.Abort(request_id), timeout)
        return reply.found  # type: ignore[union-attr]

    async def stats(self, *, timeout: float | None = None) -> P.StatsReply:
        return await self.call(P.Stats(), timeout)  # type: ignore[return-value]

    async def health(self, *, timeout: float | None = None) -> P.HealthReply:
        return await self.call(P.Health(), timeout)  # type: ignore[return-value]

    async def wait_ready(self, timeout: float = 120.0) -> P.HealthReply:
        """Poll `health` until the engine answers (it may still be loading)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.health(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            except EngineTimeout:
                if time.monotonic() >= deadline:
                    raise EngineTimeout(f"not ready within {timeout:g}s", self.name) from None
