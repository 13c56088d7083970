"""The admin API, on the gateway: the cluster changes shape while it serves.

    GET    /admin/engines              {"engines": [{id, address, role, alive, running, waiting, kv blocks, KV bytes
                                       sent/received, prefix and tier hits, LoRA adapters and slot loads}],
                                       "router": {moves, retries}}
    POST   /admin/engines              {"address", "role"[, "id"]}: a running engine joins (takes traffic once it
                                       answers); with the join token and an "id" already here at that address,
                                       a 200 no-op (`engine --join` re-posts to re-join after an eviction)
    PUT    /admin/scale                {ROLE: N, ...}: start or drain-and-stop engines the deployment owns
                                       (launch's subprocesses, launch --ray's actors: control/provision.py)
    PATCH  /admin/engines/{id}         {"role"}: the next request sees it in that role
    DELETE /admin/engines/{id}         drain, then forget it: no new request goes there, and each request
                                       streaming from it moves with its KV to another engine of its role
                                       (`?migrate=0`: they finish there instead)
    GET    /admin/requests?limit=N     {"requests": [...]}: the last N requests (newest first) with the calls
                                       their strategy made (engine, call, start_ms, ms, bytes, error)
    GET    /admin/strategy             {"name", "args"}
    PUT    /admin/strategy             {"path"} (a file on the router's host), with "args": new requests use it,
                                       requests in flight finish under the old one; {"source"} (Python in the
                                       body) only with `--allow-code-upload`, refused before anything runs
    GET    /admin/planner              {"name", "source", "args", "bounds", "decisions": [newest first]} (404: none)
    PUT    /admin/planner              {"path", "args"}: the next interval uses it (starts one when there was none,
                                       on a deployment that starts its own engines); {"source"} as for strategies
    POST   /v1/load_lora_adapter       vLLM's runtime LoRA endpoints, on every engine (control/adapters.py)
    POST   /v1/unload_lora_adapter

With several models (`launch --config`), `?model=NAME` picks the model a call changes (default: the first;
a call on `/admin/engines/{id}` finds the engine's model itself) and `GET /admin/engines` lists every
model's engines, each with its `model`.

Every call needs `Authorization: Bearer <admin key>` (`--admin-key`). The API key never opens it: an
API client is not an operator. Without an admin key the admin API is off (403, and a log line at
start says so); engines holding the cluster's join token may still join and leave. Each change is
logged and counted (`microserve_admin_changes_total{action}`).
"""

from __future__ import annotations

import hmac
import logging
from functools import partial
from typing import Any

from aiohttp import web

from microserve.control import adapters
from microserve.control.planner import PlannerError, load_planner
from microserve.control.planning import Planning
from microserve.control.provision import ScaleError, scale
from microserve.control.uploads import error, load_file
from microserve.router.handle import EngineCallError
from microserve.router.runtime import Router
from microserve.router.strategy import StrategyError, load_strategy
from microserve.security import resolve

log = logging.getLogger("microserve.admin")


def _bearer(request: web.Request) -> bytes:
    # NOTE: surrogateescape: a header that is not UTF-8 is a wrong key (401), not a 500
    return request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode("utf-8", "surrogateescape")


