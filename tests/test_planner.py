"""Planners (`launch --planner FILE`, microserve/control/planner.py): a real PD deployment of the demo
model whose decode role `planners/queue.py` grows under a load step and shrinks after it, with every
request served as one engine serves it; planners that raise or answer garbage change nothing; the
command line's one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
from deploy import start_launch

from microserve.control.planner import PlannerError, load_planner, parse_bounds

KEY = "admin-secret"
PROMPTS = [f"planner load {i}: " + "words " * (3 + i) for i in range(8)]
TOKENS = 400  # NOTE: long enough that 8 streams queue on a decode engine of 2 slots for several intervals


def test_bounds_and_planner_files_are_checked(tmp_path):
    assert parse_bounds("prefill=1:4, decode=0:8") == {"prefill": (1, 4), "decode": (0, 8)}
    for bad in ("decode=4:1", "decode=1", "decode=a:b", "=1:2"):
        with pytest.raises(PlannerError, match="--scale-bounds"):
            parse_bounds(bad)
    planner = load_planner("queue", {"interval": "2.5", "calm": "4"})
    assert (type(planner).__name__, planner.interval, planner.calm) == ("QueuePlanner", 2.5, 4)
    with pytest.raises(PlannerError, match="no parameter 'nope'"):
        load_planner("slo", {"nope": "1"})
    with pytest.raises(PlannerError, match="interval must be > 0"):
        load_planner("slo", {"interval": "0"})
    (tmp_path / "none.py").write_text("x = 1\n")
    with pytest.raises(PlannerError, match=r"defines no microserve\.Planner subclass"):
        load_planner(tmp_path / "none.py")
    (tmp_path / "sync.py").write_text("from microserve import Planner\nclass P(Planner):\n    def plan(self, c, w):\n"
                                      "        return {}\n")
    with pytest.raises(PlannerError, match="async def"):
        load_planner(tmp_path / "sync.py")


async def test_the_slo_planner_sizes_roles_by_the_formula():
    """planners/slo.py on measured windows: prefill = the fewest engines at most 80% busy at which (M/M/c,
    Erlang C) at most 1% of the prompts wait past the TTFT target less their own compute, for the demand
    projected along its rise; decode = streams over what one engine holds at the ITL target (its streams
    scaled by target / measured ITL, 80% of it), and at least the engines whose KV the streams fill to 80%.
    Growing is at once; shrinking waits for `calm` intervals."""
    from microserve.control.planner import RoleWindow, Window

    def window(itl_p90: float, decode_running: int, prompt_rate: float = 2400.0, prefill: int = 1,
               kv: float | None = None, waiting: int = 0) -> Window:
        kv = (0.5 if decode_running else 0.0) if kv is None else kv
        return Window(10.0, 5.0, 50, 0, prompt_rate, 400.0, 0.5, 1.0, 1.5, 0.08, itl_p90, 0.12, roles={
            "prefill": RoleWindow(prefill, 1, 0, 0, 0.2, 900.0, 1000.0, 5.0, True),
            "decode": RoleWindow(2, decode_running, waiting, 0, kv, 400.0, 300.0, 5.0, True)})

    planner = load_planner("slo", {"itl_ms": "50", "ttft_ms": "2000"})
    # prefill: 5 prompts/s of 480 tokens, 0.48 s each on an engine of 1000 tokens/s (load 2.4): 80% busy at
    # most -> 3 engines; there P(wait > 2 - 0.48 s) = C(3, 2.4) e^(-(3/0.48 - 5) 1.52) = 0.647 x 0.150 = 0.097,
    # over 1%; with 4: 0.287 x 0.0063 = 0.0018 -> 4. decode: 8 streams per engine at 100 ms -> 4 at 50 ms, x0.8
    # = 3.2 -> ceil(16/3.2) = 5
    assert await planner.plan(None, window(0.100, 16)) == {"prefill": 4, "decode": 5}
    # a TTFT target no queue reaches: the 80% alone, ceil(2400 / 800) = 3
    lax = load_planner("slo", {"itl_ms": "50", "ttft_ms": "1e9"})
    assert (await lax.plan(None, window(0.100, 16)))["prefill"] == 3
    # a rising demand is sized ahead: +100 tokens/s an interval (10 s) for 12 intervals, the least-squares
    # slope (10 tokens/s per second) x 100 s ahead: 2100 + 1000 -> ceil(3100 / 800) = 4; without it 3
    for lookahead, want in (("100", {"prefill": 4}), ("0", {})):
        rising = load_planner("slo", {"ttft_ms": "1e9", "smoothing": "1", "lookahead": lookahead})
        wants = [await rising.plan(None, window(0.010, 2, 1000.0 + 100 * k, prefill=3)) for k in range(12)]
        assert wants[-1] == want, (lookahead, wants)
    # a queue on decode: its engines run all their slots (2 each), whatever the ITL says they could hold
    # (2 x 50 / 10 x 0.8 = 8): 4 running + 6 waiting over 2 per engine -> 5
    queued = load_planner("slo", {"itl_ms": "50", "ttft_ms": "2000"})
    assert (await queued.plan(None, window(0.010, 4, prefill=4, waiting=6)))["decode"] == 5
    assert "decode" not in await queued.plan(None, window(0.010, 4, prefill=4))  # no queue: 4 / 8 -> 1
    # under the target: 8 per engine at 25 ms -> 16 at 50 ms, x0.8 = 12.8 -> 2 decode engines, as now
    assert await planner.plan(None, window(0.025, 16, prefill=4)) == {}
    idle = load_planner("slo", {"calm": "3"})
    # nothing arrives, nothing runs: one engine each, after three intervals that want fewer
    assert [await idle.plan(None, window(0.0, 0, 0.0, prefill=3)) for _ in range(3)] == \
        [{}, {}, {"prefill": 1, "decode": 1}]
    # a missed target grows a role at once, whatever the formula says
    assert (await idle.plan(None, window(0.2, 2, 0.0)))["decode"] == 3
    # decode also by the KV its streams hold: 2 engines at 95% of their blocks -> ceil(2 x 0.95 / 0.8) = 3,
    # though the ITL is well under the target
    kv_bound = load_planner("slo", {"itl_ms": "50", "ttft_ms": "2000"})
    assert (await kv_bound.plan(None, window(0.010, 16, prefill=3, kv=0.95)))["decode"] == 3


def test_launch_refuses_a_bad_planner_before_any_engine_starts(tmp_path, capsys):
    from microserve.cli import main

    for extra, words in ((["--planner", str(tmp_path / "missing.py")], "not found"),
                         (["--planner", "queue", "--scale-bounds", "decode=3:1"], "--scale-bounds"),
                         (["--planner", "queue", "--planner-arg", "calm"], "expected NAME=VALUE"),
                         (["--scale-bounds", "decode=1:2"], "need --planner")):
        assert main(["launch", "--strategy", "pd", "--model", "demo", *extra]) == 2, words
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def ctl(dep, *args: str) -> dict:
    cmd = [sys.executable, "-m", "microserve", "ctl", "--url", dep.url, "--admin-key", KEY, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"not within {seconds:g}s: {what}"
        await asyncio.sleep(0.25)
    return value


async def admin(dep, method: str, path: str, body=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s, \
            s.request(method, dep.url + path, json=body) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
def planned(demo_path):
    dep = start_launch("--strategy", "pd", "--model", str(demo_path), "--served-model-name", "demo",
                       "--admin-key", KEY, "--log-level", "error", "--max-num-seqs", "2",
                       "--planner", "queue", "--planner-arg", "interval=1", "--planner-arg", "cooldown=0",
                       "--planner-arg", "calm=2", "--scale-bounds", "prefill=1:1,decode=1:2")
    yield dep
    assert dep.stop() == 0
    assert not dep.children(), "an engine process outlived the deployment"


async def test_a_load_step_grows_decode_and_it_shrinks_back_after(planned, demo_path):
    """8 streams of 400 tokens on a decode engine that runs 2 at a time: the queue planner (interval 1 s)
    asks for a second decode engine within two decisions of seeing the queue, the provisioner starts it,
    and once the load is gone (2 calm intervals) it drains it and its process exits. Every stream is
    what one engine gives alone; the metrics count the decisions."""
    import microserve

    dep = planned
    llm = microserve.LLM(str(demo_path))
    sampling = microserve.SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    want = dict(zip(PROMPTS, (o.text for o in llm.generate(PROMPTS, sampling))))
    del llm
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=300)

    async def one(prompt: str) -> str:
        out = await client.completions.create(model="demo", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
        return out.choices[0].text

    async def decode_engines() -> int:
        status, body = await admin(dep, "GET", "/admin/engines")
        assert status == 200, body
        return sum(1 for e in body["engines"] if e["role"] == "decode")

    # NOTE: each client sends its next request as soon as one ends, until the second engine serves: a fixed
    # batch of requests could end before the planner's next interval on a fast machine (it did, alone)
    stop, got = asyncio.Event(), []

    async def client_loop(i: int) -> None:
        n = i
        while not stop.is_set():
            got.append((PROMPTS[n % len(PROMPTS)], await one(PROMPTS[n % len(PROMPTS)])))
            n += 1

    load = asyncio.gather(*(client_loop(i) for i in range(len(PROMPTS))))
    await until(lambda: _grew(dep), 60, "the planner asked for a second decode engine")
    await until(lambda: _is(decode_engines, 2), 60, "a second decode engine serves")
    stop.set()
    await load
    assert all(text == want[prompt] for prompt, text in got), "a stream differs from one engine's"
    await until(lambda: _is(decode_engines, 1), 60, "decode shrank back to one engine after the load")
    await until(lambda: _children(dep, 2), 30, "the drained engine's process exited")

    decisions = ctl(dep, "planner", "--limit", "100")
    assert decisions["name"] == "QueuePlanner" and decisions["bounds"]["decode"] == [1, 2]
    steps = decisions["decisions"][::-1]  # oldest first
    queued = next(i for i, d in enumerate(steps) if d["window"]["roles"]["decode"]["waiting"] > 0)
    grew = next(i for i, d in enumerate(steps) if d["applied"].get("decode") == 2)
    assert grew - queued <= 1, steps[queued:grew + 1]
    assert any(d["applied"].get("decode") == 1 for d in steps[grew:])
    async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics") as r:
        text = await r.text()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("microserve_planner_decisions_total", "microserve_engines{",
                                   "microserve_requests_total", "microserve_requests_parked"))}
    model = 'model_name="demo"'
    assert samples[f'microserve_planner_decisions_total{{direction="up",{model},role="decode"}}'] == 1, samples
    assert samples[f'microserve_planner_decisions_total{{direction="down",{model},role="decode"}}'] == 1, samples
    assert samples[f'microserve_engines{{{model},role="decode"}}'] == 1, samples
    assert samples[f'microserve_requests_parked{{{model},role="decode"}}'] == 0, samples  # none refused KV here
    assert samples[f'microserve_requests_total{{{model},status="error"}}'] == 0, samples
    await client.close()


async def _grew(dep) -> bool:
    status, body = await admin(dep, "GET", "/admin/planner")
    return status == 200 and any(d["applied"].get("decode") == 2 for d in body["decisions"])


async def _is(count, n: int) -> bool:
    return await count() == n


async def _children(dep, n: int) -> bool:
    return len(dep.children()) == n


async def test_planners_that_raise_or_answer_garbage_change_nothing(planned, tmp_path):
    """Swapped in with PUT /admin/planner: a planner that raises, one that answers a list, one that names
    an unknown role and a count past the bounds. Each decision is recorded with its error or notes; the
    first three leave the cluster as it is, the last is clamped to the bound; requests are served."""
    dep = planned
    files = {
        "raises": "        raise RuntimeError('planner bug')\n",
        "garbage": "        return ['decode', 5]\n",
        "wild": "        return {'nope': 3, 'decode': 'many', 'prefill': 9}\n",
    }
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=120)
    for name, body in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text("from microserve import Planner\n\nclass P(Planner):\n    interval = 0.5\n"
                        "    async def plan(self, cluster, window):\n" + body)
        put_at = time.time()
        status, reply = await admin(dep, "PUT", "/admin/planner", {"path": str(path)})
        assert status == 200, reply

        async def decided(put_at=put_at):
            _, state = await admin(dep, "GET", "/admin/planner")
            newest = state["decisions"][0] if state["decisions"] else None
            return newest if newest and newest["planner"] == "P" and newest["time"] > put_at else None

        last = await until(decided, 10, f"a decision of the {name} planner")
        if name == "raises":
            assert "planner bug" in last["error"] and last["applied"] == {}
        elif name == "garbage":
            assert "not a dict" in last["notes"][0] and last["applied"] == {}
        else:
            assert any("unknown role 'nope'" in n for n in last["notes"]), last
            assert any("'many' is not an engine count" in n for n in last["notes"]), last
            assert any("prefill=9 clamped to 1" in n for n in last["notes"]), last
        assert last["engines"] == {"prefill": 1, "decode": 1}
        out = await client.completions.create(model="demo", prompt="still serving", max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason == "length"
    status, reply = await admin(dep, "PUT", "/admin/planner", {"source": "print('no')"})
    assert status == 403
    await client.close()
