"""Request bodies at the gateway: read under limits before anything parses them.

    declared length > MAX_BODY_BYTES ─────────> 413 before a byte is read
    slots: MAX_CONCURRENT_UPLOADS in all, MAX_UPLOADS_PER_CLIENT per address (more wait; a 429 after BODY_TIMEOUT_S)
    reading: MIN_BODY_RATE after BODY_GRACE_S, whole within BODY_TIMEOUT_S (else 408), at most MAX_BODY_BYTES (413)
    parsing: bodies over PARSE_OFF_LOOP are decoded in a worker thread (the event loop keeps serving)

So slow or huge uploads cannot hold the gateway's memory or event loop, and one client's uploads
cannot starve another's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from microserve.gateway import openai_protocol
from microserve.router.runtime import RouterError
from microserve.serving.api import ErrorCode

MAX_BODY_BYTES = 16 << 20  # a request body; more is a 413 (before any of it is parsed)
MAX_CONCURRENT_UPLOADS = 64  # request bodies being read at once
MAX_UPLOADS_PER_CLIENT = 8  # of them, from one client address
BODY_TIMEOUT_S = 30.0  # to read one request body
BODY_GRACE_S = 2.0  # then a body must keep arriving at MIN_BODY_RATE at least
MIN_BODY_RATE = 64 << 10  # bytes/s
PARSE_OFF_LOOP = 1 << 20  # bodies larger than this are parsed in a worker thread


@dataclass
class _ClientGate:
    slots: asyncio.Semaphore
    users: int = 0  # requests holding or waiting for one of its slots


class BodyTooLarge(Exception):
    """The body is (or says it is) over `MAX_BODY_BYTES` (a 413)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the request body{f' ({size} bytes)' if size > MAX_BODY_BYTES else ''} is larger than "
                         f"this server takes ({MAX_BODY_BYTES} bytes)")


class BodyTooSlow(Exception):
    """The body fell behind the minimum rate or the total time (a 408)."""


async def _read_body(stream) -> bytes:
    """Read a body, refusing one over `MAX_BODY_BYTES` or one that falls behind `MIN_BODY_RATE` (after
    `BODY_GRACE_S`) or `BODY_TIMEOUT_S` (a client trickling bytes holds nothing for long)."""
    loop = asyncio.get_running_loop()
    start, buf = loop.time(), bytearray()
    while True:
        elapsed = loop.time() - start
        wait = min(BODY_GRACE_S + len(buf) / MIN_BODY_RATE, BODY_TIMEOUT_S) - elapsed
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):  # NOTE: not wait_for, which may swallow a cancel (router/attempts.py)
                chunk = await stream.readany()
        except TimeoutError:
            raise BodyTooSlow(f"the request body arrived too slowly ({len(buf)} bytes in {elapsed:.1f}s; at "
                              f"least {MIN_BODY_RATE // 1024} KiB/s after the first {BODY_GRACE_S:g}s, all within "
                              f"{BODY_TIMEOUT_S:g}s)") from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_BODY_BYTES:
            raise BodyTooLarge(len(buf))


class Bodies:
    """The gateway's upload slots and body reader."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)
        self._clients: dict[str, _ClientGate] = {}  # upload slots by client address

    async def read(self, request: web.Request) -> bytes:
        """The body: at most `MAX_BODY_BYTES` (a larger declared length is refused before a byte is read),
        arriving at `MIN_BODY_RATE` after the first `BODY_GRACE_S` and whole within `BODY_TIMEOUT_S`.
        At most `MAX_CONCURRENT_UPLOADS` bodies are read at once, `MAX_UPLOADS_PER_CLIENT` of them from
        one address; more wait their turn (a 429 after `BODY_TIMEOUT_S`). So slow or huge uploads
        cannot hold the gateway's memory, and one client's cannot starve the others'."""
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise BodyTooLarge(request.content_length)
        client = request.remote or ""
        gate = self._clients.get(client)
        if gate is None:
            gate = self._clients[client] = _ClientGate(asyncio.Semaphore(MAX_UPLOADS_PER_CLIENT))
        gate.users += 1
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):  # NOTE: waiting for a slot only; reading has its own limits
                await gate.slots.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    gate.slots.release()
                    raise
        except BaseException as exc:
            self._leave(client, gate)
            if isinstance(exc, TimeoutError):
                raise RouterError(ErrorCode.TOO_MANY_REQUESTS, "too many request bodies are being uploaded at once",
                                  retry_after=1) from None
            raise
        try:
            return await _read_body(request.content)
        finally:
            self._slots.release()
            gate.slots.release()
            self._leave(client, gate)

    def _leave(self, client: str, gate: _ClientGate) -> None:
        gate.users -= 1
        if not gate.users:
            del self._clients[client]

    async def decode(self, body: bytes, kind):
        """`decode_body`, in a worker thread when the body is large (the event loop keeps serving)."""
        if len(body) <= PARSE_OFF_LOOP:
            return openai_protocol.decode_body(body, kind)
        return await asyncio.get_running_loop().run_in_executor(None, openai_protocol.decode_body, body, kind)

    async def parse(self, request: web.Request, kind):
        """The request's body read under the limits, then decoded as `kind`."""
        return await self.decode(await self.read(request), kind)
