"""`microserve` command line.

Subcommands so far: `generate` (offline generation with the built-in engine), `demo`
(write the demo checkpoint) and `engine` (one engine serving the microserving calls
over ZeroMQ). `launch`, `router`, `bench` and `sim` arrive with their issues.
"""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from microserve import LLM, SamplingParams
    from microserve.engine.engine import InvalidRequestError

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    try:
        outputs = llm.generate(prompts, sampling)
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    for out in outputs:
        print(f"--- {out.request_id} ({len(out.token_ids)} tokens, {out.finish_reason})")
        print(out.text)
    n = sum(len(o.token_ids) for o in outputs)
    print(f"--- {n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def _engine(args: argparse.Namespace) -> int:
    import logging

    from microserve.demo import resolve_model
    from microserve.engine.config import EngineConfig
    from microserve.engine.server import EngineOptions, run_engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.backend != "builtin":
        print("error: --backend vllm is not available yet; use --backend builtin", file=sys.stderr)
        return 2
    config = EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                          kv_cache_memory_gb=args.kv_cache_memory_gb, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                          enable_prefix_caching=not args.no_prefix_caching)
    opts = EngineOptions(str(resolve_model(args.model)), args.rpc, args.events, args.device, args.dtype,
                         args.transport, args.kv_host, args.kv_port, args.engine_id or "", args.lease_seconds,
                         args.transfer_timeout, config)
    import zmq

    try:
        return run_engine(opts)
    except (OSError, zmq.ZMQError) as exc:  # missing checkpoint files, address in use...
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from microserve import demo_model

    print(demo_model(args.path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="microserve", description="Programmable LLM serving.")
    sub = ap.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline with the built-in engine")
    gen.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per stdin line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    eng = sub.add_parser("engine", help="run one engine serving the microserving calls over ZeroMQ")
    eng.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    eng.add_argument("--rpc", default="tcp://127.0.0.1:*", help="ZeroMQ address to bind (port * = any free)")
    eng.add_argument("--events", default="tcp://127.0.0.1:*", help="ZeroMQ PUB address for KV events")
    eng.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    eng.add_argument("--device", default="cpu")
    eng.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    eng.add_argument("--transport", default="auto", choices=["auto", "shm", "ucx", "tcp"])
    eng.add_argument("--kv-host", default="127.0.0.1", help="address of the KV transfer socket")
    eng.add_argument("--kv-port", type=int, default=0)
    eng.add_argument("--engine-id", default=None)
    eng.add_argument("--lease-seconds", type=float, default=60.0, help="default lease of a receive ticket")
    eng.add_argument("--transfer-timeout", type=float, default=30.0,
                     help="how long start_generate waits for KV still in flight")
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument("--num-kv-blocks", type=int, default=None)
    eng.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048)
    eng.add_argument("--max-num-seqs", type=int, default=64)
    eng.add_argument("--no-prefix-caching", action="store_true")
    eng.add_argument("--log-level", default="warning")
    eng.set_defaults(func=_engine)

    demo = sub.add_parser("demo", help="write the tiny random demo checkpoint to PATH")
    demo.add_argument("path")
    demo.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad sampling values, unsupported checkpoint...
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
