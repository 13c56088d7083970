"""The borrower's side of its lenders (DistAttention), as the engine's step thread uses them.

    step thread                                                      lender engine
    ───────────────────────────────────────────────────────────      ─────────────────────────────────
    range computed ─> write ─────────── KV plane (any transport) ──> the lent ticket's blocks
    layer l: attend(q rows) ─> send ─── LenderChannel (ZeroMQ) ────> its attend thread: the part
             the batch's local attention runs here meanwhile         (serving/attend_server.py)
             result() <─ (out, lse) <────────────────────────────────┘

One attend message per lender and layer carries the rows of every borrowing request of the step that
uses that lender (`attend`). It goes out and comes back on the step thread's own socket, not through
the service's event loop: a hop to another thread costs a GIL handoff each way (up to the 5 ms switch
interval while the step thread computes), and there is one round trip per layer and step.

A lender's failure surfaces as an exception from `write` or from `result()`: the engine then ends
that sequence alone with an `unavailable` error naming the range, and the lender as its `peer` (the
router checks that engine and fails the request over without it).
"""

from __future__ import annotations

import itertools
import os
import time

import msgspec
import torch
import zmq

from microserve import protocol
from microserve.security import ClusterKey
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.kv_plane import KVPlane

ATTEND_TIMEOUT_S = 5.0  # an attend answers in milliseconds; a lender silent this long is lost (its borrower fails)
_context: zmq.Context | None = None  # NOTE: our own: `zmq.Context.instance()` may be the loop's asyncio context


def _sync_context() -> zmq.Context:
    global _context
    if _context is None:
        _context = zmq.Context()
    return _context


class LenderChannel:
    """A blocking DEALER socket to one lender's attend socket (`LendTicket.attend`, else its `--rpc`; a
    CURVE client under the cluster key), used by the step thread alone. `send` returns at once;
    `receive` waits for that call's reply (others that arrive first are kept for their own `receive`),
    so several attends can be in flight at once."""

    def __init__(self, address: str, cluster_key: ClusterKey | None = None) -> None:
        self.address, self.cluster_key = address, cluster_key
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)
        self._waiting: dict[bytes, bytes | None] = {}  # call id -> its reply once it came
        self.calls, self.seconds = 0, 0.0  # attends answered on this channel, their round trips summed

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = _sync_context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.cluster_key is not None:
                self.cluster_key.secure_client(sock)
            sock.connect(self.address)
            self._sock = sock
        return self._sock

    def send(self, msg: protocol.Call, timeout: float) -> bytes:
        """Send `msg`; its call id. Raises TimeoutError when the lender takes nothing for `timeout` s
        (a DEALER holds messages only once a peer is connected)."""
        sock = self._socket()
        call_id = self._prefix + next(self._ids).to_bytes(8, "little")
        if not sock.poll(timeout * 1e3, zmq.POLLOUT):
            raise TimeoutError(f"no connection to {self.address} within {timeout:g}s")
        sock.send_multipart([call_id, protocol.encode(msg)], zmq.NOBLOCK)
        self._waiting[call_id] = None
        return call_id

    def receive(self, call_id: bytes, deadline: float) -> protocol.Reply:
        """The reply to `call_id` (an `RPCError` too). Raises TimeoutError past `deadline` (monotonic)."""
        try:
            while self._waiting[call_id] is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(left * 1e3, zmq.POLLIN):  # type: ignore[union-attr]
                    raise TimeoutError("no reply")
                frames = self._sock.recv_multipart(zmq.NOBLOCK)  # type: ignore[union-attr]
                if len(frames) == 2 and frames[0] in self._waiting:  # NOTE: a late reply to a given-up call: dropped
                    self._waiting[frames[0]] = frames[1]
            body = self._waiting[call_id]
        finally:
            self._waiting.pop(call_id, None)
        try:
            return protocol.decode_reply(body)  # type: ignore[arg-type]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return protocol.RPCError(ErrorCode.INTERNAL, f"undecodable reply: {exc}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


class RemoteLender:
    """One lent range: `write(seq, begin, end)` sends its KV into the lent blocks (blocking: the step
    thread); `attend(layer, scale, asks)` sends one message to its lender with a whole step's rows.

    Args:
        ticket: the lender's `LendTicket` (its `kv` names the range and the secret; `rpc` the engine).
        plane: this engine's KV plane (its sender reads our pages).
        channel: the step thread's socket to the lender (shared by every range on that engine).
        timeout: seconds one attend may take (at most ATTEND_TIMEOUT_S).
    """

    def __init__(self, ticket: protocol.LendTicket, plane: KVPlane, channel: LenderChannel, timeout: float) -> None:
        self.kv, self.plane, self.channel = ticket.kv, plane, channel
        self.begin, self.end = ticket.kv.begin, ticket.kv.end
        self.lender = ticket.rpc  # ranges on one lender are attended in one message per layer
        self.timeout = min(timeout, ATTEND_TIMEOUT_S)

    def attend(self, layer: int, scale: float, asks: list[tuple[list[RemoteLender], torch.Tensor, torch.Tensor]]
               ) -> list[Part]:
        """`attend` below, to this range's lender (the model's way in: it does not import this layer)."""
        return attend(layer, scale, asks)

    def write(self, seq, begin: int, end: int) -> None:
        try:
            self.plane.sender.send(self.kv, begin, end, lambda: seq.block_table, self.plane.pick(self.kv, None))
        except Exception as exc:
            raise EngineError(ErrorCode.UNAVAILABLE, f"lender {self.kv.engine_id}: {exc}", self.kv.engine_id) from exc


