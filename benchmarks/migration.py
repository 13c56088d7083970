"""Live migration's pause-to-resume gap vs recomputing the context, by context length and transport.

    python benchmarks/migration.py [--lengths 512,1024,2048,4096] [--rounds 3]

Two engines (random Llama, hidden 512, 6 layers, float32). A request decodes 8 tokens on the source;
then the gap is the time from closing its stream to the first token from the target
(`router/migration.migrate`: prep_recv + remote_send of the KV from the source's cache +
start_generate). The baseline is the target computing the same context from scratch (a prompt of the
same length it has never seen) up to its first token. Best of `--rounds`, side by side.
Target: >= 5x faster than recompute at 2k tokens.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def one(src: EngineHandle, dst: EngineHandle, length: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    req = Request(f"mig-{seed}-{length}", [rng.randrange(2, 500) for _ in range(length)], SP)
    generated, stream = [], src.start_generate(req)
    async for chunk in stream:
        generated += chunk.token_ids
        if len(generated) >= 8:
            break
    await stream.aclose()
    gap = await first(migrate(req, generated, src, dst))
    fresh = Request(f"re-{seed}-{length}", [rng.randrange(2, 500) for _ in range(length + len(generated))], SP)
    recompute = await first(dst.start_generate(fresh))
    return gap, recompute


async def main(args) -> None:
    model = Path(tempfile.gettempdir()) / "microserve-bench-migration"
    if not (model / "config.json").exists():
        make_checkpoint(model, "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=512, max_position_embeddings=16384)
    lengths = [int(x) for x in args.lengths.split(",")]
    print("| transport | context | pause-to-resume gap (ms) | recompute on the target (ms) | speed-up |\n"
          "|---|---|---|---|---|")
    for transport in ("shm", "tcp"):
        procs = [spawn_engine(str(model), "--num-kv-blocks", "2048", "--transport", transport, "--log-level", "error",
                              engine_id=f"{transport}-{i}") for i in range(2)]
        src, dst = (EngineHandle(p.rpc, name=p.engine_id, timeout=600) for p in procs)
        try:
            for length in lengths:
                best = (1e9, 1e9)
                for r in range(args.rounds):
                    gap, recompute = await one(src, dst, length, seed=r * 1000 + length)
                    best = (min(best[0], gap), min(best[1], recompute))
                print(f"| {transport} | {length} | {best[0] * 1e3:.1f} | {best[1] * 1e3:.1f} | "
                      f"{best[1] / best[0]:.1f}x |", flush=True)
        finally:
            await src.close()
            await dst.close()
            for p in procs:
                p.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(p.parse_args()))
