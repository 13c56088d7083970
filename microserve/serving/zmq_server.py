"""`microserve engine`: one engine serving the microserving calls over ZeroMQ.

    ROUTER (--rpc)   [identity, call_id, body] ─> decode_call ─> dispatch(service) ─> [identity, call_id, reply]...
    PUB (--events)   KVEvent for every batch of blocks stored in / evicted from the prefix cache
    KVPlane          the KV data plane: receiver (control socket, shared or registered pool) and sender

Every call runs in its own task; a malformed frame or body gets an `RPCError` reply
and changes nothing. SIGTERM/SIGINT: stop taking calls, abort what runs, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from kvapi.transfer import host_id
from kvapi.transfer.base import transport_class
from kvapi.transfer.shm import SharedPool
from microserve import protocol, tracing
from microserve.engine.config import EngineConfig
from microserve.engine.engine import LLMEngine
from microserve.serving.api import EngineError, ErrorCode, dispatch
from microserve.serving.attend_server import AttendServer
from microserve.serving.base import EngineService
from microserve.serving.builtin import BuiltinBackend
from microserve.serving.engine_options import EngineOptions, check_addresses, check_security, check_store
from microserve.serving.kv_plane import KVPlane, pick_transports

if TYPE_CHECKING:
    import torch

    from kvapi.spec import KVSpec

log = logging.getLogger("microserve.engine")


class ZMQFrontend:
    """One engine process's network front: its backend and `EngineService` built from `EngineOptions`,
    the RPC socket (ZeroMQ ROUTER, every call through `dispatch`) and the PUB socket of its KV events."""

    def __init__(self, opts: EngineOptions) -> None:
        check_addresses(opts)
        check_security(opts)
        check_store(opts)
        self.opts = opts
        self.engine_id = opts.engine_id or f"engine-{uuid.uuid4().hex[:8]}"
        self.pool: SharedPool | None = None
        if opts.backend == "vllm":
            self._start_vllm(opts)
        elif opts.backend == "builtin":
            self._start_builtin(opts)
        else:
            raise ValueError(f"unknown backend {opts.backend!r}; choose builtin or vllm")
        if opts.cluster_key is not None:
            self.service.use_kv_key(opts.cluster_key.kv_key)
            self.service.peer_key = opts.cluster_key
        self.ctx = zmq.asyncio.Context()
        self.rpc_addr = self.events_addr = ""
        self._calls: set[asyncio.Task] = set()
        self._started = time.time()

    def _start_builtin(self, opts: EngineOptions) -> None:
        self.transports = pick_transports(opts.transport, opts.device)

        def factory(spec: KVSpec, num_blocks: int) -> torch.Tensor:
            self.pool = SharedPool(spec, num_blocks, f"microserve-kv-{self.engine_id}")
            return self.pool.tensor

        shared = any(transport_class(t).needs_shared_pool for t in self.transports)
        llm = LLMEngine(opts.model, opts.device, opts.dtype, opts.config,
                        kv_cache_factory=factory if shared else None)
        plane = KVPlane(self.engine_id, llm.runner.kv_cache, llm.kv_spec, self.transports, opts.kv_host,
                        opts.kv_port, self.pool.path if self.pool else "", host_id(), opts.transfer_timeout,
                        best_effort=opts.transport == "auto")
        self.transports = plane.transports
        self.backend = BuiltinBackend(llm, self.engine_id, plane)
        self.service = EngineService(self.backend, opts.lease_s, opts.transfer_timeout, opts.max_lease_s)
        if opts.kv_store:
            self._open_store(llm, opts)

    def _open_store(self, llm: LLMEngine, opts: EngineOptions) -> None:
        from microserve.engine.model.loader import checkpoint_fingerprint
        from microserve.serving.kv_store import StoreLink

        service, backend = self.service, self.backend
        if not isinstance(backend, BuiltinBackend):
            raise ValueError("--kv-store needs the built-in backend")
        key = opts.cluster_key
        link = StoreLink.open(opts.kv_store, llm.runner.kv_cache, llm.kv_spec, checkpoint_fingerprint(opts.model),
                              key.store_key if key else b"", key.store_password if key else None,
                              lambda kind, hashes, tier: service.events.record(kind, hashes, tier, tier == "valkey"))
        backend.use_store(link)
        log.info("engine %s: KV store %s", self.engine_id, link.describe())

    def _start_vllm(self, opts: EngineOptions) -> None:
        from microserve.serving.vllm.engine import VLLM_TRANSPORTS, VLLMBackend, vllm_available

        if not vllm_available():
            raise ValueError("--backend vllm needs vLLM in this environment: pip install 'microserve[vllm]' "
                             "(CPU: see docs/vllm.md)")
        if opts.device != "cpu":
            log.warning("the vLLM backend picks its own device (its build's platform); --device is ignored")
        transports = pick_transports(opts.transport, "cpu", VLLM_TRANSPORTS, shared_pool=False)
        cfg = opts.config or EngineConfig()
        if not cfg.mixed_batches:
            raise ValueError("--no-mixed-batches: vLLM always batches prompt chunks with decodes (chunked prefill)")
        self.backend = VLLMBackend(opts.model, self.engine_id, opts.dtype, block_size=cfg.block_size,
                                   num_kv_blocks=cfg.num_kv_blocks, max_model_len=cfg.max_model_len,
                                   enable_prefix_caching=cfg.enable_prefix_caching,
                                   kv_host=opts.kv_host, kv_port=opts.kv_port, transfer_timeout=opts.transfer_timeout,
                                   transports=transports, best_effort=opts.transport == "auto",
                                   enable_lora=cfg.enable_lora, lora_modules=cfg.lora_modules, max_loras=cfg.max_loras,
                                   max_lora_rank=cfg.max_lora_rank, seed=cfg.seed or 0, engine_args={
                                       "tensor_parallel_size": cfg.tensor_parallel_size,
                                       **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}),
                                       **_given_limits(cfg)})
        self.service = EngineService(self.backend, opts.lease_s, opts.transfer_timeout, opts.max_lease_s)
        self.service.hold.interval = cfg.stream_interval
        self.transports = self.service.transports

    # -- serving ------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event, ready: Callable[[ZMQFrontend], None] | None = None,
                    before_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        self.service.model_name = self.opts.model
        key = self.opts.cluster_key
        auth = key.authenticator(self.ctx) if key is not None else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        if key is not None:
            key.secure_server(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(self.opts.rpc)
        self.rpc_addr = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if key is not None:
            key.secure_server(self.pub)
        self.pub.bind(self.opts.events)
        self.events_addr = self.service.events_addr = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.service.events.sink = lambda event: self.pub.send(protocol.encode(event))
        attend = None
        if isinstance(self.backend, BuiltinBackend):  # NOTE: the engines that lend (DistAttention)
            attend = AttendServer(self.service, self.ctx, self.rpc_addr, key, asyncio.get_running_loop())
            self.service.attend_addr = attend.address
        step_task = asyncio.create_task(self.service.run())
        recv_task = asyncio.create_task(self._recv_loop())
        if ready is not None:
            ready(self)
        await stop.wait()
        if before_stop is not None:  # NOTE: still serving: a deployment it joined drains it first
            await before_stop()
        log.info("engine %s stopping", self.engine_id)
        recv_task.cancel()
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, recv_task, return_exceptions=True)
        self.service.close()
        step_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await step_task
        if attend is not None:
            attend.close()
        self.sock.close(0)
        self.pub.close(0)
        if auth is not None:
            auth.stop()
        self.ctx.term()
        if self.pool is not None:
            self.pool.close()

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) not in (3, 4):  # [ident, call_id, body] or with a W3C traceparent (microserve/tracing.py)
                if len(frames) >= 2:
                    call_id = frames[1] if len(frames) > 2 else b""
                    error = protocol.RPCError(ErrorCode.BAD_REQUEST, "expected [call_id, body(, traceparent)] "
                                                                     f"frames, got {len(frames) - 1}")
                    await self._send(frames[0], call_id, error)
                continue
            ident, call_id, body = frames[:3]
            trace = frames[3].decode("ascii", "replace")[:128] if len(frames) == 4 else ""
            task = asyncio.create_task(self._handle(ident, call_id, body, trace))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _send(self, ident: bytes, call_id: bytes, reply: msgspec.Struct) -> bool:
        try:
            await self.sock.send_multipart([ident, call_id, protocol.encode(reply)])
            return True
        except zmq.ZMQError as exc:  # the caller went away (ROUTER_MANDATORY)
            log.info("reply to a gone client dropped: %s", exc)
            return False

    async def _handle(self, ident: bytes, call_id: bytes, body: bytes, trace: str = "") -> None:
        try:
            call = protocol.decode_call(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._send(ident, call_id, protocol.RPCError(ErrorCode.BAD_REQUEST, f"malformed call: {exc}"))
            return
        name = type(call).__struct_config__.tag
        req = getattr(call, "req", None)
        with tracing.span(f"engine.{name}", parent=trace, server=True, engine=self.engine_id,
                          request=req.request_id if req is not None else getattr(call, "request_id", None)) as span:
            reply = await self._reply(ident, call_id, call)
            if isinstance(reply, protocol.RPCError):
                tracing.end_error(span, f"{reply.code}: {reply.message}")
            tracing.set_attrs(span, bytes=getattr(reply, "bytes", None), transport=getattr(reply, "transport", None),
                              seconds=getattr(reply, "seconds", None), matched=getattr(reply, "matched", None),
                              computed_tokens=getattr(reply, "computed_tokens", None))

    async def _reply(self, ident: bytes, call_id: bytes, call: protocol.Call) -> msgspec.Struct | None:
        """Answer one call (a stream chunk by chunk); what was sent last."""
        try:
            reply = await dispatch(self.service, call)
            if isinstance(reply, AsyncIterator):
                last = None
                async with contextlib.aclosing(reply):
                    async for last in reply:
                        if not await self._send(ident, call_id, last):
                            break
                return last
        except EngineError as exc:
            reply = protocol.RPCError(exc.code, str(exc), exc.peer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("call %s failed", type(call).__name__)
            reply = protocol.RPCError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._send(ident, call_id, reply)
        return reply


def _given_limits(cfg: EngineConfig) -> dict[str, int]:
    """`--max-num-batched-tokens` and `--max-num-seqs` for vLLM's scheduler where they differ from ours
    by default (otherwise vLLM keeps its own defaults for its platform)."""
    default = EngineConfig()
    return {name: getattr(cfg, name) for name in ("max_num_batched_tokens", "max_num_seqs")
            if getattr(cfg, name) != getattr(default, name)}


def run_engine(opts: EngineOptions) -> int:
    """Run until SIGTERM/SIGINT; prints one `READY ...` line when serving."""
    server = ZMQFrontend(opts)
    tracing.setup(opts.otlp_traces_endpoint, f"microserve-engine {server.engine_id}")

    def ready(s: ZMQFrontend) -> None:
        print(f"READY engine={s.engine_id} rpc={s.rpc_addr} events={s.events_addr} "
              f"kv={s.backend.plane.endpoint} transports={','.join(s.transports)}", flush=True)
        log.info("engine %s serving %s: rpc %s, events %s, kv %s (%s)", s.engine_id, opts.model, s.rpc_addr,
                 s.events_addr, s.backend.plane.endpoint, ",".join(s.transports))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        joined: list[asyncio.Task] = []

        def refused(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:  # NOTE: an engine nobody routes to must not idle
                log.error("engine %s: %s; stopping", server.engine_id, task.exception())
                failed.append(task.exception())
                stop.set()

        def up(s: ZMQFrontend) -> None:
            ready(s)
            if opts.join:
                from microserve.control.join import join

                token = opts.cluster_key.join_token if opts.cluster_key else ""
                joined.append(asyncio.ensure_future(join(opts.join, s.rpc_addr, opts.role, token, s.engine_id)))
                joined[0].add_done_callback(refused)

        async def before_stop() -> None:
            if joined:
                from microserve.control.join import leave

                if not joined[0].done():  # NOTE: still a member (a failed join ended the task)
                    joined[0].cancel()
                    await leave(opts.join, server.engine_id, opts.cluster_key.join_token if opts.cluster_key else "")
                joined[0].cancel()

        await server.serve(stop, up, before_stop)

    failed: list[BaseException] = []  # a refused --join
    asyncio.run(main())
    log.info("engine %s stopped", server.engine_id)
    tracing.shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):  # NOTE: a repeated signal must not kill the final teardown
        signal.signal(sig, signal.SIG_IGN)
    return 1 if failed else 0
