"""Built-in engine vs Hugging Face `generate`, same random model, same run.

Workloads (greedy, ignore EOS):
  uniform        32 prompts x 128 tokens, 64 new tokens: output tokens/s
  shared-prefix  32 prompts = one 512-token prefix + 16 own tokens, 8 new tokens: mean TTFT
                 (cold: nothing cached at start; warm: the prefix was served once before)
  single         one 128-token prompt, 64 new tokens: output tokens/s at batch 1
  mixed          32 prompts of 16-512 tokens, 8-128 new tokens each (seeded): useful output
                 tokens/s; HF serves it as one left-padded batch of max(new) steps
  bf16           the same model in bfloat16 on both sides: one 128-token prompt with 32 new
                 tokens, and 8 such prompts with 16 new tokens (tokens/s; small, because torch's
                 bf16 GEMM, which HF runs, is scalar-speed on CPUs without AVX512-BF16)
Ours runs twice where it matters: with the native CPU kernels of csrc/ and without
(`native_kernels=False`, the pure-torch path), in the same rounds.

    python benchmarks/engine_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from microserve import LLM, SamplingParams

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


def build_model(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from microserve.demo import write_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def hf_run(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """One padded static batch (all prompts have equal length here). Returns (seconds, ttft)."""
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return total, ttft


def hf_mixed_run(model, prompts: list[list[int]], new_tokens: list[int]) -> float:
    """One left-padded static batch decoding max(new_tokens) steps (HF's way to serve a
    mixed batch); only each prompt's own new tokens count as useful. Returns seconds."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    n = max(new_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - t0


