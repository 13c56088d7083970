"""The seam of the KV data plane: the address of a receive ticket, the `Transport`
interface every way of moving pages implements, the registry of transports, the wire
messages of the control channel, framing, and page-run arithmetic.

One transfer moves the K and V pages of a token range `[begin, end)` of every layer
from the sender's block pool into blocks the receiver reserved for it:

    receiver (prep_recv)                     sender (remote_send)
    reserve blocks, open ticket ── KVAddr ──> check its signature, connect to KVAddr.endpoint
                                  <── Hello   (ticket id, secret, blocks, spec, mode)
    check ticket/secret/blocks/spec ─ Reply ─> Transport.writer(): per layer, as it is computed,
                                               Writer.write_layer() (tcp: stream the pages;
                                               shm/nixl: write them into the receiver's pool;
                                               ucx: tagged messages), then Writer.finish()
    Transport.receive() returns   <── (tcp: the last byte; shm: Commit; nixl: a notification
                                       bound to the ticket; ucx: the last message)
    ticket complete  ── Reply ──> done

The control connection is the fence of one-sided transports (shm, nixl): the receiver
gives a ticket's blocks back only once the sender's connection closed or the sender
reported the transfer finished, and a sender writes nothing after it saw the receiver
close its side (see docs/microserving.md, "The KV data plane").
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import os
import socket
import struct
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

from kvapi.spec import KVSpec

__all__ = ["TRANSPORTS", "KVAddr", "TransferError", "Transport", "Writer", "check_addr", "choose_transport",
           "host_id", "sign_addr", "transport_class"]

# The registry: one line per transport, "module:class", in the order `--transport auto` prefers
# them. Adding a transport is one module (a `Transport` subclass) plus one line here.
_REGISTRY = {
    "shm": "kvapi.transfer.shm:SharedMemoryTransport",
    "nixl": "kvapi.transfer.nixl:NixlTransport",
    "ucx": "kvapi.transfer.ucx:UCXTransport",
    "tcp": "kvapi.transfer.tcp:TCPTransport",
}
TRANSPORTS = tuple(_REGISTRY)
FALLBACK = TRANSPORTS[-1]  # always offered, the last resort of every pair


class TransferError(RuntimeError):
    """A KV transfer could not be done; `code` says why in one word, `peer` names the other
    engine when the failure is its (unreachable, stalled, gone)."""

    def __init__(self, message: str, code: str = "transfer_failed", peer: str = "") -> None:
        super().__init__(message)
        self.code, self.peer = code, peer


@dataclass
class TransferOutcome:
    """How a transfer into one ticket ended."""

    ticket_id: str
    ok: bool
    begin: int = 0
    end: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    error: str = ""


class KVAddr(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where and into which blocks a receiver accepts KV for one ticket.

    `block_ids[i]` is the receiver block holding tokens of logical block
    `begin // spec.block_size + i`; `begin` is block aligned (what the receiver had
    already cached) and `end` is where the ticket stops.
    """

    engine_id: str
    endpoint: str  # "host:port" of the receiver's KV control socket
    ticket_id: str
    secret: str
    begin: int
    end: int
    block_ids: list[int]
    spec: KVSpec
    transports: list[str] = msgspec.field(default_factory=lambda: ["tcp"])
    host_id: str = ""  # machine identity: shm only between engines with the same one
    shm_path: str = ""  # the receiver's page pool file when it lives in shared memory
    ucx_address: str = ""  # the receiver's UCX worker address (hex) when it offers ucx
    expiry: float = 0.0  # unix time the ticket's lease ends (0: not stated)
    offers: dict[str, bytes] = {}  # what other transports need to reach the receiver, by name (nixl)
    model: str = ""  # the receiver's model (its checkpoint's fingerprint): KV never crosses models
    signature: str = ""  # HMAC-SHA256 of every other field with the cluster's KV key (`sign_addr`)


def _addr_digest(addr: KVAddr, key: bytes) -> str:
    body = _encoder.encode(msgspec.structs.replace(addr, signature=""))
    return hmac.new(key, b"microserve-kvaddr-v1\x00" + body, hashlib.sha256).hexdigest()


def sign_addr(addr: KVAddr, key: bytes) -> KVAddr:
    """`addr` signed by a receiver holding the cluster's KV key."""
    return msgspec.structs.replace(addr, signature=_addr_digest(addr, key))


