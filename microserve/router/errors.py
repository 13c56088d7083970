"""`RouterError`, an engine call's errors (`EngineCallError`, `Evacuated`, `EngineTimeout`) and the classes of
codes the router's request loop acts on (codes: `serving.api.ErrorCode`)."""

from __future__ import annotations

from typing import Any

from microserve.serving.api import ErrorCode

# engine failures worth restarting the request elsewhere (`attempts.run_request`)
RETRYABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.INTERNAL, ErrorCode.TRANSFER_FAILED,
                       ErrorCode.OVERLOADED})
# refusals for lack of capacity: counted as `rejected`, not `error`, when nothing was streamed
NO_CAPACITY = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED, ErrorCode.TOO_MANY_REQUESTS})


class RouterError(Exception):
    """A request the router refuses or cannot finish. `code` says why; the gateway maps it to an
    HTTP status (`gateway.app.HTTP_STATUS`)."""

    def __init__(self, code: ErrorCode | str, message: str, *, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.retry_after = ErrorCode.of(code), message, param, retry_after


class EngineCallError(RuntimeError):
    """A call failed. `remote`: the engine answered with this error (so it is alive; `peer`, if
    set, names another engine the failure is charged to, e.g. a receiver it could not reach);
    otherwise the handle gave up on it (no answer in time, marked down)."""

    def __init__(self, code: ErrorCode | str, message: str, engine: str = "", *, peer: str = "",
                 remote: bool = False) -> None:
        super().__init__(f"[{code}] {message}" + (f" (engine {engine})" if engine else ""))
        self.code, self.message, self.engine = ErrorCode.of(code), message, engine
        self.peer, self.remote = peer, remote


class Evacuated(EngineCallError):
    """The engine is being drained by migration: its stream stops after a chunk, and the router moves
    the request with its KV to another engine (`attempts.run_request`). Code "unavailable", so code that
    does not know it restarts the request elsewhere instead."""

    def __init__(self, handle: Any) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "the engine is draining: the request moves to another engine",
                         handle.name)
        self.handle = handle  # its `moving` count includes this request until the move takes it over


class EngineTimeout(EngineCallError):
    """The engine did not answer within the call's deadline (dead, wedged or overloaded)."""

    def __init__(self, message: str, engine: str = "") -> None:
        super().__init__(ErrorCode.TIMEOUT, message, engine)
