"""The borrower's side of its lenders (DistAttention), as the engine's step thread uses them.

    step thread                          service loop                    lender engine
    ─────────────────────────────────    ─────────────────────────────   ───────────────────────────
    range computed ─> write ──────────────── KV plane (any transport) ──> the lent ticket's blocks
    layer l: attend(q rows) ─> Future ─> ZMQ call `attend` ─────────────> range_attention ─> (out, lse)
             local parts run here meanwhile; the merge waits for the Future

A lender's failure surfaces as an exception from `write` or from the Future: the engine then ends
that sequence alone with an `unavailable` error naming the range.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import torch

from microserve import protocol as P
from microserve.router.transport import CallTimeout, CallUnavailable, ZMQTransport
from microserve.serving.api import EngineError, ErrorCode
from microserve.serving.kv_plane import KVPlane

ATTEND_TIMEOUT_S = 5.0  # an attend answers in milliseconds; a lender silent this long is lost (its borrower fails)


class RemoteLender:
    """One lent range: `write(seq, begin, end)` sends its KV into the lent blocks (blocking: the step
    thread); `attend(layer, positions, q, scale, more)` returns a Future of `(out, lse)` from the lender,
    over this range and those of the peers in `more` (other ranges of the request on the same lender).

    Args:
        ticket: the lender's `LendTicket` (its `kv` names the range and the secret; `rpc` the engine).
        plane: this engine's KV plane (its sender reads our pages).
        rpc: the lender's RPC channel (shared by every range on that engine).
        loop: the service's event loop, where the RPC runs.
        timeout: seconds one attend may take (at most ATTEND_TIMEOUT_S).
    """

    def __init__(self, ticket: P.LendTicket, plane: KVPlane, rpc: ZMQTransport, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.kv, self.plane, self.rpc, self.loop = ticket.kv, plane, rpc, loop
        self.begin, self.end = ticket.kv.begin, ticket.kv.end
        self.lender = ticket.rpc  # ranges on one lender are attended in one message per layer
        self.timeout = min(timeout, ATTEND_TIMEOUT_S)

    def write(self, seq, begin: int, end: int) -> None:
        try:
            self.plane.sender.send(self.kv, begin, end, lambda: seq.block_table, self.plane.pick(self.kv, None))
        except Exception as exc:
            raise EngineError(ErrorCode.UNAVAILABLE, f"lender {self.kv.engine_id}: {exc}") from exc

    def attend(self, layer: int, positions: torch.Tensor, q: torch.Tensor, scale: float,
               more: list[RemoteLender] = ()) -> Future:
        """`more`: other ranges of the request on the same lender (one message, one merged part back)."""
        msg = P.Attend(self.kv.ticket_id, self.kv.secret, layer, positions.tolist(), raw(q), scale,
                       [P.LentRef(p.kv.ticket_id, p.kv.secret) for p in more])
        return asyncio.run_coroutine_threadsafe(self._attend(msg, q.shape, q.dtype), self.loop)

    async def _attend(self, msg: P.Attend, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            reply = await self.rpc.roundtrip(msg, self.timeout)
        except (CallTimeout, CallUnavailable) as exc:
            raise EngineError(ErrorCode.UNAVAILABLE, f"lender {self.kv.engine_id} did not answer attend within "
                              f"{self.timeout:g}s") from exc
        if isinstance(reply, P.RPCError):
            raise EngineError(ErrorCode.of(reply.code), f"lender {self.kv.engine_id}: {reply.message}")
        if not isinstance(reply, P.AttendReply) or len(reply.out) != shape.numel() * dtype.itemsize:
            raise EngineError(ErrorCode.INTERNAL, f"lender {self.kv.engine_id} answered attend with a wrong reply")
        out = torch.frombuffer(bytearray(reply.out), dtype=dtype).view(shape)
        return out, torch.frombuffer(bytearray(reply.lse), dtype=torch.float32).view(shape[:2])


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, row-major, from the host (any dtype, bfloat16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
