"""`microserve launch --ray` on a real local multi-node Ray cluster (`ray.cluster_utils.Cluster`, three
nodes), inside a private network namespace so that nothing leaves loopback. The scenario itself is
tests/ray_scenarios.py (it writes facts; the assertions are here):

- pd and round_robin: the engines land on two different Ray nodes; greedy output equals one engine's;
  KV moves between the nodes (the PD transfer counter);
- `ctl scale decode=2` under a bounded load of streams: none fails, the new engine takes requests;
- kill -9 of an engine with streams in flight: every stream completes with the same text, Ray restarts
  the actor, the engine re-joins on a new address and later requests succeed;
- `--planner queue` on round robin: idle, it drains one of the two engines and Ray stops its actor;
- Ctrl-C: the launcher exits 0 and leaves no engine process, no engine actor and no open engine port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def in_netns(cmd: str) -> list[str]:
    """Run `cmd` in a new network namespace with only loopback up (as root: unshare -n; else a user
    namespace too)."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is needed to confine the Ray tests to loopback"
    flags = "-n" if os.geteuid() == 0 else "-rn"
    return [unshare, flags, "sh", "-c", f"ip link set lo up && exec {cmd}"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_launch_on_a_three_node_ray_cluster(demo_path, tmp_path):
    out = tmp_path / "facts.json"
    cmd = f"{sys.executable} {ROOT / 'tests/ray_scenarios.py'} {demo_path} {out}"
    run = subprocess.run(in_netns(cmd), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.exists(), f"the scenario wrote nothing (exit {run.returncode}):\n{run.stderr[-4000:]}"
    f = json.loads(out.read_text())
    log = run.stderr[-4000:]
    print("seconds from the start:", {k: v for k, v in f.items() if k.endswith("_s")})  # NOTE: where the time goes
    assert f["ray_nodes"] == 3
    # pd: two nodes, exact output, KV between them
    assert len(set(f["pd_nodes"].values())) == 2, f["pd_nodes"]
    assert f["pd_equal"], log
    assert f["pd_kv_bytes"] > 0
    assert f["engine_nice"] == [f["own_nice"]], f["engine_nice"]  # NOTE: Ray's workers run at nice 15
    # scale under load
    assert f["scale_rc"] == 0, f["scale_err"]
    assert f["scale_load_equal"], log
    assert f["scale_after_equal"], log
    assert f["engines_after_scale"] == ["decode-0", "decode-1", "prefill-0"]
    assert f["decode1_routed"] > 0
    # kill -9: failover, Ray restart, re-join
    assert f["kill_streams_equal"], log
    assert f["rejoin_s"] is not None, log  # NOTE: None when it did not rejoin within the scenario's 120 s
    assert f["after_rejoin_equal"], log
    # round robin spread over two nodes
    assert len(set(f["rr_nodes"].values())) == 2, f["rr_nodes"]
    assert f["rr_equal"], log
    # launch --ray --planner queue: idle, one engine is drained and its actor stopped (checked at Ctrl-C too)
    assert len(f["rr_planned_engines"]) == 1 and f["rr_planner_applied"] == [{"engine": 1}], \
        (f["rr_planned_engines"], f["rr_planner_applied"], f.get("rr_planner_error"))
    assert f["rr_after_plan_equal"], log
    # Ctrl-C leaves nothing behind
    for tag in ("pd", "rr"):
        assert f[f"{tag}_exit"] == 0, log
        assert f[f"{tag}_engines_left"] == [] and f[f"{tag}_actors_left"] == [] and f[f"{tag}_ports_left"] == []


def test_launch_ray_without_ray_exits_2_with_the_install_command():
    code = ("import sys; sys.modules['ray'] = None; from microserve.cli import main; "
            "sys.exit(main(['launch', '--ray', '--strategy', 'strategies/round_robin.py', '--model', 'demo']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "pip install 'microserve[ray]'" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
