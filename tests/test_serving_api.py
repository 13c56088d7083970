"""The call layer's contract: one interface (`EngineAPI`) that every backend implements through
one base class, one dispatch point, one error-code enum and one code -> HTTP table; and the
simulator runs the router's own request loop (`run_request`: retries, deadlines, aborts)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from microserve import protocol
from microserve.engine.config import EngineConfig
from microserve.router.handle import EngineCallError
from microserve.router.kv_wait import HEAD_POLL_S
from microserve.router.runtime import RouterError, run_request
from microserve.router.strategy import Strategy
from microserve.sampling_params import SamplingParams
from microserve.serving.api import EngineAPI, EngineError, ErrorCode, dispatch
from microserve.serving.backend import Backend
from microserve.sim import clock
from microserve.sim.cluster import build_cluster
from microserve.sim.costs import CostModel, load_gpu, load_link, load_model
from microserve.sim.run import SimRequest, engine_report, simulate

COST = CostModel(load_model("llama-3.1-8b"), load_gpu("h100"))
CONFIG = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256, num_kv_blocks=256)
CALLS = [name for name, fn in inspect.getmembers(EngineAPI) if not name.startswith("_") and callable(fn)]


def test_every_call_is_documented_with_its_caller_and_errors():
    assert set(CALLS) == {"prep_recv", "remote_send", "start_generate", "lend", "attend", "abort", "stats", "health",
                          "kv_snapshot", "lora"}
    for name in CALLS:
        doc = inspect.getdoc(getattr(EngineAPI, name)) or ""
        assert "Called by" in doc, f"EngineAPI.{name} does not say who calls it"
    for name in ("prep_recv", "remote_send", "start_generate", "lora"):
        assert "Raises" in inspect.getdoc(getattr(EngineAPI, name)), name


@pytest.mark.parametrize("backend", ["microserve.serving.builtin:BuiltinBackend",
                                     "microserve.serving.vllm.engine:VLLMBackend",
                                     "microserve.sim.service:SimBackend"])
def test_every_backend_implements_the_whole_contract_and_no_call(backend):
    import importlib

    module, name = backend.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # pragma: no cover - vLLM's module needs only torch to import
        pytest.fail(f"{backend} does not import: {exc}")
    assert issubclass(cls, Backend) and not cls.__abstractmethods__
    for call in CALLS:  # the calls live in the one service; a backend implements the contract, never a call
        assert not hasattr(cls, call), f"{name} has the call {call}"


def test_a_backend_that_misses_a_method_fails_when_it_is_built():
    """No method of the contract has a silent default: forgetting one (say `release_ticket`, which
    would leak blocks) is a TypeError at construction, naming it."""
    from microserve.sim.service import SimBackend

    methods = sorted(Backend.__abstractmethods__)
    assert len(methods) >= 20 and "release_ticket" in methods and "abort_request" in methods
    for name in methods:
        doc = inspect.getdoc(getattr(Backend, name)) or ""
        assert len(doc) > 20, f"Backend.{name} is not documented"
    partial = type("Partial", (Backend,), {m: getattr(SimBackend, m) for m in methods if m != "release_ticket"})
    with pytest.raises(TypeError, match="release_ticket"):
        partial()


def test_error_codes_are_one_enum_and_the_gateway_maps_every_one():
    from microserve.gateway.app import HTTP_STATUS

    assert set(HTTP_STATUS) == set(ErrorCode)
    assert ErrorCode.BAD_REQUEST == "bad_request" and f"{ErrorCode.TIMEOUT}" == "timeout"
    assert EngineError("overloaded", "x").code is ErrorCode.OVERLOADED
    assert EngineError("a-code-from-a-newer-peer", "x").code is ErrorCode.INTERNAL
    assert RouterError("unavailable", "x").code is ErrorCode.UNAVAILABLE
    # the wire keeps plain strings: an RPCError with an enum code decodes to the same string
    reply = protocol.decode_reply(protocol.encode(protocol.RPCError(ErrorCode.KV_SPEC_MISMATCH, "m")))
    assert isinstance(reply, protocol.RPCError) and reply.code == "kv_spec_mismatch"


def one_engine():
    cluster = build_cluster({"engine": 1}, COST, load_link("nvlink"), CONFIG)
    return cluster, cluster.servers[0]


def test_dispatch_is_the_one_entry_and_errors_cross_the_in_process_transport():
    async def go():
        cluster, service = one_engine()
        await cluster.start()
        try:
            assert isinstance(service, EngineAPI)
            health = await dispatch(service, protocol.Health())
            assert isinstance(health, protocol.HealthReply) and health.engine_id == service.engine_id
            with pytest.raises(EngineError) as err:
                await dispatch(service, protocol.PrepRecv(protocol.Request("r", [1, 2, 3]), 2, lease_s=-1))
            assert err.value.code is ErrorCode.BAD_REQUEST and "lease_s" in str(err.value)
            with pytest.raises(EngineError) as err:
                await dispatch(service, object())  # type: ignore[arg-type]
            assert err.value.code is ErrorCode.BAD_REQUEST
            # the same failure through a handle: one translation, the code intact
            (h,) = cluster.handles
            with pytest.raises(EngineCallError) as call_err:
                await h.prep_recv(protocol.Request("r2", []), 0)
            assert call_err.value.code is ErrorCode.BAD_REQUEST and call_err.value.engine == h.name
            with pytest.raises(EngineCallError, match="lend: the simulator") as call_err:  # DistAttention
                await h.lend(protocol.Request("r4", list(range(64))), 0, 32)
            assert call_err.value.code is ErrorCode.BAD_REQUEST
            held = await h.prep_recv(protocol.Request("r5", list(range(64))), 32)
            with pytest.raises(EngineCallError, match=r"start_generate\(lenders=...\): the simulator") as call_err:
                lenders = [protocol.LendTicket(held.kv, "x")]
                async for _ in h.start_generate(protocol.Request("r6", list(range(64))), lenders=lenders):
                    pass
            assert call_err.value.code is ErrorCode.BAD_REQUEST
            assert await h.abort("r5")
            stream = h.start_generate(protocol.Request("r3", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))
            chunks = [c async for c in stream]
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish_reason == "length"
            snap = await dispatch(service, protocol.KVSnapshot())
            assert isinstance(snap, protocol.KVSnapshotReply) and snap.seq >= 0
        finally:
            await cluster.close()

    clock.run(go())


def test_a_ticket_whose_kv_never_comes_is_closed_at_the_transfer_timeout_and_the_prompt_computed_here():
    """A sender that died before it connected looks like a transfer that never ends: at the transfer
    timeout the receiver closes the ticket and computes the prompt itself, as after a failed transfer."""
    async def go():
        cluster, service = one_engine()
        await cluster.start()
        try:
            (h,) = cluster.handles
            req = protocol.Request("late", list(range(64)), SamplingParams(max_tokens=3, ignore_eos=True))
            await h.prep_recv(req, 64)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            chunks = [c async for c in h.start_generate(req, begin=64)]
            assert loop.time() - t0 >= service.transfer_timeout  # NOTE: virtual time: it waited for the KV first
            assert sum(len(c.token_ids) for c in chunks) == 3 and chunks[-1].finish_reason == "length"
            stats = await h.stats()
            assert stats.open_tickets == 0 and stats.kv_blocks_used == stats.kv_blocks_cached
        finally:
            await cluster.close()

    clock.run(go())


class FailsFirst(Strategy):
    """Every first attempt fails as an overloaded engine would; the retry succeeds."""

    roles = {"engine": 1}  # noqa: RUF012 (the documented strategy style)

    async def generate(self, req, cluster):
        h = cluster.least_loaded("engine")
        if "~" not in req.request_id:
            await h.prep_recv(req, end=len(req.prompt_ids) - 1)  # holds blocks: the abort must free them
            raise EngineCallError(ErrorCode.OVERLOADED, "no blocks (simulated)", h.name)
        async for chunk in h.start_generate(req):
            yield chunk


def test_the_simulator_runs_the_routers_retry_loop():
    reqs = [SimRequest(list(range(1, 200)), 4) for _ in range(3)]
    cluster = build_cluster({"engine": 1}, COST, load_link("nvlink"), CONFIG)
    results, _ = clock.run(simulate(FailsFirst(), cluster, reqs, None, 1, 0))
    assert all(r.ok and r.output_tokens == 4 for r in results), [r.error for r in results]
    (engine,) = engine_report(cluster)
    # the failed attempts' tickets were aborted: every used block is a prefix-cache block
    assert engine["open_tickets"] == 0 and engine["kv_blocks_used"] == engine["kv_blocks_cached"]


class AvoidsWhatFailed(Strategy):
    """The first attempt fails on the engine it picked; the retry's picks pass over that engine, and its
    calls (one from a spawned task, under a derived request id) are recorded in the retry's attempt."""

    roles = {"engine": 2}  # noqa: RUF012 (the documented strategy style)

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}
        self.retried: dict[str, list[str]] = {}
        self.open_attempts: list[int] = []
        self.probes_recorded: list[bool] = []

    async def generate(self, req, cluster):
        base = req.request_id.split("~")[0]
        h = cluster.least_loaded("engine")
        if "~" not in req.request_id:
            await h.prep_recv(req, end=len(req.prompt_ids) - 1)  # touched: the abort must free its blocks
            self.failed[base] = h.name
            raise EngineCallError(ErrorCode.OVERLOADED, "no blocks (simulated)", h.name)
        picks = [h, *[cluster.least_loaded("engine") for _ in range(3)]]
        self.retried[base] = [p.name for p in picks]
        self.open_attempts.append(len(cluster.attempts))
        other = next(e for e in cluster.engines("engine") if e is not h)
        moved = req.continued("probe", [])  # a derived id belongs to this attempt too, from a spawned task too
        await asyncio.ensure_future(other.prep_recv(moved, end=len(moved.prompt_ids) - 1))
        attempt = cluster.attempts.of(moved.request_id)
        self.probes_recorded.append(attempt is cluster.attempts.of(req.request_id) and other in attempt.touched)
        await other.abort(moved.request_id)
        async for chunk in h.start_generate(req):
            yield chunk


