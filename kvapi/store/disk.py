"""`DiskStore` (`disk:PATH[:SIZE]`): one file per block under PATH, least recently used out first.

    PATH/<namespace>/<first byte of hash>/<prefix hash>.kv      a framed entry (kvapi.store.base)

A write goes to a temporary file that is renamed into place: a crash mid-write leaves a stray
`.tmp` (removed at the next start), never a torn entry under a real name. A read is one
`read` of the sealed frame, opened into the caller's buffer (kvapi.store.base); a corrupt,
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
from pathlib import Path

from kvapi.store.base import CorruptEntry, KVStore, StoreError

log = logging.getLogger(__name__)


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
        frame = bytearray(self.frame_bytes + 1)  # NOTE: one byte more: a longer file is caught
        for i, (h, dst) in enumerate(zip(hashes, out)):
            path = self._path(h)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._forget(h)
                return i
            except OSError as exc:
                raise StoreError(f"disk KV tier: cannot read {path}: {exc}") from exc
            try:
                n = os.readv(fd, [frame])
            except OSError as exc:
                raise StoreError(f"disk KV tier: cannot read {path}: {exc}") from exc
            finally:
                os.close(fd)
            opened = n == self.frame_bytes and self.seal.open_into(memoryview(frame)[:n], h, dst)
            if opened is None:  # sealed with a cipher this host does not run: a miss, the entry stays
                return i
            if not opened:
                self._forget(h, unlink=True)
                raise CorruptEntry(f"corrupt entry {path.name} in {self.root} (removed)", i)
            with self._lock:
                if h in self._files:
                    self._files.move_to_end(h)
        return len(hashes)

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

    def describe(self) -> str:
        return f"disk ({self.root}, {self.capacity / 2**30:.1f} GiB)"