class Admin:
    """Args:
        routers: the router whose cluster and strategy the API changes, or one per model by name.
        admin_key: the bearer key of every call (None: the API is off, but engines may join).
        allow_code_upload: `PUT /admin/strategy` may carry Python source to run in this process.
    """

    def __init__(self, routers: Router | dict[str, Router], admin_key: str | None,
                 allow_code_upload: bool = False) -> None:
        routers = routers if isinstance(routers, dict) else {"": routers}
        self.model, self.router = next(iter(routers.items()))
        self.key, self.allow_code_upload = admin_key, allow_code_upload
        self.peers = {name: self if r is self.router else Admin(r, admin_key, allow_code_upload)
                      for name, r in routers.items()}
        for name, peer in self.peers.items():
            peer.model = name

    def add_routes(self, app: web.Application) -> None:
        for method, path, name in (("GET", "/admin/engines", "list_engines"), ("POST", "/admin/engines", "add_engine"),
                                   ("PATCH", "/admin/engines/{id}", "set_role"),
                                   ("DELETE", "/admin/engines/{id}", "remove_engine"),
                                   ("GET", "/admin/strategy", "get_strategy"), ("GET", "/admin/requests", "requests"),
                                   ("PUT", "/admin/strategy", "put_strategy"), ("PUT", "/admin/scale", "scale"),
                                   ("GET", "/admin/planner", "get_planner"), ("PUT", "/admin/planner", "put_planner")):
            app.router.add_route(method, path, partial(self._dispatch, name))
        adapters.add_routes(self, app)  # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter

    def pick(self, request: web.Request) -> Admin:
        """The model's admin a call is for: `?model=NAME`, else the model of the engine `{id}` names, else the
        first model."""
        if (model := request.query.get("model")) is not None:
            if model not in self.peers:
                raise web.HTTPNotFound(text=f"no model {model!r} here; models: {', '.join(map(repr, self.peers))}")
            return self.peers[model]
        engine = request.match_info.get("id")
        for peer in self.peers.values():
            if engine is not None and any(h.name == engine for h in peer.router.cluster.handles):
                return peer
        return self

    async def _dispatch(self, name: str, request: web.Request) -> web.Response:
        # NOTE: the key first, so that an unknown ?model= tells a caller without it nothing
        if (refused := self._refused(request, join=name in ("add_engine", "remove_engine"))) is not None:
            return refused
        if name == "list_engines" and len(self.peers) > 1 and "model" not in request.query:
            return await self.list_all(request)
        return await getattr(self.pick(request), name)(request)

    def _refused(self, request: web.Request, join: bool = False) -> web.Response | None:
        """None when the caller holds the admin key (or, to add or remove an engine, the cluster's join
        token: `microserve engine --join`); else the error to answer."""
        if join and self._joining(request):
            return None
        if not self.key:
            return error(403, "the admin API is off: start the gateway with --admin-key")
        if not hmac.compare_digest(_bearer(request), self.key.encode()):
            return error(401, "the admin API needs Authorization: Bearer <admin key>")
        return None

    def _joining(self, request: web.Request) -> bool:
        """Whether the caller holds the cluster's join token (an engine of the cluster)."""
        cluster_key = resolve(self.router.cluster.cluster_key)
        return cluster_key is not None and hmac.compare_digest(_bearer(request), cluster_key.join_token.encode())

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text="malformed JSON body") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object")
        return body

    def _done(self, action: str, what: str) -> None:
        self.router.metrics.admin.labels(action).inc()
        log.warning("admin: %s", what)

    def _leaving(self, h, new_role: str | None) -> web.Response | None:
        """A 409 when this would take the last engine out of a role the strategy routes to."""
        roles = type(self.router.strategy).roles
        left = [x for x in self.router.cluster.roles.get(h.role, []) if x is not h]
        if h.role in roles and new_role != h.role and not left:
            return error(409, f"{h.name} is the last {h.role} engine of {type(self.router.strategy).__name__}; "
                          f"add another {h.role} engine first")
        return None

    def _handle(self, request: web.Request):
        try:
            return self.router.cluster.engine(request.match_info["id"])
        except KeyError:
            raise web.HTTPNotFound(text=f"no engine {request.match_info['id']!r}") from None

    async def list_all(self, request: web.Request) -> web.Response:
        """Every model's engines (each with its `model`), and the routers' moves and retries summed."""
        engines = [e for peer in self.peers.values() for e in peer._engines()]
        routers = [peer.router.metrics for peer in self.peers.values()]
        return web.json_response({"engines": engines, "router": {"moves": sum(_total(m.moves) for m in routers),
                                                                 "retries": sum(_total(m.retries) for m in routers)}})

    async def list_engines(self, request: web.Request) -> web.Response:
        m = self.router.metrics
        return web.json_response({"engines": self._engines(),
                                  "router": {"moves": _total(m.moves), "retries": _total(m.retries)}})

    def _engines(self) -> list[dict[str, Any]]:
        cluster = self.router.cluster
        out = []
        for h in cluster.handles:
            load = cluster.load(h)
            s = load.stats
            out.append({"id": h.name, "address": h.address, "role": h.role, "alive": h.alive,
                        "draining": h in cluster.draining, "running": s.running if s else 0,
                        "waiting": s.waiting if s else 0, "kv_blocks_used": s.kv_blocks_used if s else 0,
                        "kv_blocks_total": s.kv_blocks_total if s else 0,
                        "kv_bytes_sent": s.kv_bytes_sent if s else 0,
                        "kv_bytes_received": s.kv_bytes_received if s else 0,
                        "prefix_hit_tokens": s.prefix_cache_hit_tokens if s else 0,
                        "tier_hit_tokens": {t.tier: t.hit_tokens for t in s.kv_store} if s else {},
                        "loras": s.loras if s else [], "lora_loads": s.lora_loads if s else 0}
                       | ({"model": self.model} if self.model else {}))
        return out

    async def add_engine(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        address, role = body.get("address"), body.get("role")
        if not isinstance(address, str) or not isinstance(role, str) or not role:
            return error(400, "POST /admin/engines needs {\"address\": \"tcp://HOST:PORT\", \"role\": ROLE}")
        joining = self._joining(request)
        here = [h for h in self.router.cluster.handles if h.name == body.get("id") and h.address == address]
        if joining and here:  # a joined engine checking that it is still a member
            return web.json_response({"id": here[0].name, "address": address, "role": here[0].role})
        try:
            h = await self.router.cluster.add_engine(address, role, ready_timeout=float(body.get("timeout", 30)),
                                                     joined=joining)
        except ValueError as exc:
            return error(409, str(exc))
        except (EngineCallError, OSError) as exc:
            return error(502, f"the engine at {address} did not answer: {exc}")
        self._done("add", f"engine {h.name} ({address}) joined as {role}")
        return web.json_response({"id": h.name, "address": address, "role": role}, status=201)

    async def set_role(self, request: web.Request) -> web.Response:
        h, role = self._handle(request), (await self._body(request)).get("role")
        if not isinstance(role, str) or not role:
            return error(400, "PATCH /admin/engines/{id} needs {\"role\": ROLE}")
        old = h.role
        if (refused := self._leaving(h, role)) is not None:
            return refused
        self.router.cluster.set_role(h, role)
        self._done("role", f"engine {h.name}: role {old} -> {role}")
        return web.json_response({"id": h.name, "role": role})

    async def remove_engine(self, request: web.Request) -> web.Response:
        h = self._handle(request)
        if (refused := self._leaving(h, None)) is not None:
            return refused
        migrate = request.query.get("migrate", "1") not in ("0", "false", "no")
        await self.router.cluster.remove_engine(h, migrate=migrate)
        self._done("remove", f"engine {h.name} drained{' by migration' if migrate else ''} and removed")
        return web.json_response({"id": h.name, "removed": True})

    async def requests(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return error(400, "limit must be an integer")
        return web.json_response({"requests": self.router.journal.recent(limit)})

    async def get_strategy(self, request: web.Request) -> web.Response:
        s = self.router.strategy
        return web.json_response({"name": type(s).__name__,
                                  "args": {k: getattr(s, k) for k in type(s).parameters()}})

    async def put_strategy(self, request: web.Request) -> web.Response:
        strategy, _ = load_file(await self._body(request), "strategy", load_strategy,
                              (StrategyError, OSError, ValueError), self.allow_code_upload)
        if isinstance(strategy, web.Response):
            return strategy
        roles = self.router.cluster.roles
        missing = [r for r in type(strategy).roles if not roles.get(r)]
        if missing:
            return error(409, f"{type(strategy).__name__} routes to roles {', '.join(type(strategy).roles)}; the "
                          f"cluster has no engine with role {', '.join(missing)}")
        old, self.router.strategy = type(self.router.strategy).__name__, strategy
        self._done("strategy", f"strategy {old} -> {type(strategy).__name__} (requests in flight keep {old})")
        return web.json_response({"name": type(strategy).__name__})

    async def get_planner(self, request: web.Request) -> web.Response:
        if self.router.planning is None:
            return error(404, "no planner runs here (launch --planner FILE, or PUT /admin/planner)")
        return web.json_response(self.router.planning.describe())

    async def put_planner(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.router.engines is None:
            return error(409, "this deployment does not start its own engines (microserve router): a planner has "
                          "nothing to scale")
        planner, source = load_file(body, "planner", load_planner, (PlannerError, OSError), self.allow_code_upload)
        if isinstance(planner, web.Response):
            return planner
        args = body.get("args") or {}
        planning = self.router.planning
        if planning is None:
            planning = self.router.planning = Planning(self.router, self.router.engines, planner, None, source, args)
            planning.start()
        else:
            planning.swap(planner, source, args)
        self._done("planner", f"planner -> {type(planner).__name__} ({source})")
        return web.json_response({"name": type(planner).__name__})

    async def scale(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            roles = await scale(self.router, self.router.engines, body)
        except ScaleError as exc:
            return error(409, str(exc))
        except ValueError as exc:
            return error(400, str(exc))
        except (EngineCallError, OSError, RuntimeError, TimeoutError) as exc:
            return error(502, f"scaling failed: {exc}")
        self._done("scale", "scale " + ", ".join(f"{r}={n}" for r, n in body.items()))
        return web.json_response({"roles": roles})


def _total(counter) -> float:
    """A prometheus_client Counter's value (its `_total` sample)."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))