def ours_run(llm: LLM, prompts: list[list[int]], new_tokens: int | list[int]) -> tuple[float, float]:
    """All requests arrive at once. Returns (seconds, mean time to first token)."""
    eng = llm.engine
    counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, counts)):
        eng.add_request(f"b{time.monotonic_ns()}-{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    first: dict[str, float] = {}
    produced = 0
    while eng.has_unfinished():
        for out in eng.step():
            first.setdefault(out.request_id, time.perf_counter() - t0)
            produced += len(out.new_token_ids)
    total = time.perf_counter() - t0
    assert produced == sum(counts)
    return total, sum(first.values()) / len(first)


def bf16_rows(hf, path: str, prompts: list[list[int]], args) -> list[tuple[str, float, float, float]]:
    """HF and ours, both in bfloat16: one request (32 new tokens) and a batch of 8 (16 new)."""
    import copy

    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ours = LLM(path, dtype="bfloat16", max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=64)
    ours_run(ours, prompts[:1], 2)  # warm-up
    rows = []
    for label, batch, new in (("bf16 single request tok/s", 1, 32), ("bf16 batch 8 tok/s", 8, 16)):
        rounds = []
        for _ in range(args.repeats):
            hf_s, _ = hf_run(hf16, prompts[:batch], new)
            ours.engine.kv.radix.clear()
            our_s, _ = ours_run(ours, prompts[:batch], new)
            rounds.append((batch * new / hf_s, batch * new / our_s))
            print(f"  {label}: HF {rounds[-1][0]:.1f}, microserve {rounds[-1][1]:.1f}", flush=True)
        hf_tps, our_tps = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]
        rows.append((label + " (median)", hf_tps, our_tps, our_tps / hf_tps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts instead of 32 (smoke run)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved HF/ours rounds; the median is reported")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    args = ap.parse_args()
    n = 8 if args.quick else 32
    g = torch.Generator().manual_seed(1)
    uniform = torch.randint(5, 32000, (n, 128), generator=g).tolist()
    prefix = torch.randint(5, 32000, (512,), generator=g).tolist()
    shared = [prefix + torch.randint(5, 32000, (16,), generator=g).tolist() for _ in range(n)]
    lengths = torch.randint(16, 513, (n,), generator=g).tolist()
    mixed_prompts = [torch.randint(5, 32000, (k,), generator=g).tolist() for k in lengths]
    mixed_new = torch.randint(8, 129, (n,), generator=g).tolist()

    with tempfile.TemporaryDirectory() as path:
        hf = build_model(path)
        llm = LLM(path, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=64)
        ours_run(llm, uniform[:2], 4)  # warm-up (allocator, kernels)
        hf_run(hf, uniform[:2], 4)
        # the pure-torch path (no csrc/ kernels), for the kernels' share
        plain = LLM(path, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=64, native_kernels=False)
        ours_run(plain, uniform[:2], 4)
        rows = []
        rounds = []
        for _ in range(args.repeats):  # interleaved, so machine noise hits every side alike
            hf_s, _ = hf_run(hf, uniform, 64)
            llm.engine.kv.radix.clear()  # no prefix-cache hits from warm-up or earlier rounds
            our_s, _ = ours_run(llm, uniform, 64)
            plain.engine.kv.radix.clear()
            plain_s, _ = ours_run(plain, uniform, 64)
            rounds.append((n * 64 / hf_s, n * 64 / our_s, n * 64 / plain_s))
            print(f"  round: HF {rounds[-1][0]:.1f} tok/s, microserve {rounds[-1][1]:.1f} tok/s "
                  f"(torch path {rounds[-1][2]:.1f}), ratio {rounds[-1][1] / rounds[-1][0]:.2f}x", flush=True)
        hf_tps, our_tps, plain_tps = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]
        rows.append(("uniform tok/s (median round)", hf_tps, our_tps, our_tps / hf_tps))
        rows.append(("  same round, torch path (no csrc)", hf_tps, plain_tps, plain_tps / hf_tps))
        llm.engine.kv.radix.clear()
        hf_s, hf_ttft = hf_run(hf, shared, 8)
        _, cold = ours_run(llm, shared, 8)
        llm.engine.kv.radix.clear()
        llm.generate([prefix + [7]], SamplingParams(max_tokens=1, temperature=0))
        _, warm = ours_run(llm, shared, 8)
        rows.append(("shared-prefix mean TTFT s (cold)", hf_ttft, cold, hf_ttft / cold))
        rows.append(("shared-prefix mean TTFT s (warm)", hf_ttft, warm, hf_ttft / warm))
        single = []  # one request alone: decode latency at batch 1 (interactive use)
        for _ in range(args.repeats):
            hf_s, _ = hf_run(hf, uniform[:1], 64)
            for engine in (llm, plain):
                engine.engine.kv.radix.clear()
            our_s, _ = ours_run(llm, uniform[:1], 64)
            plain_s, _ = ours_run(plain, uniform[:1], 64)
            single.append((64 / hf_s, 64 / our_s, 64 / plain_s))
        hf_tps, our_tps, plain_tps = sorted(single, key=lambda r: r[1] / r[0])[len(single) // 2]
        rows.append(("single request tok/s (median round)", hf_tps, our_tps, our_tps / hf_tps))
        rows.append(("  same round, torch path (no csrc)", hf_tps, plain_tps, plain_tps / hf_tps))
        mixed = []
        useful = sum(mixed_new)
        for _ in range(args.repeats):
            hf_s = hf_mixed_run(hf, mixed_prompts, mixed_new)
            for engine in (llm, plain):
                engine.engine.kv.radix.clear()
            our_s, _ = ours_run(llm, mixed_prompts, mixed_new)
            plain_s, _ = ours_run(plain, mixed_prompts, mixed_new)
            mixed.append((useful / hf_s, useful / our_s, useful / plain_s))
        hf_tps, our_tps, plain_tps = sorted(mixed, key=lambda r: r[1] / r[0])[len(mixed) // 2]
        rows.append(("mixed useful tok/s (median round)", hf_tps, our_tps, our_tps / hf_tps))
        rows.append(("  same round, torch path (no csrc)", hf_tps, plain_tps, plain_tps / hf_tps))
        if not args.no_bf16:
            rows += bf16_rows(hf, path, uniform, args)

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {n} prompts, float32 CPU "
          f"(bf16 rows: bfloat16)")
    print(f"{'metric':<36}{'HF generate':>14}{'microserve':>14}{'ratio':>10}")
    for name, a, b, r in rows:
        print(f"{name:<36}{a:>14.3f}{b:>14.3f}{r:>9.2f}x")


if __name__ == "__main__":
    main()
