"""kvapi.transfer in one process: both transports, the receiver's checks, revocation."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from kvapi import KVSpec
from kvapi.spec import KVSpecMismatch
from kvapi.transfer import KVAddr, KVReceiver, KVSender, TransferError, choose_transport, host_id
from kvapi.transfer.base import block_runs, page_runs
from kvapi.transfer.nixl import nixl_available
from kvapi.transfer.shm import SharedPool
from kvapi.transfer.ucx import ucx_available

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)


UCX = pytest.mark.skipif(not ucx_available(), reason="ucxx is not installed (pip install 'microserve[ucx]')")
NIXL = pytest.mark.skipif(not nixl_available(), reason="nixl is not installed (pip install 'microserve[nixl]')")


@pytest.fixture
def pair():
    shared = SharedPool(SPEC, 32)
    outcomes = []
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, ucx=ucx_available(), nixl=nixl_available())
    src = torch.randn(SPEC.cache_shape(32))
    yield rx, KVSender(src, SPEC), src, shared.tensor, outcomes
    rx.close()
    shared.close()


def addr(rx, blocks, begin, end, secret="s3cret", ticket="t", spec=SPEC):
    return KVAddr("rx", rx.endpoint, ticket, secret, begin, end, blocks, spec, list(rx.transports), host_id(),
                  **rx.fields)


def test_runs():
    assert page_runs([1, 2, 3, 7, 8], [4, 5, 9, 10, 2]) == [(1, 4, 2), (3, 9, 1), (7, 10, 1), (8, 2, 1)]
    assert block_runs([3, 4, 5, 9]) == [(3, 3), (9, 1)]


@pytest.mark.parametrize("mode", ["tcp", "shm", pytest.param("ucx", marks=UCX), pytest.param("nixl", marks=NIXL)])
def test_pages_land_in_ticket_blocks(pair, mode):
    rx, tx, src, dst, outcomes = pair
    blocks = [20, 21, 5, 30]  # tokens [8, 24): logical blocks 2..5
    rx.open_ticket("t", "s3cret", blocks, outcomes.append)
    stats = tx.send(addr(rx, blocks, 8, 24), 8, 23, lambda: [0, 1, 10, 11, 12, 3], mode)
    assert stats.nbytes == 4 * SPEC.page_bytes * 2 * SPEC.num_layers and stats.transport == mode
    for s, d in zip([10, 11, 12, 3], blocks):
        assert torch.equal(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(32) if b not in blocks]
    assert dst[:, :, untouched].abs().sum() == 0
    assert outcomes[-1].ok and outcomes[-1].end == 23
    with pytest.raises(TransferError) as err:  # one transfer per ticket
        tx.send(addr(rx, blocks, 8, 24), 8, 23, lambda: [0, 1, 10, 11, 12, 3], mode)
    assert err.value.code == "not_found"


@pytest.mark.parametrize("change, code", [
    (dict(secret="wrong"), "forbidden"),
    (dict(blocks=[1, 2]), "forbidden"),
    (dict(ticket="nope"), "not_found"),
])
def test_receiver_refuses(pair, change, code):
    rx, tx, _, dst, outcomes = pair
    rx.open_ticket("t", "s3cret", [6, 7], outcomes.append)
    a = addr(rx, change.get("blocks", [6, 7]), 0, 8, change.get("secret", "s3cret"), change.get("ticket", "t"))
    with pytest.raises(TransferError) as err:
        tx.send(a, 0, 8, lambda: [0, 1], "tcp")
    assert err.value.code == code
    assert dst.abs().sum() == 0 and not outcomes
    assert rx.revoke("t")  # the ticket survived the bad attempt


def test_spec_mismatch_names_the_field(pair):
    rx, tx, *_ = pair
    other = KVSpec(3, 2, 8, "bfloat16", 4)
    with pytest.raises(KVSpecMismatch, match="dtype"):
        tx.send(addr(rx, [1], 0, 4, spec=other), 0, 4, lambda: [0], "tcp")


def _held_send(rx, tx, mode: str):
    """A send into ticket "t" (blocks 6, 7) that holds before layer 1 until `gate` is set; returns once
    the receiver has claimed the ticket and the sender waits at the gate (on a loaded machine the sender
    may still be setting up when the ticket is claimed): (gate, thread, errors raised by the send)."""
    gate, parked, errors = threading.Event(), threading.Event(), []

    def layer_ready(layer):
        if layer == 1:
            parked.set()
            gate.wait(10)

    def run():
        try:
            tx.send(addr(rx, [6, 7], 0, 8), 0, 8, lambda: [0, 1], mode, layer_ready)
        except TransferError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    _wait_for(lambda: rx.is_active("t") and parked.is_set())
    return gate, t, errors


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_revoke_stops_a_stalled_transfer(pair):
    rx, tx, _, _, outcomes = pair
    rx.open_ticket("t", "s3cret", [6, 7], outcomes.append)
    gate, t, errors = _held_send(rx, tx, "tcp")
    assert not rx.revoke("t")  # busy: the receiver stops it and reports through on_done
    _wait_for(lambda: outcomes)
    gate.set()
    t.join(10)
    assert not outcomes[0].ok and errors


def test_choose_transport(pair):
    rx, *_ = pair
    a = addr(rx, [1], 0, 4)
    assert choose_transport(["shm", "tcp"], a) == "shm"
    assert choose_transport(["tcp"], a) == "tcp"
    remote = KVAddr("rx", rx.endpoint, "t", "s", 0, 4, [1], SPEC, ["shm", "tcp"], "other-host/boot", rx.shm_path)
    assert choose_transport(["shm", "tcp"], remote) == "tcp"
    with pytest.raises(TransferError, match="another host"):
        choose_transport(["shm", "tcp"], remote, forced="shm")


def test_idle_connections_take_no_transfer_slot_but_real_transfers_are_capped():
    """Slots go only to transfers whose hello names a live ticket with its secret: 64 idle
    connections (and garbage) change nothing; a second real transfer beyond the cap is refused."""
    shared = SharedPool(SPEC, 8)
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, max_connections=1, handshake_timeout=1.0)
    port = int(rx.endpoint.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(b"\xff\xff\xff\xff")  # a 4 GiB length prefix: refused before any allocation
    try:
        time.sleep(0.2)
        tx = KVSender(torch.randn(SPEC.cache_shape(8)), SPEC)
        rx.open_ticket("t", "s3cret", [1], lambda o: None)
        assert tx.send(addr(rx, [1], 0, 4), 0, 4, lambda: [0], "tcp").nbytes > 0
        # one transfer in flight (held at layer 0) has the only slot: a second one is refused
        gate, started = threading.Event(), threading.Event()
        rx.open_ticket("t1", "s3cret", [2], lambda o: None)
        rx.open_ticket("t2", "s3cret", [3], lambda o: None)

        def held(layer: int) -> None:
            started.set()
            gate.wait(10)

        first = threading.Thread(target=lambda: tx.send(addr(rx, [2], 0, 4, ticket="t1"), 0, 4, lambda: [0], "tcp",
                                                        held))
        first.start()
        assert started.wait(10)
        with pytest.raises(TransferError) as err:
            tx.send(addr(rx, [3], 0, 4, ticket="t2"), 0, 4, lambda: [0], "tcp")
        assert err.value.code == "overloaded"
        gate.set()
        first.join(10)
        # idle connections are cut after the handshake deadline
        time.sleep(1.5)
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
    finally:
        for sock in [*idle, garbage]:
            sock.close()
        rx.close()
        shared.close()


def test_back_to_back_transfers_never_find_their_own_last_slot_taken():
    """With one slot, a sender that starts its next transfer as soon as the last one's reply came is served:
    the receiver frees the slot before it sends the final reply (it freed it after, a race: "overloaded")."""
    shared = SharedPool(SPEC, 8)
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, max_connections=1)
    tx = KVSender(torch.randn(SPEC.cache_shape(8)), SPEC)
    try:
        for i in range(200):
            rx.open_ticket(f"t{i}", "s3cret", [1 + i % 4], lambda o: None)
            assert tx.send(addr(rx, [1 + i % 4], 0, 4, ticket=f"t{i}"), 0, 4, lambda: [0], "tcp").nbytes > 0
    finally:
        rx.close()
        shared.close()


def test_a_flood_of_idle_connections_and_a_trickled_hello_never_stop_a_transfer():
    """A keyless flooder holds 300 connections to the KV port and opens a new one for every one
    closed, and a trickler sends a hello a byte at a time: 20 transfers still succeed one after
    another (the oldest introductions make room; a real hello follows its connect at once), and
    the trickled hello is cut by the deadline on the whole hello, before it is half sent."""
    from hostile import KVFlood

    from kvapi.transfer.base import Hello, _encoder

    shared = SharedPool(SPEC, 32)
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, handshake_timeout=1.0)
    host, port = rx.endpoint.rsplit(":", 1)

    hello = _encoder.encode(Hello("x", "y", "tcp", SPEC, [1], 0, 4))
    frame = len(hello).to_bytes(4, "big") + hello
    cut_after: list[int] = []

    def trickler() -> None:
        sock = socket.create_connection((host, int(port)))
        sock.settimeout(0.25)
        for i, byte in enumerate(frame):
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    cut_after.append(i + 1)
                    break
            except TimeoutError:
                continue
            except OSError:
                cut_after.append(i + 1)
                break
        sock.close()

    flood = KVFlood([rx.endpoint], 300)
    trickle = threading.Thread(target=trickler)
    trickle.start()
    try:
        time.sleep(0.2)  # the flood holds its connections
        tx = KVSender(torch.randn(SPEC.cache_shape(32)), SPEC)
        for i in range(20):
            rx.open_ticket(f"t{i}", "s3cret", [i + 1], lambda o: None)
            for mode in ("tcp", "shm"):
                if mode == "shm":
                    rx.open_ticket(f"t{i}s", "s3cret", [i + 1], lambda o: None)
                stats = tx.send(addr(rx, [i + 1], 0, 4, ticket=f"t{i}" + ("s" if mode == "shm" else "")), 0, 4,
                                lambda: [0], mode)
                assert stats.nbytes > 0
        trickle.join(30)
        assert cut_after and cut_after[0] < len(frame) // 2, (cut_after, len(frame))
        assert rx.refused_handshakes > 300
    finally:
        flood.stop()
        rx.close()
        shared.close()


def test_a_refused_hello_learns_nothing_and_a_wrong_pool_leaves_the_ticket_live():
    """A peer without the ticket's secret gets no pool path in the reply; a sender whose (signed) address
    names another shared pool is refused before the ticket is taken, so the ticket stays live and the
    real transfer still lands."""
    from kvapi.transfer.base import Hello, Reply, recv_msg, send_msg

    shared = SharedPool(SPEC, 8)
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path)
    outcomes: list = []
    try:
        rx.open_ticket("t", "s3cret", [1], outcomes.append)
        host, port = rx.endpoint.rsplit(":", 1)
        for secret, pool in (("guess", ""), ("s3cret", "/proc/1/fd/3")):
            with socket.create_connection((host, int(port))) as sock:
                send_msg(sock, Hello("t", secret, "shm", SPEC, [1], 0, 4, pool))
                reply = recv_msg(sock)
            assert isinstance(reply, Reply) and not reply.ok and reply.code == "forbidden"
            assert reply.shm_path == "" and shared.path not in reply.error
        assert outcomes == [] and not rx.is_active("t")
        tx = KVSender(torch.randn(SPEC.cache_shape(8)), SPEC)
        assert tx.send(addr(rx, [1], 0, 4), 0, 4, lambda: [0], "shm").nbytes > 0
        assert outcomes[-1].ok
    finally:
        rx.close()
        shared.close()


@UCX
def test_ucx_revoked_receive_never_writes_into_freed_blocks():
    """UCX cannot cancel one posted receive: a receiver that gives up reports its blocks
    free only once no receive can write into them, and a message that comes later (a slow
    or paused sender) must not land there."""
    from kvapi.transfer import ucx
    from kvapi.transfer.base import Hello, Reply, recv_msg, send_msg
    from kvapi.transfer.sender import split_endpoint

    shared = SharedPool(SPEC, 8)
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, ucx=True, timeout=1.0)
    done = threading.Event()
    outcomes = []
    rx.open_ticket("t", "s3cret", [2, 3], lambda o: (outcomes.append(o), done.set()))
    try:
        with socket.create_connection(split_endpoint(rx.endpoint)) as conn:
            send_msg(conn, Hello("t", "s3cret", "ucx", SPEC, [2, 3], 0, 8))
            assert isinstance(recv_msg(conn), Reply)  # accepted: receives are posted, no data comes
            t0 = time.monotonic()
            assert not rx.revoke("t"), "an active transfer is stopped, not dropped"
            assert done.wait(10)
            waited = time.monotonic() - t0
        assert not outcomes[0].ok and "revoked" in outcomes[0].error
        assert waited >= 0.9, f"blocks reported free after {waited:.2f}s, while receives were still posted"
        # a late message with the ticket's tags finds no receive: the freed blocks stay as they were
        worker = ucx.UCXWorker.get()
        late = torch.ones(SPEC.cache_shape(8))[0, 0, :2]
        worker.send(worker.endpoint(rx.ucx_address), late, ucx.tag_base("t", "s3cret"))
        time.sleep(0.3)
        assert shared.tensor.abs().sum() == 0
    finally:
        rx.close()
        shared.close()


def test_the_seam_is_one_registry():
    """Every transport is one module with one `Transport` subclass, listed in the registry in the
    order `--transport auto` prefers; no code outside the registry and a transport's own module
    branches on a transport's name."""
    import pathlib
    import re

    from kvapi.transfer.base import TRANSPORTS, Transport, transport_class

    assert TRANSPORTS == ("shm", "nixl", "ucx", "tcp")
    root = pathlib.Path(__file__).resolve().parents[1]
    for name in TRANSPORTS:
        cls = transport_class(name)
        assert issubclass(cls, Transport) and cls.name == name
        assert cls.__module__ == f"kvapi.transfer.{name}", "one module per transport"
    names = "|".join(TRANSPORTS)
    branch = re.compile(rf"""(==|!=|\bin)\s*[\(\[]?\s*["']({names})["']"""
                        rf"""|["']({names})["']\s*(==|!=|\bnot in\b|\bin\b)""")
    offenders = []
    for path in [*root.glob("microserve/**/*.py"), *root.glob("kvapi/**/*.py"), *root.glob("strategies/*.py")]:
        rel = path.relative_to(root).as_posix()
        if rel in {f"kvapi/transfer/{n}.py" for n in TRANSPORTS} | {"kvapi/transfer/base.py"}:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if branch.search(code) and "scheme" not in code:  # NOTE: "tcp" is also ZeroMQ's URL scheme
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "branches on a transport name outside the registry:\n" + "\n".join(offenders)


