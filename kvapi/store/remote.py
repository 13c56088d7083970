"""`RemoteStore` (`valkey://HOST:PORT[/DB]`, `redis://...`): a tier every engine of the cluster shares.

Any Redis-protocol server (Valkey, Redis, KeyDB, Dragonfly), through the maintained `redis`
client (with `hiredis` when installed). One key per block, `mskv:<namespace>:<prefix hash>`,
whose value is the sealed entry (kvapi.store.base: whoever reaches the server without the cluster's
key can neither read an entry nor make one the engines accept); a chain is checked with one
pipelined round trip of EXISTS and loaded with one MGET. Every operation has a deadline
(`timeout`); a server that is down or slow raises `StoreError` (the engine counts it, treats it as
a miss and tries again later).

Entries are written with a TTL (`ttl`, default one day) so a server without `maxmemory` does not
fill up; give the server a `maxmemory` and `maxmemory-policy allkeys-lru` to make it an LRU.
A URL without a password uses the cluster's store password when the server asks for one (the
server `launch --kv-store valkey` starts requires it).
"""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import urlsplit, urlunsplit

from kvapi.store.base import CorruptEntry, KVStore, StoreError

log = logging.getLogger(__name__)


def _client_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, *parts[1:]))


class RemoteStore(KVStore):
    tier = "valkey"
    shared = True

    def __init__(self, ns: bytes, size: int, url: str, password: str | None = None, timeout: float = 0.5,
                 ttl: int = 86400, secret: bytes = b"") -> None:
        super().__init__(ns, size, secret)
        try:
            import redis
        except ImportError as exc:
            raise StoreError("a valkey:// or redis:// KV tier needs the redis client: "
                             "pip install 'microserve[kvstore]'") from exc
        self._errors = (redis.exceptions.RedisError, OSError)
        self.url, self.ttl, self.timeout = url, ttl, timeout
        self._prefix = f"mskv:{ns.hex()}:"
        opts = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "health_check_interval": 30}
        self._client = redis.Redis.from_url(_client_url(url), **opts)
        if password and not self._client.connection_pool.connection_kwargs.get("password"):
            try:
                self._client.ping()
            except self._errors:  # NOTE: the server wants the cluster's password (or is not up yet: assume it does)
                self._client = redis.Redis.from_url(_client_url(url), password=password, **opts)

    def _key(self, h: int) -> str:
        return f"{self._prefix}{h:016x}"

    def contains(self, hashes: list[int]) -> int:
        if not hashes:
            return 0
        try:
            pipe = self._client.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self._key(h))
            found = pipe.execute()
        except self._errors as exc:
            raise StoreError(f"{self.url}: {exc}") from exc
        for i, n in enumerate(found):
            if not n:
                return i
        return len(hashes)

    def get(self, hashes: list[int], out: list[memoryview]) -> int:
        if not hashes:
            return 0
        try:
            frames = self._client.mget([self._key(h) for h in hashes])
        except self._errors as exc:
            raise StoreError(f"{self.url}: {exc}") from exc
        for i, (h, frame, dst) in enumerate(zip(hashes, frames, out)):
            if frame is None:
                return i
            opened = self.seal.open_into(frame, h, dst)
            if opened is None:  # sealed with a cipher this host does not run: a miss, the entry stays
                return i
            if not opened:
                with contextlib.suppress(*self._errors):
                    self._client.delete(self._key(h))
                raise CorruptEntry(f"{self.describe()}: corrupt entry {self._key(h)} (removed)", i)
        return len(hashes)

    def put(self, items: list[tuple[int, memoryview]]) -> list[int]:
        if not items:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for h, payload in items:
                pipe.set(self._key(h), bytes(self.seal.seal(h, payload)), ex=self.ttl)
            pipe.execute()
        except self._errors as exc:
            raise StoreError(f"{self.url}: {exc}") from exc
        return []

    def close(self) -> None:
        with contextlib.suppress(self._errors):
            self._client.close()

    def describe(self) -> str:
        parts = urlsplit(self.url)  # NOTE: never the password
        return f"valkey ({parts.hostname}:{parts.port or 6379}{parts.path})"
