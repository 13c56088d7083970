"""The microserving calls on real vLLM engines (`microserve engine --backend vllm`), KV through
`kvapi.transfer` and the microserve KV connector.

vLLM lives in its own environment (its CPU build pins its own packages): the engines run
under `$MICROSERVE_VLLM_PYTHON` (`.ci/run` builds that environment), or under this
interpreter when it can import vLLM. The tests talk to them over ZeroMQ like the router does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading

import msgspec
import pytest
from deploy import start_launch
from engines import collect, start_engine, wait_engine

from kvapi.transfer.base import sign_addr
from microserve.demo import demo_model
from microserve.protocol import LendTicket, Request
from microserve.router.handle import EngineCallError, EngineHandle
from microserve.sampling_params import SamplingParams
from microserve.security import resolve as resolve_key


def _vllm_python() -> str | None:
    env = os.environ.get("MICROSERVE_VLLM_PYTHON")
    if env:
        return env
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


VLLM_PYTHON = _vllm_python()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    VLLM_PYTHON is None, reason="vLLM cannot be imported here and MICROSERVE_VLLM_PYTHON is not set "
    "(see docs/vllm.md; .ci/run builds that environment)")]

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
BS = 32
VLLM = ["--backend", "vllm", "--dtype", "float32", "--num-kv-blocks", "256", "--log-level", "warning"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # head_dim 64: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...
    return str(demo_model(tmp_path_factory.mktemp("vllm") / "m", hidden_size=256, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def cluster(model):
    procs = {name: start_engine(model, *VLLM, engine_id=name, python=VLLM_PYTHON) for name in ("A", "B")}
    procs["C"] = start_engine(model, "--block-size", str(BS), "--num-kv-blocks", "256", "--log-level", "error",
                              engine_id="C")  # the built-in engine
    engines = {name: wait_engine(p, timeout=300) for name, p in procs.items()}
    yield engines
    for eng in engines.values():
        eng.proc.terminate()
    for name, eng in engines.items():
        assert eng.proc.wait(60) == 0, f"engine {name} did not exit cleanly on SIGTERM"


_ids = iter(range(10**9))


def req(prompt, sampling=GREEDY) -> Request:
    return Request(f"req-{next(_ids)}", list(prompt), sampling)


def rand_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]  # byte tokens: the gateway takes them too


def run(coro):
    return asyncio.run(coro)


async def alone(h: EngineHandle, prompt) -> list[int]:
    tokens, last = await collect(h.start_generate(req(prompt)))
    assert last.finish_reason == "length" and len(tokens) == GREEDY.max_tokens
    return tokens


@pytest.mark.parametrize("transport", ["tcp", "nixl"])
def test_pd_and_balanced_pd_give_the_tokens_of_one_engine_alone(cluster, transport):
    """Over nixl the sender WRITEs straight into the vLLM blocks the receiver's connector reserved
    (both engines registered vLLM's own KV tensors)."""
    async def go():
        async with EngineHandle(cluster["A"].rpc, name="A", timeout=60) as a, \
                EngineHandle(cluster["B"].rpc, name="B", timeout=60) as b:
            health = await b.health()
            assert health.kv_spec.layout == "vllm-cpu-block" and health.kv_spec.block_size == BS
            assert transport in health.transports, f"{transport} is not offered: {health.transports}"
            received0 = (await b.stats()).kv_bytes_received
            for n, seed in ((40, 1), (100, 2), (150, 3)):
                prompt = rand_prompt(n, seed)
                ref = await alone(a, prompt)
                for split in (n - 1, n // 2):  # PD (everything but the last token), balanced PD
                    r = req(prompt)
                    ticket = await b.prep_recv(r, split)
                    # what B had cached (the previous split received some), or all of it
                    assert ticket.matched % BS == 0 or ticket.matched == split
                    sent = await a.remote_send(r, ticket.kv, ticket.matched, split, transport=transport)
                    assert sent.transport == transport or ticket.matched >= split
                    spec = health.kv_spec
                    blocks = 0 if ticket.matched >= split else -(-split // BS) - ticket.matched // BS
                    assert sent.bytes == spec.num_layers * blocks * 2 * spec.page_bytes
                    tokens, last = await collect(b.start_generate(r, begin=split))
                    assert tokens == ref, f"n={n} split={split}"
                    # the received tokens were used, not recomputed: vLLM counts them as cached
                    assert last.num_cached_tokens >= split
                    # a second time: only what B does not have cached is sent
                    r2 = req(prompt)
                    again = await b.prep_recv(r2, split)
                    assert (again.matched % BS == 0 or again.matched == split) and again.matched <= split
                    if again.matched < split:
                        await a.remote_send(r2, again.kv, again.matched, split, transport=transport)
                    assert (await collect(b.start_generate(r2, begin=split)))[0] == ref
            stats = await b.stats()
            assert stats.kv_bytes_received > received0 and stats.open_tickets == 0
            assert stats.prefix_cache_hit_tokens > 0
    run(go())


class CorruptingProxy:
    """Forwards one TCP connection at a time to `target`; after the sender's first control
    frame (Hello), flips every byte it forwards from the sender: KV corrupted in transit."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        skip = None  # bytes of the first frame still to pass unchanged
        head = b""
        try:
            while data := src.recv(1 << 16):
                if corrupt:
                    if skip is None:
                        head += data
                        if len(head) < 4:
                            continue
                        skip = 4 + struct.unpack("!I", head[:4])[0]
                        data, head = head, b""
                    keep = min(skip, len(data))
                    data = data[:keep] + bytes(b ^ 0x5A for b in data[keep:])
                    skip -= keep
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def test_kv_corrupted_in_transit_changes_the_output(cluster):
    async def go():
        async with EngineHandle(cluster["A"].rpc, name="A", timeout=60) as a, \
                EngineHandle(cluster["B"].rpc, name="B", timeout=60) as b:
            prompt = rand_prompt(96, 11)
            ref = await alone(a, prompt)
            r = req(prompt)
            ticket = await b.prep_recv(r, len(prompt) - 1)
            proxy = CorruptingProxy(ticket.kv.endpoint)
            try:
                # a holder of the cluster key re-signs the address (without it the sender refuses the proxy)
                via_proxy = sign_addr(msgspec.structs.replace(ticket.kv, endpoint=proxy.endpoint),
                                      resolve_key(None).kv_key)
                await a.remote_send(r, via_proxy, 0, len(prompt) - 1, transport="tcp")  # bytes through the proxy
                tokens, last = await collect(b.start_generate(r, begin=len(prompt) - 1))
            finally:
                proxy.close()
            assert last.num_cached_tokens >= len(prompt) - 1  # the corrupted pages were used as received
            assert tokens != ref
    run(go())


def in_use(s) -> int:
    """KV blocks requests and tickets hold (`used` counts the prefix cache's too, as the built-in engine's)."""
    return s.kv_blocks_used - s.kv_blocks_cached


def test_abort_and_lease_expiry_free_the_blocks_vllm_holds(cluster):
    async def go():
        async with EngineHandle(cluster["B"].rpc, name="B", timeout=60) as b:
            base = in_use(await b.stats())
            r = req(rand_prompt(200, 21))
            ticket = await b.prep_recv(r, 199, lease_s=1.0)
            held = await b.stats()
            assert in_use(held) >= base + len(ticket.kv.block_ids) and held.open_tickets == 1
            await asyncio.sleep(2.5)
            after = await b.stats()
            assert in_use(after) == base and after.open_tickets == 0, "lease expiry freed the blocks"
            # as on the built-in engine, a start after the lease computes the prompt itself
            tokens, last = await collect(b.start_generate(r, begin=199))
            assert len(tokens) == GREEDY.max_tokens and last.num_cached_tokens < 199
            done = await b.stats()
            assert in_use(done) == base and done.kv_blocks_cached >= 199 // BS  # its full blocks stay cached

            r = req(rand_prompt(200, 22))
            held = await b.prep_recv(r, 199)
            assert in_use(await b.stats()) > base
            with pytest.raises(EngineCallError, match=r"start_generate\(lenders=...\): the vLLM backend") as err:
                async for _ in b.start_generate(req(rand_prompt(64, 24)), lenders=[LendTicket(held.kv, "x")]):
                    pass
            assert err.value.code == "bad_request"
            assert await b.abort(r.request_id)
            after = await b.stats()
            assert in_use(after) == base and after.open_tickets == 0, "abort freed the blocks"
            with pytest.raises(EngineCallError, match="lend: the vLLM backend") as err:  # DistAttention: built-in only
                await b.lend(req(rand_prompt(64, 23)), 0, 32)
            assert err.value.code == "bad_request" and in_use(await b.stats()) == base
    run(go())


def test_mixed_vllm_and_builtin_engines_are_refused_clearly(cluster):
    async def go():
        async with EngineHandle(cluster["A"].rpc, name="A", timeout=60) as a, \
                EngineHandle(cluster["C"].rpc, name="C", timeout=60) as c:
            prompt = rand_prompt(64, 31)
            for sender, receiver in ((a, c), (c, a)):
                r = req(prompt)
                ticket = await receiver.prep_recv(r, 63)
                with pytest.raises(EngineCallError) as err:
                    await sender.remote_send(r, ticket.kv, ticket.matched, 63)
                assert err.value.code == "kv_spec_mismatch" and "layout" in str(err.value)
                await receiver.abort(r.request_id)
            # both still serve
            assert len(await alone(a, prompt)) == GREEDY.max_tokens
            assert len(await alone(c, prompt)) == GREEDY.max_tokens
    run(go())


def test_live_migration_between_vllm_engines(cluster):
    """`router/migration.migrate` over vLLM engines: a request stopped on A after k tokens continues on B
    with its KV (A's prefix cache sends it); the tokens equal A's unmigrated run. The drain by migration
    of the router is these same calls."""
    from microserve.router.migration import migrate

    async def go():
        async with EngineHandle(cluster["A"].rpc, name="A", timeout=60) as a, \
                EngineHandle(cluster["B"].rpc, name="B", timeout=60) as b:
            for n, k, seed in ((90, 1, 11), (130, 5, 12)):
                prompt = rand_prompt(n, seed)
                ref = await alone(a, prompt)
                r = req(prompt)
                generated, stream = [], a.start_generate(r)
                async for chunk in stream:
                    generated += chunk.token_ids
                    if len(generated) >= k:
                        break
                await stream.aclose()
                received = (await b.stats()).kv_bytes_received
                rest, last = await collect(migrate(r, generated, a, b))
                assert generated + rest == ref, (n, k)
                assert (await b.stats()).kv_bytes_received > received  # the KV moved, it was not recomputed
                assert last.num_cached_tokens >= n
    run(go())


def _adapter(model: str, folder, seed: int, rank: int) -> str:
    """A PEFT adapter of random weights on every projection of `model`, saved to `folder`."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tuned = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    tuned.save_pretrained(folder, safe_serialization=True)
    return str(folder)


async def test_lora_adapters_on_a_vllm_engine_equal_the_builtin_engine(model, tmp_path):
    """`--enable-lora --lora-modules` on a vLLM engine, and one more adapter loaded with the `lora`
    call: each adapter's greedy tokens equal the built-in engine's under the same PEFT folder."""
    from microserve import LLM

    a8, b16 = _adapter(model, tmp_path / "a8", 0, 8), _adapter(model, tmp_path / "b16", 1, 16)
    proc = start_engine(model, *VLLM, "--enable-lora", "--max-loras", "2", "--lora-modules", f"a8={a8}",
                        engine_id="L", python=VLLM_PYTHON)
    eng = wait_engine(proc, timeout=300)
    try:
        ours = LLM(model, enable_lora=True, lora_modules={"a8": a8, "b16": b16})
        prompt = rand_prompt(40, 7)
        async with EngineHandle(eng.rpc, name="L", timeout=120) as h:
            assert (await h.stats()).loras == ["a8"]
            assert (await h.lora("load", "b16", b16)).loras == ["a8", "b16"]
            for name in (None, "a8", "b16"):
                sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, lora=name)
                got = [t async for ch in h.start_generate(req(prompt, sp)) for t in ch.token_ids]
                assert got == ours.generate([prompt], sp)[0].token_ids, name
            with pytest.raises(EngineCallError, match="unknown LoRA adapter 'c'"):
                [ch async for ch in h.start_generate(req(prompt, SamplingParams(max_tokens=2, lora="c")))]
            assert (await h.lora("unload", "b16")).loras == ["a8"]
    finally:
        eng.proc.terminate()
        assert eng.proc.wait(60) == 0


def test_launch_serves_vllm_pd_beside_a_built_in_model_through_the_openai_gateway(cluster, model, tmp_path):
    """`launch --config`: a vLLM-backed model served 1P1D and the built-in demo model behind one gateway
    (one deployment for both checks: each vLLM engine start costs ~15 s of CPU). Each name gets its own
    model's tokens, PD over vLLM engines gives the text of one engine alone, the vLLM engines stream
    5 tokens at a time (`stream_interval`), and their tickets name the checkpoint's fingerprint."""
    from openai import OpenAI

    from microserve.engine.model.loader import checkpoint_fingerprint
    from microserve.engine.model.tokenizer import Tokenizer

    prompt = rand_prompt(120, 41)

    async def reference():
        async with EngineHandle(cluster["A"].rpc, name="A", timeout=60) as a:
            r = req(prompt)
            ticket = await a.prep_recv(r)
            await a.abort(r.request_id)  # NOTE: only its address was wanted
            return await alone(a, prompt), ticket.kv.model

    ref, fingerprint = run(reference())
    assert fingerprint == checkpoint_fingerprint(model)  # what remote_send checks against its own
    want = Tokenizer(model).decode(ref)
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  - {{model: {model}, served_model_name: big, strategy: pd, backend: vllm,\n"
                      "     dtype: float32, num_kv_blocks: 256, stream_interval: 5}\n"
                      "  - {model: demo, served_model_name: small, strategy: round_robin, engines: 1}\n")
    dep = start_launch("--config", str(config), "--log-level", "warning", python=VLLM_PYTHON, timeout=300)
    try:
        client = OpenAI(base_url=dep.base_url, api_key="none")
        assert {m.id for m in client.models.list().data} == {"big", "small"}
        big = client.completions.create(model="big", prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert big.choices[0].model_extra["token_ids"] == ref and big.choices[0].text == want
        assert big.usage.completion_tokens == GREEDY.max_tokens
        small = client.completions.create(model="small", prompt=prompt, max_tokens=GREEDY.max_tokens,
                                          temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
        assert small.model == "small" and small.choices[0].model_extra["token_ids"] != ref
        (decode,) = [rpc for name, rpc in dep.engines.items() if name.startswith("big") and "decode" in name]

        async def chunks():  # the decode engine's own stream: the first token, then 5 at a time
            async with EngineHandle(decode, name="d", timeout=60) as d:
                return [c.token_ids async for c in d.start_generate(req(prompt))]

        got = run(chunks())
        assert [t for c in got for t in c] == ref
        # (more per chunk only when this reader fell behind)
        assert len(got[0]) == 1 and all(len(c) >= 5 for c in got[1:-1]) and 2 <= len(got) <= 4, got
    finally:
        assert dep.stop() == 0
