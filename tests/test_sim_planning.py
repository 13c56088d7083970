"""`microserve sim` as a planning tool: precision (FP8 weights and KV), mixed hardware per role
(GPU, TP, links per pair of roles), profiles visible to strategies, and the layout search. Each
has a case whose answer is known in closed form and a conservation check."""

from __future__ import annotations

import pytest
from test_sim import CONFIG, assert_conserved, chat_requests, sim_cli

from microserve.router.strategy import load_strategy
from microserve.sim import clock
from microserve.sim.cluster import build_cluster
from microserve.sim.costs import CostModel, load_gpu, load_link, load_model, with_precision
from microserve.sim.run import SimRequest, engine_report, simulate

M70 = load_model("llama-3.1-70b")
H100, A100 = load_gpu("h100"), load_gpu("a100")


def test_fp8_weights_and_kv_in_closed_form():
    bf16, fp8 = M70, with_precision(M70, "fp8")
    kv8 = with_precision(M70, "fp8", "fp8")
    assert fp8.bytes_per_param == 1 and fp8.kv_bytes_per_token == bf16.kv_bytes_per_token  # auto: bf16 KV
    assert kv8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2 and kv8.kv_dtype == "float8_e4m3fn"
    # a lone decode is memory-bound: its weight reads halve
    a, b = CostModel(bf16, H100, tp=4), CostModel(fp8, H100, tp=4)
    overhead = H100.step_overhead_ms * 1e-3 + a.allreduce_seconds(1)
    mem = lambda c, m: (m.weight_bytes + m.kv_bytes_per_token * 101) / (H100.hbm_tb_s * 1e12 * 0.8) / 4
    assert a.step_seconds([], [100], 1) == pytest.approx(mem(a, bf16) + overhead, rel=1e-9)
    assert b.step_seconds([], [100], 1) == pytest.approx(mem(b, fp8) + overhead, rel=1e-9)
    # a long prefill is compute-bound: FP8's own peak and efficiency
    flops, _ = b.work([(0, 8192)], [], 1)
    peak, eff = H100.peak("fp8")
    assert peak == 1979.0
    assert b.step_seconds([(0, 8192)], [], 1) == pytest.approx(
        flops / (peak * 1e12 * eff) / 4 + b.allreduce_seconds(8192) + 2e-3, rel=1e-9)
    # the all-reduce moves bf16 activations whatever the weights
    assert a.allreduce_seconds(1000) == b.allreduce_seconds(1000)
    # KV transfer with FP8 KV takes half the bytes
    link = load_link("ib400")
    full, half = CostModel(bf16, H100, 4).transfer_seconds(3000, link), CostModel(kv8, H100, 4).transfer_seconds(
        3000, link)
    assert half - link.latency_us * 1e-6 == pytest.approx((full - link.latency_us * 1e-6) / 2, rel=1e-9)


