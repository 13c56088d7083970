"""The engine options shared by `microserve engine` and `microserve launch` (which forwards the ones
given to every engine it starts), and their argparse types. Light on purpose: no torch import."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvapi.transfer.base import TRANSPORTS


def engine_knobs() -> argparse.ArgumentParser:
    """Engine options shared by `engine` and `launch` (which forwards them to its engines)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine options")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
                   help="weights and KV (auto: the checkpoint's; half precision becomes float32 on CPU)")
    g.add_argument("--tokenizer", default=None, metavar="PATH", help="a tokenizer folder other than the model's")
    g.add_argument("--seed", type=int, default=None, help="the engine's sampling seed for unseeded requests")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="devices per engine (vLLM backend; the built-in engine runs one: run more engines)")
    g.add_argument("--transport", default="auto", choices=["auto", *TRANSPORTS],
                   help="how KV moves between engines (auto: shm on one host, then nixl, ucx, tcp)")
    g.add_argument("--lease-seconds", type=float, default=60.0, help="default lease of a receive ticket")
    g.add_argument("--max-lease-seconds", type=float, default=120.0,
                   help="longest lease prep_recv grants (a peer cannot lock blocks for longer)")
    g.add_argument("--transfer-timeout", type=float, default=30.0,
                   help="how long start_generate waits for KV still in flight")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-prefill-tokens", type=positive_int, default=None, metavar="N",
                   help="most prompt tokens one step starts (one prompt may go past; default: 512 on CPU, none "
                        "on CUDA): prompts that arrive together get their first tokens one after another")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="on CUDA, no CUDA graphs for decode steps")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer (vLLM's): token-id prompts only, outputs as token ids")
    g.add_argument("--no-mixed-batches", action="store_true",
                   help="a step that prefills carries no decodes (SGLang's default scheduling; MLC-LLM's "
                        "prefill_mode=chunked)")
    g.add_argument("--stream-interval", type=positive_int, default=1, metavar="N",
                   help="after a request's first token, stream its tokens N at a time (the last chunk at once)")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (docs/models.md)")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=[], type=lora_module, metavar="NAME=PATH",
                   help="PEFT adapter folders loaded at start-up; clients name an adapter as their `model`")
    g.add_argument("--max-loras", type=positive_int, default=None, help="adapters loaded at once (default: all)")
    g.add_argument("--max-lora-rank", type=positive_int, default=16, help="the largest adapter rank (vLLM's 16)")
    g.add_argument("--kv-store", action="append", default=[], type=kv_store_spec, metavar="SPEC",
                   help="a KV store tier below the page pool, repeatable, fastest first: host:SIZE, "
                        "disk:PATH[:SIZE], valkey://HOST:PORT[/DB] (launch: `valkey` starts a local server)")
    return p


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), str(Path(path.strip()).resolve())


def kv_store_spec(text: str) -> str:
    from kvapi.store import check_spec

    if text != "valkey":  # NOTE: `launch` turns a bare `valkey` into the URL of the server it starts
        try:
            check_spec(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def forwarded_knobs(args: argparse.Namespace) -> list[str]:
    """The engine options given on the command line, as `microserve engine` arguments."""
    out = []
    for action in engine_knobs()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._AppendAction):
            out += [part for v in value for part in (flag, v if isinstance(v, str) else "=".join(v))]
            continue
        out += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return out


CPU_MAX_PREFILL_TOKENS = 512  # `--max-prefill-tokens` on CPU (docs/engine.md, "Prompts per step")


def prefill_tokens(args: argparse.Namespace) -> int | None:
    """`--max-prefill-tokens`, or its default for the device: 512 on CPU, where a step's time grows with
    its prompt tokens from the first one (docs/engine.md measures it); no limit elsewhere (not measured)."""
    if args.max_prefill_tokens is not None or getattr(args, "backend", "builtin") == "vllm":
        return args.max_prefill_tokens
    return CPU_MAX_PREFILL_TOKENS if args.device == "cpu" else None


def check_knobs(args: argparse.Namespace) -> str | None:
    """Why these engine options cannot work together (one line), or None."""
    if args.lora_modules and not args.enable_lora:
        return "--lora-modules needs --enable-lora"
    if args.tensor_parallel_size > 1 and getattr(args, "backend", "builtin") != "vllm":
        return ("--tensor-parallel-size > 1 needs --backend vllm: the built-in engine runs on one device "
                "(run more engines instead)")
    if args.max_prefill_tokens is not None and getattr(args, "backend", "builtin") == "vllm":
        return "--max-prefill-tokens is a built-in engine option: vLLM schedules prompts with its own scheduler"
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        return f"--tokenizer {args.tokenizer}: no such folder"
    return None
