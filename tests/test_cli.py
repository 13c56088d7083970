"""The `microserve` console script."""

import subprocess
import sys


def _run(*args, **kw):
    cmd = [sys.executable, "-m", "microserve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_generate_demo(demo_path):
    res = _run("generate", "--model", str(demo_path), "--prompt", "Hi", "--max-tokens", "5", "--ignore-eos")
    assert res.returncode == 0, res.stderr
    assert "(5 tokens, length)" in res.stdout


def test_generate_reports_bad_input(demo_path):
    res = _run("generate", "--model", str(demo_path), "--prompt", "")
    assert res.returncode == 2 and "prompt is empty" in res.stderr
    res = _run("generate", "--model", str(demo_path), "--prompt", "x", "--temperature", "-1")
    assert res.returncode == 2 and "temperature" in res.stderr


def test_engine_reports_bad_setup(demo_path, tmp_path):
    res = _run("engine", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2 and "config.json" in res.stderr and "Traceback" not in res.stderr
    res = _run("engine", "--model", str(demo_path), "--backend", "vllm")
    assert res.returncode == 2 and "vllm" in res.stderr
    res = _run("engine", "--model", str(demo_path), "--rpc", "not-an-address")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