def test_fp8_on_a_gpu_without_fp8_is_refused():
    with pytest.raises(ValueError, match="a100 has no FP8 tensor cores"):
        CostModel(with_precision(M70, "fp8"), A100, tp=4)
    proc = sim_cli("--strategy", "pd", "--model", "llama-3.1-70b", "--gpu", "prefill=h100,decode=a100", "--tp", "4",
                   "--dtype", "fp8", "--workload", "chat", "--rate", "1", "--num-requests", "2")
    assert proc.returncode == 2 and "a100 has no FP8 tensor cores" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_mixed_hardware_one_request_in_closed_form():
    """Prefill on H100 TP4, decode on A100 TP2, KV over InfiniBand between them (NVLink otherwise):
    TTFT = P's prefill step + the transfer (2 shards in parallel: the smaller TP) + D's last-token step."""
    p_cost, d_cost = CostModel(M70, H100, 4), CostModel(M70, A100, 2)
    ib = load_link("ib400")
    cluster = build_cluster({"prefill": 1, "decode": 1}, {"prefill": p_cost, "decode": d_cost}, load_link("nvlink"),
                            CONFIG, links={("prefill", "decode"): ib})
    n, out = 3000, 4
    (r,), _ = clock.run(simulate(load_strategy("pd"), cluster, [SimRequest(list(range(1, n + 1)), out)], None, 1, 0))
    ttft = p_cost.step_seconds([(0, n - 1)], [], 0) + ib.seconds((n - 1) * M70.kv_bytes_per_token, parallel=2) + \
        d_cost.step_seconds([(n - 1, 1)], [], 1)
    assert r.ok and r.ttft == pytest.approx(ttft, rel=1e-12)
    decodes = sum(d_cost.step_seconds([], [n + k], 1) for k in range(1, out))
    assert r.e2e == pytest.approx(ttft + decodes, rel=1e-12)
    # strategies see each engine's hardware
    by_role = {h.role: cluster.profile(h) for h in cluster.handles}
    assert by_role["prefill"]["gpu"] == "h100" and by_role["prefill"]["tp"] == 4
    assert by_role["decode"]["gpu"] == "a100" and by_role["decode"]["peak_tflops"] == 2 * 312.0


def test_mixed_hardware_and_fp8_conserve_requests_and_blocks():
    fp8 = with_precision(load_model("llama-3.1-8b"), "fp8", "fp8")
    costs = {"prefill": CostModel(fp8, load_gpu("h200"), 1), "decode": CostModel(fp8, H100, 2)}
    cluster = build_cluster({"prefill": 2, "decode": 1}, costs, load_link("nvlink"), CONFIG,
                            links={("prefill", "decode"): load_link("ib400")})
    reqs = chat_requests(60)
    results, _ = clock.run(simulate(load_strategy("balanced_pd", {"fraction": "0.2"}), cluster, reqs, 20.0, 1, 0))
    engines = engine_report(cluster)
    assert_conserved(results, engines)
    assert all(r.output_tokens == q.max_tokens for r, q in zip(results, reqs))


def test_per_role_flags_and_their_errors():
    ok = sim_cli("--strategy", "pd", "--model", "llama-3.1-8b", "--gpu", "prefill=h200,decode=h100",
                 "--tp", "prefill=2,decode=1", "--link", "nvlink,prefill:decode=ib400", "--dtype", "fp8",
                 "--workload", "chat", "--rate", "4", "--num-requests", "20", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "prefill: 2 x h200, decode: 1 x h100" in ok.stdout and "fp8" in ok.stdout
    for args, message in ((["--gpu", "prefill=h100,verifier=a100"], "verifier"),
                          (["--tp", "prefill=2"], "decode"), (["--tp", "two"], "integers"),
                          (["--link", "prefill:nowhere=ib400"], "SENDER:RECEIVER")):
        bad = sim_cli("--strategy", "pd", "--model", "llama-3.1-8b", *args, "--workload", "chat", "--rate", "1",
                      "--num-requests", "2")
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_layout_search_ranks_layouts_by_goodput_per_gpu(tmp_path):
    proc = sim_cli("--search", "--model", "llama-3.1-8b", "--gpu", "h100", "--gpus", "4", "--tp-choices", "1,2",
                   "--workload", "sonnet", "--rates", "4,16", "--slo-ttft-ms", "1500", "--slo-tpot-ms", "40",
                   "--num-requests", "60", "--no-progress", "--plot", str(tmp_path / "search.png"))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1].isdigit()]
    names = [" ".join(r[1:r.index(next(x for x in r if x.endswith("/s")))]) for r in rows]
    assert "DP 4 x TP1" in names and "1P3D TP1" in names and "2P1D TP1/TP2" in names
    per_gpu = [float(next(x for x in r if x.endswith("/s"))[:-2]) for r in rows]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    assert (tmp_path / "search.png").stat().st_size > 0
    bad = sim_cli("--search", "--model", "llama-3.1-8b", "--workload", "sonnet", "--rates", "4")
    assert bad.returncode == 2 and "SLO" in bad.stderr


