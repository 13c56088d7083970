"""Engine behaviour: batching, chunked prefill, prefix cache, preemption, sampling, no leaks."""

import subprocess
import sys

import pytest
import torch
from checkpoints import hf_greedy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(lengths, salt=0):
    return [[(11 * i + 5 * j + salt) % 300 + 5 for i in range(n)] for j, n in enumerate(lengths)]


def assert_no_leak(llm: LLM) -> None:
    kv = llm.engine.kv
    kv.pool.check_invariants()
    assert not llm.engine.has_unfinished()
    assert kv.pool.num_used == kv.num_cached, "blocks held by nobody but the prefix cache leaked"


@pytest.fixture(scope="module")
def reference(llama_ckpt):
    """Each prompt alone, one at a time."""
    path, _ = llama_ckpt
    llm = LLM(path, enable_prefix_caching=False)
    prompts = _prompts([3, 50, 16, 31, 80, 1, 64])
    return prompts, [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batch_equals_alone(llama_ckpt, reference):
    prompts, alone = reference
    llm = LLM(llama_ckpt[0])
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert_no_leak(llm)


@pytest.mark.parametrize("budget", [1, 7, 16, 33, 200])
def test_chunked_prefill_any_chunk_size(llama_ckpt, reference, budget):
    prompts, alone = reference
    llm = LLM(llama_ckpt[0], max_num_batched_tokens=budget)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert_no_leak(llm)


@pytest.mark.parametrize("budget", [7, 200])
def test_prefill_steps_apart_from_decodes_give_the_same_tokens(llama_ckpt, reference, budget):
    """`mixed_batches=False` (SGLang's default scheduling): prompts first, no step mixes prompt work and decodes."""
    prompts, alone = reference
    llm = LLM(llama_ckpt[0], max_num_batched_tokens=budget, mixed_batches=False)
    schedule = llm.engine.scheduler.schedule
    shapes = []

    def watched():
        batch = schedule()
        shapes.append([(n > 1 or s.num_computed_tokens < s.num_prompt_tokens) for s, n in
                       zip(batch.seqs, batch.num_new_tokens)])
        return batch

    llm.engine.scheduler.schedule = watched
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert all(len(set(kinds)) <= 1 for kinds in shapes), "a step mixed prompt work and decodes"
    assert_no_leak(llm)


@pytest.mark.parametrize("mixed", [True, False])
def test_max_prefill_tokens_starts_prompts_one_step_after_another(llama_ckpt, reference, mixed):
    """`max_prefill_tokens` (SGLang's): a waiting prompt joins a step only while the step's prompt tokens are
    below it; the one that joins may take it past. Same tokens as each prompt alone."""
    prompts, alone = reference
    llm = LLM(llama_ckpt[0], max_prefill_tokens=40, mixed_batches=mixed)
    schedule = llm.engine.scheduler.schedule
    steps = []

    def watched():
        batch = schedule()
        steps.append([n for s, n in zip(batch.seqs, batch.num_new_tokens)
                      if n > 1 or s.num_computed_tokens < s.num_prompt_tokens])
        return batch

    llm.engine.scheduler.schedule = watched
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert all(sum(chunks[:-1]) < 40 for chunks in steps), steps
    assert steps[0] == [3, 50], "the prompt that takes the step past the limit still starts whole"
    assert sum(1 for chunks in steps if chunks) >= 4
    assert_no_leak(llm)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        LLM(llama_ckpt[0], max_prefill_tokens=0)


def test_prefix_cache_hit(llama_ckpt):
    path, hf = llama_ckpt
    llm = LLM(path, block_size=16)
    shared = _prompts([70], salt=3)[0]
    first = shared + [9, 10, 11]
    second = shared + [12, 13]
    a = llm.generate([first], GREEDY)[0]
    assert a.num_cached_tokens == 0
    b = llm.generate([second], GREEDY)[0]
    assert b.num_cached_tokens == 64  # 4 full blocks of the 70 shared tokens
    assert llm.engine.stats().prefix_cache_hit_tokens == 64
    assert b.token_ids == hf_greedy(hf, second, GREEDY.max_tokens)
    # the exact same prompt again hits everything but the last token's block remainder
    c = llm.generate([second], GREEDY)[0]
    assert c.num_cached_tokens == 64 and c.token_ids == b.token_ids
    assert_no_leak(llm)


def test_blocks_a_running_request_shares_with_the_cache_count_as_used_not_cached(llama_ckpt):
    """`kv_blocks_cached` counts blocks only a cache holds (free to take), so `used - cached` is the KV
    requests hold: a planner's `kv_usage`. Blocks of a running request enter the prefix cache as soon as
    they are computed; they stay in use until it ends (they were once counted as cached: a decode engine
    full of streams looked empty)."""
    from microserve.engine.config import EngineConfig
    from microserve.engine.engine import LLMEngine

    engine = LLMEngine(llama_ckpt[0], config=EngineConfig(block_size=16, num_kv_blocks=64))
    engine.add_request("a", _prompts([70], salt=5)[0], SamplingParams(max_tokens=40, temperature=0.0,
                                                                      ignore_eos=True))
    for _ in range(3):
        engine.step()
    s = engine.stats()
    assert s.kv_blocks_used >= 5 and s.kv_blocks_used - s.kv_blocks_cached >= 5, s  # 70 + 2 tokens: 5 blocks held
    while engine.has_unfinished():
        engine.step()
    s = engine.stats()
    assert s.kv_blocks_used == s.kv_blocks_cached >= 6, s  # all cached now, nothing held
    engine.kv.pool.check_invariants()


def test_generated_tokens_are_cached_too(llama_ckpt):
    """A follow-up turn that extends prompt + answer reuses the answer's KV."""
    llm = LLM(llama_ckpt[0], block_size=8)
    prompt = _prompts([20])[0]
    out = llm.generate([prompt], GREEDY)[0]
    follow = prompt + out.token_ids + [7, 8, 9]
    again = llm.generate([follow], GREEDY)[0]
    assert again.num_cached_tokens == (len(prompt) + len(out.token_ids) - 1) // 8 * 8


def test_preemption_gives_same_tokens(llama_ckpt, reference):
    prompts, alone = reference
    # 24 blocks of 8 tokens: far fewer than the batch needs at once, more than any one request
    llm = LLM(llama_ckpt[0], block_size=8, num_kv_blocks=24)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert llm.engine.stats().num_preemptions > 0
    assert_no_leak(llm)


def test_preemption_without_prefix_cache(llama_ckpt, reference):
    prompts, alone = reference
    llm = LLM(llama_ckpt[0], block_size=8, num_kv_blocks=24, enable_prefix_caching=False)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.kv.pool.num_used == 0


def test_seeded_sampling_is_reproducible(llama_ckpt):
    llm = LLM(llama_ckpt[0])
    prompts = _prompts([10, 30, 5])
    sp = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[1]], sp)[0].token_ids
    together = llm.generate(prompts, [SamplingParams(max_tokens=32, temperature=0.7, ignore_eos=True), sp, GREEDY])
    assert together[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert llm.generate([prompts[1]], other_seed)[0].token_ids != alone


def test_sampling_limits_reduce_to_greedy(llama_ckpt, reference):
    prompts, alone = reference
    llm = LLM(llama_ckpt[0])
    for sp in (SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True, seed=1),
               SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, ignore_eos=True, seed=2)):
        assert llm.generate(prompts[:3], sp)[0].token_ids == alone[0]


