"""`HostStore` (`host:SIZE`): DRAM below the page pool, in shared memory every engine on the host reads.

One file in `/dev/shm` per (model, KV layout, cluster) namespace, mapped by every engine of that
namespace on the host: an entry one engine writes, another loads with one copy. The file is a
set-associative cache (as a CPU cache): a prefix hash picks a set of `WAYS` slots, a new entry
takes an empty slot or the least recently used one of its set. No index lives outside the file.

    | file header | slot meta [num_slots x (key, version, stamp, 0)] | slot frames [num_slots x frame] |

Writers take a lock (a thread lock and `flock` across processes). Readers take none: each slot
carries a version that a writer makes odd while it writes (a seqlock); a reader copies the
frame (opening it: kvapi.store.base), then checks the version did not move, else it is a miss; a
frame that does not open under a stable version is corrupt.
The file outlives the engines (a cache the next engine on the host warms up from); `launch`
puts it in its run directory and removes it on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kvapi.store.base import CorruptEntry, KVStore, StoreError

log = logging.getLogger(__name__)

WAYS = 16  # NOTE: 8 lost ~0.1% of entries to full sets at a third of capacity; one lost block costs a chain
_FILE_HEADER = struct.Struct("<8sI8sQQ")  # magic, version, namespace, entry payload size, slots
_FILE_MAGIC, _FILE_VERSION = b"MSKVHOST", 2
_META_WORDS = 4  # key, version, stamp, reserved
_ALIGN = 64


def host_dir() -> Path:
    """Where host tiers live: `$MICROSERVE_KV_HOST_DIR` (launch's run directory), else /dev/shm
    (else the temporary folder, on systems without /dev/shm)."""
    given = os.environ.get("MICROSERVE_KV_HOST_DIR")
    if given:
        return Path(given)
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class HostStore(KVStore):
    tier = "host"

    def __init__(self, ns: bytes, size: int, capacity: int, path: Path | None = None, secret: bytes = b"") -> None:
        super().__init__(ns, size, secret)
        self.slot_bytes = _round_up(self.frame_bytes, _ALIGN)
        slots = capacity // self.slot_bytes // WAYS * WAYS
        if slots < WAYS:
            raise ValueError(f"host tier of {capacity} bytes holds fewer than {WAYS} blocks of {size} bytes; "
                             f"give it at least {WAYS * self.slot_bytes} bytes")
        self.path = path or host_dir() / f"microserve-kvstore{_FILE_VERSION}-{os.getuid()}-{ns.hex()}"
        self._fd = self._open(slots)
        total = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, total)
        magic, version, their_ns, their_size, slots = _FILE_HEADER.unpack_from(self._map)
        if magic != _FILE_MAGIC or version != _FILE_VERSION or their_ns != ns or their_size != size:
            raise StoreError(f"{self.path} is not a host KV tier of this model and layout")
        self.num_slots, self.num_sets = slots, slots // WAYS
        self._meta_off = _round_up(_FILE_HEADER.size, _ALIGN)
        self._data_off = _round_up(self._meta_off + slots * _META_WORDS * 8, 4096)
        self._meta = np.frombuffer(self._map, np.uint64, slots * _META_WORDS, self._meta_off).reshape(slots, 4)
        self._lock = threading.Lock()

    def _open(self, slots: int) -> int:
        """Map the namespace's file, creating it (atomically: another engine may race us) if new."""
        try:
            return os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            pass
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            meta = _round_up(_round_up(_FILE_HEADER.size, _ALIGN) + slots * _META_WORDS * 8, 4096)
            os.ftruncate(fd, meta + slots * self.slot_bytes)
            os.pwrite(fd, _FILE_HEADER.pack(_FILE_MAGIC, _FILE_VERSION, self.ns, self.size, slots), 0)
            try:
                os.link(tmp, self.path)  # fails if another engine made it first: use theirs
            except FileExistsError:
                os.close(fd)
                fd = os.open(self.path, os.O_RDWR)
            else:
                log.info("host KV tier: %s, %d blocks (%.1f MiB)", self.path, slots,
                         slots * self.slot_bytes / 2**20)
        finally:
            tmp.unlink(missing_ok=True)
        return fd

    def _frame(self, slot: int) -> memoryview:
        off = self._data_off + slot * self.slot_bytes
        return memoryview(self._map)[off:off + self.frame_bytes]

    def _find(self, key: int) -> int:
        base = (key % self.num_sets) * WAYS
        keys = self._meta[base:base + WAYS, 0].tolist()  # NOTE: a list scan beats numpy on 8 entries
        return base + keys.index(key) if key in keys else -1

    def contains(self, hashes: list[int]) -> int:
        for i, h in enumerate(hashes):
            if self._find(h) < 0:
                return i
        return len(hashes)

    def get(self, hashes: list[int], out: list[memoryview]) -> int:
        for i, (h, dst) in enumerate(zip(hashes, out)):
            slot = self._find(h)
            if slot < 0:
                return i
            meta = self._meta[slot]
            version = int(meta[1])
            opened = self.seal.open_into(self._frame(slot), h, dst)  # NOTE: straight from the map, one pass
            if version & 1 or int(meta[1]) != version or int(meta[0]) != h:
                return i  # a writer took the slot meanwhile
            if opened is None:  # sealed with a cipher this host does not run: a miss, the entry stays
                return i
            if not opened:
                self._clear(slot, h)
                raise CorruptEntry(f"corrupt entry {h:016x} in {self.path} (removed)", i)
            meta[2] = time.monotonic_ns()
        return len(hashes)

    def _clear(self, slot: int, h: int) -> None:
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if int(self._meta[slot, 0]) == h:
                    self._meta[slot, 0] = 0
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def put(self, items: list[tuple[int, memoryview]]) -> list[int]:
        evicted = []
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                for h, payload in items:
                    if h == 0 or self._find(h) >= 0:
                        continue
                    base = (h % self.num_sets) * WAYS
                    ways = self._meta[base:base + WAYS]
                    slot = base + int(np.argmin(np.where(ways[:, 0] == 0, 0, ways[:, 2] + 1)))
                    meta = self._meta[slot]
                    if meta[0]:
                        evicted.append(int(meta[0]))
                    meta[1] += np.uint64(1)  # odd: being written
                    meta[0] = 0
                    self.seal.seal_into(h, payload, self._frame(slot))
                    meta[2] = time.monotonic_ns()
                    meta[0] = h
                    meta[1] += np.uint64(1)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return evicted

    def close(self) -> None:
        self._meta = None  # type: ignore[assignment]  # NOTE: the map closes once no view is left
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)

    def describe(self) -> str:
        return f"host ({self.num_slots} blocks, {self.path})"
