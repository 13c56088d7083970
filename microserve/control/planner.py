"""Planners: the cluster sizes itself (DESIGN.md, "Planner"; docs/planner.md).

A planner file holds one `Planner` subclass. Every `interval` seconds its `plan(cluster, window)`
says how many engines each role should have; `Planning` (control/planning.py) checks the answer
(bounds, cooldown) and applies it through the deployment's provisioner, as `ctl scale` does (scale up
starts engines, scale down drains them by migration, so no request fails):

    router ─ each request's end ─> Recorder ─┐
    cluster's polled engine stats ───────────┴─> Window ─> planner.plan ─> {role: n}
        ─> clamped to --scale-bounds, unknown roles and garbage dropped, cooldown ─> provision.grow / shrink

A planner that raises, hangs past its interval or answers garbage is logged and ignored: the
cluster keeps its shape and serves on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microserve.router.strategy import class_parameters, convert, load_subclass

log = logging.getLogger("microserve.planner")

DEFAULT_MAX = 8  # engines per role a planner may ask for without --scale-bounds


class PlannerError(ValueError):
    """A planner file or argument that cannot be used."""


@dataclass
class RoleWindow:
    """What one role's engines did over the interval (from their polled stats)."""

    engines: int  # serving (live, not draining)
    running: int  # requests running on them now
    waiting: int  # requests queued on them now
    queued_tokens: int  # prompt tokens waiting to be computed
    kv_usage: float  # mean fraction of their KV blocks held by requests (0-1; the prefix cache's are free to take)
    computed_tokens_per_s: float  # tokens computed (prefill and decode) per second, all engines together
    capacity_tokens_per_s: float  # what one engine computes per second of work: tokens over busy seconds (the
    # engines' step time) over the last intervals; engines that report no busy time: the intervals an engine
    # ended queued, else the most one engine computed in an interval (a lower bound)
    requests_per_s: float  # requests that ended having used the role, per second
    capacity_measured: bool = False  # measured (busy time, or a saturated engine), else a lower bound
    refused: int = 0  # KV receives its engines refused for want of free blocks over the interval (a request
    # failed or moved on: the role is short of KV even when its mean use looks fine)
    parked: int = 0  # requests the router holds now because every engine of the role refused them for want of KV
    # blocks (router/kv_wait.py): they wait for blocks, demand the role's engines could not take
    starting: int = 0  # engines asked for (a planner's earlier decision) that do not serve yet: `engines` does not
    # count them; a plan's count for the role is serving + starting


@dataclass
class Window:
    """The last interval, as the router measured it. Latencies in seconds; rates per second."""

    seconds: float  # the interval's length
    arrivals_per_s: float  # requests that arrived
    finished: int  # requests that ended with output
    failed: int  # requests that ended in an error
    prompt_tokens_per_s: float  # of the requests that arrived (the demand, also when a queue grows)
    output_tokens_per_s: float  # of the requests that ended
    ttft_p50: float = 0.0
    ttft_p90: float = 0.0
    ttft_p99: float = 0.0
    itl_p50: float = 0.0  # mean time between tokens of a request, its percentiles over requests
    itl_p90: float = 0.0
    itl_p99: float = 0.0
    roles: dict[str, RoleWindow] = field(default_factory=dict)


class Planner:
    """Base class of planners. Class attributes are parameters (`--planner-arg NAME=VALUE`).

    Attributes:
        interval: seconds between two `plan` calls.
        cooldown: seconds a role keeps its size after a change (no flapping).
    """

    interval: float = 10.0
    cooldown: float = 30.0

    async def plan(self, cluster, window: Window) -> dict[str, int]:
        """The engines wanted per role (roles left out keep their size)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement plan()")

    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """The tunable class attributes (`--planner-arg NAME=VALUE`) and their defaults."""
        return class_parameters(cls)


_SHIPPED = Path(__file__).resolve().parents[2] / "planners"


def load_planner(spec: str | Path, args: Mapping[str, Any] | None = None) -> Planner:
    """A planner file (or a shipped name: "queue", "slo"), its parameters overridden by `args`."""
    path = Path(spec)
    if not path.is_file() and path.suffix == "" and "/" not in str(spec):
        try:
            import planners
            path = Path(planners.__file__).parent / f"{spec}.py"
        except ImportError:  # pragma: no cover
            path = _SHIPPED / f"{spec}.py"
    if not path.is_file():
        raise PlannerError(f"planner file {str(spec)!r} not found (a path to a .py file, or queue, slo)")
    cls = load_subclass(path, Planner, "planner", PlannerError)
    if not inspect.iscoroutinefunction(cls.plan):
        raise PlannerError(f"{cls.__name__}.plan must be `async def`")
    planner, params = cls(), cls.parameters()
    for key, value in (args or {}).items():
        if key not in params:
            raise PlannerError(f"{cls.__name__} has no parameter {key!r}; parameters: "
                               f"{', '.join(f'{k}={v!r}' for k, v in params.items())}")
        setattr(planner, key, convert(key, value, params[key], PlannerError))
    if not planner.interval > 0 or not planner.cooldown >= 0:
        raise PlannerError(f"{cls.__name__}: interval must be > 0 and cooldown >= 0")
    return planner


def parse_bounds(text: str) -> dict[str, tuple[int, int]]:
    """"prefill=1:4,decode=1:8" -> {"prefill": (1, 4), "decode": (1, 8)}."""
    out: dict[str, tuple[int, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, _, span = part.partition("=")
        lo, sep, hi = span.partition(":")
        if not role.strip() or not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
            raise PlannerError(f"bad --scale-bounds entry {part!r}: expected ROLE=MIN:MAX, e.g. decode=1:8")
        out[role.strip()] = (int(lo), int(hi))
    return out
