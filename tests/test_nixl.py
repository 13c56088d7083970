"""KV over `nixl` (one-sided NIXL writes into registered pools) between real engine processes:
strategies through `launch --transport nixl`, and the faults of the data plane — a sender killed
mid-transfer, forged, replayed and expired addresses, a receiver that restarts on the same ports.

Every fault must end in an error or a recompute within a bounded time, with no block leaked on
either side, no other request's KV touched and no process down. (The in-process checks of the
nixl receiver — notifications bound to the ticket, the fence on revoke — are in test_transfer.py;
the per-call equivalence over nixl is in test_microserving.py and test_vllm_backend.py.)
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import aiohttp
import msgspec
import openai
import pytest
from checkpoints import make_checkpoint
from deploy import start_launch
from engines import spawn_engine
from test_gateway import metrics
from test_launch import assert_no_leaks as assert_launch_clean
from test_migration import long_prompts, stream

from kvapi.transfer.base import TRANSPORTS, sign_addr
from kvapi.transfer.nixl import nixl_available
from microserve import LLM, SamplingParams
from microserve.protocol import Request
from microserve.router import EngineCallError, EngineHandle
from microserve.security import resolve as resolve_key

pytestmark = pytest.mark.skipif(not nixl_available(), reason="nixl is not installed (pip install 'microserve[nixl]')")

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
NIXL = ["--transport", "nixl", "--num-kv-blocks", "400", "--block-size", str(BS), "--log-level", "error"]
_ids = iter(range(10**9))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("nixl"), "llama", max_position_embeddings=4096)
    return str(path)


@pytest.fixture(scope="module")
def pair(model):
    engines = {name: spawn_engine(model, *NIXL, engine_id=name) for name in ("P", "D")}
    yield engines
    for e in engines.values():
        assert e.stop() == 0


def req(prompt) -> Request:
    return Request(f"nixl-{next(_ids)}", list(prompt), GREEDY)


def rand_prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]


async def collect(stream_):
    return [t async for chunk in stream_ for t in chunk.token_ids]


async def assert_clean(*engines, timeout: float = 10.0) -> None:
    """Nothing open, sending or running; used blocks == blocks the prefix cache holds."""
    for e in engines:
        async with EngineHandle(e.rpc, name=e.engine_id, timeout=10) as h:
            deadline = time.monotonic() + timeout
            while True:
                s = await h.stats()
                if (s.open_tickets, s.active_sends, s.running, s.waiting) == (0, 0, 0, 0) \
                        and s.kv_blocks_used == s.kv_blocks_cached:
                    break
                assert time.monotonic() < deadline, f"{e.engine_id} leaks: {s}"
                await asyncio.sleep(0.05)


async def pd(p: EngineHandle, d: EngineHandle, prompt: list[int]) -> tuple[list[int], str]:
    r = req(prompt)
    ticket = await d.prep_recv(r)
    sent = await p.remote_send(r, ticket.kv, transport="nixl")
    return await collect(d.start_generate(r, begin=len(prompt))), sent.transport


async def test_sender_killed_mid_transfer_of_4k_tokens(model, pair):
    """SIGKILL of the prefill engine while it sends a 4,000-token prompt: the receiver's ticket ends
    within seconds (its sender's connection is gone), its blocks come back, and it serves the same
    prompt correctly afterwards; a bystander request on the receiver is untouched."""
    # P prefills in 64-token chunks: its sender has claimed D's ticket (hello accepted) for the ~60 steps
    # of the prefill before the last layers' writes go out
    p = spawn_engine(model, *NIXL, "--max-num-batched-tokens", "64", engine_id="P-doomed")
    d = spawn_engine(model, *NIXL, engine_id="D-survivor")
    try:
        async with EngineHandle(p.rpc, name="P", timeout=5) as hp, EngineHandle(d.rpc, name="D", timeout=30) as hd:
            prompt = rand_prompt(4000, 1)
            bystander = rand_prompt(300, 2)
            by_ref = await collect(hd.start_generate(req(bystander)))
            by_stream = asyncio.ensure_future(collect(hd.start_generate(req(bystander))))
            r = req(prompt)
            ticket = await hd.prep_recv(r)
            send = asyncio.ensure_future(hp.remote_send(r, ticket.kv, transport="nixl"))
            deadline = time.monotonic() + 30
            while (s := await hp.stats()).active_sends == 0 or s.computed_tokens_total < 2000:
                assert time.monotonic() < deadline  # the send is under way, half the prompt computed
                await asyncio.sleep(0.005)
            assert (await hp.stats()).active_sends == 1, "the send finished before the kill"
            p.kill()
            t0 = time.monotonic()
            with pytest.raises(EngineCallError):
                await send
            while (await hd.stats()).open_tickets:  # NOTE: a deadline for the poll, not a speed check
                assert time.monotonic() - t0 < 60, "the receiver kept the dead sender's ticket"
                await asyncio.sleep(0.05)
            assert d.proc.poll() is None
            assert await by_stream == by_ref
            # the prompt itself, computed from scratch on D, equals another engine's answer
            await hd.abort(r.request_id)
            got = await collect(hd.start_generate(req(prompt)))
        await assert_clean(d)
    finally:
        p.stop()
        d.stop()
    async with EngineHandle(pair["P"].rpc, name="R", timeout=60) as hr:  # it never saw this prompt
        assert got == await collect(hr.start_generate(req(prompt)))


async def test_forged_replayed_and_expired_addresses_write_nothing(pair):
    """Altered descriptors without the key's signature, descriptors outside the receiver's pool
    (re-signed by a key holder: NIXL refuses writes outside registered memory), an address used a
    second time, an expired lease: each is an error; nothing leaks; PD still works after."""
    key = resolve_key(None).kv_key
    async with EngineHandle(pair["P"].rpc, name="P", timeout=30) as p, \
            EngineHandle(pair["D"].rpc, name="D", timeout=30) as d:
        prompt = rand_prompt(200, 3)
        want, used = await pd(p, d, prompt)
        assert used == "nixl"
        dec, enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()

        async def refused(change, resign: bool, code: str | None = None) -> None:
            r = req(rand_prompt(120, random.randrange(10**6)))
            ticket = await d.prep_recv(r)
            forged = msgspec.structs.replace(ticket.kv, **change(ticket.kv))
            if resign:
                forged = sign_addr(forged, key)
            with pytest.raises(EngineCallError) as err:
                await p.remote_send(r, forged, transport="nixl")
            if code:
                assert err.value.code == code, err.value
            await d.abort(r.request_id)

        def regions_moved(kv):  # every region shifted by 1 GiB: outside the receiver's pool
            name, meta, regions, mem = dec.decode(kv.offers["nixl"])
            far = [[base + (1 << 30), stride, size, dev] for base, stride, size, dev in regions]
            return {"offers": {"nixl": enc.encode([name, meta, far, mem])}}

        await refused(regions_moved, resign=False, code="forbidden")
        await refused(regions_moved, resign=True)
        await refused(lambda kv: {"expiry": time.time() - 1}, resign=True, code="not_found")
        r = req(rand_prompt(64, 4))
        ticket = await d.prep_recv(r)
        await p.remote_send(r, ticket.kv, transport="nixl")
        with pytest.raises(EngineCallError) as err:  # replayed: the ticket is complete, nothing is written
            await p.remote_send(r, ticket.kv, transport="nixl")
        assert err.value.code in ("not_found", "bad_request"), err.value
        await collect(d.start_generate(r, begin=len(r.prompt_ids)))
        assert (await pd(p, d, prompt))[0] == want
    await assert_clean(*pair.values())


async def test_receiver_restarted_on_the_same_ports(model, pair):
    """A decode engine that restarts on the same RPC and KV ports is a new NIXL agent: the sender
    loads its metadata afresh and PD over nixl works again, with the same output."""
    kv_port, rpc_port = (_free_port() for _ in range(2))
    fixed = ["--kv-port", str(kv_port), "--rpc", f"tcp://127.0.0.1:{rpc_port}"]
    prompt = rand_prompt(150, 5)
    outs = []
    for _ in range(2):
        d = spawn_engine(model, *NIXL, *fixed, engine_id="D-restart")
        try:
            async with EngineHandle(pair["P"].rpc, name="P", timeout=30) as p, \
                    EngineHandle(d.rpc, name="D", timeout=30) as hd:
                outs.append(await pd(p, hd, prompt))
            await assert_clean(d)
        finally:
            assert d.stop() == 0
    assert outs[0] == outs[1] and outs[0][1] == "nixl"
    await assert_clean(pair["P"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_launch_pd_balanced_pd_and_drain_over_nixl(demo_path):
    """`launch --transport nixl`, 1 prefill + 2 decode: pd, then balanced_pd (swapped in through the
    admin API), then decode-1 drained with streams running (they move with their KV): every output
    equals one engine's; the bytes are counted under `transport="nixl"` and equal what the receivers got."""
    llm = LLM(str(demo_path))
    prompts = [f"{i} nixl moves KV one-sided. " * 6 for i in range(4)]
    dep = start_launch("--strategy", "strategies/pd.py", "--roles", "prefill=1,decode=2", "--model",
                       str(demo_path), "--transport", "nixl", "--served-model-name", "demo", "--api-key", "k",
                       "--admin-key", "adm", "--num-kv-blocks", "800", "--log-level", "error")
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="k", max_retries=0, timeout=120)
    try:
        before = await metrics(dep)
        received0 = await _received(dep)
        for strategy in ("pd", "balanced_pd"):
            if strategy != "pd":
                async with aiohttp.ClientSession() as s, s.put(
                        dep.url + "/admin/strategy", json={"path": f"strategies/{strategy}.py"},
                        headers={"Authorization": "Bearer adm"}) as r:
                    assert r.status == 200, await r.text()
            for p in prompts:
                out = await client.completions.create(model="demo", prompt=p.replace("nixl", strategy),
                                                      max_tokens=12, temperature=0,
                                                      extra_body={"ignore_eos": True, "return_token_ids": True})
                ref = llm.generate([p.replace("nixl", strategy)], SamplingParams(max_tokens=12, temperature=0,
                                                                                 ignore_eos=True))[0]
                assert out.choices[0].model_extra["token_ids"] == ref.token_ids, strategy
        after = await metrics(dep)
        assert _moved(before, after) == {"nixl": await _received(dep) - received0}
        # drain a decode engine while 6 streams run on it: they move to the other one with their KV, over nixl
        # (1024 tokens each: the streams run for seconds, the drain lands within a few hundred ms; at 256
        # they sometimes ended before it)
        long = long_prompts(6)
        ref = [o.token_ids for o in llm.generate(long, SamplingParams(max_tokens=1024, temperature=0,
                                                                        ignore_eos=True))]
        load = asyncio.gather(*(stream(client, p, 1024) for p in long))
        busy = await _busiest(dep, ["decode-0", "decode-1"])
        keep = "decode-1" if busy == "decode-0" else "decode-0"
        before, received0 = await metrics(dep), await _received(dep, keep)
        async with EngineHandle(dep.engines[busy], timeout=10) as h:
            sent0 = (await h.stats()).kv_bytes_sent
        async with aiohttp.ClientSession() as s, s.delete(dep.url + f"/admin/engines/{busy}",
                                                           headers={"Authorization": "Bearer adm"}) as r:
            assert r.status == 200, await r.text()
        assert await load == ref
        after = await metrics(dep)
        why = "\n".join(f"{k}: {before.get(k)} -> {v}" for k, v in after.items()  # NOTE: in full if this fails
                         if k.startswith(("microserve_request_", "microserve_kv_transfer_bytes", "microserve_engine_up",
                                          "microserve_engine_running")))
        assert set(_moved(before, after)) == {"nixl"}, why
        assert after["microserve_request_moves_total"] > before["microserve_request_moves_total"]
        assert await _received(dep, keep) > received0
        async with EngineHandle(dep.engines[busy], timeout=10) as h:  # removed from the router, still up
            assert (await h.stats()).kv_bytes_sent > sent0, f"{busy}'s streams did not move with their KV"
        await client.close()
        await assert_launch_clean({k: v for k, v in dep.engines.items() if k != busy})
    finally:
        assert dep.stop() == 0


