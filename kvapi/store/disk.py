"""`DiskStore` (`disk:PATH[:SIZE]`): one file per block under PATH, least recently used out first.

    PATH/<namespace>/<first byte of hash>/<prefix hash>.kv      a framed entry (kvapi.store.base)

A write goes to a temporary file that is renamed into place: a crash mid-write leaves a stray
`.tmp` (removed at the next start), never a torn entry under a real name. A read is one
`read` of the sealed frame, opened into the caller's buffer (kvapi.store.base; entries of 512 KiB and
more: the next one is read on a second thread while this one opens); a corrupt,
foreign or forged file is deleted and counted. The size cap is kept per engine over what it sees (the files
present at start, what it writes); engines sharing PATH each keep their own books, and one
that finds an entry gone counts a miss. A full disk or a read-only folder raises `StoreError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kvapi.store.base import CorruptEntry, KVStore, StoreError

log = logging.getLogger(__name__)

READ_AHEAD_BYTES = 512 << 10  # entries this large are read on a second thread while the one before opens


class DiskStore(KVStore):
    tier = "disk"

    def __init__(self, ns: bytes, size: int, path: str | Path, capacity: int | None = None,
                 secret: bytes = b"") -> None:
        super().__init__(ns, size, secret)
        self.root = Path(path) / ns.hex()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"disk KV tier {path}: cannot create {self.root}: {exc}") from exc
        if capacity is None:  # NOTE: default: 90% of what is free when the engine starts
            capacity = int(shutil.disk_usage(self.root).free * 0.9)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._files: OrderedDict[int, int] = OrderedDict()  # prefix hash -> bytes, least recent first
        self._used = 0
        self._reader: ThreadPoolExecutor | None = None  # reads the next entry of a `get` (large entries)
        self._scan()

    def _scan(self) -> None:
        found = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".tmp"):  # a write that never finished
                    os.unlink(entry.path)
                    continue
                try:
                    st = entry.stat()
                    found.append((st.st_atime_ns, int(entry.name.removesuffix(".kv"), 16), st.st_size))
                except (OSError, ValueError):
                    continue
        for _, h, n in sorted(found):
            self._files[h] = n
            self._used += n
        self._evict_to(self.capacity)

    def _path(self, h: int) -> Path:
        return self.root / f"{h & 0xFF:02x}" / f"{h:016x}.kv"

    def contains(self, hashes: list[int]) -> int:
        for i, h in enumerate(hashes):
            if h not in self._files and not self._path(h).exists():
                return i
        return len(hashes)

    def get(self, hashes: list[int], out: list[memoryview]) -> int:
        frames = (bytearray(self.frame_bytes + 1), bytearray(self.frame_bytes + 1))  # NOTE: +1: a longer file
        ahead = self._start_read(hashes, 0, frames[0])
        for i, (h, dst) in enumerate(zip(hashes, out)):
            n = ahead.result() if isinstance(ahead, Future) else ahead
            ahead = self._start_read(hashes, i + 1, frames[(i + 1) % 2])  # NOTE: read while this one opens
            if n < 0:
                return i
            opened = n == self.frame_bytes and self.seal.open_into(memoryview(frames[i % 2])[:n], h, dst)
            if opened is None:  # sealed with a cipher this host does not run: a miss, the entry stays
                return i
            if not opened:
                self._forget(h, unlink=True)
                raise CorruptEntry(f"corrupt entry {self._path(h).name} in {self.root} (removed)", i)
            with self._lock:
                if h in self._files:
                    self._files.move_to_end(h)
        return len(hashes)

    def _start_read(self, hashes: list[int], i: int, frame: bytearray) -> Future | int:
        """Read entry `i` of `hashes` into `frame`: on the reader thread when entries are large (the
        caller opens the one before meanwhile: the read and the decrypt release the GIL, so they run on
        two cores), else now. Its result: the bytes read, or -1 when the file is not there."""
        if i >= len(hashes):
            return -1
        if self.frame_bytes < READ_AHEAD_BYTES:  # NOTE: a thread handoff costs more than a small read
            return self._read(hashes[i], frame)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-disk-read")
        return self._reader.submit(self._read, hashes[i], frame)

    def _read(self, h: int, frame: bytearray) -> int:
        path = self._path(h)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(h)
            return -1
        except OSError as exc:
            raise StoreError(f"disk KV tier: cannot read {path}: {exc}") from exc
        try:
            return os.readv(fd, [frame])
        except OSError as exc:
            raise StoreError(f"disk KV tier: cannot read {path}: {exc}") from exc
        finally:
            os.close(fd)

    def put(self, items: list[tuple[int, memoryview]]) -> list[int]:
        evicted: list[int] = []
        frame = self.frame_bytes
        for h, payload in items:
            if h in self._files:
                continue
            with self._lock:
                evicted += self._evict_to(self.capacity - frame)
            path = self._path(h)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                path.parent.mkdir(exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(self.seal.seal(h, payload))
                os.replace(tmp, path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"disk KV tier: cannot write {path}: {exc}") from exc
            with self._lock:
                self._files[h] = frame
                self._used += frame
        return evicted

    def _evict_to(self, budget: int) -> list[int]:  # holds self._lock
        out = []
        while self._used > max(budget, 0) and self._files:
            h, n = self._files.popitem(last=False)
            self._used -= n
            self._path(h).unlink(missing_ok=True)
            out.append(h)
        return out

    def _forget(self, h: int, unlink: bool = False) -> None:
        with self._lock:
            n = self._files.pop(h, None)
            if n is not None:
                self._used -= n
        if unlink:
            self._path(h).unlink(missing_ok=True)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    def describe(self) -> str:
        return f"disk ({self.root}, {self.capacity / 2**30:.1f} GiB)"
