"""The built-in engine on CPU in float32, bfloat16 and float16, native kernels vs the torch path.

Same random Llama as engine_throughput.py (vocab 32000, hidden 512, 8 layers). For each dtype
and path, in one run: the median decode step at batch 1 and 32 (128-token prompts, greedy),
and one 2048-token prefill step (16 prompts x 128). The torch path runs torch's own GEMMs,
which in bf16 / fp16 are scalar-speed on CPUs without AVX512-BF16 / AMX; it gets fewer
steps.

    python benchmarks/cpu_dtypes.py [--steps 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from engine_throughput import build_model

from microserve import LLM, SamplingParams


def decode_step_ms(llm: LLM, batch: int, steps: int) -> float:
    eng = llm.engine
    eng.kv.radix.clear()
    for i in range(batch):
        eng.add_request(f"d{time.monotonic_ns()}-{i}", [(7 * i + j) % 31000 + 5 for j in range(128)],
                        SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    while eng.scheduler.waiting:  # prefill (the step that admits the last prompt also samples)
        eng.step()
    times = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def prefill_ms(llm: LLM) -> float:
    llm.engine.kv.radix.clear()
    prompts = [[(11 * i + 3 * j) % 31000 + 5 for j in range(128)] for i in range(16)]
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    return 1e3 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (torch path: a quarter)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        for dtype in ("float32", "bfloat16", "float16"):
            result = {}
            for native in (True, False):
                llm = LLM(path, dtype=dtype, native_kernels=native, max_num_batched_tokens=2048, max_num_seqs=64)
                steps = args.steps if native else max(2, args.steps // 4)
                decode_step_ms(llm, 2, 2)  # warm-up
                result[native] = (decode_step_ms(llm, 1, steps), decode_step_ms(llm, 32, steps), prefill_ms(llm))
                print(f"  {dtype} {'native' if native else 'torch'}: decode 1 / 32: {result[native][0]:.2f} / "
                      f"{result[native][1]:.2f} ms, prefill 2048: {result[native][2]:.0f} ms", flush=True)
            names = ("decode step, batch 1 (ms)", "decode step, batch 32 (ms)", "prefill 16 x 128 (ms)")
            for i, name in enumerate(names):
                rows.append((f"{dtype} {name}", result[False][i], result[True][i]))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'measurement':<40}{'torch path':>12}{'native':>10}{'speed-up':>10}")
    for name, plain, fast in rows:
        print(f"{name:<40}{plain:>12.2f}{fast:>10.2f}{plain / fast:>9.2f}x")


if __name__ == "__main__":
    main()
