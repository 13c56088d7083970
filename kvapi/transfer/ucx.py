"""`ucx`: KV pages over UCX (`ucxx`): RDMA where the fabric has it, shared memory or
TCP otherwise, chosen by UCX itself.

No UCX listener (it would bind every interface): the receiver publishes its *worker
address* in `KVAddr.ucx_address`; the sender opens an endpoint from it and sends one
tag-matched message per (layer, K|V, run of consecutive receiver blocks). Both sides
derive the same message list from the receiver's blocks, and the tags from the ticket id
*and secret*, so tags match without any extra exchange and nobody without the secret can
aim a message at a ticket's blocks. The control messages (`Hello`, `Reply`) still go over
the receiver's TCP control socket.

We use ucxx's low-level API: one context and worker per process, progressed by UCXX's
own progress thread (epoll, idle when nothing moves), requests submitted from any thread
(delayed submission hands them to the progress thread) and their completion polled with
short sleeps. ucxx's asyncio layer ("thread" mode with a notifier thread) stalled ~300 ms
on about every other transfer here, and its "blocking" mode spins a core while idle
(docs/benchmarks.md).

NOTE: UCX cannot cancel one posted receive. A receiver that gives up on a transfer must
not hand the blocks back while a receive into them is posted: `drain` waits for them
(the live sender's messages still land, into blocks nobody uses yet) and, as a last
resort, cancels every in-flight request of the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kvapi.transfer.base import KVAddr, Reply, TransferError, Transport, Writer, block_runs

log = logging.getLogger(__name__)

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


def confine_to(host: str) -> None:
    """Keep UCX's own sockets on the interface that carries `host` (`lo` for loopback): its tcp
    transport otherwise listens on every interface. Call before the first `UCXWorker.get()`;
    an explicit `UCX_NET_DEVICES` wins."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if host == "localhost" or (ip is not None and ip.is_loopback):
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
        return
    name = _interface_of(host)
    if name:
        os.environ.setdefault("UCX_NET_DEVICES", name)


def _interface_of(host: str) -> str:
    """The network interface whose IPv4 address is `host` ("" if none or not Linux)."""
    import fcntl
    import socket
    import struct

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                if socket.inet_ntoa(raw[20:24]) == host:
                    return name
    return ""


class UCXWorker:
    """The process's UCX context and worker, and the endpoints it opened."""

    _instance: UCXWorker | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array
        from ucxx.types import Tag

        self._lib, self._array, self._tag = libucxx, Array, Tag
        self.context = libucxx.UCXContext({}, feature_flags=(libucxx.Feature.TAG, libucxx.Feature.WAKEUP))
        self.worker = libucxx.UCXWorker(self.context, enable_delayed_submission=True, enable_python_future=False)
        # NOTE: ucxx wakes its progress thread on every submission; the epoll timeout is only a safety
        # net. At 1 ms it woke an idle engine 1,000 times a second (3.5% of a core, per engine); at 100 ms
        # 0.3%, with the same transfer rates (benchmarks/kv_transfer.py --tokens 16 --skip-engines).
        self.worker.start_progress_thread(polling_mode=False, epoll_timeout=100)
        atexit.register(self.worker.stop_progress_thread)  # NOTE: never let destructors run on that thread
        self.address = libucxx.UCXAddress.create_from_worker(self.worker).tobytes().hex()
        self._endpoints: dict[str, Any] = {}
        self._ep_lock = threading.Lock()
        # sends whose staged buffers must outlive them (a failed send cannot be cancelled)
        self._inflight: list[tuple[list[Any], list[torch.Tensor]]] = []

    @classmethod
    def get(cls) -> UCXWorker:
        with cls._lock:
            if cls._instance is None:
                cls._instance = UCXWorker()
            return cls._instance

    def endpoint(self, address: str) -> Any:
        with self._ep_lock:
            ep = self._endpoints.get(address)
            if ep is None or not ep.alive:
                addr = self._lib.UCXAddress.create_from_buffer(bytes.fromhex(address))
                ep = self._endpoints[address] = self._lib.UCXEndpoint.create_from_worker_address(
                    self.worker, addr, True)
            return ep

    def forget(self, address: str) -> None:
        """Drop a cached endpoint (its peer failed); the next send opens a new one."""
        with self._ep_lock:
            self._endpoints.pop(address, None)

    def send(self, ep: Any, t: torch.Tensor, tag: int) -> Any:
        return ep.tag_send(self._array(_host_array(t)), self._tag(tag))

    def recv(self, t: torch.Tensor, tag: int) -> Any:
        return self.worker.tag_recv(self._array(_host_array(t)), self._tag(tag))

    def keep_alive(self, reqs: list[Any], buffers: list[torch.Tensor]) -> None:
        """Hold staged buffers of abandoned sends until UCX is done reading them."""
        with self._ep_lock:
            self._inflight = [(r, b) for r, b in self._inflight if not all(x.completed for x in r)]
            if buffers:
                self._inflight.append((reqs, buffers))

    def cancel_all(self) -> None:
        log.warning("ucx: cancelling every in-flight request of this worker (a receive would not finish)")
        self.worker.cancel_inflight_requests(3_000_000_000, 3)


