"""Logs an operator reads (microserve/logs.py): startup and shutdown at INFO, one access line per request
with what it did, every 4xx/5xx with its code, a periodic stats line, and `--log-format json` that parses
line by line, engines included."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import openai
import pytest
from deploy import ROOT
from engines import read_ready

from microserve.logs import JSONFormatter, access
from microserve.options import serve_parser


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 1P1D launch logging JSON at INFO, a stats line every second; its stderr in a file."""
    err = tmp_path_factory.mktemp("logs") / "stderr.jsonl"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "microserve", "launch", "--port", "0", "--strategy", "pd",
                                 "--model", "demo", "--served-model-name", "demo", "--log-format", "json",
                                 "--log-level", "info", "--log-stats-interval", "1"],
                                stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    ready = read_ready(proc, 180)
    assert ready is not None, err.read_text()[-3000:]
    yield proc, ready["url"], err
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_access_error_stats_startup_and_shutdown_lines_in_json(logged):
    proc, url, err = logged
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    out = await client.completions.create(model="demo", prompt="logs tell the story", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="demo", prompt="x", max_tokens=5, temperature=-1)
    for _ in range(100):  # the stats line comes within its interval
        if any(r["logger"] == "microserve.stats" for r in records(err)):
            break
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(60) == 0
    recs = records(err)  # NOTE: every line parses as JSON, the engines' included
    served = [r for r in recs if r["logger"] == "microserve.access" and r["status"] == "success"]
    assert len(served) == 1, served
    line = served[0]
    assert line["request_id"] == out.id and line["strategy"] == "PD"
    assert line["engines"] == ["decode-0", "prefill-0"] and line["output_tokens"] == 5
    assert line["prompt_tokens"] == out.usage.prompt_tokens and line["finish_reason"] == "length"
    assert line["e2e_ms"] >= line["ttft_ms"] > 0
    refused = [r for r in recs if r["logger"] == "microserve.gateway.app" and r.get("status") == 400]
    assert refused and refused[0]["code"] == "bad_request" and refused[0]["path"] == "/v1/completions"
    stats = [r for r in recs if r["logger"] == "microserve.stats"]
    fields = {"req_per_s", "running", "waiting", "kv_use", "prefix_hit_rate", "store_hit_rate", "transfer_gb_per_s"}
    assert stats and fields <= set(stats[0])
    messages = [r["msg"] for r in recs]
    assert any(m.startswith("serving demo with PD") for m in messages)
    assert any(m.startswith("engine prefill-0 serving") for m in messages)
    assert any(m.startswith("shutting down") for m in messages)
    assert any(m == "engine decode-0 stopped" for m in messages)


def test_disable_log_requests_and_the_text_format(caplog):
    args = serve_parser().parse_args(["--strategy", "pd", "--disable-log-requests", "--log-stats-interval", "0"])
    assert args.disable_log_requests and args.log_stats_interval == 0 and args.log_level == "info"
    with caplog.at_level(logging.INFO, logger="microserve.access"):
        access("r1", "error", code="unavailable", strategy="PD", engines=["d-0"], prompt=3, e2e_s=0.5)
    assert caplog.records[0].getMessage() == ("request r1 error code=unavailable strategy=PD engines=d-0 "
                                              "prompt_tokens=3 output_tokens=0 cached_tokens=0 e2e_ms=500.0")
    assert json.loads(JSONFormatter().format(caplog.records[0]))["engines"] == ["d-0"]
