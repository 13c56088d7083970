"""`microserve bench` against a real `microserve launch` (demo model), its workloads and report."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from deploy import ROOT, start_launch

from microserve.bench import report, workloads
from microserve.bench.loadgen import RequestResult

SUMMARY_KEYS = {"requests", "ok", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                "goodput", "slo", "ttft_s", "tpot_s", "itl_s", "e2e_s"}
REQUEST_KEYS = {"index", "start_s", "ok", "error", "ttft_s", "tpot_s", "e2e_s", "prompt_tokens", "output_tokens",
                "chunks"}


@pytest.fixture(scope="module")
def server():
    dep = start_launch("--strategy", "round_robin", "--model", "demo", "--engines", "1")
    yield dep
    assert dep.stop() == 0


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microserve", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("arrivals", [("--concurrency", "4"), ("--rate", "20")])
def test_bench_against_launch(server, tmp_path, arrivals):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cap = 12
    run = bench("--url", server.url, "--workload", "chat", *arrivals, "--num-requests", "10", "--seed", "3",
                "--tokens-per-word", "6", "--max-output-tokens", str(cap), "--slo-ttft-ms", "60000",
                "--out", str(out), "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert "TTFT" in run.stdout and "E2E (JCT)" in run.stdout
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and set(data["summary"]) == SUMMARY_KEYS
    assert data["config"]["model"] == "demo" and len(data["requests"]) == 10
    expected = workloads.load("chat", 10, 3, 6, cap)  # the same seeded workload
    for r, want in zip(data["requests"], expected):
        assert set(r) == REQUEST_KEYS
        assert r["ok"] and not r["error"]
        assert 0 < r["ttft_s"] <= r["e2e_s"], "the first token cannot come after the end"
        assert r["output_tokens"] == want.max_tokens, "ignore_eos: usage must count every requested token"
        assert r["prompt_tokens"] > 0 and 1 <= r["chunks"] <= r["output_tokens"]
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1))
    s = data["summary"]
    assert s["ok"] == 10 and s["failed"] == 0 and s["goodput"] == pytest.approx(s["request_throughput"])
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert s["output_throughput"] == pytest.approx(sum(w.max_tokens for w in expected) / data["duration_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_errors(server, tmp_path):
    dead = bench("--url", "http://127.0.0.1:9", "--workload", "chat", "--concurrency", "1", "--num-requests", "1")
    assert dead.returncode == 2 and "cannot reach" in dead.stderr and "Traceback" not in dead.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    run = bench("--url", server.url, "--workload", str(bad), "--concurrency", "1", "--num-requests", "1")
    assert run.returncode == 2 and "bad.jsonl:1" in run.stderr
    # requests the server refuses are counted as failures, with the reason, and exit 1
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 5000, "max_tokens": 4}) + "\n")
    run = bench("--url", server.url, "--workload", str(long), "--concurrency", "1", "--num-requests", "2")
    assert run.returncode == 1 and "0/2 ok" in run.stdout and "HTTP 400" in run.stderr


def test_workloads_are_seeded_and_shaped():
    assert workloads.synthetic("sonnet", 5, seed=1) == workloads.synthetic("sonnet", 5, seed=1)
    assert workloads.synthetic("chat", 5, seed=1) != workloads.synthetic("chat", 5, seed=2)
    sonnet = workloads.synthetic("sonnet", 50, seed=0, tokens_per_word=1.0)
    words = [len(r.prompt.split()) for r in sonnet]
    assert 2500 < np.mean(words) < 3500 and all(r.max_tokens == 100 for r in sonnet)
    # sonnet-llmperf: the same prompts, outputs drawn as LLMPerf draws them (normal(100, 80), drawn again
    # until positive: a truncated normal of mean 116 and sd 67)
    spread = workloads.synthetic("sonnet-llmperf", 400, seed=0, tokens_per_word=1.0)
    assert [r.prompt for r in spread[:50]] == [r.prompt for r in sonnet]
    outs = [r.max_tokens for r in spread]
    assert min(outs) >= 1 and 108 < np.mean(outs) < 124 and 58 < np.std(outs) < 76
    turns = workloads.synthetic("multi-turn", 12, seed=0)
    for a, b in itertools.pairwise(turns):
        if a.session == b.session:
            assert b.prompt.startswith(a.prompt) and len(b.prompt) > len(a.prompt)
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.synthetic("nope", 1)


def test_report_statistics():
    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.5]
    for q in (0, 50, 90, 99, 100):
        assert report.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    ok = RequestResult(0, 0.0, ok=True, ttft=0.1, e2e=1.0, output_tokens=10)
    slow = RequestResult(1, 0.0, ok=True, ttft=2.0, e2e=3.0, output_tokens=10)
    failed = RequestResult(2, 0.0, error="HTTP 500")
    s = report.summarize([ok, slow, failed], duration=2.0, slo={"ttft_s": 1.0})
    assert (s["ok"], s["failed"], s["goodput"], s["output_throughput"]) == (2, 1, 0.5, 10.0)
    assert ok.tpot == pytest.approx(0.1) and failed.tpot is None
