"""The `microserve` console script. Its one-line errors are checked in-process (`cli.main(argv)`, as
the console script calls it); what it runs, in a real process."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from microserve.cli import main


def _run(*args, **kw):
    cmd = [sys.executable, "-m", "microserve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """`microserve ARGS` in this process: its exit code and what it printed."""
    def run(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


def test_generate_demo(demo_path):
    res = _run("generate", "--model", str(demo_path), "--prompt", "Hi", "--max-tokens", "5", "--ignore-eos")
    assert res.returncode == 0, res.stderr
    assert "(5 tokens, length)" in res.stdout


def test_generate_reports_bad_input(demo_path, cli):
    res = cli("generate", "--model", str(demo_path), "--prompt", "")
    assert res.returncode == 2 and "prompt is empty" in res.stderr
    res = cli("generate", "--model", str(demo_path), "--prompt", "x", "--temperature", "-1")
    assert res.returncode == 2 and "temperature" in res.stderr


def test_engine_reports_bad_setup(demo_path, tmp_path, cli):
    res = cli("engine", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such checkpoint folder" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "empty").mkdir()
    res = cli("engine", "--model", str(tmp_path / "empty"))
    assert res.returncode == 2 and "config.json" in res.stderr and "Traceback" not in res.stderr
    res = cli("engine", "--model", str(demo_path), "--backend", "vllm")
    assert res.returncode == 2 and "vllm" in res.stderr
    res = cli("engine", "--model", str(demo_path), "--rpc", "not-an-address")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


@pytest.mark.parametrize("args, words", [
    (["launch", "--strategy", "round_robin", "--model", "demo", "--engines", "0"], "--engines N needs"),
    (["launch", "--strategy", "round_robin", "--model", "/nonexistent/ckpt"], "no such checkpoint folder"),
    (["engine", "--model", "demo", "--rpc", "tcp://127.0.0.1:99999"], "port must be in 1-65535"),
    (["engine", "--model", "demo", "--rpc", "ipc:///tmp/x"], "expected tcp://"),
    (["engine", "--model", "demo", "--tensor-parallel-size", "2"], "needs --backend vllm"),
    (["launch", "--strategy", "round_robin", "--model", "demo", "-tp", "2"], "needs --backend vllm"),
    (["engine", "--model", "demo", "--tokenizer", "/nonexistent/tok"], "no such folder"),
    (["engine", "--model", "demo", "--backend", "vllm", "--max-prefill-tokens", "256"], "built-in engine option"),
    (["engine", "--model", "demo", "--max-prefill-tokens", "0"], "expected a whole number >= 1"),
    (["launch", "--strategy", "round_robin", "--model", "demo", "--chat-template", "/nonexistent.jinja"],
     "no such file"),
    (["launch", "--strategy", "round_robin", "--model", "demo", "--generation-config", "/nonexistent"],
     "no generation_config.json"),
    (["sim", "--strategy", "pd", "--roles", "engine=2", "--workload", "chat", "--rate", "1", "--num-requests", "2"],
     "needs role(s) prefill"),
    (["sim", "--strategy", "pd", "--engines", "2", "--workload", "chat", "--rate", "1", "--num-requests", "2"],
     "--engines N needs"),
])
def test_impossible_layouts_and_addresses_are_one_line_errors(args, words, cli):
    res = cli(*args)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_sim_takes_engines_as_launch_does(tmp_path):
    out = tmp_path / "o.json"
    res = subprocess.run([sys.executable, "-m", "microserve", "sim", "--strategy", "round_robin", "--engines", "3",
                          "--workload", "chat", "--rate", "4", "--num-requests", "6", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(out.read_text())["config"]["roles"] == {"engine": 3}


@pytest.mark.parametrize("command", [["engine", "--model", "demo"],
                                     ["launch", "--strategy", "pd", "--model", "demo"]])
def test_transport_nixl_without_nixl_exits_2_with_the_install_line(command):
    """Without the `nixl` extra, `--transport nixl` stops before anything starts and says how to get it."""
    hide = ("import sys; sys.modules.update(dict.fromkeys(['nixl_cu12', 'nixl_cu13'])); "
            "from microserve.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", hide, *command, "--transport", "nixl"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "pip install 'microserve[nixl]'" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr


def test_an_engine_seed_makes_unseeded_sampling_repeat(demo_path):
    from microserve import LLM, SamplingParams

    sp = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    runs = [LLM(demo_path, seed=s).generate(["seeded engine"] * 2, sp) for s in (7, 7, 8)]
    tokens = [[o.token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_max_prefill_tokens_defaults_to_512_on_cpu_and_no_limit_on_cuda():
    import argparse

    from microserve.engine_knobs import engine_knobs, prefill_tokens

    parser = argparse.ArgumentParser(parents=[engine_knobs()])
    assert prefill_tokens(parser.parse_args([])) == 512
    assert prefill_tokens(parser.parse_args(["--device", "cuda"])) is None
    assert prefill_tokens(parser.parse_args(["--device", "cuda", "--max-prefill-tokens", "1024"])) == 1024
