"""Request priority (vLLM's: lower runs first) in the engine's scheduler, and through a deployment
with the official client: explicit `priority`, and `strategies/shortest_first.py` setting it."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from deploy import start_launch

from microserve import SamplingParams
from microserve.engine.config import EngineConfig
from microserve.engine.engine import LLMEngine


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


async def ttft(client, delay: float, **kw) -> float:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    async for event in await client.completions.create(model="demo", prompt="priority test " * 4, temperature=0,
                                                       stream=True, **kw):
        if event.choices and event.choices[0].text:
            return time.perf_counter() - t0
    return time.perf_counter() - t0


async def test_under_saturation_priority_0_beats_priority_10(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    low = [ttft(client, 0.0, max_tokens=24, extra_body={"priority": 10, "ignore_eos": True}) for _ in range(6)]
    high = [ttft(client, 0.2, max_tokens=24, extra_body={"priority": -1, "ignore_eos": True}) for _ in range(3)]
    times = await asyncio.gather(*low, *high)
    low_t, high_t = times[:6], times[6:]
    # 2 run at once: the urgent ones, sent later, start before the 4 low-priority ones still waiting
    assert sum(high_t) / len(high_t) < sum(low_t) / len(low_t), (high_t, low_t)


async def test_shortest_first_sets_priority_from_max_tokens(dep):
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="x", max_retries=0)
    long = [ttft(client, 0.0, max_tokens=64, extra_body={"ignore_eos": True}) for _ in range(6)]
    short = [ttft(client, 0.2, max_tokens=4, extra_body={"ignore_eos": True}) for _ in range(3)]
    times = await asyncio.gather(*long, *short)
    assert sum(times[6:]) / 3 < sum(times[:6]) / 6, times
