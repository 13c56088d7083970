"""`microserve sim`: shipped strategy files on simulated engines behind the real Cluster,
in virtual time: determinism, conservation, exact analytic cases, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from deploy import ROOT

from microserve.engine.config import EngineConfig
from microserve.router.strategy import load_strategy
from microserve.sim import clock
from microserve.sim.cluster import build_cluster
from microserve.sim.costs import CostModel, load_gpu, load_link, load_model
from microserve.sim.run import SimRequest, engine_report, simulate

COST = CostModel(load_model("llama-3.1-8b"), load_gpu("h100"))
NVLINK = load_link("nvlink")
CONFIG = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256)


def sim(strategy: str, layout: dict[str, int], reqs: list[SimRequest], rate: float | None = None,
        config: EngineConfig = CONFIG, cost: CostModel = COST, **args):
    cluster = build_cluster(layout, cost, NVLINK, config)
    results, duration = clock.run(simulate(load_strategy(strategy, args), cluster, reqs, rate, 1, 0))
    return results, duration, engine_report(cluster)


def sim_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microserve", "sim", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_one_request_alone_matches_the_cost_model_exactly():
    n, out = 3000, 5
    prompt = list(range(1, n + 1))
    # data parallel: the prefill step, then one decode step per token
    (r,), _, _ = sim("round_robin", {"engine": 1}, [SimRequest(prompt, out)])
    assert r.ok and r.output_tokens == out
    assert r.ttft == pytest.approx(COST.step_seconds([(0, n)], [], 1), rel=1e-12)
    decodes = sum(COST.step_seconds([], [n + k], 1) for k in range(1, out))
    assert r.e2e == pytest.approx(r.ttft + decodes, rel=1e-12)
    # 1P1D: prefill of all but the last token on P, the transfer, then D computes the last token
    (r,), _, engines = sim("pd", {"prefill": 1, "decode": 1}, [SimRequest(prompt, out)])
    ttft = COST.step_seconds([(0, n - 1)], [], 0) + COST.transfer_seconds(n - 1, NVLINK) + \
        COST.step_seconds([(n - 1, 1)], [], 1)
    assert r.ok and r.ttft == pytest.approx(ttft, rel=1e-12)
    assert r.e2e == pytest.approx(ttft + decodes, rel=1e-12)
    by_id = {e["engine_id"]: e for e in engines}
    assert by_id["prefill-0"]["kv_bytes_sent"] == (n - 1) * COST.model.kv_bytes_per_token


def chat_requests(n: int, seed: int = 0) -> list[SimRequest]:
    from microserve.bench import workloads
    from microserve.sim.run import prompt_encoder

    encode = prompt_encoder("llama-3.1-8b", COST.model.vocab, 1.3)
    return [SimRequest(encode(r.prompt), r.max_tokens, r.session)
            for r in workloads.synthetic("chat", n, seed)]


def assert_conserved(results, engines) -> None:
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for e in engines:
        assert not e["unfinished"] and e["open_tickets"] == 0, e
        assert e["kv_blocks_used"] == e["kv_blocks_cached"], f"{e['engine_id']}: blocks held outside the cache"


def test_pd_conservation_bytes_and_tokens():
    reqs = chat_requests(200)
    config = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256, enable_prefix_caching=False)
    results, _, engines = sim("pd", {"prefill": 1, "decode": 1}, reqs, rate=20.0, config=config)
    assert_conserved(results, engines)
    assert [r.output_tokens for r in results] == [r.max_tokens for r in reqs]
    p, d = (next(e for e in engines if e["role"] == role) for role in ("prefill", "decode"))
    sent = sum(len(r.prompt_ids) - 1 for r in reqs)
    assert p["kv_bytes_sent"] == d["kv_bytes_received"] == sent * COST.model.kv_bytes_per_token
    assert p["computed_tokens"] == sent, "P prefills every prompt but its last token, once"
    assert d["computed_tokens"] == sum(r.max_tokens for r in reqs), "D: the last prompt token, then decodes"
    for r in results:
        assert 0 < r.ttft <= r.e2e


@pytest.mark.parametrize("strategy", ["round_robin", "pd", "balanced_pd", "adaptive_pd", "cache_aware",
                                      "context_migration",
                                      str(ROOT / "examples" / "my_strategy.py")])
def test_every_shipped_strategy_runs_unchanged(strategy):
    from microserve.bench import workloads
    from microserve.sim.run import prompt_encoder

    encode = prompt_encoder("llama-3.1-8b", COST.model.vocab, 1.3)
    reqs = [SimRequest(encode(r.prompt), r.max_tokens, r.session) for r in workloads.synthetic("multi-turn", 80, 1)]
    layout = dict(load_strategy(strategy).roles)
    results, duration, engines = sim(strategy, layout, reqs, rate=8.0)
    assert_conserved(results, engines)
    assert duration > 0 and sum(e["computed_tokens"] for e in engines) > 0
    if strategy in ("cache_aware", "context_migration"):  # multi-turn prefixes are found through the index
        assert sum(e["prefix_hit_tokens"] for e in engines) > 0


def test_deterministic_for_a_seed_and_cli_json(tmp_path):
    args = ["--strategy", "balanced_pd", "--model", "llama-3.1-8b", "--gpu", "a100", "--link", "ib400",
            "--workload", "chat", "--rate", "10", "--num-requests", "60", "--seed", "4"]
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        proc = sim_cli(*args, "--out", str(out), "--plot", str(tmp_path / f"r{i}.png"))
        assert proc.returncode == 0, proc.stderr
        assert "E2E (JCT)" in proc.stdout
        runs.append(json.loads(out.read_text()))
    a, b = runs
    assert a["schema_version"] == 1 and a["config"]["mode"] == "sim" and a["config"]["roles"] == {
        "prefill": 1, "decode": 1}
    assert a["requests"] == b["requests"] and a["summary"] == b["summary"], "same seed, same simulation"
    assert all(r["ok"] for r in a["requests"]) and a["summary"]["ok"] == 60
    assert (tmp_path / "r0.png").read_bytes()[:4] == b"\x89PNG"
    other = sim_cli(*args[:-1], "5", "--out", str(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text())["requests"] != a["requests"], "another seed differs"
    assert other.returncode == 0


def test_the_simulator_never_imports_torch(tmp_path):
    """A planning machine needs no GPU stack, and importing torch is most of a short run's wall time:
    the simulator, its engines' core and the router stay torch-free (the transfer layer loads lazily)."""
    code = ("import sys; from microserve.cli import main; "
            "sys.argv = ['microserve', 'sim', '--strategy', 'pd', '--roles', 'prefill=1,decode=1', "
            "'--model', 'llama-3.1-8b', '--gpu', 'h100', '--workload', 'chat', '--rate', '4', '--num-requests', '12', "
            "'--no-progress', "
            f"'--out', {str(tmp_path / 'r.json')!r}]\n"
            "assert main() == 0\n"
            "assert 'torch' not in sys.modules, 'the simulator imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["ok"] == 12


def test_bad_input_is_a_clear_error():
    proc = sim_cli("--strategy", "pd", "--workload", "chat", "--rate", "1", "--num-requests", "2", "--gpu", "tpu9")
    assert proc.returncode == 2 and "unknown gpu 'tpu9'" in proc.stderr
    proc = sim_cli("--strategy", "pd", "--workload", "chat", "--num-requests", "2")
    assert proc.returncode == 2 and "--rate or --concurrency" in proc.stderr
    proc = sim_cli("--strategy", "pd", "--model", "llama-3.1-70b", "--gpu", "a100", "--tp", "1", "--workload", "chat",
                   "--rate", "1", "--num-requests", "2")
    assert proc.returncode == 2 and "does not fit" in proc.stderr
    # a deployment calibration needs the deployment's strategy and a load, asked before the ladder runs
    proc = sim_cli("--calibrate", "--model", "demo", "--url", "http://127.0.0.1:9", "--workload", "chat",
                   "--rate", "1", "--num-requests", "2", "--out", "/dev/null")
    assert proc.returncode == 2 and "give --strategy" in proc.stderr


def test_a_strategy_that_fails_fails_its_requests_not_the_run():
    (r,), _, _ = sim("pd", {"engine": 1}, [SimRequest([1, 2, 3], 2)])  # pd needs a prefill role
    assert not r.ok and "no role 'prefill'" in r.error


def test_virtual_clock_deadlock_is_reported():
    import asyncio

    async def stuck():
        await asyncio.Event().wait()

    with pytest.raises(clock.SimulationDeadlock):
        clock.run(stuck())
