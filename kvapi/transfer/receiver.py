"""`KVReceiver`: the receiving end of every transport, one per engine.

It listens on a TCP control socket, checks each incoming transfer against the
tickets the engine opened (live ticket, matching secret, only that ticket's blocks,
same `KVSpec`, a transport it offers), then lets that `Transport` take the pages
(`Transport.receive`): streamed on the socket (`tcp`), written by the sender into the
pool (`shm`, `nixl`) or tagged UCX messages (`ucx`).

Threading: one handshake thread (a selector over the listening socket and every connection that
has not introduced itself yet) plus one thread per accepted transfer; `open_ticket` and `revoke`
may be called from any thread. `on_done` runs on the transfer's thread.

Hostile peers hold nothing: a connection costs a file descriptor and a few bytes until its `Hello`
(at most `HELLO_LIMIT` bytes) is whole, which must happen within `handshake_timeout` of the
connect (a deadline on the whole hello, not per read: a hello trickled a byte at a time is cut).
At most `max_handshakes` connections may be introducing themselves at once, `max_per_peer` of
them from one address; past either bound the *oldest* such connection is closed, so a flood of
idle connections churns through the bound while a real sender, whose hello follows its connect at
once, gets through. A transfer slot (`max_connections`) is taken only once the hello names a live
ticket with its secret. Only then does the reply say anything about this receiver (its pool).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvapi.spec import KVSpec, KVSpecMismatch
from kvapi.transfer.base import (
    FALLBACK,
    Hello,
    Reply,
    TransferError,
    TransferOutcome,
    Transport,
    decode_msg,
    send_msg,
    transport_class,
    tune,
)

log = logging.getLogger(__name__)

HELLO_LIMIT = 1 << 20  # bytes: a hello of ~200k block ids
ACCEPT_BATCH = 32  # connections accepted per turn of the handshake loop (then hellos are read again)
_LEN = struct.Struct("!I")


@dataclass(eq=False)
class _Pending:
    """A connection that has not introduced itself yet."""

    conn: socket.socket
    peer: str
    deadline: float
    buf: bytearray
    need: int = _LEN.size  # bytes wanted before the next step: the length prefix, then the whole frame


@dataclass
class _Ticket:
    secret: str
    blocks: frozenset[int]
    on_done: Callable[[TransferOutcome], None]
    active: bool = False
    revoked: bool = False
    conn: socket.socket | None = None
    mode: str = ""


@dataclass
class Incoming:
    """One accepted transfer, as a `Transport.receive` sees it."""

    conn: socket.socket  # the sender's control connection (closes when the sender dies or gives up)
    hello: Hello
    ticket: _Ticket
    expected: int  # bytes the ticket's blocks take over every layer
    stall_timeout: float  # seconds the data may stall before the transfer fails
    grace: float  # how often to say that a revoked one-sided writer has still not stopped

    @property
    def secret(self) -> str:
        return self.ticket.secret

    def stopped(self) -> str | None:
        """Why to give up now: the ticket was revoked, or the sender's connection closed."""
        if self.ticket.revoked:
            return "ticket revoked (lease expired or request aborted)"
        with contextlib.suppress(OSError):
            if select.select([self.conn], [], [], 0)[0] and not self.conn.recv(1, socket.MSG_PEEK):
                return "sender went away"
        return None

    def wait_sender_closed(self) -> None:
        """After telling a one-sided writer to stop (our side of the connection shut): wait until it
        closed its side, which it does only once nothing it posted can land. No deadline: a writer
        that is alive but frozen keeps the ticket's blocks out of use until it resumes (a warning
        every `grace` seconds says so); a dead host's connection fails by TCP keepalive (`tune`)."""
        waited = 0.0
        with contextlib.suppress(OSError):
            while True:
                if select.select([self.conn], [], [], self.grace)[0]:
                    if not self.conn.recv(65536):
                        return
                    continue
                waited += self.grace
                log.warning("kv receiver: the writer of ticket %s has not stopped after %.0fs; its blocks stay "
                            "out of use until it does", self.hello.ticket_id, waited)


