"""`ucx`: KV pages over UCX (`ucxx`): RDMA where the fabric has it, shared memory or
TCP otherwise, chosen by UCX itself.

No UCX listener (it would bind every interface): the receiver publishes its *worker
address* in `KVAddr.ucx_address`; the sender opens an endpoint from it and sends one
tag-matched message per (layer, K|V, run of consecutive receiver blocks). Both sides
derive the same message list from the receiver's blocks, so tags match without any
extra exchange. The control messages (`Hello`, `Reply`) still go over the receiver's
TCP control socket. All ucxx calls run on one asyncio loop in a dedicated thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Coroutine
from typing import Any

import torch

from kvapi.transfer.base import TransferError, block_runs

# NOTE: without these UCX keeps its shared-memory transports off under error handling
os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")
os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def ucx_available() -> bool:
    try:
        import ucxx  # noqa: F401
    except Exception:
        return False
    return True


class UCXWorker:
    """The process's UCX worker and the loop thread that drives it."""

    _instance: UCXWorker | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import ucxx

        self.ucxx = ucxx
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="ucx-worker", daemon=True).start()
        self.address = self.run(self._address()).hex()
        self._endpoints: dict[str, Any] = {}

    @classmethod
    def get(cls) -> UCXWorker:
        with cls._lock:
            if cls._instance is None:
                cls._instance = UCXWorker()
            return cls._instance

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TransferError(f"UCX operation stalled for {timeout}s", "timeout") from None

    async def _address(self) -> bytes:
        return bytes(self.ucxx.get_worker_address())

    async def endpoint(self, address: str) -> Any:
        ep = self._endpoints.get(address)
        if ep is None or ep.closed:
            addr = self.ucxx.get_ucx_address_from_buffer(bytes.fromhex(address))
            ep = self._endpoints[address] = await self.ucxx.create_endpoint_from_worker_address(addr)
        return ep


def _tag_base(ticket_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(ticket_id.encode(), digest_size=5).digest(), "little") << 20


def _messages(pool: torch.Tensor, layer: int, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [pool[layer, kv, s:s + n] for kv in (0, 1) for s, n in runs]


def _host_array(t: torch.Tensor):
    return t.view(torch.uint8).numpy()


async def recv_layers(worker: UCXWorker, pool: torch.Tensor, num_layers: int, dst: list[int],
                      ticket_id: str) -> int:
    """Receive every layer into the receiver blocks `dst` (logical order); returns bytes.

    All receives are posted at once, so each message lands as soon as it is sent."""
    runs = block_runs(dst)
    base = _tag_base(ticket_id)
    msgs = [m for layer in range(num_layers) for m in _messages(pool, layer, runs)]
    await asyncio.gather(*(worker.ucxx.recv(_host_array(m), tag=base + i) for i, m in enumerate(msgs)))
    return sum(m.numel() * m.element_size() for m in msgs)


async def send_layer(worker: UCXWorker, address: str, pool: torch.Tensor, layer: int, src: list[int],
                     dst: list[int], ticket_id: str) -> int:
    """Send layer `layer` of this engine's blocks `src` to the receiver's `dst`; returns bytes."""
    ep = await worker.endpoint(address)
    runs = block_runs(dst)
    base = _tag_base(ticket_id) + layer * 2 * len(runs)
    index = {d: s for s, d in zip(src, dst, strict=True)}
    msgs = []
    for kv in (0, 1):
        for d0, n in runs:
            s = [index[d] for d in range(d0, d0 + n)]
            if s == list(range(s[0], s[0] + n)):
                msgs.append(pool[layer, kv, s[0]:s[0] + n])
            else:  # NOTE: the source is scattered: stage one contiguous message
                msgs.append(pool[layer, kv].index_select(0, torch.tensor(s)))
    await asyncio.gather(*(ep.send(_host_array(m), tag=base + i, force_tag=True) for i, m in enumerate(msgs)))
    return sum(m.numel() * m.element_size() for m in msgs)
