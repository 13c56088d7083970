"""`microserve launch --ray [ADDRESS]`: the engines as Ray actors across a Ray cluster's nodes; the
router and the gateway on the driver (this process).

    driver: launch --ray                              a node of the Ray cluster
      ray.init(ADDRESS | auto | a local cluster)
      placement group, one bundle per engine ──────>  EngineActor (--engine-cpus CPUs, or 1 GPU)
        (--placement spread | pack)                     └─ `microserve engine` subprocess bound to the node's
      EngineActor.info() -> its RPC address                address, MICROSERVE_HOST_ID = the Ray node id (so
      Cluster + Router + Gateway (launch.serve)            `--transport auto` takes shm within a node, tcp/ucx
      Registry actor: the gateway's URL <───────────       across), the cluster key in a private 0600 file
                                                        the engine exits ─> the actor exits ─> Ray restarts it
                                                        (--engine-restarts) ─> the new engine --join's the
                                                        gateway (URL from the Registry) and replaces the dead one

`ctl scale ROLE=N` starts more actors or drains and kills some (`RayEngines` is a `Provisioner`).
At exit every actor stops its engine and is killed; a Ray cluster that `launch` started is shut down.
Ray is an extra (`pip install 'microserve[ray]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from microserve.control.provision import Names, Started

log = logging.getLogger("microserve.ray")
INSTALL = "pip install 'microserve[ray]'"


@dataclass
class RayOptions:
    address: str = "auto"  # "auto": the Ray cluster this host belongs to, else a new local one
    placement: str = "spread"  # spread | pack: the engines' placement group strategy
    engine_cpus: float = 1.0  # CPUs per engine actor (also its intra-op threads)
    restarts: int = 3  # Ray restarts of a failed engine actor (-1: no limit)
    ready_timeout: float = 300.0  # placement and engine start


@dataclass
class EngineSpec:
    """What an actor needs to (re)start its engine; passed to Ray as the actor's arguments."""

    model: str
    engine_id: str
    role: str
    engine_args: list[str]
    key_text: str  # the cluster key file's content (written 0600 on the node)
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray




class EngineActor:
    """One `microserve engine` process owned by a Ray actor (wrapped with `ray.remote` at launch)."""

    def __init__(self, spec: EngineSpec, registry: str) -> None:
        import warnings

        import ray

        ctx = ray.get_runtime_context()
        self.node, self.ip, self.spec = ctx.get_node_id(), ray.util.get_node_ip_address(), spec
        self.stopping = False
        self.dir = tempfile.mkdtemp(prefix="microserve-ray-")  # mode 0700
        self.cleanup = [self.dir]
        key = Path(self.dir) / "cluster.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(spec.key_text)
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        cmd = [sys.executable, "-m", "microserve", "engine", "--model", spec.model, "--engine-id", spec.engine_id,
               "--rpc", f"tcp://{host}:*", "--events", f"tcp://{host}:*", "--kv-host", self.ip,
               "--cluster-key", str(key), *spec.engine_args]
        with warnings.catch_warnings():  # NOTE: Ray 2.60 warns about its own use of a deprecated call here
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        if restarted:  # Ray restarted this actor: its engine joins the gateway again
            cmd += ["--join", ray.get(ray.get_actor(registry).url.remote()), "--role", spec.role]
        env = {**os.environ, **spec.env, "MICROSERVE_HOST_ID": self.node, "OMP_NUM_THREADS": str(spec.threads)}
        if any(a.startswith("host:") for a in spec.engine_args):  # the host KV tier: a private file on this node
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            env["MICROSERVE_KV_HOST_DIR"] = tempfile.mkdtemp(prefix="kv-", dir=shm or self.dir)
            self.cleanup.append(env["MICROSERVE_KV_HOST_DIR"])
        from microserve.control.local_engines import _die_with_parent

        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True, preexec_fn=_die_with_parent)
        self.fields: dict[str, str] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.fields = dict(part.split("=", 1) for part in line.split()[1:])
                break
        else:
            code = self.proc.wait()
            self._remove()
            raise RuntimeError(f"engine {spec.engine_id} on node {self.node} exited with code {code} before it was "
                               "ready (its error is in the lines above)")
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:  # keep the pipe drained
            pass
        code = self.proc.wait()
        if not self.stopping:  # the engine died: so does this actor, and Ray restarts it (max_restarts)
            print(f"engine {self.spec.engine_id} exited with code {code}; its actor exits for Ray to restart it",
                  file=sys.stderr, flush=True)
            self._remove()
            os._exit(1)

    def _remove(self) -> None:
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def info(self) -> dict[str, str]:
        return {"engine_id": self.spec.engine_id, "rpc": self.fields["rpc"], "node": self.node, "ip": self.ip,
                "pid": str(self.proc.pid)}

    def stop(self, grace: float = 15.0) -> int:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._remove()
        return self.proc.wait()


class Registry:
    """Holds the gateway's URL for engines whose actor Ray restarted (they join it)."""

    def __init__(self) -> None:
        self._url = ""

    def set(self, url: str) -> None:
        self._url = url

    def url(self) -> str:
        return self._url


