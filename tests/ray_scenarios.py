"""`launch --ray` on a real local multi-node Ray cluster, run inside a private network namespace (only
loopback exists there: Ray and the engines can send nothing off the machine). tests/test_ray.py runs

    unshare -n sh -c 'ip link set lo up && python tests/ray_scenarios.py MODEL OUT.json'

and checks the facts this script writes to OUT.json; this script asserts nothing itself, so that a
failure shows up as a named fact in the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import openai
from deploy import ROOT, start_launch

KEY = "ray-admin"
PROMPTS = [f"Request {i}: the quick brown fox jumps over the lazy dog and" for i in range(8)]
TOKENS = 12


def _ours() -> dict[int, bytes]:
    """Command lines of this script's processes: its descendants, and (it is their subreaper, main()) the
    orphans of those, leaked ones included; not the processes of tests running beside it."""
    parents, argv = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            argv[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    return {pid: argv[pid] for pid in mine if pid != os.getpid() and pid in argv}


def engine_pids() -> dict[str, int]:
    """`microserve engine` processes of this script by engine id."""
    out = {}
    for pid, cmdline in _ours().items():
        argv = cmdline.split(b"\0")
        if b"engine" in argv and b"--engine-id" in argv and b"microserve" in argv:
            out[argv[argv.index(b"--engine-id") + 1].decode()] = pid
    return out


def actor_procs() -> list[str]:
    return [str(pid) for pid, cmdline in _ours().items() if b"EngineActor" in cmdline]


def port_open(address: str) -> bool:
    host, port = re.match(r"tcp://\[?([^\]]+?)\]?:(\d+)$", address).groups()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def admin(url: str, method: str = "GET", path: str = "/admin/engines", body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=300) as r:
        return json.loads(r.read())


def metric(url: str, name: str) -> float:
    text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url + "/metrics", timeout=10).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(client: openai.OpenAI, prompts: list[str], stream: bool = False) -> list[str | None]:
    """Greedy completions in threads (one per prompt); None for a failed request."""
    out: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        try:
            if stream:
                chunks = client.completions.create(model="demo", prompt=prompts[i], max_tokens=TOKENS,
                                                   temperature=0, stream=True)
                out[i] = "".join(c.choices[0].text for c in chunks)
            else:
                out[i] = client.completions.create(model="demo", prompt=prompts[i], max_tokens=TOKENS,
                                                   temperature=0).choices[0].text
        except Exception as exc:
            print(f"request {i} failed: {exc}", file=sys.stderr)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def drain(dep) -> None:
    """Keep reading the launcher's stdout after READY (Ray forwards its workers' output there)."""
    threading.Thread(target=lambda: [None for _ in dep.proc.stdout], daemon=True).start()


def stop_and_check(dep, facts: dict, tag: str) -> None:
    addresses = list(dep.engines.values()) + [e["address"] for e in admin(dep.url)["engines"]]
    facts[f"{tag}_exit"] = dep.stop(signal.SIGINT, timeout=90)
    deadline = time.time() + 30  # NOTE: actors and their engines go after the launch process exits
    while time.time() < deadline and (engine_pids() or actor_procs() or any(port_open(a) for a in set(addresses))):
        time.sleep(0.2)
    facts[f"{tag}_engines_left"] = sorted(engine_pids())
    facts[f"{tag}_actors_left"] = actor_procs()
    facts[f"{tag}_ports_left"] = [a for a in set(addresses) if port_open(a)]


def main(model: str, out: str) -> None:
    import ctypes

    from ray.cluster_utils import Cluster

    from microserve import LLM, SamplingParams

    # NOTE: orphans of this script's processes (an engine whose actor died) come to it, not to init, so
    # the checks of what is left see them, and only them (PR_SET_CHILD_SUBREAPER)
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    facts: dict = {}
    t0 = time.time()
    llm = LLM(model)
    ref = [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=TOKENS, temperature=0))]
    del llm
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    facts["ray_nodes"] = len(nodes) + 1
    facts["cluster_up_s"] = round(time.time() - t0, 1)
    try:
        # 1. PD across nodes, scale decode to 2 under load, kill -9 an engine with streams in flight
        dep = start_launch("--ray", cluster.address, "--strategy", str(ROOT / "strategies/pd.py"), "--model", model,
                           "--api-key", KEY, "--admin-key", KEY, "--served-model-name", "demo",
                           "--log-level", "warning", timeout=240)
        facts["pd_ready_s"] = round(time.time() - t0, 1)
        drain(dep)
        facts["pd_nodes"] = dict(item.split("@") for item in dep.ready["nodes"].split(","))
        # the engines run at this script's priority, not at the nice 15 of Ray's workers
        facts["engine_nice"] = sorted({os.getpriority(os.PRIO_PROCESS, pid) for pid in engine_pids().values()})
        facts["own_nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        client = openai.OpenAI(base_url=dep.base_url, api_key=KEY, max_retries=0, timeout=120)
        facts["pd_equal"] = complete(client, PROMPTS) == ref
        facts["pd_kv_bytes"] = metric(dep.url, "microserve_kv_transfer_bytes_total")

        load: list = []
        loader = threading.Thread(target=lambda: load.extend(complete(client, PROMPTS * 2, stream=True)))
        loader.start()
        time.sleep(0.5)
        scaled = subprocess.run([sys.executable, "-m", "microserve", "ctl", "--url", dep.url, "--admin-key", KEY,
                                 "scale", "decode=2"], capture_output=True, text=True, timeout=240)
        loader.join()
        facts["scale_rc"], facts["scale_err"] = scaled.returncode, scaled.stderr[-400:]
        facts["scale_load_equal"] = load == ref * 2
        after = complete(client, PROMPTS)
        facts["scale_after_equal"] = after == ref
        routed = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(dep.url + "/metrics").read()
        facts["decode1_routed"] = sum(float(line.rsplit(" ", 1)[1]) for line in routed.decode().splitlines()
                                      if line.startswith('microserve_engine_requests_total{engine="decode-1"'))
        engines = {e["id"]: e for e in admin(dep.url)["engines"]}
        facts["engines_after_scale"] = sorted(engines)
        facts["scaled_s"] = round(time.time() - t0, 1)

        old = engines["decode-0"]["address"]
        streams: list = []
        runner = threading.Thread(target=lambda: streams.extend(complete(client, PROMPTS, stream=True)))
        runner.start()
        time.sleep(0.3)
        os.kill(engine_pids()["decode-0"], signal.SIGKILL)
        runner.join()
        facts["kill_streams_equal"] = streams == ref
        deadline, rejoined = time.time() + 120, None
        while time.time() < deadline and rejoined is None:
            found = {e["id"]: e for e in admin(dep.url)["engines"]}.get("decode-0")
            if found and found["alive"] and found["address"] != old:
                rejoined = round(time.time() - (deadline - 120), 1)
            time.sleep(0.5)
        facts["rejoin_s"] = rejoined
        facts["after_rejoin_equal"] = complete(client, PROMPTS) == ref
        facts["rejoined_s"] = round(time.time() - t0, 1)
        stop_and_check(dep, facts, "pd")
        facts["pd_stopped_s"] = round(time.time() - t0, 1)

        # 2. round robin, two engines spread over the nodes; the queue planner gives one back once idle
        dep = start_launch("--ray", cluster.address, "--strategy", str(ROOT / "strategies/round_robin.py"),
                           "--engines", "2", "--placement", "spread", "--model", model, "--api-key", KEY,
                           "--admin-key", KEY, "--served-model-name", "demo", "--log-level", "warning",
                           "--planner", "queue", "--planner-arg", "interval=1", "--planner-arg", "calm=5",
                           "--planner-arg", "cooldown=0", "--scale-bounds", "engine=1:2", timeout=240)
        drain(dep)
        facts["rr_ready_s"] = round(time.time() - t0, 1)
        facts["rr_nodes"] = dict(item.split("@") for item in dep.ready["nodes"].split(","))
        client = openai.OpenAI(base_url=dep.base_url, api_key=KEY, max_retries=0, timeout=120)
        facts["rr_equal"] = complete(client, PROMPTS) == ref
        deadline = time.time() + 60

        def applied() -> list[dict]:  # NOTE: a decision is recorded once its drain and stop are done
            return [d["applied"] for d in admin(dep.url, path="/admin/planner")["decisions"] if d["applied"]]

        while (len(admin(dep.url)["engines"]) > 1 or not applied()) and time.time() < deadline:
            time.sleep(0.5)
        facts["rr_planned_engines"] = sorted(e["id"] for e in admin(dep.url)["engines"])
        facts["rr_planner_applied"] = applied()
        facts["rr_after_plan_equal"] = complete(client, PROMPTS) == ref
        facts["rr_planned_s"] = round(time.time() - t0, 1)
        stop_and_check(dep, facts, "rr")
    finally:
        cluster.shutdown()
        facts["total_s"] = round(time.time() - t0, 1)
        Path(out).write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
