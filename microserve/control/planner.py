"""Planners: the cluster sizes itself (DESIGN.md, "Planner"; docs/planner.md).

A planner file holds one `Planner` subclass. Every `interval` seconds its `plan(cluster, window)`
says how many engines each role should have; `Planning` checks the answer (bounds, cooldown) and
applies it through the deployment's provisioner, as `ctl scale` does (scale up starts engines,
scale down drains them by migration, so no request fails):

    router ─ each request's end ─> Recorder ─┐
    cluster's polled engine stats ───────────┴─> Window ─> planner.plan ─> {role: n}
        ─> clamped to --scale-bounds, unknown roles and garbage dropped, cooldown ─> provision.scale

A planner that raises, hangs past its interval or answers garbage is logged and ignored: the
cluster keeps its shape and serves on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    values = sorted(values)
    at = [values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] for q in (0.5, 0.9, 0.99)]
    return at[0], at[1], at[2]


class Planning:
    """Runs a planner against a live deployment (`launch --planner FILE`).

    Args:
        router: the router (its cluster, strategy, metrics and `recorder`).
        engines: the deployment's provisioner (control/provision.py).
        planner: the loaded planner; `source` and `args` say where it came from (`GET /admin/planner`).
        bounds: `{role: (min, max)}` (`--scale-bounds`); a strategy role without one gets 1:DEFAULT_MAX.
    """

    def __init__(self, router, engines, planner: Planner, bounds: Mapping[str, tuple[int, int]] | None = None,
                 source: str = "", args: Mapping[str, Any] | None = None) -> None:
        self.router, self.engines, self.bounds = router, engines, dict(bounds or {})
        self.planner, self.source, self.args = planner, source, dict(args or {})
        self.decisions: deque[dict] = deque(maxlen=100)
        self._changed: dict[str, float] = {}  # role -> the loop's time of its last change
        self._computed: dict[Any, tuple[int, float, int]] = {}  # engine -> (computed tokens, busy s, KV refusals)
        self._capacity: dict[str, float] = {}  # role -> the most one engine computed per second
        self._saturated: dict[str, deque[tuple[float, float]]] = {}  # role -> (tokens, s) of queued intervals
        self._busy: dict[str, deque[tuple[float, float]]] = {}  # role -> (tokens, busy s) of the last intervals
        self._last = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._last = _now()
        self.router.recorder.take()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def swap(self, planner: Planner, source: str, args: Mapping[str, Any]) -> None:
        """A new planner from the next interval on (`PUT /admin/planner`)."""
        self.planner, self.source, self.args = planner, source, dict(args)

    def bound(self, role: str) -> tuple[int, int] | None:
        if role in self.bounds:
            return self.bounds[role]
        return (1, DEFAULT_MAX) if role in type(self.router.strategy).roles else None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.planner.interval)
            try:
                await self.step()
            except Exception:  # NOTE: a failed step (a start that failed, a bug) never ends the planning
                log.exception("planner step failed; the cluster keeps its shape")

    def measure(self) -> Window:
        """The window since the last one (and start a new one)."""
        now = _now()
        seconds, self._last = max(now - self._last, 1e-9), now
        (arrivals, arrived_tokens), ended = self.router.recorder.take()
        ok = [e for e in ended if e[1]]
        ttft = _percentiles([e[4] for e in ok if e[4] is not None])
        itl = _percentiles([(e[5] - e[4]) / (e[3] - 1) for e in ok if e[4] is not None and e[3] > 1])
        window = Window(seconds, arrivals / seconds, len(ok), len(ended) - len(ok),
                        arrived_tokens / seconds, sum(e[3] for e in ended) / seconds, *ttft, *itl)
        cluster = self.router.cluster
        for h in [h for h in self._computed if h not in cluster.handles]:  # NOTE: engines that left
            del self._computed[h]
        for role in cluster.roles:
            handles = cluster.engines(role)
            polled = [(h, s) for h in handles if (s := cluster.load(h).stats) is not None]
            stats = [s for _, s in polled]
            rates, refused, saturated = [], 0, self._saturated.setdefault(role, deque(maxlen=20))
            busy = self._busy.setdefault(role, deque(maxlen=20))
            for h, s in polled:
                before = self._computed.get(h)
                self._computed[h] = (s.computed_tokens_total, s.busy_seconds, s.kv_refusals)
                tokens, spent = (s.computed_tokens_total - before[0], s.busy_seconds - before[1]) if before \
                    else (0, 0.0)
                refused += max(0, s.kv_refusals - before[2]) if before else s.kv_refusals
                rates.append(max(0, tokens) / seconds)
                if spent > 0 and tokens > 0:
                    busy.append((tokens, spent))
                if before is not None and s.waiting > 0:  # NOTE: busy all along: its rate is its capacity
                    saturated.append((tokens, seconds))
            self._capacity[role] = max([self._capacity.get(role, 0.0), *rates])
            measured = busy or saturated
            capacity = sum(t for t, _ in measured) / sum(s for _, s in measured) if measured \
                else self._capacity[role]
            window.roles[role] = RoleWindow(
                len(handles), sum(s.running for s in stats), sum(s.waiting for s in stats),
                sum(s.queued_tokens for s in stats),
                sum((s.kv_blocks_used - s.kv_blocks_cached) / max(1, s.kv_blocks_total) for s in stats)
                / max(1, len(stats)),
                sum(rates), capacity, sum(1 for e in ended if role in e[0]) / seconds, bool(measured), refused)
        return window

    def check(self, want: Any) -> tuple[dict[str, int], list[str]]:
        """The planner's answer made safe: per role an integer within its bounds; what was changed or
        dropped, as notes."""
        if not isinstance(want, Mapping):
            return {}, [f"plan returned {type(want).__name__}, not a dict of role -> engines: ignored"]
        out, notes = {}, []
        for role, n in want.items():
            bounds = self.bound(role) if isinstance(role, str) else None
            if bounds is None:
                notes.append(f"unknown role {role!r}: ignored")
                continue
            if isinstance(n, bool) or not isinstance(n, int | float) or not float(n).is_integer():
                notes.append(f"{role}={n!r} is not an engine count: ignored")
                continue
            clamped = min(max(int(n), bounds[0]), bounds[1])
            if clamped != n:
                notes.append(f"{role}={n} clamped to {clamped} (bounds {bounds[0]}:{bounds[1]})")
            out[role] = clamped
        return out, notes

    async def step(self) -> dict:
        """One decision: measure, plan, check, apply. Returns the decision's record."""
        window = self.measure()
        cluster, planner = self.router.cluster, self.planner
        record: dict[str, Any] = {"time": round(time.time(), 3), "t": round(_now(), 3),
                                  "planner": type(planner).__name__, "window": _summary(window)}
        try:
            want = await asyncio.wait_for(planner.plan(cluster, window), planner.interval)
        except Exception as exc:
            log.warning("planner %s failed (%s: %s); ignored", type(planner).__name__, type(exc).__name__, exc)
            record.update(error=f"{type(exc).__name__}: {exc}", applied={},
                          engines={role: len(cluster.engines(role)) for role in cluster.roles})
            self.decisions.append(record)
            return record
        targets, notes = self.check(want)
        now, changes = _now(), {}
        for role, n in targets.items():
            have = len(cluster.engines(role)) if role in cluster.roles else 0
            if n == have:
                continue
            if now - self._changed.get(role, -math.inf) < planner.cooldown:
                notes.append(f"{role}: {have} -> {n} waits for the cooldown ({planner.cooldown:g}s)")
                continue
            changes[role] = (have, n)
        record.update(want={str(k): v for k, v in want.items()} if isinstance(want, Mapping) else repr(want),
                      notes=notes, applied={})
        for note in notes:
            log.warning("planner %s: %s", type(planner).__name__, note)
        if changes:
            await self._apply(changes, record)
        record["engines"] = {role: len(cluster.engines(role)) for role in cluster.roles}
        self.decisions.append(record)
        return record

    async def _apply(self, changes: dict[str, tuple[int, int]], record: dict) -> None:
        from microserve.control.provision import scale

        try:
            await scale(self.router, self.engines, {role: n for role, (_, n) in changes.items()})
        except Exception as exc:  # NOTE: a start that failed, a role the strategy needs: logged, shape kept
            log.warning("planner: scaling %s failed: %s", changes, exc)
            record["error"] = f"scale: {exc}"
            return
        now = _now()
        for role, (have, n) in changes.items():
            self._changed[role] = now
            self.router.metrics.planner_decisions.labels(role, "up" if n > have else "down").inc()
            log.info("planner %s: %s %d -> %d engines", type(self.planner).__name__, role, have, n)
        record["applied"] = {role: n for role, (_, n) in changes.items()}

    def describe(self) -> dict:
        p = self.planner
        return {"name": type(p).__name__, "source": self.source,
                "args": {k: getattr(p, k) for k in type(p).parameters()},
                "bounds": {r: list(self.bound(r) or ()) for r in self.router.cluster.roles if self.bound(r)},
                "decisions": list(self.decisions)[::-1]}


def _now() -> float:
    """The event loop's clock: monotonic live, virtual in `microserve sim`."""
    return asyncio.get_running_loop().time()


def _summary(window: Window) -> dict:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(window).items() if k != "roles"}
    out["roles"] = {r: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(w).items()}
                    for r, w in window.roles.items()}
    return out