def test_layout_search_with_a_planner_gives_each_layout_a_planner_column():
    """`--search --planner slo`: each layout also runs from its start under the planner; the planner column is
    its goodput over the GPUs the planner kept on average (positive wherever the planner met a rate)."""
    proc = sim_cli("--search", "--model", "llama-3.1-8b", "--gpu", "h100", "--gpus", "2", "--tp-choices", "1",
                   "--workload", "sonnet", "--rates", "2,8", "--slo-ttft-ms", "1500", "--slo-tpot-ms", "40",
                   "--num-requests", "40", "--no-progress", "--planner", "slo", "--planner-arg", "ttft_ms=1500",
                   "--planner-arg", "itl_ms=40", "--scale-bounds", "engine=1:4,prefill=1:4,decode=1:4")
    assert proc.returncode == 0, proc.stderr
    assert "planner" in proc.stdout.splitlines()[1]
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert len(rows) == 3  # DP 2 x TP1, 1P1D TP1, 1P1D TP1 balanced 0.1
    for row in rows:
        static, planned = [float(x[:-2]) for x in row if x.endswith("/s")]
        assert static >= 0 and planned >= 0
    assert any(float([x for x in r if x.endswith("/s")][1][:-2]) > 0 for r in rows)


def test_the_papers_setup_short():
    """Llama-3.1-70B FP8 on 8 x H100 (two TP4 engines, NVLink), sonnet as LLMPerf draws it, MLC-LLM's default
    scheduling (its "hybrid" prefill: decodes ride along prompt chunks), as the microserving blog ran it, with
    fewer requests: the ordering of its figure and its headline gains (docs/strategies-at-scale.md)."""
    import contextlib
    import io
    import json
    import tempfile
    from pathlib import Path

    from microserve.cli import build_parser

    def run(strategy: str, extra: list[str], rate: float) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            args = build_parser().parse_args([
                "sim", "--strategy", strategy, *extra, "--model", "llama-3.1-70b", "--gpu", "h100", "--tp", "4",
                "--dtype", "fp8", "--workload", "sonnet-llmperf", "--rate", str(rate), "--num-requests", "300",
                "--out", str(out), "--no-progress"])
            with contextlib.redirect_stdout(io.StringIO()):
                assert args.func(args) == 0
            return json.loads(out.read_text())["summary"]

    layouts = {"dp": ("round_robin", ["--roles", "engine=2"]), "pd": ("pd", []),
               "bal": ("balanced_pd", ["--strategy-arg", "fraction=0.1"])}
    low, mid, high = ({k: run(s, e, rate) for k, (s, e) in layouts.items()} for rate in (2.6, 4.6, 5.6))
    tpot = lambda r, k: r[k]["tpot_s"]["mean"]
    jct = lambda r, k, stat="mean": r[k]["e2e_s"][stat]
    # disaggregated TPOT stays at 12-15 ms; data parallel's grows with the rate (about 2x by 5.6 req/s)
    for r in (low, mid, high):
        assert 0.011 < tpot(r, "pd") < 0.015 and 0.011 < tpot(r, "bal") < 0.015
    assert tpot(high, "dp") > 1.6 * tpot(low, "pd")
    # at moderate rates both PD layouts beat data parallel; at 5.6 req/s 1P1D's prefill engine saturates and
    # falls behind data parallel, while balanced PD (10% of each prompt on the decode engine) stays ahead
    for r in (low, mid):
        assert jct(r, "pd") < jct(r, "dp") and jct(r, "bal") < jct(r, "dp")
    assert jct(high, "bal") < jct(high, "dp") < jct(high, "pd")
    # the blog's headline, 1P1D's JCT against data parallel's: up to 16% lower mean, 28% lower P99; within 25%
    assert abs(jct(mid, "pd") / jct(mid, "dp") / 0.84 - 1) < 0.25
    assert abs(jct(mid, "pd", "p99") / jct(mid, "dp", "p99") / 0.72 - 1) < 0.25


