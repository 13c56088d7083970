"""Chaos run: a 1P2D deployment with cache-aware decode choice and KV store tiers (host + Valkey), under a
bounded load of mixed requests, while faults are injected at random times (seeded); the invariants are
checked all along, and the run fails (exit code 1) on the first broken one.

    python benchmarks/chaos.py --minutes 60 --seed 1

Load: `--clients` workers, each sending one request after another, drawn (seeded) from: a completion,
streamed or not, `n` = 2, with logprobs, grammar-constrained (a regex), a long prompt, and client
disconnects at every phase (before the body is sent, before the first token, mid-stream). Prompts share
prefixes, so the prefix cache and the store tiers are hit.

Faults, one per segment of `--segment` seconds, at a random moment of it: kill -9 of any engine and its
restart (`DELETE /admin/engines/{id}`, `PUT /admin/scale`), SIGSTOP / SIGCONT of any engine, a drain
(`DELETE`, by migration) and a join (`PUT /admin/scale`), a kill and restart of the Valkey server, a
keyless flood of the decode engines' KV ports (300 idle connections each), corrupted or forged store
entries written straight into Valkey by a process without the cluster's key.

Invariants: every request ends with a 200 whose greedy text equals the reference (computed before any
fault) or a clear error (an HTTP error with an OpenAI error body, or a stream that ends with an `error`
event after a prefix of the reference), never a 200 with wrong text, and the gateway always answers; after
each segment, with the load paused, every engine is back to no running request, no open ticket, no send
in flight and no block held outside the prefix cache; the gateway's and engines' RSS stay bounded; the
prefix hit the router's index predicts on the decode engine is what its `prep_recv` reports for at least
`MIN_AGREEMENT` of the requests (events lag, and faults such as a Valkey restart empty a tier the index
still lists, so not for all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deploy import start_launch
from hostile import KVFlood

from kvapi.store.base import OVERHEAD, Seal
from kvapi.store.server import ValkeyProcess
from microserve.protocol import Request
from microserve.router import EngineCallError, EngineHandle
from microserve.sampling_params import SamplingParams
from microserve.security import ClusterKey

API, ADMIN = "chaos-api", "chaos-admin"
MAX_TOKENS = 12
FAULTS = ["kill9", "stop_cont", "drain_join", "valkey_restart", "flood", "corrupt_store"]
STRATEGY = '''"""1P2D with a cache-aware decode engine: where the most of the prompt is cached, unless busier."""
from microserve import Strategy


class CacheAwarePD(Strategy):
    roles = {"prefill": 1, "decode": 2}
    balance_requests = 2
    log = ""  # a file: per request, the prefix hit the router predicted on the decode engine and what it reported

    async def generate(self, req, cluster):
        prefill, idle = cluster.least_loaded("prefill"), cluster.least_loaded("decode")
        reach = cluster.prefix_index.locate(req)
        decode = max(cluster.engines("decode"), key=lambda e: (reach[e].pool if e in reach else 0,
                                                              -cluster.load(e).requests))
        if cluster.load(decode).requests > cluster.load(idle).requests + self.balance_requests:
            decode = idle
        end = len(req.prompt_ids) - 1
        ticket = await decode.prep_recv(req, end=end)
        if self.log and decode in cluster.health:
            bs = cluster.health[decode].kv_spec.block_size
            predicted = min(reach[decode].shared if decode in reach else 0, end // bs * bs)
            with open(self.log, "a") as f:
                f.write(f"{predicted} {ticket.matched}\\n")
        if ticket.matched < end:
            await prefill.remote_send(req, ticket.kv, begin=ticket.matched, end=end)
        async for chunk in decode.start_generate(req, begin=end):
            yield chunk
'''
KINDS = ("plain", "stream", "n2", "logprobs", "grammar", "long")
REGEX = "[a-z ]{4,40}"
MIN_AGREEMENT = 0.8  # of requests whose prefix hit the router's index predicted exactly (faults move some)


class Violation(AssertionError):
    pass


def prompts() -> dict[str, list[str]]:
    shared = ["You are a careful assistant. " * 6, "Summarize the following report. " * 5, "Translate this. " * 4]
    short = [f"{shared[i % 3]}Question {i}: what comes next?" for i in range(8)]
    long = [f"{shared[i % 3] * 12}Long question {i}." for i in range(3)]
    return {"short": short, "long": long}


def body_of(kind: str, prompt: str) -> dict:
    body = {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if kind == "stream":
        body["stream"] = True
    elif kind == "n2":
        body["n"] = 2
    elif kind == "logprobs":
        body["logprobs"] = 2
    elif kind == "grammar":
        body["guided_regex"] = REGEX
        del body["ignore_eos"]  # the grammar decides where the text may end
    return body


class Chaos:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # the load (its order depends on timing)
        self.fault_rng = random.Random(f"faults-{args.seed}")  # which fault, when: the same for a seed
        self.cycle: list[str] = []  # the kinds of fault still to inject in this round of six
        self.outcomes: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.violations: list[str] = []
        self.reference: dict[tuple[str, str], str] = {}
        self.rss: dict[str, list[int]] = {}
        self.pids: dict[str, int] = {}
        self.prompts = prompts()

    # -- setup -----------------------------------------------------------------------------------
    def start(self, tmp: Path) -> None:
        self.key_path = tmp / "cluster.key"
        self.key = ClusterKey.generate()
        self.key.write(self.key_path)
        os.environ["MICROSERVE_CLUSTER_KEY"] = str(self.key_path)
        self.valkey = ValkeyProcess(password=self.key.store_password)
        strategy = tmp / "cache_aware_pd.py"
        strategy.write_text(STRATEGY)
        os.environ["MICROSERVE_KV_HOST_DIR"] = str(tmp / "host")
        self.dep = start_launch(
            "--strategy", str(strategy), "--strategy-arg", f"log={tmp / 'hits.log'}", "--model", "demo",
            "--cluster-key", str(self.key_path),
            "--api-key", API, "--admin-key", ADMIN, "--served-model-name", "demo", "--num-kv-blocks", "384",
            "--kv-store", "host:32MiB", "--kv-store", self.valkey.url, "--max-retries", "3",
            "--request-timeout", "120", "--log-level", "critical", timeout=300)
        self.url = self.dep.url
        self.hits_log = tmp / "hits.log"

    async def engines(self, session: aiohttp.ClientSession) -> list[dict]:
        async with session.get(self.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            if r.status != 200:
                raise Violation(f"GET /admin/engines answered {r.status}: {await r.text()}")
            return (await r.json())["engines"]

    def engine_pid(self, engine_id: str) -> int | None:
        for pid in self.dep.children():
            with contextlib.suppress(OSError):
                if f"--engine-id\0{engine_id}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    # -- requests ----------------------------------------------------------------------------------
    async def request(self, session: aiohttp.ClientSession, kind: str, prompt: str,
                      disconnect: str = "") -> tuple[int, str | list[str] | None, str]:
        """(status, text or texts, how it ended); `disconnect` closes early: "early" (before an answer),
        "mid" (after the first streamed chunk)."""
        body = body_of(kind, prompt)
        if disconnect == "mid":
            body["stream"] = True
        headers = {"Authorization": f"Bearer {API}"}
        call = session.post(self.url + "/v1/completions", json=body, headers=headers)
        if disconnect == "early":
            task = asyncio.ensure_future(call.__aenter__())
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            task.cancel()
            with contextlib.suppress(BaseException):
                resp = await task
                resp.close()
            return 0, None, "disconnected"
        async with call as r:
            if r.status != 200:
                err = await r.json(content_type=None)
                if "error" not in err:
                    raise Violation(f"{r.status} without an error body: {err}")
                return r.status, None, str(err["error"].get("code") or r.status)
            if not body.get("stream"):
                data = await r.json()
                texts = [c["text"] for c in sorted(data["choices"], key=lambda c: c["index"])]
                if kind == "logprobs" and any(len(c["logprobs"]["tokens"]) != MAX_TOKENS for c in data["choices"]):
                    raise Violation(f"logprobs for {len(data['choices'][0]['logprobs']['tokens'])} tokens")
                return 200, texts, "ok"
            text, ended = "", "cut"
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ended = "ok"
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return 200, text, "error-event"
                text += "".join(c["text"] for c in event["choices"])
                if disconnect == "mid":
                    return 0, None, "disconnected"
            return 200, [text], ended

    def check(self, kind: str, prompt: str, status: int, texts, ended: str) -> None:
        ref = self.reference[(kind, prompt)]
        if status == 200 and ended == "ok":
            if any(t != ref for t in texts):
                raise Violation(f"a 200 with wrong text: {kind} {prompt[:40]!r}: {texts!r} != {ref!r}")
            self.outcomes["ok"] += 1
        elif ended == "error-event":
            if not ref.startswith(texts):
                raise Violation(f"a stream ended by an error after text that is not the reference's: {texts!r}")
            self.outcomes["error-event"] += 1
        elif ended == "cut":
            raise Violation(f"a stream ended without [DONE] or an error event: {kind}")
        else:
            self.outcomes[f"http-{status}"] += 1

    async def worker(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            kind = self.rng.choice(KINDS)
            prompt = self.rng.choice(self.prompts["long" if kind == "long" else "short"])
            disconnect = self.rng.choice(["early", "mid"]) if self.rng.random() < 0.15 else ""
            try:
                status, texts, ended = await asyncio.wait_for(self.request(session, kind, prompt, disconnect), 180)
            except Violation as exc:
                self.violations.append(str(exc))
                stop.set()
                return
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.violations.append(f"the gateway did not answer: {type(exc).__name__}: {exc}")
                stop.set()
                return
            if ended == "disconnected":
                self.outcomes["disconnected"] += 1
                continue
            try:
                self.check(kind, prompt, status, texts, ended)
            except Violation as exc:
                self.violations.append(str(exc))
                stop.set()
                return

    # -- faults --------------------------------------------------------------------------------------
    async def fault(self, session: aiohttp.ClientSession) -> str:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        live = [e for e in await self.engines(session) if e["alive"] and not e.get("draining")]
        if not self.cycle:  # NOTE: every kind once in each six faults, in a seeded order
            self.cycle = self.fault_rng.sample(FAULTS, len(FAULTS))
        name = self.cycle.pop()
        if name in ("kill9", "stop_cont", "drain_join") and not live:
            return "none"
        victim = self.fault_rng.choice(live) if live else None
        if name == "kill9":
            pid = self.engine_pid(victim["id"])
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(self.fault_rng.uniform(1.0, 3.0))
            await self.replace(session, victim, admin, migrate=False)
        elif name == "stop_cont":
            pid = self.engine_pid(victim["id"])
            if pid is not None:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(self.fault_rng.uniform(1.0, 4.0))
                os.kill(pid, signal.SIGCONT)
        elif name == "drain_join":
            await self.replace(session, victim, admin, migrate=True)
        elif name == "valkey_restart":
            port = self.valkey.port
            self.valkey.proc.kill()
            self.valkey.proc.wait()
            await asyncio.sleep(self.fault_rng.uniform(0.5, 3.0))
            self.valkey = ValkeyProcess(password=self.key.store_password, port=port)
        elif name == "flood":
            endpoints = await self.kv_ports([e for e in live if e["role"] == "decode"])
            with KVFlood(endpoints, 300):
                await asyncio.sleep(self.fault_rng.uniform(2.0, 6.0))
        elif name == "corrupt_store":
            await asyncio.get_running_loop().run_in_executor(None, self.corrupt_store)
        return name

    async def replace(self, session: aiohttp.ClientSession, victim: dict, admin: dict, migrate: bool) -> None:
        """A new engine of `victim`'s role joins (`PUT /admin/scale`), then `victim` leaves: drained by
        migration, or forgotten (dead); its process is stopped."""
        count = sum(e["role"] == victim["role"] for e in await self.engines(session))
        async with session.put(self.url + "/admin/scale", json={victim["role"]: count + 1}, headers=admin) as r:
            if r.status != 200:
                raise Violation(f"PUT /admin/scale answered {r.status}: {await r.text()}")
        async with session.delete(f"{self.url}/admin/engines/{victim['id']}?migrate={int(migrate)}",
                                  headers=admin) as r:
            if r.status != 200:
                raise Violation(f"DELETE {victim['id']} answered {r.status}: {await r.text()}")
        pid = self.engine_pid(victim["id"])
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    async def kv_ports(self, engines: list[dict]) -> list[str]:
        out = []
        for e in engines:
            async with EngineHandle(e["address"], name=e["id"], timeout=10) as h:
                r = Request(f"probe-{os.urandom(4).hex()}", list(range(5, 40)), SamplingParams(max_tokens=1))
                with contextlib.suppress(EngineCallError):
                    ticket = await h.prep_recv(r)
                    out.append(ticket.kv.endpoint)
                    await h.abort(r.request_id)
        return out

    def corrupt_store(self) -> None:
        """What a process that reaches Valkey without the cluster's key does: flip bytes, forge entries
        sealed under its own key, replay one entry under another key."""
        import redis

        client = redis.Redis(host=self.valkey.host, port=self.valkey.port, password=self.key.store_password)
        try:
            keys = list(client.scan_iter("mskv:*", count=1000))
            self.rng.shuffle(keys)
            for i, k in enumerate(keys[:30]):
                value = client.get(k)
                if value is None:
                    continue
                if i % 3 == 0:
                    data = bytearray(value)
                    data[self.rng.randrange(len(data))] ^= 0xFF
                    client.set(k, bytes(data))
                elif i % 3 == 1:
                    ns = bytes.fromhex(k.decode().split(":")[1])
                    h = int(k.decode().split(":")[2], 16)
                    client.set(k, bytes(Seal(ns, os.urandom(32)).seal(h, bytes(len(value) - OVERHEAD))))
                elif keys[i - 1] != k:
                    client.set(k, client.get(keys[i - 1]) or value)
        except redis.exceptions.RedisError:
            pass  # the server is restarting: nothing to corrupt now
        finally:
            client.close()

    # -- invariants after a segment ------------------------------------------------------------------
    async def settle(self, session: aiohttp.ClientSession) -> None:
        """With the load paused: every live engine holds no request, ticket or send, and no block
        outside its prefix cache (within 30 s); record RSS."""
        deadline = time.monotonic() + 30
        for e in await self.engines(session):
            if not e["alive"]:
                continue
            async with EngineHandle(e["address"], name=e["id"], timeout=10) as h:
                while True:
                    try:
                        s = await h.stats()
                    except EngineCallError:
                        break  # it died meanwhile (a fault of this segment): nothing to check
                    if (s.running == s.waiting == s.open_tickets == s.active_sends == 0
                            and s.kv_blocks_used == s.kv_blocks_cached):
                        break
                    if time.monotonic() > deadline:
                        raise Violation(f"engine {e['id']} did not return to baseline: {s}")
                    await asyncio.sleep(0.2)
        for name, pid in [("gateway", self.dep.proc.pid)] + [
                (e["id"], self.engine_pid(e["id"])) for e in await self.engines(session)]:
            if pid is None:
                continue
            with contextlib.suppress(OSError):
                kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
                self.rss.setdefault(name, []).append(kb)
        for name, samples in self.rss.items():
            if len(samples) >= 3 and samples[-1] > 1.5 * samples[0] + 200_000:
                raise Violation(f"RSS of {name} grew from {samples[0]} kB to {samples[-1]} kB")

    # -- the run -------------------------------------------------------------------------------------
    async def run(self) -> dict:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for kind in KINDS:
                for prompt in self.prompts["long" if kind == "long" else "short"]:
                    status, texts, ended = await self.request(session, kind, prompt)
                    if status != 200 or ended != "ok":
                        raise Violation(f"the reference run failed: {kind} {status} {ended}")
                    self.reference[(kind, prompt)] = texts[0]
                    if any(t != texts[0] for t in texts):
                        raise Violation(f"n=2 greedy choices differ: {texts!r}")
            await self.settle(session)
            end = time.monotonic() + self.args.minutes * 60
            segment = 0
            while (segment < self.args.segments if self.args.segments else time.monotonic() < end) \
                    and not self.violations:
                segment += 1
                stop = asyncio.Event()
                workers = [asyncio.ensure_future(self.worker(session, stop)) for _ in range(self.args.clients)]
                await asyncio.sleep(self.fault_rng.uniform(0.5, self.args.segment / 2))
                try:
                    name = await self.fault(session)
                except Violation as exc:
                    self.violations.append(str(exc))
                    name = "failed"
                self.faults[name] += 1
                await asyncio.sleep(max(0.0, self.args.segment / 2 - 1))
                stop.set()
                await asyncio.gather(*workers)
                if self.violations:
                    break
                try:
                    await self.settle(session)
                except Violation as exc:
                    self.violations.append(str(exc))
                print(f"segment {segment}: {name}; {dict(self.outcomes)}", flush=True)
        pairs = [line.split() for line in self.hits_log.read_text().splitlines()] if self.hits_log.exists() else []
        agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
        if pairs and agree < MIN_AGREEMENT:
            self.violations.append(f"the router predicted the decode engine's prefix hit exactly for only "
                                   f"{agree:.0%} of {len(pairs)} requests")
        return {"minutes": self.args.minutes, "seed": self.args.seed, "segments": segment,
                "prefix_hit_predicted_exactly": round(agree, 4),
                "prefix_hit_tokens_mean": round(sum(int(b) for _, b in pairs) / max(1, len(pairs)), 1),
                "requests": dict(self.outcomes), "faults": dict(self.faults), "violations": self.violations,
                "rss_kb": {k: [min(v), max(v)] for k, v in self.rss.items()}}

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.dep.stop()
        with contextlib.suppress(Exception):
            self.valkey.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--segments", type=int, default=0,
                   help="stop after this many segments instead (6: each fault once, in a seeded order)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=4, help="concurrent request loops")
    p.add_argument("--segment", type=float, default=12.0, help="seconds of load per injected fault")
    p.add_argument("--json", default="", help="also write the summary here")
    args = p.parse_args()
    chaos = Chaos(args)
    with tempfile.TemporaryDirectory(prefix="microserve-chaos-") as tmp:
        try:
            chaos.start(Path(tmp))
            try:
                summary = asyncio.run(chaos.run())
            except Violation as exc:
                summary = {"violations": [str(exc)], "requests": dict(chaos.outcomes), "faults": dict(chaos.faults)}
        finally:
            chaos.stop()
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