class RayEngines:
    """The deployment's engine actors (a `Provisioner`: `ctl scale` starts and stops more)."""

    def __init__(self, ray, opts: RayOptions, model: str, engine_args: list[str], key_text: str,
                 device: str = "cpu") -> None:
        self.ray, self.opts, self.model, self.engine_args = ray, opts, model, engine_args
        self.key_text, self.device, self.names = key_text, device, Names()
        self.actors: dict[str, object] = {}
        self.placed: dict[str, Started] = {}
        self.groups: list = []
        self.registry_name = f"microserve-registry-{uuid.uuid4().hex}"
        self.registry = ray.remote(num_cpus=0)(Registry).options(name=self.registry_name).remote()
        self.threads = max(1, int(opts.engine_cpus))
        self._cls = ray.remote(EngineActor)

    def _actor(self, role: str, engine_id: str, **scheduling):
        gpus = 1 if self.device.startswith("cuda") else 0
        env = {k: v for k, v in os.environ.items() if k.startswith("MICROSERVE_")
               and k not in ("MICROSERVE_CLUSTER_KEY", "MICROSERVE_KV_HOST_DIR")}  # NOTE: paths of this host
        spec = EngineSpec(self.model, engine_id, role, self.engine_args, self.key_text, self.threads, env)
        # NOTE: Ray runs workers at nice 15 and the engine inherited it: a busy node's scraps (80 s starts, not 8)
        actor = self._cls.options(num_cpus=self.opts.engine_cpus, num_gpus=gpus, max_restarts=self.opts.restarts,
                                  runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
                                  max_task_retries=0, **scheduling).remote(spec, self.registry_name)
        self.actors[engine_id] = actor
        return actor

    async def _ready(self, ids: list[str]) -> list[Started]:
        try:
            infos = await asyncio.wait_for(asyncio.gather(*(self.actors[i].info.remote() for i in ids)),
                                           self.opts.ready_timeout)
        except BaseException:
            await asyncio.gather(*(self.stop(i) for i in ids), return_exceptions=True)
            raise
        out = [Started(i["engine_id"], i["rpc"], i["node"]) for i in infos]
        self.placed.update({s.engine_id: s for s in out})
        for s, i in zip(out, infos):
            log.warning("engine %s on Ray node %s (%s), pid %s", s.engine_id, s.node[:12], i["ip"], i["pid"])
        return out

    async def start_layout(self, layout: Mapping[str, int]) -> dict[str, list[Started]]:
        """The initial engines, in one placement group (`--placement`)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": self.opts.engine_cpus, **({"GPU": 1} if self.device.startswith("cuda") else {})}
        slots = [(role, self.names.new(role)) for role, n in layout.items() for _ in range(n)]
        group = placement_group([dict(bundle)] * len(slots), strategy=self.opts.placement.upper())
        self.groups.append(group)
        try:
            await asyncio.wait_for(group.ready(), min(60.0, self.opts.ready_timeout))
        except TimeoutError:
            raise ValueError(f"the Ray cluster has no room for {len(slots)} engines of {bundle} "
                             f"(--placement {self.opts.placement}); its resources: "
                             f"{self.ray.cluster_resources()}; lower --engine-cpus or add nodes") from None
        for i, (role, eid) in enumerate(slots):
            self._actor(role, eid, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i))
        started = await self._ready([eid for _, eid in slots])
        out: dict[str, list[Started]] = {}
        for (role, _), s in zip(slots, started):
            out.setdefault(role, []).append(s)
        return out

    # -- Provisioner -------------------------------------------------------------------------
    def attach(self, cluster, url: str = "") -> None:
        if url:
            self.registry.set.remote(url)

    async def start(self, role: str, count: int) -> list[Started]:
        ids = [self.names.new(role) for _ in range(count)]
        for eid in ids:
            self._actor(role, eid, scheduling_strategy="SPREAD" if self.opts.placement == "spread" else "DEFAULT")
        return await self._ready(ids)

    async def stop(self, engine_id: str) -> None:
        actor = self.actors.pop(engine_id, None)
        self.placed.pop(engine_id, None)
        if actor is None:
            return
        with contextlib.suppress(Exception):  # NOTE: a dead or never-started actor has nothing to stop
            await asyncio.wait_for(actor.stop.remote(), 30.0)
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)

    def owns(self, engine_id: str) -> bool:
        return engine_id in self.actors

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(eid) for eid in list(self.actors)), return_exceptions=True)
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        with contextlib.suppress(Exception):
            self.ray.kill(self.registry)


def connect(ray, address: str, host: str) -> bool:
    """Join the Ray cluster at `address` ("auto": this host's, else start one); True if started here."""
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address != "auto":
        ray.init(address=address, **quiet)
        return False
    try:
        ray.init(address="auto", **quiet)
        return False
    except ConnectionError:
        # NOTE: a local cluster binds the gateway's address (loopback by default), not every interface
        ray.init(include_dashboard=False, _node_ip_address=host if host not in ("0.0.0.0", "::") else None, **quiet)
        return True


async def launch_on_ray(strategy, model: str, layout: Mapping[str, int], engine_args: list[str], opts,
                        tokenizer, key, ray_opts: RayOptions) -> int:
    """`launch --ray`: engines as actors, then `launch.serve` over them until SIGINT/SIGTERM."""
    from microserve.launch import serve
    from microserve.router.cluster import Cluster
    from microserve.router.handle import EngineHandle

    ray = import_ray()
    device = next((engine_args[i + 1] for i, a in enumerate(engine_args[:-1]) if a == "--device"), "cpu")
    started_here = connect(ray, ray_opts.address, opts.host)
    engines = RayEngines(ray, ray_opts, model, engine_args, Path(key.source).read_text(), device)
    try:
        placed = await engines.start_layout(layout)
        cluster = Cluster({role: [EngineHandle(s.rpc, name=s.engine_id, role=role, cluster_key=key) for s in ss]
                           for role, ss in placed.items()}, cluster_key=key)
        nodes = ",".join(f"{s.engine_id}@{s.node}" for ss in placed.values() for s in ss)
        return await serve(cluster, strategy, tokenizer, opts, engines, ready_extra=f" nodes={nodes}")
    finally:
        await engines.close()
        ray.shutdown()
        if started_here:
            log.info("stopped the local Ray cluster this launch started")
