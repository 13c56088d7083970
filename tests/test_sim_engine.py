"""The simulated engine: the real scheduler and KV books, timed exactly by the cost model."""

import random

import pytest

from microserve.engine.config import EngineConfig
from microserve.engine.core.engine_core import InvalidRequestError
from microserve.sampling_params import SamplingParams
from microserve.sim.costs import CostModel, load_gpu, load_model
from microserve.sim.engine import SimEngine

COST = CostModel(load_model("llama-3.1-8b"), load_gpu("h100"))


def add(engine: SimEngine, rid: str, prompt: list[int], max_tokens: int) -> None:
    engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run(engine: SimEngine) -> list[tuple[float, list]]:
    steps = []
    while engine.has_unfinished():
        outs = engine.step()
        steps.append((engine.last_step_seconds, outs))
    return steps


def test_one_request_alone_matches_the_cost_model_exactly():
    eng = SimEngine(COST)
    add(eng, "a", list(range(1000)), 5)
    steps = run(eng)
    assert [sum(len(o.new_token_ids) for o in outs) for _, outs in steps] == [1] * 5
    assert steps[0][0] == COST.step_seconds([(0, 1000)], [], 1)  # TTFT = the prefill step
    for k, (seconds, _) in enumerate(steps[1:], start=1):
        assert seconds == COST.step_seconds([], [1000 + k], 1)
    assert steps[-1][1][0].finish_reason == "length"


def test_long_prompt_is_chunked_by_the_token_budget():
    eng = SimEngine(COST, EngineConfig(max_num_batched_tokens=2048))
    add(eng, "a", list(range(3000)), 1)
    steps = run(eng)
    assert [s for s, _ in steps] == [COST.step_seconds([(0, 2048)], [], 0), COST.step_seconds([(2048, 952)], [], 1)]


def test_conservation_and_prefix_reuse():
    rng = random.Random(0)
    system = [rng.randrange(1000) for _ in range(512)]
    eng = SimEngine(COST, EngineConfig(num_kv_blocks=600))  # small pool: preemption and eviction happen
    want, prompt_tokens = {}, 0
    for i in range(40):
        prompt = system + [rng.randrange(1000) for _ in range(rng.randint(1, 300))]
        prompt_tokens += len(prompt)
        want[f"r{i}"] = rng.randint(1, 64)
        add(eng, f"r{i}", prompt, want[f"r{i}"])
    got = {rid: 0 for rid in want}
    finished = set()
    for _, outs in run(eng):
        for o in outs:
            got[o.request_id] += len(o.new_token_ids)
            if o.finish_reason:
                finished.add(o.request_id)
    assert got == want and finished == set(want), "every request ends with exactly its tokens"
    eng.kv.pool.check_invariants()
    assert eng.kv.pool.num_used == eng.kv.radix.num_blocks, "no block held by anyone but the prefix cache"
    # the shared 512 tokens are computed once (or a few times under preemption), not 40 times
    assert eng.kv.prefix_hit_tokens >= 30 * 512
    assert eng.computed_tokens_total < prompt_tokens - 25 * 512 + sum(want.values())


def test_deterministic_and_bad_input():
    def durations():
        eng = SimEngine(COST)
        for i in range(10):
            add(eng, str(i), [i] * (100 + 37 * i), 8)
        return [s for s, _ in run(eng)]

    assert durations() == durations()
    eng = SimEngine(COST, EngineConfig(num_kv_blocks=4))
    with pytest.raises(InvalidRequestError, match="more KV blocks than the cache has"):
        add(eng, "x", list(range(100)), 1)
    with pytest.raises(ValueError, match="max_tokens"):
        add(eng, "y", [1], 0)