def wait(reqs: list[Any], timeout: float, stop: Callable[[], str | None] | None = None) -> None:
    """Poll until every request completed; raise TransferError on a failed request, after
    `timeout` seconds, or when `stop()` names a reason to give up."""
    deadline, pause = time.monotonic() + timeout, 0.0001
    pending = list(reqs)
    while pending:
        pending = [r for r in pending if not r.completed]
        if not pending:
            break
        why = stop() if stop is not None else None
        if why:
            raise TransferError(f"UCX transfer stopped: {why}", "aborted")
        if time.monotonic() > deadline:
            raise TransferError(f"UCX transfer stalled for {timeout}s", "timeout")
        time.sleep(pause)
        pause = min(pause * 2, 0.002)
    for r in reqs:
        try:
            r.check_error()
        except Exception as exc:  # ucxx raises its own exception types
            raise TransferError(f"UCX transfer failed: {exc}", "transfer_failed") from exc


def drain(worker: UCXWorker, reqs: list[Any], grace: float) -> None:
    """After a failed receive: wait until no posted receive can still write, so the blocks
    may be reused; cancel everything in flight if one is still pending after `grace`."""
    try:
        wait(reqs, grace)
    except TransferError:
        if any(not r.completed for r in reqs):
            worker.cancel_all()


def tag_base(ticket_id: str, secret: str) -> int:
    digest = hashlib.blake2b(f"{ticket_id}\0{secret}".encode(), digest_size=5).digest()
    return int.from_bytes(digest, "little") << 20


