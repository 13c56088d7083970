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
from kvapi.transfer.shm import SharedPool
from kvapi.transfer.ucx import ucx_available

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)


UCX = pytest.mark.skipif(not ucx_available(), reason="ucxx is not installed (pip install 'microserve[ucx]')")


@pytest.fixture
def pair():
    shared = SharedPool(SPEC, 32)
    outcomes = []
    rx = KVReceiver(shared.tensor, SPEC, shm_path=shared.path, ucx=ucx_available())
    src = torch.randn(SPEC.cache_shape(32))
    yield rx, KVSender(src, SPEC), src, shared.tensor, outcomes
    rx.close()
    shared.close()


def addr(rx, blocks, begin, end, secret="s3cret", ticket="t", spec=SPEC):
    return KVAddr("rx", rx.endpoint, ticket, secret, begin, end, blocks, spec, ["shm", "ucx", "tcp"], host_id(),
                  rx.shm_path, rx.ucx_address)


def test_runs():
    assert page_runs([1, 2, 3, 7, 8], [4, 5, 9, 10, 2]) == [(1, 4, 2), (3, 9, 1), (7, 10, 1), (8, 2, 1)]
    assert block_runs([3, 4, 5, 9]) == [(3, 3), (9, 1)]


@pytest.mark.parametrize("mode", ["tcp", "shm", pytest.param("ucx", marks=UCX)])
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


def test_revoke_stops_a_stalled_transfer(pair):
    rx, tx, _, _, outcomes = pair
    rx.open_ticket("t", "s3cret", [6, 7], outcomes.append)
    gate = threading.Event()
    errors = []

    def layer_ready(layer):
        if layer == 1:
            gate.wait(10)

    def run():
        try:
            tx.send(addr(rx, [6, 7], 0, 8), 0, 8, lambda: [0, 1], "tcp", layer_ready)
        except TransferError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not rx.is_active("t"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not rx.revoke("t")  # busy: the receiver stops it and reports through on_done
    deadline = time.monotonic() + 10
    while not outcomes:
        assert time.monotonic() < deadline
        time.sleep(0.01)
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
