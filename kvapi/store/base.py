"""`KVStore`: one tier below an engine's page pool, keyed by the radix cache's chained prefix hash.

An entry is one whole block (every layer, K and V) of one prefix, framed with a header that
names what it is and checks what it holds:

    | magic "MSKV" v1 | namespace (8 B) | prefix hash (8 B) | payload bytes (8 B) | xxh3-64 (8 B) | payload ... |

The namespace is a hash of the model's fingerprint and the `KVSpec` (layers, heads, head dim,
dtype, block size, layout): two deployments share a tier safely, and another model, dtype or
block size never reads an entry it cannot use. A frame whose header or checksum does not match
is a miss (counted as an error), never KV.

Every tier is synchronous and thread-safe; the engine calls it from its store threads
(`kvapi.store.tiers.TieredStore`), never from the step loop. A tier that fails (a server down,
a full disk) raises `StoreError`; the caller counts it and treats it as a miss.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import xxhash

from kvapi.spec import KVSpec

_HEADER = struct.Struct("<4sI8sQQQ")
HEADER_BYTES = _HEADER.size  # 40
_MAGIC, _VERSION = b"MSKV", 1


class StoreError(RuntimeError):
    """A tier could not do an operation (unreachable, timed out, full, read-only...): the caller
    stops using it for a while."""


class CorruptEntry(StoreError):
    """An entry failed its checks (a miss; the tier itself works). `loaded`: the good entries
    before it, already copied out; the bad one is removed from the tier."""

    def __init__(self, message: str, loaded: int) -> None:
        super().__init__(message)
        self.loaded = loaded


def namespace(model_fingerprint: str, spec: KVSpec) -> bytes:
    """8 bytes naming the (model, KV layout) pair whose entries may be shared."""
    h = hashlib.blake2b(digest_size=8)
    h.update(model_fingerprint.encode())
    for field in ("layout", *spec.__struct_fields__):
        h.update(f"|{field}={getattr(spec, field)}".encode())
    return h.digest()


def entry_bytes(spec: KVSpec) -> int:
    """Payload bytes of one block of every layer, K and V."""
    return spec.block_size * spec.bytes_per_token


def pack_header(ns: bytes, prefix_hash: int, payload: memoryview | bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, ns, prefix_hash, len(payload), xxhash.xxh3_64_intdigest(payload))


def check_payload(header: memoryview | bytes, payload: memoryview | bytes, ns: bytes, prefix_hash: int) -> bool:
    """Whether `header` frames `payload` as the entry `prefix_hash` of namespace `ns`, intact."""
    if len(header) != HEADER_BYTES:
        return False
    magic, version, their_ns, their_hash, length, digest = _HEADER.unpack_from(header)
    return ((magic, version, their_ns, their_hash, length) == (_MAGIC, _VERSION, ns, prefix_hash, len(payload))
            and xxhash.xxh3_64_intdigest(payload) == digest)


def check_frame(frame: memoryview | bytes, ns: bytes, prefix_hash: int, size: int) -> memoryview | None:
    """The payload of a framed entry when it is the entry asked for and intact, else None."""
    frame = memoryview(frame)
    if len(frame) != HEADER_BYTES + size:
        return None
    payload = frame[HEADER_BYTES:]
    return payload if check_payload(frame[:HEADER_BYTES], payload, ns, prefix_hash) else None


@dataclass
class TierStats:
    """Counters of one tier in one engine (`microserve_kv_store_*` metrics)."""

    hit_tokens: int = 0  # prompt tokens loaded from this tier instead of computed
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # failed operations and corrupt entries
    dropped_writes: int = 0  # writes skipped because the write queue was full


class KVStore:
    """One tier. Entries are whole framed blocks; all methods are blocking and thread-safe.

    Attributes:
        tier: the label in metrics and events ("host", "disk", "valkey").
        shared: whether other engines (on other hosts too) read what this engine writes.
    """

    tier: str = ""
    shared: bool = False

    def __init__(self, ns: bytes, size: int) -> None:
        self.ns, self.size = ns, size  # size: payload bytes of one entry

    def contains(self, hashes: list[int]) -> int:
        """How many of `hashes` (a prompt's chain, in order) are stored, counted from the first."""
        raise NotImplementedError

    def get(self, hashes: list[int], out: list[memoryview]) -> int:
        """Copy the payloads of `hashes` into `out` (one writable view per hash, `size` bytes each);
        returns how many leading entries were there and intact (a bad one ends the run)."""
        raise NotImplementedError

    def put(self, items: list[tuple[int, memoryview]]) -> list[int]:
        """Store (prefix hash, payload) pairs; returns the hashes it evicted to make room."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.tier