def test_a_retry_passes_over_the_engine_that_failed_and_aborts_what_it_touched():
    strategy = AvoidsWhatFailed()
    reqs = [SimRequest(list(range(1, 200)), 4) for _ in range(4)]
    cluster = build_cluster({"engine": 2}, COST, load_link("nvlink"), CONFIG)
    results, _ = clock.run(simulate(strategy, cluster, reqs, None, 1, 0))
    assert all(r.ok and r.output_tokens == 4 for r in results), [r.error for r in results]
    assert len(strategy.retried) == 4 and all(n >= 1 for n in strategy.open_attempts)
    assert strategy.probes_recorded == [True] * 4
    for base, picks in strategy.retried.items():
        assert strategy.failed[base] not in picks, (base, strategy.failed[base], picks)
    assert len(cluster.attempts) == 0  # every attempt closed
    for engine in engine_report(cluster):  # the failed attempts' tickets were aborted
        assert engine["open_tickets"] == 0 and engine["kv_blocks_used"] == engine["kv_blocks_cached"]


class OneAtATime(Strategy):
    """Refuses a request for want of KV blocks (as a full decode engine refuses prep_recv) while another
    is running; counts its attempts."""

    roles = {"engine": 1}  # noqa: RUF012 (the documented strategy style)

    def __init__(self) -> None:
        self.running, self.attempts = 0, 0

    async def generate(self, req, cluster):
        self.attempts += 1
        h = cluster.least_loaded("engine")
        if self.running:
            raise EngineCallError(ErrorCode.OVERLOADED, "not enough free KV blocks (simulated)", h.name)
        self.running += 1
        try:
            async for chunk in h.start_generate(req):
                yield chunk
        finally:
            self.running -= 1


