"""Shared pieces of the KV transfer layer: the address of a receive ticket, the wire
messages of the control channel, framing, and page-run arithmetic.

One transfer moves the K and V pages of a token range `[begin, end)` of every layer
from the sender's block pool into blocks the receiver reserved for it:

    receiver (prep_recv)                     sender (remote_send)
    reserve blocks, open ticket ── KVAddr ──> connect to KVAddr.endpoint
                                  <── Hello   (ticket id, secret, blocks, spec, mode)
    check ticket/secret/blocks/spec ─ Reply ─> per layer: send pages (tcp) or copy
                                               them into the shared pool (shm)
                                  <── Commit  (shm only)
    all bytes in: ticket complete ── Reply ──> done
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
import uuid
from dataclasses import dataclass

import msgspec

from kvapi.spec import KVSpec

__all__ = ["TRANSPORTS", "KVAddr", "TransferError", "check_addr", "choose_transport", "host_id", "sign_addr"]

TRANSPORTS = ("shm", "ucx", "tcp")


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
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise TransferError(f"malformed control message: {exc}", "bad_request") from exc


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


def choose_transport(mine: list[str], addr: KVAddr, forced: str | None = None) -> str:
    """Pick the transport for sending to `addr`: the fastest both ends offer.

    Raises TransferError when `forced` (or every option) is not possible.
    """
    same_host = bool(addr.host_id) and addr.host_id == host_id() and bool(addr.shm_path)
    usable = [t for t in TRANSPORTS if t in mine and t in addr.transports and (t != "shm" or same_host)
              and (t != "ucx" or addr.ucx_address)]
    if forced is not None:
        if forced not in usable:
            why = "the receiver is on another host or has no shared pool" if forced == "shm" else \
                f"sender offers {mine}, receiver offers {list(addr.transports)}"
            raise TransferError(f"transport {forced!r} is not usable for this pair: {why}", "bad_request")
        return forced
    if not usable:
        raise TransferError(f"no common transport: sender {mine}, receiver {list(addr.transports)}", "bad_request")
    return usable[0]
