"""`RouterError` and the error classes the router's request loop acts on (codes: `serving.api.ErrorCode`)."""

from __future__ import annotations

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