def test_a_request_refused_for_want_of_kv_is_parked_until_blocks_free():
    """Three requests, room for one at a time, max_retries 2: the other two are parked (router/kv_wait.py)
    and each starts when the one before it ends, in arrival order, not failed and not polling: a handful
    of attempts, where retrying on a timer would take one per pause. Without a deadline to wait against,
    the refusal reaches the client as before."""
    reqs = [SimRequest(list(range(1, 100)), 400) for _ in range(3)]
    cluster = build_cluster({"engine": 1}, COST, load_link("nvlink"), CONFIG)
    strategy = OneAtATime()
    results, total = clock.run(simulate(strategy, cluster, reqs, None, 3, 0))
    assert all(r.ok and r.output_tokens == 400 for r in results), [r.error for r in results]
    first, second, third = sorted(results, key=lambda r: r.start + r.ttft)
    end = first.start + first.e2e
    assert end <= second.start + second.ttft < end + 0.05  # NOTE: virtual time: woken as the first ended
    assert second.start + second.e2e <= third.start + third.ttft < second.start + second.e2e + 0.05
    # each: a first try, the two parked ones their 2 retries and one wake; the head's rescue poll at most
    # every HEAD_POLL_S (a 1 s retry timer would have made some 20 attempts)
    assert strategy.attempts <= 3 + 2 * 2 + 2 + int(total / HEAD_POLL_S), (strategy.attempts, total)

    async def no_deadline():
        cluster, _ = one_engine()
        await cluster.start()
        try:
            busy = OneAtATime()
            busy.running = 1
            req = protocol.Request("r", list(range(1, 50)), SamplingParams(max_tokens=2))
            with pytest.raises(EngineCallError) as err:
                async for _ in run_request(busy, cluster, req, max_retries=2):
                    pass
            assert err.value.code is ErrorCode.OVERLOADED
        finally:
            await cluster.close()

    clock.run(no_deadline())


