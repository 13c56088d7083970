"""`launch --config FILE`: several models behind one gateway (docs/models.md).

    models:
      - model: demo                          # a checkpoint folder, or 'demo'
        served_model_name: [demo, small]     # default: the folder's name
        strategy: round_robin                # a strategy file or a shipped name
        engines: 2                           # or roles: {prefill: 1, decode: 1}
      - model: /models/llama-3.2-1b
        served_model_name: llama
        strategy: pd
        roles: {prefill: 1, decode: 1}
        max_num_seqs: 64                     # any engine option of `launch`
        enable_lora: true
        lora_modules: {sql: /adapters/sql}

An entry takes `launch`'s per-model options under their flag names (`max_num_seqs` or
`max-num-seqs`): the model, its served names, strategy and its arguments, the engine layout,
backend, device and every other engine option, tokenizer, chat template, generation config and
planner. A mapping gives NAME=VALUE pairs (`roles`, `strategy_args`, `planner_args`,
`scale_bounds`, `lora_modules`); a list repeats the flag; `true` sets a switch. The
deployment-wide options (address, keys, limits, logging) stay on the command line, and engine
options given there apply to every model unless its entry sets them.

Each model gets its own engines, router and strategy: a request reaches its model's engines only,
and prefix indexes, KV events, store entries and transfers never mix models.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microserve.engine_knobs import engine_knobs

if TYPE_CHECKING:
    from microserve.options import ServeOptions
    from microserve.router.strategy import Strategy

# launch options that belong to one model (the others are the gateway's, on the command line)
_MODEL_OPTIONS = {"model", "roles", "engines", "backend", "strategy", "strategy_arg", "served_model_name",
                  "chat_template", "generation_config", "planner", "planner_arg", "scale_bounds"}
_PLURAL = {"strategy_args": "strategy_arg", "planner_args": "planner_arg"}
_COMMA_PAIRS = {"roles", "scale_bounds"}  # a mapping becomes one "A=1,B=2" value


def per_model_options() -> set[str]:
    return _MODEL_OPTIONS | {a.dest for a in engine_knobs()._actions if a.option_strings and a.dest != "help"}


def _switches() -> set[str]:
    """The engine options that take no value (`true` in an entry sets them)."""
    return {a.dest for a in engine_knobs()._actions if isinstance(a, argparse._StoreTrueAction)}


def load_config(path: str | Path) -> list[list[str]]:
    """Each model's `launch` arguments from a config file; ValueError naming the file and the entry."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"models"}:
        keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"--config {path}: expected one key, `models` (a list of models); got {keys}")
    models = doc["models"]
    if not isinstance(models, list) or not models:
        raise ValueError(f"--config {path}: `models` must be a non-empty list")
    return [model_argv(f"--config {path}: models[{i}]", entry) for i, entry in enumerate(models)]


def model_argv(where: str, entry: Any) -> list[str]:
    """One entry as `launch` arguments (`where` names it in errors)."""
    if not isinstance(entry, dict) or "model" not in entry:
        raise ValueError(f"{where}: each model is a mapping with at least `model: PATH`")
    allowed, switches = per_model_options(), _switches()
    out: list[str] = []
    for key, value in entry.items():
        dest = str(key).replace("-", "_")
        dest = _PLURAL.get(dest, dest)
        if dest not in allowed:
            raise ValueError(f"{where}: {key!r} is not a per-model option (deployment-wide options such as the "
                             "address, keys and limits go on the command line); per model: "
                             f"{', '.join(sorted(allowed))}")
        out += _flag(where, "--" + dest.replace("_", "-"), dest, value, dest in switches)
    return out


def _flag(where: str, flag: str, dest: str, value: Any, switch: bool) -> list[str]:
    if isinstance(value, bool):
        if switch:
            return [flag] if value else []
        raise ValueError(f"{where}: {dest} takes a value, not {value!r}")
    if isinstance(value, dict):
        pairs = [f"{k}={v}" for k, v in value.items()]
        return [flag, ",".join(pairs)] if dest in _COMMA_PAIRS else [part for p in pairs for part in (flag, p)]
    if isinstance(value, list):
        if dest == "served_model_name":
            return [flag, *map(str, value)]
        return [part for v in value for part in (flag, str(v))]
    if value is None:
        raise ValueError(f"{where}: {dest} has no value")
    return [flag, str(value)]


def without_config(argv: list[str]) -> list[str]:
    """The command line minus `--config FILE` (what every model's arguments start from)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif not a.startswith("--config="):
            out.append(a)
    return out


@dataclass
class ModelPlan:
    """One model of `launch`: its strategy, checkpoint (as given), engines per role, engine arguments and
    options (served names, tokenizer, default sampling, planner)."""

    strategy: Strategy
    model: str
    layout: Mapping[str, int]
    engine_args: list[str]
    opts: ServeOptions


def check_names(plans: list[ModelPlan]) -> None:
    """Each served name leads to one model (ValueError before anything starts); a checkpoint path given for
    two models is accepted as a name for neither."""
    seen: dict[str, int] = {}
    for i, plan in enumerate(plans):
        for name in dict.fromkeys([plan.opts.served_model_name, *plan.opts.aliases]):
            if name in seen:
                raise ValueError(f"the served name {name!r} is given to models {seen[name]} and {i}: each name leads "
                                 "to one model (set served_model_name)")
            seen[name] = i
    paths = [p.opts.model_path for p in plans]
    for plan in plans:
        if plan.opts.model_path in seen or paths.count(plan.opts.model_path) > 1:
            plan.opts.model_path = None


def id_prefix(name: str, i: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.]+', '_', name)[:32] or f'model{i}'}-"
