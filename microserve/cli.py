"""`microserve` command line.

Subcommands: `generate` (offline generation with the built-in engine), `demo` (write
the demo checkpoint), `engine` (one engine serving the microserving calls over
ZeroMQ), `launch` (engines + router + OpenAI gateway for a strategy) and `router`
(router + gateway over engines started elsewhere).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from microserve.engine_knobs import check_knobs, engine_knobs, prefill_tokens


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
    from microserve.demo import resolve_model
    from microserve.engine.config import EngineConfig
    from microserve.logs import setup_logging
    from microserve.serving.engine_options import EngineOptions
    from microserve.serving.zmq_server import run_engine

    setup_logging(args.log_level, args.log_format)
    if (problem := check_knobs(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    block_size = args.block_size
    if args.backend == "vllm" and block_size == 16:  # the built-in default; vLLM's CPU kernels need multiples of 32
        block_size = 32
    config = EngineConfig(block_size=block_size, num_kv_blocks=args.num_kv_blocks,
                          kv_cache_memory_gb=args.kv_cache_memory_gb, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                          max_prefill_tokens=prefill_tokens(args), enable_prefix_caching=not args.no_prefix_caching,
                          cuda_graphs=not args.enforce_eager,
                          skip_tokenizer_init=args.skip_tokenizer_init, stream_interval=args.stream_interval,
                          mixed_batches=not args.no_mixed_batches, enable_lora=args.enable_lora,
                          lora_modules=tuple(args.lora_modules), max_loras=args.max_loras,
                          max_lora_rank=args.max_lora_rank, seed=args.seed, tokenizer=args.tokenizer,
                          tensor_parallel_size=args.tensor_parallel_size)
    from microserve.security import resolve

    opts = EngineOptions(str(resolve_model(args.model)), args.rpc, args.events, args.device, args.dtype,
                         args.transport, args.kv_host, args.kv_port, args.engine_id or "", args.lease_seconds,
                         args.transfer_timeout, config, args.backend,
                         resolve(args.cluster_key), args.insecure, args.max_lease_seconds, args.kv_store,
                         args.join or "", args.role, otlp_traces_endpoint=args.otlp_traces_endpoint or "")
    import zmq

    try:
        return run_engine(opts)
    except (OSError, ValueError, zmq.ZMQError) as exc:  # missing checkpoint files, address in use, a bad adapter
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _keygen(args: argparse.Namespace) -> int:
    from microserve.security import ClusterKey

    try:
        path = ClusterKey.generate().write(args.path)
    except FileExistsError:
        raise ValueError(f"{args.path} exists; a cluster key is never overwritten (remove it first)") from None
    print(f"wrote a cluster key to {path} (mode 0600): give it to every engine and router of the deployment "
          "with --cluster-key, or set MICROSERVE_CLUSTER_KEY")
    return 0


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
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    knobs = engine_knobs()
    eng = sub.add_parser("engine", parents=[knobs], help="run one engine serving the microserving calls over ZeroMQ")
    eng.add_argument("--model", required=True, help="checkpoint folder, or 'demo'")
    eng.add_argument("--rpc", default="tcp://127.0.0.1:*", help="ZeroMQ address to bind (port * = any free)")
    eng.add_argument("--events", default="tcp://127.0.0.1:*", help="ZeroMQ PUB address for KV events")
    eng.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    eng.add_argument("--kv-host", default="127.0.0.1", help="address of the KV transfer socket")
    eng.add_argument("--kv-port", type=int, default=0)
    eng.add_argument("--engine-id", default=None)
    eng.add_argument("--join", default=None, metavar="URL",
                     help="add this engine to the deployment whose gateway is at URL; on SIGTERM it drains and "
                          "leaves first (the cluster key authorizes it)")
    eng.add_argument("--role", default="engine", help="the role it joins as (with --join)")
    eng.add_argument("--cluster-key", default=None, metavar="FILE",
                     help="the deployment's key (microserve keygen); default $MICROSERVE_CLUSTER_KEY")
    eng.add_argument("--insecure", action="store_true",
                     help="serve without a cluster key: loopback addresses only, for local tests")
    eng.add_argument("--log-level", default="warning")
    eng.add_argument("--log-format", choices=["text", "json"], default="text")
    eng.add_argument("--otlp-traces-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                     metavar="URL", help="send this engine's spans to an OTLP/HTTP collector (pip install "
                     "'microserve[otel]'; default $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)")
    eng.set_defaults(func=_engine)

    from microserve import serve_cli

    serve_cli.add_launch(sub, knobs)
    serve_cli.add_router(sub)

    from microserve import bench

    ben = sub.add_parser("bench", help="load an OpenAI-compatible endpoint with a workload; TTFT, TPOT, JCT, "
                                       "throughput, goodput")
    bench.add_arguments(ben)
    ben.set_defaults(func=bench.run)

    from microserve.sim import cli as sim_cli

    sim = sub.add_parser("sim", help="run a strategy on simulated engines (GPUs, models, links from profiles) in "
                                     "virtual time; bench's metrics and JSON. --calibrate profiles this machine")
    sim_cli.add_arguments(sim)
    sim.set_defaults(func=sim_cli.main)

    ctl = sub.add_parser("ctl", help="the admin API from the shell: engines, add, role, remove, strategy")
    from microserve.control import ctl as ctl_mod

    ctl_mod.add_arguments(ctl)
    ctl.set_defaults(func=ctl_mod.main)
    top = sub.add_parser("top", help="a live view of a deployment: engines, load, request rate and latency")
    from microserve.control import top as top_mod

    top_mod.add_arguments(top)
    top.set_defaults(func=top_mod.main)
    key = sub.add_parser("keygen", help="write a new cluster key to FILE (mode 0600)")
    key.add_argument("path", metavar="FILE")
    key.set_defaults(func=_keygen)

    demo = sub.add_parser("demo", help="write the tiny random demo checkpoint to PATH")
    demo.add_argument("path")
    demo.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # launch --config starts each model from it
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # bad values, unsupported checkpoint, a port in use...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # NOTE: engines that never answer, ...: one line, not a traceback
        from microserve.router.handle import EngineCallError

        if not isinstance(exc, EngineCallError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
