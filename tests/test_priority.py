"""Request priority (vLLM's: lower runs first) in the engine's scheduler, and through a deployment
with the official client: explicit `priority`, and `strategies/shortest_first.py` setting it."""

from __future__ import annotations

import asyncio

import openai
import pytest
from deploy import start_launch

from microserve import SamplingParams
from microserve.engine.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.router.handle import EngineHandle


def first_tokens(engine: LLMEngine) -> list[str]:
    """Request ids in the order they got their first token."""
    order: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in order:
                order.append(out.request_id)
    return order


def test_waiting_requests_are_admitted_by_priority(demo_path):
    engine = LLMEngine(demo_path, config=EngineConfig(max_num_seqs=1, num_kv_blocks=64))
    for rid, prio in (("late-a", 10), ("late-b", 10), ("soon-a", 0), ("soon-b", -1), ("late-c", 10)):
        engine.add_request(rid, [5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                                             priority=prio))
    assert first_tokens(engine) == ["soon-b", "soon-a", "late-a", "late-b", "late-c"]  # FCFS within a priority


def test_preemption_takes_the_lowest_priority_first(demo_path):
    # 2 running sequences that together outgrow 6 blocks: the one with the higher number goes back
    engine = LLMEngine(demo_path, config=EngineConfig(max_num_seqs=2, num_kv_blocks=6, block_size=16))
    sp = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("background", list(range(2, 30)), SamplingParams(**sp, priority=10))
    engine.step()
    engine.add_request("urgent", list(range(40, 68)), SamplingParams(**sp, priority=0))
    preempted = []
    while engine.has_unfinished():
        before = engine.scheduler.num_preemptions
        engine.step()
        if engine.scheduler.num_preemptions > before:
            preempted += [s.request_id for s in engine.scheduler.waiting]
    assert preempted and set(preempted) == {"background"}  # the newer, urgent one is never the victim


@pytest.fixture(scope="module")
def dep(demo_path):
    d = start_launch("--strategy", "strategies/shortest_first.py", "--model", str(demo_path), "--engines", "1",
                     "--max-num-seqs", "2", "--served-model-name", "demo", "--log-level", "error")
    yield d
    d.stop()


async def first_token_order(dep, client, *batches: list[dict]) -> list[int]:
    """Send `batches` of requests (each dict: extra request fields) while 2 blocking streams hold both of
    the engine's slots, each batch once the engine has queued the previous one; then end the blockers.
    Returns the requests' indices (over all batches, in order) as their first tokens arrived: the order
    the scheduler admitted them in, with no clock involved."""
    engine = next(iter(dep.engines.values()))
    order: list[int] = []
    started = asyncio.Event()

    async def one(i: int | None, fields: dict) -> None:
        async for event in await client.completions.create(model="demo", prompt="priority test " * 4,
                                                           temperature=0, stream=True, **fields):
            if event.choices:  # NOTE: a chunk per token (its text may be held back: part of a character)
                if i is None:
                    started.set()
                    await asyncio.Event().wait()  # a blocker holds its slot until cancelled
                order.append(i)
                return

    async def queued(n: int) -> None:
        for _ in range(500):
            async with EngineHandle(engine, timeout=10) as h:
                s = await h.stats()
                if s.running >= 2 and s.waiting >= n:  # NOTE: both blockers run (a late one would count as waiting)
                    return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the engine never ran both blockers and queued {n} requests")

    blockers = [asyncio.create_task(one(None, {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}))
                for _ in range(2)]
    await started.wait()
    tasks, n = [], 0
    for batch in batches:
        tasks += [asyncio.create_task(one(n + k, fields)) for k, fields in enumerate(batch)]
        n += len(batch)
        await queued(n)
    for b in blockers:
        b.cancel()  # the client goes away: the engine aborts the blockers and admits 2 waiting requests
    await asyncio.gather(*blockers, return_exceptions=True)
    await asyncio.gather(*tasks)
    return order


async def test_under_saturation_priority_0_beats_priority_10(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    low = [{"max_tokens": 24, "extra_body": {"priority": 10, "ignore_eos": True}}] * 6
    high = [{"max_tokens": 24, "extra_body": {"priority": -1, "ignore_eos": True}}] * 3
    order = await first_token_order(dep, client, low, high)
    # 2 slots: the urgent ones, sent last, go first (the third as soon as one of the first two ends,
    # in the same step as the first low-priority one at the earliest)
    assert set(order[:2]) <= {6, 7, 8} and set(order[:4]) >= {6, 7, 8}, order


async def test_shortest_first_sets_priority_from_max_tokens(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    long = [{"max_tokens": 64, "extra_body": {"ignore_eos": True}}] * 6
    # NOTE: 16 tokens, not 4: the third short one starts when one of the first two ends, and first tokens of
    # requests started 4 steps (a few ms) apart could reach the client in either order through the gateway
    short = [{"max_tokens": 16, "extra_body": {"ignore_eos": True}}] * 3
    order = await first_token_order(dep, client, long, short)
    assert set(order[:2]) <= {6, 7, 8} and set(order[:4]) >= {6, 7, 8}, order
