"""Decode step time of the built-in engine on CUDA, against the HBM roofline and against
Hugging Face `generate` in the same run.

    python benchmarks/cuda_decode.py [--batch 1 8 32 64] [--context 512] [--steps 32]

Model: random weights in the shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV
heads, intermediate 8192, vocab 128256, tied embeddings), bfloat16 by default. Each batch
size: B requests with `--context`-token prompts are prefilled, then `--steps` decode steps
are timed one by one (median). The floor is the bytes a decode step must read (every weight
once, the lm_head once, each sequence's KV once) over the bandwidth of a device-to-device
copy measured in the same run (bytes read + written). HF: `generate` on the same batch,
(time for 1 + steps tokens - time for 1 token) / steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

MODEL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
             rope_theta=500000.0)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def build(path: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from microserve.demo import write_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(dtype).eval()
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def step_bytes(model, batch: int, context: int) -> float:
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:  # the lm_head reads the whole (shared) matrix
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * model.dtype.itemsize * context * batch
    return weights + kv


def ours(path: str, dtype: str, batch: int, context: int, steps: int, graphs: bool,
         profile: bool = False) -> tuple[float, float]:
    """(median decode step s, median forward-only s); `profile` prints the decode steps' top kernels."""
    from microserve import LLM, SamplingParams

    llm = LLM(path, device="cuda", dtype=dtype, max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
              kv_cache_memory_gb=8.0, cuda_graphs=graphs)
    eng = llm.engine
    sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        eng.add_request(f"r{i}", torch.randint(5, MODEL["vocab_size"], (context,), generator=g).tolist(), sp)
    started = set()
    while len(started) < batch:  # prefill, then a few decode steps of warm-up
        started |= {o.request_id for o in eng.step() if o.new_token_ids}
    for _ in range(3):
        eng.step()
    inner = eng._execute
    fwd: list[float] = []

    def timed(b):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner(b)
        torch.cuda.synchronize()
        fwd.append(time.perf_counter() - t)
        return out

    eng._execute = timed
    total = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
    if prof is not None:
        prof.__enter__()
    for _ in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        total.append(time.perf_counter() - t)
        assert len(outs) == batch
    if prof is not None:
        prof.__exit__(None, None, None)
        print(f"batch {batch}, {steps} decode steps, {'graphs' if graphs else 'eager'}:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return statistics.median(total), statistics.median(fwd)


def hf(model, batch: int, context: int, steps: int) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(5, MODEL["vocab_size"], (batch, context), generator=g).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        run(2)
        return (run(1 + steps) - run(1)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-graphs", action="store_true", help="only the eager engine (no CUDA graphs row)")
    ap.add_argument("--profile", action="store_true", help="print each eager run's top CUDA kernels")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    modes = [False] if args.no_graphs else [False, True]
    with tempfile.TemporaryDirectory() as path:
        model = build(path, dtype)
        head = "".join(f"{'graphs' if m else 'eager':>9} step  fwd  %floor" for m in modes)
        print(f"{'batch':>5}{'floor ms':>10}{head}{'HF ms':>9}{'HF/ours':>9}")
        for b in args.batch:
            floor = step_bytes(model, b, args.context) / bw
            row, best = f"{b:>5}{floor * 1e3:>10.3f}", None
            for m in modes:
                step, fwd = ours(path, args.dtype, b, args.context, args.steps, m, args.profile and not m)
                best = step if best is None else min(best, step)
                row += f"{step * 1e3:>14.3f}{fwd * 1e3:>6.2f}{100 * floor / step:>7.0f}%"
            theirs = hf(model, b, args.context, args.steps)
            print(row + f"{theirs * 1e3:>9.3f}{theirs / best:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
