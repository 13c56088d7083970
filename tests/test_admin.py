"""The admin API and `microserve ctl` on a real deployment: an engine joins while serving, changes
role, is drained with streams in flight, and the strategy is replaced under load; every call needs
the admin key."""

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
from engines import spawn_engine

from microserve.router import EngineHandle

KEY = "admin-secret"  # the admin key
API = "api-secret"  # the API key: opens /v1/*, never /admin/*
METRICS = "metrics-secret"


@pytest.fixture(scope="module")
def setup(demo_path):
    dep = start_launch("--strategy", "strategies/round_robin.py", "--model", str(demo_path), "--engines", "1",
                       "--api-key", API, "--admin-key", KEY, "--metrics-key", METRICS, "--served-model-name", "demo",
                       "--log-level", "error")
    extra = spawn_engine(str(demo_path), "--num-kv-blocks", "256", "--log-level", "error", engine_id="joiner")
    yield dep, extra
    dep.stop()
    extra.stop()


def ctl(dep, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "microserve", "ctl", "--url", dep.url, *(["--admin-key", key] if key else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))


async def stream_all(client, n: int, max_tokens: int = 24) -> list[str]:
    async def one(i: int) -> str:
        text = ""
        async for event in await client.completions.create(model="demo", prompt=f"stream {i} " * 3, stream=True,
                                                           max_tokens=max_tokens, temperature=0,
                                                           extra_body={"ignore_eos": True}):
            text += event.choices[0].text if event.choices else ""
        return text

    return await asyncio.gather(*(one(i) for i in range(n)))


async def ctl_under_load(dep, client, *args: str) -> None:
    """`microserve ctl ARGS` while 8 streams run: it succeeds and every stream completes."""
    load = asyncio.ensure_future(stream_all(client, 8, max_tokens=48))
    await asyncio.sleep(0.3)
    done = ctl(dep, *args)
    assert done.returncode == 0, done.stderr
    texts = await load
    assert len(texts) == 8 and all(texts)


async def computed(address: str) -> int:
    async with EngineHandle(address, timeout=10) as h:
        return (await h.stats()).computed_tokens_total