def check_addr(addr: KVAddr, key: bytes | None, now: float | None = None) -> None:
    """What a sender checks before it connects anywhere: the receiver signed `addr` with the
    cluster's KV key (so its endpoint, shm path and blocks are the receiver's own), and the lease
    has not ended. Without a key (an --insecure engine) nothing is checked. Raises TransferError."""
    if key is None:
        return
    if not addr.signature or not hmac.compare_digest(addr.signature.encode(), _addr_digest(addr, key).encode()):
        raise TransferError(f"the KV address of ticket {addr.ticket_id!r} is not signed with this cluster's key: "
                            "refused before any byte was written", "forbidden")
    if addr.expiry and (time.time() if now is None else now) > addr.expiry:
        raise TransferError(f"ticket {addr.ticket_id!r} has expired (its lease ended)", "not_found")


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    ticket_id: str
    secret: str
    mode: str
    spec: KVSpec
    block_ids: list[int]  # receiver blocks this transfer writes, in logical order
    begin: int
    end: int
    pool: str = ""  # the shared pool the ticket's address names (transports that write into it)


class Commit(msgspec.Struct, tag="commit", forbid_unknown_fields=True):
    nbytes: int


class Reply(msgspec.Struct, tag="reply", forbid_unknown_fields=True):
    ok: bool
    code: str = ""
    error: str = ""
    shm_path: str = ""  # the pool this receiver serves (the sender writes only into the one it answered for)


Message = Hello | Commit | Reply
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_LEN = struct.Struct("!I")
MAX_MESSAGE = 1 << 20  # a Hello names at most ~200k blocks; nothing bigger is allocated


def send_msg(sock: socket.socket, msg: Message) -> None:
    data = _encoder.encode(msg)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; raises ConnectionError when the peer goes away."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k


