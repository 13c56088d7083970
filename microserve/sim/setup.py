"""What `microserve sim`'s flags describe: the engines' layout, hardware per role (`--gpu`, `--tp`), the
links between roles (`--link`), and each simulated engine's scheduler knobs (GPU-serving defaults
where a flag is not given). Refused here, before anything runs, as `launch` refuses its layouts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from microserve.engine.config import EngineConfig
from microserve.router.strategy import parse_roles
from microserve.sim.costs import CostModel, Link, load_gpu, load_link, load_model, with_precision

# scheduler defaults of a GPU engine (vLLM's for online serving are in this range)
GPU_MAX_BATCHED_TOKENS = 8192
GPU_MAX_NUM_SEQS = 256


@dataclass
class SimSetup:
    cost: CostModel  # the first role's (all roles' without mixed hardware)
    layout: dict[str, int]
    config: EngineConfig
    link_name: str
    costs: dict[str, CostModel] = field(default_factory=dict)  # per role
    link: Link | None = None
    links: dict[tuple[str, str], Link] = field(default_factory=dict)  # per (sender role, receiver role)


def per_role(text: str | int | None, roles: list[str], what: str) -> dict[str, str]:
    """`h100` (every role) or `prefill=h100,decode=a100` (roles not named: the first unnamed item, else
    an error) -> {role: value}."""
    items = [x.strip() for x in str(text).split(",") if x.strip()] if text is not None else []
    named = dict(x.split("=", 1) for x in items if "=" in x)
    plain = [x for x in items if "=" not in x]
    unknown = [r for r in named if r not in roles]
    if unknown:
        raise ValueError(f"{what} names role(s) {', '.join(unknown)}; the layout has {', '.join(roles)}")
    missing = [r for r in roles if r not in named and not plain]
    if missing:
        raise ValueError(f"{what} gives nothing for role(s) {', '.join(missing)}: add ROLE=VALUE or a default")
    return {r: named.get(r, plain[0] if plain else "") for r in roles}


def parse_links(text: str, roles: list[str]) -> tuple[Link, dict[tuple[str, str], Link]]:
    """`nvlink` (every pair) or `nvlink,prefill:decode=ib400` (a default and per sender:receiver pair)."""
    default, pairs = None, {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if "=" not in item:
            default = load_link(item)
            continue
        pair, name = item.split("=", 1)
        src, sep, dst = pair.partition(":")
        if not sep or src not in roles or dst not in roles:
            raise ValueError(f"--link {item!r}: expected SENDER:RECEIVER=LINK with roles of {', '.join(roles)}")
        pairs[(src, dst)] = load_link(name)
    return default or load_link("nvlink"), pairs


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Each simulated engine's scheduler knobs (GPU-serving defaults where a flag is not given)."""
    return EngineConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                        max_num_batched_tokens=args.max_num_batched_tokens or GPU_MAX_BATCHED_TOKENS,
                        max_num_seqs=args.max_num_seqs or GPU_MAX_NUM_SEQS,
                        max_prefill_tokens=getattr(args, "max_prefill_tokens", None),
                        enable_prefix_caching=not args.no_prefix_caching, native_kernels=False,
                        stream_interval=getattr(args, "stream_interval", 1),
                        mixed_batches=not getattr(args, "no_mixed_batches", False))


def setup_from_args(args: argparse.Namespace, strategy_roles: dict[str, int]) -> SimSetup:
    from microserve.demo import resolve_model

    model = load_model(str(resolve_model(args.model)) if args.model == "demo" else args.model)
    model = with_precision(model, getattr(args, "dtype", None), getattr(args, "kv_dtype", None))
    if getattr(args, "roles", None) and getattr(args, "engines", None) is not None:
        raise ValueError("give --roles or --engines, not both")
    if getattr(args, "engines", None) is not None:
        if len(strategy_roles) != 1 or args.engines < 1:
            raise ValueError(f"--engines N needs a strategy with one role and N >= 1; this one has roles "
                             f"{', '.join(strategy_roles)}: use --roles")
        layout = {next(iter(strategy_roles)): args.engines}
    else:
        layout = parse_roles(args.roles) if args.roles else dict(strategy_roles)
    missing = [r for r in strategy_roles if r not in layout]
    if missing:  # as `launch` does: refused before anything runs
        raise ValueError(f"the strategy needs role(s) {', '.join(missing)}; --roles gives {', '.join(layout)}")
    roles = list(layout)
    gpus, tps = per_role(args.gpu, roles, "--gpu"), per_role(args.tp, roles, "--tp")
    costs = {}
    for r in roles:
        if not tps[r].isdigit() or int(tps[r]) < 1:
            raise ValueError(f"--tp {args.tp!r}: tensor parallel degrees are integers >= 1")
        costs[r] = CostModel(model, load_gpu(gpus[r]), int(tps[r]))
    config = engine_config(args)
    link, links = parse_links(args.link, roles)
    return SimSetup(costs[roles[0]], layout, config, args.link, costs, link, links)