class KVReceiver:
    """Accept KV pages into `pool` (`[layers, 2, blocks, block_size, heads, dim]`) for open tickets.

    Args:
        pool: the engine's KV cache tensor.
        spec: its layout; senders must match it field by field.
        host, port: where the control socket listens (port 0: any free port).
        shm_path: the file backing `pool` when it lives in shared memory ("" if not).
        timeout: seconds a revoked one-sided writer may take to stop before a warning says so.
        stall_timeout: seconds the data of an accepted transfer may stall (the sender
            may still be prefilling) before the transfer is failed.
        max_connections: transfers served at once; more are refused ("overloaded").
        ucx: also accept pages over UCX (needs `ucxx`).
        handshake_timeout: seconds from connect within which a connection's whole hello must arrive.
        max_handshakes: connections allowed to be introducing themselves at once (past it, the oldest is closed).
        nixl: also accept one-sided NIXL writes into the pool (needs `nixl-cu12`).
        transports: the transports to offer, by name (overrides shm_path/ucx/nixl; tcp always).
        best_effort: a transport that fails to start (say NIXL cannot register this pool) is left
            out with a warning instead of failing the receiver (`--transport auto`).
        max_per_peer: of `max_handshakes`, how many one address may hold.
    """

    def __init__(self, pool: torch.Tensor, spec: KVSpec, host: str = "127.0.0.1", port: int = 0,
                 shm_path: str = "", timeout: float = 30.0, stall_timeout: float = 300.0,
                 max_connections: int = 64, ucx: bool = False, handshake_timeout: float = 5.0,
                 max_handshakes: int = 256, nixl: bool = False, transports: list[str] | None = None,
                 best_effort: bool = False, max_per_peer: int = 128) -> None:
        self.pool, self.spec, self.shm_path = pool, spec, shm_path
        self.timeout, self.stall_timeout, self.handshake_timeout = timeout, stall_timeout, handshake_timeout
        self.max_handshakes, self.max_per_peer = max_handshakes, min(max_per_peer, max_handshakes)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=512)
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the handshake loop
        port = self._sock.getsockname()[1]
        self.endpoint = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_handshakes = 0  # connections closed before a valid hello (idle, slow, garbage, evicted)
        if transports is None:
            transports = [name for name, on in (("shm", bool(shm_path)), ("ucx", ucx), ("nixl", nixl)) if on]
        self.transports: dict[str, Transport] = {}
        for name in dict.fromkeys([*transports, FALLBACK]):
            try:
                self.transports[name] = transport_class(name)(pool, spec, host=host.strip("[]"), shm_path=shm_path)
            except Exception as exc:  # NOTE: each library fails its own way (nixl, ucxx bindings)
                if not best_effort or name == FALLBACK:
                    raise
                log.warning("kv receiver: transport %s could not start (%s); it is not offered", name, exc)
        self.fields: dict = {"offers": {}}  # what this receiver puts in every KVAddr
        for t in self.transports.values():
            offer = t.offer()
            self.fields["offers"].update(offer.pop("offers", {}))
            self.fields.update(offer)
        self.ucx_address = self.fields.get("ucx_address", "")
        self.bytes_received = 0
        threading.Thread(target=self._handshake_loop, name="kv-recv-handshake", daemon=True).start()

    # -- tickets ------------------------------------------------------------------
    def open_ticket(self, ticket_id: str, secret: str, block_ids: list[int],
                    on_done: Callable[[TransferOutcome], None]) -> None:
        with self._lock:
            self._tickets[ticket_id] = _Ticket(secret, frozenset(block_ids), on_done)

    def revoke(self, ticket_id: str) -> bool:
        """Close a ticket. False when a transfer is writing into it right now: that
        transfer is stopped and its `on_done` (ok=False) tells when the blocks are free."""
        with self._lock:
            t = self._tickets.get(ticket_id)
            if t is not None and t.active:
                t.revoked = True
                if t.conn is not None:
                    self.transports[t.mode].interrupt(t.conn)
                return False
            self._tickets.pop(ticket_id, None)
            return True

    def is_active(self, ticket_id: str) -> bool:
        with self._lock:
            t = self._tickets.get(ticket_id)
            return t is not None and t.active

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for t in self.transports.values():
            t.close()

    # -- handshakes -------------------------------------------------------------------
    def _handshake_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        pending: dict[socket.socket, _Pending] = {}  # insertion order: oldest first
        per_peer: Counter[str] = Counter()

        def drop(p: _Pending) -> None:
            pending.pop(p.conn, None)
            per_peer[p.peer] -= 1
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(p.conn)
            with contextlib.suppress(OSError):
                p.conn.close()

        def advance(p: _Pending) -> None:
            """Read what has arrived of `p`'s hello; once it is whole, hand the connection on."""
            try:
                data = p.conn.recv(p.need - len(p.buf))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.refused_handshakes += 1
                drop(p)
                return
            p.buf += data
            if len(p.buf) < p.need:
                return
            if p.need == _LEN.size:
                (n,) = _LEN.unpack(p.buf)
                if n > HELLO_LIMIT:  # refused before anything is allocated
                    self.refused_handshakes += 1
                    drop(p)
                    return
                p.need += n
                if n:
                    return
            pending.pop(p.conn)
            per_peer[p.peer] -= 1
            sel.unregister(p.conn)
            self._introduced(p.conn, bytes(p.buf[_LEN.size:]))

        while not self._closed:
            now = time.monotonic()
            for p in [p for p in pending.values() if p.deadline <= now]:  # the whole hello is late
                self.refused_handshakes += 1
                drop(p)
            timeout = max(0.0, min(p.deadline for p in pending.values()) - now) if pending else None
            accept = False
            for key, _ in sel.select(timeout):
                if key.fileobj is self._sock:
                    accept = True
                elif key.fileobj is self._wake_r:
                    break
                elif (p := pending.get(key.fileobj)) is not None:  # type: ignore[call-overload]
                    advance(p)
            if not accept or self._closed:
                continue
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, peer = self._sock.accept()
                except BlockingIOError:
                    break
                except OSError:
                    if self._closed:
                        break
                    log.exception("kv receiver: accept failed")
                    time.sleep(0.01)
                    break
                conn.setblocking(False)
                p = _Pending(conn, peer[0], time.monotonic() + self.handshake_timeout, bytearray())
                for bound, group in ((self.max_per_peer, p.peer), (self.max_handshakes, None)):
                    held = per_peer[p.peer] if group is not None else len(pending)
                    if held >= bound:  # full: the oldest introduction makes room (a real one is never old)
                        oldest = next(q for q in pending.values() if group is None or q.peer == group)
                        self.refused_handshakes += 1
                        drop(oldest)
                pending[conn] = p
                per_peer[p.peer] += 1
                sel.register(conn, selectors.EVENT_READ)
                advance(p)  # a real sender's hello is usually here already
        for p in list(pending.values()):
            drop(p)
        sel.close()
        for sock in (self._sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    def _introduced(self, conn: socket.socket, frame: bytes) -> None:
        """A whole hello arrived on `conn`: claim its ticket and a slot, then serve it on a thread of
        its own, or refuse it (the reply names no pool path)."""
        conn.setblocking(True)
        try:
            hello = decode_msg(frame)
        except TransferError:
            hello = None
        if not isinstance(hello, Hello):
            self.refused_handshakes += 1
            self._refuse(conn, "bad_request", "expected a hello")
            return
        ticket, code, error = self._claim(hello, conn)
        if ticket is not None and not self._slots.acquire(blocking=False):
            with self._lock:
                ticket.active, ticket.conn = False, None
            ticket, code, error = None, "overloaded", "too many KV transfers in flight; retry later"
        if ticket is None:
            self._refuse(conn, code, error)
            return
        threading.Thread(target=self._serve, args=(conn, hello, ticket), name="kv-recv", daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket, code: str, error: str) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(1.0)  # NOTE: a few bytes into an empty socket buffer: never blocks for long
            send_msg(conn, Reply(False, code, error))

    def _claim(self, hello: Hello, conn: socket.socket) -> tuple[_Ticket | None, str, str]:
        bs = self.spec.block_size
        with self._lock:
            t = self._tickets.get(hello.ticket_id)
            if t is None:
                return None, "not_found", f"unknown or expired ticket {hello.ticket_id!r}"
            if not hmac.compare_digest(t.secret.encode(), hello.secret.encode()):
                return None, "forbidden", "ticket secret does not match"
            if t.active:
                return None, "bad_request", "this ticket already has a transfer in flight"
            try:
                self.spec.check_compatible(hello.spec)
            except KVSpecMismatch as exc:
                return None, "kv_spec_mismatch", str(exc)
            if len(set(hello.block_ids)) != len(hello.block_ids) or not t.blocks.issuperset(hello.block_ids):
                return None, "forbidden", "the transfer names blocks outside its ticket"
            if not 0 <= hello.begin < hello.end or len(hello.block_ids) != -(-hello.end // bs) - hello.begin // bs:
                n = len(hello.block_ids)
                return None, "bad_request", f"range [{hello.begin}, {hello.end}) does not fit {n} blocks"
            if hello.mode not in self.transports:
                return None, "bad_request", f"transport {hello.mode!r} is not offered by this receiver"
            if self.transports[hello.mode].needs_shared_pool and hello.pool != self.shm_path:
                # NOTE: refused before the ticket is taken: a wrong address must not end a live ticket
                return None, "forbidden", "the transfer names another shared pool than this receiver serves"
            t.active, t.conn, t.mode = True, conn, hello.mode
            return t, "", ""

    def _serve(self, conn: socket.socket, hello: Hello, ticket: _Ticket) -> None:
        with conn:
            try:
                with contextlib.suppress(OSError):
                    send_msg(conn, Reply(True, shm_path=self.shm_path))
                conn.settimeout(self.stall_timeout)
                tune(conn)
                done = self._receive(conn, hello, ticket)
            finally:  # NOTE: free before the final reply, or a sender's next transfer finds this one's slot taken
                self._slots.release()
            with contextlib.suppress(OSError):
                send_msg(conn, done)

    def _receive(self, conn: socket.socket, hello: Hello, ticket: _Ticket) -> Reply:  # the final reply
        t0, nbytes = time.perf_counter(), 0
        expected = len(hello.block_ids) * self.spec.page_bytes * 2 * self.spec.num_layers
        outcome = TransferOutcome(hello.ticket_id, False, hello.begin, hello.end)
        try:
            link = Incoming(conn, hello, ticket, expected, self.stall_timeout, self.timeout)
            nbytes = self.transports[hello.mode].receive(link)
            if ticket.revoked:
                raise TransferError("ticket revoked (lease expired or request aborted)", "aborted")
            outcome.ok, outcome.nbytes = True, nbytes
        except (OSError, TransferError) as exc:
            outcome.error = str(exc)
        except Exception as exc:  # NOTE: a bug here must still end the ticket, or its blocks stay held forever
            log.exception("kv receiver: transfer into ticket %s failed", hello.ticket_id)
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.seconds = time.perf_counter() - t0
        with self._lock:
            self._tickets.pop(hello.ticket_id, None)
            ticket.active, ticket.conn = False, None
        if outcome.ok:
            self.bytes_received += nbytes
        try:
            ticket.on_done(outcome)
        except Exception:  # the engine's hook must not kill the receiver
            log.exception("kv receiver: on_done hook failed")
        return Reply(outcome.ok, "" if outcome.ok else "transfer_failed", outcome.error)
