"""`KVStore`: one tier below an engine's page pool, keyed by the radix cache's chained prefix hash.

An entry is one whole block (every layer, K and V) of one prefix, sealed with an AEAD (AEGIS-128L, or
AES-256-GCM where that does not run: `Seal`) under a key derived from the cluster's key and the namespace:

    | magic "MSKV" | version: 3 GCM, 4 AEGIS | namespace (8 B) | prefix hash (8 B) | payload bytes (8 B) |
    | nonce (16 B; GCM uses the first 12) |                                                          header, 48 B
    | ciphertext of the payload ... | tag (16 B) |

The header is the AEAD's associated data, so an entry opens only as the entry it was written as:
a modified, truncated or foreign entry (another cluster's key, another namespace) and one replayed
under another prefix hash all fail the tag, and are a miss (counted as an error), never KV. Without
the key the contents are unreadable. The namespace is a hash of the model's fingerprint and the
`KVSpec` (layers, heads, head dim, dtype, block size, layout): two deployments share a tier safely,
and another model, dtype or block size never reads an entry it cannot use. An engine without a
cluster key (`--insecure`) seals under a key derived from the namespace alone: that still catches
corruption, but anyone who reaches the tier can read and forge its entries.

Every tier is synchronous and thread-safe; the engine calls it from its store threads
(`kvapi.store.tiers.TieredStore`), never from the step loop. A tier that fails (a server down,
a full disk) raises `StoreError`; the caller counts it and treats it as a miss.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvapi.spec import KVSpec
from kvapi.store import aegis

_HEADER = struct.Struct("<4sI8sQQ16s")
HEADER_BYTES = _HEADER.size  # 48
TAG_BYTES = 16
OVERHEAD = HEADER_BYTES + TAG_BYTES  # a frame is the payload plus this
_INTO = hasattr(AESGCM, "decrypt_into")  # cryptography >= 45 seals and opens without a copy
_MAGIC, _GCM, _AEGIS = b"MSKV", 3, 4  # the header's version names the cipher


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


class Seal:
    """Seals and opens the entries of one namespace: AEGIS-128L where this host runs it
    (kvapi.store.aegis: x86-64 with AES-NI and a C++ compiler), else AES-256-GCM; random nonces.
    The header's version names the cipher, so either opens the other's entries where both run.

    Args:
        ns: the namespace (`namespace`).
        secret: the cluster's store secret (b"": an insecure engine; see the module docs).
        cipher: "aegis128l" or "aes256gcm" to seal with; default the fastest this host runs.
    """

    def __init__(self, ns: bytes, secret: bytes = b"", cipher: str | None = None) -> None:
        self.ns = ns
        self._gcm = AESGCM(_derive(ns, secret, b"mskv-aes256gcm", 32))
        self._aegis_key = _derive(ns, secret, b"mskv-aegis128l", 16)
        self._aegis = aegis.load()
        if cipher not in (None, "aegis128l", "aes256gcm"):
            raise ValueError(f"unknown store cipher {cipher!r}; use aegis128l or aes256gcm")
        if cipher == "aegis128l" and self._aegis is None:
            raise ValueError("this host cannot seal with AEGIS-128L (kvapi.store.aegis: no build or no AES-NI)")
        self.cipher = cipher or ("aegis128l" if self._aegis is not None else "aes256gcm")
        self._version = _AEGIS if self.cipher == "aegis128l" else _GCM

    def frame_bytes(self, size: int) -> int:
        return size + OVERHEAD

    def header(self, prefix_hash: int, size: int) -> bytes:
        return _HEADER.pack(_MAGIC, self._version, self.ns, prefix_hash, size, os.urandom(16))

    def seal_into(self, prefix_hash: int, payload: memoryview | bytes, frame: memoryview | bytearray) -> None:
        """Write the sealed entry into `frame` (`frame_bytes(len(payload))` bytes)."""
        header = self.header(prefix_hash, len(payload))
        frame = memoryview(frame)
        frame[:HEADER_BYTES] = header
        if self._version == _AEGIS:
            self._aegis.seal(self._aegis_key, header[-16:], header, payload,  # type: ignore[union-attr]
                             frame[HEADER_BYTES:-TAG_BYTES], frame[-TAG_BYTES:])
        elif _INTO:
            self._gcm.encrypt_into(header[-16:-4], payload, header, frame[HEADER_BYTES:])
        else:  # pragma: no cover  (cryptography < 45: one copy more)
            frame[HEADER_BYTES:] = self._gcm.encrypt(header[-16:-4], bytes(payload), header)

    def seal(self, prefix_hash: int, payload: memoryview | bytes) -> bytearray:
        frame = bytearray(self.frame_bytes(len(payload)))
        self.seal_into(prefix_hash, payload, frame)
        return frame

    def open_into(self, frame: memoryview | bytes, prefix_hash: int, dst: memoryview) -> bool | None:
        """Open `frame` as entry `prefix_hash` of this namespace into `dst` (its payload size).
        False (and `dst` garbage) when it is not that entry, whole and untouched, under this key;
        None when it is sealed with AEGIS-128L and this host cannot open that (a plain miss: the
        entry stays for the engines that can)."""
        frame = memoryview(frame)
        if len(frame) != self.frame_bytes(len(dst)):
            return False
        header = bytes(frame[:HEADER_BYTES])
        magic, version, ns, their_hash, length, nonce = _HEADER.unpack(header)
        if (magic, ns, their_hash, length) != (_MAGIC, self.ns, prefix_hash, len(dst)) or version not in (_GCM, _AEGIS):
            return False
        if version == _AEGIS:
            if self._aegis is None:
                return None
            return self._aegis.open(self._aegis_key, nonce, header, frame[HEADER_BYTES:-TAG_BYTES], frame[-TAG_BYTES:],
                                    dst)
        try:
            if _INTO:
                self._gcm.decrypt_into(nonce[:12], frame[HEADER_BYTES:], header, dst)
            else:  # pragma: no cover  (cryptography < 45: one copy more)
                dst[:] = self._gcm.decrypt(nonce[:12], bytes(frame[HEADER_BYTES:]), header)
        except (InvalidTag, ValueError):
            return False
        return True


def _derive(ns: bytes, secret: bytes, person: bytes, size: int) -> bytes:
    """The key of one cipher for one namespace: a keyed BLAKE2b of the namespace under the secret."""
    return hashlib.blake2b(ns, key=secret[:64], person=person, digest_size=size).digest()


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

    def __init__(self, ns: bytes, size: int, secret: bytes = b"") -> None:
        self.ns, self.size = ns, size  # size: payload bytes of one entry
        self.seal = Seal(ns, secret)
        self.frame_bytes = self.seal.frame_bytes(size)  # what one entry takes in the tier

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