def test_top_k_restricts_support(llama_ckpt):
    path, hf = llama_ckpt
    llm = LLM(path)
    prompt = _prompts([12])[0]
    import torch

    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    for seed in range(20):
        out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=seed))[0]
        assert out.token_ids[0] in allowed


def test_stop_conditions(llama_ckpt, reference):
    prompts, alone = reference
    llm = LLM(llama_ckpt[0])
    target = alone[1][5]
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[target]))[0]
    assert out.token_ids == alone[1][:alone[1].index(target) + 1] and out.finish_reason == "stop"
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == alone[1][:3] and out.finish_reason == "length"
    # EOS (id 1 in the test config) stops unless ignore_eos
    llm.engine.eos_token_ids = frozenset({target})
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == target
    assert_no_leak(llm)


def test_context_limit_ends_generation(llama_ckpt):
    llm = LLM(llama_ckpt[0], max_model_len=40)
    out = llm.generate([_prompts([30])[0]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_string_prompts_and_text(demo_path):
    llm = LLM(demo_path)
    out = llm.generate("Hello, world", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello, world")
    assert len(out.token_ids) == 8
    assert out.text == llm.tokenizer.decode(out.token_ids)
    same = llm.generate([out.prompt_token_ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert same.token_ids == out.token_ids


def test_demo_model_is_the_same_in_every_process(demo_path, tmp_path):
    """Byte `b` is token 5 + b, and two processes write byte-identical checkpoints (the tokenizers
    library hands out its byte alphabet in hash order: building the vocabulary from it gave every
    process its own vocabulary, so `--model demo` depended on which process wrote the cache)."""
    tok = LLM(demo_path).tokenizer
    text = "héllo, 世界\n\x00~"
    assert tok.encode(text) == [5 + b for b in text.encode()]
    assert tok.decode(tok.encode(text)) == text
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", "import sys, microserve; microserve.demo_model(sys.argv[1])",
                        str(tmp_path / name)], check=True, timeout=120)
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() == (demo_path / f).read_bytes()


def test_abort_frees_blocks(llama_ckpt):
    llm = LLM(llama_ckpt[0], enable_prefix_caching=False)
    eng = llm.engine
    eng.add_request("a", _prompts([40])[0], SamplingParams(max_tokens=50, temperature=0))
    eng.add_request("b", _prompts([40], salt=1)[0], SamplingParams(max_tokens=50, temperature=0))
    for _ in range(3):
        eng.step()
    assert eng.kv.pool.num_used > 0
    assert eng.abort("a") and not eng.abort("a") and not eng.abort("nope")
    while eng.has_unfinished():
        eng.step()
    assert eng.kv.pool.num_used == 0


@pytest.mark.parametrize("behind", [0, 3])
def test_an_aborted_stream_continues_on_the_kv_it_had(llama_ckpt, behind):
    """A stream stopped mid-block (an abort, as a migration or a drain does) leaves its last blocks
    behind; the request continued as prompt + generated takes them over: it computes only its last
    token, then decodes, and its seeded tokens equal an uninterrupted run. `behind`: the continuation
    knows 3 tokens fewer than the engine generated, across a block boundary (the router had not seen
    them yet): it continues on a copy of the full block, which the prefix cache keeps unchanged."""
    sp = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=5, presence_penalty=0.5, ignore_eos=True)
    prompt = _prompts([37])[0]
    ref = LLM(llama_ckpt[0]).generate([prompt], sp)[0].token_ids
    eng = LLM(llama_ckpt[0]).engine
    bs, generated = eng.block_size, []
    eng.add_request("a", prompt, sp)
    # stop where the engine's last computed position is 1 past a block boundary, so the continuation
    # (`behind` tokens short) ends inside the last full block, or mid-block when behind = 0
    while len(generated) < 2 or (len(prompt) + len(generated) - 1) % bs != (1 if behind else bs // 2):
        generated += [t for out in eng.step() for t in out.new_token_ids]
    assert eng.abort("a")
    assert len(eng.kv.tails) == 2  # the partial block and the full one before it
    full = (len(prompt) + len(generated) - 1) // bs * bs
    cached = eng.runner.kv_cache[:, :, eng.kv.radix.match(prompt + generated, 0)[-1]].clone()
    known = generated[:len(generated) - behind]
    before = eng.stats().computed_tokens_total
    eng.add_request("a-moved", prompt + known, sp.after(known))
    rest = []
    while eng.has_unfinished():
        rest += [t for out in eng.step() for t in out.new_token_ids]
    assert known + rest == ref
    assert eng.stats().computed_tokens_total - before == len(rest)  # the last token, then one per decode
    assert all(start != (full - bs if behind else full) for _, start, _ in eng.kv.tails)  # the tail was taken
    assert torch.equal(eng.runner.kv_cache[:, :, eng.kv.radix.match(prompt + generated, 0)[-1]], cached)
    assert eng.kv.pool.num_used == eng.kv.num_cached


def test_a_ticket_that_takes_a_tail_is_adopted_with_its_new_prompt(llama_ckpt):
    """A receive ticket's sequence (prompt[:end]) takes a stopped stream's tail, then becomes the request
    with the whole prompt (`adopt`): it continues from the tail's KV and gives the uninterrupted tokens
    (its prompt's block hashes, which the tail lookup computed for prompt[:end], are of the new prompt)."""
    from microserve.engine.core.sequence import Sequence

    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompt = _prompts([40])[0]
    ref = LLM(llama_ckpt[0]).generate([prompt], sp)[0].token_ids
    eng = LLM(llama_ckpt[0]).engine
    eng.add_request("a", prompt, sp)
    generated = []
    while len(generated) < 8:  # NOTE: 48 tokens, 47 of them in the ticket: one full block more than it holds
        generated += [t for out in eng.step() for t in out.new_token_ids]
    assert len(prompt + generated) % eng.block_size == 0
    assert eng.abort("a") and eng.kv.tails
    moved, end = prompt + generated, len(prompt) + len(generated) - 1
    held = Sequence("a-moved", moved[:end], sp.after(generated))
    assert eng.reserve(held, end) and held.num_computed_tokens == end  # cached blocks + the tail: all of it
    seq = eng.adopt(held, moved, end, sp.after(generated))
    assert seq is not None and seq.prompt_block_hashes(eng.block_size) == \
        Sequence("x", moved, sp).prompt_block_hashes(eng.block_size)
    eng.add_sequence(seq)
    rest = []
    while eng.has_unfinished():
        rest += [t for out in eng.step() for t in out.new_token_ids]
    assert generated + rest == ref
    assert eng.kv.pool.num_used == eng.kv.num_cached


def test_kept_tails_are_the_first_blocks_reclaimed(llama_ckpt):
    """Tails of aborted streams are cache: a request that needs the whole pool gets it."""
    llm = LLM(llama_ckpt[0], block_size=4, num_kv_blocks=64)
    eng, sp = llm.engine, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"t{i}", _prompts([6], salt=i)[0], sp)
        eng.step()
        assert eng.abort(f"t{i}")
    assert eng.kv.tails and eng.kv.pool.num_used == eng.kv.num_cached
    out = llm.generate([_prompts([60 * 4 - 4], salt=9)[0]], sp)[0]
    assert len(out.token_ids) == 3 and not eng.kv.tails
    assert_no_leak(llm)


_solo_cache: dict = {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.lists(st.integers(5, 8), min_size=1, max_size=40), min_size=1, max_size=6),
    abort_at=st.lists(st.integers(0, 30), max_size=3),
    budget=st.sampled_from([5, 16, 64]),
    prefill=st.sampled_from([None, 3, 20]),
)
def test_random_workload_never_leaks(demo_path, prompts, abort_at, budget, prefill):
    """Tiny pool, shared prefixes, aborts at random steps: finished requests match their solo
    output and, once all end, the only used blocks are the prefix cache's."""
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    if "solo" not in _solo_cache:
        _solo_cache["solo"] = LLM(demo_path, enable_prefix_caching=False)
    solo = _solo_cache["solo"]
    llm = LLM(demo_path, block_size=4, num_kv_blocks=20, max_num_batched_tokens=budget, max_prefill_tokens=prefill)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    finished, aborted, step = set(), set(), 0
    while eng.has_unfinished():
        if step in abort_at:
            victim = str(step % len(prompts))
            if eng.abort(victim):
                aborted.add(victim)
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
            if out.finish_reason:
                finished.add(out.request_id)
        step += 1
    for rid in finished:
        key = tuple(prompts[int(rid)])
        if key not in _solo_cache:
            _solo_cache[key] = solo.generate([list(key)], sp)[0].token_ids
        assert got[rid] == _solo_cache[key]
    assert finished | aborted == set(got)
    assert_no_leak(llm)


def test_in_batch_prefix_sharing_computes_the_prefix_once(llama_ckpt):
    """Requests arriving together with a shared prefix: one computes it, the rest wait a
    step and hit the cache (SGLang-style), with the same tokens as each prompt alone."""
    path, _ = llama_ckpt
    prefix = [(7 * i) % 300 + 5 for i in range(64)]  # 4 full blocks
    prompts = [prefix + [(13 * j + i) % 300 + 5 for i in range(5)] for j in range(8)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = LLM(path, enable_prefix_caching=False)
    expected = [alone.generate([p], sp)[0].token_ids for p in prompts]
    llm = LLM(path)
    outs = llm.generate(prompts, sp)
    assert [o.token_ids for o in outs] == expected
    stats = llm.engine.stats()
    assert stats.prefix_cache_hit_tokens == 7 * 64, "each waiting request counts its hit once"
    # prompts once each, the shared prefix once, plus the decode steps (the last token of each is sampled)
    assert stats.computed_tokens_total == 64 + 8 * 5 + 8 * 5
    assert_no_leak(llm)


def test_same_step_prefix_sharing(llama_ckpt):
    """Requests arriving together with a shared prefix all get their first token in the first
    step: the first computes the prefix, the others share its blocks in the same step."""
    path, hf = llama_ckpt
    prefix = [(7 * i) % 300 + 5 for i in range(64)]  # 4 full blocks
    prompts = [prefix + [(13 * j + i) % 300 + 5 for i in range(5)] for j in range(8)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(path)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp)
    first = {o.request_id for o in eng.step() if o.new_token_ids}
    assert first == {str(i) for i in range(8)}, "every request should have its first token after one step"
    got = {str(i): [] for i in range(8)}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    assert eng.stats().prefix_cache_hit_tokens == 7 * 64
    assert eng.stats().computed_tokens_total == 64 + 8 * 5 + 8 * 5
    assert_no_leak(llm)
    assert len(got["3"]) == 5  # 6 tokens in all, the first one came from the first step
    assert llm.generate([prompts[3]], sp)[0].token_ids[1:] == got["3"]
    assert hf_greedy(hf, prompts[3], 6)[1:] == got["3"]


@pytest.mark.parametrize("budget", [24, 40, 100])
def test_prefix_longer_than_the_budget_is_shared_exactly(llama_ckpt, budget):
    """The prefix's producer is chunked over several steps: others share the blocks it completes
    in a step, wait for the rest, and every output equals the prompt alone."""
    path, _ = llama_ckpt
    prefix = [(5 * i) % 300 + 5 for i in range(150)]
    prompts = [prefix + [(17 * j + i) % 300 + 5 for i in range(3 + j)] for j in range(5)]
    alone = LLM(path, enable_prefix_caching=False)
    want = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(path, max_num_batched_tokens=budget)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    assert llm.engine.stats().prefix_cache_hit_tokens >= 4 * 144  # 9 full blocks of 16, for each sharer
    assert_no_leak(llm)


def test_chunks_of_one_shape_attend_in_one_call(llama_ckpt):
    """Prompts of equal length (fresh, and sharing a cached prefix), interleaved with others so
    same-shape chunks are not adjacent in the batch: batched attention gives each prompt's tokens."""
    path, _ = llama_ckpt
    prompts = _prompts([40, 17, 40, 40, 17, 40], salt=21)
    prefix = _prompts([48], salt=2)[0]
    shared = [prefix + p[:9] for p in prompts]
    alone = LLM(path, enable_prefix_caching=False)
    want = [alone.generate([p], GREEDY)[0].token_ids for p in prompts + shared]
    llm = LLM(path)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want[:6]
    llm.generate([prefix + [7]], GREEDY)  # caches the prefix: the next batch attends to it
    assert [o.token_ids for o in llm.generate(shared, GREEDY)] == want[6:]
    assert_no_leak(llm)


def test_cascade_attention_over_a_long_shared_prefix(llama_ckpt):
    """Requests sharing a cached prefix of >= 256 tokens with tails of one length: the prefix is
    attended once for all of them (cascade), merged exactly with each tail's own attention."""
    from microserve.engine.model import attention

    path, hf = llama_ckpt
    prefix = _prompts([300], salt=8)[0]
    prompts = [prefix + q for q in _prompts([11] * 6, salt=30)]
    alone = LLM(path, enable_prefix_caching=False)
    want = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]
    llm = LLM(path, block_size=16)
    llm.generate([prefix + [3]], GREEDY)  # caches 18 blocks of the prefix
    calls = []
    orig = attention._cascade
    attention._cascade = lambda *a: calls.append(a[3]) or orig(*a)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    finally:
        attention._cascade = orig
    assert calls and all(m == 18 for m in calls), calls
    assert hf_greedy(hf, prompts[2], GREEDY.max_tokens) == want[2]
    assert_no_leak(llm)


def test_generation_config_eos_list_stops_generation(demo_path, tmp_path):
    """A checkpoint whose generation_config.json lists several EOS ids (every Llama-3 instruct model:
    end of text and end of turn) stops at any of them, as vLLM does."""
    import json
    import shutil

    from microserve.engine.config import ModelConfig

    ckpt = tmp_path / "gen"
    shutil.copytree(demo_path, ckpt)
    free = LLM(ckpt).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    target = free.token_ids[4]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, target]}))
    assert target in ModelConfig.from_pretrained(ckpt).eos_token_ids
    out = LLM(ckpt).generate([[5, 6, 7, 8]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:free.token_ids.index(target) + 1]
