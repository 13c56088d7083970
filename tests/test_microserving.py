"""The microserving calls between real engine processes (ZeroMQ + kvapi.transfer).

Engines: P (sender), D (receiver), C (third engine, migration target), T (offers tcp
only) and R (reference: prefix caching off, every answer computed from scratch).
Greedy outputs of every flow must equal R's; no test may leave a block behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from types import SimpleNamespace

import msgspec
import pytest
import torch
import zmq
import zmq.asyncio
from checkpoints import assert_follows_reference, make_checkpoint
from engines import collect, start_engine, wait_engine
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvapi.radix import prefix_hashes
from kvapi.transfer.base import sign_addr
from kvapi.transfer.nixl import nixl_available
from kvapi.transfer.ucx import ucx_available
from microserve import SamplingParams
from microserve.protocol import Request, decode_event, decode_reply
from microserve.router import EngineCallError, EngineHandle, EngineTimeout
from microserve.security import resolve as resolve_key

BS = 16
VOCAB = 256
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
TRANSPORTS = ["tcp", "shm", pytest.param("ucx", marks=pytest.mark.skipif(
    not ucx_available(), reason="ucxx is not installed (pip install 'microserve[ucx]')")),
    pytest.param("nixl", marks=pytest.mark.skipif(
        not nixl_available(), reason="nixl is not installed (pip install 'microserve[nixl]')"))]
COMMON = ["--num-kv-blocks", "400", "--block-size", str(BS), "--log-level", "error"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ms"), "llama", max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def cluster(model):
    layout = {"P": [], "D": [], "C": [], "T": ["--transport", "tcp"], "R": ["--no-prefix-caching"]}
    procs = {name: start_engine(model, *COMMON, *extra, engine_id=name) for name, extra in layout.items()}
    engines = {name: wait_engine(p) for name, p in procs.items()}
    yield engines
    for eng in engines.values():
        eng.proc.terminate()
    for name, eng in engines.items():
        assert eng.proc.wait(30) == 0, f"engine {name} did not exit cleanly on SIGTERM"


def handles(cluster, *names, timeout=30.0):
    return [EngineHandle(cluster[n].rpc, name=n, timeout=timeout) for n in names]


_ids = iter(range(10**9))


def req(prompt, sampling=GREEDY) -> Request:
    return Request(f"req-{next(_ids)}", list(prompt), sampling)


def rand_prompt(n, seed=None):
    rng = random.Random(seed)
    return [rng.randrange(2, VOCAB) for _ in range(n)]


async def reference(cluster, prompt, sampling=GREEDY):
    (r,) = handles(cluster, "R")
    try:
        tokens, _ = await collect(r.start_generate(req(prompt, sampling)))
        return tokens
    finally:
        await r.close()


async def assert_no_leaks(cluster, names=("P", "D", "C", "T", "R"), timeout=5.0):
    """Used blocks == blocks the prefix cache holds; nothing open, nothing running."""
    hs = handles(cluster, *names)
    try:
        deadline = time.monotonic() + timeout
        for h in hs:
            while True:
                s = await h.stats()
                clean = (s.kv_blocks_used == s.kv_blocks_cached and s.open_tickets == 0 and s.active_sends == 0
                         and s.running == 0 and s.waiting == 0)
                if clean:
                    break
                assert time.monotonic() < deadline, f"engine {h.name} leaks: {s}"
                await asyncio.sleep(0.05)
    finally:
        for h in hs:
            await h.close()


async def balanced_pd(p, d, r, split, transport):
    """prep_recv on D up to `split`, the missing part from P, generation on D."""
    ticket = await d.prep_recv(r, end=split)
    sent = None
    if ticket.matched < split:
        sent = await p.remote_send(r, ticket.kv, begin=ticket.matched, end=split, transport=transport)
    tokens, last = await collect(d.start_generate(r, begin=split))
    return ticket, sent, tokens, last


# -- PD, balanced PD, migration --------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pd_matches_one_engine(cluster, transport):
    p, d = handles(cluster, "P", "D")
    prompt = rand_prompt(77)
    r = req(prompt)
    ticket, sent, tokens, last = await balanced_pd(p, d, r, len(prompt), transport)
    assert ticket.matched == 0
    assert sent.transport == transport and sent.computed_tokens == len(prompt)
    spec = ticket.kv.spec
    assert sent.bytes == -(-len(prompt) // BS) * spec.page_bytes * 2 * spec.num_layers
    assert tokens == await reference(cluster, prompt)
    assert last.finish_reason == "length" and last.num_cached_tokens == len(prompt) - 1
    await assert_no_leaks(cluster)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_balanced_pd_any_split(cluster, transport):
    n = 50

    @settings(max_examples=12, deadline=None, database=None)
    @given(split=st.integers(0, n), seed=st.integers(0, 2**16))
    @example(split=0, seed=1)
    @example(split=1, seed=2)
    @example(split=BS - 1, seed=3)
    @example(split=BS, seed=4)
    @example(split=BS + 1, seed=5)
    @example(split=2 * BS, seed=6)
    @example(split=n - 1, seed=7)
    @example(split=n, seed=8)
    def check(split, seed):
        async def run():
            p, d = handles(cluster, "P", "D")
            prompt = rand_prompt(n, seed)
            # half the time D already caches a prefix of the prompt
            if seed % 2:
                await collect(d.start_generate(req(prompt[:seed % n] + rand_prompt(3))))
            _, _, tokens, _ = await balanced_pd(p, d, req(prompt), split, transport)
            assert tokens == await reference(cluster, prompt), f"split={split}"
            await p.close()
            await d.close()
        asyncio.run(run())

    check()
    asyncio.run(assert_no_leaks(cluster))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_context_migration_reuses_cached_kv(cluster, transport):
    """A computed a request; its cached prefix moves to C with no compute on A."""
    a, c = handles(cluster, "P", "C")
    prompt = rand_prompt(3 * BS + 5)
    first, _ = await collect(a.start_generate(req(prompt)))
    end = (len(prompt) // BS) * BS  # what A's prefix cache holds of the prompt
    before = (await a.stats()).computed_tokens_total
    r = req(prompt)
    ticket = await c.prep_recv(r, end=end)
    sent = await a.remote_send(r, ticket.kv, begin=ticket.matched, end=end, transport=transport)
    assert sent.computed_tokens == 0 and (await a.stats()).computed_tokens_total == before
    c_before = (await c.stats()).computed_tokens_total
    tokens, last = await collect(c.start_generate(r, begin=end))
    assert tokens == first
    assert last.num_cached_tokens == end
    # C computed only the prompt tail and the decodes
    assert (await c.stats()).computed_tokens_total - c_before == len(prompt) - end + GREEDY.max_tokens - 1
    await assert_no_leaks(cluster)


async def test_prefix_on_receiver_sends_only_the_rest(cluster):
    p, d = handles(cluster, "P", "D")
    shared = rand_prompt(2 * BS)
    await collect(d.start_generate(req(shared + rand_prompt(7))))
    prompt = shared + rand_prompt(40)
    r = req(prompt)
    ticket = await d.prep_recv(r, end=len(prompt))
    assert ticket.matched == 2 * BS
    sent = await p.remote_send(r, ticket.kv, begin=ticket.matched, end=len(prompt))
    spec = ticket.kv.spec
    blocks = -(-len(prompt) // BS) - 2
    assert sent.bytes == blocks * spec.page_bytes * 2 * spec.num_layers
    tokens, _ = await collect(d.start_generate(r, begin=len(prompt)))
    assert tokens == await reference(cluster, prompt)
    await assert_no_leaks(cluster)


async def test_host_id_override_keeps_shm_within_a_node(model, monkeypatch):
    """`$MICROSERVE_HOST_ID` (launch --ray sets the Ray node id): engines of two nodes on one machine
    move KV over the network (nixl when installed, then ucx, else tcp) with `--transport auto`; engines of
    one node over shm."""
    engines = {}
    for name, node in (("N1a", "node-1"), ("N1b", "node-1"), ("N2", "node-2")):
        monkeypatch.setenv("MICROSERVE_HOST_ID", node)
        engines[name] = start_engine(model, *COMMON, engine_id=name)
    monkeypatch.delenv("MICROSERVE_HOST_ID")
    procs = {name: wait_engine(p) for name, p in engines.items()}
    try:
        a, b, c = (EngineHandle(procs[n].rpc, name=n, timeout=30.0) for n in ("N1a", "N1b", "N2"))
        network = "nixl" if nixl_available() else "ucx" if ucx_available() else "tcp"
        for sender, receiver, expected in ((a, b, "shm"), (a, c, network)):
            prompt = rand_prompt(40)
            r = req(prompt)
            ticket = await receiver.prep_recv(r)
            assert (await sender.remote_send(r, ticket.kv)).transport == expected
            await collect(receiver.start_generate(r, begin=len(prompt)))
        for h in (a, b, c):
            await h.close()
    finally:
        for p in procs.values():
            p.stop()


async def test_start_generate_waits_for_transfer_in_flight(cluster):
    """start_generate may be called before remote_send returns: it waits for the KV."""
    p, d = handles(cluster, "P", "D")
    prompt = rand_prompt(600)
    r = req(prompt)
    ticket = await d.prep_recv(r)
    send = asyncio.ensure_future(p.remote_send(r, ticket.kv))
    tokens, last = await collect(d.start_generate(r, begin=len(prompt)))
    assert (await send).bytes > 0
    assert last.num_cached_tokens == len(prompt) - 1  # D used the KV, did not recompute it
    assert tokens == await reference(cluster, prompt)
    await assert_no_leaks(cluster)


async def test_transport_negotiation(cluster):
    p, d, t = handles(cluster, "P", "D", "T")
    for sender, receiver, expected in ((p, d, "shm"), (p, t, "tcp"), (t, d, "tcp")):
        prompt = rand_prompt(20)
        r = req(prompt)
        ticket = await receiver.prep_recv(r)
        sent = await sender.remote_send(r, ticket.kv)
        assert sent.transport == expected
        tokens, _ = await collect(receiver.start_generate(r, begin=len(prompt)))
        assert tokens == await reference(cluster, prompt)
    r = req(rand_prompt(20))
    ticket = await t.prep_recv(r)
    with pytest.raises(EngineCallError, match="shm") as err:
        await p.remote_send(r, ticket.kv, transport="shm")
    assert err.value.code == "bad_request"
    assert await t.abort(r.request_id)
    assert not await t.abort("no-such-request")
    await assert_no_leaks(cluster)


# -- leases and aborts -------------------------------------------------------------------
async def test_lease_expiry_frees_blocks(cluster):
    p, d = handles(cluster, "P", "D")
    used_before = (await d.stats()).kv_blocks_used
    r = req(rand_prompt(70))
    ticket = await d.prep_recv(r, lease_s=0.3)
    s = await d.stats()
    assert s.open_tickets == 1 and s.kv_blocks_used == used_before + 5
    await asyncio.sleep(0.6)
    with pytest.raises(EngineCallError) as err:
        await p.remote_send(r, ticket.kv)
    assert err.value.code == "not_found" and "expired" in str(err.value)
    await assert_no_leaks(cluster)


async def test_abort_frees_everything(cluster):
    p, d = handles(cluster, "P", "D")
    # a reserved ticket
    r = req(rand_prompt(60))
    await d.prep_recv(r)
    assert await d.abort(r.request_id)
    # while start_generate waits for KV that never comes
    r = req(rand_prompt(60))
    await d.prep_recv(r)
    waiting = asyncio.ensure_future(collect(d.start_generate(r, begin=60)))
    await asyncio.sleep(0.2)
    assert await d.abort(r.request_id)
    with pytest.raises(EngineCallError) as err:
        await waiting
    assert err.value.code == "aborted"
    # mid-generation
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    r = req(rand_prompt(30), long)
    stream = d.start_generate(r)
    first = await stream.__anext__()
    assert first.finish_reason is None
    assert await d.abort(r.request_id)
    _, last = await collect(stream)
    assert last.finish_reason == "abort"
    # a consumer that walks away aborts too
    r = req(rand_prompt(30), long)
    async for _ in d.start_generate(r):
        break
    # mid-transfer: D is stopped after its ticket, so P's send is surely in flight (waiting on
    # D's receiver) when both ends abort; a send that could finish first would prove nothing
    r = req(rand_prompt(1500))
    ticket = await d.prep_recv(r)
    os.kill(cluster["D"].proc.pid, signal.SIGSTOP)
    try:
        send = asyncio.ensure_future(p.remote_send(r, ticket.kv))
        await asyncio.sleep(0.5)
        assert not send.done(), "the send cannot finish while its receiver is stopped"
        assert await p.abort(r.request_id)
    finally:
        os.kill(cluster["D"].proc.pid, signal.SIGCONT)
    # D may already have dropped the ticket on its own, seeing P's send break off (then there is
    # nothing left to abort): either way the ticket must be gone, which assert_no_leaks checks
    await d.abort(r.request_id)
    with pytest.raises(EngineCallError):
        await send
    await assert_no_leaks(cluster)


# -- bad peers and bad input --------------------------------------------------------------
async def test_wrong_secret_blocks_spec(cluster):
    p, d = handles(cluster, "P", "D")
    prompt = rand_prompt(40)
    r = req(prompt)
    ticket = await d.prep_recv(r)
    kv = ticket.kv
    key = resolve_key(None).kv_key
    bad = [
        # changed without the cluster key: the sender refuses before it connects anywhere
        (msgspec.structs.replace(kv, secret="0" * 32), "forbidden", "not signed"),
        (msgspec.structs.replace(kv, block_ids=[b + 1 for b in kv.block_ids]), "forbidden", "not signed"),
        # changed by a holder of the key: the receiver's own checks still refuse
        (sign_addr(msgspec.structs.replace(kv, secret="0" * 32), key), "forbidden", "secret"),
        (sign_addr(msgspec.structs.replace(kv, secret="é" * 32), key), "forbidden", "secret"),
        (sign_addr(msgspec.structs.replace(kv, block_ids=[b + 1 for b in kv.block_ids]), key), "forbidden",
         "blocks"),
        (msgspec.structs.replace(kv, spec=msgspec.structs.replace(kv.spec, head_dim=kv.spec.head_dim * 2)),
         "kv_spec_mismatch", "head_dim"),
        (msgspec.structs.replace(kv, spec=msgspec.structs.replace(kv.spec, block_size=8)),
         "kv_spec_mismatch", "block_size"),
        # the receiver serves other weights of the same shapes (another checkpoint's fingerprint)
        (sign_addr(msgspec.structs.replace(kv, model="0" * 32), key), "kv_spec_mismatch", "another model"),
    ]
    assert len(kv.model) == 32, "a ticket names its engine's model by the checkpoint's fingerprint"
    for addr, code, words in bad:
        with pytest.raises(EngineCallError, match=words) as err:
            await p.remote_send(r, addr, timeout=10)
        assert err.value.code == code
    # the genuine ticket still works after the bad attempts
    await p.remote_send(r, kv)
    tokens, _ = await collect(d.start_generate(r, begin=len(prompt)))
    assert tokens == await reference(cluster, prompt)
    with pytest.raises(EngineCallError) as err:  # a used ticket is gone
        await p.remote_send(r, kv)
    assert err.value.code == "not_found"
    await assert_no_leaks(cluster)


async def test_dead_receiver_and_dead_sender(cluster, model):
    p, d = handles(cluster, "P", "D")
    victim = wait_engine(start_engine(model, *COMMON, "--max-num-batched-tokens", "8", engine_id="V"))
    (v,) = [EngineHandle(victim.rpc, name="V", timeout=3.0)]
    try:
        # dead receiver: the ticket points at a process that is gone
        r = req(rand_prompt(40))
        ticket = await v.prep_recv(r)
        victim.kill()
        with pytest.raises(EngineCallError) as err:  # NOTE: a hang would end in EngineTimeout, code "timeout"
            await p.remote_send(r, ticket.kv, timeout=20)
        assert err.value.code in ("unavailable", "transfer_failed")
        with pytest.raises(EngineTimeout):
            await v.stats(timeout=0.5)
        # dead sender: killed while prefilling (the receiver's ticket has an open transfer)
        victim = wait_engine(start_engine(model, *COMMON, "--max-num-batched-tokens", "8", engine_id="V"))
        await v.close()
        v = EngineHandle(victim.rpc, name="V", timeout=3.0)
        prompt = rand_prompt(2000)
        r = req(prompt)
        ticket = await d.prep_recv(r)
        send = asyncio.ensure_future(v.remote_send(r, ticket.kv))
        while (await v.stats()).running == 0:
            await asyncio.sleep(0.01)
        victim.kill()
        with pytest.raises(EngineTimeout):
            await send
        # D notices (the connection drops, or, if V died before connecting, the 30 s transfer timeout
        # passes), frees the ticket, and computes the prompt itself
        tokens, _ = await collect(d.start_generate(r, begin=len(prompt), timeout=45))
        assert tokens == await reference(cluster, prompt)
    finally:
        victim.kill()
        await v.close()
    await assert_no_leaks(cluster)


async def test_malformed_rpc_is_answered(cluster):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    resolve_key(None).secure_client(sock)  # a peer with the cluster key, sending garbage
    sock.connect(cluster["P"].rpc)
    try:
        for frames in ([b"id1", b"\xc1garbage"], [b"id2", msgspec.msgpack.encode({"type": "nope"})],
                       [b"id3", msgspec.msgpack.encode({"type": "prep_recv", "req": {"request_id": 5}})],
                       [b"id4", msgspec.msgpack.encode({"type": "start_generate", "req": {
                           "request_id": "x", "prompt_ids": [1, 2]}, "sampling": {"temperature": -1}})],
                       [b"id5", b"a", b"b"]):
            await sock.send_multipart(frames)
            call_id, body = await asyncio.wait_for(sock.recv_multipart(), 10)
            reply = decode_reply(body)
            assert call_id == frames[0] and reply.code == "bad_request", reply
    finally:
        sock.close(0)
        ctx.term()
    (p,) = handles(cluster, "P")
    assert (await p.health()).ok
    with pytest.raises(EngineCallError, match="outside the vocabulary"):
        await collect(p.start_generate(req([10**7, 3])))
    with pytest.raises(EngineCallError, match="context"):
        await p.prep_recv(req(rand_prompt(4096)))
    with pytest.raises(EngineCallError, match="outside the prompt"):
        await p.prep_recv(req(rand_prompt(10)), end=11)
    await assert_no_leaks(cluster, ("P",))


async def subscribe(cluster, name: str):
    """A SUB socket on engine `name`'s KV events (and its context), connected."""
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    resolve_key(None).secure_client(sub)
    sub.connect(cluster[name].events)
    await asyncio.sleep(0.3)  # slow joiner
    return ctx, sub


