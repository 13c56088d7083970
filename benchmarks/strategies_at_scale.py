"""Strategies at cluster scale, simulated: Llama-3.1-70B on 8 x H100 as two TP4 engines,
the `sonnet` workload (~3000 in / 100 out) at 1.6-5.6 req/s (docs/strategies-at-scale.md).

    python benchmarks/strategies_at_scale.py [--num-requests 500] [--workload sonnet-llmperf] [--plot FILE]

Prints mean / p99 JCT, mean TTFT and TPOT per strategy and rate, and each strategy's
JCT relative to data parallel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from microserve.cli import build_parser

STRATEGIES = {  # label: (strategy, extra args)
    "data parallel": ("round_robin", ["--roles", "engine=2"]),
    "TP8 (one engine)": ("round_robin", ["--roles", "engine=1", "--tp", "8"]),
    "1P1D (pd)": ("pd", []),
    "balanced PD 0.1": ("balanced_pd", ["--strategy-arg", "fraction=0.1"]),
    "adaptive PD": ("adaptive_pd", ["--strategy-arg", "max_prefill_queue=6000"]),
}
RATES = (1.6, 2.6, 3.6, 4.6, 5.6)


def run_one(strategy: str, extra: list[str], rate: float, n: int, seed: int, dtype: str, gpu: str = "h100",
            engine: tuple[str, ...] = (), workload: str = "sonnet") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        tp = [] if "--tp" in extra else ["--tp", "4"]
        args = build_parser().parse_args([
            "sim", "--strategy", strategy, *extra, "--model", "llama-3.1-70b", "--gpu", gpu, *tp, "--dtype", dtype,
            "--link", "nvlink", "--workload", workload, "--rate", str(rate), "--num-requests", str(n),
            "--seed", str(seed), "--out", str(out), "--no-progress", *engine])
        with contextlib.redirect_stdout(io.StringIO()):
            args.func(args)
        return json.loads(out.read_text())["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--dtype", default="fp8", help="fp8 (the paper's setup) or bfloat16")
    ap.add_argument("--gpu", default="h100", help="h100, or a profile JSON")
    ap.add_argument("--workload", default="sonnet",
                    help="sonnet (100 output tokens each) or sonnet-llmperf (LLMPerf's default spread, sd 80)")
    ap.add_argument("--no-mixed-batches", action="store_true",
                    help="a step that prefills carries no decodes (MLC-LLM's prefill_mode=chunked, SGLang's "
                         "default); default: MLC-LLM's default hybrid prefill (decodes ride along prompt chunks)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="simulations run in parallel")
    opts = ap.parse_args()
    engine = ("--no-mixed-batches",) if opts.no_mixed_batches else ()
    points = [(label, rate) for label in STRATEGIES for rate in RATES]
    with concurrent.futures.ProcessPoolExecutor(opts.jobs) as pool:
        futures = {p: pool.submit(run_one, *STRATEGIES[p[0]], p[1], opts.num_requests, opts.seed, opts.dtype,
                                  opts.gpu, engine, opts.workload) for p in points}
        res = {p: f.result() for p, f in futures.items()}
    print(f"llama-3.1-70b {opts.dtype}, 8 x H100 (NVLink), {opts.workload}, {opts.num_requests} requests per point, "
          f"{'prefill-only steps' if opts.no_mixed_batches else 'mixed batches (MLC-LLM hybrid prefill)'}")
    print(f"{'strategy':<18}{'rate':>6}{'JCT mean':>10}{'JCT p99':>10}{'TTFT mean':>11}{'TPOT mean':>11}"
          f"{'vs DP mean':>12}{'vs DP p99':>11}")
    for label in STRATEGIES:
        for rate in RATES:
            s, dp = res[label, rate]["e2e_s"], res["data parallel", rate]["e2e_s"]
            other = res[label, rate]
            print(f"{label:<18}{rate:>6}{s['mean']:>10.2f}{s['p99']:>10.2f}"
                  f"{other['ttft_s']['mean']:>11.3f}{other['tpot_s']['mean'] * 1e3:>9.1f}ms"
                  f"{s['mean'] / dp['mean'] - 1:>+12.1%}{s['p99'] / dp['p99'] - 1:>+11.1%}")
    if opts.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        for ax, (key, stat, title) in zip(axes, (("e2e_s", "mean", "mean JCT (s)"), ("e2e_s", "p99", "p99 JCT (s)"),
                                                 ("ttft_s", "mean", "mean TTFT (s)"),
                                                 ("tpot_s", "mean", "mean TPOT (s)"))):
            for label in STRATEGIES:
                ax.plot(RATES, [res[label, r][key][stat] for r in RATES], marker="o", label=label)
            ax.set(xlabel="request rate (req/s)", title=title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"simulated: Llama-3.1-70B {opts.dtype}, 8 x H100 (two TP4 engines; TP8: one), "
                     f"{opts.workload}")
        fig.tight_layout()
        opts.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(opts.plot, dpi=90)


if __name__ == "__main__":
    main()