def recv_msg(sock: socket.socket, limit: int = MAX_MESSAGE) -> Message:
    """One framed control message; a length over `limit` is refused before anything is allocated."""
    head = bytearray(_LEN.size)
    recv_exact(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise TransferError(f"control message of {n} bytes is too large", "bad_request")
    body = bytearray(n)
    recv_exact(sock, memoryview(body))
    return decode_msg(body)


def decode_msg(body: bytes | bytearray) -> Message:
    """One control message from its frame's body (without the length prefix)."""
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise TransferError(f"malformed control message: {exc}", "bad_request") from exc


def tune(sock: socket.socket) -> None:
    """Settings of every KV connection: no Nagle delay, large buffers, and keepalive probes so a peer
    whose host died is noticed within ~25 s even on an idle connection (a dead process closes its
    sockets at once)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    with contextlib.suppress(OSError, AttributeError):  # NOTE: the TCP_KEEP* options are Linux's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def page_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Coalesce block pairs into `(src_start, dst_start, count)` runs that are
    consecutive on both sides, so each run is one contiguous copy per layer."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def block_runs(blocks: list[int]) -> list[tuple[int, int]]:
    """`(start, count)` runs of consecutive block ids."""
    return [(s, n) for s, _, n in page_runs(blocks, blocks)]


def host_id() -> str:
    """Identity of this machine (and boot): shared memory works only between equals.
    `$MICROSERVE_HOST_ID` overrides it (`launch --ray` sets the Ray node id: shm only within a node)."""
    if os.environ.get("MICROSERVE_HOST_ID"):
        return os.environ["MICROSERVE_HOST_ID"]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def new_secret() -> str:
    return uuid.uuid4().hex + os.urandom(8).hex()


def transport_class(name: str) -> type[Transport]:
    """The `Transport` subclass registered as `name` (imported on first use)."""
    try:
        module, _, cls = _REGISTRY[name].partition(":")
    except KeyError:
        raise TransferError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}",
                            "bad_request") from None
    return getattr(importlib.import_module(module), cls)


def choose_transport(mine: list[str], addr: KVAddr, forced: str | None = None) -> str:
    """Pick the transport for sending to `addr`: the first in registry order that both ends
    offer and that can reach the receiver from here (`Transport.reachable`).

    Raises TransferError when `forced` (or every option) is not possible.
    """
    offered = [t for t in TRANSPORTS if t in mine and t in addr.transports]
    if forced is not None:
        if forced not in offered:
            raise TransferError(f"transport {forced!r} is not usable for this pair: sender offers {mine}, "
                                f"receiver offers {list(addr.transports)}", "bad_request")
        why = transport_class(forced).unreachable(addr)
        if why:
            raise TransferError(f"transport {forced!r} is not usable for this pair: {why}", "bad_request")
        return forced
    usable = [t for t in offered if not transport_class(t).unreachable(addr)]
    if not usable:
        raise TransferError(f"no common transport: sender {mine}, receiver {list(addr.transports)}", "bad_request")
    return usable[0]


class Writer(ABC):
    """The sending side of one transfer (made by `Transport.writer` after the receiver accepted
    the hello). `KVSender` calls `write_layer` for every layer in order, as soon as the layer is
    computed, then `finish`; on any failure or cancellation it calls `abandon` instead."""

    @abstractmethod
    def write_layer(self, layer: int, runs: list[tuple[int, int, int]]) -> int:
        """Move the K and V pages of `layer` along `runs`: `(src, dst, count)` runs of blocks
        consecutive on both sides (`page_runs`, the same list for every layer of a transfer), from
        this engine's pool into the receiver's. May return before the bytes landed (the next layer
        computes meanwhile). Returns the bytes it moves; raises TransferError."""

    @abstractmethod
    def finish(self, nbytes: int) -> None:
        """Every layer is written: wait for them to land and tell the receiver (`nbytes` in all).
        Raises TransferError."""

    @abstractmethod
    def abandon(self) -> None:
        """Give up: return only once nothing this writer started can still land in the
        receiver's blocks (or the transport has no way to stop it: then say so in its docs)."""


class Transport(ABC):
    """One way of moving KV pages between two engines' pools; one instance per pool and side.

    The receiver's instance says what it offers in its `KVAddr` (`offer`) and takes the pages
    of one accepted transfer (`receive`); the sender's instance opens a `Writer` per transfer.
    Completion and failure: `receive` returns the bytes it took once every page is in, or
    raises `TransferError` (`code` one word) when the sender fails, goes away, stalls past
    `link.stall_timeout`, or the ticket is revoked (lease expiry, abort). Before it returns or
    raises, nothing may write into the ticket's blocks any more: the receiver hands them back
    right after. Implementations must never touch blocks outside `hello.block_ids`.

    Args:
        pool: the engine's KV pages (`[layers, 2, blocks, block_size, heads, dim]`, or an
            object with the same `pool[layer, kv, first:last]` indexing, e.g. vLLM's pages).
        spec: its layout.
        host: the address this engine's KV listeners bind (transports with their own sockets
            stay on its interface).
        shm_path: the file backing `pool` when it lives in shared memory ("" if not).
    """

    name: ClassVar[str]
    needs_shared_pool: ClassVar[bool] = False  # the receiver's pool must live in shared memory
    timeout = 30.0  # seconds a sender waits for what it posted to land

    def __init__(self, pool: Any, spec: KVSpec, host: str = "127.0.0.1", shm_path: str = "") -> None:
        self.pool, self.spec, self.host, self.shm_path = pool, spec, host, shm_path

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        """Why this transport cannot run in this process for a pool on `device` (None: it can)."""
        return None

    @classmethod
    def unreachable(cls, addr: KVAddr) -> str | None:
        """Why a sender here cannot reach the receiver of `addr` this way (None: it can)."""
        return None

    def offer(self) -> dict[str, Any]:
        """`KVAddr` fields this receiver fills in for this transport (`offers[name]` for new ones)."""
        return {}

    @abstractmethod
    def receive(self, link: Any) -> int:
        """Take the pages of one accepted transfer (`link`: `kvapi.transfer.receiver.Incoming`)."""

    @abstractmethod
    def writer(self, conn: socket.socket, addr: KVAddr, reply: Reply, begin: int, end: int) -> Writer:
        """Open one transfer into `addr`'s ticket whose hello `reply` accepted."""

    def interrupt(self, conn: socket.socket) -> None:
        """The ticket of the transfer on `conn` was revoked: wake its `receive` (by default by
        shutting the connection down, which ends a blocked read)."""
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:  # noqa: B027 (optional: most transports hold nothing of their own)
        """Release what this instance holds (registrations, mappings)."""
