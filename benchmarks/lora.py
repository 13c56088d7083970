"""LoRA adapters in the built-in engine: tokens/s of one batch whose rows use 0, 1, 4 or 8 distinct
adapters, against the same batch on an engine without LoRA; and transformers + peft serving the
same mixed batch (`adapter_names`), in the same run.

    python benchmarks/lora.py [--batch 32] [--tokens 64] [--rank 16] [--rounds 2] [--hidden 1024]

A random Llama (8 layers, vocabulary 32000), rank-16 adapters of random weights on all seven
projections (PEFT folders written by peft). Rows take adapters round-robin. Target (issue 39):
8 adapters >= 0.7x the base model's tokens/s on CPU.
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
        print(f"| transformers + peft `generate`, 8 adapters (adapter_names) | {peft_rate:.0f} | {peft_rate / ref:.2f}x |")


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip transformers + peft")
    main(ap.parse_args())
