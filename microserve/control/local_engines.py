"""`LocalEngines`: the `microserve engine` subprocesses `launch` starts on this host (a `Provisioner`:
`ctl scale` and planners start and stop more).

    spawn_engines(model, {role: n}, args)   one subprocess per slot; returns when each printed READY
    stop_engines(procs)                     SIGTERM, then SIGKILL after a grace period

Each child gets `PR_SET_PDEATHSIG` (Linux), so it dies with the launcher even when that is SIGKILLed,
and `OMP_NUM_THREADS` of its share of the host's cores (`engine_threads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from microserve.control.provision import Names, Started

if TYPE_CHECKING:
    from microserve.router.cluster import Cluster

log = logging.getLogger("microserve.launch")


@dataclass
class EngineProcess:
    role: str
    engine_id: str
    proc: asyncio.subprocess.Process
    rpc: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def engine_threads(num_engines: int) -> int:
    """Intra-op threads per engine so that engines on one host do not oversubscribe its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, num_engines))


async def spawn_engines(model: str, layout: Mapping[str, int], engine_args: list[str],
                        ready_timeout: float = 300.0, names: Names | None = None) -> list[EngineProcess]:
    """Start one `microserve engine` per role slot; return when all printed READY (or raise)."""
    n = sum(layout.values())
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(engine_threads(n)))
    names = names or Names()
    procs: list[EngineProcess] = []
    for role, count in layout.items():
        for _ in range(count):
            eid = names.new(role)
            cmd = [sys.executable, "-m", "microserve", "engine", "--model", model, "--engine-id", eid,
                   "--rpc", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*", *engine_args]
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=subprocess.PIPE, stderr=None, env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            procs.append(EngineProcess(role, eid, proc))
    try:
        await asyncio.wait_for(asyncio.gather(*(_read_ready(p) for p in procs)), ready_timeout)
    except BaseException:
        await stop_engines(procs)
        raise
    return procs


async def _read_ready(p: EngineProcess) -> None:
    assert p.proc.stdout is not None
    while True:
        line = (await p.proc.stdout.readline()).decode()
        if not line:
            code = await p.proc.wait()
            raise RuntimeError(f"engine {p.engine_id} exited with code {code} before it was ready "
                               "(its error is printed above)")
        if line.startswith("READY "):
            p.fields = dict(part.split("=", 1) for part in line.split()[1:])
            p.rpc = p.fields["rpc"]
            return


async def stop_engines(procs: list[EngineProcess], grace: float = 15.0) -> None:
    for p in procs:
        if p.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.proc.wait(), grace)
        except TimeoutError:
            log.warning("engine %s did not stop within %gs; killing it", p.engine_id, grace)
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            await p.proc.wait()


class LocalEngines:
    """The engine subprocesses of `launch` (a `Provisioner`: `ctl scale` starts and stops more)."""

    def __init__(self, model: str, engine_args: list[str], procs: list[EngineProcess], names: Names) -> None:
        self.model, self.engine_args, self.procs, self.names = model, engine_args, procs, names
        self.cluster: Cluster | None = None
        self._stopping = False
        self._watchers: list[asyncio.Task] = []

    def attach(self, cluster: Cluster, url: str = "") -> None:
        self.cluster = cluster
        self._watchers += [asyncio.create_task(self._watch(p)) for p in self.procs]

    async def _watch(self, p: EngineProcess) -> None:
        assert p.proc.stdout is not None
        while await p.proc.stdout.readline():  # keep the pipe drained
            pass
        code = await p.proc.wait()
        if not self._stopping and p in self.procs and self.cluster is not None:
            log.error("engine %s exited with code %s; serving with the other engines", p.engine_id, code)
            with contextlib.suppress(KeyError):
                self.cluster.engine(p.engine_id).mark_down(f"the engine process exited with code {code}")

    async def start(self, role: str, count: int) -> list[Started]:
        new = await spawn_engines(self.model, {role: count}, self.engine_args, names=self.names)
        self.procs += new
        self._watchers += [asyncio.create_task(self._watch(p)) for p in new]
        return [Started(p.engine_id, p.rpc) for p in new]

    async def stop(self, engine_id: str) -> None:
        gone = [p for p in self.procs if p.engine_id == engine_id]
        self.procs = [p for p in self.procs if p.engine_id != engine_id]
        await stop_engines(gone)

    def owns(self, engine_id: str) -> bool:
        return any(p.engine_id == engine_id for p in self.procs)

    async def close(self) -> None:
        self._stopping = True
        await stop_engines(self.procs)
        for t in self._watchers:
            t.cancel()
