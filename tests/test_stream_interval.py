"""`--stream-interval N`: after the first token, a request's tokens reach the router N at a
time; the finish goes at once. The tokens, TTFT, TPOT and JCT are those of N = 1."""

from __future__ import annotations

import json

import pytest
from checkpoints import make_checkpoint
from engines import spawn_engine

from microserve import SamplingParams
from microserve.cli import build_parser
from microserve.engine.config import EngineConfig
from microserve.engine.core.engine_core import StepOutput
from microserve.protocol import Request
from microserve.router import EngineHandle
from microserve.serving.streams import StreamHold
from microserve.sim import clock
from microserve.sim.cluster import build_cluster
from microserve.sim.costs import CostModel, load_gpu, load_link, load_model

GREEDY = SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True)


def test_hold_sends_the_first_token_then_n_at_a_time_and_the_finish_at_once():
    hold = StreamHold(4)
    sent = [hold.take(StepOutput("r", [t])) for t in range(10)]
    sent.append(hold.take(StepOutput("r", [10], "length", 3)))
    chunks = [s.new_token_ids for s in sent if s is not None]
    assert chunks == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert sent[-1].finish_reason == "length" and sent[-1].num_cached_tokens == 3
    assert hold.held == {}  # a finished stream leaves nothing behind
    # logprobs travel with their tokens; a stream dropped while holding forgets it
    hold.take(StepOutput("s", [1], logprobs=[(-0.1, [])]))
    assert hold.take(StepOutput("s", [2], logprobs=[(-0.2, [])])) is None
    out = hold.take(StepOutput("s", [3], "stop", logprobs=[(-0.3, [])]))
    assert out.new_token_ids == [2, 3] and out.logprobs == [(-0.2, []), (-0.3, [])]
    hold.take(StepOutput("t", [1]))
    hold.take(StepOutput("t", [2]))
    hold.drop("t")
    assert hold.held == {}
    assert StreamHold(1).take(StepOutput("u", [1])).new_token_ids == [1]
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)


def test_simulated_engine_streams_in_chunks_and_closing_early_forgets_held_tokens():
    cost = CostModel(load_model("llama-3.1-8b"), load_gpu("h100"))
    config = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=64, num_kv_blocks=256, stream_interval=8)

    async def go():
        cluster = build_cluster({"engine": 1}, cost, load_link("nvlink"), config)
        await cluster.start()
        try:
            h, service = cluster.handles[0], cluster.servers[0]
            sizes = [len(c.token_ids) async for c in h.start_generate(Request("a", list(range(40)), GREEDY))]
            assert sizes == [1, 8, 8, 6]
            stream = h.start_generate(Request("b", list(range(40)), GREEDY))
            assert len((await anext(stream)).token_ids) == 1
            await anext(stream)
            await stream.aclose()
            assert service.hold.held == {} and not service.backend.engine.has_unfinished()
        finally:
            await cluster.close()

    clock.run(go())


def _sim(tmp_path, interval: int) -> dict:
    out = tmp_path / f"r{interval}.json"
    args = build_parser().parse_args([
        "sim", "--strategy", "pd", "--model", "llama-3.1-8b", "--gpu", "h100", "--workload", "chat",
        "--rate", "20", "--num-requests", "60", "--stream-interval", str(interval), "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    return json.loads(out.read_text())


def test_sim_results_do_not_depend_on_the_stream_interval(tmp_path):
    one, eight = _sim(tmp_path, 1), _sim(tmp_path, 8)
    for key in ("e2e_s", "ttft_s", "tpot_s"):
        for stat in ("mean", "p50", "p99"):
            assert eight["summary"][key][stat] == pytest.approx(one["summary"][key][stat], rel=1e-9), (key, stat)
    chunks = [sum(r["chunks"] for r in run["requests"]) for run in (one, eight)]
    tokens = sum(r["output_tokens"] for r in one["requests"])
    assert chunks[0] == tokens and chunks[1] < tokens / 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", seed=3)[0]


async def test_real_engine_streams_n_tokens_per_chunk_with_the_same_tokens(model):
    engines = [spawn_engine(str(model), "--num-kv-blocks", "200", "--log-level", "error", *extra)
               for extra in ([], ["--stream-interval", "4"])]
    try:
        runs = []
        for e in engines:
            h = EngineHandle(e.rpc, timeout=30.0)
            try:
                runs.append([c.token_ids async for c in h.start_generate(Request("x", list(range(3, 40)), GREEDY))])
            finally:
                await h.close()
        every, four = runs
        assert [len(c) for c in every] == [1] * 23
        assert [t for c in four for t in c] == [t for c in every for t in c]
        # the first token at once; then at least 4 per chunk (more when the reader fell behind), the rest last
        assert len(four[0]) == 1 and all(len(c) >= 4 for c in four[1:-1]) and len(four) <= 1 + 22 // 4 + 1
    finally:
        for e in engines:
            e.stop()
