"""`microserve` command line.

Subcommands so far: `generate` (offline generation with the built-in engine) and
`demo` (write the demo checkpoint). `launch`, `engine`, `router`, `bench` and `sim`
arrive with the microserving-calls, router and bench issues.
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
