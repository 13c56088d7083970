"""Start real `microserve launch` / `microserve router` processes for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engines import read_ready, stop_process

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Deployment:
    proc: subprocess.Popen
    url: str
    engines: dict[str, str] = field(default_factory=dict)  # engine name -> rpc address
    ready: dict[str, str] = field(default_factory=dict)  # the fields of its READY line

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def children(self) -> list[int]:
        """PIDs of the processes this one started (its engines)."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(entry.name))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        return stop_process(self.proc, sig, timeout)


def _start(args: list[str], timeout: float, python: str | None = None, quiet: bool = False) -> Deployment:
    cmd = [python or sys.executable, "-m", "microserve", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True,
                            env=env, cwd=ROOT)
    fields = read_ready(proc, timeout)
    if fields is None:
        proc.kill()
        raise RuntimeError(f"{' '.join(args)} did not become ready (exit code {proc.poll()})")
    engines = dict(item.split("@", 1) for item in fields["engines"].split(","))
    return Deployment(proc, fields["url"], engines, fields)


def start_launch(*args: str, timeout: float = 180.0, python: str | None = None) -> Deployment:
    """`microserve launch --port 0 ARGS` (add --strategy, --model...); `python` runs it (and its engines)."""
    return _start(["launch", "--port", "0", *args], timeout, python)


def start_router(*args: str, timeout: float = 60.0, quiet: bool = False) -> Deployment:
    """`microserve router --port 0 ARGS` (add --strategy, --engine...); `quiet`: its stderr is dropped."""
    return _start(["router", "--port", "0", *args], timeout, quiet=quiet)
