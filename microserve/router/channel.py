"""How an `EngineHandle` reaches its engine: a `Channel` carries calls and brings replies back.

    EngineHandle.call ─> Channel.roundtrip(msg) ─> Reply            (RPCError replies included)
    EngineHandle.start_generate ─> Channel.stream(msg) ─> GenerateChunk ... | RPCError

`ZMQChannel` is the wire: one DEALER socket, a reader task routing `[call_id, body]`
frames to the waiting call, a deadline on every reply. `InProcessChannel` calls a service
in this process through `serving.api.dispatch` (the simulator's engines). Failures come back
as `RPCError` replies either way, so the handle turns them into `EngineCallError` in one place.

NOTE: no ZeroMQ socket monitor here on purpose: libzmq writes monitor events from its
I/O thread with a blocking send, so one handle whose monitor is never read (a handle
the user did not close) can stall every socket of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from microserve import protocol
from microserve.security import ClusterKey
from microserve.serving.api import EngineError, dispatch


class CallTimeout(Exception):
    """No reply within the deadline."""


class CallUnavailable(Exception):
    """The call was failed locally: its engine was marked down while it waited."""


class Channel(Protocol):
    async def roundtrip(self, msg: protocol.Call, timeout: float) -> protocol.Reply:
        """Send one call; its single reply (an `RPCError` for the engine's failure). Raises
        `CallTimeout` (no reply in time) or `CallUnavailable` (`fail_pending`)."""
        ...

    def stream(self, msg: protocol.StartGenerate, timeout: float) -> AsyncIterator[protocol.Reply]:
        """Send `start_generate`; its chunks up to one with a finish reason, or an `RPCError`.
        `timeout` bounds the wait for each chunk (raises `CallTimeout`)."""
        ...

    def fail_pending(self, why: str) -> None:
        """Fail every waiting call with `CallUnavailable(why)`."""
        ...

    async def close(self) -> None: ...


class ZMQChannel:
    """The engine's `--rpc` socket (DEALER), shared by every call of one handle; a CURVE
    client when the deployment has a cluster key (an engine with a key ignores peers without it)."""

    def __init__(self, address: str, context: zmq.asyncio.Context | None = None,
                 cluster_key: ClusterKey | None = None) -> None:
        self.address, self._ctx, self.cluster_key = address, context, cluster_key
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[bytes, asyncio.Queue[protocol.Reply | CallUnavailable]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            ctx = self._ctx or zmq.asyncio.Context.instance()
            self._sock = ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            if self.cluster_key is not None:
                self.cluster_key.secure_client(self._sock)
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
                queue.put_nowait(protocol.decode_reply(frames[1]))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                queue.put_nowait(protocol.RPCError("internal", f"undecodable reply from the engine: {exc}"))

    async def _send(self, msg: protocol.Call, timeout: float,
                    trace: str = "") -> tuple[bytes, asyncio.Queue[protocol.Reply | CallUnavailable]]:
        sock = self._socket()
        call_id = self._prefix + next(self._ids).to_bytes(8, "little")
        queue: asyncio.Queue[protocol.Reply | CallUnavailable] = asyncio.Queue()
        self._pending[call_id] = queue
        try:  # NOTE: a DEALER without a connected peer (refused handshake, reconnecting) blocks on send
            frames = [call_id, protocol.encode(msg), trace.encode()] if trace else [call_id, protocol.encode(msg)]
            async with asyncio.timeout(timeout):  # NOTE: not wait_for, which may swallow a cancel (attempts.py)
                await sock.send_multipart(frames)
        except TimeoutError:
            self._pending.pop(call_id, None)
            raise CallTimeout from None
        return call_id, queue

    @staticmethod
    async def _next(queue: asyncio.Queue[protocol.Reply | CallUnavailable], timeout: float) -> protocol.Reply:
        try:
            async with asyncio.timeout(timeout):
                reply = await queue.get()
        except TimeoutError:
            raise CallTimeout from None
        if isinstance(reply, CallUnavailable):
            raise reply
        return reply

    async def roundtrip(self, msg: protocol.Call, timeout: float, trace: str = "") -> protocol.Reply:
        """One call, one reply. `trace`: the W3C traceparent of the caller's span (a third frame)."""
        call_id = b""
        try:
            call_id, queue = await self._send(msg, timeout, trace)
            return await self._next(queue, timeout)
        finally:
            self._pending.pop(call_id, None)

    async def stream(self, msg: protocol.StartGenerate, timeout: float,
                     trace: str = "") -> AsyncIterator[protocol.Reply]:
        call_id = b""
        try:
            call_id, queue = await self._send(msg, timeout, trace)
            while True:
                reply = await self._next(queue, timeout)
                yield reply
                if not isinstance(reply, protocol.GenerateChunk) or reply.finish_reason is not None:
                    return
        finally:
            self._pending.pop(call_id, None)

    def fail_pending(self, why: str) -> None:
        for queue in self._pending.values():
            queue.put_nowait(CallUnavailable(why))

    def close_nowait(self) -> None:
        """Close from outside a coroutine (an engine's backend closing its lenders' channels)."""
        self.fail_pending("closed")
        if self._reader is not None:
            self._reader.cancel()
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._reader = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self._reader = None


class InProcessChannel:
    """Calls into an `EngineAPI` object of this process (a simulated engine).

    Calls never time out here (an in-process engine cannot hang on a network), so the
    deadline is not enforced; everything else behaves as over the wire.
    """

    def __init__(self, api) -> None:
        self.api = api

    async def roundtrip(self, msg: protocol.Call, timeout: float, trace: str = "") -> protocol.Reply:
        try:
            reply = await dispatch(self.api, msg)
        except EngineError as exc:
            return protocol.RPCError(exc.code, str(exc), exc.peer)
        assert not isinstance(reply, AsyncIterator), "start_generate goes through stream()"
        return reply

    async def stream(self, msg: protocol.StartGenerate, timeout: float,
                     trace: str = "") -> AsyncIterator[protocol.Reply]:
        try:
            chunks = await dispatch(self.api, msg)
        except EngineError as exc:
            yield protocol.RPCError(exc.code, str(exc), exc.peer)
            return
        assert isinstance(chunks, AsyncIterator)
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield chunk
            except EngineError as exc:
                yield protocol.RPCError(exc.code, str(exc), exc.peer)

    def fail_pending(self, why: str) -> None:
        """Nothing waits on a wire here."""

    async def close(self) -> None:
        """Nothing to close."""
