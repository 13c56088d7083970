"""`KVReceiver`: the receiving end of every transport, one per engine.

It listens on a TCP control socket, checks each incoming transfer against the
tickets the engine opened (live ticket, matching secret, only that ticket's blocks,
same `KVSpec`, a transport it offers), then lets that `Transport` take the pages
(`Transport.receive`): streamed on the socket (`tcp`), written by the sender into the
pool (`shm`, `nixl`) or tagged UCX messages (`ucx`).

Threading: one accept thread plus one thread per connection; `open_ticket` and
`revoke` may be called from any thread. `on_done` runs on the connection thread.

Hostile peers: a connection must introduce itself (`Hello`, at most `HELLO_LIMIT` bytes) within
`handshake_timeout`, and at most `max_handshakes` connections may be doing so at once (more are
closed at once); a transfer slot (`max_connections`) is taken only once the hello names a live
ticket with its secret. So idle or garbage connections never starve real transfers.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import select
import socket
import threading
import time
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
    recv_msg,
    send_msg,
    transport_class,
    tune,
)

log = logging.getLogger(__name__)

HELLO_LIMIT = 1 << 20  # bytes: a hello of ~200k block ids


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
        timeout: seconds a connection may take to introduce itself.
        stall_timeout: seconds the data of an accepted transfer may stall (the sender
            may still be prefilling) before the transfer is failed.
        max_connections: transfers served at once; more are refused ("overloaded").
        ucx: also accept pages over UCX (needs `ucxx`).
        handshake_timeout: seconds a new connection has to send its hello.
        max_handshakes: connections allowed to be introducing themselves at once.
        nixl: also accept one-sided NIXL writes into the pool (needs `nixl-cu12`).
        transports: the transports to offer, by name (overrides shm_path/ucx/nixl; tcp always).
        best_effort: a transport that fails to start (say NIXL cannot register this pool) is left
            out with a warning instead of failing the receiver (`--transport auto`).
    """

    def __init__(self, pool: torch.Tensor, spec: KVSpec, host: str = "127.0.0.1", port: int = 0,
                 shm_path: str = "", timeout: float = 30.0, stall_timeout: float = 300.0,
                 max_connections: int = 64, ucx: bool = False, handshake_timeout: float = 5.0,
                 max_handshakes: int = 256, nixl: bool = False, transports: list[str] | None = None,
                 best_effort: bool = False) -> None:
        self.pool, self.spec, self.shm_path = pool, spec, shm_path
        self.timeout, self.stall_timeout, self.handshake_timeout = timeout, stall_timeout, handshake_timeout
        self._handshakes = threading.BoundedSemaphore(max_handshakes)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)
        port = self._sock.getsockname()[1]
        self.endpoint = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._slots = threading.BoundedSemaphore(max_connections)
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
        threading.Thread(target=self._accept_loop, name="kv-recv-accept", daemon=True).start()

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
            self._sock.close()
        for t in self.transports.values():
            t.close()

    # -- connections ----------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):  # a flood of connections: drop the newest
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            threading.Thread(target=self._serve_slot, args=(conn,), name="kv-recv", daemon=True).start()

    def _serve_slot(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.handshake_timeout)
                hello = recv_msg(conn, HELLO_LIMIT)
            except (OSError, TransferError) as exc:
                log.info("kv receiver: no valid hello (%s); connection closed", exc)
                return
            finally:
                self._handshakes.release()
            if not isinstance(hello, Hello):
                with contextlib.suppress(OSError):
                    send_msg(conn, Reply(False, "bad_request", "expected a hello"))
                return
            self._serve(conn, hello)

    def _claim(self, hello: Hello, conn: socket.socket) -> tuple[_Ticket | None, str, str]:
        bs = self.spec.block_size
        with self._lock:
            t = self._tickets.get(hello.ticket_id)
            if t is None:
                return None, "not_found", f"unknown or expired ticket {hello.ticket_id!r}"
            if not hmac.compare_digest(t.secret.encode(), hello.secret.encode()):
                return None, "forbidden", "ticket secret does not match"
            if t.active:
                return None, "conflict", "this ticket already has a transfer in flight"
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
            t.active, t.conn, t.mode = True, conn, hello.mode
            return t, "", ""

    def _serve(self, conn: socket.socket, hello: Hello) -> None:
        ticket, code, error = self._claim(hello, conn)
        if ticket is not None and not self._slots.acquire(blocking=False):
            with self._lock:
                ticket.active, ticket.conn = False, None
            ticket, code, error = None, "overloaded", "too many KV transfers in flight; retry later"
        with contextlib.suppress(OSError):
            send_msg(conn, Reply(ticket is not None, code, error, self.shm_path))
        if ticket is None:
            return
        try:
            conn.settimeout(self.stall_timeout)
            tune(conn)
            self._receive(conn, hello, ticket)
        finally:
            self._slots.release()

    def _receive(self, conn: socket.socket, hello: Hello, ticket: _Ticket) -> None:
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
        with contextlib.suppress(OSError):
            send_msg(conn, Reply(outcome.ok, "" if outcome.ok else "transfer_failed", outcome.error))
