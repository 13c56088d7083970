"""Built-in engine vs vLLM (offline `LLM.generate`), same random model and prompts, same run.

Run it with a python that has vLLM (its own environment: `.ci/vllm-env` prints one):

    $(.ci/vllm-env) benchmarks/engine_vs_vllm.py [--quick]

Workloads (greedy, ignore EOS, float32, CPU):
  uniform  32 prompts x 128 tokens, 64 new tokens
  mixed    32 prompts of 16-512 tokens, 8-128 new tokens each (seeded)
Prints output tokens/s of each engine, the ratio, and how many greedy outputs agree token for
token (float32 on both: they should all agree, up to ties in random-weight logits).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


def build_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from microserve.demo import write_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(path)
    write_tokenizer(path)


def workloads(quick: bool) -> dict[str, tuple[list[list[int]], list[int]]]:
    rng = random.Random(0)
    n = 8 if quick else 32
    uniform = ([[rng.randrange(3, 32000) for _ in range(128)] for _ in range(n)], [64] * n)
    lens = [rng.randint(16, 512) for _ in range(n)]
    mixed = ([[rng.randrange(3, 32000) for _ in range(k)] for k in lens], [rng.randint(8, 128) for _ in range(n)])
    return {"uniform": uniform, "mixed": mixed}


def run_ours(path: str, prompts, news) -> tuple[float, list[list[int]]]:
    from microserve import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32")
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in news])
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def run_vllm(llm, prompts, news) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in news], use_tqdm=False)
    return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    from vllm import LLM as VLLM

    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp)
        vllm = VLLM(tmp, dtype="float32", enforce_eager=True, max_model_len=2048, block_size=32, seed=0)
        print(f"{'workload':<10}{'ours tok/s':>12}{'vLLM tok/s':>12}{'ratio':>8}{'same tokens':>14}")
        for name, (prompts, news) in workloads(args.quick).items():
            ours_s, ours = run_ours(tmp, prompts, news)
            vllm_s, theirs = run_vllm(vllm, prompts, news)
            total = sum(news)
            same = sum(a == b for a, b in zip(ours, theirs))
            print(f"{name:<10}{total / ours_s:>12.1f}{total / vllm_s:>12.1f}{vllm_s / ours_s:>8.2f}"
                  f"{same:>9}/{len(prompts)}")


if __name__ == "__main__":
    main()