async def _busiest(dep, names: list[str]) -> str:
    """The engine among `names` running the most requests, once any runs one."""
    for _ in range(200):
        running = {}
        for name in names:
            async with EngineHandle(dep.engines[name], timeout=10) as h:
                running[name] = (await h.stats()).running
        if any(running.values()):
            return max(running, key=running.get)
        await asyncio.sleep(0.02)
    raise AssertionError("no stream started")


def _moved(before: dict, after: dict) -> dict[str, float]:
    """KV bytes counted by the router since `before`, per transport that moved any."""
    name = "microserve_kv_transfer_bytes_total{{transport={}}}"
    moved = {t: after[name.format(t)] - before[name.format(t)] for t in TRANSPORTS}
    return {t: v for t, v in moved.items() if v}


async def _received(dep, only: str | None = None) -> int:
    total = 0
    for name, address in dep.engines.items():
        if only in (None, name):
            async with EngineHandle(address, name=name, timeout=10) as h:
                total += (await h.stats()).kv_bytes_received
    return total


async def test_launch_context_migration_over_nixl(demo_path):
    """`strategies/context_migration.py` over nixl: a request whose prefix another engine holds runs on
    the idle engine after the holder WRITEs it the cached KV (told to migrate whenever it can:
    `busy_margin=-1`); outputs equal one engine's, and only nixl moved bytes."""
    llm = LLM(str(demo_path))
    prefix = "A shared context that one engine caches and the other receives over nixl. " * 3
    prompts = [prefix + f"question {i}?" for i in range(6)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(prompts, sp)]
    dep = start_launch("--strategy", "strategies/context_migration.py", "--strategy-arg", "busy_margin=-1",
                       "--engines", "2", "--model", str(demo_path), "--transport", "nixl", "--served-model-name",
                       "demo", "--num-kv-blocks", "400", "--log-level", "error")
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=120)
    try:
        before = await metrics(dep)
        for p, w in zip(prompts, want):  # one at a time: each finds the prefix the previous ones cached
            out = await client.completions.create(model="demo", prompt=p, max_tokens=10, temperature=0,
                                                  extra_body={"ignore_eos": True, "return_token_ids": True})
            assert out.choices[0].model_extra["token_ids"] == w
        moved = _moved(before, await metrics(dep))
        assert set(moved) == {"nixl"}, moved
        await client.close()
        await assert_launch_clean(dep.engines)
    finally:
        assert dep.stop() == 0
