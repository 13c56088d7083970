"""What one attempt of a request (one strategy run, `attempts.run_attempt`) touches and may use, passed
down explicitly instead of through context variables.

    run_attempt ── Attempt(request id, avoid, generating) ──> cluster.attempts (by request id)
        strategy.generate(req, cluster or AvoidingCluster)
            handle.start_generate(req) / prep_recv / remote_send / lend / abort
                └─ cluster.attempts.of(req.request_id).touched.add(handle)

A handle finds the attempt of a call by the call's request id: the attempt's own, or one derived from it
(`Request.continued`: `<id>~<tag>`, a move inside the strategy) belongs to it. The engines an attempt
touched get an abort when it ends early; a retried attempt's strategy sees the cluster through
`AvoidingCluster`, whose `least_loaded` passes over the engines the request failed on; the lead choice
of `n` records the engines that generate it (`generating`, router/choices.py).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microserve.router.cluster import Cluster
    from microserve.router.handle import EngineHandle

__all__ = ["Attempt", "AttemptRegistry", "AvoidingCluster"]


class Attempt:
    """One strategy run of one request."""

    __slots__ = ("avoid", "generating", "request_id", "touched")

    def __init__(self, request_id: str, avoid: Collection[EngineHandle] = (),
                 generating: list[EngineHandle] | None = None) -> None:
        self.request_id = request_id
        self.touched: set[EngineHandle] = set()  # every engine a call of this attempt went to
        self.avoid = frozenset(avoid)  # engines earlier attempts failed on: `least_loaded` passes over them
        self.generating = generating  # the lead choice of `n`: the engines its start_generate calls went to


class AttemptRegistry:
    """The attempts running on one cluster, by request id (every handle of the cluster holds it)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Attempt] = {}

    def open(self, attempt: Attempt) -> Attempt:
        self._by_id[attempt.request_id] = attempt
        return attempt

    def close(self, attempt: Attempt) -> None:
        if self._by_id.get(attempt.request_id) is attempt:
            del self._by_id[attempt.request_id]

    def of(self, request_id: str) -> Attempt | None:
        """The attempt a call with this request id belongs to (its own id, or one derived from it)."""
        while True:
            attempt = self._by_id.get(request_id)
            if attempt is not None or "~" not in request_id:
                return attempt
            request_id = request_id.rsplit("~", 1)[0]

    def __len__(self) -> int:
        return len(self._by_id)


class AvoidingCluster:
    """The cluster as a retried attempt's strategy sees it: `least_loaded` passes over the engines in
    `avoid` while another engine of the role is live; everything else is the cluster's own."""

    def __init__(self, cluster: Cluster, avoid: frozenset[EngineHandle]) -> None:
        self._cluster, self._avoid = cluster, avoid

    def least_loaded(self, role: str | None = None, exclude: Collection[EngineHandle] = ()) -> EngineHandle:
        return self._cluster.least_loaded(role, exclude, avoid=self._avoid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster, name)
