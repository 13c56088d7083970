"""`nixl`: one-sided NIXL WRITEs into the receiver's registered page pool.

This is how vLLM's NixlConnector, SGLang, Dynamo and LMCache move KV: every engine registers
its whole page pool with its NIXL agent once (DRAM, or VRAM for a CUDA pool: GPU to GPU with
no host staging), and a sender writes page runs straight into the receiver's reserved blocks
(UCX picks RDMA, NVLink, shared memory or TCP underneath).

    receiver: KVAddr.offers["nixl"] = (agent name, agent metadata, per (layer, K|V) region:
              base address, block stride, page bytes, device; DRAM or VRAM) — covered by the
              KVAddr's HMAC (a CPU engine and a CUDA engine can write into each other)
    sender:   check the signature, load the receiver's metadata (once per agent), hello on the
              receiver's KV control socket (the ticket is claimed: a live ticket, its secret,
              only its blocks), then per layer as soon as it is computed: one WRITE of its
              page runs (not waited for: the next layer computes meanwhile); the last layer's
              WRITE is posted once the others completed and carries the notification
              `mskv1 | ticket id | bytes | HMAC(ticket secret, ticket id, range, bytes)`
    receiver: the notification completes the ticket (one bound to another ticket, or with a
              wrong tag, completes nothing); it answers ok on the control connection.

No posted receives and no per-ticket listener: the receiver only waits for a notification.

Fencing (a late write into freed blocks): NIXL refuses a write outside the receiver's
registered pool, but cannot tell a live ticket's blocks from freed ones. So the control
connection fences the pool: the receiver hands a ticket's blocks back only after the sender's
connection closed (a sender closes it only once nothing it posted can still land: `abandon`
waits for its writes), however long that takes; to stop a writer (lease expiry, abort) it shuts
its side of the connection, and a sender checks for that before every layer's write. A frozen
(SIGSTOP) sender therefore holds that ticket's blocks until it resumes; a dead one releases them
at once (its sockets close), a dead host within ~25 s (TCP keepalive): docs/microserving.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import msgspec
import torch

from kvapi.transfer.base import KVAddr, Reply, TransferError, Transport, Writer

log = logging.getLogger(__name__)

_NOTIF = b"mskv1"
_enc, _dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()


_BUILDS = ("nixl_cu12", "nixl_cu13")  # the wheels NVIDIA publishes per CUDA major (`pip install nixl-cu12`)


def nixl_api() -> Any:
    """NIXL's Python API (`nixl_cu12._api`, or the CUDA 13 build's); ImportError when neither is installed."""
    import importlib

    errors = []
    for name in _BUILDS:
        try:
            return importlib.import_module(f"{name}._api")
        except Exception as exc:  # NOTE: a build for another CUDA fails with OSError on its libraries too
            errors.append(f"{name}: {exc}")
    raise ImportError("NIXL is not installed (pip install 'microserve[nixl]'): " + "; ".join(errors))


def nixl_available() -> bool:
    try:
        nixl_api()
    except ImportError:
        return False
    return True


def _tag(secret: str, ticket_id: str, begin: int, end: int, nbytes: int) -> bytes:
    return hmac.new(secret.encode(), f"{ticket_id}\0{begin}\0{end}\0{nbytes}".encode(), hashlib.sha256).digest()[:16]


def pool_layout(pool: Any) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int]], str]:
    """(regions, memory, mem type) of a page pool: `regions[layer * 2 + kv]` = (base address, block
    stride, page bytes, device id) (page bytes 0: no such page, e.g. a layout with K and V in one
    page); `memory` = the `(address, bytes, device)` ranges to register.

    A pool is the engine's `[layers, 2, blocks, ...]` tensor, or an object with `page_regions()`
    and `tensors()` (vLLM's per-layer KV tensors: `microserve.serving.vllm.connector.BlockPages`)."""
    if isinstance(pool, torch.Tensor):
        tensors, es = [pool], pool.element_size()
        regions = [(pool[layer, kv].data_ptr(), pool.stride(2) * es, pool[layer, kv, 0].numel() * es)
                   for layer in range(pool.shape[0]) for kv in (0, 1)]
    else:
        tensors, regions = pool.tensors(), pool.page_regions()
    device = tensors[0].device
    dev = device.index or 0 if device.type == "cuda" else 0
    memory = [(t.data_ptr(), t.numel() * t.element_size(), dev) for t in tensors]
    return [(*r, dev) for r in regions], memory, "VRAM" if device.type == "cuda" else "DRAM"


class NixlAgent:
    """The process's NIXL agent: one per engine process, shared by its sending and receiving side.

    Registers each pool once, loads peers' metadata once per agent name (a restarted peer has a
    new name), and dispatches incoming notifications to the receives waiting for them."""

    _instance: NixlAgent | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        api = nixl_api()
        nixl_agent, nixl_agent_config, sync = api.nixl_agent, api.nixl_agent_config, api.nixl_thread_sync_t
        logging.getLogger("nixl").setLevel(logging.WARNING)  # NOTE: it logs every agent start at INFO on stdout
        self.name = f"microserve-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # NOTE: no progress thread: NIXL's spins a whole core, idle or not (its Python API fixes the
        # delay at 0); the threads that wait on transfers progress the worker instead. Several
        # threads use the agent at once (sends, receives): strict locking.
        self.agent = nixl_agent(self.name, nixl_agent_config(
            enable_prog_thread=False, backends=["UCX"], sync_mode=sync.NIXL_THREAD_SYNC_STRICT))
        self._registered: dict[tuple[int, int], Any] = {}
        self._peers: set[str] = set()
        self._peer_lock = threading.Lock()
        self._notifs: OrderedDict[str, bytes] = OrderedDict()  # ticket id -> notification, not yet taken
        self._notif_lock = threading.Lock()

    @classmethod
    def get(cls, host: str = "127.0.0.1") -> NixlAgent:
        with cls._lock:
            if cls._instance is None:
                from kvapi.transfer.ucx import confine_to

                confine_to(host)  # NOTE: UCX's tcp transport listens on every interface unless told
                cls._instance = NixlAgent()
            return cls._instance

    def register(self, memory: list[tuple[int, int, int]], mem_type: str) -> None:
        with self._peer_lock:
            for addr, nbytes, dev in memory:
                if (addr, nbytes) not in self._registered:
                    self._registered[(addr, nbytes)] = self.agent.register_memory([(addr, nbytes, dev, "")], mem_type)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def connect(self, name: str, metadata: bytes) -> str:
        with self._peer_lock:
            if name != self.name and name not in self._peers:  # NOTE: in-process peers write to themselves
                self.agent.add_remote_agent(metadata)
                self._peers.add(name)
        return name

    def forget(self, name: str) -> None:
        """Drop a peer whose writes failed (it may have restarted); the next transfer reloads it."""
        with self._peer_lock:
            if name in self._peers:
                self._peers.discard(name)
                with contextlib.suppress(Exception):
                    self.agent.remove_remote_agent(name)

    def take_notif(self, ticket_id: str) -> bytes | None:
        """The notification for `ticket_id` if one came (polls the agent; keeps others for their waiters)."""
        with self._notif_lock:
            for msgs in self.agent.get_new_notifs().values():
                for msg in msgs:
                    self._file(msg)
            return self._notifs.pop(ticket_id, None)

    def _file(self, msg: bytes) -> None:
        try:
            head, ticket_id, _, _ = _dec.decode(msg)
            if head != _NOTIF or not isinstance(ticket_id, str):
                raise ValueError(head)
        except (msgspec.DecodeError, ValueError, TypeError):
            log.info("nixl: a notification that is not ours (%d bytes) was dropped", len(msg))
            return
        self._notifs[ticket_id] = msg
        while len(self._notifs) > 4096:  # NOTE: notifications nobody waits for must not grow forever
            self._notifs.popitem(last=False)


class _NixlWriter(Writer):
    def __init__(self, t: NixlTransport, conn: socket.socket, addr: KVAddr, begin: int, end: int) -> None:
        self.t, self.conn, self.addr, self.begin, self.end = t, conn, addr, begin, end
        try:
            name, meta, regions, self.remote_mem = _dec.decode(addr.offers["nixl"])
            self.remote = [tuple(r) for r in regions]
        except (KeyError, msgspec.DecodeError, ValueError, TypeError) as exc:
            raise TransferError(f"receiver {addr.engine_id} offers no usable nixl metadata", "bad_request") from exc
        if len(self.remote) != len(t.regions):
            raise TransferError(f"receiver {addr.engine_id}'s pool has {len(self.remote) // 2} layers, "
                                f"this one {len(t.regions) // 2}", "kv_spec_mismatch")
        try:
            self.peer = t.agent.connect(name, meta)
        except Exception as exc:  # nixl raises its own exception types
            raise TransferError(f"cannot load the nixl metadata of {addr.engine_id}: {exc}", "bad_request") from exc
        self.handles: list[Any] = []
        self.last, self.sent = t.spec.num_layers - 1, 0

    def write_layer(self, layer: int, runs: list[tuple[int, int, int]]) -> int:
        if _closed_by_peer(self.conn):
            raise TransferError(f"receiver {self.addr.engine_id} stopped the transfer (ticket revoked)", "aborted")
        local, remote, nbytes = self.t.descs(self.remote, layer, runs)
        notif = b""
        if layer == self.last:  # NOTE: the notification must not overtake any earlier layer's data
            self._wait(self.handles)
            total = self.sent + nbytes
            notif = _enc.encode([_NOTIF, self.addr.ticket_id, total,
                                 _tag(self.addr.secret, self.addr.ticket_id, self.begin, self.end, total)])
        self.sent += nbytes
        if not local:
            if notif:
                self.t.agent.agent.send_notif(self.peer, notif)
            return nbytes
        a = self.t.agent.agent
        try:
            h = a.initialize_xfer("WRITE", a.get_xfer_descs(local, self.t.mem_type),
                                  a.get_xfer_descs(remote, self.remote_mem), self.peer, notif)
            self.handles.append(h)
            if a.transfer(h) == "ERR":
                raise TransferError("nixl refused to post the write", "transfer_failed")
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"nixl write to {self.addr.engine_id} failed: {exc}", "transfer_failed") from exc
        return nbytes

    def finish(self, nbytes: int) -> None:
        self._wait(self.handles)
        self._release()

    def abandon(self) -> None:
        with contextlib.suppress(TransferError):
            self._wait(self.handles, self.t.timeout)
        self._release()

    def _wait(self, handles: list[Any], timeout: float | None = None) -> None:
        a, deadline, pause = self.t.agent.agent, time.monotonic() + (timeout or self.t.timeout), 0.00005
        for h in handles:
            while (state := a.check_xfer_state(h)) == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"nixl write to {self.addr.engine_id} stalled", "timeout",
                                        peer=self.addr.engine_id)
                time.sleep(pause)
                pause = min(pause * 2, 0.001)
            if state != "DONE":
                self.t.agent.forget(self.peer)
                raise TransferError(f"nixl write to {self.addr.engine_id} failed ({state})", "transfer_failed",
                                    peer=self.addr.engine_id)

    def _release(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):  # NOTE: releasing a write still in flight aborts it
                self.t.agent.agent.release_xfer_handle(h)
        self.handles = []


