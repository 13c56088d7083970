"""Start real `microserve engine` processes for tests and benchmarks."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send `sig`, wait up to `timeout` seconds, then SIGKILL; the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class EngineProc:
    proc: subprocess.Popen
    rpc: str
    events: str
    kv: str
    engine_id: str
    transports: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 15.0) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def ensure_cluster_key() -> str:
    """The cluster key file of this process's engines and handles: `$MICROSERVE_CLUSTER_KEY`,
    or a fresh key in a private temporary directory that this call puts there."""
    from microserve.security import ENV, ClusterKey

    if not os.environ.get(ENV):
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="microserve-test-key-")) / "cluster.key"
        os.environ[ENV] = str(ClusterKey.generate().write(path))
    return os.environ[ENV]


def start_engine(model: str, *args: str, engine_id: str | None = None, python: str | None = None) -> subprocess.Popen:
    """Start `microserve engine --model MODEL ARGS` (use `wait_engine` for its READY line), with
    the cluster key of `ensure_cluster_key` (benchmarks and tests share this helper)."""
    ensure_cluster_key()
    cmd = [python or sys.executable, "-m", "microserve", "engine", "--model", str(model), *args]
    if engine_id:
        cmd += ["--engine-id", engine_id]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)


def read_ready(proc: subprocess.Popen, timeout: float = 120.0) -> dict[str, str] | None:
    """Fields of the process's `READY k=v ...` stdout line (None if it exits or times out first)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if proc.poll() is not None:
                return None
            continue
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith("READY "):
            return dict(part.split("=", 1) for part in line.split()[1:])
    return None


def wait_engine(proc: subprocess.Popen, timeout: float = 120.0) -> EngineProc:
    kv = read_ready(proc, timeout)
    if kv is None:
        proc.kill()
        raise RuntimeError(f"engine {proc.args} did not become ready (exit code {proc.poll()})")
    return EngineProc(proc, kv["rpc"], kv["events"], kv["kv"], kv["engine"], kv["transports"].split(","))


def spawn_engine(model: str, *args: str, engine_id: str | None = None, timeout: float = 120.0,
                 python: str | None = None) -> EngineProc:
    return wait_engine(start_engine(model, *args, engine_id=engine_id, python=python), timeout)


async def collect(stream):
    """The token ids of a `start_generate` stream and its last chunk."""
    tokens, last = [], None
    async for chunk in stream:
        tokens += chunk.token_ids
        last = chunk
    return tokens, last