def test_kv_waiters_wake_in_arrival_order_and_count_by_role():
    """The queue itself (virtual time): `freed` wakes the longest waiting, `joined` every one, a deadline
    ends a wait unwoken; `parked(role)` is what a planner's window reads."""
    from microserve.router.kv_wait import KVWaiters

    async def go():
        q, loop, woke = KVWaiters(), asyncio.get_running_loop(), []

        async def park(name, role, deadline=1000.0):
            woke.append((name, await q.wait(loop.time() + deadline, role=role)))

        tasks = [asyncio.create_task(park(n, r)) for n, r in (("a", "decode"), ("b", "decode"), ("c", "prefill"))]
        await asyncio.sleep(0.01)
        assert (q.parked(), q.parked("decode"), q.parked("prefill")) == (3, 2, 1)
        q.freed()
        await asyncio.sleep(0.01)
        assert woke == [("a", True)] and q.parked("decode") == 1
        q.joined()
        await asyncio.gather(*tasks)
        assert woke[1:] == [("b", True), ("c", True)] and len(q) == 0
        await park("late", "decode", deadline=0.5)  # nobody wakes it, and it is the head for less than HEAD_POLL_S
        assert woke[-1] == ("late", False) and len(q) == 0

    clock.run(go())


def test_run_request_deadline_in_virtual_time_aborts_everywhere():
    async def go():
        cluster, service = one_engine()
        await cluster.start()
        try:
            from strategies.round_robin import RoundRobin

            req = protocol.Request("slow", list(range(1, 100)), SamplingParams(max_tokens=200, ignore_eos=True))
            loop = asyncio.get_running_loop()
            chunks = run_request(RoundRobin(), cluster, req, deadline=loop.time() + 0.05)
            got = 0
            with pytest.raises(RouterError) as err:
                async for chunk in chunks:
                    got += len(chunk.token_ids)
            assert err.value.code is ErrorCode.TIMEOUT and 0 < got < 200
            for _ in range(100):  # the abort runs in the background
                await asyncio.sleep(0.01)
                if not service.backend.has_work():
                    break
            stats = service.stats()
            assert stats.running == 0 and stats.kv_blocks_used == stats.kv_blocks_cached
        finally:
            await cluster.close()

    clock.run(go())


def test_a_closed_engine_ends_its_open_streams_and_refuses_new_calls():
    """An engine that stops (a planner's scale-down, a shutdown) ends each stream it still has with
    UNAVAILABLE and refuses calls that come after: the router then resumes or retries them elsewhere.
    (A start_generate that reached a stopped simulated engine used to wait forever: a planner's day in
    the simulator never ended.)"""
    async def go():
        cluster, service = one_engine()
        await cluster.start()
        try:
            h = cluster.handles[0]
            running = h.start_generate(protocol.Request("open", list(range(1, 100)),
                                                        SamplingParams(max_tokens=500, ignore_eos=True)))
            assert (await running.__anext__()).token_ids
            service.close()
            with pytest.raises(EngineCallError) as err:
                async with asyncio.timeout(60):  # NOTE: virtual seconds: a stream left open fails here, not hangs
                    async for _ in running:
                        pass
            assert err.value.code is ErrorCode.UNAVAILABLE and "shutting down" in str(err.value)
            with pytest.raises(EngineCallError) as err:
                async for _ in h.start_generate(protocol.Request("late", [1, 2, 3], SamplingParams(max_tokens=4))):
                    pass
            assert err.value.code is ErrorCode.UNAVAILABLE
            with pytest.raises(EngineCallError) as err:
                await h.prep_recv(protocol.Request("late2", [1, 2, 3], SamplingParams(max_tokens=4)), end=3)
            assert err.value.code is ErrorCode.UNAVAILABLE
        finally:
            await cluster.close()

    clock.run(go())


@pytest.mark.parametrize("wait", ["next_chunk", "channel_reply"])
async def test_a_cancel_is_kept_when_the_awaited_item_arrives_with_it(wait):
    """A client's disconnect cancels its request's task just as a chunk (or a reply) arrives: the cancel
    must win. (`asyncio.wait_for` on Python 3.11 returns the item and drops the cancel, and the request
    then ran to its end, counted as a success: the gateway's disconnect test failed about 1 run in 20.)"""
    from microserve.router.attempts import _next_chunk
    from microserve.router.channel import ZMQChannel

    queue: asyncio.Queue = asyncio.Queue()

    async def chunks():
        while True:
            yield await queue.get()

    loop = asyncio.get_running_loop()
    waiting = _next_chunk(chunks(), loop.time() + 60, "r") if wait == "next_chunk" else ZMQChannel._next(queue, 60)
    task = asyncio.ensure_future(waiting)
    for _ in range(3):
        await asyncio.sleep(0)  # the task now waits on the queue
    queue.put_nowait(protocol.Stats())  # its getter is done...
    task.cancel()  # ...and the cancel comes in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await task
