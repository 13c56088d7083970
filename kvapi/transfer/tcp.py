"""`tcp`: pages streamed over a plain socket, straight from and into the pools.

Each side walks the same byte stream, `for layer: for k|v: for block (logical order)`,
but cuts it at its own runs of consecutive blocks, so both send and receive work on
contiguous slices of the pool with no staging copy (CPU pools).
"""

from __future__ import annotations

import contextlib
import socket

import torch

from kvapi.transfer.base import recv_exact


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


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