@NIXL
def test_nixl_notification_for_another_ticket_or_with_a_wrong_tag_completes_nothing(pair):
    """The notification that completes a ticket is bound to its id and secret: one for another
    ticket, or with a tag not made from the secret, completes nothing; the receive then ends when its
    sender goes away, and no byte of the pool was written."""
    import msgspec

    from kvapi.transfer.base import Hello, recv_msg, send_msg
    from kvapi.transfer.nixl import NixlAgent
    from kvapi.transfer.sender import split_endpoint

    rx, _, _, dst, outcomes = pair
    rx.open_ticket("t2", "s3cret", [2, 3], outcomes.append)
    rx.open_ticket("t3", "other", [4], outcomes.append)
    expected = 2 * SPEC.page_bytes * 2 * SPEC.num_layers
    agent = NixlAgent.get()
    enc = msgspec.msgpack.Encoder()
    with socket.create_connection(split_endpoint(rx.endpoint)) as conn:
        send_msg(conn, Hello("t2", "s3cret", "nixl", SPEC, [2, 3], 0, 8))
        assert recv_msg(conn).ok  # claimed: the receiver waits for t2's notification
        for forged in ([b"mskv1", "t2", expected, b"\0" * 16],  # wrong tag
                       [b"mskv1", "t3", 4 * SPEC.page_bytes * 2 * SPEC.num_layers, b"\0" * 16],  # another ticket
                       b"garbage"):
            agent.agent.send_notif(agent.name, enc.encode(forged) if isinstance(forged, list) else forged)
        time.sleep(0.5)
        assert not outcomes and rx.is_active("t2")
    deadline = time.monotonic() + 10
    while not outcomes:  # the sender went away: the receive ends without data
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not outcomes[0].ok and "went away" in outcomes[0].error
    assert dst.abs().sum() == 0


