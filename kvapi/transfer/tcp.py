"""`tcp`: pages streamed over the transfer's control connection, straight from and into the pools.

Each side walks the same byte stream, `for layer: for k|v: for block (logical order)`,
but cuts it at its own runs of consecutive blocks, so both send and receive work on
contiguous slices of the pool with no staging copy (CPU pools; device pools stage
through host memory). Always available: the fallback of every pair.
"""

from __future__ import annotations

import socket

import torch

from kvapi.transfer.base import KVAddr, Reply, TransferError, Transport, Writer, block_runs, recv_exact

__all__ = ["TCPTransport", "recv_layer", "send_layer"]


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def send_layer(sock: socket.socket, pool: torch.Tensor, layer: int, runs: list[tuple[int, int]]) -> int:
    """Send K then V pages of `layer` for the `(start, count)` block runs; returns bytes."""
    nbytes = 0
    for kv in (0, 1):
        for s, n in runs:
            pages = pool[layer, kv, s:s + n]
            if pages.numel() == 0:  # a layout whose page holds K and V together has no separate V
                continue
            if pages.device.type != "cpu":
                pages = pages.cpu()
            view = _bytes_view(pages)
            sock.sendall(view)
            nbytes += len(view)
    return nbytes


def recv_layer(sock: socket.socket, pool: torch.Tensor, layer: int, runs: list[tuple[int, int]]) -> int:
    """Receive K then V pages of `layer` into the `(start, count)` block runs; returns bytes."""
    nbytes = 0
    for kv in (0, 1):
        for s, n in runs:
            pages = pool[layer, kv, s:s + n]
            if pages.numel() == 0:
                continue
            if pages.device.type == "cpu":
                view = _bytes_view(pages)
                recv_exact(sock, view)
            else:  # NOTE: device pools stage through host memory
                host = torch.empty(pages.shape, dtype=pages.dtype)
                view = _bytes_view(host)
                recv_exact(sock, view)
                pages.copy_(host)
            nbytes += len(view)
    return nbytes


class _TCPWriter(Writer):
    def __init__(self, pool: torch.Tensor, conn: socket.socket) -> None:
        self.pool, self.conn = pool, conn

    def write_layer(self, layer: int, runs: list[tuple[int, int, int]]) -> int:
        return send_layer(self.conn, self.pool, layer, [(s, n) for s, _, n in runs])

    def finish(self, nbytes: int) -> None:
        pass

    def abandon(self) -> None:
        pass  # NOTE: writes are synchronous here: nothing is left in flight when a call returns


class TCPTransport(Transport):
    """Pages on the control connection itself: no extra listener, no shared memory."""

    name = "tcp"

    def receive(self, link) -> int:
        runs, nbytes = block_runs(link.hello.block_ids), 0
        for layer in range(self.spec.num_layers):
            if link.ticket.revoked:
                raise TransferError("ticket revoked (lease expired or request aborted)", "aborted")
            nbytes += recv_layer(link.conn, self.pool, layer, runs)
        return nbytes

    def writer(self, conn: socket.socket, addr: KVAddr, reply: Reply, begin: int, end: int) -> Writer:
        return _TCPWriter(self.pool, conn)