async def test_kv_events_published(cluster):
    ctx, sub = await subscribe(cluster, "C")
    (c,) = handles(cluster, "C")
    prompt = rand_prompt(3 * BS + 2)
    try:
        await collect(c.start_generate(req(prompt)))
        want = set(prefix_hashes(prompt, BS))
        got = set()
        while not want <= got:
            ev = decode_event(await asyncio.wait_for(sub.recv(), 10))
            assert ev.engine_id == "C"
            if ev.kind == "stored":
                got |= set(ev.hashes)
    finally:
        sub.close(0)
        ctx.term()


async def test_pd_in_bfloat16(tmp_path):
    """PD between two bfloat16 engines: half-precision pages move at their own size over tcp and
    shm, D decodes from them (the prompt is not recomputed), and every token is transformers'
    bf16 choice up to rounding."""
    path, hf = make_checkpoint(tmp_path, "llama", max_position_embeddings=4096)
    names = ("P16", "D16")
    engines = [wait_engine(start_engine(str(path), *COMMON, "--dtype", "bfloat16", engine_id=n)) for n in names]
    p, d = (EngineHandle(e.rpc, name=n, timeout=30) for e, n in zip(engines, names))
    try:
        prompts, outs = [rand_prompt(77, seed=1), rand_prompt(150, seed=2)], []
        for prompt, transport in zip(prompts, ("tcp", "shm")):
            r = req(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
            ticket, sent, tokens, last = await balanced_pd(p, d, r, len(prompt), transport)
            spec = ticket.kv.spec
            assert spec.dtype == "bfloat16" and sent.transport == transport
            assert sent.bytes == -(-len(prompt) // BS) * spec.page_bytes * 2 * spec.num_layers
            assert last.num_cached_tokens == len(prompt) - 1 and len(tokens) == 16
            outs.append(SimpleNamespace(token_ids=tokens))
        assert_follows_reference(hf.to(torch.bfloat16), prompts, outs, "PD in bfloat16")
    finally:
        await p.close()
        await d.close()
        for e in engines:
            assert e.stop() == 0


async def test_lend_holds_a_range_outside_the_prefix_cache_until_abort_or_lease_end(cluster):
    """`lend` (DistAttention): D holds blocks for positions [32, 96) of a request P runs, and P writes that
    range into them (a `remote_send` to the lent address). Lent blocks never enter D's prefix cache, a
    start_generate of the same request on D does not adopt them (it computes its prompt), D publishes no
    KV event for them, and abort or the lease's end gives them back. Ranges that are empty or off a block
    boundary are refused."""
    p, d = handles(cluster, "P", "D")
    ctx, sub = await subscribe(cluster, "D")
    base = await d.stats()
    prompt = rand_prompt(120, seed=2**20 + 11)  # NOTE: outside the seeds test_balanced_pd_any_split draws
    r = req(prompt)
    lent = await d.lend(r, 32, 96)
    assert (lent.kv.begin, lent.kv.end, len(lent.kv.block_ids)) == (32, 96, 4) and lent.kv.signature  # signed
    s = await d.stats()
    assert (s.kv_blocks_lent, s.kv_blocks_used, s.open_tickets) == (4, base.kv_blocks_used + 4, 1)
    sent = await p.remote_send(r, lent.kv, 32, 96)
    assert sent.bytes == 64 * (await d.health()).kv_spec.bytes_per_token
    s = await d.stats()
    assert s.kv_blocks_cached == base.kv_blocks_cached and s.kv_blocks_lent == 4, "lent KV entered the cache"
    marker = rand_prompt(2 * BS + 1, seed=2**20 + 12)  # its events come after any the lent range caused
    await collect(d.start_generate(req(marker)))
    lent_hashes, mark, seen = set(prefix_hashes(prompt, BS)), set(prefix_hashes(marker, BS)), set()
    try:
        while not mark <= seen:
            ev = decode_event(await asyncio.wait_for(sub.recv(), 10))
            seen |= set(ev.hashes) if ev.kind == "stored" else set()
    finally:
        sub.close(0)
        ctx.term()
    assert not seen & lent_hashes, "the lender published its lent blocks"
    tokens, last = await collect(d.start_generate(r))
    assert tokens == await reference(cluster, prompt) and last.num_cached_tokens == 0
    assert (await d.stats()).kv_blocks_lent == 4  # the lent range lives until its request ends on the borrower
    assert await d.abort(r.request_id)
    assert (await d.stats()).kv_blocks_lent == 0

    await d.lend(req(prompt), 0, 40, lease_s=0.3)
    assert (await d.stats()).kv_blocks_lent == 3
    for begin, end, words in ((8, 40, "block boundary"), (32, 32, "not empty"), (0, 500, "outside the prompt")):
        with pytest.raises(EngineCallError, match=words) as err:
            await d.lend(req(prompt), begin, end)
        assert err.value.code == "bad_request"
    await asyncio.sleep(0.6)
    assert (await d.stats()).kv_blocks_lent == 0, "the lease's end gave the blocks back"
    await assert_no_leaks(cluster)


async def test_attend_over_a_lent_range_is_that_range_s_part_of_attention(cluster, model):
    """DistAttention's remote half: after P writes prompt[:64] into blocks D lent, `attend` on D returns
    for any query rows exactly the part a local engine computes over its own KV of the same tokens
    (range_attention on an in-process engine's cache), layer by layer. A wrong secret is forbidden, a
    range whose KV has not arrived or a q of the wrong size is refused, an aborted range is gone."""
    import json
    from pathlib import Path

    from microserve.engine.config import EngineConfig
    from microserve.engine.engine import LLMEngine
    from microserve.engine.model.dist_attention import range_attention
    from microserve.protocol import Attend, AttendRows, LendTicket

    p, d = handles(cluster, "P", "D")
    prompt = rand_prompt(80, seed=2**20 + 12)
    r = req(prompt)
    lent = await d.lend(r, 0, 64)
    with pytest.raises(EngineCallError) as err:
        await d.attend(lent, 0, [10], b"\0" * 8, 1.0)
    assert err.value.code == "bad_request" and "not arrived" in str(err.value)
    await p.remote_send(r, lent.kv, 0, 64)

    local = LLMEngine(model, config=EngineConfig(block_size=BS, num_kv_blocks=32))  # the same checkpoint here
    local.add_request("ref", prompt[:65], SamplingParams(max_tokens=1, temperature=0.0))
    while local.has_unfinished():
        local.step()
    blocks = torch.tensor(local.kv.radix.match(prompt[:64]))
    assert len(blocks) == 4
    heads = json.loads(Path(model, "config.json").read_text())["num_attention_heads"]
    spec = (await d.health()).kv_spec
    gen = torch.Generator().manual_seed(3)
    positions = [63, 40, 70, 5]  # decode-like rows past the range, and rows inside it (causal)
    for layer in (0, spec.num_layers - 1):
        q = torch.randn(len(positions), heads, spec.head_dim, generator=gen)
        got = await d.attend(lent, layer, positions, q.numpy().tobytes(), spec.head_dim ** -0.5)
        out = torch.frombuffer(bytearray(got.out), dtype=torch.float32).view(q.shape)
        lse = torch.frombuffer(bytearray(got.lse), dtype=torch.float32).view(len(positions), heads)
        ref_out, ref_lse = range_attention(q, torch.tensor(positions), local.runner.kv_cache[layer], blocks, 0, 64,
                                           spec.head_dim ** -0.5)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    forged = LendTicket(msgspec.structs.replace(lent.kv, secret="0" * 32))
    with pytest.raises(EngineCallError) as err:
        await d.attend(forged, 0, [10], q[:1].numpy().tobytes(), 1.0)
    assert err.value.code == "forbidden"
    # one message for a step's requests on this lender: a request failing its check gets zero rows and
    # its reason; the others' rows are what they get alone
    kv = lent.kv
    rows = torch.cat([q[:2], q[:1], q[2:]]).numpy().tobytes()
    others = [AttendRows(kv.ticket_id, "0" * 32, 1), AttendRows(kv.ticket_id, kv.secret, 2)]
    batched = await d.call(Attend(kv.ticket_id, kv.secret, 1, positions[:2] + [70] + positions[2:], rows, 0.1,
                                  others=others))
    alone = await d.attend(lent, 1, positions, q.numpy().tobytes(), 0.1)
    assert batched.errors[0] == batched.errors[2] == "" and batched.errors[1].startswith("forbidden")
    b_out = torch.frombuffer(bytearray(batched.out), dtype=torch.float32).view(5, heads, -1)
    b_lse = torch.frombuffer(bytearray(batched.lse), dtype=torch.float32).view(5, heads)
    a_out = torch.frombuffer(bytearray(alone.out), dtype=torch.float32).view(4, heads, -1)
    a_lse = torch.frombuffer(bytearray(alone.lse), dtype=torch.float32).view(4, heads)
    assert torch.equal(b_out[[0, 1, 3, 4]], a_out) and torch.equal(b_lse[[0, 1, 3, 4]], a_lse)
    assert not b_out[2].any() and torch.isinf(b_lse[2]).all()
    with pytest.raises(EngineCallError) as err:
        await d.attend(lent, 0, [10, 11], b"\0" * 12, 1.0)
    assert err.value.code == "bad_request"
    assert await d.abort(r.request_id)
    with pytest.raises(EngineCallError) as err:
        await d.attend(lent, 0, [10], q[:1].numpy().tobytes(), 1.0)
    assert err.value.code == "not_found"
    await assert_no_leaks(cluster)
