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


def test_without_mixed_batches_a_prefill_step_carries_no_decodes():
    """SGLang's default scheduling (`mixed_batches=False`): a step that prefills stalls the decodes; times in
    closed form."""
    mixed, apart = SimEngine(COST), SimEngine(COST, EngineConfig(mixed_batches=False))
    for eng in (mixed, apart):
        add(eng, "a", list(range(500)), 4)
        eng.step()  # a's prefill (its first token)
        add(eng, "b", list(range(1000, 1800)), 2)
    steps = run(apart)
    assert [sorted(o.request_id for o in outs) for _, outs in steps] == [["b"], ["a", "b"], ["a"], ["a"]]
    assert steps[0][0] == COST.step_seconds([(0, 800)], [], 1)  # b's prompt alone: a waits
    assert steps[1][0] == COST.step_seconds([], [501, 801], 2)
    together = run(mixed)
    assert together[0][0] == COST.step_seconds([(0, 800)], [501], 2)  # mixed: a decodes in b's prefill step
    assert len(together) == 3 and sum(s for s, _ in steps) > sum(s for s, _ in together)
    # a long prompt is chunked by the budget, and every chunk step is prompt work only
    eng = SimEngine(COST, EngineConfig(max_num_batched_tokens=1024, mixed_batches=False))
    add(eng, "a", list(range(100)), 3)
    eng.step()
    add(eng, "c", list(range(5000, 8000)), 1)
    shapes = []
    while eng.has_unfinished():
        batch = eng.scheduler.schedule()
        shapes.append([n for n in batch.num_new_tokens])
        for seq, n in zip(batch.seqs, batch.num_new_tokens):  # run it as the engine would
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(0)
                if seq.num_output_tokens >= seq.sampling.max_tokens:
                    eng.scheduler.finish(seq, "length")
    assert shapes[:3] == [[1024], [1024], [952]] and all(n == 1 for s in shapes[3:] for n in s)