def _messages(pool: torch.Tensor, layer: int, runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [pool[layer, kv, s:s + n] for kv in (0, 1) for s, n in runs]


def _host_array(t: torch.Tensor):
    return t.view(torch.uint8).numpy()


def post_receives(worker: UCXWorker, pool: torch.Tensor, num_layers: int, dst: list[int],
                  base: int) -> tuple[list[Any], int]:
    """Post a receive for every message of every layer into the receiver blocks `dst`;
    returns (requests, bytes expected). Posting all up front lets each message land as
    soon as it is sent."""
    runs = block_runs(dst)
    msgs = [m for layer in range(num_layers) for m in _messages(pool, layer, runs)]
    reqs = [worker.recv(m, base + i) for i, m in enumerate(msgs)]
    return reqs, sum(m.numel() * m.element_size() for m in msgs)


def send_layer(worker: UCXWorker, address: str, pool: torch.Tensor, layer: int, src: list[int],
               dst: list[int], base: int) -> tuple[list[Any], list[torch.Tensor], int]:
    """Send layer `layer` of this engine's blocks `src` to the receiver's `dst`.

    Returns (requests, staged buffers to keep alive until they complete, bytes)."""
    ep = worker.endpoint(address)
    runs = block_runs(dst)
    first = base + layer * 2 * len(runs)
    index = {d: s for s, d in zip(src, dst, strict=True)}
    msgs, staged = [], []
    for kv in (0, 1):
        for d0, n in runs:
            s = [index[d] for d in range(d0, d0 + n)]
            if s == list(range(s[0], s[0] + n)):
                msgs.append(pool[layer, kv, s[0]:s[0] + n])
            else:  # NOTE: the source is scattered: stage one contiguous message
                msgs.append(pool[layer, kv].index_select(0, torch.tensor(s)))
                staged.append(msgs[-1])
    reqs = [worker.send(ep, m, first + i) for i, m in enumerate(msgs)]
    return reqs, staged, sum(m.numel() * m.element_size() for m in msgs)


class _UCXWriter(Writer):
    def __init__(self, pool: torch.Tensor, addr: KVAddr, timeout: float) -> None:
        self.pool, self.addr, self.timeout = pool, addr, timeout
        self.worker = UCXWorker.get()
        self.base = tag_base(addr.ticket_id, addr.secret)
        self.reqs: list[Any] = []
        self.staged: list[torch.Tensor] = []
        self.src: list[int] = []
        self.dst: list[int] = []

    def write_layer(self, layer: int, runs: list[tuple[int, int, int]]) -> int:
        # NOTE: not waited for here: layer l+1 may compute while l is on the wire
        if layer == 0 or not self.src:
            self.src = [s + i for s, _, n in runs for i in range(n)]
            self.dst = [d + i for _, d, n in runs for i in range(n)]
        src, dst = self.src, self.dst
        reqs, staged, n = send_layer(self.worker, self.addr.ucx_address, self.pool, layer, src, dst, self.base)
        self.reqs += reqs
        self.staged += staged
        return n

    def finish(self, nbytes: int) -> None:
        try:
            wait(self.reqs, self.timeout)
        except TransferError as exc:
            self.abandon()
            if exc.code == "transfer_failed":
                self.worker.forget(self.addr.ucx_address)  # the peer's endpoint failed: open a new one next time
            raise

    def abandon(self) -> None:
        # NOTE: sends cannot be cancelled: staged copies live until UCX is done with them
        self.worker.keep_alive(self.reqs, self.staged)


class UCXTransport(Transport):
    """Two-sided tagged UCX messages (RDMA where the fabric has it); no UCX listener."""

    name = "ucx"

    def __init__(self, pool, spec, host: str = "127.0.0.1", shm_path: str = "") -> None:
        super().__init__(pool, spec, host, shm_path)
        confine_to(host)  # NOTE: UCX's tcp transport listens on every interface unless told
        self.worker = UCXWorker.get()

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        if not ucx_available():
            return "the ucxx package is not installed (pip install 'microserve[ucx]')"
        return None if device == "cpu" else "device pools over ucx are not wired (use nixl)"

    @classmethod
    def unreachable(cls, addr: KVAddr) -> str | None:
        return None if addr.ucx_address else "the receiver has no UCX worker address"

    def offer(self) -> dict:
        return {"ucx_address": self.worker.address}

    def receive(self, link) -> int:
        """Post every receive, wait for them; give up when the ticket is revoked, the sender's
        control connection closes (it died), or the data stalls. Giving up drains the posted
        receives first: the blocks are reported free only when nothing can write into them."""
        base = tag_base(link.hello.ticket_id, link.secret)
        reqs, nbytes = post_receives(self.worker, self.pool, self.spec.num_layers, link.hello.block_ids, base)
        try:
            wait(reqs, link.stall_timeout, link.stopped)
        except TransferError:
            drain(self.worker, reqs, grace=link.grace)
            raise
        return nbytes

    def writer(self, conn, addr: KVAddr, reply: Reply, begin: int, end: int) -> Writer:
        return _UCXWriter(self.pool, addr, self.timeout)
