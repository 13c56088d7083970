"""`EngineHandle`: the microserving calls of one engine, as async Python methods.

One DEALER socket per handle; a reader task routes reply frames to the waiting call
by call id. Every call has a deadline (`timeout`): a dead or wedged engine turns into
`EngineTimeout`, never a hang. An `RPCError` reply turns into `EngineCallError` with
the engine's error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from microserve import protocol as P
from microserve.sampling_params import SamplingParams


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

    # -- plumbing ---------------------------------------------------------------------
    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            ctx = self._ctx or zmq.asyncio.Context.instance()
            self._sock = ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return self._sock

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
        sock = self._socket()
        call_id, queue = self._open()
        try:
            await sock.send_multipart([call_id, P.encode(msg)])
            return await self._next(queue, type(msg).__name__, timeout)
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

    async def __aenter__(self) -> EngineHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the calls --------------------------------------------------------------------
    async def prep_recv(self, req: P.Request, end: int | None = None, *, lease_s: float | None = None,
                        timeout: float | None = None) -> P.RecvTicket:
        """Reserve blocks for `prompt[matched:end]` (default end: the whole prompt)."""
        end = len(req.prompt_ids) if end is None else end
        return await self.call(P.PrepRecv(req, end, lease_s), timeout)  # type: ignore[return-value]

    async def remote_send(self, req: P.Request, kv: P.KVAddr, begin: int | None = None, end: int | None = None,
                          *, transport: str | None = None, timeout: float | None = None) -> P.SendResult:
        """Compute KV of `prompt[:end]` here and write `[begin, end)` into the ticket `kv`
        (defaults: the ticket's own range)."""
        begin = kv.begin if begin is None else begin
        end = kv.end if end is None else end
        return await self.call(P.RemoteSend(req, kv, begin, end, transport), timeout)  # type: ignore[return-value]

    async def start_generate(self, req: P.Request, begin: int = 0, sampling: SamplingParams | None = None,
                             *, timeout: float | None = None) -> AsyncIterator[P.GenerateChunk]:
        """Stream `GenerateChunk`s; leaving the loop early aborts the request on the engine."""
        sock = self._socket()
        call_id, queue = self._open()
        finished = False
        try:
            await sock.send_multipart([call_id, P.encode(P.StartGenerate(req, begin, sampling))])
            while not finished:
                chunk = await self._next(queue, "start_generate", timeout)
                assert isinstance(chunk, P.GenerateChunk)
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._pending.pop(call_id, None)
            if not finished:
                with contextlib.suppress(EngineCallError, zmq.ZMQError, asyncio.CancelledError):
                    await self.abort(req.request_id, timeout=5.0)

    async def abort(self, request_id: str, *, timeout: float | None = None) -> bool:
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
