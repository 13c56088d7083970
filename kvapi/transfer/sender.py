"""`KVSender`: the sending end of every transport, one per engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvapi.spec import KVSpec
from kvapi.transfer.base import (
    Hello,
    KVAddr,
    Reply,
    TransferError,
    Transport,
    check_addr,
    page_runs,
    recv_msg,
    send_msg,
    transport_class,
    tune,
)

CONNECT_TRIES = 4  # connects per transfer before the receiver counts as unreachable (0.05 s, 0.2 s, 0.8 s apart)


@dataclass
class SendStats:
    nbytes: int
    seconds: float
    transport: str


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class KVSender:
    """Write KV pages of this engine's `pool` into a receiver's ticket.

    Args:
        pool: the engine's KV cache tensor `[layers, 2, blocks, block_size, heads, dim]`.
        spec: its layout.
        timeout: seconds any single socket operation may stall.
        sign_key: the cluster's KV key: only addresses signed with it are written into
            (None: an --insecure engine, which checks nothing).
        host: the address this engine's KV listeners bind (transports with sockets of their own stay on it).
        transports: the sending side of transports this engine already made (e.g. its receiver's,
            so one NIXL registration serves both); others are made on first use.
    """

    def __init__(self, pool: torch.Tensor, spec: KVSpec, timeout: float = 30.0, sign_key: bytes | None = None,
                 host: str = "127.0.0.1", transports: dict[str, Transport] | None = None) -> None:
        self.pool, self.spec, self.timeout, self.sign_key, self.host = pool, spec, timeout, sign_key, host
        self._transports: dict[str, Transport] = dict(transports or {})
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_by_transport: dict[str, int] = {}

    def transport(self, mode: str) -> Transport:
        with self._lock:
            t = self._transports.get(mode)
            if t is None:
                t = self._transports[mode] = transport_class(mode)(self.pool, self.spec, host=self.host)
                t.timeout = self.timeout
            return t

    def send(self, addr: KVAddr, begin: int, end: int, src_blocks: Callable[[], list[int]], mode: str,
             layer_ready: Callable[[int], None] | None = None) -> SendStats:
        """Send tokens `[begin, end)` (begin block aligned with `addr.begin` or after it).

        `layer_ready(l)` blocks until layer `l` of those tokens is computed (raising to
        abandon); `src_blocks()` is called after layer 0 is ready and returns this
        engine's blocks for the logical blocks `begin // bs ..`. Blocking: call it from
        a worker thread. Raises TransferError (with `.code`) or KVSpecMismatch.
        """
        check_addr(addr, self.sign_key)
        self.spec.check_compatible(addr.spec)
        bs = self.spec.block_size
        first, count = begin // bs - addr.begin // bs, -(-end // bs) - begin // bs
        if begin < addr.begin or end > addr.end or first < 0 or first + count > len(addr.block_ids):
            raise TransferError(f"range [{begin}, {end}) is outside the ticket's [{addr.begin}, {addr.end})",
                                "bad_request")
        dst = addr.block_ids[first:first + count]
        transport = self.transport(mode)
        t0 = time.perf_counter()
        hello = Hello(addr.ticket_id, addr.secret, transport.name, self.spec, dst, begin, end,
                      addr.shm_path if transport.needs_shared_pool else "")
        conn, reply = self._introduce(addr, hello)
        with conn:
            try:
                nbytes = self._stream(conn, transport, addr, reply, begin, end, dst, src_blocks, layer_ready)
            except TimeoutError as exc:
                raise TransferError(f"receiver {addr.engine_id} stalled for {self.timeout}s", "timeout",
                                    peer=addr.engine_id) from exc
            except (ConnectionError, BrokenPipeError) as exc:
                raise TransferError(f"connection to receiver {addr.engine_id} lost: {exc}", "unavailable",
                                    peer=addr.engine_id) from exc
        with self._lock:
            self.bytes_sent += nbytes
            self.bytes_by_transport[mode] = self.bytes_by_transport.get(mode, 0) + nbytes
        return SendStats(nbytes, time.perf_counter() - t0, mode)

    def _introduce(self, addr: KVAddr, hello: Hello) -> tuple[socket.socket, Reply]:
        """Connect and have the hello accepted. A connection refused or closed before the reply (the
        receiver's handshake bound under a flood of idle connections, a restart of its listener) is
        tried again, `CONNECT_TRIES` times in all: nothing was claimed yet. A refusal is final."""
        last: Exception | None = None
        for attempt in range(CONNECT_TRIES):
            if attempt:
                time.sleep(0.05 * 4 ** (attempt - 1))
            try:
                conn = socket.create_connection(split_endpoint(addr.endpoint), timeout=self.timeout)
            except TimeoutError as exc:
                raise TransferError(f"receiver {addr.engine_id} at {addr.endpoint} did not accept within "
                                    f"{self.timeout}s", "timeout", peer=addr.engine_id) from exc
            except OSError as exc:
                last = exc
                continue
            try:
                tune(conn)
                send_msg(conn, hello)
                reply = recv_msg(conn)
            except TimeoutError as exc:
                conn.close()
                raise TransferError(f"receiver {addr.engine_id} did not answer the hello within {self.timeout}s",
                                    "timeout", peer=addr.engine_id) from exc
            except OSError as exc:  # ConnectionError: closed before it answered
                conn.close()
                last = exc
                continue
            except BaseException:
                conn.close()
                raise
            try:
                return conn, _expect_ok(reply, addr)
            except BaseException:
                conn.close()
                raise
        raise TransferError(f"receiver {addr.engine_id} at {addr.endpoint} is not reachable: {last} "
                            f"({CONNECT_TRIES} tries)", "unavailable", peer=addr.engine_id)

    def _stream(self, conn: socket.socket, transport: Transport, addr: KVAddr, reply: Reply, begin: int, end: int,
                dst: list[int], src_blocks: Callable[[], list[int]],
                layer_ready: Callable[[int], None] | None) -> int:
        writer = transport.writer(conn, addr, reply, begin, end)
        nbytes, runs = 0, []
        try:
            for layer in range(self.spec.num_layers):
                if layer_ready is not None:
                    layer_ready(layer)
                if layer == 0:
                    bs = self.spec.block_size
                    runs = page_runs(src_blocks()[begin // bs: -(-end // bs)], dst)
                nbytes += writer.write_layer(layer, runs)
            writer.finish(nbytes)
        except BaseException:
            writer.abandon()  # NOTE: before the connection closes: the receiver reuses the blocks after that
            raise
        _expect_ok(recv_msg(conn), addr)
        return nbytes


def _expect_ok(reply: object, addr: KVAddr) -> Reply:
    if not isinstance(reply, Reply):
        raise TransferError(f"receiver {addr.engine_id} sent {type(reply).__name__}, expected a reply", "bad_request")
    if not reply.ok:
        raise TransferError(f"receiver {addr.engine_id} refused the transfer: {reply.error}", reply.code)
    return reply