@NIXL
def test_nixl_revoke_waits_until_the_writer_stopped(pair):
    """A one-sided writer cannot be stopped from the receiving side: a revoked ticket's blocks are
    handed back only once its sender saw the revocation and closed, so no write lands in freed blocks."""
    rx, tx, _, dst, outcomes = pair
    rx.open_ticket("t", "s3cret", [6, 7], outcomes.append)
    gate, t, errors = _held_send(rx, tx, "nixl")
    assert not rx.revoke("t")
    time.sleep(0.5)
    assert not outcomes, "the blocks were handed back while the writer could still write"
    gate.set()  # the writer goes on, sees the revocation before its next write, and stops
    t.join(10)
    _wait_for(lambda: outcomes)
    assert not outcomes[0].ok and errors and errors[0].code == "aborted"
    assert dst[1:].abs().sum() == 0, "a layer was written after the revocation"


def test_a_transport_that_cannot_start_is_left_out_under_auto(monkeypatch):
    """`--transport auto` (best effort): a transport whose library fails on this pool is not offered and
    the engine starts on the rest; named explicitly, the same failure stops the receiver."""
    from kvapi.transfer import ucx

    def broken(self, *args, **kwargs):
        raise RuntimeError("cannot register this pool")

    monkeypatch.setattr(ucx.UCXTransport, "__init__", broken)
    pool = torch.zeros(SPEC.cache_shape(4))
    rx = KVReceiver(pool, SPEC, transports=["ucx"], best_effort=True)
    try:
        assert list(rx.transports) == ["tcp"] and "ucx_address" not in rx.fields
    finally:
        rx.close()
    with pytest.raises(RuntimeError, match="cannot register"):
        KVReceiver(pool, SPEC, transports=["ucx"])
