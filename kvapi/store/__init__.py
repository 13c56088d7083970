"""KV store tiers below an engine's page pool (`--kv-store SPEC`, repeatable, fastest first).

    host:SIZE                     DRAM in shared memory, read by every engine on the host (kvapi.store.host)
    disk:PATH[:SIZE]              files under PATH, LRU by size (kvapi.store.disk)
    valkey://HOST:PORT[/DB]       a Redis-protocol server the whole cluster shares (kvapi.store.remote)
    redis://..., rediss://...

SIZE: bytes, or with a unit (`512MiB`, `4GiB`, `1.5GB`, `100M`).
"""

from __future__ import annotations

import re

from kvapi.store.base import (
    CorruptEntry,
    KVStore,
    Seal,
    StoreError,
    TierStats,
    entry_bytes,
    namespace,
)
from kvapi.store.tiers import EventHook, TieredStore

__all__ = ["CorruptEntry", "KVStore", "Seal", "StoreError", "TierStats", "TieredStore", "check_spec", "check_specs",
           "entry_bytes", "namespace", "open_store", "open_tier", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_REMOTE = ("valkey://", "valkeys://", "redis://", "rediss://", "unix://")


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296 (a ValueError names the accepted forms)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number of bytes, optionally with a unit (512MiB, 4GiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def check_spec(spec: str) -> str:
    """The tier a `--kv-store` SPEC names, or a ValueError that shows the accepted forms."""
    if spec == "valkey":
        raise ValueError("--kv-store valkey (a local server for the deployment) is for `microserve launch`; "
                         "an engine takes valkey://HOST:PORT")
    if spec.startswith("host:"):
        parse_size(spec[5:])
        return "host"
    if spec.startswith("disk:"):
        path, _, size = spec[5:].partition(":")
        if not path:
            raise ValueError(f"--kv-store {spec!r}: disk:PATH[:SIZE] needs a PATH")
        if size:
            parse_size(size)
        return "disk"
    if spec.startswith(_REMOTE):
        return "valkey"
    raise ValueError(f"--kv-store {spec!r}: expected host:SIZE, disk:PATH[:SIZE], valkey://HOST:PORT[/DB] "
                     "or redis://HOST:PORT[/DB]")


def open_tier(spec: str, ns: bytes, size: int, password: str | None = None, timeout: float = 0.5,
              secret: bytes = b"") -> KVStore:
    """One tier from its `--kv-store` SPEC; `size`: payload bytes of one block; `secret`: the cluster's
    store secret its entries are sealed with (b"": an insecure engine)."""
    kind = check_spec(spec)
    if kind == "host":
        from kvapi.store.host import HostStore

        return HostStore(ns, size, parse_size(spec[5:]), secret=secret)
    if kind == "disk":
        from kvapi.store.disk import DiskStore

        path, _, cap = spec[5:].partition(":")
        return DiskStore(ns, size, path, parse_size(cap) if cap else None, secret=secret)
    from kvapi.store.remote import RemoteStore

    return RemoteStore(ns, size, spec, password=password, timeout=timeout, secret=secret)


def check_specs(specs: list[str]) -> None:
    """Every SPEC well formed and each tier at most once (ValueError), before anything is opened."""
    kinds = [check_spec(s) for s in specs]
    for kind in sorted(set(kinds)):
        if kinds.count(kind) > 1:
            raise ValueError(f"--kv-store: the {kind} tier is given twice")


def open_store(specs: list[str], ns: bytes, size: int, password: str | None = None,
               on_event: EventHook | None = None, queue_bytes: int = 256 << 20, secret: bytes = b"") -> TieredStore:
    """The engine's tiers in `specs` order (duplicated tiers are refused)."""
    check_specs(specs)
    tiers: list[KVStore] = []
    try:
        for spec in specs:
            tiers.append(open_tier(spec, ns, size, password, secret=secret))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return TieredStore(tiers, queue_bytes=queue_bytes, on_event=on_event)
