"""What a hostile local process does without the cluster's key (tests and benchmarks/chaos.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class KVFlood:
    """Hold `count` idle TCP connections to each KV port in `endpoints` ("host:port"), opening a new
    one for every one the receiver closes, until `stop()`. Never sends a byte."""

    def __init__(self, endpoints: list[str], count: int = 300) -> None:
        self.targets = [(h.strip("[]"), int(p)) for h, _, p in (e.rpartition(":") for e in endpoints)]
        self.count, self.reconnects = count, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-flood", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        socks: list[list[socket.socket | None]] = [[None] * self.count for _ in self.targets]
        try:
            while not self._stop.is_set():
                for target, held in zip(self.targets, socks):
                    for i, sock in enumerate(held):
                        if sock is not None:
                            try:
                                if sock.recv(1) == b"":  # closed by the receiver
                                    sock.close()
                                    held[i] = None
                            except BlockingIOError:
                                continue
                            except OSError:
                                sock.close()
                                held[i] = None
                        with contextlib.suppress(OSError):
                            held[i] = socket.create_connection(target, timeout=1.0)
                            held[i].setblocking(False)
                            self.reconnects += 1
                time.sleep(0.02)
        finally:
            for held in socks:
                for sock in held:
                    if sock is not None:
                        sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> KVFlood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
