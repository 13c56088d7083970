"""Arguments of `microserve sim` (kept free of heavy imports: the CLI builds every parser)."""

from __future__ import annotations

import argparse
from pathlib import Path

from microserve.bench import workloads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", help="strategy file, or a shipped name (pd, balanced_pd, round_robin, ...)")
    p.add_argument("--strategy-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="override a strategy parameter (repeatable)")
    p.add_argument("--model", default="llama-3.1-8b",
                   help="llama-3.1-8b | llama-3.1-70b | a config.json | a checkpoint folder | demo")
    p.add_argument("--gpu", default="h100",
                   help="h100 | h200 | a100 | a profile JSON (from --calibrate); per role: prefill=h100,decode=a100")
    p.add_argument("--tp", default="1", help="tensor-parallel GPUs per engine; per role: prefill=4,decode=2")
    p.add_argument("--dtype", default=None, choices=["fp8", "bfloat16", "float16", "float32"],
                   help="weights' precision (default: the model profile's); fp8 uses the GPU's FP8 peak")
    p.add_argument("--kv-dtype", default=None, choices=["auto", "fp8", "bfloat16", "float16", "float32"],
                   help="KV cache precision (auto: 2 bytes with fp8 weights, else as the weights)")
    p.add_argument("--roles", default=None, help="engine layout, e.g. prefill=1,decode=1 (default: the strategy's)")
    p.add_argument("--engines", type=int, default=None, help="N engines of a one-role strategy (as in launch)")
    p.add_argument("--link", default="nvlink", help="nvlink | ib400 | pcie5 | a link JSON: KV between engines; per "
                   "pair of roles: nvlink,prefill:decode=ib400")
    p.add_argument("--workload", default=None, help=f"{', '.join(workloads.WORKLOADS)} or a JSONL file")
    arrivals = p.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals, requests per (virtual) second")
    arrivals.add_argument("--concurrency", type=int, help="requests in flight at once (closed loop)")
    p.add_argument("--num-requests", type=int, default=None, help="requests to run (a --trace: the first N)")
    t = p.add_argument_group("time-varying load and planners (docs/planner.md)")
    t.add_argument("--trace", default=None, metavar="FILE|diurnal|bursty",
                   help="requests with arrival times: a JSONL trace (ours or Mooncake's), an Azure CSV trace, or a "
                        "generator (diurnal: a day with a 10x peak; bursty); --rate is a generator's mean")
    t.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's rate")
    t.add_argument("--trace-duration", type=float, default=None, metavar="SECONDS",
                   help="a generator's length (default a day, 86400), or where a file trace is cut")
    t.add_argument("--planner", default=None, metavar="FILE", help="planner file or shipped name (queue, slo), "
                   "run in virtual time: engines start after their start latency and cost GPU-hours")
    t.add_argument("--planner-arg", action="append", default=[], metavar="NAME=VALUE")
    t.add_argument("--scale-bounds", default="", metavar="ROLE=MIN:MAX,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens-per-word", type=float, default=1.3, help="as in `microserve bench`")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap every request's max_tokens")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step (default: 8192 to simulate, the engine's 2048 to calibrate)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="running requests per engine (default: 256 to simulate, the engine's 64 to calibrate)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="most prompt tokens one step starts, one prompt may go past (default: no limit)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool per engine (default: what fits)")
    from microserve.engine_knobs import positive_int

    p.add_argument("--no-mixed-batches", action="store_true",
                   help="a step that prefills carries no decodes: prompts first, decodes wait (SGLang without "
                        "--enable-mixed-chunk; MLC-LLM's prefill_mode=chunked)")
    p.add_argument("--stream-interval", type=positive_int, default=1, metavar="N",
                   help="engines stream tokens N at a time after the first (as `engine --stream-interval`): "
                        "TTFT, TPOT and JCT are unchanged, the run is faster, gaps under N tokens are not seen")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-store", action="append", default=[], metavar="SPEC",
                   help="KV store tiers of every engine, fastest first: host:SIZE, disk:PATH[:SIZE], valkey (one "
                        "shared tier); loads cost virtual time on pcie5 / nvme / eth100 (sim/store.py)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (bench's schema)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (needs matplotlib)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--calibrate", action="store_true",
                   help="profile the real engine on this machine with --model and write a --gpu profile to --out")
    p.add_argument("--device", default="cpu", help="--calibrate: where the real engine runs")
    p.add_argument("--threads", type=int, default=None,
                   help="--calibrate: torch threads (match what each engine gets when serving: launch gives "
                        "cores / engines)")
    p.add_argument("--quick", action="store_true", help="--calibrate: a shorter ladder of batches")
    g = p.add_argument_group("layout search (--search, microserve/sim/search.py)")
    g.add_argument("--search", action="store_true",
                   help="rank layouts (DP, xPyD, balanced PD; TP degrees) of --gpus GPUs by goodput per GPU")
    g.add_argument("--gpus", type=int, default=8, help="--search: the GPU budget every layout uses")
    g.add_argument("--rates", default=None, help="--search: request rates to try, e.g. 1.6,2.6,3.6,4.6,5.6")
    g.add_argument("--tp-choices", default="1,2,4,8", help="--search: tensor parallel degrees to try")
    g.add_argument("--fractions", default="0.1", help="--search: balanced PD fractions to try")
    g.add_argument("--attainment", type=float, default=0.9,
                   help="--search: share of requests that must meet the SLOs for a rate to count as met")
    p.add_argument("--url", default=None,
                   help="--calibrate: also run the workload against this running deployment of --model (same "
                        "strategy and roles) and fit the host costs outside the model (step loop, front-end)")


def main(args: argparse.Namespace) -> int:
    if args.calibrate:
        from microserve.sim import calibrate

        return calibrate.run(args)
    if args.search:
        from microserve.sim import search

        return search.run(args)
    from microserve.sim import run

    return run.run(args)
