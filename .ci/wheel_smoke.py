"""Smoke test of an installed microserve, run by `.ci/wheel-smoke` from outside the clone with
the python of a fresh venv that has only the built wheel (and torch, openai) installed.

1. offline generate from the `demo` checkpoint, with the native CPU kernels loaded, and the store seals
   with AEGIS-128L (kvapi/csrc/);
2. `microserve launch --strategy pd --model demo --kv-store host:64MiB --stream-interval 3` answering the
   official `openai` client (a streamed request too);
3. `microserve sim` finding its hardware / model profiles and the shipped strategies;
4. `microserve launch --config FILE`: dist_attention on 3 engines serving a prompt longer than one engine's
   pool, beside a second model (round_robin) behind the same gateway.
Exits non-zero, saying why, when any of it fails (e.g. a wheel without microserve/csrc/).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLONE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"wheel smoke test FAILED: {what}")
    print(f"ok: {what}", flush=True)


def ready_line(proc: subprocess.Popen, timeout: float) -> dict[str, str]:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return dict(part.split("=", 1) for part in line.split()[1:])
    sys.exit(f"wheel smoke test FAILED: launch did not become ready (exit code {proc.poll()})")


def main() -> None:
    import microserve

    where = Path(microserve.__file__).resolve()
    check(CLONE is None or CLONE not in where.parents, f"microserve imports from the install ({where.parent})")

    # 1. offline generate, native kernels loaded
    llm = microserve.LLM("demo")
    out = llm.generate(["Hello, wheel"], microserve.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    kernels = llm.engine.stats().kernels
    check(len(out[0].token_ids) == 8, "offline generate from the demo checkpoint")
    check(kernels.startswith("native"), f"the native CPU kernels are loaded (kernels={kernels!r})")
    from kvapi.store.base import Seal

    cipher = Seal(b"wheel-ns").cipher
    check(cipher == "aegis128l", f"store entries are sealed with AEGIS-128L from the install (cipher={cipher!r})")

    # 2. launch --strategy pd with a host KV store tier, through the official openai client
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "microserve", "launch", "--strategy", "pd", "--model", "demo",
                             "--port", "0", "--kv-store", "host:64MiB", "--stream-interval", "3"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = ready_line(proc, 180)["url"]
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        resp = client.completions.create(model="demo", prompt="Hello, wheel", max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        check(resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length",
              "launch --strategy pd --model demo --kv-store host:64MiB answers the openai client")
        streamed = client.completions.create(model="demo", prompt="Hello, wheel", max_tokens=8, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
        check("".join(e.choices[0].text for e in streamed if e.choices) == resp.choices[0].text,
              "the same request streamed (engines at --stream-interval 3) gives the same text")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    check(code == 0, "launch stops cleanly on Ctrl-C")

    # 4. DistAttention: three engines of 1,024 tokens serve a 1,600-token prompt (token ids the demo knows),
    # one model of two behind the gateway (launch --config: YAML, so the wheel's pyyaml dependency is there)
    config = Path(tempfile.mkdtemp()) / "models.yaml"
    config.write_text("models:\n"
                      "  - {model: demo, served_model_name: demo, strategy: dist_attention, engines: 3,\n"
                      "     num_kv_blocks: 64, block_size: 16, max_num_batched_tokens: 256}\n"
                      "  - {model: demo, served_model_name: other, strategy: round_robin}\n")
    proc = subprocess.Popen([sys.executable, "-m", "microserve", "launch", "--config", str(config), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = ready_line(proc, 180)["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        check({m.id for m in client.models.list().data} == {"demo", "other"}, "launch --config serves two models")
        resp = client.completions.create(model="other", prompt="Hello, wheel", max_tokens=4, temperature=0)
        check(resp.model == "other" and resp.usage.completion_tokens > 0, "the second model answers")
        time.sleep(2.0)  # NOTE: the router's first stats poll tells the strategy every engine's free blocks
        resp = client.completions.create(model="demo", prompt=[(7 * i) % 250 + 5 for i in range(1600)],
                                         max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        check(resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens == 1600,
              "dist_attention serves a prompt longer than one engine's pool")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    check(code == 0, "that launch stops cleanly on Ctrl-C")

    # 3. sim finds its profiles and the shipped strategy
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "microserve", "sim", "--strategy", "pd", "--model",
                              "llama-3.1-8b", "--gpu", "h100", "--workload", "chat", "--rate", "2",
                              "--num-requests", "8", "--out", f"{tmp}/sim.json"], capture_output=True, text=True)
        ok = res.returncode == 0 and json.loads(Path(f"{tmp}/sim.json").read_text())["summary"]["ok"] == 8
        check(ok, "microserve sim runs from its packaged profiles" + ("" if ok else f": {res.stderr[-2000:]}"))


if __name__ == "__main__":
    main()