def attend(layer: int, scale: float, asks: list[tuple[list[RemoteLender], torch.Tensor, torch.Tensor]]) -> list[Part]:
    """Send one message to one lender with the rows of every request in `asks`: `(ranges, positions,
    q)` per request, `ranges` its lent ranges on that lender (the first names the lender). Returns at
    once, one `Part` per request, whose `result()` waits for `(out, lse)` over its ranges."""
    (first, pos0, q0), others = asks[0], asks[1:]
    qs = torch.cat([q for _, _, q in asks]) if others else q0
    positions = [p for _, pos, _ in asks for p in pos.tolist()] if others else pos0.tolist()
    msg = protocol.Attend(first[0].kv.ticket_id, first[0].kv.secret, layer, positions, raw(qs), scale,
                          _refs(first[1:]),
                          [protocol.AttendRows(g[0].kv.ticket_id, g[0].kv.secret, len(pos), _refs(g[1:]))
                    for g, pos, _ in others])
    pending = PendingAttend(first[0], msg, [len(pos) for _, pos, _ in asks], qs.shape, qs.dtype)
    return [Part(pending, k) for k in range(len(asks))]


def _refs(ranges: list[RemoteLender]) -> list[protocol.LentRef]:
    return [protocol.LentRef(r.kv.ticket_id, r.kv.secret) for r in ranges]


class PendingAttend:
    """One attend message on its way (sent when made); `results()` waits once for the reply and splits it
    into each request's `(out, lse)`, or an EngineError for a request whose part failed."""

    def __init__(self, lender: RemoteLender, msg: protocol.Attend, rows: list[int], shape: torch.Size,
                 dtype: torch.dtype) -> None:
        self.lender, self.rows, self.shape, self.dtype = lender, rows, shape, dtype
        self.sent = time.monotonic()
        self.deadline = self.sent + lender.timeout
        self.call_id, self.error, self._results = b"", None, None
        try:
            self.call_id = lender.channel.send(msg, lender.timeout)
        except (TimeoutError, zmq.ZMQError) as exc:
            self.error = exc

    def results(self) -> list[tuple[torch.Tensor, torch.Tensor] | EngineError]:
        if self._results is None:
            try:
                self._results = self._receive()
            except EngineError as exc:
                self._results = [exc] * len(self.rows)
        return self._results

    def _receive(self) -> list[tuple[torch.Tensor, torch.Tensor] | EngineError]:
        lender = self.lender
        name = lender.kv.engine_id
        try:
            if self.error is not None:
                raise self.error
            reply = lender.channel.receive(self.call_id, self.deadline)
            lender.channel.calls += 1
            lender.channel.seconds += time.monotonic() - self.sent
        except (TimeoutError, zmq.ZMQError) as exc:
            raise EngineError(ErrorCode.UNAVAILABLE, f"lender {name} did not answer attend within "
                              f"{lender.timeout:g}s ({exc})", name) from exc
        if isinstance(reply, protocol.RPCError):
            raise EngineError(ErrorCode.of(reply.code), f"lender {name}: {reply.message}", name)
        many = len(self.rows) > 1
        if not isinstance(reply, protocol.AttendReply) or len(reply.out) != self.shape.numel() * self.dtype.itemsize \
                or len(reply.lse) != self.shape[0] * self.shape[1] * 4 \
                or len(reply.errors) != (len(self.rows) if many else 0):
            raise EngineError(ErrorCode.INTERNAL, f"lender {name} answered attend with a wrong reply", name)
        out = torch.frombuffer(bytearray(reply.out), dtype=self.dtype).view(self.shape)
        lse = torch.frombuffer(bytearray(reply.lse), dtype=torch.float32).view(self.shape[:2])
        if not many:
            return [(out, lse)]
        parts: list = []
        for part_out, part_lse, why in zip(out.split(self.rows), lse.split(self.rows), reply.errors):
            parts.append(EngineError(ErrorCode.UNAVAILABLE, f"lender {name}: {why}", name) if why
                         else (part_out, part_lse))
        return parts


class Part:
    """One request's share of a `PendingAttend`: `result()` is its `(out, lse)` or raises EngineError."""

    def __init__(self, pending: PendingAttend, index: int) -> None:
        self.pending, self.index = pending, index

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.pending.results()[self.index]
        if isinstance(got, EngineError):
            raise got
        return got


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, row-major, from the host (any dtype, bfloat16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
