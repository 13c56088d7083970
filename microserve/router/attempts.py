"""One request on any cluster (real or simulated): `run_attempt` (one strategy run, aborts on every
engine it touched) and `run_request` (retries, failover mid-stream, moves off a draining engine,
deadline). `Router` (router/runtime.py) and `microserve sim` (sim/run.py) both run them.

    run_request ─> run_attempt(strategy) ─> chunks          an engine fails: run_attempt again, elsewhere
                └> run_attempt(Moved)    ─> chunks          its engine drains: the request moves with its KV
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from microserve.protocol import GenerateChunk, Request
from microserve.router.attempt_scope import Attempt, AvoidingCluster
from microserve.router.cluster import Cluster
from microserve.router.errors import RETRYABLE, RouterError
from microserve.router.handle import EngineCallError, EngineHandle, Evacuated
from microserve.router.migration import Moved, evacuation
from microserve.router.strategy import Strategy
from microserve.serving.api import ErrorCode

log = logging.getLogger(__name__)


async def run_attempt(strategy: Strategy, cluster: Cluster, req: Request, deadline: float | None = None,
                      avoid: frozenset[EngineHandle] = frozenset(), record: set[EngineHandle] | None = None,
                      generating: list[EngineHandle] | None = None) -> AsyncIterator[GenerateChunk]:
    """One run of `strategy.generate(req, cluster)`: its chunks, up to the one with a finish
    reason. Unless the engines finished it themselves, every engine the run touched gets an
    abort when it ends (error, deadline, the caller closing early, cancellation).

    `deadline` is in the loop's clock (`loop.time()`, virtual in the simulator); past it the
    attempt raises `RouterError(TIMEOUT)`. A strategy that ends without a finish reason raises
    `RouterError(STRATEGY_ERROR)`; engine failures raise `EngineCallError`. `least_loaded` passes
    over the engines in `avoid` while others of their role are live. The engines the attempt touched are
    added to `record` (the access log names them), the engines that generate it to `generating`. Ranges
    lent to the request (`lend`) are freed when the attempt ends, however it ends: the strategy need not
    (and a lost lender does not hold it up). The attempt's books travel as an `Attempt`
    (router/attempt_scope.py) that the handles find by request id."""
    attempt = cluster.attempts.open(Attempt(req.request_id, avoid, generating))
    touched = attempt.touched
    chunks = strategy.generate(req, AvoidingCluster(cluster, attempt.avoid) if avoid else cluster)
    clean = started = False  # clean: the engine itself finished the request: nothing left to abort
    try:
        while True:
            if deadline is None:  # NOTE: no extra coroutine frame per token on the common path
                chunk = await anext(chunks, None)
            else:
                chunk = await _next_chunk(chunks, deadline, req.request_id)
            if chunk is None:
                raise RouterError(ErrorCode.STRATEGY_ERROR, f"strategy {type(strategy).__name__} ended the stream "
                                  "without a finish reason")
            clean, started = chunk.finish_reason is not None, True
            yield chunk
            if clean:
                return
    finally:
        try:
            await chunks.aclose()
        finally:
            cluster.attempts.close(attempt)
        lenders = {h for h in touched if h.release(req.request_id)}
        if record is not None:
            record.update(touched)
        if not clean or lenders:
            abort_everywhere(req.request_id, lenders if clean else touched)
        if started:
            cluster.kv_waiters.freed()  # its blocks are freed (or being freed): a parked request may fit now


async def run_request(strategy: Strategy, cluster: Cluster, req: Request, *, max_retries: int = 0,
                      deadline: float | None = None, on_retry=None, on_move=None,
                      record: set[EngineHandle] | None = None,
                      generating: list[EngineHandle] | None = None) -> AsyncIterator[GenerateChunk]:
    """`run_attempt`, restarted (as `<id>~<n>`) when an engine fails with a `RETRYABLE` code, at
    most `max_retries` times. Before the first token the request starts over; after it, only an
    engine that died (`unavailable`, `timeout`) is failed over: the next attempt's prompt is the
    prompt plus the tokens streamed so far, with the rest of `max_tokens`, so the client's
    stream goes on without a gap or a repeat (greedy output is the same as without the failure).

    The failure is charged to the engine at fault (`_charge`: one that did not answer is marked
    down; one that answered is alive, but the peer it names may not be), and the retry prefers
    other engines. `on_retry(exc)` observes each restart; `record` collects every engine touched;
    `generating` the engines that generate it (the lead choice of `n`, router/choices.py)."""
    generated: list[int] = []
    avoid: set[EngineHandle] = set()
    attempt = moves = waits = 0
    move: Moved | None = None  # set when the engine streaming it is drained by migration
    while True:
        n = attempt + moves
        areq = req if n == 0 else req.continued(str(n), generated)
        current, move = move, None
        chunks = run_attempt(current or strategy, cluster, areq, deadline, frozenset(avoid), record, generating)
        try:
            async for chunk in chunks:
                if waits and not generated:
                    cluster.kv_waiters.freed()  # NOTE: a parked request got in: there may be room for the next
                generated += chunk.token_ids
                yield chunk
            return
        except EngineCallError as exc:
            move = evacuation(cluster, exc, allowed=bool(generated) and moves < 8)
            if move is not None:
                moves += 1
                if on_move is not None:
                    on_move()
                continue
            died = exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
            if attempt >= max_retries and await _wait_for_capacity(cluster, exc, generated, deadline, waits):
                waits += 1  # NOTE: every engine it tried is full: it waits its turn, as on one engine
                avoid.clear()
                attempt += 1
                continue
            if exc.code not in RETRYABLE or attempt >= max_retries or (generated and not died):
                raise
            log.warning("request %s: %s; %s on another engine", req.request_id, exc,
                        f"continuing after {len(generated)} tokens" if generated else "restarting it")
            culprit = None if isinstance(exc, Evacuated) else await _charge(cluster, exc)
            avoid.update(h for h in (culprit, _handle(cluster, exc.engine)) if h is not None)
            attempt += 1
            if on_retry is not None:
                on_retry(exc)
        finally:
            await chunks.aclose()
            if current is not None:
                current.release()


async def _wait_for_capacity(cluster: Cluster, exc: EngineCallError, generated: list[int], deadline: float | None,
                             waits: int) -> bool:
    """Whether to try again after waiting: an engine refused the request for want of KV blocks
    (OVERLOADED, e.g. a decode engine's prep_recv in PD) before its first token, its retries are spent,
    and the deadline leaves room. A single engine queues such a request until blocks free up; a
    cluster parks it (router/kv_wait.py) until a request ends or an engine joins, in arrival order (a
    request refused again after a wait keeps its place at the head), instead of failing it."""
    if exc.code is not ErrorCode.OVERLOADED or generated or deadline is None:
        return False
    refused_by = _handle(cluster, exc.engine)
    return await cluster.kv_waiters.wait(deadline, front=waits > 0,
                                         role=refused_by.role if refused_by is not None else None)


def _handle(cluster: Cluster, name: str) -> EngineHandle | None:
    try:
        return cluster.engine(name) if name else None
    except KeyError:
        return None


async def _charge(cluster: Cluster, exc: EngineCallError) -> EngineHandle | None:
    """The engine a failure is charged to (the retry avoids it). One whose RPC call got no answer
    is marked down (the health poll revives it when it answers again). One that answered is alive;
    the peer it names (a receiver whose KV port it could not reach, a lender that did not answer an
    attend) is checked over its own authenticated RPC channel before the retry, and marked down only
    if that fails too: whether a KV port takes connections (anyone can flood it) never decides
    liveness, and a strategy's next attempt does not pick a dead peer again."""
    if exc.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
        return None
    if exc.remote:
        culprit = _handle(cluster, exc.peer)
        if culprit is not None:
            await cluster.check(culprit)
        return culprit
    culprit = _handle(cluster, exc.engine)
    if culprit is not None:
        culprit.mark_down(str(exc))
    return culprit


async def _next_chunk(chunks: AsyncIterator[GenerateChunk], deadline: float | None,
                      rid: str) -> GenerateChunk | None:
    try:
        if deadline is None:
            return await chunks.__anext__()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        # NOTE: asyncio.timeout, not wait_for: on 3.11 wait_for returns a chunk that arrives as the task is
        # cancelled and swallows the cancel (a client's disconnect), so the request would run on to the end
        async with asyncio.timeout(remaining):
            return await chunks.__anext__()
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise RouterError(ErrorCode.TIMEOUT, f"request {rid} did not finish within its deadline") from None


_CLEANUP: set[asyncio.Future] = set()


def abort_everywhere(request_id: str, engines: set[EngineHandle]) -> None:
    """Abort on every engine of `engines`, in the background (also when the caller is cancelled);
    an engine that is down gets it when it answers again."""
    for h in engines:
        if not h.alive:
            h.abort_when_back(request_id)
    engines = {h for h in engines if h.alive}
    if not engines:
        return

    async def run() -> None:
        await asyncio.gather(*(h.abort(request_id, timeout=5.0) for h in engines), return_exceptions=True)

    task = asyncio.ensure_future(run())
    _CLEANUP.add(task)
    task.add_done_callback(_CLEANUP.discard)
