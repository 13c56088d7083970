"""The GEMM floor of the engine-throughput benchmark's model on this machine.

Times, outside any engine, the GEMMs one decode step must run (8 layers x qkv, o,
gate_up, down with MKL on `[in, out]` weights + the lm_head as the engine runs it: one
batched matmul over 16-column tiles; MKL's time for it is printed too), batch 32, and a
2048-token prefill's layer GEMMs, then prints the best exact-float32 ratio our engine
could reach against the HF time you pass (both GEMM-bound):

    python benchmarks/gemm_floor.py [--hf-seconds 5.08]
"""

from __future__ import annotations

import argparse
import time

import torch

HIDDEN, INTER, VOCAB, LAYERS, Q, KV = 512, 1376, 32000, 8, 512, 256


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-seconds", type=float, default=None, help="HF generate's time for the uniform workload")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(HIDDEN, Q + 2 * KV), (Q, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]
    layers = [[torch.randn(k, n) for k, n in shapes] for _ in range(LAYERS)]
    lm_head = torch.randn(HIDDEN, VOCAB)
    packed = lm_head.view(HIDDEN, -1, 16).transpose(0, 1).contiguous()  # [T, K, 16], as Linear.pack_weight_

    def step(m: int, with_head: bool) -> None:
        x = torch.randn(m, INTER)
        for ws in layers:
            for w in ws:
                x[:, :w.shape[0]] @ w
        if with_head:
            torch.matmul(x[:, :HIDDEN], packed).transpose(0, 1).reshape(m, -1)

    with torch.inference_mode():
        decode = timed(lambda: step(32, True), 20)
        head = timed(lambda: torch.matmul(torch.randn(32, HIDDEN), packed).transpose(0, 1).reshape(32, -1), 20)
        head_mkl = timed(lambda: torch.randn(32, HIDDEN) @ lm_head, 20)
        prefill = timed(lambda: step(2048, False), 3)
    total = 2 * prefill + 64 * decode  # uniform workload: 4096 prompt tokens, 64 decode steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"{'piece':<44}{'seconds':>10}")
    print(f"{'decode step GEMMs (32 seqs, 8 layers + lm_head)':<44}{decode:>10.4f}")
    print(f"{'  of which lm_head (packed tiles)':<44}{head:>10.4f}")
    print(f"{'  lm_head with MKL on [in, out] instead':<44}{head_mkl:>10.4f}")
    print(f"{'prefill GEMMs, 2048 tokens (no lm_head)':<44}{prefill:>10.4f}")
    print(f"{'uniform workload, GEMMs only':<44}{total:>10.3f}")
    if args.hf_seconds:
        print(f"ceiling vs HF ({args.hf_seconds:.2f} s): {args.hf_seconds / total:.2f}x")


if __name__ == "__main__":
    main()
