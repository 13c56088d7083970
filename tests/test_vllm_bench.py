"""vLLM's own serving benchmark (`vllm bench serve`) against our gateway, unchanged and without
`--model`: it reads the model from `/v1/models` (`root` is the checkpoint, which it loads its
tokenizer from), sends random prompts and must count every request as successful.

It runs in the vLLM environment (`.ci/vllm-env`, `$MICROSERVE_VLLM_PYTHON`), through the module
behind the `vllm bench serve` command (`vllm.benchmarks.serve`: its own argument parser and
`main`); the `vllm` console script of the CPU build stops on an instruction this machine lacks
before it reaches the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from deploy import start_launch

PYTHON = os.environ.get("MICROSERVE_VLLM_PYTHON") or "/tmp/microserve-vllm-venv/bin/python"
BENCH = ("import argparse, sys; import vllm.benchmarks.serve as serve; p = argparse.ArgumentParser(); "
         "serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))")

pytestmark = pytest.mark.skipif(not Path(PYTHON).exists(), reason="needs the vLLM environment (.ci/vllm-env)")


@pytest.fixture(scope="module")
def dep(demo_path):
    d = start_launch("--strategy", "strategies/pd.py", "--model", str(demo_path), "--log-level", "error")
    yield d
    assert d.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_unchanged_without_model(dep, tmp_path, backend, endpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run(
        [PYTHON, "-c", BENCH, "--backend", backend, "--base-url", dep.url, "--endpoint", endpoint,
         "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
         "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json", "--num-warmups", "0"],
        capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 12 and result.get("failed", 0) == 0, result
    assert result["total_output_tokens"] == 12 * 8  # ignore_eos honoured: every request ran its length
