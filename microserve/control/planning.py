"""`Planning`: a planner (control/planner.py) run against a live deployment (`launch --planner FILE`,
`PUT /admin/planner`) or, with the same code, in the simulator's virtual time (sim/planning.py).

    every `interval`: measure() ─> Window ─> planner.plan(cluster, window) ─> check() (bounds, unknown
    roles, garbage) ─> cooldown ─> a change per role, in the background:
        more:  provision.grow (start engines; they count as `starting` until they serve)
        fewer: provision.shrink (drain by migration, then stop), once no change of the role is in flight

The planner keeps deciding every interval while engines start (a minute or more) or drain: a role may
grow again while its last engines start; it shrinks only when nothing of it is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from microserve.control.planner import DEFAULT_MAX, Planner, RoleWindow, Window

log = logging.getLogger("microserve.planner")


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
        self._changes: dict[str, set[asyncio.Task]] = {}  # role -> its changes in flight
        self._starting: dict[str, int] = {}  # role -> engines asked for that do not serve yet

    def start(self) -> None:
        self._last = _now()
        self.router.recorder.take()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *(t for ts in self._changes.values() for t in ts)) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
                sum(s.kv_usage for s in stats) / max(1, len(stats)),
                sum(rates), capacity, sum(1 for e in ended if role in e[0]) / seconds, bool(measured), refused,
                cluster.kv_waiters.parked(role), self._starting.get(role, 0))
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
            have = (len(cluster.engines(role)) if role in cluster.roles else 0) + self._starting.get(role, 0)
            if n == have:
                continue
            if n < have and self._changes.get(role):
                notes.append(f"{role}: {have} -> {n} waits for the change in flight")
                continue
            if now - self._changed.get(role, -math.inf) < planner.cooldown:
                notes.append(f"{role}: {have} -> {n} waits for the cooldown ({planner.cooldown:g}s)")
                continue
            changes[role] = (have, n)
        record.update(want={str(k): v for k, v in want.items()} if isinstance(want, Mapping) else repr(want),
                      notes=notes, applied={role: n for role, (_, n) in changes.items()})
        for note in notes:
            log.warning("planner %s: %s", type(planner).__name__, note)
        for role, (have, n) in changes.items():
            self._changed[role] = now
            self.router.metrics.planner_decisions.labels(role, "up" if n > have else "down").inc()
            log.info("planner %s: %s %d -> %d engines", type(planner).__name__, role, have, n)
            task = asyncio.ensure_future(self._change(role, have, n, record))
            self._changes.setdefault(role, set()).add(task)
            task.add_done_callback(self._changes[role].discard)
        record["engines"] = {role: len(cluster.engines(role)) for role in cluster.roles}
        self.decisions.append(record)
        return record

    async def _change(self, role: str, have: int, n: int, record: dict) -> None:
        """One role's change, in the background: grow by `n - have` (they count as starting until they
        serve), or shrink to `n` serving engines. A failure is logged and noted in the decision's record;
        the cluster keeps the engines it has."""
        from microserve.control.provision import grow, shrink

        try:
            if n > have:
                self._starting[role] = self._starting.get(role, 0) + n - have
                try:
                    await grow(self.router, self.engines, role, n - have)
                finally:
                    self._starting[role] -= n - have
            else:
                await shrink(self.router, self.engines, role, n)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NOTE: a start that failed, a role the strategy needs: logged, shape kept
            log.warning("planner: scaling %s to %d failed: %s", role, n, exc)
            record["error"] = f"scale {role}: {exc}"

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