def test_a_shared_store_tier_in_closed_form():
    """Round robin over two engines sharing a simulated Valkey tier: the second request for a prompt lands
    on the other engine and loads its stored blocks instead of computing them. TTFT = the load over the
    tier's link + one prefill step of the rest."""
    from microserve.sim.costs import CostModel as CM
    from microserve.sim.store import LINKS

    cost = CM(load_model("llama-3.1-8b"), H100)
    cluster = build_cluster({"engine": 2}, cost, load_link("nvlink"), CONFIG, kv_store=["host:1GiB", "valkey"])
    n, bs = 3200, CONFIG.block_size
    prompt = list(range(7, n + 7))
    reqs = [SimRequest(prompt, 3), SimRequest(prompt, 3)]
    results, _ = clock.run(simulate(load_strategy("round_robin"), cluster, reqs, None, 1, 0))
    engines = engine_report(cluster)
    assert_conserved(results, engines)
    first, second = results
    hit = engines[1]["kv_store"]["valkey"]["hit_tokens"]
    assert (n - 1) // bs * bs == hit  # every full block of the prompt but its last token's
    block_bytes = cost.model.kv_bytes_per_token * bs
    link = load_link(LINKS["valkey"])
    expect = link.seconds(hit // bs * block_bytes) + cost.step_seconds([(hit, n - hit)], [], 1)
    assert second.ttft == pytest.approx(expect, rel=1e-9)
    assert first.ttft == pytest.approx(cost.step_seconds([(0, n)], [], 1), rel=1e-9)
    assert engines[0]["kv_store"]["valkey"]["hit_tokens"] == 0
    assert engines[1]["kv_store"]["host"]["hit_tokens"] == 0  # its own host tier had nothing


def test_store_tiers_conserve_and_raise_hits_under_a_small_pool():
    """40 prompts of 1500 tokens, then the same 40 again, on two engines whose pools hold about 6: the
    second pass computes what the pool evicted unless a tier kept it. In the same order each prompt comes
    back to its engine (its host tier serves it); swapped, only a shared tier does."""
    prompts = [[1000 * i + j for j in range(1500)] for i in range(40)]
    small = CONFIG.__class__(max_num_batched_tokens=8192, max_num_seqs=256, num_kv_blocks=600)
    computed = {}
    for order, second in (("same", prompts), ("swapped", prompts[1:] + prompts[:1])):
        for tiers in ((), ("host:64GiB",), ("host:64GiB", "disk:/unused:1TiB", "valkey")):
            cluster = build_cluster({"engine": 2}, CostModel(load_model("llama-3.1-8b"), H100), load_link("nvlink"),
                                    small, kv_store=tiers)
            reqs = [SimRequest(p, 4) for p in prompts + second]
            results, _ = clock.run(simulate(load_strategy("round_robin"), cluster, reqs, 10.0, 1, 0))
            engines = engine_report(cluster)
            assert_conserved(results, engines)
            computed[order, len(tiers)] = sum(e["computed_tokens"] for e in engines)
    assert computed["same", 1] < 0.75 * computed["same", 0]
    assert computed["swapped", 3] < 0.75 * computed["swapped", 1]
    bad = sim_cli("--strategy", "round_robin", "--model", "llama-3.1-8b", "--kv-store", "tape:1GiB",
                  "--workload", "chat", "--rate", "1", "--num-requests", "2")
    assert bad.returncode == 2 and "host:SIZE" in bad.stderr


def test_store_tiers_publish_their_events_to_the_prefix_index():
    """As a real engine's store, a simulated tier tells the router what it stored and evicted (the shared
    tier only what it stored: Valkey evicts without telling), so `locate` sees the tiers at scale too."""
    small = CONFIG.__class__(max_num_batched_tokens=8192, max_num_seqs=256, num_kv_blocks=200)  # ~2 prompts
    cost = CostModel(load_model("llama-3.1-8b"), H100)
    block_mib = cost.model.kv_bytes_per_token * small.block_size / 2**20
    host = f"host:{int(285 * block_mib)}MiB"  # three prompts of 93 full blocks
    cluster = build_cluster({"engine": 1}, cost, load_link("nvlink"), small, kv_store=[host, "valkey"])
    prompts = [[1000 * i + j for j in range(1500)] for i in range(5)]  # one after another
    results, _ = clock.run(simulate(load_strategy("round_robin"), cluster, [SimRequest(p, 3) for p in prompts],
                                    None, 1, 0))
    assert all(r.ok for r in results)
    reach = lambda p: cluster.prefix_index.locate(p)[cluster.engines("engine")[0]]
    full = 1500 // 16 * 16
    # prompts 0 and 1 left the pool and then the host tier (its evicted events); the shared tier has them
    assert reach(prompts[0]) == reach(prompts[1]) == (0, 0, full)
    # prompt 2 left the pool (all or most of it) and is whole in the host tier (its stored events)
    assert reach(prompts[2]).pool < full and reach(prompts[2])[1:] == (full, full)
    # the last one is in the pool
    assert reach(prompts[4]) == (full, full, full)
    # the index's view of the host tier is the tier (stored minus evicted), full to its capacity
    host_tier = cluster.servers[0].backend.store.tiers[0]
    assert len(host_tier.held) == 285 and cluster.prefix_index._tiers["engine-0"]["host"] == set(host_tier.held)


def test_live_migration_in_closed_form_and_at_scale(tmp_path):
    """A request moved after k tokens (`cluster.migrate`, the calls of router/migration.py) on simulated
    engines: the gap between token k and k+1 is the transfer of the KV (the source computes nothing: the
    partial block is the stopped stream's kept tail) and the target's last-token step; the target
    computes nothing else."""
    from test_migration import MOVE
    from test_sim import COST, NVLINK

    path = tmp_path / "move_after.py"
    path.write_text(MOVE)
    n, out, k = 3000, 8, 3
    cluster = build_cluster({"engine": 2}, COST, NVLINK, CONFIG)
    (r,), _ = clock.run(simulate(load_strategy(str(path), {"after": str(k)}), cluster,
                                 [SimRequest(list(range(1, n + 1)), out)], None, 1, 0))
    engines = engine_report(cluster)
    assert_conserved([r], engines)
    # the source's send computes nothing: its prefix cache and the stopped stream's kept tail (the partial
    # block, engine/core/kv_manager.py) hold every position it sends
    gap = COST.transfer_seconds(n + k - 1, NVLINK) + COST.step_seconds([(n + k - 1, 1)], [], 1)
    assert r.output_tokens == out and r.itl[k - 1] == pytest.approx(gap, rel=1e-12)
    assert engines[1]["computed_tokens"] == out - k  # the last prompt token, then its decode steps
    assert engines[1]["kv_bytes_received"] == (n + k - 1) * COST.model.kv_bytes_per_token
    # the shipped rebalance strategy, moving on every chance, over a chat workload: nothing lost
    reqs = chat_requests(60)
    cluster = build_cluster({"engine": 3}, COST, NVLINK, CONFIG)
    strategy = load_strategy("rebalance", {"high": "-1", "margin": "-2", "min_tokens": "4"})
    results, _ = clock.run(simulate(strategy, cluster, reqs, 20.0, 1, 0))
    engines = engine_report(cluster)
    assert_conserved(results, engines)
    assert all(r.output_tokens == q.max_tokens for r, q in zip(results, reqs))
    assert sum(e["kv_bytes_sent"] for e in engines) > 0
