"""Live migration's pause-to-resume gap vs recomputing the context, by context length and transport.

    python benchmarks/migration.py [--lengths 512,1024,2048,4096] [--rounds 3]

Two engines (random Llama, hidden 512, 6 layers, float32). A request decodes 8 tokens on the source;
then the gap is the time from closing its stream to the first token from the target
(`router/migration.migrate`: prep_recv + remote_send of the KV from the source's cache +
start_generate). The baseline is the target computing the same context from scratch (a prompt of the
same length it has never seen) up to its first token. A second baseline is a PD transfer of the same
KV (prep_recv + remote_send from the source's cache into a third engine) plus one decode step (the
median gap between the target's tokens). Best of `--rounds`, side by side.
Targets: >= 5x faster than recompute at 2k tokens; the gap within 1.2x of the PD transfer + a step.

Then the drain time of an engine with 16 running requests (`launch`, round robin over two engines,
16 streams of 256 tokens): DELETE /admin/engines/{id} by migration (the default) against letting
the requests finish there (`?migrate=0`), with every stream's output checked against an undrained run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import make_checkpoint
from engines import spawn_engine

from microserve.protocol import Request
from microserve.router import EngineHandle
from microserve.router.migration import migrate
from microserve.sampling_params import SamplingParams

SP = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


async def first(stream) -> float:
    t0 = time.perf_counter()
    async for chunk in stream:
        if chunk.token_ids:
            gap = time.perf_counter() - t0
            await stream.aclose()
            return gap
    return time.perf_counter() - t0


async def steps(stream) -> tuple[float, float]:
    """(time to the first token, median gap between the next ones) of a stream."""
    t0, stamps = time.perf_counter(), []
    async for chunk in stream:
        if chunk.token_ids:
            stamps.append(time.perf_counter())
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return stamps[0] - t0, gaps[len(gaps) // 2]


async def one(src: EngineHandle, dst: EngineHandle, pd: EngineHandle, length: int,
              seed: int) -> tuple[float, float, float]:
    rng = random.Random(seed)
    req = Request(f"mig-{seed}-{length}", [rng.randrange(2, 500) for _ in range(length)], SP)
    generated, stream = [], src.start_generate(req)
    async for chunk in stream:
        generated += chunk.token_ids
        if len(generated) >= 8:
            break
    await stream.aclose()
    gap, step = await steps(migrate(req, generated, src, dst))
    fresh = Request(f"re-{seed}-{length}", [rng.randrange(2, 500) for _ in range(length + len(generated))], SP)
    recompute = await first(dst.start_generate(fresh))
    copy = Request(f"pd-{seed}-{length}", req.prompt_ids + generated, SP)  # the same KV, from the source's cache
    t0 = time.perf_counter()
    ticket = await pd.prep_recv(copy, end=len(copy.prompt_ids) - 1)
    await src.remote_send(copy, ticket.kv)
    transfer = time.perf_counter() - t0 + step
    await pd.abort(copy.request_id)
    return gap, recompute, transfer


async def main(args) -> None:
    model = Path(tempfile.gettempdir()) / "microserve-bench-migration"
    if not (model / "config.json").exists():
        make_checkpoint(model, "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=512, max_position_embeddings=16384)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    print("| transport | context | pause-to-resume gap (ms) | recompute on the target (ms) | speed-up | "
          "PD transfer + 1 step (ms) | gap / that |\n|---|---|---|---|---|---|---|")
    for transport in ("shm", "tcp"):
        procs = [spawn_engine(str(model), "--num-kv-blocks", "2048", "--transport", transport, "--log-level", "error",
                              engine_id=f"{transport}-{i}") for i in range(3)]
        src, dst, pd = (EngineHandle(p.rpc, name=p.engine_id, timeout=600) for p in procs)
        try:
            for length in lengths:
                best = (1e9, 1e9, 1e9)
                for r in range(args.rounds):
                    got = await one(src, dst, pd, length, seed=r * 1000 + length)
                    best = tuple(min(a, b) for a, b in zip(best, got))
                gap, recompute, transfer = best
                print(f"| {transport} | {length} | {gap * 1e3:.1f} | {recompute * 1e3:.1f} | {recompute / gap:.1f}x | "
                      f"{transfer * 1e3:.1f} | {gap / transfer:.2f} |", flush=True)
        finally:
            for h in (src, dst, pd):
                await h.close()
            for p in procs:
                p.stop()
    await drain_times(model)


async def drain_times(model: Path) -> None:
    import aiohttp
    import openai
    from deploy import start_launch

    dep = start_launch("--strategy", "strategies/round_robin.py", "--engines", "2", "--model", str(model),
                       "--api-key", "k", "--served-model-name", "m", "--num-kv-blocks", "2048", "--log-level", "error")
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="k", max_retries=0, timeout=600)
    auth = {"Authorization": "Bearer k"}

    async def stream(i: int) -> list[int]:
        rng = random.Random(i)
        ids = []
        async for ev in await client.completions.create(
                model="m", prompt=[rng.randrange(2, 250) for _ in range(256)], max_tokens=256, temperature=0,
                stream=True, extra_body={"ignore_eos": True, "return_token_ids": True}):
            ids += ev.choices[0].model_extra.get("token_ids") or [] if ev.choices else []
        return ids

    try:
        ref = await asyncio.gather(*(stream(i) for i in range(16)))
        print("\n| drain of 1 of 2 engines, 16 streams running | drain time (s) | streams' end after the call (s) | "
              "outputs equal |\n|---|---|---|---|")
        async with aiohttp.ClientSession() as s:
            for mode in ("1", "0"):
                load = asyncio.gather(*(stream(i) for i in range(16)))
                await asyncio.sleep(1.0)
                t0 = time.perf_counter()
                async with s.delete(f"{dep.url}/admin/engines/engine-1?migrate={mode}", headers=auth) as r:
                    assert r.status == 200, await r.text()
                drain = time.perf_counter() - t0
                got = await load
                end = time.perf_counter() - t0
                print(f"| {'by migration' if mode == '1' else 'waiting for them'} | {drain:.2f} | {end:.2f} | "
                      f"{got == ref} |", flush=True)
                async with s.post(f"{dep.url}/admin/engines", headers=auth,
                                  json={"address": dep.engines["engine-1"], "role": "engine"}) as r:
                    assert r.status == 201, await r.text()
    finally:
        dep.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(p.parse_args()))
