"""LoRA adapters in the built-in engine: tokens/s of one batch whose rows use 0, 1, 4 or 8 distinct
adapters, against the same batch on an engine without LoRA; and transformers + peft serving the
same mixed batch (`adapter_names`), in the same run.

    python benchmarks/lora.py [--batch 32] [--tokens 64] [--rank 16] [--rounds 2] [--hidden 1024]
    python benchmarks/lora.py --routing [--engines 4] [--adapters 16] [--max-loras 2] [--requests 96]

A random Llama (8 layers, vocabulary 32000), rank-16 adapters of random weights on all seven
projections (PEFT folders written by peft). Rows take adapters round-robin. Target (issue 39):
8 adapters >= 0.7x the base model's tokens/s on CPU.

`--routing`: `launch` with `--engines 4 --max-loras 2` and 16 adapters whose popularity follows a
Zipf law; the same requests (16 at a time, streamed) through `round_robin` and through
`lora_affinity`: slot loads summed over the engines (GET /admin/engines) and TTFT.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from microserve import LLM, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(root: Path, hidden: int, rank: int, count: int):
    """A random Llama at root/base and `count` PEFT adapters (root/adapters/aN); returns the peft model too."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from microserve.demo import write_tokenizer

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=8, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    write_tokenizer(root / "base")
    tuned = None
    for i in range(count):
        lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        if tuned is None:
            tuned = peft.get_peft_model(base, lora, adapter_name=f"a{i}")
        else:
            tuned.add_adapter(f"a{i}", lora)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if f".a{i}." in name:
                    p.normal_(0, 0.02)
    tuned.save_pretrained(root / "adapters")  # NOTE: one subfolder per adapter name
    folders = {f"a{i}": str(root / "adapters" / f"a{i}") for i in range(count)}
    return root / "base", folders, tuned.eval()


def rate(llm: LLM, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def main(args) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="microserve-bench-lora-"))
    base, folders, tuned = build(root, args.hidden, args.rank, 8)
    plain = LLM(str(base))
    lora = LLM(str(base), enable_lora=True, lora_modules=folders, max_lora_rank=args.rank)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 32000, (64,), generator=g).tolist() for _ in range(args.batch)]

    def params(k: int):
        return [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                               lora=f"a{i % k}" if k else None) for i in range(args.batch)]

    rows = {"base model, no LoRA engine": (plain, params(0))}
    rows |= {f"{k} adapter{'s' if k != 1 else ''}" if k else "LoRA engine, no adapter": (lora, params(k))
             for k in (0, 1, 4, 8)}
    for llm, ps in rows.values():
        llm.generate(prompts[:4], ps[:4])  # warm up
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (llm, ps) in rows.items():
            llm.engine.kv.radix.clear()
            best[name] = max(best.get(name, 0.0), rate(llm, prompts, ps))
    peft_rate = peft_generate(tuned, prompts, args.tokens) if args.peft else None
    ref = best["base model, no LoRA engine"]
    print(f"\n{args.batch} requests x {args.tokens} tokens (64-token prompts), hidden {args.hidden}, 8 layers, "
          f"rank {args.rank} on all 7 projections, best of {args.rounds} rounds\n")
    print("| batch | tokens/s | vs base |\n|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r:.0f} | {r / ref:.2f}x |")
    if peft_rate is not None:
        print(f"| transformers + peft `generate`, 8 adapters (adapter_names) | {peft_rate:.0f} | "
              f"{peft_rate / ref:.2f}x |")


def peft_generate(tuned, prompts, tokens: int) -> float:
    """One left-padded batch, each row under its adapter (peft's mixed-batch inference)."""
    ids = torch.tensor(prompts)
    names = [f"a{i % 8}" for i in range(len(prompts))]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, adapter_names=names, pad_token_id=0)
        seconds = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) * len(prompts) / seconds


async def _ttft(client, gate, prompt: list[int], name: str) -> float:
    async with gate:
        t0 = time.perf_counter()
        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        first = None
        async for _ in stream:
            first = first or time.perf_counter() - t0
        return first


async def _loads(session, url: str) -> int:
    """Slot loads summed over the engines."""
    async with session.get(url + "/admin/engines") as r:
        return sum(e["lora_loads"] for e in (await r.json())["engines"])


async def routing(args) -> None:
    import asyncio
    import random
    import statistics
    import sys

    import aiohttp
    import openai

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from deploy import start_launch

    root = Path(tempfile.mkdtemp(prefix="microserve-bench-lora-"))
    base, folders, _ = build(root, 256, 8, args.adapters)
    rng = random.Random(0)
    weights = [1 / (i + 1) for i in range(args.adapters)]
    names = rng.choices(sorted(folders, key=lambda n: int(n[1:])), weights, k=args.requests)
    prompts = [[rng.randrange(2, 250) for _ in range(96)] for _ in range(args.requests)]  # the byte tokenizer
    print(f"\n{args.requests} requests (96-token prompts, 32 tokens out, {args.concurrency} at a time) under "
          f"{args.adapters} adapters (Zipf popularity), {args.engines} engines of --max-loras {args.max_loras}\n")
    print("| strategy | slot loads | mean TTFT ms | p90 TTFT ms | wall s |\n|---|---|---|---|---|")
    for strategy in ("round_robin", "lora_affinity"):
        dep = start_launch("--strategy", strategy, "--engines", str(args.engines), "--model", str(base),
                           "--enable-lora", "--max-loras", str(args.max_loras), "--max-lora-rank", "8",
                           "--lora-modules", *(f"{k}={v}" for k, v in folders.items()), "--admin-key", "bench",
                           "--log-level", "error")
        try:
            client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
            gate = asyncio.Semaphore(args.concurrency)
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer bench"}) as s:
                before, t0 = await _loads(s, dep.url), time.perf_counter()
                ttft = sorted(await asyncio.gather(*(_ttft(client, gate, p, n) for p, n in zip(prompts, names))))
                wall = time.perf_counter() - t0
                await asyncio.sleep(1.5)  # NOTE: one more stats poll
                after = await _loads(s, dep.url)
            print(f"| {strategy} | {after - before} | {statistics.mean(ttft) * 1e3:.0f} | "
                  f"{ttft[int(0.9 * len(ttft))] * 1e3:.0f} | {wall:.1f} |")
            await client.close()
        finally:
            dep.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip transformers + peft")
    ap.add_argument("--routing", action="store_true", help="round_robin vs lora_affinity over launch instead")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=2)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if args.routing:
        import asyncio

        asyncio.run(routing(args))
    else:
        main(args)