async def test_the_admin_api_needs_its_key(setup, tmp_path):
    """Neither no key, a wrong one, a header that is not UTF-8 nor the API key opens the admin API; the
    admin key does, but even it cannot upload code without --allow-code-upload: refused before any of
    it runs. /metrics needs its own key."""
    dep, _ = setup
    marker = tmp_path / "ran"
    source = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n" + (
        "from microserve import Strategy\nclass S(Strategy):\n    roles = {'engine': 1}\n")
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API}"},
                        {"Authorization": "Bearer \xff\xfe"}):
            for method, path, body in (("GET", "/admin/engines", None), ("PUT", "/admin/scale", {"engine": 2}),
                                       ("PUT", "/admin/strategy", {"source": source})):
                async with s.request(method, dep.url + path, json=body, headers=headers) as r:
                    assert r.status == 401, (headers, path, r.status)
        async with s.put(dep.url + "/admin/strategy", json={"source": source},
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 403 and "--allow-code-upload" in (await r.json())["error"]["message"]
        assert not marker.exists()
        async with s.get(dep.url + "/metrics") as r:
            assert r.status == 401
        async with s.get(dep.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"}) as r:
            assert r.status == 200 and "microserve_" in await r.text()
    assert ctl(dep, "engines", key="wrong").returncode == 2
    assert ctl(dep, "engines", key=API).returncode == 2


async def test_join_role_strategy_and_drain_while_serving(setup):
    dep, extra = setup
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key=API, max_retries=0)
    listed = json.loads(ctl(dep, "engines").stdout)["engines"]
    assert [e["role"] for e in listed] == ["engine"]
    # an engine joins and takes a share of new requests at once
    added = ctl(dep, "add", extra.rpc, "--role", "engine")
    assert added.returncode == 0, added.stderr
    before = await computed(extra.rpc)
    await stream_all(client, 6)
    assert await computed(extra.rpc) > before, "the joined engine got no request"
    assert ctl(dep, "add", extra.rpc, "--role", "engine").returncode == 2  # already in
    # a role change shows at once; the last engine of a role cannot leave it
    assert ctl(dep, "role", "joiner", "spare").returncode == 0
    assert {e["id"]: e["role"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]}["joiner"] == "spare"
    first = listed[0]["id"]
    bad = ctl(dep, "role", first, "spare")
    assert bad.returncode == 2 and "last engine" in bad.stderr
    assert ctl(dep, "role", "joiner", "engine").returncode == 0
    # the strategy is replaced under load: nothing fails, the new one serves what comes next
    load = asyncio.ensure_future(stream_all(client, 8))
    await asyncio.sleep(0.2)
    swapped = ctl(dep, "strategy", "strategies/shortest_first.py", "--strategy-arg", "bucket=8")
    assert swapped.returncode == 0, swapped.stderr
    assert all(await load)
    async with aiohttp.ClientSession() as s, s.get(dep.url + "/admin/strategy",
                                                   headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert (await r.json()) == {"name": "ShortestFirst", "args": {"bucket": 8}}
    refused = ctl(dep, "strategy", "strategies/pd.py")  # no prefill / decode engines here
    assert refused.returncode == 2 and "no engine with role" in refused.stderr
    # drain the joined engine with streams running: every stream completes, then it is gone
    await ctl_under_load(dep, client, "remove", "joiner")
    assert [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]] == [first]
    async with aiohttp.ClientSession() as s, s.get(dep.url + "/metrics",
                                                   headers={"Authorization": f"Bearer {METRICS}"}) as r:
        metrics = await r.text()
    for action in ("add", "role", "strategy", "remove"):
        assert f'microserve_admin_changes_total{{action="{action}"' in metrics


async def test_an_engine_joins_with_the_cluster_key_and_leaves_on_sigterm(setup, demo_path):
    """`microserve engine --join URL`: no admin key needed (the cluster key authorizes it); it takes
    traffic, and on SIGTERM it drains its streams and deregisters before it exits."""
    from engines import start_engine, wait_engine

    dep, _ = setup
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key=API, max_retries=0)
    eng = wait_engine(start_engine(str(demo_path), "--num-kv-blocks", "256", "--log-level", "warning",
                                   "--join", dep.url, "--role", "engine", engine_id="volunteer"))
    try:
        for _ in range(100):
            ids = [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]]
            if "volunteer" in ids:
                break
            await asyncio.sleep(0.1)
        assert "volunteer" in ids
        before = await computed(eng.rpc)
        await stream_all(client, 6)
        assert await computed(eng.rpc) > before
        load = asyncio.ensure_future(stream_all(client, 8, max_tokens=48))
        await asyncio.sleep(0.3)
        eng.proc.terminate()  # SIGTERM: drain, deregister, exit
        texts = await load
        assert len(texts) == 8 and all(texts)
        assert eng.proc.wait(60) == 0
        assert "volunteer" not in [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]]
    finally:
        eng.stop()


async def test_an_engine_whose_join_is_refused_stops(setup, demo_path, tmp_path):
    """An engine of another cluster (another key) asks to join: the gateway refuses it, and the engine
    stops with an error instead of idling with nobody routing to it."""
    from engines import start_engine, wait_engine

    from microserve.security import ClusterKey

    dep, _ = setup
    other = tmp_path / "other.key"
    ClusterKey.generate().write(other)
    eng = wait_engine(start_engine(str(demo_path), "--num-kv-blocks", "64", "--log-level", "error", "--cluster-key",
                                   str(other), "--join", dep.url, "--role", "engine", engine_id="stranger"))
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, eng.proc.wait, 120) == 1
        assert "stranger" not in [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]]
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def elastic(demo_path):
    dep = start_launch("--strategy", "strategies/round_robin.py", "--model", str(demo_path), "--engines", "1",
                       "--api-key", API, "--admin-key", KEY, "--served-model-name", "demo", "--log-level", "error",
                       "--evict-after", "2")
    yield dep
    dep.stop()


def engine_ids(dep) -> list[str]:
    return [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]]


