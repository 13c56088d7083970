"""DistAttention: the longest context N engines serve together, and what remote attention costs a decode.

    python benchmarks/dist_attention.py [--engines 1 2 4] [--decode-tokens 64] [--rounds 5]

Random Llama (hidden 512, 8 layers, 8 heads of 64, 4 KV heads, float32), engine processes with pools of
1,024 tokens (64 blocks of 16), prefill chunks of 256. For N engines, one borrows the ranges of its
prompt it cannot hold from the other N - 1, as `strategies/dist_attention.py` places them (its first
256 tokens and the tail stay, the rest is lent in spans of 256 to the lender with the most room left);
the longest prompt that decodes 16 tokens is found by a scan from N x 1,024 + 256 down in steps of 32
(target: >= 0.9 x N x one engine's). Then decode TPOT at batch 1, a 2,048-token prompt: with half its
context ([512, 1536), two ranges of 512) on one lender, against one engine whose pool holds it all,
same run; and one `attend` round trip (one row, one layer) on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from checkpoints import make_checkpoint
from engines import spawn_engine

from microserve.protocol import Attend, Health, Request, RPCError
from microserve.router import EngineCallError, EngineHandle
from microserve.sampling_params import SamplingParams
from microserve.serving.lenders import LenderChannel

POOL, SPAN, BS = 1024, 256, 16
COMMON = ["--block-size", str(BS), "--max-num-batched-tokens", "256", "--log-level", "error"]
_ids = iter(range(10**9))


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 32000) for _ in range(n)]


async def run(engine: EngineHandle, req: Request, lent: list) -> tuple[list[float], int]:
    """Arrival times of the chunks (seconds) and the tokens."""
    times, tokens = [], 0
    async for chunk in engine.start_generate(req, lenders=lent):
        times.append(time.perf_counter())
        tokens += len(chunk.token_ids)
    return times, tokens


async def serves(borrower: EngineHandle, lenders: list[EngineHandle], n: int) -> bool:
    """Does a prompt of n tokens (+16) decode, placed as the DistAttention strategy places it?"""
    req = Request(f"len-{next(_ids)}", prompt_of(n, seed=n), SamplingParams(max_tokens=16, temperature=0,
                                                                             ignore_eos=True))
    need, have = n + 16, POOL - BS
    end = min(-(-(SPAN + need - have) // SPAN) * SPAN, n // SPAN * SPAN) if need > have and lenders else SPAN
    room = {h: POOL for h in lenders}
    try:
        lent = []
        for begin in range(SPAN, end, SPAN):
            lender = max(room, key=room.get)
            room[lender] -= SPAN
            lent.append(await lender.lend(req, begin, begin + SPAN))
        _, tokens = await run(borrower, req, lent)
        return tokens == 16
    except EngineCallError:
        return False
    finally:
        await asyncio.gather(*(h.abort(req.request_id) for h in lenders))


async def longest(handles: list[EngineHandle], count: int) -> int:
    for n in range(count * POOL + 256, 0, -32):
        if await serves(handles[0], handles[1:count], n):
            return n
    return 0


async def tpot(engine: EngineHandle, prompt: list[int], lent_on: EngineHandle | None, tokens: int) -> float:
    req = Request(f"tpot-{next(_ids)}", prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    lent = [await lent_on.lend(req, b, b + 512) for b in (512, 1024)] if lent_on else []
    try:
        times, _ = await run(engine, req, lent)
    finally:
        if lent_on:
            await lent_on.abort(req.request_id)
    return (times[-1] - times[0]) / (tokens - 1) * 1e3


async def main_async(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = make_checkpoint(Path(tmp) / "m", "llama", vocab_size=32000, hidden_size=512,
                                   intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=8192, initializer_range=0.02)
        count = max(args.engines)
        procs = [spawn_engine(str(model), *COMMON, "--num-kv-blocks", str(POOL // BS), engine_id=f"e{i}")
                 for i in range(count)]
        big = spawn_engine(str(model), *COMMON, "--num-kv-blocks", "256", engine_id="big")
        mid = spawn_engine(str(model), *COMMON, "--num-kv-blocks", "128", engine_id="borrower")
        handles = [EngineHandle(p.rpc, name=p.engine_id, timeout=300.0) for p in procs]
        hb, hm = (EngineHandle(p.rpc, name=p.engine_id, timeout=300.0) for p in (big, mid))
        try:
            rows = []
            for n in sorted(args.engines):
                got = await longest(handles, n)
                rows.append((n, got))
                print(f"{n} engine(s): {got} tokens", file=sys.stderr, flush=True)
            prompt = prompt_of(2048, seed=1)
            await tpot(hb, prompt[:64], None, 4)  # warm up
            locals_, splits = [], []
            for _ in range(args.rounds):  # NOTE: interleaved, so a slow spell of the machine hits both
                locals_.append(await tpot(hb, prompt, None, args.decode_tokens))
                splits.append(await tpot(hm, prompt, handles[0], args.decode_tokens))
            local, split = statistics.median(locals_), statistics.median(splits)
            req = Request("rt", prompt_of(600, seed=9), SamplingParams(max_tokens=1))
            lent = await handles[0].lend(req, 0, 512)
            await hm.remote_send(req, lent.kv, 0, 512)
            q = bytes(8 * 64 * 4)
            rts = []
            for _ in range(200):
                t0 = time.perf_counter()
                await handles[0].attend(lent, 3, [600], q, 0.125)
                rts.append((time.perf_counter() - t0) * 1e3)
            # what the borrower's step thread uses: its own blocking socket; and a `health` on it (the floor)
            attend = Attend(lent.kv.ticket_id, lent.kv.secret, 3, [600], q, 0.125, [])
            sync_rts, floor, served = [], [], []
            for address, msg, into in ((lent.rpc, attend, sync_rts), (lent.rpc, Health(), floor),
                                       (lent.attend, attend, served)):
                channel = LenderChannel(address, handles[0].cluster_key)
                for _ in range(300):
                    t0 = time.perf_counter()
                    reply = channel.receive(channel.send(msg, 5.0), time.monotonic() + 5.0)
                    into.append((time.perf_counter() - t0) * 1e3)
                assert not isinstance(reply, RPCError), reply
                channel.close()
            await handles[0].abort("rt")
        finally:
            for h in (*handles, hb, hm):
                await h.close()
            for p in (*procs, big, mid):
                p.proc.terminate()
                p.proc.wait(30)
    print("\n| engines (1,024-token pools) | longest context served | vs N x one engine's |\n|---|---|---|")
    one = rows[0][1] if rows[0][0] == 1 else POOL
    for n, got in rows:
        print(f"| {n} | {got} | {got / (n * one):.2f} |")
    print("\n| decode, 2,048-token context, batch 1 | TPOT ms |\n|---|---|")
    print(f"| one engine, pool large enough | {local:.1f} |")
    print(f"| half the context ([512, 1536)) on a lender, 2 ranges | {split:.1f} ({split / local:.2f}x) |")
    print(f"| one attend round trip (1 row, 1 layer, 512 tokens), p50: an asyncio EngineHandle | "
          f"{statistics.median(rts):.2f} |")
    print(f"| the same from a blocking socket to the lender's RPC socket, p50 | {statistics.median(sync_rts):.2f} |")
    print(f"| a `health` call there (the RPC floor), p50 | {statistics.median(floor):.2f} |")
    print(f"| the attend to the lender's attend socket (what a borrower uses), p50 | {statistics.median(served):.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="TPOT runs of each kind (the median is reported)")
    asyncio.run(main_async(ap.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
