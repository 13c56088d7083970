"""The lender's side of DistAttention's `attend`: its own socket, answered on a thread of its own.

    borrower step thread ──Attend──> ROUTER (attend socket) ── attend thread: check the tickets,
                                                                compute the part, reply
                                     └─ a range whose KV is still arriving: `dispatch` on the loop

A borrower sends one `attend` per lender, layer and step, and its next layer waits for the reply, so
the round trip is on the critical path of every step. On the RPC socket the call would cross the
engine's asyncio loop (a wake-up, a task, a GIL handoff to and from the loop's thread: ~0.2 ms on
loopback here, as much as the socket itself). The attend thread blocks on its socket with the GIL
released, checks the tickets (reads of the ticket book; a used range's lease is renewed through
`used_at`, which the expiry timer on the loop reads), computes the part with the backend's blocking
`attend_range` (it reads only the lent blocks, which no step writes) and replies. It answers nothing
but `attend`. The socket is bound on the RPC socket's host, a CURVE server under the cluster key like
the RPC socket (same ZeroMQ context, so the same ZAP handler admits only key holders); `lend` names it
in `LendTicket.attend`. The RPC socket still answers `attend` too (`EngineHandle.attend`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import msgspec
import zmq
import zmq.asyncio

from microserve import protocol
from microserve.serving.api import EngineError, ErrorCode, dispatch
from microserve.serving.tickets import ARRIVAL_GRACE_S, lent_groups

log = logging.getLogger(__name__)


def answer_attend(service, call: protocol.Attend, ready_only: bool) -> protocol.AttendReply | None:
    """The reply to `call` (blocking: the part is computed here). None with `ready_only` when a range's KV
    is still arriving. Raises EngineError as `EngineAPI.attend` documents."""
    spec = service.kv_spec
    if not 0 <= call.layer < spec.num_layers:
        raise EngineError(ErrorCode.BAD_REQUEST, f"layer {call.layer} is outside [0, {spec.num_layers})")
    resolved = lent_groups(service.tickets, call, ready_only)
    if resolved is None:
        return None
    groups, errors = resolved
    service.attends_served += 1
    out, lse = service.backend.attend_range(groups, call.layer, call.positions, call.q, call.scale)
    return protocol.AttendReply(out, lse, errors if call.others else [])


class AttendServer:
    """The attend socket and its thread. `address`: where it listens (for `LendTicket.attend`).

    Args:
        service: the engine's `EngineService`.
        ctx: the engine's ZeroMQ context (its ZAP handler secures this socket too).
        rpc_addr: the RPC socket's bound address (this one binds on its host).
        key: the cluster key (None: --insecure).
        loop: the service's loop, for calls that must wait there.
    """

    def __init__(self, service, ctx: zmq.asyncio.Context, rpc_addr: str, key, loop: asyncio.AbstractEventLoop) -> None:
        self.service, self.loop = service, loop
        self._ctx = zmq.Context.shadow(ctx.underlying)
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if key is not None:
            key.secure_server(self.sock)
        self.sock.bind(rpc_addr.rsplit(":", 1)[0] + ":*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="attend", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self.sock
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(zmq.NOBLOCK)
                if len(frames) not in (3, 4):  # [ident, call_id, body] (a traceparent may follow: ignored)
                    continue
                reply = self._answer(frames[2])
                with contextlib.suppress(zmq.ZMQError):  # the borrower went away (ROUTER_MANDATORY)
                    sock.send_multipart([frames[0], frames[1], protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # NOTE: the context is ending under us (shutdown)
            if not self._stop.is_set():
                log.error("attend socket failed: %s", exc)
        finally:
            sock.close(0)

    def _answer(self, body: bytes) -> msgspec.Struct:
        try:
            call = protocol.decode_call(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return protocol.RPCError(ErrorCode.BAD_REQUEST, f"malformed call: {exc}")
        if not isinstance(call, protocol.Attend):
            return protocol.RPCError(ErrorCode.BAD_REQUEST,
                                     "this socket answers attend only (others: the engine's --rpc)")
        try:
            reply = answer_attend(self.service, call, ready_only=True)
            if reply is None:  # NOTE: a range's KV is still arriving: the loop waits for it (rare: the first layer)
                reply = asyncio.run_coroutine_threadsafe(dispatch(self.service, call), self.loop).result(
                    ARRIVAL_GRACE_S + 5.0)
            return reply
        except EngineError as exc:
            return protocol.RPCError(exc.code, str(exc), exc.peer)
        except Exception as exc:  # NOTE: a bug must not end the thread: the borrower gets an error
            log.exception("attend failed")
            return protocol.RPCError(ErrorCode.INTERNAL, f"attend failed: {exc!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