async def test_ctl_scale_starts_and_drains_launch_engines(elastic):
    """`ctl scale ROLE=N` on a plain `launch`: new engine subprocesses take requests; scaling down
    drains the newest and stops its process; a role the strategy needs cannot go to 0."""
    dep = elastic
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key=API, max_retries=0)
    load = asyncio.ensure_future(stream_all(client, 6))
    up = ctl(dep, "scale", "engine=2")
    assert up.returncode == 0, up.stderr
    assert all(await load)
    assert sorted(engine_ids(dep)) == ["engine-0", "engine-1"]
    new = next(e for e in json.loads(ctl(dep, "engines").stdout)["engines"] if e["id"] == "engine-1")
    before = await computed(new["address"])
    assert all(await stream_all(client, 6))
    assert await computed(new["address"]) > before, "the new engine got no request"
    assert len(dep.children()) == 2
    await ctl_under_load(dep, client, "scale", "engine=1")
    assert engine_ids(dep) == ["engine-0"]
    for _ in range(50):
        if len(dep.children()) == 1:
            break
        await asyncio.sleep(0.1)
    assert len(dep.children()) == 1, "the drained engine's process is still running"
    zero = ctl(dep, "scale", "engine=0")
    assert zero.returncode == 2 and "at least one engine" in zero.stderr
    bad = ctl(dep, "scale", "engine=two")
    assert bad.returncode == 2


async def test_a_joined_engine_that_stops_answering_is_evicted_and_rejoins(elastic, demo_path):
    import signal

    from engines import start_engine, wait_engine

    dep = elastic
    eng = wait_engine(start_engine(str(demo_path), "--num-kv-blocks", "256", "--log-level", "warning",
                                   "--join", dep.url, "--role", "engine", engine_id="flaky"))
    try:
        async def until(pred, seconds: float) -> bool:
            # NOTE: GET /admin/engines directly: a `ctl` process per poll cost a second each (ctl has its own test)
            deadline = time.monotonic() + seconds
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
                while time.monotonic() < deadline:
                    async with s.get(dep.url + "/admin/engines") as r:
                        if pred([e["id"] for e in (await r.json())["engines"]]):
                            return True
                    await asyncio.sleep(0.1)
            return False

        assert await until(lambda ids: "flaky" in ids, 10)
        eng.proc.send_signal(signal.SIGSTOP)  # it stops answering (a hung host, a partition)
        assert await until(lambda ids: "flaky" not in ids, 15), "not evicted"
        client = openai.AsyncOpenAI(base_url=dep.base_url, api_key=API, max_retries=0)
        assert all(await stream_all(client, 4))  # served by the other engine meanwhile
        eng.proc.send_signal(signal.SIGCONT)
        assert await until(lambda ids: "flaky" in ids, 15), "did not re-join"
        before = await computed(eng.rpc)
        assert all(await stream_all(client, 6))
        assert await computed(eng.rpc) > before
    finally:
        eng.proc.send_signal(signal.SIGCONT)
        eng.stop()


async def test_requests_journal_ctl_timelines_and_top(setup):
    """`GET /admin/requests` lists the last requests with the calls their strategy made; `ctl requests`
    prints them as timelines; `microserve top --once` shows the engines and the request rate."""
    dep, _ = setup
    client = openai.AsyncOpenAI(base_url=dep.base_url, api_key=API, max_retries=0)
    out = await client.completions.create(model="demo", prompt="journal me", max_tokens=3, temperature=0)
    async with aiohttp.ClientSession() as s, s.get(dep.url + "/admin/requests?limit=1",
                                                   headers={"Authorization": f"Bearer {KEY}"}) as r:
        last = (await r.json())["requests"]
    assert len(last) == 1 and last[0]["request_id"] == out.id and last[0]["status"] == "success"
    assert [c["call"] for c in last[0]["calls"]] == ["start_generate"] and last[0]["output_tokens"] == 3
    assert last[0]["calls"][0]["engine"] in [e["id"] for e in json.loads(ctl(dep, "engines").stdout)["engines"]]
    timeline = ctl(dep, "requests", "--limit", "1")
    assert timeline.returncode == 0 and out.id in timeline.stdout and "start_generate" in timeline.stdout
    top = subprocess.run([sys.executable, "-m", "microserve", "top", "--url", dep.url, "--admin-key", KEY, "--once"],
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    assert all(word in top.stdout for word in ("requests:", "moves", "PREFIX HITS", "KV SENT", "TIER HITS"))
    assert all(e["id"] in top.stdout
                                             for e in json.loads(ctl(dep, "engines").stdout)["engines"])