def _closed_by_peer(conn: socket.socket) -> bool:
    """Whether the receiver shut its side of the control connection (it wants the writer gone)."""
    with contextlib.suppress(OSError):
        if select.select([conn], [], [], 0)[0]:
            return not conn.recv(1, socket.MSG_PEEK)
    return False


class NixlTransport(Transport):
    """One-sided writes into registered pools through NIXL (extra `microserve[nixl]`)."""

    name = "nixl"

    def __init__(self, pool: Any, spec: Any, host: str = "127.0.0.1", shm_path: str = "") -> None:
        super().__init__(pool, spec, host, shm_path)
        self.agent = NixlAgent.get(host)
        self.regions, memory, self.mem_type = pool_layout(pool)
        self.agent.register(memory, self.mem_type)
        self._offer = b""

    @classmethod
    def unavailable(cls, device: str) -> str | None:
        return None if nixl_available() else "the nixl package is not installed (pip install 'microserve[nixl]')"

    @classmethod
    def unreachable(cls, addr: KVAddr) -> str | None:
        return None if "nixl" in addr.offers else "the receiver registered no pool with NIXL"

    def offer(self) -> dict:
        if not self._offer:
            self._offer = _enc.encode([self.agent.name, self.agent.metadata(), list(self.regions), self.mem_type])
        return {"offers": {"nixl": self._offer}}

    def descs(self, remote: list[tuple], layer: int,
              runs: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]], int]:
        """Local and remote `(address, bytes, device)` descriptors of one layer's page runs."""
        local, far, nbytes = [], [], 0
        for kv in (0, 1):
            lb, ls, ll, ld = self.regions[layer * 2 + kv]
            rb, rs, rl, rd = remote[layer * 2 + kv]
            if ll == 0:
                continue
            if rl != ll:
                raise TransferError(f"page sizes differ ({ll} here, {rl} on the receiver)", "kv_spec_mismatch")
            for s, d, n in runs:
                if ls == ll and rs == rl:  # whole runs are contiguous on both sides
                    local.append((lb + s * ls, n * ll, ld))
                    far.append((rb + d * rs, n * ll, rd))
                else:
                    local += [(lb + (s + i) * ls, ll, ld) for i in range(n)]
                    far += [(rb + (d + i) * rs, ll, rd) for i in range(n)]
                nbytes += n * ll
        return local, far, nbytes

    def receive(self, link) -> int:
        """Wait for the sender's notification bound to this ticket; stop when the ticket is
        revoked, the sender goes away, or nothing came for `stall_timeout`."""
        hello = link.hello
        deadline, pause = time.monotonic() + link.stall_timeout, 0.00005
        while True:
            msg = self.agent.take_notif(hello.ticket_id)
            if msg is not None:
                _, _, nbytes, tag = _dec.decode(msg)
                if nbytes == link.expected and hmac.compare_digest(
                        tag, _tag(link.secret, hello.ticket_id, hello.begin, hello.end, nbytes)):
                    return nbytes
                log.warning("nixl: a notification for ticket %s with a wrong tag or size was ignored",
                            hello.ticket_id)
            why = link.stopped()
            if why is None and time.monotonic() > deadline:
                why = f"no notification within {link.stall_timeout}s"
            if why:
                self._fence(link)
                raise TransferError(f"nixl transfer stopped: {why}", "aborted" if "revoked" in why else "timeout")
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    def interrupt(self, conn: socket.socket) -> None:
        pass  # NOTE: `receive` polls the revocation and fences the writer itself: the connection must stay readable

    @staticmethod
    def _fence(link) -> None:
        """Tell the writer to stop and wait until it closed: only then may the blocks be reused."""
        with contextlib.suppress(OSError):
            link.conn.shutdown(socket.SHUT_WR)
        link.wait_sender_closed()

    def writer(self, conn: socket.socket, addr: KVAddr, reply: Reply, begin: int, end: int) -> Writer:
        return _NixlWriter(self, conn, addr, begin, end)
