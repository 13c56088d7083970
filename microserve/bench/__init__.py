"""`microserve bench`: load an OpenAI-compatible endpoint (ours or any other) with a
workload and measure TTFT, TPOT/ITL, end-to-end latency, throughput and goodput.

    microserve bench --url http://127.0.0.1:8000 --workload chat --rate 4 --num-requests 200 \\
        --out results.json --plot results.png

See docs/bench.md. Never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from microserve.bench import report, workloads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (its /v1/completions)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--workload", required=True,
                   help=f"built-in ({', '.join(workloads.WORKLOADS)}) or a JSONL file of "
                        '{"prompt": str, "max_tokens": int}')
    arrivals = p.add_mutually_exclusive_group(required=True)
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals, requests per second (open loop)")
    arrivals.add_argument("--concurrency", type=int, help="requests in flight at once (closed loop)")
    p.add_argument("--num-requests", type=int, required=True)
    p.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrivals")
    p.add_argument("--tokens-per-word", type=float, default=1.3,
                   help="synthetic prompts: tokens per pseudo-word (1.3 for BPE tokenizers, ~6 for the demo model)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap every request's max_tokens")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that refuse the vLLM extension)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput: end-to-end limit")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def run(args: argparse.Namespace) -> int:
    from microserve.bench import loadgen  # NOTE: here, not at the top: every CLI process builds this parser,
    # and aiohttp's client costs an engine 0.1-0.2 s of start-up for nothing

    if args.num_requests < 1 or (args.rate is not None and args.rate <= 0) or \
            (args.concurrency is not None and args.concurrency < 1):
        raise ValueError("--num-requests, --rate and --concurrency must be positive")
    reqs = workloads.load(args.workload, args.num_requests, args.seed, args.tokens_per_word, args.max_output_tokens)
    try:
        model = args.model or asyncio.run(loadgen.first_model(args.url, args.api_key))
    except (TimeoutError, OSError) as exc:  # aiohttp's connection errors are OSErrors
        raise ValueError(f"cannot reach {args.url}: {exc}") from None
    cfg = loadgen.LoadConfig(args.url, model, args.api_key, args.rate, args.concurrency or 1, args.seed,
                             not args.no_ignore_eos, args.timeout)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    results, duration = asyncio.run(loadgen.run_load(cfg, reqs, progress))
    slo = {k: v / 1e3 for k, v in (("ttft_s", args.slo_ttft_ms), ("tpot_s", args.slo_tpot_ms),
                                   ("e2e_s", args.slo_e2e_ms)) if v is not None}
    summary = report.summarize(results, duration, slo)
    config = {"url": args.url, "model": model, "workload": args.workload, "rate": args.rate,
              "concurrency": args.concurrency, "num_requests": args.num_requests, "seed": args.seed,
              "tokens_per_word": args.tokens_per_word, "max_output_tokens": args.max_output_tokens,
              "ignore_eos": cfg.ignore_eos}
    data = report.to_json(config, results, duration, summary)
    arrivals = f"rate {args.rate} req/s" if args.rate is not None else f"concurrency {args.concurrency}"
    print(f"{args.workload}, {arrivals}, {args.num_requests} requests against {args.url} ({model})")
    return report.emit(data, results, args.out, args.plot, f"{args.workload}, {arrivals}")
