"""`KVSender`: the sending end of every transport, one per engine."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvapi.spec import KVSpec
from kvapi.transfer import shm, tcp, ucx
from kvapi.transfer.base import (
    Commit,
    Hello,
    KVAddr,
    Reply,
    TransferError,
    check_addr,
    page_runs,
    recv_msg,
    send_msg,
)


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
    """

    def __init__(self, pool: torch.Tensor, spec: KVSpec, timeout: float = 30.0, sign_key: bytes | None = None) -> None:
        self.pool, self.spec, self.timeout, self.sign_key = pool, spec, timeout, sign_key
        self._maps = shm.PoolMaps()
        self.bytes_sent = 0

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
        t0 = time.perf_counter()
        try:
            conn = socket.create_connection(split_endpoint(addr.endpoint), timeout=self.timeout)
        except OSError as exc:
            raise TransferError(f"receiver {addr.engine_id} at {addr.endpoint} is not reachable: {exc}",
                                "unavailable", peer=addr.engine_id) from exc
        with conn:
            tcp.tune(conn)
            try:
                nbytes = self._stream(conn, addr, begin, end, dst, src_blocks, mode, layer_ready)
            except TimeoutError as exc:
                raise TransferError(f"receiver {addr.engine_id} stalled for {self.timeout}s", "timeout",
                                    peer=addr.engine_id) from exc
            except (ConnectionError, BrokenPipeError) as exc:
                raise TransferError(f"connection to receiver {addr.engine_id} lost: {exc}", "unavailable",
                                    peer=addr.engine_id) from exc
        self.bytes_sent += nbytes
        return SendStats(nbytes, time.perf_counter() - t0, mode)

    def _stream(self, conn: socket.socket, addr: KVAddr, begin: int, end: int, dst: list[int],
                src_blocks: Callable[[], list[int]], mode: str, layer_ready: Callable[[int], None] | None) -> int:
        send_msg(conn, Hello(addr.ticket_id, addr.secret, mode, self.spec, dst, begin, end))
        hello_reply = recv_msg(conn)
        _expect_ok(hello_reply, addr)
        if mode == "shm" and hello_reply.shm_path != addr.shm_path:  # type: ignore[union-attr]
            raise TransferError(f"receiver {addr.engine_id} serves another shared pool than its ticket names",
                                "forbidden")
        dst_pool = self._maps.get(addr.shm_path, self.spec) if mode == "shm" else None
        worker = ucx.UCXWorker.get() if mode == "ucx" else None
        base = ucx.tag_base(addr.ticket_id, addr.secret) if worker is not None else 0
        nbytes, runs, src, reqs, staged = 0, [], [], [], []
        try:
            for layer in range(self.spec.num_layers):
                if layer_ready is not None:
                    layer_ready(layer)
                if layer == 0:
                    bs = self.spec.block_size
                    src = src_blocks()[begin // bs: -(-end // bs)]
                    runs = page_runs(src, dst)
                if worker is not None:  # NOTE: not waited for here: layer l+1 may compute while l is on the wire
                    layer_reqs, layer_staged, n = ucx.send_layer(worker, addr.ucx_address, self.pool, layer, src,
                                                                 dst, base)
                    reqs += layer_reqs
                    staged += layer_staged
                    nbytes += n
                elif dst_pool is not None:
                    nbytes += shm.copy_layer(dst_pool, self.pool, layer, runs)
                else:
                    nbytes += tcp.send_layer(conn, self.pool, layer, [(s, n) for s, _, n in runs])
            if worker is not None:
                ucx.wait(reqs, self.timeout)
        except BaseException as exc:
            if worker is not None:  # NOTE: sends cannot be cancelled: staged copies live until UCX is done
                worker.keep_alive(reqs, staged)
                if isinstance(exc, TransferError) and exc.code == "transfer_failed":
                    worker.forget(addr.ucx_address)  # the peer's endpoint failed: open a new one next time
            raise
        if dst_pool is not None:
            send_msg(conn, Commit(nbytes))
        _expect_ok(recv_msg(conn), addr)
        return nbytes


def _expect_ok(reply: object, addr: KVAddr) -> None:
    if not isinstance(reply, Reply):
        raise TransferError(f"receiver {addr.engine_id} sent {type(reply).__name__}, expected a reply", "bad_request")
    if not reply.ok:
        raise TransferError(f"receiver {addr.engine_id} refused the transfer: {reply.error}", reply.code)
