"""Virtual time for asyncio: an event loop whose clock jumps instead of waiting.

`VirtualTimeLoop` is a normal selector loop whose `time()` is a counter. When no
callback is ready, asyncio asks the selector to wait until the next timer; this
selector instead moves the clock forward by that much and returns at once. Everything
built on the loop's clock (`asyncio.sleep`, `wait_for`, `call_later`, timeouts) then
runs in virtual seconds, as fast as the CPU allows, and a run is deterministic.

There is no real I/O in a simulation: a loop left with nothing ready and no timer
would wait forever, so that raises `SimulationDeadlock` instead.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class SimulationDeadlock(RuntimeError):
    """Every task waits on something no timer or task will ever set."""


class _JumpSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None):
        if timeout is None:
            raise SimulationDeadlock("every task is waiting and no timer is pending")
        if timeout > 0:
            self._loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpSelector(self))

    def time(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` in virtual time (starts at 0.0)."""
    loop = VirtualTimeLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
